//! Quantile RFM (`scoring.mode = "quantile"`) against a brute-force reading
//! written here from the raw events: at every 00:00 UTC the edges the engine
//! recorded equal the population's percentiles computed directly (every
//! customer's values from its events before that instant, sorted), and at
//! instants across the run the engine's RFM and value labels equal those the
//! raw events give under the edges in force.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use segstream::query::{Answers, StateReader};
use segstream::{run_file, Config, FileSettings};
use segstream_decode::{decode_json_line, parse_rfc3339_millis, Event, EventKind, Format, SubscriptionStatus};
use segstream_engine::QuantileMeta;
use segstream_scoring::{Edges, ScoringMode};

const DAY: i64 = 86_400_000;
const MIN_CUSTOMERS: u64 = 30;

/// One customer's values at τ: (ms since the last activity or first event,
/// active days in the 90-day window, MRR), from its events `keep`s; `None`
/// when it does not exist then (no event, or erased since its last one).
fn values(events: &[&Event], tau: i64, keep: impl Fn(i64) -> bool) -> Option<(i64, usize, i64)> {
    let mut life: Vec<&Event> = Vec::new();
    for e in events.iter().filter(|e| keep(e.ts)) {
        if e.kind == EventKind::CustomerDeleted {
            life.clear();
        } else {
            life.push(e);
        }
    }
    let first = life.iter().map(|e| e.ts).min()?;
    let activity: Vec<i64> = life.iter().filter(|e| e.kind.is_activity()).map(|e| e.ts).collect();
    let reference = activity.iter().copied().max().unwrap_or(first);
    let today = tau.div_euclid(DAY);
    let days: BTreeSet<i64> =
        activity.iter().map(|t| t.div_euclid(DAY)).filter(|d| *d >= today - 89 && *d <= today).collect();
    let mut mrr = 0;
    let mut latest = i64::MIN;
    for e in &life {
        if let EventKind::Subscription { mrr_cents, status, .. } = &e.kind {
            if e.ts >= latest {
                latest = e.ts;
                mrr = if *status == SubscriptionStatus::Canceled { 0 } else { *mrr_cents };
            }
        }
    }
    Some((tau - reference, days.len(), mrr))
}

/// The value of nearest rank ⌈p·n/100⌉ of `v` (sorted here).
fn pct<T: Ord + Copy>(v: &mut [T], p: usize) -> T {
    v.sort_unstable();
    v[(p * v.len()).div_ceil(100).max(1) - 1]
}

fn score(above: impl Fn(usize) -> bool) -> u8 {
    (0..4).find(|i| above(*i)).map_or(1, |i| 5 - i as u8)
}

/// SPEC's RFM grid and value tiers under `edges`, at τ.
fn labels_of(v: (i64, usize, i64), e: &Edges) -> (&'static str, &'static str) {
    let (r_ms, days, mrr) = v;
    let r = score(|i| r_ms < i64::from(e.recency_days[i]) * DAY);
    let f = score(|i| days as u32 >= e.min_active_days[i]);
    let m = score(|i| mrr >= e.min_mrr_cents[i]);
    let value = match m {
        5 => "high_touch",
        3 | 4 => "low_touch",
        _ => "tech_touch",
    };
    (SPEC_RFM_GRID[usize::from(5 - r)][usize::from(f - 1)], value)
}

fn quantile_config() -> Config {
    let mut cfg = config_committing_every(700);
    cfg.scoring.mode = ScoringMode::Quantile;
    cfg.scoring.quantile.min_customers = MIN_CUSTOMERS;
    cfg
}

fn recomputations(state: &std::path::Path, scratch: &std::path::Path) -> Vec<QuantileMeta> {
    let store = segstream_state::StateStore::open_reader(state, scratch).expect("reader");
    store
        .meta_with_prefix("quantile:")
        .expect("meta")
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).expect("a recomputation"))
        .collect()
}

