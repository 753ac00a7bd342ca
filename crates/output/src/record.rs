//! The SPEC §6 transition record, in JSON and Avro.

use std::sync::OnceLock;

use apache_avro::types::Value;
use apache_avro::Schema;
use segstream_decode::{format_rfc3339_millis, write_rfc3339_millis};
use segstream_scoring::{Cause, Scores, Transition};
use serde::{Deserialize, Serialize};

pub const TRANSITION_SCHEMA_JSON: &str = include_str!("../schemas/transition.avsc");

/// The parsed `transition.avsc`.
pub fn transition_schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| Schema::parse_str(TRANSITION_SCHEMA_JSON).expect("the shipped transition schema is valid"))
}

/// A transition as it appears on the wire; also what tests and consumers read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub customer_id: String,
    pub group: String,
    pub from: Option<String>,
    pub to: Option<String>,
    /// RFC 3339, milliseconds, UTC.
    pub at: String,
    pub cause: CauseRecord,
    pub scores: Scores,
    pub transition_id: String,
    /// The rules version that produced it (records written before versions
    /// existed read as 1).
    #[serde(default = "first_version")]
    pub rules_version: u32,
}

fn first_version() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CauseRecord {
    Event {
        event_id: String,
    },
    Time {
        boundary: String,
    },
    /// A rule migration re-evaluated the customer.
    Rules {
        from_version: u32,
        to_version: u32,
    },
    /// A recomputation of the quantile edges re-evaluated the customer.
    Requantile,
}

impl From<&Transition> for TransitionRecord {
    fn from(t: &Transition) -> Self {
        Self {
            customer_id: t.customer_id.clone(),
            group: t.group.to_string(),
            from: t.from.as_deref().map(str::to_string),
            to: t.to.as_deref().map(str::to_string),
            at: format_rfc3339_millis(t.at),
            cause: match &t.cause {
                Cause::Event(id) => CauseRecord::Event { event_id: id.clone() },
                Cause::Time(kind) => CauseRecord::Time { boundary: kind.name() },
                Cause::Rules { from, to } => CauseRecord::Rules { from_version: *from, to_version: *to },
                Cause::Requantile => CauseRecord::Requantile,
            },
            scores: t.scores,
            transition_id: t.transition_id().to_string(),
            rules_version: t.rules_version,
        }
    }
}

/// One JSON line (without the newline).
pub fn transition_to_json(t: &Transition) -> String {
    let mut out = Vec::with_capacity(384);
    write_transition_json(t, &mut out);
    String::from_utf8(out).expect("JSON text is UTF-8")
}

/// Appends the JSON record of `t` to `out`: the bytes of
/// [`TransitionRecord`] serialized by serde_json (a test keeps them equal),
/// without building the record's strings first (the output's hot path).
pub fn write_transition_json(t: &Transition, out: &mut Vec<u8>) {
    write_transition_json_with_id(t, t.transition_id(), out);
}

/// [`write_transition_json`] with the transition's id computed already
/// (`t.transition_id()`, a SHA-1): for a caller that needs the id too.
pub fn write_transition_json_with_id(t: &Transition, transition_id: uuid::Uuid, out: &mut Vec<u8>) {
    fn text(out: &mut Vec<u8>, s: &str) {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
    }
    fn opt(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => text(out, s),
            None => out.extend_from_slice(b"null"),
        }
    }
    fn num(out: &mut Vec<u8>, n: impl itoa::Integer) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    out.extend_from_slice(b"{\"customer_id\":");
    text(out, &t.customer_id);
    out.extend_from_slice(b",\"group\":");
    text(out, &t.group);
    out.extend_from_slice(b",\"from\":");
    opt(out, t.from.as_deref());
    out.extend_from_slice(b",\"to\":");
    opt(out, t.to.as_deref());
    out.extend_from_slice(b",\"at\":\"");
    write_rfc3339_millis(t.at, out);
    out.extend_from_slice(b"\",\"cause\":{\"kind\":");
    match &t.cause {
        Cause::Event(id) => {
            out.extend_from_slice(b"\"event\",\"event_id\":");
            text(out, id);
        }
        Cause::Time(kind) => {
            out.extend_from_slice(b"\"time\",\"boundary\":");
            text(out, &kind.name());
        }
        Cause::Rules { from, to } => {
            out.extend_from_slice(b"\"rules\",\"from_version\":");
            num(out, *from);
            out.extend_from_slice(b",\"to_version\":");
            num(out, *to);
        }
        Cause::Requantile => out.extend_from_slice(b"\"requantile\""),
    }
    let s = &t.scores;
    for (i, (name, v)) in [
        ("R", u16::from(s.r)),
        ("F", u16::from(s.f)),
        ("M", u16::from(s.m)),
        ("adoption", u16::from(s.adoption)),
        ("health", u16::from(s.health)),
        ("engagement", u16::from(s.engagement)),
        ("recency", u16::from(s.recency)),
        ("support", u16::from(s.support)),
        ("billing", u16::from(s.billing)),
        ("sentiment", u16::from(s.sentiment)),
        ("active_days", s.active_days),
        ("features", s.features),
    ]
    .into_iter()
    .enumerate()
    {
        out.extend_from_slice(if i == 0 { b"},\"scores\":{\"" } else { b",\"" });
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        num(out, v);
    }
    out.extend_from_slice(b"},\"transition_id\":\"");
    let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.extend_from_slice(transition_id.hyphenated().encode_lower(&mut id).as_bytes());
    out.extend_from_slice(b"\",\"rules_version\":");
    num(out, t.rules_version);
    out.push(b'}');
}

