//! How long EstimateAudience takes at a million opt-ins, on SQLite.
//!
//!     cargo bench --bench estimate_audience [-- OPT_INS]
//!
//! Loads OPT_INS opt-ins on one topic (one in ten already expired, half the users tagged `vip`,
//! a tenth `churned`) through the store's ingestion, then times EstimateAudience over gRPC for a
//! story to everyone and for one aimed at a segment (vip and not churned) with window users.

#[path = "in_process/mod.rs"]
mod common;
use common::PAGE;
use std::time::Instant;

use otnd::{
    domain::{EventKind, IncomingEvent, OptInToken, PageId, Psid, Topic},
    pb::{
        CreateSegmentRequest, CreateStoryRequest, EstimateAudienceRequest, SegmentRule,
        StoryContent, TagSubscribersRequest, audience_service_client::AudienceServiceClient,
        story_content::Kind, story_service_client::StoryServiceClient,
    },
    store::Store,
};

const TOPIC: &str = "Tickets on sale";
const DAY_MS: i64 = 24 * 3600 * 1000;

fn main() -> anyhow::Result<()> {
    let opt_ins: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let bench = common::start_on_sqlite()?;
    let app = &bench.app;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(app.grpc_port, bench.database.clone(), opt_ins));
    let common::Bench { app, dir, .. } = bench;
    app.stop()?;
    drop(dir);
    result
}

async fn run(
    grpc_port: u16,
    database: otnd::config::DatabaseUrl,
    opt_ins: usize,
) -> anyhow::Result<()> {
    let channel = common::connect_and_register(grpc_port, "secret").await?;

    let loading = Instant::now();
    let store = Store::connect(&database).await?;
    // Opt-ins of nobody ever erased: the key only digests psids when a page has erasures.
    let cipher = otnd::crypto::SecretCipher::new(&otnd::crypto::MasterKey::generate());
    let page = PageId::parse(PAGE).map_err(anyhow::Error::msg)?;
    let topic = Topic::parse(TOPIC).map_err(anyhow::Error::msg)?;
    let now = chrono::Utc::now().timestamp_millis();
    for start in (0..opt_ins).step_by(10_000) {
        let events: Vec<IncomingEvent> = (start..(start + 10_000).min(opt_ins))
            .map(|n| IncomingEvent {
                psid: Psid::parse(&format!("psid-{n}")).unwrap(),
                // One in ten opted in more than a year ago: expired.
                at_ms: if n % 10 == 0 {
                    now - 400 * DAY_MS
                } else {
                    now - (n % 300) as i64 * DAY_MS
                },
                kind: EventKind::OptIn {
                    topic: topic.clone(),
                    token: OptInToken::parse(&format!("token-{n:09}-abcdefghijklmnopqrstuvwxyz"))
                        .unwrap(),
                    recurring: None,
                },
            })
            .collect();
        otnd::store::optins::ingest(&store.db, &cipher, &[(page.clone(), events)]).await?;
    }
    store.close().await;
    let mut audience = AudienceServiceClient::new(channel.clone());
    for (tag, every) in [("vip", 2), ("churned", 10)] {
        let psids: Vec<String> = (0..opt_ins)
            .step_by(every)
            .map(|n| format!("psid-{n}"))
            .collect();
        for chunk in psids.chunks(10_000) {
            audience
                .tag_subscribers(TagSubscribersRequest {
                    page_id: PAGE.into(),
                    psids: chunk.to_vec(),
                    add_tags: vec![tag.into()],
                    remove_tags: vec![],
                })
                .await?;
        }
    }
    let loaded_in = loading.elapsed().as_secs_f64();
    let segment = audience
        .create_segment(CreateSegmentRequest {
            page_id: PAGE.into(),
            name: "loyal".into(),
            rule: Some(SegmentRule {
                all_tags: vec!["vip".into()],
                any_tags: vec![],
                none_tags: vec!["churned".into()],
            }),
        })
        .await?
        .into_inner()
        .segment
        .unwrap();

    let mut stories = StoryServiceClient::new(channel);
    let content = Some(StoryContent {
        kind: Some(Kind::Text("Tickets are on sale".into())),
    });
    let everyone = stories
        .create_story(CreateStoryRequest {
            page_id: PAGE.into(),
            topic: TOPIC.into(),
            content: content.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .story
        .unwrap();
    let aimed = stories
        .create_story(CreateStoryRequest {
            page_id: PAGE.into(),
            topic: TOPIC.into(),
            content,
            include_window_users: true,
            segment_id: segment.segment_id,
            ..Default::default()
        })
        .await?
        .into_inner()
        .story
        .unwrap();

    println!(
        "EstimateAudience on SQLite: {opt_ins} opt-ins on one topic (loaded in {loaded_in:.1} s)"
    );
    for (name, story) in [("everyone", everyone), ("segment + window users", aimed)] {
        let mut timings = Vec::new();
        let mut last = None;
        for _ in 0..5 {
            let started = Instant::now();
            let estimate = stories
                .estimate_audience(EstimateAudienceRequest {
                    story_id: story.story_id.clone(),
                })
                .await?
                .into_inner();
            timings.push(started.elapsed().as_secs_f64() * 1000.0);
            last = Some(estimate);
        }
        timings.sort_by(f64::total_cmp);
        let estimate = last.unwrap();
        println!(
            "  {name:<24} median {:>7.1} ms  (min {:.1}, max {:.1})  tokens {} window {} expired {} outside segment {}",
            timings[2],
            timings[0],
            timings[4],
            estimate.token_recipients,
            estimate.window_recipients,
            estimate.excluded_expired,
            estimate.excluded_by_segment
        );
    }
    Ok(())
}
