//! Building and running the application: settings in, bound listeners, migrated database and a
//! started engine out. Tests build it on port 0 and read the real ports back.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming};
use tonic_health::ServingStatus;

use crate::{
    api::{Audience, GuardLayer, MAX_REQUEST_BYTES, OptIns, Pages, Sends, Stories, pb},
    config::{ApiKeys, DatabaseUrl, Settings, TlsFiles},
    crypto::{self, KeyFileOutcome, MasterKey, SecretCipher},
    engine::{EngineHandle, LeaseSettings, PacingSettings, StreamSlots},
    graph::GraphClient,
    http::{self, HttpState},
    store::{self, Store, meta},
};

/// Deliveries an unpaced page keeps in flight (benchmarks; paced pages derive theirs). Also the
/// most a crash can leave ambiguous on such a page. S0 (2026-11-24, 5 runs each): 4,000 gave a
/// median of ~30,800/s, 8,000 35,534/s, 16,000 34,856/s; S3's peak RSS 119 -> 123 MiB.
const UNPACED_IN_FLIGHT: usize = 8000;

/// Page leases on SQLite: effectively forever (see where it is used).
const SQLITE_LEASE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How often SQLite's single instance looks for pages to give up or take.
const SQLITE_LEASE_ROUND: Duration = Duration::from_secs(2);

/// The services health reports on, besides the whole server ("").
const SERVICE_NAMES: &[&str] = &[
    pb::page_service_server::SERVICE_NAME,
    pb::audience_service_server::SERVICE_NAME,
    pb::opt_in_service_server::SERVICE_NAME,
    pb::story_service_server::SERVICE_NAME,
    pb::send_service_server::SERVICE_NAME,
];

pub struct Application {
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    tls: Option<ServerTlsConfig>,
    guard: GuardLayer,
    /// The keys the guard checks, which the console checks too.
    api_keys: Arc<ApiKeys>,
    /// Serve the console on the HTTP listener.
    console: bool,
    cors: tower_http::cors::CorsLayer,
    shutdown_grace: Duration,
    max_active_sends: u64,
    recurring_cooldown_ms: i64,
    /// How long a Graph call may stay unanswered.
    graph_timeout: Duration,
    store: Store,
    cipher: SecretCipher,
    graph: GraphClient,
    engine: EngineHandle,
}

impl Application {
    /// Connects and migrates the database, checks the master key, binds both listeners and starts
    /// the engine. Must run inside an `actix::System`.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // First, so that a build without crash points refuses the setting before it creates
        // or migrates anything.
        match crate::crashpoint::arm() {
            Ok(None) => {}
            Ok(Some(point)) => tracing::warn!(
                %point,
                "a test crash point is armed: this process will abort when it passes it"
            ),
            Err(problem) => bail!(problem),
        }
        let tls = settings.tls.as_ref().map(tls_config).transpose()?;
        let graph = GraphClient::new(
            &settings.graph_url,
            &settings.graph_version,
            settings.graph_timeout,
        )
        .context("Failed to build the Graph API client")?;
        let master_key = resolve_master_key(&settings)?;
        let cipher = SecretCipher::new(&master_key);

        let instance = instance_id(&settings);
        let store = Store::connect_serving(&settings.database_url, &instance).await?;
        store.migrate().await?;
        match meta::check_master_key(&store.db, &cipher)
            .await
            .context("Failed to check the master key against the database")?
        {
            meta::KeyCheck::Recorded | meta::KeyCheck::Matches => {}
            meta::KeyCheck::Mismatch => bail!(
                "the master key does not open the secrets already stored in this database; \
                 start otnd with the OTN_MASTER_KEY (or the key file) it was first started with"
            ),
        }

