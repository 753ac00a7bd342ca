//! File mode: one input file through the engine to a transition file, with
//! exact resume (see ARCHITECTURE.md, "Commit protocol (file mode)").

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use segstream_engine::{Counters, Engine, EngineSettings};
use segstream_output::{DeadLetter, Emitter, FileSink, TransitionFile};
use segstream_scoring::Transition;

use super::input::{InputProgress, InputReader, Record};
use super::summary::RunSummary;
use crate::settings::FileSettings;

const PROGRESS_EVERY: Duration = Duration::from_secs(5);

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
        Some(v) => {
            std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()).with_context(|| format!("corrupt meta {key}"))
        }
    }
}

/// The state-dir keys under which the input position and the outputs'
/// committed lengths are kept.
struct Keys {
    input: String,
    transitions: String,
    dead_letters: String,
}

/// Commit protocol: output bytes are durable before the state that produced
/// them names their length (ADR 002).
fn commit(engine: &mut Engine, sink: &mut FileSink, keys: &Keys, pos: &InputProgress) -> anyhow::Result<()> {
    let mut meta = vec![(keys.input.clone(), serde_json::to_vec(pos)?)];
    let lengths = sink.sync()?;
    meta.push((keys.transitions.clone(), lengths.transitions.to_string().into_bytes()));
    if let Some(len) = lengths.dead_letters {
        meta.push((keys.dead_letters.clone(), len.to_string().into_bytes()));
    }
    engine.commit(meta)?;
    Ok(())
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

/// Runs one input file to the end (or to the injected crash), committing
/// every `state.commit_every_records` records and at the end.
pub fn run_file(settings: &EngineSettings, args: &FileSettings) -> anyhow::Result<RunSummary> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let mut engine = Engine::open(&args.state_dir, settings)?;
    let start_counters = engine.counters().clone();

    let input_abs = absolute(&args.input)?;
    let output_abs = absolute(&args.output)?;
    let dead_letter_abs = absolute(&args.dead_letter)?;
    if output_abs == input_abs || dead_letter_abs == input_abs {
        anyhow::bail!("the output and dead-letter files must not be the input file {}", args.input.display());
    }
    let keys = Keys {
        input: format!("input:{}", input_abs.display()),
        transitions: format!("output:{}", output_abs.display()),
        dead_letters: format!("output:{}", dead_letter_abs.display()),
    };
    let fresh = || InputProgress::start(&args.input).with_context(|| format!("reading {}", args.input.display()));
    let position = match engine.meta(&keys.input)? {
        None => fresh()?,
        Some(v) => {
            let p: InputProgress =
                serde_json::from_slice(&v).with_context(|| format!("corrupt meta {}", keys.input))?;
            if p.same_file(&args.input)? {
                p
            } else {
                tracing::warn!(input = %args.input.display(), "input differs from the file of that name read before; reading it from the start as a new input");
                fresh()?
            }
        }
    };

    let transitions =
        TransitionFile::open(&args.output, args.output_format, committed_len(&engine, &keys.transitions)?)?;
    let sink = FileSink::new(transitions, args.dead_letter.clone(), committed_len(&engine, &keys.dead_letters)?)?;
    let mut out = Emitter::new(sink);

    let mut reader = InputReader::open(&args.input, args.input_format, position)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let commit_every = settings.commit_every_records();
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
                out.transitions(&mut buf)?;
            }
            Record::Invalid(r) => {
                engine.count_invalid();
                out.dead_letter(&DeadLetter::from(&r))?;
            }
        }
        let pos = reader.position();
        if pos.records % commit_every == 0 {
            commit(&mut engine, out.sink_mut(), &keys, &pos)?;
        }
        if args.faults.crash_now(summary.records) {
            out.sink_mut().flush_uncommitted()?;
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
            out.transitions(&mut buf)?;
        }
        commit(&mut engine, out.sink_mut(), &keys, &reader.position())?;
    }
    summary.totals = engine.counters().clone();
    summary.counts = diff(engine.counters(), &start_counters);
    summary.elapsed = started.elapsed();
    summary.invalid_samples = out.invalid_samples().to_vec();
    summary.transitions = out.tally().transitions();
    summary.dead_letter = out.sink().dead_letter_path().map(Path::to_path_buf);
    Ok(summary)
}
