//! Users, topics, tokens and tags, as parsed at the edge.

use std::{collections::BTreeSet, fmt};

use sha2::{Digest, Sha256};

use super::{Violations, char_len};

/// A one-time token is usable for a year after the opt-in. Counted as 365 days, the shorter
/// reading of "a year", so otnd never presents a token Facebook may already consider expired.
pub const OPT_IN_LIFETIME_MS: i64 = 365 * 24 * 60 * 60 * 1000;
/// The standard messaging window after a user's last interaction.
pub const WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

const PSID_MAX_CHARS: usize = 128;
/// Facebook's limit on a template payload, which carries the topic back.
const TOPIC_MAX_CHARS: usize = 1000;
const TOKEN_MAX_CHARS: usize = 2048;
const TAG_MAX_CHARS: usize = 64;
/// The most tags a segment rule names (all_tags, any_tags and none_tags together): a rule is
/// evaluated for every recipient of every step of a send.
pub const MAX_TAGS_PER_RULE: usize = 50;

/// A page-scoped user id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Psid(String);

impl Psid {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("is required".into());
        }
        if char_len(raw) > PSID_MAX_CHARS {
            return Err(format!("must be at most {PSID_MAX_CHARS} characters"));
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain whitespace or control characters".into());
        }
        Ok(Psid(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Psid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The exact string an opt-in is for: spelling, case, punctuation and spaces all count, so it is
/// stored as given, never trimmed or folded.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

impl Topic {
    pub fn parse(raw: &str) -> Result<Self, String> {
        Self::parse_within(raw, TOPIC_MAX_CHARS)
    }

    /// With a tighter limit than Facebook's payload limit (opt-in requests allow 200).
    pub fn parse_within(raw: &str, max_chars: usize) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("is required".into());
        }
        let len = char_len(raw);
        if len > max_chars {
            return Err(format!("must be at most {max_chars} characters, got {len}"));
        }
        // PostgreSQL's text cannot hold it (SQLite's can): refused on both, alike.
        if raw.contains('\0') {
            return Err("must not contain a NUL character".into());
        }
        Ok(Topic(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A one-time notification token as Facebook issued it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OptInToken(String);

impl fmt::Debug for OptInToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OptInToken({})", self.fingerprint())
    }
}

impl OptInToken {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("is required".into());
        }
        if char_len(raw) > TOKEN_MAX_CHARS {
            return Err(format!("must be at most {TOKEN_MAX_CHARS} characters"));
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain whitespace or control characters".into());
        }
        Ok(OptInToken(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What support sees instead of the token: the start of its SHA-256, which anyone holding
    /// the token can compute to find the opt-in.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.0)
    }
}

pub fn fingerprint(token: &str) -> String {
    hex::encode(&Sha256::digest(token.as_bytes())[..6])
}

/// A subscriber tag (case-sensitive, 1..64 characters, no surrounding whitespace).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("must not be empty".into());
        }
        let len = char_len(raw);
        if len > TAG_MAX_CHARS {
            return Err(format!(
                "must be at most {TAG_MAX_CHARS} characters, got {len}"
            ));
        }
        if raw.trim() != raw || raw.chars().any(char::is_control) {
            return Err("must not have surrounding whitespace or control characters".into());
        }
        Ok(Tag(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Parses every tag of a list, naming `field[i]` for each bad one.
pub fn parse_tags(field: &str, raw: &[String], violations: &mut Violations) -> BTreeSet<Tag> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, tag)| violations.check(&format!("{field}[{i}]"), Tag::parse(tag)))
        .collect()
}

/// Who a segment holds: every non-empty condition must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentRule {
    pub all_tags: BTreeSet<String>,
    pub any_tags: BTreeSet<String>,
    pub none_tags: BTreeSet<String>,
}

