//! `segstream report` and `segstream simulate` through the real binary:
//! every number of the report on a hand-built fixture against an
//! independent computation written here (from the raw JSON events and the
//! transitions of a separate `segstream run`), sizes against the engine's
//! own state, and simulate against two real runs diffed here.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use common::{read_json, sample, START};
use segstream_decode::{parse_rfc3339_millis, Format};
use segstream_output::TransitionRecord;
use serde_json::{json, Value};

const DAY: i64 = 86_400_000;

fn segstream(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_segstream")).args(args).env("RUST_LOG", "warn").output().expect("run segstream")
}

fn ok(out: std::process::Output) -> std::process::Output {
    assert!(out.status.success(), "segstream failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn read_report(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("report is JSON")
}

fn close(a: &Value, b: f64, what: &str) {
    let a = a.as_f64().unwrap_or_else(|| panic!("{what}: {a} is not a number"));
    assert!((a - b).abs() < 1e-9, "{what}: report {a}, expected {b}");
}

fn opt_close(a: &Value, b: Option<f64>, what: &str) {
    match b {
        None => assert!(a.is_null(), "{what}: report {a}, expected none"),
        Some(b) => close(a, b, what),
    }
}

// ---- the hand-built fixture ----

/// Six accounts built so that each analysis has something to find:
/// `a` subscribes, is active 47 days, goes quiet, cancels on a month's last day; `b` pays a lot and
/// stays active; `c` is active for two weeks and is erased; `d` downgrades;
/// `e` comes back now and then; `f` only has a profile. Plus a repeated event.
fn fixture() -> Vec<Value> {
    let mut ev = Vec::new();
    let mut n = 0;
    let mut push = |customer: &str, day: i64, kind: &str, extra: Value| {
        n += 1;
        let mut e = json!({"event_id": format!("e{n}"), "customer_id": customer, "type": kind, "ts": START + day * DAY + 9 * 3_600_000});
        if let (Some(m), Value::Object(x)) = (e.as_object_mut(), extra) {
            m.extend(x);
        }
        ev.push(e);
    };
    push("a", 4, "subscription", json!({"plan": "pro", "mrr_cents": 10_000, "status": "active"}));
    for d in 4..=50 {
        push("a", d, "login", json!({}));
    }
    push("a", 89, "subscription", json!({"plan": "pro", "mrr_cents": 10_000, "status": "canceled"}));
    push("b", 9, "subscription", json!({"plan": "enterprise", "mrr_cents": 300_000, "status": "active"}));
    push("b", 9, "profile", json!({"industry": "software", "employees": 800, "country": "US"}));
    for d in (9..=150).step_by(2) {
        push("b", d, "feature_used", json!({"feature": format!("f{}", d % 4)}));
    }
    for d in 33..=45 {
        push("c", d, "session", json!({"duration_s": 300}));
    }
    push("c", 73, "customer_deleted", json!({}));
    push("d", 45, "subscription", json!({"plan": "team", "mrr_cents": 50_000, "status": "active"}));
    for d in 45..=89 {
        push("d", d, "workflow_completed", json!({"workflow": "w"}));
    }
    push("d", 99, "subscription", json!({"plan": "team", "mrr_cents": 20_000, "status": "active"}));
    for d in [59, 80, 120] {
        push("e", d, "login", json!({}));
    }
    push("f", 20, "profile", json!({"industry": "retail", "employees": 30, "country": "DE"}));
    // An erasure of an account that never existed: the engine ignores it.
    push("ghost", 30, "customer_deleted", json!({}));
    // Repeated events: the engine ignores them, so does the report. A login
    // sent twice in a row, and d's downgrade sent again at the end of the file.
    let login = ev[5].clone();
    ev.insert(6, login);
    let downgrade =
        ev.iter().find(|e| e["customer_id"] == "d" && e["mrr_cents"] == 20_000).expect("d's downgrade").clone();
    ev.push(downgrade);
    // Not in time order (file mode reads a finished file in any order).
    ev.reverse();
    ev
}

/// 2026-05-31T23:59:59.999Z: the fixture's report ends with May.
const TO: i64 = START + 151 * DAY - 1;

/// Days since 1970-01-01 to (year, month), Howard Hinnant's civil_from_days.
fn civil(day: i64) -> (i64, i64) {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m)
}

fn month(t: i64) -> i64 {
    let (y, m) = civil(t.div_euclid(DAY));
    y * 12 + m - 1
}

/// The first instant of month `m` (as numbered by [`month`]), by search.
fn month_start(m: i64) -> i64 {
    let mut d = ((m / 12 - 1970) * 365 + (m % 12) * 28) - 400;
    while month(d * DAY) < m {
        d += 1;
    }
    d * DAY
}

fn write_lines(path: &Path, events: &[Value]) {
    let text: String = events.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(path, text).expect("write events");
}

fn at(t: &TransitionRecord) -> i64 {
    parse_rfc3339_millis(&t.at).expect("transition at")
}

/// One stay in a segment, from transitions sorted by time: (customer, group, segment, entered, left).
fn stays(transitions: &[TransitionRecord], to: i64) -> Vec<(String, String, String, i64, Option<i64>)> {
    let mut sorted: Vec<&TransitionRecord> = transitions.iter().filter(|t| at(t) <= to).collect();
    sorted.sort_by_key(|t| at(t));
    let mut open: HashMap<(String, String), usize> = HashMap::new();
    let mut out: Vec<(String, String, String, i64, Option<i64>)> = Vec::new();
    for t in sorted {
        let key = (t.customer_id.clone(), t.group.clone());
        if let Some(i) = open.remove(&key) {
            out[i].4 = Some(at(t));
        }
        if let Some(to) = &t.to {
            open.insert(key, out.len());
            out.push((t.customer_id.clone(), t.group.clone(), to.clone(), at(t), None));
        }
    }
    out
}

