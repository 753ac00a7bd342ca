//! Writer schemas for Avro input in the Schema Registry wire format: local
//! `.avsc` files mapped to ids in the configuration (loaded once, at start),
//! then the registry, fetched once per unknown id and cached.

use segstream_decode::{decode_wire, wire, DecodeError, Event, StaticSchemas};

use crate::registry::{Registry, RegistryError};

/// Decodes wire-format records of one partition task.
#[derive(Clone)]
pub struct WireDecoder {
    schemas: StaticSchemas,
    registry: Option<Registry>,
    /// Ids the registry said it does not know: not asked again (each such
    /// record is poison, and a stream of them must not become a stream of
    /// HTTP requests).
    unknown: std::collections::HashSet<u32>,
}

impl WireDecoder {
    pub fn new(schemas: StaticSchemas, registry: Option<Registry>) -> Self {
        Self { schemas, registry, unknown: Default::default() }
    }

    /// Decodes one message. `DecodeError::RegistryUnavailable` is transient:
    /// the caller retries the same record; `RegistryRefused` is fatal.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        if let (Some(id), Some(reg)) = (wire::schema_id(bytes), &self.registry) {
            if !self.schemas.contains(id) && !self.unknown.contains(&id) {
                match reg.schema(id) {
                    Ok(Some(text)) => self.schemas.insert_json(id, &text)?,
                    Ok(None) => {
                        self.unknown.insert(id);
                        return Err(DecodeError::UnknownSchemaId(id));
                    }
                    Err(e @ (RegistryError::Unauthorized { .. } | RegistryError::BadAnswer { .. })) => {
                        return Err(DecodeError::RegistryRefused(e.to_string()))
                    }
                    Err(e) => return Err(DecodeError::RegistryUnavailable(e.to_string())),
                }
            }
        }
        decode_wire(bytes, &self.schemas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segstream_decode::{Classify, ErrorClass};

    #[test]
    fn an_unreachable_registry_is_transient_and_an_unknown_id_without_one_is_poison() {
        // A port nothing listens on: connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let registry = Registry::new(&format!("http://127.0.0.1:{port}"), None);
        let message = wire::frame(5, &[0]);
        let err = WireDecoder::new(StaticSchemas::new(), Some(registry)).decode(&message).expect_err("no registry");
        assert_eq!(err.class(), ErrorClass::Transient, "{err}");
        let err = WireDecoder::new(StaticSchemas::new(), None).decode(&message).expect_err("unknown id");
        assert_eq!(err, DecodeError::UnknownSchemaId(5));
        assert_eq!(err.class(), ErrorClass::Poison);
    }

    /// A registry on 127.0.0.1 answering every request with `status` (and a
    /// non-JSON body); returns its URL and a request counter.
    fn registry_answering(status: u16) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let body = "<html>no</html>";
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, count)
    }

    #[test]
    fn unknown_ids_are_asked_once_and_a_refusal_is_fatal() {
        let (url, count) = registry_answering(404);
        let mut d = WireDecoder::new(StaticSchemas::new(), Some(Registry::new(&url, None)));
        for _ in 0..3 {
            assert_eq!(d.decode(&wire::frame(9, &[0])), Err(DecodeError::UnknownSchemaId(9)));
        }
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1, "a 404 is remembered");
        for status in [401, 403, 200] {
            let (url, _) = registry_answering(status);
            let err = WireDecoder::new(StaticSchemas::new(), Some(Registry::new(&url, Some("k:s"))))
                .decode(&wire::frame(9, &[0]))
                .expect_err("refused");
            assert_eq!(err.class(), ErrorClass::Fatal, "{status}: {err}");
        }
        let (url, _) = registry_answering(503);
        let err = WireDecoder::new(StaticSchemas::new(), Some(Registry::new(&url, None))).decode(&wire::frame(9, &[0]));
        assert_eq!(err.expect_err("unavailable").class(), ErrorClass::Transient);
    }

    #[test]
    fn a_local_schema_is_used_without_a_registry() {
        let mut schemas = StaticSchemas::new();
        schemas.insert_json(3, segstream_decode::EVENT_SCHEMA_JSON).expect("schema");
        let e = segstream_decode::decode_json_line(
            br#"{"event_id":"e","customer_id":"c","type":"login","ts":1767225600000}"#,
        )
        .expect("event");
        let bytes = segstream_decode::event_to_wire(&e, 3);
        assert_eq!(WireDecoder::new(schemas, None).decode(&bytes).expect("decodes"), e);
    }
}
