//! The consumer group: the calling thread polls it and runs the rebalance
//! callbacks, which start and stop one [`Task`] thread per assigned
//! partition; records go to the tasks through bounded queues (a full queue
//! pauses that partition's fetching).

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use segstream_engine::EngineSettings;

use crate::error::Error;
use crate::metrics::{Metrics, PartitionState};
use crate::partition::{Shared, Task};
use crate::preflight;
use crate::record::{Msg, Rec};
use crate::settings::KafkaSettings;
use crate::stop::StopFlag;

/// Numbers the assignments of partitions (see [`PartitionState::Ready`]).
static NEXT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Batches queued per partition before its fetching is paused.
const TASK_QUEUE: usize = 8;
const BATCH: usize = 2_000;

struct TaskHandle {
    tx: SyncSender<Msg>,
    stop: StopFlag,
    lost: StopFlag,
    join: JoinHandle<Result<(), Error>>,
    /// Batches the task's queue had no room for.
    pending: VecDeque<Vec<Rec>>,
    paused: bool,
    /// Records handed to the task; the task counts those of the batches it
    /// finished, and ticks per record: work waits while `sent > taken`.
    sent: u64,
    progress: Arc<crate::record::Progress>,
    /// The task's ticks at the last check, and since when they have not
    /// moved while work waited.
    seen: (u64, Instant),
}

/// Owns the partition tasks; the rebalance callbacks start and stop them.
struct GroupContext {
    shared: Arc<Shared>,
    tasks: Mutex<HashMap<i32, TaskHandle>>,
    failure: Mutex<Option<String>>,
    /// Partitions whose task found a newer owner, since when: the group
    /// should revoke them soon; their records are dropped meanwhile.
    fenced: Mutex<HashMap<i32, Instant>>,
    /// High watermarks of the input partitions from librdkafka's statistics.
    highs: Mutex<HashMap<(String, i32), i64>>,
}

/// How long a partition may stay assigned here after its task was fenced
/// before the process stops (a restart rejoins the group cleanly).
const FENCED_LIMIT: Duration = Duration::from_secs(60);

impl GroupContext {
    fn fail(&self, msg: String) {
        tracing::error!("{msg}");
        self.failure.lock().expect("failure").get_or_insert(msg);
    }

    fn start(&self, partition: i32) {
        let (tx, rx) = sync_channel(TASK_QUEUE);
        let shared = self.shared.clone();
        let stop = StopFlag::new();
        let lost = StopFlag::new();
        let (task_stop, task_lost) = (stop.clone(), lost.clone());
        let progress = Arc::new(crate::record::Progress::default());
        let counter = progress.clone();
        let generation = NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.metrics.set_partition(partition, Some(PartitionState::Restoring));
        let join = std::thread::Builder::new()
            .name(format!("partition-{partition}"))
            .spawn(move || {
                let metrics = shared.metrics.clone();
                let ended = Task::open(shared, partition, task_stop, task_lost).and_then(|mut task| {
                    metrics.set_partition(partition, Some(PartitionState::Ready(generation)));
                    task.report_progress(counter);
                    task.run(rx)
                });
                match &ended {
                    // Revoked while restoring: the restore stops at once, so
                    // the rebalance is not held up by it.
                    // (The restore says how far it came.)
                    Err(Error::Stopped) => tracing::debug!(partition, "task stopped while opening"),
                    Err(Error::Fenced(why)) => tracing::warn!(partition, "{why}"),
                    // Said now, not when the main thread collects the task.
                    Err(e) => tracing::error!(partition, "partition task failed: {e}"),
                    Ok(()) => {}
                }
                ended
            })
            .expect("spawning a partition thread");
        let handle = TaskHandle {
            tx,
            stop,
            lost,
            join,
            pending: VecDeque::new(),
            paused: false,
            sent: 0,
            progress,
            seen: (0, Instant::now()),
        };
        self.tasks.lock().expect("tasks").insert(partition, handle);
        self.shared.metrics.assigned_partitions.inc();
    }

