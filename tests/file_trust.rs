//! File mode under mistakes: inputs in any order, files that already exist,
//! inputs that changed, state dirs copied with their files.

mod common;

use std::path::Path;

use common::*;
use segstream::{run_file, Config, FileFaults, FileSettings, InputOrder};
use segstream_decode::Format;

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).expect("read").lines().map(str::to_string).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write");
}

/// A deterministic shuffle (xorshift), so a failure can be replayed.
fn shuffled(lines: &[String], seed: u64) -> Vec<String> {
    let mut v = lines.to_vec();
    let mut x = seed.max(1);
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn customer(line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("customer_id").and_then(|c| c.as_str()).map(str::to_string))
        .unwrap_or_default()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

fn ts(line: &str) -> Option<i64> {
    segstream_decode::decode_json_line(line.as_bytes()).ok().map(|e| e.ts)
}

/// SPEC §2: one file in any order gives exactly the transitions of the same
/// events sorted by `ts`, ties in that file's order — an export grouped by
/// customer (as CRMs and warehouses write them), reversed, shuffled; sorted
/// in memory or through runs on disk; with a crash while the sorted copy is
/// processed. The reference is file mode on each file's events, stably
/// sorted beforehand, which reads it in one pass.
#[test]
fn any_order_of_one_file_gives_the_sorted_files_transitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "sorted.jsonl", 120, 90, 21, Format::Json, Some(101));
    let cfg = config_committing_every(250);
    let mut args = FileSettings::new(&input, dir.path().join("want.jsonl"), dir.path().join("s0"));
    args.until = Some(end);
    let first = run_file(&engine(&cfg), &args).expect("sorted input");
    assert_eq!(first.order, Some(InputOrder::InTime));
    let want = std::fs::read(&args.output).expect("output");
    let want_dead = first.counts.invalid;
    assert!(want_dead > 0 && !want.is_empty());

    let lines = lines_of(&input);
    let mut by_customer = lines.clone();
    by_customer.sort_by_key(|l| customer(l)); // stable: each customer's events stay in time order
    let mut reversed = lines.clone();
    reversed.reverse();
    let orders = [("grouped by customer", by_customer), ("reversed", reversed), ("shuffled", shuffled(&lines, 7))];
    let mut want_of = Vec::new();
    for (i, (_, order)) in orders.iter().enumerate() {
        let mut valid: Vec<(i64, String)> = order.iter().filter_map(|l| Some((ts(l)?, l.clone()))).collect();
        valid.sort_by_key(|(t, _)| *t); // stable: ties keep this file's order
        let path = dir.path().join(format!("sorted{i}.jsonl"));
        write_lines(&path, &valid.into_iter().map(|(_, l)| l).collect::<Vec<_>>());
        let mut args =
            FileSettings::new(&path, dir.path().join(format!("want{i}.jsonl")), dir.path().join(format!("w{i}")));
        args.until = Some(end);
        let s = run_file(&engine(&cfg), &args).expect("sorted input");
        assert_eq!(s.order, Some(InputOrder::InTime));
        want_of.push(std::fs::read(&args.output).expect("output"));
    }
    assert!(want_of[0] == want, "grouping by customer keeps each customer's order: the generated file's transitions");
    for (i, (name, order)) in orders.iter().enumerate() {
        let path = dir.path().join(format!("in{i}.jsonl"));
        write_lines(&path, order);
        for (budget, crash) in [(256 << 20, None), (8 << 10, None), (8 << 10, Some(777))] {
            let tag = format!("{name}, sort buffer {budget}, crash {crash:?}");
            let state = dir.path().join(format!("s{i}-{budget}-{}", crash.is_some()));
            let out = dir.path().join(format!("out{i}-{budget}-{}.jsonl", crash.is_some()));
            let mut args = FileSettings::new(&path, &out, &state);
            args.until = Some(end);
            args.sort_buffer = budget;
            if let Some(n) = crash {
                args.faults = FileFaults::crash_after(n);
                let s = run_file(&engine(&cfg), &args).expect("crashing run");
                assert!(s.stopped_early, "{tag}");
                args.faults = FileFaults::default();
            }
            let s = run_file(&engine(&cfg), &args).unwrap_or_else(|e| panic!("{tag}: {e:#}"));
            if crash.is_none() {
                match &s.order {
                    Some(InputOrder::Sorted { runs, events, .. }) => {
                        assert_eq!(*runs > 0, budget < 1 << 20, "{tag}: {:?}", s.order);
                        assert_eq!(*events, first.counts.events, "{tag}");
                    }
                    other => panic!("{tag}: {other:?}"),
                }
                assert!(s.render().contains("not in time order"), "{tag}: {}", s.render());
            }
            assert!(
                std::fs::read(&out).expect("output") == want_of[i],
                "{tag}: transitions differ from the sorted file's"
            );
            assert_eq!(s.totals.invalid, want_dead, "{tag}: every invalid record dead-lettered once");
            assert_eq!(lines_of(&args.dead_letter).len() as u64, want_dead, "{tag}");
            assert_eq!(s.totals.late, 0, "{tag}: nothing is late within one file");
            let left: Vec<_> = std::fs::read_dir(state.join("sort")).map(|d| d.count()).into_iter().collect();
            assert_eq!(left, vec![0], "{tag}: the sorted copy is removed once processed");
        }
    }
}

