//! End-to-end harness of the analyses: a generated sample is run once
//! (`run_file`, as `segstream run`), then `segstream report` is timed on the
//! run's state dir and transitions (no engine run: what a team does after a
//! production run), as a replay (the report runs the engine itself), and
//! `segstream simulate` with a changed recency threshold.
//!
//! Run: `cargo bench -p segstream --bench e2e_report`
//! Sizes: SEGSTREAM_BENCH_CUSTOMERS (default 100000), SEGSTREAM_BENCH_DAYS
//! (default 365); SEGSTREAM_BENCH_DIR keeps the sample there between runs
//! (regenerated when missing); SEGSTREAM_BENCH_SKIP=replay,simulate skips those.

use std::path::PathBuf;
use std::time::Instant;

use segstream::analyze::{report, simulate, ReportArgs, SimulateArgs};
use segstream::{generate, run_file, Config, FileSettings, GenerateArgs};
use segstream_analysis::OutputFormat;
use segstream_decode::Format;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let customers = env_or("SEGSTREAM_BENCH_CUSTOMERS", 100_000);
    let days = env_or("SEGSTREAM_BENCH_DAYS", 365) as u32;
    let skip = std::env::var("SEGSTREAM_BENCH_SKIP").unwrap_or_default();
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = std::env::var("SEGSTREAM_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|_| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir).expect("bench dir");
    let input = dir.join(format!("events-{customers}-{days}.jsonl"));
    let (transitions, state) =
        (dir.join(format!("t-{customers}-{days}.jsonl")), dir.join(format!("s-{customers}-{days}")));
    if !input.exists() || !state.exists() {
        let _ = std::fs::remove_dir_all(&state);
        let _ = std::fs::remove_file(&transitions);
        let t = Instant::now();
        let stats = generate(
            &GenerateArgs {
                customers,
                days,
                start_ms: 1_767_225_600_000,
                seed: 1,
                format: Format::Json,
                invalid_every: None,
            },
            &input,
        )
        .expect("generate");
        println!(
            "generated {} events for {customers} customers over {days} days in {:.1}s",
            stats.events,
            t.elapsed().as_secs_f64()
        );
        let cfg = Config::default().engine_settings().expect("defaults");
        let t = Instant::now();
        let summary = run_file(&cfg, &FileSettings::new(&input, &transitions, &state)).expect("run");
        println!(
            "run: {} events, {} transitions in {:.1}s ({:.0} events/s)",
            summary.counts.events,
            summary.counts.transitions,
            t.elapsed().as_secs_f64(),
            summary.counts.events as f64 / t.elapsed().as_secs_f64()
        );
    }
    let mb = std::fs::metadata(&input).expect("input").len() as f64 / 1048576.0;
    println!("input: {} ({mb:.0} MiB)", input.display());

    let out = dir.join("report.html");
    let args = ReportArgs {
        input: input.clone(),
        input_format: None,
        config: None,
        state_dir: Some(state.clone()),
        transitions: Some(transitions.clone()),
        from: None,
        to: None,
        output: out.clone(),
        format: OutputFormat::Html,
        seed: 7,
        breakdown: Vec::new(),
    };
    let t = Instant::now();
    report(&args).expect("report");
    println!(
        "report on the state dir + transitions: {:.1}s, {:.0} KiB of HTML, peak RSS {:.0} MiB",
        t.elapsed().as_secs_f64(),
        std::fs::metadata(&out).expect("html").len() as f64 / 1024.0,
        peak_rss_mib()
    );
    if !skip.contains("replay") {
        let t = Instant::now();
        report(&ReportArgs { state_dir: None, transitions: None, ..args.clone() }).expect("report");
        println!(
            "report running the engine itself: {:.1}s, peak RSS {:.0} MiB",
            t.elapsed().as_secs_f64(),
            peak_rss_mib()
        );
    }
    if !skip.contains("simulate") {
        let candidate = dir.join("candidate.toml");
        std::fs::write(&candidate, "[scoring.recency]\nthresholds_days = [5, 14, 30, 60]\n").expect("config");
        let t = Instant::now();
        simulate(&SimulateArgs {
            input: input.clone(),
            input_format: None,
            config: candidate,
            baseline: None,
            from: None,
            to: None,
            output: dir.join("simulate.html"),
            format: OutputFormat::Html,
        })
        .expect("simulate");
        println!(
            "simulate (two engine runs side by side): {:.1}s, peak RSS {:.0} MiB",
            t.elapsed().as_secs_f64(),
            peak_rss_mib()
        );
    }
}
