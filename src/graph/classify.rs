//! Every Graph answer sorted once into what the caller must do about it (GRAPH_API.md, Errors).

use std::time::Duration;

use serde::Deserialize;

use super::usage::Usage;

/// What a failed call means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Retry with backoff. `ambiguous`: the request may have been carried out (a timeout, a
    /// dropped connection, a 5xx): safe to retry with a one-time token, not with a standard send.
    Transient { ambiguous: bool },
    /// Slow down; never drop. `regain`: Facebook's estimate of when the page (or app) may call
    /// again, when it gave one.
    Throttled { regain: Option<Duration> },
    /// This recipient (or this one request) cannot be sent to; the others can.
    RecipientPermanent,
    /// The page cannot send at all (token, restriction, permissions): stop and fix the page.
    PagePermanent,
}

/// Facebook's error, as it answered it (or as otnd observed it for transport failures).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphError {
    pub http_status: Option<u16>,
    pub code: i64,
    pub subcode: Option<i64>,
    pub message: String,
    pub fbtrace_id: Option<String>,
}

/// A classified failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub class: Class,
    pub error: GraphError,
}

impl Failure {
    /// Code 100 on a token send: the token is used, expired or invalid. For a delivery that was
    /// in flight when otnd stopped, the proof that the earlier attempt landed.
    pub fn is_token_spent(&self, kind: SendKind) -> bool {
        kind == SendKind::Token && self.error.code == 100 && self.error.subcode.is_none()
    }

    pub fn transport(message: String, ambiguous: bool) -> Self {
        Failure {
            class: Class::Transient { ambiguous },
            error: GraphError {
                http_status: None,
                code: 0,
                subcode: None,
                message,
                fbtrace_id: None,
            },
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.error.subcode {
            Some(sub) => write!(f, "{} ({}/{})", self.error.message, self.error.code, sub),
            None if self.error.code != 0 => {
                write!(f, "{} ({})", self.error.message, self.error.code)
            }
            None => f.write_str(&self.error.message),
        }
    }
}

/// The kind of call, where the same code means different things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendKind {
    /// `recipient.one_time_notif_token`
    Token,
    /// `recipient.notification_messages_token`
    Recurring,
    /// `recipient.id`, a standard message inside the window
    Standard,
    /// the `one_time_notif_req` template
    OptInRequest,
}

#[derive(Debug, Default, Deserialize)]
pub struct ErrorEnvelope {
    #[serde(default)]
    pub error: ErrorBody,
}

#[derive(Debug, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub code: i64,
    pub error_subcode: Option<i64>,
    pub fbtrace_id: Option<String>,
}

/// How long a throttled delivery waits before its retry when Facebook gives no regain time.
pub const DEFAULT_THROTTLE_WAIT: Duration = Duration::from_secs(1);

