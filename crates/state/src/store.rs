use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::Path;

use compact_str::CompactString;
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions,
    DB,
};
use segstream_scoring::{CustomerState, Scores};

use crate::head::{StateHead, StoredState};

const CF_CUSTOMERS: &str = "customers";
const CF_TIMERS: &str = "timers";
const CF_META: &str = "meta";
/// Segment membership: group (u16, big-endian), segment (u16), customer id
/// → nothing. Kept at each commit from the customers it writes.
const CF_MEMBERS: &str = "members";
/// Per (group, segment): customers and the sum of their MRR (cents).
const META_SEGMENT_COUNTS: &str = "segments:counts";
/// Present once the membership index covers every customer.
const META_SEGMENT_INDEX: &str = "segments:index";
/// A customer's last transitions: id length (u16, big-endian), id, sequence
/// number (u32, big-endian) → a [`HistoryEntry`] (postcard).
const CF_HISTORY: &str = "history";
const ALL_CFS: [&str; 5] = [CF_CUSTOMERS, CF_TIMERS, CF_META, CF_MEMBERS, CF_HISTORY];
/// Format 2 added `CustomerState::extra` (attributes and survey answers),
/// format 3 `CustomerState::rules_version` and `pending`, format 4
/// `CustomerState::quantile_at`.
const STATE_FORMAT: u8 = 4;
const STATE_FORMAT_3: u8 = 3;
const STATE_FORMAT_2: u8 = 2;
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

/// One transition as a customer's history keeps it: groups and segments by
/// their index in the configuration (a state dir is bound to one).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryEntry {
    pub group: u16,
    pub from: Option<u16>,
    pub to: Option<u16>,
    pub at: i64,
    /// The event's id, or `None` for a time boundary; for a rule
    /// migration's entry, the previous segment's name when the new rules do
    /// not have it (`from` is then `None`).
    pub event_id: Option<String>,
    /// The boundary's kind bits (time boundaries).
    pub boundary: u8,
    pub scores: Scores,
    /// A rule migration: (from version, to version). Last, so that entries
    /// written before it read with `None` (see [`HistoryEntry::decode`]).
    pub rules: Option<(u32, u32)>,
    /// The rules version whose indexes `group`, `from` and `to` are (0: an
    /// entry written before versions were recorded), so that a migration
    /// renames each entry once.
    pub version: u32,
}

impl HistoryEntry {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a history entry serializes")
    }

    /// Reads an entry, also one written before `rules` or `version` existed
    /// (their zero bytes are appended).
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        match postcard::from_bytes(bytes) {
            Err(postcard::Error::DeserializeUnexpectedEnd) => {}
            other => return other,
        }
        // An earlier format: its missing last fields read as zeros.
        let mut longer = bytes.to_vec();
        longer.push(0);
        loop {
            match postcard::from_bytes(&longer) {
                Err(postcard::Error::DeserializeUnexpectedEnd) if longer.len() < bytes.len() + 2 => longer.push(0),
                other => return other,
            }
        }
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
    /// Transitions kept per customer (0: no history).
    pub history_per_customer: u32,
}

impl Default for StateOptions {
    fn default() -> Self {
        Self {
            cache_customers: 500_000,
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 32 << 20,
            history_per_customer: 50,
        }
    }
}

/// A handle to a cached customer, valid until the next [`StateStore::commit`].
pub type SlotId = u32;

/// One cached customer. `state` is `None` for a customer that does not exist
/// (never seen, or erased).
#[derive(Debug)]
pub struct Slot {
    pub state: Option<CustomerState>,
    id: CompactString,
    dirty: bool,
    used: bool,
    /// The timer as it is in the committed index: what a commit must delete
    /// when the customer's timer has moved.
    committed_timer: Option<i64>,
    /// Bumped on eviction, so that stale timer-heap entries are recognised.
    generation: u32,
    /// The labels and MRR as the membership index has them (`None`: not in
    /// it), for a commit to move the customer between segments.
    committed: Option<Membership>,
    /// History writes since the last commit, in order: (sequence number,
    /// entry or `None` to delete it).
    history: Vec<(u32, Option<HistoryEntry>)>,
    /// The customer was erased since the last commit: all its history goes
    /// (before the writes above).
    history_reset: bool,
    /// The sequence number of its next history entry, once looked up.
    history_next: Option<u32>,
}

fn history_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + id.len());
    k.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn history_key(id: &str, seq: u32) -> Vec<u8> {
    let mut k = history_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// What the membership index and the segment counters know of a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Membership {
    labels: Box<[u16]>,
    mrr_cents: i64,
}

impl Membership {
    fn of(st: Option<&CustomerState>) -> Option<Self> {
        st.map(|s| Self { labels: s.labels.clone().into_boxed_slice(), mrr_cents: s.mrr_cents })
    }
}

/// A customer [`StateStore::update_each`] changed: in the cache already, or
/// read from RocksDB (cached after the walk, with what its committed version holds).
enum Changed {
    Cached(SlotId),
    Loaded { id: Box<str>, state: Box<CustomerState>, timer: Option<i64>, committed: Option<Membership> },
}

/// See [`StateStore::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub live_data_bytes: u64,
    pub estimated_keys: u64,
    pub block_cache_bytes: u64,
    pub pending_compaction_bytes: u64,
    pub write_stopped: bool,
}

/// Customers and their summed MRR in one segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentCount {
    pub customers: i64,
    pub mrr_cents: i64,
}

fn encode_counts(counts: &std::collections::BTreeMap<(u16, u16), SegmentCount>) -> Vec<u8> {
    let pairs: Vec<((u16, u16), SegmentCount)> = counts.iter().map(|(k, c)| (*k, *c)).collect();
    postcard::to_stdvec(&pairs).expect("counts serialize")
}

