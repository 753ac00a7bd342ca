//! File mode end to end: formats, invalid records, splits, re-runs, --until.

mod common;

use std::collections::BTreeSet;

use common::*;
use proptest::prelude::*;
use segstream::{run_file, Config, FileFaults, FileSettings};
use segstream_decode::parse_rfc3339_millis;
use segstream_decode::Format;
use segstream_engine::EngineSettings;
use segstream_output::CauseRecord;

#[test]
fn avro_and_json_inputs_and_outputs_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (json_in, end) = sample(dir.path(), "e.jsonl", 150, 100, 11, Format::Json, None);
    let (avro_in, _) = sample(dir.path(), "e.avro", 150, 100, 11, Format::Avro, None);
    let cfg = Config::default();
    let mut a = FileSettings::new(&json_in, dir.path().join("a.jsonl"), dir.path().join("sa"));
    a.until = Some(end);
    let sa = run_file(&engine(&cfg), &a).expect("json run");
    let mut b = FileSettings::new(&avro_in, dir.path().join("b.avro"), dir.path().join("sb"));
    b.until = Some(end);
    let sb = run_file(&engine(&cfg), &b).expect("avro run");
    assert_eq!(sa.counts, sb.counts);
    let ja = read_json(&a.output);
    assert!(ja.len() > 500, "a realistic sample yields many transitions, got {}", ja.len());
    assert_eq!(ja, read_avro(&b.output));
}

#[test]
fn invalid_records_are_counted_located_and_dead_lettered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, _) = sample(dir.path(), "e.jsonl", 40, 30, 3, Format::Json, Some(50));
    let args = FileSettings::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    let s = run_file(&EngineSettings::spec_default(), &args).expect("run");
    assert!(s.counts.invalid >= 5, "{}", s.counts.invalid);
    assert_eq!(s.records, s.counts.events + s.counts.invalid);
    let dlq = std::fs::read_to_string(&args.dead_letter).expect("dead letters written");
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
    let (input, _) = sample(dir.path(), "e.avro", 20, 20, 4, Format::Avro, Some(40));
    let args = FileSettings::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    let s = run_file(&EngineSettings::spec_default(), &args).expect("run");
    assert!(s.counts.invalid >= 3, "{}", s.counts.invalid);
    let dlq = std::fs::read_to_string(&args.dead_letter).expect("dead letters written");
    for line in dlq.lines() {
        let l: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(l["error_kind"], "unknown_type");
        assert!(l["location"].as_str().expect("location").contains(".avro#record "));
        let raw: serde_json::Value =
            serde_json::from_str(l["raw"].as_str().expect("raw")).expect("raw is the record as json");
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
        let (input, end) = sample(dir.path(), "e.jsonl", 40, 60, seed, Format::Json, None);
        let text = std::fs::read_to_string(&input).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let mut bounds: Vec<usize> = cuts.iter().map(|c| (c * lines.len() as f64) as usize).collect();
        bounds.push(0);
        bounds.push(lines.len());
        bounds.sort_unstable();
        let cfg = Config::default();

        let mut whole = FileSettings::new(&input, dir.path().join("whole.jsonl"), dir.path().join("s1"));
        whole.until = Some(end);
        run_file(&engine(&cfg), &whole).expect("whole");

        let mut pieces = Vec::new();
        for (i, w) in bounds.windows(2).enumerate() {
            let part = dir.path().join(format!("part{i}.jsonl"));
            std::fs::write(&part, lines[w[0]..w[1]].iter().map(|l| format!("{l}\n")).collect::<String>()).expect("write");
            let mut args = FileSettings::new(&part, dir.path().join(format!("out{i}.jsonl")), dir.path().join("s2"));
            if w[1] == lines.len() {
                args.until = Some(end);
            }
            run_file(&engine(&cfg), &args).expect("piece");
            pieces.extend(read_json(&args.output));
        }
        prop_assert!(pieces == read_json(&whole.output), "split run differs from the whole (bounds {:?})", bounds);
    }
}

