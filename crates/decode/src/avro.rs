use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::sync::OnceLock;

use apache_avro::types::Value;
use apache_avro::{from_avro_datum, Reader, Schema};

use crate::error::DecodeError;
use crate::event::{Answer, AttrValue, Event};
use crate::fields::{build_event, flatten, Fields, FlatValue, FIELD_NAMES};
use crate::time_fmt::parse_rfc3339_millis;

/// The Avro schema of an input event, shipped with the project (`schemas/event.avsc`).
pub const EVENT_SCHEMA_JSON: &str = include_str!("../schemas/event.avsc");

/// The most apache-avro may allocate for one value (a string, bytes, a
/// block) while decoding: a forged length makes it zero-fill that much, and
/// its own default is 512 MiB. Set on the first decoding.
pub const MAX_AVRO_ALLOCATION: usize = 64 << 20;

/// Runs an apache-avro call that parses a schema from outside (a container
/// file's header, a registry's answer): apache-avro 0.21 panics on some
/// invalid schemas (an invalid record name is `unwrap`ped in
/// `Name::parse`), which must be an error here, not a crash.
fn contain<T>(what: &str, f: impl FnOnce() -> Result<T, DecodeError>) -> Result<T, DecodeError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the Avro library failed");
            Err(DecodeError::Avro(format!("{what}: {}", crate::fields::clip(why))))
        }
    }
}

fn limit_allocations() {
    apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION);
}

/// The parsed input-event schema; readers resolve every writer schema to it.
pub fn event_schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| Schema::parse_str(EVENT_SCHEMA_JSON).expect("shipped event.avsc is a valid schema"))
}

struct AvroRecord<'a>(&'a [(String, Value)]);

fn unwrap_union(v: &Value) -> &Value {
    match v {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

fn kind_of(v: &Value) -> String {
    let s = format!("{v:?}");
    let head = s.split(['(', ' ', '{']).next().unwrap_or("value");
    head.to_string()
}

impl AvroRecord<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| unwrap_union(v)).filter(|v| !matches!(v, Value::Null))
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Double(d) => Some(*d),
        Value::Float(f) => Some(f64::from(*f)),
        Value::Long(l) => Some(*l as f64),
        Value::Int(i) => Some(f64::from(*i)),
        _ => None,
    }
}

impl Fields for AvroRecord<'_> {
    fn answer(&self) -> Result<Option<Answer>, DecodeError> {
        match self.get("answer") {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(Answer::Str(s.clone()))),
            Some(v) => number(v).map(|n| Some(Answer::Num(n))).ok_or_else(|| DecodeError::WrongType {
                field: "answer",
                expected: "a string or a number",
                found: kind_of(v),
            }),
        }
    }

    fn attributes(&self) -> Result<Option<Vec<(String, AttrValue)>>, DecodeError> {
        let wrong = |v: &Value| DecodeError::WrongType {
            field: "attributes",
            expected: "a map of strings, numbers, booleans and lists of strings",
            found: kind_of(v),
        };
        let Some(v) = self.get("attributes") else { return Ok(None) };
        let Value::Map(map) = v else { return Err(wrong(v)) };
        let mut out = Vec::with_capacity(map.len());
        for (name, v) in map {
            let value = match unwrap_union(v) {
                Value::String(s) => AttrValue::Str(s.clone()),
                Value::Boolean(b) => AttrValue::Bool(*b),
                Value::Array(items) => AttrValue::List(
                    items
                        .iter()
                        .map(|i| match unwrap_union(i) {
                            Value::String(s) => Ok(s.clone()),
                            other => Err(wrong(other)),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                other => AttrValue::Num(number(other).ok_or_else(|| wrong(other))?),
            };
            out.push((name.clone(), value));
        }
        // By name, as the JSON decoder gives them (a map has no order).
        out.sort_by(|a, b| a.0.cmp(&b.0));
        crate::fields::checked_attributes(out).map(Some)
    }

    fn text(&self, name: &'static str) -> Result<Option<Cow<'_, str>>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) | Some(Value::Enum(_, s)) => Ok(Some(Cow::Borrowed(s))),
            Some(other) => Err(DecodeError::WrongType { field: name, expected: "a string", found: kind_of(other) }),
        }
    }

    fn integer(&self, name: &'static str) -> Result<Option<i64>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Long(i)) => Ok(Some(*i)),
            Some(Value::Int(i)) => Ok(Some(i64::from(*i))),
            Some(other) => Err(DecodeError::WrongType { field: name, expected: "an integer", found: kind_of(other) }),
        }
    }

    fn timestamp(&self, name: &'static str) -> Result<Option<i64>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::TimestampMillis(t)) | Some(Value::Long(t)) => Ok(Some(*t)),
            Some(Value::TimestampMicros(t)) => Ok(Some(t.div_euclid(1000))),
            Some(Value::String(s)) => parse_rfc3339_millis(s)
                .map(Some)
                .map_err(|reason| DecodeError::BadTimestamp { value: s.clone(), reason }),
            Some(other) => Err(DecodeError::BadTimestamp {
                value: kind_of(other),
                reason: "expected timestamp-millis, long or an RFC 3339 string".into(),
            }),
        }
    }
}