/// The membership key of a customer in segment `label` of group `group`.
fn member_key(group: u16, label: u16, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + id.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(&label.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
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
    index: HashMap<CompactString, SlotId, foldhash::fast::RandomState>,
    slots: Vec<Slot>,
    free: Vec<SlotId>,
    heap: BinaryHeap<Reverse<(i64, SlotId, u32)>>,
    /// Committed timers after the last scan position, in order.
    ahead: VecDeque<(i64, Box<str>)>,
    /// Every committed timer `≤ ahead_through` (and after the scan start) is
    /// in `ahead` or was consumed; `None` when nothing is loaded.
    ahead_through: Option<i64>,
    opts: StateOptions,
    /// Per (group, segment), as of the last commit.
    counts: std::collections::BTreeMap<(u16, u16), SegmentCount>,
    /// Opened for writing (not a secondary reader): flushes its memtables
    /// when dropped.
    primary: bool,
    /// Customers changed since the last commit (slots with `dirty` set).
    dirty: usize,
    /// States a restore brought for customers not in the cache, written as
    /// they are by the next commit (`None`: erased); a customer loaded
    /// before then takes its state from here.
    restored: HashMap<Box<str>, Restored, foldhash::fast::RandomState>,
}

/// What a restore brought for a customer not in the cache.
#[derive(Debug, Default)]
struct Restored {
    /// Its state (`Some(None)`: erased); `None`: not restored.
    state: Option<Option<StoredState>>,
    /// History writes, in order (`None`: a deletion), after the erasure
    /// of all before when `reset` (the customer was erased).
    history: Vec<(u32, Option<HistoryEntry>)>,
    reset: bool,
}

impl Drop for StateStore {
    /// A clean stop flushes every column family's memtable to SST files, so
    /// the next open does not replay the write-ahead log (RocksDB does not
    /// flush at close while the WAL is on). What is flushed is only what was
    /// committed; a crash skips this and the WAL replay covers it.
    fn drop(&mut self) {
        if self.primary {
            if let Err(e) = self.flush() {
                tracing::warn!(error = %e, "flushing the state at stop failed; the next open replays the write-ahead log");
            }
        }
    }
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
    let mut out = Vec::new();
    encode_state_into(st, &mut out);
    out
}

/// [`encode_state`] into `out`, replacing what it held (a buffer reused
/// across a commit's customers).
pub fn encode_state_into(st: &CustomerState, out: &mut Vec<u8>) {
    let mut buf = std::mem::take(out);
    buf.clear();
    buf.push(STATE_FORMAT);
    // Serializing plain data into a Vec cannot fail.
    *out = postcard::to_extend(st, buf).expect("state serializes");
}

/// The membership changes and count deltas of a customer moving from
/// `before` to `now` ((segments, MRR); `None`: no state).
fn membership_ops(
    id: &str,
    before: Option<(&[u16], i64)>,
    now: Option<(&[u16], i64)>,
    deltas: &mut Vec<((u16, u16), i64, i64)>,
    member_ops: &mut Vec<(Vec<u8>, bool)>,
) {
    if now == before {
        return;
    }
    if let Some((labels, mrr)) = before {
        for (g, &l) in labels.iter().enumerate() {
            let g = u16::try_from(g).unwrap_or(u16::MAX);
            deltas.push(((g, l), -1, -mrr));
            if now.is_none_or(|(n, _)| n.get(usize::from(g)) != Some(&l)) {
                member_ops.push((member_key(g, l, id), false));
            }
        }
    }
    if let Some((labels, mrr)) = now {
        for (g, &l) in labels.iter().enumerate() {
            let g = u16::try_from(g).unwrap_or(u16::MAX);
            deltas.push(((g, l), 1, mrr));
            if before.is_none_or(|(b, _)| b.get(usize::from(g)) != Some(&l)) {
                member_ops.push((member_key(g, l, id), true));
            }
        }
    }
}

/// The timer index change of a customer whose timer moves from `before` to `now`.
fn timer_op(id: &str, before: Option<i64>, now: Option<i64>, ops: &mut Vec<(Vec<u8>, bool)>) {
    if now != before {
        if let Some(old) = before {
            ops.push((timer_key(old, id), false));
        }
        if let Some(new) = now {
            ops.push((timer_key(new, id), true));
        }
    }
}

/// Whether `f` is a state format this build reads.
pub(crate) fn known_format(f: u8) -> bool {
    matches!(f, STATE_FORMAT | STATE_FORMAT_3 | STATE_FORMAT_2 | STATE_FORMAT_1)
}

pub fn decode_state(key: &[u8], v: &[u8]) -> Result<CustomerState, StateError> {
    let corrupt = |reason: String| StateError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason };
    match v.split_first() {
        Some((&STATE_FORMAT, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string())),
        Some((&STATE_FORMAT_3, rest)) => {
            // Format 3 lacks the last field, `quantile_at`: append a 0.
            let mut bytes = rest.to_vec();
            bytes.push(0);
            postcard::from_bytes(&bytes).map_err(|e| corrupt(e.to_string()))
        }
        Some((&STATE_FORMAT_2, rest)) => {
            // Format 2 lacks `rules_version` and `pending` too: append a 0
            // and an empty list.
            let mut bytes = rest.to_vec();
            bytes.extend([0, 0, 0]);
            postcard::from_bytes(&bytes).map_err(|e| corrupt(e.to_string()))
        }
        Some((&STATE_FORMAT_1, rest)) => {
            // Format 1 lacks `extra` too: append its `None`.
            let mut bytes = rest.to_vec();
            bytes.extend([0, 0, 0, 0]);
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
        // A column family written rarely (meta, members) would otherwise keep
        // its memtable, and with it every WAL file since, alive for the next
        // open to replay (before stops flushed, 1.85 s at 100k customers and
        // 7.6 s at 1M; a crash still replays). Past this total, which is what
        // full memtables of every column family hold, RocksDB flushes the
        // column families that pin the oldest WAL; a lower bound would flush
        // the busy ones early.
        let wal_bytes = ALL_CFS.len() as u64 * opts.write_buffer_bytes as u64;
        db_opts.set_max_total_wal_size(wal_bytes);
        let cfs = ALL_CFS.map(|n| ColumnFamilyDescriptor::new(n, cf_opts.clone()));
        let db = DB::open_cf_descriptors(&db_opts, dir, cfs)?;
        let mut store = Self::with_db(db, opts, true);
        store.counts = store.read_counts()?;
        if store.meta(META_SEGMENT_INDEX)?.is_none() {
            store.build_segment_index()?;
        }
        Ok(store)
    }

    /// Opens a state dir for reading next to the process that writes it (a
    /// RocksDB secondary instance, which keeps its own files under
    /// `secondary`): [`StateStore::catch_up`] brings in what that process
    /// committed since.
    pub fn open_reader(dir: &Path, secondary: &Path) -> Result<Self, StateError> {
        let mut db_opts = Options::default();
        db_opts.set_max_open_files(-1);
        let db = DB::open_cf_as_secondary(&db_opts, dir, secondary, ALL_CFS)?;
        let mut store = Self::with_db(db, StateOptions::default(), false);
        if store.meta(META_SEGMENT_INDEX)?.is_none() {
            return Err(StateError::Corrupt {
                key: META_SEGMENT_INDEX.into(),
                reason: format!(
                    "{} has no segment index yet: run `segstream run` on it once with this version",
                    dir.display()
                ),
            });
        }
        store.counts = store.read_counts()?;
        Ok(store)
    }

    /// Reads what the writing process committed since the last call.
    pub fn catch_up(&mut self) -> Result<(), StateError> {
        self.db.try_catch_up_with_primary()?;
        self.counts = self.read_counts()?;
        Ok(())
    }

    /// Writes every column family's memtable to SST files (what was
    /// committed; done at a clean stop, see `Drop`).
    pub fn flush(&self) -> Result<(), StateError> {
        let cfs: Vec<_> = ALL_CFS.iter().map(|n| self.cf(n)).collect();
        self.db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?;
        Ok(())
    }

    fn with_db(db: DB, opts: StateOptions, primary: bool) -> Self {
        Self {
            db,
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            heap: BinaryHeap::new(),
            ahead: VecDeque::new(),
            ahead_through: None,
            opts,
            counts: std::collections::BTreeMap::new(),
            primary,
            dirty: 0,
            restored: HashMap::default(),
        }
    }

    fn read_counts(&self) -> Result<std::collections::BTreeMap<(u16, u16), SegmentCount>, StateError> {
        match self.meta(META_SEGMENT_COUNTS)? {
            None => Ok(std::collections::BTreeMap::new()),
            Some(v) => {
                let pairs: Vec<((u16, u16), SegmentCount)> = postcard::from_bytes(&v)
                    .map_err(|e| StateError::Corrupt { key: META_SEGMENT_COUNTS.into(), reason: e.to_string() })?;
                Ok(pairs.into_iter().collect())
            }
        }
    }

    /// Builds the membership index and the counters from every committed
    /// customer (a state dir of an earlier version), streaming through them.
    fn build_segment_index(&mut self) -> Result<(), StateError> {
        let members = self.cf(CF_MEMBERS);
        // An earlier attempt may have stopped half-way.
        self.db.delete_range_cf(members, &[][..], &[0xffu8; 5][..])?;
        let mut counts = std::collections::BTreeMap::<(u16, u16), SegmentCount>::new();
        let mut batch = WriteBatch::default();
        let mut n = 0u64;
        for item in self.db.iterator_cf(self.cf(CF_CUSTOMERS), IteratorMode::Start) {
            let (k, v) = item?;
            let st = decode_state(&k, &v)?;
            let id = String::from_utf8_lossy(&k);
            for (g, &label) in st.labels.iter().enumerate() {
                let g = u16::try_from(g).unwrap_or(u16::MAX);
                batch.put_cf(members, member_key(g, label, &id), []);
                let c = counts.entry((g, label)).or_default();
                c.customers += 1;
                c.mrr_cents = c.mrr_cents.saturating_add(st.mrr_cents);
            }
            n += 1;
            if batch.len() >= 100_000 {
                self.db.write(std::mem::take(&mut batch))?;
            }
        }
        self.counts = counts;
        let meta = self.cf(CF_META);
        batch.put_cf(meta, META_SEGMENT_COUNTS, encode_counts(&self.counts));
        batch.put_cf(meta, META_SEGMENT_INDEX, b"1");
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        if n > 0 {
            tracing::info!(customers = n, "built the segment membership index of an earlier state dir");
        }
        Ok(())
    }

    /// The next history sequence number of the customer in `sid`.
    fn history_next(&mut self, sid: SlotId) -> Result<u32, StateError> {
        if let Some(n) = self.slots[sid as usize].history_next {
            return Ok(n);
        }
        let n = self.next_history_seq(&self.slots[sid as usize].id)?;
        self.slots[sid as usize].history_next = Some(n);
        Ok(n)
    }

    /// Keeps a transition of the customer in `sid` for its history (written
    /// at the next commit, with the customer); the oldest kept one beyond
    /// `history_per_customer` goes.
    pub fn record_history(&mut self, sid: SlotId, entry: HistoryEntry) -> Result<(), StateError> {
        let keep = self.opts.history_per_customer;
        if keep == 0 {
            return Ok(());
        }
        let seq = self.history_next(sid)?;
        let slot = &mut self.slots[sid as usize];
        slot.history.push((seq, Some(entry)));
        if let Some(old) = seq.checked_sub(keep) {
            slot.history.push((old, None));
        }
        slot.history_next = Some(seq.saturating_add(1));
        Ok(())
    }

    /// The customer in `sid` was erased: its history goes with it.
    pub fn erase_history(&mut self, sid: SlotId) -> Result<(), StateError> {
        let next = self.history_next(sid)?;
        let keep = self.opts.history_per_customer;
        let slot = &mut self.slots[sid as usize];
        for seq in next.saturating_sub(keep.max(1))..next {
            slot.history.push((seq, None));
        }
        slot.history_reset = true;
        slot.history_next = Some(0);
        Ok(())
    }

    /// Writes a history entry as a restore found it (`None`: deleted). The
    /// next sequence number is looked up again after the commit that writes
    /// it (an erasure may have restarted the numbering).
    pub fn restore_history(&mut self, sid: SlotId, seq: u32, entry: Option<HistoryEntry>) {
        let slot = &mut self.slots[sid as usize];
        slot.history_next = None;
        slot.history.push((seq, entry));
    }

    /// Calls `f` for every customer whose history changed since the last
    /// commit: its history writes in order (`None`: a deletion).
    pub fn for_each_history_change(&self, mut f: impl FnMut(&str, &[(u32, Option<HistoryEntry>)])) {
        for slot in self.dirty_sorted() {
            if !slot.history.is_empty() {
                f(&slot.id, &slot.history);
            }
        }
    }

    /// A customer's kept transitions, oldest first (committed ones).
    pub fn history(&self, id: &str) -> Result<Vec<HistoryEntry>, StateError> {
        Ok(self.history_with_seqs(id)?.into_iter().map(|(_, e)| e).collect())
    }

    /// A customer's kept transitions with their sequence numbers, oldest
    /// first (committed ones).
    pub fn history_with_seqs(&self, id: &str) -> Result<Vec<(u32, HistoryEntry)>, StateError> {
        let prefix = history_prefix(id);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_HISTORY), IteratorMode::From(&prefix, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 4 {
                break;
            }
            let seq = u32::from_be_bytes(k[prefix.len()..].try_into().expect("4 bytes"));
            let e =
                HistoryEntry::decode(&v).map_err(|e| StateError::Corrupt { key: id.into(), reason: e.to_string() })?;
            out.push((seq, e));
        }
        Ok(out)
    }

    /// Up to `max` committed customer ids after `after` (from the first
    /// when `None`), in id order: a bounded walk through every customer.
    pub fn customer_ids_after(&self, after: Option<&str>, max: usize) -> Result<Vec<String>, StateError> {
        self.settled();
        let start = after.map(|a| a.as_bytes().to_vec()).unwrap_or_default();
        let mode = IteratorMode::From(&start, Direction::Forward);
        let mut out = Vec::with_capacity(max.min(1 << 16));
        for item in self.db.iterator_cf(self.cf(CF_CUSTOMERS), mode) {
            let (k, _) = item?;
            if after.is_some_and(|a| a.as_bytes() == &*k) {
                continue;
            }
            if out.len() >= max {
                break;
            }
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }

    /// One kept history entry of a customer (committed).
    pub fn history_entry(&self, id: &str, seq: u32) -> Result<Option<HistoryEntry>, StateError> {
        match self.db.get_pinned_cf(self.cf(CF_HISTORY), history_key(id, seq))? {
            Some(v) => Ok(Some(
                HistoryEntry::decode(&v).map_err(|e| StateError::Corrupt { key: id.into(), reason: e.to_string() })?,
            )),
            None => Ok(None),
        }
    }

    /// The next history sequence number of a customer (after its last kept entry).
    fn next_history_seq(&self, id: &str) -> Result<u32, StateError> {
        let upper = history_key(id, u32::MAX);
        let mut it = self.db.raw_iterator_cf(self.cf(CF_HISTORY));
        it.seek_for_prev(&upper);
        if it.valid() {
            if let Some(k) = it.key() {
                let prefix = history_prefix(id);
                if k.len() == prefix.len() + 4 && k.starts_with(&prefix) {
                    let seq: [u8; 4] = k[prefix.len()..].try_into().expect("4 bytes");
                    return Ok(u32::from_be_bytes(seq).saturating_add(1));
                }
            }
        }
        it.status()?;
        Ok(0)
    }

    /// Customers and MRR per (group, segment) now: the last commit's counts
    /// moved by the customers changed since.
    pub fn live_counts(&self) -> std::collections::BTreeMap<(u16, u16), SegmentCount> {
        self.settled();
        let mut counts = self.counts.clone();
        for slot in self.slots.iter().filter(|s| s.dirty) {
            for (m, sign) in [(slot.committed.clone(), -1), (Membership::of(slot.state.as_ref()), 1)] {
                if let Some(m) = m {
                    for (g, &l) in m.labels.iter().enumerate() {
                        let e = counts.entry((u16::try_from(g).unwrap_or(u16::MAX), l)).or_default();
                        e.customers += sign;
                        e.mrr_cents = e.mrr_cents.saturating_add(sign * m.mrr_cents);
                    }
                }
            }
        }
        counts.retain(|_, v| *v != SegmentCount::default());
        counts
    }

    /// Customers and MRR per (group, segment) as of the last commit.
    pub fn segment_counts(&self) -> &std::collections::BTreeMap<(u16, u16), SegmentCount> {
        &self.counts
    }

    /// Up to `limit` members of segment `label` of group `group`, in
    /// customer id order, after customer `after` (exclusive).
    pub fn members(
        &self,
        group: u16,
        label: u16,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StateError> {
        let prefix = member_key(group, label, "");
        let mut start = member_key(group, label, after.unwrap_or(""));
        if after.is_some() {
            start.push(0); // the smallest key after `after`
        }
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_MEMBERS), IteratorMode::From(&start, Direction::Forward)) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    /// A customer's committed state, read without the cache (for readers).
    pub fn committed_customer(&self, id: &str) -> Result<Option<CustomerState>, StateError> {
        match self.db.get_pinned_cf(self.cf(CF_CUSTOMERS), id.as_bytes())? {
            Some(v) => Ok(Some(decode_state(id.as_bytes(), &v)?)),
            None => Ok(None),
        }
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
        let restored = match self.restored.remove(id) {
            Some(r) => {
                let st = r.state.map(|s| s.map(|s| s.decode(id.as_bytes())).transpose()).transpose()?;
                Some((st, r.history, r.reset))
            }
            None => None,
        };
        let committed_timer = state.as_ref().and_then(|s| s.timer);
        let committed = Membership::of(state.as_ref());
        // No committed state, no kept history (an erasure deletes both in
        // one commit): its numbering starts at 0 without a lookup.
        let history_next = if state.is_none() { Some(0) } else { None };
        let sid = self.insert_slot(id, state, committed_timer, committed, history_next);
        if let Some((st, history, reset)) = restored {
            let slot = &mut self.slots[sid as usize];
            if let Some(st) = st {
                slot.state = st;
            }
            if reset || !history.is_empty() {
                slot.history = history;
                slot.history_reset = reset;
                slot.history_next = None;
            }
            self.touch(sid);
        }
        Ok(sid)
    }

    /// A customer's state as a restore found it (`None`: erased), written
    /// at the next commit. A customer in the cache takes it decoded; any
    /// other keeps it as it came until then, undecoded (ADR 011).
    pub fn restore_state(&mut self, id: &str, state: Option<StoredState>) -> Result<(), StateError> {
        // An erasure takes the history before it; what is restored after
        // it (a customer that came back) stays.
        let erased = state.is_none();
        if let Some(&sid) = self.index.get(id) {
            let slot = &mut self.slots[sid as usize];
            slot.state = state.map(|s| s.decode(id.as_bytes())).transpose()?;
            if erased {
                slot.history.clear();
                slot.history_reset = true;
                slot.history_next = None;
            }
            self.touch(sid);
        } else {
            let r = self.restored_entry(id);
            r.state = Some(state);
            if erased {
                r.history.clear();
                r.reset = true;
            }
        }
        Ok(())
    }

    fn restored_entry(&mut self, id: &str) -> &mut Restored {
        if !self.restored.contains_key(id) {
            self.restored.insert(id.into(), Restored::default());
        }
        self.restored.get_mut(id).expect("inserted")
    }

    /// Writes a history entry as a restore found it (`None`: deleted), at
    /// the next commit. The next sequence number is looked up again after
    /// that commit (an erasure may have restarted the numbering).
    pub fn restore_history_of(&mut self, id: &str, seq: u32, entry: Option<HistoryEntry>) {
        match self.index.get(id) {
            Some(&sid) => {
                self.restore_history(sid, seq, entry);
                self.touch(sid);
            }
            None => self.restored_entry(id).history.push((seq, entry)),
        }
    }

    /// Restored states wait for the next commit, and what reads the current
    /// customers does not see them: a caller commits after a restore.
    fn settled(&self) {
        assert!(self.restored.is_empty(), "restored customer states are read only after the commit that writes them");
    }

    /// Caches a customer not in the cache, with what its committed version holds.
    fn insert_slot(
        &mut self,
        id: &str,
        state: Option<CustomerState>,
        committed_timer: Option<i64>,
        committed: Option<Membership>,
        history_next: Option<u32>,
    ) -> SlotId {
        let sid = match self.free.pop() {
            Some(sid) => {
                let slot = &mut self.slots[sid as usize];
                slot.state = state;
                slot.id = id.into();
                slot.dirty = false;
                slot.used = true;
                slot.committed_timer = committed_timer;
                slot.committed = committed;
                slot.history.clear();
                slot.history_reset = false;
                slot.history_next = history_next;
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
                    committed,
                    history: Vec::new(),
                    history_reset: false,
                    history_next,
                });
                sid
            }
        };
        self.index.insert(id.into(), sid);
        sid
    }

    /// Calls `f` for every customer that exists now (the cached version
    /// where the cache holds one, else the committed one), in no order.
    pub fn for_each_current(&self, mut f: impl FnMut(&str, &CustomerState)) -> Result<(), StateError> {
        self.settled();
        for (id, &sid) in &self.index {
            if let Some(st) = &self.slots[sid as usize].state {
                f(id, st);
            }
        }
        for item in self.db.iterator_cf(self.cf(CF_CUSTOMERS), IteratorMode::Start) {
            let (k, v) = item?;
            let id = String::from_utf8_lossy(&k);
            if !self.index.contains_key(&*id) {
                f(&id, &decode_state(&k, &v)?);
            }
        }
        Ok(())
    }

    /// Calls `f` on every customer that exists now, in id order, and
    /// returns the customers it changed (those for which it returned true:
    /// cached and marked as by [`StateStore::touch`]), in that order. A
    /// customer it leaves unchanged is not cached by the walk, so memory
    /// grows with the changes only.
    pub fn update_each(
        &mut self,
        mut f: impl FnMut(&str, &mut CustomerState) -> bool,
    ) -> Result<Vec<SlotId>, StateError> {
        self.settled();
        let mut cached: Vec<(CompactString, SlotId)> = self.index.iter().map(|(k, v)| (k.clone(), *v)).collect();
        cached.sort_unstable();
        let mut next = 0;
        let mut changed: Vec<Changed> = Vec::new();
        let cf = self.db.cf_handle(CF_CUSTOMERS).expect("column families are created at open");
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            let id = String::from_utf8_lossy(&k);
            while next < cached.len() && *cached[next].0 <= *id {
                let (cid, sid) = &cached[next];
                next += 1;
                if let Some(st) = &mut self.slots[*sid as usize].state {
                    if f(cid, st) {
                        changed.push(Changed::Cached(*sid));
                    }
                }
            }
            if next > 0 && *cached[next - 1].0 == *id {
                continue;
            }
            let mut st = decode_state(&k, &v)?;
            let (timer, committed) = (st.timer, Membership::of(Some(&st)));
            if f(&id, &mut st) {
                changed.push(Changed::Loaded { id: id.into(), state: Box::new(st), timer, committed });
            }
        }
        for (cid, sid) in &cached[next..] {
            if let Some(st) = &mut self.slots[*sid as usize].state {
                if f(cid, st) {
                    changed.push(Changed::Cached(*sid));
                }
            }
        }
        let mut out = Vec::with_capacity(changed.len());
        for c in changed {
            let sid = match c {
                Changed::Cached(sid) => sid,
                Changed::Loaded { id, state, timer, committed } => {
                    self.insert_slot(&id, Some(*state), timer, committed, None)
                }
            };
            self.touch(sid);
            out.push(sid);
        }
        Ok(out)
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
        self.settled();
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
        self.dirty += usize::from(!slot.dirty);
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
        self.settled();
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
        self.settled();
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
        // In key order: memtable inserts in order reuse their skip-list
        // position and cost a fraction of random ones.
        let dirty = self.dirty_sorted();
        // Room for a typical customer's record and keys, so that the batch
        // is not copied as it doubles.
        let mut batch = WriteBatch::with_capacity_bytes(dirty.len() * 384);
        let customers = self.cf(CF_CUSTOMERS);
        let timers = self.cf(CF_TIMERS);
        let mut timer_ops: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut member_ops: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut deltas: Vec<((u16, u16), i64, i64)> = Vec::new();
        for slot in &dirty {
            let now = slot.state.as_ref().map(|s| (&s.labels[..], s.mrr_cents));
            let before = slot.committed.as_ref().map(|m| (&m.labels[..], m.mrr_cents));
            membership_ops(&slot.id, before, now, &mut deltas, &mut member_ops);
        }
        let mut value = Vec::new();
        for slot in &dirty {
            match &slot.state {
                Some(st) => {
                    encode_state_into(st, &mut value);
                    batch.put_cf(customers, slot.id.as_bytes(), &value);
                }
                None => batch.delete_cf(customers, slot.id.as_bytes()),
            }
            timer_op(&slot.id, slot.committed_timer, slot.state.as_ref().and_then(|s| s.timer), &mut timer_ops);
        }
        // Restored states, as they came (ADR 011), against the committed
        // ones' heads.
        let mut restored: Vec<(&str, &Restored)> = self.restored.iter().map(|(id, r)| (&**id, r)).collect();
        restored.sort_unstable_by_key(|(id, _)| *id);
        for (id, r) in &restored {
            let Some(state) = &r.state else { continue };
            let before = match self.db.get_pinned_cf(customers, id.as_bytes())? {
                Some(v) => Some(StateHead::read(id.as_bytes(), &v)?),
                None => None,
            };
            let now = state.as_ref().map(StoredState::head);
            membership_ops(
                id,
                before.as_ref().map(|h| (&h.labels[..], h.mrr_cents)),
                now.map(|h| (&h.labels[..], h.mrr_cents)),
                &mut deltas,
                &mut member_ops,
            );
            timer_op(id, before.and_then(|h| h.timer), now.and_then(|h| h.timer), &mut timer_ops);
            match state {
                Some(st) => batch.put_cf(customers, id.as_bytes(), st.bytes()),
                None => batch.delete_cf(customers, id.as_bytes()),
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
        let history = self.cf(CF_HISTORY);
        let delete_history = |batch: &mut WriteBatch, id: &str| {
            let prefix = history_prefix(id);
            let mut end = prefix.clone();
            end.extend_from_slice(&[0xff; 5]);
            batch.delete_range_cf(history, &prefix, &end);
        };
        let write_history = |batch: &mut WriteBatch, id: &str, writes: &[(u32, Option<HistoryEntry>)]| {
            for (seq, entry) in writes {
                match entry {
                    Some(e) => batch.put_cf(history, history_key(id, *seq), e.encode()),
                    None => batch.delete_cf(history, history_key(id, *seq)),
                }
            }
        };
        for slot in &dirty {
            // Erased: its history goes with it, then what came after the
            // erasure is written. A customer without a state that never
            // had one keeps the history a restore wrote for it (its state
            // comes later in the changelog, after this commit).
            let erased = slot.state.is_none() && slot.committed.is_some() && !slot.history_reset;
            if slot.history_reset || erased {
                delete_history(&mut batch, &slot.id);
            }
            if !erased {
                write_history(&mut batch, &slot.id, &slot.history);
            }
        }
        for (id, r) in &restored {
            if r.reset {
                delete_history(&mut batch, id);
            }
            write_history(&mut batch, id, &r.history);
        }
        member_ops.sort_unstable();
        let members = self.cf(CF_MEMBERS);
        for (key, put) in member_ops {
            if put {
                batch.put_cf(members, key, []);
            } else {
                batch.delete_cf(members, key);
            }
        }
        let mut counts = None;
        if !deltas.is_empty() {
            let mut c = self.counts.clone();
            for (k, n, mrr) in deltas {
                let e = c.entry(k).or_default();
                e.customers += n;
                e.mrr_cents = e.mrr_cents.saturating_add(mrr);
            }
            c.retain(|_, v| *v != SegmentCount::default());
            counts = Some(c);
        }
        let meta_cf = self.cf(CF_META);
        if let Some(c) = &counts {
            batch.put_cf(meta_cf, META_SEGMENT_COUNTS, encode_counts(c));
        }
        for (k, v) in meta {
            batch.put_cf(meta_cf, k.as_bytes(), v);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        if let Some(c) = counts {
            self.counts = c;
        }
        self.dirty = 0;
        self.restored.clear();
        for slot in &mut self.slots {
            if slot.dirty {
                slot.dirty = false;
                slot.committed_timer = slot.state.as_ref().and_then(|s| s.timer);
                slot.committed = Membership::of(slot.state.as_ref());
                slot.history.clear();
                slot.history_reset = false;
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
        for cf in ALL_CFS {
            self.db.compact_range_cf(self.cf(cf), None::<&[u8]>, None::<&[u8]>);
        }
    }

    /// Total size of the live SST files, bytes.
    pub fn live_sst_bytes(&self) -> u64 {
        self.live_sst_bytes_per_cf().iter().map(|(_, bytes)| bytes).sum()
    }

    /// Size of the live SST files of each column family, bytes.
    pub fn live_sst_bytes_per_cf(&self) -> Vec<(&'static str, u64)> {
        let live = |cf: &str| self.db.property_int_value_cf(self.cf(cf), "rocksdb.live-sst-files-size").ok().flatten();
        ALL_CFS.iter().map(|cf| (*cf, live(cf).unwrap_or(0))).collect()
    }

    /// RocksDB's figures for monitoring (estimates, cheap to read).
    pub fn stats(&self) -> StoreStats {
        let int = |cf: &str, name: &str| self.db.property_int_value_cf(self.cf(cf), name).ok().flatten().unwrap_or(0);
        let sum = |name: &str| ALL_CFS.iter().map(|cf| int(cf, name)).sum::<u64>();
        StoreStats {
            live_data_bytes: sum("rocksdb.estimate-live-data-size"),
            estimated_keys: int(CF_CUSTOMERS, "rocksdb.estimate-num-keys"),
            block_cache_bytes: int(CF_CUSTOMERS, "rocksdb.block-cache-usage"),
            pending_compaction_bytes: sum("rocksdb.estimate-pending-compaction-bytes"),
            write_stopped: self.db.property_int_value("rocksdb.is-write-stopped").ok().flatten().unwrap_or(0) > 0,
        }
    }

    pub fn cached_customers(&self) -> usize {
        self.index.len()
    }

    /// Whether the customers changed since the last commit fill a quarter of
    /// `cache_customers`. They stay cached until a commit writes them (the
    /// cache is trimmed only then), so committing at this point holds the
    /// cache to 1.25 × its capacity whatever `commit_every_records` is. Being
    /// a function of the records since the last commit, it commits at the
    /// same records in a resumed run as in an uninterrupted one.
    pub fn commit_due(&self) -> bool {
        self.dirty >= (self.opts.cache_customers / 4).max(1)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn states_of_the_earlier_format_still_read() {
        let st = CustomerState::new(1_767_225_600_000);
        let current = encode_state(&st);
        assert_eq!(current[0], STATE_FORMAT);
        // Format 3 is format 4 without `quantile_at` (0: a 0 byte); format 2
        // is format 3 without `rules_version` and `pending` (0 and an empty
        // list: a 0 byte each); format 1 is format 2 without `extra` (a 0
        // byte for None).
        assert!(current.ends_with(&[0, 0, 0, 0]));
        let mut v3 = current[..current.len() - 1].to_vec();
        v3[0] = STATE_FORMAT_3;
        assert_eq!(decode_state(b"c", &v3).expect("format 3"), st);
        let mut v2 = current[..current.len() - 3].to_vec();
        v2[0] = STATE_FORMAT_2;
        assert_eq!(decode_state(b"c", &v2).expect("format 2"), st);
        let mut v1 = current[..current.len() - 4].to_vec();
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

    fn wal_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .expect("state dir")
            .map(|e| e.expect("entry"))
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| e.metadata().expect("metadata").len())
            .sum()
    }

    #[test]
    fn a_clean_stop_leaves_no_write_ahead_log_to_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = StateStore::open(dir.path(), StateOptions::default()).expect("open");
            for round in 0..5i64 {
                for i in 0..2_000 {
                    set(&mut s, &format!("c{i:05}"), Some(state(round, Some(10_000 + i))));
                }
                s.commit(&[("input".into(), round.to_be_bytes().to_vec())]).expect("commit");
            }
            // Five commits of 2 000 customers each are in the WAL, far
            // below a memtable's size: nothing was flushed yet.
            assert!(wal_bytes(dir.path()) > 100_000, "the commits are in the WAL");
        }
        let left = wal_bytes(dir.path());
        assert!(left < 4_096, "WAL after a clean stop: {left} bytes");
        let s = StateStore::open(dir.path(), StateOptions::default()).expect("reopen");
        assert_eq!(s.meta("input").expect("meta"), Some(4i64.to_be_bytes().to_vec()));
        assert_eq!(s.committed_customer("c01999").expect("read"), Some(state(4, Some(11_999))));
        assert_eq!(s.committed_timers().expect("timers").len(), 2_000);
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
    fn a_commit_is_due_once_a_quarter_of_the_cache_is_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s =
            StateStore::open(dir.path(), StateOptions { cache_customers: 40, ..Default::default() }).expect("open");
        for i in 0..9 {
            set(&mut s, &format!("c{i}"), Some(state(0, None)));
            // Changing the same customer again does not count twice.
            set(&mut s, &format!("c{i}"), Some(state(1, None)));
        }
        assert!(!s.commit_due(), "9 changed customers of a 40-customer cache");
        set(&mut s, "c9", Some(state(0, None)));
        assert!(s.commit_due(), "10 changed: a quarter");
        s.commit(&[]).expect("commit");
        assert!(!s.commit_due(), "nothing changed since the commit");
        let sid = s.customer("c0").expect("load");
        assert!(!s.commit_due(), "reading does not change");
        s.touch(sid);
        assert!(!s.commit_due());
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

    fn entry(group: u16, to: u16, at: i64) -> HistoryEntry {
        HistoryEntry {
            group,
            from: None,
            to: Some(to),
            at,
            event_id: Some(format!("e{at}")),
            boundary: 0,
            scores: Scores::default(),
            rules: None,
            version: 0,
        }
    }

    #[test]
    fn history_entries_written_before_rule_versions_still_read() {
        let e = entry(2, 1, 77);
        let mut older = e.encode();
        assert_eq!(older.pop(), Some(0), "the version is one byte at the end");
        assert_eq!(HistoryEntry::decode(&older).expect("entry without a version"), e);
        assert_eq!(older.pop(), Some(0), "the rules cause one before it");
        assert_eq!(HistoryEntry::decode(&older).expect("entry without either"), e);
        let migrated = HistoryEntry { rules: Some((1, 2)), event_id: None, ..e };
        assert_eq!(HistoryEntry::decode(&migrated.encode()).expect("new entry"), migrated);
    }

    /// Brute force over the committed customers: members and counts.
    type Members = BTreeMap<(u16, u16), Vec<String>>;
    /// Per customer: (labels, MRR) or erased, and its history.
    type Model = BTreeMap<String, (Option<(Vec<u16>, i64)>, Vec<HistoryEntry>)>;

    fn scanned(s: &StateStore) -> (Members, BTreeMap<(u16, u16), SegmentCount>) {
        let mut members: BTreeMap<(u16, u16), Vec<String>> = BTreeMap::new();
        let mut counts: BTreeMap<(u16, u16), SegmentCount> = BTreeMap::new();
        s.for_each_customer(|id, st| {
            for (g, &l) in st.labels.iter().enumerate() {
                members.entry((g as u16, l)).or_default().push(id.to_string());
                let c = counts.entry((g as u16, l)).or_default();
                c.customers += 1;
                c.mrr_cents += st.mrr_cents;
            }
        })
        .expect("scan");
        (members, counts)
    }

    use std::collections::BTreeMap;

    #[test]
    fn the_membership_index_counts_and_history_follow_every_change_through_evictions_and_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = StateOptions { cache_customers: 4, history_per_customer: 3, ..StateOptions::default() };
        let mut s = StateStore::open(dir.path(), opts.clone()).expect("open");
        let mut seed: u64 = 7;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        // The model: each customer's current state (None: erased) and history.
        let mut model: Model = BTreeMap::new();
        for step in 0..3000i64 {
            let id = format!("c{}", next(40));
            let sid = s.customer(&id).expect("load");
            let m = model.entry(id.clone()).or_default();
            if next(10) == 0 {
                s.slot_mut(sid).state = None;
                s.erase_history(sid).expect("erase");
                *m = (None, Vec::new());
            } else {
                let mut st = s.slot(sid).state.clone().unwrap_or_else(|| state(step, None));
                st.labels = vec![next(3) as u16, next(5) as u16];
                st.mrr_cents = next(1000) as i64;
                let e = entry(next(2) as u16, next(5) as u16, step);
                s.slot_mut(sid).state = Some(st.clone());
                s.record_history(sid, e.clone()).expect("record");
                m.0 = Some((st.labels.clone(), st.mrr_cents));
                m.1.push(e);
            }
            s.touch(sid);
            if next(25) == 0 {
                let live = s.live_counts();
                s.commit(&[]).expect("commit");
                let (members, counts) = scanned(&s);
                assert_eq!(s.segment_counts(), &counts, "counts at step {step}");
                assert_eq!(live, counts, "live counts before the commit at step {step}");
                for g in 0..2u16 {
                    for l in 0..5u16 {
                        let all = s.members(g, l, None, 1000).expect("members");
                        assert_eq!(&all, members.get(&(g, l)).unwrap_or(&Vec::new()), "members of {g}/{l}");
                        // Paged by two: the same list.
                        let mut paged = Vec::new();
                        loop {
                            let page = s.members(g, l, paged.last().map(String::as_str), 2).expect("page");
                            if page.is_empty() {
                                break;
                            }
                            paged.extend(page);
                        }
                        assert_eq!(paged, all);
                    }
                }
                for (id, (_, history)) in &model {
                    let keep = history.len().saturating_sub(3);
                    assert_eq!(s.history(id).expect("history"), history[keep..].to_vec(), "history of {id}");
                }
            }
        }
        s.commit(&[]).expect("commit");
        let before = scanned(&s);
        // A state dir of an earlier version: no index. Opening builds it.
        let members = s.cf(CF_MEMBERS);
        s.db.delete_range_cf(members, &[][..], &[0xffu8; 5][..]).expect("wipe");
        s.db.delete_cf(s.cf(CF_META), META_SEGMENT_INDEX).expect("unmark");
        s.db.delete_cf(s.cf(CF_META), META_SEGMENT_COUNTS).expect("uncount");
        drop(s);
        let s = StateStore::open(dir.path(), opts).expect("reopen");
        assert_eq!(s.segment_counts(), &before.1, "counts rebuilt");
        for ((g, l), ids) in &before.0 {
            assert_eq!(&s.members(*g, *l, None, 1000).expect("members"), ids, "members rebuilt");
        }
        // A reader next to the writer sees its commits after catching up.
        let secondary = tempfile::tempdir().expect("tempdir");
        let mut reader = StateStore::open_reader(dir.path(), secondary.path()).expect("reader");
        assert_eq!(reader.segment_counts(), &before.1);
        let mut s = s;
        let sid = s.customer("new").expect("load");
        let mut st = state(1, None);
        st.labels = vec![2, 4];
        s.slot_mut(sid).state = Some(st);
        s.touch(sid);
        s.commit(&[]).expect("commit");
        reader.catch_up().expect("catch up");
        assert!(reader.members(1, 4, None, 1000).expect("members").contains(&"new".to_string()));
        assert!(reader.committed_customer("new").expect("read").is_some());
    }

    /// Everything a store holds for its customers, as text.
    fn contents(s: &StateStore) -> Vec<String> {
        let mut out = Vec::new();
        s.for_each_customer(|id, st| out.push(format!("{id} {st:?}"))).expect("customers");
        out.push(format!("timers {:?}", s.committed_timers().expect("timers")));
        out.push(format!("counts {:?}", s.segment_counts()));
        out.push(format!("members {:?}", scanned(s).0));
        for g in 0..2u16 {
            for l in 0..5u16 {
                out.push(format!("index {g}/{l} {:?}", s.members(g, l, None, 1000).expect("members")));
            }
        }
        for id in s.customer_ids_after(None, 1000).expect("ids") {
            out.push(format!("history {id} {:?}", s.history_with_seqs(&id).expect("history")));
        }
        for i in 0..12 {
            let id = format!("c{i}");
            out.push(format!("history {id} {:?}", s.history_with_seqs(&id).expect("history")));
        }
        out
    }

    #[test]
    fn restored_states_written_as_they_came_equal_decoded_ones() {
        let opts = StateOptions { cache_customers: 3, history_per_customer: 4, ..StateOptions::default() };
        let (da, db) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        // `raw` restores through the undecoded path wherever a customer is
        // not cached; `decoded` loads every customer first, as restores did.
        let mut raw = StateStore::open(da.path(), opts.clone()).expect("open");
        let mut decoded = StateStore::open(db.path(), opts).expect("open");
        let mut seed: u64 = 11;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for step in 0..4000i64 {
            let id = format!("c{}", next(12));
            match next(8) {
                0 => {
                    raw.restore_state(&id, None).expect("erase");
                    let sid = decoded.customer(&id).expect("load");
                    decoded.restore_state(&id, None).expect("erase");
                    assert!(decoded.slot(sid).state.is_none());
                }
                1..=3 => {
                    let mut st = state(step, (next(2) == 0).then_some(step + next(100) as i64));
                    st.labels = vec![next(3) as u16, next(5) as u16];
                    st.mrr_cents = next(1000) as i64;
                    let stored = StoredState::of(&st);
                    raw.restore_state(&id, Some(stored.clone())).expect("restore");
                    decoded.customer(&id).expect("load");
                    decoded.restore_state(&id, Some(stored)).expect("restore");
                }
                4..=6 => {
                    let seq = next(6) as u32;
                    let e = (next(4) != 0).then(|| entry(next(2) as u16, next(5) as u16, step));
                    raw.restore_history_of(&id, seq, e.clone());
                    decoded.customer(&id).expect("load");
                    decoded.restore_history_of(&id, seq, e);
                }
                _ => {
                    // A customer loaded mid-restore takes what was restored for it.
                    let (a, b) = (raw.customer(&id).expect("load"), decoded.customer(&id).expect("load"));
                    assert_eq!(raw.slot(a).state, decoded.slot(b).state, "{id} at step {step}");
                }
            }
            if next(30) == 0 {
                raw.commit(&[]).expect("commit");
                decoded.commit(&[]).expect("commit");
                assert_eq!(contents(&raw), contents(&decoded), "after step {step}");
                assert_eq!(raw.segment_counts(), &scanned(&raw).1, "counts at step {step}");
            }
        }
        raw.commit(&[]).expect("commit");
        decoded.commit(&[]).expect("commit");
        assert_eq!(contents(&raw), contents(&decoded));
    }

    #[test]
    fn history_restored_before_its_customers_first_state_is_kept_across_a_commit() {
        // The changelog carries a commit's history entries before its
        // customers: a restore's periodic commit can fall between them.
        for cached in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut s = StateStore::open(dir.path(), StateOptions::default()).expect("open");
            if cached {
                s.customer("new").expect("load");
            }
            s.restore_history_of("new", 0, Some(entry(0, 1, 5)));
            s.commit(&[]).expect("commit");
            s.restore_state("new", Some(StoredState::of(&state(5, None)))).expect("restore");
            s.commit(&[]).expect("commit");
            assert_eq!(s.history("new").expect("history"), vec![entry(0, 1, 5)], "cached first: {cached}");
            // An erasure restored then takes it away.
            s.restore_state("new", None).expect("erase");
            s.commit(&[]).expect("commit");
            assert!(s.history("new").expect("history").is_empty());
        }
    }

    #[test]
    #[should_panic(expected = "restored customer states are read only after the commit")]
    fn reading_due_timers_before_the_commit_of_a_restore_is_a_bug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = StateStore::open(dir.path(), StateOptions::default()).expect("open");
        s.restore_state("a", Some(StoredState::of(&state(5, Some(10))))).expect("restore");
        let _ = s.next_due(0);
    }
}
