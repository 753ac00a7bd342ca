//! `segstream webhook` against a local HTTP receiver that fails, times out,
//! refuses and accepts: every chosen transition is delivered at least once,
//! repeats carry the same `Idempotency-Key`, signatures verify, a refused
//! one goes to the dead-letter file, and a `kill -9` in the middle loses
//! nothing.

mod common;
#[path = "support/receiver.rs"]
mod receiver;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use receiver::{receiver, verify};
use segstream::{run_file, FileSettings};
use segstream_decode::Format;
use segstream_engine::EngineSettings;

#[test]
fn chosen_transitions_are_delivered_at_least_once_signed_and_across_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "events.jsonl", 150, 120, 3, Format::Json, None);
    let out = dir.path().join("transitions.jsonl");
    let mut args = FileSettings::new(&input, &out, dir.path().join("state"));
    args.until = Some(end);
    run_file(&EngineSettings::spec_default(), &args).expect("file mode");
    let lines: Vec<String> = std::fs::read_to_string(&out).expect("output").lines().map(str::to_string).collect();
    let chosen: Vec<&String> = lines
        .iter()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            v["group"] == "rfm" && (v["to"] == "at_risk" || v["to"] == "champions")
        })
        .collect();
    assert!(chosen.len() >= 20, "enough chosen transitions: {}", chosen.len());
    let key_of = |l: &str| {
        serde_json::from_str::<serde_json::Value>(l).expect("json")["transition_id"].as_str().expect("id").to_string()
    };
    // The last one: refused in the second run only (a refusal before the
    // kill could be repeated, like any delivery of the last second).
    let refused = key_of(chosen[chosen.len() - 1]);

    let (url, seen) = receiver(refused.clone());
    let config = dir.path().join("webhook.toml");
    std::fs::write(
        &config,
        format!(
            "[webhook]\nurl = \"{url}\"\ngroups = [\"rfm\"]\nto = [\"at_risk\", \"champions\"]\n\
             timeout_ms = 300\nbackoff_ms = 20\nmax_backoff_ms = 100\n"
        ),
    )
    .expect("config");
    let secret = "whsec_test_secret";
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_segstream"))
            .args(["webhook", "--once", "--config"])
            .arg(&config)
            .arg("--input")
            .arg(&out)
            .arg("--state-dir")
            .arg(dir.path().join("hook"))
            .env("SEGSTREAM_WEBHOOK_SECRET", secret)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start segstream webhook")
    };
    // A first run, killed (-9) halfway through.
    let mut first = run();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().expect("seen").iter().filter(|s| s.status == 200).count() < chosen.len() / 2 {
        assert!(Instant::now() < deadline, "deliveries stalled: {:?}", seen.lock().expect("seen").len());
        std::thread::sleep(Duration::from_millis(10));
    }
    first.kill().expect("kill -9");
    let _ = first.wait();
    // The second run finishes the file.
    let second = run().wait_with_output().expect("second run");
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{said}");
    assert!(said.contains("1 refused"), "{said}");

    let seen = seen.lock().expect("seen").clone();
    let accepted: BTreeSet<&str> = seen.iter().filter(|s| s.status == 200).map(|s| s.key.as_str()).collect();
    let wanted: BTreeSet<String> = chosen.iter().map(|l| key_of(l)).filter(|k| *k != refused).collect();
    let missing: Vec<&String> = wanted.iter().filter(|k| !accepted.contains(k.as_str())).collect();
    assert!(missing.is_empty(), "chosen transitions never accepted: {missing:?}");
    let posted: BTreeSet<&str> = seen.iter().map(|s| s.key.as_str()).collect();
    assert!(posted.iter().all(|k| wanted.contains(*k) || *k == refused), "only chosen transitions are posted");
    // Every attempt of a transition carries the same body under its key, signed.
    let mut bodies: BTreeMap<&str, &str> = BTreeMap::new();
    for s in &seen {
        assert_eq!(*bodies.entry(&s.key).or_insert(&s.body), s.body.as_str(), "same body for key {}", s.key);
        assert_eq!(key_of(&s.body), s.key, "the key is the transition id");
        assert!(verify(secret, s.signature.as_deref().unwrap_or(""), &s.body), "signature of {}", s.key);
        assert!(!verify("another secret", s.signature.as_deref().unwrap_or(""), &s.body));
    }
    let failures = seen.iter().filter(|s| s.status >= 500).count();
    assert!(failures >= chosen.len() / 4, "the receiver failed some first attempts: {failures}");
    // The refused one is dead-lettered with the answer, once.
    let dead =
        std::fs::read_to_string(dir.path().join("hook").join("webhook-dead-letter.jsonl")).expect("dead letters");
    let dead: Vec<serde_json::Value> = dead.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["status"], 400);
    assert_eq!(dead[0]["answer"], "unknown account");
    assert_eq!(dead[0]["transition"]["transition_id"], refused.as_str());
    // Repeats after the kill are the window of at-least-once: at most the
    // deliveries of the last second before it.
    let repeats = seen.iter().filter(|s| s.status == 200).count() - accepted.len();
    eprintln!("{} chosen, {} requests, {repeats} accepted twice (after the kill)", chosen.len(), seen.len());
    assert!(repeats < chosen.len() / 3, "the second run resumed near where the first was killed: {repeats} repeats");
}

