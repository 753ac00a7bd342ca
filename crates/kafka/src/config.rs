//! The `[kafka]` section of the pipeline configuration, as written in the
//! file; [`crate::KafkaSettings`] is what it resolves to.

use std::collections::BTreeMap;
use std::path::PathBuf;

use segstream_decode::Format;
use serde::{Deserialize, Serialize};

/// One input topic of several (`kafka.input_topics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputTopic {
    pub topic: String,
    /// JSON (one object per message) or Avro in the Schema Registry wire format.
    #[serde(default)]
    pub format: Format,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group; instances with the same id share the partitions.
    pub group_id: String,
    /// Events, keyed by `customer_id`.
    pub input_topic: String,
    pub input_format: Format,
    /// Several input topics instead of `input_topic`, each with its format
    /// (e.g. product events in JSON, billing in Avro). They must be
    /// co-partitioned: the same partition count, keyed by `customer_id` with
    /// the same partitioner, so that partition `p` of every topic holds the
    /// same customers.
    pub input_topics: Vec<InputTopic>,
    /// Transitions (SPEC §6), keyed by `customer_id`.
    pub output_topic: String,
    pub output_format: Format,
    /// Schema id of the transition schema in the wire format (Avro output).
    /// Without it, the schema is registered under `<output_topic>-value` in
    /// the Schema Registry at start.
    pub output_schema_id: Option<u32>,
    /// Records that cannot be decoded, unchanged, with error headers.
    pub dead_letter_topic: String,
    /// Compacted topic backing each partition's state; `<group_id>.changelog`
    /// when empty. Needs as many partitions as the input topic.
    pub changelog_topic: String,
    /// Quantile RFM (`scoring.mode = "quantile"`): the topic where every
    /// partition publishes its population at each recomputation, and reads
    /// the others'; `<group_id>.quantiles` when empty. One partition,
    /// compacted. Unused otherwise.
    pub quantile_topic: String,
    /// Local RocksDB state, one directory per input partition.
    pub state_dir: PathBuf,
    /// A partition commits at least this often while it has new records (ms).
    pub commit_interval_ms: u64,
    /// A partition with no new record for this long advances its watermark
    /// with the wall clock (less the allowed lateness), so that time-driven
    /// transitions of a quiet topic still come out. 0 disables it.
    pub idle_advance_ms: u64,
    /// Records whose event time is more than this behind their broker
    /// timestamp are a backfill, not a live stream: a partition whose last
    /// record was one does not follow the wall clock when idle (else a pause
    /// in a backfill would move its time to today and make the rest late).
    pub live_lag_ms: u64,
    /// `/healthz` fails when a partition has records waiting and processed
    /// none for this long (ms; restores excluded). 0 disables the check.
    pub stuck_after_ms: u64,
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
    /// The URL other instances reach this one's HTTP endpoint at (the query
    /// API redirects there). Default: `http://<metrics_addr>` as bound, unless
    /// it listens on every interface (0.0.0.0), where it must be set.
    pub http_advertised_url: Option<String>,
    /// Serve the query API (`/v1`, customer data, no authentication) beside
    /// `/metrics`.
    pub query_api: bool,
    /// How the input's producers map a key to a partition, for the query
    /// API to find a customer's partition: `murmur2` (Kafka's Java client,
    /// librdkafka's `murmur2`/`murmur2_random`) or `consistent` (librdkafka's
    /// default `consistent_random`: CRC-32).
    pub key_partitioner: KeyPartitioner,
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
            input_format: Format::Json,
            input_topics: Vec::new(),
            output_topic: "segstream.transitions".into(),
            output_format: Format::Json,
            output_schema_id: None,
            dead_letter_topic: "segstream.dead-letter".into(),
            changelog_topic: String::new(),
            quantile_topic: String::new(),
            state_dir: PathBuf::from("segstream-state"),
            commit_interval_ms: 1_000,
            idle_advance_ms: 1_000,
            live_lag_ms: 3_600_000,
            stuck_after_ms: 300_000,
            schema_registry_url: None,
            schema_registry_user_info: None,
            schemas: BTreeMap::new(),
            metrics_addr: "127.0.0.1:9464".into(),
            http_advertised_url: None,
            query_api: true,
            key_partitioner: KeyPartitioner::Murmur2,
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }
}

/// See [`KafkaConfig::key_partitioner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPartitioner {
    #[default]
    Murmur2,
    Consistent,
}

impl KeyPartitioner {
    /// As written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Murmur2 => "murmur2",
            Self::Consistent => "consistent",
        }
    }
}
