//! One state dir opened for questions, next to the process that writes it.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use segstream_decode::{format_rfc3339_millis, Answer, AttrValue, DAY_MS};
use segstream_engine::{read_series, Clock, EngineSettings, QuantileMeta, SegmentCounts, META_QUANTILE};
use segstream_scoring::{BoundaryKind, CustomerState, Scorer};
use segstream_state::{HistoryEntry, StateStore};
use serde_json::{json, Map, Value};

use super::{counts_json, series_json, ts, Answers, Names, PartitionAsk, QueryError, Series};

/// How often a reader looks for what the writing process committed.
const CATCH_UP_EVERY: Duration = Duration::from_millis(500);

/// A state dir opened by a RocksDB secondary instance: it runs next to the
/// process writing the state and catches up with its commits.
pub struct StateReader {
    store: Mutex<(StateStore, Instant)>,
    /// The fingerprint of the rules this reader names labels with.
    fingerprint: String,
    scorer: Scorer,
    names: Names,
    /// Kept while the reader lives: the secondary instance's own files.
    _secondary: tempfile::TempDir,
}

impl StateReader {
    /// Opens `dir` (a state dir run with `settings`' scoring and segments).
    pub fn open(dir: &Path, settings: &EngineSettings) -> anyhow::Result<Self> {
        if !dir.join("CURRENT").exists() {
            anyhow::bail!("{} is not a state dir (no RocksDB database there)", dir.display());
        }
        let secondary = tempfile::Builder::new().prefix("segstream-reader-").tempdir()?;
        let store = StateStore::open_reader(dir, secondary.path())?;
        let fingerprint = settings.fingerprint();
        if let Some(m) = store
            .meta("rules:migration")?
            .and_then(|v| serde_json::from_slice::<Option<segstream_engine::MigrationProgress>>(&v).ok())
            .flatten()
        {
            anyhow::bail!(
                "a rule migration of {} from version {} to {} is under way or was interrupted ({} customers done): \
                 serve it once `segstream run` with the version-{} configuration has finished it",
                dir.display(),
                m.from.version,
                m.to.version,
                m.customers,
                m.to.version
            );
        }
        match store.meta("config_fingerprint")? {
            Some(v) if String::from_utf8_lossy(&v) == fingerprint.to_string() => {}
            Some(_) => anyhow::bail!(
                "{} was built with another scoring or segments configuration ({}): pass the --config it was run with",
                dir.display(),
                segstream_engine::rules_mismatch(store.meta("rules")?.as_deref(), &settings.rules_json())
            ),
            None => anyhow::bail!("{} has no configuration fingerprint: not a segstream state dir", dir.display()),
        }
        let scorer = settings.scorer();
        let names = Names::new(scorer.groups());
        Ok(Self {
            store: Mutex::new((store, Instant::now())),
            fingerprint: fingerprint.to_string(),
            scorer,
            names,
            _secondary: secondary,
        })
    }

    /// Runs `f` on the store, after catching up with the writer if it is time.
    fn with_store<T>(&self, f: impl FnOnce(&StateStore) -> Result<T, QueryError>) -> Result<T, QueryError> {
        let mut guard = self.store.lock().map_err(|_| QueryError::internal("state reader poisoned"))?;
        let (store, last) = &mut *guard;
        if last.elapsed() >= CATCH_UP_EVERY {
            store.catch_up().map_err(QueryError::internal)?;
            *last = Instant::now();
        }
        // The writer may have moved the state to other rules since this
        // reader opened (a rule migration): its labels are then not ours to
        // name. Asked of the store, which caches nothing: a meta read.
        let migrating = store.meta("rules:migration").map_err(QueryError::internal)?;
        if migrating.as_deref().is_some_and(|v| v != b"null") {
            return Err(QueryError::unavailable(
                "rule_migration",
                "a rule migration of the state is under way, or was interrupted (then `segstream run` with the \
                 new rules' configuration finishes it): segments mix both rules until it is done"
                    .into(),
                5,
            ));
        }
        let fingerprint = store.meta("config_fingerprint").map_err(QueryError::internal)?;
        if fingerprint.as_deref() != Some(self.fingerprint.as_bytes()) {
            return Err(QueryError::unavailable(
                "rules_changed",
                "the state was migrated to other rules since this server started: restart it with the \
                 configuration the state now runs with"
                    .into(),
                60,
            ));
        }
        f(store)
    }

