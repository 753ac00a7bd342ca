//! Restore decisions (ARCHITECTURE.md, "Recovery"), kept pure so that each
//! is tested without a broker: whether the local RocksDB state can be used
//! ([`verdict`]), and what the changelog after it says ([`ChangelogTail`]).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use segstream_state::StoredState;

use crate::changelog::{Entry, LoggedRun};
use crate::marker::{LocalMarker, Marker};

/// What to do with the local state of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No local state: read the whole changelog.
    Empty,
    /// Use it and read the changelog from `from` on.
    Current { from: i64 },
    /// Wipe it and read the whole changelog, because of `why`.
    Rebuild { why: &'static str },
}

/// Whether local state committed at changelog offset `local.changelog_offset`
/// can be used, given the changelog's offsets `low..high` now, the wall
/// clock and the changelog's `delete.retention.ms`.
///
/// - It must be in the changelog (not past its end: the topic was recreated;
///   not before its start: it was truncated).
/// - If the changelog moved on after it, it must be younger than the
///   tombstone retention: erasures it never saw may have had their tombstones
///   compacted away, and the old state would keep those customers. With
///   nothing written after it, it is current however old.
pub fn verdict(local: Option<&LocalMarker>, low: i64, high: i64, now_ms: i64, retention: Duration) -> Verdict {
    let Some(l) = local else { return Verdict::Empty };
    let age = Duration::from_millis(u64::try_from(now_ms.saturating_sub(l.committed_at_ms)).unwrap_or(0));
    if l.changelog_offset >= high || l.changelog_offset + 1 < low {
        Verdict::Rebuild { why: "it does not match the changelog (recreated or truncated)" }
    } else if l.changelog_offset + 1 < high && age >= retention {
        Verdict::Rebuild {
            why: "it is older than the changelog's delete.retention.ms: tombstones it never saw may be gone",
        }
    } else {
        Verdict::Current { from: l.changelog_offset + 1 }
    }
}

/// The changelog read after the local state, record by record.
#[derive(Debug, Default)]
pub struct ChangelogTail {
    /// The last marker seen (or the local one) and its offset.
    last: Option<(Marker, i64)>,
    /// Customers written after the last marker: by a commit that did not
    /// finish. Their states are kept (they include events the marker's
    /// position does not), with the record number they are applied through.
    ahead: HashMap<String, i64, foldhash::fast::RandomState>,
    /// Customers written after the last marker by a rule-migration batch
    /// (their state is under the migration's target version): their
    /// history came with them, and the migration passes them over.
    migrated: std::collections::HashSet<String, foldhash::fast::RandomState>,
    /// Day counts read after the last marker: applied only once a marker
    /// follows them (an unfinished commit's are noted again by its replay;
    /// a rule migration's renamed ones must not be renamed twice).
    series: Vec<(i64, segstream_engine::SegmentCounts)>,
    /// Day counts a marker confirmed, for the caller to take.
    confirmed_series: Vec<(i64, segstream_engine::SegmentCounts)>,
    /// Runs logged after the last marker, with their keys.
    runs: Vec<(Vec<u8>, LoggedRun)>,
    /// History entries written after the last marker: kept only for the
    /// customers whose state that unfinished commit wrote too.
    /// With whether the entry is a transition of the rule migration under
    /// way (a migration's renamed entries are kept: see `finish`).
    history: Vec<(String, u32, bool)>,
    /// The newest owner epoch seen: the offset of the last owner record, or
    /// the highest epoch a record carried (an owner record compaction removed).
    owner: Option<i64>,
    /// Records read.
    pub records: u64,
    /// Records ignored because a newer owner had taken the partition before
    /// them: written by a stalled previous owner ([`crate::fence`]).
    pub stale: u64,
}

/// What a changelog record puts into the engine (one at a time: the size
/// difference of the variants does not matter).
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Restore {
    /// A customer's state (`None`: erased), in its stored encoding.
    Customer(String, Option<StoredState>),
    /// A customer's history entry (`None`: deleted).
    History { id: String, seq: u32, entry: Option<segstream_state::HistoryEntry> },
}

