//! Scoring configuration: every number of SPEC §4–5, with SPEC's defaults.
//! `config/default.toml` spells the same values out; a test keeps them equal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringConfig {
    /// How the R, F and M thresholds are set: fixed (the numbers below,
    /// SPEC) or from the population's quintiles, recomputed every day at
    /// 00:00 UTC (the numbers below then hold until the first recomputation).
    #[serde(skip_serializing_if = "ScoringMode::is_fixed")]
    pub mode: ScoringMode,
    /// Quantile mode's settings.
    #[serde(skip_serializing_if = "QuantileConfig::is_default")]
    pub quantile: QuantileConfig,
    pub recency: RecencyConfig,
    pub frequency: FrequencyConfig,
    pub monetary: MonetaryConfig,
    pub adoption: AdoptionConfig,
    pub health: HealthConfig,
}

/// Where the R, F and M thresholds come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoringMode {
    /// `recency.thresholds_days`, `frequency.min_active_days`, `monetary.min_mrr_cents`.
    #[default]
    Fixed,
    /// Population quintiles, recomputed every day at 00:00 UTC.
    Quantile,
}

impl ScoringMode {
    /// Left out of the fingerprint when fixed: state dirs made before the
    /// option existed keep theirs.
    pub fn is_fixed(&self) -> bool {
        *self == ScoringMode::Fixed
    }
}

/// Quantile mode: see `docs/semantics.md` §4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantileConfig {
    /// A recomputation over fewer customers keeps the edges in force.
    pub min_customers: u64,
    /// Days between recomputations, counted from Monday 1970-01-05 (7: every
    /// Monday at 00:00 UTC).
    pub every_days: u32,
}

impl Default for QuantileConfig {
    fn default() -> Self {
        Self { min_customers: 100, every_days: 1 }
    }
}

impl QuantileConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// R: 5 if `r < thresholds_days[0]`, 4 if `< [1]`, 3 if `< [2]`, 2 if `< [3]`, else 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecencyConfig {
    /// Days since last activity (or since first seen, before any activity), ascending.
    pub thresholds_days: [u32; 4],
}

/// F: 5 if `active_days >= min_active_days[0]`, 4 if `>= [1]`, 3 if `>= [2]`, 2 if `>= [3]`, else 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrequencyConfig {
    /// Length of the active-days window, in days (at most 120).
    pub window_days: u32,
    /// Descending.
    pub min_active_days: [u32; 4],
}

/// M: 5 if `mrr_cents >= min_mrr_cents[0]`, … 2 if `>= [3]`, else 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonetaryConfig {
    /// Descending.
    pub min_mrr_cents: [i64; 4],
}

/// adoption = `min(max, points_per_feature × features used in the last window_days)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdoptionConfig {
    pub window_days: u32,
    pub points_per_feature: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Weights of the components; they must add up to 100.
    pub weights: HealthWeights,
    /// Support component = `max(0, 100 − Σ penalty)` over open tickets.
    pub ticket_penalty: TicketPenalty,
    pub sentiment: SentimentConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthWeights {
    pub engagement: u32,
    pub recency: u32,
    pub adoption: u32,
    pub support: u32,
    pub billing: u32,
    pub sentiment: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TicketPenalty {
    pub low: u32,
    pub normal: u32,
    pub high: u32,
    pub urgent: u32,
}

/// Sentiment component from the latest NPS score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentimentConfig {
    /// Value when no NPS answer was ever given.
    pub no_answer: u32,
    /// Scores `>= promoter_min` are promoters.
    pub promoter_min: u8,
    /// Scores `>= passive_min` (and below `promoter_min`) are passives; the rest detractors.
    pub passive_min: u8,
    pub promoter: u32,
    pub passive: u32,
    pub detractor: u32,
}

/// Segment groups: the four SPEC §5 groups and any custom ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentsConfig {
    pub rfm: RfmConfig,
    pub health: HealthSegmentsConfig,
    pub value: ValueConfig,
    pub engagement: EngagementConfig,
    /// Custom groups, evaluated in this order after the built-in ones.
    pub custom: Vec<CustomGroupConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RfmConfig {
    /// `grid[5 − R][X − 1]`: rows R = 5 down to 1, columns X = 1 to 5,
    /// where X is F (`axis = "F"`, SPEC) or FM (`axis = "FM"`).
    pub grid: [[String; 5]; 5],
    /// The grid's columns: F (SPEC's R × F grid) or FM, the mean of F and M
    /// rounded half up (`(F + M + 1) / 2`), as classic RFM maps do, so that a
    /// frequent customer who pays little is not `cant_lose`.
    #[serde(skip_serializing_if = "RfmAxis::is_f")]
    pub axis: RfmAxis,
    /// A customer moves to another segment of this group only after
    /// qualifying for it continuously this long (ms); 0: at once.
    #[serde(skip_serializing_if = "is_zero")]
    pub min_dwell_ms: u64,
    /// Hysteresis, per segment: a customer leaves that segment only when no
    /// scores within this many steps of its own (per score: R and the grid's column) would keep it
    /// there. Segments not named: at once, as their scores give another.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub exit_margin: BTreeMap<String, u32>,
}

/// The column score of the RFM grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RfmAxis {
    /// Frequency alone (SPEC §5).
    #[default]
    F,
    /// `(F + M + 1) / 2`.
    FM,
}

impl RfmAxis {
    /// Left out of the fingerprint when F: state dirs made before the
    /// option existed keep theirs.
    pub fn is_f(&self) -> bool {
        *self == RfmAxis::F
    }

