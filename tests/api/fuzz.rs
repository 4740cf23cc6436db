//! Bad input, generated ("Proof under faults and load", section "Bad input"):
//!
//! - the webhook body parser: any bytes, Facebook-like envelopes with fields of the wrong type,
//!   missing fields, huge numbers and deep nesting never panic, and what it takes is what an
//!   oracle written again from GRAPH_API.md and the domain's rules takes;
//! - story content validation against an independent oracle of the documented limits;
//! - the webhook endpoint under forged, mutated and genuine POSTs: never a 5xx, and the opt-ins
//!   stored are exactly those of bodies signed with the page's own app secret;
//! - a sweep of every RPC of every service with empty, oversized and wrong-typed requests: never
//!   INTERNAL or UNKNOWN, and the server still answers afterwards.
//!
//! Every property's case count is a `const` here; the webhook run and the sweep print theirs.
//! (The signature check's properties are unit tests in `src/webhook/mod.rs`.)

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use otnd::{
    domain::{Button, ButtonInput, ButtonKind, ContentInput, EventKind, StoryContent, fingerprint},
    pb::{
        CreateSegmentRequest, CreateStoryRequest, GetSubscriberRequest, ListOptInsRequest,
        PreviewStoryRequest, RecordInteractionRequest, RecordOptInRequest, SegmentRule,
        StartSendRequest, story_content::Kind,
    },
    webhook::parse::{ParseError, ParsedWebhook, parse},
};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, TestRunner},
};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    helpers::{TestApp, page_app_secret, spawn_app},
};

/// Cases of each property (inputs tried per run).
pub const PARSE_BYTES_CASES: u32 = 2000;
pub const PARSE_ENVELOPE_CASES: u32 = 2000;
pub const PARSE_NUMBER_CASES: u32 = 1000;
pub const PARSE_NESTING_CASES: u32 = 256;
pub const STORY_CASES: u32 = 2000;
pub const STORY_WILD_CASES: u32 = 1000;
/// POSTs to the running webhook per backend.
pub const WEBHOOK_POSTS: usize = 600;
/// Random byte strings sent to each RPC by the sweep (besides its fixed requests).
pub const SWEEP_RANDOM_BODIES_PER_RPC: usize = 4;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Unicode scalar values counted from UTF-8 lead bytes: how Facebook's limits count
/// characters, computed without `chars()`.
fn scalars(s: &str) -> usize {
    s.bytes().filter(|b| b & 0xC0 != 0x80).count()
}

fn no_space_or_control(s: &str) -> bool {
    !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

// ---------------------------------------------------------------------------------------------
// The webhook body parser.

/// What a parsed webhook says, in plain values that both the parser and the oracle give.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    pages: BTreeMap<String, Vec<(String, i64, Taken)>>,
    skipped: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Taken {
    OptIn { topic: String, token: String },
    Interaction,
    Seen,
}

fn outcome(parsed: &ParsedWebhook) -> Outcome {
    Outcome {
        pages: parsed
            .pages
            .iter()
            .map(|(page, events)| {
                let events = events
                    .iter()
                    .map(|event| {
                        let taken = match &event.kind {
                            EventKind::OptIn { topic, token } => Taken::OptIn {
                                topic: topic.as_str().into(),
                                token: token.as_str().into(),
                            },
                            EventKind::Interaction => Taken::Interaction,
                            EventKind::Seen => Taken::Seen,
                        };
                        (event.psid.as_str().to_string(), event.at_ms, taken)
                    })
                    .collect();
                (page.as_str().to_string(), events)
            })
            .collect(),
        skipped: parsed.skipped,
    }
}

/// An id as Facebook sends it: a string, or a number in its decimal form.
fn oracle_id(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn is_page_id(id: &str) -> bool {
    (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit())
}

fn is_psid(psid: &str) -> bool {
    (1..=128).contains(&scalars(psid)) && no_space_or_control(psid)
}

fn is_token(token: &str) -> bool {
    (1..=2048).contains(&scalars(token)) && no_space_or_control(token)
}

/// Epoch milliseconds: an integer from 0001-01-01 to 9999-12-31 (a float, a number in a string
/// or a time no clock gives is none); from 0 to 10^11 (before March 1973 in milliseconds), seconds.
fn oracle_ms(value: &Value) -> Option<i64> {
    let raw = value.as_i64()?;
    let ms = if (0..100_000_000_000).contains(&raw) {
        raw * 1000
    } else {
        raw
    };
    let year_1 = -62_135_596_800_000_i64;
    let year_10000 = 253_402_300_800_000_i64;
    (year_1 <= ms && ms < year_10000).then_some(ms)
}

/// The envelope rules of GRAPH_API.md written again: what otnd should take from a JSON body
/// (`None`: the body is no envelope at all).
fn oracle(body: &Value, now_ms: i64) -> Option<Outcome> {
    let envelope = body.as_object()?;
    let mut out = Outcome {
        pages: BTreeMap::new(),
        skipped: 0,
    };
    if envelope.get("object") != Some(&Value::String("page".into())) {
        out.skipped = 1;
        return Some(out);
    }
    let Some(Value::Array(entries)) = envelope.get("entry") else {
        return None;
    };
    for entry in entries {
        let page = entry
            .get("id")
            .and_then(oracle_id)
            .filter(|id| is_page_id(id));
        // Events come under `messaging`, or `standby` while another app holds the thread.
        let list = |key: &str| match entry.get(key) {
            Some(Value::Array(events)) => Some(events.clone()),
            _ => None,
        };
        let messaging = match (list("messaging"), list("standby")) {
            (None, None) => None,
            (a, b) => Some([a.unwrap_or_default(), b.unwrap_or_default()].concat()),
        };
        let (Some(page), Some(messaging)) = (page, messaging) else {
            out.skipped += 1;
            continue;
        };
        let entry_time = entry.get("time").and_then(oracle_ms).unwrap_or(now_ms);
        for event in &messaging {
            match oracle_event(event, &page, entry_time) {
                Some(taken) => out.pages.entry(page.clone()).or_default().push(taken),
                None => out.skipped += 1,
            }
        }
    }
    Some(out)
}

fn oracle_event(event: &Value, page: &str, entry_time: i64) -> Option<(String, i64, Taken)> {
    let sender = oracle_id(event.get("sender")?.get("id")?)?;
    if sender == page || !is_psid(&sender) {
        return None;
    }
    let at = event
        .get("timestamp")
        .and_then(oracle_ms)
        .unwrap_or(entry_time);
    let taken = if let Some(optin) = event.get("optin") {
        if optin.get("type").and_then(Value::as_str) == Some("one_time_notif_req") {
            let topic = optin.get("payload")?.as_str()?;
            let token = optin.get("one_time_notif_token")?.as_str()?;
            let topic_ok = (1..=1000).contains(&scalars(topic)) && !topic.contains('\0');
            if !topic_ok || !is_token(token) {
                return None;
            }
            Taken::OptIn {
                topic: topic.into(),
                token: token.into(),
            }
        } else {
            Taken::Seen
        }
    } else if let Some(message) = event.get("message") {
        if message.get("is_echo") == Some(&Value::Bool(true)) {
            return None;
        }
        Taken::Interaction
    } else if event.get("postback").is_some() {
        Taken::Interaction
    } else {
        Taken::Seen
    };
    Some((sender, at, taken))
}

/// The parser on `body` agrees with serde_json on what is JSON and with the oracle on the rest.
fn check_parse(body: &[u8], now_ms: i64) -> Result<(), TestCaseError> {
    let result = parse(body, now_ms);
    match serde_json::from_slice::<Value>(body) {
        Err(_) => prop_assert!(
            matches!(result, Err(ParseError::NotJson(_))),
            "not JSON, yet {result:?}"
        ),
        Ok(value) => match (oracle(&value, now_ms), result) {
            (None, Err(ParseError::NotAnEnvelope(_))) => {}
            (Some(expected), Ok(parsed)) => prop_assert_eq!(outcome(&parsed), expected),
            (expected, result) => {
                return Err(TestCaseError::fail(format!(
                    "oracle {expected:?}, parser {result:?}"
                )));
            }
        },
    }
    Ok(())
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "object", "entry", "id", "time", "messaging", "sender", "recipient", "timestamp",
            "optin", "type", "payload", "one_time_notif_token", "message", "is_echo", "postback", "standby",
            "read", "watermark", "text",
        ])
        .prop_map(String::from),
        1 => "\\PC{0,8}",
    ]
}

