//! The answers of attempts, recorded: each answer moves its delivery out of `in_flight` only if
//! the delivery is still in flight under the claim the answer belongs to, so an answer recorded
//! twice (a retried flush) or late (after a newer claim) changes nothing, and the counters move
//! by the rows that changed.

use std::collections::{BTreeMap, HashMap};

use sea_orm::{ConnectionTrait, DatabaseTransaction, FromQueryResult};

use super::{
    CounterDelta, Moved, ROWS_PER_STATEMENT, Send, SendChange, leaving, lifecycle, lock_send,
    push_values, set_state, settle_optins, update_send,
};
use crate::{
    domain::{DeliveryEvent, DeliveryState, OptInEvent, SendEvent, SendState},
    store::{StoreError, leases::Fence, sql::Sql},
};

/// How one attempt ended, as the engine decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Sent {
        message_id: Option<String>,
        /// Facebook refused the token as already used after an attempt that may have landed:
        /// that attempt is the one it accepted.
        confirmed_by_token: bool,
    },
    Failed {
        error: DeliveryError,
        /// Facebook refused the token for good: the opt-in is `rejected` (else it is released).
        token_refused: bool,
    },
    /// Back to pending, due at `at`.
    Retry {
        at: i64,
        /// This attempt, or an earlier one, may have landed.
        ambiguous: bool,
        /// Throttling, page failures and calls never made are nobody's attempt: not counted.
        refund_attempt: bool,
        error: DeliveryError,
    },
    /// It may have landed, and it is not retried.
    Unknown { error: DeliveryError },
    /// Facebook held a recurring message back (the subscriber's minimum gap): not sent, and
    /// not a failure of the recipient; `skipped` with Facebook's reason.
    Declined { error: DeliveryError },
    /// The user stopped recurring notifications on the topic: failed, and the token is stopped
    /// (never presented again until the user resumes).
    TokenStopped { error: DeliveryError },
}

impl Outcome {
    /// A claimed delivery whose call was never made: pending again, the attempt not counted
    /// (an earlier attempt's ambiguity is the row's, and stays).
    pub fn not_attempted(now: i64, why: &str) -> Self {
        Outcome::Retry {
            at: now,
            ambiguous: false,
            refund_attempt: true,
            error: DeliveryError {
                code: None,
                subcode: None,
                message: why.to_string(),
            },
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryError {
    pub code: Option<i32>,
    pub subcode: Option<i32>,
    pub message: String,
}

/// One attempt's outcome, for the delivery and claim it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub send_id: String,
    pub id: i64,
    pub claim: i32,
    pub outcome: Outcome,
}

/// How an answer moves its delivery, once the send's state is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Accept,
    RefuseToken,
    RefuseStopped,
    Refuse,
    Decline,
    Retry,
    Lose,
    /// A retry the send no longer wants (it was cancelled): skipped where nothing of it can
    /// have landed; a row an earlier attempt may have reached is lost (`unknown`) instead,
    /// whatever the answer said, so that its token is never given back.
    Withdraw,
}

impl Kind {
    fn event(self) -> DeliveryEvent {
        match self {
            Kind::Accept => DeliveryEvent::Accept,
            Kind::RefuseToken | Kind::RefuseStopped | Kind::Refuse => DeliveryEvent::Refuse,
            Kind::Decline => DeliveryEvent::Skip,
            Kind::Retry => DeliveryEvent::Retry,
            Kind::Lose => DeliveryEvent::Lose,
            Kind::Withdraw => DeliveryEvent::Skip,
        }
    }

