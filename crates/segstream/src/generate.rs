//! Realistic sample data: SaaS accounts of several kinds over a few months,
//! written in event-time order as JSON lines or an Avro container file.
//!
//! Deterministic for a given seed, and generated day by day so that memory
//! stays proportional to the number of customers, not of events.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use segstream_decode::{
    event_schema, event_to_avro_value, event_to_json, Answer, AttrValue, Event, EventKind, PaymentStatus, Priority,
    SubscriptionStatus, TicketAction, DAY_MS,
};

use segstream_decode::Format;

/// The kinds of account in a sample, with their share of customers (percent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archetype {
    /// Daily, broad feature use, high MRR, promoters.
    Champion,
    /// A few days a week, mid MRR.
    Steady,
    /// Active, then fading out towards the end.
    Declining,
    /// Active, then gone mid-way; the subscription is canceled.
    Churning,
    /// Signed up in the last weeks, trialing first.
    New,
    /// Logs in a lot, uses almost no features.
    SurfaceActive,
    /// Active, with failed payments and a past-due subscription.
    PaymentTrouble,
    /// Active, with many open high-priority tickets and detractor NPS.
    SupportHeavy,
}

const MIX: [(Archetype, u32); 8] = [
    (Archetype::Champion, 12),
    (Archetype::Steady, 25),
    (Archetype::Declining, 12),
    (Archetype::Churning, 10),
    (Archetype::New, 10),
    (Archetype::SurfaceActive, 12),
    (Archetype::PaymentTrouble, 9),
    (Archetype::SupportHeavy, 10),
];

const FEATURES: [&str; 8] = ["dashboards", "reports", "alerts", "api", "sso", "exports", "workflows", "integrations"];
const INDUSTRIES: [&str; 5] = ["fintech", "healthcare", "retail", "saas", "manufacturing"];
const COUNTRIES: [&str; 5] = ["US", "DE", "FR", "GB", "BR"];

