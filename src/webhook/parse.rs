//! Facebook's webhook envelope into events, read with serde. Tolerant, as real payloads need:
//! ids as strings or numbers (above 2^53 kept exactly), times missing or in seconds instead of
//! milliseconds, events under `standby` (another app holds the thread) as well as `messaging`,
//! event kinds otnd does not handle, empty arrays. Every event or entry otnd does not handle, or
//! cannot read, is skipped and counted, never fatal to the rest of the POST: each is read on its
//! own, and a field of the wrong type reads as absent.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::Value;

use crate::domain::{
    EventKind, IncomingEvent, OptInToken, PageId, Psid, RECURRING_TITLE_MAX_CHARS, RecurringTerms,
    SubscriptionChange, Topic, recurring_text, recurring_timezone,
};

#[derive(Debug, Default)]
pub struct ParsedWebhook {
    /// Events per page id, in the order they came.
    pub pages: BTreeMap<PageId, Vec<IncomingEvent>>,
    /// Entries and events that were not for otnd or could not be read.
    pub skipped: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the body is not a webhook envelope: {0}")]
    NotAnEnvelope(&'static str),
}

/// The times otnd takes from Facebook: 0001-01-01 to 9999-12-31 in epoch milliseconds, the range
/// of a protobuf Timestamp (and of `RecordOptIn`). A time outside it is treated as absent, so
/// that no date arithmetic downstream (an opt-in's expiry a year on, the 24-hour window) can
/// overflow.
const MIN_TIME_MS: i64 = -62_135_596_800_000;
const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// A time from 0 up to this is read as seconds: in milliseconds it would be before March 1973,
/// and some of Facebook's products (and gateways relaying them) send `time` in seconds.
const SECONDS_BELOW: i64 = 100_000_000_000;

/// A field read as `T` when it has `T`'s shape, else absent: one field of the wrong type never
/// costs the rest of its event.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let value = Value::deserialize(deserializer)?;
    Ok(T::deserialize(value).ok())
}

/// `value` read as `T` when it is a JSON object of `T`'s shape. (serde would also read a struct
/// from an array of its fields in order; Facebook's structs are objects, and `[0]` is no sender.)
fn from_object<T: DeserializeOwned>(value: Value) -> Option<T> {
    if value.is_object() {
        T::deserialize(value).ok()
    } else {
        None
    }
}

/// A field read with [`from_object`], absent when it is something else.
fn lenient_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    Ok(from_object(Value::deserialize(deserializer)?))
}

/// A page or user id: Facebook sends strings, some relays numbers. A number keeps its decimal
/// digits exactly (serde_json reads integers up to 2^64 without going through a float).
#[derive(Debug)]
struct Id(String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(s) => Ok(Id(s)),
            Value::Number(n) => Ok(Id(n.to_string())),
            _ => Err(serde::de::Error::custom("an id is a string or a number")),
        }
    }
}

/// Epoch milliseconds (or seconds, see [`SECONDS_BELOW`]), an integer in the range otnd takes.
#[derive(Clone, Copy, Debug)]
struct Time(i64);

/// A time Facebook gave, as epoch milliseconds: seconds below [`SECONDS_BELOW`] are scaled, and
/// what falls outside the range otnd takes is none.
fn epoch_ms(raw: i64) -> Option<i64> {
    let ms = if (0..SECONDS_BELOW).contains(&raw) {
        raw * 1000
    } else {
        raw
    };
    (MIN_TIME_MS..=MAX_TIME_MS).contains(&ms).then_some(ms)
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        epoch_ms(i64::deserialize(deserializer)?)
            .map(Time)
            .ok_or_else(|| serde::de::Error::custom("a time no clock gives"))
    }
}

/// The body: `object` says whose updates they are; `entry` holds them.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default, deserialize_with = "lenient")]
    object: Option<String>,
    #[serde(default)]
    entry: Option<Value>,
}