#[test]
fn every_number_of_the_report_on_a_hand_built_fixture_matches_an_independent_computation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let events = fixture();
    write_lines(&d.join("events.jsonl"), &events);
    let to = TO.to_string();
    ok(segstream(&[
        "report",
        "--input",
        p(&d.join("events.jsonl")),
        "--to",
        &to,
        "--format",
        "json",
        "--output",
        p(&d.join("r.json")),
    ]));
    let r = read_report(&d.join("r.json"));
    // A separate run of the engine gives the transitions the checks below use.
    ok(segstream(&[
        "run",
        "--input",
        p(&d.join("events.jsonl")),
        "--output",
        p(&d.join("t.jsonl")),
        "--state-dir",
        p(&d.join("s")),
        "--until",
        &to,
    ]));
    let transitions = read_json(&d.join("t.jsonl"));

    // The period starts on the day of the first event (a's subscription, day 4).
    let from = START + 4 * DAY;
    assert_eq!(r["period"]["from"], "2026-01-05T00:00:00.000Z");
    assert_eq!(r["period"]["to"], "2026-05-31T23:59:59.999Z");
    assert_eq!(r["period"]["duplicate_events"], 2);
    assert_eq!(r["period"]["events"], events.len() as u64 - 3, "duplicates and the ghost's erasure left out");
    // c was erased: five customers remain; MRR b 300 000 + d 20 000 (a canceled).
    assert_eq!(r["period"]["customers"], 5);
    assert_eq!(r["period"]["mrr_cents"], 320_000);

    // Flows: every (group, from, to) count of the run's transitions in the period.
    let mut flows: BTreeMap<(String, Option<String>, Option<String>), u64> = BTreeMap::new();
    for t in transitions.iter().filter(|t| at(t) >= from && at(t) <= TO) {
        *flows.entry((t.group.clone(), t.from.clone(), t.to.clone())).or_default() += 1;
    }
    let reported: BTreeMap<(String, Option<String>, Option<String>), u64> = r["flows"]
        .as_array()
        .expect("flows")
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().map(str::to_string);
            ((s("group").expect("group"), s("from"), s("to")), f["transitions"].as_u64().expect("count"))
        })
        .collect();
    assert_eq!(reported, flows);
    assert_eq!(r["period"]["transitions"], flows.values().sum::<u64>());
    // The erasure shows as a flow to no segment in every group.
    assert_eq!(flows.iter().filter(|(k, _)| k.2.is_none()).count(), 4);

    // Cohort retention from the raw events: first event month, activity, MRR at month ends.
    let activity = ["login", "session", "feature_used", "workflow_completed"];
    let mut first: BTreeMap<String, i64> = BTreeMap::new();
    let mut active: HashSet<(String, i64)> = HashSet::new();
    let mut seen_ids = HashSet::new();
    // (ts, Some((MRR, canceled)) for a subscription, None for an erasure)
    type Timeline = Vec<(i64, Option<(i64, bool)>)>;
    let mut money: BTreeMap<String, Timeline> = BTreeMap::new();
    let mut by_time = events.clone();
    by_time.reverse(); // file order back; ts ties keep it
    by_time.sort_by_key(|e| e["ts"].as_i64());
    for e in &by_time {
        if !seen_ids.insert(e["event_id"].as_str().expect("id").to_string()) {
            continue;
        }
        let (c, ts, kind) = (
            e["customer_id"].as_str().expect("c").to_string(),
            e["ts"].as_i64().expect("ts"),
            e["type"].as_str().expect("type"),
        );
        if kind == "customer_deleted" && !first.contains_key(&c) {
            continue; // erases nothing, makes no account
        }
        first.entry(c.clone()).or_insert(ts);
        if activity.contains(&kind) {
            active.insert((c.clone(), month(ts)));
        }
        match kind {
            "subscription" => {
                let canceled = e["status"] == "canceled";
                let mrr = if canceled { 0 } else { e["mrr_cents"].as_i64().expect("mrr") };
                money.entry(c).or_default().push((ts, Some((mrr, canceled))));
            }
            "customer_deleted" => money.entry(c).or_default().push((ts, None)),
            _ => {}
        }
    }
    let mrr_at = |c: &str, t: i64| -> i64 {
        money
            .get(c)
            .map_or(0, |v| v.iter().take_while(|(ts, _)| *ts <= t).last().map_or(0, |(_, m)| m.map_or(0, |m| m.0)))
    };
    let mut expected_cohorts = Vec::new();
    let cohorts: BTreeMap<i64, Vec<&String>> = first.iter().fold(BTreeMap::new(), |mut m, (c, ts)| {
        m.entry(month(*ts)).or_insert_with(Vec::new).push(c);
        m
    });
    for (cm, members) in &cohorts {
        let base: i64 = members.iter().map(|c| mrr_at(c, month_start(cm + 1) - 1)).sum();
        for k in 0..=(month(TO) - cm) {
            let end = (month_start(cm + k + 1) - 1).min(TO);
            let act = members.iter().filter(|c| active.contains(&((**c).clone(), cm + k))).count() as f64;
            let mrr: i64 = members.iter().map(|c| mrr_at(c, end)).sum();
            expected_cohorts.push((
                *cm,
                k,
                members.len() as u64,
                act / members.len() as f64,
                mrr,
                (base > 0).then(|| mrr as f64 / base as f64),
            ));
        }
    }
    let got = r["cohort_retention"].as_array().expect("cohorts");
    assert_eq!(got.len(), expected_cohorts.len());
    for (row, (cm, k, accounts, share, mrr, mrr_share)) in got.iter().zip(&expected_cohorts) {
        let what = format!("cohort {cm} +{k}");
        assert_eq!(row["cohort"], format!("{:04}-{:02}", cm / 12, cm % 12 + 1), "{what}");
        assert_eq!(row["months_since"], *k, "{what}");
        assert_eq!(row["accounts"], *accounts, "{what}");
        close(&row["active_share"], *share, &what);
        assert_eq!(row["mrr_cents"], *mrr, "{what}");
        opt_close(&row["mrr_share"], *mrr_share, &what);
        assert_eq!(row["partial"], false, "{what}");
    }
    // And by hand, from the fixture's design: January's cohort is a, b and f.
    let cell = |c: &str, k: i64| got.iter().find(|x| x["cohort"] == c && x["months_since"] == k).expect("cell").clone();
    assert_eq!(cell("2026-01", 0)["accounts"], 3);
    close(&cell("2026-01", 1)["active_share"], 2.0 / 3.0, "Jan +1: a (to Feb 20) and b");
    close(&cell("2026-01", 2)["active_share"], 1.0 / 3.0, "Jan +2: b");
    close(&cell("2026-01", 2)["mrr_share"], 300_000.0 / 310_000.0, "Jan +2: a canceled on March 31");
    close(&cell("2026-02", 1)["active_share"], 0.5, "Feb +1: d, not c");
    close(&cell("2026-02", 2)["mrr_share"], 20_000.0 / 50_000.0, "Feb +2: c erased, d downgraded");
    close(&cell("2026-03", 1)["active_share"], 0.0, "Mar +1: e quiet in April");
    close(&cell("2026-03", 2)["active_share"], 1.0, "Mar +2: e back in May");

    // Dwell and stability per segment, from the run's transitions.
    let all = stays(&transitions, TO);
    let validation = r["validation"].as_array().expect("validation");
    assert!(!validation.is_empty());
    for row in validation {
        let (g, s) = (row["group"].as_str().expect("g"), row["segment"].as_str().expect("s"));
        let what = format!("{g}/{s}");
        let mine: Vec<_> = all.iter().filter(|x| x.1 == g && x.2 == s && x.3 >= from && x.3 <= TO).collect();
        assert_eq!(row["entries"], mine.len() as u64, "{what}");
        let mut dwell: Vec<f64> = mine.iter().filter_map(|x| x.4.map(|l| (l - x.3) as f64 / DAY as f64)).collect();
        dwell.sort_by(f64::total_cmp);
        let median = match dwell.len() {
            0 => None,
            n if n % 2 == 1 => Some(dwell[n / 2]),
            n => Some((dwell[n / 2 - 1] + dwell[n / 2]) / 2.0),
        };
        assert_eq!(row["completed_stays"], dwell.len() as u64, "{what}");
        opt_close(&row["median_dwell_days"], median, &what);
        let observed: Vec<_> = mine.iter().filter(|x| x.3 + 30 * DAY <= TO).collect();
        let stayed = observed.iter().filter(|x| x.4.is_none_or(|l| l > x.3 + 30 * DAY)).count();
        assert_eq!(row["entries_observed_30d"], observed.len() as u64, "{what}");
        opt_close(
            &row["still_there_30d"],
            (!observed.is_empty()).then(|| stayed as f64 / observed.len() as f64),
            &what,
        );
    }

    // Lift: entries followed by a cancellation or an erasure within the horizon.
    let mut churn: HashMap<String, Vec<i64>> = HashMap::new();
    let mut downgrade: HashMap<String, Vec<i64>> = HashMap::new();
    for (c, v) in &money {
        let (mut mrr, mut canceled) = (0, false);
        for (ts, m) in v {
            match m {
                None => churn.entry(c.clone()).or_default().push(*ts),
                Some((_, true)) if !canceled => churn.entry(c.clone()).or_default().push(*ts),
                Some((x, false)) if *x < mrr => downgrade.entry(c.clone()).or_default().push(*ts),
                _ => {}
            }
            (mrr, canceled) = m.unwrap_or((0, false));
        }
    }
    let predictive = r["predictive"].as_array().expect("predictive");
    let mut checked_a_lift = false;
    for row in predictive {
        let (g, s, o, h) = (
            row["group"].as_str().expect("g"),
            row["segment"].as_str().expect("s"),
            row["outcome"].as_str().expect("o"),
            row["horizon_days"].as_i64().expect("h"),
        );
        let what = format!("{g}/{s} {o} {h}d");
        let outcomes = if o == "churn" { &churn } else { &downgrade };
        let followed = |x: &(String, String, String, i64, Option<i64>)| {
            outcomes.get(&x.0).is_some_and(|v| v.iter().any(|t| *t > x.3 && *t <= x.3 + h * DAY))
        };
        // An account canceled when it enters cannot churn: not a churn entry.
        let canceled_at = |c: &str, t: i64| {
            money
                .get(c)
                .and_then(|v| v.iter().take_while(|(ts, _)| *ts <= t).last())
                .is_some_and(|(_, m)| matches!(m, Some((_, true))))
        };
        let entries: Vec<_> = all
            .iter()
            .filter(|x| x.1 == g && x.3 >= from && x.3 + h * DAY <= TO && (o != "churn" || !canceled_at(&x.0, x.3)))
            .collect();
        let mine: Vec<_> = entries.iter().filter(|x| x.2 == s).copied().collect();
        let hits = mine.iter().filter(|x| followed(x)).count();
        let base_hits = entries.iter().filter(|x| followed(x)).count();
        let rate = (!mine.is_empty()).then(|| hits as f64 / mine.len() as f64);
        let base = (!entries.is_empty()).then(|| base_hits as f64 / entries.len() as f64);
        assert_eq!(row["entries"], mine.len() as u64, "{what}");
        assert_eq!(row["with_outcome"], hits as u64, "{what}");
        opt_close(&row["rate"], rate, &what);
        opt_close(&row["base_rate"], base, &what);
        let lift = match (rate, base) {
            (Some(r), Some(b)) if b > 0.0 => Some(r / b),
            _ => None,
        };
        opt_close(&row["lift"], lift, &what);
        checked_a_lift |= lift.is_some_and(|l| l > 1.0);
    }
    assert!(checked_a_lift, "the fixture has a segment whose entries churn more than the base");
    // By hand: the erasure and the cancellation are the only churn outcomes, the
    // downgrade (sent twice) the only downgrade.
    assert_eq!(churn.values().map(Vec::len).sum::<usize>(), 2);
    assert_eq!(downgrade.values().map(Vec::len).sum::<usize>(), 1);

    // Sizes at the end: the engine's state (customers per segment) and MRR.
    let engine = segstream_engine::Engine::open(&d.join("s"), &segstream_engine::EngineSettings::spec_default())
        .expect("open state");
    let sizes = engine.segment_sizes().expect("sizes");
    for row in r["current_sizes"].as_array().expect("current") {
        let key = (row["group"].as_str().expect("g").to_string(), row["segment"].as_str().expect("s").to_string());
        assert_eq!(row["customers"], sizes.get(&key).copied().unwrap_or(0), "{key:?}");
    }
    // Breakdowns: f is retail (11-50 employees, DE), b software; the others unknown.
    let bd = |dim: &str, value: &str| -> u64 {
        r["breakdowns"]
            .as_array()
            .expect("breakdowns")
            .iter()
            .filter(|x| x["dimension"] == dim && x["value"] == value && x["group"] == "value")
            .map(|x| x["customers"].as_u64().expect("n"))
            .sum()
    };
    assert_eq!((bd("industry", "retail"), bd("industry", "software"), bd("industry", "unknown")), (1, 1, 3));
    assert_eq!((bd("employees", "11-50"), bd("employees", "201-1000"), bd("country", "DE")), (1, 1, 1));
    // Too few customers for k-means: said, not made up.
    assert!(r["discovery"].is_null());
}

