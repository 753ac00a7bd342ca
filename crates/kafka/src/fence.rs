//! Fencing a previous owner without broker transactions (ARCHITECTURE.md,
//! "Two owners of one partition").
//!
//! An instance that stalls (a stopped process, a long GC-like pause, a
//! network cut to the group coordinator) past the group's session timeout
//! loses its partitions to another instance, but does not know it until it
//! runs again. Kafka transactions would fence its writes at the broker; here
//! the changelog partition does it:
//!
//! - a task that takes a partition first writes an owner record (`o`) to the
//!   changelog partition; its offset is the task's **epoch**, and every
//!   changelog record the task writes afterwards carries the epoch in a
//!   header. A restore ignores records whose epoch is below the newest owner
//!   record before them ([`crate::restore::ChangelogTail`]);
//! - a task knows how many changelog records it wrote since it last looked
//!   at the partition's end. When the end grew by more than that, someone
//!   else wrote; if what they wrote includes a newer owner record, this task
//!   is fenced: it stops writing at once ([`Fence`]);
//! - it looks at every commit (before the changelog records, and after the
//!   marker, so a commit interleaved with a new owner is not kept locally),
//!   and before processing anything after a stall (a gap in its own
//!   progress), so the first thing a resumed instance does is find out.

use crate::changelog::OWNER_KEY;

/// How long a task may go without progress before it checks, on its next
/// record, that it still owns its partition.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(1);

/// What a task knows of its changelog partition's writers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    epoch: i64,
    /// Every record before this offset was looked at (or is this task's own).
    known_end: i64,
    /// Records this task sent since `known_end` was established.
    sent: i64,
    /// Keys a previous owner wrote after this task took over: compaction
    /// would keep those stale values over this task's, so they are written
    /// again at the next commit.
    stale: Vec<Vec<u8>>,
}

/// What a look at the partition's end needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Only this task's own records were added.
    Clean,
    /// Someone else wrote too: read these offsets for an owner record.
    Scan { from: i64, to: i64 },
}

impl Fence {
    /// After this task's owner record, acknowledged at offset `epoch`.
    pub fn new(epoch: i64) -> Self {
        Self { epoch, known_end: epoch + 1, sent: 0, stale: Vec::new() }
    }

    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// One more changelog record sent by this task.
    pub fn sent(&mut self) {
        self.sent += 1;
    }

    /// Once everything this task sent is acknowledged, the partition ends
    /// at `end`: were those records the only ones added?
    pub fn look(&self, end: i64) -> Look {
        if end == self.known_end + self.sent {
            Look::Clean
        } else {
            Look::Scan { from: self.known_end, to: end }
        }
    }

    /// Everything before `end` was looked at and no newer owner found.
    pub fn looked(&mut self, end: i64) {
        self.known_end = end;
        self.sent = 0;
    }

    /// A previous owner's record, found after this task's owner record.
    pub fn note_stale(&mut self, key: &[u8]) {
        if key != OWNER_KEY {
            self.stale.push(key.to_vec());
        }
    }

    /// The stale keys to write again.
    pub fn take_stale(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.stale)
    }

    /// Whether the changelog record `key` at `offset` is a newer owner's.
    pub fn is_newer_owner(&self, key: &[u8], offset: i64) -> bool {
        key == OWNER_KEY && offset > self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_newer_owner_record_fences_and_a_partition_written_only_by_us_needs_no_read() {
        let mut f = Fence::new(40);
        assert_eq!(f.look(41), Look::Clean, "nothing written since the owner record");
        f.sent();
        f.sent();
        assert_eq!(f.look(43), Look::Clean, "our two records");
        assert_eq!(f.look(45), Look::Scan { from: 41, to: 45 }, "two records of someone else");
        // A scan found only a stale writer's records: go on from there.
        f.looked(45);
        assert_eq!(f.look(45), Look::Clean);
        f.sent();
        assert_eq!(f.look(46), Look::Clean);
        assert!(f.is_newer_owner(OWNER_KEY, 47));
        assert!(!f.is_newer_owner(OWNER_KEY, 40), "our own owner record");
        assert!(!f.is_newer_owner(OWNER_KEY, 12), "an older owner's record");
        assert!(!f.is_newer_owner(b"m", 47), "a marker is not an owner record");
    }
}
