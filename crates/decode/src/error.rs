use std::fmt;

/// How the pipeline must react to an error (see STYLE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The record itself is bad: count it, dead-letter it, go on.
    Poison,
    /// Something outside the record failed and may recover: retry with backoff.
    Transient,
    /// Cannot continue: stop cleanly.
    Fatal,
}

/// Every segstream library error says how the pipeline must react to it.
pub trait Classify {
    fn class(&self) -> ErrorClass;
}

/// Why a record could not be turned into an [`crate::Event`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid json: {0}")]
    Json(String),
    #[error("not valid utf-8: {0}")]
    Utf8(String),
    #[error("missing field `{field}`")]
    MissingField { field: &'static str },
    #[error("field `{field}` must be {expected}, got {found}")]
    WrongType { field: &'static str, expected: &'static str, found: String },
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("bad timestamp {value}: {reason}")]
    BadTimestamp { value: String, reason: String },
    #[error("implausible timestamp {value}: {reason}")]
    ImplausibleTimestamp { value: String, reason: String },
    #[error("field `{field}` out of range: {value} ({reason})")]
    OutOfRange { field: &'static str, value: String, reason: &'static str },
    #[error("field `{field}` has unknown value `{value}` (expected one of {allowed})")]
    BadEnum { field: &'static str, value: String, allowed: &'static str },
    #[error("not valid avro: {0}")]
    Avro(String),
    #[error("bad schema registry framing: {0}")]
    WireFormat(String),
    #[error("unknown writer schema id {0}")]
    UnknownSchemaId(u32),
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    #[error("schema registry refused: {0}")]
    RegistryRefused(String),
    #[error("{} has {len} bytes, more than the {max} allowed", if *field == "record" { "the record".to_string() } else { format!("field `{field}`") })]
    TooLarge { field: &'static str, len: usize, max: usize },
    #[error(
        "message key `{key}` is not the event's customer_id `{customer_id}` (SPEC §1: the key is the customer id)"
    )]
    KeyMismatch { key: String, customer_id: String },
}

impl DecodeError {
    /// A short stable name for metrics labels and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "json",
            DecodeError::Utf8(_) => "utf8",
            DecodeError::MissingField { .. } => "missing_field",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::BadTimestamp { .. } => "bad_timestamp",
            DecodeError::ImplausibleTimestamp { .. } => "implausible_timestamp",
            DecodeError::OutOfRange { .. } => "out_of_range",
            DecodeError::BadEnum { .. } => "bad_enum",
            DecodeError::Avro(_) => "avro",
            DecodeError::WireFormat(_) => "wire_format",
            DecodeError::UnknownSchemaId(_) => "unknown_schema_id",
            DecodeError::RegistryUnavailable(_) => "registry_unavailable",
            DecodeError::RegistryRefused(_) => "registry_refused",
            DecodeError::KeyMismatch { .. } => "key_mismatch",
            DecodeError::TooLarge { .. } => "too_large",
        }
    }
}

impl Classify for DecodeError {
    fn class(&self) -> ErrorClass {
        match self {
            DecodeError::RegistryUnavailable(_) => ErrorClass::Transient,
            DecodeError::RegistryRefused(_) => ErrorClass::Fatal,
            _ => ErrorClass::Poison,
        }
    }
}

/// A record that failed to decode, with where it was found and its raw bytes,
/// ready for the dead-letter destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRecord {
    /// Human-readable position, e.g. `events.jsonl:42` or `events.avro#record 17`.
    pub location: String,
    pub error: DecodeError,
    pub raw: Vec<u8>,
}

impl fmt::Display for InvalidRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.error)
    }
}
