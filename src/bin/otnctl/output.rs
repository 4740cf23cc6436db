//! What otnctl prints: one row struct per kind of result, from which both the table's columns
//! (tabled) and the JSON fields (serde) come. Enums print as their short names (`RUNNING`),
//! timestamps as RFC 3339, absent values as `null` in JSON and `-` in a table.

use std::io::{self, Write};

use chrono::{DateTime, SecondsFormat};
use otnd::pb;
use serde::Serialize;
use tabled::{
    Table, Tabled,
    derive::display,
    settings::{Format, Style, object::Segment},
};

use crate::cli::Output;

/// Writes to stdout; a reader that went away (`| head`) ends otnctl quietly and successfully.
pub fn emit(text: &str) {
    let mut stdout = io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        stdout_failed(e);
    }
}

pub fn stdout_failed(e: io::Error) -> ! {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("otnctl: cannot write to stdout: {e}");
    std::process::exit(1);
}

/// One result: a two-column table (field, value), or one JSON object.
pub fn one<T: Tabled + Serialize>(output: Output, row: &T) {
    match output {
        Output::Table => {
            let mut table = Table::kv([row]);
            table
                .with(Style::rounded().remove_horizontals())
                .modify(Segment::all(), Format::content(inert));
            emit(&format!("{table}\n"));
        }
        Output::Json => emit(&json(row)),
    }
}

/// A list: a table with a header row (or a note when empty), or one JSON array.
pub fn many<T: Tabled + Serialize>(output: Output, rows: &[T], what: &str) {
    match output {
        Output::Table if rows.is_empty() => eprintln!("no {what}"),
        Output::Table => {
            let mut table = Table::new(rows);
            table
                .with(Style::rounded())
                .modify(Segment::all(), Format::content(inert));
            emit(&format!("{table}\n"));
        }
        Output::Json => emit(&json(&rows)),
    }
}

