//! Exact resume: whatever the commit interval and wherever the process stops
//! (an in-process crash point, or `kill -9` of the real binary), re-running
//! the same command completes to the output of one uninterrupted run, byte
//! for byte — transitions and dead letters alike.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use segstream::{run_file, Config, FileFaults, FileSettings};
use segstream_decode::Format;

fn uninterrupted(cfg: &Config, input: &Path, out: &Path, state: &Path, until: i64) -> (Vec<u8>, Vec<u8>) {
    let mut args = FileSettings::new(input, out, state);
    args.until = Some(until);
    run_file(&engine(cfg), &args).expect("uninterrupted run");
    let dlq = std::fs::read(&args.dead_letter).unwrap_or_default();
    (std::fs::read(out).expect("output"), dlq)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn any_commit_interval_and_crash_points_give_the_same_bytes(
        seed in 0u64..1000,
        commit_every in 1u64..300,
        // Small caches commit when a quarter of them is changed, between
        // the record-count commits (25 customers in the sample).
        cache in 1usize..80,
        crashes in proptest::collection::vec(1u64..2_000, 1..4),
        avro in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (input, end) = sample(dir.path(), "e.jsonl", 25, 50, seed, Format::Json, Some(97));
        let mut cfg = config_committing_every(commit_every);
        cfg.state.cache_customers = cache;
        let ext = if avro { "avro" } else { "jsonl" };
        let whole_out = dir.path().join(format!("whole.{ext}"));
        let (want, want_dlq) = uninterrupted(&cfg, &input, &whole_out, &dir.path().join("s1"), end);

        let out = dir.path().join(format!("crashy.{ext}"));
        let mut args = FileSettings::new(&input, &out, dir.path().join("s2"));
        args.until = Some(end);
        args.output_format = if avro { Format::Avro } else { Format::Json };
        for n in crashes {
            args.faults = FileFaults::crash_after(n);
            run_file(&engine(&cfg), &args).expect("crashing run");
        }
        args.faults = FileFaults::default();
        run_file(&engine(&cfg), &args).expect("final run");
        let got = std::fs::read(&out).expect("output");
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
        prop_assert!(got == want, "output differs: {} vs {} bytes, first difference at {:?}", got.len(), want.len(), first_diff);
        prop_assert!(std::fs::read(&args.dead_letter).unwrap_or_default() == want_dlq, "dead letters differ");
    }
}

/// Runs the real binary and kills it with SIGKILL once its output has grown
/// past `after_bytes`; returns whether it was still running when killed.
fn run_and_kill(args: &[String], output: &Path, after_bytes: u64) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn segstream");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "segstream failed: {status}");
            return false;
        }
        let len = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
        if len > after_bytes || Instant::now() > deadline {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn kill_9_at_any_moment_then_rerun_gives_the_uninterrupted_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (input, end) = sample(dir.path(), "e.jsonl", 600, 120, 42, Format::Json, Some(1_000));
    let config = dir.path().join("segstream.toml");
    std::fs::write(&config, "[state]\ncommit_every_records = 700\n").expect("config");
    let cfg = config_committing_every(700);
    let (want, want_dlq) = uninterrupted(&cfg, &input, &dir.path().join("whole.jsonl"), &dir.path().join("s1"), end);

    let out = dir.path().join("killed.jsonl");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let args: Vec<String> = vec![
        "run".into(),
        "--input".into(),
        path(&input),
        "--output".into(),
        path(&out),
        "--state-dir".into(),
        path(&dir.path().join("s2")),
        "--config".into(),
        path(&config),
        "--until".into(),
        end.to_string(),
    ];
    let mut kills = 0;
    for fraction in [8, 4, 2] {
        if run_and_kill(&args, &out, want.len() as u64 / fraction) {
            kills += 1;
        }
    }
    assert!(kills >= 1, "the run was never caught mid-way");
    let status =
        Command::new(env!("CARGO_BIN_EXE_segstream")).args(&args).stderr(Stdio::null()).status().expect("rerun");
    assert!(status.success());
    let got = std::fs::read(&out).expect("output");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "resumed output differs from the uninterrupted one");
    assert_eq!(std::fs::read(dir.path().join("killed.jsonl.dead-letter.jsonl")).expect("dlq"), want_dlq);
}
