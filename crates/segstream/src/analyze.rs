//! `segstream report` and `segstream simulate`: the engine's own runs,
//! gathered into a [`Dataset`] and handed to `segstream-analysis`.
//!
//! A report reads the input events once (cohorts, outcomes) and takes the
//! transitions and the end state either from a run it makes itself (file
//! mode on a temporary state dir: the numbers are the stream's) or from an
//! existing state dir and its transitions file. `simulate` makes two such
//! runs, one per configuration, side by side on two threads.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use segstream_analysis::{
    build_report, compare, write_tables, Dataset, FactBatch, Names, OutputFormat, ReportOptions, Snapshot,
};
use segstream_decode::{event_to_json, format_rfc3339_millis, Event, Format, DAY_MS};
use segstream_engine::{Clock, EngineSettings};
use segstream_output::TransitionRecord;
use segstream_state::StateStore;

use crate::file::{for_each_json_chunk, for_each_json_record, InputReader, Position, Record};
use crate::settings::FileSettings;
use crate::{run_file, Config};

/// `segstream report`'s arguments.
#[derive(Debug, Clone)]
pub struct ReportArgs {
    pub input: PathBuf,
    pub input_format: Option<Format>,
    pub config: Option<PathBuf>,
    /// With `transitions`: report on this state dir instead of running the engine.
    pub state_dir: Option<PathBuf>,
    pub transitions: Option<PathBuf>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub output: PathBuf,
    pub format: OutputFormat,
    pub seed: u64,
    /// Further breakdowns: `attr.NAME` or `survey.QUESTION`.
    pub breakdown: Vec<String>,
}

/// `segstream simulate`'s arguments.
#[derive(Debug, Clone)]
pub struct SimulateArgs {
    pub input: PathBuf,
    pub input_format: Option<Format>,
    /// The candidate configuration.
    pub config: PathBuf,
    /// The configuration in force (SPEC defaults when absent).
    pub baseline: Option<PathBuf>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub output: PathBuf,
    pub format: OutputFormat,
}

fn load_settings(config: Option<&Path>) -> anyhow::Result<EngineSettings> {
    let config = match config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    Ok(config.engine_settings()?)
}

fn names(settings: &EngineSettings) -> Names {
    Names::new(
        settings
            .scorer()
            .groups()
            .iter()
            .map(|g| (g.name.to_string(), g.segments.iter().map(|s| s.to_string()).collect())),
    )
}

/// What reading the input found.
#[derive(Debug, Default)]
struct InputRead {
    invalid: u64,
    first_ts: Option<i64>,
    last_ts: Option<i64>,
    /// Events after `--to`, left out.
    after_to: u64,
}

/// One chunk of the input, as its decoding thread reduced it.
#[derive(Default)]
struct ChunkRead {
    facts: FactBatch,
    invalid: u64,
    after_to: u64,
    first_ts: Option<i64>,
    last_ts: Option<i64>,
}