    fn of(outcome: &Outcome, send: SendState) -> Kind {
        let cancelled = send == SendState::Cancelled;
        match outcome {
            Outcome::Sent { .. } => Kind::Accept,
            Outcome::Failed {
                token_refused: true,
                ..
            } => Kind::RefuseToken,
            Outcome::Failed { .. } => Kind::Refuse,
            Outcome::TokenStopped { .. } => Kind::RefuseStopped,
            Outcome::Declined { .. } => Kind::Decline,
            Outcome::Retry {
                ambiguous: true, ..
            } if cancelled => Kind::Lose,
            Outcome::Retry { .. } if cancelled => Kind::Withdraw,
            Outcome::Retry { .. } => Kind::Retry,
            Outcome::Unknown { .. } => Kind::Lose,
        }
    }
}

/// Records answers of any of the page's sends in one transaction, which locks their rows (in
/// id order) first; with `halt`, the page's sends halt in the same transaction. Returns the
/// sends' rows afterwards.
pub async fn record(
    txn: &DatabaseTransaction,
    fence: &Fence,
    answers: &[Answer],
    halt: Option<(&str, &str)>,
    now: i64,
) -> Result<Vec<Send>, StoreError> {
    let backend = txn.get_database_backend();
    fence.check(txn).await?;
    let mut by_send: BTreeMap<&str, Vec<&Answer>> = BTreeMap::new();
    for answer in answers {
        by_send
            .entry(answer.send_id.as_str())
            .or_default()
            .push(answer);
    }
    let mut states = HashMap::new();
    for send_id in by_send.keys() {
        match lock_send(txn, send_id).await {
            Ok(send) => {
                states.insert(*send_id, send.state);
            }
            // Gone with its page: nothing of it to record.
            Err(StoreError::NotFound) => {}
            Err(err) => return Err(err),
        }
    }
    // By kind and send: the rows a statement moves are all of one send, whose counters move by
    // as many.
    let mut groups: BTreeMap<(Kind, &str), Vec<&Answer>> = BTreeMap::new();
    for answer in answers {
        if let Some(state) = states.get(answer.send_id.as_str()) {
            groups
                .entry((Kind::of(&answer.outcome, *state), answer.send_id.as_str()))
                .or_default()
                .push(answer);
        }
    }
    let mut deltas: BTreeMap<&str, CounterDelta> = BTreeMap::new();
    for ((group_kind, send_id), rows) in &groups {
        // A withdrawal skips the rows nothing can have reached; what it left in flight (the
        // ambiguous ones) is lost.
        let passes: &[Kind] = match group_kind {
            Kind::Withdraw => &[Kind::Withdraw, Kind::Lose],
            kind => std::slice::from_ref(kind),
        };
        let chunks: Vec<(&Kind, &[&Answer])> = passes
            .iter()
            .flat_map(|kind| rows.chunks(ROWS_PER_STATEMENT).map(move |c| (kind, c)))
            .collect();
        for (kind, chunk) in chunks {
            let event = kind.event();
            let mut sql = Sql::new(backend);
            statement(&mut sql, *kind, chunk, now)?;
            crate::crashpoint::pass("recording");
            let moved = Moved::find_by_statement(sql.statement()).all(txn).await?;
            deltas.entry(send_id).or_default().moved(
                DeliveryState::InFlight,
                event.target(),
                moved.len() as i64,
            );
            settle_optins(txn, &moved, event.target(), *kind == Kind::RefuseToken, now).await?;
            // A recurring token is never reserved: it is active while its delivery is out.
            // Refused for good it is rejected, stopped by its user it is stopped. (A one-time
            // token was reserved, and settled above; these events leave it as it is.)
            let recurring = match kind {
                Kind::RefuseToken => Some(OptInEvent::Invalidate),
                Kind::RefuseStopped => Some(OptInEvent::Stop),
                _ => None,
            };
            if let Some(event) = recurring {
                let optins: Vec<i64> = moved.iter().filter_map(|m| m.optin_id).collect();
                crate::store::optins::apply(txn, event, &optins, now).await?;
            }
        }
    }
    let mut rows = Vec::new();
    for send_id in states.keys() {
        let delta = deltas.get(send_id).copied().unwrap_or_default();
        // The last answers of a send complete it in the statement that counts them: a small
        // send otherwise takes one more step on the writer only to end.
        let change = SendChange {
            event: halt.is_none().then_some(SendEvent::Complete),
            ..SendChange::counters(delta)
        };
        if let Some(row) = update_send(txn, send_id, change, now).await? {
            rows.push(row);
        }
    }
    if let Some((page_id, reason)) = halt {
        lifecycle::halt_page(txn, page_id, reason, now).await?;
        for row in &mut rows {
            *row = lifecycle::get(txn, &row.id).await?;
        }
    }
    Ok(rows)
}

/// The statement that moves one chunk of answers of one kind: joined to the answers' values by
/// delivery id and claim, guarded by the event's states, returning the rows it moved.
fn statement(sql: &mut Sql, kind: Kind, rows: &[&Answer], now: i64) -> Result<(), StoreError> {
    let event = kind.event();
    sql.push("UPDATE deliveries SET ");
    set_state(sql, event);
    match kind {
        Kind::Accept => {
            sql.push(
                ", message_id = v.column3, confirmed_by_token = v.column4, error_code = NULL, \
                 error_subcode = NULL, error_message = NULL",
            );
        }
        Kind::Retry => {
            sql.push(
                ", error_code = v.column3, error_subcode = v.column4, error_message = v.column5, \
                 next_attempt_at = v.column6, ambiguous = (ambiguous OR v.column7), \
                 attempts = attempts - v.column8",
            );
        }
        _ => {
            sql.push(
                ", error_code = v.column3, error_subcode = v.column4, error_message = v.column5",
            );
        }
    }
    sql.push(", updated_at = ").bind(now).push(" FROM (VALUES ");
    push_values(sql, rows, |sql, answer| {
        sql.bind(answer.id).push(", ").bind(answer.claim);
        match (&answer.outcome, kind) {
            (
                Outcome::Sent {
                    message_id,
                    confirmed_by_token,
                },
                _,
            ) => {
                sql.push(", ")
                    .bind(message_id.clone())
                    .push(", ")
                    .bind(*confirmed_by_token);
            }
            (
                Outcome::Retry {
                    at,
                    ambiguous,
                    refund_attempt,
                    error,
                },
                Kind::Retry,
            ) => {
                bind_error(sql, error);
                sql.push(", ")
                    .bind(*at)
                    .push(", ")
                    .bind(*ambiguous)
                    .push(", ")
                    .bind(i32::from(*refund_attempt));
            }
            (Outcome::Retry { error, .. }, ended @ (Kind::Withdraw | Kind::Lose)) => {
                let when = match ended {
                    Kind::Withdraw => "before this delivery could be tried again",
                    _ => "after an attempt that may have landed",
                };
                let why = DeliveryError {
                    message: format!("the send was cancelled {when} ({})", error.message),
                    ..error.clone()
                };
                bind_error(sql, &why);
            }
            (Outcome::Retry { error, .. }, _)
            | (Outcome::Failed { error, .. }, _)
            | (Outcome::Unknown { error }, _)
            | (Outcome::Declined { error }, _)
            | (Outcome::TokenStopped { error }, _) => bind_error(sql, error),
        }
    });
    sql.push(") AS v WHERE deliveries.id = v.column1 AND deliveries.claim = v.column2");
    if kind == Kind::Withdraw {
        sql.push(" AND NOT deliveries.ambiguous");
    }
    leaving(sql, event, DeliveryState::InFlight, "deliveries.state")?;
    sql.push(" RETURNING deliveries.id AS id, deliveries.optin_id AS optin_id");
    Ok(())
}

fn bind_error(sql: &mut Sql, error: &DeliveryError) {
    sql.push(", ")
        .bind(error.code)
        .push(", ")
        .bind(error.subcode)
        .push(", ")
        .bind(error.message.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::OptInState,
        store::{
            now_ms,
            sends::cancel,
            testing::{TestStore, answer, postgres_tests, retry, sent, store_tests, unstamped},
        },
    };

    fn failed(token_refused: bool) -> Outcome {
        Outcome::Failed {
            error: DeliveryError {
                code: Some(10),
                subcode: None,
                message: "refused".into(),
            },
            token_refused,
        }
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            error: DeliveryError {
                message: "timed out".into(),
                ..Default::default()
            },
        }
    }

