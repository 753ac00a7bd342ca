//! Minimum dwell end to end: file mode on generated samples with a dwell on
//! some groups equals the dwell rule applied by this test to the labels of a
//! run without one, and leaves the other groups exactly as they were.

mod common;

use std::collections::BTreeMap;

use common::*;
use segstream::{run_file, Config, FileSettings};
use segstream_decode::{parse_rfc3339_millis, Format};
use segstream_output::TransitionRecord;

type Key = (String, String);
/// (from, to, at) of one transition.
type Move = (Option<String>, Option<String>, i64);

fn by_customer_and_group(records: &[TransitionRecord]) -> BTreeMap<Key, Vec<Move>> {
    let mut out: BTreeMap<Key, Vec<Move>> = BTreeMap::new();
    for r in records {
        let at = parse_rfc3339_millis(&r.at).expect("at");
        out.entry((r.customer_id.clone(), r.group.clone())).or_default().push((r.from.clone(), r.to.clone(), at));
    }
    out
}

/// The dwell rule on the labels a run without a dwell gives (its
/// transitions of one customer in one group, in order): a first label and
/// an erasure are at once; otherwise the customer moves to a segment once
/// it has qualified for it over `[since, since + dwell)`, at `since + dwell`,
/// if that is not after `end` (the last instant the run evaluated).
fn with_dwell(moves: &[Move], dwell: i64, end: i64) -> Vec<Move> {
    let mut out = Vec::new();
    let mut held: Option<String> = None;
    let mut qualifies: Option<(String, i64)> = None;
    let settle = |held: &mut Option<String>, qualifies: &Option<(String, i64)>, t: i64, out: &mut Vec<Move>| {
        if let Some((q, since)) = qualifies {
            if held.as_ref() != Some(q) && since + dwell <= t {
                out.push((held.clone(), Some(q.clone()), since + dwell));
                *held = Some(q.clone());
            }
        }
    };
    for (from, to, at) in moves {
        match (from, to) {
            (None, Some(first)) => {
                out.push((None, Some(first.clone()), *at));
                held = Some(first.clone());
                qualifies = Some((first.clone(), *at));
            }
            (_, None) => {
                settle(&mut held, &qualifies, *at, &mut out);
                out.push((held.take(), None, *at));
                qualifies = None;
            }
            (Some(_), Some(next)) => {
                settle(&mut held, &qualifies, *at, &mut out);
                qualifies = Some((next.clone(), *at));
            }
        }
    }
    settle(&mut held, &qualifies, end, &mut out);
    out
}

#[test]
fn a_dwell_holds_back_exactly_the_moves_that_do_not_last_and_touches_no_other_group() {
    for (seed, customers, days) in [(3, 300, 60), (11, 200, 90)] {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, end) = sample(d.path(), "e.jsonl", customers, days, seed, Format::Json, None);
        let plain = Config::default();
        let mut dwelling = Config::default();
        let (health, engagement, custom) = (2 * 86_400_000, 36 * 3_600_000 + 1, 5 * 86_400_000);
        dwelling.segments.health.min_dwell_ms = health as u64;
        dwelling.segments.engagement.min_dwell_ms = engagement as u64;
        let tier = |dwell: u64| segstream_scoring::CustomGroupConfig {
            name: "attention".into(),
            rules: vec![segstream_scoring::RuleConfig {
                segment: "watch".into(),
                when: "R <= 3 or health < 50".into(),
            }],
            default: "fine".into(),
            min_dwell_ms: dwell,
        };
        let mut plain = plain;
        plain.segments.custom = vec![tier(0)];
        dwelling.segments.custom = vec![tier(custom as u64)];
        let run = |cfg: &Config, name: &str| {
            let mut args = FileSettings::new(&input, d.path().join(format!("{name}.jsonl")), d.path().join(name));
            args.until = Some(end);
            run_file(&engine(cfg), &args).expect("run");
            by_customer_and_group(&read_json(&args.output))
        };
        let (a, b) = (run(&plain, "plain"), run(&dwelling, "dwelling"));
        let mut held_back = 0;
        for (key, moves) in &a {
            let want = match key.1.as_str() {
                "health" => with_dwell(moves, health, end),
                "engagement" => with_dwell(moves, engagement, end),
                "attention" => with_dwell(moves, custom, end),
                _ => moves.clone(),
            };
            held_back += moves.len() - want.len();
            assert_eq!(b.get(key), Some(&want), "seed {seed}, {key:?}: without a dwell {moves:?}");
        }
        assert_eq!(a.len(), b.len());
        assert!(held_back > 50, "seed {seed}: the dwell held back moves that did not last ({held_back})");

        // The query API shows a move still waiting, and when it would happen.
        let settings = engine(&dwelling);
        let reader = segstream::query::StateReader::open(&d.path().join("dwelling"), &settings).expect("reader");
        let store =
            segstream_state::StateStore::open_reader(&d.path().join("dwelling"), &d.path().join("r2")).expect("store");
        let mut waiting = None;
        store
            .for_each_customer(|id, st| {
                if waiting.is_none() {
                    waiting = st.pending.first().map(|p| (id.to_string(), *p));
                }
            })
            .expect("scan");
        let (id, (g, _, since)) = waiting.expect("some customer waits at the end");
        let v = reader.customer_json(&id, None).expect("customer");
        let group = settings.scorer().groups()[usize::from(g)].name.to_string();
        let dwell = [("health", health), ("engagement", engagement), ("attention", custom)]
            .iter()
            .find(|(n, _)| *n == group)
            .map(|(_, d)| *d)
            .expect("a dwelling group");
        let q = &v["segments"][&group]["qualifies_for"];
        assert_eq!(q["since"], segstream_decode::format_rfc3339_millis(since), "{v}");
        assert_eq!(q["moves_at"], segstream_decode::format_rfc3339_millis(since + dwell), "{v}");
        assert!(since + dwell > end, "still waiting at the end of the run");
    }
}
