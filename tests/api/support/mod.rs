//! The test harness: a fresh database per test (SQLite always, PostgreSQL when `DATABASE_URL` or
//! `OTN_TEST_DATABASE_URL` names one), the application started on port 0 in its own actix
//! System, and typed gRPC clients. The client-side fixtures (a page, a reviewed story, a started
//! send, the sandbox's admin surface, the judge) are `otnd_testkit`'s, shared with the
//! benchmarks, and re-exported here.

pub mod debian;

use std::{collections::BTreeMap, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use graph_sandbox::{RunningSandbox, SandboxOptions};
use otnd::{
    config::Settings,
    pb::{
        audience_service_client::AudienceServiceClient, opt_in_service_client::OptInServiceClient,
        page_service_client::PageServiceClient, send_service_client::SendServiceClient,
        story_service_client::StoryServiceClient,
    },
    startup::BackgroundApp,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub use otnd_testkit::{
    Sandbox, eventually, page_access_token, page_app_secret, page_verify_token,
};

/// The master key the harness gives every app unless a test asks for none.
pub const TEST_MASTER_KEY: [u8; 32] = [42; 32];

pub fn test_master_key_base64() -> String {
    BASE64.encode(TEST_MASTER_KEY)
}

/// Runs each test body once per backend: `<name>::sqlite` always, `<name>::postgres` when a
/// PostgreSQL URL is configured (it says so and passes otherwise, so plain `cargo test` works).
#[macro_export]
macro_rules! backend_tests {
    ($(async fn $name:ident($db:ident) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let $db = $crate::support::TestDatabase::sqlite();
                $body
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some($db) = $crate::support::TestDatabase::postgres("otnd_test").await else {
                    eprintln!("skipped: DATABASE_URL names no PostgreSQL server");
                    return;
                };
                $body
            }
        }
    )*};
}

/// A database of this test's own, removed when dropped.
pub use otnd::store::scratch::ScratchDatabase as TestDatabase;

/// Settings for an app on `db`, on port 0, with the test master key; `overrides` are `OTN_*`
/// variables as a user would set them.
pub fn settings_for(db: &TestDatabase, overrides: &[(&str, &str)]) -> Result<Settings, String> {
    settings_with_graph(db, "http://127.0.0.1:9", overrides)
}

