//! Answers about segments and customers: a customer's segments, scores,
//! facts and last transitions; segment sizes and MRR; a segment's members;
//! daily sizes. Read from the state's own indexes (never a scan of every
//! customer). File mode answers from one state dir ([`StateReader`]); Kafka
//! mode from every instance's partitions ([`cluster::KafkaQuery`]). The HTTP
//! API over either is [`api`].

pub mod api;
pub mod cluster;
mod reader;

use std::collections::BTreeMap;

use segstream_decode::{format_rfc3339_millis, DAY_MS};
use segstream_engine::SegmentCounts;
use segstream_scoring::Group;
use segstream_state::SegmentCount;
use serde_json::{json, Map, Value};

pub use reader::StateReader;

/// Why a question has no answer here: the HTTP status, a stable `code` for
/// programs, a message for people, the parameter at fault; a redirect's
/// target; when to ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub parameter: Option<&'static str>,
    /// `307`: where the answer is.
    pub location: Option<String>,
    /// `503`: seconds after which to ask again.
    pub retry_after: Option<u32>,
}

impl QueryError {
    pub fn new(status: u16, code: &'static str, message: String) -> Self {
        Self { status, code, message, parameter: None, location: None, retry_after: None }
    }

    pub fn not_found(code: &'static str, message: String) -> Self {
        Self::new(404, code, message)
    }

    pub fn bad(parameter: &'static str, message: String) -> Self {
        Self { parameter: Some(parameter), ..Self::new(400, "bad_parameter", message) }
    }

    /// Not answerable now (a partition restoring, an owner not known yet).
    pub fn unavailable(code: &'static str, message: String, retry_after: u32) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(503, code, message) }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(500, "internal", e.to_string())
    }

    pub fn body(&self) -> Value {
        let mut e = json!({ "code": self.code, "message": self.message });
        if let Some(p) = self.parameter {
            e["parameter"] = json!(p);
        }
        if let Some(l) = &self.location {
            e["location"] = json!(l);
        }
        json!({ "error": e })
    }
}

/// One partition's (or one state dir's) daily counts: the days whose counts
/// changed, oldest first, and the last day whose end its watermark passed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub days: Vec<(i64, SegmentCounts)>,
    pub last_day: i64,
}

/// What the API answers, from one state dir or from a whole group.
pub trait Answers: Send + Sync {
    /// `query`: the request's query string, for a redirect.
    fn customer(&self, id: &str, at: Option<i64>, query: &str) -> Result<Value, QueryError>;
    fn segments(&self) -> Result<Value, QueryError>;
    fn members(&self, group: &str, segment: &str, after: Option<&str>, limit: usize) -> Result<Value, QueryError>;
    fn history(&self, group: &str, from: Option<i64>, to: Option<i64>) -> Result<Value, QueryError>;
    /// One partition's own answers (Kafka mode, between instances).
    fn partition(&self, partition: i32, ask: PartitionAsk) -> Result<Value, QueryError>;
}

/// What one instance asks another about a partition it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionAsk {
    Counts,
    Members { group: String, segment: String, after: Option<String>, limit: usize },
    Series,
}

pub(crate) fn ts(ms: i64) -> Value {
    if ms == i64::MIN {
        Value::Null
    } else {
        json!(format_rfc3339_millis(ms))
    }
}

/// Counts as exchanged between instances: `[[group, segment, customers, mrr_cents], …]`.
pub(crate) fn counts_json(counts: &SegmentCounts) -> Value {
    json!(counts.iter().map(|((g, l), c)| json!([g, l, c.customers, c.mrr_cents])).collect::<Vec<_>>())
}

pub(crate) fn counts_from_json(v: &Value) -> Result<SegmentCounts, QueryError> {
    let bad = || QueryError::internal(format!("unreadable counts from another instance: {v}"));
    let mut out = BTreeMap::new();
    for row in v.as_array().ok_or_else(bad)? {
        let n = |i: usize| row.get(i).and_then(Value::as_i64).ok_or_else(bad);
        let (g, l) = (u16::try_from(n(0)?).map_err(|_| bad())?, u16::try_from(n(1)?).map_err(|_| bad())?);
        out.insert((g, l), SegmentCount { customers: n(2)?, mrr_cents: n(3)? });
    }
    Ok(out)
}

pub(crate) fn series_json(s: &Series) -> Value {
    let days: Vec<Value> = s.days.iter().map(|(d, c)| json!([d, counts_json(c)])).collect();
    json!({ "last_day": s.last_day, "days": days })
}