/// Reads the input's events into `ds` (those up to `to`); with `copy`, also
/// writes them there as JSON lines (the input a run up to `to` reads).
fn read_events(
    path: &Path,
    format: Format,
    settings: &EngineSettings,
    to: Option<i64>,
    mut ds: Option<&mut Dataset>,
    mut copy: Option<&mut BufWriter<File>>,
) -> anyhow::Result<InputRead> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    // Implausible times are judged as a fresh `segstream run` judges them:
    // against the wall clock when the input is first read.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut read = InputRead::default();
    let copying = copy.is_some();
    let mut take = |record: Option<Event>| -> anyhow::Result<()> {
        match record {
            None => read.invalid += 1,
            Some(e) if to.is_some_and(|to| e.ts > to) => read.after_to += 1,
            Some(e) => {
                read.first_ts = Some(read.first_ts.map_or(e.ts, |t| t.min(e.ts)));
                read.last_ts = Some(read.last_ts.map_or(e.ts, |t| t.max(e.ts)));
                if let Some(w) = copy.as_deref_mut() {
                    w.write_all(event_to_json(&e).as_bytes())?;
                    w.write_all(b"\n")?;
                }
                if let Some(ds) = ds.as_deref_mut() {
                    ds.add_event(&e);
                }
            }
        }
        Ok(())
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    match (format, !copying) {
        // Reduced to facts on the decoding threads; this one only adds them up.
        (Format::Json, true) => {
            let per_chunk = |records: Vec<Option<Event>>| {
                let mut chunk = ChunkRead::default();
                for r in records {
                    match r {
                        None => chunk.invalid += 1,
                        Some(e) if to.is_some_and(|to| e.ts > to) => chunk.after_to += 1,
                        Some(e) => {
                            chunk.first_ts = Some(chunk.first_ts.map_or(e.ts, |t| t.min(e.ts)));
                            chunk.last_ts = Some(chunk.last_ts.map_or(e.ts, |t| t.max(e.ts)));
                            chunk.facts.push(&e);
                        }
                    }
                }
                chunk
            };
            for_each_json_chunk(path, *settings.window(), Some(now), workers, per_chunk, |chunk| {
                read.invalid += chunk.invalid;
                read.after_to += chunk.after_to;
                read.first_ts = match (read.first_ts, chunk.first_ts) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                read.last_ts = match (read.last_ts, chunk.last_ts) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                if let Some(ds) = ds.as_deref_mut() {
                    ds.add_batch(&chunk.facts);
                }
                Ok(())
            })
            .with_context(|| format!("reading {}", path.display()))?;
        }
        (Format::Json, false) => for_each_json_record(path, *settings.window(), Some(now), workers, take)
            .with_context(|| format!("reading {}", path.display()))?,
        _ => {
            let mut reader = InputReader::open(path, format, Position::default(), len)
                .with_context(|| format!("opening {}", path.display()))?
                .with_window(*settings.window(), Some(now));
            while let Some(r) = reader.next_record() {
                match r.with_context(|| format!("reading {}", path.display()))? {
                    Record::Invalid(_) => take(None)?,
                    Record::Event(e) => take(Some(e))?,
                }
            }
        }
    }
    Ok(read)
}

/// Adds a transitions file (JSON lines, or Avro when named `.avro`) to `ds`.
/// With `keep`, also returns the records of those customers (JSON values).
fn read_transitions(
    path: &Path,
    mut ds: Option<&mut Dataset>,
    keep: &[String],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut kept = Vec::new();
    let mut add = |rec: TransitionRecord, ds: &mut Option<&mut Dataset>, line: u64| -> anyhow::Result<()> {
        if let Some(ds) = ds.as_deref_mut() {
            let at = segstream_decode::parse_rfc3339_millis(&rec.at)
                .map_err(|e| anyhow::anyhow!("{}:{line}: bad `at` {:?}: {e}", path.display(), rec.at))?;
            ds.add_transition(&rec.customer_id, &rec.group, rec.from.as_deref(), rec.to.as_deref(), at).with_context(
                || {
                    format!(
                        "{}:{line} (a file that spans a rule migration, cause `rules`, that removed or renamed \
                         groups or segments cannot be reported under one configuration: report on the transitions \
                         written since the migration)",
                        path.display()
                    )
                },
            )?;
        }
        if keep.contains(&rec.customer_id) {
            kept.push(serde_json::to_value(&rec)?);
        }
        Ok(())
    };
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if Format::from_path(path) == Format::Avro {
        let reader = apache_avro::Reader::new(BufReader::new(file))
            .with_context(|| format!("{} is not an Avro container file", path.display()))?;
        for (i, v) in reader.enumerate() {
            let v = v.with_context(|| format!("{}#record {}", path.display(), i + 1))?;
            let rec = segstream_output::transition_from_avro_value(&v)
                .map_err(|e| anyhow::anyhow!("{}#record {}: {e}", path.display(), i + 1))?;
            add(rec, &mut ds, i as u64 + 1)?;
        }
    } else {
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let rec: TransitionRecord = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a transition record", path.display(), i + 1))?;
            add(rec, &mut ds, i as u64 + 1)?;
        }
    }
    Ok(kept)
}

/// A customer's profile attributes (`attr.NAME`) and survey answers
/// (`survey.QUESTION`) as lists of strings.
fn named_values(st: &segstream_scoring::CustomerState) -> Vec<(String, Vec<String>)> {
    use segstream_decode::{Answer, AttrValue};
    let Some(extra) = st.extra.as_deref() else { return Vec::new() };
    let num = |x: f64| if x.fract() == 0.0 && x.abs() < 1e15 { format!("{}", x as i64) } else { x.to_string() };
    let mut out = Vec::with_capacity(extra.attributes.len() + extra.answers.len());
    for (name, v) in &extra.attributes {
        let values = match v {
            AttrValue::Str(s) => vec![s.clone()],
            AttrValue::Num(x) => vec![num(*x)],
            AttrValue::Bool(b) => vec![b.to_string()],
            // An empty list is an answer (none), not missing data.
            AttrValue::List(l) if l.is_empty() => vec!["(none)".to_string()],
            AttrValue::List(l) => l.clone(),
        };
        out.push((format!("attr.{name}"), values));
    }
    for (question, answer, _) in &extra.answers {
        let value = match answer {
            Answer::Str(s) => s.clone(),
            Answer::Num(x) => num(*x),
        };
        out.push((format!("survey.{question}"), vec![value]));
    }
    out
}

