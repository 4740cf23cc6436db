//! Asking a user to opt in: the one-time notification request, sent as Facebook's template and
//! remembered, so that the opt-in that comes back can be told from one nobody asked for.

use super::{GraphContext, ServiceError};
use crate::{
    domain::{PageId, Psid, Topic, Violations, char_len},
    store::{now_ms, optins, pages},
};

/// Topics of opt-in requests (the payload Facebook echoes back).
pub const REQUEST_TOPIC_MAX_CHARS: usize = 200;
/// Facebook's limit on the template's title.
pub const TITLE_MAX_CHARS: usize = 65;

/// An opt-in request, its fields checked.
pub struct OptInRequest {
    pub page_id: PageId,
    pub psid: Psid,
    pub topic: Topic,
    /// What the user reads; the topic itself when it fits and no title was given.
    pub title: String,
}

impl OptInRequest {
    /// `title` empty: the topic, which must then fit a title.
    pub fn parse(
        page_id: Result<PageId, String>,
        psid: Result<Psid, String>,
        topic: &str,
        title: &str,
    ) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let page_id = v.check("page_id", page_id);
        let psid = v.check("psid", psid);
        let topic = v.check("topic", Topic::parse_within(topic, REQUEST_TOPIC_MAX_CHARS));
        let title = if title.is_empty() {
            match &topic {
                Some(topic) if char_len(topic.as_str()) <= TITLE_MAX_CHARS => {
                    Some(topic.as_str().to_string())
                }
                Some(_) => v.check::<String>(
                    "title",
                    Err(format!(
                        "is required when the topic is longer than {TITLE_MAX_CHARS} characters"
                    )),
                ),
                None => None,
            }
        } else if char_len(title) > TITLE_MAX_CHARS {
            v.check::<String>(
                "title",
                Err(format!(
                    "must be at most {TITLE_MAX_CHARS} characters, got {}",
                    char_len(title)
                )),
            )
        } else {
            Some(title.to_string())
        };
        let (page_id, psid, topic, title) = v.finish(|| Some((page_id?, psid?, topic?, title?)))?;
        Ok(OptInRequest {
            page_id,
            psid,
            topic,
            title,
        })
    }
}

/// Sends the opt-in request to the user through the page and records it; Facebook's message
/// id. A refusal is Facebook's answer, mapped for the caller (`ServiceError::Graph`).
pub async fn request_opt_in(
    cx: &GraphContext,
    request: &OptInRequest,
) -> Result<String, ServiceError> {
    let OptInRequest {
        page_id,
        psid,
        topic,
        title,
    } = request;
    let credentials = pages::credentials(&cx.store.db, &cx.cipher, page_id)
        .await
        .map_err(|e| ServiceError::from_store(e, || format!("page {page_id}")))?;
    let delivered = cx
        .graph
        .send_optin_request(&credentials, psid.as_str(), title, topic.as_str())
        .await
        .map_err(|failure| {
            tracing::info!(%failure, "opt-in request refused");
            ServiceError::Graph(failure)
        })?;
    optins::record_request(
        &cx.store.db,
        page_id,
        psid,
        topic,
        title,
        &delivered.message_id,
        now_ms(),
    )
    .await
    .map_err(ServiceError::internal)?;
    tracing::info!(message_id = %delivered.message_id, "opt-in request sent");
    Ok(delivered.message_id)
}
