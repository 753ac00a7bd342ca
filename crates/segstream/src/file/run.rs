//! File mode: one input file through the engine to a transition file, with
//! exact resume (see ARCHITECTURE.md, "Commit protocol (file mode)").

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use segstream_decode::Format;
use segstream_engine::{Counters, Engine, EngineSettings};
use segstream_output::{DeadLetter, Emitter, FileSink, TransitionFile};
use segstream_scoring::Transition;

use super::input::{InputReader, Position, Record};
use super::progress::{InputProgress, OutputRecord, SortedCopy, INPUT_PREFIX, OUTPUT_PREFIX};
use super::sort::sort_events;
use super::summary::{InputOrder, RunSummary};
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

/// The state-dir keys of this run's files.
struct Keys {
    input: String,
    transitions: String,
    dead_letters: String,
}

/// The committed length of an output about to be opened, and whether the
/// state dir has no record of it yet.
fn committed_output(
    engine: &Engine,
    key: &str,
    path: &Path,
    format: Format,
    overwrite: bool,
    what: &str,
) -> anyhow::Result<(u64, bool)> {
    let meta = |bytes: Vec<u8>| OutputRecord::decode(&bytes).with_context(|| format!("corrupt meta {key}"));
    if let Some(rec) = engine.meta(key)?.map(meta).transpose()? {
        if let Some(was) = rec.format.filter(|f| *f != format) {
            bail!(
                "{} was written as {was} by this state dir; writing {format} to it now would mix two formats in one \
                 file. Keep --{what}-format {was}, or give another --{what}",
                path.display()
            );
        }
        return Ok((rec.len, false));
    }
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len == 0 || overwrite {
        return Ok((0, true));
    }
    // A state dir copied or moved with its files: the same committed bytes
    // under another name.
    for (other, bytes) in engine.meta_with_prefix(OUTPUT_PREFIX)? {
        if let Some(rec) = OutputRecord::decode(&bytes) {
            if rec.format.is_none_or(|f| f == format) && rec.matches(path).unwrap_or(false) {
                tracing::info!(path = %path.display(), was = &other[OUTPUT_PREFIX.len()..], "output recognised as a copy of one this state dir wrote: continuing it");
                return Ok((rec.len, true));
            }
        }
    }
    bail!(
        "{} already exists ({len} bytes) and this state dir did not write it: refusing to overwrite it. \
         Give another --{what}, or --overwrite to replace it",
        path.display()
    )
}

/// The committed progress of the input: under its path, else under another
/// path with the same content (a moved or copied file), else none.
fn committed_input(engine: &Engine, key: &str, input: &Path) -> anyhow::Result<Option<InputProgress>> {
    let decode = |bytes: &[u8]| InputProgress::decode(bytes, input).map_err(anyhow::Error::msg);
    if let Some(bytes) = engine.meta(key)? {
        return match decode(&bytes).with_context(|| format!("corrupt meta {key}"))? {
            Some(p) if p.same_content(input)? => Ok(Some(p)),
            _ => bail!(
                "{} is not the file this state dir read under that name: its content changed. Its events would be \
                 applied on top of those of the earlier content. To recompute from the new content use a new \
                 --state-dir; to apply it as a further input, give it another name",
                input.display()
            ),
        };
    }
    for (other, bytes) in engine.meta_with_prefix(INPUT_PREFIX)? {
        if let Ok(Some(p)) = decode(&bytes) {
            if p.same_content(input).unwrap_or(false) {
                tracing::info!(input = %input.display(), was = &other[INPUT_PREFIX.len()..], "input recognised as the content of one read before (moved or copied): continuing where it stopped");
                return Ok(Some(p));
            }
        }
    }
    Ok(None)
}

/// Whether the rest of `path` may be out of time order, from a pass over
/// the records' `ts` alone (a fraction of decoding them): `false` means its
/// events are in time order, as the records read include all of them.
fn maybe_disordered(mut reader: InputReader, path: &Path) -> anyhow::Result<bool> {
    let mut max = i64::MIN;
    while let Some(ts) = reader.next_ts() {
        if let Some(ts) = ts.with_context(|| format!("reading {}", path.display()))? {
            if ts < max {
                return Ok(true);
            }
            max = ts;
        }
    }
    Ok(false)
}