/// One page's updates.
#[derive(Deserialize)]
struct Entry {
    #[serde(default, deserialize_with = "lenient")]
    id: Option<Id>,
    #[serde(default, deserialize_with = "lenient")]
    time: Option<Time>,
    /// Events for the app that holds the conversation.
    #[serde(default, deserialize_with = "lenient")]
    messaging: Option<Vec<Value>>,
    /// The same events while another app holds the conversation (handover): the user, their
    /// window and their opt-ins are the page's all the same.
    #[serde(default, deserialize_with = "lenient")]
    standby: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct Party {
    #[serde(default, deserialize_with = "lenient")]
    id: Option<Id>,
}

/// A field that is there, whatever its value (`null` included): an event's kind is the key it
/// carries.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct Event {
    #[serde(default, deserialize_with = "lenient_object")]
    sender: Option<Party>,
    #[serde(default, deserialize_with = "lenient")]
    timestamp: Option<Time>,
    #[serde(default, deserialize_with = "present")]
    optin: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    message: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    postback: Option<Value>,
}

#[derive(Deserialize)]
struct OptIn {
    #[serde(default, rename = "type", deserialize_with = "lenient")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    payload: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    one_time_notif_token: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    notification_messages_token: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    title: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    notification_messages_timezone: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    token_expiry_timestamp: Option<Expiry>,
    #[serde(default, deserialize_with = "lenient")]
    user_token_status: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    notification_messages_status: Option<String>,
}

/// `token_expiry_timestamp`: epoch milliseconds as a number or a string of digits (Meta's
/// reference shows it quoted). Past the range otnd takes, it reads as "does not expire".
#[derive(Clone, Copy, Debug)]
struct Expiry(Option<i64>);

impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = match Value::deserialize(deserializer)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        let Some(raw) = raw else {
            return Err(serde::de::Error::custom(
                "an expiry is a number of milliseconds",
            ));
        };
        Ok(Expiry(epoch_ms(raw)))
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(default, deserialize_with = "lenient")]
    is_echo: Option<bool>,
}

pub fn parse(body: &[u8], now_ms: i64) -> Result<ParsedWebhook, ParseError> {
    // Read as a JSON value first: what is JSON is serde_json's call alone, and a key given
    // twice keeps its last value, as everywhere else otnd reads JSON.
    let body: Value =
        serde_json::from_slice(body).map_err(|e| ParseError::NotJson(e.to_string()))?;
    let envelope: Envelope =
        from_object(body).ok_or(ParseError::NotAnEnvelope("not a JSON object"))?;
    let mut parsed = ParsedWebhook::default();
    // Instagram, WhatsApp and others share the endpoint shape; only pages are otnd's.
    if envelope.object.as_deref() != Some("page") {
        parsed.skipped += 1;
        return Ok(parsed);
    }
    let Some(Value::Array(entries)) = envelope.entry else {
        return Err(ParseError::NotAnEnvelope("no entry array"));
    };
    for entry in entries {
        let Some(entry) = from_object::<Entry>(entry) else {
            parsed.skipped += 1;
            continue;
        };
        let page_id = entry.id.and_then(|id| PageId::parse(&id.0).ok());
        let events: Option<Vec<Value>> = match (entry.messaging, entry.standby) {
            (None, None) => None,
            (messaging, standby) => Some(
                messaging
                    .into_iter()
                    .flatten()
                    .chain(standby.into_iter().flatten())
                    .collect(),
            ),
        };
        let (Some(page_id), Some(events)) = (page_id, events) else {
            parsed.skipped += 1;
            continue;
        };
        let entry_time = entry.time.map_or(now_ms, |t| t.0);
        for event in events {
            match parse_event(event, &page_id, entry_time) {
                Some(event) => parsed.pages.entry(page_id.clone()).or_default().push(event),
                None => parsed.skipped += 1,
            }
        }
    }
    Ok(parsed)
}

