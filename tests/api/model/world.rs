//! A history carried out: one sandbox, one database, the real `otnd` binary (and, on
//! PostgreSQL, other instances joining and leaving), driven step by step as clients, users,
//! Facebook and the machine would. What the checker needs that the database and the sandbox do
//! not keep (statuses answered, erasures and when they returned, logs of stopped instances,
//! how many answers could have been lost) is observed here.

use std::{
    fmt::Debug,
    time::{Duration, Instant},
};

use otnd::pb::{
    CancelSendRequest, CreatePageRequest, CreateSegmentRequest, CreateStoryRequest,
    DeleteSubscriberRequest, GetSendRequest, PauseSendRequest, PreviewStoryRequest,
    ResumeSendRequest, SegmentRule, SendState, StartSendRequest, StoryContent,
    TagSubscribersRequest, UpdatePageRequest, UpdateStoryRequest,
    audience_service_client::AudienceServiceClient, opt_in_service_client::OptInServiceClient,
    page_service_client::PageServiceClient, send_service_client::SendServiceClient,
    story_content::Kind, story_service_client::StoryServiceClient,
};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, Statement};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};

use super::history::{FaultSet, PAGES, Step, TAGS, TOPICS};
use crate::{
    faults::Proxy,
    judge::{Harness, Node},
    support::{
        TestDatabase, eventually, page_access_token, page_app_secret, page_verify_token,
        sign_webhook,
    },
};

/// Who previews every story (inside the window at the sandbox only: otnd never hears of them,
/// so they are in no audience).
pub(crate) const REVIEWER: &str = "boss";
/// Users of each page and topic opted in before the history begins.
const INITIAL_OPT_INS: u64 = 60;
/// Graph calls are given up after this long; the sandbox holds a timed-out call longer.
const GRAPH_TIMEOUT_SECONDS: &str = "1";
const TIMEOUT_HOLD_MS: u64 = 1_500;

/// A non-OK answer to a request the history made.
#[derive(Clone, Debug)]
pub(crate) struct Answer {
    pub(crate) step: usize,
    pub(crate) rpc: &'static str,
    pub(crate) code: Code,
    pub(crate) message: String,
}

/// What the checker needs besides the database and the sandbox.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// Every non-OK answer.
    pub(crate) refusals: Vec<Answer>,
    /// Every answer and status message as text, for the secret scan.
    pub(crate) responses: String,
    /// (page, psid, epoch ms when DeleteSubscriber returned OK).
    pub(crate) erasures: Vec<(String, String, i64)>,
    /// SIGKILLs, SIGTERMs and database outages: each may leave up to a page's in-flight cap of
    /// window deliveries honestly `unknown`.
    pub(crate) disruptions: u64,
    /// The highest send rate each page had (its in-flight cap follows it).
    pub(crate) max_rates: Vec<u32>,
    /// Access tokens the history set that Facebook refuses: secrets too.
    pub(crate) bad_tokens: Vec<String>,
    /// A repeated request id that brought back another send, or a broken promise seen while the
    /// history ran (not read from the database afterwards).
    pub(crate) broken: Vec<String>,
    /// Logs of instances that were stopped.
    pub(crate) logs: Vec<String>,
}

struct PageState {
    id: &'static str,
    /// Users the page knows of (opted in or written), erased ones removed.
    users: Vec<String>,
}

struct StoryState {
    id: String,
    version: u32,
    /// A story that has been sent can no longer change: the next send of it is a new story
    /// made like it.
    sent: bool,
    request: CreateStoryRequest,
}

struct SendRecord {
    id: String,
    story: String,
    request_id: String,
}

pub(crate) struct World<'a> {
    pub(crate) db: &'a TestDatabase,
    pub(crate) h: Harness,
    proxy: Option<Proxy>,
    main: Option<Node>,
    others: Vec<Node>,
    joined: u32,
    pages: Vec<PageState>,
    stories: Vec<StoryState>,
    sends: Vec<SendRecord>,
    segments: Vec<(usize, String)>,
    faults: FaultSet,
    restricted: Option<&'static str>,
    seed: u64,
    counter: u64,
    calls: usize,
    step: usize,
    pub(crate) observed: Observed,
}

