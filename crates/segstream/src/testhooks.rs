//! Fault injection for file mode's resume tests, in one place (Kafka mode's
//! is `segstream_kafka::testhooks`). Off unless a test sets it.

/// Stop abruptly after this many records, leaving uncommitted output on
/// disk, as a crash would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileFaults {
    pub crash_after_records: Option<u64>,
}

impl FileFaults {
    pub fn crash_after(records: u64) -> Self {
        Self { crash_after_records: Some(records) }
    }

    /// Whether to stop now that this process read `records` records.
    pub fn crash_now(&self, records: u64) -> bool {
        self.crash_after_records == Some(records)
    }
}
