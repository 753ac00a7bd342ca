//! A Schema Registry client (blocking; called from the start-up check and
//! the partition threads, never from a tokio worker): writer schemas by id
//! (`GET /schemas/ids/{id}`) and the registration of the transition schema.

use std::fmt;
use std::time::Duration;

use segstream_decode::{Classify, ErrorClass};

/// Why the registry did not answer a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("{url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url}: HTTP {status}: check kafka.schema_registry_user_info (or SEGSTREAM_SCHEMA_REGISTRY_USER_INFO)")]
    Unauthorized { url: String, status: u16 },
    #[error("{url}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status { url: String, status: u16, body: String },
    #[error("{url}: unexpected answer: {reason}")]
    BadAnswer { url: String, reason: String },
}

impl Classify for RegistryError {
    /// An outage or a server error may pass: retried, stop-aware
    /// ([`crate::stop::retry`]). Refused credentials or an answer that is not
    /// the registry's API will not: the partition stops with the message.
    fn class(&self) -> ErrorClass {
        match self {
            RegistryError::Unreachable { .. } | RegistryError::Status { .. } => ErrorClass::Transient,
            RegistryError::Unauthorized { .. } | RegistryError::BadAnswer { .. } => ErrorClass::Fatal,
        }
    }
}

/// A Schema Registry at a base URL, with optional HTTP basic authentication.
#[derive(Clone)]
pub struct Registry {
    base: String,
    agent: ureq::Agent,
    /// `Authorization` header value (HTTP basic), never logged.
    authorization: Option<String>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("base", &self.base)
            .field("authenticated", &self.authorization.is_some())
            .finish()
    }
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

    pub fn base(&self) -> &str {
        &self.base
    }

    fn authorized<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(a) => req.header("Authorization", a),
            None => req,
        }
    }

    /// The schema text of `id`: `Ok(None)` when the registry does not know
    /// it (the record is poison), `Err` when it cannot answer now.
    pub fn schema(&self, id: u32) -> Result<Option<String>, RegistryError> {
        let url = format!("{}/schemas/ids/{id}", self.base);
        let unreachable = |e: ureq::Error| RegistryError::Unreachable { url: url.clone(), reason: e.to_string() };
        let mut resp = self.authorized(self.agent.get(&url)).call().map_err(unreachable)?;
        match resp.status().as_u16() {
            200 => resp
                .body_mut()
                .read_json::<SchemaResponse>()
                .map(|r| Some(r.schema))
                .map_err(|e| RegistryError::BadAnswer { url: url.clone(), reason: e.to_string() }),
            404 => Ok(None),
            status @ (401 | 403) => Err(RegistryError::Unauthorized { url, status }),
            status => Err(RegistryError::Status { url, status, body: String::new() }),
        }
    }

    /// Registers `schema` under `subject` (idempotent in the registry) and
    /// returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let url = format!("{}/subjects/{subject}/versions", self.base);
        let body = serde_json::json!({ "schema": schema });
        let mut resp = self
            .authorized(self.agent.post(&url))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .send_json(&body)
            .map_err(|e| RegistryError::Unreachable { url: url.clone(), reason: e.to_string() })?;
        match resp.status().as_u16() {
            200 => resp
                .body_mut()
                .read_json::<IdResponse>()
                .map(|r| r.id)
                .map_err(|e| RegistryError::BadAnswer { url: url.clone(), reason: e.to_string() }),
            status @ (401 | 403) => Err(RegistryError::Unauthorized { url, status }),
            status => {
                Err(RegistryError::Status { url, status, body: resp.body_mut().read_to_string().unwrap_or_default() })
            }
        }
    }
}
