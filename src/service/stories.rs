//! Stories as use cases: write one for a topic (aimed at a segment, with or without window
//! users), change it until it is sent, review it in a reviewer's Messenger, estimate whom it
//! reaches. Plain async functions over domain and store types: the gRPC handlers only translate
//! (see `api::stories`).

use super::{GraphContext as Context, ServiceError, ensure_page};
use crate::{
    domain::{PageId, Psid, StoryContent, TokenKind, Topic, Violations},
    graph::Recipient,
    store::{
        StoreError, audience, now_ms, optins, pages,
        stories::{self, AudienceEstimate, NewStory, StoryChanges},
    },
};

/// A new story, its fields checked.
pub struct NewStoryRequest {
    pub page_id: PageId,
    pub topic: Topic,
    pub content: StoryContent,
    pub include_window_users: bool,
    /// Every kind when empty.
    pub token_kinds: Vec<TokenKind>,
    pub segment_id: Option<String>,
}

/// A change to a story: each field `None` is left as it is; `segment_id: Some(None)` removes
/// the segment. At least one field is set.
pub struct StoryUpdate {
    pub topic: Option<Topic>,
    pub content: Option<StoryContent>,
    pub include_window_users: Option<bool>,
    pub token_kinds: Option<Vec<TokenKind>>,
    pub segment_id: Option<Option<String>>,
}

impl StoryUpdate {
    pub fn parse(
        topic: Option<Result<Topic, String>>,
        content: Option<Result<StoryContent, Violations>>,
        include_window_users: Option<bool>,
        segment_id: Option<String>,
        token_kinds: Option<Result<Vec<TokenKind>, String>>,
    ) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let nothing = topic.is_none()
            && content.is_none()
            && include_window_users.is_none()
            && segment_id.is_none()
            && token_kinds.is_none();
        let topic = topic.map(|t| v.check("topic", t));
        let token_kinds = token_kinds.map(|k| v.check("token_kinds.kinds", k));
        let content = content.map(|c| c.map_err(|more| v.0.extend(more.0)).ok());
        if nothing {
            v.add(
                "update",
                "sets no field to change (topic, content, include_window_users, segment_id, \
                 token_kinds)",
            );
        }
        let (topic, content, token_kinds) = v.finish(|| {
            Some((
                topic.map(Option::unwrap),
                content.map(Option::unwrap),
                token_kinds.map(Option::unwrap),
            ))
        })?;
        Ok(StoryUpdate {
            topic,
            content,
            include_window_users,
            token_kinds,
            segment_id: segment_id.map(|s| (!s.is_empty()).then_some(s)),
        })
    }
}

/// A story and what its author should know of its topic (warnings, not errors: opt-ins may
/// still be coming).
pub struct Written {
    pub story: stories::Model,
    pub warnings: Vec<String>,
}

pub async fn create(cx: &Context, request: NewStoryRequest) -> Result<Written, ServiceError> {
    ensure_page(&cx.store, &request.page_id).await?;
    let segment_id = request.segment_id.as_deref();
    if let Some(segment_id) = segment_id {
        check_segment(cx, &request.page_id, segment_id).await?;
    }
    let story = stories::create(
        &cx.store.db,
        NewStory {
            page_id: &request.page_id,
            topic: request.topic.as_str(),
            content: &request.content,
            include_window_users: request.include_window_users,
            token_kinds: &request.token_kinds,
            segment_id,
        },
        now_ms(),
    )
    .await
    .map_err(ServiceError::internal)?;
    let warnings = topic_warnings(cx, &request.page_id, &story.topic).await?;
    tracing::info!(story_id = %story.id, warnings = warnings.len(), "story created");
    Ok(Written { story, warnings })
}

pub async fn get(cx: &Context, story_id: &str) -> Result<stories::Model, ServiceError> {
    if story_id.is_empty() {
        return Err(Violations::single("story_id", "is required").into());
    }
    let story = stories::get(&cx.store.read, story_id)
        .await
        .map_err(|e| ServiceError::from_store(e, || format!("story {story_id}")))?;
    tracing::Span::current().record("page_id", story.page_id.as_str());
    Ok(story)
}

/// Changes a story not yet sent; a change of topic or content clears its review. `update` as
/// parsed: a sent story is refused before its update's problems are reported.
pub async fn update(
    cx: &Context,
    story_id: &str,
    update: Result<StoryUpdate, Violations>,
) -> Result<Written, ServiceError> {
    let current = get(cx, story_id).await?;
    refuse_if_sent(&current, "edited")?;
    let update = update?;
    let page_id = PageId::from_trusted(current.page_id.clone());
    if let Some(Some(segment_id)) = &update.segment_id {
        check_segment(cx, &page_id, segment_id).await?;
    }
    let changes = StoryChanges {
        topic: update.topic.as_ref().map(Topic::as_str),
        content: update.content.as_ref(),
        include_window_users: update.include_window_users,
        token_kinds: update.token_kinds.as_deref(),
        segment_id: update.segment_id.as_ref().map(Option::as_deref),
    };
    let story = stories::update(&cx.store.db, &current, &changes, now_ms())
        .await
        .map_err(|e| ServiceError::from_store(e, || format!("story {}", current.id)))?;
    let warnings = topic_warnings(cx, &page_id, &story.topic).await?;
    Ok(Written { story, warnings })
}

