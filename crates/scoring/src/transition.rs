use std::sync::{Arc, OnceLock};

use uuid::Uuid;

use crate::scorer::Scores;

/// One label change of one customer in one group (SPEC §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub customer_id: String,
    pub group: Arc<str>,
    /// `None` when the customer first appears.
    pub from: Option<Arc<str>>,
    /// `None` when the customer is deleted.
    pub to: Option<Arc<str>>,
    /// Epoch milliseconds: the event's `ts` or the boundary instant.
    pub at: i64,
    pub cause: Cause,
    /// Scores at `at` (for a deletion: just before the customer was erased).
    pub scores: Scores,
    /// The version of the rules (scoring and segments) that produced it.
    pub rules_version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Caused by the event with this id.
    Event(String),
    /// Caused by time passing across a boundary.
    Time(BoundaryKind),
    /// Caused by a change of the rules: the customer re-evaluated under
    /// version `to` (a rule migration, `segstream run --migrate-rules`).
    Rules { from: u32, to: u32 },
    /// Caused by a recomputation of the quantile edges (`scoring.mode =
    /// "quantile"`), at 00:00 UTC.
    Requantile,
}

/// Which time-varying inputs crossed a threshold at a boundary (a bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BoundaryKind(u8);

impl BoundaryKind {
    pub const RECENCY: u8 = 1;
    pub const FREQUENCY: u8 = 2;
    pub const ADOPTION: u8 = 4;
    /// A group's `min_dwell_ms` passed: the customer qualified for the new
    /// segment long enough to move.
    pub const DWELL: u8 = 8;
    /// Not a boundary kind: marks a kept history entry of a quantile
    /// recomputation (cause `requantile`) in the entry's kind bits.
    pub const REQUANTILE: u8 = 16;

    pub const fn from_bits(bits: u8) -> Self {
        Self(bits & (Self::RECENCY | Self::FREQUENCY | Self::ADOPTION | Self::DWELL))
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    /// `recency`, `frequency`, `adoption`, joined with `+` when several moved at once.
    pub fn name(self) -> String {
        let names = [
            (Self::RECENCY, "recency"),
            (Self::FREQUENCY, "frequency"),
            (Self::ADOPTION, "adoption"),
            (Self::DWELL, "dwell"),
        ];
        let parts: Vec<&str> = names.iter().filter(|(b, _)| self.0 & b != 0).map(|(_, n)| *n).collect();
        parts.join("+")
    }

    /// The kind named by [`BoundaryKind::name`] (`None` for an unknown part).
    pub fn from_name(name: &str) -> Option<Self> {
        let mut bits = 0;
        for part in name.split('+') {
            bits |= match part {
                "recency" => Self::RECENCY,
                "frequency" => Self::FREQUENCY,
                "adoption" => Self::ADOPTION,
                "dwell" => Self::DWELL,
                _ => return None,
            };
        }
        Some(Self(bits))
    }

    /// Human explanation with the configured windows (see [`crate::Scorer::explain`]).
    pub fn explain(self, frequency_window_days: u32, adoption_window_days: u32) -> String {
        let mut parts = Vec::new();
        if self.0 & Self::RECENCY != 0 {
            parts.push("time since the last activity crossed a recency threshold".to_string());
        }
        if self.0 & Self::FREQUENCY != 0 {
            parts.push(format!("an active day left the {frequency_window_days}-day frequency window"));
        }
        if self.0 & Self::ADOPTION != 0 {
            parts.push(format!("a feature left the {adoption_window_days}-day adoption window"));
        }
        if self.0 & Self::DWELL != 0 {
            parts.push("it qualified for the new segment for the group's minimum dwell".to_string());
        }
        parts.join("; ")
    }
}

/// A time boundary found by [`crate::Scorer::next_boundary`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundary {
    pub at: i64,
    pub kind: BoundaryKind,
    pub scores: Scores,
    pub labels: Vec<u16>,
    /// Moves waiting for their group's minimum dwell from this instant on
    /// (see [`crate::CustomerState::pending`]).
    pub pending: Vec<(u16, u16, i64)>,
}

impl Boundary {
    /// Which of (R, active days, features) differ between two instants.
    pub(crate) fn kinds(before: (u8, u32, u32), after: (u8, u32, u32)) -> BoundaryKind {
        let mut bits = 0;
        if before.0 != after.0 {
            bits |= BoundaryKind::RECENCY;
        }
        if before.1 != after.1 {
            bits |= BoundaryKind::FREQUENCY;
        }
        if before.2 != after.2 {
            bits |= BoundaryKind::ADOPTION;
        }
        BoundaryKind(bits)
    }
}

fn namespace() -> &'static Uuid {
    static NS: OnceLock<Uuid> = OnceLock::new();
    NS.get_or_init(|| Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:segstream:transition"))
}

impl Transition {
    /// Deterministic id from (customer, group, at, to) — and, for a rule
    /// migration's, the rules version it moves to: a UUID v5, so a replay of
    /// the same input yields the same ids and consumers can de-duplicate.
    pub fn transition_id(&self) -> Uuid {
        let mut name = Vec::with_capacity(self.customer_id.len() + 48);
        let mut at = itoa::Buffer::new();
        for part in [self.customer_id.as_bytes(), self.group.as_bytes(), at.format(self.at).as_bytes()] {
            name.extend_from_slice(part);
            name.push(0x1f);
        }
        match &self.to {
            Some(to) => {
                name.push(b's');
                name.extend_from_slice(to.as_bytes());
            }
            None => name.push(b'n'),
        }
        // A rule migration's transition names its target version too: the
        // same move made again by a later change of rules (a revert, at the
        // same instant) is another transition, not a duplicate of this one.
        if let Cause::Rules { to, .. } = &self.cause {
            name.push(0x1f);
            name.extend_from_slice(format!("rules:{to}").as_bytes());
        }
        Uuid::new_v5(namespace(), &name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_names_round_trip_and_explanations_use_the_windows() {
        let k = BoundaryKind::from_bits(BoundaryKind::RECENCY | BoundaryKind::ADOPTION);
        assert_eq!(k.name(), "recency+adoption");
        assert_eq!(BoundaryKind::from_name(&k.name()), Some(k));
        assert_eq!(BoundaryKind::from_name("recency+later"), None);
        let text = BoundaryKind::from_bits(BoundaryKind::FREQUENCY | BoundaryKind::ADOPTION).explain(60, 14);
        assert_eq!(text, "an active day left the 60-day frequency window; a feature left the 14-day adoption window");
    }

    #[test]
    fn a_rule_migrations_id_names_its_target_version() {
        let t = |cause: Cause| Transition {
            customer_id: "c".into(),
            group: Arc::from("health"),
            from: Some(Arc::from("yellow")),
            to: Some(Arc::from("green")),
            at: 5,
            cause,
            scores: Scores::default(),
            rules_version: 1,
        };
        let event = t(Cause::Event("e".into())).transition_id();
        assert_eq!(
            event,
            t(Cause::Time(BoundaryKind::from_bits(1))).transition_id(),
            "SPEC: (customer, group, at, to)"
        );
        let to2 = t(Cause::Rules { from: 1, to: 2 }).transition_id();
        let to4 = t(Cause::Rules { from: 3, to: 4 }).transition_id();
        assert!(to2 != event && to2 != to4, "a revert to the same segment at the same instant is another move");
    }
}
