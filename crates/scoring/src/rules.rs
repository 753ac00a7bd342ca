//! The condition language of custom segment rules.
//!
//! ```text
//! expr    := and ("or" and)*
//! and     := unary ("and" unary)*
//! unary   := "not" unary | "(" expr ")" | operand (op operand)?
//! op      := "==" | "!=" | "<" | "<=" | ">" | ">="
//! operand := metric | profile.FIELD | attr.NAME | survey.QUESTION | number | "string" | true | false
//! ```
//! `x in attr.NAME` holds when the list attribute NAME contains the string x.
//! `attr.` and `survey.` names are checked when evaluated, not at load (their
//! values' types are the data's).
//! A bare operand is true when it is `true` or a non-zero number. A comparison
//! with an absent value (a profile field never sent, no NPS answer) is false,
//! whatever the operator, so `not (x == 1)` is how to say "x is not 1 or unknown".

use std::fmt;

/// The values a rule can read, at one instant.
pub trait RuleInput {
    fn metric(&self, m: Metric) -> Val<'_>;
    /// `attr.NAME`: a profile attribute.
    fn attr(&self, _name: &str) -> Val<'_> {
        Val::Absent
    }
    /// `survey.QUESTION`: the latest answer.
    fn answer(&self, _question: &str) -> Val<'_> {
        Val::Absent
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Val<'a> {
    Num(f64),
    Str(&'a str),
    Bool(bool),
    List(&'a [String]),
    Absent,
}

macro_rules! metrics {
    ($($variant:ident => $name:literal),+ $(,)?) => {
        /// Everything a rule may name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Metric { $($variant),+ }
        impl Metric {
            pub const NAMES: &'static [&'static str] = &[$($name),+];
            fn parse(s: &str) -> Option<Self> {
                match s { $($name => Some(Metric::$variant),)+ _ => None }
            }
        }
    };
}

metrics!(
    R => "R", F => "F", M => "M", Adoption => "adoption", Health => "health",
    Engagement => "engagement", Recency => "recency", Support => "support",
    Billing => "billing", Sentiment => "sentiment", ActiveDays => "active_days",
    MrrCents => "mrr_cents", OpenTickets => "open_tickets", Nps => "nps",
    SubStatus => "sub_status", PaymentFailed => "payment_failed",
    Industry => "profile.industry", Employees => "profile.employees", Country => "profile.country",
);

/// What kind of value a name or a literal is, for checking rules at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Num,
    Str,
    Bool,
    /// A string from a fixed list.
    Enum(&'static [&'static str]),
    /// Known only from the data (`attr.`, `survey.`).
    Dynamic,
}

impl Kind {
    fn describe(self) -> String {
        match self {
            Kind::Num => "a number".into(),
            Kind::Str => "a string".into(),
            Kind::Bool => "true or false".into(),
            Kind::Enum(values) => format!("one of {}", values.join(", ")),
            Kind::Dynamic => "the data's".into(),
        }
    }
}

const SUB_STATUSES: &[&str] = &["trialing", "active", "past_due", "canceled"];

impl Metric {
    fn kind(self) -> Kind {
        match self {
            Metric::SubStatus => Kind::Enum(SUB_STATUSES),
            Metric::PaymentFailed => Kind::Bool,
            Metric::Industry | Metric::Country => Kind::Str,
            _ => Kind::Num,
        }
    }
}

impl Operand {
    fn kind(&self) -> Kind {
        match self {
            Operand::Metric(m) => m.kind(),
            Operand::Num(_) => Kind::Num,
            Operand::Str(_) => Kind::Str,
            Operand::Bool(_) => Kind::Bool,
            Operand::Attr(_) | Operand::Survey(_) => Kind::Dynamic,
        }
    }

    fn shown(&self) -> String {
        match self {
            Operand::Metric(m) => format!("`{}`", Metric::NAMES[*m as usize]),
            Operand::Num(n) => format!("`{n}`"),
            Operand::Str(s) => format!("`\"{s}\"`"),
            Operand::Bool(b) => format!("`{b}`"),
            Operand::Attr(n) => format!("`attr.{n}`"),
            Operand::Survey(q) => format!("`survey.{q}`"),
        }
    }
}

