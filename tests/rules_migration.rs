//! Rule migration in file mode (ADR 008): a state built under one set of
//! rules moved to another mid-stream, checked against fresh runs under the
//! new rules; crashes in the middle; groups added and removed; refusals.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use segstream::{run_file, Config, FileFaults, FileSettings};
use segstream_decode::Format;
use segstream_engine::RulesPolicy;
use segstream_output::{CauseRecord, TransitionRecord};
use segstream_scoring::{CustomGroupConfig, RuleConfig};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).expect("read").lines().map(str::to_string).collect()
}

/// The sample split at `days` after its start: events before, events after.
fn split(dir: &Path, customers: u64, days: u32, at_day: i64) -> (PathBuf, PathBuf, PathBuf) {
    let (all, _) = sample(dir, "all.jsonl", customers, days, 5, Format::Json, None);
    let cut = START + at_day * 86_400_000;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for l in lines(&all) {
        let ts = segstream_decode::decode_json_line(l.as_bytes()).expect("valid sample").ts;
        if ts < cut {
            a.push(l)
        } else {
            b.push(l)
        }
    }
    let (pa, pb) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    std::fs::write(&pa, a.join("\n") + "\n").expect("write");
    std::fs::write(&pb, b.join("\n") + "\n").expect("write");
    (pa, pb, all)
}

/// at_risk sooner (R = 2 from 21 days of silence instead of 30), and
/// green health from 60 instead of 70.
fn sooner_at_risk(mut cfg: Config) -> Config {
    cfg.scoring.recency.thresholds_days = [7, 14, 21, 60];
    cfg.segments.health.green_min = 60;
    cfg
}

fn run(cfg: &Config, policy: Option<RulesPolicy>, input: &Path, output: &Path, state: &Path) -> segstream::RunSummary {
    let mut settings = engine(cfg);
    if let Some(p) = policy {
        settings = settings.with_rules_policy(p);
    }
    run_file(&settings, &FileSettings::new(input, output, state)).expect("run")
}

const MIGRATE: Option<RulesPolicy> = Some(RulesPolicy { version: None, migrate: true });

fn is_rules(r: &TransitionRecord) -> bool {
    matches!(r.cause, CauseRecord::Rules { .. })
}

/// The issue's test: a changed threshold mid-stream produces exactly the
/// labels a fresh run under the new rules has at that instant, and then
/// continues exactly as that fresh run continues.
#[test]
fn a_threshold_changed_mid_stream_gives_a_fresh_runs_labels_and_continues_as_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path();
    let (a, b, all) = split(p, 240, 75, 40);
    let old = config_committing_every(100);
    let new = sooner_at_risk(config_committing_every(100));
    let mut new_v2 = new.clone();
    new_v2.rules_version = Some(2);

    run(&old, None, &a, &p.join("old-a.jsonl"), &p.join("s"));
    let migrated = run(&new, MIGRATE, &b, &p.join("migrated-b.jsonl"), &p.join("s"));
    run(&new_v2, None, &a, &p.join("fresh-a.jsonl"), &p.join("fresh-a"));
    run(&new_v2, None, &all, &p.join("fresh-all.jsonl"), &p.join("fresh-all"));

    let m = migrated.migration.expect("the run migrated the rules");
    let mut before = BTreeMap::new();
    fold_labels(&mut before, &read_json(&p.join("old-a.jsonl")));
    let alive = before.keys().map(|(c, _)| c).collect::<std::collections::BTreeSet<_>>().len() as u64;
    assert!(alive > 150, "{alive}");
    assert_eq!((m.from.version, m.to.version, m.customers), (1, 2, alive), "every customer, once");
    let out_b = read_json(&p.join("migrated-b.jsonl"));
    let rules: Vec<TransitionRecord> = out_b.iter().filter(|r| is_rules(r)).cloned().collect();
    assert_eq!(rules.len() as u64, m.transitions);
    let moved: std::collections::BTreeSet<_> = rules.iter().map(|r| (r.group.as_str(), r.to.as_deref())).collect();
    assert!(moved.contains(&("health", Some("green"))), "the new threshold moves customers to green: {moved:?}");
    for r in &rules {
        assert_eq!(r.cause, CauseRecord::Rules { from_version: 1, to_version: 2 });
        assert_eq!(r.rules_version, 2);
    }
    // The migration comes first, then the input's transitions.
    let first_other = out_b.iter().position(|r| !is_rules(r)).expect("transitions of b");
    assert!(out_b[first_other..].iter().all(|r| !is_rules(r)));

    // Labels right after the migration = labels of a fresh run under the new rules.
    let mut after_migration = BTreeMap::new();
    fold_labels(&mut after_migration, &read_json(&p.join("old-a.jsonl")));
    fold_labels(&mut after_migration, &rules);
    let mut fresh = BTreeMap::new();
    fold_labels(&mut fresh, &read_json(&p.join("fresh-a.jsonl")));
    let differ: Vec<_> = fresh
        .iter()
        .filter(|(k, v)| after_migration.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone(), after_migration.get(k).cloned()))
        .take(5)
        .collect();
    assert!(
        differ.is_empty() && after_migration.len() == fresh.len(),
        "(customer, group), fresh, migrated: {differ:?}"
    );

    // Then every transition of the second part equals the fresh run's, byte for byte.
    let fresh_a = lines(&p.join("fresh-a.jsonl")).len();
    let fresh_all = lines(&p.join("fresh-all.jsonl"));
    let b_lines = lines(&p.join("migrated-b.jsonl"));
    assert_eq!(b_lines[first_other..], fresh_all[fresh_a..]);
    assert!(fresh_all.len() > fresh_a + 100, "the second part moves customers too");
}