impl<'a> World<'a> {
    /// A sandbox, the database, `otnd` on it, and `pages` pages whose users have opted in.
    pub(crate) async fn new(db: &'a TestDatabase, pages: usize, seed: u64, fleet: bool) -> Self {
        let mut h = Harness::new(db, 0)
            .await
            .with_env("OTN_GRAPH_TIMEOUT_SECONDS", GRAPH_TIMEOUT_SECONDS);
        if fleet {
            // Pages of a departed instance move within seconds.
            h = h.with_env("OTN_LEASE_SECONDS", "3");
        }
        let proxy = Proxy::in_front_of(&mut h, db).await;
        let main = h.start().await;
        let mut world = World {
            db,
            h,
            proxy,
            main: Some(main),
            others: Vec::new(),
            joined: 0,
            pages: Vec::new(),
            stories: Vec::new(),
            sends: Vec::new(),
            segments: Vec::new(),
            faults: FaultSet::default(),
            restricted: None,
            seed,
            counter: 0,
            calls: 0,
            step: 0,
            observed: Observed {
                max_rates: vec![300; pages],
                ..Observed::default()
            },
        };
        world.post_faults().await;
        for (index, id) in PAGES.iter().take(pages).enumerate() {
            world.set_up_page(index, id).await;
        }
        world
    }

    async fn set_up_page(&mut self, index: usize, id: &'static str) {
        let (channel, http) = {
            let node = self.main_node();
            (node.channel.clone(), node.http.clone())
        };
        PageServiceClient::new(channel.clone())
            .create_page(CreatePageRequest {
                page_id: id.into(),
                name: format!("Model page {index}"),
                access_token: page_access_token(id),
                app_secret: page_app_secret(id),
                verify_token: page_verify_token(id),
                send_rate_per_second: Some(300),
            })
            .await
            .unwrap();
        self.h
            .sandbox_post(
                "/__sandbox/pages",
                json!({"page_id": id, "access_token": page_access_token(id),
                       "app_secret": page_app_secret(id),
                       "webhook_url": format!("http://{http}/webhook")}),
            )
            .await;
        self.h
            .sandbox_post(
                "/__sandbox/interactions",
                json!({"page_id": id, "psid": REVIEWER, "text": "ok", "deliver_webhook": false}),
            )
            .await;
        self.pages.push(PageState {
            id,
            users: Vec::new(),
        });
        for topic in 0..TOPICS.len() {
            self.opt_in(index, topic, INITIAL_OPT_INS, false).await;
        }
        // The history begins once otnd holds them all.
        let optins = OptInServiceClient::new(channel);
        eventually(Duration::from_secs(60), "the first opt-ins stored", || {
            let mut optins = optins.clone();
            async move {
                let topics = optins
                    .list_topics(otnd::pb::ListTopicsRequest { page_id: id.into() })
                    .await
                    .ok()?
                    .into_inner()
                    .topics;
                (topics.iter().map(|t| t.active).sum::<u64>()
                    >= INITIAL_OPT_INS * TOPICS.len() as u64)
                    .then_some(())
            }
        })
        .await;
    }

    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// A channel to a live instance, going round them.
    fn channel(&mut self) -> Channel {
        self.calls += 1;
        let live: Vec<&Node> = self.main.iter().chain(self.others.iter()).collect();
        live[self.calls % live.len()].channel.clone()
    }

    fn main_node(&self) -> &Node {
        self.main
            .as_ref()
            .expect("the first instance runs between steps")
    }