fn settings_with_graph(
    db: &TestDatabase,
    graph_url: &str,
    overrides: &[(&str, &str)],
) -> Result<Settings, String> {
    let mut env: BTreeMap<String, String> = [
        ("OTN_GRAPH_URL", graph_url.to_string()),
        ("OTN_DATABASE_URL", db.url.clone()),
        ("OTN_GRPC_ADDR", "127.0.0.1:0".to_string()),
        ("OTN_HTTP_ADDR", "127.0.0.1:0".to_string()),
        ("OTN_MASTER_KEY", test_master_key_base64()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (key, value) in overrides {
        env.insert(key.to_string(), value.to_string());
    }
    // An override of "" for the master key means "none": the app falls back to its key file.
    if env.get("OTN_MASTER_KEY").is_some_and(String::is_empty) {
        env.remove("OTN_MASTER_KEY");
    }
    Settings::load_from(None, &env).map_err(|e| e.to_string())
}

/// A running application and clients connected to it.
pub struct TestApp {
    pub grpc_port: u16,
    pub http_port: u16,
    pub channel: Channel,
    pub pages: PageServiceClient<Channel>,
    pub audience: AudienceServiceClient<Channel>,
    pub optins: OptInServiceClient<Channel>,
    pub stories: StoryServiceClient<Channel>,
    pub sends: SendServiceClient<Channel>,
    /// The Graph sandbox otnd talks to (apps started by `spawn_app*`).
    running_sandbox: Option<RunningSandbox>,
    app: Option<BackgroundApp>,
}

pub async fn spawn_app(db: &TestDatabase) -> TestApp {
    spawn_app_with(db, &[]).await
}

/// The app with a Graph sandbox of its own behind `OTN_GRAPH_URL`.
pub async fn spawn_app_with(db: &TestDatabase, overrides: &[(&str, &str)]) -> TestApp {
    let sandbox = RunningSandbox::start(SandboxOptions {
        webhook_retry_base: Duration::from_millis(50),
        ..SandboxOptions::default()
    })
    .await
    .expect("the sandbox starts");
    let settings =
        settings_with_graph(db, &sandbox.url(""), overrides).expect("valid test settings");
    let mut app = try_spawn(settings).await.expect("the application starts");
    app.running_sandbox = Some(sandbox);
    app
}

/// Starts the application in a thread of its own running an actix System over a multi-thread
/// tokio runtime, exactly as `otnd serve` does. Start-up errors come back as `Err`.
pub async fn try_spawn(settings: Settings) -> Result<TestApp, String> {
    try_spawn_tls(settings, None).await
}

/// As [`try_spawn`], connecting over TLS to a server whose certificate `ca_pem` signs (for the
/// name `localhost`).
pub async fn try_spawn_tls(settings: Settings, ca_pem: Option<&[u8]>) -> Result<TestApp, String> {
    // With RUST_LOG set (e.g. `RUST_LOG=otnd=debug cargo test x -- --nocapture`), the app logs.
    if std::env::var_os("RUST_LOG").is_some() {
        otnd::telemetry::init(otnd::config::LogFormat::Pretty);
    }
    let app = tokio::task::spawn_blocking(move || BackgroundApp::start(settings, 2))
        .await
        .expect("the start-up waiter")
        .map_err(|e| format!("{e:#}"))?;
    let grpc_port = app.grpc_port;
    let http_port = app.http_port;
    let endpoint = match ca_pem {
        None => Channel::from_shared(format!("http://127.0.0.1:{grpc_port}")).expect("a URI"),
        Some(ca_pem) => Channel::from_shared(format!("https://127.0.0.1:{grpc_port}"))
            .expect("a URI")
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca_pem))
                    .domain_name("localhost"),
            )
            .map_err(|e| format!("client TLS: {e}"))?,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting to the app: {e}"))?;
    Ok(TestApp {
        grpc_port,
        http_port,
        pages: PageServiceClient::new(channel.clone()),
        audience: AudienceServiceClient::new(channel.clone()),
        optins: OptInServiceClient::new(channel.clone()),
        stories: StoryServiceClient::new(channel.clone()),
        sends: SendServiceClient::new(channel.clone()),
        channel,
        running_sandbox: None,
        app: Some(app),
    })
}

/// `X-Hub-Signature-256` of a webhook body, as Facebook signs it with the app secret.
pub fn sign_webhook(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

impl TestApp {
    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn sandbox_url(&self, path: &str) -> String {
        self.running_sandbox
            .as_ref()
            .expect("an app with a sandbox")
            .url(path)
    }

    /// The sandbox's admin surface.
    pub fn sandbox(&self) -> Sandbox {
        Sandbox::new(self.sandbox_url(""))
    }

    /// POSTs JSON to the sandbox's admin surface; fails the test unless it answers 2xx.
    pub async fn sandbox_admin(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        self.sandbox().post(path, body).await
    }

    /// GETs JSON from the sandbox's admin surface.
    pub async fn sandbox_get(&self, path: &str) -> serde_json::Value {
        self.sandbox().get(path).await
    }

    /// Registers the page in otnd and in the sandbox, whose webhooks then go to otnd.
    pub async fn register_page(&mut self, page_id: &str) {
        let http = format!("127.0.0.1:{}", self.http_port);
        otnd_testkit::register_page(&self.channel, &self.sandbox(), &http, page_id, None).await;
    }

    /// Asks for a graceful shutdown and waits for the application to finish it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let app = self.app.take().expect("a running app");
        tokio::task::spawn_blocking(move || app.stop())
            .await
            .expect("the joiner")
    }
}

/// The field paths named in an INVALID_ARGUMENT's BadRequest details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "expected INVALID_ARGUMENT, got {status:?}"
    );
    status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// The status code a call ended with (`Ok` for success).
pub fn code_of<T>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    result.map_or_else(|status| status.code(), |_| tonic::Code::Ok)
}