        let grpc_listener = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("Failed to listen for gRPC on {}", settings.grpc_addr))?;
        let http_listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("Failed to listen for HTTP on {}", settings.http_addr))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        if !settings.enforce_page_rate {
            tracing::warn!(
                "OTN_ENFORCE_PAGE_RATE is off: pages are sent to as fast as Graph answers; \
                 for benchmarks against a sandbox only"
            );
        }
        let stream_slots = StreamSlots::new(settings.max_watchers);
        let engine = EngineHandle::start(
            store.clone(),
            cipher.clone(),
            graph.clone(),
            PacingSettings {
                enforce_page_rate: settings.enforce_page_rate,
                max_batch: settings.send_batch_max,
                app_rate: settings.app_rate_per_second,
                unpaced_in_flight: UNPACED_IN_FLIGHT,
            },
            match settings.database_url {
                // One instance by construction (the instance lock): its leases never lapse. A
                // round still runs every few seconds, to give up pages whose sends ended and
                // take waiting ones (see OTN_MAX_PAGE_ACTORS).
                DatabaseUrl::Sqlite(_) => LeaseSettings {
                    instance: instance.clone(),
                    ttl: SQLITE_LEASE,
                    round_every: SQLITE_LEASE_ROUND,
                    max_pages: settings.max_page_actors,
                },
                DatabaseUrl::Postgres(_) => LeaseSettings {
                    instance: instance.clone(),
                    ttl: settings.lease_ttl,
                    round_every: settings.lease_ttl / 3,
                    max_pages: settings.max_page_actors,
                },
            },
            stream_slots.clone(),
            settings.max_watchers_per_send,
        );
        tracing::info!(
            %grpc_addr,
            %http_addr,
            database = settings.database_url.backend_name(),
            %instance,
            tls = tls.is_some(),
            api_keys = !settings.api_keys.is_empty(),
            cors_origins = settings.cors_origins.len(),
            "otnd ready"
        );
        let api_keys = Arc::new(settings.api_keys);
        // Without keys the console answers anyone: only where only this machine can reach it.
        let console = settings.console && (!api_keys.is_empty() || http_addr.ip().is_loopback());
        if settings.console && !console {
            tracing::warn!(
                %http_addr,
                "the console is not served: OTN_HTTP_ADDR is not a loopback address and \
                 OTN_API_KEYS is not set; set OTN_API_KEYS to serve it, or OTN_CONSOLE=false \
                 to say it is meant to be off"
            );
        }
        Ok(Application {
            grpc_listener,
            http_listener,
            grpc_addr,
            http_addr,
            tls,
            guard: GuardLayer::new(
                api_keys.clone(),
                settings.max_concurrent_requests,
                settings.request_timeout,
                stream_slots,
            ),
            api_keys,
            console,
            cors: cors_layer(&settings.cors_origins),
            shutdown_grace: settings.shutdown_grace,
            max_active_sends: settings.max_active_sends,
            recurring_cooldown_ms: i64::try_from(settings.recurring_cooldown.as_millis())
                .unwrap_or(i64::MAX),
            graph_timeout: settings.graph_timeout,
            store,
            cipher,
            graph,
            engine,
        })
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_addr.port()
    }

    pub fn http_port(&self) -> u16 {
        self.http_addr.port()
    }

    /// Serves until `shutdown` completes, then: health NOT_SERVING, the engine stops taking work
    /// and records what is in flight, the servers finish the requests they hold, and it returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let (serving_tx, serving_rx) = watch::channel(true);
        let (stop_tx, stop_rx) = watch::channel(false);

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("Failed to build the reflection service")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("Failed to build the reflection service")?;

        let pages = pb::page_service_server::PageServiceServer::new(Pages::new(
            self.store.clone(),
            self.cipher.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let audience = pb::audience_service_server::AudienceServiceServer::new(Audience::new(
            self.store.clone(),
            self.cipher.clone(),
            self.engine.clone(),
            self.graph_timeout,
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let graph_context = crate::service::GraphContext {
            store: self.store.clone(),
            cipher: self.cipher.clone(),
            graph: self.graph.clone(),
            recurring_cooldown_ms: self.recurring_cooldown_ms,
        };
        let optins =
            pb::opt_in_service_server::OptInServiceServer::new(OptIns::new(graph_context.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES);
        let stories =
            pb::story_service_server::StoryServiceServer::new(Stories::new(graph_context))
                .max_decoding_message_size(MAX_REQUEST_BYTES);
        let sends_context = crate::service::sends::Context {
            store: self.store.clone(),
            engine: self.engine.clone(),
            stopping: stop_rx.clone(),
            max_active_sends: self.max_active_sends,
            recurring_cooldown_ms: self.recurring_cooldown_ms,
        };
        let console = self.console.then(|| crate::console::ConsoleState {
            sends: sends_context.clone(),
            api_keys: self.api_keys.clone(),
        });
        let sends = pb::send_service_server::SendServiceServer::new(Sends::new(sends_context))
            .max_decoding_message_size(MAX_REQUEST_BYTES);

        let mut builder = Server::builder();
        if let Some(tls) = self.tls {
            builder = builder
                .tls_config(tls)
                .context("Failed to configure TLS for gRPC")?;
        }
        // Browsers speak grpc-web over HTTP/1.1 (or HTTP/2 with TLS): translated to gRPC before
        // the guard, so API keys, roles, shedding and deadlines apply to them as to any client.
        let grpc_server = builder
            .accept_http1(true)
            .layer(self.cors)
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(self.guard)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(pages)
            .add_service(audience)
            .add_service(optins)
            .add_service(stories)
            .add_service(sends)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.grpc_listener).with_nodelay(Some(true)),
                stopped(stop_rx.clone()),
            );
        let mut grpc_task = tokio::spawn(grpc_server);

        let http_app = http::router(HttpState {
            store: self.store.clone(),
            cipher: self.cipher.clone(),
            serving: serving_rx,
            metrics: crate::engine::metrics::prometheus(),
            console,
        });
        let http_server = axum::serve(self.http_listener, http_app)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future();
        let mut http_task = tokio::spawn(http_server);

        // Runs until a shutdown is asked for, or a server fails on its own.
        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested"),
            result = &mut grpc_task => {
                return Err(server_ended("gRPC", result.map(|r| r.map_err(anyhow::Error::from))));
            }
            result = &mut http_task => {
                return Err(server_ended("HTTP", result.map(|r| r.map_err(anyhow::Error::from))));
            }
        }

        let _ = serving_tx.send(false);
        set_health(&health, ServingStatus::NotServing).await;
        if let Err(err) = self.engine.shutdown(self.shutdown_grace).await {
            tracing::warn!(error = %err, "engine did not confirm its shutdown");
        }
        let _ = stop_tx.send(true);
        // Long-lived streams (Health/Watch, WatchSend) never end on their own: after the grace
        // period the servers are stopped with whatever is still open.
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            tokio::join!(&mut grpc_task, &mut http_task)
        })
        .await;
        match drained {
            Ok((grpc, http)) => {
                grpc.context("gRPC server task failed")?
                    .context("gRPC server failed")?;
                http.context("HTTP server task failed")?
                    .context("HTTP server failed")?;
            }
            Err(_) => {
                tracing::warn!(
                    grace_seconds = self.shutdown_grace.as_secs(),
                    "closing connections still open after the shutdown grace period"
                );
                grpc_task.abort();
                http_task.abort();
            }
        }
        self.store.close().await;
        tracing::info!("otnd stopped");
        Ok(())
    }
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(*name, status).await;
    }
}

