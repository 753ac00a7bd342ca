//! The commit protocol of one partition (ARCHITECTURE.md, "Commit"), as one
//! function over the side effects it needs ([`CommitIo`]), so that its order
//! — the whole point of it — is tested without a broker.
//!
//! 1. every transition and dead letter produced so far is acknowledged, and
//!    no newer owner has taken the partition ([`crate::fence`]);
//! 2. the changed customers' states go to the changelog;
//! 3. the next marker (made after step 1, so its output ends are
//!    acknowledged ones) goes to the changelog and is acknowledged: its
//!    offset is the commit's place in the changelog; if a newer owner
//!    wrote in between, the commit is not kept (its records are stale and
//!    every restore ignores them);
//! 4. tombstones (erased customers, logged runs now committed);
//! 5. the local RocksDB commit of state and marker.
//!
//! A crash before step 3 leaves the last marker in force; after it, the new
//! one. Either way recovery finds a consistent position (see `restore`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::changelog::MARKER_KEY;
use crate::error::Error;
use crate::marker::{LocalMarker, Marker, Progress};
use crate::testhooks::CrashPoint;

/// What a commit does to the world.
pub trait CommitIo {
    /// Waits until everything produced so far is acknowledged.
    fn flush(&mut self) -> Result<(), Error>;
    /// The acknowledged end offset of every partition written.
    fn delivered(&self) -> HashMap<(String, i32), i64>;
    /// Sends a record to this partition's changelog (`None`: a tombstone).
    fn send_changelog(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), Error>;
    /// The offset after the last acknowledged changelog record.
    fn changelog_end(&self) -> Option<i64>;
    /// Fails with [`Error::Fenced`] when a newer owner took the partition.
    /// Without `ask_broker`, only the offsets the task's own records got are
    /// looked at (no request): a newer owner that wrote among them is found;
    /// one that wrote after them is found at the next commit.
    fn check_owner(&mut self, ask_broker: bool) -> Result<(), Error>;
    /// Commits the engine's state with the marker to the local RocksDB.
    fn commit_local(&mut self, local: &LocalMarker) -> Result<(), Error>;
    /// Fault injection: may abort the process here.
    fn crash_point(&self, point: CrashPoint);
}

/// One commit's content.
pub struct Commit<'a> {
    pub prev: &'a Marker,
    /// Where the partition stands (`delivered` is filled in here).
    pub progress: Progress<'a>,
    /// Keep the previous marker's output ends (a replay has not passed them).
    pub hold_outputs: bool,
    /// Changed customers (with their history and the day counts noted):
    /// changelog key and value (`None`: a tombstone).
    pub states: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Keys tombstoned once the marker is written.
    pub tombstones: Vec<Vec<u8>>,
    /// Wall clock now (epoch ms), kept with the local marker.
    pub now_ms: i64,
}

/// A completed commit.
#[derive(Debug)]
pub struct Committed {
    pub marker: Marker,
    pub changelog_offset: i64,
    /// Time to step 1's end, and to step 3's.
    pub outputs_acknowledged: Duration,
    pub marker_acknowledged: Duration,
}