/// Sorts an error answer (GRAPH_API.md's table, row by row).
pub fn classify(http_status: u16, body: ErrorBody, usage: &Usage) -> Failure {
    let error = GraphError {
        http_status: Some(http_status),
        code: body.code,
        subcode: body.error_subcode,
        message: if body.message.is_empty() {
            format!("HTTP {http_status} without an error message")
        } else {
            body.message
        },
        fbtrace_id: body.fbtrace_id,
    };
    let class = match (error.code, error.subcode) {
        (1 | 2 | 1200, _) => Class::Transient { ambiguous: true },
        // Policy answers about one recipient that look like throttling and are not: the same
        // opt-in request repeated, a recurring message before the subscriber's minimum gap.
        // Too many recurring opt-in requests (per title, per user, per week) is the same kind.
        (613, Some(1893016)) | (4, Some(2018354)) | (9, Some(2018352)) => Class::RecipientPermanent,
        (4 | 17 | 32 | 613 | 80006, _) => Class::Throttled {
            regain: usage.regain,
        },
        // 1893015: the user stopped recurring notifications on this topic; about them only.
        (10, Some(2018278 | 2018108 | 1893015)) | (551, _) | (200, Some(1545041)) => {
            Class::RecipientPermanent
        }
        (100, _) => Class::RecipientPermanent,
        (10, Some(1893063)) | (190, _) | (10 | 200, _) | (104, _) => Class::PagePermanent,
        // An answer without Graph's envelope: the status says what it is.
        (0, _) if http_status >= 500 => Class::Transient { ambiguous: true },
        _ if http_status >= 500 => Class::Transient { ambiguous: true },
        // Anything else is about this request, not the page: fail it, keep going.
        _ => Class::RecipientPermanent,
    };
    Failure { class, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: i64, subcode: Option<i64>) -> ErrorBody {
        ErrorBody {
            message: format!("(#{code}) test"),
            code,
            error_subcode: subcode,
            fbtrace_id: Some("A1".into()),
        }
    }

    fn class_of(status: u16, code: i64, subcode: Option<i64>) -> Class {
        classify(status, body(code, subcode), &Usage::default()).class
    }

    #[test]
    fn unknown_and_temporary_errors_are_transient_and_ambiguous() {
        for code in [1, 2, 1200] {
            assert_eq!(
                class_of(500, code, None),
                Class::Transient { ambiguous: true },
                "{code}"
            );
        }
        let bare = classify(502, ErrorBody::default(), &Usage::default());
        assert_eq!(bare.class, Class::Transient { ambiguous: true });
        assert!(bare.error.message.contains("HTTP 502"));
    }

    #[test]
    fn rate_limits_are_throttled_except_a_repeated_opt_in_request() {
        for code in [4, 17, 32, 613, 80006] {
            assert!(
                matches!(class_of(400, code, None), Class::Throttled { .. }),
                "{code}"
            );
        }
        assert!(matches!(
            class_of(400, 613, Some(2534040)),
            Class::Throttled { .. }
        ));
        assert_eq!(class_of(400, 613, Some(1893016)), Class::RecipientPermanent);
        assert_eq!(class_of(400, 4, Some(2018354)), Class::RecipientPermanent);
    }

    #[test]
    fn the_regain_time_comes_from_the_usage_header() {
        let usage = Usage::from_headers(
            Some(
                r#"{"111":[{"type":"messenger","call_count":100,"estimated_time_to_regain_access":3}]}"#,
            ),
            None,
        );
        let failure = classify(400, body(613, None), &usage);
        assert_eq!(
            failure.class,
            Class::Throttled {
                regain: Some(Duration::from_secs(180))
            }
        );
        let failure = classify(
            400,
            body(613, None),
            &Usage::from_headers(Some("not json"), None),
        );
        assert_eq!(failure.class, Class::Throttled { regain: None });
    }

    #[test]
    fn recipient_errors_fail_only_that_recipient() {
        for (code, subcode) in [
            (10, Some(2018278)),
            (551, None),
            (200, Some(1545041)),
            (10, Some(2018108)),
            (100, None),
            (100, Some(2018001)),
            (10, Some(1893015)),
            (9, Some(2018352)),
        ] {
            assert_eq!(
                class_of(400, code, subcode),
                Class::RecipientPermanent,
                "{code}/{subcode:?}"
            );
        }
    }

    #[test]
    fn code_100_on_a_token_send_means_the_token_is_spent() {
        let failure = classify(400, body(100, None), &Usage::default());
        assert!(failure.is_token_spent(SendKind::Token));
        assert!(!failure.is_token_spent(SendKind::Standard));
        // A recurring token is reusable: 100 says it is invalid, never that it was used.
        assert!(!failure.is_token_spent(SendKind::Recurring));
        let no_user = classify(400, body(100, Some(2018001)), &Usage::default());
        assert!(!no_user.is_token_spent(SendKind::Token));
    }

    #[test]
    fn page_errors_halt_the_page() {
        for (code, subcode) in [
            (190, None),
            (190, Some(463)),
            (10, Some(1893063)),
            (200, None),
            (10, None),
            (200, Some(1)),
            (104, None),
        ] {
            assert_eq!(
                class_of(400, code, subcode),
                Class::PagePermanent,
                "{code}/{subcode:?}"
            );
        }
    }

    #[test]
    fn code_subcode_message_and_trace_are_kept() {
        let failure = classify(400, body(10, Some(2018278)), &Usage::default());
        assert_eq!(failure.error.code, 10);
        assert_eq!(failure.error.subcode, Some(2018278));
        assert_eq!(failure.error.message, "(#10) test");
        assert_eq!(failure.error.fbtrace_id.as_deref(), Some("A1"));
        assert_eq!(failure.error.http_status, Some(400));
    }
}
