//! Writer schemas for Avro input in the Schema Registry wire format: local
//! `.avsc` files mapped to ids in the configuration (loaded once, at start),
//! then the registry, fetched once per unknown id and cached.

use segstream_decode::{decode_wire, wire, DecodeError, Event, StaticSchemas};

use crate::registry::Registry;

/// Decodes wire-format records of one partition task.
#[derive(Clone)]
pub struct WireDecoder {
    schemas: StaticSchemas,
    registry: Option<Registry>,
}

impl WireDecoder {
    pub fn new(schemas: StaticSchemas, registry: Option<Registry>) -> Self {
        Self { schemas, registry }
    }

    /// Decodes one message. `DecodeError::RegistryUnavailable` is transient:
    /// the caller retries the same record.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        if let (Some(id), Some(reg)) = (wire::schema_id(bytes), &self.registry) {
            if !self.schemas.contains(id) {
                match reg.schema(id).map_err(|e| DecodeError::RegistryUnavailable(e.to_string()))? {
                    Some(text) => self.schemas.insert_json(id, &text)?,
                    None => return Err(DecodeError::UnknownSchemaId(id)),
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