/// The partition's committed position after the changelog's tail.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// The last commit and its changelog offset; `None` when no commit was
    /// ever made (then only an unfinished first commit's records are there).
    pub last: Option<(Marker, i64)>,
    /// Customers whose state already includes events at or after the
    /// marker's record number (the marker's own skip map and the customers
    /// an unfinished commit wrote).
    pub skip: BTreeMap<String, i64>,
    /// The runs to replay first, in order: the marker's, then those logged after it.
    pub runs: Vec<LoggedRun>,
    /// Keys of the runs logged after the marker, tombstoned at the next commit.
    pub run_keys: Vec<Vec<u8>>,
    /// History entries an unfinished commit wrote for customers whose state
    /// it did not: to delete again (the replay records them anew).
    pub undo_history: Vec<(String, u32)>,
}

impl ChangelogTail {
    /// Starts after the local state's marker, if any.
    pub fn after(local: Option<LocalMarker>) -> Self {
        let owner = local.as_ref().and_then(|l| l.marker.owner);
        Self { last: local.map(|l| (l.marker, l.changelog_offset)), owner, ..Self::default() }
    }

    /// The last commit marker seen (or the local one) and its offset.
    pub fn last(&self) -> Option<&(Marker, i64)> {
        self.last.as_ref()
    }

    /// The newest owner epoch seen so far.
    pub fn owner(&self) -> Option<i64> {
        self.owner
    }

    /// Takes the record at `offset`, written with owner epoch `epoch` (none:
    /// before owner records existed); returns a customer state to restore.
    pub fn apply(&mut self, key: &[u8], offset: i64, entry: Entry, epoch: Option<i64>) -> Option<Restore> {
        self.records += 1;
        if let Entry::Owner = entry {
            self.owner = Some(self.owner.map_or(offset, |o| o.max(offset)));
            return None;
        }
        if let Some(owner) = self.owner {
            if epoch.unwrap_or(-1) < owner {
                self.stale += 1;
                return None;
            }
        }
        if let Some(e) = epoch {
            self.owner = Some(self.owner.map_or(e, |o| o.max(e)));
        }
        match entry {
            Entry::Owner => None,
            Entry::Marker(marker) => {
                self.last = Some((*marker, offset));
                self.ahead.clear();
                self.migrated.clear();
                self.confirmed_series.append(&mut self.series);
                self.runs.clear();
                self.history.clear();
                None
            }
            Entry::Run(Some(run)) => {
                self.runs.push((key.to_vec(), run));
                None
            }
            Entry::Run(None) => None,
            Entry::Customer { id, applied_through, state } => {
                let target = self.last.as_ref().and_then(|(m, _)| m.migration.as_ref()).map(|m| m.to.version);
                // Its rules version is past the head: the state is decoded
                // only while a migration is under way.
                if target.is_some()
                    && state.as_ref().and_then(|s| s.decode(id.as_bytes()).ok()).map(|s| s.rules_version) == target
                {
                    self.migrated.insert(id.clone());
                }
                match applied_through {
                    Some(a) => self.ahead.insert(id.clone(), a),
                    None => self.ahead.remove(&id),
                };
                Some(Restore::Customer(id, state))
            }
            Entry::History { id, seq, entry } => {
                if let Some(e) = &entry {
                    let target = self.last.as_ref().and_then(|(m, _)| m.migration.as_ref()).map(|m| m.to.version);
                    let migrations = target.is_some() && e.rules.map(|r| r.1) == target;
                    self.history.push((id.clone(), seq, migrations));
                }
                Some(Restore::History { id, seq, entry })
            }
            Entry::Series { day, counts } => {
                self.series.push((day, counts));
                None
            }
        }
    }

    /// Day counts confirmed by a marker since the last call.
    pub fn take_series(&mut self) -> Vec<(i64, segstream_engine::SegmentCounts)> {
        std::mem::take(&mut self.confirmed_series)
    }

