//! A customer's state as stored, with what a commit needs of it read
//! without decoding the rest: a changelog restore writes the bytes a
//! record carries as they came (ADR 011).

use segstream_scoring::CustomerState;

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
            Some((f, rest)) if known_format(*f) => read_head(rest).map_err(|e| corrupt(e.to_string())),
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

/// Reads `CustomerState`'s postcard fields up to `timer` (a restore reads
/// one per customer record, so this is a hand-written walk over the bytes
/// rather than serde: the 32 dedup hashes and the feature and ticket hashes
/// are skipped by their length, not read one byte at a time). Postcard:
/// integers are varints (signed ones zigzag), `u8` and `bool` one byte, an
/// `Option` a 0/1 tag, a sequence or string its varint length first, a
/// unit enum its variant's varint index, a struct or tuple its fields in
/// order. A field inserted before `timer` in `CustomerState` must be read
/// here too: `head_reads_what_the_state_holds` and
/// `hand_reader_equals_serde_on_random_states` fail until it is.
fn read_head(v: &[u8]) -> Result<StateHead, postcard::Error> {
    let mut r = Reader { v, at: 0 };
    r.i64()?; // first_seen
    r.option(|r| r.i64().map(drop))?; // last_active
    r.i64()?; // active_anchor
    r.varint(128)?; // active_bits
    let features = r.len()?;
    for _ in 0..features {
        r.skip(8)?;
        r.i64()?;
    }
    let mrr_cents = r.i64()?;
    r.option(Reader::variant)?; // sub_status
    r.option(|r| r.i64().map(drop))?; // sub_ts
    r.bool()?; // payment_failed
    r.option(|r| r.i64().map(drop))?; // payment_ts
    let tickets = r.len()?;
    for _ in 0..tickets {
        r.skip(8)?;
        r.variant()?; // priority
    }
    r.option(|r| r.skip(1))?; // last_nps
    r.option(|r| r.i64().map(drop))?; // nps_ts
    r.option(Reader::str)?; // profile.industry
    r.option(|r| r.i64().map(drop))?; // profile.employees
    r.option(Reader::str)?; // profile.country
    r.option(|r| r.i64().map(drop))?; // profile_ts
    let ids = r.len()?;
    r.skip(ids.checked_mul(8).ok_or(postcard::Error::DeserializeBadVarint)?)?; // recent_ids
    r.i64()?; // evaluated_at
    let n = r.len()?;
    let mut labels = Vec::with_capacity(n.min(r.v.len()));
    for _ in 0..n {
        labels.push(r.varint(16)? as u16);
    }
    let mut timer = None;
    r.option(|r| {
        timer = Some(r.i64()?);
        Ok(())
    })?;
    Ok(StateHead { mrr_cents, labels, timer })
}

