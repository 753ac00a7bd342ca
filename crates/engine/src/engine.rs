//! The engine: events and the passage of event time in, transitions out, on
//! durable per-customer state.
//!
//! Time (SPEC §2) is one watermark: the largest `ts` seen less the allowed
//! lateness. Whenever it moves, every customer whose next boundary it passed
//! is advanced to it, found through the state's timer index. After an event,
//! a customer whose new next boundary is already behind the watermark (a late
//! event, or a new customer created by one) is advanced at once, so that at
//! every moment no customer has an unevaluated boundary at or before the
//! watermark. Everything the output depends on is in the state store and
//! committed with the input position, so a restart from a commit continues
//! exactly as the uninterrupted run did.

use std::collections::BTreeMap;

use segstream_decode::{Event, DAY_MS};
use segstream_scoring::{BoundaryKind, Cause, CustomerState, Edges, Group, Outcome, Population, Scorer, Transition};
use segstream_state::{HistoryEntry, SegmentCount, StateStore, StoredState};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::rules::{decide, Decision, MigrationProgress, Renaming, RulesMeta, META_MIGRATION, META_RULES};
use crate::settings::EngineSettings;

const META_CONFIG: &str = "config_fingerprint";
const META_CLOCK: &str = "clock";
const META_COUNTERS: &str = "counters";
/// `series:<day, 10 digits>` → segment counts when the watermark passed the
/// end of that (UTC) day, written only when they changed.
const META_SERIES: &str = "series:";
/// Quantile mode: the edges in force ([`QuantileMeta`]; `null` or absent: the
/// configured thresholds), and `quantile:<day, 10 digits>` → each day's
/// recomputation at its 00:00.
pub const META_QUANTILE: &str = "quantile";

/// Quantile mode: a recomputation of the edges and the edges it left in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantileMeta {
    /// The edges in force after the recomputation.
    pub edges: Edges,
    /// The recomputation that last changed them (`None`: the configured
    /// thresholds are still in force). A customer last evaluated before it
    /// is taken as evaluated then: the recomputation evaluated every
    /// customer there, and wrote only those it changed.
    pub since: Option<i64>,
    /// The instant of this recomputation (00:00 UTC).
    pub computed_at: i64,
    /// Customers counted.
    pub customers: u64,
    /// Whether the edges are this population's (false: fewer customers than
    /// `scoring.quantile.min_customers`, the edges in force were kept).
    pub from_population: bool,
}

/// Customers and MRR per (group index, segment index).
pub type SegmentCounts = BTreeMap<(u16, u16), SegmentCount>;

/// A transition as the customer's history keeps it.
fn history_entry(groups: &[Group], t: &Transition) -> Option<HistoryEntry> {
    let g = groups.iter().position(|g| g.name == t.group)?;
    let index = |name: &Option<std::sync::Arc<str>>| {
        name.as_ref().and_then(|n| groups[g].segments.iter().position(|s| s == n)).and_then(|i| u16::try_from(i).ok())
    };
    let from = index(&t.from);
    Some(HistoryEntry {
        group: u16::try_from(g).ok()?,
        from,
        to: index(&t.to),
        at: t.at,
        event_id: match &t.cause {
            Cause::Event(id) => Some(id.clone()),
            // A migration out of a segment the new rules no longer have: its
            // name, which no index can give.
            Cause::Rules { .. } if from.is_none() => t.from.as_deref().map(str::to_string),
            _ => None,
        },
        boundary: match &t.cause {
            Cause::Time(k) => k.bits(),
            Cause::Requantile => BoundaryKind::REQUANTILE,
            _ => 0,
        },
        scores: t.scores,
        rules: match &t.cause {
            Cause::Rules { from, to } => Some((*from, *to)),
            _ => None,
        },
        version: t.rules_version,
    })
}

/// Event-time clock, persisted with every commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    /// Largest event `ts` seen.
    pub max_ts: Option<i64>,
    /// Every boundary at or before this instant has been evaluated.
    pub watermark: i64,
}

impl Default for Clock {
    fn default() -> Self {
        Self { max_ts: None, watermark: i64::MIN }
    }
}

/// Cumulative counts over the life of the state dir.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Valid events handed to the engine.
    pub events: u64,
    /// Events that changed state (including creations and deletions).
    pub applied: u64,
    /// Events ignored because their id was among the customer's last 32.
    pub duplicate: u64,
    /// Events older than their customer's last evaluated instant (applied all the same).
    pub late: u64,
    /// Records that could not be decoded (dead-lettered).
    pub invalid: u64,
    /// `customer_deleted` for a customer that did not exist.
    pub deleted_unknown: u64,
    /// Events applied whose new open ticket or feature was not remembered
    /// (the customer is at the limit of either).
    pub capped: u64,
    /// Customers existing now.
    pub customers: u64,
    pub transitions: u64,
}

pub struct Engine {
    scorer: Scorer,
    store: StateStore,
    lateness: i64,
    clock: Clock,
    counters: Counters,
    /// No timer is due before this instant (a lower bound; may be stale low).
    next_due: Option<i64>,
    /// Day-end segment counts to write at the next commit, and the last ones.
    pending_series: Vec<(i64, SegmentCounts)>,
    last_series: Option<SegmentCounts>,
    /// A rule migration under way, with the old rules' scorer.
    migration: Option<(MigrationProgress, Scorer)>,
    /// Metadata for the next commit (the rules, a migration's progress).
    pending_meta: Vec<(String, Vec<u8>)>,
    /// A migration decided at open and not begun yet.
    planned: Option<MigrationProgress>,
    /// Quantile mode: the last recomputation of the edges.
    quantile: Option<QuantileMeta>,
    /// Quantile mode: the configured thresholds (in force until a
    /// recomputation changes them).
    configured_edges: Edges,
    /// Quantile mode, Kafka: populations supplied by the caller (the whole
    /// group's, merged) for the recomputations ahead; with `external`, a
    /// recomputation without one is an error.
    supplied: BTreeMap<i64, Option<Population>>,
    external_population: bool,
}

