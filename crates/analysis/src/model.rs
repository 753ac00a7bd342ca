//! What a report is computed from: the transitions a run produced, the input
//! events (what happened to each account, month by month) and the state at
//! the report's end (each customer's segments and scores), gathered once.

use std::collections::HashMap;

use segstream_decode::{Event, EventKind, SubscriptionStatus, DAY_MS};
use xxhash_rust::xxh3::xxh3_64;

use crate::AnalysisError;

/// The segment groups of the configuration the data was produced with, in
/// its order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Names {
    pub groups: Vec<GroupNames>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupNames {
    pub name: String,
    pub segments: Vec<String>,
}

impl Names {
    pub fn new(groups: impl IntoIterator<Item = (String, Vec<String>)>) -> Self {
        Self { groups: groups.into_iter().map(|(name, segments)| GroupNames { name, segments }).collect() }
    }

    pub fn group(&self, name: &str) -> Option<u16> {
        self.groups.iter().position(|g| g.name == name).map(|g| g as u16)
    }

    pub fn segment(&self, group: u16, name: &str) -> Option<u16> {
        self.groups.get(usize::from(group))?.segments.iter().position(|s| s == name).map(|s| s as u16)
    }

    pub fn group_name(&self, group: u16) -> &str {
        &self.groups[usize::from(group)].name
    }

    pub fn segment_name(&self, group: u16, segment: u16) -> &str {
        &self.groups[usize::from(group)].segments[usize::from(segment)]
    }

    /// A segment's name, `None` for "no segment" (before the first event, after erasure).
    pub fn label(&self, group: u16, segment: Option<u16>) -> Option<String> {
        segment.map(|s| self.segment_name(group, s).to_string())
    }
}

/// One transition: a customer's label in a group changed at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub customer: u32,
    pub group: u16,
    pub from: Option<u16>,
    pub to: Option<u16>,
    pub at: i64,
}

/// A customer as the state holds it at the report's end.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub customer: u32,
    /// The segment of each group, by index.
    pub labels: Vec<u16>,
    pub r: u8,
    pub f: u8,
    pub m: u8,
    pub adoption: u8,
    pub health: u8,
    pub mrr_cents: i64,
    pub industry: Option<String>,
    pub employees: Option<i64>,
    pub country: Option<String>,
    /// Profile attributes as `attr.NAME` and survey answers as
    /// `survey.QUESTION`, each as its values (a list attribute has several),
    /// for breakdowns asked by name.
    pub named: Vec<(String, Vec<String>)>,
}

/// What changes an account's money, in time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Money {
    /// A `subscription` event: the MRR it sets (0 when canceled).
    Subscription { mrr_cents: i64, canceled: bool },
    /// A `customer_deleted` event: the account and its MRR are gone.
    Erased,
}

/// What the input events tell of one account.
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    /// `ts` of its first event (any type); `i64::MAX` when it has none.
    pub first_seen: i64,
    /// Calendar months (see [`month_of`]) with at least one activity event.
    pub active_months: Vec<i32>,
    /// (ts, input order, what happened, event id hash), sorted by the first
    /// two once gathered.
    pub money: Vec<(i64, u64, Money, u64)>,
    /// Hashes of the last [`DEDUP_IDS`] event ids read, as the engine keeps
    /// them: a ring (`recent_next` is the oldest once `recent_len` is full),
    /// inline so that checking costs no further memory access.
    recent_ids: [u64; DEDUP_IDS],
    recent_len: u8,
    recent_next: u8,
    /// The day of the last activity event read (a shortcut for `active_months`).
    last_active_day: i64,
}

/// Event ids remembered per customer for de-duplication: the engine's number.
pub const DEDUP_IDS: usize = 32;

/// What an outcome of an account is, for the predictive checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A cancellation (a subscription becoming `canceled`) or an erasure.
    Churn,
    /// A subscription whose MRR is lower than the one before it, not canceled.
    Downgrade,
}

impl Facts {
    fn new() -> Self {
        Self {
            first_seen: i64::MAX,
            active_months: Vec::new(),
            money: Vec::new(),
            recent_ids: [0; DEDUP_IDS],
            recent_len: 0,
            recent_next: 0,
            last_active_day: i64::MIN,
        }
    }

