//! Files whose length is committed with the engine's state.
//!
//! Bytes are buffered in memory and written on [`CommittedFile::sync`], which
//! also fsyncs; the engine then stores the returned length in the same RocksDB
//! batch as the state that produced those bytes. On the next start the file is
//! cut back to that length, so whatever a crash left after it is replaced by
//! the byte-identical replay.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use apache_avro::Writer;
use segstream_decode::Format;
use segstream_scoring::Transition;

use crate::emit::DeadLetter;
use crate::error::OutputError;
use crate::record::{transition_schema, transition_to_avro_value, write_transition_json};

/// Written to the file when this much is buffered, even between commits.
const WRITE_THRESHOLD: usize = 1 << 20;
/// Avro sync marker: fixed, so a resumed run writes the same bytes as an
/// uninterrupted one (a random marker would differ per process).
const AVRO_SYNC_MARKER: [u8; 16] = *b"segstream:transi";
/// Avro block size before the writer ends a block by itself.
const AVRO_BLOCK_BYTES: usize = 64 * 1024;

/// An append-only file cut back to its committed length when opened.
pub struct CommittedFile {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Bytes already handed to the OS.
    written: u64,
}

impl CommittedFile {
    /// Opens (creating it if needed) and truncates to `committed` bytes.
    pub fn open(path: &Path, committed: u64) -> Result<Self, OutputError> {
        let io = |source| OutputError::Io { path: path.to_path_buf(), source };
        let existed = path.exists();
        let mut file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path).map_err(io)?;
        if !existed {
            // The new file's directory entry must survive a crash too: the
            // state will name its length.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        let actual = file.metadata().map_err(io)?.len();
        if actual < committed {
            return Err(OutputError::Shortened { path: path.to_path_buf(), committed, actual });
        }
        file.set_len(committed).map_err(io)?;
        file.seek(SeekFrom::Start(committed)).map_err(io)?;
        Ok(Self { path: path.to_path_buf(), file, buf: Vec::with_capacity(WRITE_THRESHOLD), written: committed })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&mut self, bytes: &[u8]) -> Result<(), OutputError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= WRITE_THRESHOLD {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the buffer to the OS without fsync: the bytes are not committed.
    pub fn flush(&mut self) -> Result<(), OutputError> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf).map_err(|source| OutputError::Io { path: self.path.clone(), source })?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes and fsyncs everything; returns the length to commit.
    pub fn sync(&mut self) -> Result<u64, OutputError> {
        self.flush()?;
        self.file.sync_data().map_err(|source| OutputError::Io { path: self.path.clone(), source })?;
        Ok(self.written)
    }
}

/// The container file header. apache-avro writes its metadata map from a
/// `HashMap`, whose order differs between processes; a resumed file must be
/// byte-identical, so the header is written here with sorted keys.
fn avro_header() -> Vec<u8> {
    fn long(v: i64, out: &mut Vec<u8>) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }
    let schema = serde_json::to_string(transition_schema()).expect("a parsed schema serializes");
    let mut h = b"Obj\x01".to_vec();
    long(2, &mut h);
    for (k, v) in [("avro.codec", b"null".as_slice()), ("avro.schema", schema.as_bytes())] {
        long(k.len() as i64, &mut h);
        h.extend_from_slice(k.as_bytes());
        long(v.len() as i64, &mut h);
        h.extend_from_slice(v);
    }
    long(0, &mut h);
    h.extend_from_slice(&AVRO_SYNC_MARKER);
    h
}

enum Encoder {
    Json,
    /// With the schema of an existing file written by an earlier version,
    /// when it differs from this version's: records are projected onto it.
    Avro(Box<Writer<'static, Vec<u8>>>, Option<&'static apache_avro::Schema>),
}

/// The schema an existing Avro file was written with (from its header).
fn existing_schema(path: &Path) -> Result<apache_avro::Schema, OutputError> {
    let f = File::open(path).map_err(|source| OutputError::Io { path: path.to_path_buf(), source })?;
    let reader = apache_avro::Reader::new(std::io::BufReader::new(f))
        .map_err(|e| OutputError::Avro(format!("{}: reading its header: {e}", path.display())))?;
    Ok(reader.writer_schema().clone())
}

/// The transition output file, JSON lines or Avro.
pub struct TransitionFile {
    file: CommittedFile,
    enc: Encoder,
    /// A JSON line being written (reused).
    line: Vec<u8>,
}

