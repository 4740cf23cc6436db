//! SendService. The send engine is the next piece of work; until it lands, StartSend already
//! enforces the review rule, and every other RPC answers UNIMPLEMENTED.

use tonic::{Request, Response, Status};

use super::{
    ApiError,
    pb::{self, send_service_server::SendService},
};
use crate::{
    domain::{Violations, char_len},
    store::{Store, stories},
};

const REQUEST_ID_MAX_CHARS: usize = 128;

pub struct Sends {
    store: Store,
}

impl Sends {
    pub fn new(store: Store) -> Self {
        Sends { store }
    }
}

#[tonic::async_trait]
impl SendService for Sends {
    async fn start_send(
        &self,
        request: Request<pb::StartSendRequest>,
    ) -> Result<Response<pb::StartSendResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        if req.story_id.is_empty() {
            v.add("story_id", "is required");
        }
        let len = char_len(&req.request_id);
        if len == 0 || len > REQUEST_ID_MAX_CHARS {
            v.add(
                "request_id",
                format!("must be 1 to {REQUEST_ID_MAX_CHARS} characters, chosen by the client so a retry is safe"),
            );
        }
        v.finish(|| Some(())).map_err(ApiError::from)?;
        let story = stories::get(&self.store.db, &req.story_id)
            .await
            .map_err(|e| ApiError::from_store(e, || format!("story {}", req.story_id)))?;
        tracing::Span::current().record("page_id", story.page_id.as_str());
        if !story.reviewed() {
            let what_to_do = match story.reviewed_at {
                None => "it has never been reviewed".to_string(),
                Some(_) => format!(
                    "its content changed after {} reviewed it",
                    story.reviewer_psid.as_deref().unwrap_or("the reviewer")
                ),
            };
            return Err(ApiError::FailedPrecondition(format!(
                "story {} cannot be sent: {what_to_do}; call StoryService.PreviewStory to send \
                 the current content to a reviewer, then start the send again",
                story.id
            ))
            .into());
        }
        Err(Status::unimplemented(
            "the story is reviewed, but the send engine is not built yet",
        ))
    }
}
