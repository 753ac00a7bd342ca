//! What a partition task writes to its changelog partition, and reads back
//! on restore (ARCHITECTURE.md, "Kafka mode").
//!
//! Keys: `c/<customer_id>` for a customer, `m` for the commit marker,
//! `b/<record number>` for a batch of several input topics' records (the
//! order in which they were processed, written before their output).
//! Customer values: `S` + applied-through offset (8 bytes, big-endian) +
//! the state as RocksDB stores it; `D` + applied-through for an erased
//! customer (replaced by a tombstone once the erasure is committed).

use std::collections::BTreeMap;

use segstream_scoring::CustomerState;
use segstream_state::{decode_state, encode_state};
use serde::{Deserialize, Serialize};

use crate::engine::{Clock, Counters};

pub const MARKER_KEY: &[u8] = b"m";
const CUSTOMER_PREFIX: &[u8] = b"c/";
const BATCH_PREFIX: &[u8] = b"b/";

/// Records of one input topic, processed in a row (offsets `first..=last`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub topic: String,
    pub first: i64,
    pub last: i64,
}

pub fn batch_key(record: i64) -> Vec<u8> {
    let mut k = BATCH_PREFIX.to_vec();
    k.extend_from_slice(record.to_string().as_bytes());
    k
}

/// A commit of one partition: everything recovery needs besides the
/// customers' states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// Commit number of this partition, from 1.
    pub seq: u64,
    /// Per input topic, the next offset to process (every record before it
    /// is in the state); a topic not listed starts where the group is.
    pub input_offsets: BTreeMap<String, i64>,
    /// Number of input records processed by this partition since it began:
    /// the record number of the next one.
    pub records: i64,
    pub clock: Clock,
    pub counters: Counters,
    /// A wall-clock advance decided at this commit: recovery applies it
    /// before the next record, exactly as the task did after committing.
    pub pending_watermark: Option<i64>,
    /// End offsets of the output and dead-letter partitions after every
    /// record produced before this commit was acknowledged: recovery reads
    /// from here to learn what the uncommitted tail already wrote.
    pub outputs: BTreeMap<String, BTreeMap<i32, i64>>,
    /// Customers whose state already includes events at or after `records`
    /// (after a recovery from a partly written commit): customer → record
    /// number of the last event applied.
    pub skip: BTreeMap<String, i64>,
    /// Several input topics: runs of records the previous owner processed
    /// (and logged) after its last commit that the replay has not reached
    /// yet, in order (`first` unused).
    #[serde(default)]
    pub replay: Vec<Batch>,
    /// Fingerprint of the scoring and segments configuration.
    pub config_fingerprint: u64,
}

/// The marker as the local RocksDB keeps it, with where it is in the changelog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalMarker {
    pub marker: Marker,
    pub changelog_offset: i64,
    /// Wall clock (epoch ms) when the local state last matched the changelog
    /// (0 in markers written before this field: treated as old).
    #[serde(default)]
    pub committed_at_ms: i64,
}

pub const LOCAL_MARKER_META: &str = "kafka:marker";

pub fn customer_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(CUSTOMER_PREFIX.len() + id.len());
    k.extend_from_slice(CUSTOMER_PREFIX);
    k.extend_from_slice(id.as_bytes());
    k
}

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
    /// for a tombstone (an erasure already committed).
    Customer { id: String, applied_through: Option<i64>, state: Option<CustomerState> },
    /// `None`: a tombstone (the batch's commit is complete).
    Batch(Option<Batch>),
}

pub fn decode_entry(key: &[u8], value: Option<&[u8]>) -> Result<Entry, String> {
    if key == MARKER_KEY {
        let v = value.ok_or("empty commit marker")?;
        return serde_json::from_slice(v).map(|m| Entry::Marker(Box::new(m))).map_err(|e| e.to_string());
    }
    if key.starts_with(BATCH_PREFIX) {
        return match value {
            None => Ok(Entry::Batch(None)),
            Some(v) => serde_json::from_slice(v).map(|b| Entry::Batch(Some(b))).map_err(|e| e.to_string()),
        };
    }
    let id = key
        .strip_prefix(CUSTOMER_PREFIX)
        .and_then(|id| std::str::from_utf8(id).ok())
        .ok_or_else(|| format!("unknown changelog key {:?}", String::from_utf8_lossy(key)))?
        .to_string();
    let Some(v) = value else {
        return Ok(Entry::Customer { id, applied_through: None, state: None });
    };
    if v.len() < 9 {
        return Err(format!("changelog value of {id:?} has {} bytes", v.len()));
    }
    let applied = i64::from_be_bytes(v[1..9].try_into().expect("8 bytes"));
    let state = match v[0] {
        b'S' => Some(decode_state(id.as_bytes(), &v[9..]).map_err(|e| e.to_string())?),
        b'D' => None,
        other => return Err(format!("changelog value of {id:?} has unknown tag {other}")),
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
        match decode_entry(&customer_key("c-2"), None).expect("tombstone") {
            Entry::Customer { applied_through: None, state: None, .. } => {}
            other => panic!("{other:?}"),
        }
        assert!(decode_entry(b"x", Some(b"1")).is_err());
        assert!(decode_entry(&customer_key("c"), Some(b"S12")).is_err());
        assert!(decode_entry(MARKER_KEY, Some(b"{")).is_err());
    }
}
