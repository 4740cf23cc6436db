//! What otnd's tests and benchmarks share, each used as a client would: a page registered in otnd
//! and the sandbox, opt-ins through signed webhooks, a reviewed story, a started send, the
//! sandbox's admin surface, and the judge of exactly-once. Everything goes through the public
//! surfaces (otnd's gRPC API, the sandbox's HTTP admin), and the judge reads the sandbox with the
//! sandbox's own HTTP client: nothing here depends on otnd's internals.

use std::time::{Duration, Instant};

use otnd::pb::{
    CreatePageRequest, CreateSegmentRequest, CreateStoryRequest, Delivery, DeliveryState,
    GetSendRequest, ListDeliveriesRequest, ListTopicsRequest, PreviewStoryRequest, SegmentRule,
    SendProgress, SendState, StartSendRequest, StoryContent,
    audience_service_client::AudienceServiceClient, opt_in_service_client::OptInServiceClient,
    page_service_client::PageServiceClient, send_service_client::SendServiceClient,
    story_content::Kind, story_service_client::StoryServiceClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// The page most tests and benchmarks use, and the topic its users opt in to.
pub const PAGE: &str = "4242";
pub const TOPIC: &str = "Doors open";

/// The secrets a page is registered with, in otnd and in the sandbox alike.
pub fn page_access_token(page_id: &str) -> String {
    format!("EAAB-test-{page_id}")
}
pub fn page_app_secret(page_id: &str) -> String {
    format!("app-secret-{page_id}")
}
pub fn page_verify_token(page_id: &str) -> String {
    format!("verify-{page_id}")
}

/// Polls `check` until it returns `Some`, or fails after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sandbox's admin surface (`/__sandbox/...`), over the sandbox's own HTTP client.
#[derive(Clone)]
pub struct Sandbox {
    base: String,
    http: reqwest::Client,
}

impl Sandbox {
    /// The sandbox at `base` (`http://host:port`, no trailing slash).
    pub fn new(base: impl Into<String>) -> Self {
        Sandbox {
            base: base.into().trim_end_matches('/').to_string(),
            http: graph_sandbox::http_client_builder()
                .build()
                .expect("an HTTP client with default settings builds"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GETs JSON; fails unless the sandbox answers 2xx.
    pub async fn get(&self, path: &str) -> Value {
        let response = self.http.get(self.url(path)).send().await;
        Self::json(path, response).await
    }

    /// POSTs JSON; fails unless the sandbox answers 2xx.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let response = self.http.post(self.url(path)).json(&body).send().await;
        Self::json(path, response).await
    }

    async fn json(path: &str, response: reqwest::Result<reqwest::Response>) -> Value {
        let response = response.unwrap_or_else(|e| panic!("sandbox {path}: {e}"));
        let status = response.status();
        let body = response.text().await.expect("the sandbox's answer");
        assert!(status.is_success(), "sandbox {path}: {status} {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("sandbox {path}: {e}: {body}"))
    }

    pub async fn stats(&self) -> Value {
        self.get("/__sandbox/stats").await
    }

    pub async fn faults(&self, faults: Value) {
        self.post("/__sandbox/faults", faults).await;
    }

    /// The page in the sandbox, with the test secrets, its webhooks going to `webhook_url`.
    pub async fn register_page(&self, page: &str, webhook_url: &str) {
        self.post(
            "/__sandbox/pages",
            json!({"page_id": page, "access_token": page_access_token(page),
                   "app_secret": page_app_secret(page), "webhook_url": webhook_url}),
        )
        .await;
    }

    /// `count` users `{prefix}{n}` of the page opt in to `topic`; each opt-in's signed webhook
    /// goes to otnd. `expires_in_seconds`: the tokens' lifetime (default a year).
    pub async fn opt_in(
        &self,
        page: &str,
        topic: &str,
        prefix: &str,
        count: u64,
        expires_in_seconds: Option<i64>,
    ) {
        let mut body = json!({"page_id": page, "psid_prefix": prefix, "count": count,
                              "payload": topic, "deliver_webhook": true});
        if let Some(seconds) = expires_in_seconds {
            body["expires_in_seconds"] = json!(seconds);
        }
        self.post("/__sandbox/optins", body).await;
    }

    /// `count` users `{prefix}{n}` of the page subscribe to recurring notifications on `topic`
    /// (tokens without an expiry); each opt-in's signed webhook goes to otnd. The tokens.
    pub async fn opt_in_recurring(
        &self,
        page: &str,
        topic: &str,
        prefix: &str,
        count: u64,
    ) -> Vec<String> {
        let answer = self
            .post(
                "/__sandbox/optins",
                json!({"page_id": page, "psid_prefix": prefix, "count": count,
                       "payload": topic, "kind": "recurring", "deliver_webhook": true}),
            )
            .await;
        answer["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_str().expect("a token").to_string())
            .collect()
    }

    /// The user writes to the page, which opens their 24-hour window; otnd hears of it only
    /// with `deliver_webhook`.
    pub async fn interact(&self, page: &str, psid: &str, deliver_webhook: bool) {
        self.post(
            "/__sandbox/interactions",
            json!({"page_id": page, "psid": psid, "text": "hi",
                   "deliver_webhook": deliver_webhook}),
        )
        .await;
    }

    /// The psids the sandbox accepted a token message for on the page, sorted.
    pub async fn token_recipients(&self, page: &str) -> Vec<String> {
        let messages = self
            .get(&format!("/__sandbox/messages?page_id={page}"))
            .await;
        let mut psids: Vec<String> = messages["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["token"].is_string())
            .map(|m| m["psid"].as_str().expect("a psid").to_string())
            .collect();
        psids.sort();
        psids
    }
}

/// Registers the page in otnd (`rate`: its send rate, `None` for the default) and in the
/// sandbox, whose webhooks then go to otnd's `http_addr`.
pub async fn register_page(
    channel: &Channel,
    sandbox: &Sandbox,
    http_addr: &str,
    page: &str,
    rate: Option<u32>,
) {
    PageServiceClient::new(channel.clone())
        .create_page(CreatePageRequest {
            page_id: page.into(),
            name: format!("Page {page}"),
            access_token: page_access_token(page),
            app_secret: page_app_secret(page),
            verify_token: page_verify_token(page),
            send_rate_per_second: rate,
        })
        .await
        .expect("CreatePage");
    sandbox
        .register_page(page, &format!("http://{http_addr}/webhook"))
        .await;
}

/// The active opt-ins otnd holds on the page's topic.
pub async fn active_opt_ins(channel: &Channel, page: &str, topic: &str) -> u64 {
    OptInServiceClient::new(channel.clone())
        .list_topics(ListTopicsRequest {
            page_id: page.into(),
        })
        .await
        .expect("ListTopics")
        .into_inner()
        .topics
        .iter()
        .find(|t| t.topic == topic)
        .map_or(0, |t| t.active)
}

/// Waits until otnd holds exactly `count` active opt-ins on the page's topic (more fails).
pub async fn wait_for_opt_ins(
    channel: &Channel,
    page: &str,
    topic: &str,
    count: u64,
    deadline: Duration,
) {
    eventually(
        deadline,
        &format!("{count} opt-ins on {topic:?}"),
        || async move {
            let active = active_opt_ins(channel, page, topic).await;
            assert!(
                active <= count,
                "more active opt-ins ({active}) than expected ({count})"
            );
            (active == count).then_some(())
        },
    )
    .await;
}

/// `count` users `{prefix}{n}` of the page opt in to `topic` through the sandbox's signed
/// webhooks (tokens valid for `expires_in_seconds`, default a year); returns once otnd holds at
/// least `count` more active opt-ins than before. At least: a send running meanwhile may hand
/// opt-ins back (a cancel, an answer that proves nothing was sent).
pub async fn opt_in_users(
    channel: &Channel,
    sandbox: &Sandbox,
    page: &str,
    topic: &str,
    prefix: &str,
    count: u64,
    expires_in_seconds: Option<i64>,
) {
    let before = active_opt_ins(channel, page, topic).await;
    sandbox
        .opt_in(page, topic, prefix, count, expires_in_seconds)
        .await;
    let wanted = before + count;
    eventually(
        OPT_INS_ARRIVE_WITHIN,
        &format!("{wanted} opt-ins on {topic:?}"),
        || async move { (active_opt_ins(channel, page, topic).await >= wanted).then_some(()) },
    )
    .await;
}

/// How long opt-ins delivered by webhook may take to be stored (thousands, on a busy machine).
const OPT_INS_ARRIVE_WITHIN: Duration = Duration::from_secs(60);

/// A segment of the page's subscribers by `rule`; its id.
pub async fn create_segment(
    channel: &Channel,
    page: &str,
    name: &str,
    rule: SegmentRule,
) -> String {
    AudienceServiceClient::new(channel.clone())
        .create_segment(CreateSegmentRequest {
            page_id: page.into(),
            name: name.into(),
            rule: Some(rule),
        })
        .await
        .expect("CreateSegment")
        .into_inner()
        .segment
        .expect("a segment")
        .segment_id
}

/// What [`reviewed_story`] makes: a text story on the topic, by default reviewed by `boss`,
/// without window users or segment.
#[derive(Clone, Copy, Debug)]
pub struct StorySpec<'a> {
    pub page: &'a str,
    pub topic: &'a str,
    pub text: &'a str,
    pub window: bool,
    pub segment_id: &'a str,
    pub reviewer: &'a str,
    /// The story's token kinds (`otn.v1.TokenKind` values); every kind when empty.
    pub token_kinds: &'a [i32],
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
            token_kinds: &[],
        }
    }
}

/// A story as `spec` says, reviewed: the reviewer is brought inside the window through the
/// sandbox only (otnd does not hear of it), then PreviewStory sends it to them. Its id.
pub async fn reviewed_story(channel: &Channel, sandbox: &Sandbox, spec: StorySpec<'_>) -> String {
    let mut stories = StoryServiceClient::new(channel.clone());
    let story = stories
        .create_story(CreateStoryRequest {
            page_id: spec.page.into(),
            topic: spec.topic.into(),
            content: Some(StoryContent {
                kind: Some(Kind::Text(spec.text.into())),
            }),
            include_window_users: spec.window,
            segment_id: spec.segment_id.into(),
            token_kinds: spec.token_kinds.to_vec(),
        })
        .await
        .expect("CreateStory")
        .into_inner()
        .story
        .expect("a story");
    sandbox.interact(spec.page, spec.reviewer, false).await;
    stories
        .preview_story(PreviewStoryRequest {
            story_id: story.story_id.clone(),
            reviewer_psid: spec.reviewer.into(),
        })
        .await
        .expect("PreviewStory");
    story.story_id
}

pub async fn start_send(channel: &Channel, story_id: &str, request_id: &str) -> otnd::pb::Send {
    SendServiceClient::new(channel.clone())
        .start_send(StartSendRequest {
            story_id: story_id.into(),
            request_id: request_id.into(),
        })
        .await
        .expect("StartSend")
        .into_inner()
        .send
        .expect("a send")
}

pub async fn get_send(channel: &Channel, send_id: &str) -> otnd::pb::Send {
    SendServiceClient::new(channel.clone())
        .get_send(GetSendRequest {
            send_id: send_id.into(),
        })
        .await
        .expect("GetSend")
        .into_inner()
        .send
        .expect("a send")
}

/// Waits (at most `deadline`) until the send is as `done` wants it; the send then.
pub async fn wait_for_send(
    channel: &Channel,
    send_id: &str,
    what: &str,
    deadline: Duration,
    done: impl Fn(&otnd::pb::Send) -> bool,
) -> otnd::pb::Send {
    let done = &done;
    eventually(deadline, what, || async move {
        let send = get_send(channel, send_id).await;
        done(&send).then_some(send)
    })
    .await
}

/// The send's deliveries in `state` (every state: `Unspecified`), read page by page.
pub async fn deliveries(channel: &Channel, send_id: &str, state: DeliveryState) -> Vec<Delivery> {
    let mut all = Vec::new();
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
            .expect("ListDeliveries")
            .into_inner();
        all.extend(page.deliveries);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

/// The psids of the send's deliveries in `state`, sorted.
pub async fn psids_in(channel: &Channel, send_id: &str, state: DeliveryState) -> Vec<String> {
    let mut psids: Vec<String> = deliveries(channel, send_id, state)
        .await
        .into_iter()
        .map(|d| d.psid)
        .collect();
    psids.sort();
    psids
}

/// The judge, for a send of `page` that has ended (the Jepsen set-checker idea): every recipient
/// in exactly one terminal state; no recipient messaged twice and no token accepted twice at the
/// sandbox; no expired token presented; otnd's `sent` is exactly the set of recipients whose
/// token the sandbox accepted on the page. The final progress.
pub async fn judge(
    channel: &Channel,
    sandbox: &Sandbox,
    send_id: &str,
    page: &str,
) -> SendProgress {
    let send = get_send(channel, send_id).await;
    let state = send.state();
    let p = send.progress.expect("progress");
    assert_eq!(state, SendState::Completed, "{p:?}");
    assert_eq!((p.pending, p.in_flight), (0, 0), "nothing left over: {p:?}");
    assert_eq!(
        p.sent + p.failed + p.unknown + p.skipped,
        p.total,
        "every recipient in one terminal state: {p:?}"
    );
    let stats = sandbox.stats().await;
    assert_eq!(stats["recipients_with_duplicate_content"], 0, "{stats}");
    assert_eq!(stats["tokens_accepted_more_than_once"], 0, "{stats}");
    assert_eq!(stats["recipients_messaged_twice_within_gap"], 0, "{stats}");
    assert!(
        stats["rejected_by_reason"].get("token_expired").is_none(),
        "an expired token was presented: {stats}"
    );
    let accepted = sandbox.token_recipients(page).await;
    let sent = psids_in(channel, send_id, DeliveryState::Sent).await;
    assert_eq!(sent.len() as u64, p.sent, "{p:?}");
    assert!(
        sent == accepted,
        "otnd's sent ({}) differs from the sandbox's accepted ({}); {stats}",
        sent.len(),
        accepted.len()
    );
    p
}