pub(crate) fn series_from_json(v: &Value) -> Result<Series, QueryError> {
    let bad = || QueryError::internal(format!("unreadable daily counts from another instance: {v}"));
    let mut days = Vec::new();
    for d in v["days"].as_array().ok_or_else(bad)? {
        days.push((d[0].as_i64().ok_or_else(bad)?, counts_from_json(&d[1])?));
    }
    Ok(Series { days, last_day: v["last_day"].as_i64().ok_or_else(bad)? })
}

/// Group and segment names of the configuration (the same for every
/// partition: a state is bound to its configuration), and the answers'
/// JSON shapes.
pub struct Names {
    groups: Vec<Group>,
}

impl Names {
    pub fn new(groups: &[Group]) -> Self {
        Self { groups: groups.to_vec() }
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn group(&self, name: &str) -> Result<(u16, &Group), QueryError> {
        self.groups.iter().enumerate().find(|(_, g)| &*g.name == name).map(|(i, g)| (i as u16, g)).ok_or_else(|| {
            let known: Vec<&str> = self.groups.iter().map(|g| &*g.name).collect();
            QueryError::not_found("unknown_group", format!("no segment group {name:?}; groups: {}", known.join(", ")))
        })
    }

    pub fn segment(&self, group: &str, segment: &str) -> Result<(u16, u16), QueryError> {
        let (g, grp) = self.group(group)?;
        let l = grp.segments.iter().position(|s| &**s == segment).ok_or_else(|| {
            let known: Vec<&str> = grp.segments.iter().map(|s| &**s).collect();
            QueryError::not_found(
                "unknown_segment",
                format!("group {group} has no segment {segment:?}; segments: {}", known.join(", ")),
            )
        })?;
        Ok((g, l as u16))
    }

    pub fn label(&self, group: u16, label: Option<u16>) -> Value {
        match label {
            None => Value::Null,
            Some(l) => self
                .groups
                .get(usize::from(group))
                .and_then(|g| g.segments.get(usize::from(l)))
                .map_or(Value::Null, |s| json!(&**s)),
        }
    }

    /// `GET /v1/segments`.
    pub fn segments(&self, counts: &SegmentCounts, watermark: i64) -> Value {
        let groups: Vec<Value> = self
            .groups
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
        json!({ "as_of": ts(watermark), "groups": groups })
    }

    /// `GET /v1/segments/{group}/{segment}/customers` from up to `limit + 1`
    /// ids in order (one more than asked tells whether a next page exists).
    pub fn members(group: &str, segment: &str, mut ids: Vec<String>, limit: usize) -> Value {
        let more = ids.len() > limit;
        ids.truncate(limit);
        let next = if more { ids.last().cloned() } else { None };
        json!({ "group": group, "segment": segment, "customers": ids, "next": next })
    }

    /// `GET /v1/segments/{group}/history` over the daily counts of one or
    /// more sources (partitions), summed day by day: up to the last day every
    /// source's watermark passed.
    pub fn history(
        &self,
        group: &str,
        sources: &[Series],
        from: Option<i64>,
        to: Option<i64>,
    ) -> Result<Value, QueryError> {
        let (g, grp) = self.group(group)?;
        let Some(first) = sources.iter().filter_map(|s| s.days.first().map(|d| d.0)).min() else {
            return Ok(json!({ "group": group, "days": [] }));
        };
        // Up to the last day every partition with data has passed (one that
        // never had an event has no say).
        let last = sources.iter().filter(|s| !s.days.is_empty()).map(|s| s.last_day).min().unwrap_or(first);
        let from_day = from.map_or(first, |t| t.div_euclid(DAY_MS)).max(first);
        let to_day = to.map_or(last, |t| t.div_euclid(DAY_MS)).min(last);
        if let (Some(f), Some(t)) = (from, to) {
            if t < f {
                return Err(QueryError::bad("to", "to is before from".into()));
            }
        }
        if to_day.saturating_sub(from_day) > 3660 {
            return Err(QueryError::bad("from", "at most ten years of days at a time".into()));
        }
        let mut days = Vec::new();
        let mut at = vec![0usize; sources.len()];
        let mut current: Vec<Option<&SegmentCounts>> = vec![None; sources.len()];
        for day in first..=to_day {
            for (i, s) in sources.iter().enumerate() {
                while at[i] < s.days.len() && s.days[at[i]].0 <= day {
                    current[i] = Some(&s.days[at[i]].1);
                    at[i] += 1;
                }
            }
            if day < from_day {
                continue;
            }
            let mut sizes = Map::new();
            for (l, name) in grp.segments.iter().enumerate() {
                let n: i64 = current.iter().flatten().map(|c| c.get(&(g, l as u16)).map_or(0, |c| c.customers)).sum();
                sizes.insert(name.to_string(), json!(n));
            }
            days.push(json!({ "day": &format_rfc3339_millis(day * DAY_MS)[..10], "customers": sizes }));
        }
        Ok(json!({ "group": group, "days": days }))
    }
}