impl TransitionFile {
    pub fn open(path: &Path, format: Format, committed: u64) -> Result<Self, OutputError> {
        let mut file = CommittedFile::open(path, committed)?;
        if format == Format::Avro && committed == 0 {
            file.append(&avro_header())?;
        }
        // A file an earlier version began keeps its schema: appending records
        // of another schema after its header would make it unreadable.
        let mut earlier = None;
        if format == Format::Avro && committed > 0 {
            let schema = existing_schema(path)?;
            if schema.canonical_form() != transition_schema().canonical_form() {
                tracing::info!(path = %path.display(), "continuing an Avro file with the schema it began with (an earlier version's): fields it lacks are left out");
                earlier = Some(&*Box::leak(Box::new(schema)));
            }
        }
        let enc = match format {
            Format::Json => Encoder::Json,
            Format::Avro => Encoder::Avro(
                Box::new(
                    Writer::builder()
                        .schema(earlier.unwrap_or(transition_schema()))
                        .writer(Vec::new())
                        .marker(AVRO_SYNC_MARKER)
                        .block_size(AVRO_BLOCK_BYTES)
                        // Written by `avro_header`, deterministically.
                        .has_header(true)
                        .build(),
                ),
                earlier,
            ),
        };
        Ok(Self { file, enc, line: Vec::with_capacity(512) })
    }

    pub fn write(&mut self, t: &Transition) -> Result<(), OutputError> {
        match &mut self.enc {
            Encoder::Json => {
                self.line.clear();
                write_transition_json(t, &mut self.line);
                self.line.push(b'\n');
                self.file.append(&self.line)
            }
            Encoder::Avro(w, earlier) => {
                let mut value = transition_to_avro_value(t);
                if let Some(schema) = earlier {
                    value = crate::record::project(value, schema);
                }
                w.append(value).map_err(|e| OutputError::Avro(e.to_string()))?;
                if !w.get_ref().is_empty() {
                    let bytes = std::mem::take(w.get_mut());
                    self.file.append(&bytes)?;
                }
                Ok(())
            }
        }
    }

    /// Ends the current Avro block (if any) so the committed prefix is a valid file.
    fn end_block(&mut self) -> Result<(), OutputError> {
        if let Encoder::Avro(w, _) = &mut self.enc {
            w.flush().map_err(|e| OutputError::Avro(e.to_string()))?;
            let bytes = std::mem::take(w.get_mut());
            self.file.append(&bytes)?;
        }
        Ok(())
    }

    /// Writes and fsyncs everything written so far; returns the length to commit.
    pub fn sync(&mut self) -> Result<u64, OutputError> {
        self.end_block()?;
        self.file.sync()
    }

    /// Hands buffered bytes to the OS without committing them (used to
    /// simulate the worst crash in tests: bytes on disk past the commit).
    pub fn flush_uncommitted(&mut self) -> Result<(), OutputError> {
        self.end_block()?;
        self.file.flush()
    }
}

/// Invalid input records, one JSON object per line:
/// `{"location", "error_kind", "error", "raw"}` (`raw_hex` when the bytes are not UTF-8).
pub struct DeadLetterFile {
    file: CommittedFile,
}

impl DeadLetterFile {
    pub fn open(path: &Path, committed: u64) -> Result<Self, OutputError> {
        Ok(Self { file: CommittedFile::open(path, committed)? })
    }

    pub fn write(&mut self, r: &DeadLetter<'_>) -> Result<(), OutputError> {
        let mut obj = serde_json::Map::new();
        obj.insert("location".into(), r.location.into());
        obj.insert("error_kind".into(), r.error.kind().into());
        obj.insert("error".into(), r.error.to_string().into());
        let raw = r.raw.unwrap_or_default();
        match std::str::from_utf8(raw) {
            Ok(s) => obj.insert("raw".into(), s.into()),
            Err(_) => obj.insert("raw_hex".into(), raw.iter().map(|b| format!("{b:02x}")).collect::<String>().into()),
        };
        let mut line = serde_json::Value::Object(obj).to_string();
        line.push('\n');
        self.file.append(line.as_bytes())
    }

    pub fn sync(&mut self) -> Result<u64, OutputError> {
        self.file.sync()
    }

