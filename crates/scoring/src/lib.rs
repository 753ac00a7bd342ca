//! Scoring for segstream: the pure, deterministic heart of the engine.
//!
//! Given a customer's rolling state ([`CustomerState`]) and an instant, it
//! computes SPEC §4 scores and §5 segments, finds the next instant at which
//! time alone changes a segment ([`Scorer::next_boundary`]), and runs events
//! and passing time through the customer's state machine, producing SPEC §6
//! transitions. No I/O, no clock, no async: time is always an argument, so
//! every mode of the engine (file, Kafka, replay) shares this exact logic.

mod boundary;
mod config;
mod quantile;
mod rules;
mod scorer;
mod state;
mod transition;

pub use config::{
    AdoptionConfig, CustomGroupConfig, EngagementConfig, FrequencyConfig, HealthConfig, HealthSegmentsConfig,
    HealthWeights, MonetaryConfig, QuantileConfig, RecencyConfig, RfmAxis, RfmConfig, RuleConfig, ScoringConfig,
    ScoringMode, SegmentsConfig, SentimentConfig, TicketPenalty, ValueConfig,
};
pub use quantile::{Edges, Population};
pub use rules::{Condition, Metric, RuleError, RuleInput, Val};
pub use scorer::{ConfigError, Group, Outcome, Scorer, Scores};
pub use state::{
    day, id_hash, CustomerState, NamedValues, Profile, DEDUP_IDS, MAX_FEATURES, MAX_NAMED_VALUES, MAX_OPEN_TICKETS,
};
pub use transition::{Boundary, BoundaryKind, Cause, Transition};
