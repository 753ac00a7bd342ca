//! The engine against an independent, naive reading of SPEC.
//!
//! The reference below shares no code with the engine: for every instant that
//! could matter it recomputes a customer's scores and segments from scratch,
//! from the raw list of that customer's events with `ts ≤ τ` (SPEC §3–5), and
//! records where a label changes. Labels are piecewise constant between
//! events and the instants where a recency threshold, the frequency window or
//! the adoption window is crossed, so evaluating at exactly those instants
//! finds every transition. The engine's output, reduced to label timelines,
//! must be identical.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::*;
use segstream::{run_file, Config, FileSettings};
use segstream_decode::Format;
use segstream_decode::{
    decode_json_line, format_rfc3339_millis, Event, EventKind, PaymentStatus, Priority, SubscriptionStatus,
    TicketAction,
};

const DAY: i64 = 86_400_000;

fn day(t: i64) -> i64 {
    t.div_euclid(DAY)
}

/// Exit margins per group (rfm, health, value, engagement): segment → steps.
type Margins = [&'static [(&'static str, i64)]; 4];
const NO_MARGINS: Margins = [&[], &[], &[], &[]];

/// SPEC §4–5 at τ from the customer's events with ts ≤ τ (in input order);
/// with `fm`, the RFM grid's columns are the mean of F and M rounded half up
/// (`segments.rfm.axis = "FM"`). With `margins`, a customer holding a
/// segment with a margin k (`held`: its labels just before) keeps it while
/// some scores within k steps of its own give it: tried one by one here.
fn labels_at(
    events: &[&Event],
    tau: i64,
    fm: bool,
    held: Option<[&'static str; 4]>,
    margins: &Margins,
) -> [&'static str; 4] {
    let seen: Vec<&&Event> = events.iter().filter(|e| e.ts <= tau).collect();
    let first_seen = seen.iter().map(|e| e.ts).min().expect("customer exists");
    let activity: Vec<i64> = seen.iter().filter(|e| e.kind.is_activity()).map(|e| e.ts).collect();
    let reference = activity.iter().copied().max().unwrap_or(first_seen);
    let r_ms = tau - reference;
    let r = if r_ms < 7 * DAY {
        5
    } else if r_ms < 14 * DAY {
        4
    } else if r_ms < 30 * DAY {
        3
    } else if r_ms < 60 * DAY {
        2
    } else {
        1
    };
    let days: BTreeSet<i64> =
        activity.iter().map(|t| day(*t)).filter(|d| *d >= day(tau) - 89 && *d <= day(tau)).collect();
    let n = days.len();
    let f = if n >= 45 {
        5
    } else if n >= 25 {
        4
    } else if n >= 10 {
        3
    } else if n >= 3 {
        2
    } else {
        1
    };
    let mut feature_last: HashMap<&str, i64> = HashMap::new();
    // "Latest" facts: by ts, the later one in input order on ties.
    let mut by_ts: Vec<&&&Event> = seen.iter().collect();
    by_ts.sort_by_key(|e| e.ts);
    let (mut mrr, mut status, mut failed, mut nps) = (0i64, None, false, None);
    let mut tickets: BTreeMap<&str, Priority> = BTreeMap::new();
    for e in &by_ts {
        match &e.kind {
            EventKind::FeatureUsed { feature, .. } => {
                let d = feature_last.entry(feature.as_str()).or_insert(i64::MIN);
                *d = (*d).max(day(e.ts));
            }
            EventKind::Subscription { mrr_cents, status: s, .. } => {
                status = Some(*s);
                mrr = if *s == SubscriptionStatus::Canceled { 0 } else { *mrr_cents };
            }
            EventKind::Payment { status: PaymentStatus::Failed, .. } => failed = true,
            EventKind::Payment { status: PaymentStatus::Succeeded, .. } => failed = false,
            EventKind::Ticket { ticket_id, action: TicketAction::Opened, priority } => {
                tickets.insert(ticket_id.as_str(), *priority);
            }
            EventKind::Ticket { ticket_id, action: TicketAction::Closed, .. } => {
                tickets.remove(ticket_id.as_str());
            }
            EventKind::Nps { score } => nps = Some(*score),
            _ => {}
        }
    }
    let m = if mrr >= 200_000 {
        5
    } else if mrr >= 50_000 {
        4
    } else if mrr >= 10_000 {
        3
    } else if mrr >= 1 {
        2
    } else {
        1
    };
    let features = feature_last.values().filter(|d| **d >= day(tau) - 29).count() as i64;
    let adoption = (20 * features).min(100);
    let penalty: i64 = tickets
        .values()
        .map(|p| match p {
            Priority::Low => 10,
            Priority::Normal => 20,
            Priority::High => 35,
            Priority::Urgent => 50,
        })
        .sum();
    let support = (100 - penalty).max(0);
    let billing = if failed || status == Some(SubscriptionStatus::PastDue) { 0 } else { 100 };
    let sentiment = match nps {
        None => 50,
        Some(s) if s >= 9 => 100,
        Some(s) if s >= 7 => 50,
        Some(_) => 0,
    };
    let s = 30 * (f - 1) * 25 + 20 * (r - 1) * 25 + 20 * adoption + 10 * support + 10 * billing + 10 * sentiment;
    let health = (s + 50).div_euclid(100);
    let column = if fm { ((f + m) as f64 / 2.0).round() as i64 } else { f };
    let rfm = |r: i64, x: i64| SPEC_RFM_GRID[(5 - r) as usize][(x - 1) as usize];
    let health_seg = |h: i64| {
        if h >= 70 {
            "green"
        } else if h >= 40 {
            "yellow"
        } else {
            "red"
        }
    };
    let value = |m: i64| {
        if m == 5 {
            "high_touch"
        } else if m >= 3 {
            "low_touch"
        } else {
            "tech_touch"
        }
    };
    let engagement = |r: i64, f: i64| {
        if r >= 4 && f >= 4 && adoption >= 60 {
            "power_user"
        } else if r <= 2 {
            "non_active"
        } else {
            "on_the_fence"
        }
    };
    let raw = [rfm(r, column), health_seg(health), value(m), engagement(r, f)];
    let Some(held) = held else { return raw };
    let mut out = raw;
    for g in 0..4 {
        let Some((_, k)) = margins[g].iter().find(|(seg, _)| *seg == held[g]) else { continue };
        let k = *k;
        // Every combination of scores within k steps, on their scales.
        let steps = |v: i64, lo: i64, hi: i64| ((v - k).max(lo))..=((v + k).min(hi));
        let mut reachable = Vec::new();
        match g {
            0 => {
                for r2 in steps(r, 1, 5) {
                    for x2 in steps(column, 1, 5) {
                        reachable.push(rfm(r2, x2));
                    }
                }
            }
            1 => reachable.extend(steps(health, 0, 100).map(health_seg)),
            2 => reachable.extend(steps(m, 1, 5).map(value)),
            _ => {
                for r2 in steps(r, 1, 5) {
                    for f2 in steps(f, 1, 5) {
                        reachable.push(engagement(r2, f2));
                    }
                }
            }
        }
        if reachable.contains(&held[g]) {
            out[g] = held[g];
        }
    }
    out
}

const GROUPS: [&str; 4] = ["rfm", "health", "value", "engagement"];

type Timeline = BTreeMap<(String, &'static str), Vec<(i64, Option<String>)>>;

/// Label changes per (customer, group), from the events alone.
fn reference(events: &[Event], until: i64, fm: bool, margins: &Margins) -> Timeline {
    let mut per_customer: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        per_customer.entry(&e.customer_id).or_default().push(e);
    }
    let mut out = Timeline::new();
    for (c, evs) in per_customer {
        // One "life" per stretch between deletions.
        let mut lives: Vec<Vec<&Event>> = vec![Vec::new()];
        let mut deletions = Vec::new();
        for e in evs {
            if e.kind == EventKind::CustomerDeleted {
                if !lives.last().expect("non-empty").is_empty() {
                    deletions.push(e.ts);
                    lives.push(Vec::new());
                }
            } else {
                lives.last_mut().expect("non-empty").push(e);
            }
        }
        for (i, life) in lives.iter().enumerate() {
            if life.is_empty() {
                continue;
            }
            let end = deletions.get(i).copied().unwrap_or(until);
            let mut instants: BTreeSet<i64> = life.iter().map(|e| e.ts).collect();
            for e in life.iter().filter(|e| e.kind.is_activity()) {
                for d in [7, 14, 30, 60] {
                    instants.insert(e.ts + d * DAY);
                }
                instants.insert((day(e.ts) + 90) * DAY);
            }
            let first = life.iter().map(|e| e.ts).min().expect("non-empty");
            for d in [7, 14, 30, 60] {
                instants.insert(first + d * DAY);
            }
            for e in life {
                if let EventKind::FeatureUsed { .. } = e.kind {
                    instants.insert((day(e.ts) + 30) * DAY);
                }
            }
            let mut prev: Option<[&str; 4]> = None;
            for tau in instants.into_iter().filter(|t| *t <= end && *t >= first) {
                let now = labels_at(life, tau, fm, prev, margins);
                for g in 0..4 {
                    if prev.is_none_or(|p| p[g] != now[g]) {
                        out.entry((c.to_string(), GROUPS[g])).or_default().push((tau, Some(now[g].to_string())));
                    }
                }
                prev = Some(now);
            }
            if let Some(d) = deletions.get(i) {
                for g in GROUPS {
                    out.entry((c.to_string(), g)).or_default().push((*d, None));
                }
            }
        }
    }
    out
}

/// The engine's transitions as label timelines: several changes at one
/// instant collapse to the last, and changes back to the same label vanish.
fn engine_timeline(records: &[segstream_output::TransitionRecord]) -> Timeline {
    let mut raw = Timeline::new();
    for r in records {
        let g = GROUPS.iter().find(|g| **g == r.group).expect("built-in group");
        let at = segstream_decode::parse_rfc3339_millis(&r.at).expect("at");
        raw.entry((r.customer_id.clone(), g)).or_default().push((at, r.to.clone()));
    }
    let mut out = Timeline::new();
    for (k, changes) in raw {
        let mut line: Vec<(i64, Option<String>)> = Vec::new();
        let mut before: Option<String> = None;
        let mut i = 0;
        while i < changes.len() {
            let at = changes[i].0;
            let mut last = changes[i].1.clone();
            while i < changes.len() && changes[i].0 == at {
                last = changes[i].1.clone();
                i += 1;
            }
            if last != before || line.is_empty() {
                line.push((at, last.clone()));
            }
            before = last;
        }
        out.insert(k, line);
    }
    out
}

/// A sample's events sorted by `ts` (ties in file order): what SPEC §2 says
/// a file in any order means.
fn events_by_time(input: &std::path::Path) -> Vec<Event> {
    let mut events: Vec<Event> = std::fs::read_to_string(input)
        .expect("input")
        .lines()
        .map(|l| decode_json_line(l.as_bytes()).expect("valid"))
        .collect();
    events.sort_by_key(|e| e.ts);
    events
}

/// Compares the engine with the reference on a generated sample; with
/// `shuffle`, the engine reads the sample's lines in a pseudo-random order
/// and the reference takes the events sorted by `ts` (ties in that order),
/// which is what SPEC §2 says a file in any order means.
fn compare(seed: u64, customers: u64, days: u32, cfg: &Config, shuffle: bool) {
    compare_with(seed, customers, days, cfg, shuffle, &NO_MARGINS);
}

/// [`compare`], with `margins` the exit margins `cfg` sets.
fn compare_with(seed: u64, customers: u64, days: u32, cfg: &Config, shuffle: bool, margins: &Margins) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut input, end) = sample(dir.path(), "e.jsonl", customers, days, seed, Format::Json, None);
    if shuffle {
        let mut lines: Vec<String> =
            std::fs::read_to_string(&input).expect("input").lines().map(str::to_string).collect();
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for i in (1..lines.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            lines.swap(i, (x % (i as u64 + 1)) as usize);
        }
        input = dir.path().join("shuffled.jsonl");
        std::fs::write(&input, lines.join("\n") + "\n").expect("write");
    }
    let mut args = FileSettings::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    args.until = Some(end);
    run_file(&engine(cfg), &args).expect("run");
    let got = engine_timeline(&read_json(&args.output));
    let events = events_by_time(&input);
    let want = reference(&events, end, cfg.segments.rfm.axis == segstream_scoring::RfmAxis::FM, margins);
    assert_eq!(got.len(), want.len(), "customer×group timelines");
    let mut time_driven = 0;
    for (k, w) in &want {
        let g = got.get(k).unwrap_or_else(|| panic!("engine has no transitions for {k:?}"));
        if g != w {
            let show = |v: &Vec<(i64, Option<String>)>| {
                v.iter()
                    .map(|(t, s)| format!("{} {}", format_rfc3339_millis(*t), s.as_deref().unwrap_or("null")))
                    .collect::<Vec<_>>()
            };
            panic!("{k:?} differs (seed {seed})\n engine:    {:?}\n reference: {:?}", show(g), show(w));
        }
        time_driven += w.len();
    }
    assert!(time_driven > 100);
}

