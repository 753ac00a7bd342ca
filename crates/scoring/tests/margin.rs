//! Exit margins (`segments.<group>.exit_margin`): golden cases worked out by
//! hand from the rule "a customer holding a segment with margin k keeps it
//! while some scores within k steps of its own give it".

use segstream_decode::{decode_json_line, Event, DAY_MS};
use segstream_scoring::{CustomerState, Scorer, ScoringConfig, SegmentsConfig, Transition};

const T0: i64 = 1_767_225_600_000;

fn login(day: i64) -> Event {
    let line = format!(r#"{{"event_id":"l{day}","customer_id":"c","ts":{},"type":"login"}}"#, T0 + day * DAY_MS);
    decode_json_line(line.as_bytes()).expect("test event is valid")
}

fn scorer(at_risk_margin: Option<u32>) -> Scorer {
    let mut seg = SegmentsConfig::default();
    if let Some(k) = at_risk_margin {
        seg.rfm.exit_margin.insert("at_risk".into(), k);
    }
    Scorer::new(ScoringConfig::default(), seg).expect("valid")
}

/// A customer active on days 0..=9, then quiet until day `until`, as the
/// engine runs it; with its transitions.
fn active_ten_days_then_quiet(s: &Scorer, until: i64) -> (CustomerState, Vec<Transition>) {
    let mut state: Option<CustomerState> = None;
    let mut out: Vec<Transition> = Vec::new();
    for d in 0..10 {
        if let Some(st) = state.as_mut() {
            s.advance("c", st, T0 + d * DAY_MS, &mut out);
        }
        s.on_event(&mut state, &login(d), &mut out);
    }
    let mut st = state.expect("exists");
    s.advance("c", &mut st, T0 + until * DAY_MS, &mut out);
    (st, out)
}

/// The rfm transitions (to, at in days after T0, cause) of a customer active
/// on days 0..=9, then quiet until day 120.
fn quiet_after_ten_days(s: &Scorer) -> (Vec<(String, f64, String)>, CustomerState) {
    let (st, out) = active_ten_days_then_quiet(s, 120);
    let rows = out
        .iter()
        .filter(|t| &*t.group == "rfm")
        .map(|t| {
            let cause = match &t.cause {
                segstream_scoring::Cause::Time(k) => format!("time:{}", k.name()),
                segstream_scoring::Cause::Event(id) => format!("event:{id}"),
                other => format!("{other:?}"),
            };
            (t.to.as_deref().unwrap_or("-").to_string(), (t.at - T0) as f64 / DAY_MS as f64, cause)
        })
        .collect();
    (rows, st)
}

fn row(to: &str, day: f64, cause: &str) -> (String, f64, String) {
    (to.into(), day, cause.into())
}

#[test]
fn an_at_risk_customer_stays_until_f_is_two_steps_below_the_segment() {
    // Active days 0..=9 (10 days: F = 3), last login on day 9. R = 2 from
    // day 39 (30 days quiet): at_risk. Day 0 leaves the 90-day window at
    // day 90: 9 active days, F = 2, R = 1: hibernating without a margin;
    // with margin 1, F = 3 is one step away and gives at_risk, so it stays.
    // Day 7 leaves at day 97: 2 active days, F = 1: two steps, it leaves.
    let (plain, _) = quiet_after_ten_days(&scorer(None));
    let (damped, st) = quiet_after_ten_days(&scorer(Some(1)));
    let tail = |rows: &[(String, f64, String)]| rows[rows.len() - 2..].to_vec();
    assert_eq!(tail(&plain), vec![row("at_risk", 39.0, "time:recency"), row("hibernating", 90.0, "time:frequency")]);
    assert_eq!(tail(&damped), vec![row("at_risk", 39.0, "time:recency"), row("hibernating", 97.0, "time:frequency")]);
    assert_eq!(plain[..plain.len() - 1], damped[..damped.len() - 1], "before, the same moves");
    assert_eq!(st.timer, None, "nothing moves after");
}

#[test]
fn a_margin_of_zero_is_no_margin_and_a_rule_migration_keeps_a_held_segment() {
    assert_eq!(quiet_after_ten_days(&scorer(Some(0))).0, quiet_after_ten_days(&scorer(None)).0);
    // Held in at_risk by the margin at day 92 (F = 2): a migration to the
    // same rules, version 2, leaves it there.
    let s = scorer(Some(1));
    let (mut st, _) = active_ten_days_then_quiet(&s, 92);
    let mut v2 = scorer(Some(1));
    v2.set_rules_version(2);
    let mut moved = Vec::new();
    v2.migrate(&s, "c", &mut st, T0 + 92 * DAY_MS, 1, &mut moved);
    assert!(moved.is_empty(), "{moved:?}");
    // Without the margin in the new rules, it moves.
    let mut plain = scorer(None);
    plain.set_rules_version(2);
    plain.migrate(&s, "c", &mut st, T0 + 92 * DAY_MS, 1, &mut moved);
    assert_eq!(moved.iter().map(|t| t.to.as_deref()).collect::<Vec<_>>(), vec![Some("hibernating")]);
}

#[test]
fn unknown_segments_and_oversized_margins_are_refused_by_name() {
    let mut seg = SegmentsConfig::default();
    seg.rfm.exit_margin.insert("at_rsk".into(), 1);
    let err = Scorer::new(ScoringConfig::default(), seg).err().expect("refused").to_string();
    assert!(err.contains("no segment \"at_rsk\"") && err.contains("at_risk"), "{err}");
    let mut seg = SegmentsConfig::default();
    seg.health.exit_margin.insert("green".into(), 101);
    let err = Scorer::new(ScoringConfig::default(), seg).err().expect("refused").to_string();
    assert!(err.contains("at most 100"), "{err}");
}
