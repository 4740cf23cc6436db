//! The web console on the HTTP listener: one page, its script and style (hand-written, compiled
//! into the binary, no JavaScript build), and the JSON and server-sent-events API the page reads.
//!
//! Each API call stands for a gRPC method and needs the role the gRPC guard gives that method,
//! with the same API keys, so the console can do nothing a gRPC client with the same key could
//! not. The calls run the same use cases and store reads as the gRPC handlers.

mod views;

use std::{convert::Infallible, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use tokio_stream::StreamExt;

use self::views::{
    DeliveryList, DeliveryView, PageList, PageView, ProgressView, SendList, SendView, StoryList,
    StoryView, TopicList, TopicView, WhoAmI,
};
use crate::{
    api::{
        DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE,
        guard::{bearer_token_of, required_role},
        page_size, page_token, paginate,
        shared::{page_listing, parse_page_id},
    },
    config::{ApiKeys, Role},
    domain::{DeliveryState, SendState, Violations},
    engine::{Progress, SendCommand},
    service::{
        ServiceError, ensure_page,
        sends::{self as cases, DeliveryQuery},
    },
    store::{now_ms, optins, pages, sends, stories},
};

/// What the console's API works with.
#[derive(Clone)]
pub struct ConsoleState {
    pub sends: cases::Context,
    pub api_keys: Arc<ApiKeys>,
}

/// Everything a page of the console may load or reach: its own script, style and API, nothing
/// inline, no other origin, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

// The gRPC methods the console's calls stand for: their roles are the guard's.
const LIST_PAGES: &str = "/otn.v1.PageService/ListPages";
const LIST_TOPICS: &str = "/otn.v1.OptInService/ListTopics";
const LIST_STORIES: &str = "/otn.v1.StoryService/ListStories";
const LIST_SENDS: &str = "/otn.v1.SendService/ListSends";
const GET_SEND: &str = "/otn.v1.SendService/GetSend";
const WATCH_SEND: &str = "/otn.v1.SendService/WatchSend";
const LIST_DELIVERIES: &str = "/otn.v1.SendService/ListDeliveries";
const PAUSE_SEND: &str = "/otn.v1.SendService/PauseSend";
const RESUME_SEND: &str = "/otn.v1.SendService/ResumeSend";
const CANCEL_SEND: &str = "/otn.v1.SendService/CancelSend";

// The gRPC lists' page-token kinds: a token from one surface continues the same list on the other.
const PAGES_TOKEN_KIND: &str = "pages";
const STORIES_TOKEN_KIND: &str = "stories";
const SENDS_TOKEN_KIND: &str = "sends";
const DELIVERIES_TOKEN_KIND: &str = "deliveries";

pub fn router(state: ConsoleState) -> Router {
    let api = Router::new()
        .route("/whoami", get(whoami))
        .route("/pages", get(list_pages))
        .route("/pages/{page_id}/topics", get(list_topics))
        .route("/pages/{page_id}/stories", get(list_stories))
        .route("/pages/{page_id}/sends", get(list_sends))
        .route("/sends/{send_id}", get(get_send))
        .route("/sends/{send_id}/deliveries", get(list_deliveries))
        .route("/sends/{send_id}/events", get(watch_send))
        .route("/sends/{send_id}/pause", post(pause_send))
        .route("/sends/{send_id}/resume", post(resume_send))
        .route("/sends/{send_id}/cancel", post(cancel_send))
        .fallback(unknown_call)
        .layer(middleware::map_response(api_response))
        .with_state(Arc::new(state));
    Router::new()
        .route("/", get(index))
        .route("/console/console.js", get(script))
        .route("/console/console.css", get(style))
        .nest("/console/api", api)
        .layer(middleware::from_fn(security_headers))
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// Every API answer is uncached, and every refusal JSON: axum's own (a path that does not
/// decode, a method the call does not take) are rewritten in the API's error shape.
async fn api_response(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    let refused = parts.status.is_client_error() || parts.status.is_server_error();
    let mut response = if refused && !is_json {
        let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text).trim().to_string();
        let code = match parts.status {
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "invalid_argument",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "unimplemented",
            _ => "internal",
        };
        let message = if text.is_empty() {
            parts
                .status
                .canonical_reason()
                .unwrap_or("refused")
                .to_string()
        } else {
            text
        };
        let status = parts.status;
        parts.headers.remove(header::CONTENT_TYPE);
        parts.headers.remove(header::CONTENT_LENGTH);
        let mut rewritten = ApiError {
            status,
            code,
            message,
        }
        .into_response();
        for (name, value) in &parts.headers {
            rewritten.headers_mut().insert(name, value.clone());
        }
        rewritten
    } else {
        Response::from_parts(parts, body)
    };
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Revalidated on every load: a new otnd's console replaces the old one at once.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", CONSOLE_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", CONSOLE_CSS)
}

/// An API call's refusal: its HTTP status and a JSON body `{"error": …, "code": …}`, the code
/// being the gRPC code the same refusal has there.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn invalid(violations: Violations) -> Self {
        ServiceError::Invalid(violations).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "code": self.code });
        (self.status, Json(body)).into_response()
    }
}

