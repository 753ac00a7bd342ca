//! A webhook receiver for the tests: a local HTTP server that fails,
//! times out, refuses and accepts, and remembers every request.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub key: String,
    pub body: String,
    pub signature: Option<String>,
    pub status: u16,
}

/// A receiver on 127.0.0.1: the first attempt of every third key fails
/// (503), the first attempt of every fifth key is answered after the
/// client's timeout, `refuse` is always refused (400), the rest accepted.
pub fn receiver(refuse: String) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hooks/segstream", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut keys: BTreeMap<String, usize> = BTreeMap::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() || !line.starts_with("POST /hooks/segstream") {
                continue;
            }
            let (mut length, mut key, mut signature) = (0usize, String::new(), None);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                let (name, value) =
                    h.split_once(':').map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string())).unwrap_or_default();
                match name.as_str() {
                    "content-length" => length = value.parse().unwrap_or(0),
                    "idempotency-key" => key = value,
                    "segstream-signature" => signature = Some(value),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let n = keys.len();
            let index = *keys.entry(key.clone()).or_insert(n);
            let attempt = log.lock().expect("log").iter().filter(|s: &&Seen| s.key == key).count();
            let status = if key == refuse {
                400
            } else if attempt == 0 && index % 3 == 1 {
                503
            } else if attempt == 0 && index % 5 == 2 {
                // Longer than the client's timeout: it gives up and retries.
                std::thread::sleep(Duration::from_millis(800));
                504
            } else {
                200
            };
            log.lock().expect("log").push(Seen {
                key,
                body: String::from_utf8(body).expect("utf-8"),
                signature,
                status,
            });
            let answer = if status == 400 { "unknown account" } else { "" };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    (url, seen)
}

/// Whether `signature` is `body`'s with `secret`.
pub fn verify(secret: &str, signature: &str, body: &str) -> bool {
    let Some((t, v1)) = signature.strip_prefix("t=").and_then(|s| s.split_once(",v1=")) else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let Ok(tag) =
        (0..v1.len() / 2).map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16)).collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    ring::hmac::verify(&key, format!("{t}.{body}").as_bytes(), &tag).is_ok()
}