    /// Stops a task after it commits: returns once its state and outputs
    /// are durable, so the next owner starts from them. With `lost` (the
    /// group gave the partition to another member already), the task ends
    /// without writing anything.
    fn stop(&self, partition: i32, lost: bool) {
        let Some(h) = self.tasks.lock().expect("tasks").remove(&partition) else { return };
        self.shared.metrics.assigned_partitions.dec();
        self.shared.metrics.set_partition(partition, None);
        if lost {
            h.lost.set();
        }
        // A task waiting on a retry (registry, broker) gives up at once; one
        // that already ended dropped its receiver: nothing to tell it.
        h.stop.set();
        let _ = h.tx.send(Msg::Stop);
        let joined = h.join.join();
        // (A task removes its series when it ends; a restore stopped before
        // the task existed leaves its progress gauge.)
        self.shared.metrics.gauges.forget_partition(partition, &self.shared.kafka.topic_names());
        match joined {
            // Stopped during its restore: nothing was processed, nothing to commit.
            Ok(Ok(())) | Ok(Err(Error::Stopped)) => {}
            // Another instance owns it now: not this process's failure.
            Ok(Err(Error::Fenced(_))) => {
                // Its positions are the new owner's to commit.
                self.shared.committed.lock().expect("committed").remove(&partition);
                if !lost {
                    self.fenced.lock().expect("fenced").insert(partition, Instant::now());
                }
            }
            Ok(Err(e)) => self.fail(format!("partition {partition}: {e}")),
            Err(_) => self.fail(format!("partition {partition}: the task panicked")),
        }
    }

    fn stop_all(&self) {
        let parts: Vec<i32> = self.tasks.lock().expect("tasks").keys().copied().collect();
        for p in parts {
            self.stop(p, false);
        }
    }

    fn commit_offsets(&self, consumer: &BaseConsumer<GroupContext>, parts: Option<&[i32]>, mode: CommitMode) {
        let committed = self.shared.committed.lock().expect("committed").clone();
        let mut tpl = TopicPartitionList::new();
        for (p, positions) in committed {
            if parts.is_none_or(|ps| ps.contains(&p)) {
                for (topic, off) in positions {
                    // Cannot fail: the offset is a plain number.
                    let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(off));
                }
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, mode) {
                // Informational only: the authoritative position is the commit marker.
                tracing::debug!("committing group offsets: {e}");
            }
        }
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::client::bridge_log("consumer", level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::client::bridge_error("consumer", &error, reason);
    }

    /// librdkafka's statistics (`statistics.interval.ms`): the high
    /// watermark of each input partition as of the last fetch, for the lag.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut highs = self.highs.lock().expect("highs");
        for (topic, t) in statistics.topics {
            for (p, part) in t.partitions {
                // The last stable offset (what a read_committed consumer
                // can reach), else the high watermark.
                let end = if part.ls_offset >= 0 { part.ls_offset } else { part.hi_offset };
                if p >= 0 && end >= 0 {
                    highs.insert((topic.clone(), p), end);
                }
            }
        }
    }
}

