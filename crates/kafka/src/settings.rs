//! Kafka mode's settings, resolved once at start from the `[kafka]` section,
//! the command line's overrides and the environment. Nothing after start
//! reads the environment or derives a setting again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use segstream_decode::{Format, StaticSchemas};

use crate::config::{InputTopic, KafkaConfig};
use crate::registry::Registry;
use crate::testhooks::{FaultInjection, CRASH_AT_ENV};

/// Overrides `kafka.schema_registry_user_info` (keeps the secret out of the file).
pub const REGISTRY_USER_INFO_ENV: &str = "SEGSTREAM_SCHEMA_REGISTRY_USER_INFO";

/// Command-line flags that override the `[kafka]` section.
#[derive(Debug, Clone, Default)]
pub struct KafkaOverrides {
    pub brokers: Option<String>,
    pub group_id: Option<String>,
    pub input_topic: Option<String>,
    pub output_topic: Option<String>,
    pub dead_letter_topic: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub metrics_addr: Option<String>,
}

/// What Kafka mode takes from the environment, read once at start.
#[derive(Debug, Clone, Default)]
pub struct KafkaEnvironment {
    /// `SEGSTREAM_SCHEMA_REGISTRY_USER_INFO`.
    pub registry_user_info: Option<String>,
    /// `SEGSTREAM_CRASH_AT` (tests only).
    pub crash_at: Option<String>,
    /// `SEGSTREAM_RESTORE_PAUSE_MS` (tests only).
    pub restore_pause_ms: Option<u64>,
    /// librdkafka properties from `SEGSTREAM_KAFKA_<NAME>` variables (see
    /// [`property_from_env`]), over the configuration's `kafka.properties`:
    /// secrets (`SEGSTREAM_KAFKA_SASL_PASSWORD`) need not be in a file.
    pub properties: BTreeMap<String, String>,
    /// `SEGSTREAM_HTTP_ADVERTISED_URL`: this instance's own URL (one per
    /// pod, where the configuration file is shared), over the file's.
    pub http_advertised_url: Option<String>,
}

/// This instance's query API URL for the others (over the file's).
pub const ADVERTISED_URL_ENV: &str = "SEGSTREAM_HTTP_ADVERTISED_URL";

/// The prefix of environment variables that set librdkafka properties.
pub const PROPERTY_ENV_PREFIX: &str = "SEGSTREAM_KAFKA_";

/// The librdkafka property an environment variable sets, if any:
/// `SEGSTREAM_KAFKA_SASL_PASSWORD` → `sasl.password` (the rest of the name,
/// lower case, `_` as `.`).
pub fn property_from_env(name: &str) -> Option<String> {
    let rest = name.strip_prefix(PROPERTY_ENV_PREFIX)?;
    (!rest.is_empty()).then(|| rest.to_ascii_lowercase().replace('_', "."))
}

impl KafkaEnvironment {
    pub fn from_process() -> Self {
        Self {
            registry_user_info: std::env::var(REGISTRY_USER_INFO_ENV).ok(),
            crash_at: std::env::var(CRASH_AT_ENV).ok(),
            restore_pause_ms: std::env::var(crate::testhooks::RESTORE_PAUSE_ENV).ok().and_then(|v| v.parse().ok()),
            properties: std::env::vars().filter_map(|(k, v)| property_from_env(&k).map(|p| (p, v))).collect(),
            http_advertised_url: std::env::var(ADVERTISED_URL_ENV).ok().filter(|u| !u.is_empty()),
        }
    }
}

/// Kafka mode, resolved.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    /// The input topics (`input_topics`, else `input_topic` alone), co-partitioned.
    pub inputs: Vec<InputTopic>,
    pub output_topic: String,
    pub output_format: Format,
    pub output_schema_id: Option<u32>,
    pub dead_letter_topic: String,
    pub changelog_topic: String,
    /// See [`crate::config::KafkaConfig::quantile_topic`].
    pub quantile_topic: String,
    pub state_dir: PathBuf,
    pub commit_interval: Duration,
    /// `None`: event time only.
    pub idle_advance: Option<Duration>,
    /// A record this far behind its broker timestamp is a backfill's (ms).
    pub live_lag_ms: i64,
    /// See `kafka.stuck_after_ms` (`None`: never stuck).
    pub stuck_after: Option<Duration>,
    pub registry: Option<Registry>,
    /// Writer schemas from the configured `.avsc` files.
    pub schemas: StaticSchemas,
    /// `None`: no HTTP endpoint.
    pub metrics_addr: Option<String>,
    /// See [`KafkaConfig::http_advertised_url`]; filled in from the bound
    /// address when unset.
    pub http_advertised_url: Option<String>,
    pub key_partitioner: crate::config::KeyPartitioner,
    pub query_api: bool,
    pub properties: BTreeMap<String, String>,
    pub consumer_properties: BTreeMap<String, String>,
    pub producer_properties: BTreeMap<String, String>,
    pub faults: FaultInjection,
}

