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
    domain::{DeliveryEvent, DeliveryState, SendEvent, SendState},
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
    Refuse,
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
            Kind::RefuseToken | Kind::Refuse => DeliveryEvent::Refuse,
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
            | (Outcome::Unknown { error }, _) => bind_error(sql, error),
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
