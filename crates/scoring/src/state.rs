//! The per-customer rolling state of SPEC §3 and how events change it.

use segstream_decode::{
    Answer, AttrValue, Event, EventKind, PaymentStatus, Priority, SubscriptionStatus, TicketAction, DAY_MS,
};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// How many applied event ids a customer remembers for de-duplication.
pub const DEDUP_IDS: usize = 32;

/// Open tickets remembered per customer.
pub const MAX_OPEN_TICKETS: usize = 1000;
/// Features remembered per customer (within the adoption window).
pub const MAX_FEATURES: usize = 1000;
/// Profile attributes, and survey questions, remembered per customer.
pub const MAX_NAMED_VALUES: usize = 256;

/// `day(t) = floor(t / 86_400_000)`.
pub fn day(t: i64) -> i64 {
    t.div_euclid(DAY_MS)
}

/// Everything SPEC §3 keeps about a customer, plus the engine's bookkeeping
/// (labels, last evaluated instant, pending timer). Compact on purpose: it is
/// stored once per customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerState {
    /// `ts` of the earliest event seen.
    pub first_seen: i64,
    /// Largest `ts` of an activity event.
    pub last_active: Option<i64>,
    /// Active days as a bitmap: bit k set means day `active_anchor − k` was active.
    pub active_anchor: i64,
    pub active_bits: u128,
    /// (xxh3 of the feature name, last day it was used).
    #[serde(with = "compact::hashed_pairs")]
    pub features: Vec<(u64, i64)>,
    pub mrr_cents: i64,
    pub sub_status: Option<SubscriptionStatus>,
    #[serde(with = "compact::instant")]
    pub sub_ts: i64,
    pub payment_failed: bool,
    #[serde(with = "compact::instant")]
    pub payment_ts: i64,
    /// (xxh3 of the ticket id, priority) of tickets opened and not closed.
    #[serde(with = "compact::hashed_pairs")]
    pub open_tickets: Vec<(u64, Priority)>,
    pub last_nps: Option<u8>,
    #[serde(with = "compact::instant")]
    pub nps_ts: i64,
    pub profile: Profile,
    #[serde(with = "compact::instant")]
    pub profile_ts: i64,
    /// xxh3 of the last [`DEDUP_IDS`] applied event ids, oldest first.
    #[serde(with = "compact::hashes")]
    pub recent_ids: Vec<u64>,
    /// The customer's last evaluated instant: the largest of the applied
    /// events' `ts` and the boundary instants already emitted.
    pub evaluated_at: i64,
    /// Current segment of each group (index into the group's segment list).
    pub labels: Vec<u16>,
    /// The next boundary instant, as registered in the timer index.
    pub timer: Option<i64>,
    /// Profile attributes and survey answers, for custom rules; absent for
    /// most customers (one byte). Last, so that records of the earlier
    /// format read as this one with `None` appended.
    pub extra: Option<Box<NamedValues>>,
    /// The rules version its labels are under (0: a state written before
    /// versions were recorded). A rule migration skips a customer already
    /// at its target version, so that it is idempotent per customer.
    pub rules_version: u32,
    /// Moves waiting for their group's minimum dwell: (group, segment the
    /// customer qualifies for, since when). At most one per group; empty
    /// unless a group has `min_dwell_ms`.
    pub pending: Vec<(u16, u16, i64)>,
    /// Quantile RFM: the last recomputation of the edges whose edges this
    /// state was evaluated under (0: none). A recomputation passes over a
    /// state already through it or a later one: in Kafka mode, a state
    /// restored from ahead of the replay (ADR 010).
    pub quantile_at: i64,
}

/// What `profile.attributes` and `survey` events left (SPEC §1).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NamedValues {
    /// By name: the latest `profile` replaces the attributes it carries.
    pub attributes: Vec<(String, AttrValue)>,
    /// By question: the latest answer (by `ts`; later processed on ties).
    pub answers: Vec<(String, Answer, i64)>,
}

/// Serde encodings that keep the stored state small (ADR 001): hashes as 8
/// fixed bytes (a varint of a random 64-bit value takes 9–10), and "never"
/// (`i64::MIN`) instants as an absent option (a varint of `i64::MIN` takes 10).
mod compact {
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// A sequence of `W` read straight into a `Vec` of what `f` makes of
    /// each (one allocation, sized by the length prefix; a decode of the
    /// wire type's `Vec` then a conversion allocated twice).
    struct SeqOf<W, T, F>(F, std::marker::PhantomData<fn(W) -> T>);

