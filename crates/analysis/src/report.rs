//! The report's tables, computed from a [`Dataset`]. Every table is a list
//! of flat rows, so that the same rows make the HTML, the JSON and the CSV.
//! Definitions: `docs/report.md`.

use std::collections::{BTreeMap, HashMap};

use segstream_decode::{format_rfc3339_millis, DAY_MS};
use serde::Serialize;

use crate::kmeans::{discover, Discovery};
use crate::model::{day_label, month_label, month_of, month_start, Dataset, Outcome};

/// What a report covers and how.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// The period's first instant (flows, entries, weekly and daily series start here).
    pub from: i64,
    /// Its last instant: the state's time (the snapshot is taken there).
    pub to: i64,
    /// Segments whose weekly inflow and outflow are charted: (group, segment).
    pub watch: Vec<(String, String)>,
    /// Values of a firmographic shown one by one in breakdowns (the rest are `other`).
    pub breakdown_values: usize,
    /// k-means seed (the same seed gives the same clusters).
    pub seed: u64,
    /// Run the discovery section (k-means).
    pub discovery: bool,
    /// Where the data comes from, in words (shown with the period).
    pub source: String,
    /// Further breakdowns by name: `attr.NAME` (a profile attribute) or
    /// `survey.QUESTION` (the latest answer).
    pub breakdown_by: Vec<String>,
    /// Invalid input records skipped (said with the period).
    pub invalid_records: u64,
}

impl ReportOptions {
    pub fn new(from: i64, to: i64) -> Self {
        Self {
            from,
            to,
            watch: vec![("rfm".into(), "at_risk".into()), ("rfm".into(), "champions".into())],
            breakdown_values: 8,
            seed: 7,
            discovery: true,
            source: String::new(),
            breakdown_by: Vec::new(),
            invalid_records: 0,
        }
    }
}

/// Days after entering a segment within which an outcome counts.
pub const HORIZONS_DAYS: [i64; 3] = [30, 60, 90];
/// The stability check: still in the segment this many days after entering.
pub const STABLE_DAYS: i64 = 30;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub period: Period,
    pub sizes_over_time: Vec<SizeRow>,
    #[serde(rename = "current_sizes")]
    pub current: Vec<CurrentRow>,
    pub flows: Vec<FlowRow>,
    #[serde(rename = "weekly_flows")]
    pub weekly: Vec<WeeklyRow>,
    #[serde(rename = "cohort_retention")]
    pub cohorts: Vec<CohortRow>,
    pub validation: Vec<ValidationRow>,
    pub predictive: Vec<PredictiveRow>,
    pub features: Vec<FeatureRow>,
    pub breakdowns: Vec<BreakdownRow>,
    pub discovery: Option<Discovery>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Period {
    pub from: String,
    pub to: String,
    /// Customers in the state at `to`.
    pub customers: u64,
    pub mrr_cents: i64,
    /// Transitions with `at` in the period.
    pub transitions: u64,
    /// Input events read (duplicates not included).
    pub events: u64,
    pub duplicate_events: u64,
    /// Input records that are not valid events (skipped, as the engine
    /// dead-letters them).
    pub invalid_records: u64,
    /// Where the transitions and the end state come from.
    pub source: String,
    /// With a transitions file checked against the engine's run of the
    /// input: transitions of the period in one and not the other.
    pub unmatched_transitions: Option<u64>,
    /// Σ over segments of |customers by the transitions − customers in the
    /// state| at the end: 0 when the transitions and the state agree (else
    /// the transitions file is incomplete or from another run).
    pub end_size_differences: u64,
}

/// Customers in a segment at the end of a day (the last day: at `to`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SizeRow {
    pub day: String,
    pub group: String,
    pub segment: String,
    pub customers: u64,
}

/// A segment at `to`, from the state.
#[derive(Debug, Clone, Serialize)]
pub struct CurrentRow {
    pub group: String,
    pub segment: String,
    pub customers: u64,
    pub share: f64,
    pub mrr_cents: i64,
    pub mrr_share: f64,
}

/// Transitions from one segment to another in the period (`null`: none).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FlowRow {
    pub group: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub transitions: u64,
}

/// Transitions into and out of a watched segment per ISO week (Monday first).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WeeklyRow {
    pub week: String,
    pub group: String,
    pub segment: String,
    pub inflow: u64,
    pub outflow: u64,
}

