//! What an attempt's answer means for its delivery (GRAPH_API.md's error classes, DESIGN.md's
//! exactly-once rules). Pure: the page actor applies the decision.

use std::time::Duration;

use rand::Rng;

use crate::{
    domain::Route,
    graph::{Class, Delivered, Failure, SendKind},
    store::sends::{Attempt, DeliveryError, Outcome},
};

/// Attempts before a transient failure is final.
pub const MAX_ATTEMPTS: i32 = 5;
/// A token delivery that may have landed is retried longer: the retry is safe (the token is
/// single-use), and it is the only way to learn the outcome.
pub const MAX_ATTEMPTS_AMBIGUOUS_TOKEN: i32 = 10;
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What the page must do besides recording the outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageSignal {
    None,
    /// Slow down; with a regain time, hold the page (or, app-wide, every page) until then.
    Throttled {
        regain: Option<Duration>,
        app_wide: bool,
    },
    /// The page cannot send: halt its sends.
    Halt {
        reason: String,
    },
}

pub struct Decision {
    pub outcome: Outcome,
    pub signal: PageSignal,
}

fn error_of(failure: &Failure) -> DeliveryError {
    let narrow = |v: i64| i32::try_from(v).ok();
    DeliveryError {
        code: (failure.error.code != 0)
            .then_some(failure.error.code)
            .and_then(narrow),
        subcode: failure.error.subcode.and_then(narrow),
        message: failure.error.message.clone(),
    }
}

/// Exponential backoff with full jitter over the upper half: attempt 1 waits 125-250 ms.
pub fn backoff(attempt: i32) -> Duration {
    let exp = u32::try_from(attempt.clamp(1, 16) - 1).unwrap_or(0);
    let ceiling = BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(exp))
        .min(BACKOFF_MAX);
    let low = ceiling / 2;
    low + ceiling
        .saturating_sub(low)
        .mul_f64(rand::thread_rng().r#gen::<f64>())
}

/// A claimed delivery whose call was never made: pending again, the attempt not counted.
pub fn not_attempted(now_ms: i64) -> Outcome {
    Outcome::not_attempted(
        now_ms,
        "not attempted: the page halted or resumed, or the send stopped, before its turn",
    )
}