#[test]
fn rerunning_a_finished_run_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "e.jsonl", 30, 40, 9, Format::Json, Some(100));
    let mut args = FileSettings::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    args.until = Some(end);
    let cfg = Config::default();
    let first = run_file(&engine(&cfg), &args).expect("run");
    let bytes = std::fs::read(&args.output).expect("read");
    let dlq = std::fs::read(&args.dead_letter).expect("read");
    let again = run_file(&engine(&cfg), &args).expect("rerun");
    assert_eq!(again.records, 0);
    assert!(again.render().contains("nothing new"), "{}", again.render());
    assert_eq!(again.counts.transitions, 0);
    assert_eq!(again.totals, first.totals);
    assert_eq!(std::fs::read(&args.output).expect("read"), bytes);
    assert_eq!(std::fs::read(&args.dead_letter).expect("read"), dlq);
}

#[test]
fn a_different_scoring_config_is_refused_on_the_same_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, _) = sample(dir.path(), "e.jsonl", 5, 5, 1, Format::Json, None);
    let args = FileSettings::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    run_file(&EngineSettings::spec_default(), &args).expect("run");
    let mut other = Config::default();
    other.segments.health.green_min = 80;
    let err = run_file(&engine(&other), &args).expect_err("must refuse").to_string();
    assert!(err.contains("other scoring or segment rules"), "{err}");
    assert!(err.contains("changed: segments.health.green_min") && err.contains("--migrate-rules"), "{err}");
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
    let mut args = FileSettings::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    args.until = Some(t0 + 61 * 86_400_000);
    run_file(&EngineSettings::spec_default(), &args).expect("run");
    let quiet: Vec<_> =
        read_json(&args.output).into_iter().filter(|r| r.customer_id == "quiet" && r.group == "rfm").collect();
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