/// One cell of the cohort table: accounts first seen in `cohort`,
/// `months_since` months later.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CohortRow {
    pub cohort: String,
    pub months_since: i32,
    pub accounts: u64,
    /// Accounts with an activity event in that month.
    pub active: u64,
    pub active_share: f64,
    /// The cohort's MRR at the month's end (at `to` for the last month).
    pub mrr_cents: i64,
    /// `mrr_cents` over the cohort's MRR at the end of its first month; absent when that is 0.
    pub mrr_share: Option<f64>,
    /// The month is not over at `to`.
    pub partial: bool,
}

/// Is a segment substantial and stable?
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ValidationRow {
    pub group: String,
    pub segment: String,
    pub customers: u64,
    pub share: f64,
    pub mrr_cents: i64,
    /// Transitions into the segment in the period.
    pub entries: u64,
    /// Stays entered in the period that ended by `to`.
    pub completed_stays: u64,
    /// Their median length, days.
    pub median_dwell_days: Option<f64>,
    /// Entries at least 30 days before `to`.
    pub entries_observed_30d: u64,
    /// Of those, the share still in the segment 30 days after entering.
    pub still_there_30d: Option<f64>,
}

/// Does entering a segment predict an outcome?
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PredictiveRow {
    pub group: String,
    pub segment: String,
    /// `churn` (cancellation or erasure) or `downgrade` (lower MRR).
    pub outcome: String,
    pub horizon_days: i64,
    /// Entries in the period at least `horizon_days` before `to`.
    pub entries: u64,
    /// Of those, entries followed by the outcome within the horizon.
    pub with_outcome: u64,
    pub rate: Option<f64>,
    /// The rate over the entries into every segment of the group.
    pub base_rate: Option<f64>,
    pub lift: Option<f64>,
}

/// Is a segment distinct? A feature's mean inside against the rest.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeatureRow {
    pub group: String,
    pub segment: String,
    pub feature: String,
    pub members: u64,
    pub mean_in: Option<f64>,
    pub mean_rest: Option<f64>,
    /// Cohen's d (pooled standard deviation).
    pub effect_size: Option<f64>,
}

/// Customers of a segment by one firmographic value.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BreakdownRow {
    pub dimension: String,
    pub value: String,
    pub group: String,
    pub segment: String,
    pub customers: u64,
    pub share_of_segment: f64,
}

/// The features of the distinctness check and of k-means.
pub const FEATURES: [&str; 6] = ["R", "F", "M", "adoption", "health", "mrr"];

pub(crate) fn feature_values(s: &crate::model::Snapshot) -> [f64; 6] {
    [
        f64::from(s.r),
        f64::from(s.f),
        f64::from(s.m),
        f64::from(s.adoption),
        f64::from(s.health),
        s.mrr_cents as f64 / 100.0,
    ]
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// The Monday of the ISO week of a day (days since 1970-01-01, a Thursday).
pub fn week_start(day: i64) -> i64 {
    day - (day + 3).rem_euclid(7)
}

/// The median of a sorted list (the mean of the two middle values when even).
pub fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Cohen's d of two samples given as (n, sum, sum of squares).
fn cohens_d(a: (f64, f64, f64), b: (f64, f64, f64)) -> Option<f64> {
    let (na, sa, qa) = a;
    let (nb, sb, qb) = b;
    if na < 2.0 || nb < 2.0 {
        return None;
    }
    let (ma, mb) = (sa / na, sb / nb);
    let (va, vb) = ((qa - na * ma * ma) / (na - 1.0), (qb - nb * mb * mb) / (nb - 1.0));
    let pooled = (((na - 1.0) * va + (nb - 1.0) * vb) / (na + nb - 2.0)).max(0.0).sqrt();
    (pooled > 1e-12).then(|| (ma - mb) / pooled)
}

/// Employee bands of the breakdowns.
pub fn employee_band(n: Option<i64>) -> &'static str {
    match n {
        None => "unknown",
        Some(n) if n <= 10 => "1-10",
        Some(n) if n <= 50 => "11-50",
        Some(n) if n <= 200 => "51-200",
        Some(n) if n <= 1000 => "201-1000",
        Some(n) if n <= 5000 => "1001-5000",
        Some(_) => "5001+",
    }
}

/// One stay of a customer in a segment.
struct Stay {
    customer: u32,
    group: u16,
    segment: u16,
    entered: i64,
    left: Option<i64>,
}

