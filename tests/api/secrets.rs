//! No secret leaves otnd. The real binary sends, previews and asks for opt-ins while the sandbox
//! makes every fault it knows, one after the other; then every response a client got, every byte
//! of the database and every log line (at debug) is searched for the page's access token, app
//! secret, verify token and `appsecret_proof`, the master key, and (outside the database, which
//! must keep them) the one-time tokens.

use std::time::{Duration, Instant};

use otnd::pb::{
    CancelSendRequest, GetPageRequest, GetSendRequest, ListDeliveriesRequest, ListOptInsRequest,
    ListSendsRequest, PreviewStoryRequest, SendOptInRequestRequest, StartSendRequest,
    opt_in_service_client::OptInServiceClient, page_service_client::PageServiceClient,
    send_service_client::SendServiceClient, story_service_client::StoryServiceClient,
};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    judge::{Harness, Node, PAGE, StorySpec},
    support::{
        TestDatabase, page_access_token, page_app_secret, page_verify_token, test_master_key_base64,
    },
};

/// Every fault kind the sandbox has, each on its own.
fn every_fault() -> Vec<(&'static str, Value)> {
    vec![
        ("5xx", json!({"error_rate": 1.0})),
        (
            "timeout",
            json!({"timeout_rate": 1.0, "timeout_hold_ms": 3000}),
        ),
        ("reset", json!({"reset_rate": 1.0})),
        ("accept-then-fail", json!({"accept_then_fail_rate": 1.0})),
        (
            "throttle",
            json!({"throttle_rate": 1.0, "throttle_regain_minutes": 1}),
        ),
        ("restricted", json!({"restricted_pages": [PAGE]})),
        ("slow", json!({"latency_ms": 1500})),
        ("single-use off", json!({"enforce_single_use": false})),
    ]
}

/// What clients were told, as text.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    fn keep<T: std::fmt::Debug>(&mut self, what: &str, result: &Result<T, tonic::Status>) {
        self.0.push(format!("{what}: {result:?}"));
    }
}

async fn reviewed_window_story(h: &Harness, node: &Node, text: &str) -> String {
    h.reviewed_story(
        node,
        StorySpec {
            text,
            window: true,
            ..StorySpec::default()
        },
    )
    .await
}

/// Every row of every table of the database, or every byte of its files, as text.
pub(crate) async fn database_text(db: &TestDatabase) -> String {
    if let Some(file) = &db.sqlite_file {
        let dir = file.parent().unwrap();
        let mut text = String::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("otnd.db")
            {
                text.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
            }
        }
        return text;
    }
    let conn = Database::connect(&db.url).await.unwrap();
    let tables = conn
        .query_all_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        ))
        .await
        .unwrap();
    let mut text = String::new();
    for table in tables {
        let name: String = table.try_get("", "tablename").unwrap();
        let rows = conn
            .query_all_raw(Statement::from_string(
                conn.get_database_backend(),
                format!("SELECT row_to_json(t)::text AS row FROM \"{name}\" t"),
            ))
            .await
            .unwrap();
        for row in rows {
            let row: String = row.try_get("", "row").unwrap();
            text.push_str(&row);
            text.push('\n');
        }
    }
    let _ = conn.close().await;
    text
}

async fn one_time_tokens(db: &TestDatabase) -> Vec<String> {
    let conn = Database::connect(&db.url).await.unwrap();
    let rows = conn
        .query_all_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT token FROM optins",
        ))
        .await
        .unwrap();
    let _ = conn.close().await;
    rows.iter()
        .map(|row| row.try_get::<String>("", "token").unwrap())
        .collect()
}

