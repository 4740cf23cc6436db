//! Graph's wire formats as the sandbox speaks them: error bodies, message rules, request bodies
//! (JSON or form), `appsecret_proof`, and webhook bodies escaped and signed as Facebook does.

use serde_json::{Map, Value, json};

use super::world::SendRequest;

/// A Graph error answer: HTTP status, the `error` envelope, and the reason the sandbox counts.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphError {
    pub http_status: u16,
    pub code: i64,
    pub subcode: Option<i64>,
    pub kind: &'static str,
    pub message: String,
    /// Key of `rejected_by_reason` in the stats.
    pub reason: &'static str,
}

impl GraphError {
    fn new(
        http_status: u16,
        code: i64,
        subcode: Option<i64>,
        message: String,
        reason: &'static str,
    ) -> Self {
        GraphError {
            http_status,
            code,
            subcode,
            kind: "OAuthException",
            message,
            reason,
        }
    }

    pub fn body(&self, trace_id: &str) -> Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "code": self.code,
            "fbtrace_id": trace_id,
        });
        if let Some(subcode) = self.subcode {
            error["error_subcode"] = json!(subcode);
        }
        json!({ "error": error })
    }

    pub fn access_token_required() -> Self {
        Self::new(
            400,
            104,
            None,
            "An access token is required to request this resource.".into(),
            "access_token_missing",
        )
    }

    pub fn invalid_access_token() -> Self {
        Self::new(
            400,
            190,
            None,
            "Invalid OAuth access token - Cannot parse access token".into(),
            "access_token_invalid",
        )
    }

    pub fn invalid_appsecret_proof() -> Self {
        let mut error = Self::new(
            400,
            100,
            None,
            "Invalid appsecret_proof provided in the API argument".into(),
            "appsecret_proof_invalid",
        );
        error.kind = "GraphMethodException";
        error
    }

    pub fn page_mismatch() -> Self {
        Self::new(
            400,
            100,
            None,
            "(#100) The page id in the path does not belong to the access token".into(),
            "page_mismatch",
        )
    }

    pub fn page_restricted() -> Self {
        Self::new(
            400,
            10,
            Some(1893063),
            "(#10) This Page is temporarily restricted from sending messages.".into(),
            "page_restricted",
        )
    }

    pub fn rate_limited() -> Self {
        Self::new(
            400,
            613,
            Some(2534040),
            "(#613) Calls to this api have exceeded the rate limit.".into(),
            "rate_limited",
        )
    }

    pub fn too_many_messages() -> Self {
        Self::new(400, 80006, None, "(#80006) There have been too many messages sent to this Messenger account. Please wait a while before sending more messages.".into(), "rate_limited")
    }

    /// Code 4: the app's own limit, shared by every page.
    pub fn app_request_limit() -> Self {
        Self::new(
            400,
            4,
            None,
            "(#4) Application request limit reached".into(),
            "app_rate_limited",
        )
    }

    pub fn unknown_error() -> Self {
        Self::new(
            500,
            1,
            None,
            "An unknown error occurred".into(),
            "injected_error",
        )
    }

    pub fn service_unavailable() -> Self {
        Self::new(
            503,
            2,
            None,
            "An unexpected error has occurred. Please retry your request later.".into(),
            "injected_error",
        )
    }

    pub fn missing_param(name: &str) -> Self {
        Self::new(
            400,
            100,
            None,
            format!("(#100) The parameter {name} is required"),
            "invalid_message",
        )
    }

    pub fn invalid_param(message: String) -> Self {
        Self::new(
            400,
            100,
            None,
            format!("(#100) {message}"),
            "invalid_message",
        )
    }

    pub fn bad_recipient() -> Self {
        Self::new(
            400,
            100,
            None,
            "(#100) Param recipient must have exactly one of id, one_time_notif_token or notification_messages_token".into(),
            "invalid_recipient",
        )
    }

    pub fn optin_request_needs_id() -> Self {
        Self::new(
            400,
            100,
            None,
            "(#100) An opt-in request must be sent to recipient[id]".into(),
            "invalid_recipient",
        )
    }

    /// Used, expired, unknown or foreign: Graph names no difference (GRAPH_API.md, otnd choice).
    pub fn token_spent(reason: &'static str) -> Self {
        Self::new(
            400,
            100,
            None,
            "(#100) The one-time notification token is invalid, expired or already used".into(),
            reason,
        )
    }

    /// Unknown, foreign or expired: one answer, as for one-time tokens.
    pub fn recurring_token_invalid(reason: &'static str) -> Self {
        Self::new(
            400,
            100,
            None,
            "(#100) The notification_messages_token is invalid or expired".into(),
            reason,
        )
    }

    /// The user sent STOP: the token is dead until a RESUME.
    pub fn recurring_stopped() -> Self {
        Self::new(
            400,
            10,
            Some(1893015),
            "(#10) The user has stopped notifications on this topic".into(),
            "recurring_token_stopped",
        )
    }

    /// A recurring message inside the subscriber's minimum gap: skip them, not a throttle.
    pub fn recurring_gap() -> Self {
        Self::new(
            400,
            4,
            Some(2018354),
            "(#4) Recurring notification minimum gap not respected".into(),
            "recurring_gap",
        )
    }

    /// A second recurring opt-in request with the same title within a week.
    pub fn too_many_recurring_requests() -> Self {
        Self::new(
            400,
            9,
            Some(2018352),
            "(#9) Too many notification_messages requests".into(),
            "too_many_recurring_requests",
        )
    }

    pub fn no_matching_user() -> Self {
        Self::new(
            400,
            100,
            Some(2018001),
            "(#100) No matching user found".into(),
            "no_matching_user",
        )
    }

    pub fn outside_window() -> Self {
        Self::new(
            400,
            10,
            Some(2018278),
            "(#10) This message is sent outside of allowed window.".into(),
            "outside_window",
        )
    }

    pub fn repeated_optin_request() -> Self {
        Self::new(
            400,
            613,
            Some(1893016),
            "(#613) An opt-in request for this topic was already sent to this person.".into(),
            "repeated_optin_request",
        )
    }

    pub fn batch_too_large(items: usize) -> Self {
        let mut error = Self::new(
            400,
            100,
            None,
            format!(
                "(#100) Too many requests in batch message. Maximum batch size is 50, got {items}"
            ),
            "batch_too_large",
        );
        error.kind = "GraphBatchException";
        error
    }

    pub fn batch_malformed(why: &str) -> Self {
        let mut error = Self::new(
            400,
            100,
            None,
            format!("(#100) The batch parameter is malformed: {why}"),
            "batch_malformed",
        );
        error.kind = "GraphBatchException";
        error
    }

    pub fn unsupported_request(what: &str) -> Self {
        let mut error = Self::new(
            400,
            100,
            None,
            format!("(#100) Unsupported request: {what}"),
            "unsupported_request",
        );
        error.kind = "GraphMethodException";
        error
    }
}