fn stays(ds: &Dataset, to: i64) -> Vec<Stay> {
    let groups = ds.names.groups.len();
    let mut open: HashMap<(u32, u16), usize> = HashMap::new();
    let mut out: Vec<Stay> = Vec::new();
    for m in ds.moves.iter().filter(|m| m.at <= to) {
        if let Some(i) = open.remove(&(m.customer, m.group)) {
            out[i].left = Some(m.at);
        }
        if let Some(segment) = m.to {
            open.insert((m.customer, m.group), out.len());
            out.push(Stay { customer: m.customer, group: m.group, segment, entered: m.at, left: None });
        }
    }
    debug_assert!(groups == 0 || out.iter().all(|s| usize::from(s.group) < groups));
    out
}

/// Builds every table of the report.
pub fn build_report(ds: &Dataset, opts: &ReportOptions) -> Report {
    let names = &ds.names;
    let (from, to) = (opts.from, opts.to);
    let in_period = |t: i64| t >= from && t <= to;

    // Sizes at the end of each day, from the transitions.
    let mut sizes_over_time = Vec::new();
    let mut counts: Vec<Vec<i64>> = names.groups.iter().map(|g| vec![0; g.segments.len()]).collect();
    let mut moves = ds.moves.iter().peekable();
    let (first_day, last_day) = (from.div_euclid(DAY_MS), to.div_euclid(DAY_MS));
    for day in first_day..=last_day {
        let end = ((day + 1) * DAY_MS).min(to + 1);
        while let Some(m) = moves.next_if(|m| m.at < end) {
            if let Some(s) = m.from {
                counts[usize::from(m.group)][usize::from(s)] -= 1;
            }
            if let Some(s) = m.to {
                counts[usize::from(m.group)][usize::from(s)] += 1;
            }
        }
        for (g, group) in names.groups.iter().enumerate() {
            for (s, segment) in group.segments.iter().enumerate() {
                sizes_over_time.push(SizeRow {
                    day: day_label(day),
                    group: group.name.clone(),
                    segment: segment.clone(),
                    customers: counts[g][s].max(0) as u64,
                });
            }
        }
    }

    // Now: the state's customers and MRR per segment.
    let total_customers = ds.snapshot.len() as u64;
    let total_mrr: i64 = ds.snapshot.iter().map(|s| s.mrr_cents).sum();
    let mut now: Vec<Vec<(u64, i64)>> = names.groups.iter().map(|g| vec![(0, 0); g.segments.len()]).collect();
    for s in &ds.snapshot {
        for (g, &l) in s.labels.iter().enumerate().take(now.len()) {
            if let Some(cell) = now[g].get_mut(usize::from(l)) {
                cell.0 += 1;
                cell.1 += s.mrr_cents;
            }
        }
    }
    let mut end_size_differences = 0;
    for (g, group) in names.groups.iter().enumerate() {
        for s in 0..group.segments.len() {
            end_size_differences += (counts[g][s] - now[g][s].0 as i64).unsigned_abs();
        }
    }
    let mut current = Vec::new();
    for (g, group) in names.groups.iter().enumerate() {
        for (s, segment) in group.segments.iter().enumerate() {
            let (customers, mrr_cents) = now[g][s];
            current.push(CurrentRow {
                group: group.name.clone(),
                segment: segment.clone(),
                customers,
                share: ratio(customers, total_customers).unwrap_or(0.0),
                mrr_cents,
                mrr_share: if total_mrr > 0 { mrr_cents as f64 / total_mrr as f64 } else { 0.0 },
            });
        }
    }

    // Flows in the period.
    let mut flow_counts: BTreeMap<(u16, Option<u16>, Option<u16>), u64> = BTreeMap::new();
    let mut transitions = 0;
    for m in ds.moves.iter().filter(|m| in_period(m.at)) {
        *flow_counts.entry((m.group, m.from, m.to)).or_default() += 1;
        transitions += 1;
    }
    let flows = flow_counts
        .into_iter()
        .map(|((g, f, t), n)| FlowRow {
            group: names.group_name(g).to_string(),
            from: names.label(g, f),
            to: names.label(g, t),
            transitions: n,
        })
        .collect();

    // Weekly inflow and outflow of the watched segments.
    let mut weekly = Vec::new();
    let (first_week, last_week) = (week_start(first_day), week_start(last_day));
    for (group, segment) in &opts.watch {
        let Some(g) = names.group(group) else { continue };
        let Some(s) = names.segment(g, segment) else { continue };
        let mut per_week: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
        let mut w = first_week;
        while w <= last_week {
            per_week.insert(w, (0, 0));
            w += 7;
        }
        for m in ds.moves.iter().filter(|m| m.group == g && in_period(m.at)) {
            let cell = per_week.entry(week_start(m.at.div_euclid(DAY_MS))).or_default();
            if m.to == Some(s) {
                cell.0 += 1;
            }
            if m.from == Some(s) {
                cell.1 += 1;
            }
        }
        weekly.extend(per_week.into_iter().map(|(w, (inflow, outflow))| WeeklyRow {
            week: day_label(w),
            group: group.clone(),
            segment: segment.clone(),
            inflow,
            outflow,
        }));
    }

    let cohorts = cohorts(ds, from, to);

    // Validation: stays, entries and what followed them.
    let all_stays = stays(ds, to);
    let churn: Vec<Vec<i64>> = ds.facts.iter().map(|f| f.outcomes(Outcome::Churn)).collect();
    let downgrade: Vec<Vec<i64>> = ds.facts.iter().map(|f| f.outcomes(Outcome::Downgrade)).collect();
    // An account already canceled when it enters cannot churn again: such
    // entries are left out of the churn rates (and their base).
    let can_have =
        |outcome: &str, st: &Stay| outcome != "churn" || !ds.facts[st.customer as usize].canceled_at(st.entered);
    let followed = |times: &[i64], t: i64, horizon: i64| {
        let i = times.partition_point(|&x| x <= t);
        times.get(i).is_some_and(|&x| x <= t + horizon)
    };
    let mut validation = Vec::new();
    let mut predictive = Vec::new();
    for (g, group) in names.groups.iter().enumerate() {
        let g16 = g as u16;
        let entered: Vec<&Stay> = all_stays.iter().filter(|st| st.group == g16 && in_period(st.entered)).collect();
        // Base rates: every entry into a segment of the group.
        let mut base = Vec::new();
        for (outcome, times) in [("churn", &churn), ("downgrade", &downgrade)] {
            for h in HORIZONS_DAYS {
                let horizon = h * DAY_MS;
                let observed: Vec<&&Stay> =
                    entered.iter().filter(|st| st.entered + horizon <= to && can_have(outcome, st)).collect();
                let hits =
                    observed.iter().filter(|st| followed(&times[st.customer as usize], st.entered, horizon)).count();
                base.push((outcome, h, ratio(hits as u64, observed.len() as u64)));
            }
        }
        for (s, segment) in group.segments.iter().enumerate() {
            let s16 = s as u16;
            let mine: Vec<&&Stay> = entered.iter().filter(|st| st.segment == s16).collect();
            let mut dwell: Vec<f64> =
                mine.iter().filter_map(|st| st.left.map(|l| (l - st.entered) as f64 / DAY_MS as f64)).collect();
            dwell.sort_by(f64::total_cmp);
            let stable = STABLE_DAYS * DAY_MS;
            let observed: Vec<&&&Stay> = mine.iter().filter(|st| st.entered + stable <= to).collect();
            let stayed = observed.iter().filter(|st| st.left.is_none_or(|l| l > st.entered + stable)).count();
            let (customers, mrr_cents) = now[g][s];
            validation.push(ValidationRow {
                group: group.name.clone(),
                segment: segment.clone(),
                customers,
                share: ratio(customers, total_customers).unwrap_or(0.0),
                mrr_cents,
                entries: mine.len() as u64,
                completed_stays: dwell.len() as u64,
                median_dwell_days: median(&dwell),
                entries_observed_30d: observed.len() as u64,
                still_there_30d: ratio(stayed as u64, observed.len() as u64),
            });
            let mut b = base.iter();
            for (outcome, times) in [("churn", &churn), ("downgrade", &downgrade)] {
                for h in HORIZONS_DAYS {
                    let horizon = h * DAY_MS;
                    let observed: Vec<&&&Stay> =
                        mine.iter().filter(|st| st.entered + horizon <= to && can_have(outcome, st)).collect();
                    let hits = observed
                        .iter()
                        .filter(|st| followed(&times[st.customer as usize], st.entered, horizon))
                        .count() as u64;
                    let rate = ratio(hits, observed.len() as u64);
                    let base_rate = b.next().and_then(|(_, _, r)| *r);
                    predictive.push(PredictiveRow {
                        group: group.name.clone(),
                        segment: segment.clone(),
                        outcome: outcome.to_string(),
                        horizon_days: h,
                        entries: observed.len() as u64,
                        with_outcome: hits,
                        rate,
                        base_rate,
                        lift: match (rate, base_rate) {
                            (Some(r), Some(b)) if b > 0.0 => Some(r / b),
                            _ => None,
                        },
                    });
                }
            }
        }
    }

    let features = features(ds);
    let breakdowns = breakdowns(ds, opts.breakdown_values, &opts.breakdown_by);
    let discovery = if opts.discovery { discover(ds, opts.seed) } else { None };

    Report {
        period: Period {
            from: format_rfc3339_millis(from),
            to: format_rfc3339_millis(to),
            customers: total_customers,
            mrr_cents: total_mrr,
            transitions,
            events: ds.events,
            duplicate_events: ds.duplicate_events,
            invalid_records: opts.invalid_records,
            source: opts.source.clone(),
            unmatched_transitions: None,
            end_size_differences,
        },
        sizes_over_time,
        current,
        flows,
        weekly,
        cohorts,
        validation,
        predictive,
        features,
        breakdowns,
        discovery,
    }
}

