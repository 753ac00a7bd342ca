//! What the engine needs, resolved and validated once at start.

use std::num::NonZeroU64;
use std::time::Duration;

use segstream_decode::{format_rfc3339_millis, DecodeError};
use segstream_scoring::{Scorer, ScoringConfig, SegmentsConfig};
use segstream_state::StateOptions;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::EngineError;

/// Which event times are believable (SPEC accepts any; these catch typos
/// and epoch seconds sent as milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeWindow {
    /// Events before this instant (epoch ms) are refused; `None`: no floor.
    pub earliest: Option<i64>,
    /// Events more than this far (ms) ahead of their reference clock are
    /// refused; `None`: no limit.
    pub max_future: Option<i64>,
}

impl TimeWindow {
    /// Whether an event at `ts` is believable, given the reference clock of
    /// its input (Kafka: the record's timestamp; file mode: the wall clock
    /// when the input was first read), which must be deterministic so that a
    /// replay judges alike. An implausible event is poison: dead-lettered.
    pub fn check(&self, ts: i64, reference: Option<i64>) -> Result<(), DecodeError> {
        let shown = || format_rfc3339_millis(ts);
        if let Some(earliest) = self.earliest.filter(|e| ts < *e) {
            return Err(DecodeError::ImplausibleTimestamp {
                value: shown(),
                reason: format!(
                    "before time.earliest_event {} (epoch seconds sent as milliseconds land in 1970)",
                    format_rfc3339_millis(earliest)
                ),
            });
        }
        if let (Some(max), Some(reference)) = (self.max_future, reference) {
            if ts > reference.saturating_add(max) {
                return Err(DecodeError::ImplausibleTimestamp {
                    value: shown(),
                    reason: format!(
                        "more than time.max_future_ms ({} days) after its input's clock {}",
                        max / 86_400_000,
                        format_rfc3339_millis(reference)
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The engine's settings: the rules, time, and state tuning.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    scoring: ScoringConfig,
    segments: SegmentsConfig,
    lateness_ms: i64,
    window: TimeWindow,
    state: StateOptions,
    commit_every_records: NonZeroU64,
    rules: RulesPolicy,
}

/// What a state dir built under other rules may do (ADR 008).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RulesPolicy {
    /// The configuration's `rules_version`: `None` follows the state's.
    pub version: Option<u32>,
    /// `--migrate-rules`: re-evaluate every customer under changed rules.
    pub migrate: bool,
}

impl EngineSettings {
    /// Validates the rules (the scorer accepts them) and the lateness.
    pub fn new(
        scoring: ScoringConfig,
        segments: SegmentsConfig,
        allowed_lateness: Duration,
        state: StateOptions,
        commit_every_records: NonZeroU64,
    ) -> Result<Self, EngineError> {
        Scorer::new(scoring.clone(), segments.clone())?;
        let lateness_ms = i64::try_from(allowed_lateness.as_millis())
            .map_err(|_| EngineError::Config(format!("time.allowed_lateness_ms is too large: {allowed_lateness:?}")))?;
        Ok(Self {
            scoring,
            segments,
            lateness_ms,
            window: TimeWindow::default(),
            state,
            commit_every_records,
            rules: RulesPolicy::default(),
        })
    }

    /// With a window of believable event times.
    pub fn with_window(mut self, window: TimeWindow) -> Self {
        self.window = window;
        self
    }

    pub fn window(&self) -> &TimeWindow {
        &self.window
    }

    /// With a rules version and whether a rule change may be migrated.
    pub fn with_rules_policy(mut self, rules: RulesPolicy) -> Self {
        self.rules = rules;
        self
    }

    pub fn rules_policy(&self) -> RulesPolicy {
        self.rules
    }

    /// The rules (scoring and segments) as stored in a state dir: the text
    /// the fingerprint hashes.
    pub fn rules_json(&self) -> String {
        serde_json::to_string(&(&self.scoring, &self.segments)).expect("the rules serialize")
    }

    /// SPEC's defaults.
    pub fn spec_default() -> Self {
        Self::new(
            ScoringConfig::default(),
            SegmentsConfig::default(),
            Duration::ZERO,
            StateOptions::default(),
            NonZeroU64::new(1_000_000).expect("non-zero"),
        )
        .expect("SPEC's defaults are valid")
    }

    pub fn scorer(&self) -> Scorer {
        Scorer::new(self.scoring.clone(), self.segments.clone()).expect("validated when the settings were made")
    }

    /// The watermark is the largest `ts` seen less this (ms).
    pub fn lateness_ms(&self) -> i64 {
        self.lateness_ms
    }

    pub fn state_options(&self) -> &StateOptions {
        &self.state
    }

    /// Input records between two commits (file mode: at multiples of this
    /// record number; Kafka mode: at least this often).
    pub fn commit_every_records(&self) -> u64 {
        self.commit_every_records.get()
    }

    /// A stable hash of the time settings that decide what a given sequence
    /// of records produces besides the rules: the lateness and the window of
    /// plausible event times (Kafka: a replay after a crash must produce what
    /// the crashed run wrote).
    pub fn time_fingerprint(&self) -> u64 {
        let w = &self.window;
        xxh3_64(format!("{}/{:?}/{:?}", self.lateness_ms, w.earliest, w.max_future).as_bytes())
    }

    /// A stable hash of the settings that decide segments: a state built with
    /// one set of rules must not silently continue under another.
    pub fn fingerprint(&self) -> u64 {
        xxh3_64(self.rules_json().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_rules_and_lateness_are_refused_once_at_start() {
        let mut seg = SegmentsConfig::default();
        seg.health.green_min = 30; // below yellow_min
        let opts = StateOptions::default();
        let every = NonZeroU64::MIN;
        assert!(EngineSettings::new(ScoringConfig::default(), seg, Duration::ZERO, opts.clone(), every).is_err());
        let huge = Duration::from_secs(u64::MAX);
        let err = EngineSettings::new(ScoringConfig::default(), SegmentsConfig::default(), huge, opts, every)
            .expect_err("lateness beyond i64 ms");
        assert!(err.to_string().contains("allowed_lateness_ms"), "{err}");
    }

    #[test]
    fn the_window_refuses_times_before_its_floor_or_far_ahead_of_the_reference() {
        let day = 86_400_000;
        let w = TimeWindow { earliest: Some(946_684_800_000), max_future: Some(day) };
        let now = 1_780_000_000_000;
        assert!(w.check(now, Some(now)).is_ok());
        assert!(w.check(now + day, Some(now)).is_ok());
        let e = w.check(now + day + 1, Some(now)).expect_err("a day and a millisecond ahead");
        assert_eq!(e.kind(), "implausible_timestamp");
        assert!(w.check(now + 100 * 365 * day, None).is_ok(), "no reference clock: no upper limit");
        let secs = w.check(1_780_000_000, Some(now)).expect_err("epoch seconds");
        assert!(secs.to_string().contains("epoch seconds"), "{secs}");
        assert!(TimeWindow::default().check(0, Some(now)).is_ok(), "SPEC accepts any time by default");
    }

    #[test]
    fn the_fingerprint_follows_the_rules_only() {
        let a = EngineSettings::spec_default();
        let mut scoring = ScoringConfig::default();
        scoring.recency.thresholds_days[0] = 6;
        let b = EngineSettings::new(
            scoring,
            SegmentsConfig::default(),
            Duration::from_secs(5),
            StateOptions::default(),
            NonZeroU64::MIN,
        )
        .expect("valid");
        assert_ne!(a.fingerprint(), b.fingerprint());
        let c = EngineSettings::new(
            ScoringConfig::default(),
            SegmentsConfig::default(),
            Duration::from_secs(5),
            StateOptions { cache_customers: 3, ..StateOptions::default() },
            NonZeroU64::MIN,
        )
        .expect("valid");
        assert_eq!(a.fingerprint(), c.fingerprint(), "time and tuning do not change what is computed");
    }

    #[test]
    fn the_rfm_axis_changes_the_fingerprint_only_when_it_is_not_spec_s() {
        // State dirs made before `segments.rfm.axis` existed keep their
        // fingerprint: the default is left out of the hashed text.
        let text = serde_json::to_string(&SegmentsConfig::default()).expect("serializes");
        assert!(!text.contains("axis"), "{text}");
        let mut seg = SegmentsConfig::default();
        seg.rfm.axis = segstream_scoring::RfmAxis::FM;
        let fm = EngineSettings::new(
            ScoringConfig::default(),
            seg,
            Duration::ZERO,
            StateOptions::default(),
            NonZeroU64::MIN,
        )
        .expect("valid");
        assert_ne!(fm.fingerprint(), EngineSettings::spec_default().fingerprint());
    }
}
