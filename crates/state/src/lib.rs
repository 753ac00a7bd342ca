//! Durable per-customer state for segstream, in RocksDB.
//!
//! Three column families (see ADR 001):
//! - `customers`: customer id → compact binary [`CustomerState`] (version byte + postcard);
//! - `timers`: (due instant, customer id) → nothing: the next boundary of every
//!   customer, so time-driven transitions are found by a range scan, never by
//!   scanning customers;
//! - `meta`: input positions, output lengths, watermark, counters.
//!
//! Hot customers stay in an in-memory cache; changes are written back in one
//! `WriteBatch` per commit together with the caller's positions, so state and
//! input position can never disagree after a crash.

mod head;
mod store;

pub use head::{StateHead, StoredState};

pub use store::{
    decode_state, encode_state, HistoryEntry, SegmentCount, Slot, SlotId, StateError, StateOptions, StateStore,
    StoreStats,
};
