//! File mode: one input file through the engine to a transition file, with
//! exact resume (see ARCHITECTURE.md, "Commit protocol").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use segstream_decode::InvalidRecord;
use segstream_output::{DeadLetterFile, OutputFormat, TransitionFile};
use segstream_scoring::Transition;

use crate::config::Config;
use crate::engine::{Counters, Engine};
use crate::input::{InputFormat, InputProgress, InputReader, Record};

/// Invalid records shown in the summary (all of them go to the dead-letter file).
const INVALID_SAMPLES: usize = 5;
/// Invalid records logged one by one before the log goes quiet.
const INVALID_LOGGED: u64 = 100;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RunArgs {
    pub input: PathBuf,
    pub output: PathBuf,
    pub state_dir: PathBuf,
    pub input_format: Option<InputFormat>,
    pub output_format: Option<OutputFormat>,
    /// Default: `<output>.dead-letter.jsonl`.
    pub dead_letter: Option<PathBuf>,
    /// Advance time to this instant (epoch ms) after the input ends.
    pub until: Option<i64>,
    /// Stop abruptly after this many records, leaving uncommitted output on
    /// disk, as a crash would (for tests of the resume protocol).
    pub crash_after: Option<u64>,
    pub progress: bool,
}

impl RunArgs {
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            input: input.into(),
            output: output.into(),
            state_dir: state_dir.into(),
            input_format: None,
            output_format: None,
            dead_letter: None,
            until: None,
            crash_after: None,
            progress: false,
        }
    }

    pub fn dead_letter_path(&self) -> PathBuf {
        self.dead_letter.clone().unwrap_or_else(|| {
            let mut s = self.output.clone().into_os_string();
            s.push(".dead-letter.jsonl");
            PathBuf::from(s)
        })
    }
}

/// What one `run` did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Records read by this process (valid or not).
    pub records: u64,
    /// Counters of this process (differences of the cumulative ones).
    pub counts: Counters,
    /// Cumulative counters of the state dir.
    pub totals: Counters,
    pub invalid_samples: Vec<String>,
    /// Transitions written by this process, by (group, new segment or `null`).
    pub transitions: BTreeMap<(String, String), u64>,
    pub elapsed: Duration,
    /// Record number this run started from (0 for a fresh input).
    pub resumed_from: u64,
    pub stopped_early: bool,
    pub dead_letter: Option<PathBuf>,
}

/// A path's stable identity in the state dir: absolute and normalised, also
/// for a file that does not exist yet.
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Ok(p);
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let parent = parent.canonicalize().with_context(|| format!("directory of {}", path.display()))?;
    Ok(parent.join(path.file_name().with_context(|| format!("{} is not a file path", path.display()))?))
}

fn committed_len(engine: &Engine, key: &str) -> anyhow::Result<u64> {
    match engine.meta(key)? {
        None => Ok(0),
        Some(v) => std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()).with_context(|| format!("corrupt meta {key}")),
    }
}

struct Outputs {
    transitions: TransitionFile,
    transitions_key: String,
    dead_letter: Option<DeadLetterFile>,
    dead_letter_path: PathBuf,
    dead_letter_key: String,
}

impl Outputs {
    fn dead_letter(&mut self, engine: &Engine) -> anyhow::Result<&mut DeadLetterFile> {
        if self.dead_letter.is_none() {
            // Opened on the first invalid record, so clean inputs leave no empty file.
            let committed = committed_len(engine, &self.dead_letter_key)?;
            self.dead_letter = Some(DeadLetterFile::open(&self.dead_letter_path, committed)?);
        }
        Ok(self.dead_letter.as_mut().expect("opened above"))
    }

    fn write(&mut self, ts: &mut Vec<Transition>, tally: &mut BTreeMap<(String, String), u64>) -> anyhow::Result<()> {
        for t in ts.drain(..) {
            self.transitions.write(&t)?;
            let to = t.to.as_deref().unwrap_or("null").to_string();
            *tally.entry((t.group.to_string(), to)).or_insert(0) += 1;
        }
        Ok(())
    }

    /// Commit protocol: output bytes are durable before the state that
    /// produced them names their length; see ARCHITECTURE.md.
    fn commit(&mut self, engine: &mut Engine, input_key: &str, pos: &InputProgress) -> anyhow::Result<()> {
        let mut meta = vec![(input_key.to_string(), serde_json::to_vec(pos)?)];
        let len = self.transitions.sync()?;
        meta.push((self.transitions_key.clone(), len.to_string().into_bytes()));
        if let Some(d) = &mut self.dead_letter {
            let len = d.sync()?;
            meta.push((self.dead_letter_key.clone(), len.to_string().into_bytes()));
        }
        engine.commit(meta)?;
        Ok(())
    }
}

fn diff(now: &Counters, start: &Counters) -> Counters {
    Counters {
        events: now.events - start.events,
        applied: now.applied - start.applied,
        duplicate: now.duplicate - start.duplicate,
        late: now.late - start.late,
        invalid: now.invalid - start.invalid,
        deleted_unknown: now.deleted_unknown - start.deleted_unknown,
        customers: now.customers,
        transitions: now.transitions - start.transitions,
    }
}

