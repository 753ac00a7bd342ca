//! The `segstream` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use segstream::analyze::{ReportArgs, SimulateArgs};
use segstream::demo::{run_demo, DemoArgs};
use segstream::{generate, run_file, Config, GenerateArgs, Mode, RunFlags, Settings};
use segstream_decode::{parse_rfc3339_millis, Format, MAX_TS, MIN_TS};
use segstream_kafka::{KafkaEnvironment, KafkaOverrides, Metrics, StopFlag};

/// mimalloc: the hot paths allocate per event (decoded strings, transitions,
/// RocksDB batch entries); glibc's malloc and free were a seventh of a
/// file-mode profile (ARCHITECTURE.md, "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "segstream",
    version,
    about = "Streaming SaaS customer segmentation: events in, segment transitions out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: `text` for people, `json` (one object per line)
    /// for log collectors. The level comes from RUST_LOG (default info).
    #[arg(long, global = true, env = "SEGSTREAM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Run the engine: on an event file with `--input` (re-running continues
    /// from the last commit), else as a Kafka consumer group from the
    /// configuration's `[kafka]` section.
    Run {
        /// Events: JSON lines, or an Avro container file (`.avro`). Selects file mode.
        #[arg(long, requires_all = ["output", "state_dir"])]
        input: Option<PathBuf>,
        /// Transitions: JSON lines, or Avro if the name ends in `.avro`.
        #[arg(long)]
        output: Option<PathBuf>,
        /// RocksDB state: customers, timers, input positions, output lengths
        /// (Kafka mode: overrides kafka.state_dir).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Pipeline configuration (TOML); built-in SPEC defaults otherwise.
        #[arg(long)]
        config: Option<PathBuf>,
        /// After the input, advance time to this instant (RFC 3339, epoch ms, or `now`) and emit every boundary up to it.
        #[arg(long, value_parser = parse_instant)]
        until: Option<i64>,
        /// Input format; from the file extension by default.
        #[arg(long, value_parser = format_parser())]
        format: Option<Format>,
        /// Output format; from the file extension by default (`.avro`: Avro, else JSON lines).
        #[arg(long, value_parser = format_parser())]
        output_format: Option<Format>,
        /// Where invalid records go; default `<output>.dead-letter.jsonl`.
        #[arg(long)]
        dead_letter: Option<PathBuf>,
        /// Replace an existing output or dead-letter file this state dir did
        /// not write (refused otherwise, so that nothing is lost by mistake).
        #[arg(long)]
        overwrite: bool,
        /// The configuration's scoring or segment rules differ from those the
        /// state was built under: re-evaluate every customer under the new
        /// rules before any input (a transition with cause `rules` for each
        /// segment that changes), then continue. Without it such a state is
        /// refused. Raising `rules_version` in the configuration does the same.
        #[arg(long)]
        migrate_rules: bool,
        /// Kafka mode: overrides kafka.brokers.
        #[arg(long, env = "SEGSTREAM_BROKERS")]
        brokers: Option<String>,
        /// Kafka mode: overrides kafka.group_id.
        #[arg(long)]
        group_id: Option<String>,
        /// Kafka mode: overrides kafka.input_topic.
        #[arg(long)]
        input_topic: Option<String>,
        /// Kafka mode: overrides kafka.output_topic.
        #[arg(long)]
        output_topic: Option<String>,
        /// Kafka mode: overrides kafka.dead_letter_topic.
        #[arg(long)]
        dead_letter_topic: Option<String>,
        /// Kafka mode: overrides kafka.metrics_addr ("" disables the endpoint).
        /// File mode: serves /metrics there while the run lasts (long replays).
        #[arg(long)]
        metrics_addr: Option<String>,
    },
    /// Answer questions about a state dir over HTTP (JSON under /v1; see
    /// /v1/openapi.json): a customer's segments and history, segment sizes
    /// and members, daily sizes. Read-only; safe next to a running `run`.
    Serve {
        /// The state dir a `segstream run` writes (file mode).
        #[arg(long)]
        state_dir: PathBuf,
        /// The configuration the state dir was run with (segment names and
        /// rules); built-in SPEC defaults otherwise.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
    },
    /// Generate a sample, run it, and show segment sizes and a few explained transitions.
    Demo {
        /// Directory for the sample, its state and its transitions (replaced on each run).
        #[arg(long, default_value = "segstream-demo")]
        dir: PathBuf,
        #[arg(long, default_value_t = 2_000)]
        customers: u64,
        #[arg(long, default_value_t = 120)]
        days: u32,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Deliver chosen transitions (`[webhook]` in the configuration) as
    /// signed HTTP POSTs, at least once, from a transitions file (followed as
    /// it grows) or, without `--input`, from Kafka mode's output topic.
    Webhook {
        /// Configuration with a `[webhook]` section (and `[kafka]` without `--input`).
        #[arg(long)]
        config: PathBuf,
        /// A transitions file (JSON lines) written by `segstream run`.
        #[arg(long, requires = "state_dir")]
        input: Option<PathBuf>,
        /// Where the position in `--input` and the dead letters are kept.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Stop at the end of `--input` instead of waiting for more.
        #[arg(long)]
        once: bool,
    },
    /// Analyse segments the way the segmentation guides do: sizes and flows
    /// over time, cohort retention, segment validation, firmographic
    /// breakdowns, k-means against the rules. Runs the engine on the input
    /// (or reads a state dir and its transitions) and writes one HTML page
    /// (charts inline, nothing fetched), a JSON file or a directory of CSVs.
    Report {
        /// The input events (JSON lines or Avro), as given to `segstream run`.
        #[arg(long)]
        input: PathBuf,
        /// The configuration the segments come from; built-in SPEC defaults otherwise.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Report on this state dir (file mode) instead of running the engine; needs --transitions.
        #[arg(long, requires = "transitions", conflicts_with = "to")]
        state_dir: Option<PathBuf>,
        /// The transitions file the state dir's run wrote. Without --state-dir (e.g. Kafka mode's
        /// output topic saved to a file): its transitions are reported, the end state comes from
        /// running the engine on the input, and the file is checked against that run.
        #[arg(long)]
        transitions: Option<PathBuf>,
        /// The period's start (RFC 3339 or epoch ms); the day of the first event otherwise.
        #[arg(long, value_parser = parse_period_bound)]
        from: Option<i64>,
        /// The period's end: the report is as of this instant (events after it are left out,
        /// boundaries up to it fire); the end of the data otherwise.
        #[arg(long, value_parser = parse_period_bound)]
        to: Option<i64>,
        /// Where to write: a file (html, json) or a directory (csv).
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value = "html", value_parser = ["html", "json", "csv"])]
        format: String,
        /// Input format; from the file extension by default.
        #[arg(long, value_parser = format_parser())]
        input_format: Option<Format>,
        /// Seed of the k-means (the same seed, the same clusters).
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Also break segments down by a profile attribute (`attr.crm`; a list attribute such as
        /// `attr.integrations` counts a customer under each of its values) or a survey answer
        /// (`survey.role`). Repeatable.
        #[arg(long)]
        breakdown: Vec<String>,
    },
    /// What would a rule change do? Replays the input through the engine
    /// under the current and the new configuration (temporary state) and
    /// writes the difference: sizes over time, who ends where, transitions
    /// added and removed per day, example customers with both explanations.
    Simulate {
        /// The new configuration.
        #[arg(long)]
        config: PathBuf,
        /// The configuration in force; built-in SPEC defaults otherwise.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// The input events (JSON lines or Avro).
        #[arg(long)]
        input: PathBuf,
        #[arg(long, value_parser = parse_period_bound)]
        from: Option<i64>,
        #[arg(long, value_parser = parse_period_bound)]
        to: Option<i64>,
        /// Where to write: a file (html, json) or a directory (csv).
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value = "html", value_parser = ["html", "json", "csv"])]
        format: String,
        #[arg(long, value_parser = format_parser())]
        input_format: Option<Format>,
    },
    /// Write a realistic sample of SaaS events (several kinds of account) to a file.
    Generate {
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 1_000)]
        customers: u64,
        #[arg(long, default_value_t = 120)]
        days: u32,
        /// First day (RFC 3339 or epoch ms).
        #[arg(long, value_parser = parse_instant, default_value = "2026-01-01T00:00:00Z")]
        start: i64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output format; from the file extension by default.
        #[arg(long, value_parser = format_parser())]
        format: Option<Format>,
        /// Add an invalid record after every N valid ones, to exercise dead-lettering.
        #[arg(long)]
        invalid_every: Option<u64>,
    },
}

