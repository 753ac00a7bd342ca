//! segstream: streaming SaaS customer segmentation.
//!
//! The binary's library: configuration, the [`Engine`] that runs events and
//! event time through per-customer state into transitions, file mode with
//! exact resume ([`run_file`]), the sample generator and the demo. The pure
//! scoring lives in `segstream-scoring`, the RocksDB state in
//! `segstream-state`, the record formats in `segstream-decode` and
//! `segstream-output`.

pub mod config;
pub mod demo;
pub mod engine;
pub mod generate;
pub mod input;
pub mod kafka;
pub mod run;

pub use config::Config;
pub use engine::{Clock, Counters, Engine, EngineError};
pub use generate::{generate, Archetype, GenerateArgs, GenerateStats};
pub use input::{InputFormat, InputProgress, InputReader, Record};
pub use run::{run_file, RunArgs, RunSummary};
