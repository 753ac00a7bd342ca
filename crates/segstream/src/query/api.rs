//! The query API over HTTP (JSON, versioned under `/v1`, described by
//! `/v1/openapi.json`). Handlers read RocksDB on tokio's blocking pool,
//! never on an async worker.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use segstream_decode::parse_rfc3339_millis;
use serde_json::Value;

use super::{QueryError, StateReader};

/// The OpenAPI description served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

type Params = Query<HashMap<String, String>>;

/// An instant parameter: RFC 3339, a date (its start, UTC), or epoch ms.
fn instant(params: &HashMap<String, String>, name: &'static str) -> Result<Option<i64>, QueryError> {
    let Some(v) = params.get(name) else { return Ok(None) };
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(Some(ms));
    }
    let text = if v.len() == 10 { format!("{v}T00:00:00Z") } else { v.clone() };
    parse_rfc3339_millis(&text).map(Some).map_err(|e| {
        QueryError::bad(name, format!("{name}={v:?}: {e} (expected RFC 3339, a date YYYY-MM-DD, or epoch ms)"))
    })
}

fn only(params: &HashMap<String, String>, allowed: &[&str]) -> Result<(), QueryError> {
    match params.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(QueryError {
            status: 400,
            code: "unknown_parameter",
            message: format!("unknown parameter {k:?}; this endpoint takes: {}", allowed.join(", ")),
            parameter: None,
        }),
        None => Ok(()),
    }
}

/// Runs a reader call on the blocking pool.
async fn blocking(
    reader: Arc<StateReader>,
    f: impl FnOnce(&StateReader) -> Result<Value, QueryError> + Send + 'static,
) -> Result<Json<Value>, QueryError> {
    tokio::task::spawn_blocking(move || f(&reader))
        .await
        .map_err(|e| QueryError { status: 500, code: "internal", message: e.to_string(), parameter: None })?
        .map(Json)
}

async fn customer(
    State(r): State<Arc<StateReader>>,
    Path(id): Path<String>,
    Query(p): Params,
) -> Result<Json<Value>, QueryError> {
    only(&p, &["at"])?;
    let at = instant(&p, "at")?;
    blocking(r, move |r| r.customer(&id, at)).await
}

async fn segments(State(r): State<Arc<StateReader>>, Query(p): Params) -> Result<Json<Value>, QueryError> {
    only(&p, &[])?;
    blocking(r, |r| r.segments()).await
}

async fn members(
    State(r): State<Arc<StateReader>>,
    Path((group, segment)): Path<(String, String)>,
    Query(p): Params,
) -> Result<Json<Value>, QueryError> {
    only(&p, &["limit", "after"])?;
    let limit = match p.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(QueryError::bad("limit", format!("limit={v:?}: a number from 1 to {MAX_LIMIT}"))),
        },
    };
    let after = p.get("after").cloned();
    blocking(r, move |r| r.members(&group, &segment, after.as_deref(), limit)).await
}

async fn history(
    State(r): State<Arc<StateReader>>,
    Path(group): Path<String>,
    Query(p): Params,
) -> Result<Json<Value>, QueryError> {
    only(&p, &["from", "to"])?;
    let (from, to) = (instant(&p, "from")?, instant(&p, "to")?);
    blocking(r, move |r| r.history(&group, from, to)).await
}

async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn not_found() -> QueryError {
    QueryError::not_found("not_found", "no such endpoint; see /v1/openapi.json".into())
}

/// The `/v1` routes over `reader`.
pub fn router(reader: Arc<StateReader>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/customers/{id}", get(customer))
        .route("/v1/segments", get(segments))
        .route("/v1/segments/{group}/history", get(history))
        .route("/v1/segments/{group}/{segment}/customers", get(members))
        .fallback(not_found)
        .with_state(reader)
}

/// Serves the API on `addr` from the calling thread until the process ends;
/// `ready` is told the bound address first.
pub fn serve(addr: &str, reader: Arc<StateReader>, ready: impl FnOnce(std::net::SocketAddr)) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("address {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    ready(listener.local_addr()?);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, router(reader)).await
    })?;
    Ok(())
}