/// Whether `l op r` can ever hold: a comparison that cannot (a number with a
/// string, a status that does not exist) would silently always be false.
fn check(l: &Operand, op: Op, r: &Operand) -> Result<(), String> {
    let (kl, kr) = (l.kind(), r.kind());
    if op == Op::In {
        return match (kl, kr) {
            (Kind::Str | Kind::Dynamic, Kind::Dynamic) => Ok(()),
            _ => Err(format!(
                "`in` takes a string on its left and a list attribute (attr.NAME) on its right, not {} and {}",
                l.shown(),
                r.shown()
            )),
        };
    }
    if kl == Kind::Dynamic || kr == Kind::Dynamic {
        return Ok(());
    }
    let mismatch =
        || format!("{} is {}, {} is {}: they never compare equal", l.shown(), kl.describe(), r.shown(), kr.describe());
    match (kl, kr) {
        (Kind::Num, Kind::Num) | (Kind::Str, Kind::Str) | (Kind::Bool, Kind::Bool) => {}
        (Kind::Enum(a), Kind::Enum(b)) if a == b => {}
        (Kind::Enum(values), Kind::Str) | (Kind::Str, Kind::Enum(values)) => {
            let lit = if let Operand::Str(s) = r {
                s
            } else if let Operand::Str(s) = l {
                s
            } else {
                return Ok(());
            };
            if !values.contains(&lit.as_str()) {
                return Err(format!("`\"{lit}\"` is not a value of this name, which is one of {}", values.join(", ")));
            }
        }
        _ => return Err(mismatch()),
    }
    if matches!(op, Op::Lt | Op::Le | Op::Gt | Op::Ge) && matches!(kl, Kind::Bool | Kind::Enum(_)) {
        return Err(format!("{} is {}: compare it with == or !=", l.shown(), kl.describe()));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    In,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Metric(Metric),
    Num(f64),
    Str(String),
    Bool(bool),
    Attr(String),
    Survey(String),
}

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition(Expr);

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(Operand, Op, Operand),
    Truthy(Operand),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad rule condition `{input}` at column {column}: {message}")]
pub struct RuleError {
    pub input: String,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Num(f64),
    Str(String),
    Op(Op),
    LParen,
    RParen,
}

fn tokenize(input: &str) -> Result<Vec<(usize, Tok)>, (usize, String)> {
    let b = input.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push((start, Tok::LParen));
                i += 1;
            }
            b')' => {
                out.push((start, Tok::RParen));
                i += 1;
            }
            b'=' | b'!' | b'<' | b'>' => {
                let two = b.get(i + 1) == Some(&b'=');
                let op = match (c, two) {
                    (b'=', true) => Op::Eq,
                    (b'!', true) => Op::Ne,
                    (b'<', true) => Op::Le,
                    (b'>', true) => Op::Ge,
                    (b'<', false) => Op::Lt,
                    (b'>', false) => Op::Gt,
                    _ => return Err((start, "expected `==` or `!=`".into())),
                };
                out.push((start, Tok::Op(op)));
                i += if two { 2 } else { 1 };
            }
            b'"' | b'\'' => {
                let end = input[i + 1..].find(c as char).ok_or((start, "unterminated string".to_string()))?;
                out.push((start, Tok::Str(input[i + 1..i + 1 + end].to_string())));
                i += end + 2;
            }
            b'0'..=b'9' | b'-' | b'.' => {
                while i < b.len() && (b[i].is_ascii_digit() || matches!(b[i], b'.' | b'-' | b'_' | b'e' | b'E')) {
                    i += 1;
                }
                let text: String = input[start..i].chars().filter(|c| *c != '_').collect();
                let n = text.parse::<f64>().map_err(|_| (start, format!("bad number `{text}`")))?;
                out.push((start, Tok::Num(n)));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.')) {
                    i += 1;
                }
                out.push((start, Tok::Ident(input[start..i].to_string())));
            }
            _ => return Err((start, format!("unexpected character `{}`", c as char))),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }
    fn col(&self) -> usize {
        self.toks.get(self.pos).map_or(self.len, |(c, _)| *c)
    }
    fn keyword(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(s)) if s == kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn or(&mut self) -> Result<Expr, (usize, String)> {
        let mut left = self.and()?;
        while self.keyword("or") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Expr, (usize, String)> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }
    fn unary(&mut self) -> Result<Expr, (usize, String)> {
        if self.keyword("not") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let inner = self.or()?;
            if self.peek() != Some(&Tok::RParen) {
                return Err((self.col(), "expected `)`".into()));
            }
            self.pos += 1;
            return Ok(inner);
        }
        let col = self.col();
        let left = self.operand()?;
        let op = match self.peek() {
            Some(Tok::Op(op)) => Some(*op),
            Some(Tok::Ident(s)) if s == "in" => Some(Op::In),
            _ => None,
        };
        if let Some(op) = op {
            self.pos += 1;
            let right = self.operand()?;
            check(&left, op, &right).map_err(|m| (col, m))?;
            return Ok(Expr::Cmp(left, op, right));
        }
        Ok(Expr::Truthy(left))
    }
    fn operand(&mut self) -> Result<Operand, (usize, String)> {
        let col = self.col();
        let tok = self.toks.get(self.pos).map(|(_, t)| t.clone());
        self.pos += 1;
        match tok {
            Some(Tok::Num(n)) => Ok(Operand::Num(n)),
            Some(Tok::Str(s)) => Ok(Operand::Str(s)),
            Some(Tok::Ident(s)) if s == "true" => Ok(Operand::Bool(true)),
            Some(Tok::Ident(s)) if s == "false" => Ok(Operand::Bool(false)),
            Some(Tok::Ident(s)) if s.starts_with("attr.") && s.len() > 5 => Ok(Operand::Attr(s[5..].to_string())),
            Some(Tok::Ident(s)) if s.starts_with("survey.") && s.len() > 7 => Ok(Operand::Survey(s[7..].to_string())),
            Some(Tok::Ident(s)) => Metric::parse(&s)
                .map(Operand::Metric)
                .ok_or((col, format!("unknown name `{s}` (known: {})", Metric::NAMES.join(", ")))),
            Some(t) => Err((col, format!("unexpected {t:?}"))),
            None => Err((col, "unexpected end of condition".into())),
        }
    }
}

