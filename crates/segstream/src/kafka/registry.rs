//! Writer schemas for the Schema Registry wire format: local `.avsc` files
//! mapped to ids in the configuration, then the registry's
//! `GET /schemas/ids/{id}`, cached per id.

use std::time::Duration;

use segstream_decode::{decode_wire, DecodeError, Event, StaticSchemas};

use super::config::KafkaConfig;

/// A Schema Registry client (blocking; called from partition threads only).
#[derive(Clone)]
pub struct Registry {
    base: String,
    agent: ureq::Agent,
    /// `Authorization` header value (HTTP basic), never logged.
    authorization: Option<String>,
}

#[derive(serde::Deserialize)]
struct SchemaResponse {
    schema: String,
}

#[derive(serde::Deserialize)]
struct IdResponse {
    id: u32,
}

impl Registry {
    /// `user_info`: `user:password` for HTTP basic authentication.
    pub fn new(base: &str, user_info: Option<&str>) -> Self {
        use base64::Engine as _;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let authorization =
            user_info.map(|u| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(u.as_bytes())));
        Self { base: base.trim_end_matches('/').to_string(), agent, authorization }
    }

    fn authorized<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(a) => req.header("Authorization", a),
            None => req,
        }
    }

    /// The schema text of `id`: `Ok(None)` when the registry does not know
    /// it (the record is poison), `Err` when the registry cannot be reached
    /// or answers with a server error (retry later).
    pub fn schema(&self, id: u32) -> Result<Option<String>, String> {
        let url = format!("{}/schemas/ids/{id}", self.base);
        let mut resp = self.authorized(self.agent.get(&url)).call().map_err(|e| format!("{url}: {e}"))?;
        match resp.status().as_u16() {
            200 => resp
                .body_mut()
                .read_json::<SchemaResponse>()
                .map(|r| Some(r.schema))
                .map_err(|e| format!("{url}: {e}")),
            404 => Ok(None),
            s @ (401 | 403) => Err(format!("{url}: HTTP {s}: check kafka.schema_registry_user_info")),
            s => Err(format!("{url}: HTTP {s}")),
        }
    }

    /// Registers `schema` under `subject` (idempotent in the registry) and
    /// returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, String> {
        let url = format!("{}/subjects/{subject}/versions", self.base);
        let body = serde_json::json!({ "schema": schema });
        let mut resp = self
            .authorized(self.agent.post(&url))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .send_json(&body)
            .map_err(|e| format!("{url}: {e}"))?;
        match resp.status().as_u16() {
            200 => resp.body_mut().read_json::<IdResponse>().map(|r| r.id).map_err(|e| format!("{url}: {e}")),
            s => Err(format!("{url}: HTTP {s}: {}", resp.body_mut().read_to_string().unwrap_or_default())),
        }
    }
}

/// Decodes wire-format records, fetching unknown writer schemas once.
pub struct WireDecoder {
    schemas: StaticSchemas,
    registry: Option<Registry>,
}

impl WireDecoder {
    pub fn from_config(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        let mut schemas = StaticSchemas::new();
        for (id, path) in &cfg.schemas {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("schema {id}: {}: {e}", path.display()))?;
            schemas.insert_json(*id, &text).map_err(|e| anyhow::anyhow!("schema {id}: {}: {e}", path.display()))?;
        }
        Ok(Self { schemas, registry: cfg.registry() })
    }

    /// Decodes one message. `DecodeError::RegistryUnavailable` is transient:
    /// the caller retries the same record.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        if bytes.len() >= 5 && bytes[0] == 0 {
            let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
            if !self.schemas.contains(id) {
                if let Some(reg) = &self.registry {
                    match reg.schema(id).map_err(DecodeError::RegistryUnavailable)? {
                        Some(text) => self.schemas.insert_json(id, &text)?,
                        None => return Err(DecodeError::UnknownSchemaId(id)),
                    }
                }
            }
        }
        decode_wire(bytes, &self.schemas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use segstream_decode::ErrorClass;

    fn wire(id: u32) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&id.to_be_bytes());
        v.push(0);
        v
    }

    #[test]
    fn an_unreachable_registry_is_transient_and_an_unknown_id_without_one_is_poison() {
        // A port nothing listens on: connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let cfg = KafkaConfig { schema_registry_url: Some(format!("http://127.0.0.1:{port}")), ..Default::default() };
        let err = WireDecoder::from_config(&cfg).expect("decoder").decode(&wire(5)).expect_err("no registry");
        assert_eq!(err.class(), ErrorClass::Transient, "{err}");
        let cfg = KafkaConfig::default();
        let err = WireDecoder::from_config(&cfg).expect("decoder").decode(&wire(5)).expect_err("unknown id");
        assert_eq!(err, DecodeError::UnknownSchemaId(5));
        assert_eq!(err.class(), ErrorClass::Poison);
    }

    #[test]
    fn a_local_schema_file_is_used_without_a_registry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("event.avsc");
        std::fs::write(&path, segstream_decode::EVENT_SCHEMA_JSON).expect("write");
        let mut cfg = KafkaConfig::default();
        cfg.schemas.insert(3, path);
        let e = segstream_decode::decode_json_line(br#"{"event_id":"e","customer_id":"c","type":"login","ts":1767225600000}"#)
            .expect("event");
        let datum =
            apache_avro::to_avro_datum(segstream_decode::event_schema(), segstream_decode::event_to_avro_value(&e)).expect("datum");
        let mut bytes = vec![0, 0, 0, 0, 3];
        bytes.extend(datum);
        assert_eq!(WireDecoder::from_config(&cfg).expect("decoder").decode(&bytes).expect("decodes"), e);
        cfg.schemas.insert(4, dir.path().join("missing.avsc"));
        let err = WireDecoder::from_config(&cfg).err().expect("missing file is an error");
        assert!(err.to_string().contains("missing.avsc"), "{err}");
    }
}
