//! The one validation path shared by every decoder: a decoder exposes the raw
//! record through [`Fields`], and [`build_event`] checks it against SPEC §1.

use std::borrow::Cow;

use crate::error::DecodeError;
use crate::event::{Answer, AttrValue, Event, EventKind, PaymentStatus, Priority, SubscriptionStatus, TicketAction};

/// Typed access to one field of a raw record. `Ok(None)` means absent or null;
/// a present value of the wrong type is an error naming the field.
pub(crate) trait Fields {
    /// A string field, borrowed from the record where it can be.
    fn text(&self, name: &'static str) -> Result<Option<Cow<'_, str>>, DecodeError>;
    /// A string field, owned, within its size limit.
    fn string(&self, name: &'static str) -> Result<Option<String>, DecodeError> {
        let Some(s) = self.text(name)? else { return Ok(None) };
        let max = if matches!(name, "event_id" | "customer_id") { MAX_ID_BYTES } else { MAX_TEXT_BYTES };
        if s.len() > max {
            return Err(DecodeError::TooLarge { field: name, len: s.len(), max });
        }
        Ok(Some(s.into_owned()))
    }
    fn integer(&self, name: &'static str) -> Result<Option<i64>, DecodeError>;
    /// `answer`: a string or a number.
    fn answer(&self) -> Result<Option<Answer>, DecodeError>;
    /// `attributes`: an object of strings, numbers, booleans and lists of strings.
    fn attributes(&self) -> Result<Option<Vec<(String, AttrValue)>>, DecodeError>;
    /// A timestamp: an RFC 3339 string or integer epoch milliseconds.
    fn timestamp(&self, name: &'static str) -> Result<Option<i64>, DecodeError>;
}

/// Largest `event_id` and `customer_id`, bytes. A customer id is the key of
/// every record written for it (transitions, changelog), so an unbounded one
/// could make a record too large to produce.
pub const MAX_ID_BYTES: usize = 512;
/// Largest other string field (plan, feature, profile fields…), bytes.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Largest record (a JSON line, a wire-format message), bytes.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Most attributes one `profile` event may carry, and most strings in one
/// attribute's list.
pub const MAX_ATTRIBUTES: usize = 64;

/// Checks a decoded `attributes` object against the limits.
pub(crate) fn checked_attributes(attrs: Vec<(String, AttrValue)>) -> Result<Vec<(String, AttrValue)>, DecodeError> {
    let too = |field, len, max| Err(DecodeError::TooLarge { field, len, max });
    if attrs.len() > MAX_ATTRIBUTES {
        return too("attributes", attrs.len(), MAX_ATTRIBUTES);
    }
    for (name, v) in &attrs {
        if name.is_empty() || name.len() > 128 {
            return Err(DecodeError::OutOfRange {
                field: "attributes",
                value: clip(name),
                reason: "names must be 1 to 128 bytes",
            });
        }
        match v {
            AttrValue::Str(s) if s.len() > MAX_TEXT_BYTES => return too("attributes", s.len(), MAX_TEXT_BYTES),
            AttrValue::List(l) if l.len() > MAX_ATTRIBUTES => return too("attributes", l.len(), MAX_ATTRIBUTES),
            AttrValue::List(l) => {
                if let Some(s) = l.iter().find(|s| s.len() > MAX_TEXT_BYTES) {
                    return too("attributes", s.len(), MAX_TEXT_BYTES);
                }
            }
            AttrValue::Num(n) if !n.is_finite() => {
                return Err(DecodeError::OutOfRange {
                    field: "attributes",
                    value: n.to_string(),
                    reason: "must be finite",
                })
            }
            _ => {}
        }
    }
    Ok(attrs)
}

/// At most the first 64 characters of `s`, for error messages.
pub fn clip(s: &str) -> String {
    if s.len() <= 64 {
        return s.to_string();
    }
    let cut = (0..=64).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
    format!("{}…", &s[..cut])
}

/// 0001-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z, epoch ms.
pub const MIN_TS: i64 = -62_135_596_800_000;
pub const MAX_TS: i64 = 253_402_300_799_999;

fn required<T>(v: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::MissingField { field })
}

fn non_empty(f: &impl Fields, field: &'static str) -> Result<String, DecodeError> {
    let s = required(f.string(field)?, field)?;
    if s.is_empty() {
        return Err(DecodeError::OutOfRange { field, value: "\"\"".into(), reason: "must not be empty" });
    }
    Ok(s)
}

fn non_negative(f: &impl Fields, field: &'static str) -> Result<i64, DecodeError> {
    let v = required(f.integer(field)?, field)?;
    if v < 0 {
        return Err(DecodeError::OutOfRange { field, value: v.to_string(), reason: "must be >= 0" });
    }
    Ok(v)
}

fn enum_field<T>(
    f: &impl Fields,
    field: &'static str,
    parse: fn(&str) -> Option<T>,
    allowed: &'static str,
) -> Result<T, DecodeError> {
    let s = required(f.text(field)?, field)?;
    parse(&s).ok_or_else(|| DecodeError::BadEnum { field, value: clip(&s), allowed })
}

pub(crate) fn build_event(f: &impl Fields) -> Result<Event, DecodeError> {
    let event_id = non_empty(f, "event_id")?;
    let customer_id = non_empty(f, "customer_id")?;
    let type_name = required(f.text("type")?, "type")?;
    let ts = required(f.timestamp("ts")?, "ts")?;
    if !(MIN_TS..=MAX_TS).contains(&ts) {
        // Keeps every instant arithmetic of the engine (ts + windows) in range.
        return Err(DecodeError::BadTimestamp {
            value: ts.to_string(),
            reason: "outside the years 0001 to 9999".into(),
        });
    }
    let kind = match type_name.as_ref() {
        "login" => EventKind::Login { user_id: f.string("user_id")? },
        "session" => EventKind::Session { user_id: f.string("user_id")?, duration_s: non_negative(f, "duration_s")? },
        "feature_used" => EventKind::FeatureUsed { user_id: f.string("user_id")?, feature: non_empty(f, "feature")? },
        "workflow_completed" => {
            EventKind::WorkflowCompleted { user_id: f.string("user_id")?, workflow: non_empty(f, "workflow")? }
        }
        "subscription" => EventKind::Subscription {
            plan: required(f.string("plan")?, "plan")?,
            mrr_cents: non_negative(f, "mrr_cents")?,
            status: enum_field(f, "status", SubscriptionStatus::parse, SubscriptionStatus::ALLOWED)?,
        },
        "payment" => EventKind::Payment {
            amount_cents: non_negative(f, "amount_cents")?,
            status: enum_field(f, "status", PaymentStatus::parse, PaymentStatus::ALLOWED)?,
        },
        "ticket" => EventKind::Ticket {
            ticket_id: non_empty(f, "ticket_id")?,
            action: enum_field(f, "action", TicketAction::parse, TicketAction::ALLOWED)?,
            priority: enum_field(f, "priority", Priority::parse, Priority::ALLOWED)?,
        },
        "nps" => {
            let score = required(f.integer("score")?, "score")?;
            if !(0..=10).contains(&score) {
                return Err(DecodeError::OutOfRange {
                    field: "score",
                    value: score.to_string(),
                    reason: "nps score must be 0..10",
                });
            }
            EventKind::Nps { score: score as u8 }
        }
        "profile" => {
            let employees = f.integer("employees")?;
            if let Some(e) = employees.filter(|e| *e < 0) {
                return Err(DecodeError::OutOfRange {
                    field: "employees",
                    value: e.to_string(),
                    reason: "must be >= 0",
                });
            }
            EventKind::Profile {
                industry: f.string("industry")?,
                employees,
                country: f.string("country")?,
                attributes: f.attributes()?.unwrap_or_default(),
            }
        }
        "survey" => {
            let answer = required(f.answer()?, "answer")?;
            match &answer {
                Answer::Str(s) if s.len() > MAX_TEXT_BYTES => {
                    return Err(DecodeError::TooLarge { field: "answer", len: s.len(), max: MAX_TEXT_BYTES })
                }
                Answer::Num(n) if !n.is_finite() => {
                    return Err(DecodeError::OutOfRange {
                        field: "answer",
                        value: n.to_string(),
                        reason: "must be finite",
                    })
                }
                _ => {}
            }
            EventKind::Survey { question: non_empty(f, "question")?, answer }
        }
        "customer_deleted" => EventKind::CustomerDeleted,
        _ => return Err(DecodeError::UnknownType(clip(&type_name))),
    };
    Ok(Event { event_id, customer_id, ts, kind })
}

/// Field names of the flat record layout shared by JSON and the Avro schema.
pub(crate) const FIELD_NAMES: [&str; 22] = [
    "event_id",
    "customer_id",
    "type",
    "ts",
    "user_id",
    "duration_s",
    "feature",
    "workflow",
    "plan",
    "mrr_cents",
    "status",
    "amount_cents",
    "ticket_id",
    "action",
    "priority",
    "score",
    "industry",
    "employees",
    "country",
    "question",
    "answer",
    "attributes",
];

/// The flat `(field, value)` view of an event, the inverse of [`build_event`].
pub(crate) enum FlatValue<'a> {
    Str(&'a str),
    Int(i64),
    Answer(&'a Answer),
    Attributes(&'a [(String, AttrValue)]),
}

pub(crate) fn flatten(e: &Event) -> Vec<(&'static str, FlatValue<'_>)> {
    use FlatValue::{Int, Str};
    let mut v = vec![
        ("event_id", Str(e.event_id.as_str())),
        ("customer_id", Str(e.customer_id.as_str())),
        ("type", Str(e.kind.type_name())),
        ("ts", Int(e.ts)),
    ];
    match &e.kind {
        EventKind::Login { user_id } => push_opt(&mut v, "user_id", user_id),
        EventKind::Session { user_id, duration_s } => {
            push_opt(&mut v, "user_id", user_id);
            v.push(("duration_s", Int(*duration_s)));
        }
        EventKind::FeatureUsed { user_id, feature } => {
            push_opt(&mut v, "user_id", user_id);
            v.push(("feature", Str(feature)));
        }
        EventKind::WorkflowCompleted { user_id, workflow } => {
            push_opt(&mut v, "user_id", user_id);
            v.push(("workflow", Str(workflow)));
        }
        EventKind::Subscription { plan, mrr_cents, status } => {
            v.push(("plan", Str(plan)));
            v.push(("mrr_cents", Int(*mrr_cents)));
            v.push(("status", Str(status.as_str())));
        }
        EventKind::Payment { amount_cents, status } => {
            v.push(("amount_cents", Int(*amount_cents)));
            v.push(("status", Str(status.as_str())));
        }
        EventKind::Ticket { ticket_id, action, priority } => {
            v.push(("ticket_id", Str(ticket_id)));
            v.push(("action", Str(action.as_str())));
            v.push(("priority", Str(priority.as_str())));
        }
        EventKind::Nps { score } => v.push(("score", Int(i64::from(*score)))),
        EventKind::Profile { industry, employees, country, attributes } => {
            push_opt(&mut v, "industry", industry);
            if let Some(n) = employees {
                v.push(("employees", Int(*n)));
            }
            push_opt(&mut v, "country", country);
            if !attributes.is_empty() {
                v.push(("attributes", FlatValue::Attributes(attributes)));
            }
        }
        EventKind::Survey { question, answer } => {
            v.push(("question", Str(question)));
            v.push(("answer", FlatValue::Answer(answer)));
        }
        EventKind::CustomerDeleted => {}
    }
    v
}

fn push_opt<'a>(v: &mut Vec<(&'static str, FlatValue<'a>)>, name: &'static str, s: &'a Option<String>) {
    if let Some(s) = s {
        v.push((name, FlatValue::Str(s)));
    }
}