/// Who checks the rules a state was built under when it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesCheck {
    /// The state dir's own record (file mode).
    Local,
    /// The caller, from its own record (Kafka mode: the commit marker; the
    /// local state is a cache of the changelog).
    Caller,
}

/// Where a rule migration stands after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStep {
    pub progress: MigrationProgress,
    pub done: bool,
}

fn read_meta<T: for<'de> Deserialize<'de>>(store: &StateStore, key: &'static str) -> Result<Option<T>, EngineError> {
    match store.meta(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| EngineError::Meta { key, reason: e.to_string() }),
    }
}

impl Engine {
    /// Opens (or creates) the state in `dir`, checking its rules (file mode).
    pub fn open(dir: &std::path::Path, settings: &EngineSettings) -> Result<Self, EngineError> {
        Self::open_with(dir, settings, RulesCheck::Local)
    }

    /// Opens (or creates) the state in `dir`. With [`RulesCheck::Local`], a
    /// state built under other rules is refused, or a migration to the new
    /// ones begins (see [`Engine::migrate_step`]) when the settings allow it.
    pub fn open_with(dir: &std::path::Path, settings: &EngineSettings, check: RulesCheck) -> Result<Self, EngineError> {
        let mut scorer = settings.scorer();
        let mut store = StateStore::open(dir, settings.state_options().clone())?;
        let clock: Clock = read_meta(&store, META_CLOCK)?.unwrap_or_default();
        let counters = read_meta(&store, META_COUNTERS)?.unwrap_or_default();
        let lateness = settings.lateness_ms();
        let next_due = store.next_due(clock.watermark)?;
        let mut engine = Self {
            scorer: settings.scorer(),
            store,
            lateness,
            clock,
            counters,
            next_due,
            pending_series: Vec::new(),
            last_series: None,
            migration: None,
            pending_meta: Vec::new(),
            planned: None,
            quantile: None,
            configured_edges: settings.scorer().edges(),
            supplied: BTreeMap::new(),
            external_population: false,
        };
        engine.last_series = engine.series()?.pop().map(|(_, c)| c);
        let quantile = read_meta::<Option<QuantileMeta>>(&engine.store, META_QUANTILE)?.flatten();
        if scorer.quantile_min_customers().is_some() {
            if let Some(q) = &quantile {
                scorer.set_edges(&q.edges);
                engine.scorer.set_edges(&q.edges);
            }
            engine.quantile = quantile;
        } else if quantile.is_some() {
            // Rules without quantiles now: a later return to them starts
            // from the configured thresholds again.
            engine.pending_meta.push((META_QUANTILE.into(), b"null".to_vec()));
        }
        if check == RulesCheck::Caller {
            return Ok(engine);
        }
        let current = RulesMeta { version: 0, fingerprint: settings.fingerprint(), rules: settings.rules_json() };
        let migration = read_meta::<Option<MigrationProgress>>(&engine.store, META_MIGRATION)?.flatten();
        let stored = read_meta::<RulesMeta>(&engine.store, META_RULES)?;
        let legacy = read_meta::<u64>(&engine.store, META_CONFIG)?;
        let dir_name = dir.display().to_string();
        match decide(&dir_name, stored, legacy, migration, current, settings.rules_policy())? {
            Decision::Same(m) => {
                if settings.rules_policy().migrate {
                    tracing::info!(
                        version = m.version,
                        "--migrate-rules: the rules are those of the state, nothing to migrate"
                    );
                }
                scorer.set_rules_version(m.version)
            }
            Decision::Record(m) => {
                if settings.rules_policy().migrate {
                    tracing::info!(
                        version = m.version,
                        "--migrate-rules: a new state takes these rules, nothing to migrate"
                    );
                }
                scorer.set_rules_version(m.version);
                engine.store.commit(&[
                    (META_RULES.into(), serde_json::to_vec(&m).expect("rules serialize")),
                    (META_CONFIG.into(), m.fingerprint.to_string().into_bytes()),
                ])?;
            }
            Decision::Migrate(m) => {
                // Begun by the caller (`start_migration`) once its own
                // checks passed: a run refused for another reason leaves
                // the state as it was.
                scorer.set_rules_version(m.to.version);
                engine.scorer = scorer;
                engine.planned = Some(m);
                return Ok(engine);
            }
            Decision::Resume(m) => {
                engine.scorer = scorer;
                engine.resume_migration(m)?;
                return Ok(engine);
            }
        }
        engine.scorer = scorer;
        Ok(engine)
    }

