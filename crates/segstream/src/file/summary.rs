//! What one `run` did, and its end-of-run report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use segstream_engine::Counters;

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
