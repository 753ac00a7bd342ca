//! File mode's `/metrics` (`run --metrics-addr`), for long replays: the
//! same names as Kafka mode where they mean the same (events, dead letters,
//! transitions, watermark, process), and the input's progress in bytes.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use segstream_kafka::{KindLabel, TallyPublished, TransitionLabel};
use segstream_output::Tally;

pub struct FileMetrics {
    registry: Registry,
    events: Counter,
    records: Counter,
    read_bytes: Gauge,
    size_bytes: Gauge,
    watermark: Gauge<f64, AtomicU64>,
    dead_letters: Family<KindLabel, Counter>,
    transitions: Family<TransitionLabel, Counter>,
    published: std::sync::Mutex<Published>,
}

#[derive(Default)]
struct Published {
    events: u64,
    records: u64,
    tally: TallyPublished,
}

impl Default for FileMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("segstream");
        let events = Counter::default();
        registry.register("input_events", "Valid events applied", events.clone());
        let records = Counter::default();
        registry.register("file_records", "Input records read (valid and invalid)", records.clone());
        let read_bytes = Gauge::default();
        registry.register(
            "file_read_bytes",
            "Bytes of the input read so far (the sorted copy's, once sorted)",
            read_bytes.clone(),
        );
        let size_bytes = Gauge::default();
        registry.register(
            "file_size_bytes",
            "Size of what is being read (the input, or its sorted copy)",
            size_bytes.clone(),
        );
        let watermark = Gauge::<f64, AtomicU64>::default();
        registry.register("time_watermark_seconds", "Event-time watermark (epoch seconds)", watermark.clone());
        let dead_letters = Family::<KindLabel, Counter>::default();
        registry.register("input_dead_letters", "Records dead-lettered, by error kind", dead_letters.clone());
        let transitions = Family::<TransitionLabel, Counter>::default();
        registry.register(
            "output_transitions",
            "Transitions written, by group, previous and target segment (null: none)",
            transitions.clone(),
        );
        Self {
            registry,
            events,
            records,
            read_bytes,
            size_bytes,
            watermark,
            dead_letters,
            transitions,
            published: std::sync::Mutex::new(Published::default()),
        }
    }
}

impl std::fmt::Debug for FileMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileMetrics")
    }
}

impl FileMetrics {
    /// Brings the figures up to what the run did so far (`events` and
    /// `records` since the run began).
    pub fn update(&self, events: u64, records: u64, bytes: (u64, u64), watermark_ms: i64, tally: &Tally) {
        let Ok(mut p) = self.published.lock() else { return };
        self.events.inc_by(events.saturating_sub(p.events));
        self.records.inc_by(records.saturating_sub(p.records));
        (p.events, p.records) = (events.max(p.events), records.max(p.records));
        self.read_bytes.set(i64::try_from(bytes.0).unwrap_or(i64::MAX));
        self.size_bytes.set(i64::try_from(bytes.1).unwrap_or(i64::MAX));
        self.watermark.set(watermark_ms.max(0) as f64 / 1000.0);
        p.tally.publish(tally, &self.transitions, &self.dead_letters);
    }
}

impl crate::http::Exposition for FileMetrics {
    fn encode(&self) -> String {
        segstream_kafka::gauges::encode_with_process(&self.registry)
    }

    fn liveness(&self) -> Result<(), String> {
        Ok(())
    }

    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}
