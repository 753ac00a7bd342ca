//! Opening a partition (ARCHITECTURE.md, "Recovery"): local RocksDB, then
//! the changelog after it, then what the outputs already hold.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use rdkafka::message::{Headers, Message};
use rdkafka::producer::BaseRecord;
use segstream_engine::{decide_rules, Engine, RulesCheck, RulesDecision, RulesMeta};
use segstream_output::Emitter;

use super::{now_ms, OwnerCheck, Shared, Task};
use crate::changelog::{decode_entry, ChangelogError, Owner, EPOCH_HEADER, OWNER_KEY};
use crate::client::{end_offsets, partition_count, read_range, reader, watermarks};
use crate::error::Error;
use crate::fence::Fence;
use crate::marker::{LocalMarker, Marker, LOCAL_MARKER_META};
use crate::metrics::SourceLabel;
use crate::producer::Producer;
use crate::replay::{dead_letter_id, parse_source, ReplayGuard};
use crate::restore::{verdict, ChangelogTail, Restore, Verdict};
use crate::runlog::RunLog;
use crate::schemas::WireDecoder;
use crate::sink::KafkaSink;
use crate::stop::StopFlag;
use crate::testhooks::CrashPoint;
use segstream_decode::Format;

/// When a restore records its progress in the local state: at a commit
/// marker, after [`Checkpoint::RECORDS`] records or [`Checkpoint::EVERY`]
/// since the last time (a checkpoint is one RocksDB batch).
struct Checkpoint {
    records: u64,
    at: Instant,
    every_records: u64,
    /// The changelog offset of the last marker recorded.
    offset: Option<i64>,
}

impl Checkpoint {
    const RECORDS: u64 = 100_000;
    const EVERY: std::time::Duration = std::time::Duration::from_secs(2);

    fn new(every_records: u64) -> Self {
        Self { records: 0, at: Instant::now(), every_records, offset: None }
    }

    fn due(&self, records: u64) -> bool {
        records > self.records && (records - self.records >= self.every_records || self.at.elapsed() >= Self::EVERY)
    }

    fn done(&mut self, records: u64, offset: i64) {
        self.records = records;
        self.offset = Some(offset);
        self.at = Instant::now();
    }
}

/// Who this instance is, for people reading the changelog.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{}", host.trim(), std::process::id())
}

fn header<'a>(m: &'a rdkafka::message::BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    let h = m.headers()?;
    h.iter().find(|h| h.key == key).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

