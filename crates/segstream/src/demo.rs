//! `segstream demo`: generate a sample, run it through file mode, and show
//! what came out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use segstream_decode::{format_rfc3339_millis, parse_rfc3339_millis, Format};
use segstream_engine::{Engine, EngineSettings};
use segstream_output::{CauseRecord, TransitionRecord};
use segstream_scoring::{BoundaryKind, Scorer};

use crate::file::{run_file, RunSummary};
use crate::generate::{generate, GenerateArgs};
use crate::settings::FileSettings;

#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub dir: PathBuf,
    pub customers: u64,
    pub days: u32,
    pub seed: u64,
}

pub struct DemoReport {
    pub summary: RunSummary,
    pub text: String,
}

/// Runs the demo in `dir` (its previous demo files are replaced).
pub fn run_demo(settings: &EngineSettings, args: &DemoArgs) -> anyhow::Result<DemoReport> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let events = args.dir.join("events.jsonl");
    let output = args.dir.join("transitions.jsonl");
    let state = args.dir.join("state");
    // The demo's own files, and those its "Try:" command writes, so that the
    // command gives the same numbers after every demo.
    for dir in [state.clone(), args.dir.join("state2")] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    for file in ["again.jsonl", "again.jsonl.dead-letter.jsonl"] {
        let p = args.dir.join(file);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let start_ms = parse_rfc3339_millis("2026-01-01T00:00:00Z").map_err(|e| anyhow::anyhow!(e))?;
    let gen = GenerateArgs {
        customers: args.customers,
        days: args.days,
        start_ms,
        seed: args.seed,
        format: Format::Json,
        invalid_every: Some(25_000),
    };
    let stats = generate(&gen, &events)?;
    let mut run = FileSettings::new(&events, &output, &state);
    run.until = Some(stats.end_ms);
    // A fresh output: the demo's state dir was just removed.
    for p in [output.clone(), run.dead_letter.clone()] {
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    if stats.invalid > 0 {
        eprintln!(
            "segstream demo: the sample holds {} invalid records on purpose (one after every 25 000 events), \
             to show how they are dead-lettered: the warnings below are about them",
            stats.invalid
        );
    }
    let summary = run_file(settings, &run)?;

    let mut text = String::new();
    let _ = writeln!(
        text,
        "segstream demo: {} customers, {} days of events ({} events) from {} to {}\n",
        args.customers,
        args.days,
        stats.events,
        format_rfc3339_millis(start_ms),
        format_rfc3339_millis(stats.end_ms)
    );
    let engine = Engine::open(&state, settings)?;
    text.push_str(&segment_table(&engine)?);
    text.push_str("\nSome transitions and why they happened:\n");
    for r in pick_examples(&output)? {
        text.push_str(&describe(engine.scorer(), &r));
    }
    drop(engine);
    let _ = writeln!(
        text,
        "\nFiles: {} (input), {} (transitions), {} (state)",
        events.display(),
        output.display(),
        state.display()
    );
    let _ = writeln!(
        text,
        "Try: segstream run --input {} --output {} --state-dir {} --until {}",
        events.display(),
        args.dir.join("again.jsonl").display(),
        args.dir.join("state2").display(),
        format_rfc3339_millis(stats.end_ms)
    );
    let _ = writeln!(
        text,
        "Ask: segstream serve --state-dir {}   (then: curl localhost:8080/v1/segments)",
        state.display()
    );
    Ok(DemoReport { summary, text })
}

fn segment_table(engine: &Engine) -> anyhow::Result<String> {
    let sizes = engine.segment_sizes()?;
    let mut by_group: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
    for ((g, s), n) in &sizes {
        by_group.entry(g).or_default().push((s, *n));
    }
    let mut text = String::from("Segment sizes at the end of the sample:\n");
    for g in engine.scorer().groups() {
        let Some(segs) = by_group.get(g.name.as_ref()) else { continue };
        let total: u64 = segs.iter().map(|(_, n)| n).sum();
        let _ = writeln!(text, "  {}", g.name);
        // In the group's own order, so the table reads like the SPEC.
        for seg in &g.segments {
            if let Some((_, n)) = segs.iter().find(|(s, _)| *s == seg.as_ref()) {
                let pct = 100.0 * *n as f64 / total.max(1) as f64;
                let _ = writeln!(text, "    {seg:<22} {n:>7}  {pct:5.1}%");
            }
        }
    }
    Ok(text)
}

/// A varied handful: the first transition into each of a few telling segments,
/// preferring time-driven ones, plus a deletion.
fn pick_examples(output: &Path) -> anyhow::Result<Vec<TransitionRecord>> {
    let wanted = [
        ("rfm", Some("champions"), false),
        ("rfm", Some("at_risk"), true),
        ("rfm", Some("cant_lose"), true),
        ("rfm", Some("hibernating"), true),
        ("health", Some("red"), false),
        ("engagement", Some("non_active"), true),
        ("value", Some("high_touch"), false),
        ("rfm", None, false),
    ];
    let text = std::fs::read_to_string(output).with_context(|| format!("reading {}", output.display()))?;
    let mut found: Vec<Option<TransitionRecord>> = vec![None; wanted.len()];
    for line in text.lines() {
        let r: TransitionRecord = serde_json::from_str(line).with_context(|| format!("parsing {line}"))?;
        let is_time = matches!(r.cause, CauseRecord::Time { .. });
        for (i, (g, to, time)) in wanted.iter().enumerate() {
            if found[i].is_none() && r.group == *g && r.to.as_deref() == *to && (is_time || !time) && r.from.is_some() {
                found[i] = Some(r.clone());
            }
        }
    }
    Ok(found.into_iter().flatten().collect())
}

fn describe(scorer: &Scorer, r: &TransitionRecord) -> String {
    let from = r.from.as_deref().unwrap_or("(new)");
    let to = r.to.as_deref().unwrap_or("(deleted)");
    let why = match &r.cause {
        CauseRecord::Event { event_id } => format!("event {event_id}"),
        CauseRecord::Time { boundary } => match BoundaryKind::from_name(boundary) {
            Some(kind) => format!("time passed: {}", scorer.explain(kind)),
            None => format!("time passed: {boundary}"),
        },
        CauseRecord::Rules { from_version, to_version } => {
            format!("the rules changed from version {from_version} to {to_version}")
        }
        CauseRecord::Requantile => "the population's quintile edges were recomputed (00:00 UTC)".to_string(),
    };
    let s = &r.scores;
    format!(
        "  {} {}: {} -> {} at {}\n      because {}\n      R={} F={} M={} adoption={} health={} (active days {}, support {}, billing {}, sentiment {})\n",
        r.customer_id, r.group, from, to, r.at, why, s.r, s.f, s.m, s.adoption, s.health, s.active_days, s.support, s.billing, s.sentiment
    )
}
