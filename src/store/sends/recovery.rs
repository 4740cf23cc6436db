//! What an earlier life left in flight: every delivery of the send still `in_flight` when its
//! page's actor starts may or may not have reached Facebook.

use sea_orm::DatabaseConnection;

use super::{CounterDelta, SendChange, lock_send, move_with_reason, settle_optins, update_send};
use crate::{
    domain::{DeliveryEvent, DeliveryState, Route, SendState},
    store::{StoreError, begin_write, leases::Fence},
};

/// Settles the send's deliveries found in flight. A token delivery goes back to pending, marked
/// ambiguous, so that its retry with the same token settles it (the token is single-use); a
/// standard message becomes `unknown` and is never retried (no idempotency at Facebook). A
/// cancelled send retries nothing: its token deliveries are `unknown` too, their tokens spent.
/// Returns how many deliveries were recovered.
pub async fn recover_in_flight(
    db: &DatabaseConnection,
    fence: &Fence,
    send_id: &str,
    now: i64,
) -> Result<u64, StoreError> {
    let txn = begin_write(db).await?;
    fence.check(&txn).await?;
    let send = lock_send(&txn, send_id).await?;
    let cancelled = send.state == SendState::Cancelled;
    let mut delta = CounterDelta::default();
    let mut recovered = 0;
    for route in Route::ALL {
        let (event, why) = match (route, cancelled) {
            (Route::Token, false) => (
                DeliveryEvent::Retry,
                "otnd stopped while this token send was in flight; retried with the same token",
            ),
            (Route::Token, true) => (
                DeliveryEvent::Lose,
                "otnd stopped while this token send was in flight, and the send was cancelled \
                 before a retry could settle it",
            ),
            (Route::Window, _) => (
                DeliveryEvent::Lose,
                "otnd stopped while this standard message was in flight; it may or may not \
                 have landed",
            ),
        };
        let moved = move_with_reason(
            &txn,
            event,
            DeliveryState::InFlight,
            why,
            now,
            |sql| {
                if event == DeliveryEvent::Retry {
                    // Its retry, with the same token, settles whether it landed.
                    sql.push(", ambiguous = ")
                        .bind(true)
                        .push(", next_attempt_at = 0");
                }
            },
            |sql| {
                sql.push("send_id = ")
                    .bind(send_id)
                    .push(" AND route = ")
                    .bind(*route);
            },
        )
        .await?;
        settle_optins(&txn, &moved, event.target(), false, now).await?;
        delta.moved(DeliveryState::InFlight, event.target(), moved.len() as i64);
        recovered += moved.len() as u64;
    }
    update_send(&txn, send_id, SendChange::counters(delta), now).await?;
    txn.commit().await?;
    Ok(recovered)
}