/// Adds every customer of a state dir, scored at its time, to `ds`;
/// returns the report's end: the latest event time the state has applied
/// (or its watermark, when a run's `--until` moved it further). With an
/// allowed lateness the watermark trails the latest event; the state (and
/// the transitions) already hold the events after it, so the end is there.
fn read_state(dir: &Path, settings: &EngineSettings, ds: &mut Dataset) -> anyhow::Result<i64> {
    if !dir.join("CURRENT").exists() {
        bail!("{} is not a state dir (no RocksDB database there)", dir.display());
    }
    let secondary = tempfile::Builder::new().prefix("segstream-report-").tempdir()?;
    let store = StateStore::open_reader(dir, secondary.path())?;
    match store.meta("config_fingerprint")? {
        Some(v) if String::from_utf8_lossy(&v) == settings.fingerprint().to_string() => {}
        Some(_) => bail!(
            "{} was built with another scoring or segments configuration ({}): pass the --config it was run with",
            dir.display(),
            segstream_engine::rules_mismatch(store.meta("rules")?.as_deref(), &settings.rules_json())
        ),
        None => bail!("{} has no configuration fingerprint: not a segstream state dir", dir.display()),
    }
    let clock: Clock = match store.meta("clock")? {
        Some(v) => serde_json::from_slice(&v).context("reading the state's clock")?,
        None => Clock::default(),
    };
    let scorer = settings.scorer();
    let mut rows = Vec::new();
    store.for_each_customer(|id, st| {
        let s = scorer.scores(st, clock.max_ts.unwrap_or(clock.watermark).max(clock.watermark).max(st.evaluated_at));
        rows.push((
            id.to_string(),
            Snapshot {
                customer: 0,
                labels: st.labels.clone(),
                r: s.r,
                f: s.f,
                m: s.m,
                adoption: s.adoption,
                health: s.health,
                mrr_cents: st.mrr_cents,
                industry: st.profile.industry.clone(),
                employees: st.profile.employees,
                country: st.profile.country.clone(),
                named: named_values(st),
            },
        ));
    })?;
    for (id, row) in rows {
        ds.add_snapshot(&id, row);
    }
    Ok(clock.max_ts.map_or(clock.watermark, |t| t.max(clock.watermark)))
}

/// A file-mode run of `input` on a fresh state dir under `dir`, up to `until`.
fn replay(
    settings: &EngineSettings,
    input: &Path,
    format: Format,
    until: Option<i64>,
    dir: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (output, state) = (dir.join("transitions.jsonl"), dir.join("state"));
    let mut args = FileSettings::new(input, &output, &state);
    args.input_format = format;
    args.until = until;
    run_file(settings, &args)?;
    Ok((output, state))
}

/// The input of the engine's run for a report or a simulation: the file
/// itself, or with `to`, a copy (JSON lines) holding only the events up to it.
fn run_input(
    input: &Path,
    format: Format,
    settings: &EngineSettings,
    to: Option<i64>,
    work: &Path,
) -> anyhow::Result<(PathBuf, Format)> {
    let Some(to) = to else { return Ok((input.to_path_buf(), format)) };
    let copy = work.join("input-to.jsonl");
    let mut w = BufWriter::new(File::create(&copy)?);
    read_events(input, format, settings, Some(to), None, Some(&mut w))?;
    w.flush()?;
    Ok((copy, Format::Json))
}

/// Fails early (before any run) when the output's folder does not exist.
fn writable(output: &Path) -> anyhow::Result<()> {
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    anyhow::ensure!(parent.is_dir(), "cannot write {}: {} is not a directory", output.display(), parent.display());
    Ok(())
}

/// `--from`, else midnight of the first event's day; `None` without events.
fn period_start(from: Option<i64>, read: &InputRead, ds: &Dataset) -> Option<i64> {
    from.or(read.first_ts.map(|t| t.div_euclid(DAY_MS) * DAY_MS))
        .or(ds.moves().first().map(|m| m.at.div_euclid(DAY_MS) * DAY_MS))
}

