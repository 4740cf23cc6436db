//! StoryService: content rules at their boundaries with field paths, topic warnings, preview
//! through the sandbox, the review kept or cleared, StartSend's gate, and audience estimates.

use otnd::pb::{
    Button, ButtonTemplate, ButtonType, CreateSegmentRequest, CreateStoryRequest,
    DeleteSegmentRequest, DeleteStoryRequest, DeleteSubscriberRequest, EstimateAudienceRequest,
    EstimateAudienceResponse, GetStoryRequest, ListStoriesRequest, PreviewStoryRequest,
    RecordInteractionRequest, RecordOptInRequest, SegmentRule, StartSendRequest, Story,
    StoryContent, TagSubscribersRequest, UpdateStoryRequest, story_content::Kind,
};
use prost_types::Timestamp;
use serde_json::{Value, json};
use tonic::Code;

use crate::{
    backend_tests,
    support::{TestApp, spawn_app, violated_fields},
    webhook::wait_for_active,
};

const PAGE: &str = "100";
const DAY_MS: i64 = 24 * 3600 * 1000;

fn text(body: &str) -> Option<StoryContent> {
    Some(StoryContent {
        kind: Some(Kind::Text(body.into())),
    })
}

fn button(kind: ButtonType, title: &str, url: &str, payload: &str) -> Button {
    Button {
        r#type: kind.into(),
        title: title.into(),
        url: url.into(),
        payload: payload.into(),
    }
}

fn template(body: &str, buttons: Vec<Button>) -> Option<StoryContent> {
    Some(StoryContent {
        kind: Some(Kind::ButtonTemplate(ButtonTemplate {
            text: body.into(),
            buttons,
        })),
    })
}

fn postback(title: &str) -> Button {
    button(ButtonType::Postback, title, "", "LATER")
}

fn story_request(topic: &str, content: Option<StoryContent>) -> CreateStoryRequest {
    CreateStoryRequest {
        page_id: PAGE.into(),
        topic: topic.into(),
        content,
        ..Default::default()
    }
}

async fn create(app: &mut TestApp, request: CreateStoryRequest) -> (Story, Vec<String>) {
    let response = app
        .stories
        .create_story(request)
        .await
        .unwrap()
        .into_inner();
    (response.story.unwrap(), response.warnings)
}

