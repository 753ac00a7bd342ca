//! The processing order of several input topics (ARCHITECTURE.md, "Kafka
//! mode"). Records of co-partitioned topics arrive in no fixed order across
//! topics, so a partition processes them one topic's run at a time and logs
//! each run to the changelog before any of its output: a replay then takes
//! the same runs in the same order, the previous owner's first. This module
//! decides the order; the task writes the log records and processes.

use std::collections::VecDeque;

use crate::record::Rec;

/// What the task does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Process this record.
    Record(Rec),
    /// Log a new run of `topic`'s records `first..=last` (and wait for the
    /// acknowledgement) before processing them: they come next.
    Log { topic: usize, first: i64, last: i64 },
    /// Nothing can be processed until more records arrive.
    Wait,
}

#[derive(Debug)]
pub struct RunLog {
    /// Records per topic not yet in a run.
    waiting: Vec<VecDeque<Rec>>,
    /// Logged runs to replay first: (topic, last offset).
    replay: VecDeque<(usize, i64)>,
    /// The run being processed (topic, last offset), and its records left.
    current: Option<(usize, i64)>,
    run: VecDeque<Rec>,
}

impl RunLog {
    /// `replay`: the runs the previous owner logged and did not commit, in order.
    pub fn new(topics: usize, replay: Vec<(usize, i64)>) -> Self {
        Self { waiting: vec![VecDeque::new(); topics], replay: replay.into(), current: None, run: VecDeque::new() }
    }

    pub fn push(&mut self, recs: Vec<Rec>) {
        for r in recs {
            let t = r.topic;
            self.waiting[t].push_back(r);
        }
    }

    /// Logged runs still to replay.
    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }

    /// The next step, given each topic's next offset to process.
    pub fn next(&mut self, next_offsets: &[i64]) -> Step {
        loop {
            if let Some(r) = self.run.pop_front() {
                return Step::Record(r);
            }
            self.current = None;
            if let Some(&(t, last)) = self.replay.front() {
                if self.waiting[t].front().is_some_and(|r| r.offset <= last) {
                    return Step::Record(self.waiting[t].pop_front().expect("checked non-empty"));
                }
                // Done when the run's last offset is processed, or the topic
                // has moved past it (a gap in the offsets).
                let done = next_offsets[t] > last || self.waiting[t].front().is_some_and(|r| r.offset > last);
                if !done {
                    return Step::Wait; // more of topic t is on its way
                }
                self.replay.pop_front();
                continue;
            }
            let Some(t) = self.waiting.iter().position(|w| !w.is_empty()) else { return Step::Wait };
            let from = next_offsets[t];
            self.run = self.waiting[t].drain(..).filter(|r| r.offset >= from).collect();
            let (Some(first), Some(last)) = (self.run.front().map(|r| r.offset), self.run.back().map(|r| r.offset))
            else {
                continue;
            };
            self.current = Some((t, last));
            return Step::Log { topic: t, first, last };
        }
    }

    /// The runs a commit now must hand to the next owner: the rest of the
    /// current run, then the replay's, as (topic, last offset).
    pub fn pending_runs(&self, next_offsets: &[i64]) -> Vec<(usize, i64)> {
        self.current.filter(|&(t, last)| next_offsets[t] <= last).iter().chain(&self.replay).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(topic: usize, offset: i64) -> Rec {
        Rec { topic, offset, key: None, payload: None, timestamp: None }
    }

    /// Runs the log as a task would: processes every record it is given.
    fn drain(log: &mut RunLog, next: &mut [i64]) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match log.next(next) {
                Step::Record(r) => {
                    if r.offset >= next[r.topic] {
                        next[r.topic] = r.offset + 1;
                        seen.push(format!("{}@{}", r.topic, r.offset));
                    }
                }
                Step::Log { topic, first, last } => seen.push(format!("log {topic}:{first}..{last}")),
                Step::Wait => return seen,
            }
        }
    }

    #[test]
    fn new_records_are_logged_a_topic_run_at_a_time() {
        let mut log = RunLog::new(2, Vec::new());
        let mut next = [-1, -1];
        log.push(vec![rec(1, 0), rec(0, 0), rec(1, 1), rec(0, 1)]);
        assert_eq!(drain(&mut log, &mut next), ["log 0:0..1", "0@0", "0@1", "log 1:0..1", "1@0", "1@1"]);
        // Already processed records (a refetch) are not logged again.
        log.push(vec![rec(0, 1), rec(0, 2)]);
        assert_eq!(drain(&mut log, &mut next), ["log 0:2..2", "0@2"]);
    }

    #[test]
    fn the_previous_owners_runs_come_first_in_their_order() {
        let mut log = RunLog::new(2, vec![(1, 1), (0, 0)]);
        let mut next = [0, 0];
        log.push(vec![rec(0, 0), rec(0, 1)]);
        assert_eq!(drain(&mut log, &mut next), Vec::<String>::new(), "waits for topic 1's run");
        assert_eq!(log.pending_runs(&next), vec![(1, 1), (0, 0)]);
        log.push(vec![rec(1, 0), rec(1, 1), rec(1, 2)]);
        assert_eq!(drain(&mut log, &mut next), ["1@0", "1@1", "0@0", "log 0:1..1", "0@1", "log 1:2..2", "1@2"]);
        assert_eq!(log.replay_len(), 0);
    }

    #[test]
    fn a_gap_past_a_replayed_run_ends_it_and_a_commit_inside_a_run_hands_over_its_rest() {
        let mut log = RunLog::new(2, vec![(0, 3)]);
        let mut next = [0, 0];
        log.push(vec![rec(0, 5)]);
        assert_eq!(log.next(&next), Step::Log { topic: 0, first: 5, last: 5 }, "offsets 0..=3 are gone: passed over");
        let mut log = RunLog::new(1, Vec::new());
        log.push(vec![rec(0, 0), rec(0, 1), rec(0, 2)]);
        assert!(matches!(log.next(&next), Step::Log { .. }));
        assert!(matches!(log.next(&next), Step::Record(r) if r.offset == 0));
        next[0] = 1;
        assert_eq!(log.pending_runs(&next), vec![(0, 2)], "a commit now leaves 1..=2 to replay first");
        next[0] = 3;
        assert!(log.pending_runs(&next).is_empty());
    }
}