    /// Starts moving the state to the rules of `m.to` (this engine's): the
    /// daily counts are renamed now; customers by [`Engine::migrate_step`].
    pub fn begin_migration(&mut self, m: MigrationProgress) -> Result<(), EngineError> {
        let old = self.old_scorer(&m)?;
        self.scorer.set_rules_version(m.to.version);
        let renaming = Renaming::new(old.groups(), self.scorer.groups());
        for (day, counts) in self.series()? {
            self.pending_series.push((day, renaming.counts(&counts)));
        }
        self.last_series = self.last_series.as_ref().map(|c| renaming.counts(c));
        let (was, now) = (old.windows_days(), self.scorer.windows_days());
        for (name, was, now) in [("frequency", was.0, now.0), ("adoption", was.1, now.1)] {
            if now > was {
                tracing::warn!(
                    "scoring.{name}.window_days grows from {was} to {now}: the state holds {was} days of it, so for \
                     the next {} days the window counts less than a run over the whole history would",
                    now - was
                );
            }
        }
        tracing::info!(
            from_version = m.from.version,
            to_version = m.to.version,
            customers = self.counters.customers,
            "rule migration: re-evaluating every customer under the new rules"
        );
        if self.scorer.quantile_min_customers().is_some() && self.quantile.is_none() {
            tracing::info!(
                "scoring.mode = \"quantile\": the configured thresholds hold until the first recomputation of the \
                 edges, at the next 00:00 UTC the watermark reaches"
            );
        }
        self.pending_meta.push((META_MIGRATION.into(), serde_json::to_vec(&Some(&m)).expect("progress serializes")));
        self.migration = Some((m, old));
        Ok(())
    }

    /// Continues a migration begun by an earlier run (its daily counts are
    /// already renamed).
    pub fn resume_migration(&mut self, m: MigrationProgress) -> Result<(), EngineError> {
        let old = self.old_scorer(&m)?;
        self.scorer.set_rules_version(m.to.version);
        tracing::info!(
            from_version = m.from.version,
            to_version = m.to.version,
            done = m.customers,
            of = self.counters.customers,
            "rule migration: resuming"
        );
        self.migration = Some((m, old));
        Ok(())
    }

    /// The scorer of the rules a migration leaves, with the quantile edges
    /// the state had under them.
    fn old_scorer(&self, m: &MigrationProgress) -> Result<Scorer, EngineError> {
        let mut old = m.from.scorer()?;
        if old.quantile_min_customers().is_some() {
            if let Some(q) = read_meta::<Option<QuantileMeta>>(&self.store, META_QUANTILE)?.flatten() {
                old.set_edges(&q.edges);
            }
        }
        Ok(old)
    }

    /// The rules version stamped on transitions from now on (Kafka mode:
    /// from the commit marker).
    pub fn set_rules_version(&mut self, version: u32) {
        self.scorer.set_rules_version(version);
    }

    /// The migration under way, if any.
    pub fn migration(&self) -> Option<&MigrationProgress> {
        self.migration.as_ref().map(|(m, _)| m)
    }

    /// Begins the migration decided at open, if any (see [`Engine::open_with`]).
    pub fn start_migration(&mut self) -> Result<(), EngineError> {
        match self.planned.take() {
            Some(m) => self.begin_migration(m),
            None => Ok(()),
        }
    }

    /// Records the rules the state is under in its own metadata, at the
    /// next commit (Kafka mode: from the commit marker, so that readers of
    /// the local state know them).
    pub fn note_rules(&mut self, rules: &RulesMeta) {
        self.pending_meta.push((META_RULES.into(), serde_json::to_vec(rules).expect("rules serialize")));
        self.pending_meta.push((META_CONFIG.into(), rules.fingerprint.to_string().into_bytes()));
        self.pending_meta.push((META_MIGRATION.into(), b"null".to_vec()));
    }

    /// Re-evaluates up to `max` more customers (in id order) under the new
    /// rules, at the current watermark (SPEC's labels at that instant under
    /// the new rules; see [`Scorer::migrate`]). The caller writes `out` and
    /// commits, which records the progress; after the step that returns
    /// `done`, that commit makes the new rules the state's.
    pub fn migrate_step(&mut self, max: usize, out: &mut Vec<Transition>) -> Result<MigrationStep, EngineError> {
        let Some((m, old)) = self.migration.as_mut() else {
            return Err(EngineError::Rules("no rule migration is under way".into()));
        };
        let renaming = Renaming::new(old.groups(), self.scorer.groups());
        let ids = self.store.customer_ids_after(m.cursor.as_deref(), max)?;
        let watermark = self.clock.watermark;
        let before = out.len();
        for id in &ids {
            let sid = self.store.customer(id)?;
            m.customers += 1;
            // Already under the new rules: a changelog restore in Kafka mode
            // brought back its state from a migration batch that crashed
            // before its commit marker (its history came with it).
            if self.store.slot(sid).state.as_ref().is_some_and(|s| s.rules_version == m.to.version) {
                continue;
            }
            // Entries already under the new rules (renamed by a batch whose
            // commit did not finish, Kafka) stay; identical tables rename nothing.
            let entries = if renaming.is_identity() { Vec::new() } else { self.store.history_with_seqs(id)? };
            for (seq, entry) in entries.into_iter().filter(|(_, e)| e.version != m.to.version) {
                match renaming.history(&entry) {
                    Some(e) => self.store.restore_history(sid, seq, Some(HistoryEntry { version: m.to.version, ..e })),
                    None => {
                        self.store.restore_history(sid, seq, None);
                        m.history_dropped += 1;
                    }
                }
            }
            let first = out.len();
            let (cid, state) = self.store.slot_mut(sid).parts();
            if let Some(st) = state {
                self.scorer.migrate(old, cid, st, watermark, m.from.version, out);
            }
            for t in &out[first..] {
                if let Some(entry) = history_entry(self.scorer.groups(), t) {
                    self.store.record_history(sid, entry)?;
                }
            }
            self.store.touch(sid);
        }
        m.cursor = ids.last().cloned().or(m.cursor.take());
        let made = (out.len() - before) as u64;
        m.transitions += made;
        self.counters.transitions += made;
        self.next_due = self.store.next_due(watermark)?;
        let done = ids.len() < max;
        let progress = m.clone();
        if done {
            tracing::info!(
                from_version = m.from.version,
                to_version = m.to.version,
                customers = m.customers,
                transitions = m.transitions,
                history_dropped = m.history_dropped,
                "rule migration complete: the state is under the new rules"
            );
            let rules = m.to.clone();
            self.pending_meta.push((META_RULES.into(), serde_json::to_vec(&rules).expect("rules serialize")));
            self.pending_meta.push((META_CONFIG.into(), rules.fingerprint.to_string().into_bytes()));
            self.pending_meta.push((META_MIGRATION.into(), b"null".to_vec()));
            self.migration = None;
        } else {
            self.pending_meta.push((META_MIGRATION.into(), serde_json::to_vec(&Some(&progress)).expect("serializes")));
        }
        Ok(MigrationStep { progress, done })
    }

