//! Sorting an input segment by event time in bounded memory (SPEC: a file
//! in any order gives the transitions of the same events sorted by `ts`,
//! ties in file order).
//!
//! Events are buffered up to a memory budget, each full buffer is sorted by
//! (`ts`, record number) and written as a run under the state dir, and the
//! runs are merged into one JSON-lines file of the events in time order. An
//! input that fits the budget is sorted in memory and written at once.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use segstream_decode::{event_to_json, InvalidRecord};

use super::input::Record;

/// Bytes counted per buffered event besides its JSON (key, vector slot).
const ENTRY_OVERHEAD: usize = 48;
/// Runs merged at once; more are merged in passes.
const FAN_IN: usize = 128;

/// What sorting did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SortStats {
    pub events: u64,
    pub invalid: u64,
    /// Runs written to disk (0: sorted in memory).
    pub runs: usize,
}

struct Entry {
    ts: i64,
    seq: u64,
    json: Vec<u8>,
}

/// A run file: entries `ts` (i64 LE), `seq` (u64 LE), length (u32 LE), JSON.
fn write_run(path: &Path, entries: &[Entry]) -> anyhow::Result<()> {
    let mut w =
        BufWriter::with_capacity(1 << 20, File::create(path).with_context(|| format!("creating {}", path.display()))?);
    for e in entries {
        write_entry(&mut w, e)?;
    }
    w.flush().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

struct RunReader {
    r: BufReader<File>,
    path: PathBuf,
}

impl RunReader {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { r: BufReader::with_capacity(1 << 16, f), path: path.to_path_buf() })
    }

    fn next(&mut self) -> anyhow::Result<Option<Entry>> {
        let mut head = [0u8; 20];
        match self.r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
        let ts = i64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
        let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
        let mut json = vec![0; len];
        self.r.read_exact(&mut json).with_context(|| format!("reading {}", self.path.display()))?;
        Ok(Some(Entry { ts, seq, json }))
    }
}

