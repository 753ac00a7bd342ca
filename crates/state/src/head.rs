//! A customer's state as stored, with what a commit needs of it read
//! without decoding the rest: a changelog restore writes the bytes a
//! record carries as they came (ADR 011).

use std::marker::PhantomData;

use segstream_decode::{Priority, SubscriptionStatus};
use segstream_scoring::CustomerState;
use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::store::{decode_state, encode_state, known_format, StateError};

/// What a commit needs of a customer's state: its segments (one per
/// group), MRR and timer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateHead {
    pub mrr_cents: i64,
    pub labels: Vec<u16>,
    pub timer: Option<i64>,
}

impl StateHead {
    pub fn of(st: &CustomerState) -> Self {
        Self { mrr_cents: st.mrr_cents, labels: st.labels.clone(), timer: st.timer }
    }

    /// Reads the head of a stored state (`v`: the format byte, then
    /// postcard). Every format has the same fields up to `timer`, and what
    /// follows is not read.
    pub fn read(key: &[u8], v: &[u8]) -> Result<Self, StateError> {
        let corrupt = |reason: String| StateError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason };
        match v.split_first() {
            Some((f, rest)) if known_format(*f) => {
                let w: Wire<'_> = postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
                Ok(Self { mrr_cents: w.mrr_cents, labels: w.labels, timer: w.timer })
            }
            Some((f, _)) => Err(corrupt(format!("unknown state format {f}"))),
            None => Err(corrupt("empty value".into())),
        }
    }
}

/// A customer's state in its stored encoding (a RocksDB value, which a
/// changelog record carries after its prefix), with its head read.
///
/// Only the head is checked: the rest is decoded when the customer is
/// first loaded, and an error there names the customer
/// ([`StateError::Corrupt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    bytes: Vec<u8>,
    head: StateHead,
}

impl StoredState {
    /// The stored value `bytes` of customer `key`.
    pub fn new(key: &[u8], bytes: Vec<u8>) -> Result<Self, StateError> {
        let head = StateHead::read(key, &bytes)?;
        Ok(Self { bytes, head })
    }

    /// Of `st`, encoded.
    pub fn of(st: &CustomerState) -> Self {
        Self { bytes: encode_state(st), head: StateHead::of(st) }
    }

    pub fn head(&self) -> &StateHead {
        &self.head
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole state.
    pub fn decode(&self, key: &[u8]) -> Result<CustomerState, StateError> {
        decode_state(key, &self.bytes)
    }
}

/// `CustomerState`'s fields up to `timer`, in its order and wire types,
/// with what a head does not need skipped without allocating. A change to
/// `CustomerState`'s fields before `timer` must change this too: the test
/// `head_reads_what_the_state_holds` fails until it does.
#[derive(Deserialize)]
#[allow(dead_code)]
struct Wire<'a> {
    first_seen: i64,
    last_active: Option<i64>,
    active_anchor: i64,
    active_bits: u128,
    features: Skip<([u8; 8], i64)>,
    mrr_cents: i64,
    sub_status: Option<SubscriptionStatus>,
    sub_ts: Option<i64>,
    payment_failed: bool,
    payment_ts: Option<i64>,
    open_tickets: Skip<([u8; 8], Priority)>,
    last_nps: Option<u8>,
    nps_ts: Option<i64>,
    #[serde(borrow)]
    profile: (Option<&'a str>, Option<i64>, Option<&'a str>),
    profile_ts: Option<i64>,
    recent_ids: Skip<[u8; 8]>,
    evaluated_at: i64,
    labels: Vec<u16>,
    timer: Option<i64>,
}

/// A sequence of `T`, read and dropped.
struct Skip<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Skip<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(Skip(PhantomData))
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Skip<T> {
    type Value = Skip<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<T>()?.is_some() {}
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use segstream_decode::{AttrValue, Priority, SubscriptionStatus};
    use segstream_scoring::{CustomerState, NamedValues, Profile};

    use super::*;

    /// Every field set, so that each is on the wire.
    fn full() -> CustomerState {
        let mut st = CustomerState::new(1_700_000_000_000);
        st.last_active = Some(1_700_000_500_000);
        st.active_bits = u128::MAX - 12345;
        st.features = vec![(7, 19_000), (u64::MAX, -3)];
        st.mrr_cents = 1_234_567;
        st.sub_status = Some(SubscriptionStatus::PastDue);
        st.sub_ts = 1_700_000_100_000;
        st.payment_failed = true;
        st.payment_ts = 1_700_000_200_000;
        st.open_tickets = vec![(1, Priority::Urgent), (2, Priority::Low)];
        st.last_nps = Some(9);
        st.nps_ts = 1_700_000_300_000;
        st.profile = Profile { industry: Some("saas ✓".into()), employees: Some(250), country: Some("DE".into()) };
        st.profile_ts = 1_700_000_400_000;
        st.recent_ids = (0..40).map(|i: u64| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        st.evaluated_at = 1_700_000_600_000;
        st.labels = vec![3, 0, 11, 2, 65_000];
        st.timer = Some(1_700_086_400_000);
        st.extra = Some(Box::new(NamedValues {
            attributes: vec![("plan".into(), AttrValue::Str("pro".into()))],
            ..NamedValues::default()
        }));
        st.rules_version = 4;
        st.pending = vec![(1, 2, 1_700_000_000_000)];
        st.quantile_at = 1_699_920_000_000;
        st
    }

    #[test]
    fn head_reads_what_the_state_holds() {
        let empty = CustomerState::new(5);
        let mut none_set = full();
        none_set.timer = None;
        none_set.profile = Profile::default();
        none_set.extra = None;
        for st in [full(), empty, none_set] {
            let stored = StoredState::new(b"c", encode_state(&st)).expect("head reads");
            assert_eq!(stored.head(), &StateHead::of(&st));
            assert_eq!(stored.decode(b"c").expect("decodes"), st);
            assert_eq!(stored, StoredState::of(&st));
        }
    }

    #[test]
    fn head_rejects_what_is_not_a_state() {
        let v = encode_state(&full());
        assert!(StoredState::new(b"c", v[..v.len() / 2].to_vec()).is_err());
        assert!(StoredState::new(b"c", vec![99, 0, 0]).is_err());
        assert!(StoredState::new(b"c", Vec::new()).is_err());
    }
}
