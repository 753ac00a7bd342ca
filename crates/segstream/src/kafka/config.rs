//! The `[kafka]` section of the pipeline configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How records are encoded on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicFormat {
    /// One JSON object per message (SPEC §1 / §6 field names).
    Json,
    /// Avro in the Schema Registry wire format: byte 0, a 4-byte big-endian
    /// schema id, the Avro datum.
    Avro,
}

/// One input topic of several (`kafka.input_topics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputTopic {
    pub topic: String,
    #[serde(default = "json")]
    pub format: TopicFormat,
}

fn json() -> TopicFormat {
    TopicFormat::Json
}

/// Overrides `kafka.schema_registry_user_info`.
pub const REGISTRY_USER_INFO_ENV: &str = "SEGSTREAM_SCHEMA_REGISTRY_USER_INFO";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group; instances with the same id share the partitions.
    pub group_id: String,
    /// Events, keyed by `customer_id`.
    pub input_topic: String,
    pub input_format: TopicFormat,
    /// Several input topics instead of `input_topic`, each with its format
    /// (e.g. product events in JSON, billing in Avro). They must be
    /// co-partitioned: the same partition count, keyed by `customer_id` with
    /// the same partitioner, so that partition `p` of every topic holds the
    /// same customers.
    pub input_topics: Vec<InputTopic>,
    /// Transitions (SPEC §6), keyed by `customer_id`.
    pub output_topic: String,
    pub output_format: TopicFormat,
    /// Schema id of the transition schema in the wire format (Avro output).
    /// Without it, the schema is registered under `<output_topic>-value` in
    /// the Schema Registry at start.
    pub output_schema_id: Option<u32>,
    /// Records that cannot be decoded, unchanged, with error headers.
    pub dead_letter_topic: String,
    /// Compacted topic backing each partition's state; `<group_id>.changelog`
    /// when empty. Needs as many partitions as the input topic.
    pub changelog_topic: String,
    /// Local RocksDB state, one directory per input partition.
    pub state_dir: PathBuf,
    /// A partition commits at least this often while it has new records (ms).
    pub commit_interval_ms: u64,
    /// A partition with no new record for this long advances its watermark
    /// with the wall clock (less the allowed lateness), so that time-driven
    /// transitions of a quiet topic still come out. 0 disables it.
    pub idle_advance_ms: u64,
    /// Schema Registry base URL (`GET /schemas/ids/{id}`), for Avro input.
    pub schema_registry_url: Option<String>,
    /// `user:password` for the registry's HTTP basic authentication
    /// (Confluent's `basic.auth.user.info`, e.g. `<api key>:<api secret>`).
    /// The environment variable `SEGSTREAM_SCHEMA_REGISTRY_USER_INFO`, when
    /// set, takes precedence, so the secret need not be in the file.
    pub schema_registry_user_info: Option<String>,
    /// Writer schemas from local `.avsc` files: schema id → path. Used before
    /// the registry.
    pub schemas: BTreeMap<u32, PathBuf>,
    /// `host:port` of the HTTP endpoint serving `/metrics` (Prometheus) and
    /// `/healthz`. Empty: no endpoint.
    pub metrics_addr: String,
    /// librdkafka properties for every client (security.protocol,
    /// sasl.*, ssl.*…), applied after segstream's own settings.
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumers only.
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the producers only.
    pub producer_properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "segstream".into(),
            input_topic: "segstream.events".into(),
            input_format: TopicFormat::Json,
            input_topics: Vec::new(),
            output_topic: "segstream.transitions".into(),
            output_format: TopicFormat::Json,
            output_schema_id: None,
            dead_letter_topic: "segstream.dead-letter".into(),
            changelog_topic: String::new(),
            state_dir: PathBuf::from("segstream-state"),
            commit_interval_ms: 1_000,
            idle_advance_ms: 1_000,
            schema_registry_url: None,
            schema_registry_user_info: None,
            schemas: BTreeMap::new(),
            metrics_addr: "127.0.0.1:9464".into(),
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// The input topics: `input_topics`, else `input_topic` alone.
    pub fn inputs(&self) -> Vec<InputTopic> {
        if self.input_topics.is_empty() {
            vec![InputTopic { topic: self.input_topic.clone(), format: self.input_format }]
        } else {
            self.input_topics.clone()
        }
    }

    /// The Schema Registry client, when a URL is configured.
    pub fn registry(&self) -> Option<super::registry::Registry> {
        let user_info = std::env::var(REGISTRY_USER_INFO_ENV).ok().or_else(|| self.schema_registry_user_info.clone());
        self.schema_registry_url.as_deref().map(|url| super::registry::Registry::new(url, user_info.as_deref()))
    }

    pub fn changelog(&self) -> String {
        if self.changelog_topic.is_empty() {
            format!("{}.changelog", self.group_id)
        } else {
            self.changelog_topic.clone()
        }
    }

    /// Client settings: `defaults` (segstream's tuning), then `properties`,
    /// then the role's own, then `forced` (what correctness depends on, e.g.
    /// no auto-commit, idempotence), which the configuration cannot undo.
    pub(crate) fn client_config(
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
