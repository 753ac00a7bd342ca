//! The query API (`segstream serve`) over a real state dir, through HTTP:
//! every answer compared with what the transitions file and the input imply,
//! computed independently here; errors; and a reader next to a running `run`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use segstream_decode::{format_rfc3339_millis, parse_rfc3339_millis, Format, DAY_MS};
use serde_json::Value;

/// Per (customer, group): (segment entered, instant), in order.
type Transitions = BTreeMap<(String, String), Vec<(Option<String>, i64)>>;

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(state: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args(["serve", "--addr", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start serve");
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("stderr")).read_line(&mut line).expect("first line");
    let addr = line.split("http://").nth(1).and_then(|r| r.split('/').next()).unwrap_or_else(|| panic!("{line}"));
    Server(child, addr.to_string())
}

/// GET `path`: the status and the JSON body.
fn get(server: &Server, path: &str) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(&server.1).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", server.1).expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let status = text[9..12].parse().expect("status");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {text}")))
}

fn run(input: &Path, dir: &Path, until: Option<&str>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segstream"));
    cmd.args(["run", "--input"]).arg(input).arg("--output").arg(dir.join("out.jsonl"));
    cmd.arg("--state-dir").arg(dir.join("state"));
    if let Some(u) = until {
        cmd.args(["--until", u]);
    }
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// What the transitions file says, computed here: per (customer, group),
/// the transitions in order.
fn transitions(dir: &Path) -> Transitions {
    let mut by: Transitions = BTreeMap::new();
    for line in std::fs::read_to_string(dir.join("out.jsonl")).expect("output").lines() {
        let t: Value = serde_json::from_str(line).expect("json");
        let at = parse_rfc3339_millis(t["at"].as_str().expect("at")).expect("at");
        let key = (t["customer_id"].as_str().expect("id").to_string(), t["group"].as_str().expect("group").to_string());
        by.entry(key).or_default().push((t["to"].as_str().map(str::to_string), at));
    }
    by
}

/// Each customer's segment per group at instant `t` (after every
/// transition at or before it); customers not existing then are left out.
fn segments_at(ts: &Transitions, t: i64) -> BTreeMap<(String, String), String> {
    ts.iter()
        .filter_map(|(k, v)| {
            v.iter().rev().find(|(_, at)| *at <= t).and_then(|(to, _)| to.clone()).map(|s| (k.clone(), s))
        })
        .collect()
}

/// MRR per existing customer, from the input (SPEC: the latest
/// subscription event's, 0 when canceled; gone when deleted).
fn mrr(input: &Path) -> BTreeMap<String, i64> {
    let mut m: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for line in std::fs::read_to_string(input).expect("input").lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else { continue };
        let (Some(id), Some(ts)) = (e["customer_id"].as_str(), e["ts"].as_i64()) else { continue };
        match e["type"].as_str() {
            Some("customer_deleted") => {
                m.remove(id);
            }
            Some("subscription") => {
                let v = if e["status"] == "canceled" { 0 } else { e["mrr_cents"].as_i64().expect("mrr") };
                let entry = m.entry(id.to_string()).or_insert((i64::MIN, 0));
                if ts >= entry.0 {
                    *entry = (ts, v);
                }
            }
            _ => {
                m.entry(id.to_string()).or_insert((i64::MIN, 0));
            }
        }
    }
    m.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

fn sizes(
    now: &BTreeMap<(String, String), String>,
    mrr: &BTreeMap<String, i64>,
) -> BTreeMap<(String, String), (i64, i64)> {
    let mut s: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for ((c, g), seg) in now {
        let e = s.entry((g.clone(), seg.clone())).or_default();
        e.0 += 1;
        e.1 += mrr.get(c).copied().unwrap_or(0);
    }
    s
}

fn api_sizes(v: &Value) -> BTreeMap<(String, String), (i64, i64)> {
    let mut s = BTreeMap::new();
    for g in v["groups"].as_array().expect("groups") {
        for seg in g["segments"].as_array().expect("segments") {
            let n = seg["customers"].as_i64().expect("customers");
            if n > 0 {
                let key =
                    (g["group"].as_str().expect("g").to_string(), seg["segment"].as_str().expect("s").to_string());
                s.insert(key, (n, seg["mrr_cents"].as_i64().expect("mrr")));
            }
        }
    }
    s
}

#[test]
fn the_api_answers_what_the_transitions_and_the_input_imply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "events.jsonl", 150, 60, 11, Format::Json, None);
    run(&input, dir.path(), None);
    let server = serve(&dir.path().join("state"));
    let ts = transitions(dir.path());
    let mrr = mrr(&input);
    let now = segments_at(&ts, i64::MAX);

    // Sizes and MRR per segment.
    let (status, v) = get(&server, "/v1/segments");
    assert_eq!(status, 200, "{v}");
    assert_eq!(api_sizes(&v), sizes(&now, &mrr), "segment sizes and MRR");

    // Members, paged 7 at a time.
    let at_risk: BTreeSet<String> =
        now.iter().filter(|((_, g), s)| g == "rfm" && *s == "at_risk").map(|((c, _), _)| c.clone()).collect();
    assert!(!at_risk.is_empty(), "the sample has customers at risk");
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let (status, v) = get(&server, &format!("/v1/segments/rfm/at_risk/customers?limit=7{after}"));
        assert_eq!(status, 200, "{v}");
        paged.extend(v["customers"].as_array().expect("customers").iter().map(|c| c.as_str().expect("id").to_string()));
        match v["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    assert_eq!(paged.iter().cloned().collect::<BTreeSet<_>>(), at_risk);
    assert_eq!(paged.len(), at_risk.len(), "no customer twice");

    // Customers: segments now and at earlier instants, and the history.
    let customers: BTreeSet<&String> = now.keys().map(|(c, _)| c).collect();
    for c in customers.iter().step_by(15) {
        let (status, v) = get(&server, &format!("/v1/customers/{c}"));
        assert_eq!(status, 200, "{v}");
        for ((cc, g), seg) in &now {
            if cc == *c {
                assert_eq!(v["segments"][g]["segment"], seg.as_str(), "{c} {g}");
                let since = ts[&(cc.clone(), g.clone())].last().expect("a transition").1;
                assert_eq!(v["segments"][g]["since"], format_rfc3339_millis(since).as_str(), "{c} {g} since");
            }
        }
        assert_eq!(v["facts"]["mrr_cents"], mrr[*c], "{c} mrr");
        let mine: usize = ts.iter().filter(|((cc, _), _)| cc == *c).map(|(_, v)| v.len()).sum();
        assert_eq!(v["history"].as_array().expect("history").len(), mine.min(50), "{c}: every transition (≤ 50)");
        for day in [10, 30, 45] {
            let t = START + day * DAY_MS + 12 * 3_600_000;
            let then = segments_at(&ts, t);
            let (status, v) = get(&server, &format!("/v1/customers/{c}?at={t}"));
            assert_eq!(status, 200, "{v}");
            for g in ["rfm", "health", "value", "engagement"] {
                let want = then.get(&((*c).clone(), g.to_string())).map(String::as_str);
                assert_eq!(v["segments"][g]["segment"].as_str(), want, "{c} {g} at day {day}");
            }
        }
    }

    // Daily sizes: the segments at the end of each day.
    check_days(&server, &ts, "health", "2026-01-20", "2026-02-10", 22);

    // Errors: a stable code, the parameter named.
    let (status, v) = get(&server, "/v1/customers/nobody");
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_customer")));
    let (status, v) = get(&server, "/v1/segments/rfm/at_risk/customers?limit=lots");
    assert_eq!((status, v["error"]["parameter"].as_str()), (400, Some("limit")));
    let (status, v) = get(&server, "/v1/segments/rfm/nowhere/customers");
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_segment")));
    let (status, v) = get(&server, "/v1/segments/colour/history");
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("unknown_group")));
    let (status, v) = get(&server, "/v1/customers/x?when=now");
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("unknown_parameter")));
    let (status, v) = get(&server, "/v1/openapi.json");
    assert_eq!((status, v["openapi"].as_str()), (200, Some("3.0.3")));

    // Next to a running `run`: time moves on 60 days, customers go quiet;
    // the server (already open) answers with the new state.
    let later = format_rfc3339_millis(end + 60 * DAY_MS);
    run(&input, dir.path(), Some(&later));
    std::thread::sleep(std::time::Duration::from_millis(600));
    let ts = transitions(dir.path());
    let now_later = segments_at(&ts, i64::MAX);
    assert_ne!(now_later, now, "time moved customers");
    let (_, v) = get(&server, "/v1/segments");
    assert_eq!(api_sizes(&v), sizes(&now_later, &mrr), "sizes after the second run");
    // Days after the input: only time moved them.
    let from = &format_rfc3339_millis(end + DAY_MS)[..10];
    let to = &format_rfc3339_millis(end + 50 * DAY_MS)[..10];
    check_days(&server, &ts, "rfm", from, to, 50);
}

/// `/v1/segments/{group}/history` from `from` to `to` (dates) has `n` days,
/// each with the sizes the transitions imply at the day's end.
fn check_days(server: &Server, ts: &Transitions, group: &str, from: &str, to: &str, n: usize) {
    let (status, v) = get(server, &format!("/v1/segments/{group}/history?from={from}&to={to}"));
    assert_eq!(status, 200, "{v}");
    let days = v["days"].as_array().expect("days");
    assert_eq!(days.len(), n, "{v}");
    for d in days {
        let day = parse_rfc3339_millis(&format!("{}T00:00:00Z", d["day"].as_str().expect("day"))).expect("day");
        let then = segments_at(ts, day + DAY_MS - 1);
        for (seg, count) in d["customers"].as_object().expect("customers") {
            let want = then.iter().filter(|((_, g), s)| g == group && *s == seg).count();
            assert_eq!(count.as_u64(), Some(want as u64), "{group} {} {seg}", d["day"]);
        }
    }
}
