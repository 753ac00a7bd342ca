//! JSON lines decoded on several threads, handed over in file order.
//!
//! Decoding is most of the cost of reading events. A reader thread cuts the
//! file into chunks of whole lines, workers decode chunks round-robin, and
//! the caller receives the chunks' records in file order: the same records,
//! in the same order, as [`crate::InputReader`] gives, at the speed of
//! several cores. Used where records are only counted when invalid (the
//! report); file mode keeps its positioned reader.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use segstream_decode::{decode_json_line, Event, MAX_RECORD_BYTES};
use segstream_engine::TimeWindow;

/// Bytes per chunk (extended to the end of its last line).
const CHUNK_BYTES: usize = 4 << 20;

/// What a line held: an event, or an invalid record (nothing for a blank line).
fn decode_chunk(chunk: &[u8], window: &TimeWindow, reference: Option<i64>) -> Vec<Option<Event>> {
    let mut out = Vec::with_capacity(chunk.len() / 120);
    for line in chunk.split(|b| *b == b'\n') {
        let body = line.strip_suffix(b"\r").unwrap_or(line);
        if body.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if body.len() > MAX_RECORD_BYTES {
            out.push(None);
            continue;
        }
        out.push(decode_json_line(body).ok().filter(|e| window.check(e.ts, reference).is_ok()));
    }
    out
}

/// Consumes the rest of a line, newline included, without keeping it.
fn skip_line(r: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                r.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    }
}

/// Calls `f` with every record of the JSON lines file `path` in file order:
/// `Some(event)`, or `None` for an invalid record (events outside `window`,
/// judged against `reference`, are invalid). `workers` threads decode.
pub fn for_each_json_record(
    path: &Path,
    window: TimeWindow,
    reference: Option<i64>,
    workers: usize,
    mut f: impl FnMut(Option<Event>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for_each_in_chunks(
        path,
        (window, reference),
        workers,
        CHUNK_BYTES,
        |records| records,
        |records| records.into_iter().try_for_each(&mut f),
    )
}

/// Like [`for_each_json_record`], with each chunk's records turned into a
/// `T` by `per_chunk` on the decoding thread (so that what the caller does
/// not keep is freed there), and `f` called with the `T`s in file order.
pub fn for_each_json_chunk<T: Send>(
    path: &Path,
    window: TimeWindow,
    reference: Option<i64>,
    workers: usize,
    per_chunk: impl Fn(Vec<Option<Event>>) -> T + Sync,
    f: impl FnMut(T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for_each_in_chunks(path, (window, reference), workers, CHUNK_BYTES, per_chunk, f)
}

fn for_each_in_chunks<T: Send>(
    path: &Path,
    (window, reference): (TimeWindow, Option<i64>),
    workers: usize,
    chunk_bytes: usize,
    per_chunk: impl Fn(Vec<Option<Event>>) -> T + Sync,
    mut f: impl FnMut(T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let workers = workers.max(1);
    let file = File::open(path)?;
    let per_chunk = &per_chunk;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let mut inputs: Vec<SyncSender<Vec<u8>>> = Vec::new();
        let mut outputs: Vec<Receiver<T>> = Vec::new();
        let mut decoders = Vec::new();
        for _ in 0..workers {
            let (to_worker, chunks) = sync_channel::<Vec<u8>>(2);
            let (done, from_worker) = sync_channel::<T>(2);
            inputs.push(to_worker);
            outputs.push(from_worker);
            decoders.push(s.spawn(move || {
                for chunk in chunks {
                    if done.send(per_chunk(decode_chunk(&chunk, &window, reference))).is_err() {
                        break;
                    }
                }
            }));
        }
        // The reader: chunks of whole lines, round-robin to the workers.
        let reader = s.spawn(move || -> std::io::Result<usize> {
            let mut r = BufReader::with_capacity(1 << 20, file);
            let mut n = 0;
            loop {
                let mut chunk = Vec::with_capacity(chunk_bytes + 4096);
                (&mut r).take(chunk_bytes as u64).read_to_end(&mut chunk)?;
                if chunk.is_empty() {
                    return Ok(n);
                }
                if chunk.last() != Some(&b'\n') {
                    // The rest of the last line, up to the longest record
                    // (one longer is invalid; what is beyond is skipped).
                    (&mut r).take(MAX_RECORD_BYTES as u64 + 2).read_until(b'\n', &mut chunk)?;
                    if chunk.last() != Some(&b'\n') {
                        skip_line(&mut r)?;
                    }
                }
                if inputs[n % inputs.len()].send(chunk).is_err() {
                    return Ok(n); // the caller stopped
                }
                n += 1;
            }
        });
        let mut i = 0;
        let mut failed = None;
        // In file order: chunk i comes from worker i mod workers.
        while let Ok(out) = outputs[i % workers].recv() {
            i += 1;
            if let Err(e) = f(out) {
                failed = Some(e);
                break;
            }
        }
        drop(outputs);
        let sent = reader.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
        for d in decoders {
            d.join().map_err(|_| anyhow::anyhow!("a decoding thread panicked reading {}", path.display()))?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        anyhow::ensure!(sent == i, "read {sent} chunks of {} but decoded {i}", path.display());
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::{InputReader, Position, Record};
    use segstream_decode::Format;

    #[test]
    fn gives_the_records_of_the_positioned_reader_in_its_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e.jsonl");
        let mut text = String::new();
        for i in 0..20_000 {
            match i % 997 {
                0 => text.push_str("{\"broken\n"),
                1 => text.push_str("   \r\n"),
                _ => text.push_str(&format!(
                    "{{\"event_id\":\"e{i}\",\"customer_id\":\"c{}\",\"type\":\"login\",\"ts\":{}}}\r\n",
                    i % 37,
                    1_700_000_000_000i64 + i
                )),
            }
        }
        // A line longer than any record: invalid, and the next line is read.
        text.push_str(&"x".repeat(MAX_RECORD_BYTES + 100));
        text.push('\n');
        text.push_str("{\"event_id\":\"last\",\"customer_id\":\"c\",\"type\":\"login\",\"ts\":5}"); // no newline
        std::fs::write(&path, &text).expect("write");
        let len = text.len() as u64;
        let mut expected = Vec::new();
        let mut reader = InputReader::open(&path, Format::Json, Position::default(), len).expect("open");
        while let Some(r) = reader.next_record() {
            expected.push(match r.expect("read") {
                Record::Event(e) => Some(e),
                Record::Invalid(_) => None,
            });
        }
        for workers in [1, 2, 3] {
            let mut got = Vec::new();
            for_each_in_chunks(
                &path,
                (TimeWindow::default(), None),
                workers,
                64 << 10,
                |r| r,
                |r| {
                    got.extend(r);
                    Ok(())
                },
            )
            .expect("parallel read");
            assert_eq!(got.len(), expected.len(), "{workers} workers");
            assert!(got == expected, "{workers} workers: other records or another order");
        }
        // A caller that stops stops the reading, with its error.
        let mut n = 0;
        let err = for_each_json_record(&path, TimeWindow::default(), None, 2, |_| {
            n += 1;
            anyhow::ensure!(n < 10, "enough");
            Ok(())
        });
        assert!(err.is_err_and(|e| e.to_string() == "enough"));
    }
}
