//! Facebook's webhook on the HTTP listener: `GET /webhook` answers the subscription check,
//! `POST /webhook` takes signed events. A POST is authenticated before anything is done with
//! what it says: a cheap scan finds the pages the envelope names (at most
//! [`MAX_PAGES_PER_BODY`]), the signature is checked on the raw bytes against those pages' app
//! secrets (one HMAC per distinct secret), and only then is the body parsed, stored in one
//! transaction, and acknowledged. It never calls the Graph API.

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

/// The most distinct pages one POST may name: every named page otnd manages costs a lookup and
/// (per distinct app secret) an HMAC over the whole body before anything is trusted.
pub const MAX_PAGES_PER_BODY: usize = 100;

/// What the cheap scan reads of an envelope: its object and its entries' page ids; every other
/// field is skipped unread.
#[derive(Deserialize)]
struct Envelope {
    object: Option<String>,
    entry: Option<Vec<EntryId>>,
}

/// An entry's page id, if it has a readable one. Anything else (an entry that is not an object,
/// its `messaging`, its `time`) is skipped without being built.
struct EntryId(Option<String>);

impl<'de> Deserialize<'de> for EntryId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct Scan;
        impl<'de> Visitor<'de> for Scan {
            type Value = EntryId;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an entry")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EntryId, A::Error> {
                let mut id = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "id" {
                        id = match map.next_value::<serde_json::Value>()? {
                            serde_json::Value::String(s) => Some(s),
                            serde_json::Value::Number(n) => Some(n.to_string()),
                            _ => None,
                        };
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(EntryId(id))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EntryId, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(EntryId(None))
            }

            fn visit_bool<E>(self, _: bool) -> Result<EntryId, E> {
                Ok(EntryId(None))
            }

            fn visit_i64<E>(self, _: i64) -> Result<EntryId, E> {
                Ok(EntryId(None))
            }

            fn visit_u64<E>(self, _: u64) -> Result<EntryId, E> {
                Ok(EntryId(None))
            }

            fn visit_f64<E>(self, _: f64) -> Result<EntryId, E> {
                Ok(EntryId(None))
            }

            fn visit_str<E>(self, _: &str) -> Result<EntryId, E> {
                Ok(EntryId(None))
            }

            fn visit_unit<E>(self) -> Result<EntryId, E> {
                Ok(EntryId(None))
            }
        }
        deserializer.deserialize_any(Scan)
    }
}

