//! The send lifecycle: a send's states and a delivery's, each with one transition table. Every
//! state change the store writes is one of these events, as one conditional statement
//! (`UPDATE … WHERE state IN <the states the event leaves>`), so a step applied twice changes
//! nothing the second time.
//!
//! A send:
//!
//! ```text
//! queued  --run------> running      the page's owner takes it up
//! queued  --pause----> paused
//! running --pause----> paused
//! paused  --resume---> running
//! halted  --resume---> running      the page was fixed
//! queued  --halt-----> halted       the page cannot send (token, restriction, permission)
//! running --halt-----> halted
//! running --complete-> completed    audience materialised, every delivery ended
//! queued | running | paused | halted --cancel--> cancelled
//! ```
//!
//! A delivery (created `in_flight` by the step that materialises it, or `pending`):
//!
//! ```text
//! pending   --claim--> in_flight    committed before anyone calls Facebook
//! in_flight --accept-> sent         Facebook took it (or the spent token proves it did)
//! in_flight --refuse-> failed       Facebook refused this recipient for good, or retries ran out
//! in_flight --retry--> pending      not sent, or a token send that a retry settles; due later
//! in_flight --lose---> unknown      it may have landed and cannot be retried safely
//! pending   --lose---> unknown      an earlier attempt may have landed; it will not be settled
//! pending   --skip---> skipped      it will not be sent (cancelled, or its token lapsed) and no
//! in_flight --skip---> skipped        attempt of it can have landed
//! ```

use std::fmt;

use super::{lifecycle::lifecycle, optin::OptInEvent};

lifecycle! {
    "send",
    /// Where a send is in its life.
    enum SendState {
        Queued = "queued",
        Running = "running",
        Paused = "paused",
        Completed = "completed",
        Cancelled = "cancelled",
        Halted = "halted",
    }
    /// What happens to a send.
    enum SendEvent {
        Run = "run",
        Pause = "pause",
        Resume = "resume",
        Halt = "halt",
        Complete = "complete",
        Cancel = "cancel",
    }
    table {
        Queued --Run--> Running,
        Queued --Pause--> Paused,
        Running --Pause--> Paused,
        Paused --Resume--> Running,
        Halted --Resume--> Running,
        Queued --Halt--> Halted,
        Running --Halt--> Halted,
        Running --Complete--> Completed,
        Queued --Cancel--> Cancelled,
        Running --Cancel--> Cancelled,
        Paused --Cancel--> Cancelled,
        Halted --Cancel--> Cancelled,
    }
}

lifecycle! {
    "delivery",
    /// Where one recipient of a send is.
    enum DeliveryState {
        Pending = "pending",
        InFlight = "in_flight",
        Sent = "sent",
        Failed = "failed",
        Skipped = "skipped",
        Unknown = "unknown",
    }
    /// What happens to a delivery.
    enum DeliveryEvent {
        Claim = "claim",
        Accept = "accept",
        Refuse = "refuse",
        Retry = "retry",
        Lose = "lose",
        Skip = "skip",
    }
    table {
        Pending --Claim--> InFlight,
        InFlight --Accept--> Sent,
        InFlight --Refuse--> Failed,
        InFlight --Retry--> Pending,
        InFlight --Lose--> Unknown,
        Pending --Lose--> Unknown,
        Pending --Skip--> Skipped,
        InFlight --Skip--> Skipped,
    }
}

impl DeliveryState {
    /// What this delivery's end means for the opt-in it was reserved for: a token that was
    /// accepted, or may have been, is spent; one Facebook refused for good is rejected; one no
    /// attempt of which can have landed goes back for a later send.
    pub fn optin_event(self, token_refused: bool) -> Option<OptInEvent> {
        match self {
            DeliveryState::Sent | DeliveryState::Unknown => Some(OptInEvent::Spend),
            DeliveryState::Failed if token_refused => Some(OptInEvent::Reject),
            DeliveryState::Failed | DeliveryState::Skipped => Some(OptInEvent::Release),
            DeliveryState::Pending | DeliveryState::InFlight => None,
        }
    }
}

impl SendState {
    /// A send that will never move again.
    pub fn is_finished(self) -> bool {
        self.is_terminal()
    }
}

/// How a delivery reaches its recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// A one-time notification: the opt-in's token, usable once.
    Token,
    /// A standard message to a user inside the 24-hour window.
    Window,
    /// A recurring notification: the opt-in's reusable token, at most once per cooldown.
    Recurring,
}

