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

impl Rec {
    /// Copies a consumer message of input topic number `topic`.
    pub fn from_message(topic: usize, m: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        use rdkafka::Message;
        Self {
            topic,
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            timestamp: m.timestamp().to_millis(),
        }
    }
}

/// What a task tells the group thread of its progress, for the stuck
/// check: records of batches it finished (against the records handed to
/// it), and a tick per record it went through (processed, skipped as
/// already committed, or read to fill a gap), which shows life inside a
/// long batch.
#[derive(Debug, Default)]
pub struct Progress {
    pub taken: std::sync::atomic::AtomicU64,
    pub ticks: std::sync::atomic::AtomicU64,
}

pub enum Msg {
    Records(Vec<Rec>),
    /// Commit and end (revocation, shutdown); when the task's `lost` flag
    /// is set, end without writing anything.
    Stop,
}
