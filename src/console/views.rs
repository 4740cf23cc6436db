//! The console API's JSON: what the page shows, and nothing else (no page secret, no opt-in
//! token). Times are epoch milliseconds; states are otnd's own names (`running`, `in_flight`).

use serde::Serialize;

use crate::{
    domain::StoryContent,
    engine::Progress,
    store::{optins::TopicLedger, pages::PageRecord, sends, stories},
};

#[derive(Serialize)]
pub struct WhoAmI {
    /// Whether otnd has API keys, so that a call needs one.
    pub keys_required: bool,
    /// The presented key's role; `None` without keys or without a key.
    pub role: Option<&'static str>,
    /// Whether this caller may pause, resume and cancel sends.
    pub can_steer: bool,
}

#[derive(Serialize)]
pub struct PageList {
    pub pages: Vec<PageView>,
    pub next_page_token: String,
}

#[derive(Serialize)]
pub struct PageView {
    pub page_id: String,
    pub name: String,
    pub send_rate_per_second: u32,
    pub has_access_token: bool,
    pub has_app_secret: bool,
    pub has_verify_token: bool,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
}

impl From<PageRecord> for PageView {
    fn from(page: PageRecord) -> Self {
        PageView {
            page_id: page.id.as_str().to_string(),
            name: page.name,
            send_rate_per_second: page.send_rate_per_second,
            has_access_token: page.has_access_token,
            has_app_secret: page.has_app_secret,
            has_verify_token: page.has_verify_token,
            create_time_ms: page.created_at_ms,
            update_time_ms: page.updated_at_ms,
        }
    }
}

#[derive(Serialize)]
pub struct TopicList {
    pub topics: Vec<TopicView>,
}

/// ListTopics' summary of one topic.
#[derive(Serialize)]
pub struct TopicView {
    pub topic: String,
    pub active: u64,
    pub reserved: u64,
    pub used: u64,
    pub expired: u64,
    pub rejected: u64,
    pub expiring_soon: u64,
    pub requests_sent: u64,
    pub subscribers: u64,
    pub stopped: u64,
    /// Of `active`, the recurring tokens (the rest are one-time tokens).
    pub recurring_active: u64,
}

impl From<TopicLedger> for TopicView {
    fn from(t: TopicLedger) -> Self {
        let recurring_active = t
            .by_kind
            .iter()
            .filter(|(kind, _)| *kind == crate::domain::TokenKind::Recurring)
            .map(|(_, counts)| counts.active)
            .sum();
        TopicView {
            topic: t.topic,
            active: t.total.active,
            reserved: t.total.reserved,
            used: t.total.used,
            expired: t.total.expired,
            rejected: t.total.rejected,
            expiring_soon: t.total.expiring_soon,
            requests_sent: t.requests_sent,
            subscribers: t.total.subscribers,
            stopped: t.total.stopped,
            recurring_active,
        }
    }
}

#[derive(Serialize)]
pub struct StoryList {
    pub stories: Vec<StoryView>,
    pub next_page_token: String,
}

#[derive(Serialize)]
pub struct StoryView {
    pub story_id: String,
    pub page_id: String,
    pub topic: String,
    /// The message's text (a button template's text; its buttons are not shown).
    pub text: String,
    /// `draft` or `sent`.
    pub state: String,
    /// Reviewed as it is now: a send may start.
    pub reviewed: bool,
    /// Reviewed once, but changed since.
    pub changed_since_review: bool,
    pub review_time_ms: Option<i64>,
    pub reviewer_psid: Option<String>,
    pub include_window_users: bool,
    pub segment_id: Option<String>,
    pub update_time_ms: i64,
}

impl From<stories::Model> for StoryView {
    fn from(story: stories::Model) -> Self {
        let reviewed = story.reviewed();
        let text = match story.story_content() {
            Some(StoryContent::Text(text) | StoryContent::ButtonTemplate { text, .. }) => text,
            None => String::new(),
        };
        StoryView {
            reviewed,
            changed_since_review: !reviewed && story.reviewed_at.is_some(),
            text,
            story_id: story.id,
            page_id: story.page_id,
            topic: story.topic,
            state: story.state,
            review_time_ms: story.reviewed_at,
            reviewer_psid: story.reviewer_psid,
            include_window_users: story.include_window_users,
            segment_id: story.segment_id,
            update_time_ms: story.updated_at,
        }
    }
}

#[derive(Serialize)]
pub struct SendList {
    pub sends: Vec<SendView>,
    pub next_page_token: String,
}

#[derive(Serialize)]
pub struct SendView {
    pub send_id: String,
    pub story_id: String,
    pub page_id: String,
    pub topic: String,
    pub state: &'static str,
    pub request_id: String,
    pub progress: ProgressView,
    pub create_time_ms: i64,
    pub start_time_ms: Option<i64>,
    pub finish_time_ms: Option<i64>,
}

impl From<&sends::Send> for SendView {
    fn from(send: &sends::Send) -> Self {
        SendView {
            send_id: send.id.clone(),
            story_id: send.story_id.clone(),
            page_id: send.page_id.clone(),
            topic: send.topic.clone(),
            state: send.state.as_str(),
            request_id: send.request_id.clone(),
            progress: ProgressView::from(&Progress::from_send(send)),
            create_time_ms: send.created_at,
            start_time_ms: send.started_at,
            finish_time_ms: send.finished_at,
        }
    }
}

/// WatchSend's snapshot.
#[derive(Serialize)]
pub struct ProgressView {
    pub send_id: String,
    pub state: &'static str,
    pub finished: bool,
    pub total: u64,
    pub pending: u64,
    pub in_flight: u64,
    pub sent: u64,
    pub failed: u64,
    pub skipped: u64,
    pub unknown: u64,
    pub rate_per_second: f64,
    pub eta_seconds: f64,
    pub last_error: String,
}

impl From<&Progress> for ProgressView {
    fn from(p: &Progress) -> Self {
        ProgressView {
            send_id: p.send_id.clone(),
            state: p.state.as_str(),
            finished: p.is_finished(),
            total: p.total,
            pending: p.pending,
            in_flight: p.in_flight,
            sent: p.sent,
            failed: p.failed,
            skipped: p.skipped,
            unknown: p.unknown,
            rate_per_second: finite(p.rate_per_second),
            eta_seconds: finite(p.eta_seconds),
            last_error: p.last_error.clone(),
        }
    }
}

/// JSON has no infinity or NaN (serde would write `null`, which the page would misread).
fn finite(value: f64) -> f64 {
    if value.is_finite() { value } else { 0.0 }
}

#[derive(Serialize)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
    pub next_page_token: String,
}

/// One recipient of a send, with Facebook's answer when it refused.
#[derive(Serialize)]
pub struct DeliveryView {
    pub delivery_id: String,
    pub psid: String,
    pub route: &'static str,
    pub state: &'static str,
    pub attempts: i32,
    pub message_id: Option<String>,
    pub error_code: Option<i32>,
    pub error_subcode: Option<i32>,
    pub error_message: Option<String>,
    pub confirmed_by_token: bool,
    pub update_time_ms: i64,
}

impl From<sends::delivery::Model> for DeliveryView {
    fn from(d: sends::delivery::Model) -> Self {
        DeliveryView {
            delivery_id: d.id.to_string(),
            psid: d.psid,
            route: d.route.as_str(),
            state: d.state.as_str(),
            attempts: d.attempts,
            message_id: d.message_id,
            error_code: d.error_code,
            error_subcode: d.error_subcode,
            error_message: d.error_message,
            confirmed_by_token: d.confirmed_by_token,
            update_time_ms: d.updated_at,
        }
    }
}
