//! A recipient erased from every send of the page: their deliveries go, and each send's counters
//! with them, so that the counters still equal the rows.

use std::collections::BTreeMap;

use sea_orm::{DatabaseTransaction, FromQueryResult};

use super::{CounterDelta, lock_send, update_send};
use crate::{
    domain::DeliveryState,
    store::{StoreError, sql::Sql},
};

/// Deletes the user's deliveries from every send of the page, in the caller's transaction; the
/// sends they belong to are locked first (in id order, as every writer of several sends does).
/// A delivery in flight goes too: its answer, when it comes, finds nothing to record. Returns how
/// many deliveries were deleted.
pub async fn erase_recipient(
    txn: &DatabaseTransaction,
    page_id: &str,
    psid: &str,
    now: i64,
) -> Result<u64, StoreError> {
    use sea_orm::ConnectionTrait;
    #[derive(FromQueryResult)]
    struct SendOf {
        send_id: String,
    }
    #[derive(FromQueryResult)]
    struct Gone {
        send_id: String,
        state: DeliveryState,
    }
    let backend = txn.get_database_backend();
    // Through each send's (send_id, psid) key: deliveries have no index by page and user.
    let mut sql = Sql::new(backend);
    sql.push(
        "SELECT DISTINCT d.send_id AS send_id FROM deliveries d JOIN sends s ON s.id = d.send_id \
         WHERE s.page_id = ",
    )
    .bind(page_id)
    .push(" AND d.psid = ")
    .bind(psid)
    .push(" ORDER BY d.send_id");
    let sends = SendOf::find_by_statement(sql.statement()).all(txn).await?;
    let mut deltas: BTreeMap<String, CounterDelta> = BTreeMap::new();
    for send in &sends {
        lock_send(txn, &send.send_id).await?;
        let mut sql = Sql::new(backend);
        sql.push("DELETE FROM deliveries WHERE send_id = ")
            .bind(send.send_id.as_str())
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
        update_send(txn, send_id, *delta, None, now).await?;
    }
    Ok(erased)
}

/// How many deliveries a removal delta stands for.
fn delta_rows(delta: &CounterDelta) -> u64 {
    u64::try_from(-delta.total).unwrap_or(0)
}
