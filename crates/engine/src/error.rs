use segstream_decode::{Classify, ErrorClass};
use segstream_scoring::ConfigError;
use segstream_state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Scoring(#[from] ConfigError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(
        "the state in {dir} was built with a different scoring or segments configuration \
         (fingerprint {stored:016x}, now {current:016x}); its segments would not match the new rules. \
         Use a new --state-dir, or the configuration it was built with"
    )]
    ConfigChanged { dir: String, stored: u64, current: u64 },
    /// Rules that do not fit the state (changed without a migration, …).
    #[error("{0}")]
    Rules(String),
    /// Events reached an engine whose rule migration is not finished.
    #[error("a rule migration is under way: it must finish before events are applied")]
    Migrating,
    #[error("corrupt engine metadata `{key}`: {reason}")]
    Meta { key: &'static str, reason: String },
}

impl Classify for EngineError {
    /// Nothing the engine reports can be retried away: its state or its
    /// configuration is wrong, and the run stops before committing.
    fn class(&self) -> ErrorClass {
        ErrorClass::Fatal
    }
}
