//! The real `otnd` binary against the sandbox, judged mechanically by the sandbox's ledger (the
//! Jepsen set-checker idea: every recipient ends in exactly one terminal state, and otnd's `sent`
//! is exactly the set of recipients Facebook accepted; nobody lost, nobody twice).

use std::time::Duration;

use graph_sandbox::{RunningSandbox, SandboxOptions};
use otnd::pb::{
    GetSubscriberRequest, SendProgress, audience_service_client::AudienceServiceClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{
    binary::{Served, json_field},
    support::{Sandbox, TestDatabase, eventually, test_master_key_base64},
};

pub(crate) use otnd_testkit::{PAGE, StorySpec, TOPIC, get_send as progress_of, psids_in};

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

    /// The sandbox's admin surface.
    pub(crate) fn admin(&self) -> Sandbox {
        Sandbox::new(self.sandbox.url(""))
    }

    pub(crate) async fn sandbox_post(&self, path: &str, body: Value) -> Value {
        self.admin().post(path, body).await
    }

    pub(crate) async fn sandbox_get(&self, path: &str) -> Value {
        self.admin().get(path).await
    }

    pub(crate) async fn faults(&self, faults: Value) {
        self.admin().faults(faults).await;
    }

    /// Registers the page at `rate` per second, opts every recipient in through the signed
    /// webhook, writes and reviews a story; returns its id.
    pub(crate) async fn prepare(&self, node: &Node, rate: u32) -> String {
        self.prepare_page(node, PAGE, rate).await
    }

    /// `prepare` for any page.
    pub(crate) async fn prepare_page(&self, node: &Node, page: &str, rate: u32) -> String {
        otnd_testkit::register_page(&node.channel, &self.admin(), &node.http, page, Some(rate))
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
        let admin = self.admin();
        otnd_testkit::opt_in_users(
            &node.channel,
            &admin,
            page,
            TOPIC,
            prefix,
            count,
            expires_in_seconds,
        )
        .await;
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

    /// A story as `spec` says, reviewed (see `otnd_testkit::reviewed_story`).
    pub(crate) async fn reviewed_story(&self, node: &Node, spec: StorySpec<'_>) -> String {
        otnd_testkit::reviewed_story(&node.channel, &self.admin(), spec).await
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

/// How long a send of the harness's size may take to reach what a test waits for.
const SEND_DEADLINE: Duration = Duration::from_secs(120);

pub(crate) async fn start_send(channel: &Channel, story_id: &str, request_id: &str) -> String {
    otnd_testkit::start_send(channel, story_id, request_id)
        .await
        .send_id
}

pub(crate) async fn wait_until(
    channel: &Channel,
    send_id: &str,
    what: &str,
    done: impl Fn(&otnd::pb::Send) -> bool,
) {
    otnd_testkit::wait_for_send(channel, send_id, what, SEND_DEADLINE, done).await;
}

pub(crate) fn sent(send: &otnd::pb::Send) -> u64 {
    send.progress.as_ref().unwrap().sent
}

/// The judge (`otnd_testkit::judge`) for a send of [`PAGE`].
pub(crate) async fn judge(h: &Harness, channel: &Channel, send_id: &str) -> SendProgress {
    judge_page(h, channel, send_id, PAGE).await
}

/// The judge for a send of any page.
pub(crate) async fn judge_page(
    h: &Harness,
    channel: &Channel,
    send_id: &str,
    page: &str,
) -> SendProgress {
    otnd_testkit::judge(channel, &h.admin(), send_id, page).await
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
