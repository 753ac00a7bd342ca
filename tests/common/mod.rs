//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use segstream::{generate, Config, GenerateArgs};
use segstream_decode::Format;
use segstream_engine::EngineSettings;
use segstream_output::TransitionRecord;

pub const START: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

/// SPEC §5's RF grid, written out here for the tests' own references:
/// `SPEC_RFM_GRID[5 − R][F − 1]`.
pub const SPEC_RFM_GRID: [[&str; 5]; 5] = [
    ["new_customers", "potential_loyalists", "potential_loyalists", "champions", "champions"],
    ["promising", "potential_loyalists", "potential_loyalists", "loyal_customers", "loyal_customers"],
    ["about_to_sleep", "about_to_sleep", "need_attention", "loyal_customers", "loyal_customers"],
    ["hibernating", "hibernating", "at_risk", "at_risk", "cant_lose"],
    ["hibernating", "hibernating", "at_risk", "at_risk", "cant_lose"],
];

pub fn sample(
    dir: &Path,
    name: &str,
    customers: u64,
    days: u32,
    seed: u64,
    format: Format,
    invalid_every: Option<u64>,
) -> (PathBuf, i64) {
    let path = dir.join(name);
    let stats = generate(&GenerateArgs { customers, days, start_ms: START, seed, format, invalid_every }, &path)
        .expect("generate");
    (path, stats.end_ms)
}

/// The engine settings of a configuration (valid in every test).
pub fn engine(cfg: &Config) -> EngineSettings {
    cfg.engine_settings().expect("a valid test configuration")
}

pub fn config_committing_every(n: u64) -> Config {
    let mut cfg = Config::default();
    cfg.state.commit_every_records = std::num::NonZeroU64::new(n).expect("non-zero");
    cfg
}

/// Folds transitions into the labels per (customer, group) they leave,
/// checking that each one starts where the customer was.
pub fn fold_labels(labels: &mut std::collections::BTreeMap<(String, String), String>, records: &[TransitionRecord]) {
    for r in records {
        let key = (r.customer_id.clone(), r.group.clone());
        assert_eq!(labels.get(&key), r.from.as_ref(), "{r:?} starts where the customer was");
        match &r.to {
            Some(to) => labels.insert(key, to.clone()),
            None => labels.remove(&key),
        };
    }
}

pub fn read_json(path: &Path) -> Vec<TransitionRecord> {
    std::fs::read_to_string(path)
        .expect("read output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("valid transition record"))
        .collect()
}

pub fn read_avro(path: &Path) -> Vec<TransitionRecord> {
    let f = std::fs::File::open(path).expect("open");
    apache_avro::Reader::new(f)
        .expect("avro header")
        .map(|v| segstream_output::transition_from_avro_value(&v.expect("record")).expect("transition"))
        .collect()
}
