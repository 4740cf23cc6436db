//! Webhooks as Facebook sends them: the `page` envelope, millisecond timestamps, bodies escaped
//! as Facebook escapes them, `X-Hub-Signature-256` over the exact bytes, and retries of failed
//! deliveries with growing pauses.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};

use super::{Shared, wire, world::RecurringTerms};

/// Facebook sends at most this many events in one POST of a bulk load (otnd choice, DESIGN.md).
pub const EVENTS_PER_POST: usize = 100;

/// One `messaging_optins` event: who opted in (or stopped, or resumed), and its `optin` object.
pub struct OptInEvent {
    pub psid: String,
    pub optin: Value,
}

impl OptInEvent {
    /// A one-time notification opt-in.
    pub fn one_time(psid: String, payload: &str, token: &str) -> Self {
        OptInEvent {
            psid,
            optin: json!({
                "type": "one_time_notif_req",
                "payload": payload,
                "one_time_notif_token": token,
            }),
        }
    }

    /// A recurring subscription: a plain opt-in (`status` `None`) or a STOP or RESUME, whose
    /// `status` is the spelling Facebook sent. Without `token`, the event names none (Facebook
    /// has been seen to leave it out of status changes).
    pub fn recurring(
        psid: String,
        payload: &str,
        terms: &RecurringTerms,
        token: Option<&str>,
        status: Option<&str>,
    ) -> Self {
        let mut optin = json!({
            "type": "notification_messages",
            "payload": payload,
            "title": terms.title,
            "notification_messages_timezone": terms.timezone,
        });
        if let Some(token) = token {
            optin["notification_messages_token"] = json!(token);
        }
        match status {
            None => {
                if let Some(expiry) = terms.expires_at_ms {
                    optin["token_expiry_timestamp"] = json!(expiry);
                }
                optin["user_token_status"] = json!(terms.user_token_status);
            }
            Some(status) => {
                optin["user_token_status"] = json!("NOT_REFRESHED");
                optin["notification_messages_status"] = json!(status);
            }
        }
        OptInEvent { psid, optin }
    }
}

pub fn optin_envelope(page_id: &str, events: &[OptInEvent], time_ms: i64) -> Value {
    let messaging: Vec<Value> = events
        .iter()
        .map(|event| {
            json!({
                "sender": {"id": event.psid},
                "recipient": {"id": page_id},
                "timestamp": time_ms,
                "optin": event.optin,
            })
        })
        .collect();
    json!({"object": "page", "entry": [{"id": page_id, "time": time_ms, "messaging": messaging}]})
}

pub fn message_envelope(page_id: &str, psid: &str, text: &str, mid: &str, time_ms: i64) -> Value {
    json!({"object": "page", "entry": [{"id": page_id, "time": time_ms, "messaging": [{
        "sender": {"id": psid},
        "recipient": {"id": page_id},
        "timestamp": time_ms,
        "message": {"mid": mid, "text": text},
    }]}]})
}

/// Posts each body in order, each retried until it is acknowledged or the attempts run out.
pub fn deliver_in_order(shared: Arc<Shared>, url: String, app_secret: String, bodies: Vec<Value>) {
    tokio::spawn(async move {
        for body in bodies {
            let raw = wire::facebook_json(&body);
            let (delivered, failed_attempts) =
                post_with_retries(&shared, &url, &app_secret, raw).await;
            shared.world().count_webhook(delivered, failed_attempts);
        }
    });
}

async fn post_with_retries(
    shared: &Shared,
    url: &str,
    app_secret: &str,
    body: String,
) -> (bool, u64) {
    let signature = wire::webhook_signature(app_secret, body.as_bytes());
    let mut failed = 0;
    for attempt in 0..shared.options.webhook_max_attempts {
        if attempt > 0 {
            let pause = shared.options.webhook_retry_base * 2u32.saturating_pow(attempt - 1);
            tokio::time::sleep(pause.min(Duration::from_secs(300))).await;
        }
        let result = shared
            .http
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Hub-Signature-256", &signature)
            .body(body.clone())
            .send()
            .await;
        match result {
            Ok(response) if response.status().is_success() => return (true, failed),
            Ok(response) => {
                tracing::warn!(url, status = %response.status(), attempt, "webhook refused");
            }
            Err(err) => tracing::warn!(url, error = %err, attempt, "webhook not delivered"),
        }
        failed += 1;
    }
    tracing::warn!(url, attempts = failed, "webhook abandoned");
    (false, failed)
}
