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
/// standard message or a recurring notification becomes `unknown` and is never retried (no
/// idempotency at Facebook, and a recurring token stays valid after use). A
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
            // A recurring token is reusable: a retry could message the user twice.
            (Route::Recurring, _) => (
                DeliveryEvent::Lose,
                "otnd stopped while this recurring notification was in flight; it may or may \
                 not have landed",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{OptInState, PageId},
        store::{
            now_ms,
            sends::{Send, Started, cancel},
            testing::{TestStore, answer, postgres_tests, retry, store_tests, unstamped},
        },
    };

    /// A running send to `a` by token and `w` in the window, both in flight.
    async fn both_routes_in_flight(t: &TestStore, page: &PageId) -> (Send, Fence) {
        t.opt_in(page, "a", "news", "t-a", now_ms()).await;
        t.interaction(page, "w", now_ms()).await;
        let story = t.story(page, "news", true).await;
        let Ok(Started::Created(send)) = t.start(&story, "r1").await else {
            panic!("created")
        };
        let fence = t.fence(page).await;
        // The first step takes the token phase, the second the window.
        t.step(&fence, &send.id, 10).await;
        t.step(&fence, &send.id, 10).await;
        let send = t.send_row(&send.id).await;
        assert_eq!(send.in_flight, 2);
        (send, fence)
    }

    async fn routes(t: &TestStore, send_id: &str) -> Vec<(Route, DeliveryState, bool)> {
        t.deliveries(send_id)
            .await
            .iter()
            .map(|d| (d.route, d.state, d.ambiguous))
            .collect()
    }

    store_tests! {
        /// A token delivery's retry (same token, single use) settles whether it landed; a
        /// standard message cannot be retried safely, so it is unknown.
        async fn recovery_retries_token_deliveries_and_gives_window_ones_up(t) {
            let page = t.page("1").await;
            let (send, fence) = both_routes_in_flight(&t, &page).await;
            assert_eq!(
                recover_in_flight(t.db(), &fence, &send.id, now_ms())
                    .await
                    .unwrap(),
                2
            );
            let expected = [
                (Route::Token, DeliveryState::Pending, true),
                (Route::Window, DeliveryState::Unknown, false),
            ];
            assert_eq!(routes(&t, &send.id).await, expected);
            let token = &t.deliveries(&send.id).await[0];
            assert_eq!(
                t.opt_in_row(token.optin_id.unwrap()).await.state,
                OptInState::Reserved
            );
            let row = t.send_row(&send.id).await;
            assert_eq!((row.in_flight, row.unknown, row.pending()), (0, 1, 1));
        }

        /// A recurring token is reusable: a delivery found in flight may have landed and a retry
        /// could message the user twice, so it is unknown; the token stays active.
        async fn recovery_gives_recurring_deliveries_up(t) {
            let page = t.page("1").await;
            let token = t.recurring_opt_in(&page, "r", "news", "rt", None).await;
            let send = t.send(&page, "news").await;
            let fence = t.fence(&page).await;
            assert_eq!(t.step(&fence, &send.id, 10).await.claimed.len(), 1);
            assert_eq!(
                recover_in_flight(t.db(), &fence, &send.id, now_ms())
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(
                routes(&t, &send.id).await,
                [(Route::Recurring, DeliveryState::Unknown, false)]
            );
            assert_eq!(t.opt_in_row(token.id).await.state, OptInState::Active);
            let row = t.send_row(&send.id).await;
            assert_eq!((row.in_flight, row.unknown), (0, 1));
        }

        /// A recovered retry is due at once, whenever its earlier attempt was due.
        async fn a_recovered_token_delivery_is_due_at_once(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a"]).await;
            let due = now_ms() - 1;
            t.record(&fence, &[answer(&send.id, &claimed[0], retry(due, false))])
                .await;
            t.step(&fence, &send.id, 10).await;
            assert_eq!(t.delivery(claimed[0].id).await.next_attempt_at, due);
            recover_in_flight(t.db(), &fence, &send.id, now_ms())
                .await
                .unwrap();
            let row = t.delivery(claimed[0].id).await;
            assert_eq!(
                (row.state, row.next_attempt_at),
                (DeliveryState::Pending, 0)
            );
        }

        async fn recovering_twice_recovers_once(t) {
            let page = t.page("1").await;
            let (send, fence) = both_routes_in_flight(&t, &page).await;
            recover_in_flight(t.db(), &fence, &send.id, now_ms())
                .await
                .unwrap();
            let before = (
                unstamped(t.send_row(&send.id).await),
                t.deliveries(&send.id).await,
            );
            assert_eq!(
                recover_in_flight(t.db(), &fence, &send.id, now_ms())
                    .await
                    .unwrap(),
                0
            );
            assert_eq!(
                (
                    unstamped(t.send_row(&send.id).await),
                    t.deliveries(&send.id).await
                ),
                before
            );
        }

        /// A cancelled send retries nothing: what was in flight is unknown, its token spent.
        async fn a_cancelled_send_gives_up_its_token_deliveries_too(t) {
            let page = t.page("1").await;
            let (send, _, fence) = t.claimed_send(&page, "news", &["a"]).await;
            cancel(t.db(), &send.id, now_ms()).await.unwrap();
            assert_eq!(
                recover_in_flight(t.db(), &fence, &send.id, now_ms())
                    .await
                    .unwrap(),
                1
            );
            let row = &t.deliveries(&send.id).await[0];
            assert_eq!(row.state, DeliveryState::Unknown);
            assert_eq!(
                t.opt_in_row(row.optin_id.unwrap()).await.state,
                OptInState::Used
            );
        }
    }

    postgres_tests! {
        async fn recovery_under_a_stale_fence_moves_nothing(t) {
            let page = t.page("1").await;
            let (send, _, stale) = t.claimed_send(&page, "news", &["a"]).await;
            t.fence(&page).await;
            let fenced = recover_in_flight(t.db(), &stale, &send.id, now_ms()).await;
            assert!(matches!(fenced, Err(StoreError::Fenced)), "{fenced:?}");
            assert_eq!(
                t.deliveries(&send.id).await[0].state,
                DeliveryState::InFlight
            );
        }
    }
}