pub fn decide(delivery: &Attempt, result: Result<Delivered, Failure>, now_ms: i64) -> Decision {
    // Only a one-time token makes a retry safe: Facebook refuses it once used. A standard
    // message and a recurring token (reusable) have no idempotency at Facebook.
    let token = delivery.route == Route::Token;
    let kind = match delivery.route {
        Route::Token => SendKind::Token,
        Route::Window => SendKind::Standard,
        Route::Recurring => SendKind::Recurring,
    };
    let plain = |outcome| Decision {
        outcome,
        signal: PageSignal::None,
    };
    let failure = match result {
        Ok(delivered) => {
            return plain(Outcome::Sent {
                message_id: Some(delivered.message_id),
                confirmed_by_token: false,
            });
        }
        Err(failure) => failure,
    };
    // The token was spent, and an earlier attempt may have landed: that attempt is the one
    // Facebook accepted. Nothing else can have spent it: it was reserved for this delivery.
    if delivery.ambiguous && failure.is_token_spent(kind) {
        return plain(Outcome::Sent {
            message_id: None,
            confirmed_by_token: true,
        });
    }
    let error = error_of(&failure);
    if kind == SendKind::Recurring && failure.class == Class::RecipientPermanent {
        match (failure.error.code, failure.error.subcode) {
            // Facebook's minimum gap between two recurring messages to one subscriber: this
            // one is not sent, as if otnd's own cooldown had held it back.
            (4, Some(2018354)) => return plain(Outcome::Declined { error }),
            // The user stopped notifications on the topic: the token is dead until a RESUME.
            (10, Some(1893015)) => return plain(Outcome::TokenStopped { error }),
            _ => {}
        }
    }
    match failure.class {
        Class::Transient { ambiguous } => {
            if ambiguous && !token {
                // No idempotency key for standard messages or recurring tokens: at most once.
                return plain(Outcome::Unknown { error });
            }
            // This attempt, or an earlier one, may have landed.
            let maybe_landed = ambiguous || delivery.ambiguous;
            let limit = if token && maybe_landed {
                MAX_ATTEMPTS_AMBIGUOUS_TOKEN
            } else {
                MAX_ATTEMPTS
            };
            if delivery.attempts >= limit {
                return plain(if maybe_landed {
                    Outcome::Unknown { error }
                } else {
                    Outcome::Failed {
                        error,
                        token_refused: false,
                    }
                });
            }
            plain(Outcome::Retry {
                at: now_ms + backoff(delivery.attempts).as_millis() as i64,
                ambiguous: maybe_landed,
                refund_attempt: false,
                error,
            })
        }
        Class::Throttled { regain } => Decision {
            outcome: Outcome::Retry {
                at: now_ms
                    + regain
                        .unwrap_or(crate::graph::classify::DEFAULT_THROTTLE_WAIT)
                        .as_millis() as i64,
                ambiguous: delivery.ambiguous,
                refund_attempt: true,
                error,
            },
            // Code 4 is the app's own limit, shared by every page.
            signal: PageSignal::Throttled {
                regain,
                app_wide: failure.error.code == 4,
            },
        },
        Class::RecipientPermanent => plain(Outcome::Failed {
            error,
            // Code 100 on a recurring token: invalid or expired, never to be presented again.
            token_refused: token || (kind == SendKind::Recurring && failure.error.code == 100),
        }),
        Class::PagePermanent => {
            let reason = format!("the page cannot send: {failure}");
            Decision {
                outcome: Outcome::Retry {
                    at: now_ms,
                    ambiguous: delivery.ambiguous,
                    refund_attempt: true,
                    error,
                },
                signal: PageSignal::Halt { reason },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::classify::{ErrorBody, classify};

    fn claimed(route: &str, attempts: i32, ambiguous: bool) -> Attempt {
        Attempt {
            route: Route::parse(route).unwrap(),
            attempts,
            claim: attempts,
            ambiguous,
        }
    }

    fn graph_error(status: u16, code: i64, subcode: Option<i64>) -> Failure {
        classify(
            status,
            ErrorBody {
                message: format!("(#{code}) x"),
                code,
                error_subcode: subcode,
                fbtrace_id: None,
            },
            &crate::graph::Usage::default(),
        )
    }

    #[test]
    fn a_spent_token_after_an_ambiguous_attempt_is_a_confirmed_send() {
        let d = decide(
            &claimed("token", 2, true),
            Err(graph_error(400, 100, None)),
            0,
        );
        assert_eq!(
            d.outcome,
            Outcome::Sent {
                message_id: None,
                confirmed_by_token: true,
            }
        );
        // Without an ambiguous attempt before, the token was refused: failed, opt-in rejected.
        let d = decide(
            &claimed("token", 1, false),
            Err(graph_error(400, 100, None)),
            0,
        );
        assert!(matches!(
            d.outcome,
            Outcome::Failed {
                token_refused: true,
                ..
            }
        ));
    }

    #[test]
    fn an_ambiguous_window_send_is_unknown_and_a_token_send_is_retried() {
        let timeout = Failure::transport("timed out".into(), true);
        let d = decide(&claimed("window", 1, false), Err(timeout.clone()), 0);
        assert!(matches!(d.outcome, Outcome::Unknown { .. }));
        let d = decide(&claimed("token", 1, false), Err(timeout), 1000);
        match d.outcome {
            Outcome::Retry {
                at,
                ambiguous: true,
                ..
            } => assert!((1125..=1250).contains(&at), "{at}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transient_failures_are_bounded() {
        let refused = Failure::transport("connection refused".into(), false);
        let d = decide(
            &claimed("window", MAX_ATTEMPTS, false),
            Err(refused.clone()),
            0,
        );
        assert!(matches!(d.outcome, Outcome::Failed { .. }));
        let d = decide(
            &claimed("token", MAX_ATTEMPTS, true),
            Err(refused.clone()),
            0,
        );
        assert!(
            matches!(d.outcome, Outcome::Retry { .. }),
            "an ambiguous token is retried longer"
        );
        let d = decide(
            &claimed("token", MAX_ATTEMPTS_AMBIGUOUS_TOKEN, true),
            Err(refused),
            0,
        );
        assert!(matches!(d.outcome, Outcome::Unknown { .. }));
    }

    #[test]
    fn throttling_waits_and_never_drops() {
        let d = decide(
            &claimed("token", 3, false),
            Err(graph_error(400, 613, None)),
            0,
        );
        assert!(matches!(
            d.outcome,
            Outcome::Retry {
                refund_attempt: true,
                ..
            }
        ));
        assert!(matches!(
            d.signal,
            PageSignal::Throttled {
                app_wide: false,
                ..
            }
        ));
    }

    #[test]
    fn policy_refusals_that_look_like_throttles_fail_the_recipient_and_slow_nothing() {
        for (code, subcode) in [(4, Some(2018354)), (613, Some(1893016))] {
            let d = decide(
                &claimed("token", 1, false),
                Err(graph_error(400, code, subcode)),
                0,
            );
            assert!(
                matches!(d.outcome, Outcome::Failed { .. }),
                "{code}/{subcode:?}"
            );
            assert_eq!(d.signal, PageSignal::None, "{code}/{subcode:?}");
        }
    }

    #[test]
    fn page_failures_halt_without_failing_the_recipient() {
        for (code, subcode) in [(190, None), (10, Some(1893063))] {
            let d = decide(
                &claimed("token", 1, false),
                Err(graph_error(400, code, subcode)),
                0,
            );
            assert!(matches!(
                d.outcome,
                Outcome::Retry {
                    refund_attempt: true,
                    ..
                }
            ));
            assert!(matches!(d.signal, PageSignal::Halt { .. }));
        }
    }

    /// A recurring token is reusable: an answer that may have landed is never retried, and
    /// Facebook's refusals say what became of the recipient and the token.
    #[test]
    fn a_recurring_send_is_at_most_once_and_its_refusals_are_read_by_subcode() {
        let timeout = Failure::transport("timed out".into(), true);
        let d = decide(&claimed("recurring", 1, false), Err(timeout), 0);
        assert!(
            matches!(d.outcome, Outcome::Unknown { .. }),
            "{:?}",
            d.outcome
        );
        let refused = Failure::transport("connection refused".into(), false);
        let d = decide(&claimed("recurring", 1, false), Err(refused), 0);
        assert!(matches!(
            d.outcome,
            Outcome::Retry {
                ambiguous: false,
                ..
            }
        ));
        let d = decide(
            &claimed("recurring", 1, false),
            Err(graph_error(400, 4, Some(2018354))),
            0,
        );
        assert!(
            matches!(d.outcome, Outcome::Declined { .. }),
            "{:?}",
            d.outcome
        );
        assert_eq!(d.signal, PageSignal::None, "the gap is no throttle");
        let d = decide(
            &claimed("recurring", 1, false),
            Err(graph_error(400, 10, Some(1893015))),
            0,
        );
        assert!(
            matches!(d.outcome, Outcome::TokenStopped { .. }),
            "{:?}",
            d.outcome
        );
        assert_eq!(
            d.signal,
            PageSignal::None,
            "one user's choice halts nothing"
        );
        let d = decide(
            &claimed("recurring", 1, false),
            Err(graph_error(400, 100, None)),
            0,
        );
        assert!(matches!(
            d.outcome,
            Outcome::Failed {
                token_refused: true,
                ..
            }
        ));
        // Another recipient refusal leaves the token as it is.
        let d = decide(
            &claimed("recurring", 1, false),
            Err(graph_error(400, 551, None)),
            0,
        );
        assert!(matches!(
            d.outcome,
            Outcome::Failed {
                token_refused: false,
                ..
            }
        ));
        let d = decide(
            &claimed("recurring", 1, false),
            Err(graph_error(400, 190, None)),
            0,
        );
        assert!(matches!(d.signal, PageSignal::Halt { .. }));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(250));
        assert!(backoff(3) >= Duration::from_millis(500));
        assert!(backoff(30) <= BACKOFF_MAX);
    }
}
