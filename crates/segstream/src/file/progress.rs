//! What a state dir remembers of each input and output file, and how a file
//! is recognised again: by its content, not only its name, so that a file
//! changed under the same name is noticed and a moved or copied one (a state
//! dir copied with its files) is not taken for a new one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use segstream_decode::Format;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use super::input::Position;

/// Meta keys: `input:<absolute path>`, `output:<absolute path>`.
pub const INPUT_PREFIX: &str = "input:";
pub const OUTPUT_PREFIX: &str = "output:";

/// Bytes hashed before an output's committed length to recognise it.
const OUTPUT_TAIL_BYTES: u64 = 64 * 1024;

/// xxh3 of the first `len` bytes of `path` (an error if it is shorter).
pub fn hash_prefix(path: &Path, len: u64) -> std::io::Result<u64> {
    let mut f = File::open(path)?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "shorter than its recorded content"));
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.digest())
}

/// A sorted copy of an input segment, under `<state dir>/sort/`, and how far
/// it is processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SortedCopy {
    pub file: String,
    pub pos: Position,
}

/// How far an input file is read and processed.
///
/// Reading goes by *segments*: a segment is what the file holds beyond the
/// previous segments when a run starts (`start` to `end`; a file that grows
/// gets a new segment on the next run). A segment in time order is read
/// directly; one that is not is first sorted by `ts` into a copy, which is
/// then processed (SPEC: a file in any order gives the transitions of its
/// events sorted by time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputProgress {
    /// The content this state read or is reading: the file's first `end`
    /// bytes, whose xxh3 is `end_hash`.
    pub end: u64,
    pub end_hash: u64,
    /// Where the current segment began.
    pub start: Position,
    /// How far the input has been read: the resume point of a segment read
    /// directly, or the segment's end once a sorted copy holds it.
    pub read: Position,
    /// The segment is processed from this sorted copy.
    pub sorted: Option<SortedCopy>,
    /// Every record of the segment is processed.
    pub complete: bool,
    /// The wall clock (epoch ms) when the segment was first read: the
    /// reference for `time.max_future_ms`, kept so that a resumed run judges
    /// every event as the first did (0 in records of earlier versions).
    #[serde(default)]
    pub clock_ms: i64,
}

/// The format of an earlier version: the first 64 KiB's hash and a position.
#[derive(Deserialize)]
struct LegacyProgress {
    prefix_len: u64,
    prefix_hash: u64,
    offset: u64,
    records: u64,
    lines: u64,
}

impl InputProgress {
    /// A new segment from `start` to the file's current end.
    pub fn segment(path: &Path, start: Position) -> std::io::Result<Self> {
        let end = std::fs::metadata(path)?.len();
        let clock_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Ok(Self { end, end_hash: hash_prefix(path, end)?, start, read: start, sorted: None, complete: false, clock_ms })
    }

    /// Reads a committed progress (also in the earlier format, checked
    /// against `path`'s first bytes: `None` when they differ).
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Option<Self>, String> {
        if let Ok(p) = serde_json::from_slice::<Self>(bytes) {
            return Ok(Some(p));
        }
        let old: LegacyProgress = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        if len < old.prefix_len.max(old.offset) || hash_prefix(path, old.prefix_len).ok() != Some(old.prefix_hash) {
            return Ok(None);
        }
        // What was read is done; anything after it is a new segment.
        let read = Position { offset: old.offset, records: old.records, lines: old.lines };
        let end_hash = hash_prefix(path, old.offset).map_err(|e| e.to_string())?;
        Ok(Some(Self { end: old.offset, end_hash, start: read, read, sorted: None, complete: true, clock_ms: 0 }))
    }

    /// Whether `path` still holds the content this progress was taken on.
    pub fn same_content(&self, path: &Path) -> std::io::Result<bool> {
        if std::fs::metadata(path)?.len() < self.end {
            return Ok(false);
        }
        Ok(hash_prefix(path, self.end)? == self.end_hash)
    }
}