/// A crash in the middle of a migration (after a batch's transitions are
/// written, before its commit) and a restart: the same output as a
/// migration that was not interrupted, byte for byte — nothing twice,
/// nothing missing.
#[test]
fn a_migration_interrupted_by_a_crash_resumes_where_it_committed() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path();
    let (a, b, _) = split(p, 200, 60, 45);
    let old = config_committing_every(30);
    let new = sooner_at_risk(config_committing_every(30));
    for s in ["calm", "crashy"] {
        run(&old, None, &a, &p.join(format!("{s}-a.jsonl")), &p.join(s));
    }
    run(&new, MIGRATE, &b, &p.join("calm-b.jsonl"), &p.join("calm"));

    let mut crashy = FileSettings::new(&b, p.join("crashy-b.jsonl"), p.join("crashy"));
    crashy.faults = FileFaults { crash_after_migrated: Some(70), ..FileFaults::default() };
    let settings = engine(&new).with_rules_policy(MIGRATE.expect("policy"));
    let first = run_file(&settings, &crashy).expect("crashes");
    assert!(first.stopped_early);
    let written = std::fs::metadata(&crashy.output).expect("output").len();
    assert!(written > 0, "the crash left transitions of an uncommitted batch on disk");

    // A restart with the old rules is refused: the migration must finish first.
    let refused = run_file(&engine(&old), &FileSettings::new(&b, p.join("crashy-b.jsonl"), p.join("crashy")));
    let text = format!("{:#}", refused.expect_err("old rules during a migration"));
    assert!(text.contains("under way"), "{text}");

    // The configured rules are enough to finish it (no flag needed).
    crashy.faults = FileFaults::default();
    let second = run_file(&engine(&new), &crashy).expect("resumes");
    assert!(second.migration.is_some());
    assert_eq!(std::fs::read(&crashy.output).expect("out"), std::fs::read(p.join("calm-b.jsonl")).expect("out"));
}

fn plan_group(name: &str) -> CustomGroupConfig {
    CustomGroupConfig {
        name: name.into(),
        rules: vec![RuleConfig { segment: "paying".into(), when: "M >= 2".into() }],
        default: "free".into(),
        min_dwell_ms: 0,
    }
}

fn keep_group() -> CustomGroupConfig {
    CustomGroupConfig {
        name: "keep".into(),
        rules: vec![RuleConfig { segment: "ok".into(), when: "health >= 60".into() }],
        default: "low".into(),
        min_dwell_ms: 0,
    }
}