/// A cell as text that cannot steer the terminal: a topic or a Facebook reason may hold escape
/// sequences or line breaks, shown here as `\u{1b}` and spaces (JSON escapes them by itself).
fn inert(cell: &str) -> String {
    cell.chars()
        .map(|c| match c {
            '\n' | '\r' | '\t' => " ".to_string(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("rows serialize");
    text.push('\n');
    text
}

/// RFC 3339 in UTC, or `None` when the field is absent.
pub fn time(t: &Option<prost_types::Timestamp>) -> Option<String> {
    let t = t.as_ref()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    DateTime::from_timestamp(t.seconds, nanos)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// `SEND_STATE_RUNNING` → `RUNNING`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_string()
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn dash(value: &Option<String>) -> String {
    display::option(value, "-")
}

/// The most characters of free text (a story, Facebook's reason) a table cell shows; JSON and
/// exports carry all of it.
const CELL_MAX_CHARS: usize = 80;

fn clip(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(CELL_MAX_CHARS) {
        Some((end, _)) => format!("{}…", &one_line[..end]),
        None => one_line,
    }
}

fn clipped(value: &Option<String>) -> String {
    value.as_deref().map_or_else(|| "-".to_string(), clip)
}

/// A timestamp in a table: to the second, still in UTC (JSON keeps RFC 3339 to the millisecond).
fn when(value: &Option<String>) -> String {
    match value {
        Some(t) if t.len() >= 19 => format!("{}Z", t[..19].replacen('T', " ", 1)),
        Some(t) => t.clone(),
        None => "-".to_string(),
    }
}

fn set(value: &bool) -> String {
    display::bool(value, "set", "-")
}

fn yes(value: &bool) -> String {
    display::bool(value, "yes", "no")
}

fn code(value: &Option<i32>) -> String {
    value.map_or_else(|| "-".to_string(), |c| c.to_string())
}

#[derive(Debug, Serialize, Tabled)]
pub struct PageRow {
    #[tabled(rename = "PAGE")]
    pub page_id: String,
    #[tabled(rename = "NAME")]
    pub name: String,
    #[tabled(rename = "RATE/S")]
    pub send_rate_per_second: u32,
    #[tabled(rename = "ACCESS TOKEN", display("set"))]
    pub has_access_token: bool,
    #[tabled(rename = "APP SECRET", display("set"))]
    pub has_app_secret: bool,
    #[tabled(rename = "VERIFY TOKEN", display("set"))]
    pub has_verify_token: bool,
    #[tabled(rename = "CREATED", display("when"))]
    pub create_time: Option<String>,
    #[tabled(rename = "UPDATED", display("when"))]
    pub update_time: Option<String>,
}

impl From<pb::Page> for PageRow {
    fn from(p: pb::Page) -> Self {
        PageRow {
            create_time: time(&p.create_time),
            update_time: time(&p.update_time),
            page_id: p.page_id,
            name: p.name,
            send_rate_per_second: p.send_rate_per_second,
            has_access_token: p.has_access_token,
            has_app_secret: p.has_app_secret,
            has_verify_token: p.has_verify_token,
        }
    }
}

#[derive(Debug, Serialize, Tabled)]
pub struct TopicRow {
    #[tabled(rename = "TOPIC")]
    pub topic: String,
    #[tabled(rename = "ACTIVE")]
    pub active: u64,
    #[tabled(rename = "RESERVED")]
    pub reserved: u64,
    #[tabled(rename = "USED")]
    pub used: u64,
    #[tabled(rename = "EXPIRED")]
    pub expired: u64,
    #[tabled(rename = "REJECTED")]
    pub rejected: u64,
    #[tabled(rename = "EXPIRING ≤30D")]
    pub expiring_soon: u64,
    #[tabled(rename = "REQUESTS SENT")]
    pub requests_sent: u64,
    #[tabled(rename = "SUBSCRIBERS")]
    pub subscribers: u64,
    /// Of the active, the recurring tokens.
    #[tabled(rename = "RECURRING")]
    pub recurring_active: u64,
    #[tabled(rename = "STOPPED")]
    pub stopped: u64,
}

impl From<pb::TopicSummary> for TopicRow {
    fn from(t: pb::TopicSummary) -> Self {
        TopicRow {
            topic: t.topic,
            active: t.active,
            reserved: t.reserved,
            used: t.used,
            expired: t.expired,
            rejected: t.rejected,
            expiring_soon: t.expiring_soon,
            requests_sent: t.requests_sent,
            subscribers: t.subscribers,
            recurring_active: t
                .by_kind
                .iter()
                .filter(|c| c.kind() == pb::TokenKind::Recurring)
                .map(|c| c.active)
                .sum(),
            stopped: t.stopped,
        }
    }
}

#[derive(Debug, Serialize, Tabled)]
pub struct OptInRow {
    #[tabled(rename = "OPT-IN")]
    pub opt_in_id: String,
    #[tabled(skip)]
    pub page_id: String,
    #[tabled(rename = "PSID")]
    pub psid: String,
    #[tabled(rename = "TOPIC")]
    pub topic: String,
    #[tabled(rename = "KIND")]
    pub kind: String,
    #[tabled(rename = "STATE")]
    pub state: String,
    #[tabled(rename = "TOKEN")]
    pub token_fingerprint: String,
    #[tabled(rename = "OPTED IN", display("when"))]
    pub opt_in_time: Option<String>,
    #[tabled(rename = "EXPIRES", display("when"))]
    pub expire_time: Option<String>,
    #[tabled(rename = "USED", display("when"))]
    pub use_time: Option<String>,
    #[tabled(rename = "DELIVERY", display("dash"))]
    pub delivery_id: Option<String>,
}

impl From<pb::OptIn> for OptInRow {
    fn from(o: pb::OptIn) -> Self {
        OptInRow {
            state: short(o.state().as_str_name(), "OPT_IN_STATE_"),
            kind: short(o.kind().as_str_name(), "TOKEN_KIND_"),
            opt_in_time: time(&o.opt_in_time),
            expire_time: time(&o.expire_time),
            use_time: time(&o.use_time),
            delivery_id: nonempty(&o.delivery_id),
            opt_in_id: o.opt_in_id,
            page_id: o.page_id,
            psid: o.psid,
            topic: o.topic,
            token_fingerprint: o.token_fingerprint,
        }
    }
}

/// A story's content, shaped as in the proto: `{"text": …}` or `{"button_template": …}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentOut {
    Text(String),
    ButtonTemplate {
        text: String,
        buttons: Vec<ButtonOut>,
    },
    /// Content otnd did not send (never for a stored story).
    None,
}

#[derive(Debug, Serialize)]
pub struct ButtonOut {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub url: String,
    pub payload: String,
}

impl From<Option<pb::StoryContent>> for ContentOut {
    fn from(content: Option<pb::StoryContent>) -> Self {
        match content.and_then(|c| c.kind) {
            Some(pb::story_content::Kind::Text(text)) => ContentOut::Text(text),
            Some(pb::story_content::Kind::ButtonTemplate(t)) => ContentOut::ButtonTemplate {
                text: t.text,
                buttons: t
                    .buttons
                    .into_iter()
                    .map(|b| ButtonOut {
                        kind: short(b.r#type().as_str_name(), "BUTTON_TYPE_"),
                        title: b.title,
                        url: b.url,
                        payload: b.payload,
                    })
                    .collect(),
            },
            None => ContentOut::None,
        }
    }
}

/// The text, and each button as `[title → what it does]`.
fn content(content: &ContentOut) -> String {
    match content {
        ContentOut::Text(text) => clip(text),
        ContentOut::ButtonTemplate { text, buttons } => {
            let buttons: Vec<String> = buttons
                .iter()
                .map(|b| {
                    let target = if b.url.is_empty() { &b.payload } else { &b.url };
                    format!("[{} → {}]", b.title, target)
                })
                .collect();
            clip(&format!("{text} {}", buttons.join(" ")))
        }
        ContentOut::None => "-".to_string(),
    }
}

#[derive(Debug, Serialize, Tabled)]
pub struct StoryRow {
    #[tabled(rename = "STORY")]
    pub story_id: String,
    #[tabled(rename = "PAGE")]
    pub page_id: String,
    #[tabled(rename = "TOPIC")]
    pub topic: String,
    #[tabled(rename = "CONTENT", display("content"))]
    pub content: ContentOut,
    #[tabled(rename = "WINDOW USERS", display("yes"))]
    pub include_window_users: bool,
    #[tabled(rename = "SEGMENT", display("dash"))]
    pub segment_id: Option<String>,
    #[tabled(rename = "STATE")]
    pub state: String,
    #[tabled(rename = "REVIEWED", display("yes"))]
    pub reviewed: bool,
    #[tabled(rename = "REVIEWER", display("dash"))]
    pub reviewer_psid: Option<String>,
    #[tabled(rename = "REVIEWED AT", display("when"))]
    pub review_time: Option<String>,
    #[tabled(rename = "CREATED", display("when"))]
    pub create_time: Option<String>,
    #[tabled(rename = "UPDATED", display("when"))]
    pub update_time: Option<String>,
}

impl From<pb::Story> for StoryRow {
    fn from(s: pb::Story) -> Self {
        StoryRow {
            state: short(s.state().as_str_name(), "STORY_STATE_"),
            segment_id: nonempty(&s.segment_id),
            reviewer_psid: nonempty(&s.reviewer_psid),
            review_time: time(&s.review_time),
            create_time: time(&s.create_time),
            update_time: time(&s.update_time),
            content: s.content.into(),
            story_id: s.story_id,
            page_id: s.page_id,
            topic: s.topic,
            include_window_users: s.include_window_users,
            reviewed: s.reviewed,
        }
    }
}

#[derive(Debug, Serialize, Tabled)]
pub struct EstimateRow {
    #[tabled(rename = "STORY")]
    pub story_id: String,
    #[tabled(rename = "TOKEN RECIPIENTS")]
    pub token_recipients: u64,
    #[tabled(rename = "WINDOW RECIPIENTS")]
    pub window_recipients: u64,
    #[tabled(rename = "EXCLUDED: EXPIRED")]
    pub excluded_expired: u64,
    #[tabled(rename = "EXCLUDED: SEGMENT")]
    pub excluded_by_segment: u64,
}

#[derive(Debug, Serialize, Tabled)]
pub struct SendRow {
    #[tabled(rename = "SEND")]
    pub send_id: String,
    #[tabled(rename = "STORY")]
    pub story_id: String,
    #[tabled(rename = "PAGE")]
    pub page_id: String,
    #[tabled(rename = "STATE")]
    pub state: String,
    #[tabled(rename = "TOTAL")]
    pub total: u64,
    #[tabled(rename = "PENDING")]
    pub pending: u64,
    #[tabled(rename = "IN FLIGHT")]
    pub in_flight: u64,
    #[tabled(rename = "SENT")]
    pub sent: u64,
    #[tabled(rename = "FAILED")]
    pub failed: u64,
    #[tabled(rename = "SKIPPED")]
    pub skipped: u64,
    #[tabled(rename = "UNKNOWN")]
    pub unknown: u64,
    #[tabled(rename = "RATE/S", format("{:.1}", self.rate_per_second))]
    pub rate_per_second: f64,
    #[tabled(rename = "LAST ERROR", display("clipped"))]
    pub last_error: Option<String>,
    #[tabled(rename = "REQUEST")]
    pub request_id: String,
    /// The start (below) says more to an operator; scripts have both.
    #[tabled(skip)]
    pub create_time: Option<String>,
    #[tabled(rename = "STARTED", display("when"))]
    pub start_time: Option<String>,
    #[tabled(rename = "FINISHED", display("when"))]
    pub finish_time: Option<String>,
}

impl From<pb::Send> for SendRow {
    fn from(s: pb::Send) -> Self {
        let p = s.progress.clone().unwrap_or_default();
        SendRow {
            state: short(s.state().as_str_name(), "SEND_STATE_"),
            create_time: time(&s.create_time),
            start_time: time(&s.start_time),
            finish_time: time(&s.finish_time),
            send_id: s.send_id,
            story_id: s.story_id,
            page_id: s.page_id,
            total: p.total,
            pending: p.pending,
            in_flight: p.in_flight,
            sent: p.sent,
            failed: p.failed,
            skipped: p.skipped,
            unknown: p.unknown,
            rate_per_second: p.rate_per_second,
            last_error: nonempty(&p.last_error),
            request_id: s.request_id,
        }
    }
}

/// A delivery, as listed and as exported (CSV columns and JSON Lines fields alike).
#[derive(Debug, Default, Serialize, Tabled)]
pub struct DeliveryRow {
    #[tabled(rename = "DELIVERY")]
    pub delivery_id: String,
    #[tabled(rename = "PSID")]
    pub psid: String,
    #[tabled(rename = "ROUTE")]
    pub route: String,
    #[tabled(rename = "STATE")]
    pub state: String,
    #[tabled(rename = "ATTEMPTS")]
    pub attempts: u32,
    #[tabled(rename = "MESSAGE", display("dash"))]
    pub message_id: Option<String>,
    #[tabled(rename = "FB CODE", display("code"))]
    pub error_code: Option<i32>,
    #[tabled(rename = "FB SUBCODE", display("code"))]
    pub error_subcode: Option<i32>,
    #[tabled(rename = "FB REASON", display("clipped"))]
    pub error_message: Option<String>,
    #[tabled(rename = "CONFIRMED BY TOKEN", display("yes"))]
    pub confirmed_by_token: bool,
    #[tabled(rename = "UPDATED", display("when"))]
    pub update_time: Option<String>,
}

impl From<pb::Delivery> for DeliveryRow {
    fn from(d: pb::Delivery) -> Self {
        DeliveryRow {
            route: short(d.route().as_str_name(), "ROUTE_"),
            state: short(d.state().as_str_name(), "DELIVERY_STATE_"),
            message_id: nonempty(&d.message_id),
            error_code: (d.error_code != 0).then_some(d.error_code),
            error_subcode: (d.error_subcode != 0).then_some(d.error_subcode),
            error_message: nonempty(&d.error_message),
            update_time: time(&d.update_time),
            delivery_id: d.delivery_id,
            psid: d.psid,
            attempts: d.attempts,
            confirmed_by_token: d.confirmed_by_token,
        }
    }
}