    /// Segment counts at the end of each day the watermark passed, oldest
    /// first; a day missing from the list had the counts of the day before.
    pub fn series(&self) -> Result<Vec<(i64, SegmentCounts)>, EngineError> {
        read_series(&self.store)
    }

    /// Customers and MRR per (group, segment) now (committed or not).
    pub fn segment_counts(&self) -> SegmentCounts {
        self.store.live_counts()
    }

    /// Keeps the transitions `out` of customer `sid` in its history.
    fn keep_history(&mut self, sid: segstream_state::SlotId, out: &[Transition]) -> Result<(), EngineError> {
        for t in out {
            if let Some(entry) = history_entry(self.scorer.groups(), t) {
                self.store.record_history(sid, entry)?;
            }
        }
        Ok(())
    }

    /// Calls `f` for every customer whose history changed since the last
    /// commit, with its history writes (Kafka mode sends them to the changelog).
    pub fn for_each_history_change(&self, f: impl FnMut(&str, &[(u32, Option<HistoryEntry>)])) {
        self.store.for_each_history_change(f);
    }

    /// Day-end counts noted since the last commit (Kafka mode sends them to
    /// the changelog).
    pub fn pending_series(&self) -> &[(i64, SegmentCounts)] {
        &self.pending_series
    }

    /// Marks a customer changed, to be written at the next commit as it is.
    pub fn touch_customer(&mut self, id: &str) -> Result<(), EngineError> {
        let sid = self.store.customer(id)?;
        self.store.touch(sid);
        Ok(())
    }

    /// One kept history entry of a customer (committed).
    pub fn history_entry(&self, id: &str, seq: u32) -> Result<Option<HistoryEntry>, EngineError> {
        Ok(self.store.history_entry(id, seq)?)
    }

    /// A history entry as a restore found it (`None`: deleted).
    pub fn restore_history(&mut self, id: &str, seq: u32, entry: Option<HistoryEntry>) -> Result<(), EngineError> {
        self.store.restore_history_of(id, seq, entry);
        Ok(())
    }

    /// A day's counts as a restore found them.
    pub fn restore_series(&mut self, day: i64, counts: SegmentCounts) {
        self.last_series = Some(counts.clone());
        self.pending_series.push((day, counts));
    }

