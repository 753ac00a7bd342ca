//! One input partition: restored in [`open`](Task::open), then records in
//! and transitions out, committing by the protocol of [`crate::commit`].
//! Runs on its own thread; owns its RocksDB state and its idempotent producer.

mod open;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use segstream_decode::{decode_json_line, Classify, DecodeError, ErrorClass, Event, Format};
use segstream_engine::{Engine, EngineSettings};
use segstream_output::{DeadLetter, Emitter, Say, Throttle};
use segstream_scoring::{Outcome, Transition};

use crate::changelog::{
    customer_key, encode_customer, encode_series, history_key, run_key, series_key, LoggedRun, EPOCH_HEADER,
};
use crate::client::{read_range, watermarks};
use crate::commit::{commit, Commit, CommitIo};
use crate::error::Error;
use crate::fence::{Fence, Look, STALL};
use crate::marker::{LocalMarker, Marker, Progress, LOCAL_MARKER_META};
use crate::metrics::{Metrics, PartitionLabel, TopicPartitionLabel};
use crate::owners::partition_for_key;
use crate::producer::Producer;
use crate::quantile::{Exchange, Published};
use crate::record::{Msg, Rec};
use crate::runlog::{RunLog, Step};
use crate::schemas::WireDecoder;
use crate::settings::KafkaSettings;
use crate::sink::{KafkaSink, OutputEncoding};
use crate::stop::{retry, Backoff, RetryError, StopFlag};
use crate::testhooks::{CrashPoint, FaultInjection};

/// Per input topic, the next offset to read (topics never read are absent).
pub type Positions = Vec<(String, i64)>;

/// What every task of the process shares.
pub struct Shared {
    pub engine: EngineSettings,
    pub kafka: KafkaSettings,
    pub metrics: Arc<Metrics>,
    pub output: OutputEncoding,
    /// The changelog's `delete.retention.ms`: local state older than this
    /// may miss erasures whose tombstones compaction has removed since.
    pub changelog_delete_retention: Duration,
    /// Per partition, the next offset of each input topic at its last
    /// commit, for the main thread to commit to the consumer group.
    pub committed: Mutex<HashMap<i32, Positions>>,
    /// Partitions of the input topics when the process started.
    pub input_partitions: i32,
}

use crate::clock::{host_now_ms as now_ms, WallClock};

pub struct Task {
    shared: Arc<Shared>,
    partition: i32,
    stop: StopFlag,
    engine: Engine,
    emitter: Emitter<KafkaSink>,
    /// Whether the partition is still this task's; shared with the sink,
    /// which asks it before every record it produces.
    owner: Rc<RefCell<OwnerCheck>>,
    /// The last commit.
    marker: Marker,
    /// Per input topic, the next offset to process (-1: none yet).
    next_offsets: Vec<i64>,
    /// Per input topic: whether the group consumer delivered a record yet
    /// (its first one is checked against `next_offsets`).
    delivered: Vec<bool>,
    /// Record number of the next record processed (all topics).
    records: i64,
    /// Customer → record number of its last event applied since the last commit.
    epoch_applied: HashMap<String, i64>,
    /// Several input topics: the processing order.
    runs: RunLog,
    /// Keys of this epoch's logged runs, tombstoned after the next marker.
    run_keys: Vec<Vec<u8>>,
    decoder: Option<WireDecoder>,
    out: Vec<Transition>,
    records_since_commit: u64,
    last_commit: Instant,
    last_record: Instant,
    /// `topic/partition/` per input topic.
    source_prefixes: Vec<String>,
    /// What an idle partition follows (see [`crate::clock`]).
    wall_clock: WallClock,
    /// How far the last event was behind its record's broker timestamp.
    last_delay_ms: Option<i64>,
    /// Tally counts already added to the metrics: transitions by (group,
    /// segment), dead letters by kind.
    /// What of the emitter's tally the counters hold.
    published: crate::metrics::TallyPublished,
    /// Records whose customer belongs to another partition (logged, throttled).
    misplaced: Throttle,
    /// This partition's share of the segment population gauges.
    published_segments: BTreeMap<(String, String), (i64, i64)>,
    /// Progress reported to the group thread's stuck check.
    progress: Arc<crate::record::Progress>,
    /// During a rule migration: customers re-evaluated by this process.
    migrated_here: Option<i64>,
    /// Quantile RFM: the populations the partitions published (ADR 010).
    quantile: Option<crate::quantile::Exchange>,
    /// Quantile RFM: whether this task knows its partition's start is published.
    quantile_joined: bool,
}

/// An event whose message key is not its `customer_id` would put the
/// customer's state in a partition other producers do not write to: it is
/// poison. A record without a key is accepted (the producer's partitioner
/// placed it; with one partition that is harmless).
fn keyed_by_customer(key: Option<&[u8]>, ev: Event) -> Result<Event, DecodeError> {
    match key {
        Some(k) if k != ev.customer_id.as_bytes() => Err(DecodeError::KeyMismatch {
            key: segstream_decode::clip(&String::from_utf8_lossy(&k[..k.len().min(256)])),
            customer_id: ev.customer_id.clone(),
        }),
        _ => Ok(ev),
    }
}

