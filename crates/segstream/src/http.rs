//! The HTTP endpoint beside a running pipeline: `/metrics` (OpenMetrics
//! text), `/healthz` (liveness: fails when a partition with lag is stuck)
//! and `/readyz` (readiness: joined, assigned, nothing restoring), served by a small tokio runtime on its own thread,
//! so that nothing of the pipeline runs on a tokio worker.

use std::net::SocketAddr;
use std::sync::Arc;

use segstream_kafka::Metrics;

/// What the endpoint serves: metrics text and the two probes.
pub trait Exposition: Send + Sync + 'static {
    fn encode(&self) -> String;
    fn liveness(&self) -> Result<(), String>;
    fn readiness(&self) -> Result<(), String>;
}

impl Exposition for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }

    fn liveness(&self) -> Result<(), String> {
        Metrics::liveness(self)
    }

    fn readiness(&self) -> Result<(), String> {
        Metrics::readiness(self)
    }
}

/// A probe's answer: 200 with `ok`, or 503 with the reason.
async fn probe(state: Result<(), String>, ok: &'static str) -> (axum::http::StatusCode, String) {
    match state {
        Ok(()) => (axum::http::StatusCode::OK, ok.to_string()),
        Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Binds `addr` (port 0 picks a free one).
pub fn bind(addr: &str) -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("metrics address {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// Serves on `addr` (port 0 picks a free one); returns the bound address.
pub fn serve(addr: &str, metrics: Arc<dyn Exposition>) -> anyhow::Result<SocketAddr> {
    let (listener, bound) = bind(addr)?;
    serve_on(listener, metrics, None)?;
    Ok(bound)
}

/// Serves `/metrics`, `/healthz` and `extra`'s routes (the query API) on a
/// bound listener, from a thread of its own.
pub fn serve_on(
    listener: std::net::TcpListener,
    metrics: Arc<dyn Exposition>,
    extra: Option<axum::Router>,
) -> anyhow::Result<()> {
    std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("metrics endpoint: {e}");
                return;
            }
        };
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("metrics endpoint: {e}");
                    return;
                }
            };
            let m = metrics.clone();
            let h = metrics.clone();
            let app = axum::Router::new()
                .route(
                    "/metrics",
                    axum::routing::get(move || {
                        let m = m.clone();
                        async move {
                            (
                                [(
                                    axum::http::header::CONTENT_TYPE,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )],
                                m.encode(),
                            )
                        }
                    }),
                )
                .route("/healthz", axum::routing::get(move || probe(h.liveness(), "ok")))
                .route("/readyz", axum::routing::get(move || probe(metrics.readiness(), "ready")));
            let app = match extra {
                Some(extra) => app.merge(extra),
                None => app,
            };
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("metrics endpoint: {e}");
            }
        });
    })?;
    Ok(())
}
