//! Facebook's limits as otnd meets them through the real binary: a page whose true budget is
//! below its configured rate, a throttle with a regain time, the app's own limit (code 4).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{
    backend_tests,
    judge::{Harness, PAGE, judge, judge_page, progress_of, start_send, wait_until},
    support::eventually,
};

/// The value of a gauge for the page on `/metrics`, if it is there.
fn page_gauge(metrics: &str, name: &str, page: &str) -> Option<f64> {
    let prefix = format!("{name}{{page_id=\"{page}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

async fn sandbox_stat(h: &Harness, name: &str) -> u64 {
    h.sandbox_get("/__sandbox/stats").await[name]
        .as_u64()
        .unwrap_or(0)
}

/// The sandbox's acceptance times of token messages to the page, in its clock (Unix ms).
async fn accepted_times(h: &Harness, page: &str) -> Vec<i64> {
    let messages = h
        .sandbox_get(&format!("/__sandbox/messages?page_id={page}"))
        .await;
    let mut times: Vec<i64> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["token"].is_string())
        .map(|m| m["time_ms"].as_i64().unwrap())
        .collect();
    times.sort_unstable();
    times
}

backend_tests! {
    async fn a_page_whose_budget_is_below_its_rate_slows_down_before_facebook_refuses(db) {
        // Configured at 300/s, but Facebook gives the page 60 calls in any rolling second and
        // refuses it for a minute at the first call past them: otnd must learn the budget from
        // the usage header alone and never reach it.
        let h = Harness::new(&db, 300).await;
        let node = h.start().await;
        let story = h.prepare(&node, 300).await;
        h.faults(json!({"page_capacity_per_second": 60, "capacity_block_ms": 60_000})).await;
        let send = start_send(&node.channel, &story, "below-budget").await;
        wait_until(&node.channel, &send, "the send to complete", |s| {
            s.state() == otnd::pb::SendState::Completed
        })
        .await;
        let p = judge(&h, &node.channel, &send).await;
        assert_eq!(p.sent, 300, "{p:?}");
        assert_eq!(sandbox_stat(&h, "capacity_refused").await, 0, "never refused");
        let metrics = node.metrics().await;
        let budget = page_gauge(&metrics, "otnd_page_budget_calls_per_second", PAGE)
            .expect("the budget is exported");
        assert!((54.0..=62.0).contains(&budget), "budget {budget}");
        let pace = page_gauge(&metrics, "otnd_page_pace_calls_per_second", PAGE).unwrap();
        assert!(pace < budget, "paced under the budget: {pace} of {budget}");
        // No rolling second of the sandbox's clock saw more than the budget.
        let times = accepted_times(&h, PAGE).await;
        for (i, t) in times.iter().enumerate() {
            let in_second = times[i..].iter().take_while(|u| **u < t + 1000).count();
            assert!(in_second <= 60, "{in_second} calls in the second from {t}");
        }
    }

    async fn a_throttle_with_a_regain_time_holds_the_page_until_then(db) {
        let h = Harness::new(&db, 20).await;
        let node = h.start().await;
        let story = h.prepare(&node, 300).await;
        // Every call refused, asking for a minute.
        h.faults(json!({"throttle_rate": 1.0, "throttle_regain_minutes": 1})).await;
        let send = start_send(&node.channel, &story, "held").await;
        eventually(Duration::from_secs(60), "a throttled call", || async {
            (sandbox_stat(&h, "rate_limited").await > 0).then_some(())
        })
        .await;
        let throttled_at = chrono::Utc::now().timestamp_millis();
        let held_from = Instant::now();
        // Facebook would take calls again at once: otnd must wait the minute it was told.
        h.faults(json!({})).await;
        eventually(Duration::from_secs(120), "the send to complete", || async {
            let send = progress_of(&node.channel, &send).await;
            (send.state() == otnd::pb::SendState::Completed).then_some(())
        })
        .await;
        let p = judge(&h, &node.channel, &send).await;
        assert_eq!(p.sent, 20, "{p:?}");
        let first = accepted_times(&h, PAGE).await[0];
        assert!(
            first - throttled_at >= 58_000,
            "the first call after the throttle came {} ms later",
            first - throttled_at
        );
        assert!(held_from.elapsed() >= Duration::from_secs(58));
        // One refusal per call that was in flight when the first came back, not a call a
        // millisecond for the whole minute.
        assert!(sandbox_stat(&h, "rate_limited").await <= 60);
    }

    async fn code_4_slows_every_page_of_the_app(db) {
        const OTHER: &str = "4343";
        let h = Harness::new(&db, 150).await;
        let node = h.start().await;
        let first_story = h.prepare(&node, 300).await;
        let second_story = h.prepare_page(&node, OTHER, 300).await;
        // The app may make 40 calls in any rolling second, both pages together; they are
        // configured for 600.
        h.faults(json!({"app_capacity_per_second": 40})).await;
        let first = start_send(&node.channel, &first_story, "app-a").await;
        let second = start_send(&node.channel, &second_story, "app-b").await;
        for send in [&first, &second] {
            wait_until(&node.channel, send, "the send to complete", |s| {
                s.state() == otnd::pb::SendState::Completed
            })
            .await;
        }
        assert_eq!(judge(&h, &node.channel, &first).await.sent, 150);
        assert_eq!(judge_page(&h, &node.channel, &second, OTHER).await.sent, 150);
        // Without slowing down, 600 calls a second against 40 would be refused fourteen times
        // for every call accepted; every page holds and slows down instead (a code 4 says
        // nothing of the app's budget: each one costs the calls already on their way).
        let refused = sandbox_stat(&h, "app_capacity_refused").await;
        let accepted = sandbox_stat(&h, "accepted").await;
        assert!(refused < 2 * accepted, "{refused} refused, {accepted} accepted");
    }
}