    /// The grid column (1..=5) of scores F and M.
    pub fn column(self, f: u8, m: u8) -> u8 {
        match self {
            RfmAxis::F => f,
            RfmAxis::FM => (f + m).div_ceil(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSegmentsConfig {
    /// `green` if health >= green_min.
    pub green_min: u32,
    /// `yellow` if health >= yellow_min, else `red`.
    pub yellow_min: u32,
    /// A customer moves to another segment of this group only after
    /// qualifying for it continuously this long (ms); 0: at once.
    #[serde(skip_serializing_if = "is_zero")]
    pub min_dwell_ms: u64,
    /// Hysteresis, per segment: a customer leaves that segment only when no
    /// scores within this many steps of its own (per score: health points) would keep it
    /// there. Segments not named: at once, as their scores give another.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub exit_margin: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValueConfig {
    /// `high_touch` if M >= this.
    pub high_touch_min_m: u8,
    /// `low_touch` if M >= this (and below high_touch_min_m), else `tech_touch`.
    pub low_touch_min_m: u8,
    /// A customer moves to another segment of this group only after
    /// qualifying for it continuously this long (ms); 0: at once.
    #[serde(skip_serializing_if = "is_zero")]
    pub min_dwell_ms: u64,
    /// Hysteresis, per segment: a customer leaves that segment only when no
    /// scores within this many steps of its own (per score: M) would keep it
    /// there. Segments not named: at once, as their scores give another.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub exit_margin: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngagementConfig {
    /// `power_user` needs R >= this, F >= power_min_f and adoption >= power_min_adoption.
    pub power_min_r: u8,
    pub power_min_f: u8,
    pub power_min_adoption: u32,
    /// `non_active` if R <= this (checked after power_user); else `on_the_fence`.
    pub non_active_max_r: u8,
    /// A customer moves to another segment of this group only after
    /// qualifying for it continuously this long (ms); 0: at once.
    #[serde(skip_serializing_if = "is_zero")]
    pub min_dwell_ms: u64,
    /// Hysteresis, per segment: a customer leaves that segment only when no
    /// scores within this many steps of its own (per score: R and F; adoption is compared as it is) would keep it
    /// there. Segments not named: at once, as their scores give another.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub exit_margin: BTreeMap<String, u32>,
}

/// A custom group: ordered rules, first match wins, `default` when none matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomGroupConfig {
    pub name: String,
    pub rules: Vec<RuleConfig>,
    /// Segment when no rule matches, so every customer is in exactly one segment.
    pub default: String,
    /// See [`RfmConfig::min_dwell_ms`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_dwell_ms: u64,
}

/// Left out of the fingerprint when 0: state dirs made before the option
/// existed keep theirs.
fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub segment: String,
    /// A condition such as `R >= 4 and profile.industry == "fintech"`; see README.
    pub when: String,
}

// Each section has its own defaults, so that a file may set one field of a
// section (`[segments.health] green_min = 75`) and keep SPEC's others.

impl Default for RecencyConfig {
    fn default() -> Self {
        Self { thresholds_days: [7, 14, 30, 60] }
    }
}

impl Default for FrequencyConfig {
    fn default() -> Self {
        Self { window_days: 90, min_active_days: [45, 25, 10, 3] }
    }
}

impl Default for MonetaryConfig {
    fn default() -> Self {
        Self { min_mrr_cents: [200_000, 50_000, 10_000, 1] }
    }
}

impl Default for AdoptionConfig {
    fn default() -> Self {
        Self { window_days: 30, points_per_feature: 20, max: 100 }
    }
}

impl Default for HealthWeights {
    fn default() -> Self {
        Self { engagement: 30, recency: 20, adoption: 20, support: 10, billing: 10, sentiment: 10 }
    }
}

impl Default for TicketPenalty {
    fn default() -> Self {
        Self { low: 10, normal: 20, high: 35, urgent: 50 }
    }
}

impl Default for SentimentConfig {
    fn default() -> Self {
        Self { no_answer: 50, promoter_min: 9, passive_min: 7, promoter: 100, passive: 50, detractor: 0 }
    }
}

fn row(names: [&str; 5]) -> [String; 5] {
    names.map(str::to_string)
}

impl Default for RfmConfig {
    fn default() -> Self {
        Self {
            grid: [
                row(["new_customers", "potential_loyalists", "potential_loyalists", "champions", "champions"]),
                row(["promising", "potential_loyalists", "potential_loyalists", "loyal_customers", "loyal_customers"]),
                row(["about_to_sleep", "about_to_sleep", "need_attention", "loyal_customers", "loyal_customers"]),
                row(["hibernating", "hibernating", "at_risk", "at_risk", "cant_lose"]),
                row(["hibernating", "hibernating", "at_risk", "at_risk", "cant_lose"]),
            ],
            axis: RfmAxis::F,
            min_dwell_ms: 0,
            exit_margin: BTreeMap::new(),
        }
    }
}

impl Default for HealthSegmentsConfig {
    fn default() -> Self {
        Self { green_min: 70, yellow_min: 40, min_dwell_ms: 0, exit_margin: BTreeMap::new() }
    }
}

impl Default for ValueConfig {
    fn default() -> Self {
        Self { high_touch_min_m: 5, low_touch_min_m: 3, min_dwell_ms: 0, exit_margin: BTreeMap::new() }
    }
}

impl Default for EngagementConfig {
    fn default() -> Self {
        Self {
            power_min_r: 4,
            power_min_f: 4,
            power_min_adoption: 60,
            non_active_max_r: 2,
            min_dwell_ms: 0,
            exit_margin: BTreeMap::new(),
        }
    }
}
