//! Quantile RFM (`scoring.mode = "quantile"`): R, F and M as quintiles of
//! the population, whose edges are recomputed at 00:00 UTC every day and
//! then used as the day's fixed thresholds.
//!
//! The edges are the population's 20th, 40th, 60th and 80th percentiles
//! (nearest rank) of each raw value: days since the last activity (whole
//! days), active days in the frequency window, MRR in cents. A value at or
//! below the 20th percentile is in the first quintile, so customers with
//! equal values always share a quintile. The first quintile of recency (the
//! most recent) is R = 5; of active days and MRR, F = 1 and M = 1.

use std::collections::BTreeMap;

use segstream_decode::DAY_MS;
use serde::{Deserialize, Serialize};

use crate::config::ScoringMode;
use crate::scorer::Scorer;
use crate::state::CustomerState;
use crate::transition::{Boundary, BoundaryKind, Cause, Transition};

/// The R, F and M thresholds in force, in the configuration's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edges {
    /// R: 5 if fewer days than `recency_days[0]` since the last activity, … (ascending).
    pub recency_days: [u32; 4],
    /// F: 5 if at least `min_active_days[0]` active days, … (descending).
    pub min_active_days: [u32; 4],
    /// M: 5 if at least `min_mrr_cents[0]`, … (descending).
    pub min_mrr_cents: [i64; 4],
}

/// Exact counts of the population's raw R, F and M values at one instant:
/// mergeable (a sum per value), and small (recency and active days take a
/// few hundred values; MRR takes the plans' prices).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Population {
    pub customers: u64,
    pub recency_days: BTreeMap<u32, u64>,
    pub active_days: BTreeMap<u32, u64>,
    pub mrr_cents: BTreeMap<i64, u64>,
}

/// The value of nearest rank `⌈p·n/100⌉` (1-based) in ascending order.
fn percentile<K: Copy + Ord>(counts: &BTreeMap<K, u64>, n: u64, p: u64) -> Option<K> {
    let rank = (p * n).div_ceil(100).max(1);
    let mut seen = 0;
    for (v, c) in counts {
        seen += c;
        if seen >= rank {
            return Some(*v);
        }
    }
    None
}

impl Population {
    /// Counts one customer's values at `tau`.
    pub fn add(&mut self, scorer: &Scorer, st: &CustomerState, tau: i64) {
        let reference = st.last_active.unwrap_or(st.first_seen);
        let days = (tau - reference).max(0).div_euclid(DAY_MS);
        let days = u32::try_from(days).unwrap_or(u32::MAX);
        self.customers += 1;
        *self.recency_days.entry(days).or_default() += 1;
        *self.active_days.entry(st.active_days_in_window(tau, scorer.frequency_window())).or_default() += 1;
        *self.mrr_cents.entry(st.mrr_cents).or_default() += 1;
    }

    /// Adds another part of the population (another partition's counts).
    pub fn merge(&mut self, other: &Population) {
        self.customers += other.customers;
        for (v, c) in &other.recency_days {
            *self.recency_days.entry(*v).or_default() += c;
        }
        for (v, c) in &other.active_days {
            *self.active_days.entry(*v).or_default() += c;
        }
        for (v, c) in &other.mrr_cents {
            *self.mrr_cents.entry(*v).or_default() += c;
        }
    }

    /// The quintile edges of this population (`None` when it is empty).
    pub fn edges(&self) -> Option<Edges> {
        let n = self.customers;
        let q = |p| -> Option<(u32, u32, i64)> {
            Some((
                percentile(&self.recency_days, n, p)?,
                percentile(&self.active_days, n, p)?,
                percentile(&self.mrr_cents, n, p)?,
            ))
        };
        let (q20, q40, q60, q80) = (q(20)?, q(40)?, q(60)?, q(80)?);
        // "At or below the percentile" as the thresholds' strict and
        // non-strict comparisons need it: every value is an integer.
        Some(Edges {
            recency_days: [q20.0, q40.0, q60.0, q80.0].map(|d| d.saturating_add(1)),
            min_active_days: [q80.1, q60.1, q40.1, q20.1].map(|d| d.saturating_add(1)),
            min_mrr_cents: [q80.2, q60.2, q40.2, q20.2].map(|m| m.saturating_add(1)),
        })
    }
}

