//! Quantile RFM in Kafka mode (ADR 010): the edges of a recomputation come
//! from the whole population, which every partition holds a part of. When its
//! watermark reaches a recomputation instant, a partition publishes its part
//! (exact counts, [`Population`]) to the quantile topic, keyed by (day,
//! partition), then waits until every input partition's part for that day is
//! there and merges them: every partition puts the same edges in force.
//!
//! Which instants are recomputations is global too, as in file mode: every
//! recomputation day after the group's first event. Each partition publishes
//! its *start*, the watermark its first record moved it to: it has no
//! customer at any instant up to there, so its part there is empty. The
//! recomputations are those after the earliest start; a partition that
//! starts later first goes through those before its start (on an empty
//! state), so that it puts the same edges in force as the others.
//!
//! A partition that already has state when it finds no start of its own (a
//! group switched to quantile mode, a new quantile topic) publishes a
//! *joined* start at its watermark: it cannot count its customers at the
//! instants before, so those are recomputations for no partition.
//!
//! The first record of a key wins: a partition that finds its own part
//! already published (by itself before a crash, or by a stalled previous
//! owner) uses that one and publishes nothing, so that a replay, whose
//! restored states may be ahead of the instant, uses the counts the first
//! run took.

use std::collections::BTreeMap;

use rdkafka::message::Message;
use rdkafka::producer::BaseRecord;
use segstream_scoring::Population;
use serde::{Deserialize, Serialize};

use crate::client::{read_range, watermarks, Reader};
use crate::error::Error;
use crate::producer::Producer;
use crate::stop::StopFlag;

/// A record of the quantile topic (postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Published {
    /// The partition's first watermark: no customer of it exists at any
    /// instant up to `watermark` (`fresh`); or, not fresh, the watermark
    /// of a partition that had state already: no recomputation at or before it.
    Start { partition: i32, watermark: i64, fresh: bool },
    /// The partition's part of the population at a recomputation instant
    /// (00:00 UTC, ms).
    Part { at: i64, partition: i32, population: Population },
}

impl Published {
    fn key(&self) -> String {
        match self {
            Self::Start { partition, .. } => format!("start/{partition}"),
            Self::Part { at, partition, .. } => format!("{at:013}/{partition}"),
        }
    }
}

/// The largest record published (under Kafka's default 1 MB message size).
const MAX_RECORD_BYTES: usize = 900 * 1024;

/// What a task has read of the quantile topic.
pub struct Exchange {
    topic: String,
    /// The next offset to read.
    read_to: i64,
    /// (instant, partition) → the first part published for it.
    parts: BTreeMap<(i64, i32), Population>,
    /// Partition → the first start published for it (watermark, fresh).
    starts: BTreeMap<i32, (i64, bool)>,
}

impl Exchange {
    pub fn new(topic: &str) -> Self {
        Self { topic: topic.to_string(), read_to: 0, parts: BTreeMap::new(), starts: BTreeMap::new() }
    }

