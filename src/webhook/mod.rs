//! Facebook's webhook on the HTTP listener: `GET /webhook` answers the subscription check,
//! `POST /webhook` takes signed events. A POST is checked against the raw bytes it came as,
//! stored in one transaction, and acknowledged; it never calls the Graph API.

pub mod parse;

use axum::{
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use secrecy::ExposeSecret;
use serde::Deserialize;
use std::sync::Arc;

use crate::{
    crypto::{constant_time_eq, hmac_sha256},
    http::HttpState,
    store,
};

/// The largest webhook body otnd reads (Facebook batches up to 1000 updates per POST).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Deserialize)]
pub struct Verification {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

fn refuse(status: StatusCode, why: &'static str) -> Response {
    tracing::warn!(status = status.as_u16(), why, "webhook refused");
    (status, why).into_response()
}

/// The subscription check: 200 with the challenge when the token is some page's verify token.
pub async fn verify(
    State(state): State<Arc<HttpState>>,
    Query(query): Query<Verification>,
) -> Response {
    let (Some(mode), Some(token), Some(challenge)) =
        (query.mode, query.verify_token, query.challenge)
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "hub.mode, hub.verify_token and hub.challenge are required",
        );
    };
    if mode != "subscribe" {
        return refuse(StatusCode::FORBIDDEN, "hub.mode is not subscribe");
    }
    let tokens = match store::pages::verify_tokens(&state.store.db, &state.cipher).await {
        Ok(tokens) => tokens,
        Err(err) => {
            tracing::error!(error = %err, "webhook verification could not read pages");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    // Every token is compared, in constant time, so timing says nothing of which one matched.
    let matched = tokens.iter().fold(false, |found, known| {
        found | constant_time_eq(known.expose_secret().as_bytes(), token.as_bytes())
    });
    if matched {
        (StatusCode::OK, challenge).into_response()
    } else {
        refuse(StatusCode::FORBIDDEN, "hub.verify_token matches no page")
    }
}

/// `sha256=<64 hex digits>` from X-Hub-Signature-256.
fn signature(headers: &HeaderMap) -> Option<[u8; 32]> {
    let value = headers.get("x-hub-signature-256")?.to_str().ok()?;
    let hex_digits = value.strip_prefix("sha256=")?;
    let mut signature = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut signature).ok()?;
    Some(signature)
}

pub async fn receive(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(signature) = signature(&headers) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "X-Hub-Signature-256 (sha256=<hex>) is required",
        );
    };
    let parsed = match parse::parse(&body, store::now_ms()) {
        Ok(parsed) => parsed,
        Err(err) => {
            tracing::warn!(error = %err, "webhook body refused");
            return (StatusCode::BAD_REQUEST, err.to_string()).into_response();
        }
    };
    let secrets = match store::pages::app_secrets(
        &state.store.db,
        &state.cipher,
        parsed.pages.keys(),
    )
    .await
    {
        Ok(secrets) => secrets,
        Err(err) => {
            tracing::error!(error = %err, "webhook could not read page secrets");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    if secrets.is_empty() {
        // Facebook keeps retrying what is not acknowledged; events of pages otnd does not
        // manage are acknowledged and dropped.
        tracing::warn!(pages = ?parsed.pages.keys().collect::<Vec<_>>(), "webhook for no registered page ignored");
        return (StatusCode::OK, "ignored").into_response();
    }
    // One app signs a POST; only pages whose app secret produced this signature are taken.
    let signed_by: Vec<_> = secrets
        .iter()
        .filter(|(_, secret)| {
            let expected = hmac_sha256(secret.expose_secret().as_bytes(), &body);
            constant_time_eq(&expected, &signature)
        })
        .map(|(id, _)| id.clone())
        .collect();
    if signed_by.is_empty() {
        return refuse(
            StatusCode::FORBIDDEN,
            "X-Hub-Signature-256 does not match the body",
        );
    }
    let mut pages = parsed.pages;
    let batches: Vec<_> = signed_by
        .into_iter()
        .filter_map(|id| pages.remove(&id).map(|events| (id, events)))
        .collect();
    match store::optins::ingest(&state.store.db, &batches).await {
        Ok(report) => {
            tracing::info!(
                events = report.events,
                opt_ins_created = report.opt_ins_created,
                skipped = parsed.skipped,
                "webhook stored"
            );
            (StatusCode::OK, "EVENT_RECEIVED").into_response()
        }
        Err(err) => {
            // Not acknowledged: Facebook delivers it again.
            tracing::error!(error = %err, "webhook could not be stored");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