/// Final segment of every (customer, group) of a transitions file.
fn final_labels(transitions: &[TransitionRecord]) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for t in transitions {
        let key = (t.customer_id.clone(), t.group.clone());
        match &t.to {
            Some(s) => out.insert(key, s.clone()),
            None => out.remove(&key),
        };
    }
    out
}

#[test]
fn report_sizes_equal_the_engine_state_and_a_state_dir_reports_like_a_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (input, _) = sample(d, "e.jsonl", 400, 150, 11, Format::Json, None);
    ok(segstream(&["run", "--input", p(&input), "--output", p(&d.join("t.jsonl")), "--state-dir", p(&d.join("s"))]));
    ok(segstream(&["report", "--input", p(&input), "--format", "json", "--output", p(&d.join("replay.json"))]));
    ok(segstream(&[
        "report",
        "--input",
        p(&input),
        "--state-dir",
        p(&d.join("s")),
        "--transitions",
        p(&d.join("t.jsonl")),
        "--format",
        "json",
        "--output",
        p(&d.join("state.json")),
    ]));
    let (mut replay, mut state) = (read_report(&d.join("replay.json")), read_report(&d.join("state.json")));
    // Where the data came from is said; everything else is the same.
    assert!(replay["period"]["source"].as_str().expect("source").starts_with("the engine's run of"));
    assert!(state["period"]["source"].as_str().expect("source").starts_with("state dir"));
    assert!(replay["period"]["unmatched_transitions"].is_null());
    for r in [&mut replay, &mut state] {
        r["period"]["source"] = Value::Null;
    }
    assert_eq!(replay, state, "a report on the run's state dir equals one that runs the engine itself");

    // A transitions file alone (as Kafka mode's output topic saved to a file):
    // reported, and checked against the engine's run of the input.
    let mut lines: Vec<String> =
        std::fs::read_to_string(d.join("t.jsonl")).expect("t").lines().map(str::to_string).collect();
    lines.reverse(); // the order of a topic's partitions, not of time
    std::fs::write(d.join("topic.jsonl"), lines.join("\n") + "\n").expect("write");
    ok(segstream(&[
        "report",
        "--input",
        p(&input),
        "--transitions",
        p(&d.join("topic.jsonl")),
        "--format",
        "json",
        "--output",
        p(&d.join("topic.json")),
    ]));
    let mut topic = read_report(&d.join("topic.json"));
    assert_eq!(topic["period"]["unmatched_transitions"], 0);
    topic["period"]["source"] = Value::Null;
    topic["period"]["unmatched_transitions"] = Value::Null;
    assert_eq!(topic, replay);
    // Ten transitions lost: said on the page, in the JSON and in the log.
    std::fs::write(d.join("cut.jsonl"), lines[10..].join("\n") + "\n").expect("write");
    let out = ok(segstream(&[
        "report",
        "--input",
        p(&input),
        "--transitions",
        p(&d.join("cut.jsonl")),
        "--format",
        "json",
        "--output",
        p(&d.join("cut.json")),
    ]));
    assert_eq!(read_report(&d.join("cut.json"))["period"]["unmatched_transitions"], 10);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("differs from the engine's run"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let engine =
        segstream_engine::Engine::open(&d.join("s"), &segstream_engine::EngineSettings::spec_default()).expect("open");
    let sizes = engine.segment_sizes().expect("sizes");
    let total: u64 = sizes.iter().filter(|((g, _), _)| g == "rfm").map(|(_, n)| n).sum();
    assert!(total > 300, "{total}");
    assert_eq!(replay["period"]["customers"], total);
    let last_day = replay["sizes_over_time"].as_array().expect("sizes").last().expect("a day")["day"].clone();
    for row in replay["current_sizes"].as_array().expect("current") {
        let key = (row["group"].as_str().expect("g").to_string(), row["segment"].as_str().expect("s").to_string());
        assert_eq!(row["customers"], sizes.get(&key).copied().unwrap_or(0), "{key:?}");
        // The daily series, made from the transitions, ends where the state is.
        let daily = replay["sizes_over_time"]
            .as_array()
            .expect("sizes")
            .iter()
            .find(|x| x["day"] == last_day && x["group"] == key.0.as_str() && x["segment"] == key.1.as_str())
            .expect("last day row")["customers"]
            .clone();
        assert_eq!(daily, row["customers"], "{key:?}");
    }
    // Every day's sizes, replayed here from the transitions file.
    let transitions = read_json(&d.join("t.jsonl"));
    let days = replay["sizes_over_time"].as_array().expect("sizes");
    let first_day = parse_rfc3339_millis(replay["period"]["from"].as_str().expect("from")).expect("from") / DAY;
    let end = parse_rfc3339_millis(replay["period"]["to"].as_str().expect("to")).expect("to");
    let mut checked = 0;
    for row in days.iter().step_by(7) {
        let day = parse_rfc3339_millis(&format!("{}T00:00:00Z", row["day"].as_str().expect("day"))).expect("day") / DAY;
        assert!(day >= first_day);
        let cut = ((day + 1) * DAY).min(end + 1);
        let (g, seg) = (row["group"].as_str().expect("g"), row["segment"].as_str().expect("s"));
        let mut last: HashMap<&str, Option<&str>> = HashMap::new();
        for t in transitions.iter().filter(|t| t.group == g && at(t) < cut) {
            last.insert(&t.customer_id, t.to.as_deref());
        }
        let n = last.values().filter(|v| **v == Some(seg)).count() as u64;
        assert_eq!(row["customers"], n, "{} {g}/{seg}", row["day"]);
        checked += 1;
    }
    assert!(checked > 100);
    // Weekly inflow and outflow of at_risk, counted here by ISO week.
    for row in replay["weekly_flows"].as_array().expect("weekly").iter().filter(|w| w["segment"] == "at_risk") {
        let monday = parse_rfc3339_millis(&format!("{}T00:00:00Z", row["week"].as_str().expect("week"))).expect("week");
        let week =
            |t: &TransitionRecord| at(t) >= monday.max(first_day * DAY) && at(t) < monday + 7 * DAY && at(t) <= end;
        let into =
            transitions.iter().filter(|t| t.group == "rfm" && t.to.as_deref() == Some("at_risk") && week(t)).count();
        let out =
            transitions.iter().filter(|t| t.group == "rfm" && t.from.as_deref() == Some("at_risk") && week(t)).count();
        assert_eq!((row["inflow"].as_u64(), row["outflow"].as_u64()), (Some(into as u64), Some(out as u64)), "{row}");
    }
    // Cohen's d of health for champions, from the state dir's customers scored here.
    let scorer = segstream_engine::EngineSettings::spec_default().scorer();
    let clock: segstream_engine::Clock =
        serde_json::from_slice(&engine.meta("clock").expect("meta").expect("clock")).expect("clock json");
    let (mut inside, mut rest) = (Vec::new(), Vec::new());
    engine
        .store()
        .for_each_customer(|_, st| {
            let s = scorer.scores(st, clock.watermark.max(st.evaluated_at));
            let champion = scorer.groups()[0].segments[usize::from(st.labels[0])].as_ref() == "champions";
            if champion { &mut inside } else { &mut rest }.push(f64::from(s.health));
        })
        .expect("customers");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let var = |v: &[f64]| v.iter().map(|x| (x - mean(v)).powi(2)).sum::<f64>() / (v.len() as f64 - 1.0);
    let (n1, n2) = (inside.len() as f64, rest.len() as f64);
    let pooled = (((n1 - 1.0) * var(&inside) + (n2 - 1.0) * var(&rest)) / (n1 + n2 - 2.0)).sqrt();
    let d_row = replay["features"]
        .as_array()
        .expect("features")
        .iter()
        .find(|f| f["group"] == "rfm" && f["segment"] == "champions" && f["feature"] == "health")
        .expect("row")
        .clone();
    assert!(n1 > 5.0 && n2 > 5.0);
    assert!(
        (d_row["effect_size"].as_f64().expect("d") - (mean(&inside) - mean(&rest)) / pooled).abs() < 1e-9,
        "{d_row}"
    );
    close(&d_row["mean_in"], mean(&inside), "mean health of champions");
    // Flows add up to the transitions file.
    let flows: u64 =
        replay["flows"].as_array().expect("flows").iter().map(|f| f["transitions"].as_u64().expect("n")).sum();
    assert_eq!(flows, read_json(&d.join("t.jsonl")).len() as u64);
    // k-means ran on this many customers, with a k of 2..8.
    let k = replay["discovery"]["k"].as_u64().expect("a k");
    assert!((2..=8).contains(&k));
    assert_eq!(
        replay["discovery"]["clusters"]
            .as_array()
            .expect("clusters")
            .iter()
            .map(|c| c["customers"].as_u64().expect("n"))
            .sum::<u64>(),
        total
    );

    // The HTML page and the CSV tables, from the same data.
    ok(segstream(&["report", "--input", p(&input), "--output", p(&d.join("r.html"))]));
    let html = std::fs::read_to_string(d.join("r.html")).expect("html");
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg") && html.contains("Cohort retention"));
    for needle in ["http:", "https:", "src=", "@import", "url(", "<link", "<script"] {
        assert!(!html.contains(needle), "the page must open without network access, yet it has {needle:?}");
    }
    ok(segstream(&["report", "--input", p(&input), "--format", "csv", "--output", p(&d.join("csv"))]));
    let current = std::fs::read_to_string(d.join("csv/current_sizes.csv")).expect("csv");
    assert!(current.starts_with("group,segment,customers,share,mrr_cents,mrr_share\n"), "{current}");
    assert_eq!(current.lines().count(), 1 + replay["current_sizes"].as_array().expect("rows").len());
    for table in [
        "sizes_over_time",
        "flows",
        "weekly_flows",
        "cohort_retention",
        "validation",
        "predictive",
        "features",
        "breakdowns",
        "discovery_clusters",
    ] {
        assert!(d.join(format!("csv/{table}.csv")).exists(), "{table}.csv");
    }
}