    /// MRR in force at instant `t` (after every event with `ts ≤ t`).
    pub fn mrr_at(&self, t: i64) -> i64 {
        let mut mrr = 0;
        for (ts, _, m, _) in &self.money {
            if *ts > t {
                break;
            }
            mrr = match m {
                Money::Subscription { mrr_cents, .. } => *mrr_cents,
                Money::Erased => 0,
            };
        }
        mrr
    }

    /// Whether the subscription in force at `t` is canceled (an erasure
    /// since ends it: the account is gone, a later one starts afresh).
    pub fn canceled_at(&self, t: i64) -> bool {
        let mut canceled = false;
        for (ts, _, m, _) in &self.money {
            if *ts > t {
                break;
            }
            canceled = matches!(m, Money::Subscription { canceled: true, .. });
        }
        canceled
    }

    /// The instants of each outcome, in time order.
    pub fn outcomes(&self, kind: Outcome) -> Vec<i64> {
        // The MRR in force, and whether the previous subscription (if any) was canceled.
        let (mut mrr, mut previous) = (0i64, None::<bool>);
        let mut out = Vec::new();
        for &(ts, _, m, _) in &self.money {
            match (kind, m) {
                (Outcome::Churn, Money::Erased) => out.push(ts),
                (Outcome::Churn, Money::Subscription { canceled: true, .. }) if previous == Some(false) => out.push(ts),
                (Outcome::Downgrade, Money::Subscription { mrr_cents, canceled: false }) if mrr_cents < mrr => {
                    out.push(ts)
                }
                _ => {}
            }
            (mrr, previous) = match m {
                Money::Subscription { mrr_cents, canceled } => (mrr_cents, Some(canceled)),
                Money::Erased => (0, None),
            };
        }
        out
    }
}

/// What a report keeps of one input event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventFact {
    pub ts: i64,
    /// xxh3 of the `event_id`, for de-duplication.
    pub event_id_hash: u64,
    pub kind: FactKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactKind {
    /// `login`, `session`, `feature_used`, `workflow_completed`.
    Activity,
    Subscription {
        mrr_cents: i64,
        canceled: bool,
    },
    Erased,
    /// Any other type (it still makes the customer exist).
    Other,
}

impl EventFact {
    pub fn of(e: &Event) -> Self {
        let kind = match &e.kind {
            k if k.is_activity() => FactKind::Activity,
            EventKind::Subscription { mrr_cents, status, .. } => {
                let canceled = *status == SubscriptionStatus::Canceled;
                FactKind::Subscription { mrr_cents: if canceled { 0 } else { *mrr_cents }, canceled }
            }
            EventKind::CustomerDeleted => FactKind::Erased,
            _ => FactKind::Other,
        };
        Self { ts: e.ts, event_id_hash: xxh3_64(e.event_id.as_bytes()), kind }
    }
}

/// Events reduced to facts where they are decoded (one allocation per
/// batch, not several per event), added to a [`Dataset`] in order.
#[derive(Debug, Default)]
pub struct FactBatch {
    ids: String,
    facts: Vec<(u32, u32, EventFact)>,
}

impl FactBatch {
    pub fn push(&mut self, e: &Event) {
        let start = self.ids.len() as u32;
        self.ids.push_str(&e.customer_id);
        self.facts.push((start, e.customer_id.len() as u32, EventFact::of(e)));
    }

    pub fn len(&self) -> usize {
        self.facts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.facts.is_empty()
    }
}

/// A calendar month as a number: `year × 12 + month − 1` (UTC).
pub fn month_of(t: i64) -> i32 {
    let d = date_of(t);
    d.year() * 12 + i32::from(u8::from(d.month())) - 1
}

/// The first instant of a month numbered as by [`month_of`].
pub fn month_start(month: i32) -> i64 {
    let (y, m) = (month.div_euclid(12), month.rem_euclid(12) + 1);
    let month = time::Month::try_from(m as u8).expect("1..=12");
    let d = time::Date::from_calendar_date(y, month, 1).unwrap_or(time::Date::MIN);
    i64::from(d.to_julian_day() - UNIX_EPOCH_JULIAN_DAY) * DAY_MS
}

