//! StoryService: the one message of a topic, aimed, reviewed in Messenger, estimated.

use tonic::{Request, Response, Status};

use super::{
    ApiError, paginate,
    pb::{self, story_service_server::StoryService},
    shared::{ensure_page, page_listing, parse_page_id, parse_psid},
    time::timestamp_from_ms,
};
use crate::{
    crypto::SecretCipher,
    domain::{
        Button, ButtonInput, ButtonKind, ContentInput, PageId, StoryContent, Topic, Violations,
    },
    graph::{GraphClient, Recipient},
    store::{
        Store, StoreError, audience, now_ms, optins, pages,
        stories::{self, NewStory, StoryChanges},
    },
};

const PAGE_TOKEN_KIND: &str = "stories";

pub struct Stories {
    store: Store,
    cipher: SecretCipher,
    graph: GraphClient,
}

impl Stories {
    pub fn new(store: Store, cipher: SecretCipher, graph: GraphClient) -> Self {
        Stories {
            store,
            cipher,
            graph,
        }
    }

    async fn load(&self, story_id: &str) -> Result<stories::Model, ApiError> {
        if story_id.is_empty() {
            return Err(Violations::single("story_id", "is required").into());
        }
        let story = stories::get(&self.store.read, story_id)
            .await
            .map_err(|e| ApiError::from_store(e, || format!("story {story_id}")))?;
        tracing::Span::current().record("page_id", story.page_id.as_str());
        Ok(story)
    }

    /// A segment a story may use: one of the same page.
    async fn check_segment(&self, page_id: &PageId, segment_id: &str) -> Result<(), ApiError> {
        match audience::get_segment(&self.store.read, segment_id).await {
            Ok(segment) if segment.page_id == page_id.as_str() => Ok(()),
            Ok(_) | Err(StoreError::NotFound) => Err(ApiError::NotFound(format!(
                "segment_id: page {page_id} has no segment {segment_id}"
            ))),
            Err(err) => Err(ApiError::internal(err)),
        }
    }