/// Groups added and removed (one moving to another place in the list), the
/// rules version from the configuration, history, counts and membership
/// renamed, and refusals that say what differs.
#[test]
fn added_groups_get_first_labels_removed_ones_end_and_history_follows() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path();
    let (a, b, _) = split(p, 60, 40, 30);
    let mut old = config_committing_every(1000);
    old.segments.custom = vec![plan_group("plan"), keep_group()];
    run(&old, None, &a, &p.join("a.out.jsonl"), &p.join("s"));

    // `keep` moves from the sixth group to the fifth.
    let mut new = config_committing_every(1000);
    new.segments.custom = vec![keep_group(), plan_group("tier")];
    let err = run_file(&engine(&new), &FileSettings::new(&b, p.join("b.out.jsonl"), p.join("s")))
        .expect_err("changed rules without a migration");
    let text = format!("{err:#}");
    assert!(text.contains("--migrate-rules") && text.contains("segments.custom"), "{text}");

    new.rules_version = Some(7);
    let summary = run(&new, None, &b, &p.join("b.out.jsonl"), &p.join("s"));
    assert_eq!(summary.migration.as_ref().map(|m| (m.from.version, m.to.version)), Some((1, 7)));
    let out = read_json(&p.join("b.out.jsonl"));
    let rules: Vec<&TransitionRecord> = out.iter().filter(|r| is_rules(r)).collect();
    let customers = summary.migration.as_ref().expect("migration").customers as usize;
    let mut before = BTreeMap::new();
    fold_labels(&mut before, &read_json(&p.join("a.out.jsonl")));
    assert_eq!(customers, before.keys().filter(|(_, g)| g == "plan").count());
    let ended: Vec<_> = rules.iter().filter(|r| r.group == "plan").collect();
    let started: Vec<_> = rules.iter().filter(|r| r.group == "tier").collect();
    assert_eq!(ended.len(), customers, "every customer leaves the removed group");
    assert!(ended.iter().all(|r| r.to.is_none() && r.from.is_some()));
    assert_eq!(started.len(), customers, "every customer gets a first label in the new group");
    assert!(started.iter().all(|r| r.from.is_none() && r.to.is_some()));
    assert!(rules.iter().all(|r| r.group == "plan" || r.group == "tier"), "built-in groups did not change");
    assert!(out.iter().all(|r| r.rules_version == 7));

    // History: the removed group's entries are gone, the new group's first
    // label is there with its cause.
    let opened = segstream_engine::Engine::open(&p.join("s"), &engine(&new)).expect("open under the new rules");
    let groups = opened.scorer().groups();
    assert_eq!(groups.len(), 6);
    let name = |g: u16, l: Option<u16>| -> (String, Option<String>) {
        let g = &groups[usize::from(g)];
        (g.name.to_string(), l.map(|l| g.segments[usize::from(l)].to_string()))
    };
    let mut all = read_json(&p.join("a.out.jsonl"));
    all.extend(out.iter().cloned());
    for r in rules.iter().take(10) {
        let id = &r.customer_id;
        let history = opened.store().history(id).expect("history");
        let real: std::collections::BTreeSet<(String, Option<String>, String)> = all
            .iter()
            .filter(|t| &t.customer_id == id)
            .map(|t| (t.group.clone(), t.to.clone(), t.at.clone()))
            .collect();
        for e in &history {
            let (g, to) = name(e.group, e.to);
            let at = segstream_decode::format_rfc3339_millis(e.at);
            assert!(
                real.contains(&(g.clone(), to.clone(), at.clone())),
                "{id}: kept {g} → {to:?} at {at} is no transition"
            );
        }
        assert!(history.iter().all(|e| name(e.group, None).0 != "plan"), "the removed group's entries are gone");
        assert!(history.iter().any(|e| name(e.group, None).0 == "keep"), "the moved group's entries are kept");
        let first: Vec<_> = history.iter().filter(|e| e.rules.is_some()).collect();
        assert_eq!(first.len(), 1, "{id}: one move by the migration (tier's first label)");
        assert_eq!(
            (first[0].rules, first[0].from, name(first[0].group, None).0.as_str()),
            (Some((1, 7)), None, "tier")
        );
    }
    // Counters and membership follow, by the new names.
    let sizes = opened.segment_sizes().expect("scan");
    let counts: BTreeMap<(String, String), u64> = opened
        .segment_counts()
        .into_iter()
        .filter(|(_, c)| c.customers != 0)
        .map(|((g, l), c)| {
            let (g, l) = name(g, Some(l));
            ((g, l.expect("segment")), c.customers as u64)
        })
        .collect();
    assert_eq!(counts, sizes);
    for (gi, g) in groups.iter().enumerate() {
        for (li, l) in g.segments.iter().enumerate() {
            let members = opened.store().members(gi as u16, li as u16, None, 100_000).expect("members");
            let want = sizes.get(&(g.name.to_string(), l.to_string())).copied().unwrap_or(0);
            assert_eq!(members.len() as u64, want, "members of {}/{l}", g.name);
        }
    }
    drop(opened);

    // Going back to an earlier version is refused.
    let mut back = old.clone();
    back.rules_version = Some(3);
    let err = run_file(&engine(&back), &FileSettings::new(&b, p.join("c.out.jsonl"), p.join("s")))
        .expect_err("older version");
    assert!(format!("{err:#}").contains("cannot go back"), "{err:#}");
}

