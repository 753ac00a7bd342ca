//! SPEC §4–5: scores and segments at an instant, the next time boundary, and
//! the per-customer state machine that turns events and passing time into
//! transitions (SPEC §2, §6).

use std::sync::Arc;

use segstream_decode::{Answer, AttrValue, Event, EventKind, Priority, SubscriptionStatus, DAY_MS};
use smallvec::SmallVec;

use crate::config::{ScoringConfig, SegmentsConfig};
use crate::rules::{Condition, Metric, RuleError, RuleInput, Val};
use crate::state::CustomerState;
use crate::transition::{BoundaryKind, Cause, Transition};

/// Scores of one customer at one instant (SPEC §4). The serde names are
/// those of the transition record's `scores` (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    #[serde(rename = "R")]
    pub r: u8,
    #[serde(rename = "F")]
    pub f: u8,
    #[serde(rename = "M")]
    pub m: u8,
    pub adoption: u8,
    pub health: u8,
    pub engagement: u8,
    pub recency: u8,
    pub support: u8,
    pub billing: u8,
    pub sentiment: u8,
    /// Active days in the frequency window.
    pub active_days: u16,
    /// Features used in the adoption window.
    pub features: u16,
}

/// A segment group and the names of its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: Arc<str>,
    pub segments: Vec<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid scoring config: {0}")]
    Invalid(String),
    /// `error` and not `source`: the message already says it, and a source
    /// would print it a second time in an error chain.
    #[error("custom group `{group}`: {error}")]
    Rule { group: String, error: RuleError },
}

impl segstream_decode::Classify for ConfigError {
    /// A configuration the scorer refuses cannot be worked around at run time.
    fn class(&self) -> segstream_decode::ErrorClass {
        segstream_decode::ErrorClass::Fatal
    }
}

#[derive(Clone)]
struct CustomGroup {
    rules: Vec<(Condition, u16)>,
    default: u16,
}

/// The validated scoring settings: computes scores, labels and boundaries.
#[derive(Clone)]
pub struct Scorer {
    pub(crate) cfg: ScoringConfig,
    seg: SegmentsConfig,
    groups: Vec<Group>,
    rfm_grid: [[u16; 5]; 5],
    custom: Vec<CustomGroup>,
    /// Whether a custom rule reads the raw active-day count (then every
    /// change of it may move a label, not only changes of F).
    custom_uses_active_days: bool,
    /// Stamped on every transition (see [`Transition::rules_version`]).
    rules_version: u32,
    /// Per group: the minimum dwell (ms; 0: none).
    dwell: Vec<i64>,
    /// Per built-in group, per segment: its exit margin (0: none).
    margins: Vec<Vec<u32>>,
}

/// Labels of one customer, without a heap allocation for the usual few groups.
pub(crate) type LabelSet = SmallVec<[u16; 8]>;

const HEALTH_GROUP: [&str; 3] = ["green", "yellow", "red"];
const VALUE_GROUP: [&str; 3] = ["high_touch", "low_touch", "tech_touch"];
const ENGAGEMENT_GROUP: [&str; 3] = ["power_user", "on_the_fence", "non_active"];
const MAX_WINDOW_DAYS: u32 = 120;
/// Ten years: a longer minimum dwell is a typo (and would overflow instants).
const MAX_DWELL_MS: u64 = 10 * 365 * 86_400_000;

fn intern(segments: &mut Vec<Arc<str>>, name: &str) -> u16 {
    match segments.iter().position(|s| &**s == name) {
        Some(i) => i as u16,
        None => {
            segments.push(Arc::from(name));
            (segments.len() - 1) as u16
        }
    }
}

fn group(name: &str, segments: &[&str]) -> Group {
    Group { name: Arc::from(name), segments: segments.iter().map(|s| Arc::from(*s)).collect() }
}

