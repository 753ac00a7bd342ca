//! Finding the next time boundary of a customer: the first instant at which
//! time alone changes one of its labels.

use segstream_decode::DAY_MS;
use smallvec::SmallVec;

use crate::scorer::Scorer;
use crate::state::CustomerState;
use crate::transition::{Boundary, BoundaryKind};

impl Scorer {
    /// The first instant `> after` at which time alone changes any of the
    /// customer's labels, with the scores and labels from that instant on.
    /// Labels only move when R, the active-day count or the feature count
    /// moves, and those only at candidate instants: a recency threshold after
    /// the last activity, an active day leaving the frequency window, a
    /// feature leaving the adoption window. The candidates are merged in
    /// ascending order from three sorted sources and evaluated until one
    /// changes a label.
    pub fn next_boundary(&self, st: &CustomerState, after: i64) -> Option<Boundary> {
        let reference = st.last_active.unwrap_or(st.first_seen);
        let thresholds = self.cfg.recency.thresholds_days.map(|d| reference + i64::from(d) * DAY_MS);
        let mut ti = thresholds.iter().position(|t| *t > after).unwrap_or(thresholds.len());
        // Active day `anchor − k` leaves the window at `(anchor − k + window) × day`:
        // the highest set bit is the earliest.
        let fw = self.frequency_window();
        let mut bits = st.active_bits;
        let mut next_day_exit = move || -> Option<i64> {
            while bits != 0 {
                let k = 127 - i64::from(bits.leading_zeros());
                bits &= !(1u128 << k);
                let exit = (st.active_anchor - k + fw) * DAY_MS;
                if exit > after {
                    return Some(exit);
                }
            }
            None
        };
        let mut day_exit = next_day_exit();
        let aw = self.adoption_window();
        let mut feature_exits: SmallVec<[i64; 16]> =
            st.features.iter().map(|(_, d)| (d + aw) * DAY_MS).filter(|t| *t > after).collect();
        feature_exits.sort_unstable();
        let mut fi = 0;

        // A group with a minimum dwell adds the deadlines of the moves
        // waiting for it, and stops at every instant its wait changes (the
        // state must remember when a wait began): a boundary then may change
        // no label ("silent").
        let dwell = self.has_dwell();
        let deadline = if dwell { self.next_deadline(&st.pending).map(|d| d.max(after + 1)) } else { None };

        let mut prev = self.time_varying(st, after);
        let mut prev_key = self.label_key(prev);
        loop {
            let at = [thresholds.get(ti).copied(), day_exit, feature_exits.get(fi).copied(), deadline]
                .into_iter()
                .flatten()
                .min()?;
            while thresholds.get(ti) == Some(&at) {
                ti += 1;
            }
            while day_exit == Some(at) {
                day_exit = next_day_exit();
            }
            while feature_exits.get(fi) == Some(&at) {
                fi += 1;
            }
            let due = deadline == Some(at);
            let tv = self.time_varying(st, at);
            if tv == prev && !due {
                continue;
            }
            let key = self.label_key(tv);
            if key != prev_key || due {
                let scores = self.scores_from(st, tv.0, tv.1, tv.2);
                let q = self.label_set(st, &scores);
                let mut pending = st.pending.clone();
                let labels = self.settle(&st.labels, &mut pending, &q, at);
                if labels[..] != st.labels[..] || pending != st.pending {
                    // What moved at this very instant (not since `after`).
                    let mut kind = Boundary::kinds(prev, tv);
                    if due && labels[..] != st.labels[..] {
                        kind = BoundaryKind::from_bits(kind.bits() | BoundaryKind::DWELL);
                    }
                    return Some(Boundary { at, kind, scores, labels: labels.to_vec(), pending });
                }
            }
            prev = tv;
            prev_key = key;
        }
    }
}
