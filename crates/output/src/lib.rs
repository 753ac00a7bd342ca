//! Transition output for segstream.
//!
//! Turns [`segstream_scoring::Transition`]s into SPEC §6 records — JSON lines
//! or Avro with the shipped `transition.avsc` — and is the one path by which
//! transitions and dead letters leave the engine: an [`Emitter`] (tally,
//! rate-limited log of invalid records) in front of a [`TransitionSink`].
//! File mode's sink ([`FileSink`]) writes files whose committed length is
//! part of the engine's state commit: after a crash the file is cut back to
//! that length and the replay writes the very same bytes again. Kafka mode's
//! sink lives in `segstream-kafka`.

mod emit;
mod error;
mod file;
mod record;

pub use emit::{DeadLetter, Emitter, FileSink, Flow, Say, SyncedLengths, Tally, Throttle, TransitionSink};
pub use error::OutputError;
pub use file::{CommittedFile, DeadLetterFile, TransitionFile};
pub use record::{
    transition_from_avro_value, transition_schema, transition_to_avro_value, transition_to_json, write_transition_json,
    write_transition_json_with_id, CauseRecord, TransitionRecord, TRANSITION_SCHEMA_JSON,
};
