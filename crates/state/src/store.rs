use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};
use segstream_scoring::CustomerState;

const CF_CUSTOMERS: &str = "customers";
const CF_TIMERS: &str = "timers";
const CF_META: &str = "meta";
const STATE_FORMAT: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB failed (I/O, lock held by another process, …): fatal for the run.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt state for key {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Tuning of the store; defaults suit a laptop and a 2-core CI machine.
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// Customers kept in memory between commits (clean ones beyond this are evicted).
    pub cache_customers: usize,
    /// RocksDB block cache, bytes.
    pub block_cache_bytes: usize,
    /// RocksDB memtable size per column family, bytes.
    pub write_buffer_bytes: usize,
}

impl Default for StateOptions {
    fn default() -> Self {
        Self { cache_customers: 500_000, block_cache_bytes: 64 << 20, write_buffer_bytes: 32 << 20 }
    }
}

/// One cached customer. `state` is `None` for a customer that does not exist
/// (never seen, or erased); `dirty` marks it for the next commit.
#[derive(Debug)]
pub struct Slot {
    pub state: Option<CustomerState>,
    pub dirty: bool,
    used: bool,
}

pub struct StateStore {
    db: DB,
    cache: HashMap<Box<str>, Slot>,
    /// Timer changes not yet committed: `true` put, `false` delete.
    pending_timers: BTreeMap<(i64, Box<str>), bool>,
    opts: StateOptions,
}

