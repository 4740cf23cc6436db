//! graph-sandbox: every Graph rule, every fault, the batch format, the webhooks (signature checked
//! with an independent HMAC), and the judge's ledger and counters. Driven over real HTTP.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Bytes, http::HeaderMap, routing::post};
use graph_sandbox::{AcceptedMessage, RunningSandbox, SandboxOptions, Stats, TokenKind};
use serde_json::{Value, json};

/// Polls `check` until it returns `Some`; fails naming `what` after `deadline`.
async fn eventually<T, Fut: Future<Output = Option<T>>>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> Fut,
) -> T {
    let polling = async {
        loop {
            match check().await {
                Some(value) => break value,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    tokio::time::timeout(deadline, polling)
        .await
        .unwrap_or_else(|_| panic!("timed out after {deadline:?} waiting for {what}"))
}

const PAGE: &str = "111";
const PAGE_TOKEN: &str = "EAAB-page-111";
const APP_SECRET: &str = "app-secret-111";
const OTHER_PAGE: &str = "222";
const OTHER_TOKEN: &str = "EAAB-page-222";

struct Sandbox {
    running: RunningSandbox,
    http: reqwest::Client,
}

struct Answer {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

impl Answer {
    fn code(&self) -> i64 {
        self.body["error"]["code"].as_i64().unwrap_or(0)
    }
    fn subcode(&self) -> i64 {
        self.body["error"]["error_subcode"].as_i64().unwrap_or(0)
    }
    fn error_message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

impl Sandbox {
    async fn start() -> Self {
        Self::start_with(SandboxOptions::default()).await
    }

    async fn start_with(options: SandboxOptions) -> Self {
        let sandbox = Sandbox {
            running: RunningSandbox::start(options).await.unwrap(),
            http: graph_sandbox::http_client_builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        sandbox.page(PAGE, PAGE_TOKEN, None).await;
        sandbox.page(OTHER_PAGE, OTHER_TOKEN, None).await;
        sandbox
    }

    async fn admin(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.running.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn page(&self, page_id: &str, token: &str, webhook_url: Option<&str>) {
        let (status, body) = self
            .admin(
                "/__sandbox/pages",
                json!({"page_id": page_id, "access_token": token,
                       "app_secret": format!("app-secret-{page_id}"), "webhook_url": webhook_url}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    async fn optin(&self, page_id: &str, psid: &str, payload: &str) -> String {
        let (status, body) = self
            .admin(
                "/__sandbox/optins",
                json!({"page_id": page_id, "psid": psid, "payload": payload}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    async fn interact(&self, psid: &str, time_ms: Option<i64>) {
        let (status, body) = self
            .admin(
                "/__sandbox/interactions",
                json!({"page_id": PAGE, "psid": psid, "text": "hi", "time_ms": time_ms}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    async fn faults(&self, faults: Value) {
        let (status, body) = self.admin("/__sandbox/faults", faults).await;
        assert_eq!(status, 200, "{body}");
    }

    /// A JSON send to `/v24.0/me/messages?access_token=…`.
    async fn send(&self, access_token: &str, body: Value) -> Answer {
        let url = self
            .running
            .url(&format!("/v24.0/me/messages?access_token={access_token}"));
        self.post(self.http.post(url).json(&body)).await
    }

    async fn post(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        Answer {
            status,
            body,
            headers,
        }
    }

    /// A GET of the sandbox's admin surface, its JSON answer read as `T`.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.http
            .get(self.running.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn stats(&self) -> Stats {
        self.get_json("/__sandbox/stats").await
    }

    async fn messages(&self, query: &str) -> Vec<AcceptedMessage> {
        let body: Value = self.get_json(&format!("/__sandbox/messages{query}")).await;
        serde_json::from_value(body["messages"].clone()).unwrap()
    }
}

fn token_send(token: &str, text: &str) -> Value {
    json!({"recipient": {"one_time_notif_token": token}, "message": {"text": text}})
}

fn standard_send(psid: &str, message: Value) -> Value {
    json!({"recipient": {"id": psid}, "messaging_type": "UPDATE", "message": message})
}

fn optin_request(title: &str, topic: &str) -> Value {
    json!({"attachment": {"type": "template", "payload": {
        "template_type": "one_time_notif_req", "title": title, "payload": topic}}})
}

#[tokio::test]
async fn a_token_works_once_and_every_presentation_counts() {
    let sandbox = Sandbox::start().await;
    let token = sandbox.optin(PAGE, "u1", "Spring Sale!").await;

    let first = sandbox
        .send(PAGE_TOKEN, token_send(&token, "on sale"))
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["recipient_id"], "u1");
    let message_id = first.body["message_id"].as_str().unwrap();
    assert!(message_id.starts_with("m_"), "{message_id}");
    for header in ["x-app-usage", "x-business-use-case-usage"] {
        assert!(
            first.headers.contains_key(header),
            "{header} on every answer"
        );
    }

    let second = sandbox
        .send(PAGE_TOKEN, token_send(&token, "on sale"))
        .await;
    assert_eq!((second.status, second.code()), (400, 100));
    assert!(
        second
            .error_message()
            .contains("invalid, expired or already used")
    );

    let stats = sandbox.stats().await;
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.token_presentations, 2);
    assert_eq!(stats.tokens_presented_more_than_once, 1);
    assert_eq!(stats.tokens_accepted_more_than_once, 0);
    assert_eq!(stats.recipients_with_duplicate_content, 0);
    assert_eq!(stats.rejected_by_reason["token_used"], 1);

    let ledger = sandbox.messages("").await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].token.as_deref(), Some(token.as_str()));
    assert_eq!(ledger[0].psid, "u1");
    assert_eq!(ledger[0].message, json!({"text": "on sale"}));
    assert_eq!(ledger[0].message_id, message_id);
}

#[tokio::test]
async fn without_single_use_a_reused_token_gets_through_and_is_counted() {
    let sandbox = Sandbox::start().await;
    sandbox.faults(json!({"enforce_single_use": false})).await;
    let token = sandbox.optin(PAGE, "u1", "topic").await;
    for _ in 0..2 {
        assert_eq!(
            sandbox
                .send(PAGE_TOKEN, token_send(&token, "same"))
                .await
                .status,
            200
        );
    }
    let stats = sandbox.stats().await;
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.tokens_accepted_more_than_once, 1);
    assert_eq!(stats.recipients_with_duplicate_content, 1);
}

#[tokio::test]
async fn expired_foreign_and_unknown_tokens_answer_code_100() {
    let sandbox = Sandbox::start().await;
    let (_, body) = sandbox
        .admin(
            "/__sandbox/optins",
            json!({"page_id": PAGE, "psid": "u1", "payload": "t", "expires_in_seconds": 0}),
        )
        .await;
    let expired = body["token"].as_str().unwrap().to_string();
    let foreign = sandbox.optin(OTHER_PAGE, "u2", "t").await;
    for (token, reason) in [
        (expired.as_str(), "token_expired"),
        (foreign.as_str(), "token_foreign"),
        ("otn-made-up", "token_unknown"),
    ] {
        let answer = sandbox.send(PAGE_TOKEN, token_send(token, "x")).await;
        assert_eq!((answer.status, answer.code()), (400, 100), "{reason}");
        assert_eq!(sandbox.stats().await.rejected_by_reason[reason], 1);
    }
    assert_eq!(sandbox.stats().await.accepted, 0);
}

#[tokio::test]
async fn access_tokens_bearer_form_bodies_and_appsecret_proof() {
    let sandbox = Sandbox::start().await;
    let url = sandbox.running.url("/v24.0/me/messages");

    let missing = sandbox
        .post(sandbox.http.post(&url).json(&token_send("x", "x")))
        .await;
    assert_eq!(missing.code(), 104);
    let unknown = sandbox.send("EAAB-nobody", token_send("x", "x")).await;
    assert_eq!(unknown.code(), 190);

    // Bearer header, JSON body.
    let token = sandbox.optin(PAGE, "u1", "t").await;
    let bearer = sandbox
        .post(
            sandbox
                .http
                .post(&url)
                .bearer_auth(PAGE_TOKEN)
                .json(&token_send(&token, "a")),
        )
        .await;
    assert_eq!(bearer.status, 200, "{}", bearer.body);

    // Form body with JSON-valued fields, token in the form, on /{page-id}/messages.
    let token = sandbox.optin(PAGE, "u2", "t").await;
    let form = sandbox
        .post(
            sandbox
                .http
                .post(sandbox.running.url(&format!("/v24.0/{PAGE}/messages")))
                .form(&[
                    ("access_token", PAGE_TOKEN),
                    (
                        "recipient",
                        &json!({"one_time_notif_token": token}).to_string(),
                    ),
                    ("message", &json!({"text": "form"}).to_string()),
                ]),
        )
        .await;
    assert_eq!(form.status, 200, "{}", form.body);
    assert_eq!(form.body["recipient_id"], "u2");

    // The path's page must be the token's page.
    let token = sandbox.optin(PAGE, "u3", "t").await;
    let mismatch = sandbox
        .post(
            sandbox
                .http
                .post(sandbox.running.url(&format!(
                    "/v24.0/{OTHER_PAGE}/messages?access_token={PAGE_TOKEN}"
                )))
                .json(&token_send(&token, "x")),
        )
        .await;
    assert_eq!(mismatch.code(), 100);

    // appsecret_proof: the right one passes, a wrong one is refused.
    let proof = hex_hmac(APP_SECRET, PAGE_TOKEN);
    let good = sandbox
        .post(
            sandbox
                .http
                .post(format!(
                    "{url}?access_token={PAGE_TOKEN}&appsecret_proof={proof}"
                ))
                .json(&token_send(&token, "x")),
        )
        .await;
    assert_eq!(good.status, 200, "{}", good.body);
    let token = sandbox.optin(PAGE, "u4", "t").await;
    let bad = sandbox
        .post(
            sandbox
                .http
                .post(format!(
                    "{url}?access_token={PAGE_TOKEN}&appsecret_proof=00ff"
                ))
                .json(&token_send(&token, "x")),
        )
        .await;
    assert_eq!(bad.code(), 100);
    assert!(bad.error_message().contains("appsecret_proof"));
}

/// HMAC-SHA256 by `ring`: independent of the sandbox's own implementation.
fn hex_hmac(key: &str, message: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    hex::encode(ring::hmac::sign(&key, message.as_bytes()).as_ref())
}

#[tokio::test]
async fn standard_messages_need_the_window() {
    let sandbox = Sandbox::start().await;
    let nobody = sandbox
        .send(PAGE_TOKEN, standard_send("u9", json!({"text": "hi"})))
        .await;
    assert_eq!((nobody.code(), nobody.subcode()), (100, 2018001));

    let two_days_ago = chrono::Utc::now().timestamp_millis() - 2 * 24 * 3600 * 1000;
    sandbox.interact("u1", Some(two_days_ago)).await;
    let outside = sandbox
        .send(PAGE_TOKEN, standard_send("u1", json!({"text": "hi"})))
        .await;
    assert_eq!((outside.code(), outside.subcode()), (10, 2018278));
    assert!(
        outside
            .error_message()
            .contains("outside of allowed window")
    );

    sandbox.interact("u1", None).await;
    let inside = sandbox
        .send(PAGE_TOKEN, standard_send("u1", json!({"text": "hi"})))
        .await;
    assert_eq!(inside.status, 200, "{}", inside.body);
    assert_eq!(sandbox.messages("?psid=u1").await.len(), 1);
}

#[tokio::test]
async fn opt_in_requests_follow_their_rules() {
    let sandbox = Sandbox::start().await;
    sandbox.interact("u1", None).await;
    let sent = sandbox
        .send(
            PAGE_TOKEN,
            standard_send("u1", optin_request("Notify me", "Spring Sale!")),
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.body);

    let repeat = sandbox
        .send(
            PAGE_TOKEN,
            standard_send("u1", optin_request("Again", "Spring Sale!")),
        )
        .await;
    assert_eq!((repeat.code(), repeat.subcode()), (613, 1893016));
    let other_topic = sandbox
        .send(
            PAGE_TOKEN,
            standard_send("u1", optin_request("Other", "spring sale")),
        )
        .await;
    assert_eq!(
        other_topic.status, 200,
        "topics are exact: {}",
        other_topic.body
    );

    let long_title = sandbox
        .send(
            PAGE_TOKEN,
            standard_send("u1", optin_request(&"t".repeat(66), "x")),
        )
        .await;
    assert_eq!(long_title.code(), 100);
    assert!(
        long_title.error_message().contains("[title]"),
        "{}",
        long_title.error_message()
    );
    let max_title = sandbox
        .send(
            PAGE_TOKEN,
            standard_send("u1", optin_request(&"t".repeat(65), "y")),
        )
        .await;
    assert_eq!(max_title.status, 200);

    let two_days_ago = chrono::Utc::now().timestamp_millis() - 2 * 24 * 3600 * 1000;
    sandbox.interact("u2", Some(two_days_ago)).await;
    let outside = sandbox
        .send(PAGE_TOKEN, standard_send("u2", optin_request("t", "z")))
        .await;
    assert_eq!((outside.code(), outside.subcode()), (10, 2018278));
}

#[tokio::test]
async fn messages_are_validated_as_facebook_does() {
    let sandbox = Sandbox::start().await;
    sandbox.interact("u1", None).await;
    let button = |buttons: Value| {
        json!({"attachment": {"type": "template", "payload": {
        "template_type": "button", "text": "Tickets!", "buttons": buttons}}})
    };
    let postback = json!({"type": "postback", "title": "Yes", "payload": "YES"});
    let cases = [
        (json!({"text": "é".repeat(2001)}), "message[text]"),
        (json!({"text": ""}), "message[text]"),
        (json!({}), "cannot be empty"),
        (
            button(json!([postback, postback, postback, postback])),
            "1 to 3",
        ),
        (
            button(json!([{"type": "postback", "title": "x".repeat(21), "payload": "p"}])),
            "[buttons][0][title]",
        ),
        (
            button(json!([{"type": "web_url", "title": "Go", "url": "not a url"}])),
            "[buttons][0][url]",
        ),
        (
            button(json!([{"type": "phone_number", "title": "Call", "payload": "5551234"}])),
            "[buttons][0][payload]",
        ),
        (
            button(json!([{"type": "element_share", "title": "Share"}])),
            "[buttons][0][type]",
        ),
        (
            json!({"attachment": {"type": "template", "payload": {"template_type": "button",
            "text": "x".repeat(641), "buttons": [postback]}}}),
            "[payload][text]",
        ),
    ];
    for (message, named) in cases {
        let answer = sandbox
            .send(PAGE_TOKEN, standard_send("u1", message.clone()))
            .await;
        assert_eq!(answer.code(), 100, "{message}");
        assert!(
            answer.error_message().contains(named),
            "{named}: {}",
            answer.error_message()
        );
    }
    let valid = button(json!([
        {"type": "web_url", "title": "x".repeat(20), "url": "https://example.com/t"},
        {"type": "postback", "title": "Later", "payload": "LATER"},
        {"type": "phone_number", "title": "Call", "payload": "+15105551234"}
    ]));
    assert_eq!(
        sandbox
            .send(PAGE_TOKEN, standard_send("u1", valid))
            .await
            .status,
        200
    );
    assert_eq!(
        sandbox
            .send(
                PAGE_TOKEN,
                standard_send("u1", json!({"text": "é".repeat(2000)}))
            )
            .await
            .status,
        200
    );
    assert_eq!(sandbox.stats().await.accepted, 2);
}

fn batch_item(token: &str, text: &str) -> Value {
    json!({"method": "POST", "relative_url": "me/messages",
           "body": format!("recipient={}&message={}",
               urlencode(&json!({"one_time_notif_token": token}).to_string()),
               urlencode(&json!({"text": text}).to_string()))})
}

fn urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[tokio::test]
async fn batches_answer_in_order_as_a_form_or_json() {
    let sandbox = Sandbox::start().await;
    let tokens: Vec<String> = optins_for(&sandbox, 3).await;
    // Form body, batch as a JSON string; the third item reuses the first token.
    let batch = json!([
        batch_item(&tokens[0], "a"),
        batch_item(&tokens[1], "b"),
        batch_item(&tokens[0], "c")
    ]);
    let answer = sandbox
        .post(
            sandbox
                .http
                .post(sandbox.running.url("/v24.0/"))
                .form(&[("access_token", PAGE_TOKEN), ("batch", &batch.to_string())]),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let items = answer.body.as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["code"], 200);
    assert_eq!(items[1]["code"], 200);
    assert_eq!(items[2]["code"], 400);
    assert!(items[0]["headers"].is_array());
    let first: Value = serde_json::from_str(items[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(first["recipient_id"], "u0");
    let refused: Value = serde_json::from_str(items[2]["body"].as_str().unwrap()).unwrap();
    assert_eq!(refused["error"]["code"], 100);

    // JSON body with the batch as an array, on POST /, without headers.
    let answer = sandbox
        .post(sandbox.http.post(sandbox.running.url("/")).json(&json!({
            "access_token": PAGE_TOKEN, "include_headers": false,
            "batch": [batch_item(&tokens[2], "d")]})))
        .await;
    let items = answer.body.as_array().unwrap();
    assert_eq!(items[0]["code"], 200, "{}", answer.body);
    assert!(items[0].get("headers").is_none());

    // More than 50 items are refused whole.
    let too_many: Vec<Value> = (0..51).map(|_| batch_item("x", "x")).collect();
    let answer = sandbox
        .post(
            sandbox
                .http
                .post(sandbox.running.url("/v24.0"))
                .json(&json!({
            "access_token": PAGE_TOKEN, "batch": too_many})),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["error"]["type"], "GraphBatchException");
    assert_eq!(sandbox.stats().await.accepted, 3);
}

async fn optins_for(sandbox: &Sandbox, n: usize) -> Vec<String> {
    let mut tokens = Vec::new();
    for i in 0..n {
        tokens.push(sandbox.optin(PAGE, &format!("u{i}"), "t").await);
    }
    tokens
}

#[tokio::test]
async fn faults_apply_to_batch_items_one_by_one_with_null_for_the_unfinished() {
    let sandbox = Sandbox::start().await;
    let tokens = optins_for(&sandbox, 40).await;
    sandbox
        .faults(json!({"reset_rate": 0.3, "accept_then_fail_rate": 0.2, "seed": 7}))
        .await;
    let batch: Vec<Value> = tokens.iter().map(|t| batch_item(t, "x")).collect();
    let answer = sandbox
        .post(
            sandbox
                .http
                .post(sandbox.running.url("/v24.0/"))
                .json(&json!({
            "access_token": PAGE_TOKEN, "batch": batch})),
        )
        .await;
    let items = answer.body.as_array().unwrap();
    let nulls = items.iter().filter(|i| i.is_null()).count();
    let ok = items.iter().filter(|i| i["code"] == 200).count();
    assert!(nulls > 0 && ok > 0, "{nulls} null, {ok} ok");
    assert_eq!(nulls + ok, 40);
    let stats = sandbox.stats().await;
    // Accepted-then-failed items are in the ledger although their answer is null.
    assert_eq!(
        stats.accepted as usize,
        ok + stats.faults_injected["accept_then_fail"] as usize
    );
}

#[tokio::test]
async fn the_rate_limit_answers_613_and_holds_each_second_to_the_limit() {
    let sandbox = Sandbox::start().await;
    sandbox.faults(json!({"rate_limit_per_page": 2})).await;
    let tokens = optins_for(&sandbox, 10).await;
    let mut limited = None;
    for token in &tokens {
        let answer = sandbox.send(PAGE_TOKEN, token_send(token, "x")).await;
        if answer.code() == 613 {
            limited = Some(answer);
        }
    }
    let limited = limited.expect("10 calls in at most two seconds exceed 2 per second");
    let usage: Value = serde_json::from_str(
        limited.headers["x-business-use-case-usage"]
            .to_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(usage[PAGE][0]["call_count"], 100);
    assert!(
        usage[PAGE][0]
            .get("estimated_time_to_regain_access")
            .is_some()
    );
    let stats = sandbox.stats().await;
    assert!(stats.rate_limited >= 1);
    let mut per_second = std::collections::HashMap::<i64, u32>::new();
    for message in sandbox.messages("").await {
        *per_second.entry(message.time_ms / 1000).or_default() += 1;
    }
    assert!(per_second.values().all(|n| *n <= 2), "{per_second:?}");
}

fn header_json(answer_headers: &HeaderMap, name: &str) -> Value {
    serde_json::from_str(answer_headers[name].to_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_page_at_its_capacity_answers_80006_and_stays_refused_until_it_regains_access() {
    let sandbox = Sandbox::start().await;
    sandbox
        .faults(json!({"page_capacity_per_second": 4, "capacity_block_ms": 90_000}))
        .await;
    let tokens = optins_for(&sandbox, 6).await;
    // Every answer says how much of the rolling second's budget is used.
    for (n, token) in tokens.iter().take(4).enumerate() {
        let answer = sandbox.send(PAGE_TOKEN, token_send(token, "x")).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        let usage = header_json(&answer.headers, "x-business-use-case-usage");
        assert_eq!(usage[PAGE][0]["call_count"], json!((n + 1) * 25), "{usage}");
        assert_eq!(usage[PAGE][0]["estimated_time_to_regain_access"], 0);
    }
    // The fifth call within the second finds the budget used up: refused, and so is every call
    // until the page regains access (two minutes, rounded up from 90 s).
    for token in &tokens[4..] {
        let answer = sandbox.send(PAGE_TOKEN, token_send(token, "x")).await;
        assert_eq!(answer.code(), 80006, "{:?}", answer.body);
        let usage = header_json(&answer.headers, "x-business-use-case-usage");
        assert_eq!(usage[PAGE][0]["call_count"], 100);
        assert_eq!(usage[PAGE][0]["estimated_time_to_regain_access"], 2);
    }
    let stats = sandbox.stats().await;
    assert_eq!((stats.accepted, stats.capacity_refused), (4, 2));
    assert_eq!(stats.rate_limited, 2);
}

#[tokio::test]
async fn without_a_block_the_capacity_is_a_rolling_second() {
    let sandbox = Sandbox::start().await;
    sandbox
        .faults(json!({"page_capacity_per_second": 3, "capacity_block_ms": 0}))
        .await;
    let tokens = optins_for(&sandbox, 5).await;
    for token in &tokens[..3] {
        assert_eq!(
            sandbox
                .send(PAGE_TOKEN, token_send(token, "x"))
                .await
                .status,
            200
        );
    }
    let refused = sandbox.send(PAGE_TOKEN, token_send(&tokens[3], "x")).await;
    assert_eq!(refused.code(), 80006);
    let usage = header_json(&refused.headers, "x-business-use-case-usage");
    assert_eq!(usage[PAGE][0]["estimated_time_to_regain_access"], 0);
    // Once the first calls are a second old, there is room again.
    eventually(
        Duration::from_secs(5),
        "room in the rolling second",
        || async {
            let answer = sandbox.send(PAGE_TOKEN, token_send(&tokens[3], "x")).await;
            (answer.status == 200).then_some(())
        },
    )
    .await;
    let times: Vec<i64> = sandbox
        .messages("")
        .await
        .iter()
        .map(|m| m.time_ms)
        .collect();
    assert!(times[3] - times[0] >= 1000, "{times:?}");
}

#[tokio::test]
async fn the_apps_capacity_answers_code_4_across_pages_and_x_app_usage_reports_it() {
    let sandbox = Sandbox::start().await;
    sandbox.faults(json!({"app_capacity_per_second": 2})).await;
    let tokens = optins_for(&sandbox, 3).await;
    let first = sandbox.send(PAGE_TOKEN, token_send(&tokens[0], "x")).await;
    assert_eq!(header_json(&first.headers, "x-app-usage")["call_count"], 50);
    sandbox.send(PAGE_TOKEN, token_send(&tokens[1], "x")).await;
    let refused = sandbox.send(PAGE_TOKEN, token_send(&tokens[2], "x")).await;
    assert_eq!(refused.code(), 4, "{:?}", refused.body);
    assert_eq!(refused.body["error"]["error_subcode"], Value::Null);
    assert_eq!(
        header_json(&refused.headers, "x-app-usage")["call_count"],
        100
    );
    let stats = sandbox.stats().await;
    assert_eq!((stats.accepted, stats.app_capacity_refused), (2, 1));
}

#[tokio::test]
async fn error_throttle_and_restriction_faults_accept_nothing() {
    let sandbox = Sandbox::start().await;
    let token = sandbox.optin(PAGE, "u1", "t").await;

    sandbox.faults(json!({"error_rate": 1.0})).await;
    let answer = sandbox.send(PAGE_TOKEN, token_send(&token, "x")).await;
    assert!(
        matches!((answer.status, answer.code()), (500, 1) | (503, 2)),
        "{}",
        answer.body
    );

    sandbox
        .faults(json!({"throttle_rate": 1.0, "throttle_regain_minutes": 3}))
        .await;
    let answer = sandbox.send(PAGE_TOKEN, token_send(&token, "x")).await;
    assert!(matches!(answer.code(), 613 | 80006), "{}", answer.body);
    let usage: Value = serde_json::from_str(
        answer.headers["x-business-use-case-usage"]
            .to_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(usage[PAGE][0]["estimated_time_to_regain_access"], 3);

    sandbox.faults(json!({"restricted_pages": [PAGE]})).await;
    let answer = sandbox.send(PAGE_TOKEN, token_send(&token, "x")).await;
    assert_eq!((answer.code(), answer.subcode()), (10, 1893063));

    // None of them used the token.
    sandbox.faults(json!({})).await;
    assert_eq!(
        sandbox
            .send(PAGE_TOKEN, token_send(&token, "x"))
            .await
            .status,
        200
    );
    assert_eq!(sandbox.stats().await.accepted, 1);
}

#[tokio::test]
async fn timeouts_and_resets_leave_nothing_accepted_but_accept_then_fail_does() {
    let sandbox = Sandbox::start().await;
    let token = sandbox.optin(PAGE, "u1", "t").await;
    let url = sandbox
        .running
        .url(&format!("/v24.0/me/messages?access_token={PAGE_TOKEN}"));
    let impatient = graph_sandbox::http_client_builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();

    sandbox
        .faults(json!({"timeout_rate": 1.0, "timeout_hold_ms": 5000}))
        .await;
    let timed_out = impatient
        .post(&url)
        .json(&token_send(&token, "x"))
        .send()
        .await;
    assert!(timed_out.unwrap_err().is_timeout());

    sandbox.faults(json!({"reset_rate": 1.0})).await;
    let reset = async {
        sandbox
            .http
            .post(&url)
            .json(&token_send(&token, "x"))
            .send()
            .await?
            .bytes()
            .await
    };
    assert!(
        reset.await.is_err(),
        "the connection is dropped without an answer"
    );
    assert_eq!(sandbox.stats().await.accepted, 0);

    sandbox.faults(json!({"accept_then_fail_rate": 1.0})).await;
    let failed = async {
        sandbox
            .http
            .post(&url)
            .json(&token_send(&token, "x"))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await
    };
    assert!(
        failed.await.is_err(),
        "the answer is a 500 or a dropped connection"
    );
    assert_eq!(
        sandbox.stats().await.accepted,
        1,
        "yet the message was accepted"
    );
    sandbox.faults(json!({})).await;
    let retry = sandbox.send(PAGE_TOKEN, token_send(&token, "x")).await;
    assert_eq!(retry.code(), 100, "and its token is spent");
}

#[tokio::test]
async fn latency_is_added_to_answers() {
    let sandbox = Sandbox::start().await;
    sandbox.faults(json!({"latency_ms": 150})).await;
    let token = sandbox.optin(PAGE, "u1", "t").await;
    let started = std::time::Instant::now();
    assert_eq!(
        sandbox
            .send(PAGE_TOKEN, token_send(&token, "x"))
            .await
            .status,
        200
    );
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "the fault's delay was applied"
    );
}

#[tokio::test]
async fn admin_refuses_bad_input() {
    let sandbox = Sandbox::start().await;
    for (path, body) in [
        ("/__sandbox/faults", json!({"error_rate": 2.0})),
        (
            "/__sandbox/faults",
            json!({"error_rate": 0.6, "reset_rate": 0.6}),
        ),
        ("/__sandbox/faults", json!({"eror_rate": 0.1})),
        ("/__sandbox/faults", json!({"page_capacity_per_second": 0})),
        ("/__sandbox/faults", json!({"app_capacity_per_second": 0})),
        ("/__sandbox/faults", json!({"capacity_block_ms": -1})),
        (
            "/__sandbox/optins",
            json!({"page_id": PAGE, "payload": "t"}),
        ),
        (
            "/__sandbox/optins",
            json!({"page_id": PAGE, "payload": "t", "psid_prefix": "p", "count": 0}),
        ),
        (
            "/__sandbox/pages",
            json!({"page_id": "abc", "access_token": "t", "app_secret": "s"}),
        ),
        (
            "/__sandbox/pages",
            json!({"page_id": "1", "access_token": "t", "app_secret": "s", "webhook_url": "ftp://x"}),
        ),
    ] {
        let (status, answer) = sandbox.admin(path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert!(answer["error"].is_string());
    }
    // Refused knobs changed nothing.
    let faults: Value = sandbox.get_json("/__sandbox/faults").await;
    assert_eq!(faults["page_capacity_per_second"], Value::Null, "{faults}");
    assert_eq!(faults["app_capacity_per_second"], Value::Null, "{faults}");
    let (status, _) = sandbox
        .admin(
            "/__sandbox/optins",
            json!({"page_id": "999", "psid": "u", "payload": "t"}),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn reset_clears_everything() {
    let sandbox = Sandbox::start().await;
    let token = sandbox.optin(PAGE, "u1", "t").await;
    assert_eq!(
        sandbox
            .send(PAGE_TOKEN, token_send(&token, "x"))
            .await
            .status,
        200
    );
    sandbox.faults(json!({"error_rate": 1.0})).await;
    sandbox.admin("/__sandbox/reset", json!({})).await;
    assert_eq!(sandbox.stats().await, Stats::default());
    assert!(sandbox.messages("").await.is_empty());
    // Pages are gone too.
    assert_eq!(
        sandbox
            .send(PAGE_TOKEN, token_send(&token, "x"))
            .await
            .code(),
        190
    );
}

/// A webhook endpoint that records every POST and refuses the first `fail_first` of them.
struct Receiver {
    url: String,
    posts: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn receiver(fail_first: u32) -> Receiver {
    let posts: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
    let failures = Arc::new(AtomicU32::new(fail_first));
    let sink = posts.clone();
    let app = Router::new().route(
        "/webhook",
        post(move |headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            let failures = failures.clone();
            async move {
                if failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                sink.lock().unwrap().push((headers, body));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Receiver {
        url,
        posts,
        _stop: stop,
    }
}

fn fast_retries() -> SandboxOptions {
    SandboxOptions {
        webhook_retry_base: Duration::from_millis(10),
        ..SandboxOptions::default()
    }
}

#[tokio::test]
async fn opt_in_webhooks_are_signed_escaped_and_shaped_like_facebooks() {
    let hook = receiver(0).await;
    let sandbox = Sandbox::start_with(fast_retries()).await;
    sandbox.page("333", "EAAB-333", Some(&hook.url)).await;
    let (_, body) = sandbox
        .admin(
            "/__sandbox/optins",
            json!({"page_id": "333", "psid": "u1", "payload": "Été 🎉 sale"}),
        )
        .await;
    let token = body["token"].as_str().unwrap().to_string();

    let (headers, raw) = eventually(Duration::from_secs(5), "the opt-in webhook", || {
        let posts = hook.posts.clone();
        async move { posts.lock().unwrap().first().cloned() }
    })
    .await;
    let signature = headers["x-hub-signature-256"].to_str().unwrap();
    let expected = format!(
        "sha256={}",
        hex_hmac("app-secret-333", std::str::from_utf8(&raw).unwrap())
    );
    assert_eq!(
        signature, expected,
        "HMAC-SHA256 of the raw body with the app secret"
    );
    let text = std::str::from_utf8(&raw).unwrap();
    assert!(
        text.is_ascii() && text.contains("\\u00c9t\\u00e9 \\ud83c\\udf89"),
        "{text}"
    );

    let envelope: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(envelope["object"], "page");
    let entry = &envelope["entry"][0];
    assert_eq!(entry["id"], "333");
    let event = &entry["messaging"][0];
    assert_eq!(event["sender"]["id"], "u1");
    assert_eq!(event["recipient"]["id"], "333");
    assert_eq!(event["optin"]["type"], "one_time_notif_req");
    assert_eq!(event["optin"]["payload"], "Été 🎉 sale");
    assert_eq!(event["optin"]["one_time_notif_token"], token.as_str());
    let millis = event["timestamp"].as_i64().unwrap();
    assert!(
        (millis - chrono::Utc::now().timestamp_millis()).abs() < 60_000,
        "milliseconds"
    );
}

#[tokio::test]
async fn bulk_opt_ins_go_out_in_posts_of_at_most_100_events() {
    let hook = receiver(0).await;
    let sandbox = Sandbox::start_with(fast_retries()).await;
    sandbox.page("444", "EAAB-444", Some(&hook.url)).await;
    let (status, body) = sandbox
        .admin(
            "/__sandbox/optins",
            json!({"page_id": "444", "psid_prefix": "fan-", "count": 250, "payload": "t"}),
        )
        .await;
    assert_eq!(status, 200);
    let tokens: Vec<String> = serde_json::from_value(body["tokens"].clone()).unwrap();
    assert_eq!(tokens.len(), 250);

    let posts = eventually(Duration::from_secs(10), "three webhook posts", || {
        let posts = hook.posts.clone();
        async move {
            let posts = posts.lock().unwrap();
            (posts.len() == 3).then(|| posts.clone())
        }
    })
    .await;
    let mut seen = Vec::new();
    for (index, (_, raw)) in posts.iter().enumerate() {
        let envelope: Value = serde_json::from_slice(raw).unwrap();
        let events = envelope["entry"][0]["messaging"].as_array().unwrap();
        assert_eq!(events.len(), [100, 100, 50][index]);
        seen.extend(events.iter().map(|e| {
            e["optin"]["one_time_notif_token"]
                .as_str()
                .unwrap()
                .to_string()
        }));
    }
    assert_eq!(seen, tokens, "every token once, in order");
}

#[tokio::test]
async fn failed_webhooks_are_retried_until_acknowledged() {
    let hook = receiver(2).await;
    let sandbox = Sandbox::start_with(fast_retries()).await;
    sandbox.page("555", "EAAB-555", Some(&hook.url)).await;
    let (status, _) = sandbox
        .admin(
            "/__sandbox/interactions",
            json!({"page_id": "555", "psid": "u1", "text": "hello"}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, raw) = eventually(Duration::from_secs(5), "the retried webhook", || {
        let posts = hook.posts.clone();
        async move { posts.lock().unwrap().first().cloned() }
    })
    .await;
    let envelope: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        envelope["entry"][0]["messaging"][0]["message"]["text"],
        "hello"
    );
    let stats = eventually(
        Duration::from_secs(5),
        "the delivery to be counted",
        || async {
            let stats = sandbox.stats().await;
            (stats.webhook_posts_delivered == 1).then_some(stats)
        },
    )
    .await;
    assert_eq!(stats.webhook_attempts_failed, 2);
    // The interaction opened the window.
    let answer = sandbox
        .send("EAAB-555", standard_send("u1", json!({"text": "hi"})))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// The npm `messaging-api-messenger` client works against the sandbox with only its base URL
/// changed: a token send, a refused reuse, and a batch (see tests/peer/messaging-api-messenger).
#[tokio::test]
async fn a_real_graph_client_library_works_against_the_sandbox() {
    let sandbox = Sandbox::start().await;
    let (status, body) = sandbox
        .admin(
            "/__sandbox/optins",
            json!({"page_id": PAGE, "psid_prefix": "fan-", "count": 5, "payload": "Tickets"}),
        )
        .await;
    assert_eq!(status, 200);
    let tokens: Vec<String> = serde_json::from_value(body["tokens"].clone()).unwrap();

    let source =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peer/messaging-api-messenger");
    let dir = tempfile::tempdir().unwrap();
    for file in ["package.json", "package-lock.json", "check.cjs"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let workdir = dir.path().to_path_buf();
    let run = move |program: &str, args: &[&str], env: Vec<(&str, String)>| {
        let output = std::process::Command::new(program)
            .args(args)
            .current_dir(&workdir)
            .envs(env)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program} could not run (is Node.js installed?): {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let sandbox_url = format!("http://{}", sandbox.running.addr);
    let env = vec![
        ("SANDBOX_URL", sandbox_url),
        ("PAGE_TOKEN", PAGE_TOKEN.to_string()),
        ("APP_SECRET", APP_SECRET.to_string()),
        ("OTN_TOKENS", tokens.join(",")),
        ("EXPECTED_PSID", "fan-0".to_string()),
    ];
    tokio::task::spawn_blocking(move || {
        run(
            "npm",
            &["ci", "--no-audit", "--no-fund", "--loglevel=error"],
            vec![],
        );
        run("node", &["check.cjs"], env);
    })
    .await
    .unwrap();

    let stats = sandbox.stats().await;
    assert_eq!(stats.accepted, 5, "one single send and a batch of four");
    assert_eq!(
        stats.tokens_presented_more_than_once, 1,
        "the refused reuse"
    );
    assert_eq!(
        stats.rejected_by_reason.get("appsecret_proof_invalid"),
        None
    );
    let ledger = sandbox.messages("").await;
    assert_eq!(ledger.len(), 5);
    assert_eq!(ledger[0].message, json!({"text": "Tickets are on sale"}));
    assert_eq!(ledger[0].psid, "fan-0");
}

#[tokio::test]
async fn unknown_versions_and_batch_items_are_graph_errors() {
    let sandbox = Sandbox::start().await;
    let token = sandbox.optin(PAGE, "u1", "t").await;
    let url = sandbox
        .running
        .url(&format!("/latest/me/messages?access_token={PAGE_TOKEN}"));
    let answer = sandbox
        .post(sandbox.http.post(url).json(&token_send(&token, "x")))
        .await;
    assert_eq!((answer.status, answer.code()), (400, 100));
    assert!(answer.error_message().contains("unknown version 'latest'"));

    let answer = sandbox
        .post(sandbox.http.post(sandbox.running.url("/v24.0/")).json(&json!({
            "access_token": PAGE_TOKEN,
            "batch": [{"method": "GET", "relative_url": "me?fields=id"}, batch_item(&token, "x")]})))
        .await;
    let items = answer.body.as_array().unwrap();
    assert_eq!(items[0]["code"], 400, "only sends are supported");
    assert_eq!(items[1]["code"], 200, "the other items still run");
}

// Recurring notifications (`notification_messages`): reusable tokens, STOP and RESUME, the
// subscriber's minimum gap, the opt-in request template, and the judge's counters for them.

fn recurring_send(token: &str, text: &str) -> Value {
    json!({"recipient": {"notification_messages_token": token}, "message": {"text": text}})
}

fn recurring_request(fields: Value) -> Value {
    let mut payload = json!({"template_type": "notification_messages"});
    payload
        .as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    json!({"attachment": {"type": "template", "payload": payload}})
}

impl Sandbox {
    /// A recurring opt-in with these extra fields; its token.
    async fn recurring_optin_with(&self, page_id: &str, psid: &str, fields: Value) -> String {
        let mut body = json!({"page_id": page_id, "psid": psid, "payload": "news",
                              "kind": "recurring"});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let (status, answer) = self.admin("/__sandbox/optins", body).await;
        assert_eq!(status, 200, "{answer}");
        answer["token"].as_str().unwrap().to_string()
    }

    async fn recurring_optin(&self, page_id: &str, psid: &str, payload: &str) -> String {
        self.recurring_optin_with(page_id, psid, json!({"payload": payload}))
            .await
    }

    async fn recurring_status(&self, body: Value) -> (u16, Value) {
        self.admin("/__sandbox/recurring/status", body).await
    }
}

/// Waits for `count` webhook posts; checks each one's signature and returns its bodies.
async fn signed_webhooks(hook: &Receiver, app_secret: &str, count: usize) -> Vec<Value> {
    let posts = eventually(
        Duration::from_secs(5),
        &format!("{count} webhook posts"),
        || {
            let posts = hook.posts.clone();
            async move {
                let posts = posts.lock().unwrap();
                (posts.len() >= count).then(|| posts.clone())
            }
        },
    )
    .await;
    assert_eq!(posts.len(), count, "no more posts than expected");
    posts
        .iter()
        .map(|(headers, raw)| {
            let expected = format!(
                "sha256={}",
                hex_hmac(app_secret, std::str::from_utf8(raw).unwrap())
            );
            assert_eq!(headers["x-hub-signature-256"].to_str().unwrap(), expected);
            serde_json::from_slice(raw).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_recurring_token_is_reusable_once_its_subscribers_gap_has_passed() {
    let sandbox = Sandbox::start().await;
    sandbox
        .faults(json!({"recurring_cooldown_seconds": 1}))
        .await;
    let token = sandbox.recurring_optin(PAGE, "u1", "news").await;

    let first = sandbox
        .send(PAGE_TOKEN, recurring_send(&token, "first"))
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["recipient_id"], "u1");
    assert!(first.body["message_id"].as_str().unwrap().starts_with("m_"));
    for header in ["x-app-usage", "x-business-use-case-usage"] {
        assert!(first.headers.contains_key(header), "{header}");
    }

    // The gap is the subscriber's, across all their recurring tokens.
    let inside = sandbox
        .send(PAGE_TOKEN, recurring_send(&token, "second"))
        .await;
    assert_eq!(
        (inside.status, inside.code(), inside.subcode()),
        (400, 4, 2018354),
        "{}",
        inside.body
    );
    assert_eq!(
        inside.error_message(),
        "(#4) Recurring notification minimum gap not respected"
    );
    let other_topic = sandbox.recurring_optin(PAGE, "u1", "deals").await;
    let also_inside = sandbox
        .send(PAGE_TOKEN, recurring_send(&other_topic, "second"))
        .await;
    assert_eq!((also_inside.code(), also_inside.subcode()), (4, 2018354));
    // Another subscriber has a gap of their own.
    let other_user = sandbox.recurring_optin(PAGE, "u2", "news").await;
    let elsewhere = sandbox
        .send(PAGE_TOKEN, recurring_send(&other_user, "first"))
        .await;
    assert_eq!(elsewhere.status, 200, "{}", elsewhere.body);

    // Past the gap, the same token works again, here as a form on /{page-id}/messages.
    let form_send = || {
        sandbox.post(
            sandbox
                .http
                .post(sandbox.running.url(&format!("/v24.0/{PAGE}/messages")))
                .form(&[
                    ("access_token", PAGE_TOKEN),
                    (
                        "recipient",
                        &json!({"notification_messages_token": token}).to_string(),
                    ),
                    ("message", &json!({"text": "second"}).to_string()),
                ]),
        )
    };
    let again = eventually(Duration::from_secs(5), "the gap to pass", || async {
        let answer = form_send().await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert_eq!(again.body["recipient_id"], "u1");

    let stats = sandbox.stats().await;
    assert_eq!(stats.accepted, 3);
    assert_eq!(stats.recurring_accepted, 3);
    assert_eq!(
        stats.recurring_presentations,
        stats.recurring_accepted + stats.rejected
    );
    assert!(stats.rejected_by_reason["recurring_gap"] >= 2, "{stats:?}");
    assert_eq!(stats.recipients_messaged_twice_within_gap, 0);
    // Reuse of a recurring token is no fault: the one-time counters saw nothing.
    assert_eq!(stats.token_presentations, 0);
    assert_eq!(stats.tokens_presented_more_than_once, 0);
    assert_eq!(stats.tokens_accepted_more_than_once, 0);
    assert_eq!(stats.rate_limited, 0, "the gap is not a throttle");

    let ledger = sandbox.messages("?psid=u1").await;
    assert_eq!(ledger.len(), 2);
    for entry in &ledger {
        assert_eq!(entry.token.as_deref(), Some(token.as_str()));
        assert_eq!(entry.token_kind, Some(TokenKind::Recurring));
        assert_eq!(entry.psid, "u1");
    }
    let raw: Value = sandbox.get_json("/__sandbox/messages?psid=u2").await;
    assert_eq!(raw["messages"][0]["token_kind"], "recurring");
}

#[tokio::test]
async fn without_the_gap_rule_two_messages_inside_it_are_accepted_and_counted() {
    let sandbox = Sandbox::start().await;
    let faults: Value = sandbox.get_json("/__sandbox/faults").await;
    assert_eq!(faults["recurring_cooldown_seconds"], 172_800);
    assert_eq!(faults["enforce_recurring_gap"], true);
    sandbox
        .faults(json!({"enforce_recurring_gap": false}))
        .await;
    let token = sandbox.recurring_optin(PAGE, "u1", "news").await;
    let other = sandbox.recurring_optin(PAGE, "u1", "deals").await;
    for (token, text) in [(&token, "same"), (&other, "same"), (&token, "different")] {
        let answer = sandbox.send(PAGE_TOKEN, recurring_send(token, text)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let stats = sandbox.stats().await;
    assert_eq!(stats.recurring_accepted, 3);
    assert_eq!(
        stats.recipients_messaged_twice_within_gap, 1,
        "distinct subscribers"
    );
    assert_eq!(stats.recipients_with_duplicate_content, 1);
    assert_eq!(stats.tokens_accepted_more_than_once, 0);
}

#[tokio::test]
async fn recurring_tokens_unknown_foreign_expired_or_of_the_other_kind_answer_code_100() {
    let sandbox = Sandbox::start().await;
    let expired = sandbox
        .recurring_optin_with(PAGE, "u1", json!({"expires_in_seconds": 0}))
        .await;
    let foreign = sandbox.recurring_optin(OTHER_PAGE, "u2", "news").await;
    let one_time = sandbox.optin(PAGE, "u3", "news").await;
    for (token, reason) in [
        (expired.as_str(), "recurring_token_expired"),
        (foreign.as_str(), "recurring_token_foreign"),
        ("rn-made-up", "recurring_token_unknown"),
        (one_time.as_str(), "recurring_token_unknown"),
    ] {
        let answer = sandbox.send(PAGE_TOKEN, recurring_send(token, "x")).await;
        assert_eq!((answer.status, answer.code()), (400, 100), "{reason}");
        assert_eq!(answer.body["error"]["type"], "OAuthException");
        assert_eq!(
            answer.error_message(),
            "(#100) The notification_messages_token is invalid or expired"
        );
        assert!(answer.body["error"].get("error_subcode").is_none());
        assert!(
            sandbox.stats().await.rejected_by_reason[reason] >= 1,
            "{reason}"
        );
    }
    // A recurring token in the one-time field is an unknown one-time token.
    let live = sandbox.recurring_optin(PAGE, "u4", "news").await;
    let answer = sandbox.send(PAGE_TOKEN, token_send(&live, "x")).await;
    assert_eq!((answer.status, answer.code()), (400, 100));
    assert!(
        answer
            .error_message()
            .contains("one-time notification token")
    );
    // Both kinds at once, or a token with an id, is a bad recipient.
    let both = sandbox
        .send(
            PAGE_TOKEN,
            json!({"recipient": {"notification_messages_token": live, "id": "u4"},
                   "message": {"text": "x"}}),
        )
        .await;
    assert_eq!(both.code(), 100);
    assert!(
        both.error_message().contains("exactly one of"),
        "{}",
        both.body
    );

    let stats = sandbox.stats().await;
    assert_eq!(stats.accepted, 0);
    assert_eq!(stats.recurring_presentations, 4);
    assert_eq!(stats.token_presentations, 1);
    assert_eq!(stats.rejected_by_reason["token_unknown"], 1);
    // The one-time token refused in the recurring field is still good as what it is.
    let answer = sandbox.send(PAGE_TOKEN, token_send(&one_time, "x")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[tokio::test]
async fn recurring_opt_in_webhooks_are_shaped_like_facebooks() {
    let hook = receiver(0).await;
    let sandbox = Sandbox::start_with(fast_retries()).await;
    sandbox.page("333", "EAAB-333", Some(&hook.url)).await;
    let before = chrono::Utc::now().timestamp_millis();
    let expiring = sandbox
        .recurring_optin_with(
            "333",
            "u1",
            json!({"payload": "Été news", "title": "Weekly deals", "timezone": "Europe/London",
                   "user_token_status": "REFRESHED", "expires_in_seconds": 3600}),
        )
        .await;
    let bodies = signed_webhooks(&hook, "app-secret-333", 1).await;
    let event = &bodies[0]["entry"][0]["messaging"][0];
    let timestamp = event["timestamp"].as_i64().unwrap();
    assert!((timestamp - before).abs() < 60_000, "milliseconds");
    let expiry = event["optin"]["token_expiry_timestamp"].as_i64().unwrap();
    assert!(
        (expiry - timestamp - 3_600_000).abs() < 1000,
        "{expiry} is an epoch-ms number an hour on"
    );
    assert_eq!(
        event,
        &json!({"sender": {"id": "u1"}, "recipient": {"id": "333"}, "timestamp": timestamp,
                "optin": {"type": "notification_messages", "payload": "Été news",
                          "title": "Weekly deals", "notification_messages_token": expiring,
                          "notification_messages_timezone": "Europe/London",
                          "token_expiry_timestamp": expiry,
                          "user_token_status": "REFRESHED"}})
    );

    // Defaults: the default title, UTC, NOT_REFRESHED, and no expiry at all.
    let lasting = sandbox.recurring_optin("333", "u2", "news").await;
    let bodies = signed_webhooks(&hook, "app-secret-333", 2).await;
    let event = &bodies[1]["entry"][0]["messaging"][0];
    assert_eq!(
        event["optin"],
        json!({"type": "notification_messages", "payload": "news",
               "title": "Updates and promotions", "notification_messages_token": lasting,
               "notification_messages_timezone": "UTC", "user_token_status": "NOT_REFRESHED"})
    );

    // Bulk recurring opt-ins: posts of at most 100 events, every token once, in order.
    let (status, answer) = sandbox
        .admin(
            "/__sandbox/optins",
            json!({"page_id": "333", "psid_prefix": "fan-", "count": 150, "payload": "news",
                   "kind": "recurring"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let tokens: Vec<String> = serde_json::from_value(answer["tokens"].clone()).unwrap();
    assert_eq!(tokens.len(), 150);
    let bodies = signed_webhooks(&hook, "app-secret-333", 4).await;
    let mut seen = Vec::new();
    for (body, expected) in bodies[2..].iter().zip([100, 50]) {
        let events = body["entry"][0]["messaging"].as_array().unwrap();
        assert_eq!(events.len(), expected);
        for event in events {
            assert_eq!(event["optin"]["type"], "notification_messages");
            assert!(event["optin"].get("notification_messages_status").is_none());
            seen.push(
                event["optin"]["notification_messages_token"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    assert_eq!(seen, tokens);
    let fan = sandbox
        .send("EAAB-333", recurring_send(&tokens[149], "hi"))
        .await;
    assert_eq!(fan.body["recipient_id"], "fan-149", "{}", fan.body);
}

#[tokio::test]
async fn stop_and_resume_post_their_webhooks_and_switch_the_token_off_and_on() {
    let hook = receiver(0).await;
    let sandbox = Sandbox::start_with(fast_retries()).await;
    sandbox.page("333", "EAAB-333", Some(&hook.url)).await;
    sandbox
        .faults(json!({"enforce_recurring_gap": false}))
        .await;
    let token = sandbox
        .recurring_optin_with(
            "333",
            "u1",
            json!({"title": "Deals", "timezone": "Asia/Tokyo", "expires_in_seconds": 3600}),
        )
        .await;
    signed_webhooks(&hook, "app-secret-333", 1).await;

    let status_event = |status: &str, token: Option<&str>| {
        let mut optin = json!({"type": "notification_messages", "payload": "news",
            "title": "Deals", "notification_messages_timezone": "Asia/Tokyo",
            "user_token_status": "NOT_REFRESHED", "notification_messages_status": status});
        if let Some(token) = token {
            optin["notification_messages_token"] = json!(token);
        }
        optin
    };
    let cases = [
        (
            "STOP",
            None,
            None,
            "STOP_NOTIFICATIONS",
            Some(token.as_str()),
        ),
        (
            "RESUME",
            None,
            None,
            "RESUME_NOTIFICATIONS",
            Some(token.as_str()),
        ),
        (
            "STOP",
            Some("space"),
            Some(false),
            "STOP NOTIFICATIONS",
            None,
        ),
        (
            "RESUME",
            Some("space"),
            Some(true),
            "RESUME NOTIFICATIONS",
            Some(token.as_str()),
        ),
        (
            "STOP",
            Some("underscore"),
            Some(false),
            "STOP_NOTIFICATIONS",
            None,
        ),
    ];
    for (index, (status, spelling, include_token, sent, named)) in cases.into_iter().enumerate() {
        let mut body = json!({"page_id": "333", "token": token, "status": status});
        if let Some(spelling) = spelling {
            body["spelling"] = json!(spelling);
        }
        if let Some(include_token) = include_token {
            body["include_token"] = json!(include_token);
        }
        let (code, answer) = sandbox.recurring_status(body).await;
        assert_eq!((code, &answer), (200, &json!({})));
        let bodies = signed_webhooks(&hook, "app-secret-333", index + 2).await;
        let event = &bodies[index + 1]["entry"][0]["messaging"][0];
        assert_eq!(event["sender"]["id"], "u1");
        assert_eq!(event["recipient"]["id"], "333");
        assert!(event["timestamp"].is_i64());
        assert_eq!(
            event["optin"],
            status_event(sent, named),
            "{status} {spelling:?}"
        );

        let send = sandbox
            .send(
                "EAAB-333",
                recurring_send(&token, &format!("after {index}")),
            )
            .await;
        if status == "STOP" {
            assert_eq!(
                (send.status, send.code(), send.subcode()),
                (400, 10, 1893015),
                "{}",
                send.body
            );
            assert_eq!(
                send.error_message(),
                "(#10) The user has stopped notifications on this topic"
            );
        } else {
            assert_eq!(send.status, 200, "{}", send.body);
        }
    }
    let stats = sandbox.stats().await;
    assert_eq!(stats.rejected_by_reason["recurring_token_stopped"], 3);
    assert_eq!(stats.recurring_accepted, 2);

    // Without a webhook: the state still changes.
    let (code, _) = sandbox
        .recurring_status(json!({"page_id": "333", "token": token, "status": "RESUME",
                                 "deliver_webhook": false}))
        .await;
    assert_eq!(code, 200);
    let send = sandbox
        .send("EAAB-333", recurring_send(&token, "back"))
        .await;
    assert_eq!(send.status, 200, "{}", send.body);
    assert_eq!(
        hook.posts.lock().unwrap().len(),
        6,
        "no webhook was asked for"
    );

    // What the admin call refuses.
    let one_time = sandbox.optin("333", "u2", "news").await;
    for (body, expected) in [
        (
            json!({"page_id": "999", "token": token, "status": "STOP"}),
            404,
        ),
        (
            json!({"page_id": "333", "token": "rn-made-up", "status": "STOP"}),
            404,
        ),
        (
            json!({"page_id": PAGE, "token": token, "status": "STOP"}),
            404,
        ),
        (
            json!({"page_id": "333", "token": one_time, "status": "STOP"}),
            400,
        ),
        (
            json!({"page_id": "333", "token": token, "status": "PAUSE"}),
            400,
        ),
        (
            json!({"page_id": "333", "token": token, "status": "STOP", "spelling": "dash"}),
            400,
        ),
        (
            json!({"page_id": "333", "token": token, "status": "STOP", "colour": "red"}),
            400,
        ),
    ] {
        let (code, answer) = sandbox.recurring_status(body.clone()).await;
        assert_eq!(code, expected, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let send = sandbox
        .send("EAAB-333", recurring_send(&token, "still"))
        .await;
    assert_eq!(
        send.status, 200,
        "refused calls changed nothing: {}",
        send.body
    );
}

#[tokio::test]
async fn recurring_opt_ins_refuse_bad_input_naming_the_field() {
    let sandbox = Sandbox::start().await;
    for (body, named) in [
        (json!({"title": "t"}), "title"),
        (json!({"timezone": "UTC"}), "timezone"),
        (
            json!({"kind": "one_time", "user_token_status": "REFRESHED"}),
            "user_token_status",
        ),
        (json!({"kind": "weekly"}), "kind"),
        (
            json!({"kind": "recurring", "title": "t".repeat(66)}),
            "title",
        ),
        (json!({"kind": "recurring", "title": ""}), "title"),
        (
            json!({"kind": "recurring", "user_token_status": "FRESH"}),
            "user_token_status",
        ),
        (json!({"kind": "recurring", "timezone": ""}), "timezone"),
        (
            json!({"kind": "recurring", "expires_in_seconds": -1}),
            "expires_in_seconds",
        ),
        (
            json!({"kind": "recurring", "frequency": "DAILY"}),
            "frequency",
        ),
    ] {
        let mut request = json!({"page_id": PAGE, "psid": "u1", "payload": "news"});
        request
            .as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let (status, answer) = sandbox.admin("/__sandbox/optins", request).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(named),
            "{named}: {answer}"
        );
    }
    let max_title = sandbox
        .recurring_optin_with(PAGE, "u1", json!({"title": "é".repeat(65)}))
        .await;
    assert!(!max_title.is_empty());
    let (status, _) = sandbox
        .admin(
            "/__sandbox/optins",
            json!({"page_id": "999", "psid": "u1", "payload": "news", "kind": "recurring"}),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn recurring_opt_in_requests_follow_their_rules() {
    let sandbox = Sandbox::start().await;
    sandbox.interact("u1", None).await;
    let field = |key: &str| format!("[payload][{key}]");
    let cases = [
        (
            json!({"title": "t".repeat(66), "payload": "p"}),
            field("title"),
        ),
        (json!({"title": "", "payload": "p"}), field("title")),
        (json!({"title": "t"}), field("payload")),
        (json!({"payload": ""}), field("payload")),
        (
            json!({"payload": "p", "image_url": "ftp://x/y.png"}),
            field("image_url"),
        ),
        (
            json!({"payload": "p", "notification_messages_timezone": 5}),
            field("notification_messages_timezone"),
        ),
        (
            json!({"payload": "p", "notification_messages_cta_text": "SUBSCRIBE"}),
            field("notification_messages_cta_text"),
        ),
        (
            json!({"payload": "p", "notification_messages_reoptin": "YES"}),
            field("notification_messages_reoptin"),
        ),
    ];
    for (fields, named) in cases {
        let answer = sandbox
            .send(
                PAGE_TOKEN,
                standard_send("u1", recurring_request(fields.clone())),
            )
            .await;
        assert_eq!((answer.status, answer.code()), (400, 100), "{fields}");
        assert!(
            answer.error_message().contains(&named),
            "{named}: {}",
            answer.error_message()
        );
    }
    assert_eq!(sandbox.stats().await.accepted, 0);

    let full = recurring_request(json!({"title": "Weekly deals", "payload": "deals",
        "image_url": "https://example.com/deals.png",
        "notification_messages_timezone": "Europe/London",
        "notification_messages_cta_text": "GET_UPDATES",
        "notification_messages_reoptin": "ENABLED"}));
    let sent = sandbox.send(PAGE_TOKEN, standard_send("u1", full)).await;
    assert_eq!(sent.status, 200, "{}", sent.body);

    // The same title within a week: 9/2018352, whatever the payload.
    let again = sandbox
        .send(
            PAGE_TOKEN,
            standard_send(
                "u1",
                recurring_request(json!({"title": "Weekly deals", "payload": "other"})),
            ),
        )
        .await;
    assert_eq!(
        (again.status, again.code(), again.subcode()),
        (400, 9, 2018352),
        "{}",
        again.body
    );
    assert_eq!(
        again.error_message(),
        "(#9) Too many notification_messages requests"
    );
    // The default title counts as a title.
    let untitled = || {
        sandbox.send(
            PAGE_TOKEN,
            standard_send("u1", recurring_request(json!({"payload": "news"}))),
        )
    };
    assert_eq!(untitled().await.status, 200);
    let twice = untitled().await;
    assert_eq!((twice.code(), twice.subcode()), (9, 2018352));
    let titled_default = sandbox
        .send(
            PAGE_TOKEN,
            standard_send(
                "u1",
                recurring_request(json!({"title": "Updates and promotions", "payload": "x"})),
            ),
        )
        .await;
    assert_eq!(
        (titled_default.code(), titled_default.subcode()),
        (9, 2018352)
    );
    // Another user has their own week.
    sandbox.interact("u2", None).await;
    let other_user = sandbox
        .send(
            PAGE_TOKEN,
            standard_send("u2", recurring_request(json!({"payload": "news"}))),
        )
        .await;
    assert_eq!(other_user.status, 200, "{}", other_user.body);

    // A payload the user already holds a live recurring token for: 613/1893016, as for a
    // repeated one-time request; once they stopped it, they may be asked again.
    let token = sandbox.recurring_optin(PAGE, "u3", "sport").await;
    let held = || {
        sandbox.send(
            PAGE_TOKEN,
            standard_send(
                "u3",
                recurring_request(json!({"title": "Sport", "payload": "sport"})),
            ),
        )
    };
    let answer = held().await;
    assert_eq!(
        (answer.code(), answer.subcode()),
        (613, 1893016),
        "{}",
        answer.body
    );
    let (status, _) = sandbox
        .recurring_status(json!({"page_id": PAGE, "token": token, "status": "STOP"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(held().await.status, 200);

    // Outside the window, or to a token: refused as for one-time requests.
    let two_days_ago = chrono::Utc::now().timestamp_millis() - 2 * 24 * 3600 * 1000;
    sandbox.interact("u4", Some(two_days_ago)).await;
    let outside = sandbox
        .send(
            PAGE_TOKEN,
            standard_send("u4", recurring_request(json!({"payload": "news"}))),
        )
        .await;
    assert_eq!((outside.code(), outside.subcode()), (10, 2018278));
    let live = sandbox.recurring_optin(PAGE, "u5", "news").await;
    let to_token = sandbox
        .send(
            PAGE_TOKEN,
            json!({"recipient": {"notification_messages_token": live},
                   "message": recurring_request(json!({"payload": "more"}))}),
        )
        .await;
    assert_eq!(to_token.code(), 100);
    assert!(to_token.error_message().contains("recipient[id]"));

    let stats = sandbox.stats().await;
    assert_eq!(stats.rejected_by_reason["too_many_recurring_requests"], 3);
    assert_eq!(stats.rejected_by_reason["repeated_optin_request"], 1);
    let requests = sandbox.messages("?psid=u1").await;
    assert_eq!(requests.len(), 2);
    assert!(requests.iter().all(|m| m.token_kind.is_none()));
}

fn recurring_batch_item(token: &str, text: &str) -> Value {
    json!({"method": "POST", "relative_url": "v24.0/me/messages",
           "body": format!("recipient={}&message={}",
               urlencode(&json!({"notification_messages_token": token}).to_string()),
               urlencode(&json!({"text": text}).to_string()))})
}

#[tokio::test]
async fn batch_items_send_with_recurring_tokens_each_under_the_rules() {
    let sandbox = Sandbox::start().await;
    let first = sandbox.recurring_optin(PAGE, "u0", "news").await;
    let second = sandbox.recurring_optin(PAGE, "u1", "news").await;
    let one_time = sandbox.optin(PAGE, "u2", "news").await;
    let batch = json!([
        recurring_batch_item(&first, "a"),
        recurring_batch_item(&second, "b"),
        recurring_batch_item(&first, "c"),
        batch_item(&one_time, "d"),
        recurring_batch_item(&one_time, "e"),
    ]);
    let answer = sandbox
        .post(
            sandbox
                .http
                .post(sandbox.running.url("/v24.0/"))
                .form(&[("access_token", PAGE_TOKEN), ("batch", &batch.to_string())]),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let items = answer.body.as_array().unwrap();
    let bodies: Vec<Value> = items
        .iter()
        .map(|item| serde_json::from_str(item["body"].as_str().unwrap()).unwrap())
        .collect();
    let codes: Vec<i64> = items.iter().map(|i| i["code"].as_i64().unwrap()).collect();
    assert_eq!(codes, [200, 200, 400, 200, 400], "{}", answer.body);
    assert_eq!(bodies[0]["recipient_id"], "u0");
    assert_eq!(bodies[1]["recipient_id"], "u1");
    assert_eq!(bodies[2]["error"]["code"], 4);
    assert_eq!(bodies[2]["error"]["error_subcode"], 2018354);
    assert_eq!(bodies[4]["error"]["code"], 100);
    assert!(items[0]["headers"].is_array());

    let kinds: Vec<Option<TokenKind>> = sandbox
        .messages("")
        .await
        .iter()
        .map(|m| m.token_kind)
        .collect();
    assert_eq!(
        kinds,
        [
            Some(TokenKind::Recurring),
            Some(TokenKind::Recurring),
            Some(TokenKind::OneTime)
        ]
    );
    let stats = sandbox.stats().await;
    assert_eq!(stats.recurring_presentations, 4);
    assert_eq!(stats.recurring_accepted, 2);
    assert_eq!(stats.token_presentations, 1);
}

#[tokio::test]
async fn faults_apply_to_recurring_sends_and_accept_then_fail_starts_the_gap() {
    let sandbox = Sandbox::start().await;
    let token = sandbox.recurring_optin(PAGE, "u1", "news").await;
    let url = sandbox
        .running
        .url(&format!("/v24.0/me/messages?access_token={PAGE_TOKEN}"));

    sandbox.faults(json!({"restricted_pages": [PAGE]})).await;
    let restricted = sandbox.send(PAGE_TOKEN, recurring_send(&token, "x")).await;
    assert_eq!((restricted.code(), restricted.subcode()), (10, 1893063));
    sandbox.faults(json!({"error_rate": 1.0})).await;
    let failed = sandbox.send(PAGE_TOKEN, recurring_send(&token, "x")).await;
    assert!(failed.status >= 500, "{}", failed.body);
    sandbox.faults(json!({"throttle_rate": 1.0})).await;
    let throttled = sandbox.send(PAGE_TOKEN, recurring_send(&token, "x")).await;
    assert!(
        [613, 80006].contains(&throttled.code()),
        "{}",
        throttled.body
    );
    assert_eq!(sandbox.stats().await.recurring_accepted, 0);

    sandbox.faults(json!({"accept_then_fail_rate": 1.0})).await;
    let ambiguous = async {
        sandbox
            .http
            .post(&url)
            .json(&recurring_send(&token, "x"))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await
    };
    assert!(ambiguous.await.is_err(), "a 500 or a dropped connection");
    let stats = sandbox.stats().await;
    assert_eq!((stats.accepted, stats.recurring_accepted), (1, 1));
    assert_eq!(sandbox.messages("?psid=u1").await.len(), 1);

    sandbox.faults(json!({})).await;
    let retry = sandbox.send(PAGE_TOKEN, recurring_send(&token, "x")).await;
    assert_eq!(
        (retry.code(), retry.subcode()),
        (4, 2018354),
        "the accepted-then-failed message started the gap"
    );
}

#[tokio::test]
async fn one_time_and_standard_sends_are_unchanged_and_ledgered_with_their_kind() {
    let sandbox = Sandbox::start().await;
    let token = sandbox.optin(PAGE, "u1", "news").await;
    assert_eq!(
        sandbox
            .send(PAGE_TOKEN, token_send(&token, "x"))
            .await
            .status,
        200
    );
    let reuse = sandbox.send(PAGE_TOKEN, token_send(&token, "x")).await;
    assert_eq!(
        reuse.error_message(),
        "(#100) The one-time notification token is invalid, expired or already used"
    );
    sandbox.interact("u2", None).await;
    assert_eq!(
        sandbox
            .send(PAGE_TOKEN, standard_send("u2", json!({"text": "hi"})))
            .await
            .status,
        200
    );
    let raw: Value = sandbox.get_json("/__sandbox/messages").await;
    assert_eq!(raw["messages"][0]["token_kind"], "one_time");
    assert_eq!(raw["messages"][1]["token_kind"], Value::Null);
    assert!(
        raw["messages"][1]
            .as_object()
            .unwrap()
            .contains_key("token_kind")
    );
    let stats = sandbox.stats().await;
    assert_eq!(stats.token_presentations, 2);
    assert_eq!(stats.tokens_presented_more_than_once, 1);
    assert_eq!(
        (stats.recurring_presentations, stats.recurring_accepted),
        (0, 0)
    );
}

#[tokio::test]
async fn reset_forgets_recurring_tokens_gaps_and_counters() {
    let sandbox = Sandbox::start().await;
    sandbox
        .faults(json!({"enforce_recurring_gap": false, "recurring_cooldown_seconds": 5}))
        .await;
    let token = sandbox.recurring_optin(PAGE, "u1", "news").await;
    for _ in 0..2 {
        assert_eq!(
            sandbox
                .send(PAGE_TOKEN, recurring_send(&token, "x"))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        sandbox.stats().await.recipients_messaged_twice_within_gap,
        1
    );
    sandbox.admin("/__sandbox/reset", json!({})).await;
    assert_eq!(sandbox.stats().await, Stats::default());
    assert!(sandbox.messages("").await.is_empty());
    let faults: Value = sandbox.get_json("/__sandbox/faults").await;
    assert_eq!(faults["enforce_recurring_gap"], true);
    assert_eq!(faults["recurring_cooldown_seconds"], 172_800);
    sandbox.page(PAGE, PAGE_TOKEN, None).await;
    let gone = sandbox.send(PAGE_TOKEN, recurring_send(&token, "x")).await;
    assert_eq!(gone.code(), 100, "the token is forgotten");
    let (status, _) = sandbox
        .recurring_status(json!({"page_id": PAGE, "token": token, "status": "STOP"}))
        .await;
    assert_eq!(status, 404);
}
