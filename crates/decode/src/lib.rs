//! Event decoding for segstream: the SPEC §1 event model and the decoders that
//! turn bytes into it — JSON lines, Avro object container files and single Avro
//! messages in the Confluent Schema Registry wire format ([`wire`]).
//!
//! Every decoder goes through one validation path ([`fields`]), so JSON and Avro
//! accept and reject exactly the same records, with the same typed errors.
//! No I/O here beyond bytes in, events out. [`ErrorClass`], the poison /
//! transient / fatal classification every segstream error carries, lives
//! here because every other crate depends on this one.

mod avro;
mod error;
mod event;
mod fields;
mod format;
mod json;
mod time_fmt;
pub mod wire;

pub use avro::{
    decode_wire, event_schema, event_to_avro_value, event_to_wire, needs_resolution, AvroFileReader, SchemaLookup,
    StaticSchemas, WriterSchema, EVENT_SCHEMA_JSON, MAX_AVRO_ALLOCATION,
};
pub use error::{Classify, DecodeError, ErrorClass, InvalidRecord};
pub use event::{Answer, AttrValue, Event, EventKind, PaymentStatus, Priority, SubscriptionStatus, TicketAction};
pub use fields::{clip, MAX_ID_BYTES, MAX_RECORD_BYTES, MAX_TEXT_BYTES, MAX_TS, MIN_TS};
pub use format::Format;
pub use json::{decode_json_line, event_to_json, json_line_ts};
pub use time_fmt::{format_rfc3339_millis, parse_rfc3339_millis, write_rfc3339_millis, DAY_MS};