    pub fn scorer(&self) -> &Scorer {
        &self.scorer
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.store.meta(key)?)
    }

    /// Committed metadata entries whose keys start with `prefix`.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, EngineError> {
        Ok(self.store.meta_with_prefix(prefix)?)
    }

    /// Counts a record that could not be decoded.
    pub fn count_invalid(&mut self) {
        self.counters.invalid += 1;
    }

    /// Applies one event (SPEC §2): moves the watermark, fires the boundaries
    /// it passed, then runs the event through its customer's state machine.
    pub fn on_event(&mut self, e: &Event, out: &mut Vec<Transition>) -> Result<Outcome, EngineError> {
        if self.migration.is_some() || self.planned.is_some() {
            return Err(EngineError::Migrating);
        }
        self.counters.events += 1;
        self.observe(e.ts, out)?;

        let before = out.len();
        let watermark = self.clock.watermark;
        let sid = self.store.customer(&e.customer_id)?;
        let slot = self.store.slot_mut(sid);
        lift(&mut slot.state, self.quantile.as_ref());
        let outcome = self.scorer.on_event(&mut slot.state, e, out);
        // A customer it created was evaluated under the edges in force (at
        // its own `ts`: the catch-up below fires its boundaries from there).
        if let (Some(st), Some(q)) = (&mut slot.state, &self.quantile) {
            st.quantile_at = st.quantile_at.max(q.computed_at);
        }
        if let Some(st) = &mut slot.state {
            // A late event can leave a boundary behind the watermark: catch up now.
            if st.timer.is_some_and(|t| t <= watermark) {
                self.scorer.advance(&e.customer_id, st, watermark, out);
            }
        }
        let new_timer = slot.state.as_ref().and_then(|s| s.timer);
        if matches!(outcome, Outcome::Deleted { .. }) {
            self.store.erase_history(sid)?;
        } else {
            self.keep_history(sid, &out[before..])?;
        }
        let (applied, late) = match outcome {
            Outcome::Duplicate => {
                self.counters.duplicate += 1;
                (false, false)
            }
            Outcome::DeletedUnknown => {
                self.counters.deleted_unknown += 1;
                (false, false)
            }
            Outcome::Created => {
                self.counters.customers += 1;
                (true, false)
            }
            Outcome::Deleted { late } => {
                self.counters.customers = self.counters.customers.saturating_sub(1);
                (true, late)
            }
            Outcome::Applied { late, capped } => {
                self.counters.capped += u64::from(capped);
                (true, late)
            }
        };
        if applied {
            self.store.touch(sid);
            self.counters.applied += 1;
            self.counters.late += u64::from(late);
            if let Some(n) = new_timer {
                self.next_due = Some(self.next_due.map_or(n, |d| d.min(n)));
            }
        }
        self.counters.transitions += (out.len() - before) as u64;
        Ok(outcome)
    }

    /// Moves the clock for an event without applying it: for a record whose
    /// customer's restored state already includes it (Kafka recovery), so
    /// that time moves exactly as it did when the event was first applied.
    pub fn skip_event(&mut self, e: &Event, out: &mut Vec<Transition>) -> Result<(), EngineError> {
        self.observe(e.ts, out)
    }

    /// An event time seen: the largest `ts` and with it the watermark move.
    fn observe(&mut self, ts: i64, out: &mut Vec<Transition>) -> Result<(), EngineError> {
        let max_ts = self.clock.max_ts.map_or(ts, |m| m.max(ts));
        self.clock.max_ts = Some(max_ts);
        self.advance_watermark(max_ts.saturating_sub(self.lateness), out)
    }

    /// Replaces a customer's state with a restored one (`None`: erased), to
    /// be written at the next commit, which the caller makes before the
    /// engine goes on: until then only restores and a commit may follow.
    pub fn restore_customer(&mut self, id: &str, state: Option<StoredState>) -> Result<(), EngineError> {
        let timer = state.as_ref().and_then(|s| s.head().timer);
        self.store.restore_state(id, state)?;
        if let Some(n) = timer {
            self.next_due = Some(self.next_due.map_or(n, |d| d.min(n)));
        }
        Ok(())
    }

    /// Sets the clock and counters restored with a commit marker.
    pub fn restore_clock(&mut self, clock: Clock, counters: Counters) -> Result<(), EngineError> {
        self.clock = clock;
        self.counters = counters;
        self.next_due = self.store.next_due(clock.watermark)?;
        Ok(())
    }

    /// Calls `f` for every customer changed since the last commit (`None`: erased).
    pub fn for_each_dirty(&self, f: impl FnMut(&str, Option<&CustomerState>)) {
        self.store.for_each_dirty(f);
    }

    /// A lower bound of the earliest pending boundary: nothing is due before it.
    pub fn next_due(&self) -> Option<i64> {
        self.next_due
    }

    /// Moves the watermark to `to` (never back), emitting every boundary
    /// `≤ to` of every customer, in (boundary, customer) order.
    ///
    /// At the end of each (UTC) day it passes, the segment counts are noted
    /// for the daily series (`Engine::series`): the watermark stops there,
    /// then goes on, which fires the same boundaries in the same order.
    pub fn advance_watermark(&mut self, to: i64, out: &mut Vec<Transition>) -> Result<(), EngineError> {
        if self.migration.is_some() || self.planned.is_some() {
            return Err(EngineError::Migrating);
        }
        let mut from = self.clock.watermark;
        if from != i64::MIN && from >= 0 {
            loop {
                let start = (from.div_euclid(DAY_MS) + 1) * DAY_MS;
                let end = start - 1;
                if end > to {
                    break;
                }
                if end > from {
                    self.advance_to(end, out)?;
                    self.note_day(end.div_euclid(DAY_MS));
                }
                if start > to {
                    break;
                }
                if self.scorer.requantiles_at(start) {
                    self.requantile(start, out)?;
                }
                from = start;
            }
        }
        self.advance_to(to, out)
    }

    /// Quantile mode, at 00:00 UTC (`at`; the watermark is 1 ms before):
    /// counts the population's R, F and M values at `at`, and when the
    /// quintile edges they give differ from those in force, puts them in
    /// force and re-evaluates every customer at `at` (see
    /// [`Scorer::requantile`]), in id order; the watermark is then `at`.
    fn requantile(&mut self, at: i64, out: &mut Vec<Transition>) -> Result<(), EngineError> {
        let Some(min) = self.scorer.quantile_min_customers() else {
            return Ok(());
        };
        let population = match self.supplied.remove(&at) {
            Some(Some(p)) => p,
            Some(None) => {
                tracing::info!(
                    at = %segstream_decode::format_rfc3339_millis(at),
                    "no quantile recomputation: a partition joined the group's quantile mode with its state after this \
                     instant"
                );
                return Ok(());
            }
            None if self.external_population => {
                return Err(EngineError::Rules(format!(
                    "no population supplied for the recomputation of the quantile edges at {}",
                    segstream_decode::format_rfc3339_millis(at)
                )))
            }
            None => self.population_at(at)?,
        };
        let computed = if population.customers >= min.max(1) { population.edges() } else { None };
        let in_force = self.scorer.edges();
        let mut record = QuantileMeta {
            edges: in_force,
            since: self.quantile.as_ref().and_then(|q| q.since),
            computed_at: at,
            customers: population.customers,
            from_population: computed.is_some(),
        };
        match computed {
            Some(edges) if edges != in_force => {
                let old = self.scorer.clone();
                self.scorer.set_edges(&edges);
                let before = out.len();
                let scorer = &self.scorer;
                let mut spans = Vec::new();
                let changed = self.store.update_each(|id, st| {
                    let first = out.len();
                    let changed = scorer.requantile(&old, id, st, at, out);
                    if changed {
                        spans.push(first..out.len());
                    }
                    changed
                })?;
                for (sid, span) in changed.into_iter().zip(spans) {
                    self.keep_history(sid, &out[span])?;
                }
                let made = out.len() - before;
                self.counters.transitions += made as u64;
                self.clock.watermark = at;
                self.next_due = self.store.next_due(at)?;
                record.edges = edges;
                record.since = Some(at);
                let requantile = out[before..].iter().filter(|t| t.cause == Cause::Requantile).count();
                tracing::info!(
                    at = %segstream_decode::format_rfc3339_millis(at),
                    customers = population.customers,
                    recency_days = ?edges.recency_days,
                    min_active_days = ?edges.min_active_days,
                    min_mrr_cents = ?edges.min_mrr_cents,
                    requantile_transitions = requantile,
                    time_transitions = made - requantile,
                    "quantile edges recomputed: changed"
                );
            }
            Some(_) => tracing::info!(
                at = %segstream_decode::format_rfc3339_millis(at),
                customers = population.customers,
                "quantile edges recomputed: unchanged"
            ),
            None => tracing::info!(
                at = %segstream_decode::format_rfc3339_millis(at),
                customers = population.customers,
                min_customers = min,
                "quantile edges kept: fewer customers than scoring.quantile.min_customers"
            ),
        }
        let json = serde_json::to_vec(&record).expect("quantile record serializes");
        self.pending_meta.push((format!("{META_QUANTILE}:{:010}", at.div_euclid(DAY_MS)), json.clone()));
        self.pending_meta.push((META_QUANTILE.into(), json));
        self.quantile = Some(record);
        Ok(())
    }

    /// Quantile mode: the last recomputation of the edges.
    pub fn quantile(&self) -> Option<&QuantileMeta> {
        self.quantile.as_ref()
    }

    /// Quantile mode: the first recomputation instant in `(watermark, to]`
    /// (the watermark passes it on its way to `to`) without a supplied
    /// population.
    pub fn quantile_due(&self, to: i64) -> Option<i64> {
        let from = self.clock.watermark;
        if from == i64::MIN || from < 0 || self.scorer.quantile_min_customers().is_none() {
            return None;
        }
        let mut q = (from.div_euclid(DAY_MS) + 1) * DAY_MS;
        while q <= to {
            if self.scorer.requantiles_at(q) && !self.supplied.contains_key(&q) {
                return Some(q);
            }
            q += DAY_MS;
        }
        None
    }

    /// This state's part of the population at `at` (every existing
    /// customer, committed or not), as a recomputation counts it.
    pub fn population_at(&self, at: i64) -> Result<Population, EngineError> {
        let mut population = Population::default();
        let scorer = &self.scorer;
        self.store.for_each_current(|_, st| population.add(scorer, st, at))?;
        Ok(population)
    }

    /// A clock that never moved starts at `watermark` (Kafka mode, quantile:
    /// the group's first watermark, so that this partition goes through the
    /// recomputations before its own first record, on its empty state).
    pub fn start_watermark_at(&mut self, watermark: i64) {
        if self.clock.watermark == i64::MIN {
            self.clock.watermark = watermark;
        }
    }

    /// Quantile mode with the population counted elsewhere (Kafka mode: the
    /// group's partitions, merged): every recomputation needs
    /// [`Engine::supply_population`] first.
    pub fn take_population_from_caller(&mut self) {
        self.external_population = true;
    }

    /// The population the recomputation at `at` uses (`None`: there is no
    /// recomputation at `at`).
    pub fn supply_population(&mut self, at: i64, population: Option<Population>) {
        self.supplied.insert(at, population);
    }

    /// Puts in force the edges a commit recorded (Kafka mode: the commit
    /// marker's), or the configured thresholds (`None`).
    pub fn restore_quantile(&mut self, q: Option<QuantileMeta>) {
        if self.scorer.quantile_min_customers().is_none() {
            return;
        }
        let edges = q.as_ref().map_or(self.configured_edges, |q| q.edges);
        self.scorer.set_edges(&edges);
        self.pending_meta.push((META_QUANTILE.into(), serde_json::to_vec(&q).expect("quantile record serializes")));
        self.quantile = q;
    }

    fn note_day(&mut self, day: i64) {
        let counts = self.store.live_counts();
        if self.last_series.as_ref() != Some(&counts) {
            self.pending_series.push((day, counts.clone()));
            self.last_series = Some(counts);
        }
    }

    fn advance_to(&mut self, to: i64, out: &mut Vec<Transition>) -> Result<(), EngineError> {
        let from = self.clock.watermark;
        if to <= from {
            return Ok(());
        }
        self.clock.watermark = to;
        if self.next_due.is_none_or(|d| d > to) {
            return Ok(());
        }
        let before = out.len();
        for sid in self.store.due(from, to)? {
            let (id, state) = self.store.slot_mut(sid).parts();
            lift(state, self.quantile.as_ref());
            let first = out.len();
            if let Some(st) = state {
                self.scorer.advance(id, st, to, out);
            }
            self.keep_history(sid, &out[first..])?;
            self.store.touch(sid);
        }
        self.counters.transitions += (out.len() - before) as u64;
        self.next_due = self.store.next_due(to)?;
        Ok(())
    }

    /// Commits every change so far, with the caller's entries (input position,
    /// output lengths), in one synced RocksDB write.
    pub fn commit(&mut self, extra: Vec<(String, Vec<u8>)>) -> Result<(), EngineError> {
        let mut meta = extra;
        meta.append(&mut self.pending_meta);
        meta.push((META_CLOCK.into(), serde_json::to_vec(&self.clock).expect("clock serializes")));
        meta.push((META_COUNTERS.into(), serde_json::to_vec(&self.counters).expect("counters serialize")));
        for (day, counts) in &self.pending_series {
            let pairs: Vec<((u16, u16), SegmentCount)> = counts.iter().map(|(k, c)| (*k, *c)).collect();
            meta.push((format!("{META_SERIES}{day:010}"), postcard::to_stdvec(&pairs).expect("counts serialize")));
        }
        self.store.commit(&meta)?;
        self.pending_series.clear();
        Ok(())
    }

    /// Segment sizes per group over every committed customer.
    pub fn segment_sizes(&self) -> Result<BTreeMap<(String, String), u64>, EngineError> {
        let mut sizes = BTreeMap::new();
        let groups = self.scorer.groups();
        self.store.for_each_customer(|_, st| {
            for (g, &label) in groups.iter().zip(&st.labels) {
                *sizes.entry((g.name.to_string(), g.segments[usize::from(label)].to_string())).or_insert(0) += 1;
            }
        })?;
        Ok(sizes)
    }
}