/// Completes once the stop flag is raised (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

fn server_ended(
    name: &str,
    result: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Error {
    match result {
        Ok(Ok(())) => anyhow::anyhow!("the {name} server stopped unexpectedly"),
        Ok(Err(err)) => err.context(format!("the {name} server failed")),
        Err(err) => anyhow::Error::from(err).context(format!("the {name} server task failed")),
    }
}

fn tls_config(files: &TlsFiles) -> anyhow::Result<ServerTlsConfig> {
    let cert = std::fs::read(&files.cert)
        .with_context(|| format!("Failed to read OTN_TLS_CERT {}", files.cert.display()))?;
    let key = std::fs::read(&files.key)
        .with_context(|| format!("Failed to read OTN_TLS_KEY {}", files.key.display()))?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
}

/// The configured key, or on SQLite the key file beside the database (created on first start).
fn resolve_master_key(settings: &Settings) -> anyhow::Result<MasterKey> {
    if let Some(key) = &settings.master_key {
        return Ok(key.clone());
    }
    match &settings.database_url {
        DatabaseUrl::Postgres(_) => {
            bail!("OTN_MASTER_KEY is required with PostgreSQL")
        }
        DatabaseUrl::Sqlite(url) => match store::sqlite_file(url)? {
            Some(database_file) => {
                let path = crypto::key_file_for(&database_file);
                let (key, outcome) = MasterKey::load_or_create_file(&path)?;
                if outcome == KeyFileOutcome::Created {
                    tracing::warn!(
                        key_file = %path.display(),
                        "generated a master key for page secrets; back it up with the database \
                         (without it the stored secrets cannot be read)"
                    );
                }
                Ok(key)
            }
            None => {
                tracing::warn!("in-memory database: page secrets use a throwaway master key");
                Ok(MasterKey::generate())
            }
        },
    }
}

/// Keeps transparent huge pages off this process. The allocator hands memory it no longer uses
/// back to the OS and faults it in again under load; where THP is `always` (as on the benchmark
/// machine), each such fault zeroes a whole 2 MiB page (`clear_page_erms`: 3% to 10% of otnd's
/// CPU in an unpaced send), and S0's median was 4% to 5% lower with THP than without. Only
/// Linux has the switch; elsewhere, or if the kernel refuses it, nothing changes.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and reads or writes no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// How far below the API's threads the engine's threads run (a nice value, Linux).
const ENGINE_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority below the API's: for the engine's threads (page
/// actors and senders), which do the bulk of a send. On a busy instance
/// an operator's GetSend or a dashboard's snapshot then waits for no page's step: while S5's
/// thousand pages sent, its p99 was 43 ms with every thread equal. The engine loses nothing it
/// would have used: it is paced by Facebook, and takes every cycle the API leaves. Linux only
/// (setpriority on a thread id changes that thread alone); elsewhere nothing changes.
pub fn lower_engine_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and get/setpriority take plain integers and touch no memory of ours.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        // A lower priority is always allowed; failing to lower it changes nothing else.
        libc::setpriority(libc::PRIO_PROCESS, tid, (current + ENGINE_NICE).min(19));
    }
}