/// Accounts by the month of their first event, and what became of them.
fn cohorts(ds: &Dataset, from: i64, to: i64) -> Vec<CohortRow> {
    let (first, last) = (month_of(from), month_of(to));
    // (cohort, months since) → (accounts, active, MRR)
    let mut cells: BTreeMap<(i32, i32), (u64, u64, i64)> = BTreeMap::new();
    for f in &ds.facts {
        if f.first_seen > to || f.first_seen == i64::MAX {
            continue;
        }
        let c = month_of(f.first_seen);
        if c < first {
            continue;
        }
        for k in 0..=(last - c) {
            let month = c + k;
            let end = (month_start(month + 1) - 1).min(to);
            let cell = cells.entry((c, k)).or_default();
            cell.0 += 1;
            if f.active_months.binary_search(&month).is_ok() {
                cell.1 += 1;
            }
            cell.2 += f.mrr_at(end);
        }
    }
    let base: HashMap<i32, i64> = cells.iter().filter(|((_, k), _)| *k == 0).map(|((c, _), v)| (*c, v.2)).collect();
    cells
        .into_iter()
        .map(|((c, k), (accounts, active, mrr_cents))| {
            let base = base.get(&c).copied().unwrap_or(0);
            CohortRow {
                cohort: month_label(c),
                months_since: k,
                accounts,
                active,
                active_share: ratio(active, accounts).unwrap_or(0.0),
                mrr_cents,
                mrr_share: (base > 0).then(|| mrr_cents as f64 / base as f64),
                partial: month_start(c + k + 1) - 1 > to,
            }
        })
        .collect()
}