impl Task {
    /// Opens the partition's state and brings it up to date.
    pub fn open(shared: Arc<Shared>, partition: i32, stop: StopFlag, lost: StopFlag) -> Result<Self, Error> {
        let _span = tracing::info_span!("restore", partition).entered();
        let started = Instant::now();
        let k = &shared.kafka;
        let changelog = k.changelog_topic.as_str();
        let dir = k.partition_dir(partition);
        std::fs::create_dir_all(&k.state_dir).map_err(Error::io(format!("creating {}", k.state_dir.display())))?;
        let mut engine = Engine::open_with(&dir, &shared.engine, RulesCheck::Caller)?;
        // Local state is a cache of the changelog: a marker it cannot read
        // means rebuilding it from the changelog, not stopping.
        let mut unreadable = false;
        let mut local: Option<LocalMarker> = match engine.meta(LOCAL_MARKER_META)? {
            Some(v) => serde_json::from_slice(&v)
                .inspect_err(|e| {
                    tracing::warn!(partition, dir = %dir.display(), "local commit marker unreadable ({e}): rebuilding from the changelog");
                    unreadable = true;
                })
                .ok(),
            None => None,
        };
        if unreadable {
            drop(engine);
            std::fs::remove_dir_all(&dir).map_err(Error::io(format!("removing {}", dir.display())))?;
            engine = Engine::open_with(&dir, &shared.engine, RulesCheck::Caller)?;
        }
        let consumer = reader(k)?;
        let (low, high) = watermarks(&consumer, changelog, partition, &stop)?;
        if let (Verdict::Rebuild { why }, Some(l)) =
            (verdict(local.as_ref(), low, high, now_ms(), shared.changelog_delete_retention), &local)
        {
            tracing::warn!(
                partition,
                local = l.changelog_offset,
                low,
                high,
                age_s = now_ms().saturating_sub(l.committed_at_ms).max(0) / 1000,
                "local state not used, {why}: rebuilding it from the changelog"
            );
            drop(engine);
            std::fs::remove_dir_all(&dir).map_err(Error::io(format!("removing {}", dir.display())))?;
            engine = Engine::open_with(&dir, &shared.engine, RulesCheck::Caller)?;
            local = None;
        }
        let from = local.as_ref().map_or(low, |l| l.changelog_offset + 1);
        let mut tail = ChangelogTail::after(local);
        let faults = k.faults;
        let mut checkpoint =
            Checkpoint::new(if faults.armed(CrashPoint::DuringRestore) { 1 } else { Checkpoint::RECORDS });
        let remaining = shared
            .metrics
            .gauges
            .restore_remaining
            .get_or_create(&crate::metrics::PartitionLabel { partition })
            .clone();
        remaining.set((high - from).max(0));
        let mut read = |range: (i64, i64)| {
            let read = read_range(&consumer, changelog, partition, range, &stop, |m| {
                let key = m.key().unwrap_or_default();
                let entry = decode_entry(key, m.payload()).map_err(|e| ChangelogError::At {
                    topic: changelog.to_string(),
                    partition,
                    offset: m.offset(),
                    source: Box::new(e),
                })?;
                let epoch = header(m, EPOCH_HEADER).and_then(|e| e.parse().ok());
                match tail.apply(key, m.offset(), entry, epoch) {
                    Some(Restore::Customer(id, state)) => engine.restore_customer(&id, state)?,
                    Some(Restore::History { id, seq, entry }) => engine.restore_history(&id, seq, entry)?,
                    None => {}
                }
                for (day, counts) in tail.take_series() {
                    engine.restore_series(day, counts);
                }
                // At a commit marker the local state equals the partition's
                // state at that commit: a restore stopped later (a rebalance,
                // a crash) resumes from here, not from the beginning.
                if let Some((marker, offset)) = tail.last().filter(|(_, o)| *o == m.offset()) {
                    if checkpoint.due(tail.records) {
                        let at_ms = m.timestamp().to_millis().unwrap_or(0).min(now_ms());
                        let local =
                            LocalMarker { marker: marker.clone(), changelog_offset: *offset, committed_at_ms: at_ms };
                        engine.commit(vec![(LOCAL_MARKER_META.into(), serde_json::to_vec(&local)?)])?;
                        checkpoint.done(tail.records, *offset);
                    }
                }
                faults.crash_point(CrashPoint::DuringRestore, tail.records as i64, partition, || {});
                if tail.records.is_multiple_of(1_000) {
                    remaining.set((range.1 - m.offset() - 1).max(0));
                }
                if tail.records.is_multiple_of(100_000) {
                    engine.commit(Vec::new())?;
                    tracing::info!(
                        partition,
                        restored = tail.records,
                        of = high - from,
                        "restoring from the changelog"
                    );
                }
                Ok(())
            });
            if let Err(Error::Stopped) = read {
                tracing::info!(
                    partition,
                    changelog_records = tail.records,
                    resumes_after = ?checkpoint.offset,
                    "restore stopped (the partition was revoked): the next restore here resumes after the last \
                     commit marker it recorded"
                );
            }
            read
        };
        if let Some(pause) = faults.restore_pause {
            let until = Instant::now() + pause;
            while Instant::now() < until && !stop.is_set() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        read((from, high))?;
        if stop.is_set() || lost.is_set() {
            return Err(Error::Stopped);
        }
        let producer = Producer::new(k, partition)?;
        // Take the partition: the owner record fences any previous owner
        // (crate::fence) before this task reads what the outputs hold. What
        // the previous owner wrote after the restore read and before the
        // owner record was still its own to write: it is restored too.
        let owner = Owner { instance: instance_name(), at_ms: now_ms(), url: k.http_advertised_url.clone() };
        producer.send(
            BaseRecord::<[u8], [u8], ()>::to(changelog)
                .partition(partition)
                .key(OWNER_KEY)
                .payload(serde_json::to_vec(&owner)?.as_slice()),
        )?;
        producer.flush()?;
        let epoch = producer
            .delivered_end(changelog, partition)
            .ok_or_else(|| Error::Delivery("no acknowledgement for the owner record".into()))?
            - 1;
        read((high, epoch))?;
        tracing::debug!(partition, epoch, "owner record written");
        let restored = tail.records;
        remaining.set(0);
        if tail.stale > 0 {
            tracing::warn!(
                partition,
                stale = tail.stale,
                "changelog records written by a previous owner after a newer one took over: ignored"
            );
        }
        shared.metrics.restore_records.inc_by(restored);
        let fingerprint = shared.engine.fingerprint();
        let restored_tail = tail.finish();
        for (id, seq) in &restored_tail.undo_history {
            engine.restore_history(id, *seq, None)?;
        }
        // Restored states are written as they came and read back from
        // RocksDB (ADR 011): committed before the engine goes on.
        engine.commit(Vec::new())?;
        let (skip, runs, run_keys) = (restored_tail.skip, restored_tail.runs, restored_tail.run_keys);
        let (marker, changelog_offset, fresh) = match restored_tail.last {
            Some((marker, offset)) => (marker, offset, false),
            None => {
                let outputs = end_offsets(&consumer, [&k.output_topic, &k.dead_letter_topic], &stop)?;
                (Marker::first(outputs, fingerprint, shared.engine.time_fingerprint()), -1, true)
            }
        };
        // The rules: those of the marker, or a migration to the configured
        // ones (ADR 008). Not the local state's: it is a cache.
        let mut marker = marker;
        let current = RulesMeta { version: 0, fingerprint, rules: shared.engine.rules_json() };
        let decision = decide_rules(
            &format!("partition {partition}"),
            marker.rules.clone(),
            Some(marker.config_fingerprint),
            marker.migration.clone(),
            current,
            shared.engine.rules_policy(),
        )
        .map_err(|e| Error::Setup(e.to_string()))?;
        let mut planned = None;
        match decision {
            RulesDecision::Same(m) => {
                engine.set_rules_version(m.version);
                engine.note_rules(&m);
            }
            RulesDecision::Record(m) => {
                engine.set_rules_version(m.version);
                engine.note_rules(&m);
                marker.rules = Some(m);
            }
            // Begun after the checks below and the local commit, right
            // before its first batch (`finish_migration`).
            RulesDecision::Migrate(m) => planned = Some(m),
            RulesDecision::Resume(m) => engine.resume_migration(m)?,
        }
        let time_fingerprint = shared.engine.time_fingerprint();
        let unfinished = !skip.is_empty() || !runs.is_empty();
        if marker.time_fingerprint.is_some_and(|f| f != time_fingerprint) && unfinished {
            return Err(Error::Setup(format!(
                "partition {partition} has work after its last commit done under other time settings \
                 (time.allowed_lateness_ms, time.earliest_event, time.max_future_ms); replaying it under the new \
                 ones would write different transitions. Restart with the previous time settings until the \
                 partition has committed, then change them"
            )));
        }
        engine.restore_clock(marker.clock, marker.counters.clone())?;
        // Quantile RFM: the edges of the last commit; recomputations take
        // the group's population from the quantile topic (ADR 010).
        let quantile = shared.engine.scorer().quantile_min_customers().is_some();
        if quantile {
            engine.take_population_from_caller();
            engine.restore_quantile(marker.quantile.clone());
        }
        if !fresh {
            let local = LocalMarker { marker: marker.clone(), changelog_offset, committed_at_ms: now_ms() };
            engine.commit(vec![(LOCAL_MARKER_META.into(), serde_json::to_vec(&local)?)])?;
        }
        let mut replay = Vec::with_capacity(runs.len());
        for run in runs {
            let t = k.inputs.iter().position(|i| i.topic == run.topic).ok_or_else(|| {
                Error::Setup(format!("the changelog names input topic {} that is not configured", run.topic))
            })?;
            replay.push((t, run.last));
        }
        let skips = skip.len();
        let guard = ReplayGuard::new(k.inputs.len(), skip);
        marker.owner = Some(epoch);
        let mut sink = KafkaSink::new(producer, k, shared.output, guard, shared.metrics.clone());
        let owner_check =
            Rc::new(RefCell::new(OwnerCheck::new(consumer, Fence::new(epoch), lost.clone(), changelog, partition)));
        let gate = owner_check.clone();
        sink.set_gate(Box::new(move |producer| gate.borrow_mut().before_output(producer)));
        let decoder = k
            .inputs
            .iter()
            .any(|i| i.format == Format::Avro)
            .then(|| WireDecoder::new(k.schemas.clone(), k.registry.clone()));
        let last_delay_ms = marker.last_delay_ms;
        let mut task = Self {
            source_prefixes: k.inputs.iter().map(|i| format!("{}/{partition}/", i.topic)).collect(),
            next_offsets: k.inputs.iter().map(|i| marker.input_offsets.get(&i.topic).copied().unwrap_or(-1)).collect(),
            delivered: vec![false; k.inputs.len()],
            records: marker.records,
            runs: RunLog::new(k.inputs.len(), replay),
            run_keys,
            marker,
            shared: shared.clone(),
            partition,
            stop,
            engine,
            emitter: Emitter::new(sink),
            owner: owner_check.clone(),
            epoch_applied: HashMap::new(),
            decoder,
            out: Vec::new(),
            records_since_commit: 0,
            last_commit: Instant::now(),
            last_record: Instant::now(),
            wall_clock: crate::clock::WallClock::start(),
            last_delay_ms,
            published: crate::metrics::TallyPublished::default(),
            misplaced: segstream_output::Throttle::new(10, std::time::Duration::from_secs(60)),
            published_segments: std::collections::BTreeMap::new(),
            progress: Arc::new(crate::record::Progress::default()),
            migrated_here: None,
            quantile: quantile.then(|| crate::quantile::Exchange::new(&k.quantile_topic)),
            quantile_joined: false,
        };
        if fresh {
            // The outputs' current ends must be durable before anything is produced.
            task.commit(None)?;
        } else {
            task.read_outputs()?;
            if task.emitter.sink().guard().holds_outputs()
                && task.marker.time_fingerprint.is_some_and(|f| f != time_fingerprint)
            {
                return Err(Error::Setup(format!(
                    "partition {partition} wrote output after its last commit under other time settings \
                     (time.allowed_lateness_ms, time.earliest_event, time.max_future_ms); replaying it under the \
                     new ones would write different transitions. Restart with the previous time settings until \
                     the partition has committed, then change them"
                )));
            }
            if planned.is_some()
                && (skips > 0
                    || task.runs.replay_len() > 0
                    || task.emitter.sink().guard().holds_outputs()
                    || task.marker.pending_watermark.is_some())
            {
                return Err(Error::Setup(format!(
                    "partition {partition} has work after its last commit done under its current rules; a replay \
                     under the new ones would write other transitions. Restart with the current rules until the \
                     partition has committed (a clean stop commits), then migrate"
                )));
            }
            // From now on commits carry this process's time settings.
            task.marker.time_fingerprint = Some(time_fingerprint);
            // A crash between a commit's marker and its tombstones would leave
            // erased customers' keys in the changelog: send them again (the
            // next commit's flush acknowledges them).
            for id in &task.marker.erased {
                let key = crate::changelog::customer_key(id);
                let producer = task.emitter.sink().producer();
                super::send_changelog(
                    producer,
                    &mut task.owner.borrow_mut().fence,
                    (changelog, partition),
                    &key,
                    None,
                )?;
            }
            if let Some(w) = task.marker.pending_watermark {
                task.advance_to(w)?;
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
            replay_batches = task.runs.replay_len(),
            already_written = task.emitter.sink().guard().pending(),
            replay_skips = skips,
            seconds = started.elapsed().as_secs_f64(),
            "partition restored"
        );
        task.publish_opened();
        task.finish_migration(planned)?;
        Ok(task)
    }

    /// Learns what the uncommitted tail wrote: every output and dead-letter
    /// record after the marker's end offsets whose source is this partition.
    fn read_outputs(&mut self) -> Result<(), Error> {
        let k = &self.shared.kafka;
        let owner = self.owner.borrow();
        let consumer = &owner.reader;
        for (topic, is_dlq) in [(&k.output_topic, false), (&k.dead_letter_topic, true)] {
            for q in 0..partition_count(consumer, topic, &self.stop)? {
                let (low, high) = watermarks(consumer, topic, q, &self.stop)?;
                let from =
                    self.marker.outputs.get(topic.as_str()).and_then(|o| o.get(&q)).copied().unwrap_or(0).max(low);
                let guard = self.emitter.sink_mut().guard_mut();
                read_range(consumer, topic, q, (from, high), &self.stop, |m| {
                    let Some(source) = header(m, "source") else { return Ok(()) };
                    let Some((t, offset)) = parse_source(&self.source_prefixes, source) else { return Ok(()) };
                    let id = if is_dlq {
                        dead_letter_id(source)
                    } else {
                        match header(m, "transition_id") {
                            Some(id) => id.to_string(),
                            None => return Ok(()),
                        }
                    };
                    guard.already_written(t, offset, id);
                    Ok(())
                })?;
            }
        }
        Ok(())
    }
}
