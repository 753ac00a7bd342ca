//! Kafka mode's [`TransitionSink`]: transitions to the output topic, invalid
//! records unchanged to the dead-letter topic, both through the partition's
//! idempotent producer and past its [`ReplayGuard`].

use std::sync::Arc;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use segstream_decode::{wire, Format};
use segstream_output::{transition_schema, transition_to_avro_value, DeadLetter, TransitionSink};
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
                let id = t.transition_id();
                let mut json = Vec::with_capacity(384);
                segstream_output::write_transition_json_with_id(t, id, &mut json);
                Ok((id.hyphenated().to_string(), Some(json)))
            }
            OutputEncoding::Avro(_) => Ok((t.transition_id().to_string(), None)),
        }
    }

    /// The record value (Avro is encoded only for what is sent).
    fn value(self, t: &Transition, encoded: Option<Vec<u8>>) -> Result<Vec<u8>, Error> {
        match (self, encoded) {
            (_, Some(v)) => Ok(v),
            (OutputEncoding::Json, None) => {
                let mut v = Vec::with_capacity(384);
                segstream_output::write_transition_json(t, &mut v);
                Ok(v)
            }
            (OutputEncoding::Avro(schema_id), None) => {
                let datum = apache_avro::to_avro_datum(transition_schema(), transition_to_avro_value(t))
                    .map_err(|e| Error::Setup(format!("encoding a transition as Avro: {e}")))?;
                Ok(wire::frame(schema_id, &datum))
            }
        }
    }
}

/// Largest dead letter produced, key, value and headers together: under
/// Kafka's default `message.max.bytes` (1 MB), so that a dead letter is
/// never itself too large to produce.
pub const DEAD_LETTER_MAX_BYTES: usize = 900 << 10;
/// Largest message key kept in a dead letter.
const DEAD_LETTER_MAX_KEY: usize = 1 << 10;

/// The key and value of a dead letter cut to fit [`DEAD_LETTER_MAX_BYTES`]
/// beside `headers` bytes of headers, and a `truncated` header's value
/// (original sizes) when something was cut.
fn fit<'a>(
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: usize,
) -> (Option<&'a [u8]>, Option<&'a [u8]>, Option<String>) {
    let k = key.map(|k| &k[..k.len().min(DEAD_LETTER_MAX_KEY)]);
    let room = DEAD_LETTER_MAX_BYTES.saturating_sub(headers + k.map_or(0, <[u8]>::len));
    let v = value.map(|v| &v[..v.len().min(room)]);
    let cut = k.map(<[u8]>::len) != key.map(<[u8]>::len) || v.map(<[u8]>::len) != value.map(<[u8]>::len);
    let note = cut.then(|| format!("key={} value={}", key.map_or(0, <[u8]>::len), value.map_or(0, <[u8]>::len)));
    (k, v, note)
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
    /// Asked before every record is produced (whether the partition is
    /// still this task's, see `crate::fence`).
    gate: Option<Gate>,
}

/// See [`KafkaSink::set_gate`].
pub type Gate = Box<dyn FnMut(&Producer) -> Result<(), Error>>;

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
            gate: None,
        }
    }

    /// Asks `gate` before producing each record; its error stops the task.
    pub fn set_gate(&mut self, gate: Gate) {
        self.gate = Some(gate);
    }

    fn pass_gate(&mut self) -> Result<(), Error> {
        match &mut self.gate {
            Some(g) => g(&self.producer),
            None => Ok(()),
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
        self.pass_gate()?;
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
        let header_bytes = 64 + message.len() + d.location.len() + d.error.kind().len();
        let (key, value, truncated) = fit(d.key, d.raw, header_bytes);
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "error_kind", value: Some(d.error.kind()) })
            .insert(Header { key: "error", value: Some(message.as_str()) })
            .insert(Header { key: "source", value: Some(d.location) });
        if let Some(t) = &truncated {
            headers = headers.insert(Header { key: "truncated", value: Some(t.as_str()) });
        }
        let mut rec = BaseRecord::to(&self.dead_letter_topic).headers(headers);
        if let Some(key) = key {
            rec = rec.key(key);
        }
        if let Some(raw) = value {
            rec = rec.payload(raw);
        }
        let producer = &self.producer;
        if let Some(g) = &mut self.gate {
            g(producer)?;
        }
        producer.send(rec)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_are_cut_to_what_a_broker_accepts_and_say_so() {
        let (k, v) = (b"cus_1".as_slice(), vec![b'x'; 100]);
        assert_eq!(fit(Some(k), Some(&v), 200), (Some(k), Some(v.as_slice()), None), "small: unchanged");
        let (key, value) = (vec![b'k'; 600 << 10], vec![b'v'; 2 << 20]);
        let (k, v, note) = fit(Some(&key), Some(&value), 200);
        let (k, v) = (k.expect("key"), v.expect("value"));
        assert_eq!(k.len(), 1 << 10);
        assert_eq!(k.len() + v.len() + 200, DEAD_LETTER_MAX_BYTES);
        assert_eq!(note.as_deref(), Some(format!("key={} value={}", 600 << 10, 2 << 20).as_str()));
        assert_eq!(fit(None, None, 10), (None, None, None), "a record without key or value stays so");
    }
}