impl Route {
    pub const ALL: &'static [Route] = &[Route::Token, Route::Window, Route::Recurring];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::Window => "window",
            Route::Recurring => "recurring",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "token" => Some(Route::Token),
            "window" => Some(Route::Window),
            "recurring" => Some(Route::Recurring),
            _ => None,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token is presented only if it stays valid this long after the step that claims it: the
/// call must reach Facebook first. The same margin decides who a send (and its estimate) can
/// reach by token.
pub const MIN_TOKEN_LIFE_MS: i64 = 60_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole send table, written out: every (state, event) pair and its answer.
    #[test]
    fn every_send_transition_is_the_table() {
        use SendEvent::*;
        use SendState::*;
        let expected = |from: SendState, event: SendEvent| -> Option<SendState> {
            match (from, event) {
                (Queued, Run) => Some(Running),
                (Queued | Running, Pause) => Some(Paused),
                (Paused | Halted, Resume) => Some(Running),
                (Queued | Running, Halt) => Some(Halted),
                (Running, Complete) => Some(Completed),
                (Queued | Running | Paused | Halted, Cancel) => Some(Cancelled),
                _ => None,
            }
        };
        for from in SendState::ALL {
            for event in SendEvent::ALL {
                assert_eq!(
                    from.on(*event).ok(),
                    expected(*from, *event),
                    "{from} --{}-->",
                    event.as_str()
                );
            }
        }
        assert_eq!(
            SendState::ALL
                .iter()
                .filter(|s| s.is_finished())
                .collect::<Vec<_>>(),
            [&Completed, &Cancelled]
        );
        assert_eq!(Cancel.sources(), [Queued, Running, Paused, Halted]);
        assert_eq!(Resume.sources(), [Paused, Halted]);
    }

    /// The whole delivery table, written out.
    #[test]
    fn every_delivery_transition_is_the_table() {
        use DeliveryEvent::*;
        use DeliveryState::*;
        let expected = |from: DeliveryState, event: DeliveryEvent| -> Option<DeliveryState> {
            match (from, event) {
                (Pending, Claim) => Some(InFlight),
                (InFlight, Accept) => Some(Sent),
                (InFlight, Refuse) => Some(Failed),
                (InFlight, Retry) => Some(Pending),
                (Pending | InFlight, Lose) => Some(Unknown),
                (Pending | InFlight, Skip) => Some(Skipped),
                _ => None,
            }
        };
        for from in DeliveryState::ALL {
            for event in DeliveryEvent::ALL {
                assert_eq!(
                    from.on(*event).ok(),
                    expected(*from, *event),
                    "{from} --{}-->",
                    event.as_str()
                );
            }
        }
        // Every ended delivery stays ended: none of sent, failed, skipped, unknown moves again.
        let terminal: Vec<_> = DeliveryState::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, [&Sent, &Failed, &Skipped, &Unknown]);
    }

    #[test]
    fn an_ended_delivery_settles_its_opt_in() {
        use DeliveryState::*;
        assert_eq!(Sent.optin_event(false), Some(OptInEvent::Spend));
        assert_eq!(Unknown.optin_event(false), Some(OptInEvent::Spend));
        assert_eq!(Failed.optin_event(true), Some(OptInEvent::Reject));
        assert_eq!(Failed.optin_event(false), Some(OptInEvent::Release));
        assert_eq!(Skipped.optin_event(false), Some(OptInEvent::Release));
        assert_eq!(Pending.optin_event(false), None);
        assert_eq!(InFlight.optin_event(false), None);
    }

    #[test]
    fn names_round_trip() {
        for state in SendState::ALL {
            assert_eq!(SendState::parse(state.as_str()), Some(*state));
        }
        for state in DeliveryState::ALL {
            assert_eq!(DeliveryState::parse(state.as_str()), Some(*state));
        }
        for route in Route::ALL {
            assert_eq!(Route::parse(route.as_str()), Some(*route));
        }
        assert_eq!(SendState::parse("done"), None);
    }

    #[test]
    fn an_illegal_event_says_what_and_from_where() {
        let err = SendState::Completed.on(SendEvent::Pause).unwrap_err();
        assert_eq!(err.to_string(), "a send cannot pause from completed");
    }
}