/// Deletes a story not yet sent.
pub async fn delete(cx: &Context, story_id: &str) -> Result<(), ServiceError> {
    let story = get(cx, story_id).await?;
    refuse_if_sent(&story, "deleted")?;
    stories::delete(&cx.store.db, &story)
        .await
        .map_err(|e| ServiceError::from_store(e, || format!("story {}", story.id)))
}

/// Sends the story's current content to the reviewer as a standard message (never a token,
/// never counted against the topic) and records the review of exactly that content. The
/// reviewed story and Facebook's message id.
pub async fn preview(
    cx: &Context,
    story_id: &str,
    reviewer: &Psid,
) -> Result<(stories::Model, String), ServiceError> {
    let story = get(cx, story_id).await?;
    let page_id = PageId::from_trusted(story.page_id.clone());
    let credentials = pages::credentials(&cx.store.db, &cx.cipher, &page_id)
        .await
        .map_err(|e| ServiceError::from_store(e, || format!("page {page_id}")))?;
    let delivered = cx
        .graph
        .send(
            &credentials,
            Recipient::Psid(reviewer.as_str()),
            &story.graph_message(),
        )
        .await
        .map_err(ServiceError::Graph)?;
    let story = stories::record_review(
        &cx.store.db,
        &story.id,
        &story.content_hash,
        reviewer.as_str(),
        now_ms(),
    )
    .await
    .map_err(|e| match e {
        StoreError::Conflict => ServiceError::FailedPrecondition(format!(
            "story {} changed while the preview was sent; preview it again",
            story.id
        )),
        e => ServiceError::internal(e),
    })?;
    tracing::info!(story_id = %story.id, message_id = %delivered.message_id, "story reviewed");
    Ok((story, delivered.message_id))
}

/// Whom a send of the story would reach now.
pub async fn estimate(cx: &Context, story_id: &str) -> Result<AudienceEstimate, ServiceError> {
    let story = get(cx, story_id).await?;
    let segment = stories::segment_rule(&cx.store.read, &story)
        .await
        .map_err(ServiceError::internal)?;
    stories::estimate(
        &cx.store.read,
        &story,
        segment.as_ref(),
        cx.recurring_cooldown_ms,
        now_ms(),
    )
    .await
    .map_err(ServiceError::internal)
}

/// A segment a story may use: one of the same page.
async fn check_segment(
    cx: &Context,
    page_id: &PageId,
    segment_id: &str,
) -> Result<(), ServiceError> {
    match audience::get_segment(&cx.store.read, segment_id).await {
        Ok(segment) if segment.page_id == page_id.as_str() => Ok(()),
        Ok(_) | Err(StoreError::NotFound) => Err(ServiceError::NotFound(format!(
            "segment_id: page {page_id} has no segment {segment_id}"
        ))),
        Err(err) => Err(ServiceError::internal(err)),
    }
}

fn refuse_if_sent(story: &stories::Model, what: &str) -> Result<(), ServiceError> {
    if story.state == stories::STATE_SENT {
        return Err(ServiceError::FailedPrecondition(format!(
            "story {} has been sent and can no longer be {what}; create a new story instead",
            story.id
        )));
    }
    Ok(())
}

/// No active opt-in on the topic: a warning, naming topics that differ only in case, spaces or
/// punctuation (the usual slip).
async fn topic_warnings(
    cx: &Context,
    page_id: &PageId,
    topic: &str,
) -> Result<Vec<String>, ServiceError> {
    let ledger = optins::ledger(&cx.store.read, page_id, now_ms())
        .await
        .map_err(ServiceError::internal)?;
    if ledger
        .iter()
        .any(|t| t.topic == topic && t.total.active > 0)
    {
        return Ok(Vec::new());
    }
    let wanted = fold(topic);
    let near: Vec<String> = ledger
        .iter()
        .filter(|t| t.topic != topic && t.total.active > 0 && fold(&t.topic) == wanted)
        .map(|t| format!("'{}' ({} active)", t.topic, thousands(t.total.active)))
        .collect();
    Ok(vec![if near.is_empty() {
        format!("no opt-ins for '{topic}' yet: a send would reach only window users, if included")
    } else {
        format!(
            "no opt-ins for '{topic}'; did you mean {}?",
            near.join(" or ")
        )
    }])
}

/// A topic as people misremember it: case, whitespace and punctuation ignored.
fn fold(topic: &str) -> String {
    topic
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