/// The first record `reader` gives whose `ts` is earlier than one before
/// it, as a location; `None` when the rest of `path` is in time order.
fn first_disorder(mut reader: InputReader, path: &Path) -> anyhow::Result<Option<String>> {
    let mut max = i64::MIN;
    while let Some(rec) = reader.next_record() {
        if let Record::Event(e) = rec.with_context(|| format!("reading {}", path.display()))? {
            if e.ts < max {
                return Ok(Some(reader.location()));
            }
            max = e.ts;
        }
    }
    Ok(None)
}

/// Commit protocol: output bytes are durable before the state that produced
/// them names their length (ADR 002).
fn commit(
    engine: &mut Engine,
    sink: &mut FileSink,
    keys: &Keys,
    args: &FileSettings,
    progress: &InputProgress,
) -> anyhow::Result<()> {
    let lengths = sink.sync()?;
    let record = |path: &Path, len, format| -> anyhow::Result<Vec<u8>> {
        let rec = OutputRecord::of(path, len, format).with_context(|| format!("reading back {}", path.display()))?;
        Ok(serde_json::to_vec(&rec)?)
    };
    let mut meta = vec![
        (keys.input.clone(), serde_json::to_vec(progress)?),
        (keys.transitions.clone(), record(&args.output, lengths.transitions, args.output_format)?),
    ];
    if let Some(len) = lengths.dead_letters {
        meta.push((keys.dead_letters.clone(), record(&args.dead_letter, len, Format::Json)?));
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
        capped: now.capped - start.capped,
        customers: now.customers,
        transitions: now.transitions - start.transitions,
    }
}

