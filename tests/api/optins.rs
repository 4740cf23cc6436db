//! OptInService through gRPC, with the sandbox as Facebook: RecordOptIn, SendOptInRequest and
//! each of Facebook's refusals, the per-topic ledger, expiry at the one-year boundary, listing.

use otnd::pb::{
    ListOptInsRequest, ListTopicsRequest, OptInState, RecordOptInRequest, SendOptInRequestRequest,
    UpdatePageRequest,
};
use prost_types::Timestamp;
use serde_json::json;
use tonic::Code;

use crate::{
    backend_tests,
    support::{TestApp, spawn_app, violated_fields},
    webhook::topics,
};

const DAY_MS: i64 = 24 * 3600 * 1000;
const YEAR_MS: i64 = 365 * DAY_MS;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn at(ms: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

fn record(
    page_id: &str,
    psid: &str,
    topic: &str,
    token: &str,
    when: Option<i64>,
) -> RecordOptInRequest {
    RecordOptInRequest {
        page_id: page_id.into(),
        psid: psid.into(),
        topic: topic.into(),
        token: token.into(),
        opt_in_time: when.and_then(at),
        ..Default::default()
    }
}

fn opt_in_request(page_id: &str, psid: &str, topic: &str, title: &str) -> SendOptInRequestRequest {
    SendOptInRequestRequest {
        page_id: page_id.into(),
        psid: psid.into(),
        topic: topic.into(),
        title: title.into(),
        ..Default::default()
    }
}

/// The user writes to the page in the sandbox (opening the window there), `age_ms` ago.
async fn user_writes(app: &TestApp, page_id: &str, psid: &str, age_ms: i64) {
    app.sandbox_admin(
        "/__sandbox/interactions",
        json!({"page_id": page_id, "psid": psid, "text": "hi", "time_ms": now_ms() - age_ms, "deliver_webhook": false}),
    )
    .await;
}

async fn faults(app: &TestApp, faults: serde_json::Value) {
    app.sandbox_admin("/__sandbox/faults", faults).await;
}

backend_tests! {
    async fn record_opt_in_is_idempotent_on_the_token(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("100").await;
        let first = app.optins.record_opt_in(record("100", "u1", "Spring Sale!", "tok-1", None))
            .await.unwrap().into_inner();
        assert!(first.created);
        let opt_in = first.opt_in.unwrap();
        assert_eq!((opt_in.topic.as_str(), opt_in.psid.as_str()), ("Spring Sale!", "u1"));
        assert_eq!(opt_in.state(), OptInState::Active);

        let again = app.optins.record_opt_in(record("100", "u1", "Spring Sale!", "tok-1", None))
            .await.unwrap().into_inner();
        assert!(!again.created);
        assert_eq!(again.opt_in.unwrap().opt_in_id, opt_in.opt_in_id);
        assert_eq!(topics(&mut app, "100").await[0].active, 1);
    }

    async fn record_opt_in_refuses_bad_input_and_unknown_pages(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("100").await;
        let status = app.optins.record_opt_in(record("1x", "", "", "", None)).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["page_id", "psid", "topic", "token"]);
        let status = app.optins.record_opt_in(record("100", "u 1", "t", "tok with space", None)).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["psid", "token"]);
        let mut bad_time = record("100", "u1", "t", "tok", None);
        bad_time.opt_in_time = Some(Timestamp { seconds: 1, nanos: -1 });
        assert_eq!(violated_fields(&app.optins.record_opt_in(bad_time).await.unwrap_err()), ["opt_in_time"]);
        let status = app.optins.record_opt_in(record("999", "u1", "t", "tok", None)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert!(topics(&mut app, "100").await.is_empty(), "nothing stored");
    }

    async fn the_ledger_counts_each_state_per_exact_topic(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("200").await;
        let now = now_ms();
        let cases = [
            ("u1", "Spring Sale!", "t1", now),                      // active
            ("u2", "Spring Sale!", "t2", now - 340 * DAY_MS),       // active, expires within 30 days
            ("u3", "Spring Sale!", "t3", now - 366 * DAY_MS),       // expired
            ("u1", "spring sale", "t4", now),                       // another topic
        ];
        for (psid, topic, token, when) in cases {
            app.optins.record_opt_in(record("200", psid, topic, token, Some(when))).await.unwrap();
        }
        let ledger = topics(&mut app, "200").await;
        assert_eq!(ledger.len(), 2);
        let sale = ledger.iter().find(|t| t.topic == "Spring Sale!").unwrap();
        assert_eq!((sale.active, sale.expired, sale.expiring_soon, sale.subscribers), (2, 1, 1, 3));
        assert_eq!((sale.reserved, sale.used, sale.rejected), (0, 0, 0));
        let lower = ledger.iter().find(|t| t.topic == "spring sale").unwrap();
        assert_eq!((lower.active, lower.subscribers), (1, 1));
    }

    async fn an_opt_in_expires_exactly_one_year_after_it_was_given(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("300").await;
        let now = now_ms();
        // Ten seconds either side of the boundary, far beyond the test's own running time.
        app.optins.record_opt_in(record("300", "u1", "t", "inside", Some(now - YEAR_MS + 10_000))).await.unwrap();
        app.optins.record_opt_in(record("300", "u2", "t", "outside", Some(now - YEAR_MS - 10_000))).await.unwrap();
        let ledger = topics(&mut app, "300").await;
        assert_eq!((ledger[0].active, ledger[0].expired), (1, 1));
        let expired = app.optins.list_opt_ins(ListOptInsRequest {
            page_id: "300".into(), state: OptInState::Expired.into(), ..Default::default()
        }).await.unwrap().into_inner().opt_ins;
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].psid, "u2");
        let expiry = expired[0].expire_time.unwrap();
        let opted = expired[0].opt_in_time.unwrap();
        assert_eq!((expiry.seconds - opted.seconds) * 1000, YEAR_MS);
    }

    async fn list_opt_ins_filters_and_pages_without_showing_tokens(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("400").await;
        for i in 0..5 {
            let topic = if i % 2 == 0 { "even" } else { "odd" };
            app.optins.record_opt_in(record("400", &format!("u{i}"), topic, &format!("secret-token-{i}"), None)).await.unwrap();
        }
        let evens = app.optins.list_opt_ins(ListOptInsRequest {
            page_id: "400".into(), topic: "even".into(), ..Default::default()
        }).await.unwrap().into_inner();
        assert_eq!(evens.opt_ins.iter().map(|o| o.psid.as_str()).collect::<Vec<_>>(), ["u0", "u2", "u4"]);
        assert!(!format!("{evens:?}").contains("secret-token"));
        let one = app.optins.list_opt_ins(ListOptInsRequest {
            page_id: "400".into(), psid: "u3".into(), ..Default::default()
        }).await.unwrap().into_inner().opt_ins;
        assert_eq!(one.len(), 1);

        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = app.optins.list_opt_ins(ListOptInsRequest {
                page_id: "400".into(), page_size: 2, page_token: token, ..Default::default()
            }).await.unwrap().into_inner();
            seen.extend(page.opt_ins.into_iter().map(|o| o.psid));
            if page.next_page_token.is_empty() { break; }
            token = page.next_page_token;
        }
        assert_eq!(seen, ["u0", "u1", "u2", "u3", "u4"]);

        let status = app.optins.list_opt_ins(ListOptInsRequest {
            page_id: "400".into(), state: 42, page_token: "bogus".into(), ..Default::default()
        }).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["state", "page_token"]);
    }

    async fn send_opt_in_request_sends_the_template_and_counts_it(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("500").await;
        user_writes(&app, "500", "u1", 0).await;
        let sent = app.optins.send_opt_in_request(opt_in_request("500", "u1", "Spring Sale!", ""))
            .await.unwrap().into_inner();
        assert!(sent.message_id.starts_with("m_"));

        let ledger = app.sandbox_get("/__sandbox/messages?page_id=500&psid=u1").await;
        let payload = &ledger["messages"][0]["message"]["attachment"]["payload"];
        assert_eq!(payload["template_type"], "one_time_notif_req");
        assert_eq!(payload["payload"], "Spring Sale!", "the topic travels as the payload");
        assert_eq!(payload["title"], "Spring Sale!", "the title defaults to the topic");
        assert_eq!(ledger["messages"][0]["message_id"], sent.message_id.as_str());

        let ledger = topics(&mut app, "500").await;
        assert_eq!((ledger[0].topic.as_str(), ledger[0].requests_sent), ("Spring Sale!", 1));
    }

    async fn send_opt_in_request_maps_each_facebook_refusal(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("600").await;
        user_writes(&app, "600", "u1", 0).await;
        app.optins.send_opt_in_request(opt_in_request("600", "u1", "t", "Notify me")).await.unwrap();

        let repeat = app.optins.send_opt_in_request(opt_in_request("600", "u1", "t", "Again")).await.unwrap_err();
        assert_eq!(repeat.code(), Code::AlreadyExists, "{repeat:?}");
        assert!(repeat.message().contains("1893016"), "Facebook's reason is kept: {repeat:?}");

        user_writes(&app, "600", "u2", 2 * DAY_MS).await;
        let outside = app.optins.send_opt_in_request(opt_in_request("600", "u2", "t", "x")).await.unwrap_err();
        assert_eq!(outside.code(), Code::FailedPrecondition);
        assert!(outside.message().contains("message the page first"), "{outside:?}");

        let stranger = app.optins.send_opt_in_request(opt_in_request("600", "nobody", "t", "x")).await.unwrap_err();
        assert_eq!(stranger.code(), Code::NotFound, "{stranger:?}");

        faults(&app, json!({"throttle_rate": 1.0})).await;
        let throttled = app.optins.send_opt_in_request(opt_in_request("600", "u1", "u", "x")).await.unwrap_err();
        assert_eq!(throttled.code(), Code::ResourceExhausted, "{throttled:?}");

        faults(&app, json!({"error_rate": 1.0})).await;
        let failed = app.optins.send_opt_in_request(opt_in_request("600", "u1", "u", "x")).await.unwrap_err();
        assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");

        faults(&app, json!({"restricted_pages": ["600"]})).await;
        let restricted = app.optins.send_opt_in_request(opt_in_request("600", "u1", "u", "x")).await.unwrap_err();
        assert_eq!(restricted.code(), Code::FailedPrecondition);
        assert!(restricted.message().contains("1893063"), "{restricted:?}");

        faults(&app, json!({})).await;
        app.pages.update_page(UpdatePageRequest {
            page_id: "600".into(), access_token: Some("EAAB-revoked".into()), ..Default::default()
        }).await.unwrap();
        let revoked = app.optins.send_opt_in_request(opt_in_request("600", "u1", "u", "x")).await.unwrap_err();
        assert_eq!(revoked.code(), Code::FailedPrecondition);
        assert!(revoked.message().contains("access token") && revoked.message().contains("190"), "{revoked:?}");

        // Only the one successful request was counted.
        let ledger = app.optins.list_topics(ListTopicsRequest { page_id: "600".into() })
            .await.unwrap().into_inner().topics;
        assert_eq!(ledger.iter().map(|t| t.requests_sent).sum::<u64>(), 1);
    }

    async fn send_opt_in_request_validates_before_calling_facebook(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("700").await;
        let long_topic = "t".repeat(201);
        let status = app.optins.send_opt_in_request(opt_in_request("700", "", &long_topic, &"x".repeat(66)))
            .await.unwrap_err();
        assert_eq!(violated_fields(&status), ["psid", "topic", "title"]);
        let status = app.optins.send_opt_in_request(opt_in_request("700", "u1", &"t".repeat(66), ""))
            .await.unwrap_err();
        assert_eq!(violated_fields(&status), ["title"]);
        assert!(status.message().contains("required when the topic is longer than 65"));
        let status = app.optins.send_opt_in_request(opt_in_request("799", "u1", "t", "x")).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let stats = app.sandbox_get("/__sandbox/stats").await;
        assert_eq!(stats["accepted"].as_u64().unwrap() + stats["rejected"].as_u64().unwrap(), 0);
    }
}
