use std::path::PathBuf;

use segstream_decode::{Classify, ErrorClass};

/// Why output could not be written. All of these are fatal for a file run:
/// the engine stops before committing, so nothing is lost or repeated.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is {actual} bytes but {committed} bytes were committed: the file was changed outside segstream")]
    Shortened { path: PathBuf, committed: u64, actual: u64 },
    #[error("avro: {0}")]
    Avro(String),
}

impl Classify for OutputError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Fatal
    }
}