    fn clock(store: &StateStore) -> Result<Clock, QueryError> {
        match store.meta("clock").map_err(QueryError::internal)? {
            Some(v) => serde_json::from_slice(&v).map_err(QueryError::internal),
            None => Ok(Clock::default()),
        }
    }

    /// Customers and MRR per segment, and the watermark.
    pub fn counts(&self) -> Result<(SegmentCounts, i64), QueryError> {
        self.with_store(|store| Ok((store.segment_counts().clone(), Self::clock(store)?.watermark)))
    }

    /// Up to `limit` members of a segment after `after`.
    pub fn member_ids(&self, g: u16, l: u16, after: Option<&str>, limit: usize) -> Result<Vec<String>, QueryError> {
        self.with_store(|store| store.members(g, l, after, limit).map_err(QueryError::internal))
    }

    /// The daily counts.
    pub fn series(&self) -> Result<Series, QueryError> {
        self.with_store(|store| {
            let days = read_series(store).map_err(QueryError::internal)?;
            // The last day whose end the watermark has passed.
            let last_day = Self::clock(store)?.watermark.saturating_add(1).div_euclid(DAY_MS) - 1;
            Ok(Series { days, last_day })
        })
    }

    /// Quantile mode: the last recomputation of the edges, as the writer committed it.
    fn quantile(&self, store: &StateStore) -> Result<Option<QuantileMeta>, QueryError> {
        if self.scorer.quantile_min_customers().is_none() {
            return Ok(None);
        }
        match store.meta(META_QUANTILE).map_err(QueryError::internal)? {
            Some(v) => serde_json::from_slice::<Option<QuantileMeta>>(&v).map_err(QueryError::internal),
            None => Ok(None),
        }
    }

    fn history_json(&self, e: &HistoryEntry) -> Value {
        let cause = match (&e.event_id, e.rules) {
            (_, Some((from, to))) => json!({ "kind": "rules", "from_version": from, "to_version": to }),
            (None, None) if e.boundary == BoundaryKind::REQUANTILE => json!({ "kind": "requantile" }),
            (Some(id), None) => json!({ "kind": "event", "event_id": id }),
            (None, None) => json!({ "kind": "time", "boundary": BoundaryKind::from_bits(e.boundary).name() }),
        };
        // A migration out of a segment the rules no longer have keeps its name.
        let from = match (&e.event_id, e.rules, e.from) {
            (Some(name), Some(_), None) => json!(name),
            _ => self.names.label(e.group, e.from),
        };
        json!({
            "group": self.names.groups().get(usize::from(e.group)).map_or("", |g| &*g.name),
            "from": from,
            "to": self.names.label(e.group, e.to),
            "at": ts(e.at),
            "cause": cause,
            "scores": e.scores,
        })
    }

    /// `GET /v1/customers/{id}`; with `at`, the segments at that earlier
    /// instant as the kept history tells.
    pub fn customer_json(&self, id: &str, at: Option<i64>) -> Result<Value, QueryError> {
        self.with_store(|store| {
            let unknown = || QueryError::not_found("unknown_customer", format!("no customer {id:?} in this state"));
            let st = store.committed_customer(id).map_err(QueryError::internal)?.ok_or_else(unknown)?;
            let history = store.history(id).map_err(QueryError::internal)?;
            let clock = Self::clock(store)?;
            match at {
                None => match self.quantile(store)? {
                    // Scores under the edges in force, not the configured ones.
                    Some(q) => {
                        let mut scorer = self.scorer.clone();
                        scorer.set_edges(&q.edges);
                        Ok(self.customer_now(&scorer, id, &st, &history, clock))
                    }
                    None => Ok(self.customer_now(&self.scorer, id, &st, &history, clock)),
                },
                Some(t) => self.customer_at(id, &history, t),
            }
        })
    }

