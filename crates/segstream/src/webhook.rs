//! `segstream webhook`: delivers chosen transitions to an HTTP endpoint, for
//! automation (CSM alerts, emails, CRM updates). ADR 006.
//!
//! It reads the durable output — the transitions file of file mode, or the
//! output topic of Kafka mode through its own consumer group — never the
//! engine's memory: a slow or failing receiver cannot slow the engine down
//! or lose anything, and the output is the queue. One transition at a time,
//! in output order (a customer's transitions arrive in the order they
//! happened); its position moves past a transition only once the receiver
//! accepted it (2xx) or refused it for good (4xx other than 408 and 429:
//! written to the webhook's dead-letter file with the answer). Everything
//! else (5xx, 408, 429, timeouts, connection errors) is retried with
//! exponential backoff, without end: back-pressure, not loss. Positions are
//! saved at least once a second, so a crash repeats at most the last
//! second's deliveries: at-least-once, each POST carrying the transition id
//! as `Idempotency-Key` (receivers that keep the keys see each transition
//! once) and an HMAC-SHA256 signature of the timestamp and body.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use segstream_kafka::StopFlag;

/// The environment variable with the signing secret (over `webhook.secret`).
pub const SECRET_ENV: &str = "SEGSTREAM_WEBHOOK_SECRET";

/// `[webhook]` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Where transitions are POSTed.
    pub url: String,
    /// Groups whose transitions are delivered; empty: every group.
    pub groups: Vec<String>,
    /// Target segments delivered (`"null"`: erasures, and the end of a group
    /// a rule migration removed); empty: every one.
    pub to: Vec<String>,
    /// Causes delivered: `event`, `time`, `rules` (a rule migration); empty:
    /// every one. `["event", "time"]` leaves rule changes out.
    pub causes: Vec<String>,
    /// One request's time limit (ms).
    pub timeout_ms: u64,
    /// The first retry's wait (ms); it doubles up to `max_backoff_ms`.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// The HMAC-SHA256 key of the `Segstream-Signature` header; prefer
    /// `SEGSTREAM_WEBHOOK_SECRET` in the environment. Unset: unsigned.
    pub secret: Option<String>,
    /// Kafka mode: the consumer group that keeps the webhook's position in
    /// the output topic (default `<kafka.group_id>.webhook`).
    pub group_id: Option<String>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            groups: Vec::new(),
            to: Vec::new(),
            causes: Vec::new(),
            timeout_ms: 10_000,
            backoff_ms: 500,
            max_backoff_ms: 60_000,
            secret: None,
            group_id: None,
        }
    }
}

impl WebhookConfig {
    /// Refuses a filter that names a group or segment the configuration does
    /// not have (a typo would deliver nothing, silently).
    pub fn check(&self, groups: &[segstream_scoring::Group]) -> anyhow::Result<()> {
        if self.url.is_empty() {
            bail!("webhook.url is not set");
        }
        for g in &self.groups {
            if !groups.iter().any(|k| &*k.name == g.as_str()) {
                let known: Vec<&str> = groups.iter().map(|k| &*k.name).collect();
                bail!("webhook.groups: no group {g:?} (groups: {})", known.join(", "));
            }
        }
        let chosen: Vec<&segstream_scoring::Group> =
            groups.iter().filter(|k| self.groups.is_empty() || self.groups.iter().any(|g| g == &*k.name)).collect();
        for t in &self.to {
            if t != "null" && !chosen.iter().any(|k| k.segments.iter().any(|s| &**s == t.as_str())) {
                bail!("webhook.to: no segment {t:?} in the chosen groups (\"null\" = erasures)");
            }
        }
        for c in &self.causes {
            if !["event", "time", "rules", "requantile"].contains(&c.as_str()) {
                bail!("webhook.causes: no cause {c:?} (causes: event, time, rules, requantile)");
            }
        }
        if self.to.iter().any(|t| t == "null") && self.causes.is_empty() {
            tracing::warn!(
                "webhook.to has \"null\" and webhook.causes is empty: a rule migration that removes a group also \
                 ends every customer's label in it with to = null; set causes = [\"event\"] for erasures only"
            );
        }
        Ok(())
    }