    /// Reads what was published since the last read.
    pub fn catch_up(&mut self, reader: &Reader, stop: &StopFlag) -> Result<(), Error> {
        let (low, high) = watermarks(reader, &self.topic, 0, stop)?;
        self.read_to = self.read_to.max(low);
        // Up to `high`, so that a key not read is a key not published: a
        // read may end early (an end-of-partition event before the fetch
        // caught up), and is tried again from where it stopped. Reads that
        // find nothing more are a gap compaction left before `high`.
        let mut empty = 0;
        while self.read_to < high && empty < 3 {
            let (parts, starts) = (&mut self.parts, &mut self.starts);
            let topic = &self.topic;
            let mut next = self.read_to;
            read_range(reader, topic, 0, (self.read_to, high), stop, |m| {
                next = m.offset() + 1;
                match m.payload().map(postcard::from_bytes::<Published>) {
                    Some(Ok(Published::Part { at, partition, population })) => {
                        parts.entry((at, partition)).or_insert(population);
                    }
                    Some(Ok(Published::Start { partition, watermark, fresh })) => {
                        starts.entry(partition).or_insert((watermark, fresh));
                    }
                    Some(Err(e)) => tracing::warn!(topic, offset = m.offset(), "not a population record, ignored: {e}"),
                    None => {}
                }
                Ok(())
            })?;
            if next > self.read_to {
                self.read_to = next;
                empty = 0;
            } else {
                empty += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        self.read_to = self.read_to.max(high);
        Ok(())
    }

    /// The part of `partition` at `at`, if published.
    pub fn part(&self, at: i64, partition: i32) -> Option<&Population> {
        self.parts.get(&(at, partition))
    }

    /// The start of `partition`, if published: (watermark, fresh).
    pub fn start(&self, partition: i32) -> Option<(i64, bool)> {
        self.starts.get(&partition).copied()
    }

    /// The earliest start, once every partition of `0..partitions` published its own.
    pub fn first_start(&self, partitions: i32) -> Option<i64> {
        (0..partitions).map(|p| self.start(p).map(|s| s.0)).collect::<Option<Vec<i64>>>()?.into_iter().min()
    }

    /// Publishes a record (acknowledged before it returns). Binary
    /// (postcard): a part holds one entry per distinct MRR value.
    pub fn publish(&self, producer: &Producer, record: &Published) -> Result<(), Error> {
        let key = record.key();
        let value = postcard::to_stdvec(record).expect("plain data serializes");
        if value.len() > MAX_RECORD_BYTES {
            return Err(Error::Setup(format!(
                "this partition's population part for {} is {} bytes, more than the {MAX_RECORD_BYTES} a record \
                 of {} may take: MRR takes too many distinct values for exact quintiles (see ADR 010)",
                key,
                value.len(),
                self.topic
            )));
        }
        producer
            .send(BaseRecord::<[u8], [u8], ()>::to(&self.topic).partition(0).key(key.as_bytes()).payload(&value))?;
        producer.flush()
    }

    /// The partitions of `0..partitions` still to be heard from for the
    /// population at `at`: without a start, or started before `at` without
    /// a part there.
    pub fn missing(&self, at: i64, partitions: i32) -> Vec<i32> {
        (0..partitions)
            .filter(|p| match self.start(*p) {
                None => true,
                Some((start, _)) => start < at && !self.parts.contains_key(&(at, *p)),
            })
            .collect()
    }

    /// Whether `at` is a recomputation for this partition to publish a
    /// part for: every start known, none joined at or after `at`, its own
    /// before it (`None` while a start is missing).
    pub fn counts_at(&self, at: i64, partition: i32, partitions: i32) -> Option<bool> {
        let starts = (0..partitions).map(|p| self.start(p)).collect::<Option<Vec<_>>>()?;
        let skipped = starts.iter().any(|(s, fresh)| !fresh && *s >= at);
        Some(!skipped && starts[partition as usize].0 < at)
    }

    /// The population at `at`: the parts of the partitions started before
    /// it, merged; `Some(None)` when a partition joined at or after it (no
    /// recomputation there); `None` while a start or a part is missing.
    pub fn merged(&self, at: i64, partitions: i32) -> Option<Option<Population>> {
        let starts = (0..partitions).map(|p| self.start(p)).collect::<Option<Vec<_>>>()?;
        if starts.iter().any(|(s, fresh)| !fresh && *s >= at) {
            return Some(None);
        }
        let mut whole = Population::default();
        for (p, (start, _)) in starts.iter().enumerate() {
            if *start < at {
                whole.merge(self.parts.get(&(at, p as i32))?);
            }
        }
        Some(Some(whole))
    }

    /// Forgets the parts of instants before `at` (they are never needed again).
    pub fn forget_before(&mut self, at: i64) {
        self.parts.retain(|(t, _), _| *t >= at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(customers: u64) -> Population {
        Population { customers, mrr_cents: BTreeMap::from([(100, customers)]), ..Population::default() }
    }

    #[test]
    fn merges_the_parts_of_the_partitions_started_before_the_instant() {
        const DAY: i64 = 86_400_000;
        let mut x = Exchange::new("q");
        x.parts.insert((DAY, 0), part(3));
        assert_eq!(x.missing(DAY, 2), vec![0, 1], "no start known");
        x.starts.insert(0, (10, true));
        assert_eq!(x.missing(DAY, 2), vec![1]);
        assert_eq!(x.merged(DAY, 2), None);
        // Partition 1 starts after the instant: empty there, nothing to wait for.
        x.starts.insert(1, (DAY + 5, true));
        assert_eq!(x.missing(DAY, 2), Vec::<i32>::new());
        assert_eq!(x.merged(DAY, 2).flatten().expect("all there").customers, 3);
        assert_eq!((x.counts_at(DAY, 0, 2), x.counts_at(DAY, 1, 2)), (Some(true), Some(false)));
        assert_eq!(x.first_start(2), Some(10));
        // Both started before: both parts.
        x.parts.insert((2 * DAY, 0), part(3));
        assert_eq!(x.missing(2 * DAY, 2), vec![1]);
        x.parts.insert((2 * DAY, 1), part(4));
        let whole = x.merged(2 * DAY, 2).flatten().expect("all there");
        assert_eq!((whole.customers, whole.mrr_cents.get(&100)), (7, Some(&7)));
        x.forget_before(2 * DAY);
        assert_eq!(x.merged(DAY, 2), None);
        // A partition that joined with state at 3 days: no recomputation up
        // to there, for anyone.
        x.starts.insert(1, (3 * DAY, false));
        assert_eq!(x.merged(3 * DAY, 2), Some(None));
        assert_eq!(x.counts_at(3 * DAY, 0, 2), Some(false));
        assert_eq!(x.counts_at(4 * DAY, 0, 2), Some(true));
        let keys = [
            Published::Start { partition: 3, watermark: 1, fresh: true }.key(),
            Published::Part { at: DAY, partition: 3, population: part(1) }.key(),
        ];
        assert_eq!(keys, ["start/3".to_string(), "0000086400000/3".to_string()]);
    }

    #[test]
    fn records_read_back_as_written() {
        for r in [
            Published::Start { partition: 1, watermark: -5, fresh: false },
            Published::Part { at: 86_400_000, partition: 0, population: part(4) },
        ] {
            let bytes = postcard::to_stdvec(&r).expect("serializes");
            assert_eq!(postcard::from_bytes::<Published>(&bytes).expect("reads back"), r);
        }
    }
}
