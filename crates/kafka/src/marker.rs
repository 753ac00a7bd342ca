//! The commit marker: everything a partition's recovery needs besides its
//! customers' states, and how one commit's marker follows from the last.

use std::collections::{BTreeMap, HashMap};

use segstream_engine::{Clock, Counters, MigrationProgress, QuantileMeta, RulesMeta};
use serde::{Deserialize, Serialize};

use crate::changelog::LoggedRun;

/// Output topic → partition → end offset after the last acknowledged record.
pub type OutputEnds = BTreeMap<String, BTreeMap<i32, i64>>;

/// A commit of one partition (changelog key `m`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// Commit number of this partition, from 1.
    pub seq: u64,
    /// Per input topic, the next offset to process (every record before it
    /// is in the state); a topic not listed starts where the group is.
    pub input_offsets: BTreeMap<String, i64>,
    /// Number of input records processed by this partition since it began:
    /// the record number of the next one.
    pub records: i64,
    pub clock: Clock,
    pub counters: Counters,
    /// A wall-clock advance decided at this commit: recovery applies it
    /// before the next record, exactly as the task did after committing.
    pub pending_watermark: Option<i64>,
    /// End offsets of the output and dead-letter partitions after every
    /// record produced before this commit was acknowledged: recovery reads
    /// from here to learn what the uncommitted tail already wrote.
    pub outputs: OutputEnds,
    /// Customers whose state already includes events at or after `records`
    /// (after a recovery from a partly written commit): customer → record
    /// number of the last event applied.
    pub skip: BTreeMap<String, i64>,
    /// Several input topics: runs of records the previous owner processed
    /// (and logged) after its last commit that the replay has not reached
    /// yet, in order (`first` unused).
    #[serde(default)]
    pub replay: Vec<LoggedRun>,
    /// Fingerprint of the scoring and segments configuration.
    pub config_fingerprint: u64,
    /// Fingerprint of the time settings that decide what a replay produces
    /// (lateness, the window of plausible times); `None` in markers of
    /// earlier versions.
    #[serde(default)]
    pub time_fingerprint: Option<u64>,
    /// How far the last event was behind its record's broker timestamp (ms):
    /// whether the partition reads a live stream or a backfill.
    #[serde(default)]
    pub last_delay_ms: Option<i64>,
    /// Customers erased by this commit: their tombstones follow the marker,
    /// and a recovery sends them again in case the crash came first.
    #[serde(default)]
    pub erased: Vec<String>,
    /// The owner epoch of the task that wrote it (the offset of its owner
    /// record, see [`crate::fence`]); `None` in markers of earlier versions.
    #[serde(default)]
    pub owner: Option<i64>,
    /// The rules the partition's state is under (version and text: what
    /// names its labels); `None` in markers of earlier versions, which
    /// carry the fingerprint only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<RulesMeta>,
    /// A rule migration under way (ADR 008).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
    /// Quantile mode: the last recomputation of the edges and the edges in
    /// force (ADR 010).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantile: Option<QuantileMeta>,
}

/// The marker as the local RocksDB keeps it, with where it is in the changelog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalMarker {
    pub marker: Marker,
    pub changelog_offset: i64,
    /// Wall clock (epoch ms) when the local state last matched the changelog
    /// (0 in markers written before this field: treated as old).
    #[serde(default)]
    pub committed_at_ms: i64,
}

/// The engine metadata key of the [`LocalMarker`].
pub const LOCAL_MARKER_META: &str = "kafka:marker";

/// Where a partition stands at a commit: what goes into the next marker.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    /// Record number of the next record.
    pub records: i64,
    /// Per input topic (in configuration order), the next offset; -1 while
    /// nothing of the topic was processed.
    pub next_offsets: &'a [(&'a str, i64)],
    /// Logged runs still ahead of the replay, the current run's rest first.
    pub pending_runs: Vec<LoggedRun>,
    pub clock: Clock,
    pub counters: Counters,
    pub pending_watermark: Option<i64>,
    /// The acknowledged end offsets of every partition the producer wrote;
    /// `None` while a replay has not yet passed the previous run's output
    /// (the next recovery must still read all of it).
    pub delivered: Option<&'a HashMap<(String, i32), i64>>,
    /// The output and dead-letter topics (the producer also writes the changelog).
    pub output_topics: [&'a str; 2],
    /// The skip map, without entries the commit has passed.
    pub skip: BTreeMap<String, i64>,
    /// Customers erased since the last commit.
    pub erased: Vec<String>,
    /// See [`Marker::last_delay_ms`].
    pub last_delay_ms: Option<i64>,
    /// A rule migration under way after this commit.
    pub migration: Option<MigrationProgress>,
    /// See [`Marker::quantile`].
    pub quantile: Option<QuantileMeta>,
}

