//! The Graph routes: `POST /{version}/me/messages`, `POST /{version}/{page-id}/messages`, and
//! batch requests on `POST /` and `POST /{version}/`. Parameters are read from the query string,
//! a form body or a JSON body, and the access token also from `Authorization: Bearer`.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use super::{
    Shared, now_ms,
    wire::{GraphError, form_params, send_request_from},
    world::{Decision, Usage, World},
};

/// The most items Graph runs in one batch request.
pub const MAX_BATCH_ITEMS: usize = 50;

fn is_version(segment: &str) -> bool {
    segment.strip_prefix('v').is_some_and(|rest| {
        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit() || c == '.')
    })
}

/// Every parameter of a request: query string, then the body (JSON object or form), then the
/// bearer token when no `access_token` was given.
fn request_params(
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Map<String, Value>, GraphError> {
    let mut params = uri
        .query()
        .map(|q| form_params(q.as_bytes()))
        .unwrap_or_default();
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(object)) => params.extend(object),
            _ => {
                return Err(GraphError::invalid_param(
                    "The request body is not a JSON object".into(),
                ));
            }
        }
    } else if !body.is_empty() {
        params.extend(form_params(body));
    }
    if !params.contains_key("access_token")
        && let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("OAuth "))
            })
    {
        params.insert(
            "access_token".into(),
            Value::String(token.trim().to_string()),
        );
    }
    Ok(params)
}