fn timer_key(due: i64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    // Flip the sign bit so that big-endian byte order is numeric order.
    k.extend_from_slice(&((due as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn parse_timer_key(k: &[u8]) -> Option<(i64, String)> {
    let (due, id) = k.split_at_checked(8)?;
    let due = (u64::from_be_bytes(due.try_into().ok()?) ^ (1 << 63)) as i64;
    Some((due, String::from_utf8(id.to_vec()).ok()?))
}

/// Encodes a customer's state: a format byte, then postcard (varint) fields.
pub fn encode_state(st: &CustomerState) -> Vec<u8> {
    let mut out = vec![STATE_FORMAT];
    // Serializing plain data into a Vec cannot fail.
    out.extend(postcard::to_stdvec(st).expect("state serializes"));
    out
}

pub fn decode_state(key: &[u8], v: &[u8]) -> Result<CustomerState, StateError> {
    let corrupt = |reason: String| StateError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason };
    match v.split_first() {
        Some((&STATE_FORMAT, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string())),
        Some((v, _)) => Err(corrupt(format!("unknown state format {v}"))),
        None => Err(corrupt("empty value".into())),
    }
}

impl StateStore {
    pub fn open(dir: &Path, opts: StateOptions) -> Result<Self, StateError> {
        let cache = rocksdb::Cache::new_lru_cache(opts.block_cache_bytes);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        let mut cf_opts = Options::default();
        cf_opts.set_block_based_table_factory(&table);
        cf_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        cf_opts.set_write_buffer_size(opts.write_buffer_bytes);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        let cfs = [CF_CUSTOMERS, CF_TIMERS, CF_META].map(|n| ColumnFamilyDescriptor::new(n, cf_opts.clone()));
        let db = DB::open_cf_descriptors(&db_opts, dir, cfs)?;
        Ok(Self { db, cache: HashMap::new(), pending_timers: BTreeMap::new(), opts })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }

    /// The cached slot of a customer, loaded from RocksDB on a miss.
    pub fn customer(&mut self, id: &str) -> Result<&mut Slot, StateError> {
        if !self.cache.contains_key(id) {
            let state = match self.db.get_pinned_cf(self.cf(CF_CUSTOMERS), id.as_bytes())? {
                Some(v) => Some(decode_state(id.as_bytes(), &v)?),
                None => None,
            };
            self.cache.insert(id.into(), Slot { state, dirty: false, used: true });
        }
        let slot = self.cache.get_mut(id).expect("inserted above");
        slot.used = true;
        Ok(slot)
    }

    /// Moves a customer's timer from `old` to `new` in the index.
    pub fn set_timer(&mut self, id: &str, old: Option<i64>, new: Option<i64>) {
        if old == new {
            return;
        }
        if let Some(o) = old {
            self.pending_timers.insert((o, id.into()), false);
        }
        if let Some(n) = new {
            self.pending_timers.insert((n, id.into()), true);
        }
    }

    /// Every timer with `after < due ≤ through`, in (due, customer) order,
    /// including changes not yet committed.
    pub fn due_timers(&self, after: i64, through: i64) -> Result<Vec<(i64, String)>, StateError> {
        let mut out = Vec::new();
        if through <= after {
            return Ok(out);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(timer_key(after.saturating_add(1), ""));
        if through < i64::MAX {
            ro.set_iterate_upper_bound(timer_key(through + 1, ""));
        }
        let start = timer_key(after.saturating_add(1), "");
        for item in self.db.iterator_cf_opt(self.cf(CF_TIMERS), ro, IteratorMode::From(&start, Direction::Forward)) {
            let (k, _) = item?;
            let (due, id) = parse_timer_key(&k).ok_or_else(|| StateError::Corrupt {
                key: format!("{k:?}"),
                reason: "bad timer key".into(),
            })?;
            if self.pending_timers.get(&(due, id.as_str().into())) != Some(&false) {
                out.push((due, id));
            }
        }
        let lo = (after.saturating_add(1), Box::<str>::from(""));
        for ((due, id), put) in self.pending_timers.range(lo..) {
            if *due > through {
                break;
            }
            if *put {
                out.push((*due, id.to_string()));
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The earliest timer due after `after`, including changes not yet
    /// committed: one seek, not a scan.
    pub fn next_timer_after(&self, after: i64) -> Result<Option<i64>, StateError> {
        let lo = (after.saturating_add(1), Box::<str>::from(""));
        let pending = self.pending_timers.range(lo..).find(|(_, put)| **put).map(|((due, _), _)| *due);
        let mut ro = ReadOptions::default();
        let start = timer_key(after.saturating_add(1), "");
        ro.set_iterate_lower_bound(start.clone());
        if let Some(p) = pending {
            // Only an earlier committed timer can matter.
            ro.set_iterate_upper_bound(timer_key(p, ""));
        }
        for item in self.db.iterator_cf_opt(self.cf(CF_TIMERS), ro, IteratorMode::From(&start, Direction::Forward)) {
            let (k, _) = item?;
            let (due, id) = parse_timer_key(&k)
                .ok_or_else(|| StateError::Corrupt { key: format!("{k:?}"), reason: "bad timer key".into() })?;
            if self.pending_timers.get(&(due, id.into_boxed_str())) != Some(&false) {
                return Ok(Some(due));
            }
        }
        Ok(pending)
    }

    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.db.get_cf(self.cf(CF_META), key.as_bytes())?)
    }

    /// Writes every dirty customer, every timer change and the given meta
    /// entries in one synced `WriteBatch`, then trims the cache.
    pub fn commit(&mut self, meta: &[(String, Vec<u8>)]) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        let customers = self.cf(CF_CUSTOMERS);
        for (id, slot) in &self.cache {
            if slot.dirty {
                match &slot.state {
                    Some(st) => batch.put_cf(customers, id.as_bytes(), encode_state(st)),
                    None => batch.delete_cf(customers, id.as_bytes()),
                }
            }
        }
        let timers = self.cf(CF_TIMERS);
        for ((due, id), put) in &self.pending_timers {
            let k = timer_key(*due, id);
            if *put {
                batch.put_cf(timers, k, []);
            } else {
                batch.delete_cf(timers, k);
            }
        }
        let meta_cf = self.cf(CF_META);
        for (k, v) in meta {
            batch.put_cf(meta_cf, k.as_bytes(), v);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        self.pending_timers.clear();
        for slot in self.cache.values_mut() {
            slot.dirty = false;
        }
        self.trim_cache();
        Ok(())
    }

    /// Evicts clean customers not used since the last commit, then any clean
    /// ones, until the cache is within its capacity.
    fn trim_cache(&mut self) {
        let cap = self.opts.cache_customers;
        if self.cache.len() > cap {
            self.cache.retain(|_, s| std::mem::take(&mut s.used));
        }
        if self.cache.len() > cap {
            let mut excess = self.cache.len() - cap;
            self.cache.retain(|_, _| {
                if excess > 0 {
                    excess -= 1;
                    false
                } else {
                    true
                }
            });
        }
        for s in self.cache.values_mut() {
            s.used = false;
        }
    }

    /// Calls `f` for every committed customer, in key order.
    pub fn for_each_customer(&self, mut f: impl FnMut(&str, &CustomerState)) -> Result<(), StateError> {
        for item in self.db.iterator_cf(self.cf(CF_CUSTOMERS), IteratorMode::Start) {
            let (k, v) = item?;
            let st = decode_state(&k, &v)?;
            f(&String::from_utf8_lossy(&k), &st);
        }
        Ok(())
    }

    /// Compacts every column family (for size measurements and `compact` runs).
    pub fn compact(&self) {
        for cf in [CF_CUSTOMERS, CF_TIMERS, CF_META] {
            self.db.compact_range_cf(self.cf(cf), None::<&[u8]>, None::<&[u8]>);
        }
    }

    /// Total size of the live SST files, bytes.
    pub fn live_sst_bytes(&self) -> u64 {
        [CF_CUSTOMERS, CF_TIMERS, CF_META]
            .iter()
            .filter_map(|cf| self.db.property_int_value_cf(self.cf(cf), "rocksdb.live-sst-files-size").ok().flatten())
            .sum()
    }

    pub fn cached_customers(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segstream_decode::{Event, EventKind};

    fn state(ts: i64) -> CustomerState {
        let mut s = CustomerState::new(ts);
        s.apply(&Event { event_id: "e".into(), customer_id: "c".into(), ts, kind: EventKind::Login { user_id: None } });
        s
    }

    #[test]
    fn customers_and_meta_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = StateStore::open(dir.path(), StateOptions::default()).expect("open");
            let slot = s.customer("alice").expect("load");
            assert!(slot.state.is_none());
            slot.state = Some(state(1000));
            slot.dirty = true;
            s.commit(&[("input".into(), b"42".to_vec())]).expect("commit");
            // A change that is never committed is lost with the process.
            let slot = s.customer("bob").expect("load");
            slot.state = Some(state(5));
            slot.dirty = true;
        }
        let mut s = StateStore::open(dir.path(), StateOptions::default()).expect("reopen");
        assert_eq!(s.meta("input").expect("meta"), Some(b"42".to_vec()));
        assert_eq!(s.customer("alice").expect("load").state, Some(state(1000)));
        assert!(s.customer("bob").expect("load").state.is_none());
    }

    #[test]
    fn timers_merge_committed_and_pending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = StateStore::open(dir.path(), StateOptions::default()).expect("open");
        s.set_timer("a", None, Some(10));
        s.set_timer("b", None, Some(-5));
        s.set_timer("c", None, Some(30));
        s.commit(&[]).expect("commit");
        s.set_timer("a", Some(10), Some(25));
        s.set_timer("d", None, Some(20));
        assert_eq!(s.due_timers(-10, 25).expect("scan"), vec![(-5, "b".into()), (20, "d".into()), (25, "a".into())]);
        assert_eq!(s.due_timers(-5, 100).expect("scan").len(), 3);
        s.commit(&[]).expect("commit");
        assert_eq!(s.due_timers(i64::MIN, i64::MAX).expect("scan").len(), 4);
        s.set_timer("b", Some(-5), None);
        assert_eq!(s.due_timers(i64::MIN, 0).expect("scan"), vec![]);
        // Peeking agrees with scanning, across committed, pending and deleted timers.
        s.set_timer("e", None, Some(22));
        for after in [i64::MIN, -5, 0, 19, 20, 21, 22, 25, 30, 40] {
            let scanned = s.due_timers(after, i64::MAX).expect("scan").first().map(|(d, _)| *d);
            assert_eq!(s.next_timer_after(after).expect("peek"), scanned, "after {after}");
        }
    }

    #[test]
    fn erasure_deletes_every_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = StateStore::open(dir.path(), StateOptions { cache_customers: 1, ..Default::default() }).expect("open");
        for id in ["x", "y", "z"] {
            let slot = s.customer(id).expect("load");
            slot.state = Some(state(1));
            slot.dirty = true;
            s.set_timer(id, None, Some(99));
        }
        s.commit(&[]).expect("commit");
        assert!(s.cached_customers() <= 1);
        let slot = s.customer("y").expect("load");
        slot.state = None;
        slot.dirty = true;
        s.set_timer("y", Some(99), None);
        s.commit(&[]).expect("commit");
        let mut ids = Vec::new();
        s.for_each_customer(|id, _| ids.push(id.to_string())).expect("scan");
        assert_eq!(ids, vec!["x", "z"]);
        assert_eq!(s.due_timers(0, 100).expect("scan"), vec![(99, "x".into()), (99, "z".into())]);
    }

    #[test]
    fn corrupt_values_are_reported() {
        assert!(matches!(decode_state(b"k", &[9, 1]), Err(StateError::Corrupt { .. })));
        assert!(matches!(decode_state(b"k", &[]), Err(StateError::Corrupt { .. })));
        let st = state(77);
        assert_eq!(decode_state(b"k", &encode_state(&st)).expect("decodes"), st);
    }
}
