//! The one path from the engine to a destination: transitions and dead
//! letters go through an [`Emitter`], which counts them ([`Tally`]) and logs
//! invalid records (rate-limited), and hands them to a [`TransitionSink`]:
//! files in file mode ([`FileSink`]), topics in Kafka mode.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use segstream_decode::{DecodeError, InvalidRecord};
use segstream_scoring::Transition;

use crate::error::OutputError;
use crate::file::{DeadLetterFile, TransitionFile};

/// An input record that could not be decoded, on its way to the dead-letter
/// destination.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// Where it was read: `events.jsonl:17`, `events.avro#record 4`, `topic/partition/offset`.
    pub location: &'a str,
    pub error: &'a DecodeError,
    /// The message key (Kafka), kept with the record.
    pub key: Option<&'a [u8]>,
    /// The record as read (`None`: a message without a value).
    pub raw: Option<&'a [u8]>,
}

impl<'a> From<&'a InvalidRecord> for DeadLetter<'a> {
    fn from(r: &'a InvalidRecord) -> Self {
        Self { location: &r.location, error: &r.error, key: None, raw: Some(&r.raw) }
    }
}

/// A destination for transitions and dead letters.
pub trait TransitionSink {
    type Error;

    /// Writes one transition. `Ok(false)`: not written because the
    /// destination already holds it (a replay after a crash).
    fn transition(&mut self, t: &Transition) -> Result<bool, Self::Error>;

    /// Writes one dead letter; `Ok(false)` as for [`TransitionSink::transition`].
    fn dead_letter(&mut self, d: &DeadLetter<'_>) -> Result<bool, Self::Error>;
}

/// A transition's group, previous and new segment (`None`: no segment).
pub type Flow = (Arc<str>, Option<Arc<str>>, Option<Arc<str>>);

/// What was written, by group, old and new segment, and dead letters by kind.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    transitions: HashMap<Flow, u64>,
    dead_letters: BTreeMap<&'static str, u64>,
}

impl Tally {
    pub fn count_transition(&mut self, t: &Transition) {
        *self.transitions.entry((t.group.clone(), t.from.clone(), t.to.clone())).or_insert(0) += 1;
    }

    pub fn count_dead_letter(&mut self, kind: &'static str) {
        *self.dead_letters.entry(kind).or_insert(0) += 1;
    }

    /// Transitions by (group, new segment or `null`), sorted.
    pub fn transitions(&self) -> BTreeMap<(String, String), u64> {
        let mut by_target = BTreeMap::new();
        for ((g, _, to), n) in &self.transitions {
            *by_target.entry((g.to_string(), to.as_deref().unwrap_or("null").to_string())).or_insert(0) += *n;
        }
        by_target
    }

    /// Each flow's count, as shared names: for metrics labels.
    pub fn transition_counts(&self) -> impl Iterator<Item = (&Flow, u64)> {
        self.transitions.iter().map(|(flow, n)| (flow, *n))
    }

    pub fn dead_letters(&self) -> &BTreeMap<&'static str, u64> {
        &self.dead_letters
    }

    pub fn dead_letter_total(&self) -> u64 {
        self.dead_letters.values().sum()
    }
}

/// Invalid records kept as text for an end-of-run summary.
const SAMPLES: usize = 5;

/// What a [`Throttle`] lets a log say about one more occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    /// Log this one; `last`: the last one logged one by one (say so).
    Each { last: bool },
    /// Log a count of the occurrences not logged since the last summary.
    Summary(u64),
    /// Count it only.
    Nothing,
}

/// Keeps a warning from flooding the log: the first `each` occurrences one
/// by one, then one count at most every `every`.
#[derive(Debug)]
pub struct Throttle {
    each: u64,
    every: Duration,
    seen: u64,
    unlogged: u64,
    last_summary: Instant,
}

impl Throttle {
    pub fn new(each: u64, every: Duration) -> Self {
        Self { each, every, seen: 0, unlogged: 0, last_summary: Instant::now() }
    }

    /// One more occurrence: what to log about it.
    pub fn note(&mut self) -> Say {
        self.seen += 1;
        if self.seen <= self.each {
            if self.seen == self.each {
                self.last_summary = Instant::now();
            }
            return Say::Each { last: self.seen == self.each };
        }
        self.unlogged += 1;
        if self.last_summary.elapsed() >= self.every {
            let n = std::mem::take(&mut self.unlogged);
            self.last_summary = Instant::now();
            return Say::Summary(n);
        }
        Say::Nothing
    }
}

