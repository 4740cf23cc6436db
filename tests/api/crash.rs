//! The real `otnd` binary killed mid-send (SIGKILL) and started again on the same database: the
//! send finishes by itself with nobody messaged twice, nobody lost, and otnd's `sent` equal to
//! what the sandbox accepted; also with accept-then-fail faults, and after a SIGTERM drain.

use std::time::Duration;

use otnd::{
    pb::{
        CreatePageRequest, CreateStoryRequest, DeliveryState, GetSendRequest,
        ListDeliveriesRequest, PreviewStoryRequest, SendState, StartSendRequest, StoryContent,
        opt_in_service_client::OptInServiceClient, page_service_client::PageServiceClient,
        send_service_client::SendServiceClient, story_content::Kind,
        story_service_client::StoryServiceClient,
    },
    sandbox::{RunningSandbox, SandboxOptions},
};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{
    backend_tests,
    binary::{Served, json_field},
    helpers::{
        TestDatabase, eventually, page_access_token, page_app_secret, page_verify_token,
        test_master_key_base64,
    },
};

const PAGE: &str = "4242";
const TOPIC: &str = "Doors open";
const RECIPIENTS: u64 = 1500;

struct Harness {
    dir: tempfile::TempDir,
    sandbox: RunningSandbox,
    database_url: String,
}

