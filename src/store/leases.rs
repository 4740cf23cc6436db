//! Page leases: which instance runs which page's actor (see the `leases` migration). Ownership
//! only ever changes in one conditional statement, never by a read and then a write, and every
//! change of owner raises the page's generation; a [`Fence`] carries the generation its owner
//! was given and is checked inside every transaction that writes the page's deliveries.
//!
//! Every time a lease or a heartbeat is written or compared with is the database's own clock,
//! never an instance's: instances whose clocks disagree (one running seconds ahead would find
//! live leases expired at every round, and take them) all judge by the same one.

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, FromQueryResult, TransactionTrait,
};

use super::{StoreError, sql::Sql};

/// The database's clock, in milliseconds since the Unix epoch, as SQL: the one clock every
/// instance judges leases by. (`clock_timestamp()`, not `now()`: a transaction's start time
/// would lag in a long transaction.)
fn db_now(backend: DatabaseBackend) -> &'static str {
    match backend {
        DatabaseBackend::Postgres => {
            "(CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT))"
        }
        _ => "(CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER))",
    }
}

/// The right to write one page's deliveries, as granted at `generation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub page_id: String,
    pub owner: String,
    pub generation: i64,
}

#[derive(FromQueryResult)]
struct Granted {
    page_id: String,
    generation: i64,
}

impl Fence {
    /// Fails with [`StoreError::Fenced`] unless the lease still carries this fence's owner and
    /// generation. The no-op update locks the lease row until the caller's transaction ends
    /// (on PostgreSQL), so a takeover waits for a write that passed the check to commit, and
    /// every write after the takeover fails it.
    pub async fn check(&self, db: &impl ConnectionTrait) -> Result<(), StoreError> {
        if db.get_database_backend() == DatabaseBackend::Sqlite {
            // One instance per SQLite file (its instance lock), whose leases never change
            // hands: the check could only pass, and it would cost every step a statement on
            // the one connection all pages share.
            return Ok(());
        }
        let mut sql = Sql::new(db.get_database_backend());
        sql.push("UPDATE page_leases SET generation = generation WHERE page_id = ")
            .bind(self.page_id.as_str())
            .push(" AND owner = ")
            .bind(self.owner.as_str())
            .push(" AND generation = ")
            .bind(self.generation);
        match db.execute_raw(sql.statement()).await?.rows_affected() {
            1 => Ok(()),
            _ => Err(StoreError::Fenced),
        }
    }
}