impl Condition {
    pub fn parse(input: &str) -> Result<Self, RuleError> {
        let err =
            |(column, message): (usize, String)| RuleError { input: input.to_string(), column: column + 1, message };
        let toks = tokenize(input).map_err(err)?;
        let mut p = Parser { toks, pos: 0, len: input.len() };
        let c = p.or().map_err(err)?;
        if p.pos < p.toks.len() {
            return Err(err((p.col(), "unexpected trailing input".into())));
        }
        Ok(Condition(c))
    }

    pub fn eval(&self, input: &dyn RuleInput) -> bool {
        self.0.eval(input)
    }

    /// Whether the condition reads metric `m`.
    pub fn uses(&self, m: Metric) -> bool {
        self.0.uses(m)
    }
}

impl Expr {
    fn uses(&self, m: Metric) -> bool {
        let op = |o: &Operand| matches!(o, Operand::Metric(x) if *x == m);
        match self {
            Expr::Or(a, b) | Expr::And(a, b) => a.uses(m) || b.uses(m),
            Expr::Not(a) => a.uses(m),
            Expr::Cmp(a, _, b) => op(a) || op(b),
            Expr::Truthy(o) => op(o),
        }
    }

    fn eval(&self, input: &dyn RuleInput) -> bool {
        match self {
            Expr::Or(a, b) => a.eval(input) || b.eval(input),
            Expr::And(a, b) => a.eval(input) && b.eval(input),
            Expr::Not(a) => !a.eval(input),
            Expr::Truthy(o) => match value(o, input) {
                Val::Bool(b) => b,
                Val::Num(n) => n != 0.0,
                Val::Str(s) => !s.is_empty(),
                Val::List(l) => !l.is_empty(),
                Val::Absent => false,
            },
            Expr::Cmp(l, op, r) => compare(value(l, input), *op, value(r, input)),
        }
    }
}

fn value<'a>(o: &'a Operand, input: &'a dyn RuleInput) -> Val<'a> {
    match o {
        Operand::Metric(m) => input.metric(*m),
        Operand::Num(n) => Val::Num(*n),
        Operand::Str(s) => Val::Str(s),
        Operand::Bool(b) => Val::Bool(*b),
        Operand::Attr(n) => input.attr(n),
        Operand::Survey(q) => input.answer(q),
    }
}

