//! Everything the sandbox knows, and every Graph decision it makes, behind one lock: pages,
//! users and their windows, one-time and recurring tokens, the ledger of accepted messages,
//! counters and the fault dice. Decisions are synchronous and quick; the HTTP layer does the
//! waiting.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque, hash_map::Entry};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::wire::{GraphError, appsecret_proof};

/// The standard messaging window.
pub const WINDOW_MS: i64 = 24 * 60 * 60 * 1000;
/// One-time tokens are valid for a year after the opt-in.
pub const TOKEN_LIFETIME_SECONDS: i64 = 365 * 24 * 60 * 60;
/// One message per recurring subscriber per rolling 48 hours (Meta, since September 2025).
pub const RECURRING_COOLDOWN_SECONDS: u64 = 48 * 60 * 60;
/// At most one recurring opt-in request per title per user per week.
const RECURRING_REQUEST_INTERVAL_MS: i64 = 7 * 24 * 60 * 60 * 1000;

#[derive(Clone, Debug)]
pub struct Page {
    pub access_token: String,
    pub app_secret: String,
    pub webhook_url: Option<String>,
}

#[derive(Default)]
struct User {
    last_interaction_ms: Option<i64>,
    /// Opt-in request payloads (topics) already sent to this user.
    optin_requests: HashSet<String>,
    /// Recurring opt-in requests accepted for this user: title, when last.
    recurring_requests: HashMap<String, i64>,
    /// The recurring tokens this user holds for the page, so that a request can be checked
    /// against them without scanning every token.
    recurring_tokens: Vec<String>,
}

struct Token {
    page_id: String,
    psid: String,
    payload: String,
    expires_at_ms: i64,
    presentations: u32,
    accepted: u32,
}

/// The terms of a recurring subscription, as the opt-in set them.
#[derive(Clone, Debug)]
pub struct RecurringTerms {
    pub title: String,
    pub timezone: String,
    pub user_token_status: String,
    /// `None`: the token never expires (tokens issued since August 2023).
    pub expires_at_ms: Option<i64>,
}

/// A recurring token: reusable until it expires, dead while the user has stopped it.
struct RecurringToken {
    page_id: String,
    psid: String,
    payload: String,
    terms: RecurringTerms,
    stopped: bool,
}

impl RecurringToken {
    fn is_active(&self, now_ms: i64) -> bool {
        !self.stopped && self.terms.expires_at_ms.is_none_or(|at| now_ms < at)
    }
}

/// A recurring subscription as a STOP or RESUME left it, for the webhook that tells of it.
pub struct RecurringSubscription {
    pub psid: String,
    pub payload: String,
    pub terms: RecurringTerms,
}

/// Why a STOP or RESUME names no recurring subscription of the page.
pub enum RecurringStatusError {
    /// The token is the page's, but a one-time token.
    OneTime,
    Unknown,
}

/// The kind of token a message was sent with.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    OneTime,
    Recurring,
}

/// How a send named its recipient, once its rules passed.
enum SentWith {
    Id,
    OneTime(String),
    Recurring(String),
}

/// One message the sandbox accepted: the judge's ledger.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AcceptedMessage {
    pub page_id: String,
    pub psid: String,
    /// The token (one-time or recurring) the message was sent with, if any.
    pub token: Option<String>,
    /// `None` for a standard send to `recipient.id`.
    #[serde(default)]
    pub token_kind: Option<TokenKind>,
    pub messaging_type: Option<String>,
    pub message: Value,
    pub message_id: String,
    pub time_ms: i64,
}