/// The gRPC status's message (clipped, secret-free, the cause of an internal error logged) with
/// the HTTP status that means the same.
impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        use tonic::Code;
        let status = tonic::Status::from(err);
        let (http, code) = match status.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
            Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Code::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
            Code::FailedPrecondition => (StatusCode::CONFLICT, "failed_precondition"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError {
            status: http,
            code,
            message: status.message().to_string(),
        }
    }
}

async fn unknown_call() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: "no such console API call".into(),
    }
}

fn unauthenticated() -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthenticated",
        message: "missing or unknown API key: send the header `Authorization: Bearer <key>`".into(),
    }
}

/// The caller's role by their key; `None` without a key. An unknown key is refused.
fn caller_role(state: &ConsoleState, headers: &HeaderMap) -> Result<Option<Role>, ApiError> {
    match bearer_token_of(headers) {
        None => Ok(None),
        Some(key) => state
            .api_keys
            .role_of(key)
            .map(Some)
            .ok_or_else(unauthenticated),
    }
}

/// As the gRPC guard would let the caller call `method`: anyone when no key is configured.
fn authorize(state: &ConsoleState, headers: &HeaderMap, method: &str) -> Result<(), ApiError> {
    if state.api_keys.is_empty() {
        return Ok(());
    }
    let needed = required_role(method).unwrap_or(Role::Admin);
    let role = caller_role(state, headers)?.ok_or_else(unauthenticated)?;
    if role < needed {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            code: "permission_denied",
            message: format!(
                "the {} role may not call {}: it needs the {} role",
                role.as_str(),
                method.trim_start_matches('/'),
                needed.as_str()
            ),
        });
    }
    Ok(())
}

/// The query string's parameters; a parameter the call does not take is refused by name.
fn query_params(
    raw: Option<String>,
    allowed: &[&str],
) -> Result<std::collections::HashMap<String, String>, ApiError> {
    let mut params = std::collections::HashMap::new();
    let mut v = Violations::new();
    for (name, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if allowed.contains(&name.as_ref()) {
            params.insert(name.into_owned(), value.into_owned());
        } else {
            let name: String = name.chars().take(40).collect();
            v.add(
                name,
                format!(
                    "is not a parameter of this call (it takes {})",
                    allowed.join(", ")
                ),
            );
        }
    }
    v.finish(|| Some(()))
        .map_err(ApiError::invalid)
        .map(|()| params)
}

/// `page_size` as the gRPC lists read it (absent: the default).
fn page_size_param(params: &std::collections::HashMap<String, String>) -> Result<i32, String> {
    match params.get("page_size").map(String::as_str) {
        None | Some("") => Ok(0),
        Some(raw) => raw.parse::<i32>().map_err(|_| {
            format!(
                "must be a whole number from 1 to {MAX_PAGE_SIZE} (default {DEFAULT_PAGE_SIZE})"
            )
        }),
    }
}

fn param<'a>(params: &'a std::collections::HashMap<String, String>, name: &str) -> &'a str {
    params.get(name).map_or("", String::as_str)
}

async fn whoami(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
) -> Result<Json<WhoAmI>, ApiError> {
    let steering = required_role(PAUSE_SEND).unwrap_or(Role::Admin);
    if state.api_keys.is_empty() {
        return Ok(Json(WhoAmI {
            keys_required: false,
            role: None,
            can_steer: true,
        }));
    }
    let role = caller_role(&state, &headers)?;
    Ok(Json(WhoAmI {
        keys_required: true,
        role: role.map(Role::as_str),
        can_steer: role.is_some_and(|role| role >= steering),
    }))
}