    pub fn flush_uncommitted(&mut self) -> Result<(), OutputError> {
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{transition_from_avro_value, TransitionRecord};
    use segstream_scoring::{Cause, Scores};
    use std::sync::Arc;

    fn t(i: i64) -> Transition {
        Transition {
            customer_id: format!("c{i}"),
            group: Arc::from("health"),
            from: None,
            to: Some(Arc::from("green")),
            at: 1_000 * i,
            cause: Cause::Event(format!("e{i}")),
            scores: Scores::default(),
            rules_version: 1,
        }
    }

    fn read_avro(path: &Path) -> Vec<TransitionRecord> {
        let f = File::open(path).expect("open");
        apache_avro::Reader::new(f)
            .expect("valid avro header")
            .map(|v| transition_from_avro_value(&v.expect("valid record")).expect("converts"))
            .collect()
    }

    #[test]
    fn resumed_files_equal_uninterrupted_ones() {
        for format in [Format::Json, Format::Avro] {
            let dir = tempfile::tempdir().expect("tempdir");
            let whole = dir.path().join("whole");
            let mut w = TransitionFile::open(&whole, format, 0).expect("open");
            for i in 0..500 {
                w.write(&t(i)).expect("write");
                if i == 199 {
                    w.sync().expect("sync");
                }
            }
            w.sync().expect("sync");

            let resumed = dir.path().join("resumed");
            let mut w = TransitionFile::open(&resumed, format, 0).expect("open");
            for i in 0..200 {
                w.write(&t(i)).expect("write");
            }
            let committed = w.sync().expect("sync");
            // Written but never committed: a crash leaves these bytes behind.
            for i in 200..350 {
                w.write(&t(i)).expect("write");
            }
            w.flush_uncommitted().expect("flush");
            drop(w);
            assert!(std::fs::metadata(&resumed).expect("meta").len() > committed);
            let mut w = TransitionFile::open(&resumed, format, committed).expect("reopen");
            for i in 200..500 {
                w.write(&t(i)).expect("write");
            }
            w.sync().expect("sync");
            assert_eq!(std::fs::read(&whole).expect("read"), std::fs::read(&resumed).expect("read"), "{format:?}");
            if format == Format::Avro {
                let recs = read_avro(&resumed);
                assert_eq!(recs.len(), 500);
                assert_eq!(recs[499].customer_id, "c499");
            }
        }
    }

    #[test]
    fn avro_header_is_the_same_in_every_process() {
        // Many writers, many HashMap seeds: one header.
        let first = avro_header();
        assert!((0..20).all(|_| avro_header() == first));
        assert!(first.starts_with(b"Obj\x01"));
    }

    #[test]
    fn empty_avro_output_is_a_valid_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("o.avro");
        let mut w = TransitionFile::open(&p, Format::Avro, 0).expect("open");
        w.sync().expect("sync");
        assert!(read_avro(&p).is_empty());
    }

    #[test]
    fn a_shortened_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("o.jsonl");
        std::fs::write(&p, b"abc").expect("write");
        assert!(matches!(CommittedFile::open(&p, 10), Err(OutputError::Shortened { committed: 10, actual: 3, .. })));
    }

    #[test]
    fn dead_letters_keep_raw_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("dlq.jsonl");
        let mut d = DeadLetterFile::open(&p, 0).expect("open");
        let unknown = segstream_decode::DecodeError::UnknownType("lgoin".into());
        d.write(&DeadLetter { location: "in.jsonl:3", error: &unknown, key: None, raw: Some(br#"{"type":"lgoin"}"#) })
            .expect("write");
        let utf8 = segstream_decode::DecodeError::Utf8("x".into());
        d.write(&DeadLetter { location: "in.jsonl:4", error: &utf8, key: None, raw: Some(&[0xff, 0x00]) })
            .expect("write");
        d.sync().expect("sync");
        let text = std::fs::read_to_string(&p).expect("read");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(lines[0]["error_kind"], "unknown_type");
        assert_eq!(lines[0]["raw"], r#"{"type":"lgoin"}"#);
        assert_eq!(lines[1]["raw_hex"], "ff00");
        assert_eq!(lines[1]["location"], "in.jsonl:4");
    }

    /// An Avro file begun by a version whose schema had no `rules_version`
    /// (nor the rules cause's versions) is continued with that schema, so
    /// that the whole file stays readable.
    #[test]
    fn an_avro_file_of_an_earlier_schema_is_continued_in_that_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.avro");
        let mut old: serde_json::Value = serde_json::from_str(crate::record::TRANSITION_SCHEMA_JSON).expect("json");
        let fields = old["fields"].as_array_mut().expect("fields");
        fields.retain(|f| f["name"] != "rules_version");
        let cause = fields.iter_mut().find(|f| f["name"] == "cause").expect("cause");
        cause["type"]["fields"]
            .as_array_mut()
            .expect("cause fields")
            .retain(|f| f["name"] != "from_version" && f["name"] != "to_version");
        let old = apache_avro::Schema::parse_str(&old.to_string()).expect("earlier schema");
        // As segstream wrote it: its fixed sync marker.
        let mut w = apache_avro::Writer::builder().schema(&old).writer(Vec::new()).marker(AVRO_SYNC_MARKER).build();
        let first = crate::record::project(transition_to_avro_value(&t(1)), &old);
        w.append(first).expect("earlier record");
        let bytes = w.into_inner().expect("earlier file");
        std::fs::write(&path, &bytes).expect("write");

        let mut f = TransitionFile::open(&path, Format::Avro, bytes.len() as u64).expect("continue");
        f.write(&t(2)).expect("write");
        f.sync().expect("sync");
        let read = read_avro(&path);
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].customer_id, "c2");
        assert_eq!(read[1].rules_version, 1, "absent in the earlier schema: read as 1");
    }
}