impl Scorer {
    /// Whether the thresholds are the population's quintiles, and the
    /// smallest population a recomputation uses.
    pub fn quantile_min_customers(&self) -> Option<u64> {
        (self.cfg.mode == ScoringMode::Quantile).then_some(self.cfg.quantile.min_customers)
    }

    /// Whether the quantile edges are recomputed at `at` (00:00 UTC of a
    /// day every `every_days` from Monday 1970-01-05).
    pub fn requantiles_at(&self, at: i64) -> bool {
        self.cfg.mode == ScoringMode::Quantile
            && at.rem_euclid(DAY_MS) == 0
            && (at.div_euclid(DAY_MS) - 4).rem_euclid(i64::from(self.cfg.quantile.every_days.max(1))) == 0
    }

    /// The R, F and M thresholds in force.
    pub fn edges(&self) -> Edges {
        Edges {
            recency_days: self.cfg.recency.thresholds_days,
            min_active_days: self.cfg.frequency.min_active_days,
            min_mrr_cents: self.cfg.monetary.min_mrr_cents,
        }
    }

    /// Puts `edges` in force. Unlike configured thresholds, quintile edges
    /// may repeat (ties): a repeated edge leaves a score empty.
    pub fn set_edges(&mut self, edges: &Edges) {
        self.cfg.recency.thresholds_days = edges.recency_days.map(|d| d.max(1));
        self.cfg.frequency.min_active_days = edges.min_active_days;
        self.cfg.monetary.min_mrr_cents = edges.min_mrr_cents;
    }