/// Logs invalid records without flooding the log: the first 100 each with
/// its location, kind and error (never the record's bytes), then a count
/// per minute.
#[derive(Debug)]
struct InvalidLog(Throttle);

impl InvalidLog {
    fn new() -> Self {
        Self(Throttle::new(100, Duration::from_secs(60)))
    }

    fn note(&mut self, d: &DeadLetter<'_>) {
        match self.0.note() {
            Say::Each { last } => {
                tracing::warn!(location = %d.location, kind = d.error.kind(), "invalid record: {}", d.error);
                if last {
                    tracing::warn!(
                        "further invalid records are only counted and dead-lettered (a count is logged every minute)"
                    );
                }
            }
            Say::Summary(count) => {
                tracing::warn!(count, last = d.location, "invalid records dead-lettered in the last minute");
            }
            Say::Nothing => {}
        }
    }
}

/// A sink with its tally and invalid-record log.
pub struct Emitter<S> {
    sink: S,
    tally: Tally,
    log: InvalidLog,
    samples: Vec<String>,
}

impl<S: TransitionSink> Emitter<S> {
    pub fn new(sink: S) -> Self {
        Self { sink, tally: Tally::default(), log: InvalidLog::new(), samples: Vec::new() }
    }

    /// Writes (and drains) `out`, in order.
    pub fn transitions(&mut self, out: &mut Vec<Transition>) -> Result<(), S::Error> {
        for t in out.drain(..) {
            if self.sink.transition(&t)? {
                self.tally.count_transition(&t);
            }
        }
        Ok(())
    }

    pub fn dead_letter(&mut self, d: &DeadLetter<'_>) -> Result<(), S::Error> {
        self.log.note(d);
        if self.samples.len() < SAMPLES {
            self.samples.push(format!("{}: {}", d.location, d.error));
        }
        if self.sink.dead_letter(d)? {
            self.tally.count_dead_letter(d.error.kind());
        }
        Ok(())
    }

    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// The first few invalid records, as `location: error`.
    pub fn invalid_samples(&self) -> &[String] {
        &self.samples
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }
}

/// File mode's destination: the transition file, and the dead-letter file,
/// created on the first invalid record so that clean inputs leave none.
pub struct FileSink {
    transitions: TransitionFile,
    dead_letters: Option<DeadLetterFile>,
    dead_letter_path: PathBuf,
    dead_letter_committed: u64,
}

/// The lengths to commit with the state (ADR 002).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncedLengths {
    pub transitions: u64,
    /// `None` while the dead-letter file does not exist.
    pub dead_letters: Option<u64>,
}

impl FileSink {
    /// `dead_letter_committed`: the dead-letter file's committed length (0 if
    /// none); a file with committed content is opened (and cut back) at once.
    pub fn new(
        transitions: TransitionFile,
        dead_letter_path: PathBuf,
        dead_letter_committed: u64,
    ) -> Result<Self, OutputError> {
        let mut sink = Self { transitions, dead_letters: None, dead_letter_path, dead_letter_committed };
        if dead_letter_committed > 0 {
            sink.dead_letter_file()?;
        }
        Ok(sink)
    }

    fn dead_letter_file(&mut self) -> Result<&mut DeadLetterFile, OutputError> {
        if self.dead_letters.is_none() {
            self.dead_letters = Some(DeadLetterFile::open(&self.dead_letter_path, self.dead_letter_committed)?);
        }
        Ok(self.dead_letters.as_mut().expect("opened above"))
    }

    /// Writes and fsyncs both files (ADR 002: before the state names their lengths).
    pub fn sync(&mut self) -> Result<SyncedLengths, OutputError> {
        let transitions = self.transitions.sync()?;
        let dead_letters = match &mut self.dead_letters {
            Some(d) => Some(d.sync()?),
            None => None,
        };
        Ok(SyncedLengths { transitions, dead_letters })
    }

    /// Hands buffered bytes to the OS without committing them: what a crash
    /// between two commits leaves on disk (for tests of the resume protocol).
    pub fn flush_uncommitted(&mut self) -> Result<(), OutputError> {
        self.transitions.flush_uncommitted()?;
        if let Some(d) = &mut self.dead_letters {
            d.flush_uncommitted()?;
        }
        Ok(())
    }