impl Scorer {
    pub fn new(cfg: ScoringConfig, seg: SegmentsConfig) -> Result<Self, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let r = cfg.recency.thresholds_days;
        if r[0] == 0 || r.windows(2).any(|w| w[0] >= w[1]) {
            return bad(format!("recency.thresholds_days must be positive and strictly ascending, got {r:?}"));
        }
        let f = cfg.frequency.min_active_days;
        if f.windows(2).any(|w| w[0] <= w[1]) {
            return bad(format!("frequency.min_active_days must be strictly descending, got {f:?}"));
        }
        let m = cfg.monetary.min_mrr_cents;
        if m.windows(2).any(|w| w[0] <= w[1]) {
            return bad(format!("monetary.min_mrr_cents must be strictly descending, got {m:?}"));
        }
        for (name, w) in [("frequency", cfg.frequency.window_days), ("adoption", cfg.adoption.window_days)] {
            if w == 0 || w > MAX_WINDOW_DAYS {
                return bad(format!("{name}.window_days must be 1..={MAX_WINDOW_DAYS}, got {w}"));
            }
        }
        let q = &cfg.quantile;
        if q.min_customers == 0 || q.every_days == 0 || q.every_days > 366 {
            return bad(format!(
                "quantile.min_customers must be at least 1 and quantile.every_days 1..=366, got {} and {}",
                q.min_customers, q.every_days
            ));
        }
        if cfg.adoption.max > 100 {
            return bad(format!("adoption.max must be <= 100, got {}", cfg.adoption.max));
        }
        let w = &cfg.health.weights;
        let sum: u64 = [w.engagement, w.recency, w.adoption, w.support, w.billing, w.sentiment]
            .iter()
            .map(|v| u64::from(*v))
            .sum();
        if sum != 100 {
            return bad(format!("health.weights must add up to 100, got {sum}"));
        }
        let s = &cfg.health.sentiment;
        if s.passive_min > s.promoter_min || [s.no_answer, s.promoter, s.passive, s.detractor].iter().any(|v| *v > 100)
        {
            return bad("health.sentiment: passive_min must be <= promoter_min and values <= 100".into());
        }
        if seg.health.yellow_min > seg.health.green_min {
            return bad("segments.health: yellow_min must be <= green_min".into());
        }
        if seg.value.low_touch_min_m > seg.value.high_touch_min_m {
            return bad("segments.value: low_touch_min_m must be <= high_touch_min_m".into());
        }

