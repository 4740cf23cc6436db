//! The Graph API client: the only module that speaks HTTP to Facebook. One reqwest client with
//! connection reuse and timeouts; base URL and version from configuration; `appsecret_proof` on
//! every call; every answer classified once (see [`classify`]).
//!
//! The page's credentials travel in the JSON body of every POST, never in a URL: URLs end up in
//! error texts (reqwest's `Display` of a failed request names it), proxies' and servers' access
//! logs, and traces. Transport errors are stripped of their URL all the same.

pub mod classify;
pub mod usage;

use std::time::Duration;

use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;

pub use classify::{Class, Failure, GraphError, SendKind};
pub use usage::Usage;

use crate::domain::PageCredentials;

/// The most items Graph runs in one batch request.
pub const MAX_BATCH_ITEMS: usize = 50;

/// A message Facebook accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub message_id: String,
    /// Facebook may leave it out; tolerated.
    pub recipient_id: Option<String>,
}

/// Who a send goes to.
#[derive(Clone, Copy, Debug)]
pub enum Recipient<'a> {
    /// A standard message to a user inside the window.
    Psid(&'a str),
    /// A one-time notification, spending the token.
    Token(&'a str),
    /// A recurring notification: the token is a subscription and stays valid.
    Recurring(&'a str),
}

impl Recipient<'_> {
    fn kind(&self) -> SendKind {
        match self {
            Recipient::Psid(_) => SendKind::Standard,
            Recipient::Token(_) => SendKind::Token,
            Recipient::Recurring(_) => SendKind::Recurring,
        }
    }

    fn to_json(self) -> Value {
        match self {
            Recipient::Psid(psid) => json!({ "id": psid }),
            Recipient::Token(token) => json!({ "one_time_notif_token": token }),
            Recipient::Recurring(token) => json!({ "notification_messages_token": token }),
        }
    }
}

/// An opt-in request's template.
#[derive(Clone, Debug)]
pub enum OptInTemplate<'a> {
    /// `one_time_notif_req`: a "Notify Me" button for one message.
    OneTime { title: &'a str, topic: &'a str },
    /// `notification_messages`: a recurring subscription.
    Recurring {
        title: &'a str,
        topic: &'a str,
        image_url: Option<&'a str>,
        /// IANA name, e.g. `Europe/London`.
        timezone: Option<&'a str>,
        /// `ALLOW`, `FREQUENCY`, `GET`, `GET_UPDATES`, `OPT_IN` or `SIGN_UP`.
        call_to_action: Option<&'static str>,
        reoptin: bool,
    },
}

impl OptInTemplate<'_> {
    fn payload(&self) -> Value {
        match *self {
            OptInTemplate::OneTime { title, topic } => json!({
                "template_type": "one_time_notif_req", "title": title, "payload": topic}),
            OptInTemplate::Recurring {
                title,
                topic,
                image_url,
                timezone,
                call_to_action,
                reoptin,
            } => {
                let mut payload = json!({
                    "template_type": "notification_messages", "title": title, "payload": topic});
                if let Some(url) = image_url {
                    payload["image_url"] = json!(url);
                }
                if let Some(timezone) = timezone {
                    payload["notification_messages_timezone"] = json!(timezone);
                }
                if let Some(text) = call_to_action {
                    payload["notification_messages_cta_text"] = json!(text);
                }
                if reoptin {
                    payload["notification_messages_reoptin"] = json!("ENABLED");
                }
                payload
            }
        }
    }
}

/// One send of a batch.
#[derive(Clone, Debug)]
pub struct BatchSend<'a> {
    pub recipient: Recipient<'a>,
    pub message: &'a Value,
}

#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    /// `{base}/{version}/` with a trailing slash, so relative paths join under the version.
    versioned: Url,
    timeout: Duration,
}

#[derive(Deserialize)]
struct SendAnswer {
    message_id: Option<String>,
    recipient_id: Option<String>,
}

#[derive(Deserialize)]
struct BatchAnswer {
    code: u16,
    #[serde(default)]
    headers: Vec<BatchHeader>,
    #[serde(default)]
    body: Option<String>,
}

/// A batch request's JSON body, the page's credentials included.
#[derive(Serialize)]
struct BatchRequest<'a> {
    #[serde(flatten)]
    credentials: BodyCredentials<'a>,
    include_headers: bool,
    batch: Vec<BatchItem>,
}

/// `access_token` and `appsecret_proof` as body parameters (Graph reads a POST's parameters from
/// its body as well as from its query string).
#[derive(Serialize)]
struct BodyCredentials<'a> {
    access_token: &'a str,
    appsecret_proof: String,
}

impl<'a> BodyCredentials<'a> {
    fn of(credentials: &'a PageCredentials) -> Self {
        let token = credentials.access_token.expose_secret();
        BodyCredentials {
            access_token: token,
            appsecret_proof: appsecret_proof(credentials.app_secret.expose_secret(), token),
        }
    }
}