/// What a valid message is, as far as the recipient rules care.
#[derive(Debug, PartialEq)]
pub enum MessageKind {
    Text,
    ButtonTemplate,
    OptInRequest {
        payload: String,
    },
    /// `template_type: notification_messages`; `title` defaulted when absent.
    RecurringOptInRequest {
        title: String,
        payload: String,
    },
}

impl MessageKind {
    pub fn is_optin_request(&self) -> bool {
        matches!(
            self,
            MessageKind::OptInRequest { .. } | MessageKind::RecurringOptInRequest { .. }
        )
    }
}

/// The title of a recurring opt-in request (and subscription) that names none.
pub const DEFAULT_RECURRING_TITLE: &str = "Updates and promotions";
/// The most characters of a recurring opt-in request's title.
pub const MAX_RECURRING_TITLE_CHARS: usize = 65;

const RECURRING_CTA_TEXTS: [&str; 6] = [
    "ALLOW",
    "FREQUENCY",
    "GET",
    "GET_UPDATES",
    "OPT_IN",
    "SIGN_UP",
];
const RECURRING_REOPTIN: [&str; 2] = ["ENABLED", "DISABLED"];

fn chars(value: &str) -> usize {
    value.chars().count()
}

fn text_field<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, GraphError> {
    match object.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(GraphError::invalid_param(format!(
            "Param {path} must be a string"
        ))),
        None => Err(GraphError::missing_param(path)),
    }
}

