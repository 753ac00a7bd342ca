//! Fault injection for the crash tests, in one place. Shipped code reaches
//! it only through [`FaultInjection::crash_point`], which does nothing unless
//! `SEGSTREAM_CRASH_AT` was set when the settings were resolved.

use std::fmt;
use std::str::FromStr;

/// A step of the commit protocol (ARCHITECTURE.md, "Commit") at which a
/// test can make the process abort, as `kill -9` would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Outputs acknowledged, nothing of the commit written yet.
    AfterOutput,
    /// Customer states sent to the changelog, no marker yet.
    AfterChangelogStates,
    /// Marker acknowledged; tombstones and the local RocksDB commit not done.
    AfterMarker,
    /// In a restore, after this many changelog records were read (the
    /// record number is the restore's count, not the partition's). While
    /// armed, the restore checkpoints at every commit marker it reads.
    DuringRestore,
}

impl CrashPoint {
    pub fn name(self) -> &'static str {
        match self {
            Self::AfterOutput => "after_output",
            Self::AfterChangelogStates => "after_changelog_states",
            Self::AfterMarker => "after_marker",
            Self::DuringRestore => "during_restore",
        }
    }
}

/// The test hook's environment variable: `<point>:<record number>`.
pub const CRASH_AT_ENV: &str = "SEGSTREAM_CRASH_AT";

/// Where to abort, if anywhere: at `point` of the first commit at or past
/// record number `record`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultInjection {
    crash_at: Option<(CrashPoint, i64)>,
    /// `<point>:migrated:<n>`: the count is of customers a rule migration
    /// re-evaluated in this process, and only a migration's commits crash.
    pub during_migration: bool,
    /// `SEGSTREAM_RESTORE_PAUSE_MS`: every restore waits this long before
    /// reading the changelog (stop-aware), so that a test sees a restore.
    pub restore_pause: Option<std::time::Duration>,
}

/// See [`FaultInjection::restore_pause`].
pub const RESTORE_PAUSE_ENV: &str = "SEGSTREAM_RESTORE_PAUSE_MS";

impl FromStr for FaultInjection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{CRASH_AT_ENV}={s}: expected <after_output|after_changelog_states|after_marker|during_restore>:<record> \
                 or <point>:migrated:<customers>"
            )
        };
        let (point, record) = s.split_once(':').ok_or_else(bad)?;
        let points = [
            CrashPoint::AfterOutput,
            CrashPoint::AfterChangelogStates,
            CrashPoint::AfterMarker,
            CrashPoint::DuringRestore,
        ];
        let point = points.into_iter().find(|p| p.name() == point).ok_or_else(bad)?;
        let (during_migration, record) = match record.strip_prefix("migrated:") {
            Some(n) => (true, n),
            None => (false, record),
        };
        Ok(Self { crash_at: Some((point, record.parse().map_err(|_| bad())?)), during_migration, restore_pause: None })
    }
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FaultInjection {
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether a crash is armed at `point` (whatever the record).
    pub fn armed(&self, point: CrashPoint) -> bool {
        self.crash_at.is_some_and(|(p, _)| p == point)
    }

    /// Whether to abort at `point` now that `records` records were processed.
    pub fn should_crash(&self, point: CrashPoint, records: i64) -> bool {
        self.crash_at.is_some_and(|(p, at)| p == point && records >= at)
    }

    /// Aborts the process at `point` if configured to, after `before` (which
    /// lets what was produced reach the broker, as it may before a real crash).
    pub fn crash_point(&self, point: CrashPoint, records: i64, partition: i32, before: impl FnOnce()) {
        if self.should_crash(point, records) {
            before();
            tracing::warn!(partition, point = point.name(), "SEGSTREAM_CRASH_AT: aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_points_parse_and_fire_at_or_after_their_record() {
        let f: FaultInjection = "after_marker:40".parse().expect("valid");
        assert!(!f.should_crash(CrashPoint::AfterMarker, 39));
        assert!(f.should_crash(CrashPoint::AfterMarker, 40));
        assert!(!f.should_crash(CrashPoint::AfterOutput, 400));
        assert!("after_lunch:4".parse::<FaultInjection>().is_err());
        assert!("after_marker".parse::<FaultInjection>().is_err());
        let m: FaultInjection = "after_output:migrated:60".parse().expect("valid");
        assert!(m.during_migration && m.should_crash(CrashPoint::AfterOutput, 60));
        assert!(!FaultInjection::none().should_crash(CrashPoint::AfterOutput, i64::MAX));
    }
}