/// The commit's side effects on a task's producer and engine.
struct TaskIo<'a> {
    producer: &'a Producer,
    owner: &'a RefCell<OwnerCheck>,
    engine: &'a mut Engine,
    changelog: &'a str,
    partition: i32,
    faults: &'a FaultInjection,
    records: i64,
    /// Customers a rule migration re-evaluated in this process, at its
    /// commits (`None`: not a migration's commit).
    migrated: Option<i64>,
}

impl CommitIo for TaskIo<'_> {
    fn flush(&mut self) -> Result<(), Error> {
        self.producer.flush()
    }

    fn delivered(&self) -> HashMap<(String, i32), i64> {
        self.producer.with_delivered(Clone::clone)
    }

    fn send_changelog(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), Error> {
        send_changelog(self.producer, &mut self.owner.borrow_mut().fence, (self.changelog, self.partition), key, value)
    }

    fn changelog_end(&self) -> Option<i64> {
        self.producer.delivered_end(self.changelog, self.partition)
    }

    fn check_owner(&mut self, ask_broker: bool) -> Result<(), Error> {
        self.owner.borrow_mut().check(self.producer, ask_broker)
    }

    fn commit_local(&mut self, local: &LocalMarker) -> Result<(), Error> {
        Ok(self.engine.commit(vec![(LOCAL_MARKER_META.into(), serde_json::to_vec(local)?)])?)
    }

    fn crash_point(&self, point: CrashPoint) {
        let count = if self.faults.during_migration { self.migrated } else { Some(self.records) };
        if let Some(n) = count {
            self.faults.crash_point(point, n, self.partition, || self.producer.flush_before_crash());
        }
    }
}

