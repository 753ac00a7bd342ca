//! What a partition task writes to its changelog partition, and reads back
//! on restore (ARCHITECTURE.md, "Kafka mode").
//!
//! Keys: `c/<customer_id>` for a customer, `m` for the commit marker,
//! `b/<record number>` for a logged run of one input topic's records (the
//! order in which several topics' records were processed, written before
//! their output). Customer values: `S` + applied-through record number
//! (8 bytes, big-endian) + the state as RocksDB stores it; `D` +
//! applied-through for an erased customer (replaced by a tombstone once the
//! erasure is committed). `h/<id length><id><seq>` is a customer's history
//! entry (tombstoned when trimmed), `s/<day>` a day's segment counts (both
//! for the query API). `o` is the owner record: a task writes it when it
//! takes the partition, and its offset is the owner epoch that every record
//! the task writes afterwards carries in its [`EPOCH_HEADER`] (see
//! [`crate::fence`]).

use segstream_scoring::CustomerState;
use segstream_state::{encode_state, StoredState};
use serde::{Deserialize, Serialize};

use crate::marker::Marker;

pub const MARKER_KEY: &[u8] = b"m";
pub const OWNER_KEY: &[u8] = b"o";
/// The header carrying the owner epoch (decimal) on every changelog record
/// a task writes after its owner record.
pub const EPOCH_HEADER: &str = "segstream_owner";
const CUSTOMER_PREFIX: &[u8] = b"c/";
const RUN_PREFIX: &[u8] = b"b/";
const HISTORY_PREFIX: &[u8] = b"h/";
const SERIES_PREFIX: &[u8] = b"s/";

/// A changelog record segstream cannot read: the topic holds something it
/// did not write, or a newer version's format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangelogError {
    #[error("unknown changelog key {0:?}")]
    UnknownKey(String),
    #[error("changelog value of {id:?}: {reason}")]
    Customer { id: String, reason: String },
    #[error("changelog commit marker: {0}")]
    Marker(String),
    #[error("changelog run record: {0}")]
    Run(String),
    #[error("encoding a changelog record: {0}")]
    Encode(String),
    #[error("changelog {topic}/{partition}@{offset}: {source}")]
    At { topic: String, partition: i32, offset: i64, source: Box<ChangelogError> },
}

/// Records of one input topic processed in a row (offsets `first..=last`),
/// logged before their output so that a replay takes the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedRun {
    pub topic: String,
    pub first: i64,
    pub last: i64,
}

/// The value of an owner record: who took the partition, and when (for
/// people reading the changelog; the epoch is the record's offset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub instance: String,
    pub at_ms: i64,
    /// Where the owner's query API answers (`kafka.http_advertised_url`).
    #[serde(default)]
    pub url: Option<String>,
}

/// The key of the run that starts at record number `record`.
pub fn run_key(record: i64) -> Vec<u8> {
    let mut k = RUN_PREFIX.to_vec();
    k.extend_from_slice(record.to_string().as_bytes());
    k
}

/// The key of a customer's history entry `seq`: `h/`, the id's length
/// (u16, big-endian), the id, `seq` (u32, big-endian).
pub fn history_key(id: &str, seq: u32) -> Vec<u8> {
    let mut k = HISTORY_PREFIX.to_vec();
    k.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The key of a day's segment counts (see `Engine::series`).
pub fn series_key(day: i64) -> Vec<u8> {
    let mut k = SERIES_PREFIX.to_vec();
    k.extend_from_slice(day.to_string().as_bytes());
    k
}

/// A day's counts as the changelog carries them.
pub fn encode_series(counts: &segstream_engine::SegmentCounts) -> Vec<u8> {
    let pairs: Vec<((u16, u16), segstream_state::SegmentCount)> = counts.iter().map(|(k, c)| (*k, *c)).collect();
    postcard::to_stdvec(&pairs).expect("counts serialize")
}

pub fn customer_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(CUSTOMER_PREFIX.len() + id.len());
    k.extend_from_slice(CUSTOMER_PREFIX);
    k.extend_from_slice(id.as_bytes());
    k
}

