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
