//! File mode end to end: formats, invalid records, splits, re-runs, --until.

mod common;

use std::collections::BTreeSet;

use common::*;
use proptest::prelude::*;
use segstream::{run_file, Config, InputFormat, RunArgs};
use segstream_decode::parse_rfc3339_millis;
use segstream_output::CauseRecord;

#[test]
fn avro_and_json_inputs_and_outputs_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (json_in, end) = sample(dir.path(), "e.jsonl", 150, 100, 11, InputFormat::Json, None);
    let (avro_in, _) = sample(dir.path(), "e.avro", 150, 100, 11, InputFormat::Avro, None);
    let cfg = Config::default();
    let mut a = RunArgs::new(&json_in, dir.path().join("a.jsonl"), dir.path().join("sa"));
    a.until = Some(end);
    let sa = run_file(&cfg, &a).expect("json run");
    let mut b = RunArgs::new(&avro_in, dir.path().join("b.avro"), dir.path().join("sb"));
    b.until = Some(end);
    let sb = run_file(&cfg, &b).expect("avro run");
    assert_eq!(sa.counts, sb.counts);
    let ja = read_json(&a.output);
    assert!(ja.len() > 500, "a realistic sample yields many transitions, got {}", ja.len());
    assert_eq!(ja, read_avro(&b.output));
}

#[test]
fn invalid_records_are_counted_located_and_dead_lettered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, _) = sample(dir.path(), "e.jsonl", 40, 30, 3, InputFormat::Json, Some(50));
    let args = RunArgs::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    let s = run_file(&Config::default(), &args).expect("run");
    assert!(s.counts.invalid >= 5, "{}", s.counts.invalid);
    assert_eq!(s.records, s.counts.events + s.counts.invalid);
    let dlq = std::fs::read_to_string(args.dead_letter_path()).expect("dead letters written");
    let lines: Vec<serde_json::Value> = dlq.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(lines.len() as u64, s.counts.invalid);
    let kinds: BTreeSet<&str> = lines.iter().map(|l| l["error_kind"].as_str().expect("kind")).collect();
    assert_eq!(kinds, BTreeSet::from(["bad_timestamp", "json", "missing_field", "out_of_range", "unknown_type"]));
    // Each location names the file and line, and that line holds the raw record.
    let text = std::fs::read_to_string(&input).expect("input");
    let input_lines: Vec<&str> = text.lines().collect();
    for l in &lines {
        let loc = l["location"].as_str().expect("location");
        let (file, line) = loc.rsplit_once(':').expect("file:line");
        assert_eq!(file, input.display().to_string());
        let n: usize = line.parse().expect("line number");
        assert_eq!(input_lines[n - 1], l["raw"].as_str().expect("raw"));
    }
    assert_eq!(s.invalid_samples.len(), 5);
    assert!(s.render().contains("invalid"));
}

#[test]
fn invalid_avro_records_are_dead_lettered_with_their_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, _) = sample(dir.path(), "e.avro", 20, 20, 4, InputFormat::Avro, Some(40));
    let args = RunArgs::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    let s = run_file(&Config::default(), &args).expect("run");
    assert!(s.counts.invalid >= 3, "{}", s.counts.invalid);
    let dlq = std::fs::read_to_string(args.dead_letter_path()).expect("dead letters written");
    for line in dlq.lines() {
        let l: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(l["error_kind"], "unknown_type");
        assert!(l["location"].as_str().expect("location").contains(".avro#record "));
        let raw: serde_json::Value = serde_json::from_str(l["raw"].as_str().expect("raw")).expect("raw is the record as json");
        assert_eq!(raw["type"], "signup");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// Any split of the input into consecutive files, run one after the other
    /// on one state dir, gives the transitions of the whole file.
    #[test]
    fn any_split_on_one_state_dir_equals_the_whole(
        seed in 0u64..1000,
        cuts in proptest::collection::vec(0.0f64..1.0, 1..4),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (input, end) = sample(dir.path(), "e.jsonl", 40, 60, seed, InputFormat::Json, None);
        let text = std::fs::read_to_string(&input).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let mut bounds: Vec<usize> = cuts.iter().map(|c| (c * lines.len() as f64) as usize).collect();
        bounds.push(0);
        bounds.push(lines.len());
        bounds.sort_unstable();
        let cfg = Config::default();

        let mut whole = RunArgs::new(&input, dir.path().join("whole.jsonl"), dir.path().join("s1"));
        whole.until = Some(end);
        run_file(&cfg, &whole).expect("whole");

        let mut pieces = Vec::new();
        for (i, w) in bounds.windows(2).enumerate() {
            let part = dir.path().join(format!("part{i}.jsonl"));
            std::fs::write(&part, lines[w[0]..w[1]].iter().map(|l| format!("{l}\n")).collect::<String>()).expect("write");
            let mut args = RunArgs::new(&part, dir.path().join(format!("out{i}.jsonl")), dir.path().join("s2"));
            if w[1] == lines.len() {
                args.until = Some(end);
            }
            run_file(&cfg, &args).expect("piece");
            pieces.extend(read_json(&args.output));
        }
        prop_assert!(pieces == read_json(&whole.output), "split run differs from the whole (bounds {:?})", bounds);
    }
}

