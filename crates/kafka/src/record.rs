//! What the group consumer's thread hands to a partition task.

/// One input record, copied off the consumer's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    /// Index of its topic in the configured inputs.
    pub topic: usize,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The record's timestamp (create or log-append time), epoch ms: the
    /// reference clock for `time.max_future_ms`, the same on every replay.
    pub timestamp: Option<i64>,
}

pub enum Msg {
    Records(Vec<Rec>),
    /// Commit and end (revocation, shutdown); when the task's `lost` flag
    /// is set, end without writing anything.
    Stop,
}