fn opt_str(v: Option<&str>) -> Value {
    match v {
        Some(s) => Value::Union(1, Box::new(Value::String(s.to_string()))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

/// The Avro value of a transition, matching [`transition_schema`].
pub fn transition_to_avro_value(t: &Transition) -> Value {
    let (kind, event_id, boundary, versions) = match &t.cause {
        Cause::Event(id) => ("event", Some(id.as_str()), None, None),
        Cause::Time(k) => ("time", None, Some(k.name()), None),
        Cause::Rules { from, to } => ("rules", None, None, Some((*from, *to))),
        Cause::Requantile => ("requantile", None, None, None),
    };
    let opt_int = |v: Option<u32>| match v {
        Some(n) => Value::Union(1, Box::new(Value::Int(i32::try_from(n).unwrap_or(i32::MAX)))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let s = &t.scores;
    let int = |v: u8| Value::Int(i32::from(v));
    Value::Record(vec![
        ("customer_id".into(), Value::String(t.customer_id.clone())),
        ("group".into(), Value::String(t.group.to_string())),
        ("from".into(), opt_str(t.from.as_deref())),
        ("to".into(), opt_str(t.to.as_deref())),
        ("at".into(), Value::TimestampMillis(t.at)),
        (
            "cause".into(),
            Value::Record(vec![
                ("kind".into(), Value::String(kind.into())),
                ("event_id".into(), opt_str(event_id)),
                ("boundary".into(), opt_str(boundary.as_deref())),
                ("from_version".into(), opt_int(versions.map(|v| v.0))),
                ("to_version".into(), opt_int(versions.map(|v| v.1))),
            ]),
        ),
        (
            "scores".into(),
            Value::Record(vec![
                ("R".into(), int(s.r)),
                ("F".into(), int(s.f)),
                ("M".into(), int(s.m)),
                ("adoption".into(), int(s.adoption)),
                ("health".into(), int(s.health)),
                ("engagement".into(), int(s.engagement)),
                ("recency".into(), int(s.recency)),
                ("support".into(), int(s.support)),
                ("billing".into(), int(s.billing)),
                ("sentiment".into(), int(s.sentiment)),
                ("active_days".into(), Value::Int(i32::from(s.active_days))),
                ("features".into(), Value::Int(i32::from(s.features))),
            ]),
        ),
        ("transition_id".into(), Value::Uuid(t.transition_id())),
        ("rules_version".into(), Value::Int(i32::try_from(t.rules_version).unwrap_or(i32::MAX))),
    ])
}

/// `value` with only the fields `schema` has (records, recursively): a
/// record of this version written with an earlier version's schema.
pub fn project(value: Value, schema: &Schema) -> Value {
    match (value, schema) {
        (Value::Record(fields), Schema::Record(rs)) => Value::Record(
            fields
                .into_iter()
                .filter_map(|(name, v)| {
                    let field = &rs.fields[*rs.lookup.get(&name)?];
                    Some((name, project(v, &field.schema)))
                })
                .collect(),
        ),
        (v, _) => v,
    }
}

/// Reads a transition back from an Avro value (for tests and tools).
pub fn transition_from_avro_value(v: &Value) -> Result<TransitionRecord, String> {
    let json = avro_to_json(v)?;
    serde_json::from_value(json).map_err(|e| e.to_string())
}

fn avro_to_json(v: &Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match v {
        Value::Null => J::Null,
        Value::String(s) => J::String(s.clone()),
        Value::Int(i) => J::from(*i),
        Value::Long(i) => J::from(*i),
        Value::TimestampMillis(ms) => J::String(format_rfc3339_millis(*ms)),
        Value::Uuid(u) => J::String(u.to_string()),
        Value::Union(_, inner) => avro_to_json(inner)?,
        Value::Record(fields) => {
            let mut map = serde_json::Map::new();
            for (k, v) in fields {
                map.insert(k.clone(), avro_to_json(v)?);
            }
            if let Some(J::String(kind)) = map.get("kind").cloned() {
                // The cause's unused branch is null in Avro and absent in JSON.
                map.retain(|_, v| !v.is_null());
                map.insert("kind".into(), J::String(kind));
            }
            J::Object(map)
        }
        other => return Err(format!("unexpected avro value {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use segstream_scoring::BoundaryKind;
    use std::sync::Arc;

    fn sample(cause: Cause) -> Transition {
        Transition {
            customer_id: "acme".into(),
            group: Arc::from("rfm"),
            from: Some(Arc::from("champions")),
            to: Some(Arc::from("loyal_customers")),
            at: 1_700_000_000_123,
            cause,
            scores: Scores {
                r: 4,
                f: 5,
                m: 3,
                adoption: 40,
                health: 71,
                engagement: 100,
                recency: 75,
                support: 100,
                billing: 100,
                sentiment: 50,
                active_days: 50,
                features: 2,
            },
            rules_version: 1,
        }
    }

    /// The hand-written encoder gives serde_json's bytes of the record, for
    /// every cause, null ends, and names that need escaping.
    #[test]
    fn the_json_writer_equals_the_serialized_record() {
        let kinds = BoundaryKind::from_bits(BoundaryKind::RECENCY | BoundaryKind::DWELL);
        for cause in [
            Cause::Event("e-\"1\"\\\n".into()),
            Cause::Time(kinds),
            Cause::Rules { from: 3, to: 40 },
            Cause::Requantile,
        ] {
            for (from, to) in [(Some("a\u{1}é"), None), (None, Some("champions"))] {
                let mut t = sample(cause.clone());
                t.customer_id = "c\"u\\s\t😀".into();
                t.from = from.map(Arc::from);
                t.to = to.map(Arc::from);
                t.at = -1;
                t.rules_version = 7;
                t.scores.active_days = 65535;
                let want = serde_json::to_string(&TransitionRecord::from(&t)).expect("serializes");
                assert_eq!(transition_to_json(&t), want);
            }
        }
    }

    #[test]
    fn json_record_has_spec_fields() {
        let t = sample(Cause::Event("e-1".into()));
        let v: serde_json::Value = serde_json::from_str(&transition_to_json(&t)).expect("json");
        assert_eq!(v["customer_id"], "acme");
        assert_eq!(v["group"], "rfm");
        assert_eq!(v["from"], "champions");
        assert_eq!(v["to"], "loyal_customers");
        assert_eq!(v["at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["cause"], serde_json::json!({"kind": "event", "event_id": "e-1"}));
        assert_eq!(v["scores"]["R"], 4);
        assert_eq!(v["scores"]["health"], 71);
        assert_eq!(v["transition_id"], t.transition_id().to_string());
        assert_eq!(v["rules_version"], 1);
        let mut migrated = sample(Cause::Rules { from: 1, to: 2 });
        migrated.rules_version = 2;
        let v: serde_json::Value = serde_json::from_str(&transition_to_json(&migrated)).expect("json");
        assert_eq!(v["cause"], serde_json::json!({"kind": "rules", "from_version": 1, "to_version": 2}));
        assert_eq!(v["rules_version"], 2);
    }

    #[test]
    fn avro_round_trips_to_the_json_record() {
        let kind = BoundaryKind::from_bits(BoundaryKind::RECENCY | BoundaryKind::FREQUENCY);
        for cause in [Cause::Event("e-9".into()), Cause::Time(kind), Cause::Rules { from: 2, to: 3 }, Cause::Requantile]
        {
            let mut t = sample(cause);
            t.from = None;
            let v = transition_to_avro_value(&t);
            let bytes = apache_avro::to_avro_datum(transition_schema(), v).expect("valid against schema");
            let back = apache_avro::from_avro_datum(transition_schema(), &mut bytes.as_slice(), None).expect("reads");
            let rec = transition_from_avro_value(&back).expect("converts");
            if let CauseRecord::Time { boundary } = &rec.cause {
                assert_eq!(boundary, "recency+frequency");
            }
            let json: TransitionRecord = serde_json::from_str(&transition_to_json(&t)).expect("json");
            assert_eq!(rec, json);
        }
    }
}