/// Fault knobs: set whole by `POST /__sandbox/faults`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every Graph answer.
    pub latency_ms: u64,
    /// Mean of an exponential long tail added on top of `latency_ms`.
    pub latency_tail_ms: u64,
    /// Share of sends answered 500 (code 1) or 503 (code 2), not accepted.
    pub error_rate: f64,
    /// Share of sends held past the client's timeout (`timeout_hold_ms`), not accepted.
    pub timeout_rate: f64,
    pub timeout_hold_ms: u64,
    /// Share of sends whose connection is dropped without an answer, not accepted.
    pub reset_rate: f64,
    /// Share of sends accepted and recorded, then answered with a 500 or a dropped connection.
    pub accept_then_fail_rate: f64,
    /// Share of sends answered 613 or 80006 (throttled), not accepted.
    pub throttle_rate: f64,
    /// Minutes the throttled answers' usage header asks the caller to wait.
    pub throttle_regain_minutes: u32,
    /// Pages answered 10/1893063 (temporarily restricted).
    pub restricted_pages: Vec<String>,
    /// When false, a used token is accepted again, so that duplicates become visible.
    pub enforce_single_use: bool,
    /// Calls per page per wall-clock second before answering 613; `None`: no limit.
    pub rate_limit_per_page: Option<u32>,
    /// Every page's business-use-case capacity: its calls in any rolling second. The call that
    /// would go past it is answered 80006 and the page is refused for `capacity_block_ms`; every
    /// answer reports the share used in `X-Business-Use-Case-Usage`. `None`: no such limit. A
    /// client is not told this figure: it learns it from the usage header.
    pub page_capacity_per_second: Option<u32>,
    /// How long a page that reached its capacity stays refused; the usage header's
    /// `estimated_time_to_regain_access` gives it in minutes, rounded up.
    pub capacity_block_ms: u64,
    /// The app's calls in any rolling second, all pages together, before calls are answered
    /// code 4 (the app's own limit), reported in `X-App-Usage`. `None`: no limit.
    pub app_capacity_per_second: Option<u32>,
    /// Seeds the fault dice, for reproducible runs.
    pub seed: Option<u64>,
    /// The least time between two recurring messages to one subscriber (page, psid).
    pub recurring_cooldown_seconds: u64,
    /// When false, a recurring message inside the gap is accepted (and counted in
    /// `recipients_messaged_twice_within_gap`), so that a client ignoring the rule is caught.
    pub enforce_recurring_gap: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency_ms: 0,
            latency_tail_ms: 0,
            error_rate: 0.0,
            timeout_rate: 0.0,
            timeout_hold_ms: 60_000,
            reset_rate: 0.0,
            accept_then_fail_rate: 0.0,
            throttle_rate: 0.0,
            throttle_regain_minutes: 0,
            restricted_pages: Vec::new(),
            enforce_single_use: true,
            rate_limit_per_page: None,
            page_capacity_per_second: None,
            capacity_block_ms: 60_000,
            app_capacity_per_second: None,
            seed: None,
            recurring_cooldown_seconds: RECURRING_COOLDOWN_SECONDS,
            enforce_recurring_gap: true,
        }
    }
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("error_rate", self.error_rate),
            ("timeout_rate", self.timeout_rate),
            ("reset_rate", self.reset_rate),
            ("accept_then_fail_rate", self.accept_then_fail_rate),
            ("throttle_rate", self.throttle_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be from 0 to 1, got {rate}"));
            }
        }
        let total = self.error_rate
            + self.timeout_rate
            + self.reset_rate
            + self.accept_then_fail_rate
            + self.throttle_rate;
        if total > 1.0 + f64::EPSILON {
            return Err(format!("the fault rates add up to {total}, more than 1"));
        }
        for (name, limit) in [
            ("rate_limit_per_page", self.rate_limit_per_page),
            ("page_capacity_per_second", self.page_capacity_per_second),
            ("app_capacity_per_second", self.app_capacity_per_second),
        ] {
            if limit == Some(0) {
                return Err(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Counters of `GET /__sandbox/stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub rate_limited: u64,
    /// Of `rate_limited`: refused because the page was at (or blocked after) its capacity.
    pub capacity_refused: u64,
    /// Of `rate_limited`: refused with code 4, the app at its capacity.
    pub app_capacity_refused: u64,
    pub token_presentations: u64,
    pub tokens_presented_more_than_once: u64,
    pub tokens_accepted_more_than_once: u64,
    pub recipients_with_duplicate_content: u64,
    /// Sends that presented a `notification_messages_token`, whatever their answer.
    pub recurring_presentations: u64,
    /// Recurring messages accepted (accepted-then-failed included).
    pub recurring_accepted: u64,
    /// Distinct (page, psid) that were sent two recurring messages less than
    /// `recurring_cooldown_seconds` apart (possible only with `enforce_recurring_gap` off).
    pub recipients_messaged_twice_within_gap: u64,
    /// Dice rolls that injected a fault, by kind.
    pub faults_injected: BTreeMap<String, u64>,
    pub webhook_posts_delivered: u64,
    pub webhook_attempts_failed: u64,
    pub webhook_posts_abandoned: u64,
}

/// A send as it arrived, transport details removed.
#[derive(Debug, Default)]
pub struct SendRequest {
    pub access_token: Option<String>,
    pub appsecret_proof: Option<String>,
    /// `{page-id}` of `/{page-id}/messages`; `None` for `/me/messages`.
    pub path_page_id: Option<String>,
    pub recipient: Option<Value>,
    pub message: Option<Value>,
    pub messaging_type: Option<String>,
}

/// What the HTTP layer must do with a send.
#[derive(Debug)]
pub enum Decision {
    Accepted {
        recipient_id: String,
        message_id: String,
        usage: Usage,
    },
    Refused {
        error: GraphError,
        usage: Usage,
    },
    /// Hold the request this long, then answer 504 (the caller has usually gone).
    Hang(u64),
    /// Drop the connection without an answer.
    Reset,
    /// Recorded as accepted; answer a 500, or drop the connection.
    AcceptedThenFail {
        drop_connection: bool,
    },
}

/// The figures behind the usage headers.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub page_id: Option<String>,
    /// Percent of the page's per-second budget used.
    pub call_count: u32,
    pub regain_minutes: u32,
    /// Percent of the app's per-second budget used.
    pub app_call_count: u32,
}

/// Calls in the last rolling second, by the sandbox's clock.
#[derive(Default)]
struct RollingSecond {
    calls: VecDeque<i64>,
}

impl RollingSecond {
    fn used(&mut self, now_ms: i64) -> u32 {
        while self.calls.front().is_some_and(|t| *t <= now_ms - 1000) {
            self.calls.pop_front();
        }
        u32::try_from(self.calls.len()).unwrap_or(u32::MAX)
    }
}

/// A page's business-use-case budget: its rolling second, and until when it is refused.
#[derive(Default)]
struct Capacity {
    second: RollingSecond,
    blocked_until: Option<i64>,
}

fn percent(used: u32, limit: u32) -> u32 {
    (used.saturating_mul(100) / limit.max(1)).min(100)
}

enum Fault {
    Error,
    Timeout,
    Reset,
    AcceptThenFail,
    Throttle,
}

pub struct World {
    pages: HashMap<String, Page>,
    page_by_token: HashMap<String, String>,
    users: HashMap<(String, String), User>,
    tokens: HashMap<String, Token>,
    recurring_tokens: HashMap<String, RecurringToken>,
    /// When each recurring subscriber (page, psid) was last sent a recurring message.
    last_recurring_message: HashMap<(String, String), i64>,
    recipients_messaged_within_gap: HashSet<(String, String)>,
    messages: Vec<AcceptedMessage>,
    /// How often each (page, psid, message body) was accepted.
    deliveries_of_content: HashMap<(String, String, String), u32>,
    recipients_with_duplicates: HashSet<(String, String)>,
    /// Calls per page in the current wall-clock second.
    rate_windows: HashMap<String, (i64, u32)>,
    capacities: HashMap<String, Capacity>,
    app_second: RollingSecond,
    stats: Stats,
    faults: Faults,
    /// The faults the sandbox started with (its flags); `reset` returns to them.
    initial_faults: Faults,
    rng: StdRng,
    next_message: u64,
}

impl World {
    /// A world with these faults (already validated).
    pub fn new(initial_faults: Faults) -> Self {
        let rng = match initial_faults.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        World {
            pages: HashMap::new(),
            page_by_token: HashMap::new(),
            users: HashMap::new(),
            tokens: HashMap::new(),
            recurring_tokens: HashMap::new(),
            last_recurring_message: HashMap::new(),
            recipients_messaged_within_gap: HashSet::new(),
            messages: Vec::new(),
            deliveries_of_content: HashMap::new(),
            recipients_with_duplicates: HashSet::new(),
            rate_windows: HashMap::new(),
            capacities: HashMap::new(),
            app_second: RollingSecond::default(),
            stats: Stats::default(),
            faults: initial_faults.clone(),
            initial_faults,
            rng,
            next_message: 0,
        }
    }

    pub fn reset(&mut self) {
        *self = World::new(self.initial_faults.clone());
    }

    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    pub fn set_faults(&mut self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        if let Some(seed) = faults.seed {
            self.rng = StdRng::seed_from_u64(seed);
        }
        self.faults = faults;
        Ok(())
    }

    pub fn latency_ms(&mut self) -> u64 {
        let mut latency = self.faults.latency_ms;
        if self.faults.latency_tail_ms > 0 {
            // Exponential tail by inversion: most answers add little, a few add a lot.
            let uniform: f64 = self.rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
            latency += (-uniform.ln() * self.faults.latency_tail_ms as f64) as u64;
        }
        latency
    }

    pub fn add_page(&mut self, page_id: String, page: Page) {
        if let Some(old) = self.pages.get(&page_id) {
            self.page_by_token.remove(&old.access_token);
        }
        self.page_by_token
            .insert(page.access_token.clone(), page_id.clone());
        self.pages.insert(page_id, page);
    }

    pub fn page(&self, page_id: &str) -> Option<&Page> {
        self.pages.get(page_id)
    }

    /// The user writes to the page (or opts in): the window opens for 24 hours.
    pub fn record_interaction(&mut self, page_id: &str, psid: &str, now_ms: i64) {
        let user = self
            .users
            .entry((page_id.to_string(), psid.to_string()))
            .or_default();
        user.last_interaction_ms = Some(user.last_interaction_ms.map_or(now_ms, |t| t.max(now_ms)));
    }

    /// A user opts in on `payload`: a new one-time token for the page.
    pub fn issue_token(
        &mut self,
        page_id: &str,
        psid: &str,
        payload: &str,
        lifetime_seconds: i64,
        now_ms: i64,
    ) -> String {
        let token = loop {
            let candidate = format!("otn-{}", random_alphanumeric(&mut self.rng, 40));
            if !self.tokens.contains_key(&candidate) {
                break candidate;
            }
        };
        self.tokens.insert(
            token.clone(),
            Token {
                page_id: page_id.to_string(),
                psid: psid.to_string(),
                payload: payload.to_string(),
                expires_at_ms: now_ms + lifetime_seconds * 1000,
                presentations: 0,
                accepted: 0,
            },
        );
        self.record_interaction(page_id, psid, now_ms);
        token
    }

    /// A user opts in to recurring notifications on `payload`: a new reusable token.
    pub fn issue_recurring_token(
        &mut self,
        page_id: &str,
        psid: &str,
        payload: &str,
        terms: RecurringTerms,
        now_ms: i64,
    ) -> String {
        let token = loop {
            let candidate = format!("rn-{}", random_alphanumeric(&mut self.rng, 40));
            if !self.recurring_tokens.contains_key(&candidate) {
                break candidate;
            }
        };
        self.recurring_tokens.insert(
            token.clone(),
            RecurringToken {
                page_id: page_id.to_string(),
                psid: psid.to_string(),
                payload: payload.to_string(),
                terms,
                stopped: false,
            },
        );
        self.record_interaction(page_id, psid, now_ms);
        self.users
            .get_mut(&(page_id.to_string(), psid.to_string()))
            .expect("record_interaction made the user")
            .recurring_tokens
            .push(token.clone());
        token
    }

    /// The user stops (or resumes) the page's recurring subscription `token`.
    pub fn set_recurring_stopped(
        &mut self,
        page_id: &str,
        token: &str,
        stopped: bool,
    ) -> Result<RecurringSubscription, RecurringStatusError> {
        match self.recurring_tokens.get_mut(token) {
            Some(entry) if entry.page_id == page_id => {
                entry.stopped = stopped;
                Ok(RecurringSubscription {
                    psid: entry.psid.clone(),
                    payload: entry.payload.clone(),
                    terms: entry.terms.clone(),
                })
            }
            _ if self.tokens.get(token).is_some_and(|t| t.page_id == page_id) => {
                Err(RecurringStatusError::OneTime)
            }
            _ => Err(RecurringStatusError::Unknown),
        }
    }

    pub fn token_payload(&self, token: &str) -> Option<&str> {
        self.tokens.get(token).map(|t| t.payload.as_str())
    }

    pub fn messages(&self, page_id: Option<&str>, psid: Option<&str>) -> Vec<AcceptedMessage> {
        self.messages
            .iter()
            .filter(|m| page_id.is_none_or(|p| m.page_id == p))
            .filter(|m| psid.is_none_or(|p| m.psid == p))
            .cloned()
            .collect()
    }

    pub fn count_webhook(&mut self, delivered: bool, failed_attempts: u64) {
        self.stats.webhook_attempts_failed += failed_attempts;
        if delivered {
            self.stats.webhook_posts_delivered += 1;
        } else {
            self.stats.webhook_posts_abandoned += 1;
        }
    }

    /// The app's usage now, for answers that are not one call's (a batch request's own headers).
    pub fn app_usage(&mut self, now_ms: i64) -> Usage {
        let app_call_count = self
            .faults
            .app_capacity_per_second
            .map_or(0, |limit| percent(self.app_second.used(now_ms), limit));
        Usage {
            app_call_count,
            ..Usage::default()
        }
    }

    fn refuse(&mut self, error: GraphError, usage: Usage) -> Decision {
        self.stats.rejected += 1;
        *self
            .stats
            .rejected_by_reason
            .entry(error.reason.to_string())
            .or_default() += 1;
        Decision::Refused { error, usage }
    }

    fn roll_fault(&mut self) -> Option<Fault> {
        let f = &self.faults;
        let roll: f64 = self.rng.r#gen();
        let mut edge = 0.0;
        for (rate, fault) in [
            (f.error_rate, Fault::Error),
            (f.timeout_rate, Fault::Timeout),
            (f.reset_rate, Fault::Reset),
            (f.accept_then_fail_rate, Fault::AcceptThenFail),
            (f.throttle_rate, Fault::Throttle),
        ] {
            edge += rate;
            if roll < edge {
                return Some(fault);
            }
        }
        None
    }

    fn count_fault(&mut self, kind: &str) {
        *self
            .stats
            .faults_injected
            .entry(kind.to_string())
            .or_default() += 1;
    }

    /// Decides one send, exactly as Graph would: authentication, page restrictions, the rate
    /// limit, injected faults, message validation, then the recipient's rules.
    pub fn send(&mut self, request: SendRequest, now_ms: i64) -> Decision {
        let mut usage = Usage::default();
        let page_id = match self.authenticate(&request) {
            Ok(page_id) => page_id,
            Err(error) => return self.refuse(error, usage),
        };
        usage.page_id = Some(page_id.clone());

        if self.faults.restricted_pages.contains(&page_id) {
            return self.refuse(GraphError::page_restricted(), usage);
        }

        if let Some(limit) = self.faults.app_capacity_per_second {
            let used = self.app_second.used(now_ms);
            if used >= limit {
                self.stats.rate_limited += 1;
                self.stats.app_capacity_refused += 1;
                usage.app_call_count = 100;
                return self.refuse(GraphError::app_request_limit(), usage);
            }
            self.app_second.calls.push_back(now_ms);
            usage.app_call_count = percent(used + 1, limit);
        }

        if let Some(limit) = self.faults.page_capacity_per_second {
            let block_ms = self.faults.capacity_block_ms;
            let capacity = self.capacities.entry(page_id.clone()).or_default();
            let blocked = capacity.blocked_until.filter(|until| *until > now_ms);
            let used = capacity.second.used(now_ms);
            if blocked.is_some() || used >= limit {
                // At 100%: this call is refused, and so is every call until the page regains
                // access.
                let until = blocked.unwrap_or(now_ms + i64::try_from(block_ms).unwrap_or(0));
                capacity.blocked_until = Some(until);
                usage.call_count = 100;
                usage.regain_minutes =
                    u32::try_from((until - now_ms).max(0).unsigned_abs().div_ceil(60_000))
                        .unwrap_or(u32::MAX);
                self.stats.rate_limited += 1;
                self.stats.capacity_refused += 1;
                return self.refuse(GraphError::too_many_messages(), usage);
            }
            capacity.second.calls.push_back(now_ms);
            usage.call_count = percent(used + 1, limit);
        }

        if let Some(limit) = self.faults.rate_limit_per_page {
            let second = now_ms.div_euclid(1000);
            let window = self
                .rate_windows
                .entry(page_id.clone())
                .or_insert((second, 0));
            if window.0 != second {
                *window = (second, 0);
            }
            window.1 += 1;
            usage.call_count = usage.call_count.max(percent(window.1, limit));
            if window.1 > limit {
                self.stats.rate_limited += 1;
                usage.regain_minutes = 0;
                return self.refuse(GraphError::rate_limited(), usage);
            }
        }

        let fault = self.roll_fault();
        match fault {
            Some(Fault::Error) => {
                self.count_fault("error");
                let error = if self.rng.gen_bool(0.5) {
                    GraphError::unknown_error()
                } else {
                    GraphError::service_unavailable()
                };
                return self.refuse(error, usage);
            }
            Some(Fault::Timeout) => {
                self.count_fault("timeout");
                return Decision::Hang(self.faults.timeout_hold_ms);
            }
            Some(Fault::Reset) => {
                self.count_fault("reset");
                return Decision::Reset;
            }
            Some(Fault::Throttle) => {
                self.count_fault("throttle");
                self.stats.rate_limited += 1;
                usage.call_count = 100;
                usage.regain_minutes = self.faults.throttle_regain_minutes;
                let error = if self.rng.gen_bool(0.5) {
                    GraphError::rate_limited()
                } else {
                    GraphError::too_many_messages()
                };
                return self.refuse(error, usage);
            }
            Some(Fault::AcceptThenFail) | None => {}
        }

        let message = match request.message.as_ref() {
            Some(message) => message,
            None => return self.refuse(GraphError::missing_param("message"), usage),
        };
        let kind = match super::wire::validate_message(message) {
            Ok(kind) => kind,
            Err(error) => return self.refuse(error, usage),
        };

        let recipient = request.recipient.as_ref().and_then(Value::as_object);
        let token_field = |name: &str| recipient.and_then(|r| r.get(name)).and_then(Value::as_str);
        let one_time = token_field("one_time_notif_token");
        let recurring = token_field("notification_messages_token");
        let psid = recipient.and_then(|r| r.get("id")).and_then(json_string);

        let (psid, sent_with) = match (one_time, recurring, psid) {
            (Some(token), None, None) => {
                if kind.is_optin_request() {
                    return self.refuse(GraphError::optin_request_needs_id(), usage);
                }
                match self.check_token(&page_id, token, now_ms) {
                    Ok(psid) => (psid, SentWith::OneTime(token.to_string())),
                    Err(error) => return self.refuse(error, usage),
                }
            }
            (None, Some(token), None) => {
                if kind.is_optin_request() {
                    return self.refuse(GraphError::optin_request_needs_id(), usage);
                }
                match self.check_recurring_token(&page_id, token, now_ms) {
                    Ok(psid) => (psid, SentWith::Recurring(token.to_string())),
                    Err(error) => return self.refuse(error, usage),
                }
            }
            (None, None, Some(psid)) => {
                if let Err(error) = self.check_window(&page_id, &psid, now_ms) {
                    return self.refuse(error, usage);
                }
                let checked = match &kind {
                    super::wire::MessageKind::OptInRequest { payload } => {
                        let user = self
                            .users
                            .get_mut(&(page_id.clone(), psid.clone()))
                            .expect("a user inside the window exists");
                        if user.optin_requests.insert(payload.clone()) {
                            Ok(())
                        } else {
                            Err(GraphError::repeated_optin_request())
                        }
                    }
                    super::wire::MessageKind::RecurringOptInRequest { title, payload } => {
                        self.check_recurring_request(&page_id, &psid, title, payload, now_ms)
                    }
                    _ => Ok(()),
                };
                if let Err(error) = checked {
                    return self.refuse(error, usage);
                }
                (psid, SentWith::Id)
            }
            _ => return self.refuse(GraphError::bad_recipient(), usage),
        };

        let message_id = self.record(&page_id, &psid, sent_with, &request, now_ms);
        if let Some(Fault::AcceptThenFail) = fault {
            self.count_fault("accept_then_fail");
            return Decision::AcceptedThenFail {
                drop_connection: self.rng.gen_bool(0.5),
            };
        }
        Decision::Accepted {
            recipient_id: psid,
            message_id,
            usage,
        }
    }

    fn authenticate(&self, request: &SendRequest) -> Result<String, GraphError> {
        let access_token = request
            .access_token
            .as_deref()
            .ok_or_else(GraphError::access_token_required)?;
        let page_id = self
            .page_by_token
            .get(access_token)
            .ok_or_else(GraphError::invalid_access_token)?;
        let page = &self.pages[page_id];
        if let Some(proof) = &request.appsecret_proof
            && !super::wire::constant_time_eq(
                proof.as_bytes(),
                appsecret_proof(&page.app_secret, access_token).as_bytes(),
            )
        {
            return Err(GraphError::invalid_appsecret_proof());
        }
        if let Some(path_page) = &request.path_page_id
            && path_page != page_id
        {
            return Err(GraphError::page_mismatch());
        }
        Ok(page_id.clone())
    }

    /// A token works once, before it expires, for its own page. Every presentation counts.
    fn check_token(
        &mut self,
        page_id: &str,
        token: &str,
        now_ms: i64,
    ) -> Result<String, GraphError> {
        self.stats.token_presentations += 1;
        let enforce_single_use = self.faults.enforce_single_use;
        let Some(entry) = self.tokens.get_mut(token) else {
            return Err(GraphError::token_spent("token_unknown"));
        };
        entry.presentations += 1;
        if entry.presentations == 2 {
            self.stats.tokens_presented_more_than_once += 1;
        }
        if entry.page_id != page_id {
            return Err(GraphError::token_spent("token_foreign"));
        }
        if now_ms >= entry.expires_at_ms {
            return Err(GraphError::token_spent("token_expired"));
        }
        if entry.accepted > 0 && enforce_single_use {
            return Err(GraphError::token_spent("token_used"));
        }
        Ok(entry.psid.clone())
    }

    fn recurring_cooldown_ms(&self) -> i64 {
        i64::try_from(self.faults.recurring_cooldown_seconds.saturating_mul(1000))
            .unwrap_or(i64::MAX)
    }

    /// A recurring token works for its own page, before it expires, while the user has not
    /// stopped it, and not inside its subscriber's minimum gap. Every presentation counts.
    fn check_recurring_token(
        &mut self,
        page_id: &str,
        token: &str,
        now_ms: i64,
    ) -> Result<String, GraphError> {
        self.stats.recurring_presentations += 1;
        let cooldown_ms = self.recurring_cooldown_ms();
        let Some(entry) = self.recurring_tokens.get(token) else {
            return Err(GraphError::recurring_token_invalid(
                "recurring_token_unknown",
            ));
        };
        if entry.page_id != page_id {
            return Err(GraphError::recurring_token_invalid(
                "recurring_token_foreign",
            ));
        }
        if entry.terms.expires_at_ms.is_some_and(|at| now_ms >= at) {
            return Err(GraphError::recurring_token_invalid(
                "recurring_token_expired",
            ));
        }
        if entry.stopped {
            return Err(GraphError::recurring_stopped());
        }
        let subscriber = (page_id.to_string(), entry.psid.clone());
        if self.faults.enforce_recurring_gap
            && let Some(last) = self.last_recurring_message.get(&subscriber)
            && now_ms - last < cooldown_ms
        {
            return Err(GraphError::recurring_gap());
        }
        Ok(subscriber.1)
    }

    /// A recurring opt-in request: not for a topic the user already holds a live token for, and
    /// one per title per user per week. Marks the title as asked when it passes.
    fn check_recurring_request(
        &mut self,
        page_id: &str,
        psid: &str,
        title: &str,
        payload: &str,
        now_ms: i64,
    ) -> Result<(), GraphError> {
        let user = self
            .users
            .get_mut(&(page_id.to_string(), psid.to_string()))
            .expect("a user inside the window exists");
        let holds_topic = user.recurring_tokens.iter().any(|token| {
            self.recurring_tokens
                .get(token)
                .is_some_and(|t| t.payload == payload && t.is_active(now_ms))
        });
        if holds_topic {
            return Err(GraphError::repeated_optin_request());
        }
        if user
            .recurring_requests
            .get(title)
            .is_some_and(|at| now_ms - at < RECURRING_REQUEST_INTERVAL_MS)
        {
            return Err(GraphError::too_many_recurring_requests());
        }
        user.recurring_requests.insert(title.to_string(), now_ms);
        Ok(())
    }

    fn check_window(&self, page_id: &str, psid: &str, now_ms: i64) -> Result<(), GraphError> {
        let user = self
            .users
            .get(&(page_id.to_string(), psid.to_string()))
            .ok_or_else(GraphError::no_matching_user)?;
        match user.last_interaction_ms {
            Some(at) if now_ms - at < WINDOW_MS => Ok(()),
            _ => Err(GraphError::outside_window()),
        }
    }

    fn record(
        &mut self,
        page_id: &str,
        psid: &str,
        sent_with: SentWith,
        request: &SendRequest,
        now_ms: i64,
    ) -> String {
        self.next_message += 1;
        let message_id = format!(
            "m_{}{:010}",
            random_alphanumeric(&mut self.rng, 22),
            self.next_message
        );
        let (token, token_kind) = match sent_with {
            SentWith::Id => (None, None),
            SentWith::OneTime(token) => {
                let entry = self.tokens.get_mut(&token).expect("a checked token exists");
                entry.accepted += 1;
                if entry.accepted == 2 {
                    self.stats.tokens_accepted_more_than_once += 1;
                }
                (Some(token), Some(TokenKind::OneTime))
            }
            SentWith::Recurring(token) => {
                self.stats.recurring_accepted += 1;
                let cooldown_ms = self.recurring_cooldown_ms();
                let subscriber = (page_id.to_string(), psid.to_string());
                let previous = self
                    .last_recurring_message
                    .insert(subscriber.clone(), now_ms);
                if previous.is_some_and(|last| now_ms - last < cooldown_ms)
                    && self.recipients_messaged_within_gap.insert(subscriber)
                {
                    self.stats.recipients_messaged_twice_within_gap += 1;
                }
                (Some(token), Some(TokenKind::Recurring))
            }
        };
        let message = request.message.clone().unwrap_or(Value::Null);
        let body = message.to_string();
        let seen =
            match self
                .deliveries_of_content
                .entry((page_id.to_string(), psid.to_string(), body))
            {
                Entry::Occupied(mut e) => {
                    *e.get_mut() += 1;
                    *e.get()
                }
                Entry::Vacant(e) => *e.insert(1),
            };
        if seen == 2
            && self
                .recipients_with_duplicates
                .insert((page_id.to_string(), psid.to_string()))
        {
            self.stats.recipients_with_duplicate_content += 1;
        }
        self.stats.accepted += 1;
        self.messages.push(AcceptedMessage {
            page_id: page_id.to_string(),
            psid: psid.to_string(),
            token,
            token_kind,
            messaging_type: request.messaging_type.clone(),
            message,
            message_id: message_id.clone(),
            time_ms: now_ms,
        });
        message_id
    }

    /// The answer body of an accepted send.
    pub fn accepted_body(recipient_id: &str, message_id: &str) -> Value {
        json!({ "recipient_id": recipient_id, "message_id": message_id })
    }
}

/// PSIDs arrive as strings, and sometimes as numbers.
fn json_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn random_alphanumeric(rng: &mut StdRng, len: usize) -> String {
    rng.sample_iter(&rand::distributions::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}