/// The request's parameters, once its path's version (if any) is one Graph would serve.
fn versioned_params(
    version: Option<&str>,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Map<String, Value>, GraphError> {
    if let Some(version) = version
        && !is_version(version)
    {
        return Err(GraphError::unsupported_request(&format!(
            "unknown version '{version}'"
        )));
    }
    request_params(uri, headers, body)
}

fn trace_id() -> String {
    use rand::Rng;
    format!("A{:016x}", rand::thread_rng().r#gen::<u64>())
}

fn usage_headers(usage: &Usage) -> Vec<(&'static str, String)> {
    // (otnd choice) Time and CPU grow with the calls, below them: the call count is what binds.
    let app = json!({"call_count": usage.app_call_count, "total_time": usage.app_call_count / 2,
        "total_cputime": usage.app_call_count / 4});
    let mut headers = vec![("x-app-usage", app.to_string())];
    if let Some(page_id) = &usage.page_id {
        let business = json!({ page_id.as_str(): [{
            "type": "messenger",
            "call_count": usage.call_count,
            "total_cputime": usage.call_count / 4,
            "total_time": usage.call_count / 2,
            "estimated_time_to_regain_access": usage.regain_minutes,
        }]});
        headers.push(("x-business-use-case-usage", business.to_string()));
    }
    headers
}

fn json_response(status: u16, body: &Value, usage: &Usage) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response();
    for (name, value) in usage_headers(usage) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn error_response(error: &GraphError, usage: &Usage) -> Response {
    json_response(error.http_status, &error.body(&trace_id()), usage)
}

/// A response whose body fails at once: the server closes the connection without a complete
/// answer, which a client sees as a reset or an incomplete message.
fn dropped_connection() -> Response {
    let failing = tokio_stream::once(Err::<Bytes, std::io::Error>(std::io::Error::other(
        "graph-sandbox dropped the connection",
    )));
    Response::new(Body::from_stream(failing))
}

fn internal_error() -> Response {
    error_response(&GraphError::unknown_error(), &Usage::default())
}

/// `POST /{version}/{node}/messages`, where node is `me` or the page id.
pub async fn messages(
    State(shared): State<Arc<Shared>>,
    Path((version, node)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = match versioned_params(Some(&version), &uri, &headers, &body) {
        Ok(params) => params,
        Err(error) => return error_response(&error, &Usage::default()),
    };
    let path_page_id = (node != "me").then_some(node);
    let request = send_request_from(params, path_page_id);
    let (decision, latency) = {
        let mut world = shared.world();
        let decision = world.send(request, now_ms());
        (decision, world.latency_ms())
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    match decision {
        Decision::Accepted {
            recipient_id,
            message_id,
            usage,
        } => json_response(
            200,
            &World::accepted_body(&recipient_id, &message_id),
            &usage,
        ),
        Decision::Refused { error, usage } => error_response(&error, &usage),
        Decision::Hang(hold_ms) => {
            tokio::time::sleep(Duration::from_millis(hold_ms)).await;
            error_response(&GraphError::service_unavailable(), &Usage::default())
        }
        Decision::Reset
        | Decision::AcceptedThenFail {
            drop_connection: true,
        } => dropped_connection(),
        Decision::AcceptedThenFail {
            drop_connection: false,
        } => internal_error(),
    }
}

/// `POST /` and `POST /{version}/`: a batch of up to 50 sends, answered in request order.
pub async fn batch(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let version = Some(uri.path().trim_matches('/')).filter(|v| !v.is_empty());
    let mut params = match versioned_params(version, &uri, &headers, &body) {
        Ok(params) => params,
        Err(error) => return error_response(&error, &Usage::default()),
    };
    let items = match params.remove("batch") {
        Some(Value::Array(items)) => items,
        Some(Value::String(text)) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(items)) => items,
            _ => {
                return error_response(
                    &GraphError::batch_malformed("not a JSON array"),
                    &Usage::default(),
                );
            }
        },
        Some(_) => {
            return error_response(
                &GraphError::batch_malformed("not a JSON array"),
                &Usage::default(),
            );
        }
        None => return error_response(&GraphError::missing_param("batch"), &Usage::default()),
    };
    if items.len() > MAX_BATCH_ITEMS {
        return error_response(&GraphError::batch_too_large(items.len()), &Usage::default());
    }
    // Graph includes each item's headers unless asked not to.
    let include_headers = match params.get("include_headers") {
        Some(Value::Bool(include)) => *include,
        Some(Value::String(text)) => text != "false",
        _ => true,
    };
    let batch_auth = BatchAuth {
        access_token: params.get("access_token").and_then(Value::as_str),
        appsecret_proof: params.get("appsecret_proof").and_then(Value::as_str),
    };

    let (answers, latency, usage) = {
        let mut world = shared.world();
        let now = now_ms();
        let answers: Vec<Value> = items
            .iter()
            .map(|item| batch_item(&mut world, item, &batch_auth, include_headers, now))
            .collect();
        (answers, world.latency_ms(), world.app_usage(now))
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    json_response(200, &Value::Array(answers), &usage)
}

/// One batch item, decided like a single send. An item whose send timed out, lost its
/// connection, or was accepted and then failed comes back `null`: it may or may not have run.
/// The batch's own credentials, used by items that carry none.
struct BatchAuth<'a> {
    access_token: Option<&'a str>,
    appsecret_proof: Option<&'a str>,
}

fn batch_item(
    world: &mut World,
    item: &Value,
    batch_auth: &BatchAuth<'_>,
    include_headers: bool,
    now: i64,
) -> Value {
    let answer = |status: u16, body: Value, usage: &Usage| {
        let mut answer = json!({"code": status, "body": body.to_string()});
        if include_headers {
            let mut headers =
                vec![json!({"name": "Content-Type", "value": "text/javascript; charset=UTF-8"})];
            headers.extend(
                usage_headers(usage)
                    .into_iter()
                    .map(|(name, value)| json!({"name": name, "value": value})),
            );
            answer["headers"] = Value::Array(headers);
        }
        answer
    };
    let refuse = |error: GraphError| {
        answer(
            error.http_status,
            error.body(&trace_id()),
            &Usage::default(),
        )
    };

    let Some(item) = item.as_object() else {
        return refuse(GraphError::batch_malformed("an item is not an object"));
    };
    let method = item.get("method").and_then(Value::as_str).unwrap_or("GET");
    let relative_url = item
        .get("relative_url")
        .and_then(Value::as_str)
        .unwrap_or("");
    let (path, query) = relative_url.split_once('?').unwrap_or((relative_url, ""));
    let mut segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.first().is_some_and(|s| is_version(s)) {
        segments.remove(0);
    }
    let node = match (method.to_ascii_uppercase().as_str(), segments.as_slice()) {
        ("POST", [node, "messages"]) => node.to_string(),
        _ => {
            return refuse(GraphError::unsupported_request(&format!(
                "{method} {relative_url}"
            )));
        }
    };
    let mut params = form_params(query.as_bytes());
    if let Some(body) = item.get("body").and_then(Value::as_str) {
        params.extend(form_params(body.as_bytes()));
    }
    if !params.contains_key("access_token")
        && let Some(token) = batch_auth.access_token
    {
        params.insert("access_token".into(), Value::String(token.to_string()));
        if let Some(proof) = batch_auth.appsecret_proof {
            params
                .entry("appsecret_proof")
                .or_insert_with(|| Value::String(proof.to_string()));
        }
    }
    let path_page_id = (node != "me").then_some(node);
    match world.send(send_request_from(params, path_page_id), now) {
        Decision::Accepted {
            recipient_id,
            message_id,
            usage,
        } => answer(
            200,
            World::accepted_body(&recipient_id, &message_id),
            &usage,
        ),
        Decision::Refused { error, usage } => {
            answer(error.http_status, error.body(&trace_id()), &usage)
        }
        Decision::Hang(_) | Decision::Reset | Decision::AcceptedThenFail { .. } => Value::Null,
    }
}
