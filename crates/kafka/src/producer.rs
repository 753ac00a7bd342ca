//! A partition task's idempotent producer: sending with back-pressure, the
//! acknowledged end offset of every partition written, and a flush that
//! waits in small steps.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::ClientContext;

use crate::error::Error;
use crate::settings::KafkaSettings;

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

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::client::bridge_log("producer", level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::client::bridge_error("producer", &error, reason);
    }
}

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

pub struct Producer {
    inner: BaseProducer<DeliveryContext>,
    partition: i32,
}

impl Producer {
    /// Idempotent with `acks=all`, whatever the configuration says.
    ///
    /// Records not delivered within the group's session timeout (at least
    /// 30 s, so that a loaded broker does not fail deliveries) fail instead
    /// of being sent later, unless configured otherwise: a process that
    /// stalls longer may have lost its partitions, and what it queued before
    /// the stall should not reach the outputs after the new owner has read
    /// them (ARCHITECTURE.md, "Two owners of one partition").
    pub fn new(settings: &KafkaSettings, partition: i32) -> Result<Self, Error> {
        let timeout = settings.session_timeout_ms().max(30_000).to_string();
        let inner = settings
            .client_config(
                &[("linger.ms", "5"), ("partitioner", "murmur2_random"), ("message.timeout.ms", timeout.as_str())],
                &settings.producer_properties,
                &[("enable.idempotence", "true"), ("acks", "all")],
            )
            .create_with_context(DeliveryContext::default())
            .map_err(Error::broker("creating the producer"))?;
        Ok(Self { inner, partition })
    }

    /// Queues a record, waiting while librdkafka's queue is full.
    pub fn send(&self, mut rec: BaseRecord<'_, [u8], [u8], ()>) -> Result<(), Error> {
        loop {
            match self.inner.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    self.inner.poll(Duration::from_millis(5));
                }
                Err((e, back)) => {
                    return Err(Error::Broker { what: format!("producing to {}", back.topic), source: e })
                }
            }
        }
    }

    /// Serves delivery reports without waiting.
    pub fn poll(&self) {
        self.inner.poll(Duration::ZERO);
    }

    /// Waits until every record produced so far is acknowledged.
    ///
    /// Not rdkafka's `flush`: it serves delivery reports with a `poll` that
    /// always waits out its timeout, 100 ms per step, so every commit cost a
    /// multiple of 100 ms however fast the broker answered (and a `poll` under
    /// 1 ms spins). Here: send what lingers, then take the delivery reports
    /// as they come, sleeping 1 ms whenever none is there.
    /// Messages queued or sent and not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }

    pub fn flush(&self) -> Result<(), Error> {
        let started = Instant::now();
        let mut warn_after = Duration::from_secs(10);
        match self.inner.flush(Duration::ZERO) {
            Ok(()) | Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {}
            Err(e) => return Err(Error::Broker { what: "producer flush".into(), source: e }),
        }
        let mut in_flight = self.inner.in_flight_count();
        while in_flight > 0 {
            self.inner.poll(Duration::ZERO);
            let now = self.inner.in_flight_count();
            if now == in_flight {
                std::thread::sleep(Duration::from_millis(1));
            }
            in_flight = now;
            if started.elapsed() >= warn_after {
                tracing::warn!(partition = self.partition, waited = ?started.elapsed(), "producer flush still waiting for acknowledgements");
                warn_after += Duration::from_secs(10);
            }
        }
        match &self.inner.context().state.lock().expect("delivery state").error {
            Some(e) => Err(Error::Delivery(e.clone())),
            None => Ok(()),
        }
    }

    /// Lets what was produced reach the broker, as it may before a real
    /// crash (fault injection only).
    pub fn flush_before_crash(&self) {
        let _ = self.inner.flush(Duration::from_secs(10));
    }

    /// The offset after the last acknowledged record of `topic`/`partition`.
    pub fn delivered_end(&self, topic: &str, partition: i32) -> Option<i64> {
        self.inner.context().state.lock().expect("delivery state").ends.get(&(topic.to_string(), partition)).copied()
    }

    /// Runs `f` on the acknowledged end offsets of every partition written.
    pub fn with_delivered<T>(&self, f: impl FnOnce(&HashMap<(String, i32), i64>) -> T) -> T {
        f(&self.inner.context().state.lock().expect("delivery state").ends)
    }
}