impl Marker {
    /// The marker of a partition that never committed: it starts at the
    /// outputs' current ends.
    pub fn first(outputs: OutputEnds, config_fingerprint: u64, time_fingerprint: u64) -> Self {
        Self {
            seq: 0,
            input_offsets: BTreeMap::new(),
            records: 0,
            clock: Clock::default(),
            counters: Counters::default(),
            pending_watermark: None,
            outputs,
            skip: BTreeMap::new(),
            replay: Vec::new(),
            config_fingerprint,
            time_fingerprint: Some(time_fingerprint),
            last_delay_ms: None,
            erased: Vec::new(),
            owner: None,
            rules: None,
            migration: None,
            quantile: None,
        }
    }

    /// The marker of the commit after this one.
    pub fn next(&self, p: Progress<'_>) -> Self {
        let mut outputs = self.outputs.clone();
        if let Some(delivered) = p.delivered {
            for ((topic, q), end) in delivered {
                if p.output_topics.contains(&topic.as_str()) {
                    outputs.entry(topic.clone()).or_default().insert(*q, *end);
                }
            }
        }
        let mut input_offsets = self.input_offsets.clone();
        for &(topic, offset) in p.next_offsets {
            if offset >= 0 {
                input_offsets.insert(topic.to_string(), offset);
            }
        }
        Self {
            seq: self.seq + 1,
            input_offsets,
            records: p.records,
            clock: p.clock,
            counters: p.counters,
            pending_watermark: p.pending_watermark,
            outputs,
            skip: p.skip,
            replay: p.pending_runs,
            config_fingerprint: self.config_fingerprint,
            time_fingerprint: self.time_fingerprint,
            last_delay_ms: p.last_delay_ms,
            erased: p.erased,
            owner: self.owner,
            rules: self.rules.clone(),
            migration: p.migration,
            quantile: p.quantile,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress<'a>(offsets: &'a [(&'a str, i64)], delivered: Option<&'a HashMap<(String, i32), i64>>) -> Progress<'a> {
        Progress {
            records: 120,
            next_offsets: offsets,
            pending_runs: vec![LoggedRun { topic: "b".into(), first: -1, last: 77 }],
            clock: Clock { max_ts: Some(5), watermark: 5 },
            counters: Counters { events: 9, ..Counters::default() },
            pending_watermark: Some(8),
            delivered,
            output_topics: ["out", "dlq"],
            skip: BTreeMap::from([("c".to_string(), 130)]),
            erased: vec!["gone".into()],
            last_delay_ms: Some(12),
            migration: None,
            quantile: None,
        }
    }

    fn first() -> Marker {
        let outputs = BTreeMap::from([("out".to_string(), BTreeMap::from([(0, 10), (1, 20)]))]);
        let mut m = Marker::first(outputs, 0xfeed, 7);
        m.input_offsets.insert("b".into(), 40);
        m
    }

    #[test]
    fn the_next_marker_carries_progress_and_keeps_what_did_not_move() {
        let delivered = HashMap::from([
            (("out".to_string(), 1), 25),
            (("dlq".to_string(), 0), 3),
            (("g.changelog".to_string(), 0), 999),
        ]);
        let next = first().next(progress(&[("a", 17), ("b", -1)], Some(&delivered)));
        assert_eq!(next.seq, 1);
        assert_eq!(next.records, 120);
        assert_eq!(next.input_offsets, BTreeMap::from([("a".into(), 17), ("b".into(), 40)]), "b not read yet: kept");
        assert_eq!(next.outputs["out"], BTreeMap::from([(0, 10), (1, 25)]));
        assert_eq!(next.outputs["dlq"], BTreeMap::from([(0, 3)]));
        assert!(!next.outputs.contains_key("g.changelog"), "the changelog is not an output");
        assert_eq!(next.pending_watermark, Some(8));
        assert_eq!(next.replay.len(), 1);
        assert_eq!(next.skip.get("c"), Some(&130));
        assert_eq!(next.config_fingerprint, 0xfeed, "the fingerprint of the state, whatever the process");
        assert_eq!(next.time_fingerprint, Some(7));
        assert_eq!(next.erased, vec!["gone".to_string()], "the erasures of this commit, for a recovery to finish");
        assert_eq!(next.next(progress(&[], Some(&delivered))).seq, 2);
    }

    #[test]
    fn outputs_stay_put_while_a_replay_has_not_passed_them() {
        let next = first().next(progress(&[("a", 17)], None));
        assert_eq!(next.outputs, first().outputs);
    }

    #[test]
    fn markers_without_newer_fields_still_read() {
        let mut v = serde_json::to_value(first()).expect("json");
        for newer in ["replay", "time_fingerprint", "erased", "last_delay_ms"] {
            v.as_object_mut().expect("object").remove(newer);
        }
        let m: Marker = serde_json::from_value(v).expect("older marker");
        assert!(m.replay.is_empty());
        let local: LocalMarker = serde_json::from_value(serde_json::json!({ "marker": m, "changelog_offset": 4 }))
            .expect("older local marker");
        assert_eq!(local.committed_at_ms, 0);
    }
}
