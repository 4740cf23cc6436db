//! What is bounded, and what is not: queued sends cost rows, so a campaign of many sends is
//! queued rather than refused; running page actors and open streams cost memory, and are
//! bounded. Through the real binary.

use std::time::{Duration, Instant};

use otnd::pb::{
    SendState, StartSendRequest, WatchSendRequest, send_service_client::SendServiceClient,
};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::json;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    backend_tests,
    judge::{Harness, PAGE, StorySpec, progress_of, start_send, wait_until},
    ledger,
    support::TestDatabase,
};

/// Defect: OTN_MAX_ACTIVE_SENDS (100 by default) counted queued sends, so a platform starting a
/// campaign of more sends than that got RESOURCE_EXHAUSTED from the 101st. Here 150 sends of
/// a page, each with an audience and a slow Graph API, so that all are queued or running at
/// once: every one is taken and completes.
async fn a_campaign_of_many_sends(db: TestDatabase) {
    const SENDS: usize = 150;
    let h = Harness::new(&db, 1).await;
    let node = h.start().await;
    h.prepare(&node, 300).await;
    h.window_users(&node, PAGE, "w", 2).await;
    let story = h
        .reviewed_story(
            &node,
            StorySpec {
                text: "News of the page",
                window: true,
                ..StorySpec::default()
            },
        )
        .await;
    h.faults(json!({"latency_ms": 2000})).await;
    let mut sends = SendServiceClient::new(node.channel.clone());
    let mut ids = Vec::new();
    for n in 0..SENDS {
        let started = sends
            .start_send(StartSendRequest {
                story_id: story.clone(),
                request_id: format!("campaign-{n}"),
            })
            .await;
        match started {
            Ok(response) => ids.push(response.into_inner().send.unwrap().send_id),
            Err(status) => panic!("StartSend {n} of {SENDS} refused: {status:?}"),
        }
    }
    h.faults(json!({})).await;
    for id in &ids {
        wait_until(&node.channel, id, "every send to complete", |s| {
            s.state() == SendState::Completed
        })
        .await;
    }
    ledger::assert_rows_hold(&h.database_url, None).await;
}

/// How many pages have an unexpired lease: the page actors running.
async fn pages_running(database_url: &str) -> i64 {
    let db = Database::connect(database_url).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM page_leases WHERE expires_at > {now}"),
        ))
        .await
        .unwrap()
        .unwrap();
    let _ = db.close().await;
    row.try_get::<i64>("", "n").unwrap()
}

/// Page actors hold memory (their deliveries in flight): at most OTN_MAX_PAGE_ACTORS run at
/// once, and the other pages' sends wait, queued, for room.
async fn bounded_page_actors(db: TestDatabase) {
    const PAGES: usize = 5;
    let h = Harness::new(&db, 60)
        .await
        .with_env("OTN_MAX_PAGE_ACTORS", "2");
    let node = h.start().await;
    let mut sends = Vec::new();
    for i in 0..PAGES {
        let page = format!("77{i}");
        let story = h.prepare_page(&node, &page, 30).await;
        sends.push(start_send(&node.channel, &story, &page).await);
    }
    let started = Instant::now();
    let mut most = 0;
    loop {
        most = most.max(pages_running(&h.database_url).await);
        let mut done = 0;
        for id in &sends {
            if progress_of(&node.channel, id).await.state() == SendState::Completed {
                done += 1;
            }
        }
        if done == PAGES {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{done} of {PAGES} sends completed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(most <= 2, "{most} page actors ran at once");
    assert_eq!(most, 2, "the limit was used");
    ledger::assert_rows_hold(&h.database_url, None).await;
}

/// Open streams hold memory: WatchSend per send and in all, health Watch counted with them.
async fn bounded_watchers(db: TestDatabase) {
    let h = Harness::new(&db, 30)
        .await
        .with_env("OTN_MAX_WATCHERS", "5")
        .with_env("OTN_MAX_WATCHERS_PER_SEND", "3");
    let node = h.start().await;
    let story = h.prepare(&node, 10).await;
    let send_id = start_send(&node.channel, &story, "watched").await;
    let mut client = SendServiceClient::new(node.channel.clone());
    let watch = |client: &mut SendServiceClient<_>| {
        let request = WatchSendRequest {
            send_id: send_id.clone(),
        };
        let mut client = client.clone();
        async move { client.watch_send(request).await }
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(watch(&mut client).await.unwrap().into_inner());
    }
    let refused = watch(&mut client).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("OTN_MAX_WATCHERS_PER_SEND"),
        "{refused:?}"
    );
    // Two health watches fill the instance's five streams; a sixth of any kind is refused.
    let mut health = HealthClient::new(node.channel.clone());
    let mut watches = Vec::new();
    for _ in 0..2 {
        let mut stream = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        watches.push(stream);
    }
    let refused = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    let refused = match refused {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("OTN_MAX_WATCHERS"),
        "{refused:?}"
    );
    // A stream that ends gives its place back.
    drop(open.pop());
    drop(watches.pop());
    let mut reopened = None;
    let until = Instant::now() + Duration::from_secs(10);
    while reopened.is_none() {
        match watch(&mut client).await {
            Ok(stream) => reopened = Some(stream.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(Instant::now() < until, "no place given back: {status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // The watchers see the send through.
    let mut stream = reopened.unwrap();
    let mut last = None;
    while let Some(message) = stream.message().await.unwrap() {
        last = message.progress;
    }
    assert_eq!(last.unwrap().state(), SendState::Completed);
}

backend_tests! {
    async fn a_campaign_of_more_sends_than_the_old_limit_is_queued_not_refused(db) {
        a_campaign_of_many_sends(db).await;
    }

    async fn page_actors_are_bounded_and_waiting_pages_get_their_turn(db) {
        bounded_page_actors(db).await;
    }

    async fn watchers_are_bounded_per_send_and_per_instance(db) {
        bounded_watchers(db).await;
    }
}