#[test]
fn engine_equals_naive_spec_reference_on_generated_samples() {
    for seed in [1, 2] {
        compare(seed, 60, 150, &Config::default(), false);
    }
}

#[test]
fn engine_equals_naive_spec_reference_on_a_file_in_any_order() {
    compare(4, 60, 150, &Config::default(), true);
}

#[test]
fn the_fm_axis_equals_the_reference_grid_of_r_against_the_mean_of_f_and_m() {
    let mut cfg = Config::default();
    cfg.segments.rfm.axis = segstream_scoring::RfmAxis::FM;
    compare(5, 60, 150, &cfg, false);
    // And it is another grid: some customer is placed elsewhere than by R × F.
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "e.jsonl", 60, 150, 5, Format::Json, None);
    let events = events_by_time(&input);
    assert_ne!(reference(&events, end, true, &NO_MARGINS), reference(&events, end, false, &NO_MARGINS));
}

#[test]
fn exit_margins_equal_the_reference_trying_every_score_within_the_margin() {
    const MARGINS: Margins = [
        &[("at_risk", 1), ("champions", 1), ("loyal_customers", 1)],
        &[("green", 6), ("red", 3)],
        &[("high_touch", 1)],
        &[("power_user", 1), ("non_active", 1)],
    ];
    let mut cfg = Config::default();
    let segments = &mut cfg.segments;
    for (g, map) in [
        &mut segments.rfm.exit_margin,
        &mut segments.health.exit_margin,
        &mut segments.value.exit_margin,
        &mut segments.engagement.exit_margin,
    ]
    .into_iter()
    .enumerate()
    {
        *map = MARGINS[g].iter().map(|(s, k)| (s.to_string(), *k as u32)).collect();
    }
    for seed in [6, 7] {
        compare_with(seed, 60, 150, &cfg, false, &MARGINS);
    }
    // And the margins hold customers back: fewer label changes than without.
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "e.jsonl", 60, 150, 6, Format::Json, None);
    let events = events_by_time(&input);
    let changes = |t: &Timeline| t.values().map(Vec::len).sum::<usize>();
    let (plain, damped) = (reference(&events, end, false, &NO_MARGINS), reference(&events, end, false, &MARGINS));
    assert!(changes(&damped) + 50 < changes(&plain), "{} vs {}", changes(&damped), changes(&plain));
}

#[test]
fn a_tiny_cache_and_frequent_commits_change_nothing() {
    // Customers are evicted after every commit and their timers come back
    // from RocksDB's index: the same transitions as with everything in memory.
    let mut cfg = config_committing_every(300);
    cfg.state.cache_customers = 5;
    compare(3, 60, 150, &cfg, false);
}