fn json_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{0,8}",
        "[0-9]{1,40}",
        ".{0,12}",
        prop::sample::select(vec![
            "page",
            "one_time_notif_req",
            "notification_messages",
            "",
            " ",
            "111",
            "222",
            "u1",
        ])
        .prop_map(String::from),
    ]
}

/// Numbers, huge ones among them.
fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // NaN and the infinities become null.
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            json!(i64::MAX),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(i64::MAX - 1000),
            json!(1e308),
            json!(-1e308),
            json!(-0.0),
            json!(0.5),
            json!(-1),
            json!(0),
            json!(253_402_300_800_000_i64),
        ]),
    ]
}

fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        json_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((json_key(), inner), 0..4)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Usually `good`, sometimes any JSON at all, sometimes absent.
fn field(good: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        6 => good.prop_map(Some),
        1 => any_json().prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

fn object(fields: Vec<(&str, Option<Value>)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_string(), value?)))
            .collect(),
    )
}

/// `len` characters from a pool rich in multi-byte, combining and invisible characters.
fn chars_exactly(len: usize) -> impl Strategy<Value = String> {
    let one = prop_oneof![
        4 => prop::char::range('a', 'z'),
        2 => prop::sample::select(vec![
            'é', 'ß', '€', '中', '🎉', 'ا', '\u{301}', '\u{308}', '\u{200D}', '\u{FE0F}',
            '\u{1F3FD}', '\u{202E}', '\u{FFFD}', '\u{10FFFF}', ' ', '\n', '\t', '\0', '"', '\\',
        ]),
        1 => any::<char>(),
    ];
    prop::collection::vec(one, len).prop_map(|chars| chars.into_iter().collect())
}

/// Strings whose length in characters sits around the limit `max`: none, one, max-1 ..= max+2,
/// or anything up to a little beyond.
fn around(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(max - 1),
        Just(max),
        Just(max + 1),
        Just(max + 2),
        0..=max + 5,
    ]
    .prop_flat_map(chars_exactly)
}

fn page_id_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec!["111", "222"]).prop_map(Value::from),
        1 => Just(json!(111)),
        1 => "[0-9]{1,40}".prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        1 => json_text().prop_map(Value::from),
    ]
}

fn psid_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "u[0-9]{1,2}".prop_map(Value::from),
        1 => Just(json!("111")),
        1 => any::<u64>().prop_map(Value::from),
        1 => ".{0,6}".prop_map(Value::from),
        1 => "[a-z]{125,131}".prop_map(Value::from),
    ]
}

fn time_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (1_400_000_000_000_i64..1_900_000_000_000).prop_map(Value::from),
        1 => (1_400_000_000_i64..1_900_000_000).prop_map(Value::from),
        2 => json_number(),
        1 => "[0-9]{1,15}".prop_map(Value::from),
    ]
}

fn topic_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "\\PC{1,20}".prop_map(Value::from),
        1 => Just(json!("")),
        1 => (995..1005_usize).prop_flat_map(chars_exactly).prop_map(Value::from),
    ]
}

fn token_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "[A-Za-z0-9_-]{1,40}".prop_map(Value::from),
        1 => Just(json!("")),
        1 => ".{1,10}".prop_map(Value::from),
        1 => "[a-z]{2045,2050}".prop_map(Value::from),
    ]
}

fn event_value() -> impl Strategy<Value = Value> {
    let optin = (
        field(
            prop_oneof![
                4 => Just("one_time_notif_req".to_string()),
                1 => Just("notification_messages".to_string()),
                1 => json_text(),
            ]
            .prop_map(Value::from),
        ),
        field(topic_value()),
        field(token_value()),
    )
        .prop_map(|(kind, payload, token)| {
            object(vec![
                ("type", kind),
                ("payload", payload),
                ("one_time_notif_token", token),
            ])
        });
    let message = field(any::<bool>().prop_map(Value::Bool))
        .prop_map(|echo| object(vec![("is_echo", echo), ("text", Some(json!("hi")))]));
    let kind = prop_oneof![
        4 => field(optin).prop_map(|v| ("optin", v)),
        1 => field(message).prop_map(|v| ("message", v)),
        1 => field(Just(json!({"payload": "YES"}))).prop_map(|v| ("postback", v)),
        1 => field(Just(json!({"watermark": 1}))).prop_map(|v| ("read", v)),
        1 => Just(("none", None)),
    ];
    (
        field(field(psid_value()).prop_map(|id| object(vec![("id", id)]))),
        field(Just(json!({"id": "111"}))),
        field(time_value()),
        kind,
    )
        .prop_map(|(sender, recipient, timestamp, (key, value))| {
            object(vec![
                ("sender", sender),
                ("recipient", recipient),
                ("timestamp", timestamp),
                (key, value),
            ])
        })
}

fn envelope_value() -> impl Strategy<Value = Value> {
    let entry = (
        field(page_id_value()),
        field(time_value()),
        field(prop::collection::vec(event_value(), 0..5).prop_map(Value::Array)),
        // Handover: another app holds the thread, the events come under `standby`.
        prop_oneof![
            3 => Just(None),
            1 => field(prop::collection::vec(event_value(), 0..3).prop_map(Value::Array)),
        ],
    )
        .prop_map(|(id, time, messaging, standby)| {
            object(vec![
                ("id", id),
                ("time", time),
                ("messaging", messaging),
                ("standby", standby),
            ])
        });
    (
        field(
            prop_oneof![
                4 => Just("page".to_string()),
                1 => Just("instagram".to_string()),
                1 => json_text(),
            ]
            .prop_map(Value::from),
        ),
        field(prop::collection::vec(entry, 0..4).prop_map(Value::Array)),
    )
        .prop_map(|(kind, entry)| object(vec![("object", kind), ("entry", entry)]))
}

/// Bytes: anything, or a soup of JSON's own characters (which is JSON far more often).
fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        prop::collection::vec(
            prop::sample::select(b"{}[]\":,0123456789.-+eE \\ntrueflsaup".to_vec()),
            0..512
        ),
        envelope_value().prop_flat_map(|envelope| {
            let bytes = envelope.to_string().into_bytes();
            let len = bytes.len();
            (Just(bytes), 0..=len).prop_map(|(bytes, cut)| bytes[..cut].to_vec())
        }),
    ]
}

/// Number literals JSON allows, and some serde_json cannot hold.
fn number_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "1e400",
            "-1e400",
            "1e-400",
            "123456789012345678901234567890",
            "-0",
            "0.0000001",
            "1E+2",
            "18446744073709551616",
            "18446744073709551615",
            "9223372036854775808",
            "9223372036854775807",
            "-9223372036854775808",
            "-9223372036854775809",
            "1.0",
            "-1",
            "0",
            "253402300800000",
            "\"111\"",
            "\"u1\"",
            "111",
        ])
        .prop_map(String::from),
        "-?[0-9]{1,400}(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?",
    ]
}

/// Nesting `depth` deep, of arrays or of objects.
fn nested(depth: usize, arrays: bool) -> String {
    if arrays {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    } else {
        format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
    }
}

proptest! {
    #![proptest_config(config(PARSE_BYTES_CASES))]

    #[test]
    fn parse_any_bytes_never_panics_and_agrees_with_the_oracle(
        body in body_bytes(),
        now_ms in any::<i64>(),
    ) {
        check_parse(&body, now_ms)?;
    }
}

proptest! {
    #![proptest_config(config(PARSE_ENVELOPE_CASES))]

    #[test]
    fn parse_envelopes_with_wrong_and_missing_fields_agree_with_the_oracle(
        envelope in envelope_value(),
        now_ms in any::<i64>(),
    ) {
        check_parse(envelope.to_string().as_bytes(), now_ms)?;
    }
}

