//! Where a customer's state is: its partition (by the input producers'
//! partitioner) and that partition's current owner, read from the owner
//! record in the changelog (see [`crate::fence`]), for the query API.
//!
//! The current owner is found in two reads: the changelog partition's last
//! record carries its writer's epoch (the offset of its owner record, or it
//! is that owner record), and the owner record names the instance's URL.
//! Compaction never removes the newest owner record (it is the last of its key).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};

use crate::changelog::{Owner, EPOCH_HEADER, OWNER_KEY};
use crate::client::{read_range, reader};
use crate::config::KeyPartitioner;
use crate::error::Error;
use crate::settings::KafkaSettings;
use crate::stop::StopFlag;

/// Kafka's murmur2 (the Java client's default partitioner; librdkafka's
/// `murmur2`), seed 0x9747b28c.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition a producer with `partitioner` sends key `key` to.
pub fn partition_for_key(key: &[u8], partitions: i32, partitioner: KeyPartitioner) -> i32 {
    let n = partitions.max(1) as u32;
    match partitioner {
        KeyPartitioner::Murmur2 => ((murmur2(key) as u32 & 0x7fff_ffff) % n) as i32,
        KeyPartitioner::Consistent => (crc32fast::hash(key) % n) as i32,
    }
}

/// How long finding an owner may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an owner looked up stays trusted.
const OWNER_TTL: Duration = Duration::from_secs(2);

/// The owners of the changelog's partitions, looked up when asked (cached
/// for a couple of seconds).
pub struct OwnerDirectory {
    consumer: crate::client::Reader,
    changelog: String,
    cache: HashMap<i32, (Option<Owner>, Instant)>,
}

impl OwnerDirectory {
    pub fn new(settings: &KafkaSettings) -> Result<Self, Error> {
        Ok(Self { consumer: reader(settings)?, changelog: settings.changelog_topic.clone(), cache: HashMap::new() })
    }

    /// The current owner of `partition` (`None`: nobody took it yet).
    pub fn owner(&mut self, partition: i32) -> Result<Option<Owner>, Error> {
        if let Some((o, at)) = self.cache.get(&partition) {
            if at.elapsed() < OWNER_TTL {
                return Ok(o.clone());
            }
        }
        let o = self.look_up(partition)?;
        self.cache.insert(partition, (o.clone(), Instant::now()));
        Ok(o)
    }

    /// Forgets what was learned (after an answer proved it stale).
    pub fn forget(&mut self, partition: i32) {
        self.cache.remove(&partition);
    }

    /// Two reads with short waits (a query must not hang on a slow broker).
    fn look_up(&self, p: i32) -> Result<Option<Owner>, Error> {
        let stop = StopFlag::new();
        let deadline = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(LOOKUP_TIMEOUT);
            deadline.set();
        });
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.changelog, p, LOOKUP_TIMEOUT)
            .map_err(Error::broker(format!("{}/{p} offsets", self.changelog)))?;
        if high <= low {
            return Ok(None);
        }
        let mut epoch = None;
        read_range(&self.consumer, &self.changelog, p, (high - 1, high), &stop, |m| {
            epoch = if m.key() == Some(OWNER_KEY) {
                Some(m.offset())
            } else {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == EPOCH_HEADER))
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse().ok())
            };
            Ok(())
        })?;
        let Some(epoch) = epoch.filter(|e| *e >= low) else { return Ok(None) };
        let mut owner = None;
        read_range(&self.consumer, &self.changelog, p, (epoch, epoch + 1), &stop, |m| {
            if m.key() == Some(OWNER_KEY) {
                owner = m.payload().and_then(|v| serde_json::from_slice(v).ok());
            }
            Ok(())
        })?;
        Ok(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas_java_client() {
        // The cases of Kafka's `UtilsTest.testMurmur2`.
        for (key, hash) in [
            (&b"21"[..], -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key), hash, "{}", String::from_utf8_lossy(key));
        }
        assert_eq!(partition_for_key(b"foobar", 4, KeyPartitioner::Murmur2), (-790_332_482i32 & 0x7fff_ffff) % 4);
        assert_eq!(partition_for_key(b"x", 1, KeyPartitioner::Consistent), 0);
    }
}
