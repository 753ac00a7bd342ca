//! End-to-end file-mode harness: generate a large sample, run it through
//! `run_file` exactly as `segstream run` does (decode, score, RocksDB state,
//! commits, transition output), and report throughput, memory and state size.
//!
//! Run: `cargo bench -p segstream --bench e2e_file`
//! Sizes: SEGSTREAM_BENCH_CUSTOMERS (default 100000), SEGSTREAM_BENCH_DAYS (default 14);
//! SEGSTREAM_BENCH_HISTORY: transitions kept per customer (`history.per_customer`, default 50).

use std::time::Instant;

use segstream::{generate, run_file, Config, FileSettings, GenerateArgs};
use segstream_decode::Format;
use segstream_engine::Engine;

// The allocator the binary ships with (see crates/segstream/src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100/s on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let customers = env_or("SEGSTREAM_BENCH_CUSTOMERS", 100_000);
    let days = env_or("SEGSTREAM_BENCH_DAYS", 14) as u32;
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.jsonl");
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
    let input_bytes = std::fs::metadata(&input).expect("input").len();
    println!(
        "generated {} events for {customers} customers over {days} days ({:.0} MiB) in {:.1}s",
        stats.events,
        input_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );

    let mut config = Config::default();
    config.history.per_customer = env_or("SEGSTREAM_BENCH_HISTORY", 50) as u32;
    let cfg = config.engine_settings().expect("default settings");
    println!("history.per_customer = {}", config.history.per_customer);
    let state = dir.path().join("state");
    let mut args = FileSettings::new(&input, dir.path().join("transitions.jsonl"), &state);
    args.until = Some(stats.end_ms);
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let summary = run_file(&cfg, &args).expect("run");
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "run: {} events in {secs:.2}s = {:.0} events/s wall, {:.2} CPU-s per million events; {} transitions; peak RSS {:.0} MiB",
        summary.counts.events,
        summary.counts.events as f64 / secs,
        cpu / (summary.counts.events as f64 / 1e6),
        summary.counts.transitions,
        peak_rss_mib()
    );

    // Restart: opening the state dir, then the first event applied (a
    // customer of the sample, so that its state is read from RocksDB).
    let t = Instant::now();
    let mut engine = Engine::open(&state, &cfg).expect("reopen");
    let opened = t.elapsed().as_secs_f64();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(std::fs::File::open(&input).expect("input")), &mut line)
        .expect("the first line");
    let first = segstream_decode::decode_json_line(line.trim_end().as_bytes()).expect("a valid event");
    let t = Instant::now();
    let mut out = Vec::new();
    let first = segstream_decode::Event { event_id: format!("{}-again", first.event_id), ts: stats.end_ms, ..first };
    engine.on_event(&first, &mut out).expect("first event");
    println!(
        "restart with {} customers of state: open {opened:.3}s, then the first event {:.3}s ({} transitions: the time \
         from the last event to --until had already been passed)",
        engine.counters().customers,
        t.elapsed().as_secs_f64(),
        out.len()
    );
    engine.store().compact();
    let bytes = engine.store().live_sst_bytes();
    let n = engine.counters().customers.max(1);
    println!("state after compaction: {bytes} bytes for {n} customers = {:.1} bytes/customer", bytes as f64 / n as f64);
}