#[test]
fn edges_and_labels_equal_a_brute_force_recomputation_over_the_population() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, _) = sample(d.path(), "e.jsonl", 400, 45, 21, Format::Json, None);
    let cfg = quantile_config();
    let args = FileSettings::new(&input, d.path().join("out.jsonl"), d.path().join("state"));
    run_file(&engine(&cfg), &args).expect("run");
    let records = read_json(&args.output);

    let text = std::fs::read_to_string(&input).expect("input");
    let mut events: Vec<Event> = text.lines().map(|l| decode_json_line(l.as_bytes()).expect("valid")).collect();
    events.sort_by_key(|e| e.ts);
    let mut by_customer: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in &events {
        by_customer.entry(&e.customer_id).or_default().push(e);
    }
    let (first, last) = (events[0].ts, events[events.len() - 1].ts);

    // Every 00:00 the watermark passed was a recomputation, over the
    // population as its events before that instant make it.
    let recs = recomputations(&args.state_dir, &d.path().join("r"));
    let starts: Vec<i64> = ((first.div_euclid(DAY) + 1)..=last.div_euclid(DAY)).map(|d| d * DAY).collect();
    assert_eq!(recs.iter().map(|r| r.computed_at).collect::<Vec<_>>(), starts);
    let mut in_force = engine(&cfg).scorer().edges();
    let mut changes = 0;
    for rec in &recs {
        let q = rec.computed_at;
        let pop: Vec<(i64, usize, i64)> = by_customer.values().filter_map(|evs| values(evs, q, |t| t < q)).collect();
        assert_eq!(rec.customers, pop.len() as u64, "population at {q}");
        if pop.len() as u64 >= MIN_CUSTOMERS {
            let mut r: Vec<i64> = pop.iter().map(|v| v.0.div_euclid(DAY)).collect();
            let mut f: Vec<usize> = pop.iter().map(|v| v.1).collect();
            let mut m: Vec<i64> = pop.iter().map(|v| v.2).collect();
            let want = Edges {
                recency_days: [20, 40, 60, 80].map(|p| pct(&mut r, p) as u32 + 1),
                min_active_days: [80, 60, 40, 20].map(|p| pct(&mut f, p) as u32 + 1),
                min_mrr_cents: [80, 60, 40, 20].map(|p| pct(&mut m, p) + 1),
            };
            changes += usize::from(want != in_force);
            in_force = want;
        }
        assert!(rec.from_population == (pop.len() as u64 >= MIN_CUSTOMERS));
        assert_eq!(rec.edges, in_force, "edges at {}", segstream_decode::format_rfc3339_millis(q));
    }
    assert!(changes >= 10, "the edges moved on most days ({changes})");

    // Labels at 00:00 (right after a recomputation, and the events at that
    // very instant) and at midday, from the raw events under the edges in force.
    let requantiles = records.iter().filter(|r| r.cause == segstream_output::CauseRecord::Requantile).count();
    assert!(requantiles > 100, "recomputations moved customers ({requantiles})");
    for r in records.iter().filter(|r| r.cause == segstream_output::CauseRecord::Requantile) {
        assert_eq!(parse_rfc3339_millis(&r.at).expect("at").rem_euclid(DAY), 0, "{r:?} at 00:00");
    }
    let mut engine_labels = BTreeMap::new();
    let mut next = 0;
    let mut checked = 0;
    for tau in starts.iter().flat_map(|q| [*q, q + 13 * 3_600_000 + 17]).filter(|t| *t <= last) {
        while next < records.len() && parse_rfc3339_millis(&records[next].at).expect("at") <= tau {
            next += 1;
        }
        engine_labels.clear();
        fold_labels(&mut engine_labels, &records[..next]);
        let edges = recs.iter().rev().find(|r| r.computed_at <= tau).map(|r| r.edges).unwrap_or(in_force);
        for (c, evs) in &by_customer {
            let got = |g: &str| engine_labels.get(&(c.to_string(), g.to_string())).map(String::as_str);
            match values(evs, tau, |t| t <= tau) {
                None => assert_eq!(got("rfm"), None, "{c} does not exist at {tau}"),
                Some(v) => {
                    let (rfm, value) = labels_of(v, &edges);
                    assert_eq!((got("rfm"), got("value")), (Some(rfm), Some(value)), "{c} at {tau}: {v:?} {edges:?}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20_000, "{checked}");

    // The query API shows the edges in force, and scores under them.
    let reader = StateReader::open(&args.state_dir, &engine(&cfg)).expect("reader");
    let last_rec = recs.last().expect("recomputations");
    let seg = reader.segments().expect("segments");
    assert_eq!(seg["quantile"]["edges"], serde_json::to_value(last_rec.edges).expect("json"), "{seg}");
    assert_eq!(seg["quantile"]["customers"], last_rec.customers);
    for (c, evs) in &by_customer {
        let Some(v) = values(evs, last, |t| t <= last) else { continue };
        let e = &last_rec.edges;
        let want = [
            score(|i| v.0 < i64::from(e.recency_days[i]) * DAY),
            score(|i| v.1 as u32 >= e.min_active_days[i]),
            score(|i| v.2 >= e.min_mrr_cents[i]),
        ];
        let got = reader.customer_json(c, None).expect("customer")["scores"].clone();
        assert_eq!([&got["R"], &got["F"], &got["M"]], want.map(serde_json::Value::from).each_ref(), "{c}");
    }
}

#[test]
fn a_run_in_two_parts_equals_one_run_byte_for_byte() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(d.path(), "e.jsonl", 300, 30, 5, Format::Json, None);
    let text = std::fs::read_to_string(&input).expect("input");
    // Split in the middle of a day, between two instants.
    let cut = common::START + 17 * DAY + 5 * 3_600_000;
    let (mut a, mut b) = (String::new(), String::new());
    for l in text.lines() {
        let ts = decode_json_line(l.as_bytes()).expect("valid").ts;
        let part = if ts < cut { &mut a } else { &mut b };
        part.push_str(l);
        part.push('\n');
    }
    let (pa, pb) = (d.path().join("a.jsonl"), d.path().join("b.jsonl"));
    std::fs::write(&pa, a).expect("write");
    std::fs::write(&pb, b).expect("write");
    let settings = engine(&quantile_config());
    let mut whole = FileSettings::new(&input, d.path().join("whole.jsonl"), d.path().join("whole"));
    whole.until = Some(end + 3 * DAY);
    run_file(&settings, &whole).expect("run");
    let out = d.path().join("parts.jsonl");
    run_file(&settings, &FileSettings::new(&pa, out.clone(), d.path().join("parts"))).expect("first part");
    let mut second = FileSettings::new(&pb, out.clone(), d.path().join("parts"));
    second.until = whole.until;
    run_file(&settings, &second).expect("second part");
    let (x, y) = (std::fs::read(&whole.output).expect("whole"), std::fs::read(&out).expect("parts"));
    assert!(x == y, "outputs differ ({} and {} bytes)", x.len(), y.len());
    assert!(read_json(&out).iter().any(|r| r.cause == segstream_output::CauseRecord::Requantile));
}

#[test]
fn an_event_older_than_a_recomputation_counts_from_it() {
    // A customer the recomputation left unchanged is not written, yet it was
    // evaluated there: an event older than that instant is late, and its
    // changes happen at the recomputation, under the edges it put in force.
    let d = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(d.path(), "e.jsonl", 300, 30, 9, Format::Json, None);
    let settings = engine(&quantile_config());
    let mut args = FileSettings::new(&input, d.path().join("out.jsonl"), d.path().join("state"));
    args.until = Some(end + 2 * DAY);
    run_file(&settings, &args).expect("run");
    let since =
        recomputations(&args.state_dir, &d.path().join("r")).last().and_then(|r| r.since).expect("the edges changed");
    let customers: BTreeSet<String> = read_json(&args.output).into_iter().map(|r| r.customer_id).collect();
    let late = d.path().join("late.jsonl");
    let lines: Vec<String> = customers
        .iter()
        .map(|c| {
            let ts = segstream_decode::format_rfc3339_millis(since - 2 * 3_600_000);
            format!(r#"{{"event_id":"late-{c}","customer_id":"{c}","type":"login","ts":"{ts}"}}"#)
        })
        .collect();
    // And a new customer whose first event is ten days before `since`.
    let newbie_ts = since - 10 * DAY;
    let mut lines = lines;
    lines.push(format!(
        r#"{{"event_id":"newbie-1","customer_id":"newbie","type":"login","ts":"{}"}}"#,
        segstream_decode::format_rfc3339_millis(newbie_ts)
    ));
    std::fs::write(&late, lines.join("\n") + "\n").expect("write");
    let before = read_json(&args.output).len();
    let summary =
        run_file(&settings, &FileSettings::new(&late, args.output.clone(), args.state_dir.clone())).expect("late");
    let moved = &read_json(&args.output)[before..];
    assert!(moved.len() > 20, "the late logins moved customers ({})", moved.len());
    // A customer erased earlier is created anew by its login, at its `ts`.
    let reborn: BTreeSet<&str> = moved.iter().filter(|r| r.from.is_none()).map(|r| r.customer_id.as_str()).collect();
    // The new customer is created at its `ts`, then caught up to the
    // watermark under the edges in force: its labels there are theirs.
    let mut labels = BTreeMap::new();
    fold_labels(&mut labels, &moved.iter().filter(|r| r.customer_id == "newbie").cloned().collect::<Vec<_>>());
    let edges = recomputations(&args.state_dir, &d.path().join("r2")).last().expect("recomputations").edges;
    let watermark = end + 2 * DAY;
    let (rfm, value) = labels_of((watermark - newbie_ts, 1, 0), &edges);
    assert_eq!(labels.get(&("newbie".to_string(), "rfm".to_string())).map(String::as_str), Some(rfm), "{edges:?}");
    assert_eq!(labels.get(&("newbie".to_string(), "value".to_string())).map(String::as_str), Some(value));
    for r in moved.iter().filter(|r| !reborn.contains(r.customer_id.as_str())) {
        assert!(parse_rfc3339_millis(&r.at).expect("at") >= since, "{r:?} before the recomputation at {since}");
    }
    assert_eq!(summary.counts.late, (customers.len() + 1 - reborn.len()) as u64, "{:?}", summary.counts);
}

#[test]
fn weekly_recomputations_fall_on_mondays_and_keep_the_edges_between() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(d.path(), "e.jsonl", 200, 30, 13, Format::Json, None);
    let mut cfg = quantile_config();
    cfg.scoring.quantile.every_days = 7;
    let mut args = FileSettings::new(&input, d.path().join("out.jsonl"), d.path().join("state"));
    args.until = Some(end);
    run_file(&engine(&cfg), &args).expect("run");
    let recs = recomputations(&args.state_dir, &d.path().join("r"));
    assert!(recs.len() >= 4, "{recs:?}");
    for r in &recs {
        // 1970-01-05 was a Monday: day 4.
        assert_eq!((r.computed_at.div_euclid(DAY) - 4).rem_euclid(7), 0, "{r:?}");
        assert_eq!(r.computed_at.rem_euclid(DAY), 0);
    }
    let requantiles: BTreeSet<i64> = read_json(&args.output)
        .iter()
        .filter(|r| r.cause == segstream_output::CauseRecord::Requantile)
        .map(|r| parse_rfc3339_millis(&r.at).expect("at"))
        .collect();
    assert!(!requantiles.is_empty() && requantiles.iter().all(|t| recs.iter().any(|r| r.computed_at == *t)));
}