/// Takes the page for `owner` when nobody holds an unexpired lease on it, or when `owner`
/// itself does (an instance restarted under the same id takes its pages back at once); the
/// generation goes up either way. `None`: another instance holds it.
pub async fn acquire(
    db: &DatabaseConnection,
    page_id: &str,
    owner: &str,
    ttl_ms: i64,
) -> Result<Option<Fence>, StoreError> {
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return try_acquire(db, page_id, owner, ttl_ms).await;
    }
    // The old owner's fence check locks the lease row for the length of its transaction. An
    // owner frozen inside one (a paused process or VM) would hold the takeover off forever:
    // wait a moment, then end the expired holder's sessions (its open transactions roll back,
    // so nothing of them lands) and try again at the next round.
    let txn = db.begin().await?;
    txn.execute_unprepared("SET LOCAL lock_timeout = '250ms'")
        .await?;
    match try_acquire(&txn, page_id, owner, ttl_ms).await {
        Ok(granted) => {
            txn.commit().await?;
            Ok(granted)
        }
        Err(StoreError::Db(err)) if is_lock_timeout(&err) => {
            drop(txn);
            let mut holder = Sql::new(DatabaseBackend::Postgres);
            holder
                .push(
                    "SELECT pg_terminate_backend(a.pid) AS ended FROM pg_stat_activity a \
                     JOIN page_leases l ON a.application_name = ",
                )
                .bind(APPLICATION_NAME_PREFIX)
                .push(
                    " || l.owner WHERE a.datname = current_database() \
                     AND a.pid <> pg_backend_pid() AND l.page_id = ",
                )
                .bind(page_id)
                .push(" AND l.owner <> ")
                .bind(owner)
                .push(" AND l.expires_at <= ")
                .push(db_now(DatabaseBackend::Postgres))
                // Only an owner that stopped beating too (frozen or cut off): a live one that
                // handed the page over is finishing a transaction and is left to it.
                .push(
                    " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = l.owner \
                     AND i.heartbeat_at > ",
                )
                .push(db_now(DatabaseBackend::Postgres))
                .push(" - ")
                .bind(ttl_ms)
                .push(")");
            let ended = db.query_all_raw(holder.statement()).await?.len();
            if ended > 0 {
                tracing::warn!(
                    page_id,
                    sessions = ended,
                    "the page's expired owner is stuck in a transaction: its sessions were ended"
                );
            }
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Takes as many of `page_ids` as nobody else holds, as [`acquire`] takes one, in one statement
/// (one transaction on the one writer, rather than one for each page: a thousand pages that
/// start sending at once would otherwise queue a thousand commits behind their own steps). On
/// PostgreSQL, should a row be locked by an owner's step for longer than a moment, the pages
/// are taken one by one instead, which deals with a stuck owner.
pub async fn acquire_many(
    db: &DatabaseConnection,
    page_ids: &[&str],
    owner: &str,
    ttl_ms: i64,
) -> Result<Vec<Fence>, StoreError> {
    let mut pages: Vec<&str> = page_ids.to_vec();
    // Sorted and without repeats: one statement cannot take a row twice, and instances that
    // take overlapping pages lock them in the same order.
    pages.sort_unstable();
    pages.dedup();
    if pages.is_empty() {
        return Ok(Vec::new());
    }
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return try_acquire_many(db, &pages, owner, ttl_ms).await;
    }
    let txn = db.begin().await?;
    txn.execute_unprepared("SET LOCAL lock_timeout = '250ms'")
        .await?;
    match try_acquire_many(&txn, &pages, owner, ttl_ms).await {
        Ok(granted) => {
            txn.commit().await?;
            Ok(granted)
        }
        Err(StoreError::Db(err)) if is_lock_timeout(&err) => {
            drop(txn);
            let mut granted = Vec::new();
            for page_id in pages {
                granted.extend(acquire(db, page_id, owner, ttl_ms).await?);
            }
            Ok(granted)
        }
        Err(err) => Err(err),
    }
}

/// Prefix of the PostgreSQL `application_name` of an instance's connections (then its name),
/// by which a stuck instance's sessions are found.
pub const APPLICATION_NAME_PREFIX: &str = "otnd:";

fn is_lock_timeout(err: &DbErr) -> bool {
    super::has_sqlstate(err, "55P03")
}

async fn try_acquire(
    db: &impl ConnectionTrait,
    page_id: &str,
    owner: &str,
    ttl_ms: i64,
) -> Result<Option<Fence>, StoreError> {
    Ok(try_acquire_many(db, &[page_id], owner, ttl_ms).await?.pop())
}

async fn try_acquire_many(
    db: &impl ConnectionTrait,
    page_ids: &[&str],
    owner: &str,
    ttl_ms: i64,
) -> Result<Vec<Fence>, StoreError> {
    let backend = db.get_database_backend();
    let mut sql = Sql::new(backend);
    sql.push("INSERT INTO page_leases (page_id, owner, generation, expires_at) VALUES ");
    for (i, page_id) in page_ids.iter().enumerate() {
        sql.push(if i == 0 { "(" } else { ", (" })
            .bind(*page_id)
            .push(", ")
            .bind(owner)
            .push(", 1, ")
            .push(db_now(backend))
            .push(" + ")
            .bind(ttl_ms)
            .push(")");
    }
    sql.push(
        " ON CONFLICT (page_id) DO UPDATE SET owner = excluded.owner, \
         generation = page_leases.generation + 1, expires_at = excluded.expires_at \
         WHERE page_leases.owner = excluded.owner OR page_leases.expires_at <= ",
    )
    .push(db_now(backend))
    .push(" RETURNING page_id, generation");
    granted(db, &sql, owner).await
}

/// Runs a statement that returns `page_id, generation` of leases now `owner`'s: their fences.
async fn granted(
    db: &impl ConnectionTrait,
    sql: &Sql,
    owner: &str,
) -> Result<Vec<Fence>, StoreError> {
    let rows = Granted::find_by_statement(sql.statement()).all(db).await?;
    Ok(rows
        .into_iter()
        .map(|g| Fence {
            page_id: g.page_id,
            owner: owner.to_string(),
            generation: g.generation,
        })
        .collect())
}

/// Extends every unexpired lease `owner` holds; returns them. A lease that expired is not
/// revived (another instance may have taken it, or may be about to): it must be acquired
/// again, with a new generation.
pub async fn renew(
    db: &impl ConnectionTrait,
    owner: &str,
    ttl_ms: i64,
) -> Result<Vec<Fence>, StoreError> {
    let backend = db.get_database_backend();
    let mut sql = Sql::new(backend);
    sql.push("UPDATE page_leases SET expires_at = ")
        .push(db_now(backend))
        .push(" + ")
        .bind(ttl_ms)
        .push(" WHERE owner = ")
        .bind(owner)
        .push(" AND expires_at > ")
        .push(db_now(backend))
        .push(" RETURNING page_id, generation");
    granted(db, &sql, owner).await
}

/// Gives the page up (its actor has stopped and recorded what it had in flight), so that
/// another instance may take it at once; `false` when it was no longer held under the fence
/// (given up already, expired, or taken since).
pub async fn release(db: &impl ConnectionTrait, fence: &Fence) -> Result<bool, StoreError> {
    Ok(release_many(db, std::slice::from_ref(fence)).await? == 1)
}

/// Gives many pages up at once, as [`release`] gives up one, in one statement per few hundred;
/// returns how many were still held under the fences given.
pub async fn release_many(db: &impl ConnectionTrait, fences: &[Fence]) -> Result<u64, StoreError> {
    let mut released = 0;
    for chunk in fences.chunks(500) {
        let mut sql = Sql::new(db.get_database_backend());
        sql.push("UPDATE page_leases SET expires_at = 0 WHERE ");
        for (i, fence) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { " OR (" })
                .push("page_id = ")
                .bind(fence.page_id.as_str())
                .push(" AND owner = ")
                .bind(fence.owner.as_str())
                .push(" AND generation = ")
                .bind(fence.generation)
                .push(" AND expires_at > ")
                .push(db_now(db.get_database_backend()))
                .push(")");
        }
        released += db.execute_raw(sql.statement()).await?.rows_affected();
    }
    Ok(released)
}

