use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::Path;

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions,
    DB,
};
use segstream_scoring::CustomerState;

const CF_CUSTOMERS: &str = "customers";
const CF_TIMERS: &str = "timers";
const CF_META: &str = "meta";
/// Format 2 added `CustomerState::extra` (attributes and survey answers).
const STATE_FORMAT: u8 = 2;
const STATE_FORMAT_1: u8 = 1;
/// Committed timers read from RocksDB at a time.
const TIMER_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB failed (I/O, lock held by another process, …): fatal for the run.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt state for key {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl segstream_decode::Classify for StateError {
    /// Local storage that fails or holds bytes it cannot read is not retried:
    /// the run stops before committing, and a restart starts from the last commit.
    fn class(&self) -> segstream_decode::ErrorClass {
        segstream_decode::ErrorClass::Fatal
    }
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

/// A handle to a cached customer, valid until the next [`StateStore::commit`].
pub type SlotId = u32;

/// One cached customer. `state` is `None` for a customer that does not exist
/// (never seen, or erased).
#[derive(Debug)]
pub struct Slot {
    pub state: Option<CustomerState>,
    id: Box<str>,
    dirty: bool,
    used: bool,
    /// The timer as it is in the committed index: what a commit must delete
    /// when the customer's timer has moved.
    committed_timer: Option<i64>,
    /// Bumped on eviction, so that stale timer-heap entries are recognised.
    generation: u32,
}

impl Slot {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The customer id and its state, borrowed together.
    pub fn parts(&mut self) -> (&str, &mut Option<CustomerState>) {
        (&self.id, &mut self.state)
    }
}

/// Per-customer state, its timer index and the engine's metadata.
///
/// Timers: every customer's next boundary is `CustomerState::timer`; the
/// `timers` column family indexes them by due instant, rewritten only at
/// commit (one delete and one put per customer whose timer moved). Between
/// commits, timers set in memory go to a min-heap; committed ones are read
/// ahead in batches. Both may hold stale entries, so each candidate is checked
/// against the customer's current timer before it fires.
pub struct StateStore {
    db: DB,
    index: HashMap<Box<str>, SlotId, foldhash::fast::RandomState>,
    slots: Vec<Slot>,
    free: Vec<SlotId>,
    heap: BinaryHeap<Reverse<(i64, SlotId, u32)>>,
    /// Committed timers after the last scan position, in order.
    ahead: VecDeque<(i64, Box<str>)>,
    /// Every committed timer `≤ ahead_through` (and after the scan start) is
    /// in `ahead` or was consumed; `None` when nothing is loaded.
    ahead_through: Option<i64>,
    opts: StateOptions,
}

fn timer_key(due: i64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    // Flip the sign bit so that big-endian byte order is numeric order.
    k.extend_from_slice(&((due as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn parse_timer_key(k: &[u8]) -> Result<(i64, Box<str>), StateError> {
    let bad = || StateError::Corrupt { key: format!("{k:?}"), reason: "bad timer key".into() };
    let (due, id) = k.split_at_checked(8).ok_or_else(bad)?;
    let due = (u64::from_be_bytes(due.try_into().map_err(|_| bad())?) ^ (1 << 63)) as i64;
    let id = std::str::from_utf8(id).map_err(|_| bad())?;
    Ok((due, id.into()))
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
        Some((&STATE_FORMAT_1, rest)) => {
            // Format 1 lacks the last field (`extra`): append its `None`.
            let mut bytes = rest.to_vec();
            bytes.push(0);
            postcard::from_bytes(&bytes).map_err(|e| corrupt(e.to_string()))
        }
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
        Ok(Self {
            db,
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            heap: BinaryHeap::new(),
            ahead: VecDeque::new(),
            ahead_through: None,
            opts,
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }

    /// The slot of a customer, loaded from RocksDB on a cache miss.
    pub fn customer(&mut self, id: &str) -> Result<SlotId, StateError> {
        if let Some(&sid) = self.index.get(id) {
            self.slots[sid as usize].used = true;
            return Ok(sid);
        }
        let state = match self.db.get_pinned_cf(self.cf(CF_CUSTOMERS), id.as_bytes())? {
            Some(v) => Some(decode_state(id.as_bytes(), &v)?),
            None => None,
        };
        let committed_timer = state.as_ref().and_then(|s| s.timer);
        let sid = match self.free.pop() {
            Some(sid) => {
                let slot = &mut self.slots[sid as usize];
                slot.state = state;
                slot.id = id.into();
                slot.dirty = false;
                slot.used = true;
                slot.committed_timer = committed_timer;
                sid
            }
            None => {
                let sid = SlotId::try_from(self.slots.len()).expect("fewer than 2^32 cached customers");
                self.slots.push(Slot {
                    state,
                    id: id.into(),
                    dirty: false,
                    used: true,
                    committed_timer,
                    generation: 0,
                });
                sid
            }
        };
        self.index.insert(id.into(), sid);
        Ok(sid)
    }

    pub fn slot(&self, sid: SlotId) -> &Slot {
        &self.slots[sid as usize]
    }

    pub fn slot_mut(&mut self, sid: SlotId) -> &mut Slot {
        &mut self.slots[sid as usize]
    }

    /// Calls `f` for every customer changed since the last commit (state
    /// `None`: erased), in customer id order: what a commit will write.
    pub fn for_each_dirty(&self, mut f: impl FnMut(&str, Option<&CustomerState>)) {
        for slot in self.dirty_sorted() {
            f(&slot.id, slot.state.as_ref());
        }
    }

    fn dirty_sorted(&self) -> Vec<&Slot> {
        let mut dirty: Vec<&Slot> = self.slots.iter().filter(|s| s.dirty).collect();
        dirty.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        dirty
    }

    /// Marks a customer changed: written at the next commit, and its current
    /// timer (if any) becomes a candidate for [`StateStore::due`].
    pub fn touch(&mut self, sid: SlotId) {
        let slot = &mut self.slots[sid as usize];
        slot.dirty = true;
        if let Some(t) = slot.state.as_ref().and_then(|s| s.timer) {
            self.heap.push(Reverse((t, sid, slot.generation)));
        }
    }

    /// Loads committed timers until `ahead` covers `through` (or the end).
    fn fill_ahead(&mut self, after: i64, through: i64) -> Result<(), StateError> {
        while self.ahead_through.is_none_or(|t| t < through) {
            let from = self.ahead_through.map_or(after, |t| t.max(after)).saturating_add(1);
            let start = timer_key(from, "");
            let mut ro = ReadOptions::default();
            ro.set_iterate_lower_bound(start.clone());
            let mut last = None;
            let mut complete = true;
            let iter = self.db.iterator_cf_opt(self.cf(CF_TIMERS), ro, IteratorMode::From(&start, Direction::Forward));
            for (n, item) in iter.enumerate() {
                let (k, _) = item?;
                let (due, id) = parse_timer_key(&k)?;
                // A batch ends between two instants, never inside one.
                if n >= TIMER_BATCH && last != Some(due) {
                    complete = false;
                    break;
                }
                last = Some(due);
                self.ahead.push_back((due, id));
            }
            self.ahead_through = Some(if complete { i64::MAX } else { last.unwrap_or(i64::MAX) });
        }
        Ok(())
    }

    /// The customers whose current timer is in `(after, through]`, in
    /// (due, customer id) order. Loads them into the cache.
    pub fn due(&mut self, after: i64, through: i64) -> Result<Vec<SlotId>, StateError> {
        let mut found: Vec<(i64, SlotId)> = Vec::new();
        while let Some(&Reverse((due, sid, generation))) = self.heap.peek() {
            if due > through {
                break;
            }
            self.heap.pop();
            let slot = &self.slots[sid as usize];
            if due > after && slot.generation == generation && slot.state.as_ref().and_then(|s| s.timer) == Some(due) {
                found.push((due, sid));
            }
        }
        self.fill_ahead(after, through)?;
        while self.ahead.front().is_some_and(|(due, _)| *due <= through) {
            let (due, id) = self.ahead.pop_front().expect("checked non-empty");
            if due <= after {
                continue;
            }
            let sid = self.customer(&id)?;
            if self.slots[sid as usize].state.as_ref().and_then(|s| s.timer) == Some(due) {
                found.push((due, sid));
            }
        }
        found.sort_unstable_by(|a, b| (a.0, &self.slots[a.1 as usize].id).cmp(&(b.0, &self.slots[b.1 as usize].id)));
        found.dedup();
        Ok(found.into_iter().map(|(_, sid)| sid).collect())
    }

    /// A lower bound of the earliest timer after `after` (exact, or earlier
    /// when a stale entry is in the way): the engine needs no scan before it.
    pub fn next_due(&mut self, after: i64) -> Result<Option<i64>, StateError> {
        while self.ahead.front().is_some_and(|(due, _)| *due <= after) {
            self.ahead.pop_front();
        }
        if self.ahead.is_empty() && self.ahead_through != Some(i64::MAX) {
            let through = self.ahead_through.map_or(after, |t| t.max(after)).saturating_add(1);
            self.fill_ahead(after, through)?;
        }
        let heap = self.heap.peek().map(|Reverse((due, _, _))| *due);
        let committed = self.ahead.front().map(|(due, _)| *due);
        Ok(match (heap, committed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.db.get_cf(self.cf(CF_META), key.as_bytes())?)
    }

    /// Every committed meta entry whose key starts with `prefix`, in key order.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let mode = IteratorMode::From(prefix.as_bytes(), Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_META), mode) {
            let (k, v) = item?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            out.push((String::from_utf8_lossy(&k).into_owned(), v.into_vec()));
        }
        Ok(out)
    }

    /// Writes every changed customer, its timer move and the given meta
    /// entries in one synced `WriteBatch`, then trims the cache. Slot ids of
    /// evicted customers become invalid.
    pub fn commit(&mut self, meta: &[(String, Vec<u8>)]) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        let customers = self.cf(CF_CUSTOMERS);
        let timers = self.cf(CF_TIMERS);
        // In key order: memtable inserts in order reuse their skip-list
        // position and cost a fraction of random ones.
        let dirty = self.dirty_sorted();
        let mut timer_ops: Vec<(Vec<u8>, bool)> = Vec::new();
        for slot in dirty {
            match &slot.state {
                Some(st) => batch.put_cf(customers, slot.id.as_bytes(), encode_state(st)),
                None => batch.delete_cf(customers, slot.id.as_bytes()),
            }
            let timer = slot.state.as_ref().and_then(|s| s.timer);
            if timer != slot.committed_timer {
                if let Some(old) = slot.committed_timer {
                    timer_ops.push((timer_key(old, &slot.id), false));
                }
                if let Some(new) = timer {
                    timer_ops.push((timer_key(new, &slot.id), true));
                }
            }
        }
        timer_ops.sort_unstable();
        for (key, put) in timer_ops {
            if put {
                batch.put_cf(timers, key, []);
            } else {
                batch.delete_cf(timers, key);
            }
        }
        let meta_cf = self.cf(CF_META);
        for (k, v) in meta {
            batch.put_cf(meta_cf, k.as_bytes(), v);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        for slot in &mut self.slots {
            if slot.dirty {
                slot.dirty = false;
                slot.committed_timer = slot.state.as_ref().and_then(|s| s.timer);
            }
        }
        // Every timer is in the index now; the read-ahead may lack new ones.
        self.heap.clear();
        self.ahead.clear();
        self.ahead_through = None;
        self.trim_cache();
        Ok(())
    }

    /// Evicts customers not used since the last commit, then any, until the
    /// cache is within its capacity. Runs right after a commit: all are clean.
    fn trim_cache(&mut self) {
        let cap = self.opts.cache_customers;
        let mut excess = self.index.len().saturating_sub(cap);
        for pass in 0..2 {
            if excess == 0 {
                break;
            }
            for (sid, slot) in self.slots.iter_mut().enumerate() {
                if excess == 0 {
                    break;
                }
                let live = self.index.get(&slot.id) == Some(&(sid as SlotId));
                if live && (pass == 1 || !slot.used) {
                    self.index.remove(&slot.id);
                    slot.state = None;
                    slot.id = "".into();
                    slot.generation = slot.generation.wrapping_add(1);
                    self.free.push(sid as SlotId);
                    excess -= 1;
                }
            }
        }
        for s in &mut self.slots {
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

    /// Every committed timer, in order (for checks and tools; a full scan).
    pub fn committed_timers(&self) -> Result<Vec<(i64, String)>, StateError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_TIMERS), IteratorMode::Start) {
            let (k, _) = item?;
            let (due, id) = parse_timer_key(&k)?;
            out.push((due, id.into()));
        }
        Ok(out)
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
        self.index.len()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn states_of_the_earlier_format_still_read() {
        let st = CustomerState::new(1_767_225_600_000);
        let current = encode_state(&st);
        assert_eq!(current[0], STATE_FORMAT);
        // Format 1 is format 2 without the last field, `extra` (a 0 byte for None).
        assert_eq!(current.last(), Some(&0));
        let mut v1 = current[..current.len() - 1].to_vec();
        v1[0] = STATE_FORMAT_1;
        assert_eq!(decode_state(b"c", &v1).expect("format 1"), st);
        assert!(decode_state(b"c", &[9, 1, 2]).is_err());
    }

    use super::*;
    use segstream_decode::{Event, EventKind};

    fn state(ts: i64, timer: Option<i64>) -> CustomerState {
        let mut s = CustomerState::new(ts);
        s.apply(&Event { event_id: "e".into(), customer_id: "c".into(), ts, kind: EventKind::Login { user_id: None } });
        s.timer = timer;
        s
    }

    fn set(s: &mut StateStore, id: &str, st: Option<CustomerState>) {
        let sid = s.customer(id).expect("load");
        s.slot_mut(sid).state = st;
        s.touch(sid);
    }

    fn due_ids(s: &mut StateStore, after: i64, through: i64) -> Vec<String> {
        let sids = s.due(after, through).expect("due");
        sids.into_iter().map(|sid| s.slot(sid).id().to_string()).collect()
    }

    #[test]
    fn customers_and_meta_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = StateStore::open(dir.path(), StateOptions::default()).expect("open");
            let sid = s.customer("alice").expect("load");
            assert!(s.slot(sid).state.is_none());
            set(&mut s, "alice", Some(state(1000, Some(5000))));
            s.commit(&[("input".into(), b"42".to_vec())]).expect("commit");
            // A change that is never committed is lost with the process.
            set(&mut s, "bob", Some(state(5, None)));
        }
        let mut s = StateStore::open(dir.path(), StateOptions::default()).expect("reopen");
        assert_eq!(s.meta("input").expect("meta"), Some(b"42".to_vec()));
        let sid = s.customer("alice").expect("load");
        assert_eq!(s.slot(sid).state, Some(state(1000, Some(5000))));
        let sid = s.customer("bob").expect("load");
        assert!(s.slot(sid).state.is_none());
        assert_eq!(s.committed_timers().expect("scan"), vec![(5000, "alice".into())]);
    }

    #[test]
    fn due_merges_committed_and_uncommitted_timers_and_skips_stale_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = StateStore::open(dir.path(), StateOptions::default()).expect("open");
        set(&mut s, "a", Some(state(0, Some(10))));
        set(&mut s, "b", Some(state(0, Some(-5))));
        set(&mut s, "c", Some(state(0, Some(30))));
        s.commit(&[]).expect("commit");
        // Uncommitted moves: a's committed timer at 10 is now stale.
        set(&mut s, "a", Some(state(0, Some(25))));
        set(&mut s, "d", Some(state(0, Some(20))));
        set(&mut s, "d", Some(state(0, Some(21))));
        assert_eq!(s.next_due(-10).expect("peek"), Some(-5));
        assert_eq!(due_ids(&mut s, -10, 25), vec!["b", "d", "a"]);
        assert_eq!(due_ids(&mut s, 25, 100), vec!["c"]);
        s.commit(&[]).expect("commit");
        let timers = s.committed_timers().expect("scan");
        assert_eq!(timers, vec![(-5, "b".into()), (21, "d".into()), (25, "a".into()), (30, "c".into())]);
        assert_eq!(s.next_due(21).expect("peek"), Some(25));
        assert_eq!(due_ids(&mut s, 21, 29), vec!["a"]);
    }

    #[test]
    fn timers_of_evicted_customers_still_fire_and_batches_cover_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s =
            StateStore::open(dir.path(), StateOptions { cache_customers: 10, ..Default::default() }).expect("open");
        let n = TIMER_BATCH as i64 * 2 + 17;
        for i in 0..n {
            set(&mut s, &format!("c{i:05}"), Some(state(0, Some(1000 + i / 3))));
        }
        s.commit(&[]).expect("commit");
        assert!(s.cached_customers() <= 10);
        let mut fired = Vec::new();
        let mut w = 0;
        while let Some(next) = s.next_due(w).expect("peek") {
            let to = next + 97;
            fired.extend(due_ids(&mut s, w, to));
            w = to;
        }
        let want: Vec<String> = (0..n).map(|i| format!("c{i:05}")).collect();
        assert_eq!(fired, want);
    }

    #[test]
    fn erasure_deletes_every_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s =
            StateStore::open(dir.path(), StateOptions { cache_customers: 1, ..Default::default() }).expect("open");
        for id in ["x", "y", "z"] {
            set(&mut s, id, Some(state(1, Some(99))));
        }
        s.commit(&[]).expect("commit");
        assert!(s.cached_customers() <= 1);
        set(&mut s, "y", None);
        s.commit(&[]).expect("commit");
        let mut ids = Vec::new();
        s.for_each_customer(|id, _| ids.push(id.to_string())).expect("scan");
        assert_eq!(ids, vec!["x", "z"]);
        assert_eq!(s.committed_timers().expect("scan"), vec![(99, "x".into()), (99, "z".into())]);
        assert_eq!(due_ids(&mut s, 0, 100), vec!["x", "z"]);
    }

    #[test]
    fn corrupt_values_are_reported() {
        assert!(matches!(decode_state(b"k", &[9, 1]), Err(StateError::Corrupt { .. })));
        assert!(matches!(decode_state(b"k", &[]), Err(StateError::Corrupt { .. })));
        let st = state(77, None);
        assert_eq!(decode_state(b"k", &encode_state(&st)).expect("decodes"), st);
    }
}