    /// Notes an answer: its text for the secret scan, a refusal with its code.
    fn answer<T: Debug>(
        &mut self,
        rpc: &'static str,
        result: Result<tonic::Response<T>, tonic::Status>,
    ) -> Option<T> {
        match result {
            Ok(response) => {
                let response = response.into_inner();
                self.observed
                    .responses
                    .push_str(&format!("{rpc}: {response:?}\n"));
                Some(response)
            }
            Err(status) => {
                self.observed
                    .responses
                    .push_str(&format!("{rpc}: {status:?}\n"));
                self.observed.refusals.push(Answer {
                    step: self.step,
                    rpc,
                    code: status.code(),
                    message: status.message().to_string(),
                });
                None
            }
        }
    }

    async fn post_faults(&mut self) {
        let f = &self.faults;
        let body = json!({
            "latency_ms": f.latency_ms,
            "error_rate": f.error_rate,
            "timeout_rate": f.timeout_rate,
            "timeout_hold_ms": TIMEOUT_HOLD_MS,
            "reset_rate": f.reset_rate,
            "accept_then_fail_rate": f.accept_then_fail_rate,
            "throttle_rate": f.throttle_rate,
            "restricted_pages": self.restricted.iter().collect::<Vec<_>>(),
            "seed": self.seed,
        });
        self.h.faults(body).await;
    }

    async fn opt_in(&mut self, page: usize, topic: usize, count: u64, expiring: bool) {
        let n = self.next();
        let id = self.pages[page].id;
        let prefix = format!("u{n}-");
        let mut body = json!({"page_id": id, "psid_prefix": prefix, "count": count,
                              "payload": TOPICS[topic], "deliver_webhook": true});
        if expiring {
            body["expires_in_seconds"] = json!(70);
        }
        self.h.sandbox_post("/__sandbox/optins", body).await;
        self.pages[page]
            .users
            .extend((0..count).map(|i| format!("{prefix}{i}")));
    }

    fn user(&self, page: usize, user: usize) -> Option<String> {
        let users = &self.pages[page].users;
        (!users.is_empty()).then(|| users[user % users.len()].clone())
    }

