//! The segstream engine: events and the passage of event time in, SPEC §6
//! transitions out, on durable per-customer state.
//!
//! [`Engine`] owns the event-time clock (SPEC §2), the counters and a
//! [`segstream_state::StateStore`]; it runs events through the pure
//! [`segstream_scoring::Scorer`] and fires time boundaries through the
//! store's timer index. It knows nothing of files or Kafka: file mode (the
//! `segstream` binary) and Kafka mode (`segstream-kafka`) both drive it, and
//! both commit their positions together with its state through
//! [`Engine::commit`]. Its settings are resolved once, before it opens
//! ([`EngineSettings`]).

mod engine;
mod error;
mod rules;
mod settings;

pub use engine::{
    read_series, Clock, Counters, Engine, MigrationStep, QuantileMeta, RulesCheck, SegmentCounts, META_QUANTILE,
};
pub use error::EngineError;
pub use rules::{
    decide as decide_rules, rules_mismatch, Decision as RulesDecision, MigrationProgress, RulesMeta, MIGRATION_BATCH,
};
pub use settings::{EngineSettings, RulesPolicy, TimeWindow};
