use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::DecodeError;
use crate::event::{Answer, AttrValue, Event};
use crate::fields::{build_event, flatten, Fields, FlatValue, MAX_RECORD_BYTES};
use crate::time_fmt::parse_rfc3339_millis;

/// The known fields of a JSON event, each kept as raw JSON text so that a
/// wrong type is reported against its field (and only if the event's type uses
/// it: a stray `feature` on a login is an ignored extra field, as SPEC says).
#[derive(Deserialize, Default)]
struct JsonRecord<'a> {
    #[serde(borrow, default)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    customer_id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "type")]
    type_: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ts: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    duration_s: Option<&'a RawValue>,
    #[serde(borrow, default)]
    feature: Option<&'a RawValue>,
    #[serde(borrow, default)]
    workflow: Option<&'a RawValue>,
    #[serde(borrow, default)]
    plan: Option<&'a RawValue>,
    #[serde(borrow, default)]
    mrr_cents: Option<&'a RawValue>,
    #[serde(borrow, default)]
    status: Option<&'a RawValue>,
    #[serde(borrow, default)]
    amount_cents: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ticket_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    action: Option<&'a RawValue>,
    #[serde(borrow, default)]
    priority: Option<&'a RawValue>,
    #[serde(borrow, default)]
    score: Option<&'a RawValue>,
    #[serde(borrow, default)]
    industry: Option<&'a RawValue>,
    #[serde(borrow, default)]
    employees: Option<&'a RawValue>,
    #[serde(borrow, default)]
    country: Option<&'a RawValue>,
    #[serde(borrow, default)]
    question: Option<&'a RawValue>,
    #[serde(borrow, default)]
    answer: Option<&'a RawValue>,
    #[serde(borrow, default)]
    attributes: Option<&'a RawValue>,
}

impl<'a> JsonRecord<'a> {
    fn raw(&self, name: &str) -> Option<&'a RawValue> {
        let v = match name {
            "event_id" => self.event_id,
            "customer_id" => self.customer_id,
            "type" => self.type_,
            "ts" => self.ts,
            "user_id" => self.user_id,
            "duration_s" => self.duration_s,
            "feature" => self.feature,
            "workflow" => self.workflow,
            "plan" => self.plan,
            "mrr_cents" => self.mrr_cents,
            "status" => self.status,
            "amount_cents" => self.amount_cents,
            "ticket_id" => self.ticket_id,
            "action" => self.action,
            "priority" => self.priority,
            "score" => self.score,
            "industry" => self.industry,
            "employees" => self.employees,
            "country" => self.country,
            "question" => self.question,
            "answer" => self.answer,
            "attributes" => self.attributes,
            _ => None,
        };
        // `null` counts as absent, like a missing key.
        v.filter(|r| r.get() != "null")
    }
}

fn shown(raw: &RawValue) -> String {
    let s = raw.get();
    if s.len() > 64 {
        let cut = (0..=64).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        format!("{}…", &s[..cut])
    } else {
        s.to_string()
    }
}

fn wrong(field: &'static str, expected: &'static str, raw: &RawValue) -> DecodeError {
    DecodeError::WrongType { field, expected, found: shown(raw) }
}

/// An attribute value as JSON gives it.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonAttr {
    Str(String),
    Num(f64),
    Bool(bool),
    List(Vec<String>),
}