/// What a state dir remembers of an output file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    /// Bytes committed.
    pub len: u64,
    /// How it is encoded (`None`: written by an earlier version).
    pub format: Option<Format>,
    /// xxh3 of the up to 64 KiB before `len`, to recognise a copy.
    pub tail_hash: Option<u64>,
}

impl OutputRecord {
    /// Reads a committed record (an earlier version stored the length alone).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok().or_else(|| {
            let len = std::str::from_utf8(bytes).ok()?.parse().ok()?;
            Some(Self { len, format: None, tail_hash: None })
        })
    }

    /// The record of `path` with `len` bytes committed.
    pub fn of(path: &Path, len: u64, format: Format) -> std::io::Result<Self> {
        Ok(Self { len, format: Some(format), tail_hash: Some(tail_hash(path, len)?) })
    }

    /// Whether `path` holds this record's committed bytes (as a copy does).
    pub fn matches(&self, path: &Path) -> std::io::Result<bool> {
        let Some(h) = self.tail_hash else { return Ok(false) };
        Ok(std::fs::metadata(path)?.len() >= self.len && tail_hash(path, self.len)? == h)
    }
}

fn tail_hash(path: &Path, len: u64) -> std::io::Result<u64> {
    let mut h = Xxh3::new();
    h.update(&len.to_le_bytes());
    if len == 0 {
        return Ok(h.digest());
    }
    let from = len.saturating_sub(OUTPUT_TAIL_BYTES);
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity((len - from) as usize);
    f.take(len - from).read_to_end(&mut buf)?;
    if (buf.len() as u64) < len - from {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "shorter than its committed length"));
    }
    h.update(&buf);
    Ok(h.digest())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_not_the_opening_identifies_an_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, "a\nb\nc\n").expect("write");
        let prog = InputProgress::segment(&p, Position::default()).expect("segment");
        assert_eq!(prog.end, 6);
        assert!(prog.same_content(&p).expect("check"));
        std::fs::write(&p, "a\nb\nc\nd\n").expect("append");
        assert!(prog.same_content(&p).expect("check"), "grown: the content read is still there");
        std::fs::write(&p, "a\nb\nX\nd\n").expect("fix a line after the opening");
        assert!(!prog.same_content(&p).expect("check"), "a corrected line anywhere is a change");
        std::fs::write(&p, "a\n").expect("truncate");
        assert!(!prog.same_content(&p).expect("check"));
    }

    #[test]
    fn earlier_records_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, "abc\ndef\n").expect("write");
        let legacy = format!(
            r#"{{"prefix_len":8,"prefix_hash":{},"offset":4,"records":1,"lines":1}}"#,
            hash_prefix(&p, 8).expect("hash")
        );
        let prog = InputProgress::decode(legacy.as_bytes(), &p).expect("decodes").expect("same file");
        assert!(prog.complete && prog.end == 4 && prog.read.records == 1);
        std::fs::write(&p, "xyz\ndef\n").expect("change");
        assert_eq!(InputProgress::decode(legacy.as_bytes(), &p).expect("decodes"), None);
        assert_eq!(OutputRecord::decode(b"120"), Some(OutputRecord { len: 120, format: None, tail_hash: None }));
    }

    #[test]
    fn an_output_is_recognised_by_its_committed_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, vec![7u8; 100_000]).expect("write");
        let rec = OutputRecord::of(&a, 90_000, Format::Json).expect("record");
        std::fs::copy(&a, &b).expect("copy");
        assert!(rec.matches(&b).expect("check"));
        std::fs::write(&b, vec![7u8; 80_000]).expect("shorter");
        assert!(!rec.matches(&b).expect("check"));
        let decoded = OutputRecord::decode(&serde_json::to_vec(&rec).expect("json")).expect("decodes");
        assert_eq!(decoded, rec);
    }
}