async fn get(app: &mut TestApp, story_id: &str) -> Story {
    app.stories
        .get_story(GetStoryRequest {
            story_id: story_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .story
        .unwrap()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn opt_in(app: &mut TestApp, psid: &str, topic: &str, age_ms: i64) {
    let at = now_ms() - age_ms;
    app.optins
        .record_opt_in(RecordOptInRequest {
            page_id: PAGE.into(),
            psid: psid.into(),
            topic: topic.into(),
            token: format!("tok-{psid}-{topic}-{at}"),
            opt_in_time: Some(Timestamp {
                seconds: at / 1000,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The reviewer wrote to the page in the sandbox `age_ms` ago.
async fn reviewer_writes(app: &TestApp, psid: &str, age_ms: i64) {
    app.sandbox_admin(
        "/__sandbox/interactions",
        json!({"page_id": PAGE, "psid": psid,
        "text": "ready", "time_ms": now_ms() - age_ms, "deliver_webhook": false}),
    )
    .await;
}

async fn preview(
    app: &mut TestApp,
    story_id: &str,
    reviewer: &str,
) -> Result<Story, tonic::Status> {
    app.stories
        .preview_story(PreviewStoryRequest {
            story_id: story_id.into(),
            reviewer_psid: reviewer.into(),
        })
        .await
        .map(|r| r.into_inner().story.unwrap())
}

async fn estimate(app: &mut TestApp, story_id: &str) -> EstimateAudienceResponse {
    app.stories
        .estimate_audience(EstimateAudienceRequest {
            story_id: story_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

backend_tests! {
    async fn content_rules_sit_at_facebooks_limits(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        // Inclusive limits, counted in characters (emoji and accents are one each).
        create(&mut app, story_request("t", text(&"🎉".repeat(2000)))).await;
        create(&mut app, story_request("t", template(&"é".repeat(640), vec![
            button(ButtonType::WebUrl, &"x".repeat(20), "https://example.com/tickets", ""),
            postback("Later"),
            button(ButtonType::PhoneNumber, "Call", "", "+15105551234"),
        ]))).await;

        let cases: Vec<(Option<StoryContent>, Vec<&str>)> = vec![
            (text(&"é".repeat(2001)), vec!["content.text"]),
            (text(""), vec!["content.text"]),
            (None, vec!["content"]),
            (template("t", vec![postback("a"), postback("b"), postback("c"), postback("d")]),
                vec!["content.button_template.buttons"]),
            (template("t", vec![]), vec!["content.button_template.buttons"]),
            (template("t", vec![postback(&"x".repeat(21))]), vec!["content.button_template.buttons[0].title"]),
            (template("t", vec![postback("ok"), button(ButtonType::WebUrl, "Go", "example.com/x", "")]),
                vec!["content.button_template.buttons[1].url"]),
            (template("t", vec![button(ButtonType::PhoneNumber, "Call", "", "5105551234")]),
                vec!["content.button_template.buttons[0].payload"]),
            (template("t", vec![button(ButtonType::Unspecified, "x", "", "")]),
                vec!["content.button_template.buttons[0].type"]),
            (template(&"x".repeat(641), vec![postback(&"y".repeat(21))]),
                vec!["content.button_template.text", "content.button_template.buttons[0].title"]),
        ];
        for (content, fields) in cases {
            let status = app.stories.create_story(story_request("t", content.clone())).await.unwrap_err();
            assert_eq!(violated_fields(&status), fields, "{content:?}");
            assert!(status.message().contains("at most") || status.message().contains("must") || status.message().contains("required"));
        }
        let status = app.stories.create_story(CreateStoryRequest {
            page_id: "999".into(), ..story_request("t", text("x")) }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }

    async fn topic_warnings_name_near_misses_with_their_counts(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        app.sandbox_admin("/__sandbox/optins", json!({"page_id": PAGE, "psid_prefix": "fan-",
            "count": 1204, "payload": "Spring Sale!"})).await;
        wait_for_active(&mut app, PAGE, "Spring Sale!", 1204).await;

        let (_, warnings) = create(&mut app, story_request("spring sale", text("x"))).await;
        assert_eq!(warnings, ["no opt-ins for 'spring sale'; did you mean 'Spring Sale!' (1,204 active)?"]);
        let (_, warnings) = create(&mut app, story_request("Spring Sale!", text("x"))).await;
        assert!(warnings.is_empty());
        let (story, warnings) = create(&mut app, story_request("Winter", text("x"))).await;
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("no opt-ins for 'Winter' yet"), "{warnings:?}");
        // Stored exactly as given, warning or not.
        assert_eq!(story.topic, "Winter");
    }

    async fn preview_sends_the_exact_content_to_the_reviewer_without_a_token(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        opt_in(&mut app, "fan", "Sale", 0).await;
        let content = template("Tickets are on sale!", vec![
            button(ButtonType::WebUrl, "Buy", "https://example.com/t", ""), postback("Later")]);
        let (story, _) = create(&mut app, story_request("Sale", content.clone())).await;
        assert!(!story.reviewed);

        reviewer_writes(&app, "boss", 0).await;
        let reviewed = preview(&mut app, &story.story_id, "boss").await.unwrap();
        assert!(reviewed.reviewed);
        assert_eq!(reviewed.reviewer_psid, "boss");
        assert!(reviewed.review_time.is_some());
        assert_eq!(reviewed.content, content);

        let ledger = app.sandbox_get(&format!("/__sandbox/messages?page_id={PAGE}&psid=boss")).await;
        let message = &ledger["messages"][0];
        assert_eq!(message["token"], Value::Null, "a standard message, never a token");
        assert_eq!(message["message"], json!({"attachment": {"type": "template", "payload": {
            "template_type": "button", "text": "Tickets are on sale!", "buttons": [
                {"type": "web_url", "title": "Buy", "url": "https://example.com/t"},
                {"type": "postback", "title": "Later", "payload": "LATER"}]}}}));
        let stats = app.sandbox_get("/__sandbox/stats").await;
        assert_eq!(stats["token_presentations"], 0);
        assert_eq!(estimate(&mut app, &story.story_id).await.token_recipients, 1, "the opt-in is untouched");
    }

    async fn a_reviewer_outside_the_window_is_told_to_message_the_page(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        let (story, _) = create(&mut app, story_request("Sale", text("hello"))).await;
        reviewer_writes(&app, "late", 2 * DAY_MS).await;
        let status = preview(&mut app, &story.story_id, "late").await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("message the page first"), "{status:?}");
        assert!(!get(&mut app, &story.story_id).await.reviewed);
        let status = preview(&mut app, &story.story_id, "").await.unwrap_err();
        assert_eq!(violated_fields(&status), ["reviewer_psid"]);
    }

    async fn edits_clear_the_review_and_audience_changes_keep_it(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        let segment = app.audience.create_segment(CreateSegmentRequest {
            page_id: PAGE.into(), name: "vips".into(),
            rule: Some(SegmentRule { all_tags: vec!["vip".into()], ..Default::default() }),
        }).await.unwrap().into_inner().segment.unwrap();
        let (story, _) = create(&mut app, story_request("Sale", text("v1"))).await;
        reviewer_writes(&app, "boss", 0).await;
        preview(&mut app, &story.story_id, "boss").await.unwrap();

        let update = |changes: UpdateStoryRequest| {
            let mut stories = app.stories.clone();
            let id = story.story_id.clone();
            async move {
                stories.update_story(UpdateStoryRequest { story_id: id, ..changes })
                    .await.map(|r| r.into_inner().story.unwrap())
            }
        };
        let kept = update(UpdateStoryRequest { include_window_users: Some(true), segment_id: Some(segment.segment_id.clone()),
            topic: Some("Sale 2".into()), ..Default::default() }).await.unwrap();
        assert!(kept.reviewed, "audience changes keep the review");
        assert_eq!((kept.topic.as_str(), kept.segment_id.as_str()), ("Sale 2", segment.segment_id.as_str()));

        let edited = update(UpdateStoryRequest { content: text("v2"), ..Default::default() }).await.unwrap();
        assert!(!edited.reviewed, "a content change clears the review");
        let start = app.sends.start_send(StartSendRequest { story_id: story.story_id.clone(), request_id: "r1".into() })
            .await.unwrap_err();
        assert_eq!(start.code(), Code::FailedPrecondition);
        assert!(start.message().contains("changed after boss reviewed it") && start.message().contains("PreviewStory"), "{start:?}");

        let status = update(UpdateStoryRequest::default()).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["update"]);
        let status = update(UpdateStoryRequest { content: text(""), ..Default::default() }).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["content.text"]);

        // The segment is in use: it cannot be deleted from under the story.
        let status = app.audience.delete_segment(DeleteSegmentRequest { segment_id: segment.segment_id.clone() })
            .await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("used by a story"), "{status:?}");
        update(UpdateStoryRequest { segment_id: Some(String::new()), ..Default::default() }).await.unwrap();
        app.audience.delete_segment(DeleteSegmentRequest { segment_id: segment.segment_id }).await.unwrap();
    }

    async fn start_send_refuses_a_story_never_reviewed(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        let (story, _) = create(&mut app, story_request("Sale", text("hello"))).await;
        let status = app.sends.start_send(StartSendRequest { story_id: story.story_id.clone(), request_id: "r1".into() })
            .await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("never been reviewed"), "{status:?}");
        let status = app.sends.start_send(StartSendRequest { story_id: story.story_id.clone(), request_id: String::new() })
            .await.unwrap_err();
        assert_eq!(violated_fields(&status), ["request_id"]);
        let status = app.sends.start_send(StartSendRequest { story_id: "nope".into(), request_id: "r".into() })
            .await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        // Refused requests stored nothing.
        let listed = app.sends.list_sends(otnd::pb::ListSendsRequest { page_id: PAGE.into(), ..Default::default() })
            .await.unwrap().into_inner().sends;
        assert!(listed.is_empty(), "{listed:?}");
        assert_eq!(get(&mut app, &story.story_id).await.state(), otnd::pb::StoryState::Draft);
        // Once reviewed it passes the gate, and the story is locked.
        reviewer_writes(&app, "boss", 0).await;
        preview(&mut app, &story.story_id, "boss").await.unwrap();
        let send = app.sends.start_send(StartSendRequest { story_id: story.story_id.clone(), request_id: "r1".into() })
            .await.unwrap().into_inner().send.unwrap();
        assert_eq!(send.story_id, story.story_id);
        assert_eq!(get(&mut app, &story.story_id).await.state(), otnd::pb::StoryState::Sent);
    }

    async fn estimates_count_tokens_window_users_expiry_and_segments(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        opt_in(&mut app, "a", "Sale", 0).await;
        opt_in(&mut app, "a", "Sale", DAY_MS).await;          // a second opt-in: still one recipient
        opt_in(&mut app, "b", "Sale", 0).await;
        opt_in(&mut app, "c", "Sale", 0).await;
        opt_in(&mut app, "d", "Sale", 366 * DAY_MS).await;    // only an expired one
        opt_in(&mut app, "e", "Other", 0).await;              // another topic, but inside the window
        app.audience.record_interaction(RecordInteractionRequest { page_id: PAGE.into(), psid: "w".into(), interaction_time: None })
            .await.unwrap();
        app.audience.tag_subscribers(TagSubscribersRequest { page_id: PAGE.into(),
            psids: vec!["a".into(), "b".into(), "w".into()], add_tags: vec!["vip".into()], remove_tags: vec![] }).await.unwrap();
        app.audience.tag_subscribers(TagSubscribersRequest { page_id: PAGE.into(),
            psids: vec!["b".into()], add_tags: vec!["churned".into()], remove_tags: vec![] }).await.unwrap();

        let (plain, _) = create(&mut app, story_request("Sale", text("x"))).await;
        let counts = estimate(&mut app, &plain.story_id).await;
        assert_eq!((counts.token_recipients, counts.window_recipients, counts.excluded_expired, counts.excluded_by_segment), (3, 0, 1, 0));

        let (windowed, _) = create(&mut app, CreateStoryRequest { include_window_users: true, ..story_request("Sale", text("x")) }).await;
        // Inside the window without a usable opt-in on the topic: e (another topic) and w; d's
        // last interaction was its opt-in, a year ago.
        assert_eq!(estimate(&mut app, &windowed.story_id).await.window_recipients, 2);

        let segment = app.audience.create_segment(CreateSegmentRequest { page_id: PAGE.into(), name: "loyal".into(),
            rule: Some(SegmentRule { all_tags: vec!["vip".into()], none_tags: vec!["churned".into()], ..Default::default() }) })
            .await.unwrap().into_inner().segment.unwrap();
        let (aimed, _) = create(&mut app, CreateStoryRequest { include_window_users: true, segment_id: segment.segment_id,
            ..story_request("Sale", text("x")) }).await;
        let counts = estimate(&mut app, &aimed.story_id).await;
        assert_eq!((counts.token_recipients, counts.window_recipients, counts.excluded_by_segment), (1, 1, 2), "a; w; b and c");

        app.audience.delete_subscriber(DeleteSubscriberRequest { page_id: PAGE.into(), psid: "a".into() }).await.unwrap();
        assert_eq!(estimate(&mut app, &plain.story_id).await.token_recipients, 2, "an erased subscriber is skipped");
    }

    async fn stories_are_listed_fetched_and_deleted(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        let mut ids = Vec::new();
        for topic in ["a", "b", "a"] {
            ids.push(create(&mut app, story_request(topic, text("x"))).await.0.story_id);
        }
        let only_a = app.stories.list_stories(ListStoriesRequest { page_id: PAGE.into(), topic: "a".into(), ..Default::default() })
            .await.unwrap().into_inner().stories;
        assert_eq!(only_a.len(), 2);
        let first = app.stories.list_stories(ListStoriesRequest { page_id: PAGE.into(), page_size: 2, ..Default::default() })
            .await.unwrap().into_inner();
        assert_eq!(first.stories.len(), 2);
        let rest = app.stories.list_stories(ListStoriesRequest { page_id: PAGE.into(), page_size: 2,
            page_token: first.next_page_token, ..Default::default() }).await.unwrap().into_inner();
        assert_eq!(rest.stories.len(), 1);

        app.stories.delete_story(DeleteStoryRequest { story_id: ids[0].clone() }).await.unwrap();
        let gone = app.stories.get_story(GetStoryRequest { story_id: ids[0].clone() }).await.unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
        let status = app.stories.get_story(GetStoryRequest { story_id: String::new() }).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["story_id"]);
    }

    async fn a_sent_story_can_no_longer_be_edited_or_deleted(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        let (story, _) = create(&mut app, story_request("Sale", text("x"))).await;
        // The state the send engine gives a story when its first send starts.
        let settings = crate::support::settings_for(&db, &[]).unwrap();
        let store = otnd::store::Store::connect(&settings.database_url).await.unwrap();
        use sea_orm::ConnectionTrait;
        store.db.execute_unprepared(&format!("UPDATE stories SET state = 'sent' WHERE id = '{}'", story.story_id))
            .await.unwrap();
        store.close().await;

        let edit = app.stories.update_story(UpdateStoryRequest {
            story_id: story.story_id.clone(), content: text("y"), ..Default::default() }).await.unwrap_err();
        assert_eq!(edit.code(), Code::FailedPrecondition);
        assert!(edit.message().contains("has been sent"), "{edit:?}");
        let delete = app.stories.delete_story(DeleteStoryRequest { story_id: story.story_id.clone() }).await.unwrap_err();
        assert_eq!(delete.code(), Code::FailedPrecondition);
        assert_eq!(get(&mut app, &story.story_id).await.state(), otnd::pb::StoryState::Sent);
    }
}