/// The partition numbers in a list (each once: co-partitioned input topics
/// share their numbers, and one task serves partition `p` of all of them).
fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    parts.sort_unstable();
    parts.dedup();
    parts
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = partitions(tpl);
            self.fenced.lock().expect("fenced").retain(|p, _| !parts.contains(p));
            if consumer.assignment_lost() {
                // The group moved on without this instance (it missed the
                // session timeout): others own these partitions already.
                tracing::warn!(
                    ?parts,
                    "assignment lost (this instance missed the group's session timeout): \
                     its partitions stop without writing; their new owners replay what was not committed"
                );
                for &p in &parts {
                    self.stop(p, true);
                }
            } else {
                tracing::info!(?parts, "partitions revoked: committing and handing over");
                for &p in &parts {
                    self.stop(p, false);
                }
                self.commit_offsets(consumer, Some(&parts), CommitMode::Sync);
            }
            self.shared.committed.lock().expect("committed").retain(|p, _| !parts.contains(p));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = partitions(tpl);
                if let Some(p) = parts.iter().find(|p| **p >= self.shared.input_partitions) {
                    // Kafka's partitioners map keys by the partition count: a
                    // customer's new events would go where its state is not.
                    self.fail(format!(
                        "input partition {p} appeared: the input topics grew from {} partitions while segstream ran. \
                         Customers' events now reach partitions their state is not in; see README, \"Run with Kafka\"",
                        self.shared.input_partitions
                    ));
                }
                self.shared.metrics.set_assigned();
                tracing::info!(?parts, "partitions assigned: restoring");
                self.fenced.lock().expect("fenced").clear();
                for p in parts {
                    self.start(p);
                }
            }
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Runs the consumer group until `stop` is set (or a partition fails,
/// which is an error: a restart recovers exactly).
pub fn run(engine: EngineSettings, kafka: KafkaSettings, metrics: Arc<Metrics>, stop: StopFlag) -> Result<(), Error> {
    let checked = preflight::check(&kafka)?;
    if engine.scorer().quantile_min_customers().is_some() {
        preflight::check_quantile_topic(&kafka)?;
    }
    metrics.set_input_partitions(checked.input_partitions);
    let group_id = kafka.group_id.clone();
    let consumer_config = kafka.client_config(
        &[("fetch.wait.max.ms", "100"), ("auto.offset.reset", "earliest"), ("statistics.interval.ms", "5000")],
        &kafka.consumer_properties,
        &[
            ("group.id", group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("partition.assignment.strategy", "range"),
        ],
    );
    let shared = Arc::new(Shared {
        engine,
        kafka,
        metrics: metrics.clone(),
        output: checked.output,
        changelog_delete_retention: checked.changelog_delete_retention,
        committed: Mutex::new(HashMap::new()),
        input_partitions: checked.input_partitions,
    });
    let ctx = GroupContext {
        shared: shared.clone(),
        tasks: Mutex::new(HashMap::new()),
        failure: Mutex::new(None),
        fenced: Mutex::new(HashMap::new()),
        highs: Mutex::new(HashMap::new()),
    };
    let consumer: BaseConsumer<GroupContext> =
        consumer_config.create_with_context(ctx).map_err(Error::broker("creating the group consumer"))?;
    let names = shared.kafka.topic_names();
    consumer.subscribe(&names).map_err(Error::broker("subscribing"))?;
    metrics.set_ready(true);
    tracing::info!(group = group_id, input = ?names, output = shared.kafka.output_topic, "consuming");
    let result = consume(&consumer, &stop);
    metrics.set_ready(false);
    let ctx = consumer.context();
    tracing::info!("stopping: committing every partition");
    ctx.stop_all();
    ctx.commit_offsets(&consumer, None, CommitMode::Sync);
    let failure = ctx.failure.lock().expect("failure").take();
    let committed = failure.is_none() && result.is_ok();
    if committed {
        tracing::info!("partitions committed; leaving the group");
    } else {
        tracing::info!("partitions that could commit did; leaving the group (a restart recovers the others exactly)");
    }
    // What could be committed is: a broker that does not answer the leave
    // request must not keep the process from exiting (the group notices a
    // member that left without a word within its session timeout).
    let (left, leaving) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        consumer.unsubscribe();
        drop(consumer);
        let _ = left.send(());
    });
    match leaving.recv_timeout(Duration::from_secs(10)) {
        Ok(()) => tracing::info!("left the group"),
        Err(_) => tracing::warn!(
            "leaving the group takes over 10 s (the broker does not answer): exiting anyway{}; the group notices \
             within its session timeout",
            if committed { " (every partition is committed)" } else { "" }
        ),
    }
    result?;
    match failure {
        Some(f) => Err(Error::PartitionFailed(f)),
        None => Ok(()),
    }
}

/// Once a second: each partition's lag (librdkafka's statistics: the last
/// stable offset of the last fetch, less the task's position) and
/// event-time lag for the gauges, and which partitions are stuck for
/// `/healthz`: records handed to their task wait and the task processed
/// none of them for `kafka.stuck_after_ms` (restores excluded). Stuck is
/// judged from the task's own progress, not from offsets: an idle
/// partition, or one whose last offsets are transaction markers, is never
/// stuck.
fn watch(consumer: &BaseConsumer<GroupContext>, topics: &[&str]) {
    use crate::metrics::{PartitionLabel, TopicPartitionLabel};
    let ctx = consumer.context();
    let m = &ctx.shared.metrics;
    let g = &m.gauges;
    let now_s = crate::clock::host_now_ms() as f64 / 1000.0;
    let states = m.partitions().1;
    let highs = ctx.highs.lock().expect("highs");
    for &p in states.keys() {
        let label = PartitionLabel { partition: p };
        for topic in topics {
            let Some(&end) = highs.get(&(topic.to_string(), p)) else { continue };
            let tl = TopicPartitionLabel { topic: topic.to_string(), partition: p };
            let position = g.position.get_or_create(&tl).get();
            g.lag.get_or_create(&tl).set((end - position).max(0));
        }
        let watermark = m.watermark.get_or_create(&label).get();
        if watermark > 0.0 {
            g.event_time_lag.get_or_create(&label).set((now_s - watermark).max(0.0));
        }
    }
    drop(highs);
    let mut stuck = Vec::new();
    let after = ctx.shared.kafka.stuck_after;
    for (&p, h) in ctx.tasks.lock().expect("tasks").iter_mut() {
        let taken = h.progress.taken.load(std::sync::atomic::Ordering::Relaxed);
        let ticks = h.progress.ticks.load(std::sync::atomic::Ordering::Relaxed);
        let waiting = h.sent > taken || !h.pending.is_empty();
        let restoring = states.get(&p) == Some(&PartitionState::Restoring);
        if ticks != h.seen.0 || !waiting || restoring {
            h.seen = (ticks, Instant::now());
            g.last_progress.get_or_create(&PartitionLabel { partition: p }).set(now_s);
        } else if after.is_some_and(|after| h.seen.1.elapsed() > after) {
            stuck.push(p);
        }
    }
    stuck.sort_unstable();
    if stuck != m.stuck() {
        if stuck.is_empty() {
            tracing::info!("no partition is stuck any more: /healthz passes");
        } else {
            tracing::warn!(partitions = ?stuck, "partitions with records waiting processed none for kafka.stuck_after_ms: /healthz fails");
        }
    }
    m.set_stuck(stuck);
}