    /// The delivery's state and its opt-in's.
    async fn settled(
        t: &TestStore,
        claimed: &crate::store::sends::Claimed,
    ) -> (DeliveryState, OptInState) {
        let row = t.delivery(claimed.id).await;
        (
            row.state,
            t.opt_in_row(claimed.optin_id.unwrap()).await.state,
        )
    }

    async fn record_with_halt(
        t: &TestStore,
        fence: &Fence,
        answers: &[Answer],
        halt: (&str, &str),
    ) -> Vec<Send> {
        t.txn(async |txn| record(txn, fence, answers, Some(halt), now_ms()).await)
            .await
            .unwrap()
    }

    #[test]
    fn a_cancelled_send_withdraws_its_retries_and_loses_those_that_may_have_landed() {
        let retry = |ambiguous| retry(0, ambiguous);
        for (outcome, running, cancelled) in [
            (sent(), Kind::Accept, Kind::Accept),
            (failed(true), Kind::RefuseToken, Kind::RefuseToken),
            (failed(false), Kind::Refuse, Kind::Refuse),
            (retry(false), Kind::Retry, Kind::Withdraw),
            (retry(true), Kind::Retry, Kind::Lose),
            (unknown(), Kind::Lose, Kind::Lose),
        ] {
            assert_eq!(
                Kind::of(&outcome, SendState::Running),
                running,
                "{outcome:?}"
            );
            assert_eq!(
                Kind::of(&outcome, SendState::Paused),
                running,
                "{outcome:?}"
            );
            assert_eq!(
                Kind::of(&outcome, SendState::Cancelled),
                cancelled,
                "{outcome:?}"
            );
        }
    }

