//! The pipeline definition file (`--config <TOML>`) as written: time,
//! state, scoring, segments and Kafka mode. Every field has SPEC's default;
//! `config/default.toml` spells them all out. What it resolves to, with the
//! command line and the environment, is [`crate::settings`].

use std::num::NonZeroU64;
use std::path::Path;
use std::time::Duration;

use segstream_engine::{EngineError, EngineSettings, TimeWindow};
use segstream_kafka::KafkaConfig;
use segstream_scoring::{ScoringConfig, SegmentsConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The version of the scoring and segment rules, stamped on every
    /// transition. Raising it with changed rules migrates a state dir to
    /// them (as `--migrate-rules` does); unset, a state keeps its version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules_version: Option<u32>,
    pub time: TimeConfig,
    pub state: StateConfig,
    pub history: HistoryConfig,
    pub scoring: ScoringConfig,
    pub segments: SegmentsConfig,
    /// Kafka mode (`segstream run` without `--input`); absent in file mode.
    pub kafka: Option<KafkaConfig>,
    /// `segstream webhook`: which transitions go where.
    pub webhook: Option<crate::webhook::WebhookConfig>,
}

/// SPEC §2: time advances with the largest event `ts` seen, less this lateness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeConfig {
    /// Milliseconds the watermark stays behind the largest `ts` seen, so that
    /// events up to this much out of order are not late. 0 = strictly event time.
    pub allowed_lateness_ms: u64,
    /// Events before this instant (RFC 3339 or epoch ms) are implausible and
    /// dead-lettered, e.g. "2000-01-01T00:00:00Z" to catch epoch seconds sent
    /// as milliseconds. Unset: any time is accepted, as SPEC says.
    pub earliest_event: Option<String>,
    /// Events more than this many ms ahead of their input's clock (Kafka:
    /// the record's timestamp; file mode: the wall clock when the file was
    /// first read) are implausible and dead-lettered. 0 = no limit.
    pub max_future_ms: u64,
}

/// `time.max_future_ms`'s default: 366 days, so a year ahead is accepted
/// and a typo a century ahead is not.
pub const DEFAULT_MAX_FUTURE_MS: u64 = 366 * 86_400_000;

impl Default for TimeConfig {
    fn default() -> Self {
        Self { allowed_lateness_ms: 0, earliest_event: None, max_future_ms: DEFAULT_MAX_FUTURE_MS }
    }
}

/// What the state keeps for the query API besides each customer's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Transitions kept per customer (with their scores), for
    /// `GET /v1/customers/{id}`; 0 keeps none.
    pub per_customer: u32,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self { per_customer: 50 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Customers kept in memory between commits.
    pub cache_customers: usize,
    /// RocksDB block cache, MiB.
    pub block_cache_mib: usize,
    /// RocksDB memtable size per column family, MiB.
    pub write_buffer_mib: usize,
    /// Input records between two commits of state + input position + output
    /// length. Commits happen at multiples of this record number, so a resumed
    /// run commits exactly where an uninterrupted one would.
    pub commit_every_records: NonZeroU64,
    /// File mode: memory for sorting an input that is not in time order,
    /// MiB; more spills to sorted runs under the state dir.
    pub sort_buffer_mib: usize,
}

/// `state.sort_buffer_mib`'s default.
pub const DEFAULT_SORT_BUFFER_MIB: usize = 256;

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            cache_customers: 500_000,
            block_cache_mib: 64,
            write_buffer_mib: 32,
            commit_every_records: NonZeroU64::new(1_000_000).expect("non-zero"),
            sort_buffer_mib: DEFAULT_SORT_BUFFER_MIB,
        }
    }
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The engine's settings, validated (the rules are checked here, once).
    pub fn engine_settings(&self) -> Result<EngineSettings, EngineError> {
        let state = segstream_state::StateOptions {
            cache_customers: self.state.cache_customers,
            block_cache_bytes: self.state.block_cache_mib << 20,
            write_buffer_bytes: self.state.write_buffer_mib << 20,
            history_per_customer: self.history.per_customer,
        };
        let earliest = match &self.time.earliest_event {
            None => None,
            Some(t) => Some(
                t.parse::<i64>()
                    .or_else(|_| segstream_decode::parse_rfc3339_millis(t))
                    .map_err(|e| EngineError::Config(format!("time.earliest_event {t:?}: {e}")))?,
            ),
        };
        if let Some(v) = self.rules_version.filter(|v| *v == 0 || i32::try_from(*v).is_err()) {
            return Err(EngineError::Config(format!("rules_version must be 1 to {}, got {v}", i32::MAX)));
        }
        let max_future = i64::try_from(self.time.max_future_ms).map_err(|_| {
            EngineError::Config(format!("time.max_future_ms is too large: {}", self.time.max_future_ms))
        })?;
        let window = TimeWindow { earliest, max_future: (max_future > 0).then_some(max_future) };
        Ok(EngineSettings::new(
            self.scoring.clone(),
            self.segments.clone(),
            Duration::from_millis(self.time.allowed_lateness_ms),
            state,
            self.state.commit_every_records,
        )?
        .with_window(window)
        .with_rules_policy(segstream_engine::RulesPolicy { version: self.rules_version, migrate: false }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_toml_equals_the_built_in_defaults() {
        let text = include_str!("../../../config/default.toml");
        assert_eq!(Config::from_toml(text).expect("parses"), Config::default());
    }

    #[test]
    fn the_kafka_example_parses_with_its_stated_values() {
        let cfg = Config::from_toml(include_str!("../../../config/kafka.example.toml")).expect("parses");
        let k = cfg.kafka.expect("[kafka] section");
        assert_eq!(k.input_topic, "segstream.events");
        assert_eq!(k.changelog_topic, "");
        assert_eq!(k.metrics_addr, "127.0.0.1:9464", "works on a laptop as is: loopback");
        assert!(k.state_dir.is_relative(), "state under the working directory");
        assert_eq!(cfg.scoring, Config::default().scoring);
    }

    #[test]
    fn one_field_of_a_section_keeps_the_defaults_of_the_others() {
        let cfg = Config::from_toml("[segments.health]\ngreen_min = 75\n[scoring.frequency]\nwindow_days = 60\n")
            .expect("partial sections");
        assert_eq!((cfg.segments.health.green_min, cfg.segments.health.yellow_min), (75, 40));
        assert_eq!(cfg.scoring.frequency.window_days, 60);
        assert_eq!(cfg.scoring.frequency.min_active_days, Config::default().scoring.frequency.min_active_days);
        cfg.engine_settings().expect("valid");
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = Config::from_toml("[time]\nallowed_lateness = 5\n").expect_err("unknown field");
        assert!(err.to_string().contains("allowed_lateness"), "{err}");
    }

    #[test]
    fn a_rules_version_must_be_a_positive_avro_int() {
        for bad in ["rules_version = 0\n", "rules_version = 3000000000\n"] {
            let cfg = Config::from_toml(bad).expect("parses");
            let err = cfg.engine_settings().expect_err("refused").to_string();
            assert!(err.contains("rules_version must be 1 to"), "{err}");
        }
        assert!(Config::from_toml("rules_version = 7\n").expect("parses").engine_settings().is_ok());
    }
}