/// Builds an event from a decoded Avro value (already resolved to [`event_schema`]).
fn event_from_value(v: &Value) -> Result<Event, DecodeError> {
    match v {
        Value::Record(fields) => build_event(&AvroRecord(fields)),
        other => Err(DecodeError::Avro(format!("expected a record, got {}", kind_of(other)))),
    }
}

/// The Avro value of an event under [`event_schema`], for writing container
/// files or wire-format messages.
pub fn event_to_avro_value(e: &Event) -> Value {
    let flat = flatten(e);
    let fields = FIELD_NAMES
        .iter()
        .map(|&name| {
            let found = flat.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
            let v = match (name, found) {
                ("ts", Some(FlatValue::Int(t))) => Value::TimestampMillis(*t),
                ("event_id" | "customer_id" | "type", Some(FlatValue::Str(s))) => Value::String((*s).to_string()),
                ("score", Some(FlatValue::Int(i))) => Value::Union(1, Box::new(Value::Int(*i as i32))),
                (_, Some(FlatValue::Answer(Answer::Str(s)))) => Value::Union(1, Box::new(Value::String(s.clone()))),
                (_, Some(FlatValue::Answer(Answer::Num(n)))) => Value::Union(2, Box::new(Value::Double(*n))),
                (_, Some(FlatValue::Attributes(attrs))) => Value::Union(
                    1,
                    Box::new(Value::Map(
                        attrs
                            .iter()
                            .map(|(k, v)| {
                                let v = match v {
                                    AttrValue::Str(s) => Value::Union(0, Box::new(Value::String(s.clone()))),
                                    AttrValue::Num(n) => Value::Union(1, Box::new(Value::Double(*n))),
                                    AttrValue::Bool(b) => Value::Union(2, Box::new(Value::Boolean(*b))),
                                    AttrValue::List(l) => Value::Union(
                                        3,
                                        Box::new(Value::Array(l.iter().map(|s| Value::String(s.clone())).collect())),
                                    ),
                                };
                                (k.clone(), v)
                            })
                            .collect(),
                    )),
                ),
                (_, Some(FlatValue::Int(i))) => Value::Union(1, Box::new(Value::Long(*i))),
                (_, Some(FlatValue::Str(s))) => Value::Union(1, Box::new(Value::String((*s).to_string()))),
                (_, None) => Value::Union(0, Box::new(Value::Null)),
            };
            (name.to_string(), v)
        })
        .collect();
    Value::Record(fields)
}

/// One event as a wire-format message (header for `schema_id`, then the
/// datum under [`event_schema`]): what an Avro producer of events sends.
pub fn event_to_wire(e: &Event, schema_id: u32) -> Vec<u8> {
    let datum = apache_avro::to_avro_datum(event_schema(), event_to_avro_value(e))
        .expect("an event's value always matches the event schema");
    crate::wire::frame(schema_id, &datum)
}