    store_tests! {
        /// A flush retried after its commit came back as an error records its answers again:
        /// nothing moves the second time, counters included.
        async fn an_answer_recorded_twice_counts_once(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b"]).await;
            let answers = [answer(&send.id, &claimed[0], sent())];
            let first = t.record(&fence, &answers).await;
            assert_eq!((first[0].sent, first[0].in_flight), (1, 1));
            let before = t.deliveries(&send.id).await;
            let again = t.record(&fence, &answers).await;
            assert_eq!(unstamped(again[0].clone()), unstamped(first[0].clone()));
            assert_eq!(t.deliveries(&send.id).await, before);
            assert_eq!(
                settled(&t, &claimed[0]).await,
                (DeliveryState::Sent, OptInState::Used)
            );
        }

        /// The answer to an earlier claim of a delivery since claimed again (its retry) is
        /// not this claim's: it changes nothing.
        async fn a_late_answer_to_an_earlier_claim_changes_nothing(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a"]).await;
            t.record(&fence, &[answer(&send.id, &claimed[0], retry(0, false))])
                .await;
            let reclaimed = t.step(&fence, &send.id, 10).await.claimed;
            assert_eq!(reclaimed[0].claim, 2);
            let before = (
                unstamped(t.send_row(&send.id).await),
                t.deliveries(&send.id).await,
            );
            t.record(&fence, &[answer(&send.id, &claimed[0], sent())])
                .await;
            assert_eq!(
                (
                    unstamped(t.send_row(&send.id).await),
                    t.deliveries(&send.id).await
                ),
                before
            );
        }

        /// A recurring token is never spent: sent, it stays active; the user's stop (10/1893015)
        /// stops it; Facebook's refusal (100) rejects it; Facebook's gap (4/2018354) skips the
        /// delivery and leaves the token as it was. Each delivery keeps naming its token.
        async fn a_recurring_answer_settles_its_token_as_facebook_said(t) {
            let page = t.page("1").await;
            for user in ["a", "b", "c", "d"] {
                t.recurring_opt_in(&page, user, "news", &format!("rt-{user}"), None)
                    .await;
            }
            let send = t.send(&page, "news").await;
            let fence = t.fence(&page).await;
            let claimed = t.step(&fence, &send.id, 10).await.claimed;
            assert!(claimed.iter().all(|c| c.route == crate::domain::Route::Recurring));
            let error = |code, subcode| DeliveryError {
                code: Some(code),
                subcode,
                message: "refused".into(),
            };
            let answers = [
                answer(&send.id, &claimed[0], sent()),
                answer(&send.id, &claimed[1], Outcome::TokenStopped { error: error(10, Some(1893015)) }),
                answer(&send.id, &claimed[2], Outcome::Failed { error: error(100, None), token_refused: true }),
                answer(&send.id, &claimed[3], Outcome::Declined { error: error(4, Some(2018354)) }),
            ];
            let row = &t.record(&fence, &answers).await[0];
            assert_eq!(
                (row.sent, row.failed, row.skipped, row.state),
                (1, 2, 1, SendState::Completed)
            );
            let mut got = Vec::new();
            for c in &claimed {
                got.push(settled(&t, c).await);
            }
            assert_eq!(
                got,
                [
                    (DeliveryState::Sent, OptInState::Active),
                    (DeliveryState::Failed, OptInState::Stopped),
                    (DeliveryState::Failed, OptInState::Rejected),
                    (DeliveryState::Skipped, OptInState::Active),
                ]
            );
            // Recorded again, nothing moves.
            let again = &t.record(&fence, &answers).await[0];
            assert_eq!((again.sent, again.failed, again.skipped), (1, 2, 1));
        }

        /// A refusal gives the opt-in back for a later send (unbound from the delivery); a token
        /// Facebook refused for good is rejected, and stays bound.
        async fn a_refusal_releases_the_opt_in_and_a_refused_token_is_rejected(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b"]).await;
            let answers = [
                answer(&send.id, &claimed[0], failed(false)),
                answer(&send.id, &claimed[1], failed(true)),
            ];
            let row = &t.record(&fence, &answers).await[0];
            assert_eq!((row.failed, row.state), (2, SendState::Completed));
            assert_eq!(
                settled(&t, &claimed[0]).await,
                (DeliveryState::Failed, OptInState::Active)
            );
            assert_eq!(
                settled(&t, &claimed[1]).await,
                (DeliveryState::Failed, OptInState::Rejected)
            );
            let unbound: Vec<Option<i64>> = t
                .deliveries(&send.id)
                .await
                .iter()
                .map(|d| d.optin_id)
                .collect();
            assert_eq!(unbound, [None, claimed[1].optin_id]);
        }

        /// A retry waits until it is due; a retry that may have landed stays ambiguous through
        /// later attempts, and a refunded attempt is not counted.
        async fn a_retry_is_pending_until_due_and_keeps_what_may_have_landed(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b"]).await;
            let refunded = Outcome::not_attempted(0, "never called");
            let answers = [
                answer(&send.id, &claimed[0], retry(0, true)),
                answer(&send.id, &claimed[1], refunded),
            ];
            t.record(&fence, &answers).await;
            let rows = t.deliveries(&send.id).await;
            let kept: Vec<_> = rows
                .iter()
                .map(|d| (d.state, d.attempts, d.ambiguous, d.next_attempt_at))
                .collect();
            assert_eq!(
                kept,
                [
                    (DeliveryState::Pending, 1, true, 0),
                    (DeliveryState::Pending, 0, false, 0)
                ]
            );
            let reclaimed = t.step(&fence, &send.id, 10).await.claimed;
            assert!(reclaimed[0].ambiguous);
            t.record(&fence, &[answer(&send.id, &reclaimed[0], retry(99, false))])
                .await;
            let row = t.delivery(claimed[0].id).await;
            assert_eq!(
                (row.attempts, row.ambiguous, row.next_attempt_at),
                (2, true, 99)
            );
            assert_eq!(settled(&t, &claimed[0]).await.1, OptInState::Reserved);
        }

        async fn an_unknown_answer_spends_the_token(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a"]).await;
            let row = &t
                .record(&fence, &[answer(&send.id, &claimed[0], unknown())])
                .await[0];
            assert_eq!((row.unknown, row.state), (1, SendState::Completed));
            assert_eq!(
                settled(&t, &claimed[0]).await,
                (DeliveryState::Unknown, OptInState::Used)
            );
        }

        /// The last answers complete the send in the statement that counts them, once.
        async fn the_last_answer_completes_the_send(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b"]).await;
            let first = t
                .record(&fence, &[answer(&send.id, &claimed[0], sent())])
                .await;
            assert_eq!(first[0].state, SendState::Running);
            let last = t
                .record(&fence, &[answer(&send.id, &claimed[1], sent())])
                .await;
            assert_eq!((last[0].state, last[0].sent), (SendState::Completed, 2));
            assert_eq!(t.send_row(&send.id).await, last[0]);
        }

        /// An answer that says the page cannot send halts its sends, in the same transaction,
        /// rather than completing them.
        async fn answers_with_a_halt_halt_the_page_instead_of_completing(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a"]).await;
            let rows = record_with_halt(
                &t,
                &fence,
                &[answer(&send.id, &claimed[0], sent())],
                (page.as_str(), "token expired"),
            )
            .await;
            assert_eq!(
                (rows[0].state, rows[0].last_error.as_str(), rows[0].sent),
                (SendState::Halted, "token expired", 1)
            );
            assert_eq!(t.send_row(&send.id).await, rows[0]);
        }

        /// A cancelled send no longer wants retries: those nothing can have reached are
        /// skipped (their opt-ins back), those that may have landed lost (their tokens spent).
        async fn answers_to_a_cancelled_send_end_its_retries(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b"]).await;
            cancel(t.db(), &send.id, now_ms()).await.unwrap();
            let answers = [
                answer(&send.id, &claimed[0], retry(0, false)),
                answer(&send.id, &claimed[1], retry(0, true)),
            ];
            let row = &t.record(&fence, &answers).await[0];
            assert_eq!(
                (row.state, row.skipped, row.unknown, row.in_flight),
                (SendState::Cancelled, 1, 1, 0)
            );
            assert_eq!(
                settled(&t, &claimed[0]).await,
                (DeliveryState::Skipped, OptInState::Active)
            );
            assert_eq!(
                settled(&t, &claimed[1]).await,
                (DeliveryState::Unknown, OptInState::Used)
            );
        }

        /// A withdrawn retry of a delivery an earlier attempt may have reached is lost, not
        /// skipped, whatever this answer said: its token is never given back.
        async fn a_withdrawn_retry_that_may_have_landed_before_is_lost(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a"]).await;
            t.record(&fence, &[answer(&send.id, &claimed[0], retry(0, true))])
                .await;
            let reclaimed = t.step(&fence, &send.id, 10).await.claimed;
            cancel(t.db(), &send.id, now_ms()).await.unwrap();
            t.record(&fence, &[answer(&send.id, &reclaimed[0], retry(0, false))])
                .await;
            assert_eq!(
                settled(&t, &claimed[0]).await,
                (DeliveryState::Unknown, OptInState::Used)
            );
        }

        /// A send gone with its page has nothing left to record to.
        async fn an_answer_for_a_send_that_is_gone_is_dropped(t) {
            let page = t.page("1").await;
            let (_, claimed, fence) = t.claimed_send(&page, "news", &["a"]).await;
            assert!(
                t.record(&fence, &[answer("gone", &claimed[0], sent())])
                    .await
                    .is_empty()
            );
            assert_eq!(
                t.delivery(claimed[0].id).await.state,
                DeliveryState::InFlight
            );
        }
    }

    postgres_tests! {
        /// Answers are recorded only under the page's current lease.
        async fn answers_under_a_stale_fence_record_nothing(t) {
            let page = t.page("1").await;
            let (send, claimed, stale) = t.claimed_send(&page, "news", &["a"]).await;
            t.fence(&page).await;
            let answers = [answer(&send.id, &claimed[0], sent())];
            let fenced = t
                .txn(async |txn| record(txn, &stale, &answers, None, now_ms()).await)
                .await;
            assert!(
                matches!(fenced, Err(StoreError::Fenced)),
                "{:?}",
                fenced.err()
            );
            assert_eq!(
                t.delivery(claimed[0].id).await.state,
                DeliveryState::InFlight
            );
        }
    }
}
