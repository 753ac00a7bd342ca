//! Minimum dwell (`min_dwell_ms`): golden cases at the exact instants,
//! worked out by hand from the rule "a customer moves only after qualifying
//! for the new segment continuously for the dwell; the move is at the
//! instant the dwell completes" (qualifying over `[since, since + dwell)`).

use segstream_decode::{decode_json_line, Event, DAY_MS};
use segstream_scoring::{
    CustomGroupConfig, CustomerState, RuleConfig, Scorer, ScoringConfig, SegmentsConfig, Transition,
};

const T0: i64 = 1_767_225_600_000;
const H: i64 = 3_600_000;
const DWELL: i64 = 6 * H;

fn ev(id: &str, ts: i64, rest: &str) -> Event {
    let line = format!(r#"{{"event_id":"{id}","customer_id":"c","ts":{ts},{rest}}}"#);
    decode_json_line(line.as_bytes()).expect("test event is valid")
}

fn login(id: &str, ts: i64) -> Event {
    ev(id, ts, r#""type":"login""#)
}

fn payment(id: &str, ts: i64, status: &str) -> Event {
    ev(id, ts, &format!(r#""type":"payment","amount_cents":100,"status":"{status}""#))
}

/// (group, from, to, at, cause) of the transitions of `group`.
fn rows(ts: &[Transition], group: &str) -> Vec<(String, String, i64, String)> {
    ts.iter()
        .filter(|t| &*t.group == group)
        .map(|t| {
            let cause = match &t.cause {
                segstream_scoring::Cause::Event(id) => format!("event:{id}"),
                segstream_scoring::Cause::Time(k) => format!("time:{}", k.name()),
                segstream_scoring::Cause::Rules { .. } => "rules".into(),
                segstream_scoring::Cause::Requantile => "requantile".into(),
            };
            (t.from.as_deref().unwrap_or("-").into(), t.to.as_deref().unwrap_or("-").into(), t.at, cause)
        })
        .collect()
}

fn row(from: &str, to: &str, at: i64, cause: &str) -> (String, String, i64, String) {
    (from.into(), to.into(), at, cause.into())
}

/// A custom group `billing` (`failing` while the last payment failed, else
/// `ok`) with a dwell of six hours, and the rfm group with `rfm_dwell`.
fn scorer(rfm_dwell: u64) -> Scorer {
    let mut seg = SegmentsConfig::default();
    seg.rfm.min_dwell_ms = rfm_dwell;
    seg.custom = vec![CustomGroupConfig {
        name: "billing".into(),
        rules: vec![RuleConfig { segment: "failing".into(), when: "payment_failed == true".into() }],
        default: "ok".into(),
        min_dwell_ms: DWELL as u64,
    }];
    Scorer::new(ScoringConfig::default(), seg).expect("valid")
}

struct Customer {
    scorer: Scorer,
    state: Option<CustomerState>,
}

impl Customer {
    fn new(rfm_dwell: u64) -> Self {
        Self { scorer: scorer(rfm_dwell), state: None }
    }
    /// Like the engine: the boundaries up to the event's `ts`, then the event.
    fn event(&mut self, e: Event) -> Vec<Transition> {
        let mut out = self.until(e.ts);
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
    fn timer(&self) -> Option<i64> {
        self.state.as_ref().and_then(|s| s.timer)
    }
}

#[test]
fn a_move_waits_for_the_dwell_and_happens_at_its_last_millisecond_boundary() {
    let mut c = Customer::new(0);
    let created = c.event(login("l", T0));
    assert_eq!(rows(&created, "billing"), vec![row("-", "ok", T0, "event:l")], "a first label is at once");
    let t = T0 + H;
    assert!(rows(&c.event(payment("p1", t, "failed")), "billing").is_empty(), "qualifying is not moving");
    assert_eq!(c.timer(), Some(t + DWELL), "the dwell's end is a boundary");
    assert!(c.until(t + DWELL - 1).is_empty());
    assert_eq!(rows(&c.until(t + DWELL), "billing"), vec![row("ok", "failing", t + DWELL, "time:dwell")]);
}

#[test]
fn dropping_out_a_millisecond_before_the_dwell_ends_cancels_the_move_and_qualifying_again_starts_over() {
    let mut c = Customer::new(0);
    c.event(login("l", T0));
    let t = T0 + H;
    c.event(payment("p1", t, "failed"));
    let back = c.event(payment("p2", t + DWELL - 1, "succeeded"));
    assert!(rows(&back, "billing").is_empty(), "never moved: nothing to move back");
    assert!(rows(&c.until(t + 3 * DWELL), "billing").is_empty(), "the wait was cancelled");
    let again = t + 3 * DWELL;
    c.event(payment("p3", again, "failed"));
    assert_eq!(rows(&c.until(again + DWELL), "billing"), vec![row("ok", "failing", again + DWELL, "time:dwell")]);
}

#[test]
fn leaving_exactly_when_the_dwell_ends_still_moves_then_waits_to_move_back() {
    let mut c = Customer::new(0);
    c.event(login("l", T0));
    let t = T0 + H;
    c.event(payment("p1", t, "failed"));
    // Qualified over [t, t + DWELL): exactly the dwell. The move happens at
    // t + DWELL, before the event at that instant; the event starts the
    // wait to move back.
    let at_end = c.event(payment("p2", t + DWELL, "succeeded"));
    assert_eq!(rows(&at_end, "billing"), vec![row("ok", "failing", t + DWELL, "time:dwell")]);
    assert_eq!(rows(&c.until(t + 2 * DWELL), "billing"), vec![row("failing", "ok", t + 2 * DWELL, "time:dwell")]);
}

#[test]
fn a_late_event_waits_from_the_customers_last_evaluated_instant() {
    let mut c = Customer::new(0);
    c.event(login("l", T0));
    c.event(login("l2", T0 + 10 * H));
    // Late: its ts is before the customer's last evaluated instant, so it
    // counts from there (SPEC §2), and so does its wait.
    c.event(payment("p1", T0 + 5 * H, "failed"));
    assert_eq!(c.timer(), Some(T0 + 10 * H + DWELL));
    assert_eq!(
        rows(&c.until(T0 + 10 * H + DWELL), "billing"),
        vec![row("ok", "failing", T0 + 10 * H + DWELL, "time:dwell")]
    );
}

#[test]
fn a_time_driven_move_waits_too_and_a_longer_silence_moves_on_from_there() {
    // rfm with a one-day dwell: quiet after one login, R = 4 from day 7
    // (promising), R = 3 from day 14 (about_to_sleep) — each held a day later.
    let mut c = Customer::new(DAY_MS as u64);
    c.event(login("l", T0));
    let out = c.until(T0 + 20 * DAY_MS);
    assert_eq!(
        rows(&out, "rfm"),
        vec![
            row("new_customers", "promising", T0 + 8 * DAY_MS, "time:dwell"),
            row("promising", "about_to_sleep", T0 + 15 * DAY_MS, "time:dwell"),
        ]
    );
    // Without the dwell the same customer moves on days 7 and 14.
    let mut plain = Customer::new(0);
    plain.event(login("l", T0));
    let at: Vec<i64> = rows(&plain.until(T0 + 20 * DAY_MS), "rfm").iter().map(|r| r.2).collect();
    assert_eq!(at, vec![T0 + 7 * DAY_MS, T0 + 14 * DAY_MS]);
}

#[test]
fn a_dwell_longer_than_a_segment_lasts_skips_that_segment() {
    // Quiet: R = 4 on day 7 and R = 3 on day 14. A 10-day rfm dwell: the
    // customer qualifies for promising only 7 days, so it moves straight to
    // about_to_sleep, 10 days after day 14; R = 2 from day 30
    // (hibernating) is held 10 days later, day 40.
    let mut c = Customer::new(10 * DAY_MS as u64);
    c.event(login("l", T0));
    assert_eq!(
        rows(&c.until(T0 + 40 * DAY_MS), "rfm"),
        vec![
            row("new_customers", "about_to_sleep", T0 + 24 * DAY_MS, "time:dwell"),
            row("about_to_sleep", "hibernating", T0 + 40 * DAY_MS, "time:dwell"),
        ]
    );
}