/// `YYYY-MM` of a month numbered as by [`month_of`].
pub fn month_label(month: i32) -> String {
    format!("{:04}-{:02}", month.div_euclid(12), month.rem_euclid(12) + 1)
}

const UNIX_EPOCH_JULIAN_DAY: i32 = 2_440_588;

/// The UTC date of an instant.
pub fn date_of(t: i64) -> time::Date {
    let day = t.div_euclid(DAY_MS).clamp(i64::from(i32::MIN / 2), i64::from(i32::MAX / 2)) as i32;
    time::Date::from_julian_day(day + UNIX_EPOCH_JULIAN_DAY).unwrap_or(time::Date::MIN)
}

/// `YYYY-MM-DD` of the day numbered `day` (days since 1970-01-01).
pub fn day_label(day: i64) -> String {
    date_of(day * DAY_MS).to_string()
}

/// Everything a report or a comparison reads, customers numbered once.
#[derive(Debug, Default)]
pub struct Dataset {
    pub names: Names,
    ids: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    customers: Vec<Box<str>>,
    pub(crate) moves: Vec<Move>,
    pub(crate) facts: Vec<Facts>,
    pub(crate) snapshot: Vec<Snapshot>,
    /// Events gathered (duplicates by `event_id` not included).
    pub events: u64,
    /// Events whose `event_id` is among the customer's last 32: ignored, as the engine does.
    pub duplicate_events: u64,
}

impl Dataset {
    pub fn new(names: Names) -> Self {
        Self { names, ..Self::default() }
    }

    /// The number of a customer id, given on first sight.
    pub fn customer(&mut self, id: &str) -> u32 {
        if let Some(&n) = self.ids.get(id) {
            return n;
        }
        let n = self.customers.len() as u32;
        self.ids.insert(id.into(), n);
        self.customers.push(id.into());
        self.facts.push(Facts::new());
        n
    }

    /// The id of a customer number.
    pub fn customer_id(&self, n: u32) -> &str {
        &self.customers[n as usize]
    }

    pub fn customers(&self) -> usize {
        self.customers.len()
    }

    pub fn moves(&self) -> &[Move] {
        &self.moves
    }

    pub fn snapshot(&self) -> &[Snapshot] {
        &self.snapshot
    }

    /// A transition, by names as its record carries them.
    pub fn add_transition(
        &mut self,
        customer_id: &str,
        group: &str,
        from: Option<&str>,
        to: Option<&str>,
        at: i64,
    ) -> Result<(), AnalysisError> {
        let g = self.names.group(group).ok_or_else(|| AnalysisError::UnknownGroup(group.to_string()))?;
        let seg = |s: Option<&str>| -> Result<Option<u16>, AnalysisError> {
            s.map(|s| {
                self.names
                    .segment(g, s)
                    .ok_or_else(|| AnalysisError::UnknownSegment { group: group.to_string(), segment: s.to_string() })
            })
            .transpose()
        };
        let (from, to) = (seg(from)?, seg(to)?);
        let customer = self.customer(customer_id);
        self.moves.push(Move { customer, group: g, from, to, at });
        Ok(())
    }

    /// An input event; one whose `event_id` is among the last 32 its
    /// customer had (in the order read) is counted and ignored, as the engine
    /// ignores it (the same in a file in time order).
    pub fn add_event(&mut self, e: &Event) {
        self.add_fact(&e.customer_id, EventFact::of(e));
    }

    /// The events of a batch, in its order.
    pub fn add_batch(&mut self, batch: &FactBatch) {
        for (start, len, fact) in &batch.facts {
            self.add_fact(&batch.ids[*start as usize..(*start + *len) as usize], *fact);
        }
    }

