//! Checks before joining the group: topics exist with compatible partition
//! counts, the changelog is compacted, the transition schema is registered.
//! A clear error at start beats a crash loop.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use segstream_decode::Format;

use crate::client::{check_topic, reader};
use crate::error::Error;
use crate::settings::KafkaSettings;
use crate::sink::OutputEncoding;

/// Kafka's default `delete.retention.ms`, assumed where the broker does not
/// report the changelog's.
const DEFAULT_DELETE_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// What the checks learned.
#[derive(Debug, Clone, Copy)]
pub struct Preflight {
    /// The changelog's `delete.retention.ms`.
    pub changelog_delete_retention: Duration,
    pub output: OutputEncoding,
    /// Partitions of the input topics at start.
    pub input_partitions: i32,
}

pub fn check(k: &KafkaSettings) -> Result<Preflight, Error> {
    let session = k.session_timeout_ms();
    if let Some(t) = k.configured_delivery_timeout_ms().filter(|t| *t > session) {
        tracing::warn!(
            delivery_timeout_ms = t,
            session_timeout_ms = session,
            "the producer's delivery timeout is longer than the group's session timeout: after a stall longer \
             than the session timeout, records queued before it may still reach the outputs after another \
             instance took the partition over (duplicates); see ARCHITECTURE.md, \"Two owners of one partition\""
        );
    } else if k.configured_delivery_timeout_ms().is_none() && session < 30_000 {
        tracing::info!(
            session_timeout_ms = session,
            "the producer's delivery timeout defaults to 30 s, longer than this session timeout: records queued \
             before a stall of between the two may still reach the outputs after another instance took over"
        );
    }
    let output = OutputEncoding::new(k.output_format, output_schema_id(k)?)?;
    let probe = reader(k)?;
    let mut inputs: Option<(&str, i32)> = None;
    for input in &k.inputs {
        let n = check_topic(&probe, &input.topic)?;
        match inputs {
            Some((first, m)) if m != n => {
                return Err(Error::Setup(format!(
                    "input topics must be co-partitioned: {first} has {m} partitions, {} has {n}",
                    input.topic
                )))
            }
            Some(_) => {}
            None => inputs = Some((&input.topic, n)),
        }
    }
    let (_, inputs) = inputs.ok_or_else(|| Error::Setup("no input topic".into()))?;
    let changelog = &k.changelog_topic;
    let logs = check_topic(&probe, changelog)?;
    if logs < inputs {
        return Err(Error::Setup(format!(
            "changelog topic {changelog} has {logs} partitions, the input has {inputs}: \
             it needs at least as many (one per input partition), and cleanup.policy=compact"
        )));
    }
    check_topic(&probe, &k.output_topic)?;
    check_topic(&probe, &k.dead_letter_topic)?;
    Ok(Preflight { changelog_delete_retention: check_changelog_config(k)?, output, input_partitions: inputs })
}

/// Quantile RFM: the topic where the partitions exchange their populations
/// (ADR 010) must exist.
pub fn check_quantile_topic(k: &KafkaSettings) -> Result<(), Error> {
    let probe = reader(k)?;
    check_topic(&probe, &k.quantile_topic).map_err(|e| {
        Error::Setup(format!(
            "scoring.mode = \"quantile\" needs the topic {} (1 partition, cleanup.policy=compact), where the \
             partitions exchange their populations at each recomputation: {e}",
            k.quantile_topic
        ))
    })?;
    check_compacted(
        k,
        ("quantile", &k.quantile_topic),
        "or retention would drop the partitions' starts, and a restarted partition would wait for them forever",
    )?;
    Ok(())
}

/// The transition schema's id for Avro output: configured, or registered
/// under `<output_topic>-value`.
fn output_schema_id(k: &KafkaSettings) -> Result<Option<u32>, Error> {
    match (k.output_format, k.output_schema_id, &k.registry) {
        (Format::Json, _, _) => Ok(None),
        (Format::Avro, Some(id), _) => Ok(Some(id)),
        (Format::Avro, None, Some(registry)) => {
            let subject = format!("{}-value", k.output_topic);
            let schema = segstream_output::transition_schema().canonical_form();
            let id = registry
                .register(&subject, &schema)
                .map_err(|e| Error::Setup(format!("registering the transition schema under {subject}: {e}")))?;
            tracing::info!(subject, id, "transition schema registered");
            Ok(Some(id))
        }
        (Format::Avro, None, None) => Err(Error::Setup(
            "kafka.output_format = \"avro\" needs kafka.output_schema_id or kafka.schema_registry_url".into(),
        )),
    }
}

/// Checks that the changelog is compacted and returns its
/// `delete.retention.ms`. Under `cleanup.policy=delete`, retention would
/// remove the records of customers that have not changed for a while, and a
/// restore from it would silently lose them. A broker that does not report
/// the topic's configuration gets a warning, not a refusal.
fn check_changelog_config(k: &KafkaSettings) -> Result<Duration, Error> {
    check_compacted(
        k,
        ("changelog", &k.changelog_topic),
        "or retention would drop the state of customers that have not changed for a while (see README, \"Run with \
         Kafka\")",
    )
}

/// Checks that `topic` is compacted (refused when the broker reports
/// another policy; `why` says what retention would lose) and returns its
/// `delete.retention.ms`.
fn check_compacted(k: &KafkaSettings, (what, topic): (&str, &str), why: &str) -> Result<Duration, Error> {
    let changelog = topic;
    let admin: AdminClient<crate::client::LogContext> = k
        .client_config(&[], &Default::default(), &[])
        .create_with_context(crate::client::LogContext("admin"))
        .map_err(Error::broker("creating an admin client"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(Error::io("starting the admin client's runtime"))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let described = runtime.block_on(admin.describe_configs([&ResourceSpecifier::Topic(changelog)], &opts));
    let resource = match described {
        Ok(mut r) if !r.is_empty() => r.swap_remove(0).map_err(|code| code.to_string()),
        Ok(_) => Err("no answer".to_string()),
        Err(e) => Err(e.to_string()),
    };
    let value = |name: &str| resource.as_ref().ok().and_then(|r| r.get(name)).and_then(|e| e.value.clone());
    let retention = match value("delete.retention.ms").and_then(|v| v.parse::<u64>().ok()) {
        Some(ms) => Duration::from_millis(ms),
        None => DEFAULT_DELETE_RETENTION,
    };
    match value("cleanup.policy") {
        Some(p) if p.split(',').any(|x| x.trim() == "compact") => Ok(retention),
        Some(p) => {
            Err(Error::Setup(format!("{what} topic {changelog} has cleanup.policy={p}: it must be compact, {why}")))
        }
        None => {
            let error = resource.err().unwrap_or_else(|| "not reported".into());
            tracing::warn!(
                topic = changelog,
                error,
                "cannot read the {what} topic's cleanup.policy; it must be compact"
            );
            Ok(retention)
        }
    }
}
