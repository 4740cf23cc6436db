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
/// another instance may take it at once.
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
