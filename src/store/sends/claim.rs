//! One step of a running send: claim its due pending deliveries, then materialise new
//! recipients while room is left, all committed `in_flight` before anyone calls Facebook.

use std::collections::HashSet;

use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, FromQueryResult};

use super::{
    Claimed, CounterDelta, ROWS_PER_STATEMENT, Send, SendChange, leaving, lock_send,
    materialize::materialize, move_with_reason, push_id_list, record, set_state, settle_optins,
    update_send,
};
use crate::{
    domain::{DeliveryEvent, DeliveryState, SendEvent, SendState},
    store::{StoreError, in_transaction, leases::Fence, sql::Sql},
};

/// What one step of a send did: the deliveries it committed `in_flight`, and the send's row
/// afterwards (as the step found it when it could not run).
pub struct Step {
    pub claimed: Vec<Claimed>,
    pub send: Send,
}

/// One step of the send, in one transaction that locks the send's row first: nothing when the
/// send is not running (paused, cancelled... meanwhile, perhaps by another instance) or, with
/// `start`, queued; else up to `limit` due pending deliveries (retries and recovered ones)
/// first, then new recipients materialised while room is left, with the send's counters and
/// audience cursor. With `start`, a queued send is run by the same statement that moves its
/// counters (its first step is one transaction, not two).
pub async fn step(
    txn: &DatabaseTransaction,
    fence: &Fence,
    send_id: &str,
    now: i64,
    limit: u64,
    start: bool,
) -> Result<Step, StoreError> {
    fence.check(txn).await?;
    let send = lock_send(txn, send_id).await?;
    let starting = start && send.state == SendState::Queued;
    if send.state != SendState::Running && !starting {
        return Ok(Step {
            claimed: Vec::new(),
            send,
        });
    }
    // The counters are exact (they move with the rows): a send none of whose deliveries is
    // pending has none to claim, and a new send's first step only materialises.
    let (mut claimed, mut delta) = match send.pending() {
        0 => (Vec::new(), CounterDelta::default()),
        _ => claim(txn, &send.id, now, limit).await?,
    };
    let mut audience = None;
    if (claimed.len() as u64) < limit && !send.audience_done() {
        let want = limit - claimed.len() as u64;
        let made = materialize(txn, &send, now, want).await?;
        delta.total += made.claimed.len() as i64 + made.skipped;
        delta.in_flight += made.claimed.len() as i64;
        delta.skipped += made.skipped;
        claimed.extend(made.claimed);
        audience = Some((made.phase, made.cursor));
    }
    let row = if delta.is_zero() && audience.is_none() && !starting {
        send
    } else {
        let audience = audience.as_ref().map(|(p, c)| (*p, c.as_str()));
        let change = SendChange {
            delta,
            audience,
            event: starting.then_some(SendEvent::Run),
        };
        update_send(txn, &send.id, change, now)
            .await?
            .ok_or(StoreError::NotFound)?
    };
    Ok(Step { claimed, send: row })
}