fn parse_event(event: Value, page_id: &PageId, entry_time: i64) -> Option<IncomingEvent> {
    let event: Event = from_object(event)?;
    let sender = event.sender?.id?.0;
    // The page's own messages (echoes) name the page as sender: not a subscriber.
    if sender == page_id.as_str() {
        return None;
    }
    let psid = Psid::parse(&sender).ok()?;
    let at_ms = event.timestamp.map_or(entry_time, |t| t.0);
    let kind = if let Some(optin) = event.optin {
        // An `optin` that is no object says nothing of its type: seen, like other types.
        let optin: Option<OptIn> = from_object(optin);
        match optin {
            Some(optin) if optin.kind.as_deref() == Some("one_time_notif_req") => {
                let topic = Topic::parse(&optin.payload?).ok()?;
                let token = OptInToken::parse(&optin.one_time_notif_token?).ok()?;
                EventKind::OptIn {
                    topic,
                    token,
                    recurring: None,
                }
            }
            Some(optin) if optin.kind.as_deref() == Some("notification_messages") => {
                recurring_event(optin)?
            }
            // Plugin opt-ins and the like: the user is known, nothing more.
            _ => EventKind::Seen,
        }
    } else if let Some(message) = event.message {
        let echo = from_object::<Message>(message)
            .and_then(|m| m.is_echo)
            .unwrap_or(false);
        if echo {
            return None;
        }
        EventKind::Interaction
    } else if event.postback.is_some() {
        EventKind::Interaction
    } else {
        // Reads, deliveries, reactions, referrals...
        EventKind::Seen
    };
    Some(IncomingEvent { psid, at_ms, kind })
}