    /// Warnings, not errors: opt-ins may still be coming.
    async fn topic_warnings(&self, page_id: &PageId, topic: &str) -> Result<Vec<String>, ApiError> {
        let ledger = optins::ledger(&self.store.read, page_id, now_ms())
            .await
            .map_err(ApiError::internal)?;
        if ledger.iter().any(|t| t.topic == topic && t.active > 0) {
            return Ok(Vec::new());
        }
        let wanted = fold(topic);
        let near: Vec<String> = ledger
            .iter()
            .filter(|t| t.topic != topic && t.active > 0 && fold(&t.topic) == wanted)
            .map(|t| format!("'{}' ({} active)", t.topic, thousands(t.active)))
            .collect();
        Ok(vec![if near.is_empty() {
            format!(
                "no opt-ins for '{topic}' yet: a send would reach only window users, if included"
            )
        } else {
            format!(
                "no opt-ins for '{topic}'; did you mean {}?",
                near.join(" or ")
            )
        }])
    }
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

fn content_input(content: Option<pb::StoryContent>) -> ContentInput {
    match content.and_then(|c| c.kind) {
        None => ContentInput::Missing,
        Some(pb::story_content::Kind::Text(text)) => ContentInput::Text(text),
        Some(pb::story_content::Kind::ButtonTemplate(template)) => ContentInput::ButtonTemplate {
            text: template.text,
            buttons: template
                .buttons
                .into_iter()
                .map(|b| ButtonInput {
                    kind: match pb::ButtonType::try_from(b.r#type) {
                        Ok(pb::ButtonType::WebUrl) => Some(ButtonKind::WebUrl),
                        Ok(pb::ButtonType::Postback) => Some(ButtonKind::Postback),
                        Ok(pb::ButtonType::PhoneNumber) => Some(ButtonKind::PhoneNumber),
                        _ => None,
                    },
                    title: b.title,
                    url: b.url,
                    payload: b.payload,
                })
                .collect(),
        },
    }
}

fn content_to_proto(content: StoryContent) -> pb::StoryContent {
    let kind = match content {
        StoryContent::Text(text) => pb::story_content::Kind::Text(text),
        StoryContent::ButtonTemplate { text, buttons } => {
            pb::story_content::Kind::ButtonTemplate(pb::ButtonTemplate {
                text,
                buttons: buttons
                    .into_iter()
                    .map(|button| match button {
                        Button::WebUrl { title, url } => pb::Button {
                            r#type: pb::ButtonType::WebUrl.into(),
                            title,
                            url,
                            payload: String::new(),
                        },
                        Button::Postback { title, payload } => pb::Button {
                            r#type: pb::ButtonType::Postback.into(),
                            title,
                            url: String::new(),
                            payload,
                        },
                        Button::PhoneNumber { title, number } => pb::Button {
                            r#type: pb::ButtonType::PhoneNumber.into(),
                            title,
                            url: String::new(),
                            payload: number,
                        },
                    })
                    .collect(),
            })
        }
    };
    pb::StoryContent { kind: Some(kind) }
}

pub fn story_to_proto(story: stories::Model) -> pb::Story {
    let reviewed = story.reviewed();
    let content = story.story_content().map(content_to_proto);
    pb::Story {
        story_id: story.id,
        page_id: story.page_id,
        topic: story.topic,
        content,
        include_window_users: story.include_window_users,
        segment_id: story.segment_id.unwrap_or_default(),
        state: if story.state == stories::STATE_SENT {
            pb::StoryState::Sent
        } else {
            pb::StoryState::Draft
        }
        .into(),
        reviewed,
        review_time: story.reviewed_at.map(timestamp_from_ms),
        reviewer_psid: story.reviewer_psid.unwrap_or_default(),
        create_time: Some(timestamp_from_ms(story.created_at)),
        update_time: Some(timestamp_from_ms(story.updated_at)),
    }
}

fn refuse_if_sent(story: &stories::Model, what: &str) -> Result<(), ApiError> {
    if story.state == stories::STATE_SENT {
        return Err(ApiError::FailedPrecondition(format!(
            "story {} has been sent and can no longer be {what}; create a new story instead",
            story.id
        )));
    }
    Ok(())
}

fn merge(v: &mut Violations, broken: Result<StoryContent, Violations>) -> Option<StoryContent> {
    match broken {
        Ok(content) => Some(content),
        Err(more) => {
            v.0.extend(more.0);
            None
        }
    }
}

#[tonic::async_trait]
impl StoryService for Stories {
    async fn create_story(
        &self,
        request: Request<pb::CreateStoryRequest>,
    ) -> Result<Response<pb::CreateStoryResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let page_id = v.check("page_id", parse_page_id(&req.page_id));
        let topic = v.check("topic", Topic::parse(&req.topic));
        let content = merge(
            &mut v,
            StoryContent::parse("content", content_input(req.content)),
        );
        let (page_id, topic, content) = v
            .finish(|| Some((page_id?, topic?, content?)))
            .map_err(ApiError::from)?;
        ensure_page(&self.store, &page_id).await?;
        let segment_id = (!req.segment_id.is_empty()).then_some(req.segment_id.as_str());
        if let Some(segment_id) = segment_id {
            self.check_segment(&page_id, segment_id).await?;
        }
        let story = stories::create(
            &self.store.db,
            NewStory {
                page_id: &page_id,
                topic: topic.as_str(),
                content: &content,
                include_window_users: req.include_window_users,
                segment_id,
            },
            now_ms(),
        )
        .await
        .map_err(ApiError::internal)?;
        let warnings = self.topic_warnings(&page_id, topic.as_str()).await?;
        tracing::info!(story_id = %story.id, warnings = warnings.len(), "story created");
        Ok(Response::new(pb::CreateStoryResponse {
            story: Some(story_to_proto(story)),
            warnings,
        }))
    }

    async fn get_story(
        &self,
        request: Request<pb::GetStoryRequest>,
    ) -> Result<Response<pb::GetStoryResponse>, Status> {
        let story = self.load(&request.get_ref().story_id).await?;
        Ok(Response::new(pb::GetStoryResponse {
            story: Some(story_to_proto(story)),
        }))
    }

