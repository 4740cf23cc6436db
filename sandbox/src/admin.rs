//! `/__sandbox/*`: create pages, opt-ins (one-time and recurring), STOP and RESUME, and
//! interactions (posting their webhooks), set faults, and read the judge's ledger and counters.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Shared, now_ms,
    webhook::{self, EVENTS_PER_POST, OptInEvent},
    wire::{DEFAULT_RECURRING_TITLE, MAX_RECURRING_TITLE_CHARS},
    world::{Faults, Page, RecurringStatusError, RecurringTerms, TOKEN_LIFETIME_SECONDS},
};

/// The most opt-ins one bulk call creates.
const MAX_BULK_OPTINS: u64 = 1_000_000;

/// An admin call the sandbox refuses: 400 or 404 with `{"error": "…"}`.
pub struct AdminError(StatusCode, String);

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> AdminError {
    AdminError(StatusCode::BAD_REQUEST, message.into())
}

fn not_found(message: impl Into<String>) -> AdminError {
    AdminError(StatusCode::NOT_FOUND, message.into())
}

type AdminResult = Result<Json<Value>, AdminError>;

/// Parses a JSON body, answering 400 with serde's reason when it does not fit.
fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPage {
    page_id: String,
    access_token: String,
    app_secret: String,
    webhook_url: Option<String>,
}

