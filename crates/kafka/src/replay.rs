//! The replay guard: after a recovery, the records from the last commit on
//! are processed again, and this says what of that work is already done —
//! transitions and dead letters already in the outputs (not sent again), and
//! events already in a customer's restored state (only their time counts).

use std::collections::{BTreeMap, HashMap};

/// A multiset of record ids.
#[derive(Debug, Default)]
struct Multiset {
    counts: HashMap<String, u32>,
    total: usize,
}

impl Multiset {
    fn add(&mut self, id: String) {
        *self.counts.entry(id).or_insert(0) += 1;
        self.total += 1;
    }

    /// Whether `id` is in (once fewer from now on).
    fn take(&mut self, id: &str) -> bool {
        let Some(n) = self.counts.get_mut(id) else { return false };
        *n -= 1;
        if *n == 0 {
            self.counts.remove(id);
        }
        self.total -= 1;
        true
    }

    fn clear(&mut self) {
        self.counts.clear();
        self.total = 0;
    }
}

/// The `source` header of an output record: `<topic>/<partition>/<offset>`,
/// or `<first topic>/<partition>/time` for a wall-clock advance. `prefixes`
/// are `<topic>/<partition>/` per input topic of this partition; the result
/// is the topic's index and the offset (`None` for `time`, or anything else
/// that is not a number), or `None` for another partition's record.
pub fn parse_source(prefixes: &[String], source: &str) -> Option<(usize, Option<i64>)> {
    prefixes.iter().enumerate().find_map(|(t, prefix)| Some((t, source.strip_prefix(prefix.as_str())?.parse().ok())))
}

/// The key under which a dead letter is remembered.
pub fn dead_letter_id(source: &str) -> String {
    format!("dlq:{source}")
}

/// What a recovered partition must not do again.
#[derive(Debug)]
pub struct ReplayGuard {
    /// Transitions (by id) and dead letters (`dlq:<source>`) the uncommitted
    /// tail of a previous owner already wrote, with how many times. A count,
    /// because SPEC's id (customer, group, at, to) repeats when late events
    /// move a label back and forth at one evaluated instant.
    already_out: Multiset,
    /// Per input topic, the highest offset among `already_out`'s sources (-1: none).
    through: Vec<i64>,
    /// Customer → record number through which its restored state already includes events.
    skip: BTreeMap<String, i64>,
}

impl ReplayGuard {
    pub fn new(topics: usize, skip: BTreeMap<String, i64>) -> Self {
        Self { already_out: Multiset::default(), through: vec![-1; topics], skip }
    }

    /// A record found in an output after the marker's end offsets, written
    /// for the record at (`topic`, `offset`) (`None`: a wall-clock advance).
    pub fn already_written(&mut self, topic: usize, offset: Option<i64>, id: String) {
        if let Some(o) = offset {
            self.through[topic] = self.through[topic].max(o);
        }
        self.already_out.add(id);
    }

    /// Whether `id` is already written (and so not to be sent now).
    pub fn suppress(&mut self, id: &str) -> bool {
        self.already_out.total > 0 && self.already_out.take(id)
    }

    /// Whether the replay has not yet passed the previous owner's output:
    /// until then the output ends in a marker must not move (a second crash
    /// must find the first one's output again).
    pub fn holds_outputs(&self) -> bool {
        self.already_out.total > 0
    }

    /// Records already written, not yet met again.
    pub fn pending(&self) -> usize {
        self.already_out.total
    }

    /// Whether the event at `record` is already in `customer`'s restored state.
    pub fn skips(&self, customer: &str, record: i64) -> bool {
        self.skip.get(customer).is_some_and(|&a| record <= a)
    }

    /// The record number `customer`'s restored state is applied through, if
    /// it is in the skip map.
    pub fn applied_through(&self, customer: &str) -> Option<i64> {
        self.skip.get(customer).copied()
    }

    /// Called after each record with every topic's next offset: once every
    /// topic is past the last source of the already-written records, what is
    /// left will never be met (records of skipped customers are not
    /// recomputed): it is dropped, and how many is returned.
    pub fn passed(&mut self, next_offsets: &[i64]) -> Option<usize> {
        // A topic with no already-written record (-1) has nothing to pass.
        if self.already_out.total == 0 || !self.through.iter().zip(next_offsets).all(|(s, n)| *s < 0 || s < n) {
            return None;
        }
        let left = self.already_out.total;
        self.already_out.clear();
        Some(left)
    }

    /// At a commit at record `next`: skips behind it are done. The rest.
    pub fn prune_skips(&mut self, next: i64) -> &BTreeMap<String, i64> {
        self.skip.retain(|_, a| *a >= next);
        &self.skip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_this_partitions_topics_only() {
        let prefixes = vec!["a/3/".to_string(), "b/3/".to_string()];
        assert_eq!(parse_source(&prefixes, "b/3/17"), Some((1, Some(17))));
        assert_eq!(parse_source(&prefixes, "a/3/time"), Some((0, None)));
        assert_eq!(parse_source(&prefixes, "a/31/17"), None, "partition 31 is another partition");
        assert_eq!(parse_source(&prefixes, "a/3/x"), Some((0, None)), "still this partition's record");
    }

    #[test]
    fn repeated_ids_are_suppressed_as_often_as_they_were_written() {
        let mut g = ReplayGuard::new(1, BTreeMap::new());
        assert!(!g.suppress("x"), "nothing written: nothing suppressed");
        g.already_written(0, Some(5), "x".into());
        g.already_written(0, Some(6), "x".into());
        g.already_written(0, None, "y".into());
        assert!(g.holds_outputs());
        assert!(g.suppress("x") && g.suppress("x"), "both copies were written");
        assert!(!g.suppress("x"), "a third is new");
        assert_eq!(g.pending(), 1);
        assert!(g.suppress("y") && !g.holds_outputs());
    }

    #[test]
    fn what_is_left_is_dropped_once_every_topic_passed_its_last_source() {
        let mut g = ReplayGuard::new(2, BTreeMap::new());
        g.already_written(0, Some(10), "x".into());
        g.already_written(1, Some(4), "y".into());
        assert_eq!(g.passed(&[11, 4]), None, "topic 1 has not passed offset 4");
        assert_eq!(g.passed(&[11, 5]), Some(2));
        assert!(!g.holds_outputs());
        assert_eq!(g.passed(&[12, 6]), None);
        // A topic that never had a record here, and none written for it,
        // does not hold the rest back.
        let mut g = ReplayGuard::new(2, BTreeMap::new());
        g.already_written(0, Some(10), "x".into());
        assert_eq!(g.passed(&[11, -1]), Some(1));
    }

    #[test]
    fn skips_cover_events_through_the_restored_record_and_end_at_commits() {
        let mut g = ReplayGuard::new(1, BTreeMap::from([("c".to_string(), 40), ("d".to_string(), 45)]));
        assert!(g.skips("c", 40) && !g.skips("c", 41) && !g.skips("e", 1));
        assert_eq!(g.applied_through("d"), Some(45));
        assert_eq!(g.prune_skips(42).len(), 1, "c's skips are behind record 42");
        assert!(!g.skips("c", 30));
        assert_eq!(g.prune_skips(45).len(), 1, "record 45 is still to be replayed, and d includes it");
        assert!(g.skips("d", 45));
    }
}
