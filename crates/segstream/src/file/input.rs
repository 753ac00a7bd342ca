//! Input files: JSON lines or Avro object container files, read from a
//! committed position, each record with its location for error reports.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use segstream_decode::{decode_json_line, AvroFileReader, Event, Format, InvalidRecord};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// Bytes hashed to recognise an input file again.
const FINGERPRINT_BYTES: u64 = 64 * 1024;

/// How far an input file has been read: what the state dir remembers of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputProgress {
    /// The file is recognised by the hash of its first `prefix_len` bytes.
    pub prefix_len: u64,
    pub prefix_hash: u64,
    /// Byte offset after the last record read (JSON lines).
    pub offset: u64,
    /// Records (valid or not) read so far; blank lines are not records.
    pub records: u64,
    /// Lines read so far (JSON lines).
    pub lines: u64,
}

impl InputProgress {
    /// A fresh position for `path`, with its fingerprint.
    pub fn start(path: &Path) -> std::io::Result<Self> {
        let len = std::fs::metadata(path)?.len().min(FINGERPRINT_BYTES);
        Ok(Self { prefix_len: len, prefix_hash: prefix_hash(path, len)?, ..Self::default() })
    }

    /// Whether `path` still starts with the bytes this position was taken on.
    pub fn same_file(&self, path: &Path) -> std::io::Result<bool> {
        if std::fs::metadata(path)?.len() < self.prefix_len.max(self.offset) {
            return Ok(false);
        }
        Ok(prefix_hash(path, self.prefix_len)? == self.prefix_hash)
    }
}

fn prefix_hash(path: &Path, len: u64) -> std::io::Result<u64> {
    let mut buf = Vec::with_capacity(len as usize);
    File::open(path)?.take(len).read_to_end(&mut buf)?;
    Ok(xxh3_64(&buf))
}

/// One input record: an event, or what was wrong with it.
pub enum Record {
    Event(Event),
    Invalid(InvalidRecord),
}

enum Reader {
    Json { inner: BufReader<File>, line: Vec<u8> },
    Avro(Box<AvroFileReader<BufReader<File>>>),
}

pub struct InputReader {
    reader: Reader,
    name: String,
    pos: InputProgress,
}

impl InputReader {
    /// Opens `path` and moves to `pos` (JSON: by byte offset; Avro: by
    /// skipping the records already read, as container blocks hold no index).
    pub fn open(path: &Path, format: Format, pos: InputProgress) -> std::io::Result<Self> {
        let name = path.display().to_string();
        let mut file = File::open(path)?;
        let reader = match format {
            Format::Json => {
                file.seek(SeekFrom::Start(pos.offset))?;
                Reader::Json { inner: BufReader::with_capacity(1 << 20, file), line: Vec::with_capacity(512) }
            }
            Format::Avro => {
                let mut r = AvroFileReader::new(BufReader::with_capacity(1 << 20, file))
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{name}: {e}")))?;
                for _ in 0..pos.records {
                    if r.next().is_none() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{name}: has fewer records than the {} already committed", pos.records),
                        ));
                    }
                }
                Reader::Avro(Box::new(r))
            }
        };
        Ok(Self { reader, name, pos })
    }

    pub fn position(&self) -> InputProgress {
        self.pos
    }

    /// The next record, `None` at the end of the file.
    pub fn next_record(&mut self) -> Option<std::io::Result<Record>> {
        match &mut self.reader {
            Reader::Json { inner, line } => loop {
                line.clear();
                let n = match inner.read_until(b'\n', line) {
                    Ok(0) => return None,
                    Ok(n) => n,
                    Err(e) => return Some(Err(e)),
                };
                self.pos.offset += n as u64;
                self.pos.lines += 1;
                let mut body = line.as_slice();
                while let Some((last, rest)) = body.split_last() {
                    if *last == b'\n' || *last == b'\r' {
                        body = rest;
                    } else {
                        break;
                    }
                }
                if body.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                self.pos.records += 1;
                return Some(Ok(match decode_json_line(body) {
                    Ok(e) => Record::Event(e),
                    Err(error) => Record::Invalid(InvalidRecord {
                        location: format!("{}:{}", self.name, self.pos.lines),
                        error,
                        raw: body.to_vec(),
                    }),
                }));
            },
            Reader::Avro(r) => {
                let item = r.next()?;
                self.pos.records += 1;
                Some(Ok(match item {
                    Ok(e) => Record::Event(e),
                    Err(error) => {
                        let raw = r.take_invalid_json().map(String::into_bytes).unwrap_or_default();
                        Record::Invalid(InvalidRecord {
                            location: format!("{}#record {}", self.name, self.pos.records),
                            error,
                            raw,
                        })
                    }
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_positions_resume_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("in.jsonl");
        let ev = |i: u32| format!(r#"{{"event_id":"e{i}","customer_id":"c","type":"login","ts":{i}}}"#);
        std::fs::write(&p, format!("{}\n\n{}\r\nnot json\n{}", ev(1), ev(2), ev(3))).expect("write");
        let mut all = InputReader::open(&p, Format::Json, InputProgress::start(&p).expect("fp")).expect("open");
        let mut kinds = Vec::new();
        let mut positions = Vec::new();
        while let Some(r) = all.next_record() {
            kinds.push(match r.expect("io") {
                Record::Event(e) => e.event_id,
                Record::Invalid(i) => i.location,
            });
            positions.push(all.position());
        }
        assert_eq!(kinds, vec!["e1".to_string(), "e2".into(), format!("{}:4", p.display()), "e3".into()]);
        assert_eq!(positions[3].records, 4);
        assert_eq!(positions[3].lines, 5);
        // Resuming from the second position yields the rest.
        let mut rest = InputReader::open(&p, Format::Json, positions[1]).expect("open");
        assert!(matches!(rest.next_record(), Some(Ok(Record::Invalid(i))) if i.location.ends_with(":4")));
        assert!(matches!(rest.next_record(), Some(Ok(Record::Event(e))) if e.event_id == "e3"));
        assert!(rest.next_record().is_none());
    }

    #[test]
    fn fingerprint_tells_files_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, "abc\n").expect("write");
        let fp = InputProgress::start(&p).expect("fp");
        assert!(fp.same_file(&p).expect("check"));
        std::fs::write(&p, "abc\ndef\n").expect("append");
        assert!(fp.same_file(&p).expect("check"), "an appended file is the same file");
        std::fs::write(&p, "xyz\n").expect("replace");
        assert!(!fp.same_file(&p).expect("check"));
    }
}
