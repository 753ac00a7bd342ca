//! Answers about a state dir: a customer's segments, scores, facts and last
//! transitions; segment sizes and MRR; a segment's members; daily sizes.
//! Read from the state's own indexes (never a scan of every customer), by a
//! RocksDB secondary instance, so it runs next to the process writing the
//! state. The HTTP API over it is [`api`].

pub mod api;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use segstream_decode::{format_rfc3339_millis, Answer, AttrValue, DAY_MS};
use segstream_engine::{read_series, Clock, EngineSettings, SegmentCounts};
use segstream_scoring::{BoundaryKind, CustomerState, Group, Scorer};
use segstream_state::{HistoryEntry, StateStore};
use serde_json::{json, Map, Value};

/// How often a reader looks for what the writing process committed.
const CATCH_UP_EVERY: Duration = Duration::from_millis(500);

/// Why a question has no answer: a stable `code` for programs, the HTTP
/// status, a message for people, and the parameter at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub parameter: Option<&'static str>,
}

impl QueryError {
    pub fn not_found(code: &'static str, message: String) -> Self {
        Self { status: 404, code, message, parameter: None }
    }

    pub fn bad(parameter: &'static str, message: String) -> Self {
        Self { status: 400, code: "bad_parameter", message, parameter: Some(parameter) }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        Self { status: 500, code: "internal", message: e.to_string(), parameter: None }
    }

    pub fn body(&self) -> Value {
        let mut e = json!({ "code": self.code, "message": self.message });
        if let Some(p) = self.parameter {
            e["parameter"] = json!(p);
        }
        json!({ "error": e })
    }
}

/// A state dir opened for questions.
pub struct StateReader {
    store: Mutex<(StateStore, Instant)>,
    scorer: Scorer,
    /// Kept while the reader lives: the secondary instance's own files.
    _secondary: tempfile::TempDir,
}

fn ts(ms: i64) -> Value {
    if ms == i64::MIN {
        Value::Null
    } else {
        json!(format_rfc3339_millis(ms))
    }
}

impl StateReader {
    /// Opens `dir` (a state dir `segstream run` wrote with `settings`'
    /// scoring and segments) for reading.
    pub fn open(dir: &Path, settings: &EngineSettings) -> anyhow::Result<Self> {
        if !dir.join("CURRENT").exists() {
            anyhow::bail!("{} is not a state dir (no RocksDB database there)", dir.display());
        }
        let secondary = tempfile::Builder::new().prefix("segstream-reader-").tempdir()?;
        let store = StateStore::open_reader(dir, secondary.path())?;
        let fingerprint = settings.fingerprint();
        match store.meta("config_fingerprint")? {
            Some(v) if String::from_utf8_lossy(&v) == fingerprint.to_string() => {}
            Some(v) => anyhow::bail!(
                "{} was built with another scoring or segments configuration (fingerprint {}, this one {fingerprint}): \
                 pass the --config it was run with",
                dir.display(),
                String::from_utf8_lossy(&v)
            ),
            None => anyhow::bail!("{} has no configuration fingerprint: not a segstream state dir", dir.display()),
        }
        Ok(Self { store: Mutex::new((store, Instant::now())), scorer: settings.scorer(), _secondary: secondary })
    }

    /// Runs `f` on the store, after catching up with the writer if it is time.
    fn with_store<T>(&self, f: impl FnOnce(&StateStore) -> Result<T, QueryError>) -> Result<T, QueryError> {
        let mut guard = self.store.lock().map_err(|_| QueryError::internal("state reader poisoned"))?;
        let (store, last) = &mut *guard;
        if last.elapsed() >= CATCH_UP_EVERY {
            store.catch_up().map_err(QueryError::internal)?;
            *last = Instant::now();
        }
        f(store)
    }

    fn groups(&self) -> &[Group] {
        self.scorer.groups()
    }

    fn group(&self, name: &str) -> Result<(u16, &Group), QueryError> {
        self.groups().iter().enumerate().find(|(_, g)| &*g.name == name).map(|(i, g)| (i as u16, g)).ok_or_else(|| {
            let known: Vec<&str> = self.groups().iter().map(|g| &*g.name).collect();
            QueryError::not_found("unknown_group", format!("no segment group {name:?}; groups: {}", known.join(", ")))
        })
    }

    fn clock(store: &StateStore) -> Result<Clock, QueryError> {
        match store.meta("clock").map_err(QueryError::internal)? {
            Some(v) => serde_json::from_slice(&v).map_err(QueryError::internal),
            None => Ok(Clock::default()),
        }
    }

