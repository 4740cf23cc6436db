//! Facebook's webhook envelope into events. Tolerant: every event or entry otnd does not handle,
//! or cannot read, is skipped and counted, never fatal to the rest of the POST.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{
    domain::{OptInToken, PageId, Psid, Topic},
    store::optins::{EventKind, IncomingEvent},
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

fn id_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The times otnd takes from Facebook: 0001-01-01 to 9999-12-31 in epoch milliseconds, the range
/// of a protobuf Timestamp (and of `RecordOptIn`). A time outside it is treated as absent, so
/// that no date arithmetic downstream (an opt-in's expiry a year on, the 24-hour window) can
/// overflow.
const MIN_TIME_MS: i64 = -62_135_596_800_000;
const MAX_TIME_MS: i64 = 253_402_300_799_999;

fn time_of(value: Option<&Value>) -> Option<i64> {
    value
        .and_then(Value::as_i64)
        .filter(|ms| (MIN_TIME_MS..=MAX_TIME_MS).contains(ms))
}

pub fn parse(body: &[u8], now_ms: i64) -> Result<ParsedWebhook, ParseError> {
    let envelope: Value =
        serde_json::from_slice(body).map_err(|e| ParseError::NotJson(e.to_string()))?;
    let Some(envelope) = envelope.as_object() else {
        return Err(ParseError::NotAnEnvelope("not a JSON object"));
    };
    let mut parsed = ParsedWebhook::default();
    // Instagram, WhatsApp and others share the endpoint shape; only pages are otnd's.
    if envelope.get("object").and_then(Value::as_str) != Some("page") {
        parsed.skipped += 1;
        return Ok(parsed);
    }
    let Some(entries) = envelope.get("entry").and_then(Value::as_array) else {
        return Err(ParseError::NotAnEnvelope("no entry array"));
    };
    for entry in entries {
        let page_id = id_of(entry.get("id")).and_then(|id| PageId::parse(&id).ok());
        let messaging = entry.get("messaging").and_then(Value::as_array);
        let (Some(page_id), Some(messaging)) = (page_id, messaging) else {
            parsed.skipped += 1;
            continue;
        };
        let entry_time = time_of(entry.get("time")).unwrap_or(now_ms);
        for event in messaging {
            match parse_event(event, &page_id, entry_time) {
                Some(event) => parsed.pages.entry(page_id.clone()).or_default().push(event),
                None => parsed.skipped += 1,
            }
        }
    }
    Ok(parsed)
}

fn parse_event(event: &Value, page_id: &PageId, entry_time: i64) -> Option<IncomingEvent> {
    let sender = id_of(event.get("sender")?.get("id"))?;
    // The page's own messages (echoes) name the page as sender: not a subscriber.
    if sender == page_id.as_str() {
        return None;
    }
    let psid = Psid::parse(&sender).ok()?;
    let at_ms = time_of(event.get("timestamp")).unwrap_or(entry_time);
    let kind = if let Some(optin) = event.get("optin") {
        match optin.get("type").and_then(Value::as_str) {
            Some("one_time_notif_req") => {
                let topic = Topic::parse(optin.get("payload")?.as_str()?).ok()?;
                let token = OptInToken::parse(optin.get("one_time_notif_token")?.as_str()?).ok()?;
                EventKind::OptIn { topic, token }
            }
            // Recurring notifications, plugin opt-ins: the user is known, nothing more.
            _ => EventKind::Seen,
        }
    } else if let Some(message) = event.get("message") {
        if message.get("is_echo").and_then(Value::as_bool) == Some(true) {
            return None;
        }
        EventKind::Interaction
    } else if event.get("postback").is_some() {
        EventKind::Interaction
    } else {
        // Reads, deliveries, reactions, referrals...
        EventKind::Seen
    };
    Some(IncomingEvent { psid, at_ms, kind })
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
                {"sender": {"id": "u1"}, "recipient": {"id": "111"}, "timestamp": 1000,
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
            matches!(&page_111[0].kind, EventKind::OptIn { topic, token }
            if topic.as_str() == "Spring Sale!" && token.as_str() == "tok1")
        );
        assert_eq!(page_111[0].at_ms, 1000);
        assert!(matches!(page_111[1].kind, EventKind::Interaction));
        assert!(
            matches!(page_111[2].kind, EventKind::Interaction),
            "postback"
        );
        assert!(matches!(page_111[3].kind, EventKind::Seen), "read");
        assert!(
            matches!(page_111[4].kind, EventKind::Seen),
            "other opt-in types"
        );
        let page_222 = &parsed.pages[&PageId::parse("222").unwrap()];
        assert_eq!(
            page_222[0].at_ms, 7,
            "the entry's time when the event has none"
        );
        assert_eq!(
            parsed.skipped, 3,
            "the echo, the event without a sender, the feed entry"
        );
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
        assert_eq!(at(body(json!(5), json!(i64::MAX))), 5);
        assert_eq!(at(body(json!(5), json!(MAX_TIME_MS + 1))), 5);
        assert_eq!(at(body(json!(5), json!(MAX_TIME_MS))), MAX_TIME_MS);
        assert_eq!(at(body(json!(i64::MIN), json!(MIN_TIME_MS - 1))), 0, "now");
        assert_eq!(at(body(json!(u64::MAX), json!(MIN_TIME_MS))), MIN_TIME_MS);
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