    impl<'de, W: Deserialize<'de>, T, F: FnMut(W) -> T> Visitor<'de> for SeqOf<W, T, F> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Vec<T>, A::Error> {
            // Bounded: a corrupt length must not reserve gigabytes.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(w) = seq.next_element::<W>()? {
                out.push((self.0)(w));
            }
            Ok(out)
        }
    }

    pub mod instant {
        use super::*;

        pub fn serialize<S: Serializer>(t: &i64, s: S) -> Result<S::Ok, S::Error> {
            (*t != i64::MIN).then_some(*t).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
            Ok(Option::<i64>::deserialize(d)?.unwrap_or(i64::MIN))
        }
    }

    pub mod hashes {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|h| h.to_le_bytes()))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
            d.deserialize_seq(SeqOf(|h: [u8; 8]| u64::from_le_bytes(h), std::marker::PhantomData))
        }
    }

    pub mod hashed_pairs {
        use super::*;

        pub fn serialize<S: Serializer, T: Serialize>(v: &[(u64, T)], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|(h, t)| (h.to_le_bytes(), t)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<(u64, T)>, D::Error> {
            d.deserialize_seq(SeqOf(|(h, t): ([u8; 8], T)| (u64::from_le_bytes(h), t), std::marker::PhantomData))
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub industry: Option<String>,
    pub employees: Option<i64>,
    pub country: Option<String>,
}

/// Hash used for event ids, feature names and ticket ids (64-bit xxh3; see ADR 001).
pub fn id_hash(s: &str) -> u64 {
    xxh3_64(s.as_bytes())
}

impl CustomerState {
    /// A customer created by its first event (not yet applied).
    pub fn new(ts: i64) -> Self {
        Self {
            first_seen: ts,
            last_active: None,
            active_anchor: day(ts),
            active_bits: 0,
            features: Vec::new(),
            mrr_cents: 0,
            sub_status: None,
            sub_ts: i64::MIN,
            payment_failed: false,
            payment_ts: i64::MIN,
            open_tickets: Vec::new(),
            last_nps: None,
            nps_ts: i64::MIN,
            profile: Profile::default(),
            profile_ts: i64::MIN,
            recent_ids: Vec::new(),
            evaluated_at: ts,
            labels: Vec::new(),
            timer: None,
            extra: None,
            rules_version: 0,
            pending: Vec::new(),
            quantile_at: 0,
        }
    }

    pub fn has_seen(&self, event_id: &str) -> bool {
        let h = id_hash(event_id);
        self.recent_ids.contains(&h)
    }

    fn remember(&mut self, event_id: &str) {
        if self.recent_ids.len() >= DEDUP_IDS {
            self.recent_ids.remove(0);
        }
        self.recent_ids.push(id_hash(event_id));
    }

    fn mark_active_day(&mut self, d: i64) {
        if d > self.active_anchor {
            let shift = d - self.active_anchor;
            self.active_bits = if shift >= 128 { 0 } else { self.active_bits << shift };
            self.active_anchor = d;
        }
        let k = self.active_anchor - d;
        if k < 128 {
            self.active_bits |= 1u128 << k;
        }
    }

    /// Active days `d` with `day(τ) − (window − 1) ≤ d ≤ day(τ)`.
    pub fn active_days_in_window(&self, tau: i64, window_days: i64) -> u32 {
        let today = day(tau);
        // Days newer than `today` cannot exist for a τ the engine evaluates,
        // but stay exact anyway.
        let newest_k = (self.active_anchor - today).max(0);
        let oldest_k = self.active_anchor - today + window_days - 1;
        if oldest_k < newest_k || newest_k >= 128 {
            return 0;
        }
        let hi = oldest_k.min(127);
        let width = hi - newest_k + 1;
        let mask = if width >= 128 { u128::MAX } else { ((1u128 << width) - 1) << newest_k };
        (self.active_bits & mask).count_ones()
    }

    /// Iterates the active days, newest first.
    pub fn active_days(&self) -> impl Iterator<Item = i64> + '_ {
        (0..128i64).filter(move |k| self.active_bits & (1u128 << k) != 0).map(move |k| self.active_anchor - k)
    }

    /// Features whose last day of use is `≥ day(τ) − (window − 1)`.
    pub fn features_in_window(&self, tau: i64, window_days: i64) -> u32 {
        let from = day(tau) - (window_days - 1);
        self.features.iter().filter(|(_, d)| *d >= from).count() as u32
    }

    /// Applies one event's facts (SPEC §3). "Latest" fields keep the value of
    /// the event with the largest `ts` (the later one on ties), so an old event
    /// arriving late cannot overwrite a newer fact. Returns `false` when a new
    /// open ticket or feature was not remembered because the customer already
    /// has [`MAX_OPEN_TICKETS`] or [`MAX_FEATURES`] (a bound on state size:
    /// beyond a handful, more change no score; only custom rules on
    /// `open_tickets` could tell).
    pub fn apply(&mut self, e: &Event) -> bool {
        let mut kept = true;
        self.first_seen = self.first_seen.min(e.ts);
        if e.kind.is_activity() {
            self.last_active = Some(self.last_active.map_or(e.ts, |t| t.max(e.ts)));
            self.mark_active_day(day(e.ts));
        }
        match &e.kind {
            EventKind::FeatureUsed { feature, .. } => {
                let h = id_hash(feature);
                let d = day(e.ts);
                let full = self.features.len() >= MAX_FEATURES;
                match self.features.iter_mut().find(|(f, _)| *f == h) {
                    Some(entry) => entry.1 = entry.1.max(d),
                    None if full => kept = false,
                    None => self.features.push((h, d)),
                }
            }
            EventKind::Subscription { mrr_cents, status, .. } if e.ts >= self.sub_ts => {
                self.sub_ts = e.ts;
                self.sub_status = Some(*status);
                self.mrr_cents = if *status == SubscriptionStatus::Canceled { 0 } else { *mrr_cents };
            }
            EventKind::Payment { status, .. } if *status != PaymentStatus::Refunded && e.ts >= self.payment_ts => {
                self.payment_ts = e.ts;
                self.payment_failed = *status == PaymentStatus::Failed;
            }
            EventKind::Ticket { ticket_id, action, priority } => {
                let h = id_hash(ticket_id);
                self.open_tickets.retain(|(t, _)| *t != h);
                if *action == TicketAction::Opened {
                    if self.open_tickets.len() < MAX_OPEN_TICKETS {
                        self.open_tickets.push((h, *priority));
                    } else {
                        kept = false;
                    }
                }
            }
            EventKind::Nps { score } if e.ts >= self.nps_ts => {
                self.nps_ts = e.ts;
                self.last_nps = Some(*score);
            }
            EventKind::Profile { industry, employees, country, attributes } if e.ts >= self.profile_ts => {
                for (name, value) in attributes {
                    let named = &mut self.extra.get_or_insert_with(Default::default).attributes;
                    let full = named.len() >= MAX_NAMED_VALUES;
                    match named.iter_mut().find(|(n, _)| n == name) {
                        Some(slot) => slot.1 = value.clone(),
                        None if full => kept = false,
                        None => named.push((name.clone(), value.clone())),
                    }
                }
                self.profile_ts = e.ts;
                if industry.is_some() {
                    self.profile.industry.clone_from(industry);
                }
                if employees.is_some() {
                    self.profile.employees = *employees;
                }
                if country.is_some() {
                    self.profile.country.clone_from(country);
                }
            }
            EventKind::Survey { question, answer } => {
                let answers = &mut self.extra.get_or_insert_with(Default::default).answers;
                let full = answers.len() >= MAX_NAMED_VALUES;
                match answers.iter_mut().find(|(q, _, _)| q == question) {
                    Some(slot) if slot.2 <= e.ts => *slot = (question.clone(), answer.clone(), e.ts),
                    Some(_) => {}
                    None if full => kept = false,
                    None => answers.push((question.clone(), answer.clone(), e.ts)),
                }
            }
            _ => {}
        }
        self.remember(&e.event_id);
        kept
    }

    /// Drops what can no longer matter at any instant `≥ self.evaluated_at`.
    pub fn prune(&mut self, frequency_window_days: i64, adoption_window_days: i64) {
        let today = day(self.evaluated_at);
        let oldest_k = self.active_anchor - today + frequency_window_days - 1;
        if oldest_k < 0 {
            self.active_bits = 0;
        } else if oldest_k < 127 {
            self.active_bits &= (1u128 << (oldest_k + 1)) - 1;
        }
        let from = today - (adoption_window_days - 1);
        self.features.retain(|(_, d)| *d >= from);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn attributes_merge_by_name_and_answers_keep_the_latest_by_time() {
        let profile = |ts, attrs: Vec<(&str, AttrValue)>| Event {
            event_id: format!("p{ts}"),
            customer_id: "c".into(),
            ts,
            kind: EventKind::Profile {
                industry: None,
                employees: None,
                country: None,
                attributes: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            },
        };
        let survey = |ts, q: &str, a: Answer| Event {
            event_id: format!("s{ts}{q}"),
            customer_id: "c".into(),
            ts,
            kind: EventKind::Survey { question: q.into(), answer: a },
        };
        let mut st = CustomerState::new(0);
        st.apply(&profile(10, vec![("crm", AttrValue::Str("hubspot".into())), ("seats", AttrValue::Num(5.0))]));
        st.apply(&profile(20, vec![("crm", AttrValue::Str("salesforce".into()))]));
        st.apply(&profile(15, vec![("crm", AttrValue::Str("pipedrive".into()))])); // older: ignored
        let attrs = &st.extra.as_ref().expect("named values").attributes;
        assert_eq!(
            attrs,
            &vec![("crm".into(), AttrValue::Str("salesforce".into())), ("seats".into(), AttrValue::Num(5.0))]
        );
        st.apply(&survey(30, "role", Answer::Str("admin".into())));
        st.apply(&survey(25, "role", Answer::Str("analyst".into()))); // older answer: ignored
        st.apply(&survey(40, "ease", Answer::Num(6.0)));
        let answers: Vec<_> =
            st.extra.as_ref().expect("named values").answers.iter().map(|(q, a, _)| (q.as_str(), a.clone())).collect();
        assert_eq!(answers, vec![("role", Answer::Str("admin".into())), ("ease", Answer::Num(6.0))]);
        assert_eq!(st.last_active, None, "neither is activity");
    }

    #[test]
    fn open_tickets_and_features_are_bounded() {
        let ev = |id: String, kind| Event { event_id: id.clone(), customer_id: "c".into(), ts: 0, kind };
        let mut st = CustomerState::new(0);
        for i in 0..MAX_OPEN_TICKETS {
            let kind = segstream_decode::EventKind::Ticket {
                ticket_id: format!("t{i}"),
                action: segstream_decode::TicketAction::Opened,
                priority: segstream_decode::Priority::Low,
            };
            assert!(st.apply(&ev(format!("e{i}"), kind)));
        }
        let one_more = segstream_decode::EventKind::Ticket {
            ticket_id: "t-extra".into(),
            action: segstream_decode::TicketAction::Opened,
            priority: segstream_decode::Priority::Low,
        };
        assert!(!st.apply(&ev("extra".into(), one_more)), "not remembered");
        assert_eq!(st.open_tickets.len(), MAX_OPEN_TICKETS);
        for i in 0..=MAX_FEATURES {
            let kind = segstream_decode::EventKind::FeatureUsed { user_id: None, feature: format!("f{i}") };
            assert_eq!(st.apply(&ev(format!("f{i}"), kind)), i < MAX_FEATURES);
        }
        assert_eq!(st.features.len(), MAX_FEATURES);
    }

    use super::*;

    #[test]
    fn active_day_window_counts_exactly() {
        let mut s = CustomerState::new(0);
        for d in [0, 1, 5, 89, 90, 200] {
            s.mark_active_day(d);
        }
        // τ on day 200: window [111, 200]
        assert_eq!(s.active_days_in_window(200 * DAY_MS, 90), 1);
        let mut s = CustomerState::new(0);
        for d in [0, 1, 5, 89] {
            s.mark_active_day(d);
        }
        assert_eq!(s.active_days_in_window(89 * DAY_MS, 90), 4);
        assert_eq!(s.active_days_in_window(90 * DAY_MS - 1, 90), 4);
        assert_eq!(s.active_days_in_window(90 * DAY_MS, 90), 3);
        assert_eq!(s.active_days_in_window(95 * DAY_MS, 90), 1);
        assert_eq!(s.active_days_in_window(179 * DAY_MS, 90), 0);
        // a late, older day is still recorded
        s.mark_active_day(3);
        assert_eq!(s.active_days_in_window(89 * DAY_MS, 90), 5);
        assert_eq!(s.active_days().collect::<Vec<_>>(), vec![89, 5, 3, 1, 0]);
    }

    #[test]
    fn dedup_ring_keeps_the_last_32() {
        let mut s = CustomerState::new(0);
        for i in 0..40 {
            let e = Event {
                event_id: format!("e{i}"),
                customer_id: "c".into(),
                ts: i,
                kind: EventKind::Login { user_id: None },
            };
            s.apply(&e);
        }
        assert!(!s.has_seen("e7"));
        assert!(s.has_seen("e8"));
        assert!(s.has_seen("e39"));
    }
}
