//! The page actor's decisions, as plain functions over plain values: how much the next step may
//! claim, which sends it steps and in what order, when a step is worth taking, how long a send
//! whose step failed waits, and what the answers' page-level signals mean. What one answer means
//! for its delivery is `policy::decide`. The actor only sequences these.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::super::policy::PageSignal;

/// The most deliveries one step claims: when none are in flight, and otherwise. The first calls
/// go out after a small transaction, not after materialising a whole in-flight cap; after that
/// calls go out while the next step claims more.
pub const FIRST_CLAIM: usize = 250;
pub const MAX_CLAIM: usize = 1000;

/// A send whose step failed waits this long before its next, doubling up to the cap.
const STEP_RETRY_BASE: Duration = Duration::from_millis(500);
const STEP_RETRY_MAX: Duration = Duration::from_secs(30);

/// What the next step may claim: nothing while the page's settings are unknown, while it drains
/// or is held by a throttle; else what the in-flight cap leaves, at most one step's worth.
pub fn claim_capacity(cap: Option<usize>, in_flight: usize, draining: bool, held: bool) -> usize {
    let Some(cap) = cap else {
        return 0;
    };
    if draining || held {
        return 0;
    }
    let step = if in_flight == 0 {
        FIRST_CLAIM
    } else {
        MAX_CLAIM
    };
    cap.saturating_sub(in_flight).min(step)
}

/// Whether there is room for a claim worth a database step: a quarter of the cap (at least a
/// batch), or everything is back.
pub fn worth_pumping(cap: usize, batch: usize, in_flight: usize, out: usize) -> bool {
    out == 0 || cap.saturating_sub(in_flight) >= (cap / 4).max(batch)
}

/// What the actor knows of one of its running sends, for ordering steps.
pub struct SendView<'a> {
    pub id: &'a str,
    /// Nothing left to claim or materialise: its counters move with its rows.
    pub nothing_to_claim: bool,
}

/// The sends a step visits, as indexes into `sends`: round robin from `turn`, leaving out
/// those with nothing to claim and those whose failed step is still waiting to be tried again.
pub fn step_order(
    sends: &[SendView<'_>],
    turn: usize,
    retry_at: &HashMap<String, (u32, Instant)>,
    now: Instant,
) -> Vec<usize> {
    let n = sends.len();
    (0..n)
        .map(|k| (turn + k) % n)
        .filter(|i| !sends[*i].nothing_to_claim)
        .filter(|i| retry_at.get(sends[*i].id).is_none_or(|(_, at)| *at <= now))
        .collect()
}

/// How long a send whose step has failed `failures` times in a row waits before the next.
pub fn step_retry_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    STEP_RETRY_BASE
        .saturating_mul(2u32.saturating_pow(exp))
        .min(STEP_RETRY_MAX)
}

/// What a flush's page-level signals mean for the page.
#[derive(Debug, Default, PartialEq)]
pub struct Signals {
    /// Claims wait this long (the longest regain time Facebook asked for).
    pub hold_for: Option<Duration>,
    /// Throttles to tell the pacer: the regain time given, and whether it binds the whole app.
    pub throttles: Vec<(Option<Duration>, bool)>,
    /// The page cannot send: its sends halt with this reason.
    pub halt: Option<String>,
}

pub fn read_signals(signals: &[PageSignal]) -> Signals {
    let mut read = Signals::default();
    for signal in signals {
        match signal {
            PageSignal::Throttled { regain, app_wide } => {
                read.throttles.push((*regain, *app_wide));
                if let Some(regain) = regain
                    && read.hold_for.is_none_or(|held| held < *regain)
                {
                    read.hold_for = Some(*regain);
                }
            }
            PageSignal::Halt { reason } => read.halt = Some(reason.clone()),
            PageSignal::None => {}
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_what_the_cap_leaves_one_step_at_a_time() {
        assert_eq!(claim_capacity(None, 0, false, false), 0, "settings unknown");
        assert_eq!(claim_capacity(Some(150), 0, false, false), 150);
        assert_eq!(claim_capacity(Some(8000), 0, false, false), FIRST_CLAIM);
        assert_eq!(claim_capacity(Some(8000), 10, false, false), MAX_CLAIM);
        assert_eq!(claim_capacity(Some(8000), 7500, false, false), 500);
        assert_eq!(claim_capacity(Some(150), 150, false, false), 0);
        assert_eq!(claim_capacity(Some(150), 0, true, false), 0, "draining");
        assert_eq!(claim_capacity(Some(150), 0, false, true), 0, "held");
    }

    #[test]
    fn a_step_is_worth_it_with_a_quarter_of_the_cap_free_or_nothing_out() {
        assert!(worth_pumping(8000, 50, 6000, 6000));
        assert!(!worth_pumping(8000, 50, 6001, 6001));
        assert!(worth_pumping(8000, 50, 7000, 0), "every answer back");
        // A small cap: at least a batch.
        assert!(!worth_pumping(6, 3, 4, 4));
        assert!(worth_pumping(6, 3, 3, 3));
    }

    #[test]
    fn steps_go_round_and_skip_sends_waiting_after_a_failure() {
        let now = Instant::now();
        let sends = [
            SendView {
                id: "a",
                nothing_to_claim: false,
            },
            SendView {
                id: "b",
                nothing_to_claim: false,
            },
            SendView {
                id: "c",
                nothing_to_claim: true,
            },
        ];
        let none = HashMap::new();
        assert_eq!(step_order(&sends, 0, &none, now), [0, 1]);
        assert_eq!(step_order(&sends, 1, &none, now), [1, 0]);
        assert_eq!(step_order(&sends, 2, &none, now), [0, 1]);
        let waiting = HashMap::from([("a".to_string(), (1, now + Duration::from_secs(1)))]);
        assert_eq!(
            step_order(&sends, 0, &waiting, now),
            [1],
            "a waits, b goes on"
        );
        let due = HashMap::from([("a".to_string(), (3, now))]);
        assert_eq!(step_order(&sends, 0, &due, now), [0, 1]);
        assert!(step_order(&[], 5, &none, now).is_empty());
    }

    #[test]
    fn a_failing_step_backs_off_to_a_cap() {
        assert_eq!(step_retry_delay(1), Duration::from_millis(500));
        assert_eq!(step_retry_delay(2), Duration::from_secs(1));
        assert_eq!(step_retry_delay(4), Duration::from_secs(4));
        assert_eq!(step_retry_delay(100), STEP_RETRY_MAX);
    }

    #[test]
    fn signals_hold_for_the_longest_regain_time_and_halt_with_the_reason() {
        let read = read_signals(&[
            PageSignal::Throttled {
                regain: Some(Duration::from_secs(120)),
                app_wide: false,
            },
            PageSignal::None,
            PageSignal::Throttled {
                regain: Some(Duration::from_secs(300)),
                app_wide: true,
            },
            PageSignal::Throttled {
                regain: None,
                app_wide: false,
            },
        ]);
        assert_eq!(read.hold_for, Some(Duration::from_secs(300)));
        assert_eq!(read.throttles.len(), 3);
        // A throttle without a regain time slows the page down and holds nothing.
        let read = read_signals(&[PageSignal::Throttled {
            regain: None,
            app_wide: false,
        }]);
        assert_eq!(read.hold_for, None);
        assert_eq!(read.halt, None);
        let read = read_signals(&[PageSignal::Halt {
            reason: "token".into(),
        }]);
        assert_eq!(read.halt.as_deref(), Some("token"));
        assert_eq!(read.hold_for, None);
        assert_eq!(read_signals(&[]), Signals::default());
    }
}