#[test]
fn report_refuses_a_state_dir_of_other_rules_and_half_given_sources() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (input, _) = sample(d, "e.jsonl", 30, 40, 2, Format::Json, None);
    ok(segstream(&["run", "--input", p(&input), "--output", p(&d.join("t.jsonl")), "--state-dir", p(&d.join("s"))]));
    std::fs::write(d.join("other.toml"), "[scoring.recency]\nthresholds_days = [5, 14, 30, 60]\n").expect("config");
    let out = segstream(&[
        "report",
        "--input",
        p(&input),
        "--state-dir",
        p(&d.join("s")),
        "--transitions",
        p(&d.join("t.jsonl")),
        "--config",
        p(&d.join("other.toml")),
        "--output",
        p(&d.join("r.html")),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another scoring or segments configuration"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out =
        segstream(&["report", "--input", p(&input), "--state-dir", p(&d.join("s")), "--output", p(&d.join("r.html"))]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--transitions"), "{}", String::from_utf8_lossy(&out.stderr));
    // A transitions file of other rules names what it does not know.
    std::fs::write(
        d.join("alien.jsonl"),
        std::fs::read_to_string(d.join("t.jsonl")).expect("t").replace("\"rfm\"", "\"rfm2\""),
    )
    .expect("write");
    let out = segstream(&[
        "report",
        "--input",
        p(&input),
        "--transitions",
        p(&d.join("alien.jsonl")),
        "--output",
        p(&d.join("r.html")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("alien.jsonl:1") && err.contains("\"rfm2\"") && err.contains("--config"), "{err}");
    assert!(!d.join("r.html").exists(), "nothing written on error");
}

#[test]
fn simulate_finds_no_difference_between_equal_rules_and_exactly_the_moves_of_two_real_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (input, _) = sample(d, "e.jsonl", 300, 150, 5, Format::Json, None);
    std::fs::write(d.join("same.toml"), "").expect("config");
    ok(segstream(&[
        "simulate",
        "--input",
        p(&input),
        "--config",
        p(&d.join("same.toml")),
        "--format",
        "json",
        "--output",
        p(&d.join("same.json")),
    ]));
    let same = read_report(&d.join("same.json"));
    assert_eq!(same["period"]["customers_moved"], 0);
    assert!(same["moved"].as_array().expect("moved").is_empty());
    assert!(same["daily_transitions"].as_array().expect("daily").is_empty());
    for g in same["groups"].as_array().expect("groups") {
        assert_eq!((g["added"].as_u64(), g["removed"].as_u64()), (Some(0), Some(0)), "{g}");
        assert_eq!(g["transitions_baseline"], g["transitions_candidate"]);
    }
    assert!(same["sizes"].as_array().expect("sizes").iter().all(|s| s["difference"] == 0));

    // A stricter recency threshold: compare with two real runs diffed here.
    std::fs::write(d.join("new.toml"), "[scoring.recency]\nthresholds_days = [3, 14, 30, 60]\n").expect("config");
    ok(segstream(&[
        "simulate",
        "--input",
        p(&input),
        "--config",
        p(&d.join("new.toml")),
        "--format",
        "json",
        "--output",
        p(&d.join("new.json")),
    ]));
    let sim = read_report(&d.join("new.json"));
    ok(segstream(&[
        "run",
        "--input",
        p(&input),
        "--output",
        p(&d.join("base.jsonl")),
        "--state-dir",
        p(&d.join("sb")),
    ]));
    ok(segstream(&[
        "run",
        "--input",
        p(&input),
        "--output",
        p(&d.join("cand.jsonl")),
        "--state-dir",
        p(&d.join("sc")),
        "--config",
        p(&d.join("new.toml")),
    ]));
    let (base, cand) = (read_json(&d.join("base.jsonl")), read_json(&d.join("cand.jsonl")));
    let (lb, lc) = (final_labels(&base), final_labels(&cand));
    let mut moved: BTreeMap<(String, Option<String>, Option<String>), u64> = BTreeMap::new();
    let mut customers = HashSet::new();
    for key in lb.keys().chain(lc.keys()).collect::<HashSet<_>>() {
        let (b, c) = (lb.get(key).cloned(), lc.get(key).cloned());
        if b != c {
            *moved.entry((key.1.clone(), b, c)).or_default() += 1;
            customers.insert(key.0.clone());
        }
    }
    assert!(!customers.is_empty(), "a 3-day recency threshold moves someone");
    assert_eq!(sim["period"]["customers_moved"], customers.len() as u64);
    let reported: BTreeMap<(String, Option<String>, Option<String>), u64> = sim["moved"]
        .as_array()
        .expect("moved")
        .iter()
        .map(|m| {
            let s = |k: &str| m[k].as_str().map(str::to_string);
            ((s("group").expect("g"), s("baseline"), s("candidate")), m["customers"].as_u64().expect("n"))
        })
        .collect();
    assert_eq!(reported, moved);
    // Transitions added and removed: the multiset difference of the two files.
    let key =
        |t: &TransitionRecord| (t.customer_id.clone(), t.group.clone(), t.from.clone(), t.to.clone(), t.at.clone());
    let mut balance: HashMap<_, i64> = HashMap::new();
    for t in &base {
        *balance.entry(key(t)).or_default() -= 1;
    }
    for t in &cand {
        *balance.entry(key(t)).or_default() += 1;
    }
    let added: i64 = balance.values().filter(|v| **v > 0).sum();
    let removed: i64 = -balance.values().filter(|v| **v < 0).sum::<i64>();
    let groups = sim["groups"].as_array().expect("groups");
    assert_eq!(groups.iter().map(|g| g["added"].as_i64().expect("n")).sum::<i64>(), added);
    assert_eq!(groups.iter().map(|g| g["removed"].as_i64().expect("n")).sum::<i64>(), removed);
    assert!(added > 0 && removed > 0);
    // Examples come with their transitions under both rules, ending where the summary says.
    let examples = sim["examples"].as_array().expect("examples");
    assert!(!examples.is_empty());
    for e in examples {
        let last = |k: &str| e[k].as_array().and_then(|v| v.last()).map(|t| t["to"].clone()).unwrap_or(Value::Null);
        assert_eq!(last("baseline_transitions"), e["baseline"], "{e}");
        assert_eq!(last("candidate_transitions"), e["candidate"], "{e}");
    }
    // The page too.
    ok(segstream(&[
        "simulate",
        "--input",
        p(&input),
        "--config",
        p(&d.join("new.toml")),
        "--output",
        p(&d.join("sim.html")),
    ]));
    let html = std::fs::read_to_string(d.join("sim.html")).expect("html");
    assert!(html.contains("customers in another segment at the end") && html.contains("<svg"));
    assert!(!html.contains("http:") && !html.contains("https:"));
}

#[test]
fn a_report_as_of_mid_month_marks_it_partial_and_an_empty_period_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_lines(&d.join("events.jsonl"), &fixture());
    // A date alone on the command line is midnight UTC.
    ok(segstream(&[
        "report",
        "--input",
        p(&d.join("events.jsonl")),
        "--to",
        "2026-05-21",
        "--format",
        "json",
        "--output",
        p(&d.join("r.json")),
    ]));
    let r = read_report(&d.join("r.json"));
    assert_eq!(r["period"]["to"], "2026-05-21T00:00:00.000Z");
    for row in r["cohort_retention"].as_array().expect("cohorts") {
        let c = row["cohort"].as_str().expect("cohort");
        let month = c[5..7].parse::<i64>().expect("month") + row["months_since"].as_i64().expect("k");
        assert_eq!(row["partial"], month == 5, "{row}");
    }
    // b's activity every other day until day 150: after --to it is left out,
    // and the last size of a day is the state at --to.
    let last = r["sizes_over_time"].as_array().expect("sizes").last().expect("a row").clone();
    assert_eq!(last["day"], "2026-05-21");

    // Nothing up to --to, or nothing at all: said, and no file written.
    let out = segstream(&[
        "report",
        "--input",
        p(&d.join("events.jsonl")),
        "--to",
        "2020-01-01T00:00:00Z",
        "--output",
        p(&d.join("x.html")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no events") && err.contains("after it"), "{err}");
    std::fs::write(d.join("empty.jsonl"), "").expect("write");
    let out = segstream(&["report", "--input", p(&d.join("empty.jsonl")), "--output", p(&d.join("x.html"))]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no events"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.join("x.html").exists());
}

#[test]
fn with_lateness_the_report_ends_where_the_state_is_and_foreign_transitions_are_flagged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (input, _) = sample(d, "e.jsonl", 150, 90, 8, Format::Json, None);
    std::fs::write(d.join("late.toml"), "[time]\nallowed_lateness_ms = 172800000\n").expect("config");
    ok(segstream(&[
        "report",
        "--input",
        p(&input),
        "--config",
        p(&d.join("late.toml")),
        "--format",
        "json",
        "--output",
        p(&d.join("r.json")),
    ]));
    let r = read_report(&d.join("r.json"));
    assert_eq!(r["period"]["end_size_differences"], 0);
    let last_day = r["sizes_over_time"].as_array().expect("sizes").last().expect("row")["day"].clone();
    for c in r["current_sizes"].as_array().expect("current") {
        let daily = r["sizes_over_time"]
            .as_array()
            .expect("sizes")
            .iter()
            .find(|x| x["day"] == last_day && x["group"] == c["group"] && x["segment"] == c["segment"])
            .expect("row");
        assert_eq!(daily["customers"], c["customers"], "{c}");
    }
    // A state dir reported with the transitions of another run (other
    // thresholds, the same names): flagged, not silently mixed.
    ok(segstream(&["run", "--input", p(&input), "--output", p(&d.join("t.jsonl")), "--state-dir", p(&d.join("s"))]));
    std::fs::write(d.join("other.toml"), "[scoring.recency]\nthresholds_days = [3, 14, 30, 60]\n").expect("config");
    ok(segstream(&[
        "run",
        "--input",
        p(&input),
        "--output",
        p(&d.join("other.jsonl")),
        "--state-dir",
        p(&d.join("so")),
        "--config",
        p(&d.join("other.toml")),
    ]));
    let out = ok(segstream(&[
        "report",
        "--input",
        p(&input),
        "--state-dir",
        p(&d.join("s")),
        "--transitions",
        p(&d.join("other.jsonl")),
        "--format",
        "json",
        "--output",
        p(&d.join("mixed.json")),
    ]));
    assert!(read_report(&d.join("mixed.json"))["period"]["end_size_differences"].as_u64().expect("n") > 0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("disagree"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn simulate_with_a_new_group_moves_nobody_in_the_groups_both_have() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (input, _) = sample(d, "e.jsonl", 120, 90, 9, Format::Json, None);
    std::fs::write(
        d.join("new.toml"),
        "[[segments.custom]]\nname = \"expansion\"\ndefault = \"none\"\nrules = [{ segment = \"upsell\", when = \"health >= 70 and M <= 3\" }]\n",
    )
    .expect("config");
    ok(segstream(&[
        "simulate",
        "--input",
        p(&input),
        "--config",
        p(&d.join("new.toml")),
        "--format",
        "json",
        "--output",
        p(&d.join("s.json")),
    ]));
    let s = read_report(&d.join("s.json"));
    assert_eq!(s["period"]["customers_moved"], 0, "{}", s["period"]);
    let groups = s["groups"].as_array().expect("groups");
    let expansion = groups.iter().find(|g| g["group"] == "expansion").expect("the new group");
    assert_eq!((expansion["in_baseline"].as_bool(), expansion["in_candidate"].as_bool()), (Some(false), Some(true)));
    assert!(expansion["added"].as_u64().expect("n") > 0 && expansion["removed"] == 0);
    assert!(groups.iter().filter(|g| g["group"] != "expansion").all(|g| g["added"] == 0 && g["removed"] == 0));
}

#[test]
fn breakdowns_by_a_list_attribute_and_a_survey_answer_count_what_the_events_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (input, _) = sample(d, "e.jsonl", 150, 60, 12, Format::Json, None);
    ok(segstream(&["run", "--input", p(&input), "--output", p(&d.join("t.jsonl")), "--state-dir", p(&d.join("s"))]));
    ok(segstream(&[
        "report",
        "--input",
        p(&input),
        "--state-dir",
        p(&d.join("s")),
        "--transitions",
        p(&d.join("t.jsonl")),
        "--breakdown",
        "attr.integrations",
        "--breakdown",
        "survey.role",
        "--format",
        "json",
        "--output",
        p(&d.join("r.json")),
    ]));
    let r = read_report(&d.join("r.json"));
    // Independently: the latest attributes and answers per customer, from the
    // raw events in time order (an erasure forgets them), and each customer's
    // final `value` segment from the transitions.
    let mut events: Vec<Value> = std::fs::read_to_string(&input)
        .expect("input")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    events.sort_by_key(|e| e["ts"].as_i64());
    let mut integrations: HashMap<String, Vec<String>> = HashMap::new();
    let mut role: HashMap<String, String> = HashMap::new();
    for e in &events {
        let c = e["customer_id"].as_str().expect("c").to_string();
        match e["type"].as_str().expect("type") {
            "profile" => {
                if let Some(list) = e["attributes"]["integrations"].as_array() {
                    integrations.insert(c, list.iter().map(|v| v.as_str().expect("str").to_string()).collect());
                }
            }
            "survey" if e["question"] == "role" => {
                role.insert(c, e["answer"].as_str().expect("role").to_string());
            }
            "customer_deleted" => {
                integrations.remove(&c);
                role.remove(&c);
            }
            _ => {}
        }
    }
    let labels = final_labels(&read_json(&d.join("t.jsonl")));
    let mut want: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for ((c, g), seg) in labels.iter().filter(|((_, g), _)| g == "value") {
        let _ = g;
        let mut values = match integrations.get(c) {
            None => vec!["unknown".to_string()],
            Some(v) if v.is_empty() => vec!["(none)".to_string()],
            Some(v) => v.clone(),
        };
        values.sort();
        values.dedup();
        for v in values {
            *want.entry(("attr.integrations".into(), v, seg.clone())).or_default() += 1;
        }
        let answer = role.get(c).cloned().unwrap_or_else(|| "unknown".into());
        *want.entry(("survey.role".into(), answer, seg.clone())).or_default() += 1;
    }
    let got: BTreeMap<(String, String, String), u64> = r["breakdowns"]
        .as_array()
        .expect("breakdowns")
        .iter()
        .filter(|x| x["group"] == "value" && x["dimension"].as_str().is_some_and(|d| d.contains('.')))
        .map(|x| {
            let s = |k: &str| x[k].as_str().expect("str").to_string();
            ((s("dimension"), s("value"), s("segment")), x["customers"].as_u64().expect("n"))
        })
        .collect();
    assert!(want.keys().any(|k| k.1 == "slack") && want.keys().any(|k| k.0 == "survey.role" && k.1 != "unknown"));
    assert_eq!(got, want);
    // A name that is neither: refused before anything runs.
    let out = segstream(&["report", "--input", p(&input), "--breakdown", "crm", "--output", p(&d.join("x.html"))]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("attr.NAME"), "{}", String::from_utf8_lossy(&out.stderr));
}