    fn customer_now(
        &self,
        scorer: &Scorer,
        id: &str,
        st: &CustomerState,
        history: &[HistoryEntry],
        clock: Clock,
    ) -> Value {
        let tau = clock.watermark.max(st.evaluated_at);
        let scores = scorer.scores(st, tau);
        let mut segments = Map::new();
        for (g, (group, &label)) in self.names.groups().iter().zip(&st.labels).enumerate() {
            // Entered at the last kept transition into it (absent: before the kept history).
            let since = history.iter().rev().find(|e| usize::from(e.group) == g && e.to == Some(label)).map(|e| e.at);
            let mut entry =
                json!({ "segment": self.names.label(g as u16, Some(label)), "since": since.map_or(Value::Null, ts) });
            // A move waiting for the group's minimum dwell.
            if let Some((_, to, from)) = st.pending.iter().find(|p| usize::from(p.0) == g) {
                entry["qualifies_for"] = json!({
                    "segment": self.names.label(g as u16, Some(*to)),
                    "since": ts(*from),
                    "moves_at": ts(from.saturating_add(self.scorer.min_dwell(g))),
                });
            }
            segments.insert(group.name.to_string(), entry);
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
                let a = match a {
                    Answer::Str(s) => json!(s),
                    Answer::Num(n) => json!(n),
                };
                answers.insert(q.clone(), a);
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
        for (g, group) in self.names.groups().iter().enumerate() {
            let mine: Vec<&HistoryEntry> = history.iter().filter(|e| usize::from(e.group) == g).collect();
            let value = match mine.iter().rev().find(|e| e.at <= t) {
                Some(e) => json!({ "segment": self.names.label(g as u16, e.to), "since": ts(e.at) }),
                // Before its first transition: not a customer yet, if the
                // kept history starts with its creation.
                None if mine.first().is_some_and(|e| e.from.is_none()) => json!({ "segment": null, "since": null }),
                None => {
                    return Err(QueryError {
                        parameter: Some("at"),
                        ..QueryError::new(
                            422,
                            "before_history",
                            format!(
                                "{} is before the kept history of {id:?} (history.per_customer transitions are kept)",
                                format_rfc3339_millis(t)
                            ),
                        )
                    })
                }
            };
            segments.insert(group.name.to_string(), value);
        }
        Ok(json!({ "customer_id": id, "as_of": ts(t), "segments": segments }))
    }

    /// Quantile mode: the edges in force (the configured thresholds until a
    /// recomputation changed them) and the last recomputation, as
    /// `/v1/segments` shows them.
    pub fn quantile_json(&self) -> Result<Option<Value>, QueryError> {
        if self.scorer.quantile_min_customers().is_none() {
            return Ok(None);
        }
        let q = self.with_store(|store| self.quantile(store))?;
        let edges = q.as_ref().map_or_else(|| self.scorer.edges(), |q| q.edges);
        Ok(Some(json!({
            "edges": edges,
            "since": q.as_ref().and_then(|q| q.since).map_or(Value::Null, ts),
            "computed_at": q.as_ref().map_or(Value::Null, |q| ts(q.computed_at)),
            "customers": q.as_ref().map(|q| q.customers),
            "from_population": q.as_ref().is_some_and(|q| q.from_population),
        })))
    }

    /// A partition's own answers, as another instance asks for them.
    pub fn partition_answer(&self, ask: PartitionAsk) -> Result<Value, QueryError> {
        let mut answer = match ask {
            PartitionAsk::Counts => {
                let (counts, watermark) = self.counts()?;
                let quantile = self.quantile_json()?.unwrap_or(Value::Null);
                json!({ "watermark": watermark, "counts": counts_json(&counts), "quantile": quantile })
            }
            PartitionAsk::Members { group, segment, after, limit } => {
                let (g, l) = self.names.segment(&group, &segment)?;
                json!({ "customers": self.member_ids(g, l, after.as_deref(), limit)? })
            }
            PartitionAsk::Series => series_json(&self.series()?),
        };
        // Counts go by group and segment index: the asker checks that they
        // are indexes of its own rules.
        answer["rules"] = json!(self.fingerprint);
        Ok(answer)
    }
}

/// File mode: the one state dir answers everything.
impl Answers for StateReader {
    fn customer(&self, id: &str, at: Option<i64>, _query: &str) -> Result<Value, QueryError> {
        self.customer_json(id, at)
    }

    fn segments(&self) -> Result<Value, QueryError> {
        let (counts, watermark) = self.counts()?;
        let mut answer = self.names.segments(&counts, watermark);
        if let Some(q) = self.quantile_json()? {
            answer["quantile"] = q;
        }
        Ok(answer)
    }

    fn members(&self, group: &str, segment: &str, after: Option<&str>, limit: usize) -> Result<Value, QueryError> {
        let (g, l) = self.names.segment(group, segment)?;
        Ok(Names::members(group, segment, self.member_ids(g, l, after, limit + 1)?, limit))
    }

    fn history(&self, group: &str, from: Option<i64>, to: Option<i64>) -> Result<Value, QueryError> {
        self.names.group(group)?;
        self.names.history(group, &[self.series()?], from, to)
    }

    fn partition(&self, _partition: i32, _ask: PartitionAsk) -> Result<Value, QueryError> {
        Err(QueryError::not_found("not_found", "file mode has no partitions".into()))
    }
}