/// Runs a rule migration under way to its end before any input (ADR 008):
/// customers in id order, `commit_every_records` (at most 10 000) at a time, each batch's
/// transitions written and committed with its progress like input records.
/// Returns whether an injected crash stopped it.
fn migrate_rules(
    engine: &mut Engine,
    out: &mut Emitter<FileSink>,
    keys: &Keys,
    args: &FileSettings,
    progress: &InputProgress,
    every: u64,
    summary: &mut RunSummary,
) -> anyhow::Result<bool> {
    engine.start_migration()?;
    let batch = usize::try_from(every.min(segstream_engine::MIGRATION_BATCH)).unwrap_or(usize::MAX).max(1);
    let mut buf: Vec<Transition> = Vec::new();
    let mut done_here = 0u64;
    while let Some(before) = engine.migration().map(|m| m.customers) {
        let step = engine.migrate_step(batch, &mut buf)?;
        out.transitions(&mut buf)?;
        done_here += step.progress.customers - before;
        if args.faults.crash_now_migrating(done_here) {
            out.sink_mut().flush_uncommitted()?;
            return Ok(true);
        }
        commit(engine, out.sink_mut(), keys, args, progress)?;
        let p = &step.progress;
        tracing::info!(
            customers = p.customers,
            of = engine.counters().customers,
            transitions = p.transitions,
            "rule migration to version {}: {}",
            p.to.version,
            if step.done { "complete" } else { "in progress" }
        );
        if step.done {
            summary.migration = Some(step.progress);
        }
    }
    Ok(false)
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
        bail!("the output and dead-letter files must not be the input file {}", args.input.display());
    }
    if dead_letter_abs == output_abs {
        bail!("the dead-letter file must not be the output file {}", args.output.display());
    }
    let keys = Keys {
        input: format!("{INPUT_PREFIX}{}", input_abs.display()),
        transitions: format!("{OUTPUT_PREFIX}{}", output_abs.display()),
        dead_letters: format!("{OUTPUT_PREFIX}{}", dead_letter_abs.display()),
    };
    std::fs::metadata(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let (committed, new_output) =
        committed_output(&engine, &keys.transitions, &args.output, args.output_format, args.overwrite, "output")?;
    let (dead_committed, new_dead) =
        committed_output(&engine, &keys.dead_letters, &args.dead_letter, Format::Json, args.overwrite, "dead-letter")?;
    // An output this state dir has no record of gets one before its first
    // byte: after a crash before the first commit, its bytes are known to be
    // ours (cut back, not refused as someone else's file).
    let mut records = Vec::new();
    for (new, key, len, format) in [
        (new_output, &keys.transitions, committed, args.output_format),
        (new_dead, &keys.dead_letters, dead_committed, Format::Json),
    ] {
        if new {
            let rec = OutputRecord { len, format: Some(format), tail_hash: None };
            records.push((key.clone(), serde_json::to_vec(&rec)?));
        }
    }
    if !records.is_empty() {
        engine.commit(records)?;
    }
    let transitions = TransitionFile::open(&args.output, args.output_format, committed)?;
    let mut out = Emitter::new(FileSink::new(transitions, args.dead_letter.clone(), dead_committed)?);

    let mut summary = RunSummary::default();
    let mut progress = match committed_input(&engine, &keys.input, &args.input)? {
        None => InputProgress::segment(&args.input, Position::default())?,
        Some(p) if p.complete && std::fs::metadata(&args.input)?.len() > p.end => {
            InputProgress::segment(&args.input, p.read)?
        }
        Some(p) => {
            summary.resumed_from =
                if p.complete { None } else { Some(p.sorted.as_ref().map_or(p.read, |s| s.pos).records) };
            summary.nothing_new = p.complete;
            p
        }
    };
    if migrate_rules(&mut engine, &mut out, &keys, args, &progress, settings.commit_every_records(), &mut summary)? {
        summary.stopped_early = true;
        return Ok(summary);
    }
    let sort_dir = args.state_dir.join("sort");
    // Implausible event times are invalid records, judged against the clock
    // committed with the segment.
    let window = *settings.window();
    let reference = (progress.clock_ms > 0).then_some(progress.clock_ms);
    let open_input = |at: Position| -> anyhow::Result<InputReader> {
        let r = InputReader::open(&args.input, args.input_format, at, progress.end)
            .with_context(|| format!("opening {}", args.input.display()))?;
        Ok(r.with_window(window, reference))
    };
    if !progress.complete && progress.sorted.is_none() && progress.read == progress.start {
        // A new segment: read directly if in time order, else sort it first.
        // Most inputs are in order: the cheap pass says so; the exact one,
        // which decodes, finds where an input is not (events only count).
        let disorder = match maybe_disordered(open_input(progress.start)?, &args.input)? {
            true => first_disorder(open_input(progress.start)?, &args.input)?,
            false => None,
        };
        if let Some(at) = disorder {
            let file = format!("segment-{}-{:016x}.jsonl", progress.start.records, progress.end_hash);
            let mut reader = open_input(progress.start)?;
            let records = std::iter::from_fn(|| reader.next_record());
            let stats = sort_events(records, &sort_dir.join("tmp"), &sort_dir.join(&file), args.sort_buffer, |r| {
                engine.count_invalid();
                summary.records += 1;
                out.dead_letter(&DeadLetter::from(&r))?;
                Ok(())
            })?;
            progress.read = reader.position();
            progress.sorted = Some(SortedCopy { file, pos: Position::default() });
            commit(&mut engine, out.sink_mut(), &keys, args, &progress)?;
            summary.order = Some(InputOrder::Sorted { first_disorder: at, events: stats.events, runs: stats.runs });
        } else {
            summary.order = Some(InputOrder::InTime);
        }
    }
    if let Some(copy) = &progress.sorted {
        let path = sort_dir.join(&copy.file);
        if !path.exists() {
            // Lost (e.g. a state dir copied without it): sorted again, alike;
            // its dead letters are already written and counted.
            tracing::warn!(copy = %path.display(), "the sorted copy of the input is missing: sorting the input again");
            let mut reader = open_input(progress.start)?;
            sort_events(
                std::iter::from_fn(|| reader.next_record()),
                &sort_dir.join("tmp"),
                &path,
                args.sort_buffer,
                |_| Ok(()),
            )?;
        }
    }

    // The records: the input's, or its sorted copy's.
    let (source, format, pos, end) = match &progress.sorted {
        Some(copy) => {
            let path = sort_dir.join(&copy.file);
            let len = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
            (path, Format::Json, copy.pos, len)
        }
        None => (args.input.clone(), args.input_format, progress.read, progress.end),
    };
    if let Some(from) = summary.resumed_from.filter(|n| *n > 0) {
        tracing::info!(input = %args.input.display(), record = from, "resuming after the last commit");
    }
    let mut reader = match progress.complete {
        true => None,
        false => Some(
            InputReader::open(&source, format, pos, end)
                .with_context(|| format!("opening {}", source.display()))?
                .with_window(window, reference),
        ),
    };
    let commit_every = settings.commit_every_records();
    let mut buf: Vec<Transition> = Vec::new();
    let mut last_progress = Instant::now();
    let mut last_metrics = Instant::now();
    let publish = |engine: &Engine, out: &Emitter<FileSink>, records: u64, read: u64| {
        if let Some(m) = &args.metrics {
            let events = engine.counters().events.saturating_sub(start_counters.events);
            m.update(events, records, (read, end), engine.clock().watermark, out.tally());
        }
    };
    let mut stopped_early = false;
    while let Some(reader) = &mut reader {
        let Some(rec) = reader.next_record() else { break };
        let rec = rec.with_context(|| format!("reading {}", source.display()))?;
        summary.records += 1;
        match rec {
            Record::Event(e) => {
                let (lo, hi) = summary.event_times.get_or_insert((e.ts, e.ts));
                (*lo, *hi) = ((*lo).min(e.ts), (*hi).max(e.ts));
                engine.on_event(&e, &mut buf)?;
                out.transitions(&mut buf)?;
            }
            Record::Invalid(r) => {
                engine.count_invalid();
                out.dead_letter(&DeadLetter::from(&r))?;
            }
        }
        let pos = reader.position();
        match &mut progress.sorted {
            Some(copy) => copy.pos = pos,
            None => progress.read = pos,
        }
        if pos.records % commit_every == 0 || engine.store().commit_due() {
            commit(&mut engine, out.sink_mut(), &keys, args, &progress)?;
        }
        if args.faults.crash_now(summary.records) {
            out.sink_mut().flush_uncommitted()?;
            stopped_early = true;
            break;
        }
        if args.metrics.is_some() && last_metrics.elapsed() >= Duration::from_secs(1) {
            last_metrics = Instant::now();
            publish(&engine, &out, summary.records, pos.offset);
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
    if !stopped_early {
        if let Some(until) = args.until {
            let watermark = engine.clock().watermark;
            if until < watermark {
                summary.until_passed = Some((until, watermark));
            }
            engine.advance_watermark(until, &mut buf)?;
            out.transitions(&mut buf)?;
        }
        let copy = progress.sorted.take();
        progress.complete = true;
        commit(&mut engine, out.sink_mut(), &keys, args, &progress)?;
        if let Some(copy) = copy {
            let path = sort_dir.join(copy.file);
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    publish(&engine, &out, summary.records, end);
    summary.stopped_early = stopped_early;
    summary.totals = engine.counters().clone();
    summary.counts = diff(engine.counters(), &start_counters);
    summary.elapsed = started.elapsed();
    summary.invalid_samples = out.invalid_samples().to_vec();
    summary.transitions = out.tally().transitions();
    let counts = engine.segment_counts();
    for (g, group) in engine.scorer().groups().iter().enumerate() {
        for (l, segment) in group.segments.iter().enumerate() {
            let c = counts.get(&(g as u16, l as u16)).copied().unwrap_or_default();
            summary.segments.push((group.name.to_string(), segment.to_string(), c.customers, c.mrr_cents));
        }
    }
    summary.dead_letter = out.sink().dead_letter_path().map(Path::to_path_buf);
    Ok(summary)
}
