//! The console on the HTTP listener, over plain HTTP: the page and its assets with their security
//! headers, the JSON API with the same keys and roles as gRPC, the JSON of a real send, bad input
//! answered by name, and the progress stream as server-sent events to the send's end.

use std::time::Duration;

use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::Value;

use crate::{
    backend_tests,
    support::{TestApp, TestDatabase, spawn_app, spawn_app_with},
};
use otnd_testkit::{
    PAGE, StorySpec, TOPIC, opt_in_users, page_access_token, page_app_secret, page_verify_token,
    reviewed_story, start_send, wait_for_send,
};

const ADMIN: &str = "admin-key-0123456789";
const OPERATOR: &str = "operator-key-0123456";
const VIEWER: &str = "viewer-key-012345678";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

pub fn keys() -> String {
    format!("admin:{ADMIN},operator:{OPERATOR},viewer:{VIEWER}")
}

fn client() -> reqwest::Client {
    graph_sandbox::http_client_builder()
        .build()
        .expect("an HTTP client")
}

/// The status, headers and body (JSON, or the text as a JSON string) of a console call.
pub async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let mut request = client().request(method, app.http_url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("the console answers");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("a body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

async fn get(app: &TestApp, path: &str, key: Option<&str>) -> Value {
    let (status, _, body) = call(app, Method::GET, path, key).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    body
}

/// An error answer: its status, and a JSON body with the message and the gRPC code.
async fn refused(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
) -> (StatusCode, String, String) {
    let (status, headers, body) = call(app, method, path, key).await;
    assert!(!status.is_success(), "{path} answered {status}: {body}");
    assert_eq!(
        headers["content-type"], "application/json",
        "{path}: an error is JSON"
    );
    let error = body["error"].as_str().unwrap_or_else(|| panic!("{body}"));
    let code = body["code"].as_str().unwrap_or_else(|| panic!("{body}"));
    (status, error.to_string(), code.to_string())
}

/// A page whose `users` opted in, a reviewed story, and its send run to COMPLETED; the send id.
pub async fn completed_send(app: &mut TestApp, users: u64) -> String {
    app.register_page(PAGE).await;
    let sandbox = app.sandbox();
    opt_in_users(&app.channel, &sandbox, PAGE, TOPIC, "c-", users, None).await;
    let story = reviewed_story(&app.channel, &sandbox, StorySpec::default()).await;
    let send = start_send(&app.channel, &story, "console-1").await;
    wait_for_send(
        &app.channel,
        &send.send_id,
        "the send completes",
        Duration::from_secs(60),
        |s| s.state() == otnd::pb::SendState::Completed,
    )
    .await;
    send.send_id
}

/// A send run to COMPLETED while otnd has no keys, then otnd started again with keys on the
/// same database: the database, that otnd and the send's id.
pub async fn keyed_app_with_a_send() -> (TestDatabase, TestApp, String) {
    let db = TestDatabase::sqlite();
    let mut open = spawn_app(&db).await;
    let send_id = completed_send(&mut open, 5).await;
    open.stop().await.expect("a clean stop");
    let app = spawn_app_with(&db, &[("OTN_API_KEYS", &keys())]).await;
    (db, app, send_id)
}

fn no_page_secret(body: &Value) {
    let text = body.to_string();
    for secret in [
        page_access_token(PAGE),
        page_app_secret(PAGE),
        page_verify_token(PAGE),
    ] {
        assert!(!text.contains(&secret), "a page secret in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_served_with_the_security_headers() {
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db).await;
    for (path, content_type, marker) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<script type=\"module\" src=\"/console/console.js\">",
        ),
        (
            "/console/console.js",
            "text/javascript; charset=utf-8",
            "text/event-stream",
        ),
        (
            "/console/console.css",
            "text/css; charset=utf-8",
            "progress.bar",
        ),
    ] {
        let (status, headers, body) = call(&app, Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_eq!(headers["content-security-policy"], CSP, "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert!(body.as_str().unwrap().contains(marker), "{path}");
    }
    let (status, headers, body) = call(&app, Method::GET, "/console/api/whoami", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["content-security-policy"], CSP);
    assert_eq!(
        body,
        serde_json::json!({"keys_required": false, "role": null, "can_steer": true})
    );
    let (status, _, code) = refused(&app, Method::GET, "/console/api/nothing", None).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    // axum's own refusals come in the API's shape too.
    let (status, _, code) = refused(&app, Method::DELETE, "/console/api/pages", None).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "unimplemented")
    );
    let path = "/console/api/sends/%FF/deliveries";
    let (status, _, code) = refused(&app, Method::GET, path, None).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );
    // The rest of the listener is as it was.
    let (status, _, _) = call(&app, Method::GET, "/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_can_be_turned_off() {
    let db = TestDatabase::sqlite();
    let app = spawn_app_with(&db, &[("OTN_CONSOLE", "false")]).await;
    for path in ["/", "/console/console.js", "/console/api/whoami"] {
        let (status, _, _) = call(&app, Method::GET, path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_takes_the_same_keys_and_roles_as_grpc() {
    let (_db, app, send_id) = keyed_app_with_a_send().await;

    let whoami = get(&app, "/console/api/whoami", None).await;
    assert_eq!(
        whoami,
        serde_json::json!({"keys_required": true, "role": null, "can_steer": false})
    );
    let whoami = get(&app, "/console/api/whoami", Some(VIEWER)).await;
    assert_eq!(
        (&whoami["role"], &whoami["can_steer"]),
        (&"viewer".into(), &false.into())
    );
    let whoami = get(&app, "/console/api/whoami", Some(OPERATOR)).await;
    assert_eq!(
        (&whoami["role"], &whoami["can_steer"]),
        (&"operator".into(), &true.into())
    );

    let (status, message, code) = refused(&app, Method::GET, "/console/api/pages", None).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    assert!(message.contains("Authorization: Bearer"), "{message}");
    let unknown = "not-a-key-0123456789";
    let (status, message, _) =
        refused(&app, Method::GET, "/console/api/whoami", Some(unknown)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        !message.contains(unknown),
        "the key is not echoed: {message}"
    );

    let pages = get(&app, "/console/api/pages", Some(VIEWER)).await;
    assert_eq!(pages["pages"][0]["page_id"], PAGE, "{pages}");
    let deliveries = format!("/console/api/sends/{send_id}/deliveries");
    get(&app, &deliveries, Some(VIEWER)).await;
    // A viewer watches: the stream of a completed send is its last snapshot, then its end.
    let events = format!("/console/api/sends/{send_id}/events");
    let (status, headers, body) = call(&app, Method::GET, &events, Some(VIEWER)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["content-type"], "text/event-stream");
    let body = body.as_str().expect("the stream's text");
    assert!(
        body.starts_with("event: progress\n") && body.contains(r#""state":"completed""#),
        "{body}"
    );
    let (status, _, code) = refused(&app, Method::GET, &events, None).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );

    for command in ["pause", "resume", "cancel"] {
        let path = format!("/console/api/sends/{send_id}/{command}");
        let (status, message, code) = refused(&app, Method::POST, &path, Some(VIEWER)).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::FORBIDDEN, "permission_denied")
        );
        assert!(
            message.contains("operator") && message.contains("SendService"),
            "{message}"
        );
        // The operator gets past the key check to the send's own rule: a completed send stays so.
        let (status, message, code) = refused(&app, Method::POST, &path, Some(OPERATOR)).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::CONFLICT, "failed_precondition"),
            "{message}"
        );
        assert!(message.contains("completed"), "{message}");
    }
    let path = "/console/api/sends/no-such-send/pause";
    let (status, _, code) = refused(&app, Method::POST, path, Some(ADMIN)).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

backend_tests! {
    async fn the_api_shows_a_real_send(db) {
        let mut app = spawn_app(&db).await;
        let send_id = completed_send(&mut app, 30).await;

        let pages = get(&app, "/console/api/pages", None).await;
        no_page_secret(&pages);
        let page = &pages["pages"][0];
        assert_eq!(page["page_id"], PAGE, "{pages}");
        assert_eq!(page["has_access_token"], true, "{pages}");

        let topics = get(&app, &format!("/console/api/pages/{PAGE}/topics"), None).await;
        let topic = &topics["topics"][0];
        assert_eq!(topic["topic"], TOPIC, "{topics}");
        assert_eq!((&topic["used"], &topic["active"]), (&30.into(), &0.into()), "{topics}");
        for field in ["reserved", "expired", "rejected", "expiring_soon"] {
            assert_eq!(topic[field], 0, "{field}: {topics}");
        }

        let stories = get(&app, &format!("/console/api/pages/{PAGE}/stories"), None).await;
        let story = &stories["stories"][0];
        assert_eq!(
            (&story["topic"], &story["reviewed"], &story["reviewer_psid"]),
            (&TOPIC.into(), &true.into(), &"boss".into()),
            "{stories}"
        );
        assert_eq!(story["text"], StorySpec::default().text, "{stories}");

        let sends = get(&app, &format!("/console/api/pages/{PAGE}/sends"), None).await;
        let listed = &sends["sends"][0];
        assert_eq!(listed["send_id"], send_id.as_str(), "{sends}");
        let send = get(&app, &format!("/console/api/sends/{send_id}"), None).await;
        assert_eq!(&send, listed);
        assert_eq!(send["state"], "completed", "{send}");
        let progress = &send["progress"];
        assert_eq!(
            (&progress["total"], &progress["sent"], &progress["finished"]),
            (&30.into(), &30.into(), &true.into()),
            "{send}"
        );
        let completed = get(&app, &format!("/console/api/pages/{PAGE}/sends?state=completed"), None).await;
        assert_eq!(completed["sends"].as_array().unwrap().len(), 1);
        let running = get(&app, &format!("/console/api/pages/{PAGE}/sends?state=running"), None).await;
        assert_eq!(running["sends"], serde_json::json!([]));

        // Deliveries, page by page, filtered by state.
        let base = format!("/console/api/sends/{send_id}/deliveries");
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = get(&app, &format!("{base}?state=sent&page_size=12&page_token={token}"), None).await;
            for d in page["deliveries"].as_array().unwrap() {
                assert_eq!((&d["state"], &d["route"]), (&"sent".into(), &"token".into()), "{d}");
                assert!(d["message_id"].is_string() && d["error_code"].is_null(), "{d}");
                seen.push(d["psid"].as_str().unwrap().to_string());
            }
            token = page["next_page_token"].as_str().unwrap().to_string();
            if token.is_empty() {
                break;
            }
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 30);
        let failed = get(&app, &format!("{base}?state=failed"), None).await;
        assert_eq!(failed["deliveries"], serde_json::json!([]));

        for body in [&topics, &stories, &sends, &send] {
            no_page_secret(body);
        }

        // Bad input, answered by name.
        for (query, field) in [
            ("state=delivered", "state"),
            ("page_size=5000", "page_size"),
            ("page_size=ten", "page_size"),
            ("page_token=bogus", "page_token"),
            ("sort=psid", "sort"),
        ] {
            let (status, message, code) = refused(&app, Method::GET, &format!("{base}?{query}"), None).await;
            assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "invalid_argument"), "{query}");
            assert!(message.starts_with(&format!("{field}: ")), "{query}: {message}");
        }
        let (status, message, _) = refused(&app, Method::GET, &format!("/console/api/pages/{PAGE}/sends?state=done"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message.contains("state: must be one of queued, running"), "{message}");
        let (status, message, code) = refused(&app, Method::GET, "/console/api/sends/nope", None).await;
        assert_eq!((status, code.as_str()), (StatusCode::NOT_FOUND, "not_found"));
        assert!(message.contains("send nope does not exist"), "{message}");
        let (status, _, _) = refused(&app, Method::GET, "/console/api/sends/nope/events", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, message, _) = refused(&app, Method::GET, "/console/api/pages/99/topics", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(message.contains("page 99 does not exist"), "{message}");
        let (status, message, _) = refused(&app, Method::GET, "/console/api/pages/abc/stories", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message.starts_with("page_id: "), "{message}");
    }
}