pub fn commit<I: CommitIo>(io: &mut I, c: Commit<'_>) -> Result<Committed, Error> {
    let started = Instant::now();
    if let Err(e) = io.flush() {
        // Records that could not be delivered after a stall: fenced, if a
        // newer owner took over meanwhile (then that is what to say).
        io.check_owner(true)?;
        return Err(e);
    }
    io.check_owner(false)?;
    let outputs_acknowledged = started.elapsed();
    io.crash_point(CrashPoint::AfterOutput);
    for (key, value) in &c.states {
        io.send_changelog(key, value.as_deref())?;
    }
    io.crash_point(CrashPoint::AfterChangelogStates);
    let delivered = io.delivered();
    let marker = c.prev.next(Progress { delivered: (!c.hold_outputs).then_some(&delivered), ..c.progress });
    io.send_changelog(MARKER_KEY, Some(&serde_json::to_vec(&marker)?))?;
    io.flush()?;
    let changelog_offset =
        io.changelog_end().ok_or_else(|| Error::Delivery("no acknowledgement for the commit marker".into()))? - 1;
    io.check_owner(false)?;
    let marker_acknowledged = started.elapsed();
    io.crash_point(CrashPoint::AfterMarker);
    // Erasures and runs are committed now: tombstones let compaction drop their keys.
    for key in &c.tombstones {
        io.send_changelog(key, None)?;
    }
    io.commit_local(&LocalMarker { marker: marker.clone(), changelog_offset, committed_at_ms: c.now_ms })?;
    Ok(Committed { marker, changelog_offset, outputs_acknowledged, marker_acknowledged })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use segstream_engine::{Clock, Counters};

    /// Records every step; the broker acknowledges whatever was sent at each flush.
    #[derive(Default)]
    struct Recorder {
        steps: std::cell::RefCell<Vec<String>>,
        sent: i64,
        acknowledged: i64,
        outputs_end: i64,
        refuse_acks: bool,
        /// A newer owner appears at the n-th owner check.
        fenced_at_check: Option<usize>,
        checks: usize,
    }

    impl CommitIo for Recorder {
        fn flush(&mut self) -> Result<(), Error> {
            self.steps.borrow_mut().push("flush".into());
            if !self.refuse_acks {
                self.acknowledged = self.sent;
            }
            Ok(())
        }

        fn delivered(&self) -> HashMap<(String, i32), i64> {
            HashMap::from([
                (("out".to_string(), 0), self.outputs_end),
                (("changelog".to_string(), 2), self.acknowledged),
            ])
        }

        fn send_changelog(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), Error> {
            let key = String::from_utf8_lossy(key);
            self.steps.borrow_mut().push(match value {
                Some(_) => format!("put {key}"),
                None => format!("tombstone {key}"),
            });
            self.sent += 1;
            Ok(())
        }

        fn changelog_end(&self) -> Option<i64> {
            (self.acknowledged > 0).then_some(100 + self.acknowledged)
        }

        fn check_owner(&mut self, _ask_broker: bool) -> Result<(), Error> {
            self.steps.borrow_mut().push("check owner".into());
            self.checks += 1;
            match self.fenced_at_check {
                Some(n) if self.checks >= n => Err(Error::Fenced("a newer owner".into())),
                _ => Ok(()),
            }
        }

        fn commit_local(&mut self, local: &LocalMarker) -> Result<(), Error> {
            self.steps.borrow_mut().push(format!("local {}@{}", local.marker.seq, local.changelog_offset));
            Ok(())
        }

        fn crash_point(&self, point: CrashPoint) {
            self.steps.borrow_mut().push(format!("may crash {point}"));
        }
    }

    fn commit_of<'a>(prev: &'a Marker, hold_outputs: bool) -> Commit<'a> {
        Commit {
            prev,
            progress: Progress {
                records: 50,
                next_offsets: &[],
                pending_runs: Vec::new(),
                clock: Clock { max_ts: Some(9), watermark: 9 },
                counters: Counters::default(),
                pending_watermark: None,
                delivered: None,
                output_topics: ["out", "dlq"],
                skip: BTreeMap::new(),
                erased: vec!["b".into()],
                last_delay_ms: None,
                migration: None,
                quantile: None,
            },
            hold_outputs,
            states: vec![(b"c/a".to_vec(), Some(b"S".to_vec())), (b"c/b".to_vec(), Some(b"D".to_vec()))],
            tombstones: vec![b"c/b".to_vec(), b"b/40".to_vec()],
            now_ms: 7,
        }
    }

    #[test]
    fn outputs_then_states_then_the_marker_then_tombstones_then_local_state() {
        let prev = Marker::first(BTreeMap::from([("out".to_string(), BTreeMap::from([(0, 3)]))]), 1, 1);
        let mut io = Recorder { outputs_end: 12, ..Recorder::default() };
        let done = commit(&mut io, commit_of(&prev, false)).expect("commit");
        assert_eq!(
            *io.steps.borrow(),
            [
                "flush",
                "check owner",
                "may crash after_output",
                "put c/a",
                "put c/b",
                "may crash after_changelog_states",
                "put m",
                "flush",
                "check owner",
                "may crash after_marker",
                "tombstone c/b",
                "tombstone b/40",
                "local 1@102"
            ]
        );
        assert_eq!(done.changelog_offset, 102, "the marker is the last acknowledged changelog record");
        assert_eq!(done.marker.outputs["out"][&0], 12, "output ends acknowledged at step 1");
        assert_eq!(done.marker.records, 50);
    }

    #[test]
    fn held_outputs_stay_and_an_unacknowledged_marker_fails_the_commit() {
        let prev = Marker::first(BTreeMap::from([("out".to_string(), BTreeMap::from([(0, 3)]))]), 1, 1);
        let mut io = Recorder { outputs_end: 12, ..Recorder::default() };
        let done = commit(&mut io, commit_of(&prev, true)).expect("commit");
        assert_eq!(done.marker.outputs["out"][&0], 3, "a replay in progress keeps the previous ends");
        let mut io = Recorder { refuse_acks: true, ..Recorder::default() };
        assert!(matches!(commit(&mut io, commit_of(&prev, false)), Err(Error::Delivery(_))));
        let steps = io.steps.borrow();
        assert!(!steps.iter().any(|s| s.starts_with("local") || s.starts_with("tombstone")), "{steps:?}");
    }

    #[test]
    fn a_newer_owner_stops_the_commit_before_its_changelog_records_or_before_it_is_kept() {
        let prev = Marker::first(BTreeMap::new(), 1, 1);
        let mut io = Recorder { fenced_at_check: Some(1), ..Recorder::default() };
        assert!(matches!(commit(&mut io, commit_of(&prev, false)), Err(Error::Fenced(_))));
        assert!(!io.steps.borrow().iter().any(|s| s.starts_with("put")), "nothing written: {:?}", io.steps.borrow());
        let mut io = Recorder { fenced_at_check: Some(2), ..Recorder::default() };
        assert!(matches!(commit(&mut io, commit_of(&prev, false)), Err(Error::Fenced(_))));
        let steps = io.steps.borrow();
        assert!(steps.contains(&"put m".to_string()));
        assert!(
            !steps.iter().any(|s| s.starts_with("local") || s.starts_with("tombstone")),
            "a commit interleaved with a newer owner is not kept: {steps:?}"
        );
    }
}