impl SegmentRule {
    /// `field` is the rule's path in the request (e.g. `rule`).
    pub fn parse(
        field: &str,
        all: &[String],
        any: &[String],
        none: &[String],
    ) -> Result<Self, Violations> {
        let mut v = Violations::new();
        let named = all.len() + any.len() + none.len();
        if named > MAX_TAGS_PER_RULE {
            // Refused before any tag is read: the work a request costs is bounded first.
            v.add(
                field,
                format!(
                    "names at most {MAX_TAGS_PER_RULE} tags (all_tags, any_tags and none_tags \
                     together), got {named}"
                ),
            );
            return Err(v);
        }
        let all = parse_tags(&format!("{field}.all_tags"), all, &mut v);
        let any = parse_tags(&format!("{field}.any_tags"), any, &mut v);
        let none = parse_tags(&format!("{field}.none_tags"), none, &mut v);
        if all.is_empty() && any.is_empty() && none.is_empty() && v.is_empty() {
            v.add(
                field,
                "needs at least one tag in all_tags, any_tags or none_tags",
            );
        }
        for tag in none.iter().filter(|t| all.contains(t) || any.contains(t)) {
            v.add(
                format!("{field}.none_tags"),
                format!(
                    "'{}' is also required by all_tags or any_tags, so no subscriber could match",
                    tag.as_str()
                ),
            );
        }
        let names = |tags: BTreeSet<Tag>| tags.into_iter().map(|t| t.0).collect();
        v.finish(|| {
            Some(SegmentRule {
                all_tags: names(all),
                any_tags: names(any),
                none_tags: names(none),
            })
        })
    }
}

/// One event from Facebook (or a gateway) about one user of a page: what the webhook parser and
/// RecordOptIn give, and what the store ingests.
#[derive(Clone, Debug)]
pub struct IncomingEvent {
    pub psid: Psid,
    pub at_ms: i64,
    pub kind: EventKind,
}

#[derive(Clone, Debug)]
pub enum EventKind {
    /// An opt-in: a one-time notification token, or (with `recurring`) a recurring one. A
    /// recurring token that comes with a STOP or RESUME is the user's choice about a
    /// subscription they have, not a new opt-in (though a token otnd has not seen is kept, in
    /// the state the choice leaves it).
    OptIn {
        topic: Topic,
        token: OptInToken,
        recurring: Option<RecurringTerms>,
    },
    /// A STOP or RESUME without a token: every recurring token of the user on the topic (on
    /// every topic when none is named).
    SubscriptionChange {
        topic: Option<Topic>,
        change: SubscriptionChange,
    },
    /// A message, postback or opt-in: the user is inside the window from `at_ms`.
    Interaction,
    /// Anything else about the user (reads, deliveries): known, window unchanged.
    Seen,
}

/// What a recurring opt-in (`notification_messages`) carries besides its topic and token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecurringTerms {
    /// The title the user agreed to (Facebook's, at most 65 characters; longer is cut).
    pub title: Option<String>,
    /// The subscriber's IANA timezone (for scheduling by local time).
    pub timezone: Option<String>,
    /// `token_expiry_timestamp` in epoch ms; none: the token does not expire.
    pub expires_at: Option<i64>,
    /// Facebook's `user_token_status` (`REFRESHED`, `NOT_REFRESHED`), as given.
    pub token_status: Option<String>,
    /// `notification_messages_status`: the user stopped or resumed the subscription.
    pub change: Option<SubscriptionChange>,
}

/// The user's choice about a recurring subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriptionChange {
    Stop,
    Resume,
}

impl SubscriptionChange {
    /// `STOP_NOTIFICATIONS` or `RESUME_NOTIFICATIONS`, also spelled with a space (Facebook has
    /// sent both) and in any case; anything else is no change.
    pub fn parse(raw: &str) -> Option<Self> {
        let normal: String = raw
            .trim()
            .chars()
            .map(|c| {
                if c == ' ' {
                    '_'
                } else {
                    c.to_ascii_uppercase()
                }
            })
            .collect();
        match normal.as_str() {
            "STOP_NOTIFICATIONS" | "STOP" => Some(SubscriptionChange::Stop),
            "RESUME_NOTIFICATIONS" | "RESUME" => Some(SubscriptionChange::Resume),
            _ => None,
        }
    }
}

