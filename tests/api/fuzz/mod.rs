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
//! One file per subject: `parse.rs`, `story.rs`, `webhook.rs`, `sweep.rs`; the generators they
//! share are here. Every property's case count is a `const` here; the webhook run and the sweep print theirs.
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
    support::{TestApp, page_app_secret, spawn_app},
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
// Generators the subjects share: JSON of any shape, strings around a limit.

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

mod parse;
mod story;
mod sweep;
mod webhook;