fn consume(consumer: &BaseConsumer<GroupContext>, stop: &StopFlag) -> Result<(), Error> {
    let ctx = consumer.context();
    let topics = ctx.shared.kafka.topic_names();
    let mut batches: HashMap<(i32, usize), Vec<Rec>> = HashMap::new();
    let mut last_offset_commit = Instant::now();
    while !stop.is_set() {
        if let Some(f) = ctx.failure.lock().expect("failure").clone() {
            return Err(Error::PartitionFailed(f));
        }
        let mut n = 0;
        let mut wait = Duration::from_millis(100);
        while n < BATCH {
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    n += 1;
                    let Some(topic) = topics.iter().position(|t| *t == m.topic()) else { continue };
                    batches.entry((m.partition(), topic)).or_default().push(Rec::from_message(topic, &m));
                }
                Some(Err(e)) => {
                    tracing::warn!("consumer: {e}");
                    break;
                }
                None => break,
            }
            wait = Duration::ZERO;
        }
        let mut tasks = ctx.tasks.lock().expect("tasks");
        for ((p, _), recs) in batches.drain() {
            match tasks.get_mut(&p) {
                Some(h) => h.pending.push_back(recs),
                None => tracing::debug!(
                    partition = p,
                    "records of a partition no longer assigned: dropped (refetched by its owner)"
                ),
            }
        }
        // A task that failed (in its restore, say) is collected even when no
        // record is waiting for it.
        let mut ended: Vec<i32> = tasks.iter().filter(|(_, h)| h.join.is_finished()).map(|(p, _)| *p).collect();
        for (&p, h) in tasks.iter_mut() {
            while let Some(b) = h.pending.pop_front() {
                let n = b.len() as u64;
                match h.tx.try_send(Msg::Records(b)) {
                    Ok(()) => h.sent += n,
                    Err(TrySendError::Full(Msg::Records(b))) => {
                        h.pending.push_front(b);
                        break;
                    }
                    Err(_) => {
                        ended.push(p);
                        break;
                    }
                }
            }
            let want_pause = !h.pending.is_empty();
            if want_pause != h.paused {
                let mut tpl = TopicPartitionList::new();
                for topic in &topics {
                    tpl.add_partition(topic, p);
                }
                let r = if want_pause { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
                if let Err(e) = r {
                    tracing::warn!(partition = p, "pause/resume: {e}");
                }
                h.paused = want_pause;
            }
        }
        drop(tasks);
        for p in ended {
            // The task ended on an error (or found a newer owner): collect it.
            ctx.stop(p, false);
        }
        if let Some((p, _)) =
            ctx.fenced.lock().expect("fenced").iter().find(|(_, since)| since.elapsed() > FENCED_LIMIT)
        {
            return Err(Error::PartitionFailed(format!(
                "partition {p}: another instance took it over, but the group still assigns it here after {FENCED_LIMIT:?}; \
                 stopping so that a restart rejoins the group"
            )));
        }
        if last_offset_commit.elapsed() >= Duration::from_secs(1) {
            ctx.commit_offsets(consumer, None, CommitMode::Async);
            last_offset_commit = Instant::now();
            watch(consumer, &topics);
        }
    }
    Ok(())
}