/// A string field that may be absent.
fn optional_text_field<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, GraphError> {
    match object.get(key) {
        None => Ok(None),
        Some(_) => text_field(object, key, path).map(Some),
    }
}

fn one_of(value: &str, path: &str, allowed: &[&str]) -> Result<(), GraphError> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(GraphError::invalid_param(format!(
        "Param {path} must be one of {}, got '{value}'",
        allowed.join(", ")
    )))
}

fn is_http_url(value: &str) -> bool {
    url::Url::parse(value)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

fn length_between(value: &str, path: &str, min: usize, max: usize) -> Result<(), GraphError> {
    let len = chars(value);
    if len < min {
        return Err(GraphError::invalid_param(format!(
            "Param {path} must be non-empty"
        )));
    }
    if len > max {
        return Err(GraphError::invalid_param(format!(
            "Length of param {path} must be less than or equal to {max}"
        )));
    }
    Ok(())
}

/// Facebook's rules for the messages otnd sends: text, button template, opt-in request.
pub fn validate_message(message: &Value) -> Result<MessageKind, GraphError> {
    let Some(message) = message.as_object() else {
        return Err(GraphError::invalid_param(
            "Param message must be a JSON object".into(),
        ));
    };
    match (message.get("text"), message.get("attachment")) {
        (Some(_), Some(_)) => Err(GraphError::invalid_param(
            "Param message must have only one of text or attachment".into(),
        )),
        (None, None) => Err(GraphError::invalid_param(
            "Message cannot be empty, must provide valid attachment or text".into(),
        )),
        (Some(_), None) => {
            let text = text_field(message, "text", "message[text]")?;
            length_between(text, "message[text]", 1, 2000)?;
            Ok(MessageKind::Text)
        }
        (None, Some(attachment)) => validate_attachment(attachment),
    }
}

fn validate_attachment(attachment: &Value) -> Result<MessageKind, GraphError> {
    let attachment = attachment.as_object().ok_or_else(|| {
        GraphError::invalid_param("Param message[attachment] must be an object".into())
    })?;
    let kind = text_field(attachment, "type", "message[attachment][type]")?;
    if kind != "template" {
        return Err(GraphError::invalid_param(format!(
            "Param message[attachment][type] '{kind}' is not supported by the sandbox (template only)"
        )));
    }
    let payload = attachment
        .get("payload")
        .and_then(Value::as_object)
        .ok_or_else(|| GraphError::missing_param("message[attachment][payload]"))?;
    let template = text_field(
        payload,
        "template_type",
        "message[attachment][payload][template_type]",
    )?;
    match template {
        "button" => {
            let text = text_field(payload, "text", "message[attachment][payload][text]")?;
            length_between(text, "message[attachment][payload][text]", 1, 640)?;
            let buttons = payload
                .get("buttons")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    GraphError::missing_param("message[attachment][payload][buttons]")
                })?;
            if buttons.is_empty() || buttons.len() > 3 {
                return Err(GraphError::invalid_param(format!(
                    "Param message[attachment][payload][buttons] must have 1 to 3 buttons, got {}",
                    buttons.len()
                )));
            }
            for (index, button) in buttons.iter().enumerate() {
                validate_button(
                    button,
                    &format!("message[attachment][payload][buttons][{index}]"),
                )?;
            }
            Ok(MessageKind::ButtonTemplate)
        }
        "one_time_notif_req" => {
            let title = text_field(payload, "title", "message[attachment][payload][title]")?;
            length_between(title, "message[attachment][payload][title]", 1, 65)?;
            let topic = text_field(payload, "payload", "message[attachment][payload][payload]")?;
            length_between(topic, "message[attachment][payload][payload]", 1, 1000)?;
            Ok(MessageKind::OptInRequest {
                payload: topic.to_string(),
            })
        }
        "notification_messages" => validate_recurring_request(payload),
        other => Err(GraphError::invalid_param(format!(
            "Param message[attachment][payload][template_type] '{other}' is not supported by the sandbox"
        ))),
    }
}

