//! A recipient erased from every send of the page: their deliveries go, and each send's counters
//! with them, so that the counters still equal the rows.

use std::collections::BTreeMap;

use sea_orm::{
    ColumnTrait, DatabaseTransaction, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect,
};

use super::{CounterDelta, SendChange, end_pending, lock_send, send, unfinished, update_send};
use crate::{
    domain::DeliveryState,
    store::{StoreError, sql::Sql},
};

#[derive(FromQueryResult)]
struct SendOf {
    send_id: String,
}

/// The sends of the page with a delivery to the user, in id order (the order every writer of
/// several sends locks them in). Through each send's (send_id, psid) key: deliveries have no
/// index by page and user.
async fn sends_with(
    txn: &DatabaseTransaction,
    page_id: &str,
    psid: &str,
) -> Result<Vec<String>, StoreError> {
    use sea_orm::ConnectionTrait;
    let mut sql = Sql::new(txn.get_database_backend());
    sql.push(
        "SELECT DISTINCT d.send_id AS send_id FROM deliveries d JOIN sends s ON s.id = d.send_id \
         WHERE s.page_id = ",
    )
    .bind(page_id)
    .push(" AND d.psid = ")
    .bind(psid)
    .push(" ORDER BY d.send_id");
    Ok(SendOf::find_by_statement(sql.statement())
        .all(txn)
        .await?
        .into_iter()
        .map(|s| s.send_id)
        .collect())
}

/// Holds the user back from every send of the page before an erasure: their pending
/// deliveries end (skipped, or `unknown` where an earlier attempt may have landed, as a cancel
/// ends them), so none is claimed again. Returns how many of theirs are still in flight: the
/// erasure waits until none is, so that no message reaches the user after it returns.
pub async fn hold_recipient(
    txn: &DatabaseTransaction,
    page_id: &str,
    psid: &str,
    now: i64,
) -> Result<u64, StoreError> {
    use sea_orm::ConnectionTrait;
    #[derive(FromQueryResult)]
    struct Count {
        n: i64,
    }
    // The page's unfinished sends are locked first, in id order: a step that is materialising
    // one of them (under the same lock) commits before the user is looked for, so a delivery
    // it made for them from the rows it read before the erasure is found and ended here, and
    // every later step reads the user gone.
    let open: Vec<String> = send::Entity::find()
        .select_only()
        .column(send::Column::Id)
        .filter(send::Column::PageId.eq(page_id))
        .filter(send::Column::State.is_in(unfinished()))
        .order_by_asc(send::Column::Id)
        .into_tuple()
        .all(txn)
        .await?;
    for send_id in &open {
        lock_send(txn, send_id).await?;
    }
    let mut in_flight = 0;
    for send_id in sends_with(txn, page_id, psid).await? {
        lock_send(txn, &send_id).await?;
        let delta = end_pending(txn, &send_id, "the subscriber was erased", now, |sql| {
            sql.push(" AND psid = ").bind(psid);
        })
        .await?;
        if delta != CounterDelta::default() {
            update_send(txn, &send_id, SendChange::counters(delta), now).await?;
        }
        let mut sql = Sql::new(txn.get_database_backend());
        sql.push("SELECT COUNT(*) AS n FROM deliveries WHERE send_id = ")
            .bind(send_id.as_str())
            .push(" AND psid = ")
            .bind(psid)
            .push(" AND state = ")
            .bind(DeliveryState::InFlight.as_str());
        if let Some(count) = Count::find_by_statement(sql.statement()).one(txn).await? {
            in_flight += u64::try_from(count.n).unwrap_or(0);
        }
    }
    Ok(in_flight)
}

/// Deletes the user's deliveries from every send of the page, in the caller's transaction; the
/// sends they belong to are locked first (in id order, as every writer of several sends does).
/// The caller has held the user back first ([`hold_recipient`]) and found nothing in flight.
/// Returns how many deliveries were deleted.
pub async fn erase_recipient(
    txn: &DatabaseTransaction,
    page_id: &str,
    psid: &str,
    now: i64,
) -> Result<u64, StoreError> {
    use sea_orm::ConnectionTrait;
    #[derive(FromQueryResult)]
    struct Gone {
        send_id: String,
        state: DeliveryState,
    }
    let backend = txn.get_database_backend();
    let mut deltas: BTreeMap<String, CounterDelta> = BTreeMap::new();
    for send_id in sends_with(txn, page_id, psid).await? {
        lock_send(txn, &send_id).await?;
        let mut sql = Sql::new(backend);
        sql.push("DELETE FROM deliveries WHERE send_id = ")
            .bind(send_id.as_str())
            .push(" AND psid = ")
            .bind(psid)
            .push(" RETURNING send_id, state");
        for gone in Gone::find_by_statement(sql.statement()).all(txn).await? {
            deltas
                .entry(gone.send_id)
                .or_default()
                .removed(gone.state, 1);
        }
    }
    let mut erased = 0;
    for (send_id, delta) in &deltas {
        erased += delta_rows(delta);
        update_send(txn, send_id, SendChange::counters(*delta), now).await?;
    }
    Ok(erased)
}