/// A customer last evaluated before the quantile edges in force were put in
/// force is evaluated at that instant, and through the last recomputation
/// (which found its labels unchanged and did not write it).
fn lift(state: &mut Option<CustomerState>, quantile: Option<&QuantileMeta>) {
    if let (Some(st), Some(q)) = (state, quantile) {
        if let Some(since) = q.since {
            st.evaluated_at = st.evaluated_at.max(since);
        }
        st.quantile_at = st.quantile_at.max(q.computed_at);
    }
}

/// The daily series of a state (see [`Engine::series`]), for readers too.
pub fn read_series(store: &StateStore) -> Result<Vec<(i64, SegmentCounts)>, EngineError> {
    let mut out = Vec::new();
    for (k, v) in store.meta_with_prefix(META_SERIES)? {
        let bad = |reason: String| EngineError::Meta { key: META_SERIES, reason: format!("{k}: {reason}") };
        let day: i64 = k[META_SERIES.len()..].parse().map_err(|e: std::num::ParseIntError| bad(e.to_string()))?;
        let pairs: Vec<((u16, u16), SegmentCount)> = postcard::from_bytes(&v).map_err(|e| bad(e.to_string()))?;
        out.push((day, pairs.into_iter().collect()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use segstream_decode::{decode_json_line, DAY_MS};

    const T0: i64 = 1_767_225_600_000;

    fn ev(id: &str, customer: &str, ts: i64, kind: &str) -> Event {
        let extra = match kind {
            "customer_deleted" | "login" => String::new(),
            "feature_used" => r#","feature":"api""#.to_string(),
            other => panic!("no test event of type {other}"),
        };
        let line = format!(r#"{{"event_id":"{id}","customer_id":"{customer}","type":"{kind}","ts":{ts}{extra}}}"#);
        decode_json_line(line.as_bytes()).expect("valid test event")
    }

    fn rfm(out: &[Transition], customer: &str) -> Vec<(Option<String>, i64)> {
        out.iter()
            .filter(|t| t.customer_id == customer && &*t.group == "rfm")
            .map(|t| (t.to.as_deref().map(str::to_string), t.at))
            .collect()
    }

    #[test]
    fn another_customers_event_moves_time_for_everyone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut e = Engine::open(dir.path(), &EngineSettings::spec_default()).expect("open");
        let mut out = Vec::new();
        e.on_event(&ev("1", "quiet", T0, "login"), &mut out).expect("event");
        out.clear();
        e.on_event(&ev("2", "busy", T0 + 8 * DAY_MS, "login"), &mut out).expect("event");
        // The quiet customer's 7-day boundary fired first, at its own instant.
        assert_eq!(rfm(&out, "quiet"), vec![(Some("promising".into()), T0 + 7 * DAY_MS)]);
        assert_eq!(out[0].customer_id, "quiet");
        assert_eq!(e.clock().watermark, T0 + 8 * DAY_MS);
    }

    #[test]
    fn a_late_newcomer_is_caught_up_to_the_watermark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut e = Engine::open(dir.path(), &EngineSettings::spec_default()).expect("open");
        let mut out = Vec::new();
        e.on_event(&ev("1", "busy", T0 + 20 * DAY_MS, "login"), &mut out).expect("event");
        out.clear();
        // Twenty days older than the watermark: created at its ts, then every
        // boundary up to the watermark is emitted at once.
        e.on_event(&ev("2", "late", T0, "login"), &mut out).expect("event");
        assert_eq!(
            rfm(&out, "late"),
            vec![
                (Some("new_customers".into()), T0),
                (Some("promising".into()), T0 + 7 * DAY_MS),
                (Some("about_to_sleep".into()), T0 + 14 * DAY_MS),
            ]
        );
        // Nothing is left behind the watermark: every timer is ahead of it.
        e.commit(Vec::new()).expect("commit");
        let timers = e.store().committed_timers().expect("scan");
        assert!(timers.iter().all(|(due, _)| *due > e.clock().watermark), "{timers:?}");
    }

    #[test]
    fn allowed_lateness_holds_time_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = EngineSettings::new(
            segstream_scoring::ScoringConfig::default(),
            segstream_scoring::SegmentsConfig::default(),
            std::time::Duration::from_millis(DAY_MS as u64),
            segstream_state::StateOptions::default(),
            std::num::NonZeroU64::MIN,
        )
        .expect("valid");
        let mut e = Engine::open(dir.path(), &cfg).expect("open");
        let mut out = Vec::new();
        e.on_event(&ev("1", "quiet", T0, "login"), &mut out).expect("event");
        e.on_event(&ev("2", "busy", T0 + 7 * DAY_MS + 3_600_000, "login"), &mut out).expect("event");
        // max ts is 7d 1h after the login, the watermark a day behind it: the
        // quiet customer's 7-day boundary has not fired yet…
        assert_eq!(e.clock().watermark, T0 + 6 * DAY_MS + 3_600_000);
        assert!(rfm(&out, "quiet").iter().all(|(_, at)| *at == T0));
        // …so its event 12 hours older than max ts is on time, not late.
        out.clear();
        let outcome = e.on_event(&ev("3", "quiet", T0 + 6 * DAY_MS + 4 * 3_600_000, "login"), &mut out).expect("event");
        assert_eq!(outcome, Outcome::Applied { late: false, capped: false });
        assert!(rfm(&out, "quiet").is_empty(), "still new_customers: {out:?}");
    }

    #[test]
    fn deletion_erases_state_and_timer_and_emits_to_null_everywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut e = Engine::open(dir.path(), &EngineSettings::spec_default()).expect("open");
        let mut out = Vec::new();
        e.on_event(&ev("1", "gone", T0, "feature_used"), &mut out).expect("event");
        e.on_event(&ev("2", "stays", T0, "login"), &mut out).expect("event");
        e.commit(Vec::new()).expect("commit");
        out.clear();
        let outcome = e.on_event(&ev("3", "gone", T0 + 1000, "customer_deleted"), &mut out).expect("event");
        assert_eq!(outcome, Outcome::Deleted { late: false });
        assert_eq!(out.len(), 4, "one transition to null per built-in group");
        assert!(out.iter().all(|t| t.to.is_none() && t.at == T0 + 1000));
        e.commit(Vec::new()).expect("commit");
        let mut ids = Vec::new();
        e.store().for_each_customer(|id, _| ids.push(id.to_string())).expect("scan");
        assert_eq!(ids, vec!["stays"]);
        let timers = e.store().committed_timers().expect("scan");
        assert!(timers.iter().all(|(_, id)| id == "stays"), "{timers:?}");
        assert_eq!(e.counters().customers, 1);
    }

    #[test]
    fn clock_and_counters_survive_a_reopen_but_not_uncommitted_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = EngineSettings::spec_default();
        {
            let mut e = Engine::open(dir.path(), &cfg).expect("open");
            let mut out = Vec::new();
            e.on_event(&ev("1", "a", T0, "login"), &mut out).expect("event");
            e.on_event(&ev("1", "a", T0, "login"), &mut out).expect("event");
            e.commit(Vec::new()).expect("commit");
            e.on_event(&ev("2", "b", T0 + 5, "login"), &mut out).expect("event");
        }
        let e = Engine::open(dir.path(), &cfg).expect("reopen");
        assert_eq!(e.clock(), Clock { max_ts: Some(T0), watermark: T0 });
        assert_eq!(e.counters().events, 2);
        assert_eq!(e.counters().duplicate, 1);
        assert_eq!(e.counters().customers, 1);
    }
    fn with_custom(name: &str, policy: crate::RulesPolicy) -> EngineSettings {
        let seg = segstream_scoring::SegmentsConfig {
            custom: vec![segstream_scoring::CustomGroupConfig {
                name: name.into(),
                rules: vec![segstream_scoring::RuleConfig { segment: "used".into(), when: "adoption > 0".into() }],
                default: "unused".into(),
                min_dwell_ms: 0,
            }],
            ..Default::default()
        };
        EngineSettings::new(
            segstream_scoring::ScoringConfig::default(),
            seg,
            std::time::Duration::ZERO,
            segstream_state::StateOptions::default(),
            std::num::NonZeroU64::MIN,
        )
        .expect("valid")
        .with_rules_policy(policy)
    }

    /// Kafka mode restores a customer moved by a migration batch whose
    /// commit marker was never written: resuming the migration must pass it
    /// over (its labels are already the new rules'), not read its labels as
    /// the old rules' a second time.
    #[test]
    fn a_resumed_migration_passes_over_customers_already_under_the_new_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let migrate = crate::RulesPolicy { version: None, migrate: true };
        {
            let mut e = Engine::open(dir.path(), &with_custom("plan", crate::RulesPolicy::default())).expect("open");
            let mut out = Vec::new();
            for (i, c) in ["a", "b", "c"].iter().enumerate() {
                e.on_event(&ev(&format!("{i}"), c, T0 + i as i64, "feature_used"), &mut out).expect("event");
            }
            e.commit(Vec::new()).expect("commit");
        }
        let new = with_custom("tier", migrate);
        let moved_a = {
            let mut e = Engine::open(dir.path(), &new).expect("plans the migration");
            e.start_migration().expect("begins it");
            e.commit(Vec::new()).expect("records its start");
            let mut out = Vec::new();
            let step = e.migrate_step(1, &mut out).expect("a");
            assert!(!step.done);
            let groups: Vec<&str> = out.iter().map(|t| &*t.group).collect();
            assert_eq!(groups, vec!["tier", "plan"], "{out:?}");
            let sid = e.store.customer("a").expect("a");
            e.store().slot(sid).state.clone().expect("a exists")
            // dropped without a commit: a crash
        };
        let mut e = Engine::open(dir.path(), &new).expect("resumes");
        assert_eq!(e.migration().map(|m| m.customers), Some(0));
        e.restore_customer("a", Some(StoredState::of(&moved_a))).expect("restored from the changelog");
        e.commit(Vec::new()).expect("commit");
        let mut out = Vec::new();
        let step = e.migrate_step(10, &mut out).expect("the rest");
        assert!(step.done);
        assert_eq!(step.progress.customers, 3);
        let who: Vec<&str> = out.iter().map(|t| t.customer_id.as_str()).collect();
        assert_eq!(who, vec!["b", "b", "c", "c"], "a was moved once already: {out:?}");
        assert!(out.iter().all(|t| t.cause == Cause::Rules { from: 1, to: 2 } && t.rules_version == 2));
    }
}