fn features(ds: &Dataset) -> Vec<FeatureRow> {
    let names = &ds.names;
    let mut rows = Vec::new();
    // Totals over everyone, per feature: (n, sum, sum of squares).
    let mut all = [(0.0, 0.0, 0.0); FEATURES.len()];
    let mut per: Vec<Vec<[(f64, f64, f64); FEATURES.len()]>> =
        names.groups.iter().map(|g| vec![[(0.0, 0.0, 0.0); FEATURES.len()]; g.segments.len()]).collect();
    for s in &ds.snapshot {
        let v = feature_values(s);
        for (i, x) in v.iter().enumerate() {
            all[i].0 += 1.0;
            all[i].1 += x;
            all[i].2 += x * x;
        }
        for (g, &l) in s.labels.iter().enumerate().take(per.len()) {
            if let Some(cell) = per[g].get_mut(usize::from(l)) {
                for (i, x) in v.iter().enumerate() {
                    cell[i].0 += 1.0;
                    cell[i].1 += x;
                    cell[i].2 += x * x;
                }
            }
        }
    }
    for (g, group) in names.groups.iter().enumerate() {
        for (s, segment) in group.segments.iter().enumerate() {
            for (i, feature) in FEATURES.iter().enumerate() {
                let a = per[g][s][i];
                let rest = (all[i].0 - a.0, all[i].1 - a.1, all[i].2 - a.2);
                rows.push(FeatureRow {
                    group: group.name.clone(),
                    segment: segment.clone(),
                    feature: feature.to_string(),
                    members: a.0 as u64,
                    mean_in: (a.0 > 0.0).then(|| a.1 / a.0),
                    mean_rest: (rest.0 > 0.0).then(|| rest.1 / rest.0),
                    effect_size: cohens_d(a, rest),
                });
            }
        }
    }
    rows
}