/// A `notification_messages` opt-in: a new recurring token, or a STOP or RESUME of one. The
/// topic is the payload otnd's request carried (the title when a request had none). A STOP or
/// RESUME without a token applies to the user's recurring tokens on the topic.
fn recurring_event(optin: OptIn) -> Option<EventKind> {
    let change = optin
        .notification_messages_status
        .as_deref()
        .and_then(SubscriptionChange::parse);
    let title = optin
        .title
        .as_deref()
        .and_then(|t| recurring_text(t, RECURRING_TITLE_MAX_CHARS));
    // The payload otnd's request carried, else the title; an unreadable payload names no
    // topic at all (never "every topic").
    let topic = match optin.payload.as_deref().filter(|p| !p.is_empty()) {
        Some(payload) => Topic::parse(payload).map_err(|_| ()),
        None => title
            .as_deref()
            .and_then(|t| Topic::parse(t).ok())
            .ok_or(()),
    };
    let Some(token) = optin.notification_messages_token.filter(|t| !t.is_empty()) else {
        // Neither a token nor a choice: the user is known, nothing more.
        return Some(match (change, topic) {
            (Some(change), Ok(topic)) => EventKind::SubscriptionChange {
                topic: Some(topic),
                change,
            },
            (Some(change), Err(())) if optin.payload.as_deref().is_none_or(str::is_empty) => {
                EventKind::SubscriptionChange {
                    topic: None,
                    change,
                }
            }
            _ => EventKind::Seen,
        });
    };
    let topic = topic.ok()?;
    let token = OptInToken::parse(&token).ok()?;
    let terms = RecurringTerms {
        title,
        timezone: optin
            .notification_messages_timezone
            .as_deref()
            .and_then(recurring_timezone),
        expires_at: optin.token_expiry_timestamp.and_then(|e| e.0),
        token_status: optin
            .user_token_status
            .as_deref()
            .and_then(|s| recurring_text(s, 32)),
        change,
    };
    Some(EventKind::OptIn {
        topic,
        token,
        recurring: Some(terms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events(body: Value) -> ParsedWebhook {
        parse(body.to_string().as_bytes(), 0).unwrap()
    }

    #[test]
    fn several_entries_and_events_with_everything_facebook_sends() {
        let parsed = events(json!({"object": "page", "entry": [
            {"id": "111", "time": 5, "messaging": [
                {"sender": {"id": "u1"}, "recipient": {"id": "111"}, "timestamp": 1_700_000_001_000_i64,
                 "optin": {"type": "one_time_notif_req", "payload": "Spring Sale!", "one_time_notif_token": "tok1"}},
                {"sender": {"id": "u2"}, "recipient": {"id": "111"}, "timestamp": 2000, "message": {"mid": "m", "text": "hi"}},
                {"sender": {"id": "111"}, "recipient": {"id": "u2"}, "message": {"is_echo": true, "text": "echo"}},
                {"sender": {"id": "u3"}, "recipient": {"id": "111"}, "postback": {"payload": "YES"}},
                {"sender": {"id": "u4"}, "recipient": {"id": "111"}, "read": {"watermark": 1}},
                {"sender": {"id": "u5"}, "recipient": {"id": "111"}, "optin": {"type": "notification_messages", "payload": "x"}},
                {"recipient": {"id": "111"}, "optin": {"type": "one_time_notif_req"}},
            ]},
            {"id": 222, "time": 7, "messaging": [
                {"sender": {"id": "u9"}, "recipient": {"id": "222"}, "optin": {"type": "one_time_notif_req", "payload": "t", "one_time_notif_token": "tok9"}},
            ]},
            {"id": "333", "changes": []},
        ]}));
        let page_111 = &parsed.pages[&PageId::parse("111").unwrap()];
        assert_eq!(page_111.len(), 5);
        assert!(
            matches!(&page_111[0].kind, EventKind::OptIn { topic, token, recurring: None }
            if topic.as_str() == "Spring Sale!" && token.as_str() == "tok1")
        );
        assert_eq!(page_111[0].at_ms, 1_700_000_001_000);
        assert!(matches!(page_111[1].kind, EventKind::Interaction));
        assert!(
            matches!(page_111[2].kind, EventKind::Interaction),
            "postback"
        );
        assert!(matches!(page_111[3].kind, EventKind::Seen), "read");
        assert!(
            matches!(page_111[4].kind, EventKind::Seen),
            "a recurring opt-in without a token or a choice"
        );
        let page_222 = &parsed.pages[&PageId::parse("222").unwrap()];
        assert_eq!(
            page_222[0].at_ms, 7000,
            "the entry's time when the event has none (here in seconds)"
        );
        assert_eq!(
            parsed.skipped, 3,
            "the echo, the event without a sender, the feed entry"
        );
    }

    /// Recurring opt-ins as Facebook sends them: a new token with its terms (the expiry as a
    /// number, a quoted number, or absent), and STOP or RESUME with or without the token.
    #[test]
    fn recurring_opt_ins_and_their_stops_and_resumes() {
        let parsed = events(
            json!({"object": "page", "entry": [{"id": "111", "time": 5, "messaging": [
                {"sender": {"id": "u1"}, "recipient": {"id": "111"}, "timestamp": 1_700_000_000_000_i64,
                 "optin": {"type": "notification_messages", "payload": "deals", "title": "Weekly deals",
                           "notification_messages_token": "rt1", "notification_messages_frequency": "DAILY",
                           "notification_messages_timezone": "Europe/London",
                           "token_expiry_timestamp": 1_731_536_000_000_i64, "user_token_status": "NOT_REFRESHED"}},
                {"sender": {"id": "u2"}, "recipient": {"id": "111"}, "timestamp": 1_700_000_000_000_i64,
                 "optin": {"type": "notification_messages", "payload": "deals", "title": "Weekly deals",
                           "notification_messages_token": "rt2", "token_expiry_timestamp": "1731536000000",
                           "user_token_status": "REFRESHED"}},
                {"sender": {"id": "u3"}, "recipient": {"id": "111"},
                 "optin": {"type": "notification_messages", "title": "News", "notification_messages_token": "rt3"}},
                {"sender": {"id": "u1"}, "recipient": {"id": "111"}, "timestamp": 1_700_000_100_000_i64,
                 "optin": {"type": "notification_messages", "payload": "deals", "notification_messages_token": "rt1",
                           "notification_messages_status": "STOP NOTIFICATIONS"}},
                {"sender": {"id": "u1"}, "recipient": {"id": "111"}, "timestamp": 1_700_000_200_000_i64,
                 "optin": {"type": "notification_messages", "payload": "deals",
                           "notification_messages_status": "RESUME_NOTIFICATIONS"}},
                {"sender": {"id": "u4"}, "recipient": {"id": "111"},
                 "optin": {"type": "notification_messages", "payload": "deals", "notification_messages_token": "rt4",
                           "token_expiry_timestamp": null, "title": 7}},
            ]}]}),
        );
        let page = &parsed.pages[&PageId::parse("111").unwrap()];
        assert_eq!(page.len(), 6);
        let terms = |i: usize| match &page[i].kind {
            EventKind::OptIn {
                topic,
                token,
                recurring: Some(terms),
            } => (
                topic.as_str().to_string(),
                token.as_str().to_string(),
                terms.clone(),
            ),
            other => panic!("{i}: {other:?}"),
        };
        let (topic, token, first) = terms(0);
        assert_eq!((topic.as_str(), token.as_str()), ("deals", "rt1"));
        assert_eq!(
            first,
            RecurringTerms {
                title: Some("Weekly deals".into()),
                timezone: Some("Europe/London".into()),
                expires_at: Some(1_731_536_000_000),
                token_status: Some("NOT_REFRESHED".into()),
                change: None,
            }
        );
        assert_eq!(terms(1).2.expires_at, Some(1_731_536_000_000), "quoted");
        assert_eq!(terms(1).2.token_status.as_deref(), Some("REFRESHED"));
        assert_eq!(terms(2).0, "News", "no payload: the title is the topic");
        assert_eq!(terms(2).2.expires_at, None, "no expiry: it does not expire");
        assert_eq!(terms(3).2.change, Some(SubscriptionChange::Stop));
        assert!(matches!(
            &page[4].kind,
            EventKind::SubscriptionChange { topic: Some(topic), change: SubscriptionChange::Resume }
                if topic.as_str() == "deals"
        ));
        let (_, _, odd) = terms(5);
        assert_eq!(
            (odd.expires_at, odd.title),
            (None, None),
            "odd fields read as absent"
        );
        assert_eq!(parsed.skipped, 0);
    }

    #[test]
    fn times_no_clock_gives_fall_back_to_the_entry_time_then_now() {
        let body = |time: Value, timestamp: Value| {
            events(
                json!({"object": "page", "entry": [{"id": "111", "time": time, "messaging": [
                {"sender": {"id": "u1"}, "timestamp": timestamp,
                 "optin": {"type": "one_time_notif_req", "payload": "t", "one_time_notif_token": "k"}}]}]}),
            )
        };
        let at = |parsed: ParsedWebhook| parsed.pages[&PageId::parse("111").unwrap()][0].at_ms;
        let entry = 1_700_000_000_123_i64;
        assert_eq!(at(body(json!(entry), json!(i64::MAX))), entry);
        assert_eq!(at(body(json!(entry), json!(MAX_TIME_MS + 1))), entry);
        assert_eq!(at(body(json!(entry), json!(MAX_TIME_MS))), MAX_TIME_MS);
        assert_eq!(at(body(json!(i64::MIN), json!(MIN_TIME_MS - 1))), 0, "now");
        assert_eq!(at(body(json!(u64::MAX), json!(MIN_TIME_MS))), MIN_TIME_MS);
        assert_eq!(
            at(body(json!(entry), json!("1700000000000"))),
            entry,
            "a string"
        );
        assert_eq!(at(body(json!(entry), json!(1.7e12))), entry, "a float");
    }

    #[test]
    fn times_in_seconds_are_read_as_seconds() {
        let at = |time: Value, timestamp: Option<Value>| {
            let mut event = json!({"sender": {"id": "u1"}, "read": {"watermark": 1}});
            if let Some(timestamp) = timestamp {
                event["timestamp"] = timestamp;
            }
            events(json!({"object": "page", "entry": [
                {"id": "111", "time": time, "messaging": [event]}]}))
            .pages[&PageId::parse("111").unwrap()][0]
                .at_ms
        };
        assert_eq!(at(json!(1_700_000_000), None), 1_700_000_000_000);
        assert_eq!(at(json!(1), Some(json!(1_700_000_001))), 1_700_000_001_000);
        assert_eq!(
            at(json!(1), Some(json!(1_700_000_001_234_i64))),
            1_700_000_001_234,
            "milliseconds stay"
        );
        assert_eq!(at(json!(1), Some(json!(SECONDS_BELOW))), SECONDS_BELOW);
        assert_eq!(
            at(json!(1), Some(json!(SECONDS_BELOW - 1))),
            (SECONDS_BELOW - 1) * 1000
        );
    }

    #[test]
    fn real_payloads_standby_numeric_ids_unknown_kinds_and_empty_arrays() {
        // Handover: the events of a conversation another app holds come under `standby`.
        let parsed = events(json!({"object": "page", "entry": [
            {"id": 18446744073709551615_u64, "time": 1_700_000_000_000_i64, "standby": [
                {"sender": {"id": 9007199254740993_u64}, "recipient": {"id": "1"},
                 "timestamp": 1_700_000_000_500_i64, "message": {"mid": "m", "text": "hi"}},
                {"sender": {"id": "u2"}, "recipient": {"id": "1"},
                 "optin": {"type": "one_time_notif_req", "payload": "t", "one_time_notif_token": "k2"}},
            ]},
            {"id": "222", "time": 1_700_000_000_000_i64, "messaging": [], "standby": []},
            {"id": "333", "messaging": [
                {"sender": {"id": "u3"}, "reaction": {"reaction": "love", "action": "react"}},
                {"sender": {"id": "u3"}, "message": null},
                {"sender": {"id": "u3"}, "postback": null},
                {"sender": {"id": "u3"}, "optin": null},
                {"sender": {"id": "u3"}, "message_edit": {"mid": "m", "text": "x"}},
                {"sender": {"id": "u3"}, "timestamp": "soon", "delivery": {"mids": []}},
                {},
                [],
            ]},
        ]}));
        let page = &parsed.pages[&PageId::parse("18446744073709551615").unwrap()];
        assert_eq!(page.len(), 2);
        assert_eq!(
            page[0].psid.as_str(),
            "9007199254740993",
            "above 2^53, exactly"
        );
        assert!(matches!(page[0].kind, EventKind::Interaction));
        assert_eq!(page[0].at_ms, 1_700_000_000_500);
        assert!(matches!(&page[1].kind, EventKind::OptIn { token, .. } if token.as_str() == "k2"));
        assert!(
            !parsed.pages.contains_key(&PageId::parse("222").unwrap()),
            "nothing in empty arrays"
        );
        let kinds: Vec<&EventKind> = parsed.pages[&PageId::parse("333").unwrap()]
            .iter()
            .map(|e| &e.kind)
            .collect();
        assert!(
            matches!(
                kinds[..],
                [
                    EventKind::Seen,
                    EventKind::Interaction,
                    EventKind::Interaction,
                    EventKind::Seen,
                    EventKind::Seen,
                    EventKind::Seen
                ]
            ),
            "{kinds:?}"
        );
        assert_eq!(
            parsed.skipped, 2,
            "the event without a sender, the one that is no object"
        );
    }

    #[test]
    fn bodies_that_are_not_envelopes_are_errors_and_other_objects_are_ignored() {
        assert!(matches!(parse(b"{", 0), Err(ParseError::NotJson(_))));
        assert!(matches!(
            parse(b"[1]", 0),
            Err(ParseError::NotAnEnvelope(_))
        ));
        assert!(matches!(
            parse(br#"{"object":"page"}"#, 0),
            Err(ParseError::NotAnEnvelope(_))
        ));
        let other = parse(br#"{"object":"instagram","entry":[]}"#, 0).unwrap();
        assert!(other.pages.is_empty());
    }
}