    fn label(&self, group: u16, label: Option<u16>) -> Value {
        match label {
            None => Value::Null,
            Some(l) => self
                .groups()
                .get(usize::from(group))
                .and_then(|g| g.segments.get(usize::from(l)))
                .map_or(Value::Null, |s| json!(&**s)),
        }
    }

    fn history_json(&self, e: &HistoryEntry) -> Value {
        let cause = match &e.event_id {
            Some(id) => json!({ "kind": "event", "event_id": id }),
            None => json!({ "kind": "time", "boundary": BoundaryKind::from_bits(e.boundary).name() }),
        };
        json!({
            "group": self.groups().get(usize::from(e.group)).map_or("", |g| &*g.name),
            "from": self.label(e.group, e.from),
            "to": self.label(e.group, e.to),
            "at": ts(e.at),
            "cause": cause,
            "scores": e.scores,
        })
    }

    /// `GET /v1/customers/{id}`; with `at`, the segments at that earlier
    /// instant as the kept history tells.
    pub fn customer(&self, id: &str, at: Option<i64>) -> Result<Value, QueryError> {
        self.with_store(|store| {
            let unknown = || QueryError::not_found("unknown_customer", format!("no customer {id:?} in this state"));
            let st = store.committed_customer(id).map_err(QueryError::internal)?.ok_or_else(unknown)?;
            let history = store.history(id).map_err(QueryError::internal)?;
            let clock = Self::clock(store)?;
            match at {
                None => Ok(self.customer_now(id, &st, &history, clock)),
                Some(t) => self.customer_at(id, &history, t),
            }
        })
    }

    fn customer_now(&self, id: &str, st: &CustomerState, history: &[HistoryEntry], clock: Clock) -> Value {
        let tau = clock.watermark.max(st.evaluated_at);
        let scores = self.scorer.scores(st, tau);
        let mut segments = Map::new();
        for (g, (group, &label)) in self.groups().iter().zip(&st.labels).enumerate() {
            // Entered at the last kept transition into it (absent: before the kept history).
            let since = history.iter().rev().find(|e| usize::from(e.group) == g && e.to == Some(label)).map(|e| e.at);
            segments.insert(
                group.name.to_string(),
                json!({ "segment": self.label(g as u16, Some(label)), "since": since.map_or(Value::Null, ts) }),
            );
        }
        let mut attributes = Map::new();
        let mut answers = Map::new();
        if let Some(extra) = &st.extra {
            for (name, v) in &extra.attributes {
                let v = match v {
                    AttrValue::Str(s) => json!(s),
                    AttrValue::Num(n) => json!(n),
                    AttrValue::Bool(b) => json!(b),
                    AttrValue::List(l) => json!(l),
                };
                attributes.insert(name.clone(), v);
            }
            for (q, a, _) in &extra.answers {
                answers.insert(
                    q.clone(),
                    match a {
                        Answer::Str(s) => json!(s),
                        Answer::Num(n) => json!(n),
                    },
                );
            }
        }
        json!({
            "customer_id": id,
            "as_of": ts(tau),
            "segments": segments,
            "scores": scores,
            "facts": {
                "first_seen": ts(st.first_seen),
                "last_active": st.last_active.map_or(Value::Null, ts),
                "active_days": scores.active_days,
                "features": scores.features,
                "mrr_cents": st.mrr_cents,
                "subscription_status": st.sub_status.map(|s| s.as_str()),
                "payment_failed": st.payment_failed,
                "open_tickets": st.open_tickets.len(),
                "nps": st.last_nps,
                "profile": {
                    "industry": st.profile.industry,
                    "employees": st.profile.employees,
                    "country": st.profile.country,
                    "attributes": attributes,
                },
                "survey": answers,
            },
            "next_boundary": st.timer.map_or(Value::Null, ts),
            "history": history.iter().rev().map(|e| self.history_json(e)).collect::<Vec<_>>(),
        })
    }

    fn customer_at(&self, id: &str, history: &[HistoryEntry], t: i64) -> Result<Value, QueryError> {
        let mut segments = Map::new();
        for (g, group) in self.groups().iter().enumerate() {
            let mine: Vec<&HistoryEntry> = history.iter().filter(|e| usize::from(e.group) == g).collect();
            let value = match mine.iter().rev().find(|e| e.at <= t) {
                Some(e) => json!({ "segment": self.label(g as u16, e.to), "since": ts(e.at) }),
                // Before its first transition: not a customer yet, if the
                // kept history starts with its creation.
                None if mine.first().is_some_and(|e| e.from.is_none()) => json!({ "segment": null, "since": null }),
                None => {
                    return Err(QueryError {
                        status: 422,
                        code: "before_history",
                        message: format!(
                            "{} is before the kept history of {id:?} (history.per_customer transitions are kept)",
                            format_rfc3339_millis(t)
                        ),
                        parameter: Some("at"),
                    })
                }
            };
            segments.insert(group.name.to_string(), value);
        }
        Ok(json!({ "customer_id": id, "as_of": ts(t), "segments": segments }))
    }

