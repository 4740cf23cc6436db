//! The webhook: subscription checks, signed opt-ins from the sandbox (as Facebook posts them),
//! forged or malformed POSTs storing nothing, several pages and events per POST, redelivery.

use std::time::Duration;

use otnd::pb::{
    GetSubscriberRequest, ListOptInsRequest, ListTopicsRequest, OptInState, TopicSummary,
};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    support::{TestApp, TestDatabase, page_app_secret, page_verify_token, sign_webhook, spawn_app},
};

pub async fn topics(app: &mut TestApp, page_id: &str) -> Vec<TopicSummary> {
    app.optins
        .list_topics(ListTopicsRequest {
            page_id: page_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .topics
}

pub async fn active_on(app: &mut TestApp, page_id: &str, topic: &str) -> u64 {
    topics(app, page_id)
        .await
        .iter()
        .find(|t| t.topic == topic)
        .map_or(0, |t| t.active)
}

/// Waits until the page has `n` active opt-ins on `topic`.
pub async fn wait_for_active(app: &mut TestApp, page_id: &str, topic: &str, n: u64) {
    let deadline = Duration::from_secs(15);
    let started = std::time::Instant::now();
    loop {
        let active = active_on(app, page_id, topic).await;
        if active == n {
            return;
        }
        assert!(
            active < n,
            "more active opt-ins ({active}) than expected ({n})"
        );
        assert!(
            started.elapsed() < deadline,
            "{active} of {n} opt-ins on {topic:?} arrived"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn post(app: &TestApp, body: &[u8], signature: Option<&str>) -> (u16, String) {
    let mut request = otnd::graph::http_client()
        .post(app.http_url("/webhook"))
        .header("Content-Type", "application/json")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("X-Hub-Signature-256", signature);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

fn optin_event(psid: &str, page_id: &str, topic: &str, token: &str, at: i64) -> Value {
    json!({"sender": {"id": psid}, "recipient": {"id": page_id}, "timestamp": at,
           "optin": {"type": "one_time_notif_req", "payload": topic, "one_time_notif_token": token}})
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

backend_tests! {
    async fn subscription_checks_answer_the_challenge_only_for_a_page_verify_token(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("100").await;
        let client = otnd::graph::http_client();
        let get = |query: String| {
            let request = client.get(format!("{}?{query}", app.http_url("/webhook")));
            async move {
                let response = request.send().await.unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            }
        };
        let token = page_verify_token("100");
        assert_eq!(
            get(format!("hub.mode=subscribe&hub.verify_token={token}&hub.challenge=1158201444")).await,
            (200, "1158201444".to_string())
        );
        assert_eq!(get("hub.mode=subscribe&hub.verify_token=nope&hub.challenge=1".into()).await.0, 403);
        assert_eq!(get(format!("hub.mode=unsubscribe&hub.verify_token={token}&hub.challenge=1")).await.0, 403);
        assert_eq!(get("hub.mode=subscribe".into()).await.0, 400);
    }

    async fn signed_opt_ins_from_the_sandbox_become_opt_ins(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("200").await;
        // A topic with characters Facebook escapes, stored exactly as the user's payload.
        let topic = "Été 🎉 Sale!";
        let answer = app.sandbox_admin("/__sandbox/optins",
            json!({"page_id": "200", "psid": "u1", "payload": topic})).await;
        let token = answer["token"].as_str().unwrap().to_string();
        wait_for_active(&mut app, "200", topic, 1).await;

        let listed = app.optins.list_opt_ins(ListOptInsRequest {
            page_id: "200".into(), ..Default::default()
        }).await.unwrap().into_inner().opt_ins;
        assert_eq!(listed.len(), 1);
        let opt_in = &listed[0];
        assert_eq!((opt_in.psid.as_str(), opt_in.topic.as_str()), ("u1", topic));
        assert_eq!(opt_in.state(), OptInState::Active);
        assert_eq!(opt_in.token_fingerprint, otnd::domain::fingerprint(&token));
        assert!(!format!("{listed:?}").contains(&token), "the token itself is never returned");
        let year_ms = 365 * 24 * 3600 * 1000;
        let (opted, expires) = (opt_in.opt_in_time.unwrap(), opt_in.expire_time.unwrap());
        assert_eq!((expires.seconds - opted.seconds) * 1000, year_ms);

        // The opt-in made the user a subscriber inside the window.
        let subscriber = app.audience.get_subscriber(GetSubscriberRequest {
            page_id: "200".into(), psid: "u1".into(),
        }).await.unwrap().into_inner().subscriber.unwrap();
        assert!(subscriber.window_open);
        assert_eq!(subscriber.topics[0].active, 1);
    }

    async fn bulk_opt_ins_arrive_in_posts_of_100(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("300").await;
        app.sandbox_admin("/__sandbox/optins", json!({"page_id": "300", "psid_prefix": "fan-",
            "count": 250, "payload": "Tickets"})).await;
        wait_for_active(&mut app, "300", "Tickets", 250).await;
        let ledger = topics(&mut app, "300").await;
        assert_eq!(ledger[0].subscribers, 250);
    }

    async fn forged_missing_and_malformed_posts_store_nothing(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("400").await;
        let body = json!({"object": "page", "entry": [{"id": "400", "time": now_ms(), "messaging": [
            optin_event("u1", "400", "t", "tok-forged", now_ms())]}]}).to_string();
        let body = body.as_bytes();

        assert_eq!(post(&app, body, None).await.0, 401, "no signature");
        assert_eq!(post(&app, body, Some("sha1=abc")).await.0, 401, "not sha256");
        assert_eq!(post(&app, body, Some("sha256=zz")).await.0, 401, "not hex");
        assert_eq!(post(&app, body, Some(&sign_webhook("wrong-secret", body))).await.0, 403, "forged");
        // Signed, then altered: the signature is over the exact bytes.
        let signature = sign_webhook(&page_app_secret("400"), body);
        let altered = String::from_utf8(body.to_vec()).unwrap().replace("tok-forged", "tok-altered");
        assert_eq!(post(&app, altered.as_bytes(), Some(&signature)).await.0, 403, "altered");
        let not_json = b"{\"object\": \"page\", \"entry\": [";
        assert_eq!(post(&app, not_json, Some(&sign_webhook(&page_app_secret("400"), not_json))).await.0, 400);

        assert!(topics(&mut app, "400").await.is_empty(), "nothing was stored");
        let subscriber = app.audience.get_subscriber(GetSubscriberRequest {
            page_id: "400".into(), psid: "u1".into() }).await;
        assert_eq!(subscriber.unwrap_err().code(), tonic::Code::NotFound);

        // The genuine POST is taken.
        assert_eq!(post(&app, body, Some(&signature)).await, (200, "EVENT_RECEIVED".into()));
        assert_eq!(active_on(&mut app, "400", "t").await, 1);
    }

    async fn one_post_with_several_pages_and_events_and_its_redelivery(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("500").await;
        let now = now_ms();
        let body = json!({"object": "page", "entry": [
            {"id": "500", "time": now, "messaging": [
                optin_event("u1", "500", "Spring Sale!", "tok-1", now),
                optin_event("u2", "500", "spring sale", "tok-2", now),
                optin_event("u1", "500", "Spring Sale!", "tok-1", now),
                {"sender": {"id": "u3"}, "recipient": {"id": "500"}, "timestamp": now, "postback": {"payload": "YES"}},
                {"sender": {"id": "u4"}, "recipient": {"id": "500"}, "timestamp": now, "read": {"watermark": now}},
                {"sender": {"id": "500"}, "recipient": {"id": "u1"}, "timestamp": now, "message": {"is_echo": true, "text": "echo"}},
                {"sender": {"id": "u5"}, "recipient": {"id": "500"}, "timestamp": now,
                 "optin": {"type": "notification_messages", "payload": "weekly", "notification_messages_token": "r"}},
            ]},
            // A page otnd does not manage: skipped, not fatal.
            {"id": "999", "time": now, "messaging": [optin_event("x", "999", "t", "tok-x", now)]},
        ]}).to_string();
        let signature = sign_webhook(&page_app_secret("500"), body.as_bytes());
        for _ in 0..2 {
            assert_eq!(post(&app, body.as_bytes(), Some(&signature)).await.0, 200);
        }
        let ledger = topics(&mut app, "500").await;
        let names: Vec<(&str, u64)> = ledger.iter().map(|t| (t.topic.as_str(), t.active)).collect();
        assert_eq!(
            names,
            [("Spring Sale!", 1), ("spring sale", 1), ("weekly", 1)],
            "exact topics, each token once, of both kinds"
        );

        let get = |psid: &'static str| {
            let mut audience = app.audience.clone();
            async move {
                audience.get_subscriber(GetSubscriberRequest { page_id: "500".into(), psid: psid.into() })
                    .await.map(|r| r.into_inner().subscriber.unwrap())
            }
        };
        assert!(get("u3").await.unwrap().window_open, "a postback opens the window");
        let reader = get("u4").await.unwrap();
        assert!(!reader.window_open && reader.last_interaction_time.is_none(), "a read does not");
        let recurring = get("u5").await.unwrap().topics;
        assert_eq!(recurring.len(), 1, "{recurring:?}");
        assert_eq!((recurring[0].active, recurring[0].recurring_active), (1, 1));
        assert_eq!(recurring[0].next_expire_time, None, "it does not expire");
        assert!(get("500").await.is_err(), "the page's echo made no subscriber");
    }

    async fn standby_events_times_in_seconds_and_numeric_ids_are_taken_as_facebook_means_them(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("700").await;
        let now_s = now_ms() / 1000;
        // Handover: another app holds the conversations, so the events come under `standby`;
        // this relay sends times in seconds and ids as numbers (one above 2^53).
        let body = json!({"object": "page", "entry": [{"id": 700, "time": now_s, "standby": [
            {"sender": {"id": 9007199254740993_u64}, "recipient": {"id": 700}, "timestamp": now_s,
             "message": {"mid": "m1", "text": "hi"}},
            {"sender": {"id": "u2"}, "recipient": {"id": "700"},
             "optin": {"type": "one_time_notif_req", "payload": "Standby sale", "one_time_notif_token": "tok-standby"}},
        ]}]}).to_string();
        let signature = sign_webhook(&page_app_secret("700"), body.as_bytes());
        assert_eq!(post(&app, body.as_bytes(), Some(&signature)).await.0, 200);

        assert_eq!(active_on(&mut app, "700", "Standby sale").await, 1, "the standby opt-in is stored");
        let writer = app.audience.get_subscriber(GetSubscriberRequest {
            page_id: "700".into(), psid: "9007199254740993".into() }).await.unwrap().into_inner().subscriber.unwrap();
        assert!(writer.window_open, "a standby message opens the window");
        let last = writer.last_interaction_time.unwrap();
        assert_eq!(last.seconds, now_s, "the time in seconds read as seconds");
        let opted = app.audience.get_subscriber(GetSubscriberRequest {
            page_id: "700".into(), psid: "u2".into() }).await.unwrap().into_inner().subscriber.unwrap();
        let first = opted.first_seen_time.unwrap();
        assert_eq!(first.seconds, now_s, "no timestamp: the entry's time, in seconds");
    }

    async fn an_older_event_never_moves_the_window_back(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("600").await;
        let now = now_ms();
        let message = |at: i64| json!({"object": "page", "entry": [{"id": "600", "time": at, "messaging": [
            {"sender": {"id": "u1"}, "recipient": {"id": "600"}, "timestamp": at, "message": {"mid": format!("m{at}"), "text": "hi"}}]}]})
            .to_string();
        let secret = page_app_secret("600");
        let recent = message(now);
        let old = message(now - 3 * 24 * 3600 * 1000);
        assert_eq!(post(&app, recent.as_bytes(), Some(&sign_webhook(&secret, recent.as_bytes()))).await.0, 200);
        assert_eq!(post(&app, old.as_bytes(), Some(&sign_webhook(&secret, old.as_bytes()))).await.0, 200);
        let subscriber = app.audience.get_subscriber(GetSubscriberRequest {
            page_id: "600".into(), psid: "u1".into() }).await.unwrap().into_inner().subscriber.unwrap();
        assert!(subscriber.window_open);
        let last = subscriber.last_interaction_time.unwrap();
        assert_eq!(last.seconds * 1000 + i64::from(last.nanos) / 1_000_000, now);
        let first = subscriber.first_seen_time.unwrap();
        assert_eq!(first.seconds * 1000, (now - 3 * 24 * 3600 * 1000) / 1000 * 1000, "first seen moved earlier");
    }
}

#[tokio::test]
async fn a_post_for_unregistered_pages_is_acknowledged_and_ignored() {
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db).await;
    let body = json!({"object": "page", "entry": [{"id": "777", "time": 1, "messaging": [
        optin_event("u", "777", "t", "tok", 1)]}]})
    .to_string();
    let (status, text) = post(
        &app,
        body.as_bytes(),
        Some(&sign_webhook("any", body.as_bytes())),
    )
    .await;
    assert_eq!((status, text.as_str()), (200, "ignored"));
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_unread() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app(&db).await;
    app.register_page("800").await;
    let padding = "x".repeat(otnd::webhook::MAX_BODY_BYTES);
    let body = json!({"object": "page", "entry": [{"id": "800", "time": 1, "messaging": [
        optin_event("u", "800", &padding, "tok", 1)]}]})
    .to_string();
    let (status, _) = post(
        &app,
        body.as_bytes(),
        Some(&sign_webhook(&page_app_secret("800"), body.as_bytes())),
    )
    .await;
    assert_eq!(status, 413);
    assert!(topics(&mut app, "800").await.is_empty());
}

#[tokio::test]
async fn a_post_naming_more_pages_than_allowed_is_refused_and_stores_nothing() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app(&db).await;
    app.register_page("800").await;
    let pages = otnd::webhook::MAX_PAGES_PER_BODY;
    // The registered page, signed with its secret, among as many others as the limit allows:
    // taken. One page more: refused before any secret is looked up.
    let body = |n: usize| {
        let mut entries = vec![json!({"id": "800", "time": 1, "messaging": [
            optin_event("u", "800", "Sale", "tok-800", 1)]})];
        entries.extend((1..n).map(|i| json!({"id": format!("{}", 10_000 + i), "messaging": []})));
        json!({"object": "page", "entry": entries}).to_string()
    };
    let at_limit = body(pages);
    let (status, text) = post(
        &app,
        at_limit.as_bytes(),
        Some(&sign_webhook(&page_app_secret("800"), at_limit.as_bytes())),
    )
    .await;
    assert_eq!((status, text.as_str()), (200, "EVENT_RECEIVED"));
    let over = body(pages + 1).replace("tok-800", "tok-over");
    let (status, text) = post(
        &app,
        over.as_bytes(),
        Some(&sign_webhook(&page_app_secret("800"), over.as_bytes())),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains(&format!("at most {pages} pages")), "{text}");
    let stored = app
        .optins
        .list_opt_ins(ListOptInsRequest {
            page_id: "800".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .opt_ins;
    assert_eq!(
        stored.len(),
        1,
        "only the POST within the limit stored its opt-in"
    );
}

/// A forged POST costs otnd a scan and a short log line, whatever it says: the signature is
/// checked on the raw bytes before the body is parsed, and unknown pages are counted, not listed
/// (a log line per forged request used to carry every page id it named).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_post_is_refused_before_it_is_parsed_and_logs_a_short_line() {
    use crate::judge::{Harness, PAGE};
    let db = TestDatabase::sqlite();
    let h = Harness::new(&db, 1).await;
    let node = h.start().await;
    h.prepare(&node, 300).await;
    let client = otnd::graph::http_client();
    let url = format!("http://{}/webhook", node.http);
    let send = |body: String, signature: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let response = client
                .post(url)
                .header("Content-Type", "application/json")
                .header("X-Hub-Signature-256", signature)
                .body(body)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let before = node.served.log().len();
    // 100 unknown pages, each entry padded: close to 4 MiB of forged body.
    let padding = "x".repeat(40_000);
    let entries: Vec<Value> = (0..100)
        .map(|i| json!({"id": format!("{}", 500_000 + i), "pad": padding, "messaging": []}))
        .collect();
    let forged = json!({"object": "page", "entry": entries}).to_string();
    let (status, text) = send(forged, sign_webhook("guess", b"x")).await;
    assert_eq!((status, text.as_str()), (200, "ignored"));
    // A registered page, a wrong signature, events that do not even read: refused as forged.
    let forged =
        json!({"object": "page", "entry": [{"id": PAGE, "messaging": [{"optin": 7}]}]}).to_string();
    let (status, _) = send(forged, sign_webhook("guess", b"x")).await;
    assert_eq!(status, 403);
    let log = node.served.log();
    let added = &log[before..];
    assert!(
        added.len() < 2_000,
        "{} bytes of log for two forged POSTs",
        added.len()
    );
    assert!(
        !added.contains("500000"),
        "page ids listed in the log: {added}"
    );
    assert!(added.contains("\"pages\":100"), "{added}");
}
