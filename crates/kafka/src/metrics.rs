//! Prometheus metrics of Kafka mode, declared in one place; the binary
//! serves them at `/metrics` (OpenMetrics text) with `/healthz`. Labels are
//! bounded: partition numbers, error kinds, group and segment names from the
//! configuration; never customer ids.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    pub from: String,
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

/// What of an emitter's tally is already in the transition and
/// dead-letter counters: publishing adds only the difference (a tally
/// counts from its emitter's start; labels are built per publication, not
/// per record). Kafka mode keeps one per partition task, file mode one per run.
#[derive(Debug, Default)]
pub struct TallyPublished {
    flows: std::collections::HashMap<(String, String, String), u64>,
    dead: std::collections::HashMap<&'static str, u64>,
}

impl TallyPublished {
    pub fn publish(
        &mut self,
        tally: &segstream_output::Tally,
        transitions: &Family<TransitionLabel, Counter>,
        dead_letters: &Family<KindLabel, Counter>,
    ) {
        let name = |s: &Option<std::sync::Arc<str>>| s.as_deref().map_or_else(|| "null".to_string(), str::to_string);
        for ((group, from, to), n) in tally.transition_counts() {
            let key = (group.to_string(), name(from), name(to));
            let before = self.flows.get(&key).copied().unwrap_or(0);
            if n > before {
                let label = TransitionLabel { group: key.0.clone(), from: key.1.clone(), to: key.2.clone() };
                transitions.get_or_create(&label).inc_by(n - before);
                self.flows.insert(key, n);
            }
        }
        for (&kind, &n) in tally.dead_letters() {
            let before = self.dead.insert(kind, n).unwrap_or(0);
            if n > before {
                dead_letters.get_or_create(&KindLabel { kind: kind.to_string() }).inc_by(n - before);
            }
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub events: Counter,
    pub late: Counter,
    pub duplicates: Counter,
    pub unkeyed: Counter,
    pub misplaced: Counter,
    pub gap_records: Counter,
    pub retention_lost: Counter,
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
    pub watermark: Family<PartitionLabel, Gauge<f64, AtomicU64>>,
    pub records: Family<PartitionLabel, Gauge>,
    pub offsets: Family<TopicPartitionLabel, Gauge>,
    pub registry_errors: Counter,
    /// Lag, progress, restore, state size, segment populations.
    pub gauges: crate::gauges::Gauges,
    ready: AtomicBool,
    /// Whether the group assigned partitions (possibly none) at least once.
    assigned: AtomicBool,
    /// Partitions with lag and no progress for `kafka.stuck_after_ms`.
    stuck: std::sync::Mutex<Vec<i32>>,
    /// This instance's partitions and whether each is restoring, for the
    /// query API (and probes); with the input's partition count.
    partitions: std::sync::Mutex<(i32, std::collections::BTreeMap<i32, PartitionState>)>,
}

/// A partition this instance owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionState {
    /// Being restored: its state is not complete yet.
    Restoring,
    /// Restored and processing; the number tells assignments apart (a
    /// partition that left and came back may have had its state rebuilt).
    Ready(u64),
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("segstream");
        let events = Counter::default();
        registry.register("input_events", "Valid events applied or checked against state", events.clone());
        let late = Counter::default();
        registry.register("input_late_events", "Events older than their customer's evaluated instant", late.clone());
        let duplicates = Counter::default();
        registry.register("input_duplicate_events", "Events ignored as duplicates (SPEC §2)", duplicates.clone());
        let unkeyed = Counter::default();
        registry.register(
            "input_unkeyed_records",
            "Input records without a message key (with several partitions, a customer's events may be split)",
            unkeyed.clone(),
        );
        let misplaced = Counter::default();
        registry.register(
            "input_misplaced_records",
            "Input records whose customer belongs to another partition by kafka.key_partitioner (processed where \
             they are: a separate copy of the customer)",
            misplaced.clone(),
        );
        let gap_records = Counter::default();
        registry.register(
            "input_gap_records",
            "Input records read directly from the topic because the group's offset was ahead of the partition's \
             last commit (offsets moved forward by hand)",
            gap_records.clone(),
        );
        let retention_lost = Counter::default();
        registry.register(
            "input_retention_lost_records",
            "Input offsets after a partition's last commit that the topic's retention deleted before they were \
             processed",
            retention_lost.clone(),
        );
        let dead_letters = Family::<KindLabel, Counter>::default();
        registry.register(
            "input_dead_letters",
            "Records sent to the dead-letter topic, by error kind",
            dead_letters.clone(),
        );
        let transitions = Family::<TransitionLabel, Counter>::default();
        registry.register(
            "output_transitions",
            "Transitions produced, by group, previous and target segment (null: none)",
            transitions.clone(),
        );
        let replay_suppressed = Counter::default();
        registry.register(
            "output_replay_suppressed_transitions",
            "Transitions recomputed after a recovery and not sent again (already in the output)",
            replay_suppressed.clone(),
        );
        let replay_skipped_events = Counter::default();
        registry.register(
            "input_replay_skipped_events",
            "Events replayed after a recovery that the restored state already included",
            replay_skipped_events.clone(),
        );
        let commits = Counter::default();
        registry.register("commit", "Partition commits (producer flush, changelog, RocksDB)", commits.clone());
        let commit_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register("commit_duration_seconds", "Time of one partition commit", commit_seconds.clone());
        let restores = Family::<SourceLabel, Counter>::default();
        registry.register("restore", "Partition restores, by where the state came from", restores.clone());
        let restore_records = Counter::default();
        registry.register("restore_records", "Changelog records read while restoring", restore_records.clone());
        let restore_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "restore_duration_seconds",
            "Time to restore a partition before processing",
            restore_seconds.clone(),
        );
        let wall_clock_advances = Counter::default();
        registry.register(
            "time_wall_clock_advances",
            "Watermark advances of idle partitions by the wall clock",
            wall_clock_advances.clone(),
        );
        let assigned_partitions = Gauge::default();
        registry.register(
            "group_assigned_partitions",
            "Input partitions owned by this instance",
            assigned_partitions.clone(),
        );
        let watermark = Family::<PartitionLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "time_watermark_seconds",
            "Event-time watermark per partition (epoch seconds)",
            watermark.clone(),
        );
        let records = Family::<PartitionLabel, Gauge>::default();
        registry.register(
            "commit_records",
            "Input records (all input topics) per partition at its last commit, since the partition began",
            records.clone(),
        );
        let offsets = Family::<TopicPartitionLabel, Gauge>::default();
        registry.register(
            "commit_offset",
            "Next input offset per input topic and partition at its last commit",
            offsets.clone(),
        );
        let registry_errors = Counter::default();
        registry.register("registry_errors", "Failed Schema Registry lookups (retried)", registry_errors.clone());
        let gauges = crate::gauges::Gauges::default();
        gauges.register(&mut registry);
        Self {
            registry,
            gauges,
            events,
            late,
            duplicates,
            unkeyed,
            misplaced,
            gap_records,
            retention_lost,
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
            assigned: AtomicBool::new(false),
            stuck: std::sync::Mutex::new(Vec::new()),
            partitions: std::sync::Mutex::new((0, std::collections::BTreeMap::new())),
        }
    }

    /// The input's partition count and this instance's partitions.
    pub fn partitions(&self) -> (i32, std::collections::BTreeMap<i32, PartitionState>) {
        self.partitions.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn set_input_partitions(&self, n: i32) {
        if let Ok(mut g) = self.partitions.lock() {
            g.0 = n;
        }
    }

    pub fn set_partition(&self, partition: i32, state: Option<PartitionState>) {
        if let Ok(mut g) = self.partitions.lock() {
            match state {
                Some(s) => g.1.insert(partition, s),
                None => g.1.remove(&partition),
            };
            let restoring = g.1.values().filter(|s| **s == PartitionState::Restoring).count() as i64;
            let by_state = &self.gauges.partitions;
            by_state.get_or_create(&crate::gauges::StateLabel { state: "restoring".into() }).set(restoring);
            by_state
                .get_or_create(&crate::gauges::StateLabel { state: "ready".into() })
                .set(g.1.len() as i64 - restoring);
        }
    }

    /// Whether the consumer group is joined (for `/healthz`).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The group assigned this instance its partitions (possibly none).
    pub fn set_assigned(&self) {
        self.assigned.store(true, Ordering::Relaxed);
    }

    pub fn stuck(&self) -> Vec<i32> {
        self.stuck.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn set_stuck(&self, partitions: Vec<i32>) {
        if let Ok(mut g) = self.stuck.lock() {
            *g = partitions;
        }
    }

    /// Liveness (`/healthz`): `Err` names the partitions with lag that made
    /// no progress for `kafka.stuck_after_ms`.
    pub fn liveness(&self) -> Result<(), String> {
        let stuck = self.stuck();
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(format!("partitions {stuck:?} have records waiting and made no progress for kafka.stuck_after_ms"))
        }
    }

    /// Readiness (`/readyz`): joined, assigned, and no partition restoring.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.is_ready() {
            return Err("not consuming (starting or stopping)".into());
        }
        if !self.assigned.load(Ordering::Relaxed) {
            return Err("waiting for the group's first assignment".into());
        }
        let restoring: Vec<i32> =
            self.partitions().1.iter().filter(|(_, s)| **s == PartitionState::Restoring).map(|(p, _)| *p).collect();
        if restoring.is_empty() {
            Ok(())
        } else {
            Err(format!("restoring partitions {restoring:?}"))
        }
    }

    pub fn encode(&self) -> String {
        crate::gauges::encode_with_process(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
