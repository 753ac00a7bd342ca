use std::path::PathBuf;

/// What can go wrong gathering or writing an analysis. Every kind is fatal
/// for the command that asked for it: a report is written whole or not at all.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("transition of group {0:?}, which the configuration does not have: pass the --config the run used")]
    UnknownGroup(String),
    #[error("transition to segment {segment:?} of group {group:?}, which the configuration does not have: pass the --config the run used")]
    UnknownSegment { group: String, segment: String },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("writing {path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
}
