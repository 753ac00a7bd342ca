//! The analyses the segmentation guides teach, over segstream's own data.
//!
//! A [`Dataset`] gathers what a run produced (its transitions and the state
//! at its end) and the input events; [`build_report`] turns it into tables
//! (sizes and flows over time, cohort retention, segment validation,
//! firmographic breakdowns, k-means against the rules) and [`compare`] sets
//! two runs of the same history side by side (what a rule change would do).
//! Tables are flat rows: [`write_tables`] writes them as JSON or CSV, the
//! `html` module as one self-contained page with inline SVG charts. No I/O
//! beyond writing those files: the `segstream` binary reads inputs and runs
//! the engine.

mod compare;
mod error;
pub mod html;
mod kmeans;
mod model;
mod output;
mod report;

pub use compare::{compare, Comparison, DailyDiffRow, Example, GroupDiffRow, MovedRow, SizeDiffRow, EXAMPLES};
pub use error::AnalysisError;
pub use kmeans::{
    adjusted_rand_index, choose_k, discover, kmeans, sample_indices, silhouette, standardize, ClusterRow,
    ContingencyRow, Discovery, SilhouetteRow, K_RANGE,
};
pub use model::{
    date_of, day_label, month_label, month_of, month_start, Dataset, EventFact, FactBatch, FactKind, GroupNames, Move,
    Names, Snapshot,
};
pub use output::{write_tables, OutputFormat, Tables};
pub use report::{
    build_report, employee_band, median, week_start, BreakdownRow, CohortRow, CurrentRow, FeatureRow, FlowRow, Period,
    PredictiveRow, Report, ReportOptions, SizeRow, ValidationRow, WeeklyRow, FEATURES, HORIZONS_DAYS, STABLE_DAYS,
};
