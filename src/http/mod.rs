//! The HTTP listener (axum): liveness for load balancers, Facebook's webhook, and the console.

use std::sync::Arc;

use axum::{Router, extract::DefaultBodyLimit, extract::State, http::StatusCode, routing::get};
use tokio::sync::watch;

use crate::{console, crypto::SecretCipher, store::Store, webhook};

#[derive(Clone)]
pub struct HttpState {
    pub store: Store,
    pub cipher: SecretCipher,
    /// True from the end of start-up until shutdown begins.
    pub serving: watch::Receiver<bool>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The console and its API; `None` when it is not served (see `startup`).
    pub console: Option<console::ConsoleState>,
}

pub fn router(mut state: HttpState) -> Router {
    let console = state.console.take().map(console::router);
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(
            "/webhook",
            get(webhook::verify)
                .post(webhook::receive)
                .layer(DefaultBodyLimit::max(webhook::MAX_BODY_BYTES)),
        )
        .with_state(Arc::new(state));
    match console {
        Some(console) => router.merge(console),
        None => router,
    }
}

/// Prometheus text exposition of the engine's counters and histograms.
async fn metrics(State(state): State<Arc<HttpState>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// 200 while serving with a reachable database; 503 with the reason otherwise.
async fn healthz(State(state): State<Arc<HttpState>>) -> (StatusCode, &'static str) {
    if !*state.serving.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "serving\n"),
        Err(err) => {
            tracing::warn!(error = %err, "health check: database unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
        }
    }
}
