//! The webhook body parser.

use super::*;

/// What a parsed webhook says, in plain values that both the parser and the oracle give.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Outcome {
    pages: BTreeMap<String, Vec<(String, i64, Taken)>>,
    skipped: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Taken {
    OptIn { topic: String, token: String },
    Interaction,
    Seen,
}

pub(super) fn outcome(parsed: &ParsedWebhook) -> Outcome {
    Outcome {
        pages: parsed
            .pages
            .iter()
            .map(|(page, events)| {
                let events = events
                    .iter()
                    .map(|event| {
                        let taken = match &event.kind {
                            EventKind::OptIn { topic, token, .. } => Taken::OptIn {
                                topic: topic.as_str().into(),
                                token: token.as_str().into(),
                            },
                            EventKind::Interaction | EventKind::SubscriptionChange { .. } => {
                                Taken::Interaction
                            }
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
pub(super) fn oracle_id(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn is_page_id(id: &str) -> bool {
    (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit())
}

pub(super) fn is_psid(psid: &str) -> bool {
    (1..=128).contains(&scalars(psid)) && no_space_or_control(psid)
}

pub(super) fn is_token(token: &str) -> bool {
    (1..=2048).contains(&scalars(token)) && no_space_or_control(token)
}

/// Epoch milliseconds: an integer from 0001-01-01 to 9999-12-31 (a float, a number in a string
/// or a time no clock gives is none); from 0 to 10^11 (before March 1973 in milliseconds), seconds.
pub(super) fn oracle_ms(value: &Value) -> Option<i64> {
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
pub(super) fn oracle(body: &Value, now_ms: i64) -> Option<Outcome> {
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

pub(super) fn oracle_event(
    event: &Value,
    page: &str,
    entry_time: i64,
) -> Option<(String, i64, Taken)> {
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
pub(super) fn check_parse(body: &[u8], now_ms: i64) -> Result<(), TestCaseError> {
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

pub(super) fn page_id_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec!["111", "222"]).prop_map(Value::from),
        1 => Just(json!(111)),
        1 => "[0-9]{1,40}".prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        1 => json_text().prop_map(Value::from),
    ]
}

pub(super) fn psid_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "u[0-9]{1,2}".prop_map(Value::from),
        1 => Just(json!("111")),
        1 => any::<u64>().prop_map(Value::from),
        1 => ".{0,6}".prop_map(Value::from),
        1 => "[a-z]{125,131}".prop_map(Value::from),
    ]
}

pub(super) fn time_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (1_400_000_000_000_i64..1_900_000_000_000).prop_map(Value::from),
        1 => (1_400_000_000_i64..1_900_000_000).prop_map(Value::from),
        2 => json_number(),
        1 => "[0-9]{1,15}".prop_map(Value::from),
    ]
}

pub(super) fn topic_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "\\PC{1,20}".prop_map(Value::from),
        1 => Just(json!("")),
        1 => (995..1005_usize).prop_flat_map(chars_exactly).prop_map(Value::from),
    ]
}

pub(super) fn token_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "[A-Za-z0-9_-]{1,40}".prop_map(Value::from),
        1 => Just(json!("")),
        1 => ".{1,10}".prop_map(Value::from),
        1 => "[a-z]{2045,2050}".prop_map(Value::from),
    ]
}

pub(super) fn event_value() -> impl Strategy<Value = Value> {
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

pub(super) fn envelope_value() -> impl Strategy<Value = Value> {
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
pub(super) fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
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
pub(super) fn number_literal() -> impl Strategy<Value = String> {
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
pub(super) fn nested(depth: usize, arrays: bool) -> String {
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