    fn counts(&self, store: &StateStore) -> SegmentCounts {
        store.segment_counts().clone()
    }

    /// `GET /v1/segments`: customers and MRR of every segment of every group.
    pub fn segments(&self) -> Result<Value, QueryError> {
        self.with_store(|store| {
            let counts = self.counts(store);
            let clock = Self::clock(store)?;
            let groups: Vec<Value> = self
                .groups()
                .iter()
                .enumerate()
                .map(|(g, group)| {
                    let segments: Vec<Value> = group
                        .segments
                        .iter()
                        .enumerate()
                        .map(|(l, name)| {
                            let c = counts.get(&(g as u16, l as u16)).copied().unwrap_or_default();
                            json!({ "segment": &**name, "customers": c.customers, "mrr_cents": c.mrr_cents })
                        })
                        .collect();
                    json!({ "group": &*group.name, "segments": segments })
                })
                .collect();
            Ok(json!({ "as_of": ts(clock.watermark), "groups": groups }))
        })
    }

    /// `GET /v1/segments/{group}/{segment}/customers`: members in customer
    /// id order, `limit` at a time after the cursor `after`.
    pub fn members(&self, group: &str, segment: &str, after: Option<&str>, limit: usize) -> Result<Value, QueryError> {
        let (g, grp) = self.group(group)?;
        let l = grp.segments.iter().position(|s| &**s == segment).ok_or_else(|| {
            let known: Vec<&str> = grp.segments.iter().map(|s| &**s).collect();
            QueryError::not_found(
                "unknown_segment",
                format!("group {group} has no segment {segment:?}; segments: {}", known.join(", ")),
            )
        })? as u16;
        self.with_store(|store| {
            // One more than asked: whether there is a next page.
            let mut ids = store.members(g, l, after, limit + 1).map_err(QueryError::internal)?;
            let more = ids.len() > limit;
            ids.truncate(limit);
            let next = if more { ids.last().cloned() } else { None };
            Ok(json!({ "group": group, "segment": segment, "customers": ids, "next": next }))
        })
    }

    /// `GET /v1/segments/{group}/history`: customers per segment at the end
    /// of each day from `from` to `to` (days, UTC), as the watermark passed it.
    pub fn history(&self, group: &str, from: Option<i64>, to: Option<i64>) -> Result<Value, QueryError> {
        let (g, grp) = self.group(group)?;
        self.with_store(|store| {
            let series = read_series(store).map_err(QueryError::internal)?;
            // The last day whose end the watermark has passed.
            let last = Self::clock(store)?.watermark.saturating_add(1).div_euclid(DAY_MS) - 1;
            let Some(first) = series.first().map(|s| s.0) else {
                return Ok(json!({ "group": group, "days": [] }));
            };
            let from_day = from.map_or(first, |t| t.div_euclid(DAY_MS));
            let to_day = to.map_or(last, |t| t.div_euclid(DAY_MS));
            if to_day < from_day {
                return Err(QueryError::bad("to", "to is before from".into()));
            }
            if to_day - from_day > 3660 {
                return Err(QueryError::bad("from", "at most ten years of days at a time".into()));
            }
            let mut days = Vec::new();
            let mut current: Option<&SegmentCounts> = None;
            let mut i = 0;
            for day in from_day..=to_day {
                while i < series.len() && series[i].0 <= day {
                    current = Some(&series[i].1);
                    i += 1;
                }
                if day > last {
                    break; // the watermark has not passed this day's end yet
                }
                let Some(counts) = current else { continue };
                let mut sizes = Map::new();
                for (l, name) in grp.segments.iter().enumerate() {
                    let c = counts.get(&(g, l as u16)).copied().unwrap_or_default();
                    sizes.insert(name.to_string(), json!(c.customers));
                }
                days.push(json!({ "day": &format_rfc3339_millis(day * DAY_MS)[..10], "customers": sizes }));
            }
            Ok(json!({ "group": group, "days": days }))
        })
    }
}