/// A position in postcard bytes.
struct Reader<'a> {
    v: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, postcard::Error> {
        let b = *self.v.get(self.at).ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        self.at += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), postcard::Error> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.v.len());
        self.at = end.ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        Ok(())
    }

    /// An unsigned varint of a `bits`-bit integer: at most ⌈bits / 7⌉
    /// bytes, the last of which holds only the top bits (as postcard checks).
    fn varint(&mut self, bits: u32) -> Result<u128, postcard::Error> {
        let max = bits.div_ceil(7);
        let mut out = 0u128;
        for i in 0..max {
            let b = self.byte()?;
            if i == max - 1 && u32::from(b & 0x7f) >> (bits - 7 * i) != 0 {
                return Err(postcard::Error::DeserializeBadVarint);
            }
            out |= u128::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(postcard::Error::DeserializeBadVarint)
    }

    fn i64(&mut self) -> Result<i64, postcard::Error> {
        let z = self.varint(64)? as u64;
        Ok((z >> 1) as i64 ^ -((z & 1) as i64))
    }

    fn len(&mut self) -> Result<usize, postcard::Error> {
        usize::try_from(self.varint(64)?).map_err(|_| postcard::Error::DeserializeBadVarint)
    }

    fn bool(&mut self) -> Result<bool, postcard::Error> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(postcard::Error::DeserializeBadBool),
        }
    }

    /// A unit enum's variant index. Its range is left to the full decode
    /// when the customer is loaded: a variant added later must not make
    /// the head of a valid state unreadable.
    fn variant(&mut self) -> Result<(), postcard::Error> {
        self.varint(32).map(drop)
    }

    fn str(&mut self) -> Result<(), postcard::Error> {
        let n = self.len()?;
        let start = self.at;
        self.skip(n)?;
        std::str::from_utf8(&self.v[start..self.at]).map(drop).map_err(|_| postcard::Error::DeserializeBadUtf8)
    }

    fn option(&mut self, some: impl FnOnce(&mut Self) -> Result<(), postcard::Error>) -> Result<(), postcard::Error> {
        match self.byte()? {
            0 => Ok(()),
            1 => some(self),
            _ => Err(postcard::Error::DeserializeBadOption),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::marker::PhantomData;

    use segstream_decode::{AttrValue, Priority, SubscriptionStatus};
    use segstream_scoring::{CustomerState, NamedValues, Profile};
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    use super::*;

    /// `CustomerState`'s fields up to `timer`, in its order and wire types,
    /// read by serde (what a head does not need skipped): the reference the
    /// hand-written `read_head` is checked against.
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

    /// The serde reader's head, for comparison.
    fn wire_head(v: &[u8]) -> Result<StateHead, postcard::Error> {
        let w: Wire<'_> = postcard::from_bytes(&v[1..])?;
        Ok(StateHead { mrr_cents: w.mrr_cents, labels: w.labels, timer: w.timer })
    }

    #[test]
    fn hand_reader_equals_serde_on_random_states() {
        let mut seed: u64 = 5;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed
        };
        // Small, large and extreme values alike.
        let int = |n: &mut dyn FnMut() -> u64| -> i64 {
            match n() % 4 {
                0 => (n() % 300) as i64 - 150,
                1 => n() as i64,
                2 => [i64::MIN, i64::MAX, 0, -1][(n() % 4) as usize],
                _ => 1_700_000_000_000 + (n() % 100_000_000) as i64,
            }
        };
        for _ in 0..3000 {
            let mut st = CustomerState::new(int(&mut next));
            let some = |n: &mut dyn FnMut() -> u64| n().is_multiple_of(2);
            st.last_active = some(&mut next).then(|| int(&mut next));
            st.active_anchor = int(&mut next);
            st.active_bits = u128::from(next()) << (next() % 64);
            st.features = (0..next() % 20).map(|_| (next(), int(&mut next))).collect();
            st.mrr_cents = int(&mut next);
            st.sub_status = some(&mut next).then(|| {
                use SubscriptionStatus::*;
                [Trialing, Active, PastDue, Canceled][(next() % 4) as usize]
            });
            st.sub_ts = int(&mut next);
            st.payment_failed = some(&mut next);
            st.payment_ts = int(&mut next);
            st.open_tickets = (0..next() % 5)
                .map(|_| {
                    (next(), [Priority::Low, Priority::Normal, Priority::High, Priority::Urgent][(next() % 4) as usize])
                })
                .collect();
            st.last_nps = some(&mut next).then(|| (next() % 11) as u8);
            st.nps_ts = int(&mut next);
            st.profile = Profile {
                industry: some(&mut next).then(|| "é".repeat((next() % 200) as usize)),
                employees: some(&mut next).then(|| int(&mut next)),
                country: some(&mut next).then(|| "NL".into()),
            };
            st.profile_ts = int(&mut next);
            st.recent_ids = (0..next() % 33).map(|_| next()).collect();
            st.evaluated_at = int(&mut next);
            st.labels = (0..next() % 9).map(|_| (next() % 70_000) as u16).collect();
            st.timer = some(&mut next).then(|| int(&mut next));
            let v = encode_state(&st);
            let hand = StateHead::read(b"c", &v).expect("hand reader reads");
            assert_eq!(hand, StateHead::of(&st));
            assert_eq!(wire_head(&v).expect("serde reads"), hand);
            // Cut anywhere: both readers fail, or both read the same head.
            let cut = 1 + (next() as usize) % (v.len() - 1);
            let hand = read_head(&v[1..cut]).ok();
            assert_eq!(hand, wire_head(&v[..cut]).ok(), "cut at {cut} of {}", v.len());
        }
    }

    #[test]
    fn hand_reader_rejects_overlong_varints_and_bad_tags_as_postcard_does() {
        let st = full();
        let v = encode_state(&st);
        // `first_seen` is the first field: replace it with hostile varints.
        let first_len = v[1..].iter().position(|b| b & 0x80 == 0).expect("varint ends") + 1;
        let with_first = |first: &[u8]| [&v[..1], first, &v[1 + first_len..]].concat();
        for first in [
            &[0x80u8; 10][..],                                             // never ends
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], // 65 bits
        ] {
            let bad = with_first(first);
            assert!(read_head(&bad[1..]).is_err());
            assert!(wire_head(&bad).is_err());
        }
        // The largest zigzag value still reads.
        let max = with_first(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(read_head(&max[1..]).ok(), wire_head(&max).ok());
        assert!(read_head(&max[1..]).is_ok());
        // `last_active` is an Option: its tag is 0 or 1.
        let mut bad = v.clone();
        bad[1 + first_len] = 2;
        assert!(read_head(&bad[1..]).is_err());
        assert!(wire_head(&bad).is_err());
    }
}