/// Sends a record to the task's changelog partition with its owner epoch.
fn send_changelog(
    producer: &Producer,
    fence: &mut Fence,
    (changelog, partition): (&str, i32),
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<(), Error> {
    let epoch = fence.epoch().to_string();
    let headers = OwnedHeaders::new().insert(Header { key: EPOCH_HEADER, value: Some(epoch.as_bytes()) });
    let mut rec = BaseRecord::<[u8], [u8], ()>::to(changelog).partition(partition).key(key).headers(headers);
    if let Some(v) = value {
        rec = rec.payload(v);
    }
    producer.send(rec)?;
    fence.sent();
    Ok(())
}

/// What a task knows of its partition's ownership ([`crate::fence`]).
pub(crate) struct OwnerCheck {
    /// Reads the changelog's end (and, when someone else wrote, what).
    pub(crate) reader: crate::client::Reader,
    /// This task's owner epoch and what it knows of the changelog's writers.
    pub(crate) fence: Fence,
    lost: StopFlag,
    changelog: String,
    partition: i32,
    /// The last time the task made progress: a gap longer than [`STALL`]
    /// means a stall, after which nothing is produced before a check.
    last_alive: Instant,
}

impl OwnerCheck {
    pub(crate) fn new(
        reader: crate::client::Reader,
        fence: Fence,
        lost: StopFlag,
        changelog: &str,
        partition: i32,
    ) -> Self {
        Self { reader, fence, lost, changelog: changelog.to_string(), partition, last_alive: Instant::now() }
    }

    fn lost_error(&self) -> Error {
        Error::Fenced(format!(
            "partition {}: the group said this instance's assignment was lost (it missed the session timeout); \
             stopped without committing, the new owner replays what was not committed",
            self.partition
        ))
    }

    /// Fails when the group said this instance's assignment was lost.
    pub(crate) fn not_lost(&self) -> Result<(), Error> {
        if self.lost.is_set() {
            return Err(self.lost_error());
        }
        Ok(())
    }

    /// Before anything is produced: after a stall, the broker is asked.
    pub(crate) fn before_output(&mut self, producer: &Producer) -> Result<(), Error> {
        self.not_lost()?;
        if self.last_alive.elapsed() >= STALL {
            self.check(producer, true)?;
        }
        self.last_alive = Instant::now();
        Ok(())
    }

    /// Progress was made (a commit): no stall until [`STALL`] from now —
    /// unless the commit itself took that long (a stall in the middle of it
    /// must still be checked before anything more is produced).
    fn alive(&mut self) {
        if self.last_alive.elapsed() < STALL {
            self.last_alive = Instant::now();
        }
    }

    /// Whether the task still owns its partition: once what it sent is
    /// acknowledged, the end of the changelog (`ask_broker`: its high
    /// watermark; otherwise the offset after the task's last record) tells
    /// whether someone else wrote, and only then is what they wrote read,
    /// for a newer owner record. Waits are ended by `lost`, not by the task's
    /// stop flag: a hand-over still checks.
    pub(crate) fn check(&mut self, producer: &Producer, ask_broker: bool) -> Result<(), Error> {
        let (changelog, partition) = (self.changelog.as_str(), self.partition);
        let (reader, fence, lost) = (&self.reader, &mut self.fence, &self.lost);
        let fenced =
            |what: String| Error::Fenced(format!("partition {partition}: {what}; this instance stopped writing to it"));
        // Acknowledgements first, so that the count of the task's own records
        // is exact (a delivery failure is the caller's to report).
        let _ = producer.flush();
        let stopped = |e: Error| match e {
            Error::Stopped => fenced("the group said this instance's assignment was lost".into()),
            e => e,
        };
        let end = if ask_broker {
            watermarks(reader, changelog, partition, lost).map_err(stopped)?.1
        } else {
            producer.delivered_end(changelog, partition).unwrap_or_default()
        };
        if let Look::Scan { from, to } = fence.look(end) {
            let mut newer = None;
            let mut stale = Vec::new();
            read_range(reader, changelog, partition, (from, to), lost, |m| {
                let key = m.key().unwrap_or_default();
                if fence.is_newer_owner(key, m.offset()) {
                    newer.get_or_insert(m.offset());
                } else {
                    stale.push(key.to_vec());
                }
                Ok(())
            })
            .map_err(stopped)?;
            if let Some(at) = newer {
                return Err(fenced(format!(
                    "another instance took it over (its owner record is at changelog offset {at}, this instance's at {})",
                    fence.epoch()
                )));
            }
            tracing::warn!(
                partition,
                from,
                to,
                "changelog records of a previous owner after this one took over: ignored by every restore, \
                 and their keys written again at the next commit (compaction keeps the last value of a key)"
            );
            for key in stale {
                fence.note_stale(&key);
            }
        }
        fence.looked(end);
        Ok(())
    }
}

impl Task {
    /// Runs until told to stop (or the channel closes): records, commits,
    /// wall-clock advances.
    pub fn run(mut self, rx: Receiver<Msg>) -> Result<(), Error> {
        let interval = self.shared.kafka.commit_interval;
        let idle = self.shared.kafka.idle_advance;
        let every = self.shared.engine.commit_every_records();
        let wait = Duration::from_millis(100).min(interval);
        // Quantile RFM: a partition with state says at once that it joined,
        // records or not, so that the others need not wait for it.
        let watermark = self.engine.clock().watermark;
        if self.quantile.is_some() && watermark != i64::MIN {
            let source = format!("{}time", self.source_prefixes[0]);
            match self.before_watermark(watermark, &source) {
                Err(Error::Stopped) => return self.hand_over(),
                other => other?,
            }
        }
        loop {
            match rx.recv_timeout(wait) {
                Ok(Msg::Records(recs)) => {
                    let (topic, n) = (recs.first().map(|r| r.topic), recs.len() as u64);
                    let taken = self.take(recs);
                    self.publish_tally();
                    if let Some(t) = topic {
                        self.publish_position(t);
                    }
                    self.progress.taken.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    match taken {
                        Err(Error::Stopped) => return self.hand_over(),
                        other => other?,
                    }
                    self.last_record = Instant::now();
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return self.hand_over(),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.emitter.sink().producer().poll();
            if self.records_since_commit >= every
                || (self.records_since_commit > 0 && self.last_commit.elapsed() >= interval)
            {
                self.commit(None)?;
            }
            if idle.is_some_and(|idle| self.last_record.elapsed() >= idle) {
                self.advance_with_wall_clock()?;
            }
        }
    }

    /// Runs the rule migration under way to its end before any record
    /// (ADR 008): customers in id order, `state.commit_every_records` (at
    /// most 10 000) at a time, each batch's transitions produced (source `<topic>/<p>/rules`)
    /// and committed like a batch of records. A new migration is committed
    /// first, so that a crash in its first batch resumes it under the same
    /// rules. A crash replays from the last commit: customers already moved
    /// are passed over by their state's rules version, transitions already
    /// written are not sent again (the replay guard).
    pub(crate) fn finish_migration(
        &mut self,
        planned: Option<segstream_engine::MigrationProgress>,
    ) -> Result<(), Error> {
        self.migrated_here = Some(0);
        if let Some(m) = planned {
            self.engine.begin_migration(m)?;
            self.commit(None)?;
        }
        if self.engine.migration().is_none() {
            self.migrated_here = None;
            return Ok(());
        }
        let every = self.shared.engine.commit_every_records().min(segstream_engine::MIGRATION_BATCH);
        let batch = usize::try_from(every).unwrap_or(usize::MAX).max(1);
        let source = format!("{}rules", self.source_prefixes[0]);
        let started = Instant::now();
        while let Some(before) = self.engine.migration().map(|m| m.customers) {
            if self.stop.is_set() {
                return Err(Error::Stopped);
            }
            self.still_owner()?;
            let step = self.engine.migrate_step(batch, &mut self.out)?;
            self.emitter.sink_mut().set_source(source.clone());
            self.emitter.transitions(&mut self.out)?;
            self.migrated_here = self.migrated_here.map(|n| n + (step.progress.customers - before) as i64);
            if step.done {
                self.marker.rules = Some(step.progress.to.clone());
                self.marker.config_fingerprint = step.progress.to.fingerprint;
            }
            self.commit(None)?;
            self.publish_tally();
            tracing::info!(
                partition = self.partition,
                customers = step.progress.customers,
                of = self.engine.counters().customers,
                transitions = step.progress.transitions,
                seconds = started.elapsed().as_secs_f64(),
                "rule migration to version {}: {}",
                step.progress.to.version,
                if step.done { "complete" } else { "in progress" }
            );
        }
        self.migrated_here = None;
        Ok(())
    }

    fn hand_over(mut self) -> Result<(), Error> {
        self.owner.borrow().not_lost()?;
        self.commit(None)?;
        tracing::info!(partition = self.partition, records = self.records, "partition handed over");
        Ok(())
    }

    /// Before a record: whether the partition is still this task's. After
    /// a stall the changelog is asked; otherwise it costs a clock read.
    fn still_owner(&mut self) -> Result<(), Error> {
        self.owner.borrow_mut().before_output(self.emitter.sink().producer())
    }

    /// An idle partition's watermark follows the wall clock (less the
    /// allowed lateness), when that fires a boundary. The advance is
    /// committed before its transitions are produced, so a replay applies it
    /// at the same point.
    fn advance_with_wall_clock(&mut self) -> Result<(), Error> {
        if self.last_delay_ms.is_some_and(|d| d > self.shared.kafka.live_lag_ms) {
            // A backfill that paused: its time is its events', not today.
            return Ok(());
        }
        let now = self.wall_clock.now(now_ms(), Instant::now());
        let target = now.saturating_sub(self.shared.engine.lateness_ms());
        let watermark = self.engine.clock().watermark;
        // Quantile RFM: the group waits for every partition at each 00:00,
        // so time reaching one is worth an advance too, like a boundary. Not
        // a partition that never had a record: its first records may just be
        // slow to come, and would all be late after it.
        let quantile = self.quantile.is_some() && self.engine.quantile_due(target).is_some();
        if target <= watermark || (self.engine.next_due().is_none_or(|d| d > target) && !quantile) {
            return Ok(());
        }
        self.commit(Some(target))?;
        self.advance_to(target)?;
        self.shared.metrics.wall_clock_advances.inc();
        Ok(())
    }

    /// Moves the watermark to `target` and emits what it fires.
    fn advance_to(&mut self, target: i64) -> Result<(), Error> {
        let source = format!("{}time", self.source_prefixes[0]);
        self.before_watermark(target, &source)?;
        self.engine.advance_watermark(target, &mut self.out)?;
        self.emitter.sink_mut().set_source(source);
        self.emitter.transitions(&mut self.out)?;
        self.publish_tally();
        Ok(())
    }

    /// Quantile RFM: before the watermark moves to `target`, for each
    /// recomputation instant on the way, the partition's part of the
    /// population there is published and the group's whole population
    /// supplied to the engine (ADR 010). The watermark first goes to the
    /// millisecond before the instant, as it would on its way (the
    /// transitions that fires are the record's, `source`); then the task
    /// waits until every input partition has published its part.
    fn before_watermark(&mut self, target: i64, source: &str) -> Result<(), Error> {
        if self.quantile.is_none() || target == i64::MIN {
            return Ok(());
        }
        let watermark = self.engine.clock().watermark;
        if watermark == i64::MIN {
            // The partition's first record: its start, and the group's
            // recomputations before it (on this empty state).
            let first = self.exchange(|task, x| {
                task.publish_start(x, target, true)?;
                let n = task.shared.input_partitions;
                task.wait_for(x, "the other partitions' first records", |x| {
                    x.first_start(n).ok_or_else(|| format!("no start from partitions {:?}", x.missing(i64::MIN, n)))
                })
            })?;
            if first < target {
                self.engine.start_watermark_at(first);
            }
            self.quantile_joined = true;
        } else if !self.quantile_joined {
            // State from before quantile mode (or before this quantile
            // topic): joined at the watermark, no recomputation up to it.
            self.exchange(|task, x| {
                if task.publish_start(x, watermark, false)? {
                    tracing::info!(
                        partition = task.partition,
                        watermark = %segstream_decode::format_rfc3339_millis(watermark),
                        "quantile RFM: this partition joins with its state; recomputations start after its watermark"
                    );
                }
                Ok(())
            })?;
            self.quantile_joined = true;
        }
        while let Some(at) = self.engine.quantile_due(target) {
            self.engine.advance_watermark(at - 1, &mut self.out)?;
            self.emitter.sink_mut().set_source(source.to_string());
            self.emitter.transitions(&mut self.out)?;
            let whole = self.exchange(|task, x| {
                let n = task.shared.input_partitions;
                let what = format!("the populations at {}", segstream_decode::format_rfc3339_millis(at));
                let me = task.partition;
                let mine = task.wait_for(x, &what, |x| {
                    x.counts_at(at, me, n)
                        .ok_or_else(|| format!("no start from partitions {:?}", x.missing(i64::MIN, n)))
                })?;
                if mine && x.part(at, task.partition).is_none() {
                    let population = task.engine.population_at(at)?;
                    task.still_owner()?;
                    x.publish(
                        task.emitter.sink().producer(),
                        &Published::Part { at, partition: task.partition, population },
                    )?;
                }
                let whole = task.wait_for(x, &what, |x| {
                    x.merged(at, n).ok_or_else(|| format!("nothing yet from partitions {:?}", x.missing(at, n)))
                })?;
                x.forget_before(at);
                Ok(whole)
            })?;
            self.engine.supply_population(at, whole);
        }
        Ok(())
    }

    /// Publishes this partition's start unless one is there already (the
    /// first one wins); whether it did.
    fn publish_start(&mut self, x: &Exchange, watermark: i64, fresh: bool) -> Result<bool, Error> {
        if x.start(self.partition).is_some() {
            return Ok(false);
        }
        self.still_owner()?;
        x.publish(self.emitter.sink().producer(), &Published::Start { partition: self.partition, watermark, fresh })?;
        Ok(true)
    }

    /// Runs `f` with the quantile exchange, read up to the topic's end first.
    fn exchange<T>(&mut self, f: impl FnOnce(&mut Self, &mut Exchange) -> Result<T, Error>) -> Result<T, Error> {
        let mut x = self.quantile.take().expect("quantile mode");
        let read = x.catch_up(&self.owner.borrow().reader, &self.stop);
        let result = read.and_then(|()| f(self, &mut x));
        self.quantile = Some(x);
        result
    }

    /// Reads the quantile topic until `ready` gives an answer (stop-aware;
    /// every 30 s a warning names who is missing).
    fn wait_for<T>(
        &mut self,
        x: &mut Exchange,
        what: &str,
        ready: impl Fn(&Exchange) -> Result<T, String>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let mut said = Instant::now();
        loop {
            let missing = match ready(x) {
                Ok(v) => return Ok(v),
                Err(missing) => missing,
            };
            if self.stop.is_set() {
                return Err(Error::Stopped);
            }
            // Waiting is progress: the stuck check must not flag it.
            self.progress.ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.emitter.sink().producer().poll();
            if said.elapsed() >= Duration::from_secs(30) {
                said = Instant::now();
                tracing::warn!(
                    partition = self.partition,
                    waiting_s = started.elapsed().as_secs(),
                    missing,
                    "quantile recomputation: waiting for {what} on {} (every input partition publishes its part when \
                     its watermark reaches the instant; a partition without records never does)",
                    self.shared.kafka.quantile_topic
                );
            }
            std::thread::sleep(Duration::from_millis(100));
            x.catch_up(&self.owner.borrow().reader, &self.stop)?;
        }
    }

    /// Records from the main thread. One input topic: processed in offset
    /// order. Several: in the order of the run log ([`crate::runlog`]): each
    /// run is logged to the changelog (and acknowledged) before any of its
    /// output, so that a replay processes them in the same order.
    fn take(&mut self, recs: Vec<Rec>) -> Result<(), Error> {
        if let Some(first) = recs.first() {
            let t = first.topic;
            if !std::mem::replace(&mut self.delivered[t], true)
                && self.next_offsets[t] >= 0
                && first.offset > self.next_offsets[t]
            {
                self.fill_gap(t, first.offset)?;
            }
        }
        self.take_records(recs)
    }

    /// The group consumer started topic `t` at `to`, after this partition's
    /// committed position (the group's offsets were moved forward by hand,
    /// or reset to the latest after they expired): the records in between
    /// are read from the topic here and processed first, so none is
    /// skipped. Records the topic's retention already deleted are lost:
    /// said and counted.
    fn fill_gap(&mut self, t: usize, to: i64) -> Result<(), Error> {
        const CHUNK: i64 = 10_000;
        let topic = self.shared.kafka.inputs[t].topic.clone();
        let partition = self.partition;
        let from = self.next_offsets[t];
        let (low, _) = watermarks(&self.owner.borrow().reader, &topic, partition, &self.stop)?;
        if low > from {
            let lost = (low.min(to) - from) as u64;
            self.shared.metrics.retention_lost.inc_by(lost);
            tracing::error!(
                topic,
                partition,
                from,
                to = low.min(to),
                "input records deleted by the topic's retention before this partition processed them: lost \
                 (the group was stopped for longer than the input's retention.ms)"
            );
        }
        let mut at = from.max(low);
        if at >= to {
            return Ok(());
        }
        let (start, mut read) = (at, 0);
        while at < to {
            let end = (at + CHUNK).min(to);
            let mut chunk = Vec::new();
            read_range(&self.owner.borrow().reader, &topic, partition, (at, end), &self.stop, |m| {
                chunk.push(Rec::from_message(t, m));
                Ok(())
            })?;
            self.shared.metrics.gap_records.inc_by(chunk.len() as u64);
            read += chunk.len();
            self.take_records(chunk)?;
            self.publish_position(t);
            at = end;
        }
        if read > 0 {
            tracing::warn!(
                topic,
                partition,
                from = start,
                to,
                records = read,
                "the group's offset was ahead of this partition's last commit (offsets moved by hand, or reset after \
                 they expired): the records in between were read from the topic and processed first"
            );
        } else {
            // Only offsets without records (transaction markers, compaction).
            tracing::debug!(
                topic,
                partition,
                from = start,
                to,
                "no record between the last commit and the group's offset"
            );
        }
        Ok(())
    }

    fn take_records(&mut self, recs: Vec<Rec>) -> Result<(), Error> {
        if self.shared.kafka.inputs.len() == 1 {
            for r in recs {
                self.process(r)?;
            }
            return Ok(());
        }
        self.runs.push(recs);
        loop {
            match self.runs.next(&self.next_offsets) {
                Step::Record(r) => self.process(r)?,
                Step::Log { topic, first, last } => {
                    self.still_owner()?;
                    let key = run_key(self.records);
                    let run = LoggedRun { topic: self.shared.kafka.inputs[topic].topic.clone(), first, last };
                    let value = serde_json::to_vec(&run)?;
                    let producer = self.emitter.sink().producer();
                    let place = (self.shared.kafka.changelog_topic.as_str(), self.partition);
                    send_changelog(producer, &mut self.owner.borrow_mut().fence, place, &key, Some(&value))?;
                    producer.flush()?;
                    self.run_keys.push(key);
                }
                Step::Wait => return Ok(()),
            }
        }
    }

    /// Decodes a payload of input topic `topic`; waits (stop-aware) while
    /// the Schema Registry cannot answer.
    fn decode(&mut self, topic: usize, payload: &[u8]) -> Result<Result<Event, DecodeError>, Error> {
        let (Format::Avro, Some(decoder)) = (self.shared.kafka.inputs[topic].format, &mut self.decoder) else {
            return Ok(decode_json_line(payload));
        };
        let metrics = &self.shared.metrics;
        let transient = |e: &DecodeError| e.class() == ErrorClass::Transient;
        let what = format!("partition {}: decoding", self.partition);
        match retry(&what, &self.stop, Backoff::REGISTRY, transient, || {
            decoder.decode(payload).inspect_err(|e| {
                if e.class() != ErrorClass::Poison {
                    metrics.registry_errors.inc();
                }
            })
        }) {
            Ok(ev) => Ok(Ok(ev)),
            Err(RetryError::GaveUp { last, .. }) if last.class() == ErrorClass::Fatal => {
                Err(Error::Setup(format!("partition {}: {last}", self.partition)))
            }
            Err(RetryError::GaveUp { last, .. }) => Ok(Err(last)),
            Err(RetryError::Stopped) => Err(Error::Stopped),
        }
    }

    fn process(&mut self, r: Rec) -> Result<(), Error> {
        self.progress.ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = r.topic;
        if r.offset < self.next_offsets[t] {
            return Ok(()); // already in the committed state
        }
        self.still_owner()?;
        let record = self.records;
        if r.key.is_none() {
            self.shared.metrics.unkeyed.inc();
        }
        let decoded = match &r.payload {
            None => Err(DecodeError::Json("empty message (null value)".into())),
            Some(p) => self.decode(t, p)?,
        }
        .and_then(|ev| keyed_by_customer(r.key.as_deref(), ev))
        .and_then(|ev| self.shared.engine.window().check(ev.ts, r.timestamp).map(|()| ev));
        let source = format!("{}{}", self.source_prefixes[t], r.offset);
        match decoded {
            Err(e) => {
                self.engine.count_invalid();
                let dead =
                    DeadLetter { location: &source, error: &e, key: r.key.as_deref(), raw: r.payload.as_deref() };
                self.emitter.dead_letter(&dead)?;
            }
            Ok(ev) => {
                self.check_placement(&ev.customer_id, r.key.is_some(), &source);
                if let Some(t) = r.timestamp {
                    self.last_delay_ms = Some(t.saturating_sub(ev.ts));
                }
                let clock = self.engine.clock();
                let target =
                    clock.max_ts.map_or(ev.ts, |m| m.max(ev.ts)).saturating_sub(self.shared.engine.lateness_ms());
                self.before_watermark(target, &source)?;
                let m = &self.shared.metrics;
                m.events.inc();
                if self.emitter.sink().guard().skips(&ev.customer_id, record) {
                    self.engine.skip_event(&ev, &mut self.out)?;
                    m.replay_skipped_events.inc();
                } else {
                    match self.engine.on_event(&ev, &mut self.out)? {
                        Outcome::Duplicate => m.duplicates.inc(),
                        Outcome::Applied { late: true, .. } | Outcome::Deleted { late: true } => m.late.inc(),
                        _ => 0,
                    };
                    self.epoch_applied.insert(ev.customer_id, record);
                }
                self.emitter.sink_mut().set_source(source);
                self.emitter.transitions(&mut self.out)?;
            }
        }
        self.records += 1;
        self.next_offsets[t] = r.offset + 1;
        self.records_since_commit += 1;
        if let Some(left) = self.emitter.sink_mut().guard_mut().passed(&self.next_offsets) {
            // Left over: records of customers whose restored state was
            // already past them (skip map), which the replay does not recompute.
            tracing::info!(partition = self.partition, left, "replay caught up with the previous run's output");
        }
        if self.records_since_commit >= self.shared.engine.commit_every_records() || self.engine.store().commit_due() {
            self.commit(None)?;
        }
        Ok(())
    }

    /// A record whose customer belongs to another partition (by
    /// `kafka.key_partitioner`) is processed here, where that customer's
    /// state is not: a second, separate copy of the customer. Counted and
    /// logged with its location (throttled; no customer id in the log).
    fn check_placement(&mut self, customer: &str, keyed: bool, source: &str) {
        let k = &self.shared.kafka;
        let home = partition_for_key(customer.as_bytes(), self.shared.input_partitions, k.key_partitioner);
        if home == self.partition {
            return;
        }
        self.shared.metrics.misplaced.inc();
        match self.misplaced.note() {
            Say::Each { last } => {
                tracing::warn!(
                    location = source,
                    keyed,
                    home_partition = home,
                    partitioner = k.key_partitioner.name(),
                    "record in the wrong partition: its customer belongs to partition {home}, where its state is; \
                     processed here it starts a separate copy of the customer (produce events keyed by \
                     customer_id with the partitioner kafka.key_partitioner names){}",
                    if last {
                        "; further ones are counted (segstream_input_misplaced_records_total) and summarised every minute"
                    } else {
                        ""
                    }
                );
            }
            Say::Summary(count) => {
                tracing::warn!(count, last = source, "records in the wrong partition in the last minute");
            }
            Say::Nothing => {}
        }
    }

    /// Commits (see [`crate::commit`]), then tells the main thread and the metrics.
    fn commit(&mut self, pending_watermark: Option<i64>) -> Result<(), Error> {
        let _span = tracing::debug_span!("commit", partition = self.partition, records = self.records).entered();
        self.owner.borrow().not_lost()?;
        let started = Instant::now();
        let next = self.records;
        let mut states = Vec::new();
        self.rewrite_stale_keys(&mut states)?;
        let mut tombstones = Vec::new();
        let mut erased = Vec::new();
        let guard = self.emitter.sink().guard();
        // The query API's history first (a recovery keeps an unfinished
        // commit's history only with its customer's state, see `restore`),
        // then the customers; the daily counts, so that a new owner
        // restoring from the changelog has them too.
        self.engine.for_each_history_change(|id, writes| {
            for (seq, entry) in writes {
                let value = entry.as_ref().map(|e| e.encode());
                states.push((history_key(id, *seq), value));
            }
        });
        let histories = states.len();
        self.engine.for_each_dirty(|id, st| {
            let applied = self.epoch_applied.get(id).copied().or_else(|| guard.applied_through(id)).unwrap_or(-1);
            states.push((customer_key(id), Some(encode_customer(applied, st))));
            if st.is_none() {
                tombstones.push(customer_key(id));
                erased.push(id.to_string());
            }
        });
        let customers = states.len() - histories;
        for (day, counts) in self.engine.pending_series() {
            states.push((series_key(*day), Some(encode_series(counts))));
        }
        tombstones.append(&mut self.run_keys);
        let inputs = &self.shared.kafka.inputs;
        let offsets: Vec<(&str, i64)> =
            inputs.iter().map(|i| i.topic.as_str()).zip(self.next_offsets.iter().copied()).collect();
        let pending_runs = self
            .runs
            .pending_runs(&self.next_offsets)
            .into_iter()
            .map(|(t, last)| LoggedRun { topic: inputs[t].topic.clone(), first: -1, last })
            .collect();
        let (clock, counters) = (self.engine.clock(), self.engine.counters().clone());
        let sink = self.emitter.sink_mut();
        let hold_outputs = sink.guard().holds_outputs();
        let skip = sink.guard_mut().prune_skips(next).clone();
        let sink = self.emitter.sink();
        let progress = Progress {
            records: next,
            next_offsets: &offsets,
            pending_runs,
            clock,
            counters,
            pending_watermark,
            delivered: None,
            output_topics: sink.output_topics(),
            skip,
            erased,
            last_delay_ms: self.last_delay_ms,
            migration: self.engine.migration().cloned(),
            quantile: self.engine.quantile().cloned(),
        };
        let mut io = TaskIo {
            producer: sink.producer(),
            owner: &self.owner,
            engine: &mut self.engine,
            changelog: &self.shared.kafka.changelog_topic,
            partition: self.partition,
            faults: &self.shared.kafka.faults,
            records: next,
            migrated: self.migrated_here,
        };
        let c = Commit { prev: &self.marker, progress, hold_outputs, states, tombstones, now_ms: now_ms() };
        let done = commit(&mut io, c)?;
        let positions: Vec<(String, i64)> =
            offsets.iter().filter(|(_, o)| *o >= 0).map(|(t, o)| (t.to_string(), *o)).collect();
        self.shared.committed.lock().expect("committed offsets").insert(self.partition, positions.clone());
        self.publish(&positions, started.elapsed(), done.marker.clock.watermark);
        tracing::debug!(
            partition = self.partition,
            seq = done.marker.seq,
            records = next,
            customers,
            output_flush_ms = done.outputs_acknowledged.as_millis() as u64,
            changelog_ms = (done.marker_acknowledged - done.outputs_acknowledged).as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "committed"
        );
        self.marker = done.marker;
        self.epoch_applied.clear();
        self.records_since_commit = 0;
        self.last_commit = Instant::now();
        self.owner.borrow_mut().alive();
        Ok(())
    }

    /// Keys a stalled previous owner wrote after this task took over (see
    /// [`Fence::note_stale`]): customers are written again with this commit
    /// (touched), history entries and day counts with this task's values.
    fn rewrite_stale_keys(&mut self, states: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), Error> {
        let stale = self.owner.borrow_mut().fence.take_stale();
        for key in stale {
            match crate::changelog::decode_entry(&key, None) {
                Ok(crate::changelog::Entry::Customer { id, .. }) => self.engine.touch_customer(&id)?,
                Ok(crate::changelog::Entry::History { id, seq, .. }) => {
                    let value = self.engine.history_entry(&id, seq)?;
                    states.push((key, value.map(|e| e.encode())));
                }
                Ok(crate::changelog::Entry::Series { day, .. }) => {
                    if let Some(counts) = self.engine.series()?.into_iter().find(|(d, _)| *d == day).map(|(_, c)| c) {
                        states.push((key, Some(encode_series(&counts))));
                    }
                }
                // A run record: nobody needs it; a marker: this commit's supersedes it.
                Ok(crate::changelog::Entry::Run(_)) => states.push((key, None)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Metrics after a commit: the commit itself and the partition's position.
    fn publish(&mut self, positions: &[(String, i64)], took: Duration, watermark: i64) {
        let m = &self.shared.metrics;
        m.commits.inc();
        m.commit_seconds.observe(took.as_secs_f64());
        let label = PartitionLabel { partition: self.partition };
        m.records.get_or_create(&label).set(self.records);
        for (topic, offset) in positions {
            m.offsets
                .get_or_create(&TopicPartitionLabel { topic: topic.clone(), partition: self.partition })
                .set(*offset);
        }
        m.watermark.get_or_create(&label).set(watermark.max(0) as f64 / 1000.0);
        let g = &m.gauges;
        g.last_commit.get_or_create(&label).set(now_ms() as f64 / 1000.0);
        g.producer_queue.get_or_create(&label).set(i64::from(self.emitter.sink().producer().in_flight()));
        self.publish_tally();
        self.publish_state();
    }

    /// Where to report progress (the group thread watches it).
    pub fn report_progress(&mut self, progress: Arc<crate::record::Progress>) {
        self.progress = progress;
    }

    /// Once restored: the gauges of a partition that may stay idle.
    pub(crate) fn publish_opened(&mut self) {
        for t in 0..self.next_offsets.len() {
            if self.next_offsets[t] >= 0 {
                self.publish_position(t);
            }
        }
        self.publish_state();
    }

    /// After a batch: how far the partition is, for the lag gauges.
    fn publish_position(&self, t: usize) {
        let g = &self.shared.metrics.gauges;
        let topic = self.shared.kafka.inputs[t].topic.clone();
        g.position.get_or_create(&TopicPartitionLabel { topic, partition: self.partition }).set(self.next_offsets[t]);
    }

    /// At a commit: the state's size and this partition's share of the
    /// segment populations (added as differences, so that the instance's
    /// gauges are the sums over its partitions).
    fn publish_state(&mut self) {
        let g = &self.shared.metrics.gauges;
        let counts = self.engine.segment_counts();
        let groups = self.engine.scorer().groups();
        let mut now: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
        for (&(gi, si), c) in &counts {
            let Some(group) = groups.get(usize::from(gi)) else { continue };
            let Some(segment) = group.segments.get(usize::from(si)) else { continue };
            now.insert((group.name.to_string(), segment.to_string()), (c.customers, c.mrr_cents));
        }
        let customers: i64 = counts.iter().filter(|((gi, _), _)| *gi == 0).map(|(_, c)| c.customers).sum();
        let mut delta = BTreeMap::new();
        for (k, v) in &now {
            let before = self.published_segments.get(k).copied().unwrap_or((0, 0));
            delta.insert(k.clone(), (v.0 - before.0, v.1 - before.1));
        }
        for (k, before) in &self.published_segments {
            if !now.contains_key(k) {
                delta.insert(k.clone(), (-before.0, -before.1));
            }
        }
        g.add_segments(&delta);
        self.published_segments = now;
        let store = self.engine.store();
        let s = store.stats();
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        g.set_store(
            self.partition,
            crate::gauges::StoreFigures {
                customers,
                cached_customers: store.cached_customers() as i64,
                live_data_bytes: big(s.live_data_bytes),
                estimated_keys: big(s.estimated_keys),
                block_cache_bytes: big(s.block_cache_bytes),
                pending_compaction_bytes: big(s.pending_compaction_bytes),
                write_stopped: s.write_stopped,
            },
        );
    }

    /// Adds what the emitter wrote since the last call to the transition and
    /// dead-letter counters (after each batch of records, each wall-clock
    /// advance and each commit; not per record, which would build label
    /// strings for every transition).
    fn publish_tally(&mut self) {
        let m = &self.shared.metrics;
        self.published.publish(self.emitter.tally(), &m.transitions, &m.dead_letters);
    }
}

impl Drop for Task {
    /// The partition leaves this instance: its share of the segment
    /// populations and its series go with it.
    fn drop(&mut self) {
        let g = &self.shared.metrics.gauges;
        let delta = self.published_segments.iter().map(|(k, v)| (k.clone(), (-v.0, -v.1))).collect();
        g.add_segments(&delta);
        g.forget_partition(self.partition, &self.shared.kafka.topic_names());
    }
}