    /// The position restored.
    pub fn finish(self) -> Restored {
        let (mut skip, records, mut runs) = match &self.last {
            Some((m, _)) => (m.skip.clone(), m.records, m.replay.clone()),
            None => (BTreeMap::new(), 0, Vec::new()),
        };
        for (id, a) in self.ahead {
            if a >= records {
                let e = skip.entry(id).or_insert(a);
                *e = (*e).max(a);
            }
        }
        let (run_keys, logged): (Vec<_>, Vec<_>) = self.runs.into_iter().unzip();
        runs.extend(logged);
        // An unfinished commit's history entries are undone for customers
        // whose state it did not write (their replay writes them again).
        // During a rule migration only its new transitions are: the entries
        // it renamed carry the target version, so renaming skips them when
        // the customer is migrated again, and their old values are gone.
        let migrated = self.migrated;
        let migrating = self.last.as_ref().is_some_and(|(m, _)| m.migration.is_some());
        let undo_history = self
            .history
            .into_iter()
            .filter(|(id, _, new)| !skip.contains_key(id) && !migrated.contains(id) && (!migrating || *new))
            .map(|(id, seq, _)| (id, seq))
            .collect();
        Restored { last: self.last, skip, runs, run_keys, undo_history }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{customer_key, run_key};

    const HOUR: Duration = Duration::from_secs(3600);

    fn local(offset: i64, at: i64) -> LocalMarker {
        LocalMarker { marker: Marker::first(BTreeMap::new(), 1, 1), changelog_offset: offset, committed_at_ms: at }
    }

    #[test]
    fn local_state_is_used_only_while_it_matches_a_changelog_that_still_has_its_tombstones() {
        assert_eq!(verdict(None, 0, 10, 0, HOUR), Verdict::Empty);
        let now = 10 * 3_600_000;
        // The last record, however old: current.
        assert_eq!(verdict(Some(&local(9, 0)), 0, 10, now, HOUR), Verdict::Current { from: 10 });
        // Records after it, young: current.
        assert_eq!(verdict(Some(&local(5, now - 1000)), 0, 10, now, HOUR), Verdict::Current { from: 6 });
        // Records after it, older than the retention: rebuilt.
        assert!(matches!(verdict(Some(&local(5, now - 3_600_000)), 0, 10, now, HOUR), Verdict::Rebuild { .. }));
        // Past the end (recreated topic) or before the start (truncated): rebuilt.
        assert!(matches!(verdict(Some(&local(10, now)), 0, 10, now, HOUR), Verdict::Rebuild { .. }));
        assert!(matches!(verdict(Some(&local(3, now)), 5, 10, now, HOUR), Verdict::Rebuild { .. }));
        assert_eq!(verdict(Some(&local(4, now)), 5, 10, now, HOUR), Verdict::Current { from: 5 });
        // A clock that went backwards does not make state old.
        assert_eq!(verdict(Some(&local(5, now + 5000)), 0, 10, now, HOUR), Verdict::Current { from: 6 });
    }

    fn marker(records: i64, skip: &[(&str, i64)]) -> Entry {
        let mut m = Marker::first(BTreeMap::new(), 1, 1);
        m.records = records;
        m.skip = skip.iter().map(|(c, a)| (c.to_string(), *a)).collect();
        m.replay = vec![LoggedRun { topic: "old".into(), first: -1, last: 3 }];
        Entry::Marker(Box::new(m))
    }

    fn customer(id: &str, applied: Option<i64>) -> Entry {
        Entry::Customer { id: id.into(), applied_through: applied, state: None }
    }

    #[test]
    fn customers_after_the_last_marker_are_skipped_through_what_they_include() {
        let mut tail = ChangelogTail::after(None);
        assert!(tail.apply(&customer_key("early"), 0, customer("early", Some(99)), None).is_some());
        tail.apply(b"m", 1, marker(100, &[("kept", 150), ("both", 101)]), None);
        assert_eq!(
            tail.apply(&customer_key("a"), 2, customer("a", Some(120)), None),
            Some(Restore::Customer("a".to_string(), None))
        );
        tail.apply(&customer_key("before"), 3, customer("before", Some(99)), None);
        tail.apply(&customer_key("at"), 3, customer("at", Some(100)), None);
        tail.apply(&customer_key("both"), 4, customer("both", Some(130)), None);
        tail.apply(&customer_key("erased"), 5, customer("erased", Some(140)), None);
        tail.apply(&customer_key("erased"), 6, customer("erased", None), None);
        let run = LoggedRun { topic: "t".into(), first: 7, last: 9 };
        tail.apply(&run_key(100), 7, Entry::Run(Some(run.clone())), None);
        tail.apply(&run_key(90), 8, Entry::Run(None), None);
        assert_eq!(tail.records, 10);
        let r = tail.finish();
        assert_eq!(r.last.as_ref().map(|(_, offset)| *offset), Some(1));
        assert_eq!(
            r.skip,
            BTreeMap::from([("a".into(), 120), ("at".into(), 100), ("both".into(), 130), ("kept".into(), 150)]),
            "applied through ≥ the marker's record (record 100 is the first the replay processes): skipped; \
             the marker's own skips stay; tombstoned: gone"
        );
        assert_eq!(r.runs, vec![LoggedRun { topic: "old".into(), first: -1, last: 3 }, run], "the marker's runs first");
        assert_eq!(r.run_keys, vec![run_key(100)]);
    }

    #[test]
    fn a_later_marker_completes_what_came_before_it() {
        let mut tail = ChangelogTail::after(Some(local(0, 0)));
        tail.apply(&customer_key("a"), 1, customer("a", Some(5)), None);
        tail.apply(&run_key(4), 2, Entry::Run(Some(LoggedRun { topic: "t".into(), first: 4, last: 5 })), None);
        tail.apply(b"m", 3, marker(10, &[]), None);
        let r = tail.finish();
        assert!(r.skip.is_empty() && r.run_keys.is_empty());
        assert_eq!(r.last.map(|(_, offset)| offset), Some(3));
        assert_eq!(ChangelogTail::after(Some(local(7, 0))).finish().last.map(|(_, offset)| offset), Some(7));
        // No commit yet, but a first commit that did not finish wrote a customer.
        let mut tail = ChangelogTail::after(None);
        tail.apply(&customer_key("a"), 0, customer("a", Some(5)), None);
        let r = tail.finish();
        assert!(r.last.is_none(), "nothing committed yet");
        assert_eq!(r.skip, BTreeMap::from([("a".into(), 5)]), "its events are already in its state");
    }

    #[test]
    fn records_of_an_owner_older_than_the_newest_owner_record_before_them_are_ignored() {
        let mut tail = ChangelogTail::after(None);
        // Before any owner record (an earlier version's records): taken.
        assert!(tail.apply(&customer_key("a"), 0, customer("a", Some(1)), None).is_some());
        tail.apply(b"o", 1, Entry::Owner, None);
        assert!(tail.apply(&customer_key("a"), 2, customer("a", Some(2)), Some(1)).is_some(), "the owner's own");
        tail.apply(b"m", 3, marker(3, &[]), Some(1));
        tail.apply(b"o", 4, Entry::Owner, None);
        // The previous owner (epoch 1), stalled, writes after the new owner took over.
        assert!(tail.apply(&customer_key("a"), 5, customer("a", Some(9)), Some(1)).is_none());
        tail.apply(b"m", 6, marker(10, &[]), Some(1));
        assert!(tail.apply(&customer_key("b"), 7, customer("b", None), None).is_none(), "no epoch: older still");
        assert!(tail.apply(&customer_key("c"), 8, customer("c", Some(4)), Some(4)).is_some(), "the new owner's");
        assert_eq!(tail.stale, 3);
        assert_eq!(tail.owner(), Some(4));
        let r = tail.finish();
        assert_eq!(
            r.last.map(|(m, offset)| (m.records, offset)),
            Some((3, 3)),
            "the stale marker is not the last commit"
        );
        assert_eq!(r.skip, BTreeMap::from([("c".into(), 4)]), "the stale record of a does not make it skip");
        // An owner record compacted away: a record's epoch still says who owns it.
        let mut tail = ChangelogTail::after(None);
        tail.apply(&customer_key("x"), 10, customer("x", Some(1)), Some(9));
        assert!(tail.apply(&customer_key("y"), 11, customer("y", Some(1)), Some(5)).is_none());
        // The local marker's owner counts as seen.
        let mut l = local(20, 0);
        l.marker.owner = Some(15);
        let mut tail = ChangelogTail::after(Some(l));
        assert!(tail.apply(&customer_key("z"), 21, customer("z", Some(1)), Some(12)).is_none());
        assert!(tail.apply(&customer_key("z"), 22, customer("z", Some(1)), Some(15)).is_some());
    }

    #[test]
    fn history_of_an_unfinished_commit_stays_only_with_its_customers_state() {
        let entry = segstream_state::HistoryEntry {
            group: 0,
            from: None,
            to: Some(1),
            at: 1,
            event_id: None,
            boundary: 1,
            scores: segstream_scoring::Scores::default(),
            rules: None,
            version: 0,
        };
        let h = |id: &str, seq: u32| Entry::History { id: id.into(), seq, entry: Some(entry.clone()) };
        let mut tail = ChangelogTail::after(None);
        tail.apply(b"h", 0, h("committed", 0), None);
        tail.apply(b"m", 1, marker(10, &[]), None);
        // An unfinished commit: both customers' history, only one's state.
        tail.apply(b"h", 2, h("both", 3), None);
        tail.apply(b"h", 3, h("history_only", 5), None);
        tail.apply(&customer_key("both"), 4, customer("both", Some(12)), None);
        let r = tail.finish();
        assert_eq!(r.undo_history, vec![("history_only".to_string(), 5)], "replayed, so recorded again");
    }

    fn migrating_marker(records: i64) -> Entry {
        let Entry::Marker(mut m) = marker(records, &[]) else { unreachable!() };
        let rules = |version| segstream_engine::RulesMeta { version, fingerprint: version.into(), rules: "[]".into() };
        m.migration = Some(segstream_engine::MigrationProgress {
            from: rules(1),
            to: rules(2),
            cursor: Some("b".into()),
            customers: 2,
            transitions: 0,
            history_dropped: 0,
        });
        Entry::Marker(m)
    }

    #[test]
    fn during_a_migration_only_its_new_entries_are_undone_and_day_counts_wait_for_a_marker() {
        let entry = |rules: Option<(u32, u32)>| segstream_state::HistoryEntry {
            group: 0,
            from: None,
            to: Some(1),
            at: 1,
            event_id: None,
            boundary: 0,
            scores: segstream_scoring::Scores::default(),
            rules,
            version: 2,
        };
        let counts = || Entry::Series { day: 7, counts: BTreeMap::new() };
        let mut tail = ChangelogTail::after(None);
        tail.apply(b"s/7", 0, counts(), None);
        assert!(tail.take_series().is_empty(), "not before a marker confirms it");
        tail.apply(b"m", 1, migrating_marker(10), None);
        assert_eq!(tail.take_series().len(), 1, "confirmed by the marker after it");
        // A migration batch that did not finish: c's entries renamed (an
        // event's, version 2) and its new one, no state for c.
        tail.apply(b"h", 2, Entry::History { id: "c".into(), seq: 0, entry: Some(entry(None)) }, None);
        tail.apply(b"h", 3, Entry::History { id: "c".into(), seq: 1, entry: Some(entry(Some((1, 2)))) }, None);
        tail.apply(b"s/7", 4, counts(), None);
        let r = tail.finish();
        assert_eq!(r.undo_history, vec![("c".to_string(), 1)], "the renamed entry stays, the new one goes");
    }
}
