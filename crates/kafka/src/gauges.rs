//! What an operator watches besides the counters: per-partition lag,
//! progress, restore and state size, segment populations, and the process
//! itself. Registered into [`crate::Metrics`]' registry; a partition's
//! series are removed when it leaves this instance, so that the sums over
//! instances stay right after a rebalance.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{PartitionLabel, TopicPartitionLabel};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SegmentLabel {
    pub group: String,
    pub segment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// A partition's RocksDB figures (see `segstream_state::StoreStats`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreFigures {
    pub customers: i64,
    pub cached_customers: i64,
    pub live_data_bytes: i64,
    pub estimated_keys: i64,
    pub block_cache_bytes: i64,
    pub pending_compaction_bytes: i64,
    pub write_stopped: bool,
}

#[derive(Default)]
pub struct Gauges {
    pub position: Family<TopicPartitionLabel, Gauge>,
    pub lag: Family<TopicPartitionLabel, Gauge>,
    pub event_time_lag: Family<PartitionLabel, FloatGauge>,
    pub last_commit: Family<PartitionLabel, FloatGauge>,
    pub last_progress: Family<PartitionLabel, FloatGauge>,
    pub partitions: Family<StateLabel, Gauge>,
    pub restore_remaining: Family<PartitionLabel, Gauge>,
    pub customers: Family<PartitionLabel, Gauge>,
    pub cached_customers: Family<PartitionLabel, Gauge>,
    pub live_data_bytes: Family<PartitionLabel, Gauge>,
    pub estimated_keys: Family<PartitionLabel, Gauge>,
    pub block_cache_bytes: Family<PartitionLabel, Gauge>,
    pub pending_compaction_bytes: Family<PartitionLabel, Gauge>,
    pub write_stopped: Family<PartitionLabel, Gauge>,
    pub producer_queue: Family<PartitionLabel, Gauge>,
    pub segment_customers: Family<SegmentLabel, Gauge>,
    pub segment_mrr_cents: Family<SegmentLabel, Gauge>,
}

impl Gauges {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "input_position",
            "Next input offset a partition task will process, per input topic and partition",
            self.position.clone(),
        );
        r.register(
            "consumer_lag_records",
            "Input records behind the partition's high watermark (from the consumer's last fetch)",
            self.lag.clone(),
        );
        r.register(
            "event_time_lag_seconds",
            "Wall clock minus the partition's event-time watermark",
            self.event_time_lag.clone(),
        );
        r.register(
            "partition_last_commit_timestamp_seconds",
            "When the partition last committed (epoch seconds)",
            self.last_commit.clone(),
        );
        r.register(
            "partition_last_progress_timestamp_seconds",
            "When the partition last processed a record or was caught up (epoch seconds)",
            self.last_progress.clone(),
        );
        r.register(
            "group_partitions",
            "Partitions of this instance by state (restoring, ready)",
            self.partitions.clone(),
        );
        r.register(
            "restore_remaining_records",
            "Changelog records a restoring partition still has to read",
            self.restore_remaining.clone(),
        );
        r.register("state_customers", "Customers in a partition's state", self.customers.clone());
        r.register(
            "state_cached_customers",
            "Customers held in memory (the state cache) per partition",
            self.cached_customers.clone(),
        );
        r.register(
            "state_live_data_bytes",
            "RocksDB estimate of a partition's live data size",
            self.live_data_bytes.clone(),
        );
        r.register(
            "state_estimated_keys",
            "RocksDB estimate of a partition's customer keys",
            self.estimated_keys.clone(),
        );
        r.register(
            "state_block_cache_bytes",
            "RocksDB block cache memory in use per partition",
            self.block_cache_bytes.clone(),
        );
        r.register(
            "state_pending_compaction_bytes",
            "RocksDB estimate of bytes compaction has to rewrite per partition",
            self.pending_compaction_bytes.clone(),
        );
        r.register(
            "state_write_stopped",
            "1 while RocksDB stops writes of a partition (a write stall)",
            self.write_stopped.clone(),
        );
        r.register(
            "producer_queue_messages",
            "Messages a partition's producer holds, not yet acknowledged",
            self.producer_queue.clone(),
        );
        r.register(
            "segment_customers",
            "Customers per segment, over this instance's partitions at their last commit",
            self.segment_customers.clone(),
        );
        r.register(
            "segment_mrr_cents",
            "MRR (cents) of the customers per segment, over this instance's partitions at their last commit",
            self.segment_mrr_cents.clone(),
        );
    }

    /// Sets a partition's state figures.
    pub fn set_store(&self, partition: i32, f: StoreFigures) {
        let l = PartitionLabel { partition };
        self.customers.get_or_create(&l).set(f.customers);
        self.cached_customers.get_or_create(&l).set(f.cached_customers);
        self.live_data_bytes.get_or_create(&l).set(f.live_data_bytes);
        self.estimated_keys.get_or_create(&l).set(f.estimated_keys);
        self.block_cache_bytes.get_or_create(&l).set(f.block_cache_bytes);
        self.pending_compaction_bytes.get_or_create(&l).set(f.pending_compaction_bytes);
        self.write_stopped.get_or_create(&l).set(i64::from(f.write_stopped));
    }

    /// Adds `delta` (customers, MRR cents) to each segment's populations.
    pub fn add_segments(&self, delta: &BTreeMap<(String, String), (i64, i64)>) {
        for ((group, segment), (customers, mrr)) in delta {
            let l = SegmentLabel { group: group.clone(), segment: segment.clone() };
            if *customers != 0 {
                self.segment_customers.get_or_create(&l).inc_by(*customers);
            }
            if *mrr != 0 {
                self.segment_mrr_cents.get_or_create(&l).inc_by(*mrr);
            }
        }
    }

    /// Removes a partition's series (it left this instance).
    pub fn forget_partition(&self, partition: i32, topics: &[&str]) {
        let l = PartitionLabel { partition };
        for f in [
            &self.restore_remaining,
            &self.customers,
            &self.cached_customers,
            &self.live_data_bytes,
            &self.estimated_keys,
            &self.block_cache_bytes,
            &self.pending_compaction_bytes,
            &self.write_stopped,
            &self.producer_queue,
        ] {
            f.remove(&l);
        }
        for f in [&self.event_time_lag, &self.last_commit, &self.last_progress] {
            f.remove(&l);
        }
        for topic in topics {
            let tl = TopicPartitionLabel { topic: topic.to_string(), partition };
            self.position.remove(&tl);
            self.lag.remove(&tl);
        }
    }
}