        let mut rfm_segments = Vec::new();
        let mut rfm_grid = [[0u16; 5]; 5];
        for (ri, row) in seg.rfm.grid.iter().enumerate() {
            for (fi, name) in row.iter().enumerate() {
                if name.is_empty() {
                    return bad("segments.rfm.grid has an empty segment name".into());
                }
                rfm_grid[ri][fi] = intern(&mut rfm_segments, name);
            }
        }
        let mut groups = vec![
            Group { name: Arc::from("rfm"), segments: rfm_segments },
            group("health", &HEALTH_GROUP),
            group("value", &VALUE_GROUP),
            group("engagement", &ENGAGEMENT_GROUP),
        ];
        let mut custom = Vec::new();
        for g in &seg.custom {
            if g.name.is_empty() || groups.iter().any(|x| *x.name == *g.name) {
                return bad(format!("custom group name `{}` is empty or used twice", g.name));
            }
            let mut segments = Vec::new();
            let mut rules = Vec::new();
            for rule in &g.rules {
                let cond =
                    Condition::parse(&rule.when).map_err(|error| ConfigError::Rule { group: g.name.clone(), error })?;
                rules.push((cond, intern(&mut segments, &rule.segment)));
            }
            let default = intern(&mut segments, &g.default);
            groups.push(Group { name: Arc::from(g.name.as_str()), segments });
            custom.push(CustomGroup { rules, default });
        }
        let custom_uses_active_days = custom.iter().any(|g| g.rules.iter().any(|(c, _)| c.uses(Metric::ActiveDays)));
        let dwells =
            [seg.rfm.min_dwell_ms, seg.health.min_dwell_ms, seg.value.min_dwell_ms, seg.engagement.min_dwell_ms]
                .into_iter()
                .chain(seg.custom.iter().map(|g| g.min_dwell_ms));
        let mut dwell = Vec::with_capacity(groups.len());
        for (ms, g) in dwells.zip(&groups) {
            if ms > MAX_DWELL_MS {
                return bad(format!("min_dwell_ms of group `{}` is {ms}: at most {MAX_DWELL_MS} (ten years)", g.name));
            }
            dwell.push(ms as i64);
        }
        let mut margins = Vec::with_capacity(4);
        for (g, (map, max)) in [
            (&seg.rfm.exit_margin, 4),
            (&seg.health.exit_margin, 100),
            (&seg.value.exit_margin, 4),
            (&seg.engagement.exit_margin, 4),
        ]
        .into_iter()
        .enumerate()
        {
            let group = &groups[g];
            let mut per_segment = vec![0u32; group.segments.len()];
            for (name, &k) in map {
                let Some(i) = group.segments.iter().position(|s| **s == **name) else {
                    return bad(format!(
                        "segments.{}.exit_margin: no segment {name:?} in the group (segments: {})",
                        group.name,
                        group.segments.iter().map(|s| &**s).collect::<Vec<_>>().join(", ")
                    ));
                };
                if k > max {
                    return bad(format!(
                        "segments.{}.exit_margin.{name} is {k}: at most {max} ({})",
                        group.name,
                        if max == 100 { "health points" } else { "score steps" }
                    ));
                }
                per_segment[i] = k;
            }
            margins.push(per_segment);
        }
        Ok(Self { cfg, seg, groups, rfm_grid, custom, custom_uses_active_days, rules_version: 1, dwell, margins })
    }

    /// Scorer with SPEC's defaults and no custom groups.
    pub fn spec_default() -> Self {
        Self::new(ScoringConfig::default(), SegmentsConfig::default()).expect("SPEC defaults are valid")
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The version stamped on the transitions (1 unless set).
    pub fn rules_version(&self) -> u32 {
        self.rules_version
    }

    pub fn set_rules_version(&mut self, version: u32) {
        self.rules_version = version;
    }

    /// Why time alone moved a label, in words, with this configuration's windows.
    pub fn explain(&self, kind: BoundaryKind) -> String {
        kind.explain(self.cfg.frequency.window_days, self.cfg.adoption.window_days)
    }

    /// The frequency and adoption windows, in days.
    pub fn windows_days(&self) -> (i64, i64) {
        (self.frequency_window(), self.adoption_window())
    }

    pub(crate) fn frequency_window(&self) -> i64 {
        i64::from(self.cfg.frequency.window_days)
    }

    pub(crate) fn adoption_window(&self) -> i64 {
        i64::from(self.cfg.adoption.window_days)
    }

    fn r_score(&self, st: &CustomerState, tau: i64) -> u8 {
        let reference = st.last_active.unwrap_or(st.first_seen);
        let r = tau - reference;
        let th = &self.cfg.recency.thresholds_days;
        match th.iter().position(|d| r < i64::from(*d) * DAY_MS) {
            Some(i) => 5 - i as u8,
            None => 1,
        }
    }

    /// The parts of the scores that move with time alone.
    pub(crate) fn time_varying(&self, st: &CustomerState, tau: i64) -> (u8, u32, u32) {
        (
            self.r_score(st, tau),
            st.active_days_in_window(tau, self.frequency_window()),
            st.features_in_window(tau, self.adoption_window()),
        )
    }

    /// All scores of `st` at instant `tau` (SPEC §4).
    pub fn scores(&self, st: &CustomerState, tau: i64) -> Scores {
        let (r, active_days, features) = self.time_varying(st, tau);
        self.scores_from(st, r, active_days, features)
    }

    fn f_score(&self, active_days: u32) -> u8 {
        match self.cfg.frequency.min_active_days.iter().position(|n| active_days >= *n) {
            Some(i) => 5 - i as u8,
            None => 1,
        }
    }

    fn adoption_score(&self, features: u32) -> u32 {
        let a = &self.cfg.adoption;
        a.points_per_feature.saturating_mul(features).min(a.max)
    }

    /// What labels can depend on among the time-varying inputs: two instants
    /// with the same key have the same labels.
    pub(crate) fn label_key(&self, tv: (u8, u32, u32)) -> (u8, u8, u32, u32) {
        let raw_days = if self.custom_uses_active_days { tv.1 } else { 0 };
        (tv.0, self.f_score(tv.1), self.adoption_score(tv.2), raw_days)
    }

    pub(crate) fn scores_from(&self, st: &CustomerState, r: u8, active_days: u32, features: u32) -> Scores {
        let c = &self.cfg;
        let f = self.f_score(active_days);
        let m = match c.monetary.min_mrr_cents.iter().position(|n| st.mrr_cents >= *n) {
            Some(i) => 5 - i as u8,
            None => 1,
        };
        let adoption = self.adoption_score(features);
        let engagement = u32::from(f - 1) * 25;
        let recency = u32::from(r - 1) * 25;
        let p = &c.health.ticket_penalty;
        let penalty: u32 = st
            .open_tickets
            .iter()
            .map(|(_, pr)| match pr {
                Priority::Low => p.low,
                Priority::Normal => p.normal,
                Priority::High => p.high,
                Priority::Urgent => p.urgent,
            })
            .sum();
        let support = 100u32.saturating_sub(penalty);
        let billing = if st.payment_failed || st.sub_status == Some(SubscriptionStatus::PastDue) { 0 } else { 100 };
        let s = &c.health.sentiment;
        let sentiment = match st.last_nps {
            None => s.no_answer,
            Some(n) if n >= s.promoter_min => s.promoter,
            Some(n) if n >= s.passive_min => s.passive,
            Some(_) => s.detractor,
        };
        let w = &c.health.weights;
        let total = w.engagement * engagement
            + w.recency * recency
            + w.adoption * adoption
            + w.support * support
            + w.billing * billing
            + w.sentiment * sentiment;
        let health = (total + 50) / 100;
        Scores {
            r,
            f,
            m,
            adoption: adoption as u8,
            health: health as u8,
            engagement: engagement as u8,
            recency: recency as u8,
            support: support as u8,
            billing: billing as u8,
            sentiment: sentiment as u8,
            active_days: active_days.min(u32::from(u16::MAX)) as u16,
            features: features.min(u32::from(u16::MAX)) as u16,
        }
    }

    /// The segment of every group (SPEC §5), as indexes into [`Scorer::groups`].
    pub fn labels(&self, st: &CustomerState, s: &Scores) -> Vec<u16> {
        self.label_set(st, s).to_vec()
    }

    /// What the customer qualifies for, given the labels it holds (its
    /// `labels`; see [`Scorer::label_set_from`]).
    pub(crate) fn label_set(&self, st: &CustomerState, s: &Scores) -> LabelSet {
        self.label_set_from(st, s, &st.labels)
    }

    /// What the customer qualifies for at scores `s` when it holds `held`
    /// (a group missing from it, or held as `u16::MAX`, holds nothing): the
    /// segment its scores give, except when it holds a segment of a built-in
    /// group with an `exit_margin` k: it keeps it while some scores within
    /// k steps of its own (each on its own scale, clamped to it) give it.
    pub(crate) fn label_set_from(&self, st: &CustomerState, s: &Scores, held: &[u16]) -> LabelSet {
        let mut out = LabelSet::new();
        let seg = &self.seg;
        // The scores within `k` steps of `v` on the scale lo..=hi.
        let near = |v: u32, k: u32, lo: u32, hi: u32| v.saturating_sub(k).max(lo)..=(v + k).min(hi);
        // The held segment of built-in group `g` and its margin, when it has one.
        let margin = |g: usize| -> Option<(u16, u32)> {
            let h = *held.get(g)?;
            let k = *self.margins[g].get(usize::from(h))?;
            (k > 0).then_some((h, k))
        };

        let rfm = |r: u32, x: u32| self.rfm_grid[(5 - r) as usize][(x - 1) as usize];
        let (r, x) = (u32::from(s.r), u32::from(seg.rfm.axis.column(s.f, s.m)));
        out.push(match margin(0) {
            Some((h, k)) if near(r, k, 1, 5).any(|r| near(x, k, 1, 5).any(|x| rfm(r, x) == h)) => h,
            _ => rfm(r, x),
        });

        // Segment 0 from `high` up, 1 from `low` up, else 2.
        let tier = |v: u32, high: u32, low: u32| -> u16 {
            if v >= high {
                0
            } else if v >= low {
                1
            } else {
                2
            }
        };
        let hs = &seg.health;
        let health = |v: u32| tier(v, hs.green_min, hs.yellow_min);
        let v = u32::from(s.health);
        out.push(match margin(1) {
            Some((h, k)) if near(v, k, 0, 100).any(|v| health(v) == h) => h,
            _ => health(v),
        });

        let vs = &seg.value;
        let value = |m: u32| tier(m, u32::from(vs.high_touch_min_m), u32::from(vs.low_touch_min_m));
        let m = u32::from(s.m);
        out.push(match margin(2) {
            Some((h, k)) if near(m, k, 1, 5).any(|m| value(m) == h) => h,
            _ => value(m),
        });

        let e = &seg.engagement;
        let engagement = |r: u32, f: u32| -> u16 {
            if r >= u32::from(e.power_min_r)
                && f >= u32::from(e.power_min_f)
                && u32::from(s.adoption) >= e.power_min_adoption
            {
                0
            } else if r <= u32::from(e.non_active_max_r) {
                2
            } else {
                1
            }
        };
        let f = u32::from(s.f);
        out.push(match margin(3) {
            Some((h, k)) if near(r, k, 1, 5).any(|r| near(f, k, 1, 5).any(|f| engagement(r, f) == h)) => h,
            _ => engagement(r, f),
        });

        if !self.custom.is_empty() {
            let input = RuleView { st, s };
            for g in &self.custom {
                let seg = g.rules.iter().find(|(c, _)| c.eval(&input)).map_or(g.default, |(_, i)| *i);
                out.push(seg);
            }
        }
        out
    }

    /// The minimum dwell of group `g` (ms; 0: none).
    pub fn min_dwell(&self, g: usize) -> i64 {
        self.dwell.get(g).copied().unwrap_or(0)
    }

    /// Whether any group has a minimum dwell.
    pub(crate) fn has_dwell(&self) -> bool {
        self.dwell.iter().any(|d| *d > 0)
    }

    /// The labels to hold at `tau` given the labels `q` the rules give there
    /// (the customer qualifies for), the labels held before and the moves
    /// waiting for their dwell (updated). A group without a dwell takes `q`
    /// at once. With a dwell: a move waiting since `since` completes at
    /// `since + dwell` (the customer qualified for it over the half-open
    /// `[since, since + dwell)`), then `q` is compared with what is held: the
    /// same segment clears the wait, another starts (or keeps) one. Callers
    /// stop at every instant `q` may change and at every deadline, so `q`
    /// was constant since the last call.
    pub(crate) fn settle(&self, held: &[u16], pending: &mut Vec<(u16, u16, i64)>, q: &[u16], tau: i64) -> LabelSet {
        if !self.has_dwell() {
            return LabelSet::from_slice(q);
        }
        let mut out = LabelSet::new();
        for (gi, &d) in self.dwell.iter().enumerate() {
            let g = gi as u16;
            if d == 0 {
                out.push(q[gi]);
                continue;
            }
            let mut now = held[gi];
            if let Some(i) = pending.iter().position(|p| p.0 == g) {
                let (_, s, since) = pending[i];
                if since.saturating_add(d) <= tau {
                    now = s;
                    pending.remove(i);
                }
            }
            let waiting = pending.iter().position(|p| p.0 == g);
            match waiting {
                _ if q[gi] == now => {
                    if let Some(i) = waiting {
                        pending.remove(i);
                    }
                }
                Some(i) if pending[i].1 == q[gi] => {}
                Some(i) => pending[i] = (g, q[gi], tau),
                None => pending.push((g, q[gi], tau)),
            }
            out.push(now);
        }
        pending.sort_unstable();
        out
    }

    /// The earliest instant a waiting move completes (`None`: none waits).
    pub(crate) fn next_deadline(&self, pending: &[(u16, u16, i64)]) -> Option<i64> {
        pending.iter().map(|(g, _, since)| since.saturating_add(self.dwell[usize::from(*g)])).min()
    }

    // Private: each argument is one field of the transitions it builds.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn emit(
        &self,
        customer_id: &str,
        from: &[u16],
        to: Option<&[u16]>,
        at: i64,
        cause: &Cause,
        scores: &Scores,
        out: &mut Vec<Transition>,
    ) {
        for (gi, g) in self.groups.iter().enumerate() {
            let (i_before, i_after) = (from.get(gi), to.and_then(|t| t.get(gi)));
            if i_before != i_after {
                let before = i_before.map(|i| g.segments[usize::from(*i)].clone());
                let after = i_after.map(|i| g.segments[usize::from(*i)].clone());
                out.push(Transition {
                    customer_id: customer_id.to_string(),
                    group: g.name.clone(),
                    from: before,
                    to: after,
                    at,
                    cause: cause.clone(),
                    scores: *scores,
                    rules_version: self.rules_version,
                });
            }
        }
    }

    /// Re-evaluates a customer under these rules after a rule change (a
    /// migration from `old`'s rules, version `from_version`): its labels at
    /// `max(evaluated_at, watermark)` — the instant a run under these rules
    /// would have them at (a group with a minimum dwell keeps its held
    /// segment while the customer waits, as at any evaluation) — with one
    /// transition per group whose segment changed, by name: a group only these rules have gets its first label
    /// (`from` null), a group only the old rules had ends (`to` null). The
    /// customer is then evaluated at that instant and its next boundary is
    /// found under these rules.
    pub fn migrate(
        &self,
        old: &Scorer,
        customer_id: &str,
        st: &mut CustomerState,
        watermark: i64,
        from_version: u32,
        out: &mut Vec<Transition>,
    ) {
        let tau = st.evaluated_at.max(watermark);
        let scores = self.scores(st, tau);
        let cause = Cause::Rules { from: from_version, to: self.rules_version };
        let old_group = |g: &str| old.groups.iter().position(|x| &*x.name == g);
        let old_name = |g: &str| -> Option<Arc<str>> {
            let gi = old_group(g)?;
            let l = st.labels.get(gi)?;
            old.groups[gi].segments.get(usize::from(*l)).cloned()
        };
        // Held segments by name in the new rules' indexes, for exit margins.
        let held_now: Vec<u16> = self
            .groups
            .iter()
            .map(|g| {
                old_name(&g.name).and_then(|n| g.segments.iter().position(|x| *x == n)).map_or(u16::MAX, |i| i as u16)
            })
            .collect();
        let q = self.label_set_from(st, &scores, &held_now);
        // What the customer holds under the new rules: what the rules give
        // now, except in a group with a minimum dwell whose held segment the
        // new rules still have: that one stays held, and the customer waits
        // (since the wait it was in, if for the same segment, else from now)
        // as it would at any other evaluation.
        let mut labels = LabelSet::new();
        let mut pending = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            let d = self.dwell[gi];
            let held = old_name(&g.name).and_then(|n| g.segments.iter().position(|s| *s == n)).map(|i| i as u16);
            let Some(held) = held.filter(|_| d > 0) else {
                labels.push(q[gi]);
                continue;
            };
            if q[gi] == held {
                labels.push(held);
                continue;
            }
            let since = old_group(&g.name)
                .and_then(|og| st.pending.iter().find(|p| usize::from(p.0) == og))
                .filter(|p| {
                    old.groups[usize::from(p.0)].segments.get(usize::from(p.1)) == Some(&g.segments[usize::from(q[gi])])
                })
                .map_or(tau, |p| p.2);
            if since.saturating_add(d) <= tau {
                labels.push(q[gi]);
            } else {
                labels.push(held);
                pending.push((gi as u16, q[gi], since));
            }
        }
        let mut push = |group: &Arc<str>, from: Option<Arc<str>>, to: Option<Arc<str>>| {
            if from != to {
                out.push(Transition {
                    customer_id: customer_id.to_string(),
                    group: group.clone(),
                    from,
                    to,
                    at: tau,
                    cause: cause.clone(),
                    scores,
                    rules_version: self.rules_version,
                });
            }
        };
        for (gi, g) in self.groups.iter().enumerate() {
            push(&g.name, old_name(&g.name), Some(g.segments[usize::from(labels[gi])].clone()));
        }
        for g in &old.groups {
            if !self.groups.iter().any(|x| x.name == g.name) {
                push(&g.name, old_name(&g.name), None);
            }
        }
        st.labels = labels.to_vec();
        st.pending = pending;
        st.evaluated_at = tau;
        st.rules_version = self.rules_version;
        self.reschedule(st);
    }

    /// Emits every time-driven change of the customer at instants `≤ until`.
    pub fn advance(&self, customer_id: &str, st: &mut CustomerState, until: i64, out: &mut Vec<Transition>) {
        loop {
            match self.next_boundary(st, st.evaluated_at) {
                Some(b) if b.at <= until => {
                    self.emit(customer_id, &st.labels, Some(&b.labels), b.at, &Cause::Time(b.kind), &b.scores, out);
                    st.labels = b.labels;
                    st.pending = b.pending;
                    st.evaluated_at = b.at;
                }
                // The boundary that stopped the loop is the next one.
                next => {
                    st.timer = next.map(|b| b.at);
                    break;
                }
            }
        }
        st.prune(self.frequency_window(), self.adoption_window());
    }

    pub(crate) fn reschedule(&self, st: &mut CustomerState) {
        st.prune(self.frequency_window(), self.adoption_window());
        st.timer = self.next_boundary(st, st.evaluated_at).map(|b| b.at);
    }

    /// Runs one event through the customer's state machine (SPEC §2): first
    /// the boundaries at or before its `ts`, then the event itself. `state`
    /// is `None` for a customer that does not exist (yet, or any more).
    pub fn on_event(&self, state: &mut Option<CustomerState>, e: &Event, out: &mut Vec<Transition>) -> Outcome {
        let Some(st) = state else {
            if e.kind == EventKind::CustomerDeleted {
                return Outcome::DeletedUnknown;
            }
            let mut st = CustomerState::new(e.ts);
            st.rules_version = self.rules_version;
            let _ = st.apply(e); // a new customer holds one ticket or feature at most
            let scores = self.scores(&st, e.ts);
            let labels = self.labels(&st, &scores);
            self.emit(&e.customer_id, &[], Some(&labels), e.ts, &Cause::Event(e.event_id.clone()), &scores, out);
            st.labels = labels;
            self.reschedule(&mut st);
            *state = Some(st);
            return Outcome::Created;
        };
        if st.has_seen(&e.event_id) {
            return Outcome::Duplicate;
        }
        // `timer` is the next boundary, kept exact by `reschedule`.
        if st.timer.is_some_and(|t| t <= e.ts) {
            self.advance(&e.customer_id, st, e.ts, out);
        }
        let late = e.ts < st.evaluated_at;
        let tau = e.ts.max(st.evaluated_at);
        let cause = || Cause::Event(e.event_id.clone());
        if e.kind == EventKind::CustomerDeleted {
            let scores = self.scores(st, tau);
            self.emit(&e.customer_id, &st.labels, None, tau, &cause(), &scores, out);
            *state = None;
            return Outcome::Deleted { late };
        }
        let kept = st.apply(e);
        let scores = self.scores(st, tau);
        let q = self.label_set(st, &scores);
        let labels = self.settle(&st.labels, &mut st.pending, &q, tau);
        if labels[..] != st.labels[..] {
            self.emit(&e.customer_id, &st.labels, Some(&labels), tau, &cause(), &scores, out);
            st.labels = labels.to_vec();
        }
        st.evaluated_at = tau;
        self.reschedule(st);
        Outcome::Applied { late, capped: !kept }
    }
}

