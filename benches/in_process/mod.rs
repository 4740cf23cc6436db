//! What the in-process benchmark programs (ingest, estimate_audience) share: otnd started as `otnd serve` runs, on a fresh SQLite file,
//! with one page registered.

use std::collections::BTreeMap;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use otnd::{
    config::{DatabaseUrl, Settings},
    pb::{CreatePageRequest, page_service_client::PageServiceClient},
    startup::BackgroundApp,
};

pub const PAGE: &str = "1234567890";

/// A running otnd on a SQLite file in a temporary directory (removed when `dir` drops).
pub struct Bench {
    pub app: BackgroundApp,
    // Each example compiles this module on its own; not every one reads the URL.
    #[allow(dead_code)]
    pub database: DatabaseUrl,
    pub dir: tempfile::TempDir,
}

pub fn start_on_sqlite() -> anyhow::Result<Bench> {
    let dir = tempfile::tempdir()?;
    let env: BTreeMap<String, String> = [
        (
            "OTN_DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.path().join("otnd.db").display()),
        ),
        ("OTN_GRPC_ADDR", "127.0.0.1:0".into()),
        ("OTN_HTTP_ADDR", "127.0.0.1:0".into()),
        ("OTN_MASTER_KEY", STANDARD.encode([7u8; 32])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_from(None, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    let database = settings.database_url.clone();
    let app = BackgroundApp::start(settings, 2)?;
    Ok(Bench { app, database, dir })
}

/// Connects to the app's gRPC port and registers [`PAGE`] with `app_secret`.
pub async fn connect_and_register(
    grpc_port: u16,
    app_secret: &str,
) -> anyhow::Result<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))?
        .connect()
        .await?;
    PageServiceClient::new(channel.clone())
        .create_page(CreatePageRequest {
            page_id: PAGE.into(),
            name: "Benchmark".into(),
            access_token: "EAAB-bench".into(),
            app_secret: app_secret.into(),
            verify_token: String::new(),
            send_rate_per_second: None,
        })
        .await?;
    Ok(channel)
}
