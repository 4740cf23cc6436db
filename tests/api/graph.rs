//! otnd's Graph client over real HTTP against the sandbox: each kind of send, batches with
//! per-item results and null items, and every transport failure classified.

use std::time::Duration;

use graph_sandbox::{RunningSandbox, SandboxOptions};
use otnd::{
    domain::PageCredentials,
    graph::{BatchSend, Class, GraphClient, Recipient},
};
use otnd_testkit::Sandbox;
use secrecy::SecretString;
use serde_json::{Value, json};

const PAGE: &str = "100";

struct Setup {
    sandbox: RunningSandbox,
    client: GraphClient,
    credentials: PageCredentials,
}

async fn setup(timeout: Duration) -> Setup {
    let sandbox = RunningSandbox::start(SandboxOptions::default())
        .await
        .unwrap();
    Sandbox::new(sandbox.url(""))
        .post(
            "/__sandbox/pages",
            json!({"page_id": PAGE, "access_token": "EAAB-100", "app_secret": "secret-100"}),
        )
        .await;
    let base = url::Url::parse(&sandbox.url("")).unwrap();
    Setup {
        client: GraphClient::new(&base, "v24.0", timeout).unwrap(),
        credentials: credentials("EAAB-100"),
        sandbox,
    }
}

fn credentials(access_token: &str) -> PageCredentials {
    PageCredentials {
        access_token: SecretString::from(access_token.to_string()),
        app_secret: SecretString::from("secret-100".to_string()),
        verify_token: None,
    }
}

impl Setup {
    async fn admin(&self, path: &str, body: Value) -> Value {
        Sandbox::new(self.sandbox.url("")).post(path, body).await
    }

    /// A token send expected to fail, with `faults` set first.
    async fn failing_send(&self, faults: Value, token: &str) -> otnd::graph::Failure {
        self.admin("/__sandbox/faults", faults).await;
        self.client
            .send(
                &self.credentials,
                Recipient::Token(token),
                &json!({"text": "x"}),
            )
            .await
            .unwrap_err()
    }

    async fn token(&self, psid: &str) -> String {
        let answer = self
            .admin(
                "/__sandbox/optins",
                json!({"page_id": PAGE, "psid": psid, "payload": "t"}),
            )
            .await;
        answer["token"].as_str().unwrap().to_string()
    }
}

#[tokio::test]
async fn token_and_standard_sends_with_appsecret_proof() {
    let setup = setup(Duration::from_secs(5)).await;
    let token = setup.token("u1").await;
    let message = json!({"text": "Tickets are on sale"});
    let sent = setup
        .client
        .send(&setup.credentials, Recipient::Token(&token), &message)
        .await
        .unwrap();
    assert!(sent.message_id.starts_with("m_"));
    assert_eq!(sent.recipient_id.as_deref(), Some("u1"));

    let spent = setup
        .client
        .send(&setup.credentials, Recipient::Token(&token), &message)
        .await
        .unwrap_err();
    assert_eq!(spent.class, Class::RecipientPermanent);
    assert!(spent.is_token_spent(otnd::graph::SendKind::Token));

    // u1 opted in moments ago, so a standard message is inside the window.
    setup
        .client
        .send(&setup.credentials, Recipient::Psid("u1"), &message)
        .await
        .unwrap();
    let stranger = setup
        .client
        .send(&setup.credentials, Recipient::Psid("nobody"), &message)
        .await
        .unwrap_err();
    assert_eq!(
        (stranger.error.code, stranger.error.subcode),
        (100, Some(2018001))
    );

    let revoked = setup
        .client
        .send(
            &credentials("EAAB-revoked"),
            Recipient::Psid("u1"),
            &message,
        )
        .await
        .unwrap_err();
    assert_eq!(revoked.class, Class::PagePermanent);
    assert_eq!(revoked.error.code, 190);
}

#[tokio::test]
async fn batches_give_one_result_per_item_in_order() {
    let setup = setup(Duration::from_secs(5)).await;
    let (a, b) = (setup.token("u1").await, setup.token("u2").await);
    let message = json!({"text": "hello"});
    let sends = [
        BatchSend {
            recipient: Recipient::Token(&a),
            message: &message,
        },
        BatchSend {
            recipient: Recipient::Token(&b),
            message: &message,
        },
        BatchSend {
            recipient: Recipient::Token(&a),
            message: &message,
        },
    ];
    let results = setup
        .client
        .send_batch(&setup.credentials, &sends)
        .await
        .0
        .unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(
        results[0].as_ref().unwrap().recipient_id.as_deref(),
        Some("u1")
    );
    assert_eq!(
        results[1].as_ref().unwrap().recipient_id.as_deref(),
        Some("u2")
    );
    assert!(
        results[2]
            .as_ref()
            .unwrap_err()
            .is_token_spent(otnd::graph::SendKind::Token)
    );

    // Items the batch did not finish come back null: ambiguous, never "failed".
    setup
        .admin("/__sandbox/faults", json!({"reset_rate": 1.0}))
        .await;
    let c = setup.token("u3").await;
    let sends = [BatchSend {
        recipient: Recipient::Token(&c),
        message: &message,
    }];
    let results = setup
        .client
        .send_batch(&setup.credentials, &sends)
        .await
        .0
        .unwrap();
    assert_eq!(
        results[0].as_ref().unwrap_err().class,
        Class::Transient { ambiguous: true }
    );
}

