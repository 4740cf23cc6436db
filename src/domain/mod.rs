//! Parsed types, built once at the API edge and trusted everywhere else. Parsing reports every
//! broken rule at once, each naming the field path and the rule.

mod audience;
mod lifecycle;
mod optin;
mod page;
mod send;
mod story;

pub use audience::{
    EventKind, IncomingEvent, OPT_IN_LIFETIME_MS, OptInToken, Psid, RECURRING_TITLE_MAX_CHARS,
    RecurringTerms, SegmentRule, SubscriptionChange, Tag, Topic, WINDOW_MS, fingerprint,
    parse_tags, recurring_text, recurring_timezone,
};
pub use lifecycle::IllegalTransition;
pub use optin::{NEVER_EXPIRES_MS, OptInEvent, OptInState, TokenKind};
pub use page::{NewPage, PageChanges, PageCredentials, PageId, PageName, PageSecret, SendRate};
pub use send::{DeliveryEvent, DeliveryState, MIN_TOKEN_LIFE_MS, Route, SendEvent, SendState};
pub use story::{Button, ButtonInput, ButtonKind, ContentInput, StoryContent, content_hash};

/// One broken rule: the field path (as the client spelled it, e.g. `send_rate_per_second`) and
/// what the rule is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Every rule a request broke.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.summary())]
pub struct Violations(pub Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn single(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut violations = Self::new();
        violations.add(field, description);
        violations
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Keeps a parsed value, or records why it did not parse.
    pub fn check<T>(&mut self, field: &str, parsed: Result<T, String>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(description) => {
                self.add(field, description);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was broken; the value is only read then.
    pub fn finish<T>(self, value: impl FnOnce() -> Option<T>) -> Result<T, Violations> {
        if self.is_empty() {
            Ok(value().expect("every field parsed when there are no violations"))
        } else {
            Err(self)
        }
    }

    pub fn summary(&self) -> String {
        self.0
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Characters as Facebook counts them (Unicode scalar values), not bytes.
pub fn char_len(s: &str) -> usize {
    s.chars().count()
}
