//! Kafka mode: a consumer group in, transitions exactly once out, per
//! partition state in RocksDB backed by a changelog topic. The protocol is
//! in ARCHITECTURE.md ("Kafka mode"); ADR 004 says why it does not use
//! broker transactions.
//!
//! Threads: the main thread polls the group consumer (and runs rebalance
//! callbacks); each assigned partition is a [`task::Task`] on its own thread
//! with its own engine and idempotent producer; the metrics endpoint runs a
//! small tokio runtime on another. Nothing blocking runs on a tokio worker.

pub mod changelog;
pub mod config;
pub mod metrics;
pub mod registry;
pub mod task;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

pub use config::{KafkaConfig, TopicFormat};
use metrics::Metrics;
use task::{check_topic, Msg, Rec, Shared, Task};

use crate::Config;

/// Batches queued per partition before its fetching is paused.
const TASK_QUEUE: usize = 8;
const BATCH: usize = 2_000;

struct TaskHandle {
    tx: SyncSender<Msg>,
    join: JoinHandle<anyhow::Result<()>>,
    /// Batches the task's queue had no room for.
    pending: VecDeque<Vec<Rec>>,
    paused: bool,
}

/// Owns the partition tasks; the rebalance callbacks start and stop them.
struct GroupContext {
    shared: Arc<Shared>,
    tasks: Mutex<HashMap<i32, TaskHandle>>,
    failure: Mutex<Option<String>>,
}

impl GroupContext {
    fn fail(&self, msg: String) {
        tracing::error!("{msg}");
        self.failure.lock().expect("failure").get_or_insert(msg);
    }

    fn start(&self, partition: i32) {
        let (tx, rx) = sync_channel(TASK_QUEUE);
        let shared = self.shared.clone();
        let join = std::thread::Builder::new()
            .name(format!("partition-{partition}"))
            .spawn(move || Task::open(shared, partition)?.run(rx))
            .expect("spawning a partition thread");
        self.tasks.lock().expect("tasks").insert(partition, TaskHandle { tx, join, pending: VecDeque::new(), paused: false });
        self.shared.metrics.assigned_partitions.inc();
    }

    /// Stops a task after it commits: returns once its state and outputs
    /// are durable, so the next owner starts from them.
    fn stop(&self, partition: i32) {
        let Some(h) = self.tasks.lock().expect("tasks").remove(&partition) else { return };
        self.shared.metrics.assigned_partitions.dec();
        // A task that already ended dropped its receiver: nothing to tell it.
        let _ = h.tx.send(Msg::Stop);
        match h.join.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.fail(format!("partition {partition}: {e:#}")),
            Err(_) => self.fail(format!("partition {partition}: the task panicked")),
        }
    }

    fn stop_all(&self) {
        let parts: Vec<i32> = self.tasks.lock().expect("tasks").keys().copied().collect();
        for p in parts {
            self.stop(p);
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

impl ClientContext for GroupContext {}

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
            tracing::info!(?parts, "partitions revoked: committing and handing over");
            for &p in &parts {
                self.stop(p);
            }
            self.commit_offsets(consumer, Some(&parts), CommitMode::Sync);
            self.shared.committed.lock().expect("committed").retain(|p, _| !parts.contains(p));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = partitions(tpl);
                tracing::info!(?parts, "partitions assigned: restoring");
                for p in parts {
                    self.start(p);
                }
            }
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// What `segstream run` in Kafka mode needs besides the configuration.
#[derive(Debug, Default, Clone)]
pub struct KafkaRunArgs {
    /// Set to stop: every partition commits and the process returns.
    pub stop: Arc<AtomicBool>,
}

/// Kafka's default `delete.retention.ms`, assumed where the broker does not
/// report the changelog's.
const DEFAULT_DELETE_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Checks that the changelog is compacted and returns its
/// `delete.retention.ms`. Under `cleanup.policy=delete`, retention would
/// remove the records of customers that have not changed for a while, and a
/// restore from it would silently lose them. A broker that does not report
/// the topic's configuration gets a warning, not a refusal.
fn check_changelog_config(k: &KafkaConfig, changelog: &str) -> anyhow::Result<Duration> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        k.client_config(&[], &Default::default(), &[]).create().context("creating an admin client")?;
    let runtime = tokio::runtime::Builder::new_current_thread().build().context("admin runtime")?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let described = runtime.block_on(admin.describe_configs([&ResourceSpecifier::Topic(changelog)], &opts));
    let resource = match described {
        Ok(mut r) if !r.is_empty() => r.swap_remove(0).map_err(|code| code.to_string()),
        Ok(_) => Err("no answer".to_string()),
        Err(e) => Err(e.to_string()),
    };
    let value = |name: &str| resource.as_ref().ok().and_then(|r| r.get(name)).and_then(|e| e.value.clone());
    let retention = match value("delete.retention.ms").and_then(|v| v.parse::<u64>().ok()) {
        Some(ms) => Duration::from_millis(ms),
        None => DEFAULT_DELETE_RETENTION,
    };
    match value("cleanup.policy") {
        Some(p) if p.split(',').any(|x| x.trim() == "compact") => Ok(retention),
        Some(p) => bail!(
            "changelog topic {changelog} has cleanup.policy={p}: it must be compact, or retention would drop \
             the state of customers that have not changed for a while (see README, \"Run with Kafka\")"
        ),
        None => {
            let error = resource.err().unwrap_or_else(|| "not reported".into());
            tracing::warn!(changelog, error, "cannot read the changelog topic's cleanup.policy; it must be compact");
            Ok(retention)
        }
    }
}

