//! grpc-web on the gRPC port, driven by a real grpc-web client (`buf curl --protocol grpcweb`, from
//! the npm registry through npx): the same API keys and roles as gRPC, WatchSend's stream to its
//! end, and CORS only for the configured origins.

use std::process::Command;

use serde_json::Value;

use crate::support::{TestApp, TestDatabase, spawn_app_with};

const ADMIN: &str = "admin-key-0123456789";
const VIEWER: &str = "viewer-key-012345678";
const CONSOLE: &str = "http://console.example";

/// `buf curl --protocol grpcweb` of `method` with `body`, the schema from this repository's
/// protos; its exit status (0 when the call succeeded) and what it printed (the answers on
/// stdout, an error on stderr).
fn grpc_web(app: &TestApp, key: Option<&str>, method: &str, body: &str) -> (i32, String) {
    let mut buf = Command::new("npx");
    buf.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--yes", "@bufbuild/buf", "curl", "--protocol", "grpcweb"])
        .args(["--schema", ".", "--data", body]);
    if let Some(key) = key {
        buf.args(["--header", &format!("Authorization: Bearer {key}")]);
    }
    let output = buf
        .arg(format!("http://127.0.0.1:{}/{method}", app.grpc_port))
        .output()
        .expect("npx runs (Node.js and npm are needed)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), printed)
}

/// The JSON documents `buf curl` printed one after another (one per streamed message).
fn documents(printed: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(printed)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}: {printed}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_callers_need_the_same_keys_and_roles() {
    let db = TestDatabase::sqlite();
    let keys = format!("admin:{ADMIN},viewer:{VIEWER}");
    let app = spawn_app_with(&db, &[("OTN_API_KEYS", &keys)]).await;
    let page = r#"{"page_id": "77", "name": "Web", "access_token": "EAAB-web-token-0001",
                   "app_secret": "web-app-secret", "verify_token": "v"}"#;

    let (status, printed) = grpc_web(&app, Some(VIEWER), "otn.v1.PageService/CreatePage", page);
    assert_ne!(status, 0, "{printed}");
    assert!(printed.contains("permission_denied"), "{printed}");
    let (status, printed) = grpc_web(&app, None, "otn.v1.PageService/ListPages", "{}");
    assert_ne!(status, 0, "{printed}");
    assert!(printed.contains("unauthenticated"), "{printed}");

    let (status, printed) = grpc_web(&app, Some(ADMIN), "otn.v1.PageService/CreatePage", page);
    assert_eq!(status, 0, "{printed}");
    let (status, printed) = grpc_web(&app, Some(VIEWER), "otn.v1.PageService/ListPages", "{}");
    assert_eq!(status, 0, "{printed}");
    let listed = &documents(&printed)[0];
    assert_eq!(listed["pages"][0]["pageId"], "77", "{listed}");
    assert!(
        !printed.contains("web-app-secret") && !printed.contains("EAAB-web"),
        "no secret comes back: {printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_send_streams_to_completed_over_grpc_web() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app_with(&db, &[]).await;
    app.register_page(otnd_testkit::PAGE).await;
    let sandbox = app.sandbox();
    otnd_testkit::opt_in_users(
        &app.channel,
        &sandbox,
        otnd_testkit::PAGE,
        otnd_testkit::TOPIC,
        "web-",
        20,
        None,
    )
    .await;
    let story =
        otnd_testkit::reviewed_story(&app.channel, &sandbox, otnd_testkit::StorySpec::default())
            .await;
    let send = otnd_testkit::start_send(&app.channel, &story, "web-1").await;

    let body = format!(r#"{{"send_id": "{}"}}"#, send.send_id);
    let (status, printed) = grpc_web(&app, None, "otn.v1.SendService/WatchSend", &body);
    assert_eq!(status, 0, "{printed}");
    let snapshots = documents(&printed);
    let last = &snapshots.last().expect("at least one snapshot")["progress"];
    assert_eq!(last["state"], "SEND_STATE_COMPLETED", "{printed}");
    assert_eq!(last["sent"], "20", "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_configured_origins_may_call_from_a_browser() {
    let db = TestDatabase::sqlite();
    let app = spawn_app_with(&db, &[("OTN_CORS_ORIGINS", CONSOLE)]).await;
    let preflight = |origin: &'static str| {
        let url = format!(
            "http://127.0.0.1:{}/otn.v1.PageService/ListPages",
            app.grpc_port
        );
        async move {
            graph_sandbox::http_client_builder()
                .build()
                .unwrap()
                .request(reqwest::Method::OPTIONS, url)
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization,content-type,x-grpc-web",
                )
                .send()
                .await
                .unwrap()
        }
    };
    let allowed = preflight(CONSOLE).await;
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        CONSOLE,
        "{allowed:?}"
    );
    let allowed_headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap();
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    let other = preflight("http://elsewhere.example").await;
    assert!(
        other.headers().get("access-control-allow-origin").is_none(),
        "{other:?}"
    );
}