    /// Posts `events` of a page to an instance's webhook, signed as Facebook signs.
    async fn webhook(&mut self, page: usize, events: Vec<Value>) {
        let id = self.pages[page].id;
        let body =
            json!({"object": "page", "entry": [{"id": id, "time": now_ms(), "messaging": events}]})
                .to_string();
        let http = self.main_node().http.clone();
        let response = otnd::graph::http_client()
            .post(format!("http://{http}/webhook"))
            .header("Content-Type", "application/json")
            .header(
                "X-Hub-Signature-256",
                sign_webhook(&page_app_secret(id), body.as_bytes()),
            )
            .body(body)
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => self.observed.broken.push(format!(
                "step {}: a signed webhook was answered {}",
                self.step,
                response.status()
            )),
            Err(err) => self.observed.broken.push(format!(
                "step {}: a signed webhook got no answer: {err}",
                self.step
            )),
        }
    }

    /// The user's one-time token as otnd stored it, if it did.
    async fn token_of(&self, page: &str, psid: &str) -> Option<(String, String)> {
        let conn = Database::connect(&self.db.url).await.unwrap();
        let row = conn
            .query_one_raw(Statement::from_sql_and_values(
                conn.get_database_backend(),
                match conn.get_database_backend() {
                    sea_orm::DatabaseBackend::Postgres => {
                        "SELECT token, topic FROM optins WHERE page_id = $1 AND psid = $2 LIMIT 1"
                    }
                    _ => "SELECT token, topic FROM optins WHERE page_id = ? AND psid = ? LIMIT 1",
                },
                [page.into(), psid.into()],
            ))
            .await
            .unwrap();
        let _ = conn.close().await;
        row.map(|r| {
            (
                r.try_get::<String>("", "token").unwrap(),
                r.try_get::<String>("", "topic").unwrap(),
            )
        })
    }

    /// Carries out one step.
    pub(crate) async fn run(&mut self, index: usize, step: &Step) {
        self.step = index;
        match step {
            Step::CreateStory {
                page,
                topic,
                window,
                segment,
            } => {
                let page = page % self.pages.len();
                let segment_id = segment
                    .and_then(|k| {
                        let of_page: Vec<&String> = self
                            .segments
                            .iter()
                            .filter(|(p, _)| *p == page)
                            .map(|(_, id)| id)
                            .collect();
                        (!of_page.is_empty()).then(|| of_page[k % of_page.len()].clone())
                    })
                    .unwrap_or_default();
                let n = self.next();
                let request = CreateStoryRequest {
                    page_id: self.pages[page].id.into(),
                    topic: TOPICS[topic % TOPICS.len()].into(),
                    content: Some(text(format!("story {n} v0"))),
                    include_window_users: *window,
                    segment_id,
                    ..Default::default()
                };
                let result = StoryServiceClient::new(self.channel())
                    .create_story(request.clone())
                    .await;
                if let Some(story) = self.answer("CreateStory", result).and_then(|r| r.story) {
                    self.stories.push(StoryState {
                        id: story.story_id,
                        version: 0,
                        sent: false,
                        request,
                    });
                }
            }
            Step::StartSend { story } => {
                if self.stories.is_empty() {
                    return;
                }
                let k = story % self.stories.len();
                if self.stories[k].sent {
                    let n = self.next();
                    let mut request = self.stories[k].request.clone();
                    request.content = Some(text(format!("story {n} v0")));
                    let result = StoryServiceClient::new(self.channel())
                        .create_story(request.clone())
                        .await;
                    let Some(story) = self.answer("CreateStory", result).and_then(|r| r.story)
                    else {
                        return;
                    };
                    self.stories[k] = StoryState {
                        id: story.story_id,
                        version: 0,
                        sent: false,
                        request,
                    };
                }
                let story_id = self.stories[k].id.clone();
                // Every send's message is its own, so that the sandbox's ledger tells sends
                // apart: no new content, no send.
                if !self.update_story(k).await {
                    return;
                }
                for _ in 0..3 {
                    if self.preview(&story_id).await {
                        break;
                    }
                }
                let request_id = format!("r{}", self.next());
                let result = SendServiceClient::new(self.channel())
                    .start_send(StartSendRequest {
                        story_id: story_id.clone(),
                        request_id: request_id.clone(),
                    })
                    .await;
                if let Some(send) = self.answer("StartSend", result).and_then(|r| r.send) {
                    self.stories[k].sent = true;
                    self.sends.push(SendRecord {
                        id: send.send_id,
                        story: story_id,
                        request_id,
                    });
                }
            }
            Step::RepeatStart { send } => {
                let Some(record) = self.send(*send) else {
                    return;
                };
                let (id, story, request_id) = (
                    record.id.clone(),
                    record.story.clone(),
                    record.request_id.clone(),
                );
                let result = SendServiceClient::new(self.channel())
                    .start_send(StartSendRequest {
                        story_id: story,
                        request_id,
                    })
                    .await;
                if let Some(send) = self.answer("StartSend", result).and_then(|r| r.send)
                    && send.send_id != id
                {
                    self.observed.broken.push(format!(
                        "step {index}: StartSend with send {id}'s request id made another send, {}",
                        send.send_id
                    ));
                }
            }
            Step::UpdateStory { story } => {
                if !self.stories.is_empty() {
                    self.update_story(story % self.stories.len()).await;
                }
            }
            Step::PreviewStory { story } => {
                if !self.stories.is_empty() {
                    let id = self.stories[story % self.stories.len()].id.clone();
                    self.preview(&id).await;
                }
            }
            Step::Pause { send } => {
                if let Some(id) = self.send(*send).map(|s| s.id.clone()) {
                    let result = SendServiceClient::new(self.channel())
                        .pause_send(PauseSendRequest { send_id: id })
                        .await;
                    self.answer("PauseSend", result);
                }
            }
            Step::Resume { send } => {
                if let Some(id) = self.send(*send).map(|s| s.id.clone()) {
                    let result = SendServiceClient::new(self.channel())
                        .resume_send(ResumeSendRequest { send_id: id })
                        .await;
                    self.answer("ResumeSend", result);
                }
            }
            Step::Cancel { send } => {
                if let Some(id) = self.send(*send).map(|s| s.id.clone()) {
                    let result = SendServiceClient::new(self.channel())
                        .cancel_send(CancelSendRequest { send_id: id })
                        .await;
                    self.answer("CancelSend", result);
                }
            }
            Step::SetRate { page, rate } => {
                let page = page % self.pages.len();
                let result = PageServiceClient::new(self.channel())
                    .update_page(UpdatePageRequest {
                        page_id: self.pages[page].id.into(),
                        send_rate_per_second: Some(*rate),
                        ..Default::default()
                    })
                    .await;
                if self.answer("UpdatePage", result).is_some() {
                    let max = &mut self.observed.max_rates[page];
                    *max = (*max).max(*rate);
                }
            }
            Step::BreakToken { page } => {
                let page = page % self.pages.len();
                let n = self.next();
                let bad = format!("EAAbroken{}x{n}", self.pages[page].id);
                self.observed.bad_tokens.push(bad.clone());
                self.set_token(page, bad).await;
            }
            Step::FixToken { page } => {
                let page = page % self.pages.len();
                self.set_token(page, page_access_token(self.pages[page].id))
                    .await;
            }
            Step::Erase { page, user } => {
                let page = page % self.pages.len();
                let Some(psid) = self.user(page, *user) else {
                    return;
                };
                let id = self.pages[page].id;
                let result = AudienceServiceClient::new(self.channel())
                    .delete_subscriber(DeleteSubscriberRequest {
                        page_id: id.into(),
                        psid: psid.clone(),
                    })
                    .await;
                let erased = match &result {
                    Ok(_) => true,
                    // Never stored (its opt-in's webhook has not arrived): erased all the same,
                    // and that webhook must not bring it in.
                    Err(status) => status.code() == Code::NotFound,
                };
                self.answer("DeleteSubscriber", result);
                if erased {
                    self.observed
                        .erasures
                        .push((id.to_string(), psid.clone(), now_ms()));
                    self.pages[page].users.retain(|u| *u != psid);
                }
            }
            Step::Tag {
                page,
                tag,
                users,
                remove,
            } => {
                let page = page % self.pages.len();
                let psids: Vec<String> = self.pages[page]
                    .users
                    .iter()
                    .take(*users)
                    .cloned()
                    .collect();
                if psids.is_empty() {
                    return;
                }
                let tag = vec![TAGS[tag % TAGS.len()].to_string()];
                let (add_tags, remove_tags) = if *remove {
                    (Vec::new(), tag)
                } else {
                    (tag, Vec::new())
                };
                let result = AudienceServiceClient::new(self.channel())
                    .tag_subscribers(TagSubscribersRequest {
                        page_id: self.pages[page].id.into(),
                        psids,
                        add_tags,
                        remove_tags,
                    })
                    .await;
                self.answer("TagSubscribers", result);
            }
            Step::CreateSegment { page, tag, without } => {
                let page = page % self.pages.len();
                let tags = vec![TAGS[tag % TAGS.len()].to_string()];
                let rule = if *without {
                    SegmentRule {
                        none_tags: tags,
                        ..Default::default()
                    }
                } else {
                    SegmentRule {
                        all_tags: tags,
                        ..Default::default()
                    }
                };
                let name = format!("segment {}", self.next());
                let result = AudienceServiceClient::new(self.channel())
                    .create_segment(CreateSegmentRequest {
                        page_id: self.pages[page].id.into(),
                        name,
                        rule: Some(rule),
                    })
                    .await;
                if let Some(segment) = self.answer("CreateSegment", result).and_then(|r| r.segment)
                {
                    self.segments.push((page, segment.segment_id));
                }
            }
            Step::OptIns {
                page,
                topic,
                count,
                expiring,
            } => {
                let page = page % self.pages.len();
                self.opt_in(page, topic % TOPICS.len(), *count, *expiring)
                    .await;
            }
            Step::Interactions { page, count } => {
                let page = page % self.pages.len();
                let n = self.next();
                for k in 0..*count {
                    let psid = format!("w{n}-{k}");
                    self.h
                        .sandbox_post(
                            "/__sandbox/interactions",
                            json!({"page_id": self.pages[page].id, "psid": psid,
                                   "text": "hi", "deliver_webhook": true}),
                        )
                        .await;
                    self.pages[page].users.push(psid);
                }
            }
            Step::Redeliver { page, user } => {
                let page = page % self.pages.len();
                let Some(psid) = self.user(page, *user) else {
                    return;
                };
                let id = self.pages[page].id;
                let Some((token, topic)) = self.token_of(id, &psid).await else {
                    return;
                };
                let at = now_ms() - 120_000;
                let event = json!({"sender": {"id": psid}, "recipient": {"id": id},
                    "timestamp": at, "optin": {"type": "one_time_notif_req", "payload": topic,
                    "one_time_notif_token": token}});
                self.webhook(page, vec![event]).await;
            }
            Step::LateRead { page, user } => {
                let page = page % self.pages.len();
                let Some(psid) = self.user(page, *user) else {
                    return;
                };
                let id = self.pages[page].id;
                let at = now_ms() - 60_000;
                let event = json!({"sender": {"id": psid}, "recipient": {"id": id},
                    "timestamp": at, "read": {"watermark": at}});
                self.webhook(page, vec![event]).await;
            }
            Step::Faults(faults) => {
                self.faults = faults.clone();
                self.post_faults().await;
            }
            Step::FaultsOff => {
                self.faults = FaultSet::default();
                self.post_faults().await;
            }
            Step::Restrict { page } => {
                self.restricted = Some(self.pages[page % self.pages.len()].id);
                self.post_faults().await;
            }
            Step::Unrestrict => {
                self.restricted = None;
                self.post_faults().await;
            }
            Step::Kill => {
                let mut node = self.main.take().unwrap();
                node.served.kill();
                self.observed.logs.push(node.served.log());
                self.observed.disruptions += 1;
                self.main = Some(self.h.start().await);
            }
            Step::Term => {
                let mut node = self.main.take().unwrap();
                let status = node.served.terminate(Duration::from_secs(30));
                if !status.success() {
                    self.observed.broken.push(format!(
                        "step {index}: after SIGTERM otnd exited with {status}"
                    ));
                }
                self.observed.logs.push(node.served.log());
                self.observed.disruptions += 1;
                self.main = Some(self.h.start().await);
            }
            Step::DatabaseAway { ms } => {
                self.observed.disruptions += 1;
                let away = Duration::from_millis(*ms);
                match &self.proxy {
                    Some(proxy) => {
                        proxy.down();
                        tokio::time::sleep(away).await;
                        proxy.up();
                    }
                    None => {
                        // Another process's writer holds SQLite's write lock.
                        let mut options = ConnectOptions::new(self.db.url.clone());
                        options.max_connections(1).min_connections(1);
                        let other = Database::connect(options).await.unwrap();
                        let started = Instant::now();
                        // otnd may hold the lock this moment: take it as soon as it is free.
                        while other.execute_unprepared("BEGIN EXCLUSIVE").await.is_err() {
                            assert!(started.elapsed() < Duration::from_secs(30));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        tokio::time::sleep(away).await;
                        other.execute_unprepared("COMMIT").await.unwrap();
                        other.close().await.unwrap();
                    }
                }
            }
            Step::Wait { ms } => tokio::time::sleep(Duration::from_millis(*ms)).await,
            Step::Join => {
                if self.proxy.is_none() || self.others.len() >= 2 {
                    return;
                }
                self.joined += 1;
                let id = format!("other-{}", self.joined);
                let node = self.h.start_with(&[("OTN_INSTANCE_ID", &id)]).await;
                self.others.push(node);
            }
            Step::Leave => {
                if let Some(mut node) = self.others.pop() {
                    let status = node.served.terminate(Duration::from_secs(30));
                    if !status.success() {
                        self.observed.broken.push(format!(
                            "step {index}: after SIGTERM another instance exited with {status}"
                        ));
                    }
                    self.observed.logs.push(node.served.log());
                    self.observed.disruptions += 1;
                }
            }
            Step::KillOther => {
                if let Some(mut node) = self.others.pop() {
                    node.served.kill();
                    self.observed.logs.push(node.served.log());
                    self.observed.disruptions += 1;
                }
            }
        }
    }

    fn send(&self, k: usize) -> Option<&SendRecord> {
        (!self.sends.is_empty()).then(|| &self.sends[k % self.sends.len()])
    }

    async fn update_story(&mut self, k: usize) -> bool {
        self.stories[k].version += 1;
        let story = &self.stories[k];
        let request = UpdateStoryRequest {
            story_id: story.id.clone(),
            content: Some(text(format!(
                "story {} v{} (history {})",
                story.id, story.version, self.seed
            ))),
            ..Default::default()
        };
        let result = StoryServiceClient::new(self.channel())
            .update_story(request)
            .await;
        self.answer("UpdateStory", result).is_some()
    }

    async fn preview(&mut self, story_id: &str) -> bool {
        let result = StoryServiceClient::new(self.channel())
            .preview_story(PreviewStoryRequest {
                story_id: story_id.into(),
                reviewer_psid: REVIEWER.into(),
            })
            .await;
        self.answer("PreviewStory", result).is_some()
    }

    async fn set_token(&mut self, page: usize, token: String) {
        let result = PageServiceClient::new(self.channel())
            .update_page(UpdatePageRequest {
                page_id: self.pages[page].id.into(),
                access_token: Some(token),
                ..Default::default()
            })
            .await;
        self.answer("UpdatePage", result);
    }

    /// Faults off, every page's token right, every send resumed, and then time until every
    /// send has ended with nothing in flight. Whatever has not ended by the deadline is left
    /// for the checker to name.
    pub(crate) async fn settle(&mut self, deadline: Duration) {
        self.step = usize::MAX;
        self.faults = FaultSet::default();
        self.restricted = None;
        self.post_faults().await;
        if let Some(proxy) = &self.proxy {
            proxy.up();
        }
        for page in 0..self.pages.len() {
            self.set_token(page, page_access_token(self.pages[page].id))
                .await;
        }
        let ids: Vec<String> = self.sends.iter().map(|s| s.id.clone()).collect();
        let started = Instant::now();
        loop {
            let mut open = 0;
            for id in &ids {
                let channel = self.channel();
                let send = SendServiceClient::new(channel)
                    .get_send(GetSendRequest {
                        send_id: id.clone(),
                    })
                    .await;
                let Some(send) = self.answer("GetSend", send).and_then(|r| r.send) else {
                    open += 1;
                    continue;
                };
                let in_flight = send.progress.as_ref().map_or(0, |p| p.in_flight);
                match send.state() {
                    SendState::Completed | SendState::Cancelled if in_flight == 0 => {}
                    SendState::Paused | SendState::Halted => {
                        open += 1;
                        let result = SendServiceClient::new(self.channel())
                            .resume_send(ResumeSendRequest {
                                send_id: id.clone(),
                            })
                            .await;
                        self.answer("ResumeSend", result);
                    }
                    _ => open += 1,
                }
            }
            if open == 0 || started.elapsed() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The logs of every instance, running or stopped.
    pub(crate) fn logs(&self) -> Vec<String> {
        let mut logs = self.observed.logs.clone();
        logs.extend(
            self.main
                .iter()
                .chain(self.others.iter())
                .map(|n| n.served.log()),
        );
        logs
    }

    pub(crate) fn main_channel(&self) -> Channel {
        self.main_node().channel.clone()
    }

    /// Stops every instance (SIGTERM), keeping their logs.
    pub(crate) fn stop(&mut self) {
        for mut node in self.main.take().into_iter().chain(self.others.drain(..)) {
            node.served.terminate(Duration::from_secs(30));
            self.observed.logs.push(node.served.log());
        }
    }
}

fn text(body: String) -> StoryContent {
    StoryContent {
        kind: Some(Kind::Text(body)),
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