/// Pages whose unexpired lease another instance holds: page -> owner.
pub async fn held_by_others(
    db: &impl ConnectionTrait,
    owner: &str,
) -> Result<std::collections::HashMap<String, String>, StoreError> {
    #[derive(FromQueryResult)]
    struct Held {
        page_id: String,
        owner: String,
    }
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT page_id, owner FROM page_leases WHERE owner <> ")
        .bind(owner)
        .push(" AND expires_at > ")
        .push(db_now(db.get_database_backend()));
    let rows = Held::find_by_statement(sql.statement()).all(db).await?;
    Ok(rows.into_iter().map(|h| (h.page_id, h.owner)).collect())
}

/// Records that `instance` is alive.
pub async fn heartbeat(db: &impl ConnectionTrait, instance: &str) -> Result<(), StoreError> {
    let backend = db.get_database_backend();
    let mut sql = Sql::new(backend);
    sql.push("INSERT INTO instances (id, started_at, heartbeat_at) VALUES (")
        .bind(instance)
        .push(", ")
        .push(db_now(backend))
        .push(", ")
        .push(db_now(backend))
        .push(") ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at");
    db.execute_raw(sql.statement()).await?;
    Ok(())
}

/// Instances that beat within the last `ttl_ms` (this one included once it has beaten).
pub async fn live_instances(db: &impl ConnectionTrait, ttl_ms: i64) -> Result<u64, StoreError> {
    #[derive(FromQueryResult)]
    struct Count {
        n: i64,
    }
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT COUNT(*) AS n FROM instances WHERE heartbeat_at > ")
        .push(db_now(db.get_database_backend()))
        .push(" - ")
        .bind(ttl_ms);
    let count = Count::find_by_statement(sql.statement())
        .one(db)
        .await?
        .map_or(0, |c| c.n);
    Ok(count.max(0) as u64)
}