/// The events' instants up to `to` as a period, or why there is none.
fn period(from: Option<i64>, to: i64, read: &InputRead, ds: &Dataset, input: &Path) -> anyhow::Result<(i64, i64)> {
    let Some(start) =
        period_start(from, read, ds).filter(|_| to != i64::MIN && (read.first_ts.is_some() || !ds.moves().is_empty()))
    else {
        bail!(
            "no events in {}{}: nothing to report",
            input.display(),
            if read.after_to > 0 { format!(" up to --to ({} are after it)", read.after_to) } else { String::new() }
        );
    };
    if start > to {
        bail!("--from {} is after the end of the data ({})", format_rfc3339_millis(start), format_rfc3339_millis(to));
    }
    Ok((start, to))
}

/// `segstream report`: the files written.
pub fn report(args: &ReportArgs) -> anyhow::Result<Vec<PathBuf>> {
    let started = Instant::now();
    for b in &args.breakdown {
        let ok = b.strip_prefix("attr.").or_else(|| b.strip_prefix("survey.")).is_some_and(|n| !n.is_empty());
        anyhow::ensure!(
            ok,
            "--breakdown {b:?}: name a profile attribute (attr.NAME) or a survey question (survey.QUESTION)"
        );
    }
    let settings = load_settings(args.config.as_deref())?;
    writable(&args.output)?;
    let format = args.input_format.unwrap_or_else(|| Format::from_path(&args.input));
    let mut ds = Dataset::new(names(&settings));
    let work = tempfile::Builder::new().prefix("segstream-report-").tempdir()?;
    let mut check: Option<Dataset> = None;
    let (read, to, source) = match (&args.state_dir, &args.transitions) {
        (Some(state), Some(transitions)) => {
            // The cheap checks first: the state's rules, then the transitions' names.
            let to = read_state(state, &settings, &mut ds)?;
            read_transitions(transitions, Some(&mut ds), &[])?;
            let read = read_events(&args.input, format, &settings, None, Some(&mut ds), None)?;
            let source = format!("state dir {} and transitions {}", state.display(), transitions.display());
            (read, to, source)
        }
        (None, given) => {
            if let Some(file) = given {
                File::open(file).with_context(|| format!("opening {}", file.display()))?;
            }
            // The engine's run and the reading of the events, side by side.
            let input = run_input(&args.input, format, &settings, args.to, work.path())?;
            let (run, read) = std::thread::scope(|s| {
                let run = s.spawn(|| replay(&settings, &input.0, input.1, args.to, work.path()));
                let read = read_events(&args.input, format, &settings, args.to, Some(&mut ds), None);
                (run.join(), read)
            });
            let (transitions, state) = run.map_err(|_| anyhow::anyhow!("the engine's run panicked"))??;
            let read = read?;
            let source = match given {
                // A file from elsewhere (e.g. Kafka mode's output topic): its
                // transitions are reported, checked against the engine's run.
                Some(file) => {
                    read_transitions(file, Some(&mut ds), &[])?;
                    let mut replayed = Dataset::new(names(&settings));
                    read_transitions(&transitions, Some(&mut replayed), &[])?;
                    check = Some(replayed);
                    format!(
                        "transitions {}, the end state from the engine's run of {}",
                        file.display(),
                        args.input.display()
                    )
                }
                None => {
                    read_transitions(&transitions, Some(&mut ds), &[])?;
                    format!("the engine's run of {}", args.input.display())
                }
            };
            let to = read_state(&state, &settings, &mut ds)?;
            (read, args.to.unwrap_or(to).max(to), source)
        }
        (Some(_), None) => bail!("--state-dir needs the --transitions file its run wrote"),
    };
    ds.finish();
    let (from, to) = period(args.from, to, &read, &ds, &args.input)?;
    let mut opts = ReportOptions::new(from, to);
    opts.seed = args.seed;
    opts.source = source;
    opts.breakdown_by = args.breakdown.clone();
    opts.invalid_records = read.invalid;
    if let Some(last) = read.last_ts.filter(|last| to > last + DAY_MS) {
        tracing::warn!(
            days_past_the_last_event = (to - last) / DAY_MS,
            "--to is past the last event: time alone moves customers until then (they go quiet)"
        );
    }
    let gathered = started.elapsed();
    let mut report = build_report(&ds, &opts);
    for name in &args.breakdown {
        let held = report.breakdowns.iter().any(|b| &b.dimension == name && b.value != "unknown");
        if !held {
            tracing::warn!(breakdown = %name, "no customer has this attribute or answer (a typo?): every one is `unknown`");
        }
    }
    if report.period.end_size_differences > 0 {
        tracing::warn!(
            differences = report.period.end_size_differences,
            "the transitions and the state disagree on segment sizes at the end: the transitions file is \
             incomplete or from another run"
        );
    }
    if let Some(mut replayed) = check {
        replayed.finish();
        let diff = compare(&replayed, &ds, from, to);
        let (added, removed): (u64, u64) = diff.groups.iter().fold((0, 0), |(a, r), g| (a + g.added, r + g.removed));
        if added + removed > 0 {
            tracing::warn!(
                only_in_file = added,
                only_in_engine_run = removed,
                "the transitions file differs from the engine's run of the input: it is incomplete, or was made \
                 with other rules or other input; the report uses the file"
            );
        }
        report.period.unmatched_transitions = Some(added + removed);
    }
    let written = write_tables(&report, args.format, &args.output)?;
    tracing::info!(
        customers = report.period.customers,
        events = ds.events,
        invalid_events = read.invalid,
        events_after_to = read.after_to,
        transitions_read = ds.moves().len(),
        gathered_s = gathered.as_secs_f64(),
        total_s = started.elapsed().as_secs_f64(),
        "report written"
    );
    Ok(written)
}

