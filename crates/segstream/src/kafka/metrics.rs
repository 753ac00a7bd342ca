//! Prometheus metrics of Kafka mode, served at `/metrics` (OpenMetrics
//! text) with `/healthz`. Labels are bounded: partition numbers, error
//! kinds, group and segment names from the configuration; never customer ids.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabel {
    pub group: String,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicPartitionLabel {
    pub topic: String,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub events: Counter,
    pub late: Counter,
    pub duplicates: Counter,
    pub unkeyed: Counter,
    pub dead_letters: Family<KindLabel, Counter>,
    pub transitions: Family<TransitionLabel, Counter>,
    pub replay_suppressed: Counter,
    pub replay_skipped_events: Counter,
    pub commits: Counter,
    pub commit_seconds: Histogram,
    pub restores: Family<SourceLabel, Counter>,
    pub restore_records: Counter,
    pub restore_seconds: Histogram,
    pub wall_clock_advances: Counter,
    pub assigned_partitions: Gauge,
    pub watermark: Family<PartitionLabel, Gauge>,
    pub records: Family<PartitionLabel, Gauge>,
    pub offsets: Family<TopicPartitionLabel, Gauge>,
    pub registry_errors: Counter,
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("segstream");
        let events = Counter::default();
        registry.register("events", "Valid events applied or checked against state", events.clone());
        let late = Counter::default();
        registry.register("late_events", "Events older than their customer's evaluated instant", late.clone());
        let duplicates = Counter::default();
        registry.register("duplicate_events", "Events ignored as duplicates (SPEC §2)", duplicates.clone());
        let unkeyed = Counter::default();
        registry.register(
            "unkeyed_records",
            "Input records without a message key (with several partitions, a customer's events may be split)",
            unkeyed.clone(),
        );
        let dead_letters = Family::<KindLabel, Counter>::default();
        registry.register("dead_letters", "Records sent to the dead-letter topic, by error kind", dead_letters.clone());
        let transitions = Family::<TransitionLabel, Counter>::default();
        registry.register("transitions", "Transitions produced, by group and target segment", transitions.clone());
        let replay_suppressed = Counter::default();
        registry.register(
            "replay_suppressed_transitions",
            "Transitions recomputed after a recovery and not sent again (already in the output)",
            replay_suppressed.clone(),
        );
        let replay_skipped_events = Counter::default();
        registry.register(
            "replay_skipped_events",
            "Events replayed after a recovery that the restored state already included",
            replay_skipped_events.clone(),
        );
        let commits = Counter::default();
        registry.register("commits", "Partition commits (producer flush, changelog, RocksDB)", commits.clone());
        let commit_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register("commit_duration_seconds", "Time of one partition commit", commit_seconds.clone());
        let restores = Family::<SourceLabel, Counter>::default();
        registry.register("restores", "Partition restores, by where the state came from", restores.clone());
        let restore_records = Counter::default();
        registry.register("restore_records", "Changelog records read while restoring", restore_records.clone());
        let restore_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register("restore_duration_seconds", "Time to restore a partition before processing", restore_seconds.clone());
        let wall_clock_advances = Counter::default();
        registry.register(
            "wall_clock_advances",
            "Watermark advances of idle partitions by the wall clock",
            wall_clock_advances.clone(),
        );
        let assigned_partitions = Gauge::default();
        registry.register("assigned_partitions", "Input partitions owned by this instance", assigned_partitions.clone());
        let watermark = Family::<PartitionLabel, Gauge>::default();
        registry.register("watermark_ms", "Event-time watermark per partition (epoch ms)", watermark.clone());
        let records = Family::<PartitionLabel, Gauge>::default();
        registry.register(
            "committed_records",
            "Input records (all input topics) per partition at its last commit, since the partition began",
            records.clone(),
        );
        let offsets = Family::<TopicPartitionLabel, Gauge>::default();
        registry.register("committed_offset", "Next input offset per input topic and partition at its last commit", offsets.clone());
        let registry_errors = Counter::default();
        registry.register("schema_registry_errors", "Failed Schema Registry lookups (retried)", registry_errors.clone());
        Self {
            registry,
            events,
            late,
            duplicates,
            unkeyed,
            dead_letters,
            transitions,
            replay_suppressed,
            replay_skipped_events,
            commits,
            commit_seconds,
            restores,
            restore_records,
            restore_seconds,
            wall_clock_advances,
            assigned_partitions,
            watermark,
            records,
            offsets,
            registry_errors,
            ready: AtomicBool::new(false),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics` and `/healthz` on `addr` from a small tokio runtime on
/// its own thread. Returns the bound address (port 0 picks a free one).
pub fn serve(addr: &str, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("metrics address {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("metrics endpoint: {e}");
                return;
            }
        };
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("metrics endpoint: {e}");
                    return;
                }
            };
            let m = metrics.clone();
            let app = axum::Router::new()
                .route(
                    "/metrics",
                    axum::routing::get(move || {
                        let m = m.clone();
                        async move {
                            (
                                [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                                m.encode(),
                            )
                        }
                    }),
                )
                .route(
                    "/healthz",
                    axum::routing::get(move || {
                        let ready = metrics.ready.load(Ordering::Relaxed);
                        async move {
                            if ready {
                                (axum::http::StatusCode::OK, "ok")
                            } else {
                                (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting")
                            }
                        }
                    }),
                );
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("metrics endpoint: {e}");
            }
        });
    })?;
    Ok(bound)
}