/// Merges sorted runs, handing each entry to `out` in (`ts`, record) order.
fn merge(runs: &[PathBuf], mut out: impl FnMut(Entry) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut readers = runs.iter().map(|p| RunReader::open(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut heads: Vec<Option<Entry>> = Vec::with_capacity(readers.len());
    let mut heap = BinaryHeap::new();
    for (i, r) in readers.iter_mut().enumerate() {
        let head = r.next()?;
        if let Some(e) = &head {
            heap.push(Reverse((e.ts, e.seq, i)));
        }
        heads.push(head);
    }
    while let Some(Reverse((_, _, i))) = heap.pop() {
        let e = heads[i].take().expect("a run in the heap has a head");
        heads[i] = readers[i].next()?;
        if let Some(n) = &heads[i] {
            heap.push(Reverse((n.ts, n.seq, i)));
        }
        out(e)?;
    }
    Ok(())
}

/// Appends one entry to a run file.
fn write_entry(w: &mut impl Write, e: &Entry) -> anyhow::Result<()> {
    w.write_all(&e.ts.to_le_bytes())?;
    w.write_all(&e.seq.to_le_bytes())?;
    w.write_all(&u32::try_from(e.json.len()).context("an event of over 4 GiB")?.to_le_bytes())?;
    w.write_all(&e.json)?;
    Ok(())
}

/// Merges runs into one run while there are more than [`FAN_IN`]; entries
/// keep their record numbers, so ties still break in file order.
fn reduce_runs(mut runs: Vec<PathBuf>, tmp: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut n = runs.len();
    while runs.len() > FAN_IN {
        let batch: Vec<PathBuf> = runs.drain(..FAN_IN).collect();
        let path = tmp.join(format!("run-{n}"));
        n += 1;
        let mut w = BufWriter::with_capacity(
            1 << 20,
            File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        merge(&batch, |e| write_entry(&mut w, &e))?;
        w.flush().with_context(|| format!("writing {}", path.display()))?;
        for p in batch {
            let _ = std::fs::remove_file(p);
        }
        runs.push(path);
    }
    Ok(runs)
}

/// Reads every record of `records`; invalid ones go to `invalid` in file
/// order, events are written to `dest` sorted by (`ts`, file order), using
/// at most about `budget` bytes of memory and `tmp` for runs. `dest` appears
/// only once complete (written beside it, synced, renamed).
pub fn sort_events(
    records: impl Iterator<Item = std::io::Result<Record>>,
    tmp: &Path,
    dest: &Path,
    budget: usize,
    mut invalid: impl FnMut(InvalidRecord) -> anyhow::Result<()>,
) -> anyhow::Result<SortStats> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut stats = SortStats::default();
    let mut buf: Vec<Entry> = Vec::new();
    let mut used = 0usize;
    let mut runs: Vec<PathBuf> = Vec::new();
    for (seq, rec) in (0u64..).zip(records) {
        match rec? {
            Record::Invalid(r) => {
                stats.invalid += 1;
                invalid(r)?;
            }
            Record::Event(e) => {
                stats.events += 1;
                let json = event_to_json(&e).into_bytes();
                used += json.len() + ENTRY_OVERHEAD;
                buf.push(Entry { ts: e.ts, seq, json });
                if used >= budget {
                    buf.sort_unstable_by_key(|e| (e.ts, e.seq));
                    let path = tmp.join(format!("run-{}", runs.len()));
                    write_run(&path, &buf)?;
                    runs.push(path);
                    buf.clear();
                    used = 0;
                }
            }
        }
    }
    buf.sort_unstable_by_key(|e| (e.ts, e.seq));
    let partial = dest.with_extension("partial");
    let mut out = BufWriter::with_capacity(
        1 << 20,
        File::create(&partial).with_context(|| format!("creating {}", partial.display()))?,
    );
    if runs.is_empty() {
        for e in &buf {
            out.write_all(&e.json)?;
            out.write_all(b"\n")?;
        }
    } else {
        if !buf.is_empty() {
            let path = tmp.join(format!("run-{}", runs.len()));
            write_run(&path, &buf)?;
            runs.push(path);
        }
        drop(buf);
        stats.runs = runs.len();
        let runs = reduce_runs(runs, tmp)?;
        merge(&runs, |e| {
            out.write_all(&e.json)?;
            out.write_all(b"\n")?;
            Ok(())
        })?;
    }
    let file =
        out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", partial.display()))?;
    file.sync_all().with_context(|| format!("syncing {}", partial.display()))?;
    std::fs::rename(&partial, dest).with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
    if let Some(dir) = dest.parent() {
        File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    }
    std::fs::remove_dir_all(tmp).with_context(|| format!("removing {}", tmp.display()))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use segstream_decode::decode_json_line;

    fn line(id: &str, ts: i64) -> String {
        format!(r#"{{"event_id":"{id}","customer_id":"c","type":"login","ts":{ts}}}"#)
    }

    fn records(lines: &[String]) -> Vec<std::io::Result<Record>> {
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Ok(match decode_json_line(l.as_bytes()) {
                    Ok(e) => Record::Event(e),
                    Err(error) => Record::Invalid(InvalidRecord {
                        location: format!("in:{}", i + 1),
                        error,
                        raw: l.clone().into_bytes(),
                    }),
                })
            })
            .collect()
    }

    fn sorted_ids(dest: &Path) -> Vec<String> {
        std::fs::read_to_string(dest)
            .expect("sorted")
            .lines()
            .map(|l| decode_json_line(l.as_bytes()).expect("event").event_id)
            .collect()
    }

    #[test]
    fn events_come_out_by_time_with_ties_in_file_order_whatever_the_budget() {
        let mut lines: Vec<String> = (0..500).map(|i| line(&format!("e{i}"), (i * 7919) % 97)).collect();
        lines.insert(3, "not json".into());
        let mut want: Vec<(i64, usize, String)> = lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| decode_json_line(l.as_bytes()).ok().map(|e| (e.ts, i, e.event_id)))
            .collect();
        want.sort();
        let want: Vec<String> = want.into_iter().map(|(_, _, id)| id).collect();
        for budget in [1 << 30, 4_000, 200] {
            let dir = tempfile::tempdir().expect("tempdir");
            let dest = dir.path().join("sorted.jsonl");
            let mut bad = Vec::new();
            let stats = sort_events(records(&lines).into_iter(), &dir.path().join("tmp"), &dest, budget, |r| {
                bad.push(r.location);
                Ok(())
            })
            .expect("sort");
            assert_eq!(sorted_ids(&dest), want, "budget {budget}");
            assert_eq!(bad, vec!["in:4"]);
            assert_eq!((stats.events, stats.invalid), (500, 1));
            assert_eq!(stats.runs > 0, budget < 1 << 30, "budget {budget}: {stats:?}");
            assert!(!dir.path().join("tmp").exists(), "runs are removed");
        }
    }

    #[test]
    fn many_runs_are_merged_in_passes_and_ties_stay_in_file_order() {
        let tied: Vec<String> = (0..(FAN_IN * 3)).map(|i| line(&format!("t{i}"), 5)).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("tied.jsonl");
        let stats =
            sort_events(records(&tied).into_iter(), &dir.path().join("tmp"), &dest, 1, |_| Ok(())).expect("sort");
        assert!(stats.runs > FAN_IN, "{stats:?}");
        let want: Vec<String> = (0..(FAN_IN * 3)).map(|i| format!("t{i}")).collect();
        assert_eq!(sorted_ids(&dest), want);
        let lines: Vec<String> = (0..(FAN_IN as i64 * 3)).map(|i| line(&format!("e{i}"), -i)).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("sorted.jsonl");
        let stats =
            sort_events(records(&lines).into_iter(), &dir.path().join("tmp"), &dest, 1, |_| Ok(())).expect("sort");
        assert!(stats.runs > FAN_IN, "{stats:?}");
        let ids = sorted_ids(&dest);
        assert_eq!(ids.first().map(String::as_str), Some(format!("e{}", FAN_IN * 3 - 1).as_str()));
        assert_eq!(ids.len(), FAN_IN * 3);
    }
}