/// `registry` as OpenMetrics text, with the process's figures before the
/// closing `# EOF`.
pub fn encode_with_process(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String cannot fail");
    let end = out.rfind("# EOF").unwrap_or(out.len());
    let tail = out.split_off(end);
    encode_process(&mut out);
    out.push_str(&tail);
    out
}

/// The process's own figures, read from `/proc` at each scrape, in the
/// names Prometheus client libraries use (`process_…`, no prefix).
pub fn encode_process(out: &mut String) {
    use std::fmt::Write;
    let page = 4096.0;
    let ticks = 100.0; // USER_HZ on Linux
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(rss) = statm.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()) {
            let _ = writeln!(out, "# HELP process_resident_memory_bytes Resident memory size in bytes.");
            let _ = writeln!(out, "# TYPE process_resident_memory_bytes gauge");
            let _ = writeln!(out, "process_resident_memory_bytes {}", rss * page);
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces, in parentheses).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        // utime, stime: fields 14 and 15 of stat(5), 12 and 13 after the name.
        if let (Some(u), Some(s)) = (num(11), num(12)) {
            let _ = writeln!(out, "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.");
            let _ = writeln!(out, "# TYPE process_cpu_seconds_total counter");
            let _ = writeln!(out, "process_cpu_seconds_total {}", (u + s) / ticks);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(out, "# HELP process_open_fds Number of open file descriptors.");
        let _ = writeln!(out, "# TYPE process_open_fds gauge");
        let _ = writeln!(out, "process_open_fds {}", fds.count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_figures_are_read() {
        let mut out = String::new();
        encode_process(&mut out);
        for name in ["process_resident_memory_bytes ", "process_cpu_seconds_total ", "process_open_fds "] {
            let line = out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {out}"));
            let v: f64 = line[name.len()..].parse().expect("a number");
            assert!(v >= 0.0, "{line}");
        }
        assert!(out.contains("process_resident_memory_bytes ") && !out.contains("process_resident_memory_bytes 0\n"));
    }

    #[test]
    fn a_partition_that_leaves_takes_its_series_and_segment_counts_add_up() {
        let g = Gauges::default();
        let mut r = Registry::with_prefix("segstream");
        g.register(&mut r);
        g.set_store(3, StoreFigures { customers: 7, ..StoreFigures::default() });
        g.position.get_or_create(&TopicPartitionLabel { topic: "events".into(), partition: 3 }).set(10);
        let mut d = BTreeMap::new();
        d.insert(("rfm".to_string(), "at_risk".to_string()), (2, 500));
        g.add_segments(&d);
        g.add_segments(&d);
        let text = |r: &Registry| {
            let mut s = String::new();
            prometheus_client::encoding::text::encode(&mut s, r).expect("encode");
            s
        };
        let t = text(&r);
        assert!(t.contains("segstream_state_customers{partition=\"3\"} 7"), "{t}");
        assert!(t.contains("segstream_segment_customers{group=\"rfm\",segment=\"at_risk\"} 4"), "{t}");
        assert!(t.contains("segstream_segment_mrr_cents{group=\"rfm\",segment=\"at_risk\"} 1000"), "{t}");
        g.forget_partition(3, &["events"]);
        let t = text(&r);
        assert!(!t.contains("partition=\"3\""), "{t}");
    }
}