/// What [`Scorer::on_event`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Applied {
        late: bool,
        /// A new open ticket or feature was not remembered: the customer is
        /// at [`crate::MAX_OPEN_TICKETS`] or [`crate::MAX_FEATURES`].
        capped: bool,
    },
    Deleted {
        late: bool,
    },
    /// `customer_deleted` for a customer that does not exist: nothing to erase.
    DeletedUnknown,
    /// The event id is among the customer's last 32: ignored entirely.
    Duplicate,
}

struct RuleView<'a> {
    st: &'a CustomerState,
    s: &'a Scores,
}

impl RuleInput for RuleView<'_> {
    fn metric(&self, m: Metric) -> Val<'_> {
        let n = |v: u8| Val::Num(f64::from(v));
        match m {
            Metric::R => n(self.s.r),
            Metric::F => n(self.s.f),
            Metric::M => n(self.s.m),
            Metric::Adoption => n(self.s.adoption),
            Metric::Health => n(self.s.health),
            Metric::Engagement => n(self.s.engagement),
            Metric::Recency => n(self.s.recency),
            Metric::Support => n(self.s.support),
            Metric::Billing => n(self.s.billing),
            Metric::Sentiment => n(self.s.sentiment),
            Metric::ActiveDays => Val::Num(f64::from(self.s.active_days)),
            Metric::MrrCents => Val::Num(self.st.mrr_cents as f64),
            Metric::OpenTickets => Val::Num(self.st.open_tickets.len() as f64),
            Metric::Nps => self.st.last_nps.map_or(Val::Absent, n),
            Metric::SubStatus => self.st.sub_status.map_or(Val::Absent, |s| Val::Str(s.as_str())),
            Metric::PaymentFailed => Val::Bool(self.st.payment_failed),
            Metric::Industry => self.st.profile.industry.as_deref().map_or(Val::Absent, Val::Str),
            Metric::Employees => self.st.profile.employees.map_or(Val::Absent, |e| Val::Num(e as f64)),
            Metric::Country => self.st.profile.country.as_deref().map_or(Val::Absent, Val::Str),
        }
    }

    fn attr(&self, name: &str) -> Val<'_> {
        let Some(extra) = &self.st.extra else { return Val::Absent };
        match extra.attributes.iter().find(|(n, _)| n == name).map(|(_, v)| v) {
            Some(AttrValue::Str(s)) => Val::Str(s),
            Some(AttrValue::Num(n)) => Val::Num(*n),
            Some(AttrValue::Bool(b)) => Val::Bool(*b),
            Some(AttrValue::List(l)) => Val::List(l),
            None => Val::Absent,
        }
    }

    fn answer(&self, question: &str) -> Val<'_> {
        let Some(extra) = &self.st.extra else { return Val::Absent };
        match extra.answers.iter().find(|(q, _, _)| q == question).map(|(_, a, _)| a) {
            Some(Answer::Str(s)) => Val::Str(s),
            Some(Answer::Num(n)) => Val::Num(*n),
            None => Val::Absent,
        }
    }
}