fn compare(l: Val<'_>, op: Op, r: Val<'_>) -> bool {
    use std::cmp::Ordering;
    if op == Op::In {
        return matches!((l, r), (Val::Str(s), Val::List(list)) if list.iter().any(|x| x == s));
    }
    let ord: Option<Ordering> = match (l, r) {
        (Val::Num(a), Val::Num(b)) => a.partial_cmp(&b),
        (Val::Str(a), Val::Str(b)) => Some(a.cmp(b)),
        (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(&b)),
        _ => None,
    };
    let Some(ord) = ord else { return false };
    match op {
        Op::Eq => ord == Ordering::Equal,
        Op::Ne => ord != Ordering::Equal,
        Op::Lt => ord == Ordering::Less,
        Op::Le => ord != Ordering::Greater,
        Op::Gt => ord == Ordering::Greater,
        Op::Ge => ord != Ordering::Less,
        Op::In => false, // handled above
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = *self as usize;
        f.write_str(Metric::NAMES[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl RuleInput for Fixed {
        fn metric(&self, m: Metric) -> Val<'_> {
            match m {
                Metric::R => Val::Num(4.0),
                Metric::MrrCents => Val::Num(120_000.0),
                Metric::Industry => Val::Str("fintech"),
                Metric::PaymentFailed => Val::Bool(false),
                _ => Val::Absent,
            }
        }
    }

    fn t(s: &str) -> bool {
        Condition::parse(s).expect("parses").eval(&Fixed)
    }

    #[test]
    fn evaluates() {
        assert!(t("R >= 4"));
        assert!(!t("R > 4"));
        assert!(t("R == 4 and mrr_cents >= 100_000"));
        assert!(t("R < 2 or profile.industry == 'fintech'"));
        assert!(t("not payment_failed"));
        assert!(t("not (R == 5) and (profile.industry != \"retail\")"));
        assert!(t("true"));
        // absent values never compare true
        assert!(!t("profile.country == 'DE'"));
        assert!(!t("profile.country != 'DE'"));
        assert!(t("not (profile.country == 'DE')"));
        assert!(!t("nps >= 0"));
        // precedence: and binds tighter than or
        assert!(t("R == 1 and R == 2 or R == 4"));
    }

    #[test]
    fn errors_name_the_column() {
        let e = Condition::parse("R >= 4 and bogus > 1").expect_err("unknown name");
        assert_eq!(e.column, 12);
        assert!(e.message.contains("unknown name `bogus`"));
        assert!(Condition::parse("R >=").is_err());
        assert!(Condition::parse("(R >= 4").is_err());
        assert!(Condition::parse("R = 4").is_err());
        assert!(Condition::parse("R >= 4 4").is_err());
        assert!(Condition::parse("'open").is_err());
    }

    #[test]
    fn comparisons_that_can_never_hold_are_refused_at_load() {
        let e = Condition::parse("R >= 2 and health == \"high\"").expect_err("number vs string");
        assert!(e.message.contains("`health` is a number") && e.column == 12, "{e}");
        let e = Condition::parse("sub_status == 'pastdue'").expect_err("no such status");
        assert!(e.message.contains("past_due"), "{e}");
        assert!(Condition::parse("payment_failed > false").is_err(), "true/false has no order");
        assert!(Condition::parse("profile.industry == 3").is_err());
        assert!(Condition::parse("M == true").is_err());
        for ok in [
            "sub_status == \"past_due\" or payment_failed == true",
            "'canceled' != sub_status",
            "profile.industry == \"fintech\" and profile.employees >= 50",
            "nps <= 6 and health < R",
        ] {
            Condition::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    struct Named;
    impl RuleInput for Named {
        fn metric(&self, _: Metric) -> Val<'_> {
            Val::Absent
        }
        fn attr(&self, name: &str) -> Val<'_> {
            static LIST: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
            match name {
                "crm" => Val::Str("salesforce"),
                "integrations" => Val::List(LIST.get_or_init(|| vec!["slack".into(), "jira".into()])),
                "seats" => Val::Num(12.0),
                _ => Val::Absent,
            }
        }
        fn answer(&self, q: &str) -> Val<'_> {
            match q {
                "role" => Val::Str("admin"),
                "ease_of_task" => Val::Num(6.0),
                _ => Val::Absent,
            }
        }
    }

    #[test]
    fn attributes_and_survey_answers_in_rules() {
        let t = |c: &str| Condition::parse(c).unwrap_or_else(|e| panic!("{c}: {e}")).eval(&Named);
        assert!(t("attr.crm == \"salesforce\" and \"slack\" in attr.integrations"));
        assert!(!t("\"github\" in attr.integrations"));
        assert!(!t("\"slack\" in attr.crm"), "not a list: false");
        assert!(t("survey.role == 'admin' and survey.ease_of_task >= 5 and attr.seats > 10"));
        assert!(!t("survey.unasked == 'x'"), "an answer never given is absent");
        assert!(!t("attr.missing == 1") && !t("not (attr.missing == 1) and attr.missing"));
        assert!(Condition::parse("\"x\" in 3").is_err(), "`in` needs a list attribute");
        assert!(Condition::parse("attr. == 1").is_err());
    }
}