impl Fields for JsonRecord<'_> {
    fn answer(&self) -> Result<Option<Answer>, DecodeError> {
        let Some(r) = self.raw("answer") else { return Ok(None) };
        match serde_json::from_str::<JsonAttr>(r.get()) {
            Ok(JsonAttr::Str(s)) => Ok(Some(Answer::Str(s))),
            Ok(JsonAttr::Num(n)) => Ok(Some(Answer::Num(n))),
            _ => Err(wrong("answer", "a string or a number", r)),
        }
    }

    fn attributes(&self) -> Result<Option<Vec<(String, AttrValue)>>, DecodeError> {
        let Some(r) = self.raw("attributes") else { return Ok(None) };
        let expected = "an object of strings, numbers, booleans and lists of strings";
        // By name (a name given twice keeps its last value).
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r.get()).map_err(|_| wrong("attributes", expected, r))?;
        let mut out = Vec::with_capacity(map.len());
        for (name, v) in map {
            let value = match serde_json::from_value::<JsonAttr>(v) {
                Ok(JsonAttr::Str(s)) => AttrValue::Str(s),
                Ok(JsonAttr::Num(n)) => AttrValue::Num(n),
                Ok(JsonAttr::Bool(b)) => AttrValue::Bool(b),
                Ok(JsonAttr::List(l)) => AttrValue::List(l),
                Err(_) => return Err(wrong("attributes", expected, r)),
            };
            out.push((name, value));
        }
        crate::fields::checked_attributes(out).map(Some)
    }

    fn text(&self, name: &'static str) -> Result<Option<Cow<'_, str>>, DecodeError> {
        let Some(r) = self.raw(name) else { return Ok(None) };
        // The raw value is valid JSON already: a string without escapes is
        // its own content, borrowed.
        let s = r.get();
        if let Some(inner) = s.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            if !inner.contains('\\') {
                return Ok(Some(Cow::Borrowed(inner)));
            }
        }
        serde_json::from_str::<String>(s).map(|v| Some(Cow::Owned(v))).map_err(|_| wrong(name, "a string", r))
    }

    fn integer(&self, name: &'static str) -> Result<Option<i64>, DecodeError> {
        let Some(r) = self.raw(name) else { return Ok(None) };
        if let Ok(v) = r.get().parse::<i64>() {
            return Ok(Some(v));
        }
        serde_json::from_str::<i64>(r.get()).map(Some).map_err(|_| wrong(name, "an integer", r))
    }

    fn timestamp(&self, name: &'static str) -> Result<Option<i64>, DecodeError> {
        let Some(r) = self.raw(name) else { return Ok(None) };
        if r.get().starts_with('"') {
            let s = self.text(name)?.ok_or_else(|| wrong(name, "a timestamp", r))?;
            parse_rfc3339_millis(&s).map(Some).map_err(|reason| DecodeError::BadTimestamp { value: shown(r), reason })
        } else if let Ok(ms) = r.get().parse::<i64>() {
            Ok(Some(ms))
        } else {
            serde_json::from_str::<i64>(r.get()).map(Some).map_err(|_| DecodeError::BadTimestamp {
                value: shown(r),
                reason: "expected an RFC 3339 string or integer epoch milliseconds".into(),
            })
        }
    }
}

/// Decodes one JSON line (without its newline) into an [`Event`].
pub fn decode_json_line(line: &[u8]) -> Result<Event, DecodeError> {
    if line.len() > MAX_RECORD_BYTES {
        return Err(DecodeError::TooLarge { field: "record", len: line.len(), max: MAX_RECORD_BYTES });
    }
    let text = std::str::from_utf8(line).map_err(|e| DecodeError::Utf8(e.to_string()))?;
    // Serde would also accept a JSON array as a positional record: refuse it.
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => DecodeError::Json("expected a json object".into()),
            Err(e) => DecodeError::Json(e.to_string()),
        });
    }
    let record: JsonRecord<'_> = serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    build_event(&record)
}

/// The `ts` of the event a JSON line would decode to, read without decoding
/// the rest: a cheap pass over a file's event times (is it in time order?).
/// Every line that [`decode_json_line`] accepts gives its event's `ts` here;
/// a line it rejects may give one too, or `None`. So when the values given
/// for a file's lines never decrease, neither do its events' times.
pub fn json_line_ts(line: &[u8]) -> Option<i64> {
    let raw = match top_level_field(line, b"ts") {
        Scan::Found(raw) => raw,
        Scan::Absent => return None,
        Scan::Unsure => return json_line_ts_decoded(line),
    };
    let raw: &RawValue = serde_json::from_str(std::str::from_utf8(raw).ok()?).ok()?;
    // The same reading of the value as the full decode's.
    let record = JsonRecord { ts: Some(raw), ..JsonRecord::default() };
    record.timestamp("ts").ok().flatten()
}

/// [`json_line_ts`] through serde: for lines the byte scan leaves to it.
fn json_line_ts_decoded(line: &[u8]) -> Option<i64> {
    #[derive(Deserialize)]
    struct TsOnly<'a> {
        #[serde(borrow, default)]
        ts: Option<&'a RawValue>,
    }
    let text = std::str::from_utf8(line).ok()?;
    let only: TsOnly<'_> = serde_json::from_str(text).ok()?;
    let record = JsonRecord { ts: only.ts, ..JsonRecord::default() };
    record.timestamp("ts").ok().flatten()
}

