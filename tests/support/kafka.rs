//! A real Kafka-protocol broker (tansu) for tests and benchmarks, with
//! helpers to create topics, produce events and read topics back.
//!
//! The broker binary comes from `$TANSU_BIN`, else `tansu` on `PATH`, else
//! where `.ci/run` installs it (`~/.cache/segstream-tools/tansu-0.6.0/bin`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("tansu");
            if p.is_file() {
                return p;
            }
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let p = home.join(".cache/segstream-tools/tansu-0.6.0/bin/tansu");
    assert!(
        p.is_file(),
        "the tansu broker is not installed: run `bash .ci/run` once (it installs it), or set TANSU_BIN"
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Where the broker keeps its data.
#[derive(Clone)]
pub enum Storage {
    Memory,
    /// In a SQLite file in this directory: survives a broker restart.
    Sqlite(PathBuf),
}

/// A broker process on 127.0.0.1, killed on drop.
pub struct Broker {
    pub addr: String,
    port: u16,
    storage: Storage,
    child: Option<Child>,
    log: PathBuf,
}

impl Broker {
    pub fn start(storage: Storage, log_dir: &Path) -> Self {
        let port = free_port();
        let mut b = Broker {
            addr: format!("127.0.0.1:{port}"),
            port,
            storage,
            child: None,
            log: log_dir.join(format!("tansu-{port}.log")),
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // tansu resolves a SQLite path against its working directory.
        let (storage, cwd) = match &self.storage {
            Storage::Memory => ("memory://tansu/", std::env::temp_dir()),
            Storage::Sqlite(dir) => ("sqlite://tansu.db", dir.clone()),
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("broker log");
        let child = Command::new(tansu_bin())
            .current_dir(cwd)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", storage])
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting tansu");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let c: BaseConsumer = client_config(&self.addr).create().expect("probe");
        loop {
            if c.fetch_metadata(None, Duration::from_secs(2)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "broker at {} did not start; see {}", self.addr, self.log.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn client_config(addr: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", addr);
    c
}

pub fn create_topics(addr: &str, topics: &[(&str, i32, bool)]) {
    let compact: &[(&str, &str)] = &[("cleanup.policy", "compact")];
    let topics: Vec<TopicSpec<'_>> =
        topics.iter().map(|&(name, parts, c)| (name, parts, if c { compact } else { &[] })).collect();
    create_topics_with_config(addr, &topics);
}

/// A topic to create: name, partitions, topic configuration.
pub type TopicSpec<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);

pub fn create_topics_with_config(addr: &str, topics: &[TopicSpec<'_>]) {
    let admin: AdminClient<DefaultClientContext> = client_config(addr).create().expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, parts, config)| {
            config.iter().fold(NewTopic::new(name, *parts, TopicReplication::Fixed(1)), |t, (k, v)| t.set(k, v))
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let results = rt.block_on(admin.create_topics(new.iter(), &AdminOptions::new())).expect("create topics");
    for r in results {
        r.expect("topic created");
    }
}

/// Produces `(partition, key, payload)` records (an empty key: none) and
/// waits for every acknowledgement.
pub fn produce(addr: &str, topic: &str, records: &[(i32, Vec<u8>, Vec<u8>)]) {
    let p: BaseProducer = client_config(addr)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    for (part, key, payload) in records {
        let mut rec = BaseRecord::to(topic).partition(*part).payload(payload.as_slice());
        if !key.is_empty() {
            rec = rec.key(key.as_slice());
        }
        send_waiting(&p, rec);
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

/// Sends `rec`, waiting while the producer's queue is full.
fn send_waiting(p: &BaseProducer, mut rec: BaseRecord<'_, [u8], [u8]>) {
    while let Err((_, back)) = p.send(rec) {
        rec = back;
        p.poll(Duration::from_millis(20));
    }
}

/// Produces keyed records, letting librdkafka's `partitioner` (e.g.
/// `murmur2`) pick each one's partition, as an application's producer would.
pub fn produce_partitioned(addr: &str, topic: &str, partitioner: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    let p: BaseProducer = client_config(addr)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("partitioner", partitioner)
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    for (key, payload) in records {
        send_waiting(&p, BaseRecord::to(topic).key(key.as_slice()).payload(payload.as_slice()));
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

/// The partition a test puts a customer in.
pub fn partition_of(customer: &str, partitions: i32) -> i32 {
    segstream_kafka::owners::partition_for_key(
        customer.as_bytes(),
        partitions,
        segstream_kafka::KeyPartitioner::Murmur2,
    )
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
    /// The record's timestamp (epoch ms; for segstream's outputs, when the
    /// producing process handed it to librdkafka).
    pub timestamp: Option<i64>,
}

/// Reads every partition of `topic` from the start to its current end.
pub fn read_all(addr: &str, topic: &str) -> Vec<Read> {
    let c: BaseConsumer = client_config(addr)
        .set("group.id", "segstream-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    let parts = patiently("metadata", || {
        c.fetch_metadata(Some(topic), Duration::from_secs(10)).map(|md| md.topics()[0].partitions().len() as i32)
    });
    let mut out = Vec::new();
    for p in 0..parts {
        let (low, high) = patiently("watermarks", || c.fetch_watermarks(topic, p, Duration::from_secs(10)));
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low)).expect("tpl");
        c.assign(&tpl).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "reading {topic}/{p} timed out");
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push(Read {
                        partition: p,
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        headers,
                        timestamp: m.timestamp().to_millis(),
                    });
                    if m.offset() + 1 >= high {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => panic!("reading {topic}/{p}: {e}"),
                None => {}
            }
        }
    }
    out
}

/// tansu's SQLite storage can take over 10 s to answer under the heaviest
/// tests: the tests' own requests are retried for a minute.
fn patiently<T>(what: &str, mut f: impl FnMut() -> Result<T, KafkaError>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => eprintln!("{what}: {e}; retrying"),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Number of records in `topic` (sum of end − start over its partitions).
pub fn count(addr: &str, topic: &str) -> i64 {
    let c: BaseConsumer = client_config(addr).create().expect("consumer");
    let parts = patiently("metadata", || {
        c.fetch_metadata(Some(topic), Duration::from_secs(10)).map(|md| md.topics()[0].partitions().len() as i32)
    });
    (0..parts)
        .map(|p| {
            let (low, high) = patiently("watermarks", || c.fetch_watermarks(topic, p, Duration::from_secs(10)));
            high - low
        })
        .sum()
}

/// Moves `group`'s committed offsets of every partition of `topic` to its
/// end, as `kafka-consumer-groups --reset-offsets --to-latest` does while
/// the group has no member; returns the offsets set.
pub fn reset_group_to_latest(addr: &str, group: &str, topic: &str) -> Vec<(i32, i64)> {
    let c: BaseConsumer =
        client_config(addr).set("group.id", group).set("enable.auto.commit", "false").create().expect("consumer");
    let parts = patiently("metadata", || {
        c.fetch_metadata(Some(topic), Duration::from_secs(10)).map(|md| md.topics()[0].partitions().len() as i32)
    });
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in 0..parts {
        let (_, high) = patiently("watermarks", || c.fetch_watermarks(topic, p, Duration::from_secs(10)));
        tpl.add_partition_offset(topic, p, Offset::Offset(high)).expect("offset");
        ends.push((p, high));
    }
    patiently("committing offsets", || c.commit(&tpl, rdkafka::consumer::CommitMode::Sync));
    let got = patiently("reading offsets", || c.committed_offsets(tpl.clone(), Duration::from_secs(10)));
    for (p, high) in &ends {
        let at = got.find_partition(topic, *p).map(|e| e.offset());
        assert_eq!(at, Some(Offset::Offset(*high)), "the group's offset of {topic}/{p} was moved");
    }
    ends
}
