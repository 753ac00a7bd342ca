//! End-to-end file-mode harness: generate a large sample, run it through
//! `run_file` exactly as `segstream run` does (decode, score, RocksDB state,
//! commits, transition output), and report throughput, memory, restart and
//! state size; several sizes give the linear-cost table.
//!
//! Run: `cargo bench -p segstream --bench e2e_file`
//! Sizes: SEGSTREAM_BENCH_CUSTOMERS, one count or a comma list run in turn
//! (default 100000; e.g. `10000,100000,1000000` for the linear-cost table:
//! peak RSS is reset between sizes, but memory the allocator kept from a
//! smaller size counts in the next, so give them in ascending order or run
//! one per process for the exact RSS), SEGSTREAM_BENCH_DAYS (default 14);
//! SEGSTREAM_BENCH_HISTORY: transitions kept per customer (`history.per_customer`,
//! default 50; 0 turns the query API's history off);
//! SEGSTREAM_BENCH_CACHE_CUSTOMERS: `state.cache_customers` (default 500000),
//! the customers kept in memory between commits, which bounds peak RSS.

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

/// Starts the peak RSS (`VmHWM`) again from the current RSS.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
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

/// One size's figures.
struct Row {
    customers: u64,
    events: u64,
    secs: f64,
    cpu: f64,
    rss_mib: f64,
    open_secs: f64,
    first_event_secs: f64,
    state_bytes: Vec<(&'static str, u64)>,
    state_customers: u64,
}

impl Row {
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.secs
    }
    fn cpu_per_million(&self) -> f64 {
        self.cpu / (self.events as f64 / 1e6)
    }
    fn bytes_per_customer(&self) -> f64 {
        self.state_bytes.iter().map(|(_, b)| *b).sum::<u64>() as f64 / self.state_customers.max(1) as f64
    }
}

fn run_size(customers: u64, days: u32, history: u32, cache_customers: usize) -> Row {
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

    // The generated file's dirty pages are written back now, not by the
    // kernel during the run (that took CPU and I/O beside the engine).
    std::fs::File::open(&input).and_then(|f| f.sync_all()).expect("sync input");

    let mut config = Config::default();
    config.history.per_customer = history;
    config.state.cache_customers = cache_customers;
    let cfg = config.engine_settings().expect("default settings");
    let state = dir.path().join("state");
    let mut args = FileSettings::new(&input, dir.path().join("transitions.jsonl"), &state);
    args.until = Some(stats.end_ms);
    reset_peak_rss();
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let summary = run_file(&cfg, &args).expect("run");
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let rss_mib = peak_rss_mib();
    println!(
        "run: {} events in {secs:.2}s = {:.0} events/s wall, {:.2} CPU-s per million events; {} transitions; peak RSS {rss_mib:.0} MiB",
        summary.counts.events,
        summary.counts.events as f64 / secs,
        cpu / (summary.counts.events as f64 / 1e6),
        summary.counts.transitions,
    );

    // Restart: opening the state dir, then the first event applied (a
    // customer of the sample, so that its state is read from RocksDB).
    let t = Instant::now();
    let mut engine = Engine::open(&state, &cfg).expect("reopen");
    let open_secs = t.elapsed().as_secs_f64();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(std::fs::File::open(&input).expect("input")), &mut line)
        .expect("the first line");
    let first = segstream_decode::decode_json_line(line.trim_end().as_bytes()).expect("a valid event");
    let t = Instant::now();
    let mut out = Vec::new();
    let first = segstream_decode::Event { event_id: format!("{}-again", first.event_id), ts: stats.end_ms, ..first };
    engine.on_event(&first, &mut out).expect("first event");
    let first_event_secs = t.elapsed().as_secs_f64();
    println!(
        "restart with {} customers of state: open {open_secs:.3}s, then the first event {first_event_secs:.3}s ({} \
         transitions: the time from the last event to --until had already been passed)",
        engine.counters().customers,
        out.len()
    );
    engine.store().compact();
    let state_bytes = engine.store().live_sst_bytes_per_cf();
    let row = Row {
        customers,
        events: summary.counts.events,
        secs,
        cpu,
        rss_mib,
        open_secs,
        first_event_secs,
        state_bytes,
        state_customers: engine.counters().customers,
    };
    let per_cf: Vec<String> = row
        .state_bytes
        .iter()
        .map(|(cf, b)| format!("{cf} {:.1}", *b as f64 / row.state_customers.max(1) as f64))
        .collect();
    println!(
        "state after compaction: {:.1} bytes/customer for {} customers ({})",
        row.bytes_per_customer(),
        row.state_customers,
        per_cf.join(", ")
    );
    row
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sizes: Vec<u64> = std::env::var("SEGSTREAM_BENCH_CUSTOMERS")
        .unwrap_or_else(|_| "100000".into())
        .split(',')
        .map(|v| v.trim().parse().expect("SEGSTREAM_BENCH_CUSTOMERS: customer counts, comma-separated"))
        .collect();
    let days = env_or("SEGSTREAM_BENCH_DAYS", 14) as u32;
    let history = env_or("SEGSTREAM_BENCH_HISTORY", 50) as u32;
    let cache = env_or("SEGSTREAM_BENCH_CACHE_CUSTOMERS", Config::default().state.cache_customers as u64) as usize;
    println!("history.per_customer = {history}, state.cache_customers = {cache}, {days} days");
    let rows: Vec<Row> = sizes.iter().map(|&n| run_size(n, days, history, cache)).collect();
    println!();
    println!("| customers | events | events/s wall | CPU-s per million events | peak RSS MiB | restart: open + first event s | state bytes/customer |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.0} | {:.3} + {:.3} | {:.1} |",
            r.customers,
            r.events,
            r.events_per_sec(),
            r.cpu_per_million(),
            r.rss_mib,
            r.open_secs,
            r.first_event_secs,
            r.bytes_per_customer()
        );
    }
}