impl KafkaSettings {
    pub fn resolve(cfg: &KafkaConfig, over: &KafkaOverrides, env: &KafkaEnvironment) -> Result<Self, String> {
        let pick = |o: &Option<String>, c: &String| o.clone().unwrap_or_else(|| c.clone());
        let group_id = pick(&over.group_id, &cfg.group_id);
        let inputs = match (&over.input_topic, cfg.input_topics.is_empty()) {
            (Some(t), true) => vec![InputTopic { topic: t.clone(), format: cfg.input_format }],
            (Some(_), false) => {
                return Err(
                    "--input-topic overrides kafka.input_topic, but the configuration lists kafka.input_topics: \
                            change the list in the file instead"
                        .into(),
                )
            }
            (None, true) => vec![InputTopic { topic: cfg.input_topic.clone(), format: cfg.input_format }],
            (None, false) => cfg.input_topics.clone(),
        };
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = inputs.iter().find(|i| !seen.insert(i.topic.as_str())) {
            return Err(format!("input topic {} is listed twice", dup.topic));
        }
        let changelog_topic =
            if cfg.changelog_topic.is_empty() { format!("{group_id}.changelog") } else { cfg.changelog_topic.clone() };
        let quantile_topic =
            if cfg.quantile_topic.is_empty() { format!("{group_id}.quantiles") } else { cfg.quantile_topic.clone() };
        let user_info = env.registry_user_info.clone().or_else(|| cfg.schema_registry_user_info.clone());
        let registry = cfg.schema_registry_url.as_deref().map(|url| Registry::new(url, user_info.as_deref()));
        let mut schemas = StaticSchemas::new();
        for (id, path) in &cfg.schemas {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("kafka.schemas.{id}: {}: {e}", path.display()))?;
            schemas.insert_json(*id, &text).map_err(|e| format!("kafka.schemas.{id}: {}: {e}", path.display()))?;
        }
        if cfg.output_format == Format::Avro && cfg.output_schema_id.is_none() && registry.is_none() {
            return Err(
                "kafka.output_format = \"avro\" needs kafka.output_schema_id or kafka.schema_registry_url".into()
            );
        }
        let mut faults = match &env.crash_at {
            Some(v) => v.parse()?,
            None => FaultInjection::none(),
        };
        faults.restore_pause = env.restore_pause_ms.map(Duration::from_millis);
        let metrics_addr = pick(&over.metrics_addr, &cfg.metrics_addr);
        Ok(Self {
            brokers: pick(&over.brokers, &cfg.brokers),
            group_id,
            inputs,
            output_topic: pick(&over.output_topic, &cfg.output_topic),
            output_format: cfg.output_format,
            output_schema_id: cfg.output_schema_id,
            dead_letter_topic: pick(&over.dead_letter_topic, &cfg.dead_letter_topic),
            changelog_topic,
            quantile_topic,
            state_dir: over.state_dir.clone().unwrap_or_else(|| cfg.state_dir.clone()),
            commit_interval: Duration::from_millis(cfg.commit_interval_ms.max(1)),
            idle_advance: (cfg.idle_advance_ms > 0).then(|| Duration::from_millis(cfg.idle_advance_ms)),
            live_lag_ms: i64::try_from(cfg.live_lag_ms).map_err(|_| "kafka.live_lag_ms is too large".to_string())?,
            stuck_after: (cfg.stuck_after_ms > 0).then(|| Duration::from_millis(cfg.stuck_after_ms)),
            registry,
            schemas,
            metrics_addr: (!metrics_addr.is_empty()).then_some(metrics_addr),
            http_advertised_url: env
                .http_advertised_url
                .clone()
                .or_else(|| cfg.http_advertised_url.clone())
                .map(|u| u.trim_end_matches('/').to_string()),
            key_partitioner: cfg.key_partitioner,
            query_api: cfg.query_api,
            properties: cfg.properties.iter().chain(&env.properties).map(|(k, v)| (k.clone(), v.clone())).collect(),
            consumer_properties: cfg.consumer_properties.clone(),
            producer_properties: cfg.producer_properties.clone(),
            faults,
        })
    }

    pub fn topic_names(&self) -> Vec<&str> {
        self.inputs.iter().map(|i| i.topic.as_str()).collect()
    }

    /// The group's session timeout (ms) as the consumer is configured
    /// (librdkafka's default otherwise).
    pub fn session_timeout_ms(&self) -> u64 {
        self.consumer_properties
            .get("session.timeout.ms")
            .or_else(|| self.properties.get("session.timeout.ms"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(45_000)
    }

    /// The producer's delivery timeout when configured: records not
    /// delivered by then fail rather than reach the broker later.
    pub fn configured_delivery_timeout_ms(&self) -> Option<u64> {
        ["message.timeout.ms", "delivery.timeout.ms"].iter().find_map(|k| {
            self.producer_properties.get(*k).or_else(|| self.properties.get(*k)).and_then(|v| v.parse().ok())
        })
    }

    /// Where partition `p` keeps its RocksDB state.
    pub fn partition_dir(&self, partition: i32) -> PathBuf {
        self.state_dir.join(format!("{}-{partition}", self.topic_names().join("+")))
    }

    /// Client settings: `defaults` (segstream's tuning), then `properties`,
    /// then the role's own, then `forced` (what correctness depends on, e.g.
    /// no auto-commit, idempotence), which the configuration cannot undo.
    pub fn client_config(
        &self,
        defaults: &[(&str, &str)],
        role: &BTreeMap<String, String>,
        forced: &[(&str, &str)],
    ) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c.set("client.id", format!("segstream-{}", self.group_id));
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in self.properties.iter().chain(role) {
            c.set(k, v);
        }
        for (k, v) in forced {
            c.set(*k, *v);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_environment_win_once_at_start() {
        let cfg = KafkaConfig { schema_registry_url: Some("http://sr:8081/".into()), ..KafkaConfig::default() };
        let over = KafkaOverrides {
            brokers: Some("b:9092".into()),
            group_id: Some("g2".into()),
            input_topic: Some("in".into()),
            metrics_addr: Some(String::new()),
            ..KafkaOverrides::default()
        };
        let mut cfg = cfg;
        cfg.properties.insert("sasl.username".into(), "file-user".into());
        cfg.properties.insert("sasl.password".into(), "from-file".into());
        let env = KafkaEnvironment {
            registry_user_info: Some("k:s".into()),
            crash_at: Some("after_output:5".into()),
            restore_pause_ms: None,
            properties: [("sasl.password".to_string(), "from-env".to_string())].into(),
            http_advertised_url: Some("http://segstream-1.segstream:9464/".into()),
        };
        let s = KafkaSettings::resolve(&cfg, &over, &env).expect("valid");
        assert_eq!(s.brokers, "b:9092");
        assert_eq!(s.changelog_topic, "g2.changelog", "the changelog follows the overridden group");
        assert_eq!(s.topic_names(), vec!["in"]);
        assert_eq!(s.metrics_addr, None, "an empty address turns the endpoint off");
        assert_eq!(s.idle_advance, Some(Duration::from_secs(1)));
        assert_eq!(s.registry.as_ref().map(Registry::base), Some("http://sr:8081"));
        assert!(format!("{:?}", s.registry).contains("authenticated: true"));
        assert!(!format!("{s:?}").contains("k:s"), "the secret never shows in Debug output");
        assert!(s.faults.should_crash(crate::testhooks::CrashPoint::AfterOutput, 5));
        assert_eq!(s.partition_dir(3), PathBuf::from("segstream-state/in-3"));
        assert_eq!(s.properties["sasl.password"], "from-env", "the environment wins over the file");
        assert_eq!(s.http_advertised_url.as_deref(), Some("http://segstream-1.segstream:9464"));
        assert_eq!(s.properties["sasl.username"], "file-user");
        let c = s.client_config(&[], &BTreeMap::new(), &[]);
        assert_eq!(c.get("sasl.password"), Some("from-env"));
    }

    #[test]
    fn environment_variables_name_librdkafka_properties() {
        assert_eq!(property_from_env("SEGSTREAM_KAFKA_SASL_PASSWORD").as_deref(), Some("sasl.password"));
        assert_eq!(property_from_env("SEGSTREAM_KAFKA_SSL_KEY_PASSWORD").as_deref(), Some("ssl.key.password"));
        assert_eq!(property_from_env("SEGSTREAM_KAFKA_"), None);
        assert_eq!(property_from_env("SEGSTREAM_SCHEMA_REGISTRY_USER_INFO"), None);
    }

    #[test]
    fn contradictions_and_missing_files_are_refused_with_their_setting() {
        let listed = KafkaConfig {
            input_topics: vec![InputTopic { topic: "a".into(), format: Format::Json }],
            ..KafkaConfig::default()
        };
        let over = KafkaOverrides { input_topic: Some("b".into()), ..KafkaOverrides::default() };
        let env = KafkaEnvironment::default();
        assert!(KafkaSettings::resolve(&listed, &over, &env).expect_err("refused").contains("kafka.input_topics"));
        let twice = KafkaConfig {
            input_topics: vec![InputTopic { topic: "a".into(), format: Format::Json }; 2],
            ..KafkaConfig::default()
        };
        assert!(KafkaSettings::resolve(&twice, &KafkaOverrides::default(), &env)
            .expect_err("refused")
            .contains("twice"));
        let avro = KafkaConfig { output_format: Format::Avro, ..KafkaConfig::default() };
        assert!(KafkaSettings::resolve(&avro, &KafkaOverrides::default(), &env)
            .expect_err("refused")
            .contains("output_schema_id"));
        let mut missing = KafkaConfig::default();
        missing.schemas.insert(4, PathBuf::from("/nonexistent/missing.avsc"));
        let err = KafkaSettings::resolve(&missing, &KafkaOverrides::default(), &env).expect_err("refused");
        assert!(err.contains("kafka.schemas.4") && err.contains("missing.avsc"), "{err}");
        let bad_hook = KafkaEnvironment { crash_at: Some("soon".into()), ..KafkaEnvironment::default() };
        assert!(KafkaSettings::resolve(&KafkaConfig::default(), &KafkaOverrides::default(), &bad_hook).is_err());
    }
}