    /// Whether a transition (`group`, `to`, cause kind) is delivered.
    pub fn wants(&self, group: &str, to: Option<&str>, cause: &str) -> bool {
        let to = to.unwrap_or("null");
        (self.groups.is_empty() || self.groups.iter().any(|g| g == group))
            && (self.to.is_empty() || self.to.iter().any(|t| t == to))
            && (self.causes.is_empty() || self.causes.iter().any(|c| c == cause))
    }
}

/// `Segstream-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// 2xx after `attempts` tries.
    Accepted { attempts: u32 },
    /// Refused for good (a 4xx other than 408/429).
    Refused { status: u16, answer: String, attempts: u32 },
}

/// Whether an HTTP status is worth retrying.
pub fn retryable(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// POSTs transitions with retries.
pub struct Poster {
    agent: ureq::Agent,
    cfg: WebhookConfig,
    secret: Option<String>,
    retry_log: segstream_output::Throttle,
}

impl Poster {
    pub fn new(cfg: &WebhookConfig, secret: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(cfg.timeout_ms.max(1))))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            agent,
            cfg: cfg.clone(),
            secret,
            retry_log: segstream_output::Throttle::new(20, Duration::from_secs(60)),
        }
    }

    /// Delivers `body` (one transition) with `key`, retrying until the
    /// receiver decides or `stop` is set (`None`: stopped, not delivered).
    pub fn deliver(&mut self, body: &[u8], key: &str, stop: &StopFlag) -> Option<Delivery> {
        let mut wait = Duration::from_millis(self.cfg.backoff_ms.max(1));
        let max = Duration::from_millis(self.cfg.max_backoff_ms.max(self.cfg.backoff_ms).max(1));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let mut req = self
                .agent
                .post(&self.cfg.url)
                .header("Content-Type", "application/json")
                .header("Idempotency-Key", key)
                .header("Segstream-Delivery-Attempt", &attempts.to_string());
            if let Some(secret) = &self.secret {
                req = req.header("Segstream-Signature", &signature(secret, t, body));
            }
            let why = match req.send(body) {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    if (200..300).contains(&status) {
                        return Some(Delivery::Accepted { attempts });
                    }
                    let answer: String =
                        resp.body_mut().read_to_string().unwrap_or_default().chars().take(1000).collect();
                    if !retryable(status) {
                        return Some(Delivery::Refused { status, answer, attempts });
                    }
                    format!("HTTP {status}")
                }
                Err(e) => e.to_string(),
            };
            match self.retry_log.note() {
                segstream_output::Say::Each { .. } => {
                    tracing::warn!(key, attempts, retry_in = ?wait, "webhook delivery failed ({why}): retrying")
                }
                segstream_output::Say::Summary(n) => tracing::warn!(n, "webhook deliveries retried in the last minute"),
                segstream_output::Say::Nothing => {}
            }
            let until = Instant::now() + wait;
            while Instant::now() < until {
                if stop.is_set() {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20).min(wait));
            }
            wait = (wait * 2).min(max);
        }
    }
}

/// Where the transitions come from, and where the position is kept.
pub trait Source {
    /// The next transition (its JSON bytes), `None` at the end (file,
    /// `--once`) or when stopped.
    fn next(&mut self, stop: &StopFlag) -> anyhow::Result<Option<Vec<u8>>>;
    /// The transition `next` returned last is done with (delivered,
    /// dead-lettered or not chosen): the position may pass it.
    fn done(&mut self);
    /// Makes the position after the last `done` transition durable.
    fn save(&mut self) -> anyhow::Result<()>;
}