/// The distinct page ids an envelope names, from the scan.
fn named_pages(entries: &[EntryId]) -> std::collections::BTreeSet<crate::domain::PageId> {
    entries
        .iter()
        .filter_map(|e| e.0.as_deref())
        .filter_map(|id| crate::domain::PageId::parse(id).ok())
        .collect()
}

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
    let tokens = match store::pages::verify_tokens(&state.store.read, &state.cipher).await {
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

/// Whether `signature` is the HMAC-SHA256 of the raw `body` under the app `secret`, compared in
/// constant time.
fn signed_with(secret: &[u8], body: &[u8], signature: &[u8; 32]) -> bool {
    constant_time_eq(&hmac_sha256(secret, body), signature)
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
    // The scan: which pages the POST speaks for, nothing more.
    let envelope: Envelope = match serde_json::from_slice(&body) {
        Ok(envelope) => envelope,
        Err(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "the body is not a webhook envelope (a JSON object with an entry array)",
            );
        }
    };
    if envelope.object.as_deref() != Some("page") {
        // Instagram, WhatsApp and others share the endpoint shape; only pages are otnd's.
        return (StatusCode::OK, "ignored").into_response();
    }
    let Some(entries) = envelope.entry else {
        return refuse(StatusCode::BAD_REQUEST, "the envelope has no entry array");
    };
    let named = named_pages(&entries);
    if named.len() > MAX_PAGES_PER_BODY {
        tracing::warn!(
            pages = named.len(),
            "webhook refused: too many pages in one POST"
        );
        return (
            StatusCode::BAD_REQUEST,
            format!("a POST names at most {MAX_PAGES_PER_BODY} pages"),
        )
            .into_response();
    }
    let secrets = match store::pages::app_secrets(&state.store.read, &state.cipher, &named).await {
        Ok(secrets) => secrets,
        Err(err) => {
            tracing::error!(error = %err, "webhook could not read page secrets");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    if secrets.is_empty() {
        // Facebook keeps retrying what is not acknowledged; events of pages otnd does not
        // manage are acknowledged and dropped (counted, not listed: a forged POST may name
        // thousands).
        tracing::warn!(
            pages = named.len(),
            "webhook for no registered page ignored"
        );
        return (StatusCode::OK, "ignored").into_response();
    }
    // One app signs a POST; only pages whose app secret produced this signature are taken. One
    // HMAC per distinct secret: pages of one app share it.
    let mut verdicts: Vec<(&[u8], bool)> = Vec::new();
    let mut signed_by = std::collections::BTreeSet::new();
    for (id, secret) in &secrets {
        let secret = secret.expose_secret().as_bytes();
        let signed = match verdicts.iter().find(|(known, _)| *known == secret) {
            Some((_, signed)) => *signed,
            None => {
                let signed = signed_with(secret, &body, &signature);
                verdicts.push((secret, signed));
                signed
            }
        };
        if signed {
            signed_by.insert(id.clone());
        }
    }
    if signed_by.is_empty() {
        return refuse(
            StatusCode::FORBIDDEN,
            "X-Hub-Signature-256 does not match the body",
        );
    }
    let parsed = match parse::parse(&body, store::now_ms()) {
        Ok(parsed) => parsed,
        Err(err) => {
            tracing::warn!(error = %err, "webhook body refused");
            return (StatusCode::BAD_REQUEST, err.to_string()).into_response();
        }
    };
    let batches: Vec<_> = parsed
        .pages
        .into_iter()
        .filter(|(id, _)| signed_by.contains(id))
        .collect();
    match store::optins::ingest(&state.store.db, &state.cipher, &batches).await {
        Ok(report) => {
            tracing::info!(
                events = report.events,
                opt_ins_created = report.opt_ins_created,
                skipped = parsed.skipped,
                dropped_erased = report.dropped_erased,
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

#[cfg(test)]
mod proptests {
    //! X-Hub-Signature-256 under random bodies, secrets and headers, judged against ring's HMAC
    //! (an implementation independent of the one the check uses).

    use axum::http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    /// Cases each property below tries.
    pub const SIGNATURE_CASES: u32 = 1000;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: SIGNATURE_CASES,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn oracle_hex(secret: &[u8], body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    }

    /// The check `receive` makes: the header read, then compared with the body's HMAC.
    fn verifies(headers: &HeaderMap, secret: &[u8], body: &[u8]) -> bool {
        signature(headers).is_some_and(|sig| signed_with(secret, body, &sig))
    }

    /// The header as a client can send it; `None` for bytes no HTTP header can carry.
    fn with_header(value: &[u8]) -> Option<HeaderMap> {
        let value = HeaderValue::from_bytes(value).ok()?;
        let mut headers = HeaderMap::new();
        headers.insert("x-hub-signature-256", value);
        Some(headers)
    }

    fn signed(secret: &[u8], body: &[u8]) -> HeaderMap {
        with_header(format!("sha256={}", oracle_hex(secret, body)).as_bytes())
            .expect("sha256=<hex> is a valid header value")
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..4096)
    }

    /// App secrets are printable text (Facebook's are 32 hex digits); up to 200 bytes, beyond
    /// HMAC's 64-byte block where keys are hashed first.
    fn secret() -> impl Strategy<Value = Vec<u8>> {
        "[!-~]{1,200}".prop_map(String::into_bytes)
    }

    /// Signature headers that are malformed for the given right hex digits.
    fn malformed(right_hex: String) -> impl Strategy<Value = Option<Vec<u8>>> {
        let len = right_hex.len();
        let hex1 = right_hex.clone();
        let hex2 = right_hex.clone();
        let hex3 = right_hex.clone();
        let hex4 = right_hex.clone();
        let hex5 = right_hex.clone();
        prop_oneof![
            // No header at all, an empty one, the prefix alone.
            Just(None),
            Just(Some(Vec::new())),
            Just(Some(b"sha256=".to_vec())),
            // The right digits without the prefix, or under another algorithm's prefix.
            Just(Some(right_hex.clone().into_bytes())),
            Just(Some(format!("sha1={right_hex}").into_bytes())),
            // Truncated, or longer than 32 bytes.
            (0..len).prop_map(move |cut| Some(format!("sha256={}", &hex1[..cut]).into_bytes())),
            "[0-9a-f]{1,16}"
                .prop_map(move |extra| Some(format!("sha256={hex2}{extra}").into_bytes())),
            // One digit that is not hex.
            (0..len, "[g-zG-Z\\-_ .+/=]").prop_map(move |(at, bad)| {
                let mut digits = hex3.clone();
                digits.replace_range(at..at + 1, &bad);
                Some(format!("sha256={digits}").into_bytes())
            }),
            // Anything after the prefix, or anything at all.
            ".{0,80}".prop_map(|text| Some(format!("sha256={text}").into_bytes())),
            prop::collection::vec(any::<u8>(), 0..100).prop_map(Some),
            // The right digits with something around them.
            "[ -~]{1,4}".prop_map(move |junk| Some(format!("sha256={hex4}{junk}").into_bytes())),
            "[ -~]{1,4}".prop_map(move |junk| Some(format!("{junk}sha256={hex5}").into_bytes())),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn the_right_signature_verifies(body in body(), secret in secret()) {
            prop_assert!(verifies(&signed(&secret, &body), &secret, &body));
        }

        #[test]
        fn any_bit_flipped_in_the_body_is_refused(
            body in prop::collection::vec(any::<u8>(), 1..4096),
            secret in secret(),
            at in any::<prop::sample::Index>(),
            bit in 0..8u8,
        ) {
            let headers = signed(&secret, &body);
            let mut altered = body.clone();
            altered[at.index(body.len())] ^= 1 << bit;
            prop_assert!(!verifies(&headers, &secret, &altered));
        }

        #[test]
        fn any_bit_flipped_in_the_signature_is_refused(
            body in body(),
            secret in secret(),
            at in 0..32usize,
            bit in 0..8u8,
        ) {
            let mut digest = hex::decode(oracle_hex(&secret, &body)).unwrap();
            digest[at] ^= 1 << bit;
            let headers = with_header(format!("sha256={}", hex::encode(digest)).as_bytes()).unwrap();
            prop_assert!(!verifies(&headers, &secret, &body));
        }

        /// A bit flipped anywhere in the header's text is refused, unless it only changed the
        /// case of a hex digit (the same signature).
        #[test]
        fn any_bit_flipped_in_the_header_text_is_refused(
            body in body(),
            secret in secret(),
            at in 0..71usize,
            bit in 0..8u8,
        ) {
            let right = oracle_hex(&secret, &body);
            let mut header = format!("sha256={right}").into_bytes();
            header[at] ^= 1 << bit;
            let same = header.starts_with(b"sha256=") && header[7..].eq_ignore_ascii_case(right.as_bytes());
            // Bytes no header can carry (control characters) never reach the check.
            if let Some(headers) = with_header(&header) {
                prop_assert_eq!(verifies(&headers, &secret, &body), same, "header {:?}", String::from_utf8_lossy(&header));
            }
        }

        #[test]
        fn another_secret_is_refused(body in body(), secret in secret(), other in secret()) {
            prop_assume!(secret != other);
            prop_assert!(!verifies(&signed(&other, &body), &secret, &body));
        }

        #[test]
        fn malformed_headers_are_refused(
            (body, secret, header) in (body(), secret())
                .prop_flat_map(|(body, secret)| {
                    let right = oracle_hex(&secret, &body);
                    (Just(body), Just(secret), malformed(right))
                }),
        ) {
            let headers = match &header {
                None => Some(HeaderMap::new()),
                Some(value) => with_header(value),
            };
            if let Some(headers) = headers {
                prop_assert!(
                    !verifies(&headers, &secret, &body),
                    "header {:?}", header.as_deref().map(String::from_utf8_lossy)
                );
            }
        }
    }
}
