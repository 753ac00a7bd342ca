//! Broker requests outside the consumer group: metadata, offsets, and
//! reading given ranges of a partition (restores, output tails). Every wait
//! is bounded and stop-aware.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::Error;
use crate::marker::OutputEnds;
use crate::settings::KafkaSettings;
use crate::stop::{retry, Backoff, StopFlag};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A range being read that delivers nothing for this long is an error.
const READ_STALL: Duration = Duration::from_secs(60);

/// librdkafka's log lines into tracing, with their level (target
/// `librdkafka`, so `RUST_LOG=librdkafka=debug` shows its debug output when
/// `debug` contexts are configured).
pub fn bridge_log(client: &str, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "librdkafka", client, facility, "{message}")
        }
        L::Warning => tracing::warn!(target: "librdkafka", client, facility, "{message}"),
        L::Notice | L::Info => tracing::info!(target: "librdkafka", client, facility, "{message}"),
        L::Debug => tracing::debug!(target: "librdkafka", client, facility, "{message}"),
    }
}

/// librdkafka's error callback (broker down, authentication or TLS
/// failures): an error in the log. librdkafka retries these itself.
pub fn bridge_error(client: &str, error: &KafkaError, reason: &str) {
    tracing::error!(target: "librdkafka", client, "{error}: {reason}");
}

/// A client context that bridges librdkafka's logs and errors into
/// tracing, for the clients outside the group and the producers' roles
/// (`reader`, `admin`).
pub struct LogContext(pub &'static str);

impl rdkafka::ClientContext for LogContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        bridge_log(self.0, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        bridge_error(self.0, &error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for LogContext {}

/// A consumer outside the group whose librdkafka logs reach tracing.
pub type Reader = BaseConsumer<LogContext>;

/// A consumer outside the group (no offsets committed), for reading given
/// ranges: restores, output tails, metadata.
pub fn reader(settings: &KafkaSettings) -> Result<Reader, Error> {
    settings
        .client_config(
            &[("fetch.wait.max.ms", "10")],
            &settings.consumer_properties,
            &[
                ("group.id", "segstream-restore"),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "true"),
                ("auto.offset.reset", "earliest"),
            ],
        )
        .create_with_context(LogContext("reader"))
        .map_err(Error::broker("creating the restore consumer"))
}

/// A broker request, retried while the broker restarts or is overloaded.
pub fn request<T>(what: &str, stop: &StopFlag, f: impl FnMut() -> Result<T, KafkaError>) -> Result<T, Error> {
    retry(what, stop, Backoff::BROKER, |_| true, f).map_err(|e| Error::from_retry(what, e))
}

/// The low and high offsets of `topic`/`partition`.
pub fn watermarks(consumer: &Reader, topic: &str, partition: i32, stop: &StopFlag) -> Result<(i64, i64), Error> {
    request(&format!("{topic}/{partition} offsets"), stop, || {
        consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
    })
}

/// Partitions of `topic`, retrying broker errors (see [`check_topic`] for
/// the start-up check, which fails at once).
pub fn partition_count(consumer: &Reader, topic: &str, stop: &StopFlag) -> Result<i32, Error> {
    let md =
        request(&format!("metadata of topic {topic}"), stop, || consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT))?;
    topic_partitions(&md, topic)
}

/// Partitions of `topic`, failing on the first broker error: the check at
/// start, where a wrong address or a missing topic must be reported at once.
pub fn check_topic(consumer: &Reader, topic: &str) -> Result<i32, Error> {
    let md = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(Error::broker(format!("metadata of topic {topic} (are the brokers right?)")))?;
    topic_partitions(&md, topic)
}

fn topic_partitions(md: &rdkafka::metadata::Metadata, topic: &str) -> Result<i32, Error> {
    let t = md.topics().first().ok_or_else(|| Error::Setup(format!("no metadata for topic {topic}")))?;
    if let Some(e) = t.error() {
        return Err(Error::Setup(format!("topic {topic}: {e:?} (create it first; see README, \"Run with Kafka\")")));
    }
    if t.partitions().is_empty() {
        return Err(Error::Setup(format!(
            "topic {topic} does not exist or has no partitions (create it first; see README, \"Run with Kafka\")"
        )));
    }
    Ok(t.partitions().len() as i32)
}

/// The current end offsets of every partition of `topics`.
pub fn end_offsets(consumer: &Reader, topics: [&str; 2], stop: &StopFlag) -> Result<OutputEnds, Error> {
    let mut outputs = OutputEnds::new();
    for topic in topics {
        let mut ends = std::collections::BTreeMap::new();
        for q in 0..partition_count(consumer, topic, stop)? {
            ends.insert(q, watermarks(consumer, topic, q, stop)?.1);
        }
        outputs.insert(topic.to_string(), ends);
    }
    Ok(outputs)
}

/// Reads `topic`/`partition` from `from` up to (not including) `to`.
pub fn read_range(
    consumer: &Reader,
    topic: &str,
    partition: i32,
    (from, to): (i64, i64),
    stop: &StopFlag,
    mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), Error>,
) -> Result<(), Error> {
    if from >= to {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from)).map_err(Error::broker("offset list"))?;
    consumer.assign(&tpl).map_err(Error::broker(format!("assigning {topic}/{partition}")))?;
    let mut quiet_since = Instant::now();
    loop {
        if stop.is_set() {
            return Err(Error::Stopped);
        }
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
                if quiet_since.elapsed() > READ_STALL {
                    return Err(Error::ReadStalled(format!("cannot read {topic}/{partition} from offset {from}: {e}")));
                }
            }
            None => {
                if quiet_since.elapsed() > READ_STALL {
                    return Err(Error::ReadStalled(format!(
                        "no data from {topic}/{partition} for 60 s while reading offsets {from}..{to}"
                    )));
                }
            }
        }
    }
    consumer.unassign().map_err(Error::broker(format!("unassigning {topic}/{partition}")))?;
    Ok(())
}