/// The recurring opt-in request template's fields, as Meta documents them.
fn validate_recurring_request(payload: &Map<String, Value>) -> Result<MessageKind, GraphError> {
    const PREFIX: &str = "message[attachment][payload]";
    let path = |key: &str| format!("{PREFIX}[{key}]");
    let title = match optional_text_field(payload, "title", &path("title"))? {
        Some(title) => {
            length_between(title, &path("title"), 1, MAX_RECURRING_TITLE_CHARS)?;
            title
        }
        None => DEFAULT_RECURRING_TITLE,
    };
    let topic = text_field(payload, "payload", &path("payload"))?;
    length_between(topic, &path("payload"), 1, usize::MAX)?;
    if let Some(image_url) = optional_text_field(payload, "image_url", &path("image_url"))?
        && !is_http_url(image_url)
    {
        return Err(GraphError::invalid_param(format!(
            "Param {} must be a valid http(s) URL",
            path("image_url")
        )));
    }
    optional_text_field(
        payload,
        "notification_messages_timezone",
        &path("notification_messages_timezone"),
    )?;
    for (key, allowed) in [
        ("notification_messages_cta_text", &RECURRING_CTA_TEXTS[..]),
        ("notification_messages_reoptin", &RECURRING_REOPTIN[..]),
    ] {
        if let Some(value) = optional_text_field(payload, key, &path(key))? {
            one_of(value, &path(key), allowed)?;
        }
    }
    Ok(MessageKind::RecurringOptInRequest {
        title: title.to_string(),
        payload: topic.to_string(),
    })
}

fn validate_button(button: &Value, path: &str) -> Result<(), GraphError> {
    let button = button
        .as_object()
        .ok_or_else(|| GraphError::invalid_param(format!("Param {path} must be an object")))?;
    let title = text_field(button, "title", &format!("{path}[title]"))?;
    length_between(title, &format!("{path}[title]"), 1, 20)?;
    match text_field(button, "type", &format!("{path}[type]"))? {
        "web_url" => {
            let url = text_field(button, "url", &format!("{path}[url]"))?;
            if !is_http_url(url) {
                return Err(GraphError::invalid_param(format!(
                    "Param {path}[url] must be a valid http(s) URL"
                )));
            }
        }
        "postback" => {
            let payload = text_field(button, "payload", &format!("{path}[payload]"))?;
            length_between(payload, &format!("{path}[payload]"), 1, 1000)?;
        }
        "phone_number" => {
            let payload = text_field(button, "payload", &format!("{path}[payload]"))?;
            let digits = payload.strip_prefix('+').unwrap_or("");
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                return Err(GraphError::invalid_param(format!(
                    "Param {path}[payload] must be a phone number starting with +"
                )));
            }
        }
        other => {
            return Err(GraphError::invalid_param(format!(
                "Param {path}[type] '{other}' is not a supported button type"
            )));
        }
    }
    Ok(())
}

/// A field that may arrive as a JSON value (JSON body) or as a string holding JSON (form body).
fn json_field(value: Option<Value>) -> Option<Value> {
    match value {
        Some(Value::String(s)) => Some(serde_json::from_str(&s).unwrap_or(Value::String(s))),
        other => other,
    }
}

