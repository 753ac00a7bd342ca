//! The configuration file, the command line and the environment, resolved
//! once at start into typed settings for the engine and one mode. Nothing
//! after this reads the environment or derives a setting again.

use std::path::{Path, PathBuf};

use anyhow::Context;
use segstream_decode::Format;
use segstream_engine::EngineSettings;
use segstream_kafka::{KafkaEnvironment, KafkaOverrides, KafkaSettings};

use crate::config::Config;
use crate::testhooks::FileFaults;

/// `segstream run`'s flags (besides `--config`).
#[derive(Debug, Clone, Default)]
pub struct RunFlags {
    pub input: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub until: Option<i64>,
    pub input_format: Option<Format>,
    pub output_format: Option<Format>,
    pub dead_letter: Option<PathBuf>,
    pub overwrite: bool,
    /// `--migrate-rules`: move a state built under other rules to these.
    pub migrate_rules: bool,
    pub kafka: KafkaOverrides,
}

/// File mode: one input file to a transition file.
#[derive(Debug, Clone)]
pub struct FileSettings {
    pub input: PathBuf,
    pub input_format: Format,
    pub output: PathBuf,
    pub output_format: Format,
    pub dead_letter: PathBuf,
    pub state_dir: PathBuf,
    /// Advance time to this instant (epoch ms) after the input ends.
    pub until: Option<i64>,
    /// A progress line on stderr every few seconds.
    pub progress: bool,
    /// Replace output files this state dir did not write (else refused).
    pub overwrite: bool,
    /// Memory for sorting an input that is not in time order (bytes).
    pub sort_buffer: usize,
    pub faults: FileFaults,
    /// `--metrics-addr`: figures for `/metrics` while the run lasts.
    pub metrics: Option<std::sync::Arc<crate::file::FileMetrics>>,
}

impl FileSettings {
    /// Formats from the file names, the dead letters beside the output.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        let (input, output) = (input.into(), output.into());
        Self {
            input_format: Format::from_path(&input),
            output_format: Format::from_path(&output),
            dead_letter: default_dead_letter(&output),
            input,
            output,
            state_dir: state_dir.into(),
            until: None,
            progress: false,
            overwrite: false,
            sort_buffer: crate::config::DEFAULT_SORT_BUFFER_MIB << 20,
            faults: FileFaults::default(),
            metrics: None,
        }
    }
}

/// `<output>.dead-letter.jsonl`.
pub fn default_dead_letter(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".dead-letter.jsonl");
    PathBuf::from(s)
}

#[derive(Debug, Clone)]
pub enum Mode {
    File(FileSettings),
    Kafka(Box<KafkaSettings>),
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub engine: EngineSettings,
    pub mode: Mode,
}

impl Settings {
    /// File mode with `--input`, else Kafka mode from the `[kafka]` section.
    pub fn resolve(config: &Config, flags: RunFlags, env: &KafkaEnvironment) -> anyhow::Result<Self> {
        let mut engine = config.engine_settings()?;
        let policy = engine.rules_policy();
        engine = engine.with_rules_policy(segstream_engine::RulesPolicy { migrate: flags.migrate_rules, ..policy });
        let Some(input) = flags.input else {
            let kafka = config.kafka.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "nothing to run: give --input/--output/--state-dir (file mode) or a --config with a [kafka] section"
                )
            })?;
            if flags.migrate_rules && config.rules_version.is_none() {
                anyhow::bail!(
                    "--migrate-rules in Kafka mode needs rules_version in the configuration: every instance and \
                     every partition must agree on the version the new rules are (a flag alone would raise it \
                     again on each instance that restarts with it); set rules_version to the next version instead"
                );
            }
            let mut over = flags.kafka;
            over.state_dir = flags.state_dir;
            let kafka =
                KafkaSettings::resolve(kafka, &over, env).map_err(anyhow::Error::msg).context("kafka settings")?;
            return Ok(Self { engine, mode: Mode::Kafka(Box::new(kafka)) });
        };
        let (Some(output), Some(state_dir)) = (flags.output, flags.state_dir) else {
            anyhow::bail!("file mode needs --output and --state-dir");
        };
        let mut file = FileSettings::new(input, output, state_dir);
        if let Some(f) = flags.input_format {
            file.input_format = f;
        }
        if let Some(f) = flags.output_format {
            file.output_format = f;
        }
        if let Some(d) = flags.dead_letter {
            file.dead_letter = d;
        }
        file.until = flags.until;
        file.progress = true;
        file.overwrite = flags.overwrite;
        file.sort_buffer = config.state.sort_buffer_mib << 20;
        if let Some(addr) = flags.kafka.metrics_addr.filter(|a| !a.is_empty()) {
            let metrics = std::sync::Arc::new(crate::file::FileMetrics::default());
            let bound = crate::http::serve(&addr, metrics.clone())?;
            eprintln!("segstream: metrics on http://{bound}/metrics");
            file.metrics = Some(metrics);
        }
        Ok(Self { engine, mode: Mode::File(file) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_mode_takes_formats_from_names_unless_told() {
        let flags = RunFlags {
            input: Some("in.avro".into()),
            output: Some("out.jsonl".into()),
            state_dir: Some("s".into()),
            ..RunFlags::default()
        };
        let s = Settings::resolve(&Config::default(), flags.clone(), &KafkaEnvironment::default()).expect("valid");
        let Mode::File(f) = s.mode else { panic!("file mode") };
        assert_eq!((f.input_format, f.output_format), (Format::Avro, Format::Json));
        assert_eq!(f.dead_letter, PathBuf::from("out.jsonl.dead-letter.jsonl"));
        let told = RunFlags { output_format: Some(Format::Avro), ..flags };
        let Mode::File(f) =
            Settings::resolve(&Config::default(), told, &KafkaEnvironment::default()).expect("valid").mode
        else {
            panic!("file mode")
        };
        assert_eq!(f.output_format, Format::Avro);
    }

    #[test]
    fn kafka_mode_needs_its_section_and_takes_the_state_dir_flag() {
        let flags = RunFlags { state_dir: Some("elsewhere".into()), ..RunFlags::default() };
        let err =
            Settings::resolve(&Config::default(), flags.clone(), &KafkaEnvironment::default()).expect_err("no [kafka]");
        assert!(err.to_string().contains("[kafka]"), "{err}");
        let cfg = Config::from_toml("[kafka]\n").expect("valid");
        let s = Settings::resolve(&cfg, flags, &KafkaEnvironment::default()).expect("valid");
        let Mode::Kafka(k) = s.mode else { panic!("kafka mode") };
        assert_eq!(k.state_dir, PathBuf::from("elsewhere"));
    }
}
