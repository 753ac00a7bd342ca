//! segstream: streaming SaaS customer segmentation.
//!
//! The binary's library: the configuration file ([`Config`]) and its
//! resolution with the command line into [`Settings`], file mode
//! ([`run_file`]), the HTTP endpoint, the sample generator and the demo.
//! The engine is `segstream-engine`, Kafka mode `segstream-kafka`; below
//! them the pure scoring (`segstream-scoring`), the RocksDB state
//! (`segstream-state`) and the record formats (`segstream-decode`,
//! `segstream-output`).

pub mod analyze;
pub mod config;
pub mod demo;
pub mod file;
pub mod generate;
pub mod http;
pub mod query;
pub mod settings;
pub mod testhooks;
pub mod webhook;

pub use config::Config;
pub use file::{run_file, InputOrder, InputProgress, InputReader, Position, Record, RunSummary};
pub use generate::{generate, Archetype, GenerateArgs, GenerateStats};
pub use settings::{FileSettings, Mode, RunFlags, Settings};
pub use testhooks::FileFaults;