async fn list_pages(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<PageList>, ApiError> {
    authorize(&state, &headers, LIST_PAGES)?;
    let params = query_params(raw, &["page_size", "page_token"])?;
    let mut v = Violations::new();
    let size = v.check("page_size", page_size_param(&params).and_then(page_size));
    let after = v.check(
        "page_token",
        page_token::decode(PAGES_TOKEN_KIND, param(&params, "page_token")),
    );
    let (size, after) = v
        .finish(|| Some((size?, after?)))
        .map_err(ApiError::invalid)?;
    let rows = pages::list(&state.sends.store.read, after.as_deref(), size + 1)
        .await
        .map_err(ServiceError::internal)?;
    let (rows, next_page_token) = paginate(rows, size, PAGES_TOKEN_KIND, |page| {
        page.id.as_str().to_string()
    });
    Ok(Json(PageList {
        pages: rows.into_iter().map(PageView::from).collect(),
        next_page_token,
    }))
}

async fn list_topics(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(page_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<TopicList>, ApiError> {
    authorize(&state, &headers, LIST_TOPICS)?;
    query_params(raw, &[])?;
    let page_id = parse_page_id(&page_id)
        .map_err(|rule| ApiError::invalid(Violations::single("page_id", rule)))?;
    let store = &state.sends.store;
    ensure_page(store, &page_id).await?;
    let ledger = optins::ledger(&store.read, &page_id, now_ms())
        .await
        .map_err(ServiceError::internal)?;
    Ok(Json(TopicList {
        topics: ledger.into_iter().map(TopicView::from).collect(),
    }))
}

async fn list_stories(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(page_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<StoryList>, ApiError> {
    authorize(&state, &headers, LIST_STORIES)?;
    let params = query_params(raw, &["page_size", "page_token"])?;
    let size = page_size_param(&params)
        .map_err(|rule| ApiError::invalid(Violations::single("page_size", rule)))?;
    let store = &state.sends.store;
    let (page_id, size, after) = page_listing(
        store,
        &page_id,
        size,
        param(&params, "page_token"),
        STORIES_TOKEN_KIND,
    )
    .await?;
    let rows = stories::list(&store.read, &page_id, None, after.as_deref(), size + 1)
        .await
        .map_err(ServiceError::internal)?;
    let (rows, next_page_token) =
        paginate(rows, size, STORIES_TOKEN_KIND, |story| story.id.clone());
    Ok(Json(StoryList {
        stories: rows.into_iter().map(StoryView::from).collect(),
        next_page_token,
    }))
}

async fn list_sends(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(page_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<SendList>, ApiError> {
    authorize(&state, &headers, LIST_SENDS)?;
    let params = query_params(raw, &["page_size", "page_token", "state"])?;
    let size = page_size_param(&params)
        .map_err(|rule| ApiError::invalid(Violations::single("page_size", rule)))?;
    let filter = match param(&params, "state") {
        "" => None,
        raw => Some(SendState::parse(raw).ok_or_else(|| {
            ApiError::invalid(Violations::single(
                "state",
                format!("must be one of {}", names(SendState::ALL, |s| s.as_str())),
            ))
        })?),
    };
    let store = &state.sends.store;
    let (page_id, size, after) = page_listing(
        store,
        &page_id,
        size,
        param(&params, "page_token"),
        SENDS_TOKEN_KIND,
    )
    .await?;
    let rows = sends::list(
        &store.read,
        sends::SendFilter {
            page_id: page_id.as_str(),
            story_id: None,
            state: filter,
        },
        after.as_deref(),
        size + 1,
    )
    .await
    .map_err(ServiceError::internal)?;
    let (rows, next_page_token) = paginate(rows, size, SENDS_TOKEN_KIND, |send| send.id.clone());
    Ok(Json(SendList {
        // A running send's row as its page actor last committed it, as GetSend reads it.
        sends: rows
            .iter()
            .map(|row| match state.sends.engine.current_row(&row.id) {
                Some(current) => SendView::from(current.as_ref()),
                None => SendView::from(row),
            })
            .collect(),
        next_page_token,
    }))
}

fn names<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str) -> String {
    all.iter().map(|t| name(*t)).collect::<Vec<_>>().join(", ")
}

async fn get_send(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(send_id): Path<String>,
) -> Result<Json<SendView>, ApiError> {
    authorize(&state, &headers, GET_SEND)?;
    let send = cases::current(&state.sends, &send_id).await?;
    Ok(Json(SendView::from(send.as_ref())))
}

async fn list_deliveries(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(send_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<DeliveryList>, ApiError> {
    authorize(&state, &headers, LIST_DELIVERIES)?;
    let params = query_params(raw, &["page_size", "page_token", "state"])?;
    let mut v = Violations::new();
    let filter = match param(&params, "state") {
        "" => Some(None),
        raw => v.check(
            "state",
            DeliveryState::parse(raw).map(Some).ok_or_else(|| {
                format!(
                    "must be one of {}",
                    names(DeliveryState::ALL, |s| s.as_str())
                )
            }),
        ),
    };
    let size = v.check("page_size", page_size_param(&params).and_then(page_size));
    let after = v.check(
        "page_token",
        page_token::decode(DELIVERIES_TOKEN_KIND, param(&params, "page_token")).and_then(|after| {
            after
                .map(|a| {
                    a.parse::<i64>()
                        .map_err(|_| "is not a next_page_token this list returned".to_string())
                })
                .transpose()
        }),
    );
    let (filter, size, after) = v
        .finish(|| Some((filter?, size?, after?)))
        .map_err(ApiError::invalid)?;
    let query = DeliveryQuery {
        send_id,
        state: filter,
        after,
        limit: size + 1,
    };
    let rows = cases::deliveries(&state.sends, &query).await?;
    let (rows, next_page_token) = paginate(rows, size, DELIVERIES_TOKEN_KIND, |d| d.id.to_string());
    Ok(Json(DeliveryList {
        deliveries: rows.into_iter().map(DeliveryView::from).collect(),
        next_page_token,
    }))
}

async fn steer(
    state: &ConsoleState,
    headers: &HeaderMap,
    method: &str,
    send_id: &str,
    command: SendCommand,
) -> Result<Json<SendView>, ApiError> {
    authorize(state, headers, method)?;
    let send = cases::steer(&state.sends, send_id, command).await?;
    tracing::info!(send_id = %send.id, command = ?command, "send steered from the console");
    Ok(Json(SendView::from(&send)))
}

async fn pause_send(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(send_id): Path<String>,
) -> Result<Json<SendView>, ApiError> {
    steer(&state, &headers, PAUSE_SEND, &send_id, SendCommand::Pause).await
}

async fn resume_send(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(send_id): Path<String>,
) -> Result<Json<SendView>, ApiError> {
    steer(&state, &headers, RESUME_SEND, &send_id, SendCommand::Resume).await
}

async fn cancel_send(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(send_id): Path<String>,
) -> Result<Json<SendView>, ApiError> {
    steer(&state, &headers, CANCEL_SEND, &send_id, SendCommand::Cancel).await
}

/// WatchSend as server-sent events: one `progress` event per snapshot, from the current one to
/// the send's end. It holds a stream slot as WatchSend does (the watcher limits are the same)
/// and ends when otnd shuts down.
async fn watch_send(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Path(send_id): Path<String>,
) -> Result<Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    authorize(&state, &headers, WATCH_SEND)?;
    let progress = cases::watch(&state.sends, &send_id).await?;
    let events = progress.map(|progress: Progress| {
        let view = ProgressView::from(&progress);
        let data = serde_json::to_string(&view).unwrap_or_else(|_| "{}".into());
        Ok(Event::default().event("progress").data(data))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_stands_for_a_method_with_a_role() {
        for method in [
            LIST_PAGES,
            LIST_TOPICS,
            LIST_STORIES,
            LIST_SENDS,
            GET_SEND,
            WATCH_SEND,
            LIST_DELIVERIES,
        ] {
            assert_eq!(required_role(method), Some(Role::Viewer), "{method}");
        }
        for method in [PAUSE_SEND, RESUME_SEND, CANCEL_SEND] {
            assert_eq!(required_role(method), Some(Role::Operator), "{method}");
        }
    }

    #[test]
    fn an_unknown_parameter_is_refused_by_name() {
        let err = query_params(Some("page_size=5&sort=x".into()), &["page_size"]).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.starts_with("sort: "), "{}", err.message);
    }
}