/// Reads events from an Avro object container file, resolving the file's
/// writer schema to [`event_schema`]. Yields one result per record; a record
/// that cannot be read at all ends the iteration after its error, since the
/// rest of the block cannot be located.
pub struct AvroFileReader<R: Read> {
    inner: Reader<'static, R>,
    failed: bool,
    last_invalid: Option<Value>,
}

impl<R: Read> AvroFileReader<R> {
    pub fn new(input: R) -> Result<Self, DecodeError> {
        limit_allocations();
        let inner = contain("invalid container file header", || {
            Reader::with_schema(event_schema(), input).map_err(|e| DecodeError::Avro(e.to_string()))
        })?;
        Ok(Self { inner, failed: false, last_invalid: None })
    }

    /// The record behind the last error, as JSON text, for the dead-letter
    /// destination (`None` when the record could not be read at all).
    pub fn take_invalid_json(&mut self) -> Option<String> {
        let v = self.last_invalid.take()?;
        serde_json::Value::try_from(v).ok().map(|j| j.to_string())
    }
}

impl<R: Read> Iterator for AvroFileReader<R> {
    type Item = Result<Event, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        self.last_invalid = None;
        match self.inner.next()? {
            Ok(v) => {
                let e = event_from_value(&v);
                if e.is_err() {
                    self.last_invalid = Some(v);
                }
                Some(e)
            }
            Err(e) => {
                self.failed = true;
                Some(Err(DecodeError::Avro(format!("unreadable record, rest of file skipped: {e}"))))
            }
        }
    }
}

/// A writer schema, and whether data written with it needs resolution to
/// [`event_schema`] (it does not when the two are the same schema, the common
/// case, and resolution is the most expensive part of decoding).
#[derive(Debug, Clone, Copy)]
pub struct WriterSchema<'a> {
    pub schema: &'a Schema,
    pub needs_resolution: bool,
}

/// Where writer schemas come from for the Schema Registry wire format.
pub trait SchemaLookup {
    fn writer_schema(&self, id: u32) -> Result<WriterSchema<'_>, DecodeError>;
}

/// Whether a writer schema differs from the reader schema (by Parsing Canonical Form).
pub fn needs_resolution(writer: &Schema) -> bool {
    writer.canonical_form() != event_schema().canonical_form()
}

/// A fixed map of schema id → writer schema (from local `.avsc` files).
#[derive(Debug, Clone, Default)]
pub struct StaticSchemas(HashMap<u32, (Schema, bool)>);

impl StaticSchemas {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert_json(&mut self, id: u32, schema_json: &str) -> Result<(), DecodeError> {
        let schema = contain("invalid writer schema", || {
            Schema::parse_str(schema_json).map_err(|e| DecodeError::Avro(e.to_string()))
        })?;
        let resolve = needs_resolution(&schema);
        self.0.insert(id, (schema, resolve));
        Ok(())
    }

    pub fn contains(&self, id: u32) -> bool {
        self.0.contains_key(&id)
    }
}

impl SchemaLookup for StaticSchemas {
    fn writer_schema(&self, id: u32) -> Result<WriterSchema<'_>, DecodeError> {
        self.0
            .get(&id)
            .map(|(schema, needs_resolution)| WriterSchema { schema, needs_resolution: *needs_resolution })
            .ok_or(DecodeError::UnknownSchemaId(id))
    }
}