#[derive(Serialize)]
struct BatchItem {
    method: &'static str,
    relative_url: &'static str,
    /// The send's parameters, form-encoded, as Graph reads a batch item's body.
    body: String,
}

#[derive(Deserialize)]
struct BatchHeader {
    name: String,
    value: String,
}

/// Every HTTP client of the process starts here. reqwest is built without a TLS provider of its
/// own, so that rustls has exactly one (ring, which tonic's TLS also uses); this installs it as
/// the process default first (a second install is a no-op).
pub fn http_client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A client with reqwest's defaults (see [`http_client_builder`]).
pub fn http_client() -> reqwest::Client {
    http_client_builder()
        .build()
        .expect("an HTTP client with default settings builds")
}

impl GraphClient {
    pub fn new(base_url: &Url, version: &str, timeout: Duration) -> anyhow::Result<Self> {
        let mut versioned = base_url.clone();
        let base_path = versioned.path().trim_end_matches('/').to_string();
        versioned.set_path(&format!("{base_path}/{version}/"));
        Ok(GraphClient {
            http: Self::http(timeout)?,
            versioned,
            timeout,
        })
    }

    fn http(timeout: Duration) -> reqwest::Result<reqwest::Client> {
        http_client_builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("otnd/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    /// The same client with connections of its own. A connection is driven by a task on the
    /// thread that opened it: a thread that calls Graph through its own client never has its
    /// calls carried, and its answers read, by another thread's task.
    pub fn with_own_connections(&self) -> anyhow::Result<Self> {
        Ok(GraphClient {
            http: Self::http(self.timeout)?,
            ..self.clone()
        })
    }

    fn url(&self, path: &str) -> Url {
        self.versioned
            .join(path)
            .expect("a relative Graph path joins")
    }

    /// An opt-in request template: asks the user to opt in on `topic` (the payload Facebook
    /// hands back with the token).
    pub async fn send_optin_request(
        &self,
        credentials: &PageCredentials,
        psid: &str,
        template: &OptInTemplate<'_>,
    ) -> Result<Delivered, Failure> {
        let body = json!({
            "recipient": {"id": psid},
            "messaging_type": "RESPONSE",
            "message": {"attachment": {"type": "template", "payload": template.payload()}},
        });
        self.post_message(credentials, body).await.0
    }

    /// A token send or a standard (`UPDATE`) send of `message`.
    pub async fn send(
        &self,
        credentials: &PageCredentials,
        recipient: Recipient<'_>,
        message: &Value,
    ) -> Result<Delivered, Failure> {
        self.send_observed(credentials, recipient, message).await.0
    }

    /// A send, with what the answer's usage headers said.
    pub async fn send_observed(
        &self,
        credentials: &PageCredentials,
        recipient: Recipient<'_>,
        message: &Value,
    ) -> (Result<Delivered, Failure>, Usage) {
        self.post_message(credentials, message_body(recipient, message))
            .await
    }

    async fn post_message(
        &self,
        credentials: &PageCredentials,
        mut body: Value,
    ) -> (Result<Delivered, Failure>, Usage) {
        let BodyCredentials {
            access_token,
            appsecret_proof,
        } = BodyCredentials::of(credentials);
        body["access_token"] = json!(access_token);
        body["appsecret_proof"] = json!(appsecret_proof);
        let request = self.http.post(self.url("me/messages")).json(&body);
        match exchange(request).await {
            Ok((status, usage, bytes)) => (answer(status, &bytes, &usage), usage),
            Err(failure) => (Err(failure), Usage::default()),
        }
    }

    /// Up to 50 sends in one request; one result per item, in order. `Err` when the batch as a
    /// whole failed (nothing can be said of any item).
    /// One batch request: an answer per send, in order (or the failure of the whole request),
    /// with what the usage headers said, the last item's news over the request's.
    pub async fn send_batch(
        &self,
        credentials: &PageCredentials,
        sends: &[BatchSend<'_>],
    ) -> (Result<Vec<Result<Delivered, Failure>>, Failure>, Usage) {
        assert!(
            sends.len() <= MAX_BATCH_ITEMS,
            "callers split batches at {MAX_BATCH_ITEMS}"
        );
        // Sends of one batch usually share their message: its form field is encoded once.
        let mut messages: Vec<(*const Value, String)> = Vec::new();
        for send in sends {
            if !messages
                .iter()
                .any(|(ptr, _)| std::ptr::eq(*ptr, send.message))
            {
                let mut field = String::from("&message=");
                field.extend(url::form_urlencoded::byte_serialize(
                    send.message.to_string().as_bytes(),
                ));
                messages.push((send.message, field));
            }
        }
        let batch: Vec<BatchItem> = sends
            .iter()
            .map(|send| {
                let message = messages
                    .iter()
                    .find(|(ptr, _)| std::ptr::eq(*ptr, send.message))
                    .map_or("", |(_, field)| field.as_str());
                let recipient = send.recipient.to_json().to_string();
                let mut body = String::with_capacity(recipient.len() * 3 + message.len() + 40);
                body.push_str("recipient=");
                body.extend(url::form_urlencoded::byte_serialize(recipient.as_bytes()));
                if send.recipient.kind() == SendKind::Standard {
                    body.push_str("&messaging_type=UPDATE");
                }
                body.push_str(message);
                BatchItem {
                    method: "POST",
                    relative_url: "me/messages",
                    body,
                }
            })
            .collect();
        // A JSON body, as Graph also takes (and as the npm messaging-api-messenger client
        // sends it): form-encoding the batch would percent-encode every item's already
        // form-encoded body a second time, at about three times the bytes.
        let request = self.http.post(self.url("")).json(&BatchRequest {
            credentials: BodyCredentials::of(credentials),
            include_headers: true,
            batch,
        });
        let (status, mut usage, bytes) = match exchange(request).await {
            Ok(exchanged) => exchanged,
            Err(failure) => return (Err(failure), Usage::default()),
        };
        if status != 200 {
            let failure = match answer(status, &bytes, &usage) {
                Err(failure) => failure,
                Ok(_) => Failure::transport("the batch request answered like a send".into(), true),
            };
            return (Err(failure), usage);
        }
        let answers: Vec<Option<BatchAnswer>> = match serde_json::from_slice(&bytes) {
            Ok(answers) => answers,
            Err(e) => {
                let failure = Failure::transport(
                    format!("the batch answer is not Graph's format: {e}"),
                    true,
                );
                return (Err(failure), usage);
            }
        };
        let mut results: Vec<Result<Delivered, Failure>> = answers
            .into_iter()
            .map(|item| match item {
                // Graph did not finish this item: it may or may not have run.
                None => Err(Failure::transport(
                    "the batch did not finish this item".into(),
                    true,
                )),
                Some(item) => {
                    let header = |name: &str| {
                        item.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| h.value.as_str())
                    };
                    let item_usage = Usage::from_headers(
                        header("x-business-use-case-usage"),
                        header("x-app-usage"),
                    );
                    usage = usage.then(item_usage);
                    answer(
                        item.code,
                        item.body.as_deref().unwrap_or("").as_bytes(),
                        &item_usage,
                    )
                }
            })
            .collect();
        // Fewer answers than items: the rest were not finished either.
        while results.len() < sends.len() {
            results.push(Err(Failure::transport(
                "the batch answered fewer items than it was sent".into(),
                true,
            )));
        }
        (Ok(results), usage)
    }
}

fn message_body(recipient: Recipient<'_>, message: &Value) -> Value {
    let mut body = json!({"recipient": recipient.to_json(), "message": message});
    if recipient.kind() == SendKind::Standard {
        body["messaging_type"] = json!("UPDATE");
    }
    body
}

/// `appsecret_proof`: hex HMAC-SHA256 of the access token, keyed with the app secret.
pub fn appsecret_proof(app_secret: &str, access_token: &str) -> String {
    hex::encode(crate::crypto::hmac_sha256(
        app_secret.as_bytes(),
        access_token.as_bytes(),
    ))
}

/// Sends a request and reads the whole answer: status, the business usage header, the body.
async fn exchange(request: reqwest::RequestBuilder) -> Result<(u16, Usage, bytes::Bytes), Failure> {
    let response = request.send().await.map_err(transport_failure)?;
    let status = response.status().as_u16();
    let usage = usage_of(response.headers());
    let body = response.bytes().await.map_err(transport_failure)?;
    Ok((status, usage, body))
}

fn usage_of(headers: &HeaderMap) -> Usage {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    Usage::from_headers(header("x-business-use-case-usage"), header("x-app-usage"))
}

/// A transport failure: ambiguous unless the request never left (connect errors). The text
/// leaves the URL out: it is stored with the delivery and shown to API callers.
fn transport_failure(err: reqwest::Error) -> Failure {
    let err = err.without_url();
    let ambiguous = !err.is_connect() && !err.is_builder();
    let what = if err.is_timeout() {
        "Graph API timed out"
    } else if err.is_connect() {
        "could not connect to the Graph API"
    } else {
        "the Graph API connection failed"
    };
    Failure::transport(format!("{what}: {err}"), ambiguous)
}

/// Sorts one answer (a whole response, or a batch item).
fn answer(status: u16, body: &[u8], usage: &Usage) -> Result<Delivered, Failure> {
    if status == 200 {
        return match serde_json::from_slice::<SendAnswer>(body) {
            Ok(SendAnswer {
                message_id: Some(message_id),
                recipient_id,
            }) => Ok(Delivered {
                message_id,
                recipient_id,
            }),
            // A 200 without a message id: it was most likely sent, but nothing proves it.
            _ => Err(Failure::transport(
                "Graph answered 200 without a message_id".into(),
                true,
            )),
        };
    }
    let envelope: classify::ErrorEnvelope = serde_json::from_slice(body).unwrap_or_default();
    Err(classify::classify(status, envelope.error, usage))
}
