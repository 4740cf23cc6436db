//! The real `otnd` binary against the sandbox, judged mechanically by the sandbox's ledger (the
//! Jepsen set-checker idea: every recipient ends in exactly one terminal state, and otnd's `sent`
//! is exactly the set of recipients Facebook accepted; nobody lost, nobody twice).

use std::time::Duration;

use graph_sandbox::{RunningSandbox, SandboxOptions};
use otnd::pb::{
    CreatePageRequest, CreateStoryRequest, DeliveryState, GetSendRequest, GetSubscriberRequest,
    ListDeliveriesRequest, PreviewStoryRequest, SendProgress, SendState, StartSendRequest,
    StoryContent, audience_service_client::AudienceServiceClient,
    opt_in_service_client::OptInServiceClient, page_service_client::PageServiceClient,
    send_service_client::SendServiceClient, story_content::Kind,
    story_service_client::StoryServiceClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{
    binary::{Served, json_field},
    helpers::{
        TestDatabase, eventually, page_access_token, page_app_secret, page_verify_token,
        test_master_key_base64,
    },
};

pub(crate) const PAGE: &str = "4242";
pub(crate) const TOPIC: &str = "Doors open";

/// One sandbox, one database, one working directory: `otnd` may be started on them many times.
pub(crate) struct Harness {
    dir: tempfile::TempDir,
    pub(crate) sandbox: RunningSandbox,
    pub(crate) database_url: String,
    pub(crate) recipients: u64,
    env: Vec<(&'static str, String)>,
}

/// A running `otnd` and a channel to it.
pub(crate) struct Node {
    pub(crate) served: Served,
    pub(crate) channel: Channel,
    pub(crate) http: String,
}

impl Node {
    /// The instance's `/metrics` text (asserting it answers 200).
    pub(crate) async fn metrics(&self) -> String {
        let answer = otnd::graph::http_client()
            .get(format!("http://{}/metrics", self.http))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        answer.text().await.unwrap()
    }
}

impl Harness {
    pub(crate) async fn new(db: &TestDatabase, recipients: u64) -> Self {
        let sandbox = RunningSandbox::start(SandboxOptions::default())
            .await
            .unwrap();
        Harness {
            dir: tempfile::tempdir().unwrap(),
            sandbox,
            database_url: db.url.clone(),
            recipients,
            env: Vec::new(),
        }
    }

    /// An extra (or overriding) environment variable for every start.
    pub(crate) fn with_env(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.env.push((name, value.into()));
        self
    }

    fn env(&self, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("OTN_DATABASE_URL", self.database_url.clone()),
            ("OTN_MASTER_KEY", test_master_key_base64()),
            ("OTN_GRAPH_URL", self.sandbox.url("")),
            ("OTN_GRPC_ADDR", "127.0.0.1:0".into()),
            ("OTN_HTTP_ADDR", "127.0.0.1:0".into()),
            ("OTN_LOG_FORMAT", "json".into()),
            ("OTN_GRAPH_TIMEOUT_SECONDS", "2".into()),
            // A restart is the same instance: it takes its pages back without waiting for
            // their leases to expire (PostgreSQL; SQLite's single instance always does).
            ("OTN_INSTANCE_ID", "faults".into()),
            ("RUST_LOG", "info".into()),
        ];
        env.extend(self.env.iter().cloned());
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        env
    }

    /// Starts the binary and connects to it.
    pub(crate) async fn start(&self) -> Node {
        self.start_with(&[]).await
    }

    pub(crate) async fn start_with(&self, extra: &[(&'static str, &str)]) -> Node {
        let env = self.env(extra);
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
        Node {
            served,
            channel,
            http,
        }
    }

    pub(crate) async fn sandbox_post(&self, path: &str, body: Value) -> Value {
        let response = otnd::graph::http_client()
            .post(self.sandbox.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    pub(crate) async fn sandbox_get(&self, path: &str) -> Value {
        otnd::graph::http_client()
            .get(self.sandbox.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub(crate) async fn faults(&self, faults: Value) {
        self.sandbox_post("/__sandbox/faults", faults).await;
    }

    /// Registers the page at `rate` per second, opts every recipient in through the signed
    /// webhook, writes and reviews a story; returns its id.
    pub(crate) async fn prepare(&self, node: &Node, rate: u32) -> String {
        self.prepare_page(node, PAGE, rate).await
    }

    /// `prepare` for any page.
    pub(crate) async fn prepare_page(&self, node: &Node, page: &str, rate: u32) -> String {
        PageServiceClient::new(node.channel.clone())
            .create_page(CreatePageRequest {
                page_id: page.into(),
                name: "Faults".into(),
                access_token: page_access_token(page),
                app_secret: page_app_secret(page),
                verify_token: page_verify_token(page),
                send_rate_per_second: Some(rate),
            })
            .await
            .unwrap();
        self.sandbox_post(
            "/__sandbox/pages",
            json!({"page_id": page, "access_token": page_access_token(page),
                   "app_secret": page_app_secret(page),
                   "webhook_url": format!("http://{}/webhook", node.http)}),
        )
        .await;
        self.opt_in_page(node, page, "c", self.recipients, None)
            .await;
        self.story_page(node, page, "The doors are open").await
    }

    /// Opts `count` users (`{prefix}{n}`) of `page` in on the topic and waits until otnd
    /// stored them all.
    pub(crate) async fn opt_in_page(
        &self,
        node: &Node,
        page: &str,
        prefix: &str,
        count: u64,
        expires_in_seconds: Option<i64>,
    ) {
        let before = self.active(node, page).await;
        let mut body = json!({"page_id": page, "psid_prefix": prefix, "count": count,
                              "payload": TOPIC, "deliver_webhook": true});
        if let Some(seconds) = expires_in_seconds {
            body["expires_in_seconds"] = json!(seconds);
        }
        self.sandbox_post("/__sandbox/optins", body).await;
        let optins = OptInServiceClient::new(node.channel.clone());
        eventually(Duration::from_secs(60), "every opt-in stored", || {
            let mut optins = optins.clone();
            async move {
                let topics = optins
                    .list_topics(otnd::pb::ListTopicsRequest {
                        page_id: page.into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .topics;
                topics
                    .iter()
                    .any(|t| t.topic == TOPIC && t.active >= before + count)
                    .then_some(())
            }
        })
        .await;
    }

    async fn active(&self, node: &Node, page: &str) -> u64 {
        OptInServiceClient::new(node.channel.clone())
            .list_topics(otnd::pb::ListTopicsRequest {
                page_id: page.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .topics
            .iter()
            .find(|t| t.topic == TOPIC)
            .map_or(0, |t| t.active)
    }

    /// A reviewed text story on the topic.
    pub(crate) async fn story(&self, node: &Node, text: &str) -> String {
        self.story_page(node, PAGE, text).await
    }

    pub(crate) async fn story_page(&self, node: &Node, page: &str, text: &str) -> String {
        self.reviewed_story(
            node,
            StorySpec {
                page,
                text,
                ..StorySpec::default()
            },
        )
        .await
    }

    /// A story as `spec` says, reviewed (the reviewer is brought inside the window first,
    /// through the sandbox only: otnd does not hear of it).
    pub(crate) async fn reviewed_story(&self, node: &Node, spec: StorySpec<'_>) -> String {
        let mut stories = StoryServiceClient::new(node.channel.clone());
        let story = stories
            .create_story(CreateStoryRequest {
                page_id: spec.page.into(),
                topic: spec.topic.into(),
                content: Some(StoryContent {
                    kind: Some(Kind::Text(spec.text.into())),
                }),
                include_window_users: spec.window,
                segment_id: spec.segment_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .story
            .unwrap();
        self.sandbox_post(
            "/__sandbox/interactions",
            json!({"page_id": spec.page, "psid": spec.reviewer, "text": "ok",
                   "deliver_webhook": false}),
        )
        .await;
        stories
            .preview_story(PreviewStoryRequest {
                story_id: story.story_id.clone(),
                reviewer_psid: spec.reviewer.into(),
            })
            .await
            .unwrap();
        story.story_id
    }

    /// `count` users `{prefix}{n}` of `page` write to it (the signed webhook reaches otnd):
    /// inside the window. Waits until otnd knows every one (the sandbox delivers each
    /// interaction's webhook on its own, in no particular order).
    pub(crate) async fn window_users(&self, node: &Node, page: &str, prefix: &str, count: u64) {
        for k in 0..count {
            self.sandbox_post(
                "/__sandbox/interactions",
                json!({"page_id": page, "psid": format!("{prefix}{k}"), "text": "hi",
                       "deliver_webhook": true}),
            )
            .await;
        }
        let audience = AudienceServiceClient::new(node.channel.clone());
        eventually(Duration::from_secs(30), "the window users stored", || {
            let mut audience = audience.clone();
            async move {
                for k in 0..count {
                    let subscriber = audience
                        .get_subscriber(GetSubscriberRequest {
                            page_id: page.into(),
                            psid: format!("{prefix}{k}"),
                        })
                        .await
                        .ok()?
                        .into_inner()
                        .subscriber?;
                    if !subscriber.window_open {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
    }
}

/// What [`Harness::reviewed_story`] makes: a text story on the topic, by default reviewed by
/// `boss`, without window users or segment.
pub(crate) struct StorySpec<'a> {
    pub(crate) page: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) text: &'a str,
    pub(crate) window: bool,
    pub(crate) segment_id: &'a str,
    pub(crate) reviewer: &'a str,
}

impl Default for StorySpec<'_> {
    fn default() -> Self {
        StorySpec {
            page: PAGE,
            topic: TOPIC,
            text: "The doors are open",
            window: false,
            segment_id: "",
            reviewer: "boss",
        }
    }
}

pub(crate) async fn start_send(channel: &Channel, story_id: &str, request_id: &str) -> String {
    SendServiceClient::new(channel.clone())
        .start_send(StartSendRequest {
            story_id: story_id.into(),
            request_id: request_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .send
        .unwrap()
        .send_id
}

pub(crate) async fn progress_of(channel: &Channel, send_id: &str) -> otnd::pb::Send {
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

pub(crate) async fn wait_until(
    channel: &Channel,
    send_id: &str,
    what: &str,
    done: impl Fn(&otnd::pb::Send) -> bool,
) {
    eventually(Duration::from_secs(120), what, || {
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

pub(crate) fn sent(send: &otnd::pb::Send) -> u64 {
    send.progress.as_ref().unwrap().sent
}

/// The psids of the send's deliveries in `state`, sorted.
pub(crate) async fn psids_in(
    channel: &Channel,
    send_id: &str,
    state: DeliveryState,
) -> Vec<String> {
    let mut psids = Vec::new();
    let mut token = String::new();
    loop {
        let page = SendServiceClient::new(channel.clone())
            .list_deliveries(ListDeliveriesRequest {
                send_id: send_id.into(),
                state: state.into(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        psids.extend(page.deliveries.into_iter().map(|d| d.psid));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    psids.sort();
    psids
}

/// The judge, for a send that has ended: every recipient in exactly one terminal state; no
/// recipient messaged twice and no token accepted twice at the sandbox; otnd's `sent` is exactly
/// the set of recipients whose token the sandbox accepted. Returns the final progress.
pub(crate) async fn judge(h: &Harness, channel: &Channel, send_id: &str) -> SendProgress {
    judge_page(h, channel, send_id, PAGE).await
}

/// [`judge`] for a send of any page.
pub(crate) async fn judge_page(
    h: &Harness,
    channel: &Channel,
    send_id: &str,
    page: &str,
) -> SendProgress {
    let send = progress_of(channel, send_id).await;
    let state = send.state();
    let p = send.progress.unwrap();
    assert_eq!(state, SendState::Completed, "{p:?}");
    assert_eq!((p.pending, p.in_flight), (0, 0), "nothing left over: {p:?}");
    assert_eq!(
        p.sent + p.failed + p.unknown + p.skipped,
        p.total,
        "every recipient in one terminal state: {p:?}"
    );
    let stats = h.sandbox_get("/__sandbox/stats").await;
    assert_eq!(stats["recipients_with_duplicate_content"], 0, "{stats}");
    assert_eq!(stats["tokens_accepted_more_than_once"], 0, "{stats}");
    assert!(
        stats["rejected_by_reason"].get("token_expired").is_none(),
        "an expired token was presented: {stats}"
    );
    let messages = h
        .sandbox_get(&format!("/__sandbox/messages?page_id={page}"))
        .await;
    let mut accepted: Vec<String> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["token"].is_string())
        .map(|m| m["psid"].as_str().unwrap().to_string())
        .collect();
    accepted.sort();
    let sent_psids = psids_in(channel, send_id, DeliveryState::Sent).await;
    assert_eq!(sent_psids.len() as u64, p.sent, "{p:?}");
    assert!(
        sent_psids == accepted,
        "otnd's sent ({}) differs from the sandbox's accepted ({}); {stats}",
        sent_psids.len(),
        accepted.len()
    );
    p
}

/// Resident set of a process, in MiB.
pub(crate) fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}
