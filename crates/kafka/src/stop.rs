//! Stopping and retrying: one stop flag per partition task (and one for the
//! process), and the one backoff loop every retry uses (broker requests,
//! Schema Registry lookups). A retry never outlives a stop: it sleeps in
//! short slices and gives up as soon as the flag is set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set once, read anywhere: "stop what you are doing, commit, and return".
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// The flag itself, for a signal handler to set.
    pub fn shared(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sleeps up to `d`, waking early when the flag is set; whether it was.
    pub fn sleep(&self, d: Duration) -> bool {
        const SLICE: Duration = Duration::from_millis(50);
        let until = Instant::now() + d;
        loop {
            if self.is_set() {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            std::thread::sleep(SLICE.min(until - now));
        }
    }
}

/// Exponential backoff between attempts, with an optional overall limit.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    /// Give up after this long; `None`: retry until stopped.
    pub give_up_after: Option<Duration>,
}

impl Backoff {
    /// Broker requests: the broker may be restarting or overloaded.
    pub const BROKER: Backoff = Backoff {
        first: Duration::from_millis(200),
        max: Duration::from_secs(5),
        give_up_after: Some(Duration::from_secs(120)),
    };
    /// Schema Registry lookups: the record cannot be decoded without the
    /// schema, so the partition waits for the registry (until stopped).
    pub const REGISTRY: Backoff =
        Backoff { first: Duration::from_millis(200), max: Duration::from_secs(10), give_up_after: None };
}

/// Why a retried operation did not succeed.
#[derive(Debug, PartialEq, Eq)]
pub enum RetryError<E> {
    /// The stop flag was set while waiting.
    Stopped,
    /// The backoff's limit passed; the last error.
    GaveUp { last: E, waited: Duration },
}

/// Runs `f` until it succeeds, `transient` says an error is not worth
/// retrying (returned at once as `GaveUp`), the limit passes, or `stop` is set.
pub fn retry<T, E: std::fmt::Display>(
    what: &str,
    stop: &StopFlag,
    backoff: Backoff,
    mut transient: impl FnMut(&E) -> bool,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, RetryError<E>> {
    let started = Instant::now();
    let mut wait = backoff.first;
    loop {
        let e = match f() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let waited = started.elapsed();
        if !transient(&e) || backoff.give_up_after.is_some_and(|limit| waited >= limit) {
            return Err(RetryError::GaveUp { last: e, waited });
        }
        tracing::warn!("{what}: {e}; retrying in {wait:?}");
        if stop.sleep(wait) {
            return Err(RetryError::Stopped);
        }
        wait = (wait * 2).min(backoff.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Backoff = Backoff {
        first: Duration::from_millis(1),
        max: Duration::from_millis(2),
        give_up_after: Some(Duration::from_millis(30)),
    };

    #[test]
    fn retries_until_success_or_the_limit() {
        let stop = StopFlag::new();
        let mut n = 0;
        let r: Result<u32, RetryError<String>> = retry(
            "t",
            &stop,
            FAST,
            |_| true,
            || {
                n += 1;
                if n < 3 {
                    Err("not yet".to_string())
                } else {
                    Ok(n)
                }
            },
        );
        assert_eq!(r, Ok(3));
        let r: Result<(), RetryError<&str>> = retry("t", &stop, FAST, |_| true, || Err("down"));
        assert!(matches!(r, Err(RetryError::GaveUp { last: "down", .. })));
        let mut calls = 0;
        let r: Result<(), RetryError<&str>> = retry(
            "t",
            &stop,
            FAST,
            |_| false,
            || {
                calls += 1;
                Err("poison")
            },
        );
        assert!(matches!(r, Err(RetryError::GaveUp { .. })) && calls == 1, "a permanent error is not retried");
    }

    #[test]
    fn a_stop_ends_an_endless_retry_promptly() {
        let stop = StopFlag::new();
        let setter = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            setter.set();
        });
        let started = Instant::now();
        let r: Result<(), RetryError<&str>> = retry("t", &stop, Backoff::REGISTRY, |_| true, || Err("unreachable"));
        t.join().expect("setter");
        assert_eq!(r, Err(RetryError::Stopped));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