/// A stop (SIGTERM) while a delivery is being retried leaves the position
/// before that transition: the next run delivers it.
#[test]
fn a_stop_while_retrying_keeps_the_transition_for_the_next_run() {
    use segstream::webhook::{deliver_all, FileSource, WebhookConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("transitions.jsonl");
    let line = |id: &str, to: &str| {
        format!(
            r#"{{"customer_id":"c","group":"rfm","from":null,"to":"{to}","at":"2026-01-01T00:00:00.000Z","transition_id":"{id}"}}"#
        )
    };
    std::fs::write(&out, [line("t1", "champions"), line("t2", "at_risk"), line("t3", "at_risk")].join("\n") + "\n")
        .expect("write");
    let state = dir.path().join("hook");
    let dead = state.join("webhook-dead-letter.jsonl");
    // Nothing listens: every attempt fails; the stop comes during a backoff.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let cfg = WebhookConfig {
        url: format!("http://127.0.0.1:{closed}/hooks/segstream"),
        to: vec!["at_risk".into()],
        backoff_ms: 50,
        max_backoff_ms: 50,
        ..WebhookConfig::default()
    };
    let stop = segstream_kafka::StopFlag::new();
    let stopper = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        stopper.set();
    });
    let mut source = FileSource::open(&out, &state, true).expect("source");
    let s = deliver_all(&cfg, None, &mut source, &dead, &stop).expect("first run");
    assert_eq!((s.delivered, s.skipped), (0, 1), "{s:?}");
    // The next run, with a receiver that accepts: t2 then t3.
    let (url, seen) = receiver(String::new());
    let cfg = WebhookConfig { url, backoff_ms: 1, ..cfg };
    let mut source = FileSource::open(&out, &state, true).expect("source");
    let s = deliver_all(&cfg, None, &mut source, &dead, &segstream_kafka::StopFlag::new()).expect("second run");
    let accepted: Vec<String> =
        seen.lock().expect("seen").iter().filter(|s| s.status == 200).map(|s| s.key.clone()).collect();
    assert_eq!(accepted.iter().filter(|k| *k == "t2").count(), 1, "t2 delivered by the second run: {accepted:?} {s:?}");
    assert!(accepted.contains(&"t3".to_string()));
    assert!(!accepted.contains(&"t1".to_string()), "not chosen");
}

/// Following a file that went quiet, the position is saved once caught up:
/// a crash then (kill -9) repeats nothing.
#[test]
fn a_caught_up_follower_saves_its_position_while_the_file_is_quiet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("transitions.jsonl");
    let line = |id: &str| {
        format!(
            r#"{{"customer_id":"c","group":"rfm","from":null,"to":"at_risk","at":"2026-01-01T00:00:00.000Z","transition_id":"{id}"}}"#
        )
    };
    std::fs::write(&out, [line("t1"), line("t2")].join("\n") + "\n").expect("write");
    let (url, seen) = receiver(String::new());
    let config = dir.path().join("webhook.toml");
    std::fs::write(&config, format!("[webhook]\nurl = \"{url}\"\n")).expect("config");
    let state = dir.path().join("hook");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_segstream"))
            .args(["webhook", "--config"])
            .arg(&config)
            .arg("--input")
            .arg(&out)
            .arg("--state-dir")
            .arg(&state)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start segstream webhook")
    };
    let mut first = run();
    let deadline = Instant::now() + Duration::from_secs(30);
    let accepted = || -> Vec<String> {
        seen.lock().expect("seen").iter().filter(|s| s.status == 200).map(|s| s.key.clone()).collect()
    };
    while accepted().len() < 2 {
        assert!(Instant::now() < deadline, "not delivered");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Well under the once-a-second save of a busy run, well over one idle poll.
    std::thread::sleep(Duration::from_millis(600));
    first.kill().expect("kill -9");
    let _ = first.wait();
    let mut second = run();
    std::thread::sleep(Duration::from_millis(1500));
    second.kill().expect("kill -9");
    let _ = second.wait();
    // (The receiver fails t2's first attempt: a retry, not a repeat.)
    assert_eq!(accepted(), ["t1", "t2"], "nothing accepted twice after a crash while caught up");
}