/// A transitions file (JSON lines), followed as it grows; the byte offset
/// of the next line is kept in `<state_dir>/webhook.position`.
pub struct FileSource {
    path: PathBuf,
    reader: BufReader<File>,
    /// After the last line returned.
    offset: u64,
    /// After the last line done with: what `save` writes.
    done: u64,
    /// What the position file holds.
    saved: u64,
    position_file: PathBuf,
    once: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Position {
    file: PathBuf,
    offset: u64,
}

impl FileSource {
    pub fn open(path: &Path, state_dir: &Path, once: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let position_file = state_dir.join("webhook.position");
        let offset = match std::fs::read(&position_file) {
            Ok(bytes) => {
                let p: Position = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{}: not a webhook position", position_file.display()))?;
                p.offset
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("reading {}", position_file.display())),
        };
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        if offset > len && !once {
            // File mode cuts its output back to the last commit after a
            // crash, then writes the same bytes again: wait for them.
            tracing::warn!(
                file = %path.display(),
                len,
                position = offset,
                "the transitions file is shorter than the webhook's position: waiting for it to grow back \
                 (a file-mode recovery rewrites it); if it is another file, remove the position file"
            );
        } else if offset > len {
            bail!(
                "{} is shorter ({len} bytes) than the webhook's position ({offset}, in {}): a different file? \
                 Remove the position file to deliver it from the start",
                path.display(),
                position_file.display()
            );
        }
        file.seek(SeekFrom::Start(offset))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::new(file),
            offset,
            done: offset,
            saved: offset,
            position_file,
            once,
        })
    }
}

impl Source for FileSource {
    fn next(&mut self, stop: &StopFlag) -> anyhow::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        loop {
            let start = self.offset;
            let n = self.reader.read_until(b'\n', &mut line)?;
            if n > 0 && line.last() == Some(&b'\n') {
                self.offset += n as u64;
                line.pop();
                if line.iter().all(u8::is_ascii_whitespace) {
                    line.clear();
                    continue;
                }
                return Ok(Some(line));
            }
            // At the end (or a line still being written): wait for more.
            self.reader.seek(SeekFrom::Start(start))?;
            line.clear();
            if self.once || stop.is_set() {
                return Ok(None);
            }
            // Caught up: what is done becomes durable now, not only when
            // more arrives (a crash while the file is quiet repeats nothing).
            if self.done != self.saved {
                self.save()?;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn done(&mut self) {
        self.done = self.offset;
    }

    fn save(&mut self) -> anyhow::Result<()> {
        let tmp = self.position_file.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&Position { file: self.path.clone(), offset: self.done })?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.position_file)?;
        if let Some(dir) = self.position_file.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.saved = self.done;
        Ok(())
    }
}

/// What a run delivered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WebhookSummary {
    pub read: u64,
    pub delivered: u64,
    pub refused: u64,
    pub skipped: u64,
    pub retries: u64,
}

