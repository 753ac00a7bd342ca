//! Kafka mode's [`TransitionSink`]: transitions to the output topic, invalid
//! records unchanged to the dead-letter topic, both through the partition's
//! idempotent producer and past its [`ReplayGuard`].

use std::sync::Arc;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use segstream_decode::{wire, Format};
use segstream_output::{transition_schema, transition_to_avro_value, DeadLetter, TransitionRecord, TransitionSink};
use segstream_scoring::Transition;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::producer::Producer;
use crate::replay::{dead_letter_id, ReplayGuard};
use crate::settings::KafkaSettings;

/// How transitions are encoded on the output topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputEncoding {
    Json,
    /// Wire format with this schema id.
    Avro(u32),
}

impl OutputEncoding {
    /// `output_schema_id`: the transition schema's id (given, or registered at start).
    pub fn new(format: Format, output_schema_id: Option<u32>) -> Result<Self, Error> {
        match (format, output_schema_id) {
            (Format::Json, _) => Ok(Self::Json),
            (Format::Avro, Some(id)) => Ok(Self::Avro(id)),
            (Format::Avro, None) => Err(Error::Setup("Avro output without a schema id".into())),
        }
    }

    /// The transition's id, and its record value when computing the id
    /// already made it (JSON carries the id, computed once: SHA-1).
    fn id(self, t: &Transition) -> Result<(String, Option<Vec<u8>>), Error> {
        match self {
            OutputEncoding::Json => {
                let rec = TransitionRecord::from(t);
                let json = serde_json::to_vec(&rec)?;
                Ok((rec.transition_id, Some(json)))
            }
            OutputEncoding::Avro(_) => Ok((t.transition_id().to_string(), None)),
        }
    }

    /// The record value (Avro is encoded only for what is sent).
    fn value(self, t: &Transition, encoded: Option<Vec<u8>>) -> Result<Vec<u8>, Error> {
        match (self, encoded) {
            (_, Some(v)) => Ok(v),
            (OutputEncoding::Json, None) => Ok(serde_json::to_vec(&TransitionRecord::from(t))?),
            (OutputEncoding::Avro(schema_id), None) => {
                let datum = apache_avro::to_avro_datum(transition_schema(), transition_to_avro_value(t))
                    .map_err(|e| Error::Setup(format!("encoding a transition as Avro: {e}")))?;
                Ok(wire::frame(schema_id, &datum))
            }
        }
    }
}

pub struct KafkaSink {
    producer: Producer,
    output_topic: String,
    dead_letter_topic: String,
    encoding: OutputEncoding,
    /// The `source` header of what is emitted now: `topic/partition/offset`
    /// of the record being processed, or `…/time` for a wall-clock advance.
    source: String,
    guard: ReplayGuard,
    metrics: Arc<Metrics>,
}

impl KafkaSink {
    pub fn new(
        producer: Producer,
        settings: &KafkaSettings,
        encoding: OutputEncoding,
        guard: ReplayGuard,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            producer,
            output_topic: settings.output_topic.clone(),
            dead_letter_topic: settings.dead_letter_topic.clone(),
            encoding,
            source: String::new(),
            guard,
            metrics,
        }
    }

    pub fn set_source(&mut self, source: String) {
        self.source = source;
    }

    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    pub fn guard(&self) -> &ReplayGuard {
        &self.guard
    }

    pub fn guard_mut(&mut self) -> &mut ReplayGuard {
        &mut self.guard
    }

    pub fn output_topics(&self) -> [&str; 2] {
        [&self.output_topic, &self.dead_letter_topic]
    }
}

impl TransitionSink for KafkaSink {
    type Error = Error;

    fn transition(&mut self, t: &Transition) -> Result<bool, Error> {
        let (id, encoded) = self.encoding.id(t)?;
        if self.guard.suppress(&id) {
            self.metrics.replay_suppressed.inc();
            return Ok(false);
        }
        let payload = self.encoding.value(t, encoded)?;
        let headers = OwnedHeaders::new()
            .insert(Header { key: "transition_id", value: Some(id.as_str()) })
            .insert(Header { key: "source", value: Some(self.source.as_str()) });
        self.producer.send(
            BaseRecord::to(&self.output_topic)
                .key(t.customer_id.as_bytes())
                .payload(payload.as_slice())
                .headers(headers),
        )?;
        Ok(true)
    }

    fn dead_letter(&mut self, d: &DeadLetter<'_>) -> Result<bool, Error> {
        if self.guard.suppress(&dead_letter_id(d.location)) {
            return Ok(false);
        }
        let message = d.error.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: "error_kind", value: Some(d.error.kind()) })
            .insert(Header { key: "error", value: Some(message.as_str()) })
            .insert(Header { key: "source", value: Some(d.location) });
        let mut rec = BaseRecord::to(&self.dead_letter_topic).headers(headers);
        if let Some(key) = d.key {
            rec = rec.key(key);
        }
        if let Some(raw) = d.raw {
            rec = rec.payload(raw);
        }
        self.producer.send(rec)?;
        Ok(true)
    }
}