#[derive(Debug, Clone)]
pub struct GenerateArgs {
    pub customers: u64,
    pub days: u32,
    /// Epoch ms of the first day (UTC midnight recommended).
    pub start_ms: i64,
    pub seed: u64,
    pub format: Format,
    /// Write an invalid record after every this many valid ones (JSON: five
    /// kinds in rotation; Avro: an unknown event type).
    pub invalid_every: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenerateStats {
    pub events: u64,
    pub invalid: u64,
    /// Epoch ms just after the last generated day: a natural `--until`.
    pub end_ms: i64,
}

struct Customer {
    id: String,
    kind: Archetype,
    start_day: u32,
    /// Last day with activity (churning/declining accounts stop early).
    stop_day: u32,
    mrr: i64,
    features: usize,
    seq: u64,
    /// (day it closes, ticket id, priority)
    open_tickets: Vec<(u32, String, Priority)>,
    deleted_on: Option<u32>,
}

impl Customer {
    fn next_id(&mut self) -> String {
        self.seq += 1;
        format!("{}-{}", self.id, self.seq)
    }
}

fn pick_archetype(rng: &mut StdRng) -> Archetype {
    let total: u32 = MIX.iter().map(|(_, w)| w).sum();
    let mut x = rng.random_range(0..total);
    for (a, w) in MIX {
        if x < w {
            return a;
        }
        x -= w;
    }
    Archetype::Steady
}

fn new_customer(i: u64, days: u32, rng: &mut StdRng) -> Customer {
    let kind = pick_archetype(rng);
    let early = rng.random_range(0..days.clamp(1, 10));
    let (start_day, stop_day, mrr, features) = match kind {
        Archetype::Champion => (early, days, rng.random_range(150_000..600_000), 6),
        Archetype::Steady => (early, days, rng.random_range(20_000..150_000), 3),
        Archetype::Declining => (early, days * rng.random_range(55..80) / 100, rng.random_range(30_000..250_000), 4),
        Archetype::Churning => (early, days * rng.random_range(35..60) / 100, rng.random_range(5_000..60_000), 2),
        Archetype::New => (days.saturating_sub(rng.random_range(3..25)), days, rng.random_range(5_000..40_000), 3),
        Archetype::SurfaceActive => (early, days, rng.random_range(10_000..80_000), 1),
        Archetype::PaymentTrouble => (early, days, rng.random_range(20_000..120_000), 3),
        Archetype::SupportHeavy => (early, days, rng.random_range(50_000..300_000), 4),
    };
    let deleted_on = (rng.random_range(0..1000) < 3).then(|| rng.random_range(start_day..days.max(start_day + 1)));
    Customer {
        id: format!("cus_{i:07}"),
        kind,
        start_day,
        stop_day,
        mrr,
        features,
        seq: 0,
        open_tickets: Vec::new(),
        deleted_on,
    }
}

fn activity_probability(c: &Customer, day: u32) -> f64 {
    if day > c.stop_day {
        return 0.0;
    }
    match c.kind {
        Archetype::Champion => 0.85,
        Archetype::Steady => 0.2,
        Archetype::Declining => {
            let span = f64::from(c.stop_day.saturating_sub(c.start_day).max(1));
            0.75 * (1.0 - f64::from(day - c.start_day) / span).max(0.1)
        }
        Archetype::Churning => 0.6,
        Archetype::New => 0.6,
        Archetype::SurfaceActive => 0.7,
        Archetype::PaymentTrouble => 0.35,
        Archetype::SupportHeavy => 0.4,
    }
}

fn day_events(c: &mut Customer, day: u32, day_ms: i64, rng: &mut StdRng, out: &mut Vec<Event>) {
    if day < c.start_day || c.deleted_on.is_some_and(|d| day > d) {
        return;
    }
    let at = |rng: &mut StdRng| day_ms + rng.random_range(0..DAY_MS);
    let cid = c.id.clone();
    let mut push = |c: &mut Customer, ts: i64, kind: EventKind| {
        out.push(Event { event_id: c.next_id(), customer_id: cid.clone(), ts, kind });
    };
    let age = day - c.start_day;
    if age == 0 {
        // Technographics from the id, so they draw nothing from the
        // generator (the rest of a sample stays as it was before them).
        let n: usize = c.id.bytes().map(usize::from).sum();
        let integrations: Vec<String> = ["slack", "jira", "github"]
            .iter()
            .enumerate()
            .filter(|(i, _)| n >> i & 1 == 1)
            .map(|(_, s)| s.to_string())
            .collect();
        let profile = EventKind::Profile {
            industry: Some(INDUSTRIES[rng.random_range(0..INDUSTRIES.len())].into()),
            employees: Some(rng.random_range(5..5000)),
            country: Some(COUNTRIES[rng.random_range(0..COUNTRIES.len())].into()),
            attributes: vec![
                ("crm".into(), AttrValue::Str(["salesforce", "hubspot", "none"][n % 3].into())),
                ("integrations".into(), AttrValue::List(integrations)),
                ("platform".into(), AttrValue::Str(if n.is_multiple_of(4) { "mobile" } else { "web" }.into())),
            ],
        };
        push(c, day_ms + 1000, profile);
        if n.is_multiple_of(3) {
            let role = ["admin", "analyst", "developer"][n / 3 % 3];
            push(c, day_ms + 3000, EventKind::Survey { question: "role".into(), answer: Answer::Str(role.into()) });
            let ease = (n % 7 + 1) as f64;
            push(c, day_ms + 3001, EventKind::Survey { question: "ease_of_task".into(), answer: Answer::Num(ease) });
        }
        let status = if c.kind == Archetype::New { SubscriptionStatus::Trialing } else { SubscriptionStatus::Active };
        let mrr = if status == SubscriptionStatus::Trialing { 0 } else { c.mrr };
        push(c, day_ms + 2000, EventKind::Subscription { plan: plan(c.mrr).into(), mrr_cents: mrr, status });
    }
    if c.kind == Archetype::New && age == 14 {
        push(
            c,
            at(rng),
            EventKind::Subscription { plan: plan(c.mrr).into(), mrr_cents: c.mrr, status: SubscriptionStatus::Active },
        );
    }
    if c.kind == Archetype::Churning && day == c.stop_day + 10 {
        push(
            c,
            at(rng),
            EventKind::Subscription {
                plan: plan(c.mrr).into(),
                mrr_cents: c.mrr,
                status: SubscriptionStatus::Canceled,
            },
        );
    }
    // Monthly invoice.
    if age > 0 && age.is_multiple_of(30) && !(c.kind == Archetype::Churning && day > c.stop_day + 10) {
        let failed = c.kind == Archetype::PaymentTrouble && rng.random_bool(0.6);
        let status = if failed { PaymentStatus::Failed } else { PaymentStatus::Succeeded };
        push(c, at(rng), EventKind::Payment { amount_cents: c.mrr, status });
        if failed {
            push(
                c,
                at(rng),
                EventKind::Subscription {
                    plan: plan(c.mrr).into(),
                    mrr_cents: c.mrr,
                    status: SubscriptionStatus::PastDue,
                },
            );
        }
    }
    if c.kind == Archetype::PaymentTrouble && age % 30 == 12 && rng.random_bool(0.5) {
        push(c, at(rng), EventKind::Payment { amount_cents: c.mrr, status: PaymentStatus::Succeeded });
        push(
            c,
            at(rng),
            EventKind::Subscription { plan: plan(c.mrr).into(), mrr_cents: c.mrr, status: SubscriptionStatus::Active },
        );
    }
    if rng.random_bool(activity_probability(c, day)) {
        let user = Some(format!("u{}", rng.random_range(1..8)));
        push(c, at(rng), EventKind::Login { user_id: user.clone() });
        if c.kind != Archetype::SurfaceActive || rng.random_bool(0.1) {
            push(c, at(rng), EventKind::Session { user_id: user.clone(), duration_s: rng.random_range(30..3600) });
            for f in FEATURES.iter().take(c.features) {
                if rng.random_bool(0.35) {
                    push(c, at(rng), EventKind::FeatureUsed { user_id: user.clone(), feature: (*f).into() });
                }
            }
            if rng.random_bool(0.2) {
                push(c, at(rng), EventKind::WorkflowCompleted { user_id: user, workflow: "onboarding".into() });
            }
        }
    }
    let ticket_rate = if c.kind == Archetype::SupportHeavy { 0.15 } else { 0.01 };
    if day <= c.stop_day && rng.random_bool(ticket_rate) {
        let priority = [Priority::Low, Priority::Normal, Priority::High, Priority::Urgent][rng.random_range(0..4)];
        let ticket_id = format!("t{}-{}", c.id, c.seq);
        push(c, at(rng), EventKind::Ticket { ticket_id: ticket_id.clone(), action: TicketAction::Opened, priority });
        let closes_after =
            if c.kind == Archetype::SupportHeavy { rng.random_range(5..40) } else { rng.random_range(1..5) };
        c.open_tickets.push((day + closes_after, ticket_id, priority));
    }
    if age > 0 && age.is_multiple_of(45) && rng.random_bool(0.5) {
        let score = match c.kind {
            Archetype::Champion => rng.random_range(9..=10),
            Archetype::SupportHeavy | Archetype::Churning => rng.random_range(0..=6),
            _ => rng.random_range(5..=9),
        };
        push(c, at(rng), EventKind::Nps { score });
    }
    if c.deleted_on == Some(day) {
        push(c, day_ms + DAY_MS - 1, EventKind::CustomerDeleted);
    }
}

fn plan(mrr: i64) -> &'static str {
    match mrr {
        m if m >= 200_000 => "enterprise",
        m if m >= 50_000 => "business",
        _ => "team",
    }
}

