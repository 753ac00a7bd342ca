//! What one `run` did, and its end-of-run report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use segstream_decode::format_rfc3339_millis;
use segstream_engine::Counters;

/// 2000-01-01T00:00:00Z: event times all before it are likely epoch seconds.
const YEAR_2000: i64 = 946_684_800_000;

/// What a run did about the order of a new part of its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputOrder {
    /// Already in time order: read directly.
    InTime,
    /// Sorted by `ts` first (SPEC: any order gives the sorted order's transitions).
    Sorted {
        /// Where the first event earlier than one before it was.
        first_disorder: String,
        events: u64,
        /// Runs written to disk (0: sorted in memory).
        runs: usize,
    },
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
    /// Every segment now, in configuration order: (group, segment,
    /// customers, MRR in cents).
    pub segments: Vec<(String, String, i64, i64)>,
    pub elapsed: Duration,
    /// Record number this run resumed after (`None`: it started a segment).
    pub resumed_from: Option<u64>,
    /// What was done about the input's order, when a new part of it was read.
    pub order: Option<InputOrder>,
    /// The input had been read to its end before, and has not grown.
    pub nothing_new: bool,
    pub stopped_early: bool,
    /// The earliest and latest `ts` of the events this run processed.
    pub event_times: Option<(i64, i64)>,
    /// `--until` was before the time the state had reached: (until, watermark).
    pub until_passed: Option<(i64, i64)>,
    pub dead_letter: Option<PathBuf>,
    /// A rule migration this run completed.
    pub migration: Option<segstream_engine::MigrationProgress>,
}

impl RunSummary {
    /// The end-of-run report printed on stderr.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let c = &self.counts;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        if self.nothing_new {
            let _ = writeln!(s, "nothing new: this input was read to its end before (a file that grows is continued)");
        }
        if let Some(n) = self.resumed_from.filter(|n| *n > 0) {
            let _ = writeln!(s, "resumed after record {n}");
        }
        match &self.order {
            Some(InputOrder::InTime) => {
                let _ = writeln!(s, "input in time order: read in one pass");
            }
            Some(InputOrder::Sorted { first_disorder, events, runs }) => {
                let how = if *runs == 0 { "in memory".to_string() } else { format!("in {runs} runs on disk") };
                let _ = writeln!(
                    s,
                    "input not in time order (first at {first_disorder}): its {events} events were sorted by ts \
                     ({how}) and processed in that order"
                );
            }
            None => {}
        }
        if let Some(m) = &self.migration {
            let _ = writeln!(
                s,
                "rules migrated from version {} to {}: {} customers re-evaluated, {} transitions (cause `rules`){}",
                m.from.version,
                m.to.version,
                m.customers,
                m.transitions,
                if m.history_dropped > 0 {
                    format!(", {} kept history entries of removed groups or segments deleted", m.history_dropped)
                } else {
                    String::new()
                }
            );
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
        if let Some((lo, hi)) = self.event_times {
            let _ = writeln!(s, "event times {} to {}", format_rfc3339_millis(lo), format_rfc3339_millis(hi));
            if hi < YEAR_2000 {
                let _ = writeln!(
                    s,
                    "  note: every event is before 2000: if these are epoch seconds, ts must be epoch milliseconds \
                     (or RFC 3339); time.earliest_event refuses such events"
                );
            }
        }
        if let Some((until, watermark)) = self.until_passed {
            let _ = writeln!(
                s,
                "note: --until {} is before the time the state had reached ({}): it advanced nothing",
                format_rfc3339_millis(until),
                format_rfc3339_millis(watermark)
            );
        }
        let _ = writeln!(s, "customers {}", self.totals.customers);
        if !self.segments.is_empty() {
            let _ = writeln!(s, "segments now (customers, MRR):");
        }
        let mut group = "";
        for (g, seg, n, mrr) in &self.segments {
            if g != group {
                let _ = write!(s, "{}  {g}:", if group.is_empty() { "" } else { "\n" });
                group = g;
            }
            if *n > 0 {
                let _ = write!(s, " {seg}={n} (${:.0})", *mrr as f64 / 100.0);
            }
        }
        if !group.is_empty() {
            s.push('\n');
        }
        let _ = writeln!(s, "transitions {} (by the segment entered):", c.transitions);
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
