//! Asking a user to opt in: the one-time notification request or the recurring notification
//! request, sent as Facebook's template and remembered, so that the opt-in that comes back can be
//! told from one nobody asked for (and a recurring request is not sent twice in a week).

use super::{GraphContext, ServiceError};
use crate::{
    domain::{PageId, Psid, TokenKind, Topic, Violations, char_len},
    graph::OptInTemplate,
    store::{now_ms, optins, pages},
};

/// Topics of opt-in requests (the payload Facebook echoes back).
pub const REQUEST_TOPIC_MAX_CHARS: usize = 200;
/// Facebook's limit on the template's title.
pub const TITLE_MAX_CHARS: usize = 65;
/// The longest image URL a recurring request takes.
pub const IMAGE_URL_MAX_CHARS: usize = 2000;
/// The longest timezone name a recurring request takes (IANA names are about 30).
pub const TIMEZONE_MAX_CHARS: usize = 64;
/// Facebook takes one recurring opt-in request per title per user per week.
pub const RECURRING_REQUEST_INTERVAL_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// What a recurring request adds to the template.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecurringRequest {
    pub image_url: Option<String>,
    pub timezone: Option<String>,
    /// Facebook's name of the button's text.
    pub call_to_action: Option<&'static str>,
    pub reoptin: bool,
}

/// An opt-in request, its fields checked.
pub struct OptInRequest {
    pub page_id: PageId,
    pub psid: Psid,
    pub topic: Topic,
    /// What the user reads; the topic itself when it fits and no title was given.
    pub title: String,
    /// `Some` for a recurring request.
    pub recurring: Option<RecurringRequest>,
}

/// The fields of a request as the client gave them.
pub struct OptInRequestInput<'a> {
    pub topic: &'a str,
    pub title: &'a str,
    /// `None`: one-time.
    pub kind: Option<TokenKind>,
    pub image_url: &'a str,
    pub timezone: &'a str,
    /// Already Facebook's name; `Err` names what was given instead.
    pub call_to_action: Result<Option<&'static str>, String>,
    pub reoptin: bool,
}

impl OptInRequest {
    /// `title` empty: the topic, which must then fit a title.
    pub fn parse(
        page_id: Result<PageId, String>,
        psid: Result<Psid, String>,
        input: OptInRequestInput<'_>,
    ) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let page_id = v.check("page_id", page_id);
        let psid = v.check("psid", psid);
        let topic = v.check(
            "topic",
            Topic::parse_within(input.topic, REQUEST_TOPIC_MAX_CHARS),
        );
        let title = input.title;
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
        } else if title.contains('\0') {
            v.check::<String>("title", Err("must not contain a NUL character".into()))
        } else {
            Some(title.to_string())
        };
        let recurring = recurring_request(&input, &mut v);
        let (page_id, psid, topic, title) = v.finish(|| Some((page_id?, psid?, topic?, title?)))?;
        Ok(OptInRequest {
            page_id,
            psid,
            topic,
            title,
            recurring,
        })
    }
}

/// The recurring request's own fields, checked; with a one-time request each must be unset.
fn recurring_request(
    input: &OptInRequestInput<'_>,
    v: &mut Violations,
) -> Option<RecurringRequest> {
    let call_to_action = match &input.call_to_action {
        Ok(cta) => *cta,
        Err(why) => {
            v.add("call_to_action", why.clone());
            None
        }
    };
    if input.kind != Some(TokenKind::Recurring) {
        for (field, given) in [
            ("image_url", !input.image_url.is_empty()),
            ("timezone", !input.timezone.is_empty()),
            ("call_to_action", call_to_action.is_some()),
            ("reoptin", input.reoptin),
        ] {
            if given {
                v.add(
                    field,
                    "is for recurring requests only (kind TOKEN_KIND_RECURRING)",
                );
            }
        }
        return None;
    }
    let image_url = match input.image_url {
        "" => None,
        url if char_len(url) > IMAGE_URL_MAX_CHARS => {
            v.add(
                "image_url",
                format!("must be at most {IMAGE_URL_MAX_CHARS} characters"),
            );
            None
        }
        url => match url::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "https" | "http") && parsed.has_host() => {
                Some(url.to_string())
            }
            _ => {
                v.add("image_url", "must be an https:// or http:// URL");
                None
            }
        },
    };
    let timezone = match input.timezone {
        "" => None,
        tz if char_len(tz) > TIMEZONE_MAX_CHARS => {
            v.add(
                "timezone",
                format!("must be at most {TIMEZONE_MAX_CHARS} characters"),
            );
            None
        }
        tz if tz
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c)) =>
        {
            Some(tz.to_string())
        }
        _ => {
            v.add(
                "timezone",
                "must be an IANA timezone name such as Europe/London (letters, digits, /_+-)",
            );
            None
        }
    };
    Some(RecurringRequest {
        image_url,
        timezone,
        call_to_action,
        reoptin: input.reoptin,
    })
}

/// Sends the opt-in request to the user through the page and records it; Facebook's message
/// id. A recurring request with a title otnd sent this user within the week is refused before
/// Facebook is called. A refusal is Facebook's answer, mapped for the caller
/// (`ServiceError::Graph`).
pub async fn request_opt_in(
    cx: &GraphContext,
    request: &OptInRequest,
) -> Result<String, ServiceError> {
    let OptInRequest {
        page_id,
        psid,
        topic,
        title,
        recurring,
    } = request;
    let credentials = pages::credentials(&cx.store.db, &cx.cipher, page_id)
        .await
        .map_err(|e| ServiceError::from_store(e, || format!("page {page_id}")))?;
    let now = now_ms();
    let (template, kind) = match recurring {
        None => (
            OptInTemplate::OneTime {
                title,
                topic: topic.as_str(),
            },
            TokenKind::OneTime,
        ),
        Some(recurring) => {
            let since = now - RECURRING_REQUEST_INTERVAL_MS;
            let last = optins::last_recurring_request(&cx.store.read, page_id, psid, title, since)
                .await
                .map_err(ServiceError::internal)?;
            if let Some(sent_at) = last {
                let hours = (sent_at + RECURRING_REQUEST_INTERVAL_MS - now + 3_599_999) / 3_600_000;
                return Err(ServiceError::FailedPrecondition(format!(
                    "a recurring opt-in request titled {title:?} was sent to this user within \
                     the last 7 days; Facebook takes one per title per user per week: send it \
                     again in {hours} h, or with another title"
                )));
            }
            (
                OptInTemplate::Recurring {
                    title,
                    topic: topic.as_str(),
                    image_url: recurring.image_url.as_deref(),
                    timezone: recurring.timezone.as_deref(),
                    call_to_action: recurring.call_to_action,
                    reoptin: recurring.reoptin,
                },
                TokenKind::Recurring,
            )
        }
    };
    let delivered = cx
        .graph
        .send_optin_request(&credentials, psid.as_str(), &template)
        .await
        .map_err(|failure| {
            tracing::info!(%failure, "opt-in request refused");
            ServiceError::Graph(failure)
        })?;
    optins::record_request(
        &cx.store.db,
        optins::SentRequest {
            page_id,
            psid,
            topic,
            title,
            kind,
            message_id: &delivered.message_id,
            sent_at: now_ms(),
        },
    )
    .await
    .map_err(ServiceError::internal)?;
    tracing::info!(message_id = %delivered.message_id, kind = %kind, "opt-in request sent");
    Ok(delivered.message_id)
}
