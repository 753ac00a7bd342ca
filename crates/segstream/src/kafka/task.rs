//! One input partition: restore, then records in and transitions out, with
//! the commit protocol of ARCHITECTURE.md ("Kafka mode"). Runs on its own
//! thread; owns its RocksDB state and its idempotent producer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use segstream_decode::{decode_json_line, DecodeError, ErrorClass, Event};
use segstream_output::{transition_schema, transition_to_avro_value, TransitionRecord};
use segstream_scoring::{Outcome, Transition};

use super::changelog::{
    batch_key, customer_key, decode_entry, encode_customer, Batch, Entry, LocalMarker, Marker, LOCAL_MARKER_META,
    MARKER_KEY,
};
use super::config::{InputTopic, KafkaConfig, TopicFormat};
use super::metrics::{KindLabel, Metrics, PartitionLabel, SourceLabel, TopicPartitionLabel, TransitionLabel};
use super::registry::WireDecoder;
use crate::engine::{config_fingerprint, Engine};
use crate::Config;

/// One input record, copied off the consumer's queue.
pub struct Rec {
    /// Index of its topic in the configured inputs.
    pub topic: usize,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

pub enum Msg {
    Records(Vec<Rec>),
    /// Commit and end (revocation, shutdown).
    Stop,
}

/// What every task of the process shares.
pub struct Shared {
    pub cfg: Config,
    pub kafka: KafkaConfig,
    pub changelog: String,
    pub metrics: Arc<Metrics>,
    pub output_schema_id: Option<u32>,
    /// The changelog's `delete.retention.ms`: local state older than this
    /// may miss erasures whose tombstones compaction has removed since.
    pub changelog_delete_retention: Duration,
    /// Per partition, the next offset of each input topic at its last
    /// commit, for the main thread to commit to the consumer group.
    pub committed: Mutex<HashMap<i32, Vec<(String, i64)>>>,
}

#[derive(Default)]
struct Delivery {
    /// (topic, partition) → offset after the last acknowledged record.
    ends: HashMap<(String, i32), i64>,
    error: Option<String>,
}

/// Producer callbacks: acknowledged end offsets and the first failure.
#[derive(Default)]
pub struct DeliveryContext {
    state: Mutex<Delivery>,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut st = self.state.lock().expect("delivery state");
        match result {
            Ok(m) => {
                let end = st.ends.entry((m.topic().to_string(), m.partition())).or_insert(0);
                *end = (*end).max(m.offset() + 1);
            }
            Err((e, m)) => {
                if st.error.is_none() {
                    st.error = Some(format!("delivery to {}/{} failed: {e}", m.topic(), m.partition()));
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A multiset of record ids.
#[derive(Default)]
struct AlreadyOut {
    counts: HashMap<String, u32>,
    total: usize,
}

impl AlreadyOut {
    fn add(&mut self, id: String) {
        *self.counts.entry(id).or_insert(0) += 1;
        self.total += 1;
    }

    /// Whether `id` was written (once fewer from now on).
    fn take(&mut self, id: &str) -> bool {
        if self.total == 0 {
            return false;
        }
        match self.counts.get_mut(id) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(id);
                }
                self.total -= 1;
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.total
    }

    fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn clear(&mut self) {
        self.counts.clear();
        self.total = 0;
    }
}

pub struct Task {
    shared: Arc<Shared>,
    partition: i32,
    engine: Engine,
    producer: BaseProducer<DeliveryContext>,
    /// The last commit.
    marker: Marker,
    inputs: Vec<InputTopic>,
    /// Per input topic, the next offset to process.
    next_offsets: Vec<i64>,
    /// Record number of the next record processed (all topics).
    records: i64,
    /// Customer → record number of its last event applied since the last commit.
    epoch_applied: HashMap<String, i64>,
    /// Customer → record number through which its restored state already includes events.
    skip: BTreeMap<String, i64>,
    /// Transitions (by id) and dead letters (`dlq:<source>`) the uncommitted
    /// tail of a previous owner already wrote, with how many times: not sent
    /// again. A count, because SPEC's id (customer, group, at, to) repeats when
    /// late events move a label back and forth at one evaluated instant.
    already_out: AlreadyOut,
    /// Per input topic, the highest offset among `already_out`'s sources (-1: none).
    already_out_through: Vec<i64>,
    /// Several input topics: records wait here, per topic, until processed
    /// in a logged order (`replay` first, after a recovery).
    waiting: Vec<VecDeque<Rec>>,
    /// Batches the previous owner processed after its last commit, in order.
    replay: VecDeque<(usize, i64)>,
    /// Keys of this epoch's batch records, tombstoned after the next marker.
    batch_keys: Vec<Vec<u8>>,
    /// The logged run being processed (topic, last offset): a commit inside
    /// it carries its rest in the marker, as the replay must do it first.
    current_run: Option<(usize, i64)>,
    decoder: Option<WireDecoder>,
    out: Vec<Transition>,
    records_since_commit: u64,
    last_commit: Instant,
    last_record: Instant,
    /// `topic/partition/` per input topic.
    source_prefixes: Vec<String>,
    /// Fault injection for tests (`SEGSTREAM_CRASH_AT=<point>:<record>`):
    /// abort the process at a step of the first commit at or past a record
    /// number, as `kill -9` would.
    crash_at: Option<(String, i64)>,
}

/// A consumer outside the group (no offsets committed), for reading given
/// ranges: restores, output tails, metadata.
pub fn restore_consumer(k: &KafkaConfig) -> anyhow::Result<BaseConsumer> {
    k.client_config(
        &[("fetch.wait.max.ms", "10")],
        &k.consumer_properties,
        &[
            ("group.id", "segstream-restore"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "earliest"),
        ],
    )
    .create()
    .context("creating the restore consumer")
}

/// Reads `topic`/`partition` from `from` up to (not including) `to`.
fn read_range(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
    mut f: impl FnMut(&BorrowedMessage<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if from >= to {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
    consumer.assign(&tpl)?;
    let mut quiet_since = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                if m.offset() >= to {
                    break;
                }
                f(&m)?;
                if m.offset() + 1 >= to {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => {
                tracing::warn!(topic, partition, "reading: {e}");
                if quiet_since.elapsed() > Duration::from_secs(60) {
                    bail!("cannot read {topic}/{partition} from offset {from}: {e}");
                }
            }
            None => {
                if quiet_since.elapsed() > Duration::from_secs(60) {
                    bail!("no data from {topic}/{partition} for 60 s while reading offsets {from}..{to}");
                }
            }
        }
    }
    consumer.unassign()?;
    Ok(())
}

/// Retries a broker request that failed (timeouts while the broker is
/// restarting or overloaded) for up to two minutes, then gives up with its error.
fn retry<T>(what: &str, mut f: impl FnMut() -> KafkaResult<T>) -> anyhow::Result<T> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < Duration::from_secs(120) => {
                tracing::warn!("{what}: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => bail!("{what}: {e} (gave up after {:?})", started.elapsed()),
        }
    }
}

/// An event whose message key is not its `customer_id` would put the
/// customer's state in a partition other producers do not write to: it is
/// poison. A record without a key is accepted (the producer's partitioner
/// placed it; with one partition that is harmless).
fn keyed_by_customer(key: Option<&[u8]>, ev: Event) -> Result<Event, DecodeError> {
    match key {
        Some(k) if k != ev.customer_id.as_bytes() => Err(DecodeError::KeyMismatch {
            key: String::from_utf8_lossy(k).into_owned(),
            customer_id: ev.customer_id.clone(),
        }),
        _ => Ok(ev),
    }
}

fn header_str<'a>(m: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    let h = m.headers()?;
    h.iter().find(|h| h.key == key).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

impl Task {
    /// Opens the partition's state and brings it up to date (ARCHITECTURE.md,
    /// "Recovery"): local RocksDB, then the changelog after it, then what
    /// the outputs already hold.
    pub fn open(shared: Arc<Shared>, partition: i32) -> anyhow::Result<Self> {
        let started = Instant::now();
        let k = &shared.kafka;
        let inputs = k.inputs();
        let names: Vec<&str> = inputs.iter().map(|i| i.topic.as_str()).collect();
        let dir: PathBuf = k.state_dir.join(format!("{}-{partition}", names.join("+")));
        std::fs::create_dir_all(&k.state_dir).with_context(|| format!("creating {}", k.state_dir.display()))?;
        let mut engine = Engine::open(&dir, &shared.cfg)?;
        let mut local: Option<LocalMarker> = match engine.meta(LOCAL_MARKER_META)? {
            Some(v) => Some(serde_json::from_slice(&v).context("corrupt local commit marker")?),
            None => None,
        };
        let consumer = restore_consumer(k)?;
        let timeout = Duration::from_secs(30);
        let (low, high) = retry(&format!("changelog {}/{partition} offsets", shared.changelog), || {
            consumer.fetch_watermarks(&shared.changelog, partition, timeout)
        })?;
        if let Some(l) = &local {
            let age = Duration::from_millis(now_ms().saturating_sub(l.committed_at_ms).max(0) as u64);
            let stale = if l.changelog_offset >= high || l.changelog_offset + 1 < low {
                Some("it does not match the changelog (recreated or truncated)")
            } else if l.changelog_offset + 1 < high && age >= shared.changelog_delete_retention {
                Some("it is older than the changelog's delete.retention.ms: tombstones it never saw may be gone")
            } else {
                None
            };
            if let Some(why) = stale {
                tracing::warn!(
                    partition,
                    local = l.changelog_offset,
                    low,
                    high,
                    age_s = age.as_secs(),
                    "local state not used, {why}: rebuilding it from the changelog"
                );
                drop(engine);
                std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
                engine = Engine::open(&dir, &shared.cfg)?;
                local = None;
            }
        }
        let from = local.as_ref().map_or(low, |l| l.changelog_offset + 1);
        let mut last = local.map(|l| (l.marker, l.changelog_offset));
        let mut ahead: HashMap<String, i64> = HashMap::new();
        let mut batches: Vec<(Vec<u8>, Batch)> = Vec::new();
        let mut restored = 0u64;
        read_range(&consumer, &shared.changelog, partition, from, high, |m| {
            let entry = decode_entry(m.key().unwrap_or_default(), m.payload())
                .map_err(|e| anyhow!("changelog {}/{partition}@{}: {e}", shared.changelog, m.offset()))?;
            match entry {
                Entry::Marker(marker) => {
                    last = Some((*marker, m.offset()));
                    ahead.clear();
                    batches.clear();
                }
                Entry::Batch(Some(b)) => batches.push((m.key().unwrap_or_default().to_vec(), b)),
                Entry::Batch(None) => {}
                Entry::Customer { id, applied_through, state } => {
                    engine.restore_customer(&id, state)?;
                    match applied_through {
                        Some(a) => ahead.insert(id, a),
                        None => ahead.remove(&id),
                    };
                }
            }
            restored += 1;
            if restored.is_multiple_of(100_000) {
                engine.commit(Vec::new())?;
                tracing::info!(partition, restored, of = high - from, "restoring from the changelog");
            }
            Ok(())
        })?;
        shared.metrics.restore_records.inc_by(restored);
        let fingerprint = config_fingerprint(&shared.cfg);
        let (marker, changelog_offset, fresh) = match last {
            Some((m, off)) => (m, off, false),
            None => (
                Marker {
                    seq: 0,
                    input_offsets: BTreeMap::new(),
                    records: 0,
                    clock: Default::default(),
                    counters: Default::default(),
                    pending_watermark: None,
                    outputs: Self::output_ends(&consumer, k)?,
                    skip: BTreeMap::new(),
                    replay: Vec::new(),
                    config_fingerprint: fingerprint,
                },
                -1,
                true,
            ),
        };
        if marker.config_fingerprint != fingerprint {
            bail!(
                "partition {partition} was built with a different scoring or segments configuration \
                 (fingerprint {:016x}, now {fingerprint:016x}); use a new group id and changelog, or the old configuration",
                marker.config_fingerprint
            );
        }
        engine.restore_clock(marker.clock, marker.counters.clone())?;
        let mut skip = marker.skip.clone();
        for (id, a) in ahead {
            if a >= marker.records {
                let e = skip.entry(id).or_insert(a);
                *e = (*e).max(a);
            }
        }
        if !fresh {
            engine.commit(vec![(
                LOCAL_MARKER_META.into(),
                serde_json::to_vec(&LocalMarker { marker: marker.clone(), changelog_offset, committed_at_ms: now_ms() })?,
            )])?;
        }
        let producer: BaseProducer<DeliveryContext> = k
            .client_config(
                &[("linger.ms", "5"), ("partitioner", "murmur2_random")],
                &k.producer_properties,
                &[("enable.idempotence", "true"), ("acks", "all")],
            )
            .create_with_context(DeliveryContext::default())
            .context("creating the producer")?;
        let decoder =
            if inputs.iter().any(|i| i.format == TopicFormat::Avro) { Some(WireDecoder::from_config(k)?) } else { None };
        let mut replay = VecDeque::new();
        let mut batch_keys = Vec::new();
        let logged = batches.into_iter().map(|(key, b)| {
            batch_keys.push(key);
            b
        });
        for b in marker.replay.clone().into_iter().chain(logged.collect::<Vec<_>>()) {
            let t = inputs
                .iter()
                .position(|i| i.topic == b.topic)
                .ok_or_else(|| anyhow!("changelog names input topic {} that is not configured", b.topic))?;
            replay.push_back((t, b.last));
        }
        let next_offsets: Vec<i64> =
            inputs.iter().map(|i| marker.input_offsets.get(&i.topic).copied().unwrap_or(-1)).collect();
        let mut task = Self {
            source_prefixes: inputs.iter().map(|i| format!("{}/{partition}/", i.topic)).collect(),
            already_out_through: vec![-1; inputs.len()],
            waiting: inputs.iter().map(|_| VecDeque::new()).collect(),
            records: marker.records,
            next_offsets,
            replay,
            batch_keys,
            current_run: None,
            inputs,
            marker,
            shared: shared.clone(),
            partition,
            engine,
            producer,
            epoch_applied: HashMap::new(),
            skip,
            already_out: AlreadyOut::default(),
            decoder,
            out: Vec::new(),
            records_since_commit: 0,
            last_commit: Instant::now(),
            last_record: Instant::now(),
            crash_at: std::env::var("SEGSTREAM_CRASH_AT").ok().and_then(|v| {
                let (point, offset) = v.split_once(':')?;
                Some((point.to_string(), offset.parse().ok()?))
            }),
        };
        if fresh {
            // The outputs' current ends must be durable before anything is produced.
            task.commit(None)?;
        } else {
            task.read_outputs(&consumer)?;
            if let Some(w) = task.marker.pending_watermark {
                task.engine.advance_watermark(w, &mut task.out)?;
                task.emit(None)?;
            }
        }
        let source = if restored > 0 { "changelog" } else { "local" };
        shared.metrics.restores.get_or_create(&SourceLabel { source: source.into() }).inc();
        shared.metrics.restore_seconds.observe(started.elapsed().as_secs_f64());
        tracing::info!(
            partition,
            changelog_records = restored,
            from = source,
            records = task.records,
            replay_batches = task.replay.len(),
            already_written = task.already_out.len(),
            replay_skips = task.skip.len(),
            seconds = started.elapsed().as_secs_f64(),
            "partition restored"
        );
        Ok(task)
    }

    /// The current end offsets of every output and dead-letter partition.
    fn output_ends(consumer: &BaseConsumer, k: &KafkaConfig) -> anyhow::Result<BTreeMap<String, BTreeMap<i32, i64>>> {
        let mut outputs = BTreeMap::new();
        for topic in [&k.output_topic, &k.dead_letter_topic] {
            let mut ends = BTreeMap::new();
            for q in 0..partition_count(consumer, topic)? {
                let (_, high) =
                    retry(&format!("{topic}/{q} offsets"), || consumer.fetch_watermarks(topic, q, Duration::from_secs(30)))?;
                ends.insert(q, high);
            }
            outputs.insert(topic.clone(), ends);
        }
        Ok(outputs)
    }

    /// Learns what the uncommitted tail wrote: every output and dead-letter
    /// record after the marker's end offsets whose source is this partition.
    fn read_outputs(&mut self, consumer: &BaseConsumer) -> anyhow::Result<()> {
        let k = &self.shared.kafka;
        for (topic, is_dlq) in [(&k.output_topic, false), (&k.dead_letter_topic, true)] {
            for q in 0..partition_count(consumer, topic)? {
                let (low, high) =
                    retry(&format!("{topic}/{q} offsets"), || consumer.fetch_watermarks(topic, q, Duration::from_secs(30)))?;
                let from = self.marker.outputs.get(topic.as_str()).and_then(|o| o.get(&q)).copied().unwrap_or(0).max(low);
                read_range(consumer, topic, q, from, high, |m| {
                    let Some(source) = header_str(m, "source") else { return Ok(()) };
                    let Some((t, rest)) =
                        self.source_prefixes.iter().enumerate().find_map(|(t, pre)| Some((t, source.strip_prefix(pre.as_str())?)))
                    else {
                        return Ok(());
                    };
                    // "time" for a wall-clock advance; else the record's offset.
                    if let Ok(offset) = rest.parse::<i64>() {
                        self.already_out_through[t] = self.already_out_through[t].max(offset);
                    }
                    let id = if is_dlq {
                        format!("dlq:{source}")
                    } else {
                        match header_str(m, "transition_id") {
                            Some(id) => id.to_string(),
                            None => return Ok(()),
                        }
                    };
                    self.already_out.add(id);
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// Runs until told to stop (or the channel closes): records, commits,
    /// wall-clock advances.
    pub fn run(mut self, rx: Receiver<Msg>) -> anyhow::Result<()> {
        let k = &self.shared.kafka;
        let interval = Duration::from_millis(k.commit_interval_ms.max(1));
        let idle = Duration::from_millis(k.idle_advance_ms);
        let every = self.shared.cfg.state.commit_every_records.get();
        let wait = Duration::from_millis(100).min(interval);
        loop {
            match rx.recv_timeout(wait) {
                Ok(Msg::Records(recs)) => {
                    self.take(recs)?;
                    self.last_record = Instant::now();
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    self.commit(None)?;
                    tracing::info!(partition = self.partition, records = self.records, "partition handed over");
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.producer.poll(Duration::ZERO);
            if self.records_since_commit >= every
                || (self.records_since_commit > 0 && self.last_commit.elapsed() >= interval)
            {
                self.commit(None)?;
            }
            if !idle.is_zero() && self.last_record.elapsed() >= idle {
                self.advance_with_wall_clock()?;
            }
        }
    }

    /// An idle partition's watermark follows the wall clock (less the
    /// allowed lateness), when that fires a boundary. The advance is
    /// committed before its transitions are produced, so a replay applies it
    /// at the same point.
    fn advance_with_wall_clock(&mut self) -> anyhow::Result<()> {
        let lateness = i64::try_from(self.shared.cfg.time.allowed_lateness_ms).unwrap_or(i64::MAX);
        let target = now_ms().saturating_sub(lateness);
        if target <= self.engine.clock().watermark || self.engine.next_due().is_none_or(|d| d > target) {
            return Ok(());
        }
        self.commit(Some(target))?;
        self.engine.advance_watermark(target, &mut self.out)?;
        self.shared.metrics.wall_clock_advances.inc();
        self.emit(None)?;
        Ok(())
    }

    /// Records from the main thread. One input topic: processed in offset
    /// order. Several: processed a topic's run at a time, each run logged to
    /// the changelog (and acknowledged) before any of its output, so that a
    /// replay processes them in the same order; after a recovery the logged
    /// runs of the previous owner come first.
    fn take(&mut self, recs: Vec<Rec>) -> anyhow::Result<()> {
        if self.inputs.len() == 1 {
            for r in recs {
                self.process(r)?;
            }
            return Ok(());
        }
        for r in recs {
            let t = r.topic;
            self.waiting[t].push_back(r);
        }
        loop {
            if let Some(&(t, last)) = self.replay.front() {
                while self.waiting[t].front().is_some_and(|r| r.offset <= last) {
                    let r = self.waiting[t].pop_front().expect("checked non-empty");
                    self.process(r)?;
                }
                // Done when the run's last offset is processed, or the topic
                // has moved past it (a gap in the offsets).
                let done = self.next_offsets[t] > last || self.waiting[t].front().is_some_and(|r| r.offset > last);
                if !done {
                    return Ok(()); // more of topic t is on its way
                }
                self.replay.pop_front();
                continue;
            }
            let Some(t) = (0..self.inputs.len()).find(|&t| !self.waiting[t].is_empty()) else { return Ok(()) };
            let from = self.next_offsets[t];
            let run: Vec<Rec> = self.waiting[t].drain(..).filter(|r| r.offset >= from).collect();
            let (Some(first), Some(last)) = (run.first().map(|r| r.offset), run.last().map(|r| r.offset)) else {
                continue;
            };
            let key = batch_key(self.records);
            let value = serde_json::to_vec(&Batch { topic: self.inputs[t].topic.clone(), first, last })?;
            let changelog = self.shared.changelog.as_str();
            self.send(BaseRecord::to(changelog).partition(self.partition).key(key.as_slice()).payload(value.as_slice()))?;
            self.flush()?;
            self.batch_keys.push(key);
            self.current_run = Some((t, last));
            for r in run {
                self.process(r)?;
            }
            self.current_run = None;
        }
    }

    fn decode(&mut self, topic: usize, payload: &[u8]) -> Result<Event, DecodeError> {
        match (self.inputs[topic].format, &mut self.decoder) {
            (TopicFormat::Avro, Some(d)) => {
                let mut backoff = Duration::from_millis(200);
                loop {
                    match d.decode(payload) {
                        Err(e) if e.class() == ErrorClass::Transient => {
                            self.shared.metrics.registry_errors.inc();
                            tracing::warn!(partition = self.partition, "{e}; retrying in {backoff:?}");
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                        other => return other,
                    }
                }
            }
            _ => decode_json_line(payload),
        }
    }

    fn process(&mut self, r: Rec) -> anyhow::Result<()> {
        let t = r.topic;
        if r.offset < self.next_offsets[t] {
            return Ok(()); // already in the committed state
        }
        let record = self.records;
        if r.key.is_none() {
            self.shared.metrics.unkeyed.inc();
        }
        let decoded = match &r.payload {
            None => Err(DecodeError::Json("empty message (null value)".into())),
            Some(p) => self.decode(t, p),
        }
        .and_then(|ev| keyed_by_customer(r.key.as_deref(), ev));
        match decoded {
            Err(e) => {
                self.engine.count_invalid();
                self.dead_letter(&r, &e)?;
            }
            Ok(ev) => {
                let m = &self.shared.metrics;
                m.events.inc();
                if self.skip.get(&ev.customer_id).is_some_and(|&a| record <= a) {
                    self.engine.skip_event(&ev, &mut self.out)?;
                    m.replay_skipped_events.inc();
                } else {
                    match self.engine.on_event(&ev, &mut self.out)? {
                        Outcome::Duplicate => m.duplicates.inc(),
                        Outcome::Applied { late: true } | Outcome::Deleted { late: true } => m.late.inc(),
                        _ => 0,
                    };
                    self.epoch_applied.insert(ev.customer_id, record);
                }
                self.emit(Some((t, r.offset)))?;
            }
        }
        self.records += 1;
        self.next_offsets[t] = r.offset + 1;
        self.records_since_commit += 1;
        if !self.already_out.is_empty() && self.already_out_through.iter().zip(&self.next_offsets).all(|(s, n)| s < n) {
            // Left over: records of customers whose restored state was
            // already past them (skip map), which the replay does not recompute.
            tracing::info!(partition = self.partition, left = self.already_out.len(), "replay caught up with the previous run's output");
            self.already_out.clear();
        }
        if self.records_since_commit >= self.shared.cfg.state.commit_every_records.get() {
            self.commit(None)?;
        }
        Ok(())
    }

    fn send(&self, mut rec: BaseRecord<'_, [u8], [u8], ()>) -> anyhow::Result<()> {
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((e, back)) => bail!("producing to {}: {e}", back.topic),
            }
        }
    }

    fn dead_letter(&mut self, r: &Rec, e: &DecodeError) -> anyhow::Result<()> {
        let k = &self.shared.kafka;
        let source = format!("{}{}", self.source_prefixes[r.topic], r.offset);
        tracing::warn!(partition = self.partition, offset = r.offset, kind = e.kind(), "dead letter {source}: {e}");
        self.shared.metrics.dead_letters.get_or_create(&KindLabel { kind: e.kind().into() }).inc();
        if self.already_out.take(&format!("dlq:{source}")) {
            return Ok(());
        }
        let message = e.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "error_kind", value: Some(e.kind()) })
            .insert(Header { key: "error", value: Some(message.as_str()) })
            .insert(Header { key: "source", value: Some(source.as_str()) });
        let mut rec = BaseRecord::to(&k.dead_letter_topic).headers(headers);
        if let Some(key) = &r.key {
            rec = rec.key(key.as_slice());
        }
        if let Some(p) = &r.payload {
            rec = rec.payload(p.as_slice());
        }
        self.send(rec)
    }

    /// Produces the transitions in `self.out`, caused by the record at
    /// (topic, offset) or, for `None`, by a wall-clock advance, except those
    /// the previous owner already wrote.
    fn emit(&mut self, source: Option<(usize, i64)>) -> anyhow::Result<()> {
        let mut out = std::mem::take(&mut self.out);
        let k = &self.shared.kafka;
        let source = match source {
            Some((t, offset)) => format!("{}{offset}", self.source_prefixes[t]),
            None => format!("{}time", self.source_prefixes[0]),
        };
        for t in out.drain(..) {
            enum Encoding {
                Json(Vec<u8>),
                Avro(u32),
            }
            // JSON: the record carries the id, computed once (SHA-1).
            let (id, encoding) = match (k.output_format, self.shared.output_schema_id) {
                (TopicFormat::Avro, Some(schema_id)) => (t.transition_id().to_string(), Encoding::Avro(schema_id)),
                _ => {
                    let rec = TransitionRecord::from(&t);
                    let json = serde_json::to_vec(&rec).map_err(|e| anyhow!("encoding a transition: {e}"))?;
                    (rec.transition_id, Encoding::Json(json))
                }
            };
            if self.already_out.take(&id) {
                self.shared.metrics.replay_suppressed.inc();
                continue;
            }
            self.shared
                .metrics
                .transitions
                .get_or_create(&TransitionLabel {
                    group: t.group.to_string(),
                    to: t.to.as_deref().unwrap_or("null").to_string(),
                })
                .inc();
            let payload = match encoding {
                Encoding::Json(json) => json,
                Encoding::Avro(schema_id) => {
                    let datum = apache_avro::to_avro_datum(transition_schema(), transition_to_avro_value(&t))
                        .map_err(|e| anyhow!("encoding a transition: {e}"))?;
                    let mut v = Vec::with_capacity(5 + datum.len());
                    v.push(0);
                    v.extend_from_slice(&schema_id.to_be_bytes());
                    v.extend(datum);
                    v
                }
            };
            let headers = OwnedHeaders::new()
                .insert(Header { key: "transition_id", value: Some(id.as_str()) })
                .insert(Header { key: "source", value: Some(source.as_str()) });
            self.send(
                BaseRecord::to(&k.output_topic).key(t.customer_id.as_bytes()).payload(payload.as_slice()).headers(headers),
            )?;
        }
        self.out = out;
        Ok(())
    }

    /// Waits until every record produced so far is acknowledged.
    ///
    /// Not rdkafka's `flush`: it serves delivery reports with a `poll` that
    /// always waits out its timeout, 100 ms per step, so every commit cost a
    /// multiple of 100 ms however fast the broker answered (and a `poll` under
    /// 1 ms spins). Here: send what lingers, then take the delivery reports
    /// as they come, sleeping 1 ms whenever none is there.
    fn flush(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut warn_after = Duration::from_secs(10);
        match self.producer.flush(Duration::ZERO) {
            Ok(()) | Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {}
            Err(e) => bail!("producer flush: {e}"),
        }
        let mut in_flight = self.producer.in_flight_count();
        while in_flight > 0 {
            self.producer.poll(Duration::ZERO);
            let now = self.producer.in_flight_count();
            if now == in_flight {
                std::thread::sleep(Duration::from_millis(1));
            }
            in_flight = now;
            if started.elapsed() >= warn_after {
                tracing::warn!(partition = self.partition, waited = ?started.elapsed(), "producer flush still waiting for acknowledgements");
                warn_after += Duration::from_secs(10);
            }
        }
        match &self.producer.context().state.lock().expect("delivery state").error {
            Some(e) => bail!("{e}; stopping so that recovery re-sends it exactly once"),
            None => Ok(()),
        }
    }

    fn delivered_end(&self, topic: &str, partition: i32) -> Option<i64> {
        self.producer.context().state.lock().expect("delivery state").ends.get(&(topic.to_string(), partition)).copied()
    }

    fn maybe_crash(&self, point: &str) {
        if let Some((p, offset)) = &self.crash_at {
            if p == point && self.records >= *offset {
                // What was produced so far reaches the broker, as it may before a real crash.
                let _ = self.producer.flush(Duration::from_secs(10));
                tracing::warn!(partition = self.partition, point, "SEGSTREAM_CRASH_AT: aborting");
                std::process::abort();
            }
        }
    }

    /// The commit protocol: outputs acknowledged, then the changelog (states,
    /// then the marker), then RocksDB, then the group offset.
    fn commit(&mut self, pending_watermark: Option<i64>) -> anyhow::Result<()> {
        let started = Instant::now();
        let k = &self.shared.kafka;
        self.flush()?;
        let output_flushed = started.elapsed();
        self.maybe_crash("after_output");
        let mut outputs = self.marker.outputs.clone();
        // While the replay has not passed the previous run's output, the next
        // recovery must still read all of it: the output ends stay where the
        // last commit before that run put them.
        if self.already_out.is_empty() {
            let st = self.producer.context().state.lock().expect("delivery state");
            for ((topic, q), end) in &st.ends {
                if topic == &k.output_topic || topic == &k.dead_letter_topic {
                    outputs.entry(topic.clone()).or_default().insert(*q, *end);
                }
            }
        }
        let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut erased: Vec<String> = Vec::new();
        self.engine.for_each_dirty(|id, st| {
            let applied = self.epoch_applied.get(id).or_else(|| self.skip.get(id)).copied().unwrap_or(-1);
            records.push((customer_key(id), encode_customer(applied, st)));
            if st.is_none() {
                erased.push(id.to_string());
            }
        });
        let changelog = self.shared.changelog.as_str();
        for (key, value) in &records {
            self.send(BaseRecord::to(changelog).partition(self.partition).key(key.as_slice()).payload(value.as_slice()))?;
        }
        self.maybe_crash("after_changelog_states");
        let next = self.records;
        self.skip.retain(|_, a| *a >= next);
        let mut input_offsets = self.marker.input_offsets.clone();
        for (i, &o) in self.inputs.iter().zip(&self.next_offsets) {
            if o >= 0 {
                input_offsets.insert(i.topic.clone(), o);
            }
        }
        let marker = Marker {
            seq: self.marker.seq + 1,
            input_offsets,
            records: next,
            replay: self
                .current_run
                .filter(|&(t, last)| self.next_offsets[t] <= last)
                .iter()
                .chain(&self.replay)
                .map(|&(t, last)| Batch { topic: self.inputs[t].topic.clone(), first: -1, last })
                .collect(),
            clock: self.engine.clock(),
            counters: self.engine.counters().clone(),
            pending_watermark,
            outputs,
            skip: self.skip.clone(),
            config_fingerprint: self.marker.config_fingerprint,
        };
        let marker_bytes = serde_json::to_vec(&marker)?;
        self.send(BaseRecord::to(changelog).partition(self.partition).key(MARKER_KEY).payload(marker_bytes.as_slice()))?;
        self.flush()?;
        let changelog_offset = self
            .delivered_end(changelog, self.partition)
            .ok_or_else(|| anyhow!("no acknowledgement for the commit marker"))?
            - 1;
        let marker_written = started.elapsed();
        self.maybe_crash("after_marker");
        // Erasures are committed once the marker is written: tombstones now
        // let compaction drop the customer's key.
        for id in &erased {
            let key = customer_key(id);
            self.send(BaseRecord::<[u8], [u8], ()>::to(changelog).partition(self.partition).key(key.as_slice()))?;
        }
        for key in std::mem::take(&mut self.batch_keys) {
            self.send(BaseRecord::<[u8], [u8], ()>::to(changelog).partition(self.partition).key(key.as_slice()))?;
        }
        self.engine.commit(vec![(
            LOCAL_MARKER_META.into(),
            serde_json::to_vec(&LocalMarker { marker: marker.clone(), changelog_offset, committed_at_ms: now_ms() })?,
        )])?;
        let positions: Vec<(String, i64)> = self
            .inputs
            .iter()
            .zip(&self.next_offsets)
            .filter(|(_, o)| **o >= 0)
            .map(|(i, o)| (i.topic.clone(), *o))
            .collect();
        self.shared.committed.lock().expect("committed offsets").insert(self.partition, positions.clone());
        let m = &self.shared.metrics;
        m.commits.inc();
        m.commit_seconds.observe(started.elapsed().as_secs_f64());
        let label = PartitionLabel { partition: self.partition };
        m.records.get_or_create(&label).set(next);
        for (topic, offset) in &positions {
            m.offsets.get_or_create(&TopicPartitionLabel { topic: topic.clone(), partition: self.partition }).set(*offset);
        }
        m.watermark.get_or_create(&label).set(marker.clock.watermark.max(0));
        tracing::debug!(
            partition = self.partition,
            seq = marker.seq,
            records = next,
            customers = records.len(),
            output_flush_ms = output_flushed.as_millis() as u64,
            changelog_ms = (marker_written - output_flushed).as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "committed"
        );
        self.marker = marker;
        self.epoch_applied.clear();
        self.records_since_commit = 0;
        self.last_commit = Instant::now();
        Ok(())
    }
}

/// Partitions of `topic`; broker errors are retried for two minutes (see
/// [`check_topic`] for the start-up check, which fails at once).
pub fn partition_count(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<i32> {
    let md = retry(&format!("metadata of topic {topic}"), || consumer.fetch_metadata(Some(topic), Duration::from_secs(30)))?;
    topic_partitions(&md, topic)
}

/// Partitions of `topic`, failing on the first broker error: the check at
/// start, where a wrong address or a missing topic must be reported at once.
pub fn check_topic(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<i32> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("metadata of topic {topic} (are the brokers right?)"))?;
    topic_partitions(&md, topic)
}

fn topic_partitions(md: &rdkafka::metadata::Metadata, topic: &str) -> anyhow::Result<i32> {
    let t = md.topics().first().ok_or_else(|| anyhow!("no metadata for topic {topic}"))?;
    if let Some(e) = t.error() {
        bail!("topic {topic}: {e:?} (create it first; see README, \"Run with Kafka\")");
    }
    if t.partitions().is_empty() {
        bail!("topic {topic} does not exist or has no partitions (create it first; see README, \"Run with Kafka\")");
    }
    Ok(t.partitions().len() as i32)
}

#[cfg(test)]
mod tests {
    use super::AlreadyOut;

    #[test]
    fn already_out_counts_repeated_ids() {
        let mut a = AlreadyOut::default();
        a.add("x".into());
        a.add("x".into());
        a.add("y".into());
        assert!(a.take("x") && a.take("x"), "both copies were written");
        assert!(!a.take("x"), "a third is new");
        assert_eq!(a.len(), 1);
        assert!(a.take("y") && a.is_empty());
    }
}
