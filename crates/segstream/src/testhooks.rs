//! Fault injection for file mode's resume tests, in one place (Kafka mode's
//! is `segstream_kafka::testhooks`). Off unless a test sets it.

/// Stop abruptly after this many records, leaving uncommitted output on
/// disk, as a crash would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileFaults {
    pub crash_after_records: Option<u64>,
    /// Stop after the rule-migration batch that reaches this many customers
    /// (counted in this process), before its commit.
    pub crash_after_migrated: Option<u64>,
}

impl FileFaults {
    pub fn crash_after(records: u64) -> Self {
        Self { crash_after_records: Some(records), crash_after_migrated: None }
    }

    /// Whether to stop a rule migration now that this process re-evaluated
    /// `customers` customers.
    pub fn crash_now_migrating(&self, customers: u64) -> bool {
        self.crash_after_migrated.is_some_and(|n| customers >= n)
    }

    /// Whether to stop now that this process read `records` records.
    pub fn crash_now(&self, records: u64) -> bool {
        self.crash_after_records == Some(records)
    }
}
