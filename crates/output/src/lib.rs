//! Transition output for segstream.
//!
//! Turns [`segstream_scoring::Transition`]s into SPEC §6 records — JSON lines
//! or Avro with the shipped `transition.avsc` — and writes them, and the
//! dead-letter records of invalid input, to files whose committed length is
//! part of the engine's state commit: after a crash the file is cut back to
//! that length and the replay writes the very same bytes again.

mod error;
mod record;
mod sink;

pub use error::OutputError;
pub use record::{
    transition_from_avro_value, transition_schema, transition_to_avro_value, transition_to_json, CauseRecord,
    TransitionRecord,
    TRANSITION_SCHEMA_JSON,
};
pub use sink::{CommittedFile, DeadLetterFile, OutputFormat, TransitionFile};
