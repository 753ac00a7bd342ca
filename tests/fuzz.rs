//! Hostile bytes against every decoder: arbitrary bytes, and valid records
//! with bytes flipped, cut or spliced. Each decoder must answer with a
//! value or an error — never panic, never allocate without bound.
//!
//! A stable harness (no nightly toolchain for cargo-fuzz here): each
//! property runs `PROPTEST_CASES` cases, 512 by default so that the test
//! suite stays quick; run it long on demand, e.g.
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz`.

use proptest::prelude::*;
use segstream_decode::{
    decode_json_line, decode_wire, event_to_avro_value, event_to_wire, AvroFileReader, StaticSchemas,
};
use segstream_kafka::changelog::{customer_key, decode_entry, encode_customer};
use segstream_scoring::CustomerState;

const EVENTS: &[&str] = &[
    r#"{"event_id":"e1","customer_id":"c1","type":"login","ts":"2026-03-01T10:00:00Z","user_id":"u1"}"#,
    r#"{"event_id":"e2","customer_id":"c1","type":"subscription","ts":1772359200000,"plan":"business","mrr_cents":99000,"status":"active"}"#,
    r#"{"event_id":"e3","customer_id":"c1","type":"ticket","ts":1772359200001,"ticket_id":"t","action":"opened","priority":"urgent"}"#,
    r#"{"event_id":"e4","customer_id":"c1","type":"profile","ts":1772359200002,"industry":"fintech","employees":40,"country":"DE"}"#,
    r#"{"event_id":"e5","customer_id":"c1","type":"nps","ts":1772359200003,"score":9}"#,
];

/// A valid byte string changed by `edits`: (position, byte) overwrites,
/// then a cut at `cut` (per mille of the length) when below 1000.
fn mutate(valid: &[u8], edits: &[(usize, u8)], cut: u16) -> Vec<u8> {
    let mut v = valid.to_vec();
    for &(at, b) in edits {
        if !v.is_empty() {
            let i = at % v.len();
            v[i] = b;
        }
    }
    if cut < 1000 {
        v.truncate(v.len() * usize::from(cut) / 1000);
    }
    v
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8)
}

fn schemas() -> StaticSchemas {
    let mut s = StaticSchemas::new();
    s.insert_json(1, segstream_decode::EVENT_SCHEMA_JSON).expect("the shipped schema");
    s
}

fn avro_file() -> Vec<u8> {
    let mut w = apache_avro::Writer::new(segstream_decode::event_schema(), Vec::new());
    for line in EVENTS {
        let e = decode_json_line(line.as_bytes()).expect("valid");
        w.append(event_to_avro_value(&e)).expect("append");
    }
    w.into_inner().expect("flush")
}

fn state_bytes() -> Vec<u8> {
    let scorer = segstream_scoring::Scorer::spec_default();
    let mut st = None;
    let mut out = Vec::new();
    for line in EVENTS {
        scorer.on_event(&mut st, &decode_json_line(line.as_bytes()).expect("valid"), &mut out);
    }
    let st: CustomerState = st.expect("a customer");
    encode_customer(41, Some(&st))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512), ..ProptestConfig::default() })]

    #[test]
    fn json_lines(bytes in proptest::collection::vec(any::<u8>(), 0..400), pick in 0..EVENTS.len(), e in edits(), cut in 0u16..1500) {
        let _ = decode_json_line(&bytes);
        let _ = decode_json_line(&mutate(EVENTS[pick].as_bytes(), &e, cut));
    }

    #[test]
    fn wire_format(bytes in proptest::collection::vec(any::<u8>(), 0..400), pick in 0..EVENTS.len(), e in edits(), cut in 0u16..1500) {
        let schemas = schemas();
        let _ = decode_wire(&bytes, &schemas);
        let valid = event_to_wire(&decode_json_line(EVENTS[pick].as_bytes()).expect("valid"), 1);
        let _ = decode_wire(&mutate(&valid, &e, cut), &schemas);
    }

    #[test]
    fn avro_container_files(bytes in proptest::collection::vec(any::<u8>(), 0..600), e in edits(), cut in 0u16..1500) {
        for input in [bytes, mutate(&avro_file(), &e, cut)] {
            if let Ok(reader) = AvroFileReader::new(input.as_slice()) {
                // Bounded: an unreadable record ends the file.
                for (i, _) in reader.enumerate() {
                    prop_assert!(i < 10_000);
                }
            }
        }
    }

    #[test]
    fn changelog_records(key in proptest::collection::vec(any::<u8>(), 0..40), value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)), e in edits(), cut in 0u16..1500) {
        let _ = decode_entry(&key, value.as_deref());
        let _ = decode_entry(&customer_key("c1"), Some(&mutate(&state_bytes(), &e, cut)));
        let _ = decode_entry(b"m", Some(&mutate(br#"{"seq":1,"input_offsets":{},"records":0}"#, &e, cut)));
    }

    #[test]
    fn configuration_files(text in "\\PC{0,300}", e in edits(), cut in 0u16..1500) {
        let _ = segstream::Config::from_toml(&text);
        let default = include_str!("../config/default.toml");
        if let Ok(t) = String::from_utf8(mutate(default.as_bytes(), &e, cut)) {
            if let Ok(cfg) = segstream::Config::from_toml(&t) {
                let _ = cfg.engine_settings();
            }
        }
    }
}

/// A forged container block length must not make the reader allocate it.
#[test]
fn a_forged_block_length_is_refused_not_allocated() {
    let file = avro_file();
    // After the header (ends with the 16-byte sync marker), a block starts
    // with its record count and byte length (zig-zag varints): forge the
    // length to about 4 GiB.
    let header_end = file.windows(16).position(|w| w == &file[file.len() - 16..]).expect("sync marker") + 16;
    let mut forged = file[..header_end].to_vec();
    forged.push(0x02); // one record
                       // 200 MiB: under apache-avro's own limit (512 MiB), over segstream's.
    let mut len = (200u64 << 20) << 1; // zig-zag
    while len >= 0x80 {
        forged.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    forged.push(len as u8);
    forged.extend_from_slice(&[0; 64]);
    let reader = AvroFileReader::new(forged.as_slice()).expect("a valid header");
    let results: Vec<_> = reader.collect();
    let limit = segstream_decode::MAX_AVRO_ALLOCATION.to_string();
    assert!(
        results.len() == 1 && results[0].as_ref().is_err_and(|e| e.to_string().contains(&limit)),
        "refused by the allocation limit ({limit} bytes): {results:?}"
    );
}