enum Sink {
    Json(BufWriter<File>),
    Avro(Box<apache_avro::Writer<'static, BufWriter<File>>>),
}

/// Writes a sample to `path`.
pub fn generate(args: &GenerateArgs, path: &Path) -> anyhow::Result<GenerateStats> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut sink = match args.format {
        Format::Json => Sink::Json(BufWriter::with_capacity(1 << 20, file)),
        Format::Avro => {
            Sink::Avro(Box::new(apache_avro::Writer::new(event_schema(), BufWriter::with_capacity(1 << 20, file))))
        }
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut customers: Vec<Customer> = (0..args.customers).map(|i| new_customer(i, args.days, &mut rng)).collect();
    let mut stats = GenerateStats::default();
    let mut day_buf = Vec::new();
    for day in 0..args.days {
        let day_ms = args.start_ms + i64::from(day) * DAY_MS;
        day_buf.clear();
        for c in &mut customers {
            day_events(c, day, day_ms, &mut rng, &mut day_buf);
            // Tickets due to close today, at the very end of the day.
            let (closing, open): (Vec<_>, Vec<_>) =
                std::mem::take(&mut c.open_tickets).into_iter().partition(|t| t.0 == day);
            c.open_tickets = open;
            if c.deleted_on.is_some_and(|d| day >= d) {
                continue;
            }
            for (_, ticket_id, priority) in closing {
                let event_id = c.next_id();
                day_buf.push(Event {
                    event_id,
                    customer_id: c.id.clone(),
                    ts: day_ms + DAY_MS - 2,
                    kind: EventKind::Ticket { ticket_id, action: TicketAction::Closed, priority },
                });
            }
        }
        day_buf.sort_by(|a, b| (a.ts, &a.event_id).cmp(&(b.ts, &b.event_id)));
        for e in &day_buf {
            match &mut sink {
                Sink::Json(w) => {
                    w.write_all(event_to_json(e).as_bytes())?;
                    w.write_all(b"\n")?;
                    if args.invalid_every.is_some_and(|n| (stats.events + 1).is_multiple_of(n)) {
                        w.write_all(invalid_line(stats.invalid, e).as_bytes())?;
                        w.write_all(b"\n")?;
                        stats.invalid += 1;
                    }
                }
                Sink::Avro(w) => {
                    w.append(event_to_avro_value(e)).map_err(|err| anyhow::anyhow!("avro: {err}"))?;
                    if args.invalid_every.is_some_and(|n| (stats.events + 1).is_multiple_of(n)) {
                        // Valid Avro, invalid event: a type SPEC does not know.
                        let mut v = event_to_avro_value(e);
                        if let apache_avro::types::Value::Record(fields) = &mut v {
                            for (name, value) in fields.iter_mut() {
                                match name.as_str() {
                                    "type" => *value = apache_avro::types::Value::String("signup".into()),
                                    "event_id" => {
                                        *value = apache_avro::types::Value::String(format!("bad-{}", stats.invalid))
                                    }
                                    _ => {}
                                }
                            }
                        }
                        w.append(v).map_err(|err| anyhow::anyhow!("avro: {err}"))?;
                        stats.invalid += 1;
                    }
                }
            }
            stats.events += 1;
        }
    }
    match sink {
        Sink::Json(mut w) => w.flush()?,
        Sink::Avro(w) => {
            let mut inner = w.into_inner().map_err(|err| anyhow::anyhow!("avro: {err}"))?;
            inner.flush()?;
        }
    }
    stats.end_ms = args.start_ms + i64::from(args.days) * DAY_MS;
    Ok(stats)
}

/// One of several kinds of broken record, in rotation.
fn invalid_line(n: u64, near: &Event) -> String {
    let ts = near.ts;
    let c = &near.customer_id;
    match n % 5 {
        0 => format!(r#"{{"event_id":"bad-{n}","customer_id":"{c}","type":"signup","ts":{ts}}}"#),
        1 => format!(r#"{{"event_id":"bad-{n}","customer_id":"{c}","type":"nps","ts":{ts},"score":11}}"#),
        2 => format!(r#"{{"event_id":"bad-{n}","customer_id":"{c}","type":"login","ts":"yesterday"}}"#),
        3 => format!(r#"{{"event_id":"bad-{n}","type":"login","ts":{ts}}}"#),
        _ => format!(r#"{{"event_id":"bad-{n}","customer_id":"{c}","type":"login","ts":{ts}"#),
    }
}
