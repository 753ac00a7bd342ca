//! segstream's Kafka mode: a consumer group in, each transition exactly once
//! out, per-partition state in RocksDB backed by a compacted changelog topic,
//! without broker transactions (ADR 004; the protocol is in ARCHITECTURE.md,
//! "Kafka mode").
//!
//! Threads: the caller's thread polls the group consumer and runs the
//! rebalance callbacks ([`group`]); each assigned partition is a task on its
//! own thread ([`partition`]) with its own engine and idempotent producer.
//! The decisions of the protocol are pure and tested without a broker:
//! whether local state is current ([`restore`]), what a replay must not do
//! again ([`replay`]), the order of several topics ([`runlog`]), the next
//! commit marker ([`marker`]) and the order of a commit's steps ([`commit`]).

pub mod changelog;
mod client;
mod clock;
pub mod commit;
mod config;
mod error;
pub mod fence;
mod follower;
pub mod gauges;
mod group;
pub mod marker;
mod metrics;
pub mod owners;
mod partition;
mod preflight;
mod producer;
mod quantile;
mod record;
mod registry;
pub mod replay;
pub mod restore;
pub mod runlog;
mod schemas;
mod settings;
mod sink;
mod stop;
pub mod testhooks;

pub use config::{InputTopic, KafkaConfig, KeyPartitioner};
pub use error::Error;
pub use follower::OutputFollower;
pub use group::run;
pub use metrics::{KindLabel, Metrics, PartitionState, TallyPublished, TransitionLabel};
pub use registry::{Registry, RegistryError};
pub use settings::{
    property_from_env, KafkaEnvironment, KafkaOverrides, KafkaSettings, ADVERTISED_URL_ENV, REGISTRY_USER_INFO_ENV,
};
pub use stop::StopFlag;