/// The progress events of a console stream until it ends (or `stop_after` events), parsed.
async fn progress_events(app: &TestApp, send_id: &str, stop_after: Option<usize>) -> Vec<Value> {
    let mut response = client()
        .get(app.http_url(&format!("/console/api/sends/{send_id}/events")))
        .send()
        .await
        .expect("the stream opens");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut buffer = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = response.chunk().await.expect("the stream reads") {
        buffer.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut name = "";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            if name == "progress" {
                events.push(serde_json::from_str(&data).expect("JSON progress"));
            }
        }
        if stop_after.is_some_and(|n| events.len() >= n) {
            break;
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_follows_a_send_to_completed() {
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db).await;
    let http = format!("127.0.0.1:{}", app.http_port);
    otnd_testkit::register_page(&app.channel, &app.sandbox(), &http, PAGE, Some(50)).await;
    let sandbox = app.sandbox();
    opt_in_users(&app.channel, &sandbox, PAGE, TOPIC, "s-", 100, None).await;
    let story = reviewed_story(&app.channel, &sandbox, StorySpec::default()).await;
    let send = start_send(&app.channel, &story, "stream-1").await;

    let events = tokio::time::timeout(
        Duration::from_secs(60),
        progress_events(&app, &send.send_id, None),
    )
    .await
    .expect("the stream ends with the send");
    assert!(events.len() > 2, "the progress moves: {events:?}");
    let last = events.last().unwrap();
    assert_eq!(
        (
            &last["state"],
            &last["sent"],
            &last["total"],
            &last["finished"]
        ),
        (&"completed".into(), &100.into(), &100.into(), &true.into()),
        "{last}"
    );
    let sent: Vec<u64> = events.iter().map(|e| e["sent"].as_u64().unwrap()).collect();
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "{sent:?}");
    assert!(
        sent.iter().any(|&n| n > 0 && n < 100),
        "a snapshot mid-way: {sent:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_take_the_watchers_slots_and_end_when_otnd_stops() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app_with(&db, &[("OTN_MAX_WATCHERS", "1")]).await;
    let http = format!("127.0.0.1:{}", app.http_port);
    // Slow enough to be running throughout.
    otnd_testkit::register_page(&app.channel, &app.sandbox(), &http, PAGE, Some(1)).await;
    let sandbox = app.sandbox();
    opt_in_users(&app.channel, &sandbox, PAGE, TOPIC, "w-", 100, None).await;
    let story = reviewed_story(&app.channel, &sandbox, StorySpec::default()).await;
    let send = start_send(&app.channel, &story, "slots-1").await;

    let mut open = client()
        .get(app.http_url(&format!("/console/api/sends/{}/events", send.send_id)))
        .send()
        .await
        .expect("the stream opens");
    assert_eq!(open.status(), StatusCode::OK);
    open.chunk()
        .await
        .expect("a first event")
        .expect("a first event");

    // The one slot is taken: the next watcher, console or gRPC, is refused.
    let path = format!("/console/api/sends/{}/events", send.send_id);
    let (status, _, code) = refused(&app, Method::GET, &path, None).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted")
    );
    let watch = app
        .sends
        .watch_send(otnd::pb::WatchSendRequest {
            send_id: send.send_id.clone(),
        })
        .await;
    assert_eq!(
        watch.err().map(|s| s.code()),
        Some(tonic::Code::ResourceExhausted)
    );

    let stopping = tokio::spawn(app.stop());
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(_)) = open.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ends when otnd stops");
    stopping.await.expect("the stopper").expect("a clean stop");
}