/// A customer's changelog value: its state (`None`: erased) and the record
/// number of the last event applied to it.
pub fn encode_customer(applied_through: i64, state: Option<&CustomerState>) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.push(if state.is_some() { b'S' } else { b'D' });
    v.extend_from_slice(&applied_through.to_be_bytes());
    if let Some(st) = state {
        v.extend(encode_state(st));
    }
    v
}

/// One changelog record, decoded (one at a time: the size difference of the
/// variants does not matter).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Entry {
    Marker(Box<Marker>),
    /// `state` is `None` for an erased customer; `applied_through` is `None`
    /// for a tombstone (an erasure already committed). The state stays in
    /// its stored encoding, with its head read (ADR 011).
    Customer {
        id: String,
        applied_through: Option<i64>,
        state: Option<StoredState>,
    },
    /// `None`: a tombstone (the run's commit is complete).
    Run(Option<LoggedRun>),
    /// An instance took the partition; the record's offset is its epoch.
    Owner,
    /// A customer's history entry (`None`: deleted).
    History {
        id: String,
        seq: u32,
        entry: Option<segstream_state::HistoryEntry>,
    },
    /// A day's segment counts.
    Series {
        day: i64,
        counts: segstream_engine::SegmentCounts,
    },
}

pub fn decode_entry(key: &[u8], value: Option<&[u8]>) -> Result<Entry, ChangelogError> {
    if key == MARKER_KEY {
        let v = value.ok_or_else(|| ChangelogError::Marker("empty".into()))?;
        return serde_json::from_slice(v)
            .map(|m| Entry::Marker(Box::new(m)))
            .map_err(|e| ChangelogError::Marker(e.to_string()));
    }
    if key == OWNER_KEY {
        // The value is informational: an unreadable one still marks an owner.
        return Ok(Entry::Owner);
    }
    if let Some(rest) = key.strip_prefix(HISTORY_PREFIX) {
        let bad = |reason: &str| ChangelogError::Customer {
            id: String::from_utf8_lossy(rest).into_owned(),
            reason: reason.into(),
        };
        let (len, rest) = rest.split_first_chunk::<2>().ok_or_else(|| bad("short history key"))?;
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() != len + 4 {
            return Err(bad("history key length"));
        }
        let id = std::str::from_utf8(&rest[..len]).map_err(|_| bad("history key id"))?.to_string();
        let seq = u32::from_be_bytes(rest[len..].try_into().map_err(|_| bad("history key seq"))?);
        let entry = match value {
            None => None,
            Some(v) => Some(segstream_state::HistoryEntry::decode(v).map_err(|e| bad(&format!("history entry: {e}")))?),
        };
        return Ok(Entry::History { id, seq, entry });
    }
    if let Some(rest) = key.strip_prefix(SERIES_PREFIX) {
        let bad = |reason: String| {
            ChangelogError::Marker(format!("daily counts {}: {reason}", String::from_utf8_lossy(rest)))
        };
        let day = std::str::from_utf8(rest).ok().and_then(|d| d.parse().ok()).ok_or_else(|| bad("day".into()))?;
        let pairs: Vec<((u16, u16), segstream_state::SegmentCount)> = match value {
            None => Vec::new(),
            Some(v) => postcard::from_bytes(v).map_err(|e| bad(e.to_string()))?,
        };
        return Ok(Entry::Series { day, counts: pairs.into_iter().collect() });
    }
    if key.starts_with(RUN_PREFIX) {
        return match value {
            None => Ok(Entry::Run(None)),
            Some(v) => {
                serde_json::from_slice(v).map(|b| Entry::Run(Some(b))).map_err(|e| ChangelogError::Run(e.to_string()))
            }
        };
    }
    let id = key
        .strip_prefix(CUSTOMER_PREFIX)
        .and_then(|id| std::str::from_utf8(id).ok())
        .ok_or_else(|| ChangelogError::UnknownKey(String::from_utf8_lossy(key).into_owned()))?
        .to_string();
    let Some(v) = value else {
        return Ok(Entry::Customer { id, applied_through: None, state: None });
    };
    let bad = |reason: String| ChangelogError::Customer { id: id.clone(), reason };
    let Some((&tag, rest)) = v.split_first() else { return Err(bad("empty value".into())) };
    let Some((applied, state)) = rest.split_first_chunk::<8>() else {
        return Err(bad(format!("{} bytes", v.len())));
    };
    let applied = i64::from_be_bytes(*applied);
    let state = match tag {
        b'S' => Some(StoredState::new(id.as_bytes(), state.to_vec()).map_err(|e| bad(e.to_string()))?),
        b'D' => None,
        other => return Err(bad(format!("unknown tag {other}"))),
    };
    Ok(Entry::Customer { id, applied_through: Some(applied), state })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_records_round_trip_and_bad_ones_are_errors() {
        let v = encode_customer(41, None);
        match decode_entry(&customer_key("c-1"), Some(&v)).expect("decodes") {
            Entry::Customer { id, applied_through, state } => {
                assert_eq!((id.as_str(), applied_through, state.is_none()), ("c-1", Some(41), true));
            }
            other => panic!("{other:?}"),
        }
        let mut st = CustomerState::new(1_700_000_000_000);
        st.labels = vec![2, 0, 1];
        st.timer = Some(1_700_086_400_000);
        st.mrr_cents = 9_900;
        match decode_entry(&customer_key("c-3"), Some(&encode_customer(7, Some(&st)))).expect("decodes") {
            Entry::Customer { applied_through: Some(7), state: Some(stored), .. } => {
                assert_eq!(stored.bytes(), &encode_state(&st)[..], "the stored encoding, as it came");
                assert_eq!((&stored.head().labels[..], stored.head().timer), (&[2, 0, 1][..], st.timer));
                assert_eq!(stored.decode(b"c-3").expect("decodes"), st);
            }
            other => panic!("{other:?}"),
        }
        match decode_entry(&customer_key("c-2"), None).expect("tombstone") {
            Entry::Customer { applied_through: None, state: None, .. } => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode_entry(b"x", Some(b"1")), Err(ChangelogError::UnknownKey(_))));
        assert!(matches!(decode_entry(&customer_key("c"), Some(b"S12")), Err(ChangelogError::Customer { .. })));
        assert!(matches!(decode_entry(&customer_key("c"), Some(b"")), Err(ChangelogError::Customer { .. })));
        assert!(matches!(decode_entry(MARKER_KEY, Some(b"{")), Err(ChangelogError::Marker(_))));
        let run = LoggedRun { topic: "t".into(), first: 3, last: 9 };
        let v = serde_json::to_vec(&run).expect("json");
        assert!(matches!(decode_entry(&run_key(12), Some(&v)), Ok(Entry::Run(Some(r))) if r == run));
        assert!(matches!(decode_entry(&run_key(12), None), Ok(Entry::Run(None))));
        assert!(matches!(decode_entry(OWNER_KEY, Some(b"{}")), Ok(Entry::Owner)));
        let entry = segstream_state::HistoryEntry {
            group: 1,
            from: None,
            to: Some(2),
            at: 5,
            event_id: Some("e".into()),
            boundary: 0,
            scores: segstream_scoring::Scores::default(),
            rules: None,
            version: 0,
        };
        let v = postcard::to_stdvec(&entry).expect("entry");
        match decode_entry(&history_key("c/1", 7), Some(&v)).expect("history") {
            Entry::History { id, seq, entry: Some(e) } => assert_eq!((id.as_str(), seq, e), ("c/1", 7, entry)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode_entry(&history_key("x", 1), None), Ok(Entry::History { entry: None, .. })));
        assert!(decode_entry(b"h/\x00\x09ab", None).is_err());
        let counts = segstream_engine::SegmentCounts::from([(
            (0, 1),
            segstream_state::SegmentCount { customers: 3, mrr_cents: 9 },
        )]);
        match decode_entry(&series_key(20_000), Some(&encode_series(&counts))).expect("series") {
            Entry::Series { day, counts: c } => assert_eq!((day, c), (20_000, counts)),
            other => panic!("{other:?}"),
        }
    }
}
