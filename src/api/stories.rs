//! StoryService: the story use cases (`service::stories`) over gRPC.

use tonic::{Request, Response, Status};

use super::{
    ServiceError, paginate,
    pb::{self, story_service_server::StoryService},
    shared::{page_listing, parse_page_id, parse_psid, token_kinds, token_kinds_to_proto},
    time::timestamp_from_ms,
};
use crate::{
    domain::{Button, ButtonInput, ButtonKind, ContentInput, StoryContent, Topic, Violations},
    service::{
        GraphContext as Context,
        stories::{self as cases, NewStoryRequest, StoryUpdate, Written},
    },
    store::stories,
};

const PAGE_TOKEN_KIND: &str = "stories";

pub struct Stories {
    cx: Context,
}

impl Stories {
    pub fn new(cx: Context) -> Self {
        Stories { cx }
    }
}

impl TryFrom<pb::CreateStoryRequest> for NewStoryRequest {
    type Error = ServiceError;

    fn try_from(req: pb::CreateStoryRequest) -> Result<Self, ServiceError> {
        let mut v = Violations::new();
        let page_id = v.check("page_id", parse_page_id(&req.page_id));
        let topic = v.check("topic", Topic::parse(&req.topic));
        let content = StoryContent::parse("content", content_input(req.content))
            .map_err(|more| v.0.extend(more.0))
            .ok();
        let token_kinds = v.check("token_kinds", token_kinds(&req.token_kinds));
        let (page_id, topic, content, token_kinds) =
            v.finish(|| Some((page_id?, topic?, content?, token_kinds?)))?;
        Ok(NewStoryRequest {
            page_id,
            topic,
            content,
            include_window_users: req.include_window_users,
            token_kinds,
            segment_id: (!req.segment_id.is_empty()).then_some(req.segment_id),
        })
    }
}

impl From<&pb::UpdateStoryRequest> for Result<StoryUpdate, Violations> {
    fn from(req: &pb::UpdateStoryRequest) -> Self {
        StoryUpdate::parse(
            req.topic.as_deref().map(Topic::parse),
            req.content
                .clone()
                .map(|c| StoryContent::parse("content", content_input(Some(c)))),
            req.include_window_users,
            req.segment_id.clone(),
            req.token_kinds.as_ref().map(|k| token_kinds(&k.kinds)),
        )
    }
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
        token_kinds: token_kinds_to_proto(&story.token_kinds),
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

#[tonic::async_trait]
impl StoryService for Stories {
    async fn create_story(
        &self,
        request: Request<pb::CreateStoryRequest>,
    ) -> Result<Response<pb::CreateStoryResponse>, Status> {
        let Written { story, warnings } =
            cases::create(&self.cx, request.into_inner().try_into()?).await?;
        Ok(Response::new(pb::CreateStoryResponse {
            story: Some(story_to_proto(story)),
            warnings,
        }))
    }

    async fn get_story(
        &self,
        request: Request<pb::GetStoryRequest>,
    ) -> Result<Response<pb::GetStoryResponse>, Status> {
        let story = cases::get(&self.cx, &request.get_ref().story_id).await?;
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
            &self.cx.store,
            &req.page_id,
            req.page_size,
            &req.page_token,
            PAGE_TOKEN_KIND,
        )
        .await?;
        let topic = (!req.topic.is_empty()).then_some(req.topic.as_str());
        let rows = stories::list(
            &self.cx.store.read,
            &page_id,
            topic,
            after.as_deref(),
            size + 1,
        )
        .await
        .map_err(ServiceError::internal)?;
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
        let Written { story, warnings } =
            cases::update(&self.cx, &req.story_id, (&req).into()).await?;
        Ok(Response::new(pb::UpdateStoryResponse {
            story: Some(story_to_proto(story)),
            warnings,
        }))
    }

    async fn delete_story(
        &self,
        request: Request<pb::DeleteStoryRequest>,
    ) -> Result<Response<pb::DeleteStoryResponse>, Status> {
        cases::delete(&self.cx, &request.get_ref().story_id).await?;
        Ok(Response::new(pb::DeleteStoryResponse {}))
    }

    async fn preview_story(
        &self,
        request: Request<pb::PreviewStoryRequest>,
    ) -> Result<Response<pb::PreviewStoryResponse>, Status> {
        let req = request.into_inner();
        let reviewer = parse_psid(&req.reviewer_psid)
            .map_err(|rule| ServiceError::from(Violations::single("reviewer_psid", rule)))?;
        let (story, message_id) = cases::preview(&self.cx, &req.story_id, &reviewer).await?;
        Ok(Response::new(pb::PreviewStoryResponse {
            message_id,
            story: Some(story_to_proto(story)),
        }))
    }

    async fn estimate_audience(
        &self,
        request: Request<pb::EstimateAudienceRequest>,
    ) -> Result<Response<pb::EstimateAudienceResponse>, Status> {
        let estimate = cases::estimate(&self.cx, &request.get_ref().story_id).await?;
        Ok(Response::new(pb::EstimateAudienceResponse {
            token_recipients: estimate.token_recipients,
            window_recipients: estimate.window_recipients,
            excluded_expired: estimate.excluded_expired,
            excluded_by_segment: estimate.excluded_by_segment,
            one_time_recipients: estimate.one_time_recipients,
            recurring_recipients: estimate
                .token_recipients
                .saturating_sub(estimate.one_time_recipients),
            recurring_in_cooldown: estimate.recurring_in_cooldown,
        }))
    }
}