impl Harness {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTN_DATABASE_URL", self.database_url.clone()),
            ("OTN_MASTER_KEY", test_master_key_base64()),
            ("OTN_GRAPH_URL", self.sandbox.url("")),
            ("OTN_GRPC_ADDR", "127.0.0.1:0".into()),
            ("OTN_HTTP_ADDR", "127.0.0.1:0".into()),
            ("OTN_LOG_FORMAT", "json".into()),
            ("OTN_GRAPH_TIMEOUT_SECONDS", "2".into()),
            ("RUST_LOG", "info".into()),
        ]
    }

    /// Starts the binary and connects to it.
    async fn start(&self) -> (Served, Channel, String) {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let served = Served::start(self.dir.path(), &env);
        let ready = served.wait_for_line("otnd ready", Duration::from_secs(30));
        let grpc = json_field(&ready, "grpc_addr");
        let http = json_field(&ready, "http_addr");
        let channel = Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        (served, channel, http)
    }

    async fn sandbox_post(&self, path: &str, body: Value) -> Value {
        let response = otnd::graph::http_client()
            .post(self.sandbox.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        response.json().await.unwrap()
    }

    async fn sandbox_get(&self, path: &str) -> Value {
        otnd::graph::http_client()
            .get(self.sandbox.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

async fn harness(db: &TestDatabase) -> Harness {
    let sandbox = RunningSandbox::start(SandboxOptions::default())
        .await
        .unwrap();
    Harness {
        dir: tempfile::tempdir().unwrap(),
        sandbox,
        database_url: db.url.clone(),
    }
}

/// Registers the page, opts everyone in, writes and reviews the story; returns its id.
async fn prepare(h: &Harness, channel: &Channel, http: &str) -> String {
    PageServiceClient::new(channel.clone())
        .create_page(CreatePageRequest {
            page_id: PAGE.into(),
            name: "Crash".into(),
            access_token: page_access_token(PAGE),
            app_secret: page_app_secret(PAGE),
            verify_token: page_verify_token(PAGE),
            send_rate_per_second: Some(300),
        })
        .await
        .unwrap();
    h.sandbox_post(
        "/__sandbox/pages",
        json!({"page_id": PAGE, "access_token": page_access_token(PAGE),
               "app_secret": page_app_secret(PAGE), "webhook_url": format!("http://{http}/webhook")}),
    )
    .await;
    h.sandbox_post(
        "/__sandbox/optins",
        json!({"page_id": PAGE, "psid_prefix": "c", "count": RECIPIENTS, "payload": TOPIC,
               "deliver_webhook": true}),
    )
    .await;
    let optins = OptInServiceClient::new(channel.clone());
    eventually(Duration::from_secs(30), "every opt-in stored", || {
        let mut optins = optins.clone();
        async move {
            let topics = optins
                .list_topics(otnd::pb::ListTopicsRequest {
                    page_id: PAGE.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .topics;
            topics
                .iter()
                .any(|t| t.topic == TOPIC && t.active == RECIPIENTS)
                .then_some(())
        }
    })
    .await;
    let mut stories = StoryServiceClient::new(channel.clone());
    let story = stories
        .create_story(CreateStoryRequest {
            page_id: PAGE.into(),
            topic: TOPIC.into(),
            content: Some(StoryContent {
                kind: Some(Kind::Text("The doors are open".into())),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .story
        .unwrap();
    h.sandbox_post(
        "/__sandbox/interactions",
        json!({"page_id": PAGE, "psid": "boss", "text": "ok", "deliver_webhook": false}),
    )
    .await;
    stories
        .preview_story(PreviewStoryRequest {
            story_id: story.story_id.clone(),
            reviewer_psid: "boss".into(),
        })
        .await
        .unwrap();
    story.story_id
}

async fn progress_of(channel: &Channel, send_id: &str) -> otnd::pb::Send {
    SendServiceClient::new(channel.clone())
        .get_send(GetSendRequest {
            send_id: send_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .send
        .unwrap()
}

async fn wait_until(
    channel: &Channel,
    send_id: &str,
    what: &str,
    done: impl Fn(&otnd::pb::Send) -> bool,
) {
    eventually(Duration::from_secs(90), what, || {
        let channel = channel.clone();
        let send_id = send_id.to_string();
        let done = &done;
        async move {
            let send = progress_of(&channel, &send_id).await;
            done(&send).then_some(())
        }
    })
    .await;
}

fn sent(send: &otnd::pb::Send) -> u64 {
    send.progress.as_ref().unwrap().sent
}

/// The judge: otnd's records against the sandbox's ledger.
async fn judge(h: &Harness, channel: &Channel, send_id: &str) {
    let send = progress_of(channel, send_id).await;
    let state = send.state();
    let p = send.progress.unwrap();
    assert_eq!(state, SendState::Completed, "{p:?}");
    assert_eq!(p.total, RECIPIENTS);
    assert_eq!((p.pending, p.in_flight, p.skipped), (0, 0, 0), "{p:?}");
    assert_eq!(
        p.sent + p.failed + p.unknown,
        RECIPIENTS,
        "nobody lost: {p:?}"
    );
    let stats = h.sandbox_get("/__sandbox/stats").await;
    assert_eq!(stats["recipients_with_duplicate_content"], 0, "{stats}");
    let messages = h
        .sandbox_get(&format!("/__sandbox/messages?page_id={PAGE}"))
        .await;
    let accepted: Vec<&Value> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["token"].is_string())
        .collect();
    assert_eq!(
        accepted.len() as u64,
        p.sent,
        "sent = the sandbox's accepted; {stats}"
    );
    // Every recipient otnd calls sent is one the sandbox accepted, and the other way round.
    let mut sent_psids = Vec::new();
    let mut token = String::new();
    loop {
        let page = SendServiceClient::new(channel.clone())
            .list_deliveries(ListDeliveriesRequest {
                send_id: send_id.into(),
                state: DeliveryState::Sent.into(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        sent_psids.extend(page.deliveries.into_iter().map(|d| d.psid));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut accepted_psids: Vec<String> = accepted
        .iter()
        .map(|m| m["psid"].as_str().unwrap().to_string())
        .collect();
    sent_psids.sort();
    accepted_psids.sort();
    assert_eq!(sent_psids, accepted_psids);
}

async fn crash_mid_send_and_finish(db: TestDatabase, faults: Value) {
    let h = harness(&db).await;
    let (mut served, channel, http) = h.start().await;
    let story_id = prepare(&h, &channel, &http).await;
    h.sandbox_post("/__sandbox/faults", faults).await;
    let send = SendServiceClient::new(channel.clone())
        .start_send(StartSendRequest {
            story_id,
            request_id: "crash".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .send
        .unwrap();
    wait_until(&channel, &send.send_id, "a third sent", |s| {
        sent(s) >= RECIPIENTS / 3
    })
    .await;
    served.kill();

    let (mut served, channel, _) = h.start().await;
    served.wait_for_line(
        "resuming the page's unfinished sends",
        Duration::from_secs(10),
    );
    // The kill left deliveries in flight (40 ms per call, up to 150 in flight): settled first.
    served.wait_for_line("settled by recovery", Duration::from_secs(10));
    wait_until(&channel, &send.send_id, "two thirds sent", |s| {
        sent(s) >= 2 * RECIPIENTS / 3
    })
    .await;
    // A second crash, this time from the other side of a restart.
    served.kill();

    let (mut served, channel, _) = h.start().await;
    wait_until(&channel, &send.send_id, "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    judge(&h, &channel, &send.send_id).await;
    let status = served.terminate(Duration::from_secs(15));
    assert!(status.success(), "{}", served.log());
}

backend_tests! {
    async fn a_send_killed_twice_finishes_with_nobody_twice_and_nobody_lost(db) {
        // Latency keeps deliveries in flight at the moment of the kill.
        crash_mid_send_and_finish(db, json!({"latency_ms": 40})).await;
    }

    async fn the_same_with_accept_then_fail_answers(db) {
        crash_mid_send_and_finish(db, json!({"latency_ms": 40, "accept_then_fail_rate": 0.1, "seed": 11})).await;
    }

    async fn sigterm_mid_send_drains_in_flight_deliveries_and_exits(db) {
        let h = harness(&db).await;
        let (mut served, channel, http) = h.start().await;
        let story_id = prepare(&h, &channel, &http).await;
        h.sandbox_post("/__sandbox/faults", json!({"latency_ms": 100})).await;
        let send = SendServiceClient::new(channel.clone())
            .start_send(StartSendRequest { story_id, request_id: "drain".into() })
            .await.unwrap().into_inner().send.unwrap();
        wait_until(&channel, &send.send_id, "some sent", |s| sent(s) >= 100).await;
        // The real binary's metrics, mid-send.
        let metrics = otnd::graph::http_client().get(format!("http://{http}/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), 200);
        let metrics = metrics.text().await.unwrap();
        for name in ["otnd_deliveries_total{outcome=\"sent\"}", "otnd_graph_call_seconds_bucket",
                     "otnd_deliveries_in_flight{page_id=\"4242\"}", "otnd_deliveries_pending{page_id=\"4242\"}"] {
            assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
        }
        let status = served.terminate(Duration::from_secs(15));
        assert!(status.success(), "{}", served.log());
        served.wait_for_line("every delivery in flight is recorded", Duration::from_secs(1));

        // Nothing was left in flight: the next start has nothing to recover.
        let (served, channel, _) = h.start().await;
        wait_until(&channel, &send.send_id, "the send to complete", |s| s.state() == SendState::Completed).await;
        judge(&h, &channel, &send.send_id).await;
        assert!(!served.log().contains("settled by recovery"), "{}", served.log());
        let p = progress_of(&channel, &send.send_id).await.progress.unwrap();
        assert_eq!((p.sent, p.unknown), (RECIPIENTS, 0));
    }
}