/// The most characters kept of a recurring opt-in's title and timezone: Facebook's title is at
/// most 65, an IANA name at most about 30; a relay's longer text is cut, not refused.
pub const RECURRING_TITLE_MAX_CHARS: usize = 65;
const TIMEZONE_MAX_CHARS: usize = 64;

/// A title or timezone as kept: printable, trimmed, cut to `max` characters; none when empty.
pub fn recurring_text(raw: &str, max: usize) -> Option<String> {
    let printable: String = raw.chars().filter(|c| !c.is_control()).collect();
    let text: String = printable.trim().chars().take(max).collect();
    (!text.is_empty()).then_some(text)
}

/// A timezone as kept (see [`recurring_text`]).
pub fn recurring_timezone(raw: &str) -> Option<String> {
    recurring_text(raw, TIMEZONE_MAX_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_and_resume_are_read_in_either_spelling() {
        use SubscriptionChange::*;
        for (raw, change) in [
            ("STOP_NOTIFICATIONS", Some(Stop)),
            ("STOP NOTIFICATIONS", Some(Stop)),
            ("stop notifications", Some(Stop)),
            ("RESUME_NOTIFICATIONS", Some(Resume)),
            ("RESUME NOTIFICATIONS", Some(Resume)),
            ("", None),
            ("PAUSE", None),
        ] {
            assert_eq!(SubscriptionChange::parse(raw), change, "{raw}");
        }
    }

    #[test]
    fn a_recurring_title_is_trimmed_cut_and_printable() {
        assert_eq!(
            recurring_text("  Deals \u{7} ", 65).as_deref(),
            Some("Deals")
        );
        assert_eq!(recurring_text(&"x".repeat(80), 65).unwrap().len(), 65);
        assert_eq!(recurring_text(" ", 65), None);
    }

    #[test]
    fn topics_are_kept_exactly() {
        let topic = Topic::parse(" Spring Sale! ").unwrap();
        assert_eq!(topic.as_str(), " Spring Sale! ");
        assert_ne!(
            Topic::parse("spring sale").unwrap(),
            Topic::parse("Spring Sale!").unwrap()
        );
        assert!(Topic::parse("").is_err());
        assert!(Topic::parse_within(&"é".repeat(200), 200).is_ok());
        assert!(Topic::parse_within(&"é".repeat(201), 200).is_err());
    }

    #[test]
    fn token_debug_shows_only_a_fingerprint() {
        let token = OptInToken::parse("otn-SECRET-token").unwrap();
        let debug = format!("{token:?}");
        assert!(!debug.contains("SECRET"));
        assert_eq!(token.fingerprint().len(), 12);
    }

    #[test]
    fn segment_rules_need_a_tag_and_no_contradiction() {
        let err = SegmentRule::parse("rule", &[], &[], &[]).unwrap_err();
        assert_eq!(err.0[0].field, "rule");
        let err = SegmentRule::parse("rule", &["vip".into()], &[], &["vip".into()]).unwrap_err();
        assert_eq!(err.0[0].field, "rule.none_tags");
        let err = SegmentRule::parse("rule", &["".into()], &[], &[]).unwrap_err();
        assert_eq!(err.0[0].field, "rule.all_tags[0]");
        let rule = SegmentRule::parse(
            "rule",
            &["a".into()],
            &["b".into(), "c".into()],
            &["d".into()],
        )
        .unwrap();
        assert_eq!(rule.any_tags.len(), 2);
    }

    #[test]
    fn a_segment_rule_names_at_most_fifty_tags() {
        let tags =
            |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
        assert!(SegmentRule::parse("rule", &tags("a", 30), &tags("b", 10), &tags("c", 10)).is_ok());
        let err =
            SegmentRule::parse("rule", &tags("a", 30), &tags("b", 11), &tags("c", 10)).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].field, "rule");
        assert!(err.0[0].description.contains("at most 50 tags"), "{err}");
        assert!(SegmentRule::parse("rule", &tags("a", 1200), &[], &[]).is_err());
    }
}