    /// The dead-letter file, if one was written.
    pub fn dead_letter_path(&self) -> Option<&Path> {
        self.dead_letters.as_ref().map(DeadLetterFile::path)
    }
}

impl TransitionSink for FileSink {
    type Error = OutputError;

    fn transition(&mut self, t: &Transition) -> Result<bool, OutputError> {
        self.transitions.write(t)?;
        Ok(true)
    }

    fn dead_letter(&mut self, d: &DeadLetter<'_>) -> Result<bool, OutputError> {
        self.dead_letter_file()?.write(d)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segstream_decode::Format;
    use segstream_scoring::{Cause, Scores};

    fn t(group: &str, to: Option<&str>) -> Transition {
        Transition {
            customer_id: "c".into(),
            group: Arc::from(group),
            from: None,
            to: to.map(Arc::from),
            at: 0,
            cause: Cause::Event("e".into()),
            scores: Scores::default(),
            rules_version: 1,
        }
    }

    /// Remembers what it was given; refuses every second transition as "already written".
    #[derive(Default)]
    struct Recorder {
        seen: Vec<String>,
    }

    impl TransitionSink for Recorder {
        type Error = std::convert::Infallible;

        fn transition(&mut self, t: &Transition) -> Result<bool, Self::Error> {
            self.seen.push(t.group.to_string());
            Ok(self.seen.len() % 2 == 1)
        }

        fn dead_letter(&mut self, d: &DeadLetter<'_>) -> Result<bool, Self::Error> {
            self.seen.push(d.location.to_string());
            Ok(true)
        }
    }

    #[test]
    fn a_throttle_says_the_first_ones_then_counts() {
        let mut t = Throttle::new(2, Duration::ZERO);
        assert_eq!(t.note(), Say::Each { last: false });
        assert_eq!(t.note(), Say::Each { last: true });
        assert_eq!(t.note(), Say::Summary(1));
        let mut t = Throttle::new(1, Duration::from_secs(3600));
        assert_eq!(t.note(), Say::Each { last: true });
        assert_eq!(t.note(), Say::Nothing);
        assert_eq!(t.note(), Say::Nothing);
    }

    #[test]
    fn the_tally_counts_only_what_the_sink_wrote() {
        let mut e = Emitter::new(Recorder::default());
        let mut out = vec![t("rfm", Some("champions")), t("rfm", Some("champions")), t("health", None)];
        e.transitions(&mut out).expect("infallible");
        assert!(out.is_empty());
        let err = DecodeError::UnknownType("x".into());
        e.dead_letter(&DeadLetter { location: "f:3", error: &err, key: None, raw: Some(b"{}") }).expect("infallible");
        assert_eq!(e.sink().seen, vec!["rfm", "rfm", "health", "f:3"]);
        let by = e.tally().transitions();
        assert_eq!(by.get(&("rfm".into(), "champions".into())), Some(&1));
        assert_eq!(by.get(&("health".into(), "null".into())), Some(&1));
        assert_eq!(e.tally().dead_letters().get("unknown_type"), Some(&1));
        assert_eq!(e.invalid_samples(), ["f:3: unknown event type `x`"]);
    }

    #[test]
    fn a_file_sink_creates_its_dead_letter_file_only_when_needed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("o.jsonl");
        let dlq = dir.path().join("o.dlq.jsonl");
        let file = TransitionFile::open(&out, Format::Json, 0).expect("open");
        let mut sink = Emitter::new(FileSink::new(file, dlq.clone(), 0).expect("sink"));
        sink.transitions(&mut vec![t("rfm", Some("champions"))]).expect("write");
        let lengths = sink.sink_mut().sync().expect("sync");
        assert_eq!(lengths.dead_letters, None);
        assert!(!dlq.exists());
        let err = DecodeError::Json("eof".into());
        sink.dead_letter(&DeadLetter { location: "in:1", error: &err, key: None, raw: Some(b"{") }).expect("write");
        let lengths = sink.sink_mut().sync().expect("sync");
        assert!(lengths.dead_letters.is_some_and(|n| n > 0));
        assert_eq!(sink.sink().dead_letter_path(), Some(dlq.as_path()));
        assert_eq!(lengths.transitions, std::fs::metadata(&out).expect("meta").len());
    }
}