/// What [`top_level_field`] found.
enum Scan<'a> {
    /// The raw bytes of the field's value (the first occurrence).
    Found(&'a [u8]),
    /// The object ended without the field.
    Absent,
    /// Not the plain shape the scan reads (a key with an escape, an empty
    /// object, broken JSON): ask serde.
    Unsure,
}

/// Finds field `key` among the keys of the JSON object `line` by skipping
/// values without decoding them. It does not validate: for a line serde
/// accepts, it finds what serde would; for another line, anything.
fn top_level_field<'a>(line: &'a [u8], key: &[u8]) -> Scan<'a> {
    let ws = |mut i: usize| {
        while line.get(i).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) {
            i += 1;
        }
        i
    };
    let mut i = ws(0);
    if line.get(i) != Some(&b'{') {
        return Scan::Unsure;
    }
    i += 1;
    loop {
        i = ws(i);
        if line.get(i) != Some(&b'"') {
            return Scan::Unsure;
        }
        let start = i + 1;
        let Some(len) = line[start..].iter().position(|b| matches!(b, b'"' | b'\\')) else { return Scan::Unsure };
        if line[start + len] == b'\\' {
            return Scan::Unsure;
        }
        let name = &line[start..start + len];
        i = ws(start + len + 1);
        if line.get(i) != Some(&b':') {
            return Scan::Unsure;
        }
        let value = ws(i + 1);
        let Some(end) = skip_value(line, value) else { return Scan::Unsure };
        if name == key {
            return Scan::Found(&line[value..end]);
        }
        i = ws(end);
        match line.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return Scan::Absent,
            _ => return Scan::Unsure,
        }
    }
}