/// Names the kind of secret found in `haystack`, if any.
fn find_secret<'a>(haystack: &str, secrets: &'a [(&'a str, String)]) -> Option<&'a str> {
    secrets
        .iter()
        .find(|(_, secret)| haystack.contains(secret.as_str()))
        .map(|(kind, _)| *kind)
}

async fn secrets_stay_secret_under_every_fault(db: TestDatabase) {
    let h = Harness::new(&db, 5)
        .await
        .with_env("OTN_GRAPH_TIMEOUT_SECONDS", "1")
        .with_env("RUST_LOG", "otnd=debug,info");
    let node = h.start().await;
    h.prepare(&node, 300).await;
    let mut seen = Seen::default();
    let mut sends = SendServiceClient::new(node.channel.clone());
    let mut stories = StoryServiceClient::new(node.channel.clone());
    let mut optins = OptInServiceClient::new(node.channel.clone());
    for (n, (name, faults)) in every_fault().into_iter().enumerate() {
        // Fresh tokens and users inside the window for each fault.
        h.opt_in_page(&node, PAGE, &format!("f{n}-"), 5, None).await;
        h.window_users(&node, PAGE, &format!("w{n}-"), 3).await;
        let story = reviewed_window_story(&h, &node, &format!("Under {name}")).await;
        let second = reviewed_window_story(&h, &node, &format!("Preview under {name}")).await;
        h.faults(faults).await;

        let started = sends
            .start_send(StartSendRequest {
                story_id: story,
                request_id: format!("fault-{n}"),
            })
            .await;
        seen.keep("StartSend", &started);
        let send_id = started.unwrap().into_inner().send.unwrap().send_id;
        seen.keep(
            "PreviewStory",
            &stories
                .preview_story(PreviewStoryRequest {
                    story_id: second,
                    reviewer_psid: format!("w{n}-0"),
                })
                .await,
        );
        seen.keep(
            "SendOptInRequest",
            &optins
                .send_opt_in_request(SendOptInRequestRequest {
                    page_id: PAGE.into(),
                    psid: format!("w{n}-1"),
                    topic: "Another topic".into(),
                    title: "Tell me".into(),
                    ..Default::default()
                })
                .await,
        );
        // Until the send has met the fault: an error recorded, or its end.
        let began = Instant::now();
        loop {
            let deliveries = sends
                .list_deliveries(ListDeliveriesRequest {
                    send_id: send_id.clone(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await;
            seen.keep("ListDeliveries", &deliveries);
            let met = deliveries.unwrap().into_inner().deliveries.iter().any(|d| {
                !d.error_message.is_empty() || d.state() != otnd::pb::DeliveryState::Pending
            });
            let send = sends
                .get_send(GetSendRequest {
                    send_id: send_id.clone(),
                })
                .await;
            seen.keep("GetSend", &send);
            if met || began.elapsed() > Duration::from_secs(8) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen.keep(
            "CancelSend",
            &sends
                .cancel_send(CancelSendRequest {
                    send_id: send_id.clone(),
                })
                .await,
        );
        h.faults(json!({})).await;
    }
    seen.keep(
        "ListSends",
        &sends
            .list_sends(ListSendsRequest {
                page_id: PAGE.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await,
    );
    seen.keep(
        "ListOptIns",
        &optins
            .list_opt_ins(ListOptInsRequest {
                page_id: PAGE.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await,
    );
    seen.keep(
        "GetPage",
        &PageServiceClient::new(node.channel.clone())
            .get_page(GetPageRequest {
                page_id: PAGE.into(),
            })
            .await,
    );
    seen.0.push(node.metrics().await);

    let token = page_access_token(PAGE);
    let app_secret = page_app_secret(PAGE);
    let page_secrets = vec![
        ("access token", token.clone()),
        ("app secret", app_secret.clone()),
        ("verify token", page_verify_token(PAGE)),
        (
            "appsecret_proof",
            otnd::graph::appsecret_proof(&app_secret, &token),
        ),
        ("master key", test_master_key_base64()),
    ];
    let tokens = one_time_tokens(&db).await;
    assert!(tokens.len() >= 40, "the sends had tokens to use");
    let mut every_secret = page_secrets.clone();
    every_secret.extend(tokens.into_iter().map(|t| ("one-time token", t)));

    for text in &seen.0 {
        if let Some(kind) = find_secret(text, &every_secret) {
            panic!("{kind} reached a client: {text}");
        }
    }
    let log = node.served.log();
    for line in log.lines() {
        if let Some(kind) = find_secret(line, &every_secret) {
            panic!("{kind} reached the log: {line}");
        }
    }
    if let Some(kind) = find_secret(&database_text(&db).await, &page_secrets) {
        panic!("{kind} is stored in clear in the database");
    }
}

backend_tests! {
    async fn no_secret_reaches_a_response_the_database_or_the_log_under_any_fault(db) {
        secrets_stay_secret_under_every_fault(db).await;
    }
}