/// Claims up to `limit` due pending deliveries of the send, in order. A token that would lapse
/// before it can be used is never presented: its delivery is skipped (or, if an earlier attempt
/// may have landed, lost: `unknown`) and the opt-in settled. Returns the claimed deliveries and
/// the counters they move.
async fn claim(
    txn: &DatabaseTransaction,
    send_id: &str,
    now: i64,
    limit: u64,
) -> Result<(Vec<Claimed>, CounterDelta), StoreError> {
    let backend = txn.get_database_backend();
    let mut sql = Sql::new(backend);
    // A recurring token its user stopped (or Facebook refused) since the delivery was made
    // reads as no token: it is never presented.
    sql.push(
        "SELECT d.id, d.psid, d.route, d.attempts + 1 AS attempts, d.claim + 1 AS claim, \
         d.ambiguous, CASE WHEN d.route = 'recurring' AND o.state <> 'active' THEN NULL \
         ELSE o.token END AS token, o.expires_at, d.optin_id FROM deliveries d \
         LEFT JOIN optins o ON o.id = d.optin_id WHERE d.send_id = ",
    )
    .bind(send_id)
    // A literal, not a bound value: only then can SQLite use the partial index of pending
    // deliveries (a send's others are not scanned at every step).
    .push(&format!(
        " AND d.state = '{}'",
        DeliveryState::Pending.as_str()
    ))
    .push(" AND d.next_attempt_at <= ")
    .bind(now)
    .push(" ORDER BY d.id LIMIT ")
    .bind(limit as i64);
    let rows = Claimed::find_by_statement(sql.statement()).all(txn).await?;
    let cutoff = crate::store::eligibility::token_cutoff(now);
    let (usable, unusable): (Vec<Claimed>, Vec<Claimed>) = rows.into_iter().partition(|c| {
        c.route == crate::domain::Route::Window
            || (c.token.is_some() && c.expires_at.is_some_and(|e| e > cutoff))
    });
    // Not lapsed, yet without a token: a recurring token stopped or refused meanwhile.
    let (lapsed, stopped): (Vec<Claimed>, Vec<Claimed>) = unusable
        .into_iter()
        .partition(|c| c.expires_at.is_none_or(|e| e <= cutoff));
    let mut delta = CounterDelta::default();
    let ids: Vec<i64> = usable.iter().map(|c| c.id).collect();
    let event = DeliveryEvent::Claim;
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut sql = Sql::new(backend);
        sql.push("UPDATE deliveries SET ");
        set_state(&mut sql, event);
        sql.push(", attempts = attempts + 1, claim = claim + 1, updated_at = ")
            .bind(now)
            .push(" WHERE id IN ");
        push_id_list(&mut sql, chunk);
        leaving(&mut sql, event, DeliveryState::Pending, "state")?;
        // The send's row is locked: nobody else can have moved its pending deliveries.
        if txn.execute_raw(sql.statement()).await?.rows_affected() != chunk.len() as u64 {
            return Err(StoreError::Conflict);
        }
    }
    delta.moved(
        DeliveryState::Pending,
        DeliveryState::InFlight,
        ids.len() as i64,
    );
    if !stopped.is_empty() {
        let ids: Vec<i64> = stopped.iter().map(|c| c.id).collect();
        let mut moved = 0;
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            moved += move_with_reason(
                txn,
                DeliveryEvent::Skip,
                DeliveryState::Pending,
                "the user stopped recurring notifications on this topic (or Facebook refused \
                 the token) before this delivery's turn; the token was not presented",
                now,
                |_| {},
                |sql| {
                    sql.push("id IN ");
                    push_id_list(sql, chunk);
                },
            )
            .await?
            .len();
        }
        delta.moved(DeliveryState::Pending, DeliveryState::Skipped, moved as i64);
    }
    if !lapsed.is_empty() {
        let (maybe_landed, never_sent): (Vec<&Claimed>, Vec<&Claimed>) =
            lapsed.iter().partition(|c| c.ambiguous);
        for (rows, event, why) in [
            (
                never_sent,
                DeliveryEvent::Skip,
                "the opt-in lapsed before its turn; its token was never presented",
            ),
            (
                maybe_landed,
                DeliveryEvent::Lose,
                "an earlier attempt may have landed, and the token lapsed before it could be \
                 confirmed",
            ),
        ] {
            let ids: Vec<i64> = rows.iter().map(|c| c.id).collect();
            let mut moved = Vec::new();
            for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                moved.extend(
                    move_with_reason(
                        txn,
                        event,
                        DeliveryState::Pending,
                        why,
                        now,
                        |_| {},
                        |sql| {
                            sql.push("id IN ");
                            push_id_list(sql, chunk);
                        },
                    )
                    .await?,
                );
            }
            delta.moved(DeliveryState::Pending, event.target(), moved.len() as i64);
            if event == DeliveryEvent::Skip {
                // Never presented, and no longer presentable: lapsed, not released.
                let optins: Vec<i64> = moved.iter().filter_map(|m| m.optin_id).collect();
                crate::store::optins::apply(txn, crate::domain::OptInEvent::Lapse, &optins, now)
                    .await?;
            } else {
                settle_optins(txn, &moved, event.target(), false, now).await?;
            }
        }
    }
    Ok((usable, delta))
}

