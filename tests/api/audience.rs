//! AudienceService: interactions and the window, tags, segments, and erasing a subscriber.

use otnd::pb::{
    CreateSegmentRequest, DeleteSegmentRequest, DeleteSubscriberRequest, GetSubscriberRequest,
    ListOptInsRequest, ListSegmentsRequest, RecordInteractionRequest, RecordOptInRequest,
    SegmentRule, Subscriber, TagSubscribersRequest,
};
use prost_types::Timestamp;
use tonic::Code;

use crate::{
    backend_tests,
    support::{TestApp, spawn_app, violated_fields},
    webhook::topics,
};

const DAY_MS: i64 = 24 * 3600 * 1000;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn interact(app: &mut TestApp, psid: &str, at_ms: i64) -> Subscriber {
    app.audience
        .record_interaction(RecordInteractionRequest {
            page_id: "100".into(),
            psid: psid.into(),
            interaction_time: Some(Timestamp {
                seconds: at_ms / 1000,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .subscriber
        .unwrap()
}

async fn get(app: &mut TestApp, psid: &str) -> Result<Subscriber, tonic::Status> {
    app.audience
        .get_subscriber(GetSubscriberRequest {
            page_id: "100".into(),
            psid: psid.into(),
        })
        .await
        .map(|r| r.into_inner().subscriber.unwrap())
}

async fn tag(
    app: &mut TestApp,
    psids: &[&str],
    add: &[&str],
    remove: &[&str],
) -> Result<u32, tonic::Status> {
    let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
    app.audience
        .tag_subscribers(TagSubscribersRequest {
            page_id: "100".into(),
            psids: strings(psids),
            add_tags: strings(add),
            remove_tags: strings(remove),
        })
        .await
        .map(|r| r.into_inner().updated)
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn rule(all: &[&str], any: &[&str], none: &[&str]) -> Option<SegmentRule> {
    let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
    Some(SegmentRule {
        all_tags: strings(all),
        any_tags: strings(any),
        none_tags: strings(none),
    })
}

backend_tests! {
    async fn interactions_open_the_window_and_never_move_it_back(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("100").await;
        let now = now_ms();
        let subscriber = interact(&mut app, "u1", now).await;
        assert!(subscriber.window_open);
        let close = subscriber.window_close_time.unwrap();
        assert_eq!(close.seconds, now / 1000 + DAY_MS / 1000);

        let after_old = interact(&mut app, "u1", now - 3 * DAY_MS).await;
        assert!(after_old.window_open, "an older interaction does not close the window");
        assert_eq!(after_old.last_interaction_time.unwrap().seconds, now / 1000);

        let stale = interact(&mut app, "u2", now - 2 * DAY_MS).await;
        assert!(!stale.window_open, "two days ago is outside the window");

        assert_eq!(get(&mut app, "nobody").await.unwrap_err().code(), Code::NotFound);
        let status = app.audience.record_interaction(RecordInteractionRequest {
            page_id: "999".into(), psid: "u1".into(), interaction_time: None,
        }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }

    async fn tags_are_added_and_removed_for_many_subscribers(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("100").await;
        assert_eq!(tag(&mut app, &["u1", "u2", "u3"], &["vip", "fr"], &[]).await.unwrap(), 3);
        assert_eq!(tag(&mut app, &["u1", "u2"], &["vip"], &[]).await.unwrap(), 0, "already tagged");
        assert_eq!(tag(&mut app, &["u1"], &[], &["fr"]).await.unwrap(), 1);
        assert_eq!(get(&mut app, "u1").await.unwrap().tags, ["vip"]);
        assert_eq!(get(&mut app, "u2").await.unwrap().tags, ["fr", "vip"]);
        // Tagging someone who never wrote makes them a known subscriber, outside the window.
        let u3 = get(&mut app, "u3").await.unwrap();
        assert!(!u3.window_open && u3.last_interaction_time.is_none());

        let status = tag(&mut app, &[], &[], &[]).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["psids", "add_tags"]);
        let status = tag(&mut app, &["u1"], &["a", " b"], &["a"]).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["add_tags[1]", "remove_tags"]);
    }

    async fn segments_are_created_listed_and_deleted(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("100").await;
        let segment = app.audience.create_segment(CreateSegmentRequest {
            page_id: "100".into(), name: "French VIPs".into(), rule: rule(&["vip", "fr"], &[], &["churned"]),
        }).await.unwrap().into_inner().segment.unwrap();
        assert_eq!(segment.rule.clone().unwrap().all_tags, ["fr", "vip"]);
        let duplicate = app.audience.create_segment(CreateSegmentRequest {
            page_id: "100".into(), name: "French VIPs".into(), rule: rule(&["x"], &[], &[]),
        }).await.unwrap_err();
        assert_eq!(duplicate.code(), Code::AlreadyExists);
        app.audience.create_segment(CreateSegmentRequest {
            page_id: "100".into(), name: "Anyone tagged".into(), rule: rule(&[], &["a", "b"], &[]),
        }).await.unwrap();

        let listed = app.audience.list_segments(ListSegmentsRequest {
            page_id: "100".into(), page_size: 1, ..Default::default()
        }).await.unwrap().into_inner();
        assert_eq!(listed.segments[0].name, "Anyone tagged");
        let rest = app.audience.list_segments(ListSegmentsRequest {
            page_id: "100".into(), page_size: 1, page_token: listed.next_page_token,
        }).await.unwrap().into_inner();
        assert_eq!(rest.segments[0].name, "French VIPs");
        assert!(rest.next_page_token.is_empty());

        app.audience.delete_segment(DeleteSegmentRequest { segment_id: segment.segment_id.clone() }).await.unwrap();
        let again = app.audience.delete_segment(DeleteSegmentRequest { segment_id: segment.segment_id }).await;
        assert_eq!(again.unwrap_err().code(), Code::NotFound);
    }

    async fn segment_rules_are_validated(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("100").await;
        for (name, rule, fields) in [
            ("", rule(&["a"], &[], &[]), vec!["name"]),
            ("empty", rule(&[], &[], &[]), vec!["rule"]),
            ("empty", None, vec!["rule"]),
            ("contradiction", rule(&["vip"], &[], &["vip"]), vec!["rule.none_tags"]),
            ("bad tag", rule(&[""], &[], &[]), vec!["rule.all_tags[0]"]),
        ] {
            let status = app.audience.create_segment(CreateSegmentRequest {
                page_id: "100".into(), name: name.into(), rule,
            }).await.unwrap_err();
            assert_eq!(violated_fields(&status), fields, "{name}");
        }
        let status = app.audience.create_segment(CreateSegmentRequest {
            page_id: "999".into(), name: "x".into(), rule: rule(&["a"], &[], &[]),
        }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }

    async fn deleting_a_subscriber_erases_their_opt_ins_and_data(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("100").await;
        for (psid, token) in [("u1", "tok-1"), ("u1", "tok-2"), ("u2", "tok-3")] {
            app.optins.record_opt_in(RecordOptInRequest {
                page_id: "100".into(), psid: psid.into(), topic: "Sale".into(), token: token.into(), opt_in_time: None,
                ..Default::default()
            }).await.unwrap();
        }
        tag(&mut app, &["u1"], &["vip"], &[]).await.unwrap();
        let subscriber = get(&mut app, "u1").await.unwrap();
        assert_eq!(subscriber.topics[0].active, 2);

        let erased = app.audience.delete_subscriber(DeleteSubscriberRequest {
            page_id: "100".into(), psid: "u1".into(),
        }).await.unwrap().into_inner();
        assert_eq!(erased.opt_ins_deleted, 2);
        assert_eq!(get(&mut app, "u1").await.unwrap_err().code(), Code::NotFound);
        let left = app.optins.list_opt_ins(ListOptInsRequest { page_id: "100".into(), ..Default::default() })
            .await.unwrap().into_inner().opt_ins;
        assert_eq!(left.iter().map(|o| o.psid.as_str()).collect::<Vec<_>>(), ["u2"]);
        assert_eq!(topics(&mut app, "100").await[0].active, 1);

        let again = app.audience.delete_subscriber(DeleteSubscriberRequest {
            page_id: "100".into(), psid: "u1".into(),
        }).await.unwrap_err();
        assert_eq!(again.code(), Code::NotFound);
    }

    async fn tag_counts_are_bounded_and_a_big_call_within_them_works(db) {
        let mut app = spawn_app(&db).await;
        app.register_page("100").await;
        let many = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
        // A rule of 1,200 tags answered INTERNAL at EstimateAudience: refused up front now,
        // naming the rule and the limit, and nothing is stored.
        let status = app.audience.create_segment(CreateSegmentRequest {
            page_id: "100".into(), name: "huge".into(),
            rule: rule(&as_refs(&many("t", 1200)), &[], &[]),
        }).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["rule"]);
        assert!(status.message().contains("at most 50 tags"), "{status:?}");
        let listed = app.audience.list_segments(ListSegmentsRequest {
            page_id: "100".into(), ..Default::default()
        }).await.unwrap().into_inner().segments;
        assert!(listed.is_empty());
        // 400 users by 100 tags (40,000 rows) answered INTERNAL past the database's bound
        // parameters: within the limit it works, one more tag is refused.
        let users = many("u", 400);
        let tags = many("tag-", 100);
        let updated = tag(&mut app, &as_refs(&users), &as_refs(&tags), &[]).await.unwrap();
        assert_eq!(updated, 400);
        assert_eq!(get(&mut app, "u399").await.unwrap().tags.len(), 100);
        let status = tag(&mut app, &as_refs(&users), &as_refs(&many("more-", 101)), &[])
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["add_tags"]);
        assert!(status.message().contains("at most 100 tags"), "{status:?}");
        // The largest rule allowed, over those users.
        let segment = app.audience.create_segment(CreateSegmentRequest {
            page_id: "100".into(), name: "fifty".into(),
            rule: rule(&as_refs(&tags[..40]), &as_refs(&tags[40..45]), &as_refs(&many("none-", 5))),
        }).await.unwrap().into_inner().segment.unwrap();
        assert_eq!(segment.rule.unwrap().all_tags.len(), 40);
    }
}
