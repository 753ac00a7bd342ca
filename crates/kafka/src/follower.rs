//! Kafka mode's output topic read in order by a consumer group of its own,
//! for `segstream webhook`: a position is committed only when the caller
//! says that everything returned so far was delivered (at least once).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use segstream_decode::Format;

use crate::error::Error;
use crate::settings::KafkaSettings;
use crate::stop::StopFlag;

pub struct OutputFollower {
    consumer: BaseConsumer,
    topic: String,
    /// The last record returned (partition, next offset): not done yet.
    returned: Option<(i32, i64)>,
    /// Next offset per partition after what is done with.
    positions: HashMap<i32, i64>,
    /// Whether `positions` moved since the last commit.
    unsaved: bool,
}

impl OutputFollower {
    /// Joins consumer group `group` on the output topic (from its start the
    /// first time, then from the group's committed offsets).
    pub fn new(settings: &KafkaSettings, group: &str) -> Result<Self, Error> {
        if settings.output_format == Format::Avro {
            return Err(Error::Setup(
                "segstream webhook reads JSON transitions: kafka.output_format = \"avro\" is not supported by it yet"
                    .into(),
            ));
        }
        let consumer: BaseConsumer = settings
            .client_config(
                // A receiver that is down holds the webhook in its retries
                // without polling: it must not be dropped from the group.
                &[("auto.offset.reset", "earliest"), ("max.poll.interval.ms", "86400000")],
                &settings.consumer_properties,
                &[("group.id", group), ("enable.auto.commit", "false"), ("enable.auto.offset.store", "false")],
            )
            .create()
            .map_err(Error::broker("creating the webhook consumer"))?;
        consumer.subscribe(&[settings.output_topic.as_str()]).map_err(Error::broker("subscribing"))?;
        tracing::info!(group, topic = settings.output_topic, "webhook: following the output topic");
        Ok(Self {
            consumer,
            topic: settings.output_topic.clone(),
            returned: None,
            positions: HashMap::new(),
            unsaved: false,
        })
    }

    /// The next transition's bytes; `None` once `stop` is set.
    pub fn next(&mut self, stop: &StopFlag) -> Result<Option<Vec<u8>>, Error> {
        loop {
            if stop.is_set() {
                return Ok(None);
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let Some(p) = m.payload() else {
                        self.positions.insert(m.partition(), m.offset() + 1);
                        self.unsaved = true;
                        continue;
                    };
                    self.returned = Some((m.partition(), m.offset() + 1));
                    return Ok(Some(p.to_vec()));
                }
                Some(Err(e)) => tracing::warn!("webhook consumer: {e}"),
                // Caught up: what is done is committed now, not only when
                // more arrives (a crash while the topic is quiet repeats nothing).
                None if self.unsaved => self.save()?,
                None => {}
            }
        }
    }

    /// The record returned last is done with (delivered or dead-lettered).
    pub fn done(&mut self) {
        if let Some((p, next)) = self.returned.take() {
            self.positions.insert(p, next);
            self.unsaved = true;
        }
    }

    /// Commits the positions after everything done with.
    pub fn save(&mut self) -> Result<(), Error> {
        self.unsaved = false;
        if self.positions.is_empty() {
            return Ok(());
        }
        // Only partitions still assigned here: a revoked one's new owner
        // commits its own positions (committing ours would move it back).
        let assigned = self.consumer.assignment().map_err(Error::broker("reading the assignment"))?;
        self.positions.retain(|p, _| assigned.find_partition(&self.topic, *p).is_some());
        if self.positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &self.positions {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o)).map_err(Error::broker("offset list"))?;
        }
        self.consumer.commit(&tpl, CommitMode::Sync).map_err(Error::broker("committing the webhook's offsets"))
    }
}
