use std::time::Duration;

use rdkafka::error::KafkaError;
use segstream_decode::{Classify, ErrorClass};
use segstream_engine::EngineError;

use crate::changelog::ChangelogError;
use crate::registry::RegistryError;
use crate::stop::RetryError;

/// Why Kafka mode (or one of its partitions) stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A broker request failed; worth retrying.
    #[error("{what}: {source}")]
    Broker { what: String, source: KafkaError },
    /// A broker request kept failing for the whole retry budget.
    #[error("{what}: {source} (gave up after {waited:?})")]
    BrokerGaveUp { what: String, source: KafkaError, waited: Duration },
    /// No data arrived for a range that must be read (restore, output tails).
    #[error("{0}")]
    ReadStalled(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Topics or settings that cannot work (missing topic, wrong partition
    /// count, changelog not compacted, a changed configuration).
    #[error("{0}")]
    Setup(String),
    /// librdkafka could not deliver a record after its own retries.
    #[error("{0}; stopping so that recovery re-sends it exactly once")]
    Delivery(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A partition task ended with this error (the first of them).
    #[error("{0}")]
    PartitionFailed(String),
    /// Another instance owns the partition now (a newer owner record in its
    /// changelog, or the group said this instance's assignment was lost):
    /// this one stopped writing to it.
    #[error("{0}")]
    Fenced(String),
    /// The partition (or the process) was told to stop during a wait.
    #[error("stopped while waiting")]
    Stopped,
}

impl Error {
    pub(crate) fn broker(what: impl Into<String>) -> impl FnOnce(KafkaError) -> Self {
        let what = what.into();
        move |source| Self::Broker { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    pub(crate) fn from_retry(what: &str, e: RetryError<KafkaError>) -> Self {
        match e {
            RetryError::Stopped => Self::Stopped,
            RetryError::GaveUp { last, waited } => Self::BrokerGaveUp { what: what.to_string(), source: last, waited },
        }
    }
}

impl Classify for Error {
    fn class(&self) -> ErrorClass {
        match self {
            Error::Broker { .. } => ErrorClass::Transient,
            Error::Registry(e) => e.class(),
            Error::Engine(e) => e.class(),
            Error::BrokerGaveUp { .. }
            | Error::ReadStalled(_)
            | Error::Changelog(_)
            | Error::Setup(_)
            | Error::Delivery(_)
            | Error::PartitionFailed(_)
            | Error::Io { .. }
            | Error::Fenced(_)
            | Error::Stopped => ErrorClass::Fatal,
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Changelog(ChangelogError::Encode(e.to_string()))
    }
}
