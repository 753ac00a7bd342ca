//! Input files: JSON lines or Avro object container files, read from a
//! committed position, each record with its location for error reports.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Take};
use std::path::Path;

use segstream_decode::{
    decode_json_line, event_to_json, json_line_ts, AvroFileReader, DecodeError, Event, Format, InvalidRecord,
    MAX_RECORD_BYTES,
};
use segstream_engine::TimeWindow;
use serde::{Deserialize, Serialize};

/// A place in an input: after this many bytes (JSON lines), records (valid
/// or not; blank lines are not records) and lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub offset: u64,
    pub records: u64,
    pub lines: u64,
}

/// Reads one line (with its newline) into `line`, keeping at most `max` + 1
/// bytes of it; returns the bytes consumed and whether the whole line fit.
fn read_line_bounded(r: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> std::io::Result<(usize, bool)> {
    let mut consumed = 0;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = (max + 1).saturating_sub(line.len());
        line.extend_from_slice(&buf[..take.min(room)]);
        r.consume(take);
        consumed += take;
        if done {
            break;
        }
    }
    Ok((consumed, line.len() <= max))
}

/// A JSON input's next non-blank line.
enum JsonLine<'a> {
    /// Without its line end.
    Whole(&'a [u8]),
    /// Longer than any record: its length and first 64 KiB.
    TooLarge { len: usize, head: Vec<u8> },
}

/// Reads the next non-blank line into `line`, counting it (and the blank
/// lines before it) in `pos`; `None` at the end.
fn next_json_line<'a>(
    inner: &mut impl BufRead,
    line: &'a mut Vec<u8>,
    pos: &mut Position,
) -> Option<std::io::Result<JsonLine<'a>>> {
    loop {
        line.clear();
        let (n, whole) = match read_line_bounded(inner, line, MAX_RECORD_BYTES) {
            Ok((0, _)) => return None,
            Ok(read) => read,
            Err(e) => return Some(Err(e)),
        };
        pos.offset += n as u64;
        pos.lines += 1;
        if !whole {
            pos.records += 1;
            line.truncate(64 << 10);
            return Some(Ok(JsonLine::TooLarge { len: n, head: std::mem::take(line) }));
        }
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
        pos.records += 1;
        // Re-borrowed for the lifetime of `line` (the loop is over).
        let len = body.len();
        return Some(Ok(JsonLine::Whole(&line[..len])));
    }
}

/// One input record: an event, or what was wrong with it.
pub enum Record {
    Event(Event),
    Invalid(InvalidRecord),
}

enum Reader {
    Json { inner: BufReader<Take<File>>, line: Vec<u8> },
    Avro(Box<AvroFileReader<BufReader<Take<File>>>>),
}

pub struct InputReader {
    reader: Reader,
    name: String,
    pos: Position,
    /// Believable event times, and the input's reference clock.
    window: (TimeWindow, Option<i64>),
}