/// A `segstream serve` started before a migration names labels with the
/// old rules: once the state has moved, it answers 503 instead of
/// misnaming them.
#[test]
fn a_reader_opened_before_a_migration_stops_answering_after_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path();
    let (a, b, _) = split(p, 40, 30, 20);
    let old = config_committing_every(1000);
    run(&old, None, &a, &p.join("a.out.jsonl"), &p.join("s"));
    let reader = segstream::query::StateReader::open(&p.join("s"), &engine(&old)).expect("reader");
    let id = read_json(&p.join("a.out.jsonl"))[0].customer_id.clone();
    assert!(reader.customer_json(&id, None).is_ok());
    run(&sooner_at_risk(old.clone()), MIGRATE, &b, &p.join("b.out.jsonl"), &p.join("s"));
    std::thread::sleep(std::time::Duration::from_millis(600)); // the reader catches up at most every 500 ms
    let err = reader.customer_json(&id, None).expect_err("other rules now");
    assert_eq!((err.status, err.code), (503, "rules_changed"));
    let new = segstream::query::StateReader::open(&p.join("s"), &engine(&sooner_at_risk(old))).expect("new rules");
    assert!(new.customer_json(&id, None).is_ok());
}

/// A migration keeps the waits of a group with a minimum dwell: a new
/// version of the same rules moves nobody, and what follows is what would
/// have followed without it (but for the version stamped).
#[test]
fn a_migration_keeps_customers_waiting_out_a_dwell_where_they_are() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path();
    let (a, b, _) = split(p, 120, 50, 30);
    let mut cfg = config_committing_every(1000);
    cfg.segments.health.min_dwell_ms = 2 * 86_400_000;
    for s in ["same", "bumped"] {
        run(&cfg, None, &a, &p.join(format!("{s}-a.jsonl")), &p.join(s));
    }
    let waiting = {
        let store = segstream_state::StateStore::open_reader(&p.join("bumped"), &p.join("r")).expect("store");
        let mut n = 0;
        store.for_each_customer(|_, st| n += usize::from(!st.pending.is_empty())).expect("scan");
        n
    };
    assert!(waiting > 0, "some customers wait out the dwell at the migration");
    run(&cfg, None, &b, &p.join("same-b.jsonl"), &p.join("same"));
    let mut bumped = cfg.clone();
    bumped.rules_version = Some(2);
    let summary = run(&bumped, None, &b, &p.join("bumped-b.jsonl"), &p.join("bumped"));
    assert_eq!(summary.migration.map(|m| m.transitions), Some(0), "the same rules move nobody");
    let strip = |mut r: TransitionRecord| {
        r.rules_version = 0;
        r
    };
    let same: Vec<_> = read_json(&p.join("same-b.jsonl")).into_iter().map(strip).collect();
    let after: Vec<_> = read_json(&p.join("bumped-b.jsonl")).into_iter().map(strip).collect();
    assert_eq!(after, same);
}

/// A segment renamed in the RFM grid: the customers in it move to the new
/// name (cause `rules`), and the kept history names where they came from.
#[test]
fn a_renamed_segment_moves_its_customers_and_their_history_keeps_the_old_name() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path();
    let (a, b, _) = split(p, 150, 60, 45);
    let old = config_committing_every(1000);
    run(&old, None, &a, &p.join("a.out.jsonl"), &p.join("s"));
    let mut renamed = old.clone();
    for row in renamed.segments.rfm.grid.iter_mut() {
        for cell in row.iter_mut() {
            if cell == "potential_loyalists" {
                *cell = "promising_regulars".into();
            }
        }
    }
    run(&renamed, MIGRATE, &b, &p.join("b.out.jsonl"), &p.join("s"));
    let moved: Vec<TransitionRecord> = read_json(&p.join("b.out.jsonl")).into_iter().filter(is_rules).collect();
    assert!(!moved.is_empty());
    assert!(moved.iter().all(|r| r.group == "rfm"
        && r.from.as_deref() == Some("potential_loyalists")
        && r.to.as_deref() == Some("promising_regulars")));
    let reader = segstream::query::StateReader::open(&p.join("s"), &engine(&renamed)).expect("reader");
    let v = reader.customer_json(&moved[0].customer_id, None).expect("customer");
    let entry = v["history"]
        .as_array()
        .expect("history")
        .iter()
        .find(|e| e["cause"]["kind"] == "rules")
        .cloned()
        .expect("the migration is in the history");
    assert_eq!(
        (entry["from"].as_str(), entry["to"].as_str()),
        (Some("potential_loyalists"), Some("promising_regulars"))
    );
}
