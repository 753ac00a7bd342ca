//! Golden tests of SPEC §2–§6, with expectations worked out by hand from the
//! SPEC text (not from the code).

use segstream_decode::{decode_json_line, Event, DAY_MS};
use segstream_scoring::{
    Cause, CustomGroupConfig, CustomerState, Outcome, RuleConfig, Scorer, ScoringConfig, SegmentsConfig, Transition,
};

/// 2026-01-01T00:00:00Z, the start of day D0.
const T0: i64 = 1_767_225_600_000;
const D0: i64 = T0 / DAY_MS;
const H: i64 = 3_600_000;

fn ev(id: &str, ts: i64, rest: &str) -> Event {
    let line = format!(r#"{{"event_id":"{id}","customer_id":"c","ts":{ts},{rest}}}"#);
    decode_json_line(line.as_bytes()).expect("test event is valid")
}

fn login(id: &str, ts: i64) -> Event {
    ev(id, ts, r#""type":"login""#)
}

/// (group, from, to, at, cause) of a transition.
type Row = (String, Option<String>, Option<String>, i64, String);

/// The rows of transitions, for compact assertions.
fn rows(ts: &[Transition]) -> Vec<Row> {
    ts.iter()
        .map(|t| {
            let cause = match &t.cause {
                Cause::Event(id) => format!("event:{id}"),
                Cause::Time(k) => format!("time:{}", k.name()),
                Cause::Rules { from, to } => format!("rules:{from}:{to}"),
                Cause::Requantile => "requantile".into(),
            };
            (t.group.to_string(), t.from.as_deref().map(String::from), t.to.as_deref().map(String::from), t.at, cause)
        })
        .collect()
}

fn row(
    g: &str,
    from: Option<&str>,
    to: Option<&str>,
    at: i64,
    cause: &str,
) -> (String, Option<String>, Option<String>, i64, String) {
    (g.into(), from.map(String::from), to.map(String::from), at, cause.into())
}

struct Customer {
    scorer: Scorer,
    state: Option<CustomerState>,
}

impl Customer {
    fn new() -> Self {
        Self { scorer: Scorer::spec_default(), state: None }
    }
    fn event(&mut self, e: Event) -> Vec<Transition> {
        let mut out = Vec::new();
        self.scorer.on_event(&mut self.state, &e, &mut out);
        out
    }
    fn until(&mut self, t: i64) -> Vec<Transition> {
        let mut out = Vec::new();
        if let Some(st) = self.state.as_mut() {
            self.scorer.advance("c", st, t, &mut out);
        }
        out
    }
}

#[test]
fn new_customer_then_going_quiet() {
    let mut c = Customer::new();
    let t = T0 + 10 * H;
    // R=5 (r=0), F=1 (1 active day), M=1, adoption 0.
    // health: S = 30·0 + 20·100 + 20·0 + 10·100 + 10·100 + 10·50 = 4500 → 45 → yellow.
    assert_eq!(
        rows(&c.event(login("e1", t))),
        vec![
            row("rfm", None, Some("new_customers"), t, "event:e1"),
            row("health", None, Some("yellow"), t, "event:e1"),
            row("value", None, Some("tech_touch"), t, "event:e1"),
            row("engagement", None, Some("on_the_fence"), t, "event:e1"),
        ]
    );
    assert!(c.until(t + 7 * DAY_MS - 1).is_empty());
    // r = 7d: R=4 → promising; health S=4000 → 40 → still yellow.
    assert_eq!(
        rows(&c.until(t + 7 * DAY_MS)),
        vec![row("rfm", Some("new_customers"), Some("promising"), t + 7 * DAY_MS, "time:recency")]
    );
    // r = 14d: R=3 → about_to_sleep; S=3500 → 35 → red.
    // r = 30d: R=2 → hibernating, non_active; health 30 stays red.
    // r = 60d: R=1: no label changes; the day leaving the F window changes nothing either.
    assert_eq!(
        rows(&c.until(t + 400 * DAY_MS)),
        vec![
            row("rfm", Some("promising"), Some("about_to_sleep"), t + 14 * DAY_MS, "time:recency"),
            row("health", Some("yellow"), Some("red"), t + 14 * DAY_MS, "time:recency"),
            row("rfm", Some("about_to_sleep"), Some("hibernating"), t + 30 * DAY_MS, "time:recency"),
            row("engagement", Some("on_the_fence"), Some("non_active"), t + 30 * DAY_MS, "time:recency"),
        ]
    );
    let st = c.state.as_ref().expect("exists");
    assert_eq!(st.timer, None, "no label can change any more");
    let s = c.scorer.scores(st, t + 400 * DAY_MS);
    assert_eq!((s.r, s.f, s.m, s.health), (1, 1, 1, 25));
}

#[test]
fn an_active_day_leaving_the_window_is_a_frequency_boundary() {
    let mut c = Customer::new();
    for d in 0..10 {
        c.event(login(&format!("e{d}"), T0 + d * DAY_MS + 9 * H));
    }
    let last = T0 + 9 * DAY_MS + 9 * H;
    let out = rows(&c.until(T0 + 200 * DAY_MS));
    let rfm: Vec<_> = out.iter().filter(|r| r.0 == "rfm").cloned().collect();
    // 10 active days: F=3. R4: potential_loyalists (unchanged); R3: need_attention;
    // R2: at_risk; R1 at_risk; day D0 leaves the window at day D0+90: F=2 → hibernating.
    assert_eq!(
        rfm,
        vec![
            row("rfm", Some("potential_loyalists"), Some("need_attention"), last + 14 * DAY_MS, "time:recency"),
            row("rfm", Some("need_attention"), Some("at_risk"), last + 30 * DAY_MS, "time:recency"),
            row("rfm", Some("at_risk"), Some("hibernating"), (D0 + 90) * DAY_MS, "time:frequency"),
        ]
    );
}

#[test]
fn a_feature_leaving_the_window_is_an_adoption_boundary() {
    let mut c = Customer::new();
    for d in 0..=2 {
        for f in ["reports", "alerts", "api"] {
            c.event(ev(
                &format!("f{d}{f}"),
                T0 + d * DAY_MS + 8 * H,
                &format!(r#""type":"feature_used","feature":"{f}""#),
            ));
        }
    }
    for d in 0..32 {
        c.event(login(&format!("l{d}"), T0 + d * DAY_MS + 10 * H));
    }
    let st = c.state.as_ref().expect("exists");
    let s = c.scorer.scores(st, T0 + 31 * DAY_MS + 10 * H);
    // 32 active days → F=4, R=5, 3 features → adoption 60: power_user.
    // health: 30·75 + 20·100 + 20·60 + 1000 + 1000 + 500 = 7950 → 80.
    assert_eq!((s.r, s.f, s.adoption, s.health), (5, 4, 60, 80));
    // The features' last day is D0+2: they leave the 30-day window at day D0+32.
    let out = rows(&c.event(login("l32", T0 + 32 * DAY_MS + 10 * H)));
    let at = (D0 + 32) * DAY_MS;
    // adoption 0: S = 2250 + 2000 + 0 + 2500 = 6750 → 68 → yellow.
    assert_eq!(
        out,
        vec![
            row("health", Some("green"), Some("yellow"), at, "time:adoption"),
            row("engagement", Some("power_user"), Some("on_the_fence"), at, "time:adoption"),
        ]
    );
}

#[test]
fn boundaries_at_an_events_instant_fire_before_the_event() {
    let mut c = Customer::new();
    c.event(login("e1", T0));
    let at = T0 + 7 * DAY_MS;
    assert_eq!(
        rows(&c.event(login("e2", at))),
        vec![
            row("rfm", Some("new_customers"), Some("promising"), at, "time:recency"),
            // two active days: F still 1, R back to 5.
            row("rfm", Some("promising"), Some("new_customers"), at, "event:e2"),
        ]
    );
}

#[test]
fn score_tables() {
    let scorer = Scorer::spec_default();
    let at = T0 + 100 * DAY_MS;
    let mut st = CustomerState::new(T0);
    // R thresholds, measured from first_seen while there is no activity.
    for (r_ms, want) in [
        (0, 5),
        (7 * DAY_MS - 1, 5),
        (7 * DAY_MS, 4),
        (14 * DAY_MS, 3),
        (30 * DAY_MS - 1, 3),
        (30 * DAY_MS, 2),
        (60 * DAY_MS, 1),
    ] {
        assert_eq!(scorer.scores(&st, T0 + r_ms).r, want, "r = {r_ms}ms");
    }
    // F from active days in the 90-day window.
    for (days, want) in [(1, 1), (2, 1), (3, 2), (9, 2), (10, 3), (24, 3), (25, 4), (44, 4), (45, 5), (90, 5)] {
        let mut s = CustomerState::new(T0);
        for d in 0..days {
            s.apply(&login(&format!("d{d}"), at - d * DAY_MS));
        }
        assert_eq!(scorer.scores(&s, at).f, want, "{days} active days");
    }
    // M from MRR; a canceled subscription counts 0.
    for (mrr, status, want) in [
        (0, "active", 1),
        (1, "active", 2),
        (9_999, "active", 2),
        (10_000, "trialing", 3),
        (50_000, "active", 4),
        (199_999, "past_due", 4),
        (200_000, "active", 5),
        (900_000, "canceled", 1),
    ] {
        let mut s = CustomerState::new(T0);
        s.apply(&ev("s", T0, &format!(r#""type":"subscription","plan":"p","mrr_cents":{mrr},"status":"{status}""#)));
        assert_eq!(scorer.scores(&s, T0).m, want, "mrr {mrr} {status}");
    }
    // adoption = min(100, 20 × features in 30 days).
    for (n, want) in [(0, 0), (1, 20), (4, 80), (5, 100), (7, 100)] {
        let mut s = CustomerState::new(T0);
        for i in 0..n {
            s.apply(&ev(&format!("f{i}"), T0, &format!(r#""type":"feature_used","feature":"f{i}""#)));
        }
        assert_eq!(scorer.scores(&s, T0 + 29 * DAY_MS).adoption, want);
        assert_eq!(scorer.scores(&s, T0 + 30 * DAY_MS).adoption, 0);
    }
    // support, billing, sentiment components.
    st.apply(&ev("t1", T0, r#""type":"ticket","ticket_id":"a","action":"opened","priority":"urgent""#));
    st.apply(&ev("t2", T0, r#""type":"ticket","ticket_id":"b","action":"opened","priority":"high""#));
    assert_eq!(scorer.scores(&st, T0).support, 15);
    st.apply(&ev("t3", T0, r#""type":"ticket","ticket_id":"c","action":"opened","priority":"normal""#));
    assert_eq!(scorer.scores(&st, T0).support, 0);
    st.apply(&ev("t4", T0, r#""type":"ticket","ticket_id":"a","action":"closed","priority":"urgent""#));
    st.apply(&ev("t5", T0, r#""type":"ticket","ticket_id":"c","action":"closed","priority":"normal""#));
    st.apply(&ev("t6", T0, r#""type":"ticket","ticket_id":"d","action":"opened","priority":"low""#));
    assert_eq!(scorer.scores(&st, T0).support, 55);
    assert_eq!(scorer.scores(&st, T0).billing, 100);
    st.apply(&ev("p1", T0 + 1, r#""type":"payment","amount_cents":100,"status":"failed""#));
    assert_eq!(scorer.scores(&st, T0).billing, 0);
    st.apply(&ev("p2", T0 + 2, r#""type":"payment","amount_cents":100,"status":"refunded""#));
    assert_eq!(scorer.scores(&st, T0).billing, 0, "a refund does not clear a failure");
    st.apply(&ev("p3", T0 + 3, r#""type":"payment","amount_cents":100,"status":"succeeded""#));
    assert_eq!(scorer.scores(&st, T0).billing, 100);
    st.apply(&ev("s1", T0 + 4, r#""type":"subscription","plan":"p","mrr_cents":100,"status":"past_due""#));
    assert_eq!(scorer.scores(&st, T0).billing, 0);
    assert_eq!(scorer.scores(&st, T0).sentiment, 50);
    for (n, want) in [(0, 0), (6, 0), (7, 50), (8, 50), (9, 100), (10, 100)] {
        st.apply(&ev(&format!("n{n}"), T0 + 10 + i64::from(n), &format!(r#""type":"nps","score":{n}"#)));
        assert_eq!(scorer.scores(&st, T0).sentiment, want, "nps {n}");
    }
}

#[test]
fn health_rounds_half_up() {
    let scorer = Scorer::spec_default();
    // One feature (adoption 20), one urgent ticket (support 50), R=5, F=1, no NPS:
    // S = 0 + 2000 + 400 + 500 + 1000 + 500 = 4400 → 44.
    let mut st = CustomerState::new(T0);
    st.apply(&ev("f", T0, r#""type":"feature_used","feature":"x""#));
    st.apply(&ev("t", T0, r#""type":"ticket","ticket_id":"a","action":"opened","priority":"urgent""#));
    assert_eq!(scorer.scores(&st, T0).health, 44);
    // Plus a low ticket (support 40): S = 4300 → 43; R=4 instead: S = 3800 → 38.
    st.apply(&ev("t2", T0, r#""type":"ticket","ticket_id":"b","action":"opened","priority":"low""#));
    assert_eq!(scorer.scores(&st, T0).health, 43);
    assert_eq!(scorer.scores(&st, T0 + 7 * DAY_MS).health, 38);
    // A weight set where S ends in 50 rounds up: engagement 25·(F−1)… use
    // recency weight 30 and engagement 20 with R=4 (75): 30·75 = 2250.
    let mut cfg = ScoringConfig::default();
    cfg.health.weights.engagement = 20;
    cfg.health.weights.recency = 30;
    let scorer = Scorer::new(cfg, SegmentsConfig::default()).expect("valid");
    let st = CustomerState::new(T0);
    // S = 0 + 30·75 + 0 + 1000 + 1000 + 500 = 4750 → floor(48.0) = 48.
    assert_eq!(scorer.scores(&st, T0 + 7 * DAY_MS).health, 48);
    // R=5: 3000 + 2500 = 5500 → 55; R=3 (50): 1500 + 2500 = 4000 → 40.
    assert_eq!(scorer.scores(&st, T0).health, 55);
    assert_eq!(scorer.scores(&st, T0 + 14 * DAY_MS).health, 40);
}

#[test]
fn rf_grid_and_segment_rules() {
    // SPEC §5 table, rows R=5..1, columns F=1..5.
    let grid = [
        ["new_customers", "potential_loyalists", "potential_loyalists", "champions", "champions"],
        ["promising", "potential_loyalists", "potential_loyalists", "loyal_customers", "loyal_customers"],
        ["about_to_sleep", "about_to_sleep", "need_attention", "loyal_customers", "loyal_customers"],
        ["hibernating", "hibernating", "at_risk", "at_risk", "cant_lose"],
        ["hibernating", "hibernating", "at_risk", "at_risk", "cant_lose"],
    ];
    let scorer = Scorer::spec_default();
    let st = CustomerState::new(T0);
    let groups = scorer.groups();
    let name = |g: usize, i: u16| groups[g].segments[usize::from(i)].to_string();
    for r in 1..=5u8 {
        for f in 1..=5u8 {
            for (adoption, m, health) in [(0u8, 1u8, 39u8), (60, 3, 40), (59, 5, 69), (100, 4, 70)] {
                let s = segstream_scoring::Scores { r, f, m, adoption, health, ..Default::default() };
                let l = scorer.labels(&st, &s);
                assert_eq!(name(0, l[0]), grid[usize::from(5 - r)][usize::from(f - 1)], "R{r} F{f}");
                let h = if health >= 70 {
                    "green"
                } else if health >= 40 {
                    "yellow"
                } else {
                    "red"
                };
                assert_eq!(name(1, l[1]), h);
                let v = match m {
                    5 => "high_touch",
                    3 | 4 => "low_touch",
                    _ => "tech_touch",
                };
                assert_eq!(name(2, l[2]), v);
                let e = if r >= 4 && f >= 4 && adoption >= 60 {
                    "power_user"
                } else if r <= 2 {
                    "non_active"
                } else {
                    "on_the_fence"
                };
                assert_eq!(name(3, l[3]), e, "R{r} F{f} adoption {adoption}");
            }
        }
    }
}

#[test]
fn late_events_never_rewrite_emitted_transitions() {
    let mut c = Customer::new();
    c.event(login("e1", T0));
    c.until(T0 + 8 * DAY_MS); // emits new_customers → promising at T0+7d
    let late = ev("s1", T0 + DAY_MS, r#""type":"subscription","plan":"p","mrr_cents":250000,"status":"active""#);
    let mut out = Vec::new();
    let outcome = c.scorer.on_event(&mut c.state, &late, &mut out);
    assert_eq!(outcome, Outcome::Applied { late: true, capped: false });
    // Emitted at the last evaluated instant (the boundary at T0+7d), not at its ts.
    assert_eq!(rows(&out), vec![row("value", Some("tech_touch"), Some("high_touch"), T0 + 7 * DAY_MS, "event:s1")]);
    // An older subscription arriving later does not overwrite the newer one.
    let older = ev("s0", T0, r#""type":"subscription","plan":"p","mrr_cents":0,"status":"canceled""#);
    assert!(c.event(older).is_empty());
    assert_eq!(c.state.as_ref().map(|s| s.mrr_cents), Some(250_000));
}

#[test]
fn duplicates_are_ignored_entirely() {
    let mut c = Customer::new();
    c.event(login("e1", T0));
    let mut out = Vec::new();
    let outcome = c.scorer.on_event(&mut c.state, &ev("e1", T0 + 20 * DAY_MS, r#""type":"nps","score":0"#), &mut out);
    assert_eq!(outcome, Outcome::Duplicate);
    assert!(out.is_empty(), "not even the boundaries before it fire");
    assert_eq!(c.state.as_ref().map(|s| s.last_nps), Some(None));
}

#[test]
fn erasure_emits_null_and_a_later_event_starts_over() {
    let mut c = Customer::new();
    c.event(login("e1", T0));
    let at = T0 + 20 * DAY_MS;
    let out = rows(&c.event(ev("del", at, r#""type":"customer_deleted""#)));
    // The boundaries before the deletion fire first (R4 at 7d, R3 at 14d).
    let to_null: Vec<_> = out.iter().filter(|r| r.2.is_none()).cloned().collect();
    assert_eq!(
        to_null,
        vec![
            row("rfm", Some("about_to_sleep"), None, at, "event:del"),
            row("health", Some("red"), None, at, "event:del"),
            row("value", Some("tech_touch"), None, at, "event:del"),
            row("engagement", Some("on_the_fence"), None, at, "event:del"),
        ]
    );
    assert!(c.state.is_none());
    let mut out = Vec::new();
    assert_eq!(
        c.scorer.on_event(&mut c.state, &ev("del2", at, r#""type":"customer_deleted""#), &mut out),
        Outcome::DeletedUnknown
    );
    assert!(out.is_empty());
    // The same event id again: the erased customer's memory is gone too.
    let again = rows(&c.event(login("e1", at + 1)));
    assert_eq!(again[0], row("rfm", None, Some("new_customers"), at + 1, "event:e1"));
}

#[test]
fn custom_groups_first_match_wins() {
    let mut seg = SegmentsConfig::default();
    seg.custom.push(CustomGroupConfig {
        name: "expansion".into(),
        rules: vec![
            RuleConfig { segment: "fintech_upsell".into(), when: "profile.industry == 'fintech' and M >= 3".into() },
            RuleConfig { segment: "at_risk_revenue".into(), when: "M >= 3 and (R <= 2 or open_tickets > 0)".into() },
        ],
        default: "none".into(),
        min_dwell_ms: 0,
    });
    let mut c = Customer { scorer: Scorer::new(ScoringConfig::default(), seg).expect("valid"), state: None };
    let first = rows(&c.event(ev("s", T0, r#""type":"subscription","plan":"p","mrr_cents":20000,"status":"active""#)));
    assert_eq!(first.last(), Some(&row("expansion", None, Some("none"), T0, "event:s")));
    let t = rows(&c.event(ev("t", T0 + 1, r#""type":"ticket","ticket_id":"1","action":"opened","priority":"low""#)));
    assert!(t.contains(&row("expansion", Some("none"), Some("at_risk_revenue"), T0 + 1, "event:t")));
    let p = rows(&c.event(ev("p", T0 + 2, r#""type":"profile","industry":"fintech""#)));
    assert!(p.contains(&row("expansion", Some("at_risk_revenue"), Some("fintech_upsell"), T0 + 2, "event:p")));
}

#[test]
fn transition_ids_depend_on_customer_group_at_to_only() {
    let mut a = Customer::new();
    let x = a.event(login("e1", T0));
    let mut b = Customer::new();
    let y = b.event(login("other-id", T0));
    assert_eq!(x[0].transition_id(), y[0].transition_id());
    assert_ne!(x[0].transition_id(), x[1].transition_id());
}

#[test]
fn a_custom_rule_on_the_raw_active_day_count_has_its_own_boundaries() {
    // Two active days then one: F stays 1 throughout, so no built-in label
    // moves, but the custom rule does, at the instant day D0 leaves the window.
    let mut seg = SegmentsConfig::default();
    seg.custom.push(CustomGroupConfig {
        name: "habit".into(),
        rules: vec![RuleConfig { segment: "two_days".into(), when: "active_days >= 2".into() }],
        default: "fewer".into(),
        min_dwell_ms: 0,
    });
    let mut c = Customer { scorer: Scorer::new(ScoringConfig::default(), seg).expect("valid"), state: None };
    c.event(login("a", T0));
    let second = rows(&c.event(login("b", T0 + DAY_MS)));
    assert!(second.contains(&row("habit", Some("fewer"), Some("two_days"), T0 + DAY_MS, "event:b")));
    // R drops too as time passes; look at the habit group alone.
    let later: Vec<_> = rows(&c.until(T0 + 100 * DAY_MS)).into_iter().filter(|r| r.0 == "habit").collect();
    assert_eq!(later, vec![row("habit", Some("two_days"), Some("fewer"), (D0 + 90) * DAY_MS, "time:frequency")]);
}