    pub fn add_fact(&mut self, customer_id: &str, fact: EventFact) {
        let c = self.customer(customer_id) as usize;
        let facts = &mut self.facts[c];

        if facts.recent_ids[..usize::from(facts.recent_len)].contains(&fact.event_id_hash) {
            self.duplicate_events += 1;
            return;
        }
        if usize::from(facts.recent_len) < DEDUP_IDS {
            facts.recent_ids[usize::from(facts.recent_len)] = fact.event_id_hash;
            facts.recent_len += 1;
        } else {
            facts.recent_ids[usize::from(facts.recent_next)] = fact.event_id_hash;
            facts.recent_next = ((usize::from(facts.recent_next) + 1) % DEDUP_IDS) as u8;
        }
        let seq = self.events;
        self.events += 1;
        if fact.kind != FactKind::Erased {
            // An erasure makes no account exist (see `finish`).
            facts.first_seen = facts.first_seen.min(fact.ts);
        }
        match fact.kind {
            FactKind::Activity => {
                // Most activity falls on a day already seen: no calendar work then.
                let day = fact.ts.div_euclid(DAY_MS);
                if day != facts.last_active_day {
                    facts.last_active_day = day;
                    let m = month_of(fact.ts);
                    if facts.active_months.last() != Some(&m) && !facts.active_months.contains(&m) {
                        facts.active_months.push(m);
                    }
                }
            }
            FactKind::Subscription { mrr_cents, canceled } => {
                facts.money.push((fact.ts, seq, Money::Subscription { mrr_cents, canceled }, fact.event_id_hash))
            }
            FactKind::Erased => facts.money.push((fact.ts, seq, Money::Erased, fact.event_id_hash)),
            FactKind::Other => {}
        }
    }

    /// A customer of the state at the report's end.
    pub fn add_snapshot(&mut self, customer_id: &str, mut row: Snapshot) {
        row.customer = self.customer(customer_id);
        self.snapshot.push(row);
    }

    /// Puts what was gathered in time order; call once, after the last `add_`.
    pub fn finish(&mut self) {
        self.moves.sort_by_key(|m| m.at);
        for f in &mut self.facts {
            f.money.sort_by_key(|(ts, seq, _, _)| (*ts, *seq));
            // A subscription or erasure sent again with its id: next to its
            // first copy in time order, where the engine ignores it, even when
            // the file has them far apart.
            let before = f.money.len();
            f.money.dedup_by(|later, earlier| later.0 == earlier.0 && later.3 == earlier.3);
            self.duplicate_events += (before - f.money.len()) as u64;
            self.events -= (before - f.money.len()) as u64;
            // An erasure before the account's first event erases nothing:
            // the engine ignores it (and it makes no account of a cohort).
            let (before, first) = (f.money.len(), f.first_seen);
            f.money.retain(|(ts, _, m, _)| !(*m == Money::Erased && *ts < first));
            self.events -= (before - f.money.len()) as u64;
            f.active_months.sort_unstable();
        }
        // By id: the same order (so the same sums and clusters) whatever
        // was read first.
        let customers = &self.customers;
        self.snapshot.sort_by(|a, b| customers[a.customer as usize].cmp(&customers[b.customer as usize]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_days_are_utc_calendar_ones() {
        let t = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        assert_eq!(month_label(month_of(t)), "2026-01");
        assert_eq!(month_label(month_of(t - 1)), "2025-12");
        assert_eq!(month_start(month_of(t)), t);
        assert_eq!(month_start(month_of(t) + 2), t + 59 * DAY_MS); // 31 + 28 days
        assert_eq!(day_label(t / DAY_MS), "2026-01-01");
    }

    #[test]
    fn outcomes_are_new_cancellations_erasures_and_lower_mrr() {
        let sub = |mrr_cents, canceled| Money::Subscription { mrr_cents, canceled };
        let f = Facts {
            money: vec![
                (1, 0, sub(5000, false), 0),
                (2, 1, sub(3000, false), 1),
                (3, 2, sub(0, true), 2),
                (4, 3, sub(0, true), 3),
                (5, 4, sub(4000, false), 4),
                (6, 5, Money::Erased, 5),
                (7, 6, sub(1000, false), 6),
            ],
            ..Facts::new()
        };
        assert_eq!(f.outcomes(Outcome::Churn), vec![3, 6]);
        // A first subscription that is already canceled cancels nothing.
        let g = Facts {
            money: vec![(1, 0, sub(0, true), 0), (2, 1, sub(10, false), 1), (3, 2, sub(0, true), 2)],
            ..Facts::new()
        };
        assert_eq!(g.outcomes(Outcome::Churn), vec![3]);
        assert_eq!(f.outcomes(Outcome::Downgrade), vec![2]);
        assert_eq!(f.mrr_at(2), 3000);
        assert_eq!(f.mrr_at(6), 0);
        assert_eq!(f.mrr_at(100), 1000);
    }
}