/// Delivers what `source` holds until it ends or `stop` is set; refused
/// transitions go to `dead_letter` (JSON lines: the transition, the status,
/// the receiver's answer).
pub fn deliver_all(
    cfg: &WebhookConfig,
    secret: Option<String>,
    source: &mut dyn Source,
    dead_letter: &Path,
    stop: &StopFlag,
) -> anyhow::Result<WebhookSummary> {
    if cfg.url.is_empty() {
        bail!("webhook.url is not set");
    }
    let mut poster = Poster::new(cfg, secret);
    let mut summary = WebhookSummary::default();
    let mut last_save = Instant::now();
    let mut unsaved = 0u64;
    let dead = |record: serde_json::Value| -> anyhow::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dead_letter)
            .with_context(|| format!("opening {}", dead_letter.display()))?;
        writeln!(f, "{record}")?;
        f.sync_data()?;
        Ok(())
    };
    while !stop.is_set() {
        let Some(body) = source.next(stop)? else { break };
        summary.read += 1;
        let v: serde_json::Value = match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) if v.is_object() => v,
            other => {
                // Not a transition record: kept, with why, and passed.
                let why = other.err().map_or("not a JSON object".to_string(), |e| e.to_string());
                tracing::warn!(record = summary.read, "not a transition record ({why}): dead-lettered");
                summary.refused += 1;
                dead(serde_json::json!({ "raw": String::from_utf8_lossy(&body), "status": 0, "answer": why }))?;
                source.done();
                continue;
            }
        };
        let group = v["group"].as_str().unwrap_or_default();
        if !cfg.wants(group, v["to"].as_str(), v["cause"]["kind"].as_str().unwrap_or_default()) {
            summary.skipped += 1;
        } else {
            let key = v["transition_id"].as_str().unwrap_or_default().to_string();
            match poster.deliver(&body, &key, stop) {
                None => break, // stopped: not done, the next run delivers it
                Some(Delivery::Accepted { attempts }) => {
                    summary.delivered += 1;
                    summary.retries += u64::from(attempts - 1);
                }
                Some(Delivery::Refused { status, answer, attempts }) => {
                    summary.refused += 1;
                    summary.retries += u64::from(attempts - 1);
                    tracing::warn!(key, status, "webhook refused a transition for good: dead-lettered");
                    dead(serde_json::json!({ "transition": v, "status": status, "answer": answer }))?;
                }
            }
        }
        source.done();
        unsaved += 1;
        if last_save.elapsed() >= Duration::from_secs(1) || unsaved >= 1000 {
            source.save()?;
            last_save = Instant::now();
            unsaved = 0;
        }
    }
    source.save()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_takes_groups_and_targets() {
        let cfg = WebhookConfig { groups: vec!["rfm".into()], to: vec!["at_risk".into()], ..WebhookConfig::default() };
        assert!(cfg.wants("rfm", Some("at_risk"), "time"));
        assert!(!cfg.wants("rfm", Some("champions"), "time"));
        assert!(!cfg.wants("health", Some("at_risk"), "event"));
        assert!(WebhookConfig::default().wants("health", None, "rules"));
        let erasures =
            WebhookConfig { to: vec!["null".into()], causes: vec!["event".into()], ..WebhookConfig::default() };
        assert!(erasures.wants("rfm", None, "event"));
        assert!(!erasures.wants("plan", None, "rules"), "a removed group's end is no erasure");
        let typo = WebhookConfig { url: "http://x".into(), causes: vec!["rule".into()], ..WebhookConfig::default() };
        assert!(typo.check(&[]).expect_err("unknown cause").to_string().contains("webhook.causes"));
        assert!(WebhookConfig { causes: vec!["rules".into()], ..typo }.check(&[]).is_ok());
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_and_body() {
        // Computed independently (Python's hmac module).
        assert_eq!(
            signature("whsec_test", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
    }

    #[test]
    fn a_filter_naming_what_does_not_exist_is_refused() {
        let scorer = segstream_engine::EngineSettings::spec_default().scorer();
        let with = |groups: &[&str], to: &[&str]| WebhookConfig {
            url: "http://x".into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            to: to.iter().map(|s| s.to_string()).collect(),
            ..WebhookConfig::default()
        };
        assert!(with(&["rfm"], &["at_risk", "null"]).check(scorer.groups()).is_ok());
        let e = with(&["rfm"], &["at-risk"]).check(scorer.groups()).expect_err("typo").to_string();
        assert!(e.contains("at-risk"), "{e}");
        let e = with(&["RFM"], &[]).check(scorer.groups()).expect_err("typo").to_string();
        assert!(e.contains("groups: rfm"), "{e}");
        assert!(with(&["health"], &["at_risk"]).check(scorer.groups()).is_err(), "at_risk is not a health segment");
        assert!(WebhookConfig::default().check(scorer.groups()).is_err(), "no url");
    }

    #[test]
    fn statuses_worth_retrying() {
        for s in [500, 502, 503, 408, 429] {
            assert!(retryable(s), "{s}");
        }
        for s in [400, 401, 404, 410, 422] {
            assert!(!retryable(s), "{s}");
        }
    }
}