/// Only events count for the time order: records out of order that are not
/// events leave a file in time order; an event out of order is found at its
/// line.
#[test]
fn the_time_order_of_a_file_is_that_of_its_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let day = 86_400_000i64;
    let t0 = 1_767_225_600_000i64; // 2026-01-01
    let ev = |i: i64, ts: i64| format!(r#"{{"event_id":"e{i}","customer_id":"c{}","type":"login","ts":{ts}}}"#, i % 3);
    let mut lines: Vec<String> = (0..40).map(|i| ev(i, t0 + i * day)).collect();
    // Earlier than the events around them, and not events: no customer, a
    // wrong type elsewhere, an unknown type, an empty customer id.
    lines.insert(5, format!(r#"{{"event_id":"x1","type":"login","ts":{t0}}}"#));
    lines
        .insert(9, format!(r#"{{"event_id":"x2","customer_id":"c1","type":"session","ts":{t0},"duration_s":"long"}}"#));
    lines.insert(14, format!(r#"{{"event_id":"x3","customer_id":"c1","type":"teleport","ts":{t0}}}"#));
    lines.insert(20, r#"{"event_id":"x4","customer_id":"","type":"login","ts":"1970-01-02T00:00:00Z"}"#.to_string());
    let cfg = Config::default();
    let run = |name: &str, lines: &[String]| {
        let input = dir.path().join(format!("{name}.jsonl"));
        write_lines(&input, lines);
        let args = FileSettings::new(&input, dir.path().join(format!("{name}-out.jsonl")), dir.path().join(name));
        let s = run_file(&engine(&cfg), &args).expect("run");
        (s, std::fs::read(&args.output).expect("output"))
    };
    let (s, out) = run("in-order", &lines);
    assert_eq!(s.order, Some(InputOrder::InTime), "{}", s.render());
    assert_eq!(s.counts.invalid, 4, "{}", s.render());
    let events: Vec<String> = lines.iter().filter(|l| !l.contains("\"x")).cloned().collect();
    assert!(run("events-only", &events).1 == out, "the same transitions as the events alone");

    // One event a day early, at line 31: sorted, and named.
    let mut late = lines.clone();
    late[30] = ev(99, t0 + 22 * day);
    let (s, _) = run("one-early", &late);
    match &s.order {
        Some(InputOrder::Sorted { first_disorder, .. }) => {
            assert!(first_disorder.ends_with("one-early.jsonl:31"), "{first_disorder}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_existing_file_is_never_overwritten_or_mixed_by_mistake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, _) = sample(dir.path(), "e.jsonl", 10, 10, 1, Format::Json, Some(40));
    let output = dir.path().join("precious.jsonl");
    std::fs::write(&output, "last quarter's transitions\n").expect("write");
    let settings = engine(&Default::default());
    let mut args = FileSettings::new(&input, &output, dir.path().join("s"));
    let err = run_file(&settings, &args).expect_err("refused").to_string();
    assert!(err.contains("precious.jsonl") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read_to_string(&output).expect("read"), "last quarter's transitions\n", "left as it was");

    let mut same = args.clone();
    same.dead_letter = output.clone();
    let err = run_file(&settings, &same).expect_err("refused").to_string();
    assert!(err.contains("dead-letter file must not be the output"), "{err}");

    args.overwrite = true;
    run_file(&settings, &args).expect("replaced on request");
    assert!(!lines_of(&output).iter().any(|l| l.contains("last quarter")));

    args.overwrite = false;
    args.output_format = Format::Avro;
    let err = run_file(&settings, &args).expect_err("refused").to_string();
    assert!(err.contains("written as json") && err.contains("--output-format json"), "{err}");
}

#[test]
fn a_changed_input_is_refused_and_a_copied_state_dir_continues_where_it_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).expect("mkdir");
    let (input, end) = sample(&run_dir, "e.jsonl", 60, 40, 3, Format::Json, Some(57));
    assert!(std::fs::metadata(&input).expect("meta").len() > 200 << 10, "a change far from the opening");
    let settings = engine(&Default::default());
    let mut args = FileSettings::new(&input, run_dir.join("t.jsonl"), run_dir.join("state"));
    args.until = Some(end);
    let first = run_file(&settings, &args).expect("run");
    let output = std::fs::read(&args.output).expect("output");

    // The whole directory copied elsewhere (state, input, outputs): the same
    // command there adds nothing and overwrites nothing.
    let copy = dir.path().join("copy");
    copy_dir(&run_dir, &copy);
    let mut there = FileSettings::new(copy.join("e.jsonl"), copy.join("t.jsonl"), copy.join("state"));
    there.until = Some(end);
    let again = run_file(&settings, &there).expect("copied run");
    assert_eq!((again.records, again.counts.transitions), (0, 0), "nothing re-applied");
    assert_eq!(again.totals, first.totals);
    assert!(std::fs::read(&there.output).expect("output") == output, "the copied output is kept");

    // A correction deep inside the file (beyond the first 64 KiB).
    let mut lines = lines_of(&input);
    let at = lines.len() * 3 / 4;
    lines[at] = lines[at].replacen("\"event_id\":\"", "\"event_id\":\"fixed-", 1);
    write_lines(&input, &lines);
    let err = run_file(&settings, &args).expect_err("refused").to_string();
    assert!(err.contains("content changed") && err.contains("new --state-dir"), "{err}");
    assert!(std::fs::read(&args.output).expect("output") == output, "nothing written");

    // A file that only grew continues where it stopped.
    let original = lines_of(&copy.join("e.jsonl"));
    let mut grown = original.clone();
    grown.push(format!(r#"{{"event_id":"late-1","customer_id":"new-one","type":"login","ts":{end}}}"#));
    write_lines(&copy.join("e.jsonl"), &grown);
    let more = run_file(&settings, &there).expect("grown input");
    assert_eq!(more.records, 1, "only the appended record is read");
    assert_eq!(more.order, Some(InputOrder::InTime));
    assert!(lines_of(&there.output).iter().any(|l| l.contains("new-one")));
}

/// A typo a century ahead would move the clock for good (every later event
/// late, `--until` ignored, the state dir poisoned): it is dead-lettered as
/// implausible. Epoch seconds sent as milliseconds are accepted as SPEC says,
/// with a note in the summary, and refused when `time.earliest_event` is set.
#[test]
fn implausible_event_times_are_dead_lettered_and_epoch_seconds_are_pointed_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "e.jsonl", 20, 30, 5, Format::Json, None);
    let mut lines = lines_of(&input);
    let century = end + 100 * 365 * 86_400_000;
    lines.insert(10, format!(r#"{{"event_id":"typo","customer_id":"cus_typo","type":"login","ts":{century}}}"#));
    write_lines(&input, &lines);
    let mut args = FileSettings::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    args.until = Some(end + 86_400_000);
    let s = run_file(&engine(&Default::default()), &args).expect("run");
    assert_eq!(s.counts.invalid, 1);
    let dead = lines_of(&args.dead_letter);
    assert!(dead[0].contains("implausible_timestamp") && dead[0].contains("e.jsonl:11"), "{dead:?}");
    assert_eq!(s.order, Some(InputOrder::InTime), "the typo did not even make the file look out of order");
    let out = read_json(&args.output);
    let latest = out.iter().map(|r| r.at.clone()).max().expect("transitions");
    assert!(latest.as_str() <= segstream_decode::format_rfc3339_millis(end + 86_400_000).as_str(), "{latest}");
    assert!(s.render().contains("event times 2026-"), "{}", s.render());

    let secs = dir.path().join("seconds.jsonl");
    std::fs::write(&secs, "{\"event_id\":\"s1\",\"customer_id\":\"c\",\"type\":\"login\",\"ts\":1772359200}\n")
        .expect("write");
    let args = FileSettings::new(&secs, dir.path().join("s.jsonl"), dir.path().join("s2"));
    let s = run_file(&engine(&Default::default()), &args).expect("run");
    assert_eq!(s.counts.applied, 1, "SPEC: integer epoch milliseconds, whatever they are");
    assert!(s.render().contains("epoch seconds"), "{}", s.render());
    let mut strict = Config::default();
    strict.time.earliest_event = Some("2000-01-01T00:00:00Z".into());
    let args = FileSettings::new(&secs, dir.path().join("s3.jsonl"), dir.path().join("s3"));
    let s = run_file(&engine(&strict), &args).expect("run");
    assert_eq!((s.counts.applied, s.counts.invalid), (0, 1));
    assert!(lines_of(&args.dead_letter)[0].contains("epoch seconds"));
}