/// One random input line: mostly valid events of a few customers over ~150
/// days, in any order, with duplicates, deletions and some broken lines.
fn line_strategy() -> impl Strategy<Value = String> {
    let customer = prop::sample::select(vec!["a", "b", "c", "d"]);
    let ts = 1_767_225_600_000i64..1_767_225_600_000 + 150 * 86_400_000;
    let id = 0u32..60; // small: ids repeat, so duplicates happen
    let kind = prop_oneof![
        4 => Just(r#""type":"login""#.to_string()),
        2 => prop::sample::select(vec!["api", "sso", "reports", "alerts", "exports", "sharing"])
            .prop_map(|f| format!(r#""type":"feature_used","feature":"{f}""#)),
        1 => (0i64..400_000, prop::sample::select(vec!["trialing", "active", "past_due", "canceled"]))
            .prop_map(|(m, s)| format!(r#""type":"subscription","plan":"p","mrr_cents":{m},"status":"{s}""#)),
        1 => prop::sample::select(vec!["succeeded", "failed", "refunded"])
            .prop_map(|s| format!(r#""type":"payment","amount_cents":100,"status":"{s}""#)),
        1 => (0u8..4, prop::sample::select(vec!["opened", "closed"]), prop::sample::select(vec!["low", "normal", "high", "urgent"]))
            .prop_map(|(t, a, p)| format!(r#""type":"ticket","ticket_id":"t{t}","action":"{a}","priority":"{p}""#)),
        1 => (0u8..=10).prop_map(|s| format!(r#""type":"nps","score":{s}"#)),
        1 => Just(r#""type":"customer_deleted""#.to_string()),
    ];
    prop_oneof![
        20 => (customer, ts, id, kind).prop_map(|(c, t, i, k)| format!(r#"{{"event_id":"e{i}","customer_id":"{c}","ts":{t},{k}}}"#)),
        1 => Just(r#"{"event_id":"x","customer_id":"a","type":"nps","ts":5,"score":99}"#.to_string()),
        1 => Just("{not json".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the order, duplicates and broken lines: the run completes,
    /// every record is accounted for, each customer's transitions form one
    /// chain per group with non-decreasing instants within each life, and a
    /// run that crashes part-way and resumes writes the same bytes.
    #[test]
    fn disordered_input_keeps_every_invariant(lines in proptest::collection::vec(line_strategy(), 1..300), crash in 1u64..300) {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("e.jsonl");
        std::fs::write(&input, lines.join("\n")).expect("write");
        let cfg = config_committing_every(17);
        let mut args = FileSettings::new(&input, dir.path().join("t.jsonl"), dir.path().join("s1"));
        args.until = Some(1_767_225_600_000 + 400 * 86_400_000);
        let s = run_file(&engine(&cfg), &args).expect("run");
        prop_assert_eq!(s.records, lines.len() as u64);
        prop_assert_eq!(s.records, s.counts.events + s.counts.invalid);
        prop_assert_eq!(s.counts.events, s.counts.applied + s.counts.duplicate + s.counts.deleted_unknown);

        let out = read_json(&args.output);
        let mut last: std::collections::HashMap<(String, String), (Option<String>, String)> = Default::default();
        let mut last_at: std::collections::HashMap<String, i64> = Default::default();
        for r in &out {
            let at = segstream_decode::parse_rfc3339_millis(&r.at).expect("at");
            // Within one life of the customer: a customer re-created after an
            // erasure starts afresh, at its first event's ts (ADR 003).
            let prev_at = last_at.insert(r.customer_id.clone(), at);
            let new_life = r.from.is_none();
            prop_assert!(new_life || prev_at.is_none_or(|p| p <= at), "time went back for {}", r.customer_id);
            let key = (r.customer_id.clone(), r.group.clone());
            let prev_to = last.get(&key).and_then(|(to, _)| to.clone());
            prop_assert_eq!(&r.from, &prev_to, "broken chain for {:?}", key);
            prop_assert!(r.from != r.to);
            last.insert(key, (r.to.clone(), r.at.clone()));
        }

        let mut crashy = FileSettings::new(&input, dir.path().join("c.jsonl"), dir.path().join("s2"));
        crashy.until = args.until;
        crashy.faults = FileFaults::crash_after(crash);
        run_file(&engine(&cfg), &crashy).expect("crashing run");
        crashy.faults = FileFaults::default();
        run_file(&engine(&cfg), &crashy).expect("resumed run");
        prop_assert!(std::fs::read(&crashy.output).expect("read") == std::fs::read(&args.output).expect("read"));
    }
}

/// `run --metrics-addr` in file mode: the figures a long replay is watched
/// by (events, records, bytes read, watermark, transitions by flow, dead
/// letters by kind) end equal to the run's own counts.
#[test]
fn file_mode_metrics_follow_the_run() {
    use segstream::http::Exposition;
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "e.jsonl", 60, 60, 5, Format::Json, Some(70));
    let mut args = FileSettings::new(&input, dir.path().join("t.jsonl"), dir.path().join("s"));
    args.until = Some(end);
    let metrics = std::sync::Arc::new(segstream::file::FileMetrics::default());
    args.metrics = Some(metrics.clone());
    let s = run_file(&EngineSettings::spec_default(), &args).expect("run");
    let text = metrics.encode();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().expect("value").parse::<f64>().expect("number"))
            .sum()
    };
    assert_eq!(value("segstream_input_events_total ") as u64, s.counts.events, "{text}");
    assert_eq!(value("segstream_file_records_total ") as u64, s.records);
    assert_eq!(value("segstream_input_dead_letters_total{") as u64, s.counts.invalid);
    let lines = std::fs::read_to_string(&args.output).expect("output").lines().count();
    assert_eq!(value("segstream_output_transitions_total{") as usize, lines);
    let size = std::fs::metadata(&input).expect("input").len() as f64;
    assert_eq!(value("segstream_file_read_bytes "), size);
    assert_eq!(value("segstream_file_size_bytes "), size);
    assert_eq!(value("segstream_time_watermark_seconds ") as i64, end / 1000);
    assert!(text.contains("process_resident_memory_bytes ") && text.trim_end().ends_with("# EOF"));
}