pub async fn create_page(
    State(shared): State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> AdminResult {
    let page: NewPage = parse(&body)?;
    if page.page_id.is_empty() || !page.page_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_request("page_id must be digits"));
    }
    if page.access_token.is_empty() || page.app_secret.is_empty() {
        return Err(bad_request("access_token and app_secret must not be empty"));
    }
    if let Some(url) = &page.webhook_url
        && !url.starts_with("http://")
    {
        return Err(bad_request("webhook_url must be an http:// URL"));
    }
    shared.world().add_page(
        page.page_id.clone(),
        Page {
            access_token: page.access_token,
            app_secret: page.app_secret,
            webhook_url: page.webhook_url,
        },
    );
    Ok(Json(json!({"page_id": page.page_id})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOptIns {
    page_id: String,
    payload: String,
    psid: Option<String>,
    psid_prefix: Option<String>,
    count: Option<u64>,
    expires_in_seconds: Option<i64>,
    deliver_webhook: Option<bool>,
    /// "one_time" (default) or "recurring".
    kind: Option<String>,
    /// Recurring only, like the next two.
    title: Option<String>,
    timezone: Option<String>,
    user_token_status: Option<String>,
}

const USER_TOKEN_STATUSES: [&str; 2] = ["NOT_REFRESHED", "REFRESHED"];

/// The subscription terms of a recurring opt-in; `None` for a one-time opt-in, which takes none
/// of the recurring fields.
fn recurring_terms(request: &NewOptIns, now: i64) -> Result<Option<RecurringTerms>, AdminError> {
    match request.kind.as_deref() {
        None | Some("one_time") => {
            for (field, given) in [
                ("title", request.title.is_some()),
                ("timezone", request.timezone.is_some()),
                ("user_token_status", request.user_token_status.is_some()),
            ] {
                if given {
                    return Err(bad_request(format!(
                        "{field} is only for kind \"recurring\""
                    )));
                }
            }
            Ok(None)
        }
        Some("recurring") => {
            let title = request
                .title
                .clone()
                .unwrap_or_else(|| DEFAULT_RECURRING_TITLE.to_string());
            let title_chars = title.chars().count();
            if !(1..=MAX_RECURRING_TITLE_CHARS).contains(&title_chars) {
                return Err(bad_request(format!(
                    "title must be 1 to {MAX_RECURRING_TITLE_CHARS} characters, got {title_chars}"
                )));
            }
            let timezone = request
                .timezone
                .clone()
                .unwrap_or_else(|| "UTC".to_string());
            if timezone.is_empty() {
                return Err(bad_request("timezone must not be empty"));
            }
            let user_token_status = request
                .user_token_status
                .clone()
                .unwrap_or_else(|| USER_TOKEN_STATUSES[0].to_string());
            if !USER_TOKEN_STATUSES.contains(&user_token_status.as_str()) {
                return Err(bad_request(format!(
                    "user_token_status must be NOT_REFRESHED or REFRESHED, got \"{user_token_status}\""
                )));
            }
            // Recurring tokens issued since August 2023 do not expire unless told otherwise.
            let expires_at_ms = request
                .expires_in_seconds
                .map(|seconds| now.saturating_add(seconds.saturating_mul(1000)));
            Ok(Some(RecurringTerms {
                title,
                timezone,
                user_token_status,
                expires_at_ms,
            }))
        }
        Some(other) => Err(bad_request(format!(
            "kind must be \"one_time\" or \"recurring\", got \"{other}\""
        ))),
    }
}

pub async fn create_optins(
    State(shared): State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> AdminResult {
    let request: NewOptIns = parse(&body)?;
    let psids: Vec<String> = match (&request.psid, &request.psid_prefix, request.count) {
        (Some(psid), None, None) if !psid.is_empty() => vec![psid.clone()],
        (None, Some(prefix), Some(count)) if (1..=MAX_BULK_OPTINS).contains(&count) => {
            (0..count).map(|i| format!("{prefix}{i}")).collect()
        }
        _ => {
            return Err(bad_request(format!(
                "give either psid, or psid_prefix with count (1..={MAX_BULK_OPTINS})"
            )));
        }
    };
    let lifetime = request.expires_in_seconds.unwrap_or(TOKEN_LIFETIME_SECONDS);
    if lifetime < 0 {
        return Err(bad_request("expires_in_seconds must not be negative"));
    }
    let now = now_ms();
    let recurring = recurring_terms(&request, now)?;
    let (tokens, events, webhook_target) = {
        let mut world = shared.world();
        let page = world
            .page(&request.page_id)
            .cloned()
            .ok_or_else(|| not_found(format!("page {} is not in the sandbox", request.page_id)))?;
        let target = webhook_target(&page, request.deliver_webhook)?;
        let mut tokens = Vec::with_capacity(psids.len());
        let mut events = Vec::with_capacity(if target.is_some() { psids.len() } else { 0 });
        for psid in psids {
            let (token, event) = match &recurring {
                None => {
                    let token =
                        world.issue_token(&request.page_id, &psid, &request.payload, lifetime, now);
                    let event = target
                        .is_some()
                        .then(|| OptInEvent::one_time(psid, &request.payload, &token));
                    (token, event)
                }
                Some(terms) => {
                    let token = world.issue_recurring_token(
                        &request.page_id,
                        &psid,
                        &request.payload,
                        terms.clone(),
                        now,
                    );
                    let event = target.is_some().then(|| {
                        OptInEvent::recurring(psid, &request.payload, terms, Some(&token), None)
                    });
                    (token, event)
                }
            };
            tokens.push(token);
            events.extend(event);
        }
        (tokens, events, target)
    };
    let answer = if request.psid.is_some() {
        json!({"token": tokens[0]})
    } else {
        json!({"tokens": tokens})
    };
    if let Some((url, secret)) = webhook_target {
        let bodies = events
            .chunks(EVENTS_PER_POST)
            .map(|chunk| webhook::optin_envelope(&request.page_id, chunk, now))
            .collect();
        webhook::deliver_in_order(shared.clone(), url, secret, bodies);
    }
    Ok(Json(answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRecurringStatus {
    page_id: String,
    token: String,
    /// "STOP" or "RESUME".
    status: String,
    /// "underscore" (default: `STOP_NOTIFICATIONS`) or "space" (`STOP NOTIFICATIONS`): Facebook
    /// has sent both.
    spelling: Option<String>,
    /// Whether the webhook names the token (default true).
    include_token: Option<bool>,
    deliver_webhook: Option<bool>,
}

/// The user stops or resumes a recurring subscription; the signed webhook tells the page.
pub async fn set_recurring_status(
    State(shared): State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> AdminResult {
    let request: NewRecurringStatus = parse(&body)?;
    let stopped = match request.status.as_str() {
        "STOP" => true,
        "RESUME" => false,
        other => {
            return Err(bad_request(format!(
                "status must be \"STOP\" or \"RESUME\", got \"{other}\""
            )));
        }
    };
    let separator = match request.spelling.as_deref() {
        None | Some("underscore") => '_',
        Some("space") => ' ',
        Some(other) => {
            return Err(bad_request(format!(
                "spelling must be \"underscore\" or \"space\", got \"{other}\""
            )));
        }
    };
    let notification_status = format!("{}{separator}NOTIFICATIONS", request.status);
    let now = now_ms();
    let (subscription, target) = {
        let mut world = shared.world();
        let page = world
            .page(&request.page_id)
            .cloned()
            .ok_or_else(|| not_found(format!("page {} is not in the sandbox", request.page_id)))?;
        let target = webhook_target(&page, request.deliver_webhook)?;
        let subscription = world
            .set_recurring_stopped(&request.page_id, &request.token, stopped)
            .map_err(|error| match error {
                RecurringStatusError::OneTime => bad_request(
                    "token is a one-time token; only recurring tokens can be stopped or resumed",
                ),
                RecurringStatusError::Unknown => not_found(format!(
                    "token is not a recurring token of page {}",
                    request.page_id
                )),
            })?;
        (subscription, target)
    };
    if let Some((url, secret)) = target {
        let token = request
            .include_token
            .unwrap_or(true)
            .then_some(request.token.as_str());
        let event = OptInEvent::recurring(
            subscription.psid,
            &subscription.payload,
            &subscription.terms,
            token,
            Some(&notification_status),
        );
        let body = webhook::optin_envelope(&request.page_id, &[event], now);
        webhook::deliver_in_order(shared.clone(), url, secret, vec![body]);
    }
    Ok(Json(json!({})))
}

/// Where to post a page's webhook: `deliver_webhook` absent means "if the page has a URL".
fn webhook_target(
    page: &Page,
    deliver: Option<bool>,
) -> Result<Option<(String, String)>, AdminError> {
    match (deliver, &page.webhook_url) {
        (Some(false), _) | (None, None) => Ok(None),
        (_, Some(url)) => Ok(Some((url.clone(), page.app_secret.clone()))),
        (Some(true), None) => Err(bad_request(
            "deliver_webhook is true but the page has no webhook_url",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewInteraction {
    page_id: String,
    psid: String,
    text: String,
    /// When the user wrote (epoch ms); now when absent. An old time puts the user outside the
    /// 24-hour window, for testing.
    time_ms: Option<i64>,
    deliver_webhook: Option<bool>,
}

pub async fn create_interaction(
    State(shared): State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> AdminResult {
    let request: NewInteraction = parse(&body)?;
    if request.psid.is_empty() {
        return Err(bad_request("psid must not be empty"));
    }
    let now = request.time_ms.unwrap_or_else(now_ms);
    let mid = format!("m_in_{}", uuid_like(now));
    let target = {
        let mut world = shared.world();
        let page = world
            .page(&request.page_id)
            .cloned()
            .ok_or_else(|| not_found(format!("page {} is not in the sandbox", request.page_id)))?;
        let target = webhook_target(&page, request.deliver_webhook)?;
        world.record_interaction(&request.page_id, &request.psid, now);
        target
    };
    if let Some((url, secret)) = target {
        let body =
            webhook::message_envelope(&request.page_id, &request.psid, &request.text, &mid, now);
        webhook::deliver_in_order(shared.clone(), url, secret, vec![body]);
    }
    Ok(Json(json!({"message_id": mid})))
}

fn uuid_like(now: i64) -> String {
    use rand::Rng;
    format!("{now:x}{:08x}", rand::thread_rng().r#gen::<u32>())
}

pub async fn set_faults(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> AdminResult {
    let faults: Faults = parse(&body)?;
    let mut world = shared.world();
    world.set_faults(faults).map_err(bad_request)?;
    Ok(Json(json!(world.faults())))
}

pub async fn get_faults(State(shared): State<Arc<Shared>>) -> AdminResult {
    Ok(Json(json!(shared.world().faults())))
}

#[derive(Deserialize)]
pub struct MessageFilter {
    page_id: Option<String>,
    psid: Option<String>,
}

pub async fn messages(
    State(shared): State<Arc<Shared>>,
    Query(filter): Query<MessageFilter>,
) -> AdminResult {
    let messages = shared
        .world()
        .messages(filter.page_id.as_deref(), filter.psid.as_deref());
    Ok(Json(json!({"messages": messages})))
}

pub async fn stats(State(shared): State<Arc<Shared>>) -> AdminResult {
    Ok(Json(json!(shared.world().stats())))
}

pub async fn reset(State(shared): State<Arc<Shared>>) -> AdminResult {
    shared.world().reset();
    Ok(Json(json!({})))
}
