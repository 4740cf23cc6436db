//! graph-sandbox: a faithful fake of the parts of the Graph API otnd uses, for tests, benchmarks
//! and staging, and the judge of exactly-once (it counts every token presented and every
//! message accepted). State lives in memory. See the README's "Staging with graph-sandbox".

mod admin;
pub mod cli;
mod graph;
mod webhook;
pub mod wire;
pub mod world;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Router,
    routing::{get, post},
};
use tokio::net::TcpListener;

pub use graph::MAX_BATCH_ITEMS;
pub use world::{AcceptedMessage, Faults, Stats, TokenKind};

#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// The faults (latency and rate limit included) it starts with and returns to on reset.
    pub faults: Faults,
    /// Tries per webhook POST before it is abandoned.
    pub webhook_max_attempts: u32,
    /// Pause before the first retry; each later one doubles it.
    pub webhook_retry_base: Duration,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            faults: Faults::default(),
            webhook_max_attempts: 8,
            webhook_retry_base: Duration::from_millis(500),
        }
    }
}

pub struct Shared {
    world: Mutex<world::World>,
    http: reqwest::Client,
    options: SandboxOptions,
}

impl Shared {
    /// The world's lock. A panic while it was held leaves counters that may be off by one event,
    /// which is better for a test double than refusing every later request.
    fn world(&self) -> MutexGuard<'_, world::World> {
        self.world
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A reqwest client builder with rustls on the ring provider (installed as the process's default
/// if none is yet; whoever installed one first keeps theirs).
pub fn http_client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// Idle connections the sandbox keeps to a webhook receiver.
const WEBHOOK_IDLE_CONNECTIONS: usize = 16;

/// The sandbox's routes. Fails when `options.faults` are not valid.
pub fn router(options: SandboxOptions) -> Result<Router, String> {
    options.faults.validate()?;
    let shared = Arc::new(Shared {
        world: Mutex::new(world::World::new(options.faults.clone())),
        // Webhooks go out many at a time; a sender that kept every connection it ever opened
        // would leave the receiver holding hundreds of idle ones (and their buffers).
        http: http_client_builder()
            .timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(WEBHOOK_IDLE_CONNECTIONS)
            .build()
            .expect("a plain HTTP client builds"),
        options,
    });
    Ok(Router::new()
        .route("/", post(graph::batch))
        .route("/{version}", post(graph::batch))
        .route("/{version}/", post(graph::batch))
        .route("/{version}/{node}/messages", post(graph::messages))
        .route("/__sandbox/pages", post(admin::create_page))
        .route("/__sandbox/optins", post(admin::create_optins))
        .route(
            "/__sandbox/recurring/status",
            post(admin::set_recurring_status),
        )
        .route("/__sandbox/interactions", post(admin::create_interaction))
        .route(
            "/__sandbox/faults",
            post(admin::set_faults).get(admin::get_faults),
        )
        .route("/__sandbox/messages", get(admin::messages))
        .route("/__sandbox/stats", get(admin::stats))
        .route("/__sandbox/reset", post(admin::reset))
        .with_state(shared))
}

/// Serves the sandbox on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    options: SandboxOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(options).map_err(std::io::Error::other)?;
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A sandbox running in the background of the current tokio runtime (tests, benchmarks).
pub struct RunningSandbox {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningSandbox {
    pub async fn start(options: SandboxOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, options, async move {
            let _ = stopped.await;
        }));
        Ok(RunningSandbox {
            addr,
            stop: Some(stop),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for RunningSandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