/// Deliveries of the send that are `in_flight` though this actor never handed them on (a step
/// whose commit came back as an error may have committed them nonetheless): nobody called
/// Facebook for them, so they go back to pending as if never claimed. `known` holds every
/// delivery the actor has out or answered and not yet recorded. Returns how many moved.
pub async fn reconcile(
    db: &DatabaseConnection,
    fence: &Fence,
    send_id: &str,
    known: &HashSet<i64>,
    now: i64,
) -> Result<u64, StoreError> {
    #[derive(FromQueryResult)]
    struct InFlight {
        id: i64,
        claim: i32,
    }
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT id, claim FROM deliveries WHERE send_id = ")
        .bind(send_id)
        .push(" AND state = ")
        .bind(DeliveryState::InFlight);
    let rows = InFlight::find_by_statement(sql.statement()).all(db).await?;
    let answers: Vec<record::Answer> = rows
        .into_iter()
        .filter(|row| !known.contains(&row.id))
        .map(|row| record::Answer {
            send_id: send_id.to_string(),
            id: row.id,
            claim: row.claim,
            outcome: record::Outcome::not_attempted(
                now,
                "not attempted: the step that claimed it failed before handing it on",
            ),
        })
        .collect();
    let n = answers.len() as u64;
    if n > 0 {
        in_transaction(db, async |txn| {
            record::record(txn, fence, &answers, None, now).await
        })
        .await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::OptInState,
        store::{
            now_ms,
            sends::{apply, get},
            testing::{TestStore, answer, postgres_tests, retry, store_tests},
        },
    };

    /// One step at `now`, as the page's actor takes it (`start`: a queued send runs).
    async fn step_at(
        t: &TestStore,
        fence: &Fence,
        send_id: &str,
        now: i64,
        limit: u64,
        start: bool,
    ) -> Step {
        t.txn(async |txn| step(txn, fence, send_id, now, limit, start).await)
            .await
            .unwrap()
    }

    fn states(rows: &[crate::store::sends::delivery::Model]) -> Vec<DeliveryState> {
        rows.iter().map(|d| d.state).collect()
    }

    store_tests! {
        /// A queued send's first step runs it and claims its audience as it materialises it,
        /// all committed in flight, the tokens reserved.
        async fn the_first_step_of_a_queued_send_runs_it_and_claims_its_audience(t) {
            let page = t.page("1").await;
            let now = now_ms();
            let a = t.opt_in(&page, "a", "news", "t-a", now).await;
            t.opt_in(&page, "b", "news", "t-b", now).await;
            let send = t.send(&page, "news").await;
            let fence = t.fence(&page).await;
            let step = step_at(&t, &fence, &send.id, now, 10, true).await;
            let claimed: Vec<(&str, i32, i32)> = step
                .claimed
                .iter()
                .map(|c| (c.psid.as_str(), c.attempts, c.claim))
                .collect();
            assert_eq!(claimed, [("a", 1, 1), ("b", 1, 1)]);
            assert_eq!(step.claimed[0].token.as_deref(), Some("t-a"));
            let row = t.send_row(&send.id).await;
            assert_eq!(
                (row.state, row.started_at, row.total, row.in_flight),
                (SendState::Running, Some(now), 2, 2)
            );
            assert!(row.audience_done());
            assert_eq!(
                states(&t.deliveries(&send.id).await),
                [DeliveryState::InFlight; 2]
            );
            assert_eq!(t.opt_in_row(a.id).await.state, OptInState::Reserved);
        }

        /// What a step claimed is in flight: the next step finds nothing to claim and writes
        /// nothing.
        async fn a_second_step_claims_nothing_already_claimed(t) {
            let page = t.page("1").await;
            let (send, _, fence) = t.claimed_send(&page, "news", &["a", "b"]).await;
            let before = (t.send_row(&send.id).await, t.deliveries(&send.id).await);
            let again = step_at(&t, &fence, &send.id, now_ms(), 10, true).await;
            assert!(again.claimed.is_empty());
            assert_eq!(
                (t.send_row(&send.id).await, t.deliveries(&send.id).await),
                before
            );
        }

        /// Only the engine's own first step may run a queued send; a paused one is not
        /// stepped at all, its pending deliveries left pending.
        async fn a_send_that_is_not_running_is_not_stepped(t) {
            let page = t.page("1").await;
            t.opt_in(&page, "a", "news", "t-a", now_ms()).await;
            let queued = t.send(&page, "news").await;
            let fence = t.fence(&page).await;
            let step = step_at(&t, &fence, &queued.id, now_ms(), 10, false).await;
            assert!(step.claimed.is_empty());
            assert_eq!(t.send_row(&queued.id).await, queued);
            let (send, claimed, fence) = t.claimed_send(&page, "sport", &["b"]).await;
            t.record(&fence, &[answer(&send.id, &claimed[0], retry(0, false))])
                .await;
            let paused = apply(t.db(), &send.id, SendEvent::Pause, None, now_ms())
                .await
                .unwrap();
            let step = step_at(&t, &fence, &send.id, now_ms(), 10, true).await;
            assert!(step.claimed.is_empty());
            assert_eq!(step.send, paused);
            assert_eq!(
                states(&t.deliveries(&send.id).await),
                [DeliveryState::Pending]
            );
        }

        /// A retry is claimed once it is due, under a new claim and attempt; one due later
        /// waits.
        async fn a_step_claims_the_retries_that_are_due_and_leaves_the_later_ones(t) {
            let page = t.page("1").await;
            let now = now_ms();
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b"]).await;
            let answers = [
                answer(&send.id, &claimed[0], retry(now - 1, false)),
                answer(&send.id, &claimed[1], retry(now + 3_600_000, false)),
            ];
            t.record(&fence, &answers).await;
            let step = step_at(&t, &fence, &send.id, now, 10, true).await;
            let again: Vec<(i64, i32, i32)> = step
                .claimed
                .iter()
                .map(|c| (c.id, c.attempts, c.claim))
                .collect();
            assert_eq!(again, [(claimed[0].id, 2, 2)]);
            assert_eq!(
                states(&t.deliveries(&send.id).await),
                [DeliveryState::InFlight, DeliveryState::Pending]
            );
            assert_eq!((step.send.in_flight, step.send.pending()), (1, 1));
        }

        /// A step claims at most its limit, and the audience's cursor picks up where it
        /// stopped.
        async fn a_step_claims_no_more_than_its_limit_and_the_next_goes_on_from_there(t) {
            let page = t.page("1").await;
            for psid in ["a", "b", "c"] {
                t.opt_in(&page, psid, "news", &format!("t-{psid}"), now_ms())
                    .await;
            }
            let send = t.send(&page, "news").await;
            let fence = t.fence(&page).await;
            let first = step_at(&t, &fence, &send.id, now_ms(), 2, true).await;
            assert_eq!(first.claimed.len(), 2);
            assert_eq!(
                (
                    first.send.audience_phase.as_str(),
                    first.send.audience_cursor.as_str()
                ),
                ("token", "b")
            );
            let second = step_at(&t, &fence, &send.id, now_ms(), 2, true).await;
            let psids: Vec<&str> = second.claimed.iter().map(|c| c.psid.as_str()).collect();
            assert_eq!(psids, ["c"]);
            assert!(second.send.audience_done());
        }

        /// A token that would lapse before its call reaches Facebook is never presented: its
        /// delivery is skipped and the opt-in expired, or, where an earlier attempt may have
        /// landed, lost and the token spent.
        async fn a_lapsing_token_is_never_presented(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b"]).await;
            let answers = [
                answer(&send.id, &claimed[0], retry(0, false)),
                answer(&send.id, &claimed[1], retry(0, true)),
            ];
            t.record(&fence, &answers).await;
            // Half a minute before they lapse: too late for a call to reach Facebook in time.
            let expires_at = t.opt_in_row(claimed[0].optin_id.unwrap()).await.expires_at;
            let step = step_at(&t, &fence, &send.id, expires_at - 30_000, 10, true).await;
            assert!(step.claimed.is_empty());
            assert_eq!(
                states(&t.deliveries(&send.id).await),
                [DeliveryState::Skipped, DeliveryState::Unknown]
            );
            assert_eq!(
                t.opt_in_row(claimed[0].optin_id.unwrap()).await.state,
                OptInState::Expired
            );
            assert_eq!(
                t.opt_in_row(claimed[1].optin_id.unwrap()).await.state,
                OptInState::Used
            );
            assert_eq!(
                (step.send.skipped, step.send.unknown, step.send.pending()),
                (1, 1, 0)
            );
        }

        /// A recurring token its user stopped while its delivery waited for a retry is never
        /// presented: the delivery is skipped with the reason, and the token stays stopped.
        async fn a_stopped_recurring_token_is_never_presented(t) {
            use crate::domain::SubscriptionChange::Stop;
            let page = t.page("1").await;
            t.recurring_opt_in(&page, "r", "news", "rt", None).await;
            let send = t.send(&page, "news").await;
            let fence = t.fence(&page).await;
            let claimed = t.step(&fence, &send.id, 10).await.claimed;
            t.record(&fence, &[answer(&send.id, &claimed[0], retry(0, false))])
                .await;
            t.recurring_opt_in(&page, "r", "news", "rt", Some((Stop, now_ms())))
                .await;
            let step = t.step(&fence, &send.id, 10).await;
            assert!(step.claimed.is_empty());
            let row = &t.deliveries(&send.id).await[0];
            assert_eq!(row.state, DeliveryState::Skipped);
            assert!(
                row.error_message
                    .as_deref()
                    .is_some_and(|m| m.contains("stopped")),
                "{row:?}"
            );
            assert_eq!(t.opt_in_by_token(&page, "rt").await.state, OptInState::Stopped);
            assert_eq!((step.send.skipped, step.send.pending()), (1, 0));
        }

        /// A delivery committed in flight that the actor never handed on goes back to pending,
        /// its attempt not counted; once, and never one the actor knows of.
        async fn reconciling_puts_back_what_nobody_sent_once(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b"]).await;
            let known = HashSet::from([claimed[0].id]);
            assert_eq!(
                reconcile(t.db(), &fence, &send.id, &known, now_ms())
                    .await
                    .unwrap(),
                1
            );
            let rows = t.deliveries(&send.id).await;
            assert_eq!(
                states(&rows),
                [DeliveryState::InFlight, DeliveryState::Pending]
            );
            assert_eq!(
                (rows[1].attempts, rows[1].claim, rows[1].ambiguous),
                (0, 1, false)
            );
            assert_eq!(
                reconcile(t.db(), &fence, &send.id, &known, now_ms())
                    .await
                    .unwrap(),
                0
            );
            assert_eq!(t.deliveries(&send.id).await, rows);
            assert_eq!(get(t.db(), &send.id).await.unwrap().in_flight, 1);
        }
    }

    postgres_tests! {
        /// Only the page's current lease writes its deliveries: a step under a fence that
        /// lost it fails before writing anything.
        async fn a_step_under_a_stale_fence_writes_nothing(t) {
            let page = t.page("1").await;
            t.opt_in(&page, "a", "news", "t-a", now_ms()).await;
            let send = t.send(&page, "news").await;
            let stale = t.fence(&page).await;
            t.fence(&page).await;
            let fenced = t
                .txn(async |txn| step(txn, &stale, &send.id, now_ms(), 10, true).await)
                .await;
            assert!(
                matches!(fenced, Err(StoreError::Fenced)),
                "{:?}",
                fenced.err()
            );
            assert_eq!(t.send_row(&send.id).await, send);
            assert!(t.deliveries(&send.id).await.is_empty());
        }
    }
}