impl InputReader {
    /// Opens `path`, moves to `pos` (JSON: by byte offset; Avro: by skipping
    /// the records already read, as container blocks hold no index), and
    /// reads up to byte `end` (what the file held when its reading began:
    /// bytes appended meanwhile are left for the next run).
    pub fn open(path: &Path, format: Format, pos: Position, end: u64) -> std::io::Result<Self> {
        let name = path.display().to_string();
        let mut file = File::open(path)?;
        let reader = match format {
            Format::Json => {
                file.seek(SeekFrom::Start(pos.offset))?;
                let rest = file.take(end.saturating_sub(pos.offset));
                Reader::Json { inner: BufReader::with_capacity(1 << 20, rest), line: Vec::with_capacity(512) }
            }
            Format::Avro => {
                let mut r = AvroFileReader::new(BufReader::with_capacity(1 << 20, file.take(end)))
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
        Ok(Self { reader, name, pos, window: (TimeWindow::default(), None) })
    }

    /// Events outside `window` (judged against `reference`, the input's
    /// clock) are read as invalid records.
    pub fn with_window(mut self, window: TimeWindow, reference: Option<i64>) -> Self {
        self.window = (window, reference);
        self
    }

    fn screen(&self, e: Event) -> Record {
        match self.window.0.check(e.ts, self.window.1) {
            Ok(()) => Record::Event(e),
            Err(error) => {
                Record::Invalid(InvalidRecord { location: self.location(), raw: event_to_json(&e).into_bytes(), error })
            }
        }
    }

    pub fn position(&self) -> Position {
        self.pos
    }

    /// Where the last record read was: `file:line`, or `file#record N` (Avro).
    pub fn location(&self) -> String {
        match self.reader {
            Reader::Json { .. } => format!("{}:{}", self.name, self.pos.lines),
            Reader::Avro(_) => format!("{}#record {}", self.name, self.pos.records),
        }
    }

    /// The next record, `None` at the end of the file.
    pub fn next_record(&mut self) -> Option<std::io::Result<Record>> {
        match &mut self.reader {
            Reader::Json { inner, line } => {
                let line = match next_json_line(inner, line, &mut self.pos)? {
                    Ok(line) => line,
                    Err(e) => return Some(Err(e)),
                };
                let location = || format!("{}:{}", self.name, self.pos.lines);
                let body = match line {
                    JsonLine::Whole(body) => body,
                    JsonLine::TooLarge { len, head } => {
                        // Not held in memory whole: its first bytes are kept for the dead letter.
                        let error = DecodeError::TooLarge { field: "record", len, max: MAX_RECORD_BYTES };
                        return Some(Ok(Record::Invalid(InvalidRecord { location: location(), error, raw: head })));
                    }
                };
                let invalid =
                    |error| Record::Invalid(InvalidRecord { location: location(), error, raw: body.to_vec() });
                Some(Ok(match decode_json_line(body) {
                    Ok(e) => match self.window.0.check(e.ts, self.window.1) {
                        Ok(()) => Record::Event(e),
                        Err(error) => invalid(error),
                    },
                    Err(error) => invalid(error),
                }))
            }
            Reader::Avro(r) => {
                let item = r.next()?;
                self.pos.records += 1;
                Some(Ok(match item {
                    Ok(e) => self.screen(e),
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

    /// The `ts` of the next record's event without decoding the rest of it
    /// (JSON lines; Avro records are decoded), `None` inside when it is not
    /// an event. Every record [`InputReader::next_record`] gives as an event
    /// gives its `ts` here; a record it gives as invalid may give one too.
    /// `None` at the end of the file.
    pub fn next_ts(&mut self) -> Option<std::io::Result<Option<i64>>> {
        let ts = match &mut self.reader {
            Reader::Json { inner, line } => match next_json_line(inner, line, &mut self.pos)? {
                Ok(JsonLine::Whole(body)) => json_line_ts(body),
                Ok(JsonLine::TooLarge { .. }) => None,
                Err(e) => return Some(Err(e)),
            },
            Reader::Avro(_) => match self.next_record()? {
                Ok(Record::Event(e)) => Some(e.ts),
                Ok(Record::Invalid(_)) => None,
                Err(e) => return Some(Err(e)),
            },
        };
        Some(Ok(ts.filter(|ts| self.window.0.check(*ts, self.window.1).is_ok())))
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
        let end = std::fs::metadata(&p).expect("meta").len();
        let mut all = InputReader::open(&p, Format::Json, Position::default(), end).expect("open");
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
        let mut rest = InputReader::open(&p, Format::Json, positions[1], end).expect("open");
        assert!(matches!(rest.next_record(), Some(Ok(Record::Invalid(i))) if i.location.ends_with(":4")));
        assert!(matches!(rest.next_record(), Some(Ok(Record::Event(e))) if e.event_id == "e3"));
        assert!(rest.next_record().is_none());
    }

    #[test]
    fn the_ts_pass_reads_the_records_positions_and_event_times_of_the_full_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("in.jsonl");
        let ev = |i: u32| format!(r#"{{"event_id":"e{i}","customer_id":"c","type":"login","ts":{i}}}"#);
        let huge = format!(r#"{{"ts":4,"pad":"{}"}}"#, "x".repeat(MAX_RECORD_BYTES));
        let text = format!("{}\n\n  \r\n{}\r\nnot json\n{huge}\n{{\"ts\":1}}\n{}\n{}", ev(1), ev(2), ev(9), ev(3));
        std::fs::write(&p, text).expect("write");
        let end = std::fs::metadata(&p).expect("meta").len();
        // A window that makes the event at ts 9 unbelievable (after the reference).
        let window = TimeWindow { earliest: Some(0), max_future: Some(1) };
        let open = || {
            InputReader::open(&p, Format::Json, Position::default(), end).expect("open").with_window(window, Some(5))
        };
        let (mut full, mut cheap) = (open(), open());
        let mut n = 0;
        let mut times = Vec::new();
        while let Some(r) = full.next_record() {
            let ts = cheap.next_ts().expect("as many records").expect("io");
            times.push(ts);
            if let Record::Event(e) = r.expect("io") {
                assert_eq!(ts, Some(e.ts), "record {n}");
            }
            assert_eq!(full.position(), cheap.position(), "record {n}");
            n += 1;
        }
        assert!(cheap.next_ts().is_none());
        assert_eq!(n, 7);
        // Not json, too large, and beyond the window: none; not an event: its ts.
        assert_eq!(times, [Some(1), Some(2), None, None, Some(1), None, Some(3)]);
    }

    #[test]
    fn a_line_beyond_the_record_limit_is_invalid_and_not_held_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("in.jsonl");
        let ok = r#"{"event_id":"a","customer_id":"c","type":"login","ts":1}"#;
        let huge =
            format!(r#"{{"event_id":"b","customer_id":"c","type":"login","ts":2,"pad":"{}"}}"#, "x".repeat(3 << 20));
        std::fs::write(&p, format!("{ok}\n{huge}\n{ok}\n")).expect("write");
        let end = std::fs::metadata(&p).expect("meta").len();
        let mut r = InputReader::open(&p, Format::Json, Position::default(), end).expect("open");
        assert!(matches!(r.next_record(), Some(Ok(Record::Event(_)))));
        match r.next_record() {
            Some(Ok(Record::Invalid(i))) => {
                assert_eq!(i.error.kind(), "too_large");
                assert!(i.location.ends_with(":2") && i.raw.len() == 64 << 10, "{} {}", i.location, i.raw.len());
            }
            _ => panic!("the huge line is a too_large record"),
        }
        assert!(matches!(r.next_record(), Some(Ok(Record::Event(_)))), "reading goes on after it");
        assert_eq!(r.position().offset, end);
    }

    #[test]
    fn reading_stops_at_the_end_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("in.jsonl");
        let a = r#"{"event_id":"a","customer_id":"c","type":"login","ts":1}"#;
        std::fs::write(&p, format!("{a}\n{a}\n")).expect("write");
        let end = a.len() as u64 + 1;
        let mut r = InputReader::open(&p, Format::Json, Position::default(), end).expect("open");
        assert!(matches!(r.next_record(), Some(Ok(Record::Event(_)))));
        assert!(r.next_record().is_none(), "the second line was appended after the reading began");
        assert_eq!(r.position(), Position { offset: end, records: 1, lines: 1 });
    }
}
