//! The command line as a user runs it: `demo`, `generate` then `run`, errors.

use std::process::Command;

fn segstream(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_segstream")).args(args).env("RUST_LOG", "warn").output().expect("run segstream")
}

#[test]
fn demo_prints_segment_sizes_and_explained_transitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("demo");
    let out = segstream(&["demo", "--dir", d.to_str().expect("utf-8"), "--customers", "150", "--days", "100"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for group in ["rfm", "health", "value", "engagement"] {
        assert!(stdout.contains(&format!("\n  {group}\n")), "no {group} table in:\n{stdout}");
    }
    assert!(stdout.contains("because time passed"), "{stdout}");
    assert!(stdout.contains("because event"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("records read") && stderr.contains("events/s"), "{stderr}");
    // A second demo replaces the first instead of resuming it.
    let again = segstream(&["demo", "--dir", d.to_str().expect("utf-8"), "--customers", "150", "--days", "100"]);
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);
    // The command the demo suggests gives the demo's transitions.
    let try_line = stdout.lines().find_map(|l| l.strip_prefix("Try: segstream ")).expect("a Try: line");
    let args: Vec<&str> = try_line.split_whitespace().collect();
    let tried = segstream(&args);
    assert!(tried.status.success(), "{}", String::from_utf8_lossy(&tried.stderr));
    let read = |name: &str| std::fs::read(d.join(name)).expect("transitions");
    assert!(read("again.jsonl") == read("transitions.jsonl"), "the suggested command gives the demo's transitions");
}

#[test]
fn generate_then_run_with_avro_in_and_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_string();
    let gen = segstream(&["generate", "--output", &p("e.avro"), "--customers", "40", "--days", "30", "--seed", "3"]);
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    let run = segstream(&[
        "run",
        "--input",
        &p("e.avro"),
        "--output",
        &p("t.avro"),
        "--state-dir",
        &p("s"),
        "--until",
        "2026-03-01T00:00:00Z",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("customers 40"), "{stderr}");
    assert!(stderr.contains("rfm:"), "{stderr}");
    let f = std::fs::File::open(p("t.avro")).expect("output");
    let n = apache_avro::Reader::new(f).expect("avro").count();
    assert!(n > 100, "{n} transitions");
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.jsonl");
    let out = segstream(&[
        "run",
        "--input",
        missing.to_str().expect("utf-8"),
        "--output",
        "o.jsonl",
        "--state-dir",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope.jsonl"), "{stderr}");

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[segments.health]\ngreen_min = 30\nyellow_min = 40\n").expect("write");
    let out = segstream(&[
        "demo",
        "--dir",
        dir.path().join("d").to_str().expect("utf-8"),
        "--config",
        cfg.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("yellow_min must be <= green_min"));

    let out = segstream(&["run", "--input", "a", "--output", "b", "--state-dir", "c", "--until", "yesterday"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--until"));
}

#[test]
fn kafka_mode_errors_name_what_is_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Neither file mode nor a [kafka] section.
    let out = segstream(&["run"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[kafka] section"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A broker nobody listens on: the topic check fails with the broker named, not a hang.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        "[kafka]\nmetrics_addr = \"\"\n[kafka.properties]\n\"socket.connection.setup.timeout.ms\" = \"1000\"\n",
    )
    .expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args(["run", "--config", cfg.to_str().expect("utf-8"), "--brokers", &format!("127.0.0.1:{port}")])
        .args(["--input-topic", "my-events"])
        .env("RUST_LOG", "off")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("my-events"), "the overridden topic is named: {err}");
    // Avro output without a schema id or registry is refused before connecting.
    std::fs::write(&cfg, "[kafka]\noutput_format = \"avro\"\nmetrics_addr = \"\"\n").expect("config");
    let out = segstream(&["run", "--config", cfg.to_str().expect("utf-8")]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("output_schema_id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn messages_say_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_string();
    // A file of nothing but invalid records fails, naming the file and format.
    std::fs::write(p("bad.jsonl"), "not json\n{\"type\":\"login\"}\n").expect("write");
    let out = segstream(&["run", "--input", &p("bad.jsonl"), "--output", &p("o.jsonl"), "--state-dir", &p("s")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("every record read (2) was invalid") && err.contains("bad.jsonl"), "{err}");
    // A date alone is not a time: the expected forms are named.
    let out = segstream(&["run", "--input", "a", "--output", "b", "--state-dir", "c", "--until", "2026-03-01"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2026-03-01T10:00:00Z") && err.contains("a date alone"), "{err}");
    // `--until now` is accepted.
    std::fs::write(
        p("one.jsonl"),
        "{\"event_id\":\"e\",\"customer_id\":\"c\",\"type\":\"login\",\"ts\":\"2026-01-01T00:00:00Z\"}\n",
    )
    .expect("write");
    let out = segstream(&[
        "run",
        "--input",
        &p("one.jsonl"),
        "--output",
        &p("n.jsonl"),
        "--state-dir",
        &p("n"),
        "--until",
        "now",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A rule that can never hold is refused at load, with its column.
    std::fs::write(p("rules.toml"), "[[segments.custom]]\nname = \"x\"\ndefault = \"no\"\nrules = [{ segment = \"yes\", when = \"health == 'high'\" }]\n")
        .expect("write");
    let out = segstream(&["demo", "--dir", &p("d"), "--config", &p("rules.toml")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`health` is a number") && err.contains("column 1"), "{err}");
}