/// How many deliveries a removal delta stands for.
fn delta_rows(delta: &CounterDelta) -> u64 {
    u64::try_from(-delta.total).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{OptInState, SendState},
        store::{
            now_ms,
            testing::{TestStore, answer, retry, store_tests},
        },
    };

    async fn hold(t: &TestStore, psid: &str) -> u64 {
        t.txn(async |txn| hold_recipient(txn, "1", psid, now_ms()).await)
            .await
            .unwrap()
    }

    async fn erase(t: &TestStore, psid: &str) -> u64 {
        t.txn(async |txn| erase_recipient(txn, "1", psid, now_ms()).await)
            .await
            .unwrap()
    }

    #[test]
    fn a_removal_stands_for_as_many_deliveries_as_the_total_lost() {
        let mut delta = CounterDelta::default();
        delta.removed(DeliveryState::Sent, 1);
        delta.removed(DeliveryState::Pending, 2);
        assert_eq!((delta_rows(&delta), delta.sent), (3, -1));
        assert_eq!(delta_rows(&CounterDelta::default()), 0);
    }

    store_tests! {
        /// Held back, a user's waiting deliveries end as a cancel ends them (their opt-ins
        /// back, or spent where an earlier attempt may have landed); a second hold finds
        /// nothing more to end.
        async fn holding_a_recipient_back_twice_ends_their_pending_deliveries_once(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["u", "v"]).await;
            t.record(&fence, &[answer(&send.id, &claimed[0], retry(0, false))])
                .await;
            assert_eq!(hold(&t, "u").await, 0);
            let rows = t.deliveries(&send.id).await;
            assert_eq!(
                (rows[0].state, rows[1].state),
                (DeliveryState::Skipped, DeliveryState::InFlight)
            );
            assert_eq!(
                t.opt_in_row(claimed[0].optin_id.unwrap()).await.state,
                OptInState::Active
            );
            let row = t.send_row(&send.id).await;
            assert_eq!(
                (row.skipped, row.in_flight, row.state),
                (1, 1, SendState::Running)
            );
            assert_eq!(hold(&t, "u").await, 0);
            assert_eq!(
                (t.send_row(&send.id).await, t.deliveries(&send.id).await),
                (row, rows)
            );
        }

        async fn holding_back_a_delivery_that_may_have_landed_spends_its_token(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["u"]).await;
            t.record(&fence, &[answer(&send.id, &claimed[0], retry(0, true))])
                .await;
            hold(&t, "u").await;
            assert_eq!(
                t.delivery(claimed[0].id).await.state,
                DeliveryState::Unknown
            );
            assert_eq!(
                t.opt_in_row(claimed[0].optin_id.unwrap()).await.state,
                OptInState::Used
            );
        }

        /// What is on its way cannot be held back: it is counted (the erasure waits for it)
        /// and left to its answer.
        async fn holding_back_counts_what_is_in_flight_and_leaves_it(t) {
            let page = t.page("1").await;
            let (send, _, _) = t.claimed_send(&page, "news", &["u"]).await;
            let (other, _, _) = t.claimed_send(&page, "sport", &["u"]).await;
            assert_eq!(hold(&t, "u").await, 2);
            assert_eq!(
                t.deliveries(&send.id).await[0].state,
                DeliveryState::InFlight
            );
            assert_eq!(t.send_row(&other.id).await.in_flight, 1);
        }

        /// The user's deliveries go from every send of the page, and each send's counters
        /// with them; erased twice, nothing more goes.
        async fn erasing_a_recipient_twice_deletes_their_deliveries_once(t) {
            let page = t.page("1").await;
            let send = t.delivered_send(&page, "news", &["u", "v"]).await;
            assert_eq!(erase(&t, "u").await, 1);
            let row = t.send_row(&send.id).await;
            assert_eq!(
                (row.total, row.sent, row.state),
                (1, 1, SendState::Completed)
            );
            assert_eq!(erase(&t, "u").await, 0);
            assert_eq!(t.send_row(&send.id).await, row);
            let left = t.recipients(&send.id).await;
            assert_eq!(left, ["v"]);
        }
    }
}