/// Runs one input file to the end (or to `crash_after`), committing every
/// `state.commit_every_records` records and at the end.
pub fn run_file(cfg: &Config, args: &RunArgs) -> anyhow::Result<RunSummary> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let mut engine = Engine::open(&args.state_dir, cfg)?;
    let start_counters = engine.counters().clone();

    let input_abs = absolute(&args.input)?;
    let output_abs = absolute(&args.output)?;
    let dead_letter_path = args.dead_letter_path();
    let dead_letter_abs = absolute(&dead_letter_path)?;
    if output_abs == input_abs || dead_letter_abs == input_abs {
        anyhow::bail!("the output and dead-letter files must not be the input file {}", args.input.display());
    }
    let input_key = format!("input:{}", input_abs.display());
    let input_format = args.input_format.unwrap_or_else(|| InputFormat::from_path(&args.input));
    let fresh = || InputProgress::start(&args.input).with_context(|| format!("reading {}", args.input.display()));
    let position = match engine.meta(&input_key)? {
        None => fresh()?,
        Some(v) => {
            let p: InputProgress = serde_json::from_slice(&v).with_context(|| format!("corrupt meta {input_key}"))?;
            if p.same_file(&args.input)? {
                p
            } else {
                tracing::warn!(input = %args.input.display(), "input differs from the file of that name read before; reading it from the start as a new input");
                fresh()?
            }
        }
    };

    let output_format = args.output_format.or_else(|| OutputFormat::from_path(&args.output)).unwrap_or(OutputFormat::Json);
    let transitions_key = format!("output:{}", output_abs.display());
    let committed = committed_len(&engine, &transitions_key)?;
    let mut outputs = Outputs {
        transitions: TransitionFile::open(&args.output, output_format, committed)?,
        transitions_key,
        dead_letter: None,
        dead_letter_key: format!("output:{}", dead_letter_abs.display()),
        dead_letter_path,
    };
    if committed_len(&engine, &outputs.dead_letter_key)? > 0 {
        outputs.dead_letter(&engine)?;
    }

    let mut reader = InputReader::open(&args.input, input_format, position)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let commit_every = cfg.state.commit_every_records.get();
    let mut summary = RunSummary { resumed_from: position.records, ..RunSummary::default() };
    if position.records > 0 {
        tracing::info!(input = %args.input.display(), record = position.records, "resuming after the last commit");
    }
    let mut buf: Vec<Transition> = Vec::new();
    let mut last_progress = Instant::now();
    while let Some(rec) = reader.next_record() {
        let rec = rec.with_context(|| format!("reading {}", args.input.display()))?;
        summary.records += 1;
        match rec {
            Record::Event(e) => {
                engine.on_event(&e, &mut buf)?;
                outputs.write(&mut buf, &mut summary.transitions)?;
            }
            Record::Invalid(r) => {
                engine.count_invalid();
                note_invalid(&r, engine.counters().invalid - start_counters.invalid, &mut summary.invalid_samples);
                outputs.dead_letter(&engine)?.write(&r)?;
            }
        }
        let pos = reader.position();
        if pos.records % commit_every == 0 {
            outputs.commit(&mut engine, &input_key, &pos)?;
        }
        if args.crash_after == Some(summary.records) {
            outputs.transitions.flush_uncommitted()?;
            if let Some(d) = &mut outputs.dead_letter {
                d.flush_uncommitted()?;
            }
            summary.stopped_early = true;
            break;
        }
        if args.progress && last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "segstream: {} records ({:.0}/s), {} transitions",
                summary.records,
                summary.records as f64 / secs,
                engine.counters().transitions - start_counters.transitions
            );
        }
    }
    if !summary.stopped_early {
        if let Some(until) = args.until {
            engine.advance_watermark(until, &mut buf)?;
            outputs.write(&mut buf, &mut summary.transitions)?;
        }
        outputs.commit(&mut engine, &input_key, &reader.position())?;
    }
    summary.totals = engine.counters().clone();
    summary.counts = diff(engine.counters(), &start_counters);
    summary.elapsed = started.elapsed();
    summary.dead_letter = outputs.dead_letter.as_ref().map(|d| d.path().to_path_buf());
    Ok(summary)
}

fn note_invalid(r: &InvalidRecord, nth: u64, samples: &mut Vec<String>) {
    if nth <= INVALID_LOGGED {
        tracing::warn!(location = %r.location, kind = r.error.kind(), "invalid record: {}", r.error);
        if nth == INVALID_LOGGED {
            tracing::warn!("further invalid records are only counted and dead-lettered");
        }
    }
    if samples.len() < INVALID_SAMPLES {
        samples.push(r.to_string());
    }
}

impl RunSummary {
    /// The end-of-run report printed on stderr.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let c = &self.counts;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        if self.resumed_from > 0 {
            let _ = writeln!(s, "resumed after record {}", self.resumed_from);
        }
        if self.stopped_early {
            let _ = writeln!(s, "stopped early (uncommitted work will be redone by the next run)");
        }
        let _ = writeln!(
            s,
            "records read {}: events {} (applied {}, duplicate {}, late {}), invalid {}",
            self.records, c.events, c.applied, c.duplicate, c.late, c.invalid
        );
        for sample in &self.invalid_samples {
            let _ = writeln!(s, "  invalid: {sample}");
        }
        if c.invalid > self.invalid_samples.len() as u64 {
            let _ = writeln!(s, "  … and {} more", c.invalid - self.invalid_samples.len() as u64);
        }
        if let Some(d) = &self.dead_letter {
            if c.invalid > 0 {
                let _ = writeln!(s, "  dead letters: {}", d.display());
            }
        }
        let _ = writeln!(s, "customers {}", self.totals.customers);
        let _ = writeln!(s, "transitions {}", c.transitions);
        let mut group = "";
        for ((g, seg), n) in &self.transitions {
            if g != group {
                let _ = write!(s, "{}  {g}:", if group.is_empty() { "" } else { "\n" });
                group = g;
            }
            let _ = write!(s, " {seg}={n}");
        }
        if !group.is_empty() {
            s.push('\n');
        }
        let _ = writeln!(s, "elapsed {:.2}s, {:.0} events/s", secs, c.events as f64 / secs);
        s
    }
}
