//! The tables as files: one JSON document, or one CSV file per table in a
//! directory; the HTML page is the `html` module's.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::compare::Comparison;
use crate::report::Report;
use crate::AnalysisError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Html,
    Json,
    Csv,
}

impl std::str::FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "html" => Ok(Self::Html),
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            other => Err(format!("unknown format {other:?} (html, json or csv)")),
        }
    }
}

/// Something whose tables can be written: a report or a comparison.
pub trait Tables: Serialize {
    /// (file stem, CSV bytes with a header row) of each table.
    fn csv_tables(&self) -> Result<Vec<(&'static str, Vec<u8>)>, csv::Error>;
    fn html(&self) -> String;
}

fn csv_of<T: Serialize>(rows: &[T]) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

impl Tables for Report {
    fn csv_tables(&self) -> Result<Vec<(&'static str, Vec<u8>)>, csv::Error> {
        let mut t = vec![
            ("period", csv_of(std::slice::from_ref(&self.period))?),
            ("sizes_over_time", csv_of(&self.sizes_over_time)?),
            ("current_sizes", csv_of(&self.current)?),
            ("flows", csv_of(&self.flows)?),
            ("weekly_flows", csv_of(&self.weekly)?),
            ("cohort_retention", csv_of(&self.cohorts)?),
            ("validation", csv_of(&self.validation)?),
            ("predictive", csv_of(&self.predictive)?),
            ("features", csv_of(&self.features)?),
            ("breakdowns", csv_of(&self.breakdowns)?),
        ];
        if let Some(d) = &self.discovery {
            t.push(("discovery_silhouette", csv_of(&d.silhouette)?));
            t.push(("discovery_clusters", csv_of(&d.clusters)?));
            t.push(("discovery_contingency", csv_of(&d.contingency)?));
        }
        Ok(t)
    }
    fn html(&self) -> String {
        crate::html::render_report(self)
    }
}

/// An example as one CSV row (its transitions are in the JSON and HTML).
#[derive(Serialize)]
struct ExampleRow<'a> {
    customer_id: &'a str,
    group: &'a str,
    baseline: Option<&'a str>,
    candidate: Option<&'a str>,
}

impl Tables for Comparison {
    fn csv_tables(&self) -> Result<Vec<(&'static str, Vec<u8>)>, csv::Error> {
        let examples: Vec<ExampleRow<'_>> = self
            .examples
            .iter()
            .map(|e| ExampleRow {
                customer_id: &e.customer_id,
                group: &e.group,
                baseline: e.baseline.as_deref(),
                candidate: e.candidate.as_deref(),
            })
            .collect();
        Ok(vec![
            ("period", csv_of(std::slice::from_ref(&self.period))?),
            ("groups", csv_of(&self.groups)?),
            ("sizes", csv_of(&self.sizes)?),
            ("moved", csv_of(&self.moved)?),
            ("daily_transitions", csv_of(&self.daily)?),
            ("examples", csv_of(&examples)?),
        ])
    }
    fn html(&self) -> String {
        crate::html::render_comparison(self)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AnalysisError + '_ {
    move |source| AnalysisError::Write { path: path.to_path_buf(), source }
}

/// Writes `what` to `path`: an HTML file, a JSON file, or a directory of CSV
/// files (created). Files are written beside and renamed, so a reader never
/// sees half a report. Returns the files written.
pub fn write_tables(what: &impl Tables, format: OutputFormat, path: &Path) -> Result<Vec<PathBuf>, AnalysisError> {
    match format {
        OutputFormat::Html => {
            write_atomically(path, what.html().as_bytes())?;
            Ok(vec![path.to_path_buf()])
        }
        OutputFormat::Json => {
            let mut bytes = serde_json::to_vec_pretty(what).expect("reports serialize");
            bytes.push(b'\n');
            write_atomically(path, &bytes)?;
            Ok(vec![path.to_path_buf()])
        }
        OutputFormat::Csv => {
            std::fs::create_dir_all(path).map_err(io(path))?;
            let tables = what.csv_tables().map_err(|source| AnalysisError::Csv { path: path.to_path_buf(), source })?;
            let mut written = Vec::new();
            for (name, bytes) in tables {
                let file = path.join(format!("{name}.csv"));
                write_atomically(&file, &bytes)?;
                written.push(file);
            }
            Ok(written)
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AnalysisError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
