//! File mode: an event file through the engine to a transition file (and a
//! dead-letter file), resumable exactly after any crash.

mod input;
mod metrics;
mod parallel;
mod progress;
mod run;
mod sort;
mod summary;

pub use input::{InputReader, Position, Record};
pub use metrics::FileMetrics;
pub use parallel::{for_each_json_chunk, for_each_json_record};
pub use progress::{InputProgress, OutputRecord};
pub use run::run_file;
pub use summary::{InputOrder, RunSummary};