/// `json` or `avro`, listed in `--help` and in the error for anything else.
fn format_parser() -> impl clap::builder::TypedValueParser<Value = Format> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["json", "avro"])
        .map(|s| s.parse::<Format>().expect("one of the possible values"))
}

/// A report's period bound: an instant, or a date alone (midnight UTC), as
/// analysts write periods. (`run --until` keeps asking for a time.)
fn parse_period_bound(s: &str) -> Result<i64, String> {
    if s.len() == 10 && s.as_bytes().get(4) == Some(&b'-') && s.as_bytes().get(7) == Some(&b'-') {
        return parse_instant(&format!("{s}T00:00:00Z"));
    }
    parse_instant(s)
}

fn parse_instant(s: &str) -> Result<i64, String> {
    let ms = match s.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) if s == "now" => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_millis()
            .try_into()
            .map_err(|_| "the clock is past the year 9999".to_string())?,
        Err(_) => parse_rfc3339_millis(s)?,
    };
    if (MIN_TS..=MAX_TS).contains(&ms) {
        Ok(ms)
    } else {
        Err(format!("{ms} is outside the years 0001 to 9999"))
    }
}

/// Kafka mode's output topic as a webhook source.
struct KafkaSource(segstream_kafka::OutputFollower);

impl segstream::webhook::Source for KafkaSource {
    fn next(&mut self, stop: &StopFlag) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.0.next(stop)?)
    }

    fn done(&mut self) {
        self.0.done();
    }

    fn save(&mut self) -> anyhow::Result<()> {
        Ok(self.0.save()?)
    }
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    path.map_or_else(|| Ok(Config::default()), |p| Config::load(p))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    if cli.log_format == "json" {
        logs.json().with_current_span(true).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("segstream: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            input,
            output,
            state_dir,
            config,
            until,
            format,
            output_format,
            dead_letter,
            overwrite,
            migrate_rules,
            brokers,
            group_id,
            input_topic,
            output_topic,
            dead_letter_topic,
            metrics_addr,
        } => {
            let cfg = load_config(config.as_ref())?;
            let flags = RunFlags {
                input,
                output,
                state_dir,
                until,
                input_format: format,
                output_format,
                dead_letter,
                overwrite,
                migrate_rules,
                kafka: KafkaOverrides {
                    brokers,
                    group_id,
                    input_topic,
                    output_topic,
                    dead_letter_topic,
                    metrics_addr,
                    state_dir: None,
                },
            };
            let settings = Settings::resolve(&cfg, flags, &KafkaEnvironment::from_process())?;
            match settings.mode {
                Mode::File(file) => {
                    let summary = run_file(&settings.engine, &file)?;
                    eprint!("{}", summary.render());
                    let c = &summary.counts;
                    if c.invalid > 0 && c.events == 0 {
                        anyhow::bail!(
                            "every record read ({}) was invalid: is {} the right file, in the right format ({})? \
                             See the dead-letter file {}",
                            c.invalid,
                            file.input.display(),
                            file.input_format,
                            file.dead_letter.display()
                        );
                    }
                }
                Mode::Kafka(mut kafka) => {
                    let stop = StopFlag::new();
                    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                        signal_hook::flag::register(sig, stop.shared()).context("installing signal handlers")?;
                    }
                    let metrics = Arc::new(Metrics::new());
                    if let Some(addr) = kafka.metrics_addr.clone() {
                        let (listener, bound) = segstream::http::bind(&addr)?;
                        if kafka.http_advertised_url.is_none() && !bound.ip().is_unspecified() {
                            kafka.http_advertised_url = Some(format!("http://{bound}"));
                        }
                        let api = if kafka.query_api {
                            if bound.ip().is_unspecified() {
                                tracing::warn!(
                                    "the query API serves customer data without authentication on every interface \
                                     ({bound}): restrict access (network policy, an authenticating proxy) or set \
                                     kafka.query_api = false"
                                );
                            }
                            let query = segstream::query::cluster::KafkaQuery::new(
                                settings.engine.clone(),
                                (*kafka).clone(),
                                metrics.clone(),
                            )?;
                            Some(segstream::query::api::router(Arc::new(query)))
                        } else {
                            None
                        };
                        segstream::http::serve_on(listener, metrics.clone(), api)?;
                        tracing::info!(
                            advertised = kafka.http_advertised_url.as_deref().unwrap_or("none"),
                            "metrics on http://{bound}/metrics, query API on http://{bound}/v1/"
                        );
                    }
                    segstream_kafka::run(settings.engine, *kafka, metrics, stop)?;
                }
            }
        }
        Command::Serve { state_dir, config, addr } => {
            let settings = load_config(config.as_ref())?.engine_settings()?;
            let reader: Arc<dyn segstream::query::Answers> =
                Arc::new(segstream::query::StateReader::open(&state_dir, &settings)?);
            segstream::query::api::serve(&addr, reader, |bound| {
                eprintln!("serving {} on http://{bound}/v1/ (see /v1/openapi.json)", state_dir.display());
            })?;
        }
        Command::Webhook { config, input, state_dir, once } => {
            let cfg = Config::load(&config)?;
            let Some(hook) = cfg.webhook.clone() else {
                anyhow::bail!("{}: no [webhook] section (url, groups, to; see README, \"Webhook\")", config.display())
            };
            hook.check(cfg.engine_settings()?.scorer().groups()).with_context(|| config.display().to_string())?;
            let secret = std::env::var(segstream::webhook::SECRET_ENV).ok().or_else(|| hook.secret.clone());
            if secret.is_none() {
                tracing::warn!("no webhook secret (SEGSTREAM_WEBHOOK_SECRET): deliveries are not signed");
            }
            let stop = StopFlag::new();
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.shared()).context("installing signal handlers")?;
            }
            let (mut source, dead_letter): (Box<dyn segstream::webhook::Source>, PathBuf) = match (input, state_dir) {
                (Some(input), Some(dir)) => {
                    let source = segstream::webhook::FileSource::open(&input, &dir, once)?;
                    (Box::new(source), dir.join("webhook-dead-letter.jsonl"))
                }
                _ => {
                    let kafka = cfg.kafka.as_ref().with_context(|| {
                        format!("{}: no --input and no [kafka] section: where are the transitions?", config.display())
                    })?;
                    let settings = segstream_kafka::KafkaSettings::resolve(
                        kafka,
                        &KafkaOverrides::default(),
                        &KafkaEnvironment::from_process(),
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let group = hook.group_id.clone().unwrap_or_else(|| format!("{}.webhook", settings.group_id));
                    let source = segstream_kafka::OutputFollower::new(&settings, &group)?;
                    std::fs::create_dir_all(&settings.state_dir)?;
                    (Box::new(KafkaSource(source)), settings.state_dir.join("webhook-dead-letter.jsonl"))
                }
            };
            let s = segstream::webhook::deliver_all(&hook, secret, source.as_mut(), &dead_letter, &stop)?;
            eprintln!(
                "webhook: {} transitions read, {} delivered, {} refused (in {}), {} not chosen, {} retries",
                s.read,
                s.delivered,
                s.refused,
                dead_letter.display(),
                s.skipped,
                s.retries
            );
        }
        Command::Demo { dir, customers, days, seed, config } => {
            let settings = load_config(config.as_ref())?.engine_settings()?;
            let report = run_demo(&settings, &DemoArgs { dir, customers, days, seed })?;
            eprint!("{}", report.summary.render());
            println!("\n{}", report.text);
        }
        Command::Report {
            input,
            config,
            state_dir,
            transitions,
            from,
            to,
            output,
            format,
            input_format,
            seed,
            breakdown,
        } => {
            let format = format.parse().map_err(anyhow::Error::msg)?;
            let args = ReportArgs {
                input,
                input_format,
                config,
                state_dir,
                transitions,
                from,
                to,
                output,
                format,
                seed,
                breakdown,
            };
            for f in segstream::analyze::report(&args)? {
                println!("{}", f.display());
            }
        }
        Command::Simulate { config, baseline, input, from, to, output, format, input_format } => {
            let format = format.parse().map_err(anyhow::Error::msg)?;
            let args = SimulateArgs { input, input_format, config, baseline, from, to, output, format };
            for f in segstream::analyze::simulate(&args)? {
                println!("{}", f.display());
            }
        }
        Command::Generate { output, customers, days, start, seed, format, invalid_every } => {
            let format = format.unwrap_or_else(|| Format::from_path(&output));
            let args = GenerateArgs { customers, days, start_ms: start, seed, format, invalid_every };
            let stats = generate(&args, &output).with_context(|| format!("generating {}", output.display()))?;
            eprintln!(
                "wrote {} events ({} invalid) for {customers} customers over {days} days to {}",
                stats.events,
                stats.invalid,
                output.display()
            );
        }
    }
    Ok(())
}