/// Removes the instance's heartbeat on a clean shutdown, so the others count it out at once.
pub async fn leave(db: &impl ConnectionTrait, instance: &str) -> Result<(), StoreError> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("DELETE FROM instances WHERE id = ").bind(instance);
    db.execute_raw(sql.statement()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::testing::{TestStore, postgres_tests, store_tests};

    const TTL: i64 = 60_000;
    /// A lease written with this TTL expired before it was written.
    const EXPIRED: i64 = -60_000;

    /// The page's lease as stored: owner and generation, and whether it is live now.
    async fn lease(t: &TestStore, page_id: &str) -> Option<(String, i64, bool)> {
        #[derive(FromQueryResult)]
        struct Row {
            owner: String,
            generation: i64,
            live: bool,
        }
        let mut sql = Sql::new(t.backend());
        sql.push("SELECT owner, generation, expires_at > ")
            .push(db_now(t.backend()))
            .push(" AS live FROM page_leases WHERE page_id = ")
            .bind(page_id);
        Row::find_by_statement(sql.statement())
            .one(t.db())
            .await
            .unwrap()
            .map(|r| (r.owner, r.generation, r.live))
    }

    fn held(owner: &str, generation: i64) -> Option<(String, i64, bool)> {
        Some((owner.to_string(), generation, true))
    }

    async fn take(t: &TestStore, page_id: &str, owner: &str, ttl: i64) -> Option<Fence> {
        acquire(t.db(), page_id, owner, ttl).await.unwrap()
    }

    store_tests! {
        async fn a_free_page_is_taken_at_generation_one(t) {
            let fence = take(&t, "p1", "a", TTL).await.unwrap();
            assert_eq!((fence.owner.as_str(), fence.generation), ("a", 1));
            assert_eq!(lease(&t, "p1").await, held("a", 1));
        }

        /// An instance restarted under its id takes its pages back at once, under a new
        /// generation: whatever its earlier life still had running is fenced off.
        async fn taking_a_page_again_as_its_owner_raises_the_generation(t) {
            take(&t, "p1", "a", TTL).await.unwrap();
            let again = take(&t, "p1", "a", TTL).await.unwrap();
            assert_eq!(again.generation, 2);
            assert_eq!(lease(&t, "p1").await, held("a", 2));
        }

        async fn a_page_another_owner_holds_is_not_taken_and_its_lease_is_unchanged(t) {
            take(&t, "p1", "a", TTL).await.unwrap();
            assert_eq!(take(&t, "p1", "b", TTL).await, None);
            assert_eq!(lease(&t, "p1").await, held("a", 1));
        }

        async fn an_expired_lease_passes_to_the_next_owner_under_a_new_generation(t) {
            take(&t, "p1", "a", EXPIRED).await.unwrap();
            let fence = take(&t, "p1", "b", TTL).await.unwrap();
            assert_eq!((fence.owner.as_str(), fence.generation), ("b", 2));
            assert_eq!(lease(&t, "p1").await, held("b", 2));
        }

        /// Many pages in one statement: each taken once (repeats and order do not matter), the
        /// ones another instance holds left to it.
        async fn taking_many_pages_takes_each_free_one_once_and_leaves_the_held_ones(t) {
            take(&t, "p2", "b", TTL).await.unwrap();
            let fences = acquire_many(t.db(), &["p3", "p1", "p2", "p1"], "a", TTL)
                .await
                .unwrap();
            let mut taken: Vec<(&str, i64)> = fences
                .iter()
                .map(|f| (f.page_id.as_str(), f.generation))
                .collect();
            taken.sort();
            assert_eq!(taken, [("p1", 1), ("p3", 1)]);
            assert_eq!(lease(&t, "p2").await, held("b", 1));
            assert!(
                acquire_many(t.db(), &[], "a", TTL)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }

        /// A lease that expired may already be another's: renewing it would hand the page to
        /// two owners, so only live leases are extended.
        async fn renewing_extends_live_leases_and_never_revives_an_expired_one(t) {
            take(&t, "p1", "a", TTL).await.unwrap();
            take(&t, "p2", "a", EXPIRED).await.unwrap();
            take(&t, "p3", "b", TTL).await.unwrap();
            let renewed = renew(t.db(), "a", TTL).await.unwrap();
            assert_eq!(
                renewed,
                [Fence {
                    page_id: "p1".into(),
                    owner: "a".into(),
                    generation: 1
                }]
            );
            assert_eq!(lease(&t, "p2").await, Some(("a".into(), 1, false)));
            assert_eq!(lease(&t, "p3").await, held("b", 1));
        }

        async fn releasing_a_lease_twice_releases_it_once(t) {
            let fence = take(&t, "p1", "a", TTL).await.unwrap();
            assert!(release(t.db(), &fence).await.unwrap());
            assert!(!release(t.db(), &fence).await.unwrap());
            assert_eq!(lease(&t, "p1").await, Some(("a".into(), 1, false)));
            // Given up: another instance takes it at once.
            assert_eq!(take(&t, "p1", "b", TTL).await.unwrap().generation, 2);
        }

        /// A fence from an earlier generation (or another owner) releases nothing: the page's
        /// current owner keeps it.
        async fn a_stale_fence_releases_nothing(t) {
            let old = take(&t, "p1", "a", TTL).await.unwrap();
            take(&t, "p1", "a", TTL).await.unwrap();
            assert!(!release(t.db(), &old).await.unwrap());
            let other = Fence {
                owner: "b".into(),
                ..old.clone()
            };
            assert_eq!(release_many(t.db(), &[old, other]).await.unwrap(), 0);
            assert_eq!(lease(&t, "p1").await, held("a", 2));
        }

        async fn releasing_many_counts_the_leases_still_held_under_their_fences(t) {
            let fences = acquire_many(t.db(), &["p1", "p2"], "a", TTL).await.unwrap();
            release(t.db(), &fences[0]).await.unwrap();
            assert_eq!(release_many(t.db(), &fences).await.unwrap(), 1);
            assert_eq!(lease(&t, "p2").await, Some(("a".into(), 1, false)));
        }

        async fn held_by_others_lists_only_live_leases_of_other_owners(t) {
            take(&t, "p1", "a", TTL).await.unwrap();
            take(&t, "p2", "b", TTL).await.unwrap();
            take(&t, "p3", "b", EXPIRED).await.unwrap();
            let held = held_by_others(t.db(), "a").await.unwrap();
            let expected = [("p2".to_string(), "b".to_string())];
            assert_eq!(held, std::collections::HashMap::from(expected));
        }

        async fn a_heartbeat_twice_counts_one_instance_and_leaving_twice_removes_it_once(t) {
            heartbeat(t.db(), "a").await.unwrap();
            heartbeat(t.db(), "a").await.unwrap();
            assert_eq!(live_instances(t.db(), TTL).await.unwrap(), 1);
            heartbeat(t.db(), "b").await.unwrap();
            assert_eq!(live_instances(t.db(), TTL).await.unwrap(), 2);
            leave(t.db(), "a").await.unwrap();
            leave(t.db(), "a").await.unwrap();
            assert_eq!(live_instances(t.db(), TTL).await.unwrap(), 1);
        }

        /// On PostgreSQL a fence holds only while the lease is at its owner and generation. On
        /// SQLite (one instance per file, leases never change hands) the check is skipped.
        async fn a_fence_holds_only_while_the_lease_is_at_its_generation(t) {
            let old = take(&t, "p1", "a", TTL).await.unwrap();
            let current = take(&t, "p1", "a", TTL).await.unwrap();
            assert!(current.check(t.db()).await.is_ok());
            let stale = old.check(t.db()).await;
            let foreign = Fence {
                owner: "b".into(),
                ..current.clone()
            }
            .check(t.db())
            .await;
            if t.is_postgres() {
                assert!(matches!(stale, Err(StoreError::Fenced)), "{stale:?}");
                assert!(matches!(foreign, Err(StoreError::Fenced)), "{foreign:?}");
            } else {
                assert!(stale.is_ok() && foreign.is_ok());
            }
            assert_eq!(
                lease(&t, "p1").await,
                held("a", 2),
                "a check writes nothing"
            );
        }
    }

    /// Tries to take the page until it is granted (the ended sessions release their locks
    /// as their backends exit), or fails at the deadline.
    async fn take_within_deadline(t: &TestStore, page_id: &str, owner: &str) -> Fence {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(fence) = take(t, page_id, owner, TTL).await {
                return fence;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page was never taken"
            );
        }
    }

    /// Instance `old` holds page `p1` under an expired lease and is frozen inside a transaction
    /// that checked its fence, so it holds the lease row locked. The store is returned with the
    /// transaction: its sessions must outlive the test's steps.
    async fn stuck_owner(t: &TestStore) -> (crate::store::Store, sea_orm::DatabaseTransaction) {
        let old = t.instance("old").await;
        let fence = acquire(&old.db, "p1", "old", EXPIRED)
            .await
            .unwrap()
            .unwrap();
        let stuck = old.db.begin().await.unwrap();
        fence.check(&stuck).await.unwrap();
        (old, stuck)
    }

    postgres_tests! {
        /// An expired owner frozen inside a transaction that checked its fence holds the lease
        /// row locked: the takeover ends its sessions (its transaction rolls back) and takes
        /// the page at a later round.
        async fn a_takeover_ends_an_expired_owner_stuck_in_a_transaction(t) {
            let (_old, stuck) = stuck_owner(&t).await;
            assert_eq!(take(&t, "p1", "new", TTL).await, None, "the row is locked");
            let taken = take_within_deadline(&t, "p1", "new").await;
            assert_eq!(taken.generation, 2);
            assert!(
                stuck.commit().await.is_err(),
                "the stuck transaction was ended"
            );
        }

        /// An expired owner that still beats is finishing a transaction it began while it held
        /// the page: it is left to finish, and the page is taken once it has.
        async fn a_takeover_leaves_a_live_owner_to_finish_its_transaction(t) {
            let old = t.instance("old").await;
            heartbeat(&old.db, "old").await.unwrap();
            let fence = acquire(&old.db, "p1", "old", EXPIRED)
                .await
                .unwrap()
                .unwrap();
            let finishing = old.db.begin().await.unwrap();
            fence.check(&finishing).await.unwrap();
            assert_eq!(take(&t, "p1", "new", TTL).await, None);
            assert_eq!(take(&t, "p1", "new", TTL).await, None);
            finishing
                .commit()
                .await
                .expect("its transaction was left alone");
            assert_eq!(take(&t, "p1", "new", TTL).await.unwrap().generation, 2);
        }

        /// Taking many pages in one statement waits a moment at most for a locked row: past
        /// that, they are taken one by one, the stuck one as `acquire` deals with it.
        async fn taking_many_pages_goes_one_by_one_past_a_stuck_owner(t) {
            let (_old, _stuck) = stuck_owner(&t).await;
            let taken = acquire_many(t.db(), &["p1", "p2"], "new", TTL)
                .await
                .unwrap();
            let pages: Vec<&str> = taken.iter().map(|f| f.page_id.as_str()).collect();
            assert_eq!(pages, ["p2"]);
            assert_eq!(take_within_deadline(&t, "p1", "new").await.generation, 2);
        }
    }
}
