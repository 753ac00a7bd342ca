//! File mode: an event file through the engine to a transition file (and a
//! dead-letter file), resumable exactly after any crash.

mod input;
mod run;
mod summary;

pub use input::{InputProgress, InputReader, Record};
pub use run::run_file;
pub use summary::RunSummary;
