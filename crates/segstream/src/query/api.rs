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

use super::{Answers, PartitionAsk, QueryError};

type Source = Arc<dyn Answers>;

/// The OpenAPI description served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.body())).into_response();
        let headers = resp.headers_mut();
        if let Some(l) = self.location.as_deref().and_then(|l| axum::http::HeaderValue::from_str(l).ok()) {
            headers.insert(axum::http::header::LOCATION, l);
        }
        if let Some(s) = self.retry_after {
            headers.insert(axum::http::header::RETRY_AFTER, s.into());
        }
        resp
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
        Some(k) => Err(QueryError::new(
            400,
            "unknown_parameter",
            format!("unknown parameter {k:?}; this endpoint takes: {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

/// Runs a call on the blocking pool (RocksDB reads, other instances).
async fn blocking(
    source: Source,
    f: impl FnOnce(&dyn Answers) -> Result<Value, QueryError> + Send + 'static,
) -> Result<Json<Value>, QueryError> {
    tokio::task::spawn_blocking(move || f(&*source)).await.map_err(QueryError::internal)?.map(Json)
}

fn limit(p: &HashMap<String, String>) -> Result<usize, QueryError> {
    match p.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT + 1).contains(&n) => Ok(n),
            _ => Err(QueryError::bad("limit", format!("limit={v:?}: a number from 1 to {MAX_LIMIT}"))),
        },
    }
}

async fn customer(
    State(r): State<Source>,
    Path(id): Path<String>,
    Query(p): Params,
    uri: axum::http::Uri,
) -> Result<Json<Value>, QueryError> {
    only(&p, &["at"])?;
    let at = instant(&p, "at")?;
    let query = uri.query().unwrap_or_default().to_string();
    blocking(r, move |r| r.customer(&id, at, &query)).await
}

async fn segments(State(r): State<Source>, Query(p): Params) -> Result<Json<Value>, QueryError> {
    only(&p, &[])?;
    blocking(r, |r| r.segments()).await
}

async fn members(
    State(r): State<Source>,
    Path((group, segment)): Path<(String, String)>,
    Query(p): Params,
) -> Result<Json<Value>, QueryError> {
    only(&p, &["limit", "after"])?;
    let limit = limit(&p)?.min(MAX_LIMIT);
    let after = p.get("after").cloned();
    blocking(r, move |r| r.members(&group, &segment, after.as_deref(), limit)).await
}

async fn history(
    State(r): State<Source>,
    Path(group): Path<String>,
    Query(p): Params,
) -> Result<Json<Value>, QueryError> {
    only(&p, &["from", "to"])?;
    let (from, to) = (instant(&p, "from")?, instant(&p, "to")?);
    blocking(r, move |r| r.history(&group, from, to)).await
}

/// Between instances: one partition's counts, members or daily counts.
async fn partition_counts(State(r): State<Source>, Path(p): Path<i32>) -> Result<Json<Value>, QueryError> {
    blocking(r, move |r| r.partition(p, PartitionAsk::Counts)).await
}

async fn partition_series(State(r): State<Source>, Path(p): Path<i32>) -> Result<Json<Value>, QueryError> {
    blocking(r, move |r| r.partition(p, PartitionAsk::Series)).await
}

async fn partition_members(
    State(r): State<Source>,
    Path((p, group, segment)): Path<(i32, String, String)>,
    Query(q): Params,
) -> Result<Json<Value>, QueryError> {
    only(&q, &["limit", "after"])?;
    let ask = PartitionAsk::Members { group, segment, after: q.get("after").cloned(), limit: limit(&q)? };
    blocking(r, move |r| r.partition(p, ask)).await
}

async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn not_found() -> QueryError {
    QueryError::not_found("not_found", "no such endpoint; see /v1/openapi.json".into())
}

/// The `/v1` routes over `source`.
pub fn router(source: Source) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/customers/{id}", get(customer))
        .route("/v1/segments", get(segments))
        .route("/v1/segments/{group}/history", get(history))
        .route("/v1/segments/{group}/{segment}/customers", get(members))
        .route("/v1/partitions/{partition}/segments", get(partition_counts))
        .route("/v1/partitions/{partition}/series", get(partition_series))
        .route("/v1/partitions/{partition}/segments/{group}/{segment}/customers", get(partition_members))
        .fallback(not_found)
        .with_state(source)
}

/// Serves the API on `addr` from the calling thread until the process ends;
/// `ready` is told the bound address first.
pub fn serve(addr: &str, reader: Source, ready: impl FnOnce(std::net::SocketAddr)) -> anyhow::Result<()> {
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
