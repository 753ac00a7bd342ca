//! Kafka mode: any instance answers for the whole group. A customer's
//! partition comes from the input producers' partitioner
//! (`kafka.key_partitioner`); a partition owned here is read from its state
//! dir, one owned elsewhere is redirected to (a customer) or asked (sizes,
//! members, daily sizes) at the URL its owner wrote into the changelog's
//! owner record (`kafka.http_advertised_url`). A partition being restored
//! answers 503 with `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use segstream_engine::{EngineSettings, SegmentCounts};
use segstream_kafka::owners::{partition_for_key, OwnerDirectory};
use segstream_kafka::{KafkaSettings, Metrics, PartitionState};
use serde_json::Value;

use super::{counts_from_json, series_from_json, Answers, Names, PartitionAsk, QueryError, Series, StateReader};

/// How long another instance may take to answer.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KafkaQuery {
    names: Names,
    engine: EngineSettings,
    kafka: KafkaSettings,
    metrics: Arc<Metrics>,
    owners: Mutex<OwnerDirectory>,
    /// Readers of the partitions owned here, by assignment.
    readers: Mutex<HashMap<i32, (u64, Arc<StateReader>)>>,
    http: ureq::Agent,
}

fn encode(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

impl KafkaQuery {
    pub fn new(engine: EngineSettings, kafka: KafkaSettings, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let owners = Mutex::new(OwnerDirectory::new(&kafka)?);
        let http = ureq::Agent::config_builder()
            .timeout_global(Some(REMOTE_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .new_agent();
        let names = Names::new(engine.scorer().groups());
        Ok(Self { names, engine, kafka, metrics, owners, readers: Mutex::new(HashMap::new()), http })
    }

    /// The input's partition count, once the group consumer knows it.
    fn partitions(&self) -> Result<i32, QueryError> {
        match self.metrics.partitions().0 {
            0 => Err(QueryError::unavailable("starting", "this instance is joining the group".into(), 2)),
            n => Ok(n),
        }
    }

    /// The reader of `p` when this instance owns it; 503 while it restores.
    fn local(&self, p: i32) -> Result<Option<Arc<StateReader>>, QueryError> {
        let states = self.metrics.partitions().1;
        if let Ok(mut readers) = self.readers.lock() {
            // Partitions that left: their readers go (and their files with them).
            readers.retain(|q, (g, _)| states.get(q) == Some(&PartitionState::Ready(*g)));
        }
        match states.get(&p) {
            None => Ok(None),
            Some(PartitionState::Restoring) => Err(QueryError::unavailable(
                "restoring",
                format!("partition {p} is being restored here; ask again shortly"),
                2,
            )),
            Some(PartitionState::Ready(generation)) => {
                let mut readers = self.readers.lock().map_err(|_| QueryError::internal("readers poisoned"))?;
                if let Some((g, r)) = readers.get(&p) {
                    if g == generation {
                        return Ok(Some(r.clone()));
                    }
                }
                let reader = StateReader::open(&self.kafka.partition_dir(p), &self.engine)
                    .map(Arc::new)
                    .map_err(QueryError::internal)?;
                readers.insert(p, (*generation, reader.clone()));
                Ok(Some(reader))
            }
        }
    }

    /// The URL of the instance owning `p` (not this one).
    fn owner_url(&self, p: i32) -> Result<String, QueryError> {
        let mut owners = self.owners.lock().map_err(|_| QueryError::internal("owners poisoned"))?;
        let owner = owners.owner(p).map_err(|e| {
            QueryError::unavailable("owner_unknown", format!("partition {p}: finding its owner: {e}"), 2)
        })?;
        let url = owner.and_then(|o| o.url);
        match url {
            Some(u) if Some(&u) != self.kafka.http_advertised_url.as_ref() => Ok(u),
            Some(_) => {
                // The changelog still names this instance: a hand-over is under way.
                owners.forget(p);
                Err(QueryError::unavailable("rebalancing", format!("partition {p} is changing owner"), 2))
            }
            None => Err(QueryError::unavailable(
                "owner_unknown",
                format!(
                    "partition {p} has no owner with a known URL yet (each instance needs \
                     kafka.http_advertised_url when it listens on all interfaces)"
                ),
                5,
            )),
        }
    }

    /// A partition's own answer, from here or from its owner.
    fn ask(&self, p: i32, ask: PartitionAsk) -> Result<Value, QueryError> {
        if let Some(r) = self.local(p)? {
            return r.partition_answer(ask);
        }
        let base = self.owner_url(p)?;
        let url = match &ask {
            PartitionAsk::Counts => format!("{base}/v1/partitions/{p}/segments"),
            PartitionAsk::Series => format!("{base}/v1/partitions/{p}/series"),
            PartitionAsk::Members { group, segment, after, limit } => {
                let after = after.as_deref().map(|a| format!("&after={}", encode(a))).unwrap_or_default();
                format!(
                    "{base}/v1/partitions/{p}/segments/{}/{}/customers?limit={limit}{after}",
                    encode(group),
                    encode(segment)
                )
            }
        };
        let unreachable = |e: String| {
            QueryError::unavailable("partition_unavailable", format!("partition {p}: its owner at {base}: {e}"), 2)
        };
        let mut resp = self.http.get(&url).call().map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body: Value = resp.body_mut().read_json().map_err(|e| unreachable(e.to_string()))?;
        if status == 200 {
            same_rules(p, &body, &self.engine.fingerprint().to_string())?;
            Ok(body)
        } else {
            self.owners.lock().map_err(|_| QueryError::internal("owners poisoned"))?.forget(p);
            Err(unreachable(format!("answered {status}: {body}")))
        }
    }

    fn all<T>(&self, ask: PartitionAsk, read: impl Fn(&Value) -> Result<T, QueryError>) -> Result<Vec<T>, QueryError> {
        (0..self.partitions()?).map(|p| self.ask(p, ask.clone()).and_then(|v| read(&v))).collect()
    }
}

/// Another instance's partition answer is by the indexes of its rules: it
/// merges with ours only under the same rules (during a rolling change of
/// rules, two instances may run two versions).
fn same_rules(p: i32, answer: &Value, ours: &str) -> Result<(), QueryError> {
    match answer["rules"].as_str() {
        Some(theirs) if theirs != ours => Err(QueryError::unavailable(
            "rules_changed",
            format!(
                "partition {p} is owned by an instance running other scoring or segment rules (a change of rules \
                 rolling out?): group answers wait until every instance runs the same"
            ),
            10,
        )),
        _ => Ok(()),
    }
}

impl Answers for KafkaQuery {
    fn customer(&self, id: &str, at: Option<i64>, query: &str) -> Result<Value, QueryError> {
        let p = partition_for_key(id.as_bytes(), self.partitions()?, self.kafka.key_partitioner);
        if let Some(r) = self.local(p)? {
            return r.customer_json(id, at);
        }
        let base = self.owner_url(p)?;
        let q = if query.is_empty() { String::new() } else { format!("?{query}") };
        Err(QueryError {
            location: Some(format!("{base}/v1/customers/{}{q}", encode(id))),
            ..QueryError::new(307, "elsewhere", format!("customer {id:?} is in partition {p}, owned by {base}"))
        })
    }

    fn segments(&self) -> Result<Value, QueryError> {
        let parts = self.all(PartitionAsk::Counts, |v| {
            Ok((counts_from_json(&v["counts"])?, v["watermark"].as_i64().unwrap_or(i64::MIN), v["quantile"].clone()))
        })?;
        let mut total = SegmentCounts::new();
        for (counts, _, _) in &parts {
            for (k, c) in counts {
                let e = total.entry(*k).or_default();
                e.customers += c.customers;
                e.mrr_cents += c.mrr_cents;
            }
        }
        // Every partition has its own watermark: the answer is as of the
        // earliest, and so are the quantile edges (every partition puts the
        // same ones in force at each recomputation).
        let earliest = parts.iter().min_by_key(|(_, w, _)| *w);
        let watermark = earliest.map_or(i64::MIN, |(_, w, _)| *w);
        let mut answer = self.names.segments(&total, watermark);
        if let Some((_, _, q)) = earliest.filter(|(_, _, q)| !q.is_null()) {
            answer["quantile"] = q.clone();
        }
        Ok(answer)
    }

    fn members(&self, group: &str, segment: &str, after: Option<&str>, limit: usize) -> Result<Value, QueryError> {
        self.names.segment(group, segment)?;
        let ask = PartitionAsk::Members {
            group: group.into(),
            segment: segment.into(),
            after: after.map(str::to_string),
            limit: limit + 1,
        };
        let pages: Vec<Vec<String>> = self.all(ask, |v| {
            Ok(v["customers"]
                .as_array()
                .map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
                .unwrap_or_default())
        })?;
        let mut ids: Vec<String> = pages.into_iter().flatten().collect();
        // Each partition's page is in id order; merged, the first `limit + 1`.
        ids.sort_unstable();
        ids.truncate(limit + 1);
        Ok(Names::members(group, segment, ids, limit))
    }

    fn history(&self, group: &str, from: Option<i64>, to: Option<i64>) -> Result<Value, QueryError> {
        self.names.group(group)?;
        let series: Vec<Series> = self.all(PartitionAsk::Series, series_from_json)?;
        self.names.history(group, &series, from, to)
    }

    fn partition(&self, partition: i32, ask: PartitionAsk) -> Result<Value, QueryError> {
        match self.local(partition)? {
            Some(r) => r.partition_answer(ask),
            None => Err(QueryError::unavailable(
                "not_owner",
                format!("partition {partition} is not owned by this instance"),
                1,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use segstream_kafka::{KafkaConfig, KafkaEnvironment, KafkaOverrides};

    use super::*;

    #[test]
    fn a_partition_being_restored_answers_503_with_retry_after() {
        let metrics = Arc::new(Metrics::new());
        metrics.set_input_partitions(1);
        metrics.set_partition(0, Some(PartitionState::Restoring));
        let kafka =
            KafkaSettings::resolve(&KafkaConfig::default(), &KafkaOverrides::default(), &KafkaEnvironment::default())
                .expect("defaults");
        let q = KafkaQuery::new(EngineSettings::spec_default(), kafka, metrics).expect("query");
        for e in [q.customer("anyone", None, "").expect_err("restoring"), q.segments().expect_err("restoring")] {
            assert_eq!((e.status, e.code, e.retry_after), (503, "restoring", Some(2)), "{e:?}");
        }
        assert_eq!(q.members("rfm", "nowhere", None, 5).expect_err("unknown").code, "unknown_segment");
    }

    #[test]
    fn answers_of_an_instance_under_other_rules_are_not_merged() {
        let answer = serde_json::json!({ "counts": [], "rules": "17" });
        assert!(same_rules(3, &answer, "17").is_ok());
        let err = same_rules(3, &answer, "18").expect_err("other rules");
        assert_eq!((err.status, err.code), (503, "rules_changed"));
        assert!(same_rules(3, &serde_json::json!({ "counts": [] }), "18").is_ok(), "an earlier version says nothing");
    }
}