/// `segstream simulate`: the files written.
pub fn simulate(args: &SimulateArgs) -> anyhow::Result<Vec<PathBuf>> {
    let started = Instant::now();
    let baseline = load_settings(args.baseline.as_deref()).with_context(|| {
        format!("the baseline {}", args.baseline.as_ref().map_or("(SPEC defaults)".into(), |p| p.display().to_string()))
    })?;
    let candidate =
        load_settings(Some(&args.config)).with_context(|| format!("the candidate {}", args.config.display()))?;
    writable(&args.output)?;
    let format = args.input_format.unwrap_or_else(|| Format::from_path(&args.input));
    let work = tempfile::Builder::new().prefix("segstream-simulate-").tempdir()?;
    let (input, format) = run_input(&args.input, format, &baseline, args.to, work.path())?;
    let (dir_b, dir_c) = (work.path().join("baseline"), work.path().join("candidate"));
    let (run_b, run_c) = std::thread::scope(|s| {
        let b = s.spawn(|| replay(&baseline, &input, format, args.to, &dir_b));
        let c = s.spawn(|| replay(&candidate, &input, format, args.to, &dir_c));
        (b.join(), c.join())
    });
    let joined = |r: std::thread::Result<anyhow::Result<(PathBuf, PathBuf)>>, what: &str| {
        r.map_err(|_| anyhow::anyhow!("the {what} run panicked"))?.with_context(|| format!("the {what} run"))
    };
    let ((tb, sb), (tc, sc)) = (joined(run_b, "baseline")?, joined(run_c, "candidate")?);
    let (mut db, mut dc) = (Dataset::new(names(&baseline)), Dataset::new(names(&candidate)));
    read_transitions(&tb, Some(&mut db), &[])?;
    read_transitions(&tc, Some(&mut dc), &[])?;
    let to_b = read_state(&sb, &baseline, &mut db)?;
    let to_c = read_state(&sc, &candidate, &mut dc)?;
    db.finish();
    dc.finish();
    let (from, to) = period(args.from, to_b.max(to_c), &InputRead::default(), &db, &args.input)?;
    let mut cmp = compare(&db, &dc, from, to);
    // The examples' explanations: their transitions under each configuration.
    let ids: Vec<String> = cmp.examples.iter().map(|e| e.customer_id.clone()).collect();
    let kept_b = read_transitions(&tb, None, &ids)?;
    let kept_c = read_transitions(&tc, None, &ids)?;
    for e in &mut cmp.examples {
        let of = |kept: &[serde_json::Value]| -> Vec<serde_json::Value> {
            let mine: Vec<serde_json::Value> = kept
                .iter()
                .filter(|v| v["customer_id"] == e.customer_id.as_str() && v["group"] == e.group.as_str())
                .cloned()
                .collect();
            mine[mine.len().saturating_sub(5)..].to_vec()
        };
        e.baseline_transitions = of(&kept_b);
        e.candidate_transitions = of(&kept_c);
    }
    let written = write_tables(&cmp, args.format, &args.output)?;
    tracing::info!(
        customers_moved = cmp.period.customers_moved,
        total_s = started.elapsed().as_secs_f64(),
        "comparison written"
    );
    Ok(written)
}
