//! Criterion benchmarks of the per-event hot path: decoding (JSON lines, Avro
//! wire format), pure scoring, and the engine on RocksDB-backed state with the
//! working set in memory, and a Kafka partition's restore from its changelog
//! (the broker left out). Run: `cargo bench -p segstream --bench micro`.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use segstream::{generate, GenerateArgs};
use segstream_decode::Format;
use segstream_decode::{
    decode_json_line, decode_wire, event_to_wire, json_line_ts, Event, StaticSchemas, EVENT_SCHEMA_JSON,
};
use segstream_engine::{Engine, EngineSettings};
use segstream_kafka::changelog::{customer_key, decode_entry, encode_customer, history_key};
use segstream_kafka::restore::{ChangelogTail, Restore};
use segstream_scoring::{CustomerState, Scorer};

// The binary's allocator (crates/segstream/src/main.rs): the figures are
// those of the code as it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const START: i64 = 1_767_225_600_000;

/// A realistic sample: 5 000 customers over 30 days, in event-time order.
fn sample() -> (Vec<String>, Vec<Event>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("e.jsonl");
    let args = GenerateArgs {
        customers: 5_000,
        days: 30,
        start_ms: START,
        seed: 1,
        format: Format::Json,
        invalid_every: None,
    };
    generate(&args, &path).expect("generate");
    let lines: Vec<String> = std::fs::read_to_string(&path).expect("read").lines().map(str::to_string).collect();
    let events = lines.iter().map(|l| decode_json_line(l.as_bytes()).expect("valid")).collect();
    (lines, events)
}

/// An engine with the default settings on a new state dir (kept alive by
/// the returned directory).
fn empty_engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), &EngineSettings::spec_default()).expect("open");
    (dir, engine)
}

fn benches(c: &mut Criterion) {
    let (lines, events) = sample();
    let n = events.len() as u64;

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(n));
    g.bench_function("json_line", |b| {
        b.iter(|| {
            for l in &lines {
                black_box(decode_json_line(l.as_bytes()).expect("valid"));
            }
        })
    });
    // The order check's pass over a file (ADR 005): each line's `ts` only.
    g.bench_function("json_line_ts", |b| {
        b.iter(|| {
            for l in &lines {
                black_box(json_line_ts(l.as_bytes()).expect("has a ts"));
            }
        })
    });
    let mut schemas = StaticSchemas::new();
    schemas.insert_json(7, EVENT_SCHEMA_JSON).expect("schema");
    let wire: Vec<Vec<u8>> = events.iter().map(|e| event_to_wire(e, 7)).collect();
    g.bench_function("avro_wire", |b| {
        b.iter(|| {
            for m in &wire {
                black_box(decode_wire(m, &schemas).expect("valid"));
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("score");
    g.throughput(Throughput::Elements(n));
    let scorer = Scorer::spec_default();
    g.bench_function("on_event_in_memory", |b| {
        b.iter_batched(
            HashMap::<String, Option<CustomerState>>::new,
            |mut states| {
                let mut out = Vec::new();
                for e in &events {
                    let st = states.entry(e.customer_id.clone()).or_default();
                    scorer.on_event(st, e, &mut out);
                    out.clear();
                }
                states
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.bench_function("decode_score_state_rocksdb", |b| {
        b.iter_batched(
            // Opening RocksDB is start-up cost, not per-event cost.
            empty_engine,
            |(dir, mut engine)| {
                let mut out = Vec::new();
                for (i, l) in lines.iter().enumerate() {
                    let e = decode_json_line(l.as_bytes()).expect("valid");
                    engine.on_event(&e, &mut out).expect("event");
                    out.clear();
                    if i % 100_000 == 99_999 {
                        engine.commit(Vec::new()).expect("commit");
                    }
                }
                engine.commit(Vec::new()).expect("commit");
                (dir, engine)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();

    // A partition's changelog as its commits wrote it (one record per changed
    // customer and per history entry, every 10 000 events), then restored
    // into an empty state dir as `partition/open.rs` does, broker left out.
    let changelog = {
        let (_dir, mut engine) = empty_engine();
        let mut out = Vec::new();
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            engine.on_event(e, &mut out).expect("event");
            out.clear();
            if i % 10_000 == 9_999 || i + 1 == events.len() {
                engine.for_each_history_change(|id, writes| {
                    for (seq, entry) in writes {
                        records.push((history_key(id, *seq), entry.as_ref().map(|e| e.encode())));
                    }
                });
                engine.for_each_dirty(|id, st| records.push((customer_key(id), Some(encode_customer(i as i64, st)))));
                engine.commit(Vec::new()).expect("commit");
            }
        }
        records
    };
    let mut g = c.benchmark_group("restore");
    g.throughput(Throughput::Elements(changelog.len() as u64));
    g.sample_size(10);
    g.bench_function("changelog_into_rocksdb", |b| {
        b.iter_batched(
            empty_engine,
            |(dir, mut engine)| {
                let mut tail = ChangelogTail::after(None);
                for (offset, (key, value)) in changelog.iter().enumerate() {
                    let entry = decode_entry(key, value.as_deref()).expect("valid");
                    match tail.apply(key, offset as i64, entry, None) {
                        Some(Restore::Customer(id, state)) => engine.restore_customer(&id, state).expect("customer"),
                        Some(Restore::History { id, seq, entry }) => {
                            engine.restore_history(&id, seq, entry).expect("history")
                        }
                        None => {}
                    }
                    if tail.records.is_multiple_of(100_000) {
                        engine.commit(Vec::new()).expect("commit");
                    }
                }
                engine.commit(Vec::new()).expect("commit");
                (dir, engine)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(micro, benches);
criterion_main!(micro);