/// Decodes one message in the Schema Registry wire format: magic byte 0, a
/// 4-byte big-endian schema id, then the Avro datum written with that schema.
pub fn decode_wire(bytes: &[u8], schemas: &dyn SchemaLookup) -> Result<Event, DecodeError> {
    if bytes.len() > crate::fields::MAX_RECORD_BYTES {
        let max = crate::fields::MAX_RECORD_BYTES;
        return Err(DecodeError::TooLarge { field: "record", len: bytes.len(), max });
    }
    let (id, mut datum) = crate::wire::split(bytes)?;
    limit_allocations();
    let writer = schemas.writer_schema(id)?;
    let reader = writer.needs_resolution.then(event_schema);
    let value = from_avro_datum(writer.schema, &mut datum, reader).map_err(|e| DecodeError::Avro(e.to_string()))?;
    if !datum.is_empty() {
        return Err(DecodeError::WireFormat(format!("{} trailing bytes after the datum", datum.len())));
    }
    event_from_value(&value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, PaymentStatus};
    use apache_avro::{to_avro_datum, Writer};

    fn sample() -> Event {
        Event {
            event_id: "e1".into(),
            customer_id: "c1".into(),
            ts: 1_767_225_600_000,
            kind: EventKind::Payment { amount_cents: 990, status: PaymentStatus::Failed },
        }
    }

    fn wire(id: u32, schema: &Schema, v: Value) -> Vec<u8> {
        crate::wire::frame(id, &to_avro_datum(schema, v).expect("encodes"))
    }

    #[test]
    fn container_file_round_trip() {
        let mut w = Writer::new(event_schema(), Vec::new());
        w.append(event_to_avro_value(&sample())).expect("append");
        let bytes = w.into_inner().expect("flush");
        let events: Vec<_> = AvroFileReader::new(&bytes[..]).expect("header").collect();
        assert_eq!(events, vec![Ok(sample())]);
    }

    #[test]
    fn invalid_container_records_are_kept_for_dead_letters() {
        let mut bad = sample();
        bad.kind = EventKind::Nps { score: 10 };
        let mut v = event_to_avro_value(&bad);
        if let Value::Record(fields) = &mut v {
            for (name, value) in fields.iter_mut() {
                if name == "score" {
                    *value = Value::Union(1, Box::new(Value::Int(42)));
                }
            }
        }
        let mut w = Writer::new(event_schema(), Vec::new());
        w.append(v).expect("append");
        w.append(event_to_avro_value(&sample())).expect("append");
        let bytes = w.into_inner().expect("flush");
        let mut r = AvroFileReader::new(&bytes[..]).expect("header");
        assert!(matches!(r.next(), Some(Err(DecodeError::OutOfRange { field: "score", .. }))));
        let raw: serde_json::Value = serde_json::from_str(&r.take_invalid_json().expect("kept")).expect("json");
        assert_eq!(raw["score"], 42);
        assert_eq!(raw["event_id"], "e1");
        assert_eq!(r.next(), Some(Ok(sample())));
        assert_eq!(r.take_invalid_json(), None);
    }

    #[test]
    fn wire_format_resolves_an_older_writer_schema() {
        // An older producer schema: fewer optional fields, `status` absent
        // from the writer, and fields in another order.
        let old = r#"{"type":"record","name":"CustomerEvent","namespace":"io.segstream","fields":[
            {"name":"ts","type":"long"},
            {"name":"type","type":"string"},
            {"name":"customer_id","type":"string"},
            {"name":"event_id","type":"string"},
            {"name":"score","type":["null","int"],"default":null}]}"#;
        let mut schemas = StaticSchemas::new();
        schemas.insert_json(7, old).expect("schema");
        let writer = schemas.writer_schema(7).expect("present");
        assert!(writer.needs_resolution);
        let writer = writer.schema.clone();
        let v = Value::Record(vec![
            ("ts".into(), Value::Long(1000)),
            ("type".into(), Value::String("nps".into())),
            ("customer_id".into(), Value::String("c".into())),
            ("event_id".into(), Value::String("e".into())),
            ("score".into(), Value::Union(1, Box::new(Value::Int(9)))),
        ]);
        let e = decode_wire(&wire(7, &writer, v), &schemas).expect("decodes");
        assert_eq!(e.kind, EventKind::Nps { score: 9 });
        assert_eq!(e.ts, 1000);

        let v = Value::Record(vec![
            ("ts".into(), Value::Long(1000)),
            ("type".into(), Value::String("nps".into())),
            ("customer_id".into(), Value::String("c".into())),
            ("event_id".into(), Value::String("e".into())),
            ("score".into(), Value::Union(1, Box::new(Value::Int(12)))),
        ]);
        assert!(matches!(decode_wire(&wire(7, &writer, v), &schemas), Err(DecodeError::OutOfRange { .. })));
    }

    #[test]
    fn schemas_the_avro_library_panics_on_are_errors() {
        let bad = EVENT_SCHEMA_JSON.replacen("CustomerEvent", "CustomerEv!nt", 1);
        let e = StaticSchemas::new().insert_json(3, &bad).expect_err("an invalid record name");
        assert!(matches!(e, DecodeError::Avro(ref m) if m.contains("invalid writer schema")), "{e}");
        let mut w = Writer::new(event_schema(), Vec::new());
        w.append(event_to_avro_value(&sample())).expect("append");
        let file = w.into_inner().expect("flush");
        let at = file.windows(13).position(|x| x == b"CustomerEvent").expect("name in the header");
        let mut broken = file.clone();
        broken[at + 10] = b'!';
        let e = AvroFileReader::new(&broken[..]).err().expect("an invalid header schema");
        assert!(e.to_string().contains("invalid container file header"), "{e}");
    }

    #[test]
    fn surveys_and_attributes_in_avro_and_older_writers_without_them() {
        let p = crate::decode_json_line(
            br#"{"event_id":"p","customer_id":"c","type":"profile","ts":1,"attributes":{"crm":"hubspot","n":2,"b":false,"l":["x"]}}"#,
        )
        .expect("valid");
        let s = crate::decode_json_line(
            br#"{"event_id":"s","customer_id":"c","type":"survey","ts":2,"question":"q","answer":3}"#,
        )
        .expect("valid");
        let mut schemas = StaticSchemas::new();
        schemas.insert_json(1, EVENT_SCHEMA_JSON).expect("schema");
        for e in [&p, &s] {
            assert_eq!(decode_wire(&event_to_wire(e, 1), &schemas).as_ref(), Ok(e));
        }
        let mut w = Writer::new(event_schema(), Vec::new());
        w.append(event_to_avro_value(&p)).expect("append");
        w.append(event_to_avro_value(&s)).expect("append");
        let bytes = w.into_inner().expect("flush");
        let events: Vec<_> = AvroFileReader::new(&bytes[..]).expect("header").collect();
        assert_eq!(events, vec![Ok(p.clone()), Ok(s)]);
        // A producer still on the schema before these fields: resolved, defaults null.
        let old: serde_json::Value = serde_json::from_str(EVENT_SCHEMA_JSON).expect("json");
        let mut old = old;
        let fields = old["fields"].as_array_mut().expect("fields");
        fields.retain(|f| !["question", "answer", "attributes"].contains(&f["name"].as_str().unwrap_or("")));
        schemas.insert_json(2, &old.to_string()).expect("older schema");
        let login = sample();
        let old_schema = Schema::parse_str(&old.to_string()).expect("parses");
        let mut v = event_to_avro_value(&login);
        if let Value::Record(f) = &mut v {
            f.retain(|(n, _)| !["question", "answer", "attributes"].contains(&n.as_str()));
        }
        let datum = apache_avro::to_avro_datum(&old_schema, v).expect("encodes");
        assert_eq!(decode_wire(&crate::wire::frame(2, &datum), &schemas), Ok(login));
    }

    #[test]
    fn wire_format_errors() {
        let mut schemas = StaticSchemas::new();
        schemas.insert_json(1, EVENT_SCHEMA_JSON).expect("schema");
        assert!(!schemas.writer_schema(1).expect("present").needs_resolution);
        assert!(matches!(decode_wire(&[0, 0], &schemas), Err(DecodeError::WireFormat(_))));
        assert!(matches!(decode_wire(&[1, 0, 0, 0, 1, 2], &schemas), Err(DecodeError::WireFormat(_))));
        assert_eq!(decode_wire(&[0, 0, 0, 0, 9, 2], &schemas), Err(DecodeError::UnknownSchemaId(9)));
        assert!(matches!(decode_wire(&[0, 0, 0, 0, 1, 0xff, 0xff], &schemas), Err(DecodeError::Avro(_))));
        let mut good = wire(1, event_schema(), event_to_avro_value(&sample()));
        assert_eq!(decode_wire(&good, &schemas), Ok(sample()));
        good.push(0);
        assert!(matches!(decode_wire(&good, &schemas), Err(DecodeError::WireFormat(_))));
    }
}
