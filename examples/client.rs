//! otnd from a Rust client, the whole job once: register a page, take opt-ins, write a story,
//! have it reviewed, send it to everyone who opted in, and watch the send to its end.
//!
//!     cargo run --example client [-- USERS]
//!
//! Facebook is played by graph-sandbox and otnd runs on a throwaway SQLite file, both in this
//! process; everything after start-up goes through otnd's gRPC API (the generated tonic client)
//! and, for the opt-ins, through signed webhooks, as a chatbot platform's services would use it.
//! Against a real deployment, connect the same client to your otnd's address and leave the
//! sandbox out.

use std::{collections::BTreeMap, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use graph_sandbox::{RunningSandbox, SandboxOptions};
use otnd::{
    config::Settings,
    pb::{
        CreatePageRequest, CreateStoryRequest, ListTopicsRequest, PreviewStoryRequest, SendState,
        StartSendRequest, StoryContent, WatchSendRequest,
        opt_in_service_client::OptInServiceClient, page_service_client::PageServiceClient,
        send_service_client::SendServiceClient, story_content::Kind,
        story_service_client::StoryServiceClient,
    },
    startup::BackgroundApp,
};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const PAGE: &str = "1029384756";
const ACCESS_TOKEN: &str = "EAAB-example-page-token";
const APP_SECRET: &str = "example-app-secret";
const TOPIC: &str = "Tickets on sale";
/// Someone on the platform's team, who reads the story in their own Messenger first.
const REVIEWER: &str = "operator-1";

fn main() -> anyhow::Result<()> {
    let users: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Facebook, played by the sandbox.
    let sandbox = runtime.block_on(RunningSandbox::start(SandboxOptions::default()))?;
    let graph_url = format!("http://{}", sandbox.addr);

    // otnd, as `otnd serve` runs it, on a throwaway SQLite file, calling the sandbox.
    let dir = tempfile::tempdir()?;
    let env: BTreeMap<String, String> = [
        (
            "OTN_DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.path().join("otnd.db").display()),
        ),
        ("OTN_GRPC_ADDR", "127.0.0.1:0".into()),
        ("OTN_HTTP_ADDR", "127.0.0.1:0".into()),
        ("OTN_GRAPH_URL", graph_url.clone()),
        ("OTN_MASTER_KEY", STANDARD.encode([7u8; 32])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_from(None, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    let otnd = BackgroundApp::start(settings, 2)?;

    let result = runtime.block_on(drive(&otnd, &graph_url, users));
    otnd.stop()?;
    drop(sandbox);
    result
}

async fn drive(otnd: &BackgroundApp, graph_url: &str, users: u64) -> anyhow::Result<()> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", otnd.grpc_port))?
        .connect()
        .await?;
    let http = graph_sandbox::http_client_builder().build()?;
    let sandbox = |path: &str, body: Value| {
        let request = http
            .post(format!("{graph_url}/__sandbox/{path}"))
            .json(&body);
        async move {
            anyhow::Ok(
                request
                    .send()
                    .await?
                    .error_for_status()?
                    .json::<Value>()
                    .await?,
            )
        }
    };

    // 1. The page, in otnd (its secrets are sealed at rest) and at "Facebook", whose webhooks go
    //    to otnd's HTTP listener.
    PageServiceClient::new(channel.clone())
        .create_page(CreatePageRequest {
            page_id: PAGE.into(),
            name: "Example page".into(),
            access_token: ACCESS_TOKEN.into(),
            app_secret: APP_SECRET.into(),
            verify_token: "example-verify-token".into(),
            // The Send API's limit for text and templates; a page created without one sends at
            // 40 a second.
            send_rate_per_second: Some(300),
        })
        .await?;
    sandbox(
        "pages",
        json!({"page_id": PAGE, "access_token": ACCESS_TOKEN, "app_secret": APP_SECRET,
               "webhook_url": format!("http://127.0.0.1:{}/webhook", otnd.http_port)}),
    )
    .await?;
    println!("page {PAGE} registered");

    // 2. Users press "Notify me": Facebook posts each opt-in, signed, to otnd's webhook.
    sandbox(
        "optins",
        json!({"page_id": PAGE, "psid_prefix": "user-", "count": users, "payload": TOPIC}),
    )
    .await?;
    let mut optins = OptInServiceClient::new(channel.clone());
    let active = loop {
        let topics = optins
            .list_topics(ListTopicsRequest {
                page_id: PAGE.into(),
            })
            .await?
            .into_inner()
            .topics;
        let active = topics
            .iter()
            .find(|t| t.topic == TOPIC)
            .map_or(0, |t| t.active);
        if active >= users {
            break active;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("{active} users opted in to \"{TOPIC}\"");

    // 3. The story, reviewed: otnd sends it to the reviewer's own Messenger (inside their
    //    24-hour window, which writing to the page opened) and marks it reviewed.
    let mut stories = StoryServiceClient::new(channel.clone());
    let story = stories
        .create_story(CreateStoryRequest {
            page_id: PAGE.into(),
            topic: TOPIC.into(),
            content: Some(StoryContent {
                kind: Some(Kind::Text("Tickets are on sale now!".into())),
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .story
        .ok_or_else(|| anyhow::anyhow!("CreateStory answered no story"))?;
    sandbox(
        "interactions",
        json!({"page_id": PAGE, "psid": REVIEWER, "text": "ready to review"}),
    )
    .await?;
    stories
        .preview_story(PreviewStoryRequest {
            story_id: story.story_id.clone(),
            reviewer_psid: REVIEWER.into(),
        })
        .await?;
    println!("story {} reviewed by {REVIEWER}", story.story_id);

    // 4. The send: idempotent on the request id (a retried call starts nothing twice), then
    //    watched as a dashboard would, until it ends.
    let mut sends = SendServiceClient::new(channel);
    let send = sends
        .start_send(StartSendRequest {
            story_id: story.story_id,
            request_id: "example-campaign-1".into(),
        })
        .await?
        .into_inner()
        .send
        .ok_or_else(|| anyhow::anyhow!("StartSend answered no send"))?;
    println!("send {} started", send.send_id);
    let mut watch = sends
        .watch_send(WatchSendRequest {
            send_id: send.send_id.clone(),
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(message) = watch.next().await {
        let Some(p) = message?.progress else {
            continue;
        };
        println!(
            "  {:<9} sent {:>5} of {:<5} failed {} skipped {} unknown {}  {:.0}/s",
            format!("{:?}", p.state()),
            p.sent,
            p.total,
            p.failed,
            p.skipped,
            p.unknown,
            p.rate_per_second
        );
        last = Some(p);
    }
    let last = last.ok_or_else(|| anyhow::anyhow!("WatchSend ended without a snapshot"))?;
    anyhow::ensure!(
        last.state() == SendState::Completed,
        "the send ended {:?}: {}",
        last.state(),
        last.last_error
    );
    let stats = http
        .get(format!("{graph_url}/__sandbox/stats"))
        .send()
        .await?
        .json::<Value>()
        .await?;
    println!(
        "done: {} of {} users reached once each; Facebook (the sandbox) accepted {} messages, \
         {} tokens presented twice",
        last.sent, users, stats["accepted"], stats["tokens_presented_more_than_once"]
    );
    Ok(())
}