proptest! {
    #![proptest_config(config(PARSE_NUMBER_CASES))]

    #[test]
    fn parse_huge_and_odd_numbers_never_panic(
        id in number_literal(),
        time in number_literal(),
        sender in number_literal(),
        timestamp in number_literal(),
    ) {
        let body = format!(
            r#"{{"object":"page","entry":[{{"id":{id},"time":{time},"messaging":[
                {{"sender":{{"id":{sender}}},"recipient":{{"id":{id}}},"timestamp":{timestamp},
                  "optin":{{"type":"one_time_notif_req","payload":"t","one_time_notif_token":"k"}}}},
                {{"sender":{{"id":"u1"}},"timestamp":{timestamp},"message":{{"text":"hi"}}}}]}}]}}"#
        );
        check_parse(body.as_bytes(), 1_700_000_000_000)?;
    }
}

proptest! {
    #![proptest_config(config(PARSE_NESTING_CASES))]

    #[test]
    fn parse_deep_nesting_is_refused_without_overflowing_the_stack(
        depth in prop_oneof![1..200_usize, 200..20_000_usize],
        arrays in any::<bool>(),
        place in 0..5_usize,
    ) {
        let deep = nested(depth, arrays);
        let body = match place {
            0 => deep,
            1 => format!(r#"{{"object":"page","entry":[{{"id":"111","messaging":{deep}}}]}}"#),
            2 => format!(r#"{{"object":"page","entry":[{{"id":"111","messaging":[{{"sender":{{"id":{deep}}}}}]}}]}}"#),
            3 => format!(r#"{{"object":"page","entry":[{{"id":"111","messaging":[{{"sender":{{"id":"u1"}},"optin":{{"type":"one_time_notif_req","payload":{deep},"one_time_notif_token":"k"}}}}]}}]}}"#),
            _ => format!(r#"{{"object":{deep},"entry":[]}}"#),
        };
        if depth >= 130 {
            prop_assert!(matches!(parse(body.as_bytes(), 0), Err(ParseError::NotJson(_))));
        }
        check_parse(body.as_bytes(), 0)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Story content.

const URLS: &[(&str, bool)] = &[
    ("https://example.com", true),
    ("http://example.com/path?q=1#frag", true),
    ("https://例え.jp/パス", true),
    ("https://xn--r8jz45g.jp", true),
    ("http://127.0.0.1:8080/x", true),
    ("https://[::1]/", true),
    ("https://user:pw@example.com/", true),
    ("HTTPS://EXAMPLE.COM/UPPER", true),
    ("https://example.com/é🎉?q=✓", true),
    ("", false),
    ("example.com", false),
    ("ftp://example.com", false),
    ("javascript:alert(1)", false),
    ("mailto:a@example.com", false),
    ("tel:+15105551234", false),
    ("data:text/plain,hi", false),
    ("file:///etc/passwd", false),
    ("https://", false),
    ("//example.com", false),
    ("/relative/path", false),
    ("not a url", false),
    ("https://exa mple.com", false),
];

fn labelled_url() -> impl Strategy<Value = (String, bool)> {
    prop_oneof![
        prop::sample::select(URLS).prop_map(|(url, ok)| (url.to_string(), ok)),
        // Long, still valid.
        (1..3000_usize).prop_map(|n| (format!("https://example.com/{}", "a".repeat(n)), true)),
    ]
}

/// A phone number as the documented rule reads: `+` then 7 to 15 ASCII digits.
fn is_phone(value: &str) -> bool {
    match value.as_bytes() {
        [b'+', digits @ ..] => {
            (7..=15).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit)
        }
        _ => false,
    }
}

fn phone_payload() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "\\+[0-9]{7,15}",
        2 => "\\+[0-9]{0,20}",
        1 => "[0-9]{7,15}",
        1 => "\\+[0-9０-９ a-z+\\-]{5,16}",
        1 => around(20),
    ]
}

/// A button as a client might send it; the url's validity is known by construction.
#[derive(Clone, Debug)]
struct GenButton {
    kind: Option<ButtonKind>,
    title: String,
    url: String,
    url_ok: bool,
    payload: String,
}

fn gen_button() -> impl Strategy<Value = GenButton> {
    let kind = prop_oneof![
        3 => Just(Some(ButtonKind::WebUrl)),
        3 => Just(Some(ButtonKind::Postback)),
        3 => Just(Some(ButtonKind::PhoneNumber)),
        1 => Just(None),
    ];
    let none = || Just((String::new(), false));
    (kind, around(20))
        .prop_flat_map(move |(kind, title)| {
            let (url, payload) = match kind {
                Some(ButtonKind::WebUrl) => (
                    prop_oneof![4 => labelled_url(), 1 => none()].boxed(),
                    prop_oneof![4 => Just(String::new()), 1 => around(5)].boxed(),
                ),
                Some(ButtonKind::Postback) => (
                    prop_oneof![4 => none(), 1 => labelled_url()].boxed(),
                    around(1000).boxed(),
                ),
                Some(ButtonKind::PhoneNumber) | None => (
                    prop_oneof![4 => none(), 1 => labelled_url()].boxed(),
                    phone_payload().boxed(),
                ),
            };
            (Just(kind), Just(title), url, payload)
        })
        .prop_map(|(kind, title, (url, url_ok), payload)| GenButton {
            kind,
            title,
            url,
            url_ok,
            payload,
        })
}

#[derive(Clone, Debug)]
enum GenContent {
    Missing,
    Text(String),
    Template {
        text: String,
        buttons: Vec<GenButton>,
    },
}

fn gen_content() -> impl Strategy<Value = GenContent> {
    prop_oneof![
        1 => Just(GenContent::Missing),
        4 => around(2000).prop_map(GenContent::Text),
        8 => (around(640), prop::collection::vec(gen_button(), 0..=5))
            .prop_map(|(text, buttons)| GenContent::Template { text, buttons }),
    ]
}

impl GenContent {
    fn input(&self) -> ContentInput {
        match self {
            GenContent::Missing => ContentInput::Missing,
            GenContent::Text(text) => ContentInput::Text(text.clone()),
            GenContent::Template { text, buttons } => ContentInput::ButtonTemplate {
                text: text.clone(),
                buttons: buttons
                    .iter()
                    .map(|b| ButtonInput {
                        kind: b.kind,
                        title: b.title.clone(),
                        url: b.url.clone(),
                        payload: b.payload.clone(),
                    })
                    .collect(),
            },
        }
    }

    /// The documented rules, written again: every field path that breaks one, sorted.
    fn broken_fields(&self) -> Vec<String> {
        let within = |s: &str, max: usize| (1..=max).contains(&scalars(s));
        let mut broken = Vec::new();
        match self {
            GenContent::Missing => broken.push("content".to_string()),
            GenContent::Text(text) => {
                if !within(text, 2000) {
                    broken.push("content.text".into());
                }
            }
            GenContent::Template { text, buttons } => {
                let base = "content.button_template";
                if !within(text, 640) {
                    broken.push(format!("{base}.text"));
                }
                if !(1..=3).contains(&buttons.len()) {
                    broken.push(format!("{base}.buttons"));
                }
                for (i, b) in buttons.iter().enumerate() {
                    let path = format!("{base}.buttons[{i}]");
                    if !within(&b.title, 20) {
                        broken.push(format!("{path}.title"));
                    }
                    let (url_ok, payload_ok) = match b.kind {
                        None => {
                            broken.push(format!("{path}.type"));
                            (true, true)
                        }
                        Some(ButtonKind::WebUrl) => (b.url_ok, b.payload.is_empty()),
                        Some(ButtonKind::Postback) => (b.url.is_empty(), within(&b.payload, 1000)),
                        Some(ButtonKind::PhoneNumber) => (b.url.is_empty(), is_phone(&b.payload)),
                    };
                    if !url_ok {
                        broken.push(format!("{path}.url"));
                    }
                    if !payload_ok {
                        broken.push(format!("{path}.payload"));
                    }
                }
            }
        }
        broken.sort();
        broken
    }
}

/// What valid content must be: the input, unchanged.
fn same_content(parsed: &StoryContent, generated: &GenContent) -> bool {
    match (parsed, generated) {
        (StoryContent::Text(a), GenContent::Text(b)) => a == b,
        (
            StoryContent::ButtonTemplate { text, buttons },
            GenContent::Template {
                text: gen_text,
                buttons: gen_buttons,
            },
        ) => {
            text == gen_text
                && buttons.len() == gen_buttons.len()
                && buttons.iter().zip(gen_buttons).all(|(b, g)| match b {
                    Button::WebUrl { title, url } => {
                        g.kind == Some(ButtonKind::WebUrl) && *title == g.title && *url == g.url
                    }
                    Button::Postback { title, payload } => {
                        g.kind == Some(ButtonKind::Postback)
                            && *title == g.title
                            && *payload == g.payload
                    }
                    Button::PhoneNumber { title, number } => {
                        g.kind == Some(ButtonKind::PhoneNumber)
                            && *title == g.title
                            && *number == g.payload
                    }
                })
        }
        _ => false,
    }
}

proptest! {
    #![proptest_config(config(STORY_CASES))]

    #[test]
    fn story_content_is_valid_exactly_when_the_documented_rules_hold(content in gen_content()) {
        let expected = content.broken_fields();
        match StoryContent::parse("content", content.input()) {
            Ok(parsed) => {
                prop_assert!(expected.is_empty(), "accepted, yet the rules break {expected:?}");
                prop_assert!(same_content(&parsed, &content), "{parsed:?} is not the input");
                let message = parsed.to_graph_message();
                prop_assert_eq!(StoryContent::from_graph_message(&message), Some(parsed));
            }
            Err(violations) => {
                for v in &violations.0 {
                    prop_assert!(!v.field.is_empty() && !v.description.is_empty(), "{v:?}");
                }
                let mut fields: Vec<String> = violations.0.into_iter().map(|v| v.field).collect();
                fields.sort();
                prop_assert_eq!(fields, expected);
            }
        }
    }
}

fn wild_button() -> impl Strategy<Value = ButtonInput> {
    (
        prop_oneof![
            Just(None),
            Just(Some(ButtonKind::WebUrl)),
            Just(Some(ButtonKind::Postback)),
            Just(Some(ButtonKind::PhoneNumber)),
        ],
        ".{0,30}",
        prop_oneof![".{0,60}", "https?://\\PC{0,30}", "[a-z]{1,8}:\\PC{0,30}"],
        ".{0,40}",
    )
        .prop_map(|(kind, title, url, payload)| ButtonInput {
            kind,
            title,
            url,
            payload,
        })
}

proptest! {
    #![proptest_config(config(STORY_WILD_CASES))]

    /// Any strings at all (URLs included): never a panic, and every rejection names a field of
    /// the content.
    #[test]
    fn story_content_with_any_strings_names_every_broken_field(
        text in ".{0,700}",
        buttons in prop::collection::vec(wild_button(), 0..8),
    ) {
        let count = buttons.len();
        match StoryContent::parse("content", ContentInput::ButtonTemplate { text, buttons }) {
            Ok(parsed) => {
                let message = parsed.to_graph_message();
                prop_assert_eq!(StoryContent::from_graph_message(&message), Some(parsed));
            }
            Err(violations) => {
                prop_assert!(!violations.0.is_empty());
                for v in &violations.0 {
                    let known = v.field == "content.button_template.text"
                        || v.field == "content.button_template.buttons"
                        || (0..count).any(|i| {
                            ["title", "type", "url", "payload"].iter().any(|f| {
                                v.field == format!("content.button_template.buttons[{i}].{f}")
                            })
                        });
                    prop_assert!(known && !v.description.is_empty(), "{v:?}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The webhook endpoint, running.

/// Pages of the webhook run: forged POSTs aim at the first; the second gets genuine ones; the
/// third genuine ones mutated then signed; the fourth signs bodies that also name the first.
const FORGED: &str = "901";
const GENUINE: &str = "902";
const MUTATED: &str = "903";
const OTHER_TENANT: &str = "904";
const WEBHOOK_PAGES: [&str; 4] = [FORGED, GENUINE, MUTATED, OTHER_TENANT];

fn sign(secret: &str, body: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
    .into_bytes()
}

#[derive(Clone, Debug)]
struct GenOptIn {
    psid: String,
    topic: String,
    token: String,
    age_ms: i64,
}

fn gen_optin() -> impl Strategy<Value = GenOptIn> {
    let topic = prop_oneof![
        6 => "\\PC{1,40}",
        2 => "[ -~]{1,40}",
        // A NUL is a character like any other in a payload.
        1 => ("[a-z]{1,5}", "[a-z]{1,5}").prop_map(|(a, b)| format!("{a}\u{0}{b}")),
    ];
    (
        "fan-[0-9]{1,3}",
        topic,
        "[A-Za-z0-9_-]{12,40}",
        0..300 * 24 * 3600 * 1000_i64,
    )
        .prop_map(|(psid, topic, token, age_ms)| GenOptIn {
            psid,
            topic,
            token,
            age_ms,
        })
}

/// 1 to 5 opt-ins for `page`, with a message and a read beside them, as Facebook posts them.
fn entry_for(page: &str, optins: &[GenOptIn], now: i64) -> Value {
    let mut messaging: Vec<Value> = optins
        .iter()
        .map(|o| {
            json!({"sender": {"id": o.psid}, "recipient": {"id": page}, "timestamp": now - o.age_ms,
                   "optin": {"type": "one_time_notif_req", "payload": o.topic,
                             "one_time_notif_token": o.token}})
        })
        .collect();
    messaging.push(
        json!({"sender": {"id": optins[0].psid}, "recipient": {"id": page},
        "timestamp": now, "message": {"mid": "m", "text": "hi"}}),
    );
    messaging.push(
        json!({"sender": {"id": optins[0].psid}, "recipient": {"id": page},
        "timestamp": now, "read": {"watermark": now}}),
    );
    json!({"id": page, "time": now, "messaging": messaging})
}

fn envelope_for(page: &'static str, now: i64) -> impl Strategy<Value = Value> {
    prop::collection::vec(gen_optin(), 1..=5)
        .prop_map(move |optins| json!({"object": "page", "entry": [entry_for(page, &optins, now)]}))
}

/// Pre-order count of a JSON tree's nodes.
fn nodes(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(nodes).sum(),
        Value::Object(fields) => fields.values().map(nodes).sum(),
        _ => 0,
    }
}

/// Replaces the `n`th node (pre-order); returns how many nodes were passed.
fn replace_node(value: &mut Value, n: usize, with: &Value) -> usize {
    if n == 0 {
        *value = with.clone();
        return 1;
    }
    let mut seen = 1;
    let children: Vec<&mut Value> = match value {
        Value::Array(items) => items.iter_mut().collect(),
        Value::Object(fields) => fields.values_mut().collect(),
        _ => Vec::new(),
    };
    for child in children {
        if seen > n {
            break;
        }
        seen += replace_node(child, n - seen, with);
    }
    seen
}

/// Sets every `time` and `timestamp` in the tree.
fn set_times(value: &mut Value, to: &Value) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(|v| set_times(v, to)),
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                if key == "time" || key == "timestamp" {
                    *field = to.clone();
                } else {
                    set_times(field, to);
                }
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum JsonMutation {
    None,
    Replace(prop::sample::Index, Value),
    Times(Value),
    Nest(prop::sample::Index, usize),
}

#[derive(Clone, Debug)]
enum ByteMutation {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index, usize),
    Duplicate(prop::sample::Index, usize),
}

fn json_mutation() -> impl Strategy<Value = JsonMutation> {
    prop_oneof![
        2 => Just(JsonMutation::None),
        3 => (any::<prop::sample::Index>(), any_json())
            .prop_map(|(at, with)| JsonMutation::Replace(at, with)),
        2 => prop_oneof![
            3 => prop::sample::select(vec![
                json!(i64::MAX),
                json!(i64::MIN),
                json!(i64::MAX - 1000),
                json!(i64::MIN + 1000),
                json!(u64::MAX),
                json!(253_402_300_800_000_i64),
                json!(-62_135_596_800_001_i64),
                json!(-1),
            ]),
            1 => json_number(),
        ]
        .prop_map(JsonMutation::Times),
        1 => (any::<prop::sample::Index>(), 1..400_usize)
            .prop_map(|(at, depth)| JsonMutation::Nest(at, depth)),
    ]
}

/// Often none, so that the JSON mutation reaches the service intact.
fn byte_mutations() -> impl Strategy<Value = Vec<ByteMutation>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => prop::collection::vec(byte_mutation(), 1..3),
    ]
}

fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    let at = any::<prop::sample::Index>;
    prop_oneof![
        (at(), 0..8_u8).prop_map(|(at, bit)| ByteMutation::Flip(at, bit)),
        at().prop_map(ByteMutation::Truncate),
        (at(), any::<u8>()).prop_map(|(at, byte)| ByteMutation::Insert(at, byte)),
        (at(), 1..16_usize).prop_map(|(at, len)| ByteMutation::Delete(at, len)),
        (at(), 1..64_usize).prop_map(|(at, len)| ByteMutation::Duplicate(at, len)),
    ]
}

fn mutate(
    mut value: Value,
    json_mutation: &JsonMutation,
    byte_mutations: &[ByteMutation],
) -> Vec<u8> {
    match json_mutation {
        JsonMutation::None => {}
        JsonMutation::Replace(at, with) => {
            let n = at.index(nodes(&value));
            replace_node(&mut value, n, with);
        }
        JsonMutation::Times(to) => set_times(&mut value, to),
        JsonMutation::Nest(at, depth) => {
            let n = at.index(nodes(&value));
            let deep: Value = (0..*depth).fold(json!(1), |inner, _| json!([inner]));
            replace_node(&mut value, n, &deep);
        }
    }
    let mut bytes = serde_json::to_vec(&value).expect("a JSON value serialises");
    for mutation in byte_mutations {
        let len = bytes.len().max(1);
        match mutation {
            ByteMutation::Flip(at, bit) => {
                if !bytes.is_empty() {
                    let i = at.index(len);
                    bytes[i] ^= 1 << bit;
                }
            }
            ByteMutation::Truncate(at) => bytes.truncate(at.index(len)),
            ByteMutation::Insert(at, byte) => {
                bytes.insert(at.index(len + 1).min(bytes.len()), *byte)
            }
            ByteMutation::Delete(at, n) => {
                let start = at.index(len).min(bytes.len());
                let end = (start + n).min(bytes.len());
                bytes.drain(start..end);
            }
            ByteMutation::Duplicate(at, n) => {
                let start = at.index(len).min(bytes.len());
                let end = (start + n).min(bytes.len());
                let copy = bytes[start..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
    }
    bytes
}

/// A signature header that is not the right one for the body it goes with.
#[derive(Clone, Debug)]
enum BadHeader {
    Missing,
    RandomHex(String),
    WrongSecret(String),
    /// Signed with the page's secret, over the body as it was before it was altered.
    OverTheOriginal,
    /// Signed with another registered page's secret (a tenant forging for its neighbour).
    OtherTenant,
    Text(String),
    Malformed(prop::sample::Index, u8),
}

fn bad_header() -> impl Strategy<Value = BadHeader> {
    prop_oneof![
        Just(BadHeader::Missing),
        "[0-9a-f]{64}".prop_map(BadHeader::RandomHex),
        "[!-~]{1,40}".prop_map(BadHeader::WrongSecret),
        Just(BadHeader::OverTheOriginal),
        Just(BadHeader::OtherTenant),
        "[ -~]{0,80}".prop_map(BadHeader::Text),
        (any::<prop::sample::Index>(), 0..4_u8).prop_map(|(at, how)| BadHeader::Malformed(at, how)),
    ]
}

#[derive(Clone)]
struct Post {
    class: &'static str,
    body: Vec<u8>,
    header: Option<Vec<u8>>,
}

impl std::fmt::Debug for Post {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Post")
            .field("class", &self.class)
            .field("body", &String::from_utf8_lossy(&self.body))
            .field(
                "header",
                &self.header.as_deref().map(String::from_utf8_lossy),
            )
            .finish()
    }
}

fn forged_post(now: i64) -> impl Strategy<Value = Post> {
    let body = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..2048).prop_map(|b| (b.clone(), b)),
        3 => (
            envelope_for(FORGED, now),
            json_mutation(),
            byte_mutations(),
        )
            .prop_map(|(envelope, json_mutation, byte_mutations)| {
                let original = envelope.to_string().into_bytes();
                (original, mutate(envelope, &json_mutation, &byte_mutations))
            }),
    ];
    (body, bad_header()).prop_map(|((original, body), header)| {
        let right = sign(&page_app_secret(FORGED), &body);
        let header = match header {
            BadHeader::Missing => None,
            BadHeader::RandomHex(hex) => Some(format!("sha256={hex}").into_bytes()),
            BadHeader::WrongSecret(secret) => Some(sign(&secret, &body)),
            BadHeader::OverTheOriginal => Some(sign(&page_app_secret(FORGED), &original)),
            BadHeader::OtherTenant => Some(sign(&page_app_secret(OTHER_TENANT), &body)),
            BadHeader::Text(text) => Some(text.into_bytes()),
            BadHeader::Malformed(at, how) => {
                let hex = &right[7..];
                Some(match how {
                    0 => hex.to_vec(),
                    1 => right[..7 + at.index(hex.len())].to_vec(),
                    2 => [right.as_slice(), b"0"].concat(),
                    _ => [b"sha1=".as_slice(), hex].concat(),
                })
            }
        };
        // A mutation that changed nothing leaves the original signature right: not a forgery.
        let header = header.map(|h| {
            if h == right {
                sign("not-the-secret", &body)
            } else {
                h
            }
        });
        Post {
            class: "forged",
            body,
            header,
        }
    })
}

fn genuine_post(now: i64) -> impl Strategy<Value = Post> {
    envelope_for(GENUINE, now).prop_map(|envelope| {
        let body = envelope.to_string().into_bytes();
        Post {
            class: "genuine",
            header: Some(sign(&page_app_secret(GENUINE), &body)),
            body,
        }
    })
}

fn mutated_post(now: i64) -> impl Strategy<Value = Post> {
    (
        envelope_for(MUTATED, now),
        json_mutation(),
        byte_mutations(),
    )
        .prop_map(|(envelope, json_mutation, byte_mutations)| {
            let body = mutate(envelope, &json_mutation, &byte_mutations);
            Post {
                class: "mutated-signed",
                header: Some(sign(&page_app_secret(MUTATED), &body)),
                body,
            }
        })
}

/// A body naming the forged page and the other tenant, signed by the other tenant.
fn cross_tenant_post(now: i64) -> impl Strategy<Value = Post> {
    (
        prop::collection::vec(gen_optin(), 1..=3),
        prop::collection::vec(gen_optin(), 1..=3),
    )
        .prop_map(move |(victim, own)| {
            let body = json!({"object": "page", "entry": [
                entry_for(FORGED, &victim, now), entry_for(OTHER_TENANT, &own, now)]})
            .to_string()
            .into_bytes();
            Post {
                class: "cross-tenant",
                header: Some(sign(&page_app_secret(OTHER_TENANT), &body)),
                body,
            }
        })
}

fn webhook_post(now: i64) -> impl Strategy<Value = Post> {
    prop_oneof![
        5 => forged_post(now),
        2 => genuine_post(now),
        3 => mutated_post(now),
        1 => cross_tenant_post(now),
    ]
}

/// Every stored opt-in of `page`: token fingerprint -> (psid, topic).
async fn stored_opt_ins(app: &mut TestApp, page: &str) -> BTreeMap<String, (String, String)> {
    let mut stored = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let response = app
            .optins
            .list_opt_ins(ListOptInsRequest {
                page_id: page.into(),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("ListOptIns")
            .into_inner();
        for o in response.opt_ins {
            stored.insert(o.token_fingerprint, (o.psid, o.topic));
        }
        if response.next_page_token.is_empty() {
            return stored;
        }
        page_token = response.next_page_token;
    }
}

backend_tests! {
    async fn webhook_posts_never_fail_and_store_only_what_a_page_signed(db) {
        let mut app = spawn_app(&db).await;
        for page in WEBHOOK_PAGES {
            app.register_page(page).await;
        }
        let now = chrono::Utc::now().timestamp_millis();
        let mut runner = TestRunner::new(Config { failure_persistence: None, ..Config::default() });
        let strategy = webhook_post(now);
        let posts: Vec<Post> = (0..WEBHOOK_POSTS)
            .map(|_| strategy.new_tree(&mut runner).expect("a case").current())
            .collect();

        let client = otnd::graph::http_client_builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let secrets: Vec<(&str, String)> =
            WEBHOOK_PAGES.iter().map(|p| (*p, page_app_secret(p))).collect();
        // Per page, token -> (psid, topic) of the opt-ins its own signed bodies carried.
        let mut expected: BTreeMap<&str, BTreeMap<String, (String, String)>> = BTreeMap::new();
        let mut tally: BTreeMap<(&str, u16), usize> = BTreeMap::new();
        let mut psids_named_for_forged = BTreeSet::new();
        let mut failures = Vec::new();
        for post in &posts {
            let signer = secrets
                .iter()
                .find(|(_, secret)| post.header.as_deref() == Some(sign(secret, &post.body).as_slice()))
                .map(|(page, _)| *page);
            if let Ok(parsed) = parse(&post.body, now) {
                for (page, events) in &parsed.pages {
                    if page.as_str() == FORGED {
                        psids_named_for_forged.extend(events.iter().map(|e| e.psid.as_str().to_string()));
                    }
                }
            }
            let mut request = client
                .post(app.http_url("/webhook"))
                .header("Content-Type", "application/json")
                .body(post.body.clone());
            if let Some(header) = &post.header {
                match reqwest::header::HeaderValue::from_bytes(header) {
                    Ok(value) => request = request.header("X-Hub-Signature-256", value),
                    Err(_) => continue,
                }
            }
            let (status, text) = match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    (status, response.text().await.unwrap_or_default())
                }
                Err(err) => {
                    failures.push(format!("no answer ({err}) to {post:?}"));
                    continue;
                }
            };
            *tally.entry((post.class, status)).or_default() += 1;
            let ok = match (signer, status) {
                (_, 500..) => false,
                (_, 400..=499) => !matches!(post.class, "genuine" | "cross-tenant"),
                (None, 200) => text == "ignored",
                (Some(_), 200) => text == "EVENT_RECEIVED" || text == "ignored",
                _ => false,
            };
            if !ok {
                failures.push(format!("{status} {text:?} (signed by {signer:?}) for {post:?}"));
            }
            if let (Some(page), 200, "EVENT_RECEIVED") = (signer, status, text.as_str()) {
                let parsed = parse(&post.body, now).expect("a body the webhook took parses");
                let mine = expected.entry(page).or_default();
                for event in parsed.pages.iter().filter(|(p, _)| p.as_str() == page).flat_map(|(_, e)| e) {
                    if let EventKind::OptIn { topic, token } = &event.kind {
                        mine.entry(token.as_str().to_string()).or_insert_with(|| {
                            (event.psid.as_str().to_string(), topic.as_str().to_string())
                        });
                    }
                }
            }
        }
        println!("webhook fuzz: {} POSTs; (class, status) -> count: {tally:?}", posts.len());
        assert!(failures.is_empty(), "{} bad answers:\n{}", failures.len(), failures.join("\n"));

        assert!(!expected.contains_key(FORGED), "the forged page's secret signed nothing");
        for page in WEBHOOK_PAGES {
            let stored = stored_opt_ins(&mut app, page).await;
            let want: BTreeMap<String, (String, String)> = expected
                .get(page)
                .map(|m| m.iter().map(|(token, v)| (fingerprint(token), v.clone())).collect())
                .unwrap_or_default();
            println!("webhook fuzz: page {page}: {} opt-ins stored, {} expected", stored.len(), want.len());
            assert_eq!(stored, want, "page {page}: the opt-ins stored are those of its signed bodies");
        }
        assert!(
            expected.get(GENUINE).is_some_and(|m| !m.is_empty()),
            "genuine opt-ins were generated and stored"
        );
        for psid in psids_named_for_forged.iter().take(200) {
            let answer = app.audience.get_subscriber(GetSubscriberRequest {
                page_id: FORGED.into(), psid: psid.clone() }).await;
            assert_eq!(answer.map(|_| ()).unwrap_err().code(), tonic::Code::NotFound,
                "a forged POST made {psid} a subscriber of {FORGED}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The gRPC sweep.

mod raw {
    //! A codec that sends bytes as they are and hands back the bytes of the answer.

    use bytes::{Buf, BufMut};
    use tonic::{
        Status,
        codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    };

    #[derive(Clone, Copy, Default)]
    pub struct RawCodec;
    pub struct RawEncoder;
    pub struct RawDecoder;

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDecoder {
        type Item = Vec<u8>;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let len = src.remaining();
            Ok(Some(src.copy_to_bytes(len).to_vec()))
        }
    }

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;

        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }

        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }
}

mod wire {
    //! Requests built from the descriptors the server itself serves, so that every RPC of every
    //! service is swept, including those added later.

    use std::collections::HashMap;

    use prost::{
        Message as _,
        encoding::{WireType, encode_key, encode_varint},
    };
    use prost_types::{
        DescriptorProto, FileDescriptorSet,
        field_descriptor_proto::{Label, Type},
    };

    pub struct Rpc {
        pub path: String,
        pub input: String,
        pub server_streaming: bool,
    }

    pub struct Schema {
        messages: HashMap<String, DescriptorProto>,
        pub rpcs: Vec<Rpc>,
    }

    fn register(messages: &mut HashMap<String, DescriptorProto>, scope: &str, m: &DescriptorProto) {
        let name = format!("{scope}.{}", m.name());
        for nested in &m.nested_type {
            register(messages, &name, nested);
        }
        messages.insert(name, m.clone());
    }

    pub fn schema() -> Schema {
        let set = FileDescriptorSet::decode(otnd::pb::FILE_DESCRIPTOR_SET)
            .expect("the served descriptor set decodes");
        let mut messages = HashMap::new();
        let mut rpcs = Vec::new();
        for file in &set.file {
            let package = file.package();
            for m in &file.message_type {
                register(&mut messages, &format!(".{package}"), m);
            }
            if !package.starts_with("otn.") {
                continue;
            }
            for service in &file.service {
                for method in &service.method {
                    rpcs.push(Rpc {
                        path: format!("/{package}.{}/{}", service.name(), method.name()),
                        input: method.input_type().to_string(),
                        server_streaming: method.server_streaming(),
                    });
                }
            }
        }
        Schema { messages, rpcs }
    }

    /// The ids of real rows, for requests that should get past "not found".
    pub struct Ids {
        pub page_id: String,
        pub story_id: String,
        pub send_id: String,
        pub segment_id: String,
        pub psid: String,
    }

    #[derive(Clone, Copy)]
    pub enum Fill<'a> {
        /// About `budget` bytes of strings and repeated entries, integers at their extreme
        /// (`high`: maxima, unknown enum values; else minima, negative enums); with `ids`, the
        /// id fields name real rows.
        Extreme {
            budget: usize,
            high: bool,
            ids: Option<&'a Ids>,
        },
        /// Real ids, small but odd strings (a NUL, combining and multi-byte characters), small
        /// valid numbers: requests that reach the store. With `nul`, every string ends in a NUL,
        /// the ids too.
        Probe {
            ids: &'a Ids,
            unique: u64,
            nul: bool,
        },
    }

    pub const ODD: &str = "a\u{0}b é 🎉e\u{301} \u{202E}";

    fn id_for<'a>(ids: &'a Ids, field: &str) -> Option<&'a str> {
        Some(match field {
            "page_id" => &ids.page_id,
            "story_id" => &ids.story_id,
            "send_id" => &ids.send_id,
            "segment_id" => &ids.segment_id,
            "psid" | "reviewer_psid" | "psids" => &ids.psid,
            _ => return None,
        })
    }

    fn filler(len: usize) -> Vec<u8> {
        "é".repeat(len / 2 + 1).into_bytes()
    }

    fn put_len_delimited(number: u32, bytes: &[u8], buf: &mut Vec<u8>) {
        encode_key(number, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.extend_from_slice(bytes);
    }

    fn put_varint(number: u32, value: u64, buf: &mut Vec<u8>) {
        encode_key(number, WireType::Varint, buf);
        encode_varint(value, buf);
    }

    impl Schema {
        pub fn encode(&self, type_name: &str, fill: Fill<'_>) -> Vec<u8> {
            self.encode_at(type_name, fill, 0)
        }

        fn encode_at(&self, type_name: &str, fill: Fill<'_>, depth: usize) -> Vec<u8> {
            let mut buf = Vec::new();
            if type_name == ".google.protobuf.Timestamp" {
                let (seconds, nanos) = match fill {
                    Fill::Extreme { high: true, .. } => (i64::MAX, i64::from(i32::MAX)),
                    Fill::Extreme { high: false, .. } => (i64::MIN, i64::from(i32::MIN)),
                    Fill::Probe { .. } => (chrono::Utc::now().timestamp(), 0),
                };
                put_varint(1, seconds as u64, &mut buf);
                put_varint(2, nanos as u64, &mut buf);
                return buf;
            }
            let Some(message) = self.messages.get(type_name) else {
                return buf;
            };
            if depth > 4 {
                return buf;
            }
            let share = match fill {
                Fill::Extreme { budget, .. } => budget / message.field.len().max(1),
                Fill::Probe { .. } => 0,
            };
            for field in &message.field {
                let number = field.number() as u32;
                let repeated = field.label() == Label::Repeated;
                match field.r#type() {
                    Type::String | Type::Bytes => {
                        let (value, count) = match fill {
                            Fill::Extreme { ids: Some(ids), .. }
                                if id_for(ids, field.name()).is_some() =>
                            {
                                (id_for(ids, field.name()).unwrap().as_bytes().to_vec(), 1)
                            }
                            Fill::Extreme { .. } if repeated => {
                                (b"tag-\xc3\xa9".to_vec(), (share / 8).clamp(1, 100_000))
                            }
                            Fill::Extreme { .. } => (filler(share), 1),
                            Fill::Probe { ids, unique, nul } => {
                                let mut value = match (id_for(ids, field.name()), field.name()) {
                                    (Some(id), _) => id.to_string(),
                                    (None, "request_id" | "token") => format!("probe-{unique}"),
                                    (None, _) => ODD.to_string(),
                                };
                                if nul {
                                    value.push('\0');
                                }
                                (value.into_bytes(), if repeated { 3 } else { 1 })
                            }
                        };
                        for _ in 0..count {
                            put_len_delimited(number, &value, &mut buf);
                        }
                    }
                    Type::Message => {
                        let (sub_fill, count) = match fill {
                            Fill::Extreme { high, ids, .. } if repeated => {
                                let unit = Fill::Extreme {
                                    budget: 16,
                                    high,
                                    ids,
                                };
                                let len = self.encode_at(field.type_name(), unit, depth + 1).len();
                                (unit, (share / (len + 4)).clamp(1, 100_000))
                            }
                            Fill::Extreme { high, ids, .. } => (
                                Fill::Extreme {
                                    budget: share,
                                    high,
                                    ids,
                                },
                                1,
                            ),
                            Fill::Probe { .. } => (fill, if repeated { 3 } else { 1 }),
                        };
                        let sub = self.encode_at(field.type_name(), sub_fill, depth + 1);
                        for _ in 0..count {
                            put_len_delimited(number, &sub, &mut buf);
                        }
                    }
                    Type::Double => {
                        encode_key(number, WireType::SixtyFourBit, &mut buf);
                        buf.extend_from_slice(&f64::MAX.to_le_bytes());
                    }
                    Type::Float => {
                        encode_key(number, WireType::ThirtyTwoBit, &mut buf);
                        buf.extend_from_slice(&f32::MAX.to_le_bytes());
                    }
                    Type::Fixed64 | Type::Sfixed64 => {
                        encode_key(number, WireType::SixtyFourBit, &mut buf);
                        buf.extend_from_slice(&u64::MAX.to_le_bytes());
                    }
                    Type::Fixed32 | Type::Sfixed32 => {
                        encode_key(number, WireType::ThirtyTwoBit, &mut buf);
                        buf.extend_from_slice(&u32::MAX.to_le_bytes());
                    }
                    other => {
                        let value: u64 = match (fill, other) {
                            (Fill::Probe { .. }, _) => 1,
                            (_, Type::Bool) => 1,
                            (Fill::Extreme { high: true, .. }, Type::Int32 | Type::Enum) => {
                                i32::MAX as u64
                            }
                            (Fill::Extreme { high: true, .. }, Type::Uint32) => u64::from(u32::MAX),
                            (Fill::Extreme { high: true, .. }, Type::Int64) => i64::MAX as u64,
                            (Fill::Extreme { high: false, .. }, Type::Int32 | Type::Int64) => {
                                i64::from(i32::MIN) as u64
                            }
                            (Fill::Extreme { high: false, .. }, Type::Enum) => -1_i64 as u64,
                            _ => u64::MAX,
                        };
                        let count = if repeated { 3 } else { 1 };
                        for _ in 0..count {
                            put_varint(number, value, &mut buf);
                        }
                    }
                }
            }
            buf
        }
    }
}

/// Bytes that are not protobuf, or not this protobuf.
const MALFORMED: &[(&str, &[u8])] = &[
    ("a truncated varint", &[0x08, 0xFF]),
    ("field 1 as a varint", &[0x08, 0x01]),
    ("invalid UTF-8 in field 1", &[0x0A, 0x02, 0xC3, 0x28]),
    ("invalid UTF-8 in field 2", &[0x12, 0x01, 0xFF]),
    ("a length past the end", &[0x0A, 0x7F, 0x61]),
    ("field number 0", &[0x00, 0x01]),
    ("an unterminated group", &[0x0B]),
    ("wire type 7", &[0x0F]),
    (
        "an eleven-byte varint",
        &[
            0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
        ],
    ),
    (
        "a nested message cut short",
        &[0x1A, 0x05, 0x0A, 0x09, 0x61],
    ),
];

static PROBES: AtomicU64 = AtomicU64::new(0);

/// What a sweep call sends: a label, the bytes, and the only codes it may end with (`None`: any
/// but INTERNAL and UNKNOWN).
type SweepRequest = (String, Vec<u8>, Option<&'static [tonic::Code]>);

/// One call of `path` with `body` as the request: the status it ended with.
async fn raw_call(
    channel: &tonic::transport::Channel,
    path: &str,
    server_streaming: bool,
    body: Vec<u8>,
) -> Result<(tonic::Code, String), String> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let path = http::uri::PathAndQuery::try_from(path).map_err(|e| e.to_string())?;
    let request = tonic::Request::new(body);
    let call = async {
        if server_streaming {
            match grpc.server_streaming(request, path, raw::RawCodec).await {
                Err(status) => Ok((status.code(), status.message().to_string())),
                Ok(response) => {
                    let mut stream = response.into_inner();
                    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                        Err(_) => Err("a stream with no first message in 10 s".to_string()),
                        Ok(Ok(_)) => Ok((tonic::Code::Ok, String::new())),
                        Ok(Err(status)) => Ok((status.code(), status.message().to_string())),
                    }
                }
            }
        } else {
            Ok(grpc.unary(request, path, raw::RawCodec).await.map_or_else(
                |status| (status.code(), status.message().to_string()),
                |_| (tonic::Code::Ok, String::new()),
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .map_err(|_| "no answer in 60 s".to_string())?
}

/// Rows for the sweep's requests to find: a page (in the sandbox too), a subscriber inside the
/// window, an opt-in, a segment, a reviewed story and its send.
async fn sweep_fixture(app: &mut TestApp, page: &str) -> wire::Ids {
    app.register_page(page).await;
    let psid = "u1".to_string();
    app.sandbox_admin(
        "/__sandbox/interactions",
        json!({"page_id": page, "psid": psid, "text": "hi", "deliver_webhook": false}),
    )
    .await;
    app.audience
        .record_interaction(RecordInteractionRequest {
            page_id: page.into(),
            psid: psid.clone(),
            interaction_time: None,
        })
        .await
        .expect("RecordInteraction");
    app.optins
        .record_opt_in(RecordOptInRequest {
            page_id: page.into(),
            psid: psid.clone(),
            topic: "Fuzz".into(),
            token: format!("tok-fixture-{page}"),
            opt_in_time: None,
        })
        .await
        .expect("RecordOptIn");
    let segment_id = app
        .audience
        .create_segment(CreateSegmentRequest {
            page_id: page.into(),
            name: "fuzz".into(),
            rule: Some(SegmentRule {
                all_tags: vec!["vip".into()],
                ..Default::default()
            }),
        })
        .await
        .expect("CreateSegment")
        .into_inner()
        .segment
        .expect("a segment")
        .segment_id;
    let story_id = app
        .stories
        .create_story(CreateStoryRequest {
            page_id: page.into(),
            topic: "Fuzz".into(),
            content: Some(otnd::pb::StoryContent {
                kind: Some(Kind::Text("Fuzz".into())),
            }),
            ..Default::default()
        })
        .await
        .expect("CreateStory")
        .into_inner()
        .story
        .expect("a story")
        .story_id;
    app.stories
        .preview_story(PreviewStoryRequest {
            story_id: story_id.clone(),
            reviewer_psid: psid.clone(),
        })
        .await
        .expect("PreviewStory");
    let send_id = app
        .sends
        .start_send(StartSendRequest {
            story_id: story_id.clone(),
            request_id: format!("fixture-{page}"),
        })
        .await
        .expect("StartSend")
        .into_inner()
        .send
        .expect("a send")
        .send_id;
    wire::Ids {
        page_id: page.into(),
        story_id,
        send_id,
        segment_id,
        psid,
    }
}

backend_tests! {
    async fn every_rpc_answers_empty_oversized_and_wrong_requests_without_internal(db) {
        let mut app = spawn_app(&db).await;
        let schema = wire::schema();
        let services: BTreeSet<&str> = schema
            .rpcs
            .iter()
            .map(|rpc| rpc.path.rsplit_once('/').unwrap().0)
            .collect();
        assert_eq!(services.len(), 5, "{services:?}");
        assert!(schema.rpcs.iter().any(|rpc| rpc.server_streaming), "WatchSend streams");
        // Deletions and cancellations last in each round, so the others find their rows.
        let mut rpcs: Vec<&wire::Rpc> = schema.rpcs.iter().collect();
        rpcs.sort_by_key(|rpc| {
            let method = rpc.path.rsplit_once('/').unwrap().1;
            method.starts_with("Delete") || method.starts_with("Cancel")
        });
        let limit = otnd::api::MAX_REQUEST_BYTES;

        let mut runner = TestRunner::new(Config { failure_persistence: None, ..Config::default() });
        let random_bytes = prop::collection::vec(any::<u8>(), 0..256);

        let mut calls = 0_usize;
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        let mut unimplemented = BTreeSet::new();
        let mut failures = Vec::new();
        for round in 0..7 {
            // Each round gets rows of its own: the previous round may have deleted them.
            let ids = sweep_fixture(&mut app, &format!("77{round}")).await;
            for (i, rpc) in rpcs.iter().enumerate() {
                let mut requests: Vec<SweepRequest> = Vec::new();
                match round {
                    0 => requests.push(("empty".into(), Vec::new(), None)),
                    1 => {
                        let body = schema.encode(&rpc.input, wire::Fill::Extreme {
                            budget: 8 * (limit + 1024), high: true, ids: None });
                        assert!(body.len() > limit, "{}: {} bytes", rpc.path, body.len());
                        requests.push((
                            format!("over the limit ({} bytes)", body.len()),
                            body,
                            Some(&[tonic::Code::OutOfRange, tonic::Code::ResourceExhausted]),
                        ));
                    }
                    2 | 3 => {
                        let fill = wire::Fill::Extreme { budget: 900_000, high: round == 2, ids: (round == 3).then_some(&ids) };
                        let body = schema.encode(&rpc.input, fill);
                        assert!(body.len() <= limit, "{}: {} bytes", rpc.path, body.len());
                        requests.push((format!("extreme, {} bytes", body.len()), body, None));
                    }
                    4 | 5 => {
                        let unique = PROBES.fetch_add(1, Ordering::Relaxed);
                        let nul = round == 5;
                        let body = schema.encode(&rpc.input, wire::Fill::Probe { ids: &ids, unique, nul });
                        let what = if nul { "real ids and odd strings, each ending in NUL" } else { "real ids, odd strings" };
                        requests.push((what.into(), body, None));
                    }
                    _ => {
                        for step in [1, 7, 13] {
                            let other = rpcs[(i + step) % rpcs.len()];
                            if other.input != rpc.input {
                                let unique = PROBES.fetch_add(1, Ordering::Relaxed);
                                let body = schema.encode(&other.input, wire::Fill::Probe { ids: &ids, unique, nul: false });
                                requests.push((format!("a {}", other.input), body, None));
                            }
                        }
                        for (what, bytes) in MALFORMED {
                            requests.push((what.to_string(), bytes.to_vec(), None));
                        }
                        for _ in 0..SWEEP_RANDOM_BODIES_PER_RPC {
                            let bytes = random_bytes.new_tree(&mut runner).unwrap().current();
                            requests.push((format!("random bytes {}", hex::encode(&bytes)), bytes, None));
                        }
                    }
                }
                for (what, body, wanted) in requests {
                    calls += 1;
                    let answer = raw_call(&app.channel, &rpc.path, rpc.server_streaming, body).await;
                    // FUZZ_TRACE=1 prints every call and its answer.
                    if std::env::var_os("FUZZ_TRACE").is_some() {
                        let what: String = what.chars().take(60).collect();
                        eprintln!("{round} {} <- {what}: {answer:?}", rpc.path);
                    }
                    match answer {
                        Err(problem) => failures.push(format!("{} <- {what}: {problem}", rpc.path)),
                        Ok((code, message)) => {
                            *codes.entry(format!("{code:?}")).or_default() += 1;
                            if code == tonic::Code::Unimplemented {
                                unimplemented.insert(rpc.path.clone());
                            }
                            // Cancelled, or an h2 error: the answer never arrived whole
                            // (and the connection it came on may be gone).
                            let broken = code == tonic::Code::Cancelled
                                || message.contains("h2 protocol error");
                            let bad = broken
                                || match wanted {
                                    Some(wanted) => !wanted.contains(&code),
                                    None => {
                                        matches!(code, tonic::Code::Internal | tonic::Code::Unknown)
                                    }
                                };
                            if bad {
                                failures.push(format!("{} <- {what}: {code:?} {message:?}", rpc.path));
                            }
                        }
                    }
                }
            }
        }
        println!(
            "grpc sweep: {calls} calls over {} RPCs of {} services; codes: {codes:?}; unimplemented: {unimplemented:?}",
            schema.rpcs.len(),
            services.len()
        );

        // The server still answers, health and a real call alike.
        let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .expect("health answers after the sweep")
            .into_inner()
            .status();
        assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving);
        app.pages
            .list_pages(otnd::pb::ListPagesRequest::default())
            .await
            .expect("ListPages answers after the sweep");

        assert!(failures.is_empty(), "{} bad answers:\n{}", failures.len(), failures.join("\n"));
    }
}