/// Runs the consumer group until `args.stop` is set (or a partition fails,
/// which is an error: a restart recovers exactly).
pub fn run_kafka(cfg: &Config, args: &KafkaRunArgs) -> anyhow::Result<()> {
    let k = cfg.kafka.clone().ok_or_else(|| anyhow!("the configuration has no [kafka] section"))?;
    let metrics = Arc::new(Metrics::new());
    if !k.metrics_addr.is_empty() {
        let addr = metrics::serve(&k.metrics_addr, metrics.clone())?;
        tracing::info!("metrics on http://{addr}/metrics");
    }
    let output_schema_id = match (k.output_format, k.output_schema_id, k.registry()) {
        (TopicFormat::Json, _, _) => None,
        (TopicFormat::Avro, Some(id), _) => Some(id),
        (TopicFormat::Avro, None, Some(registry)) => {
            let subject = format!("{}-value", k.output_topic);
            let schema = segstream_output::transition_schema().canonical_form();
            let id = registry
                .register(&subject, &schema)
                .map_err(|e| anyhow!("registering the transition schema under {subject}: {e}"))?;
            tracing::info!(subject, id, "transition schema registered");
            Some(id)
        }
        (TopicFormat::Avro, None, None) => {
            bail!("kafka.output_format = \"avro\" needs kafka.output_schema_id or kafka.schema_registry_url")
        }
    };
    let changelog = k.changelog();
    // Check the topics before joining the group: a clear error beats a crash loop.
    let changelog_delete_retention = {
        let probe = task::restore_consumer(&k)?;
        let mut inputs = None;
        for input in k.inputs() {
            let n = check_topic(&probe, &input.topic)?;
            match inputs {
                Some((first, m)) if m != n => bail!(
                    "input topics must be co-partitioned: {first} has {m} partitions, {} has {n}",
                    input.topic
                ),
                Some(_) => {}
                None => inputs = Some((input.topic.clone(), n)),
            }
        }
        let (_, inputs) = inputs.ok_or_else(|| anyhow!("no input topic"))?;
        let logs = check_topic(&probe, &changelog)?;
        if logs < inputs {
            bail!(
                "changelog topic {changelog} has {logs} partitions, the input has {inputs}: \
                 it needs at least as many (one per input partition), and cleanup.policy=compact"
            );
        }
        check_topic(&probe, &k.output_topic)?;
        check_topic(&probe, &k.dead_letter_topic)?;
        check_changelog_config(&k, &changelog)?
    };
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        kafka: k.clone(),
        changelog,
        metrics: metrics.clone(),
        output_schema_id,
        changelog_delete_retention,
        committed: Mutex::new(HashMap::new()),
    });
    let ctx = GroupContext { shared, tasks: Mutex::new(HashMap::new()), failure: Mutex::new(None) };
    let consumer: BaseConsumer<GroupContext> = k
        .client_config(
            &[("fetch.wait.max.ms", "100"), ("auto.offset.reset", "earliest")],
            &k.consumer_properties,
            &[
                ("group.id", k.group_id.as_str()),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("partition.assignment.strategy", "range"),
            ],
        )
        .create_with_context(ctx)
        .context("creating the group consumer")?;
    let topics: Vec<String> = k.inputs().into_iter().map(|i| i.topic).collect();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).context("subscribing")?;
    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!(group = k.group_id, input = ?names, output = k.output_topic, "consuming");
    let result = consume(&consumer, args);
    metrics.ready.store(false, Ordering::Relaxed);
    let ctx = consumer.context();
    tracing::info!("stopping: committing every partition");
    ctx.stop_all();
    ctx.commit_offsets(&consumer, None, CommitMode::Sync);
    let failure = ctx.failure.lock().expect("failure").take();
    tracing::info!("partitions committed; leaving the group");
    consumer.unsubscribe();
    drop(consumer);
    tracing::info!("left the group");
    result?;
    match failure {
        Some(f) => bail!("{f}"),
        None => Ok(()),
    }
}

fn consume(consumer: &BaseConsumer<GroupContext>, args: &KafkaRunArgs) -> anyhow::Result<()> {
    let ctx = consumer.context();
    let topics: Vec<String> = ctx.shared.kafka.inputs().into_iter().map(|i| i.topic).collect();
    let mut batches: HashMap<(i32, usize), Vec<Rec>> = HashMap::new();
    let mut last_offset_commit = Instant::now();
    while !args.stop.load(Ordering::Relaxed) {
        if let Some(f) = ctx.failure.lock().expect("failure").clone() {
            bail!("{f}");
        }
        let mut n = 0;
        let mut wait = Duration::from_millis(100);
        while n < BATCH {
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    n += 1;
                    let Some(topic) = topics.iter().position(|t| t == m.topic()) else { continue };
                    batches.entry((m.partition(), topic)).or_default().push(Rec {
                        topic,
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                    });
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
                None => tracing::debug!(partition = p, "records of a partition no longer assigned: dropped (refetched by its owner)"),
            }
        }
        let mut ended = Vec::new();
        for (&p, h) in tasks.iter_mut() {
            while let Some(b) = h.pending.pop_front() {
                match h.tx.try_send(Msg::Records(b)) {
                    Ok(()) => {}
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
            // The task ended on an error: collect it.
            ctx.stop(p);
        }
        if last_offset_commit.elapsed() >= Duration::from_secs(1) {
            ctx.commit_offsets(consumer, None, CommitMode::Async);
            last_offset_commit = Instant::now();
        }
    }
    Ok(())
}