    /// Re-evaluates a customer at `at`, a recomputation of the quantile
    /// edges (which `self` has and `old` had), or at its `evaluated_at` when
    /// that is later. A label that changes there is emitted with cause
    /// `requantile` when the new edges give the customer other R, F or M
    /// scores than the old ones would; otherwise the change is the time
    /// boundary the old edges had at that very instant (an active day
    /// leaving the window at 00:00), with its kind. Returns whether the
    /// state must be written (labels, waits or the next boundary moved);
    /// `evaluated_at` and `quantile_at` alone need not be (see the engine's
    /// lifting). A state whose `quantile_at` is `at` or later is passed over.
    pub fn requantile(
        &self,
        old: &Scorer,
        customer_id: &str,
        st: &mut CustomerState,
        at: i64,
        out: &mut Vec<Transition>,
    ) -> bool {
        if st.quantile_at >= at {
            // Through this recomputation already (a state restored from
            // ahead of a replay, Kafka mode).
            return false;
        }
        st.quantile_at = at;
        let tau = st.evaluated_at.max(at);
        let tv = self.time_varying(st, tau);
        let scores = self.scores_from(st, tv.0, tv.1, tv.2);
        let q = self.label_set(st, &scores);
        let mut pending = st.pending.clone();
        let labels = self.settle(&st.labels, &mut pending, &q, tau);
        let moved = labels[..] != st.labels[..];
        if moved {
            let was = old.scores(st, tau);
            let cause = if (was.r, was.f, was.m) != (scores.r, scores.f, scores.m) {
                Cause::Requantile
            } else {
                let mut kind = Boundary::kinds(old.time_varying(st, tau - 1), old.time_varying(st, tau));
                if old.next_deadline(&st.pending) == Some(tau) {
                    kind = BoundaryKind::from_bits(kind.bits() | BoundaryKind::DWELL);
                }
                Cause::Time(kind)
            };
            self.emit(customer_id, &st.labels, Some(&labels), tau, &cause, &scores, out);
        }
        let (timer, waits) = (st.timer, pending != st.pending);
        st.labels = labels.to_vec();
        st.pending = pending;
        st.evaluated_at = tau;
        self.reschedule(st);
        moved || waits || st.timer != timer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts<K: Ord + Copy>(values: &[K]) -> BTreeMap<K, u64> {
        let mut m = BTreeMap::new();
        for v in values {
            *m.entry(*v).or_default() += 1;
        }
        m
    }

    #[test]
    fn nearest_rank_percentiles() {
        let ten: Vec<u32> = (1..=10).collect();
        let c = counts(&ten);
        assert_eq!([20, 40, 60, 80].map(|p| percentile(&c, 10, p)), [Some(2), Some(4), Some(6), Some(8)]);
        // 7 values: ranks ⌈1.4⌉ = 2, ⌈2.8⌉ = 3, ⌈4.2⌉ = 5, ⌈5.6⌉ = 6.
        let c = counts(&[10u32, 20, 30, 40, 50, 60, 70]);
        assert_eq!([20, 40, 60, 80].map(|p| percentile(&c, 7, p)), [Some(20), Some(30), Some(50), Some(60)]);
        assert_eq!(percentile(&counts(&[5u32]), 1, 20), Some(5));
        assert_eq!(percentile(&BTreeMap::<u32, u64>::new(), 0, 20), None);
    }

    #[test]
    fn ties_share_a_quintile_and_edges_follow_the_comparisons() {
        let mut p = Population::default();
        // Six of ten pay nothing: M's 20th, 40th and 60th percentiles are 0.
        for (i, mrr) in [0, 0, 0, 0, 0, 0, 100, 200, 300, 400].into_iter().enumerate() {
            p.customers += 1;
            *p.recency_days.entry(i as u32).or_default() += 1;
            *p.active_days.entry(9 - i as u32).or_default() += 1;
            *p.mrr_cents.entry(mrr).or_default() += 1;
        }
        let e = p.edges().expect("a population");
        // Recency days 0..=9: 20th percentile 1, so R = 5 below 2 days.
        assert_eq!(e.recency_days, [2, 4, 6, 8]);
        assert_eq!(e.min_active_days, [8, 6, 4, 2]);
        // Paying something, at most the 80th percentile (rank 8: 200): M = 4.
        assert_eq!(e.min_mrr_cents, [201, 1, 1, 1]);
        let mut s = Scorer::spec_default();
        s.set_edges(&e);
        let mut st = CustomerState::new(0);
        st.mrr_cents = 0;
        assert_eq!(s.scores(&st, 0).m, 1);
        st.mrr_cents = 200;
        assert_eq!(s.scores(&st, 0).m, 4);
        st.mrr_cents = 201;
        assert_eq!(s.scores(&st, 0).m, 5);
        // Exactly 2 days since first seen is past the first edge.
        assert_eq!(s.scores(&st, 2 * DAY_MS - 1).r, 5);
        assert_eq!(s.scores(&st, 2 * DAY_MS).r, 4);
    }

    #[test]
    fn merged_parts_give_the_edges_of_the_whole() {
        let s = Scorer::spec_default();
        let states: Vec<CustomerState> = (0..50)
            .map(|i| {
                let mut st = CustomerState::new(i * 3_600_000);
                st.mrr_cents = (i % 7) * 1000;
                st
            })
            .collect();
        let (mut whole, mut a, mut b) = (Population::default(), Population::default(), Population::default());
        for (i, st) in states.iter().enumerate() {
            whole.add(&s, st, 40 * DAY_MS);
            if i % 3 == 0 {
                a.add(&s, st, 40 * DAY_MS)
            } else {
                b.add(&s, st, 40 * DAY_MS)
            }
        }
        a.merge(&b);
        assert_eq!(a, whole);
        assert_eq!(a.edges(), whole.edges());
    }
}