#[test]
fn rerunning_a_finished_run_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "e.jsonl", 30, 40, 9, InputFormat::Json, Some(100));
    let mut args = RunArgs::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    args.until = Some(end);
    let cfg = Config::default();
    let first = run_file(&cfg, &args).expect("run");
    let bytes = std::fs::read(&args.output).expect("read");
    let dlq = std::fs::read(args.dead_letter_path()).expect("read");
    let again = run_file(&cfg, &args).expect("rerun");
    assert_eq!(again.records, 0);
    assert_eq!(again.counts.transitions, 0);
    assert_eq!(again.totals, first.totals);
    assert_eq!(std::fs::read(&args.output).expect("read"), bytes);
    assert_eq!(std::fs::read(args.dead_letter_path()).expect("read"), dlq);
}

#[test]
fn a_different_scoring_config_is_refused_on_the_same_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, _) = sample(dir.path(), "e.jsonl", 5, 5, 1, InputFormat::Json, None);
    let args = RunArgs::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    run_file(&Config::default(), &args).expect("run");
    let mut other = Config::default();
    other.segments.health.green_min = 80;
    let err = run_file(&other, &args).expect_err("must refuse").to_string();
    assert!(err.contains("different scoring or segments configuration"), "{err}");
}

#[test]
fn until_emits_time_driven_transitions_at_their_boundary_instants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("e.jsonl");
    let t0 = parse_rfc3339_millis("2026-03-01T10:00:00Z").expect("ts");
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n",
            r#"{"event_id":"1","customer_id":"quiet","type":"login","ts":"2026-03-01T10:00:00Z"}"#,
            r#"{"event_id":"2","customer_id":"busy","type":"login","ts":"2026-03-01T11:00:00.000Z"}"#
        ),
    )
    .expect("write");
    let mut args = RunArgs::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    args.until = Some(t0 + 61 * 86_400_000);
    run_file(&Config::default(), &args).expect("run");
    let quiet: Vec<_> = read_json(&args.output).into_iter().filter(|r| r.customer_id == "quiet" && r.group == "rfm").collect();
    let path: Vec<(Option<&str>, Option<&str>, &str)> =
        quiet.iter().map(|r| (r.from.as_deref(), r.to.as_deref(), r.at.as_str())).collect();
    // R drops at +7d, +14d, +30d and +60d after the login, to the millisecond.
    assert_eq!(
        path,
        vec![
            (None, Some("new_customers"), "2026-03-01T10:00:00.000Z"),
            (Some("new_customers"), Some("promising"), "2026-03-08T10:00:00.000Z"),
            (Some("promising"), Some("about_to_sleep"), "2026-03-15T10:00:00.000Z"),
            (Some("about_to_sleep"), Some("hibernating"), "2026-03-31T10:00:00.000Z"),
        ]
    );
    assert!(quiet[1..].iter().all(|r| r.cause == CauseRecord::Time { boundary: "recency".into() }));
}