/// Builds a send from its parameters, wherever they came from (query, form, JSON body).
pub fn send_request_from(
    mut params: Map<String, Value>,
    path_page_id: Option<String>,
) -> SendRequest {
    let text = |value: Option<Value>| match value {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    SendRequest {
        access_token: text(params.remove("access_token")),
        appsecret_proof: text(params.remove("appsecret_proof")),
        path_page_id,
        recipient: json_field(params.remove("recipient")),
        message: json_field(params.remove("message")),
        messaging_type: text(params.remove("messaging_type")),
    }
}

/// `key=value&…` into a JSON object of strings (later keys win).
pub fn form_params(form: &[u8]) -> Map<String, Value> {
    url::form_urlencoded::parse(form)
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect()
}

/// HMAC-SHA256 of `message` under `key`. The sandbox's own, not otnd's: the judge of what otnd
/// signs shares no code with it.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Facebook's `appsecret_proof`: hex HMAC-SHA256 of the access token under the app secret.
pub fn appsecret_proof(app_secret: &str, access_token: &str) -> String {
    hex::encode(hmac_sha256(app_secret.as_bytes(), access_token.as_bytes()))
}

/// The `X-Hub-Signature-256` header value for a webhook body.
pub fn webhook_signature(app_secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(hmac_sha256(app_secret.as_bytes(), body))
    )
}

/// Compares secrets without leaking, through timing, how much of them matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// JSON as Facebook writes webhook bodies: every non-ASCII character as `\uXXXX` (surrogate pairs
/// beyond the BMP) and `/` as `\/`. Receivers must verify the signature over these exact bytes.
pub fn facebook_json(value: &Value) -> String {
    let plain = value.to_string();
    let mut escaped = String::with_capacity(plain.len() + plain.len() / 8);
    for c in plain.chars() {
        match c {
            '/' => escaped.push_str("\\/"),
            c if c.is_ascii() => escaped.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    escaped.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facebook_json_escapes_like_facebook_and_parses_back() {
        let value = json!({"text": "café 🎉 a/b"});
        let escaped = facebook_json(&value);
        assert_eq!(escaped, r#"{"text":"caf\u00e9 \ud83c\udf89 a\/b"}"#);
        assert_eq!(serde_json::from_str::<Value>(&escaped).unwrap(), value);
    }

    #[test]
    fn message_rules_sit_at_facebooks_limits() {
        assert!(validate_message(&json!({"text": "é".repeat(2000)})).is_ok());
        let error = validate_message(&json!({"text": "é".repeat(2001)})).unwrap_err();
        assert!(error.message.contains("message[text]"), "{error:?}");
        let button = |n: usize| {
            json!({"attachment": {"type": "template", "payload": {
            "template_type": "button", "text": "t",
            "buttons": vec![json!({"type": "postback", "title": "t", "payload": "p"}); n]}}})
        };
        assert!(validate_message(&button(3)).is_ok());
        assert!(
            validate_message(&button(4))
                .unwrap_err()
                .message
                .contains("1 to 3")
        );
        assert!(validate_message(&button(0)).is_err());
        let titled = |title: &str| {
            json!({"attachment": {"type": "template", "payload": {
            "template_type": "button", "text": "t",
            "buttons": [{"type": "web_url", "title": title, "url": "https://example.com"}]}}})
        };
        assert!(validate_message(&titled(&"x".repeat(20))).is_ok());
        let error = validate_message(&titled(&"x".repeat(21))).unwrap_err();
        assert!(error.message.contains("buttons][0][title]"), "{error:?}");
    }

    #[test]
    fn appsecret_proof_is_hmac_sha256_of_the_token() {
        // Known answer from an independent implementation:
        // printf token | openssl dgst -sha256 -hmac secret
        assert_eq!(
            appsecret_proof("secret", "token"),
            "e941110e3d2bfe82621f0e3e1434730d7305d106c5f68c87165d0b27a4611a4a"
        );
    }
}