/// `otnd migrate`: applies pending migrations and exits.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = Store::connect(&settings.database_url).await?;
    store.migrate().await?;
    store.close().await;
    tracing::info!(
        database = settings.database_url.backend_name(),
        "migrations applied"
    );
    Ok(())
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: a signal that arrives while the application is still being built
/// (connecting, migrating) or between "otnd ready" and serving is kept and begins the graceful
/// shutdown at once, instead of killing the process with the signal's default action. Must be
/// called inside a tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for {name}");
                None
            }
        };
        let terminate = listen(SignalKind::terminate(), "SIGTERM");
        let interrupt = listen(SignalKind::interrupt(), "SIGINT");
        async move {
            let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(terminate) => {},
                () = wait(interrupt) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

/// An application running on a thread of its own, in its own actix System over a multi-thread
/// tokio runtime, exactly as `otnd serve` runs it: for tests, benchmarks and embedding.
pub struct BackgroundApp {
    pub grpc_port: u16,
    pub http_port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl BackgroundApp {
    /// Starts the application and waits until it serves (blocking). Start-up errors are
    /// returned with their whole cause chain.
    pub fn start(settings: Settings, worker_threads: usize) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(u16, u16), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("otnd-app".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(worker_threads.max(1))
                    .enable_all()
                    .build()?;
                actix::System::with_tokio_rt(move || runtime).block_on(async move {
                    let app = match Application::build(settings).await {
                        Ok(app) => app,
                        Err(err) => {
                            let _ = ready_tx.send(Err(format!("{err:#}")));
                            return Err(err);
                        }
                    };
                    let _ = ready_tx.send(Ok((app.grpc_port(), app.http_port())));
                    app.run_until_stopped(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                })
            })?;
        match ready_rx.recv() {
            Ok(Ok((grpc_port, http_port))) => Ok(BackgroundApp {
                grpc_port,
                http_port,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(message)) => {
                let _ = thread.join();
                Err(anyhow::anyhow!(message))
            }
            Err(_) => Err(anyhow::anyhow!(
                "the application thread ended before it served: {:?}",
                thread.join().map(|r| r.err().map(|e| format!("{e:#}")))
            )),
        }
    }

    /// Asks for a graceful shutdown and waits for it (blocking).
    pub fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(anyhow::anyhow!("the application thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for BackgroundApp {
    fn drop(&mut self) {
        // Dropped without `stop`: still shut down, without waiting.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// This instance's name among those sharing the database. On SQLite, which takes one instance
/// (see the instance lock), the name is fixed, so a restart takes its pages back at once.
fn instance_id(settings: &Settings) -> String {
    match (&settings.instance_id, &settings.database_url) {
        (Some(id), _) => id.clone(),
        (None, DatabaseUrl::Sqlite(_)) => "sqlite".to_string(),
        (None, DatabaseUrl::Postgres(_)) => {
            format!("otnd-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The thread's own nice value, as the kernel reports it.
    fn this_threads_nice() -> i32 {
        // SAFETY: gettid and getpriority take plain integers and touch no memory of ours.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }

    #[test]
    fn an_engine_thread_runs_below_the_others_and_only_it_does() {
        let before = this_threads_nice();
        let lowered = std::thread::spawn(|| {
            super::lower_engine_thread_priority();
            this_threads_nice()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (before + super::ENGINE_NICE).min(19));
        assert_eq!(
            this_threads_nice(),
            before,
            "the calling thread is unchanged"
        );
    }
}

/// CORS for grpc-web callers from the configured origins only: no origin configured, no
/// cross-origin page may call (the layer then answers preflights without allowing anything).
fn cors_layer(origins: &[String]) -> tower_http::cors::CorsLayer {
    use ::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([
            header("authorization"),
            header("content-type"),
            header("grpc-timeout"),
            header("x-grpc-web"),
            header("x-user-agent"),
        ])
        .expose_headers([
            header("grpc-status"),
            header("grpc-message"),
            header("grpc-status-details-bin"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}