/// The index after the JSON value starting at `i` (`None`: no value there,
/// or it does not end).
fn skip_value(line: &[u8], i: usize) -> Option<usize> {
    match *line.get(i)? {
        b'"' => skip_string(line, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *line.get(j)? {
                    b'"' => {
                        j = skip_string(line, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let len = line[i..].iter().position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'));
            let end = i + len.unwrap_or(line.len() - i);
            (end > i).then_some(end)
        }
    }
}

/// The index after the JSON string whose opening quote is at `i`.
fn skip_string(line: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += line.get(j..)?.iter().position(|b| matches!(b, b'"' | b'\\'))?;
        if line[j] == b'"' {
            return Some(j + 1);
        }
        j += 2;
    }
}

/// Encodes an event as one JSON object (no newline), `ts` as epoch milliseconds.
pub fn event_to_json(e: &Event) -> String {
    let mut m = serde_json::Map::new();
    for (name, v) in flatten(e) {
        let v = match v {
            FlatValue::Str(s) => serde_json::Value::from(s),
            FlatValue::Int(i) => serde_json::Value::from(i),
            FlatValue::Answer(Answer::Str(s)) => serde_json::Value::from(s.as_str()),
            FlatValue::Answer(Answer::Num(n)) => serde_json::Value::from(*n),
            FlatValue::Attributes(attrs) => serde_json::Value::Object(
                attrs
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            AttrValue::Str(s) => serde_json::Value::from(s.as_str()),
                            AttrValue::Num(n) => serde_json::Value::from(*n),
                            AttrValue::Bool(b) => serde_json::Value::from(*b),
                            AttrValue::List(l) => serde_json::Value::from(l.clone()),
                        };
                        (k.clone(), v)
                    })
                    .collect(),
            ),
        };
        m.insert(name.to_string(), v);
    }
    serde_json::Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, Priority, SubscriptionStatus, TicketAction};

    fn ok(s: &str) -> Event {
        decode_json_line(s.as_bytes()).expect("valid event")
    }

    fn err(s: &str) -> DecodeError {
        decode_json_line(s.as_bytes()).expect_err("invalid event")
    }

    #[test]
    fn the_ts_alone_is_that_of_every_event_decoded() {
        let lines = [
            r#"{"event_id":"e","customer_id":"c","type":"login","ts":1767225600000}"#,
            r#"{"ts":"2026-01-01T10:00:00.250+02:00","event_id":"e","customer_id":"c","type":"login"}"#,
            r#"{"event_id":"e","customer_id":"c","type":"login","ts":"2026-01-01T10:00:00\u005a"}"#,
            r#"{"event_id":"e","customer_id":"c","type":"profile","ts":5,"attributes":{"ts":7,"x":[ "a" ]}}"#,
            r#"{"event_id":"e","customer_id":"c","type":"login","note":{"ts":9},"ts":-3}"#,
            r#" {"event_id":"e","customer_id":"c","type":"login","ts":1.0e3}"#,
            r#"{"event_id":"e","customer_id":"c","type":"login","ts":null}"#,
            r#"{"event_id":"e","customer_id":"c","type":"login"}"#,
            r#"{"event_id":"e","customer_id":"c","type":"login","ts":true}"#,
            r#"{"event_id":"e","customer_id":"c","type":"login","ts":1,"ts":2}"#,
            r#"[1,2]"#,
            r#"{"event_id":"e","customer_id":"c","type":"login","ts":4"#,
            r#"{"event_id":"e","type":"login","ts":8}"#,
        ];
        let mut events = 0;
        for line in lines {
            let ts = json_line_ts(line.as_bytes());
            match decode_json_line(line.as_bytes()) {
                Ok(e) => {
                    events += 1;
                    assert_eq!(ts, Some(e.ts), "{line}");
                }
                // A rejected line may give a ts (it only makes the order
                // check look closer); these give the first one they hold.
                Err(_) => assert!(
                    ts.is_none() || [r#""ts":8"#, r#""ts":1,"#, r#""ts":4"#].iter().any(|t| line.contains(t)),
                    "{line}: {ts:?}"
                ),
            }
        }
        assert_eq!(events, 5);
        assert_eq!(
            json_line_ts(br#"{"event_id":"e","type":"login","ts":8}"#),
            Some(8),
            "not an event, a ts all the same"
        );
    }

    proptest::proptest! {
        /// Lines cut, doubled or altered anywhere: whichever of them decode
        /// to an event give that event's ts (by the byte scan, or serde
        /// where the scan is unsure).
        #[test]
        fn the_ts_scan_agrees_with_the_decode_on_altered_lines(
            base in 0usize..7,
            at in 0usize..200,
            len in 0usize..4,
            with in proptest::sample::select(vec!["", "\\", "\"", "{", "}", "[", "]", ",", ":", " ", "\\u0074", "\"ts\":2,", "x"]),
        ) {
            let lines = [
                r#"{"event_id":"e","customer_id":"c","type":"login","ts":1767225600000}"#,
                r#"{"attributes":{"crm":"hub\"spot","ts":[1,{"ts":2}]},"customer_id":"c","event_id":"e","ts":"2026-01-01T00:00:00Z","type":"profile"}"#,
                r#"{ "event_id" : "e\\" , "customer_id":"c", "type":"login", "ts" : 12 , "x":null}"#,
                r#"{"event_id":"e","customer_id":"c","type":"feature_used","feature":"a,b}","ts":-5}"#,
                r#"{"t\u0073":7,"event_id":"e","customer_id":"c","type":"login"}"#,
                r#"{"event_id":"e","customer_id":"c","type":"survey","question":"q","answer":[1],"ts":3}"#,
                r#"{"event_id":"e\",\"ts\":1,\"","customer_id":"c","type":"login","ts":5}"#,
            ];
            let line = lines[base];
            let at = at.min(line.len());
            let end = (at + len).min(line.len());
            let altered = format!("{}{}{}", &line[..at], with, &line[end..]);
            if let Ok(e) = decode_json_line(altered.as_bytes()) {
                proptest::prop_assert_eq!(json_line_ts(altered.as_bytes()), Some(e.ts), "{}", altered);
            }
        }
    }

    #[test]
    fn oversized_ids_fields_and_records_are_too_large() {
        let id = "c".repeat(MAX_RECORD_BYTES.min(600 << 10));
        let e = err(&format!(r#"{{"event_id":"e","customer_id":"{id}","type":"login","ts":1}}"#));
        assert!(matches!(e, DecodeError::TooLarge { field: "customer_id", .. }), "{e}");
        let plan = "p".repeat(crate::MAX_TEXT_BYTES + 1);
        let e = err(&format!(
            r#"{{"event_id":"e","customer_id":"c","type":"subscription","ts":1,"plan":"{plan}","mrr_cents":1,"status":"active"}}"#
        ));
        assert!(matches!(e, DecodeError::TooLarge { field: "plan", .. }), "{e}");
        let e = err(&format!(
            r#"{{"event_id":"e","customer_id":"c","type":"login","ts":1,"pad":"{}"}}"#,
            "x".repeat(MAX_RECORD_BYTES)
        ));
        assert_eq!(e.kind(), "too_large");
        let e = err(&format!(r#"{{"event_id":"e","customer_id":"c","type":"{}","ts":1}}"#, "t".repeat(10_000)));
        assert!(e.to_string().len() < 200, "error messages clip long values: {e}");
        ok(&format!(r#"{{"event_id":"e","customer_id":"{}","type":"login","ts":1}}"#, "c".repeat(crate::MAX_ID_BYTES)));
    }

    #[test]
    fn surveys_and_profile_attributes_decode_and_round_trip() {
        let s = ok(r#"{"event_id":"s","customer_id":"c","type":"survey","ts":1,"question":"role","answer":"admin"}"#);
        assert_eq!(s.kind, EventKind::Survey { question: "role".into(), answer: Answer::Str("admin".into()) });
        let n = ok(r#"{"event_id":"s","customer_id":"c","type":"survey","ts":1,"question":"ease","answer":6.5}"#);
        assert_eq!(n.kind, EventKind::Survey { question: "ease".into(), answer: Answer::Num(6.5) });
        assert_eq!(ok(&event_to_json(&n)), n);
        assert!(matches!(
            err(r#"{"event_id":"s","customer_id":"c","type":"survey","ts":1,"question":"q"}"#),
            DecodeError::MissingField { field: "answer" }
        ));
        assert!(matches!(
            err(r#"{"event_id":"s","customer_id":"c","type":"survey","ts":1,"question":"q","answer":[1]}"#),
            DecodeError::WrongType { field: "answer", .. }
        ));
        let p = ok(
            r#"{"event_id":"p","customer_id":"c","type":"profile","ts":1,"attributes":{"platform":"web","seats":12,"sso":true,"integrations":["slack","jira"]}}"#,
        );
        let EventKind::Profile { attributes, .. } = &p.kind else { panic!("a profile") };
        assert_eq!(
            attributes,
            &vec![
                ("integrations".to_string(), AttrValue::List(vec!["slack".into(), "jira".into()])),
                ("platform".to_string(), AttrValue::Str("web".into())),
                ("seats".to_string(), AttrValue::Num(12.0)),
                ("sso".to_string(), AttrValue::Bool(true)),
            ]
        );
        assert_eq!(ok(&event_to_json(&p)), p);
        assert!(matches!(
            err(r#"{"event_id":"p","customer_id":"c","type":"profile","ts":1,"attributes":{"nested":{"a":1}}}"#),
            DecodeError::WrongType { field: "attributes", .. }
        ));
        let many: Vec<String> = (0..=crate::fields::MAX_ATTRIBUTES).map(|i| format!(r#""a{i}":1"#)).collect();
        let e = err(&format!(
            r#"{{"event_id":"p","customer_id":"c","type":"profile","ts":1,"attributes":{{{}}}}}"#,
            many.join(",")
        ));
        assert_eq!(e.kind(), "too_large");
    }

    #[test]
    fn decodes_every_type() {
        let base = r#""event_id":"e1","customer_id":"c1","ts":"2026-01-01T00:00:00Z""#;
        let cases = [
            (r#""type":"login","user_id":"u""#, "login"),
            (r#""type":"session","duration_s":30"#, "session"),
            (r#""type":"feature_used","feature":"reports""#, "feature_used"),
            (r#""type":"workflow_completed","workflow":"w""#, "workflow_completed"),
            (r#""type":"subscription","plan":"pro","mrr_cents":5000,"status":"active""#, "subscription"),
            (r#""type":"payment","amount_cents":5000,"status":"failed""#, "payment"),
            (r#""type":"ticket","ticket_id":"t","action":"opened","priority":"urgent""#, "ticket"),
            (r#""type":"nps","score":9"#, "nps"),
            (r#""type":"profile","industry":"fintech","employees":40"#, "profile"),
            (r#""type":"customer_deleted""#, "customer_deleted"),
        ];
        for (extra, ty) in cases {
            let e = ok(&format!("{{{base},{extra}}}"));
            assert_eq!(e.kind.type_name(), ty);
            assert_eq!(e.ts, 1_767_225_600_000);
            let again = decode_json_line(event_to_json(&e).as_bytes()).expect("round trip");
            assert_eq!(again, e);
        }
    }

    #[test]
    fn epoch_millis_and_extra_fields() {
        let e = ok(
            r#"{"event_id":"e","customer_id":"c","type":"ticket","ts":1000,"ticket_id":"t9","action":"closed","priority":"low","feature":7,"x":{"y":[1]}}"#,
        );
        assert_eq!(e.ts, 1000);
        assert_eq!(
            e.kind,
            EventKind::Ticket { ticket_id: "t9".into(), action: TicketAction::Closed, priority: Priority::Low }
        );
        let s = ok(
            r#"{"event_id":"e","customer_id":"c","type":"subscription","ts":5,"plan":"p","mrr_cents":0,"status":"canceled","user_id":null}"#,
        );
        assert!(matches!(s.kind, EventKind::Subscription { status: SubscriptionStatus::Canceled, .. }));
    }

    #[test]
    fn every_invalid_kind_is_typed() {
        assert!(matches!(err("not json"), DecodeError::Json(_)));
        assert_eq!(err("[1,2]"), DecodeError::Json("expected a json object".into()));
        assert!(matches!(decode_json_line(b"{\"a\":\"\xff\"}"), Err(DecodeError::Utf8(_))));
        assert_eq!(
            err(r#"{"customer_id":"c","type":"login","ts":1}"#),
            DecodeError::MissingField { field: "event_id" }
        );
        assert_eq!(
            err(r#"{"event_id":"e","customer_id":"c","type":"login"}"#),
            DecodeError::MissingField { field: "ts" }
        );
        assert_eq!(
            err(r#"{"event_id":"e","customer_id":7,"type":"login","ts":1}"#),
            DecodeError::WrongType { field: "customer_id", expected: "a string", found: "7".into() }
        );
        assert_eq!(
            err(r#"{"event_id":"e","customer_id":"c","type":"click","ts":1}"#),
            DecodeError::UnknownType("click".into())
        );
        assert!(matches!(
            err(r#"{"event_id":"e","customer_id":"c","type":"login","ts":"2026-02-30T00:00:00Z"}"#),
            DecodeError::BadTimestamp { .. }
        ));
        assert!(matches!(
            err(r#"{"event_id":"e","customer_id":"c","type":"login","ts":1.5}"#),
            DecodeError::BadTimestamp { .. }
        ));
        // Far outside any calendar the engine can add windows to.
        assert!(matches!(
            err(r#"{"event_id":"e","customer_id":"c","type":"login","ts":9223372036854775807}"#),
            DecodeError::BadTimestamp { .. }
        ));
        assert!(matches!(
            err(r#"{"event_id":"e","customer_id":"c","type":"login","ts":-9223372036854775808}"#),
            DecodeError::BadTimestamp { .. }
        ));
        assert_eq!(
            ok(r#"{"event_id":"e","customer_id":"c","type":"login","ts":"9999-12-31T23:59:59.999Z"}"#).ts,
            crate::MAX_TS
        );
        assert_eq!(
            err(r#"{"event_id":"e","customer_id":"c","type":"nps","ts":1,"score":11}"#),
            DecodeError::OutOfRange { field: "score", value: "11".into(), reason: "nps score must be 0..10" }
        );
        assert!(matches!(
            err(r#"{"event_id":"e","customer_id":"c","type":"payment","ts":1,"amount_cents":-5,"status":"failed"}"#),
            DecodeError::OutOfRange { field: "amount_cents", .. }
        ));
        assert!(matches!(
            err(r#"{"event_id":"e","customer_id":"c","type":"payment","ts":1,"amount_cents":5,"status":"bounced"}"#),
            DecodeError::BadEnum { field: "status", .. }
        ));
        assert_eq!(
            err(r#"{"event_id":"e","customer_id":"","type":"login","ts":1}"#),
            DecodeError::OutOfRange { field: "customer_id", value: "\"\"".into(), reason: "must not be empty" }
        );
        assert_eq!(
            err(r#"{"event_id":"e","customer_id":"c","type":"feature_used","ts":1}"#),
            DecodeError::MissingField { field: "feature" }
        );
        assert!(matches!(
            err(r#"{"event_id":"e","customer_id":"c","type":"session","ts":1,"duration_s":"long"}"#),
            DecodeError::WrongType { field: "duration_s", .. }
        ));
    }
}
