/// One validated input event (SPEC §1). Times are UTC epoch milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: String,
    pub customer_id: String,
    pub ts: i64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    Login {
        user_id: Option<String>,
    },
    Session {
        user_id: Option<String>,
        duration_s: i64,
    },
    FeatureUsed {
        user_id: Option<String>,
        feature: String,
    },
    WorkflowCompleted {
        user_id: Option<String>,
        workflow: String,
    },
    Subscription {
        plan: String,
        mrr_cents: i64,
        status: SubscriptionStatus,
    },
    Payment {
        amount_cents: i64,
        status: PaymentStatus,
    },
    Ticket {
        ticket_id: String,
        action: TicketAction,
        priority: Priority,
    },
    Nps {
        score: u8,
    },
    /// `attributes`: named values (technographics and the like), in the
    /// order sent; an empty list when the event carries none.
    Profile {
        industry: Option<String>,
        employees: Option<i64>,
        country: Option<String>,
        attributes: Vec<(String, AttrValue)>,
    },
    /// A needs or attitude answer (SPEC §1): the latest per question is kept.
    Survey {
        question: String,
        answer: Answer,
    },
    CustomerDeleted,
}

impl EventKind {
    /// The `type` string of this event.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Login { .. } => "login",
            EventKind::Session { .. } => "session",
            EventKind::FeatureUsed { .. } => "feature_used",
            EventKind::WorkflowCompleted { .. } => "workflow_completed",
            EventKind::Subscription { .. } => "subscription",
            EventKind::Payment { .. } => "payment",
            EventKind::Ticket { .. } => "ticket",
            EventKind::Nps { .. } => "nps",
            EventKind::Profile { .. } => "profile",
            EventKind::Survey { .. } => "survey",
            EventKind::CustomerDeleted => "customer_deleted",
        }
    }

    /// Activity events move `last_active` and `active_days` (SPEC §3).
    pub fn is_activity(&self) -> bool {
        matches!(
            self,
            EventKind::Login { .. }
                | EventKind::Session { .. }
                | EventKind::FeatureUsed { .. }
                | EventKind::WorkflowCompleted { .. }
        )
    }
}

/// A value of `profile.attributes`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AttrValue {
    Str(String),
    Num(f64),
    Bool(bool),
    List(Vec<String>),
}

/// The answer of a `survey` event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Answer {
    Str(String),
    Num(f64),
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALLOWED: &'static str = concat!($($text, " "),+);
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

string_enum!(
    /// `subscription.status`.
    SubscriptionStatus { Trialing => "trialing", Active => "active", PastDue => "past_due", Canceled => "canceled" }
);
string_enum!(
    /// `payment.status`.
    PaymentStatus { Succeeded => "succeeded", Failed => "failed", Refunded => "refunded" }
);
string_enum!(
    /// `ticket.action`.
    TicketAction { Opened => "opened", Closed => "closed" }
);
string_enum!(
    /// `ticket.priority`.
    Priority { Low => "low", Normal => "normal", High => "high", Urgent => "urgent" }
);