#[tokio::test]
async fn throttling_carries_the_wait_the_usage_header_asks_for() {
    let setup = setup(Duration::from_secs(5)).await;
    setup
        .admin(
            "/__sandbox/faults",
            json!({"throttle_rate": 1.0, "throttle_regain_minutes": 2}),
        )
        .await;
    let failure = setup
        .client
        .send(
            &setup.credentials,
            Recipient::Psid("u1"),
            &json!({"text": "x"}),
        )
        .await
        .unwrap_err();
    assert_eq!(
        failure.class,
        Class::Throttled {
            regain: Some(Duration::from_secs(120))
        }
    );
}

#[tokio::test]
async fn transport_failures_say_whether_the_send_may_have_landed() {
    let setup = setup(Duration::from_millis(300)).await;
    let token = setup.token("u1").await;
    let message = json!({"text": "x"});

    let timeout = setup
        .failing_send(
            json!({"timeout_rate": 1.0, "timeout_hold_ms": 3000}),
            &token,
        )
        .await;
    assert_eq!(
        timeout.class,
        Class::Transient { ambiguous: true },
        "{timeout}"
    );
    let reset = setup.failing_send(json!({"reset_rate": 1.0}), &token).await;
    assert_eq!(reset.class, Class::Transient { ambiguous: true }, "{reset}");
    let maybe = setup
        .failing_send(json!({"accept_then_fail_rate": 1.0}), &token)
        .await;
    assert_eq!(maybe.class, Class::Transient { ambiguous: true }, "{maybe}");

    // Nothing listens on port 9: the request never left, so it did not land.
    let nowhere = GraphClient::new(
        &url::Url::parse("http://127.0.0.1:9").unwrap(),
        "v24.0",
        Duration::from_secs(2),
    )
    .unwrap();
    let refused = nowhere
        .send(&setup.credentials, Recipient::Token(&token), &message)
        .await
        .unwrap_err();
    assert_eq!(
        refused.class,
        Class::Transient { ambiguous: false },
        "{refused}"
    );
}

/// What a Graph server saw of otnd's requests: each request's path and query, and its body.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// A Graph stand-in that records every request and answers each like an accepted send (a batch
/// gets one accepted item per request item).
async fn recording_graph() -> (String, Seen) {
    use axum::{Router, extract::State, http::Uri, routing::post};
    let seen: Seen = Seen::default();
    async fn record(State(seen): State<Seen>, uri: Uri, body: String) -> String {
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let items = body["batch"].as_array().map(Vec::len);
        seen.lock().unwrap().push((uri.to_string(), body));
        let sent = json!({"recipient_id": "1", "message_id": "m"});
        match items {
            Some(n) => Value::Array(vec![json!({"code": 200, "body": sent.to_string()}); n]),
            None => sent,
        }
        .to_string()
    }
    let app = Router::new()
        .route("/{*path}", post(record))
        .route("/", post(record))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn credentials_travel_in_the_body_and_never_in_a_url() {
    let (url, seen) = recording_graph().await;
    let client = GraphClient::new(
        &url::Url::parse(&url).unwrap(),
        "v24.0",
        Duration::from_secs(5),
    )
    .unwrap();
    let credentials = credentials("EAAB-100");
    let message = json!({"text": "x"});
    client
        .send(&credentials, Recipient::Token("tok"), &message)
        .await
        .unwrap();
    client
        .send_optin_request(
            &credentials,
            "u1",
            &otnd::graph::OptInTemplate::OneTime {
                title: "Title",
                topic: "topic",
            },
        )
        .await
        .unwrap();
    let items = [
        BatchSend {
            recipient: Recipient::Psid("u1"),
            message: &message,
        },
        BatchSend {
            recipient: Recipient::Token("tok"),
            message: &message,
        },
    ];
    client.send_batch(&credentials, &items).await.0.unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    let proof = otnd::graph::appsecret_proof("secret-100", "EAAB-100");
    for (uri, body) in seen.iter() {
        assert!(
            !uri.contains("EAAB-100") && !uri.contains(&proof) && !uri.contains('?'),
            "{uri}"
        );
        assert_eq!(body["access_token"], "EAAB-100", "{body}");
        assert_eq!(body["appsecret_proof"], proof.as_str(), "{body}");
    }
}
