//! The wall clock an idle partition follows: the host's clock when the task
//! started, moved on by the monotonic clock. A step of the host's clock (an
//! operator's `date`, a bad NTP answer, a VM restored from a snapshot) then
//! cannot move event time by years at once and fire every boundary in
//! between; the difference is logged.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The host's clock, epoch ms.
pub fn host_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Differences from the host's clock beyond this are reported.
const JUMP_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    anchor_ms: i64,
    anchor: Instant,
    /// The last difference reported (ms), so that one jump is logged once.
    reported: i64,
}

impl WallClock {
    pub fn start() -> Self {
        Self::anchored(host_now_ms(), Instant::now())
    }

    pub fn anchored(anchor_ms: i64, anchor: Instant) -> Self {
        Self { anchor_ms, anchor, reported: 0 }
    }

    /// Now, by the anchor and the monotonic clock, given the host's clock
    /// now (`host_ms`) and the monotonic `at`; a difference of more than a
    /// minute from the host's clock is logged once.
    pub fn now(&mut self, host_ms: i64, at: Instant) -> i64 {
        let elapsed = i64::try_from(at.saturating_duration_since(self.anchor).as_millis()).unwrap_or(i64::MAX);
        let now = self.anchor_ms.saturating_add(elapsed);
        let diff = host_ms.saturating_sub(now);
        if diff.abs() > JUMP_MS && (diff - self.reported).abs() > JUMP_MS {
            tracing::warn!(
                host_clock_ahead_ms = diff,
                "the host's clock moved {} s away from the time elapsed since start: idle partitions follow the \
                 elapsed time (restart segstream to take the host's clock as it is now)",
                diff / 1000
            );
            self.reported = diff;
        }
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_step_of_the_host_clock_does_not_move_the_wall_clock() {
        let t0 = Instant::now();
        let mut c = WallClock::anchored(1_000_000, t0);
        assert_eq!(c.now(1_000_500, t0 + Duration::from_millis(500)), 1_000_500);
        // The host's clock jumps ten years ahead; two seconds pass.
        let decade = 10 * 365 * 86_400_000;
        assert_eq!(c.now(1_002_500 + decade, t0 + Duration::from_millis(2500)), 1_002_500);
        assert_eq!(c.reported, decade);
    }
}