    async fn list_stories(
        &self,
        request: Request<pb::ListStoriesRequest>,
    ) -> Result<Response<pb::ListStoriesResponse>, Status> {
        let req = request.into_inner();
        let (page_id, size, after) = page_listing(
            &self.store,
            &req.page_id,
            req.page_size,
            &req.page_token,
            PAGE_TOKEN_KIND,
        )
        .await?;
        let topic = (!req.topic.is_empty()).then_some(req.topic.as_str());
        let rows = stories::list(
            &self.store.read,
            &page_id,
            topic,
            after.as_deref(),
            size + 1,
        )
        .await
        .map_err(ApiError::internal)?;
        let (rows, next_page_token) = paginate(rows, size, PAGE_TOKEN_KIND, |s| s.id.clone());
        Ok(Response::new(pb::ListStoriesResponse {
            stories: rows.into_iter().map(story_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_story(
        &self,
        request: Request<pb::UpdateStoryRequest>,
    ) -> Result<Response<pb::UpdateStoryResponse>, Status> {
        let req = request.into_inner();
        let current = self.load(&req.story_id).await?;
        refuse_if_sent(&current, "edited")?;
        let mut v = Violations::new();
        let topic = req
            .topic
            .as_deref()
            .map(|raw| v.check("topic", Topic::parse(raw)));
        let content = req.content.map(|c| {
            merge(
                &mut v,
                StoryContent::parse("content", content_input(Some(c))),
            )
        });
        if topic.is_none()
            && content.is_none()
            && req.include_window_users.is_none()
            && req.segment_id.is_none()
        {
            v.add(
                "update",
                "sets no field to change (topic, content, include_window_users, segment_id)",
            );
        }
        let (topic, content) = v
            .finish(|| Some((topic.map(Option::unwrap), content.map(Option::unwrap))))
            .map_err(ApiError::from)?;
        let page_id = PageId::from_trusted(current.page_id.clone());
        let segment_id = req
            .segment_id
            .as_deref()
            .map(|s| (!s.is_empty()).then_some(s));
        if let Some(Some(segment_id)) = segment_id {
            self.check_segment(&page_id, segment_id).await?;
        }
        let changes = StoryChanges {
            topic: topic.as_ref().map(Topic::as_str),
            content: content.as_ref(),
            include_window_users: req.include_window_users,
            segment_id,
        };
        let story = stories::update(&self.store.db, &current, &changes, now_ms())
            .await
            .map_err(|e| ApiError::from_store(e, || format!("story {}", current.id)))?;
        let warnings = self.topic_warnings(&page_id, &story.topic).await?;
        Ok(Response::new(pb::UpdateStoryResponse {
            story: Some(story_to_proto(story)),
            warnings,
        }))
    }

    async fn delete_story(
        &self,
        request: Request<pb::DeleteStoryRequest>,
    ) -> Result<Response<pb::DeleteStoryResponse>, Status> {
        let story = self.load(&request.get_ref().story_id).await?;
        refuse_if_sent(&story, "deleted")?;
        stories::delete(&self.store.db, &story)
            .await
            .map_err(|e| ApiError::from_store(e, || format!("story {}", story.id)))?;
        Ok(Response::new(pb::DeleteStoryResponse {}))
    }

    async fn preview_story(
        &self,
        request: Request<pb::PreviewStoryRequest>,
    ) -> Result<Response<pb::PreviewStoryResponse>, Status> {
        let req = request.into_inner();
        let reviewer = parse_psid(&req.reviewer_psid)
            .map_err(|rule| ApiError::from(Violations::single("reviewer_psid", rule)))?;
        let story = self.load(&req.story_id).await?;
        let page_id = PageId::from_trusted(story.page_id.clone());
        let credentials = pages::credentials(&self.store.db, &self.cipher, &page_id)
            .await
            .map_err(|e| ApiError::from_store(e, || format!("page {page_id}")))?;
        // A standard message to the reviewer: never a token, never counted against the topic.
        let delivered = self
            .graph
            .send(
                &credentials,
                Recipient::Psid(reviewer.as_str()),
                &story.graph_message(),
            )
            .await
            .map_err(ApiError::Graph)?;
        let story = stories::record_review(
            &self.store.db,
            &story.id,
            &story.content_hash,
            reviewer.as_str(),
            now_ms(),
        )
        .await
        .map_err(|e| match e {
            StoreError::Conflict => ApiError::FailedPrecondition(format!(
                "story {} changed while the preview was sent; preview it again",
                story.id
            )),
            e => ApiError::internal(e),
        })?;
        tracing::info!(story_id = %story.id, message_id = %delivered.message_id, "story reviewed");
        Ok(Response::new(pb::PreviewStoryResponse {
            message_id: delivered.message_id,
            story: Some(story_to_proto(story)),
        }))
    }

    async fn estimate_audience(
        &self,
        request: Request<pb::EstimateAudienceRequest>,
    ) -> Result<Response<pb::EstimateAudienceResponse>, Status> {
        let story = self.load(&request.get_ref().story_id).await?;
        let segment = stories::segment_rule(&self.store.read, &story)
            .await
            .map_err(ApiError::internal)?;
        let estimate = stories::estimate(&self.store.read, &story, segment.as_ref(), now_ms())
            .await
            .map_err(ApiError::internal)?;
        Ok(Response::new(pb::EstimateAudienceResponse {
            token_recipients: estimate.token_recipients,
            window_recipients: estimate.window_recipients,
            excluded_expired: estimate.excluded_expired,
            excluded_by_segment: estimate.excluded_by_segment,
        }))
    }
}