fn breakdowns(ds: &Dataset, top: usize, by: &[String]) -> Vec<BreakdownRow> {
    let names = &ds.names;
    type ValuesOf = Box<dyn Fn(&crate::model::Snapshot) -> Vec<String>>;
    let one = |v: Option<String>| vec![v.unwrap_or_else(|| "unknown".into())];
    let mut dims: Vec<(String, ValuesOf)> = vec![
        ("industry".into(), Box::new(move |s| one(s.industry.clone()))),
        ("employees".into(), Box::new(|s| vec![employee_band(s.employees).to_string()])),
        ("country".into(), Box::new(move |s| one(s.country.clone()))),
    ];
    for name in by {
        let key = name.clone();
        dims.push((
            name.clone(),
            Box::new(move |s| match s.named.iter().find(|(n, _)| *n == key) {
                Some((_, v)) if !v.is_empty() => v.clone(),
                _ => vec!["unknown".into()],
            }),
        ));
    }
    let mut rows = Vec::new();
    for (dim, values_of) in &dims {
        let values: Vec<Vec<String>> = ds.snapshot.iter().map(values_of).collect();
        let mut totals: HashMap<&str, u64> = HashMap::new();
        for v in values.iter().flatten() {
            *totals.entry(v).or_default() += 1;
        }
        let mut ranked: Vec<(&str, u64)> = totals.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let kept: Vec<&str> = if dim == "employees" {
            ranked.iter().map(|(v, _)| *v).collect()
        } else {
            // `unknown` is never folded into `other`.
            ranked.iter().filter(|(v, _)| *v != "unknown").take(top).map(|(v, _)| *v).chain(["unknown"]).collect()
        };
        let bucket = |v: &str| if kept.contains(&v) { v.to_string() } else { "other".to_string() };
        let mut cells: BTreeMap<(u16, u16, String), u64> = BTreeMap::new();
        let mut seg_totals: HashMap<(u16, u16), u64> = HashMap::new();
        for (s, vs) in ds.snapshot.iter().zip(&values) {
            // A customer counts once per bucket (a list may hold several values).
            let mut buckets: Vec<String> = vs.iter().map(|v| bucket(v)).collect();
            buckets.sort_unstable();
            buckets.dedup();
            for (g, &l) in s.labels.iter().enumerate().take(names.groups.len()) {
                for b in &buckets {
                    *cells.entry((g as u16, l, b.clone())).or_default() += 1;
                }
                *seg_totals.entry((g as u16, l)).or_default() += 1;
            }
        }
        for ((g, l, value), n) in cells {
            if usize::from(l) >= names.groups[usize::from(g)].segments.len() {
                continue;
            }
            rows.push(BreakdownRow {
                dimension: dim.to_string(),
                value,
                group: names.group_name(g).to_string(),
                segment: names.segment_name(g, l).to_string(),
                customers: n,
                share_of_segment: ratio(n, seg_totals[&(g, l)]).unwrap_or(0.0),
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weeks_start_on_monday() {
        // 2026-01-05 is a Monday; 1970-01-01 a Thursday.
        let monday = 20_458;
        assert_eq!(day_label(monday), "2026-01-05");
        for d in monday..monday + 7 {
            assert_eq!(week_start(d), monday);
        }
        assert_eq!(week_start(monday - 1), monday - 7);
        assert_eq!(week_start(0), -3);
    }

    #[test]
    fn medians_and_effect_sizes() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, 2.0, 10.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), Some(3.0));
        // a = {1, 3}, b = {5, 7}: pooled sd = sqrt(2), d = -4 / sqrt(2).
        let d = cohens_d((2.0, 4.0, 10.0), (2.0, 12.0, 74.0)).expect("both sides have spread");
        assert!((d + 4.0 / 2f64.sqrt()).abs() < 1e-9, "{d}");
        assert_eq!(cohens_d((1.0, 1.0, 1.0), (3.0, 3.0, 3.0)), None);
    }
}
