//! Persistence: the only module that speaks SQL. One submodule per aggregate.

pub mod audience;
pub mod eligibility;
pub mod erasures;
pub mod leases;
pub mod meta;
pub mod notify;
pub mod optins;
pub mod pages;
#[cfg(any(test, feature = "testing"))]
pub mod scratch;
pub mod sends;
mod sql;
mod stored;
pub mod stories;
#[cfg(test)]
pub(crate) mod testing;
mod writer;

use std::{
    fs::File,
    io::{Read, Write},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ConnectOptions, Database, DatabaseConnection, DatabaseTransaction, DbErr, SqlErr,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};

use crate::config::DatabaseUrl;
use writer::{Committer, WriterThread};

pub use writer::Shared;

/// How long a SQLite writer waits for another writer before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite page cache per connection, in KiB.
const SQLITE_CACHE_KIB: u32 = 16 * 1024;

/// SQLite connections that only read (WAL readers, beside the one writer): for the API, and
/// for the engine's own reads. Apart, so that an operator's GetSend never queues behind the
/// reads of a thousand pages' first steps.
const SQLITE_READERS: u32 = 4;
const SQLITE_ENGINE_READERS: u32 = 2;

/// PostgreSQL connections for the API's reads, beside the pool everything else uses.
const POSTGRES_API_READERS: u32 = 4;

/// A reader's page cache, in KiB: SQLite's default. A reader starting a read after any commit
/// drops its whole cache (WAL), so a larger one only costs memory and the time to empty it.
const SQLITE_READER_CACHE_KIB: u32 = 2 * 1024;

/// The connection pools, and what the service needs to know about the backend.
#[derive(Clone, Debug)]
pub struct Store {
    /// Where everything is written (and what is read inside a write). On SQLite one connection:
    /// SQLite takes one writer at a time, and writers waiting here queue in order and are
    /// handed the connection the moment it is free, where writers on connections of their own
    /// would wait in SQLite's busy handler, which sleeps (up to 100 ms at a time) past the
    /// moment the lock is released: with many pages writing, most of the time went to sleep.
    pub db: DatabaseConnection,
    /// Reads outside a write (the API's Get and List calls): connections of their own, which
    /// on SQLite WAL lets read while the writer writes.
    pub read: DatabaseConnection,
    /// The engine's reads outside a write (a page's sends and settings, the lease rounds): on
    /// SQLite, connections of their own; on PostgreSQL, the writers' pool.
    pub engine_read: DatabaseConnection,
    /// On SQLite, the thread that drives every transaction on the writer (see [`Store::write`]).
    writer: Option<WriterThread>,
    /// On SQLite, where works are queued to be committed together (see [`Store::transact`]).
    committer: Option<Committer>,
    /// On SQLite, the lock that keeps a second otnd off the same file: released by `close`, or
    /// with the last clone of the store, or by the OS when the process dies.
    instance_lock: Option<Arc<std::sync::Mutex<Option<File>>>>,
}

/// Takes the SQLite database's instance lock (`<file>.lock`), or says who holds it. One page
/// actor per page is what makes each token be used once; two processes on one file would each
/// run their own. More instances need PostgreSQL (and its page leases).
fn lock_sqlite_instance(database: &Path) -> anyhow::Result<File> {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("Failed to open the instance lock {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the message the next one prints.
            file.set_len(0)?;
            write!(file, "{}", std::process::id())?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!(
                "another otnd (pid {}) is already serving the SQLite database {}: SQLite takes one \
                 instance; stop that one first, or run several instances on PostgreSQL",
                holder.trim(),
                database.display()
            )
        }
        Err(std::fs::TryLockError::Error(err)) => {
            Err(err).with_context(|| format!("Failed to lock the instance lock {}", path.display()))
        }
    }
}

impl Store {
    /// The store a serving instance uses: on a SQLite file, only once the instance lock is
    /// held (see [`lock_sqlite_instance`]).
    pub async fn connect_serving(url: &DatabaseUrl, instance: &str) -> anyhow::Result<Self> {
        let instance_lock = match url {
            DatabaseUrl::Sqlite(raw) => match sqlite_file(raw)? {
                Some(file) => Some(Arc::new(std::sync::Mutex::new(Some(lock_sqlite_instance(
                    &file,
                )?)))),
                None => None,
            },
            DatabaseUrl::Postgres(_) => None,
        };
        let mut store = Store::open(url, Some(instance)).await?;
        store.instance_lock = instance_lock;
        Ok(store)
    }

    /// A store without the instance lock: for migrations, tools and inspection.
    pub async fn connect(url: &DatabaseUrl) -> anyhow::Result<Self> {
        Store::open(url, None).await
    }

    async fn open(url: &DatabaseUrl, instance: Option<&str>) -> anyhow::Result<Self> {
        let mut options = ConnectOptions::new(url.connection_string());
        // sqlx logs every statement at info by default: too loud, and statements carry values.
        options.sqlx_logging(false);
        options.acquire_timeout(Duration::from_secs(10));
        options.connect_timeout(Duration::from_secs(10));
        let mut readers = None;
        if let DatabaseUrl::Sqlite(raw) = url {
            // A pool pings a connection each time it hands it out, by default: on SQLite a
            // round trip to the connection's thread before every transaction and every read,
            // a sixth of the writer's round trips in S5, to test a file that cannot hang up.
            options.test_before_acquire(false);
            // Nor are its connections recycled (sqlx closes idle ones after 10 minutes and
            // every one after 30): a file gains nothing by it, and the writer's connection
            // would come back on whichever thread next asked for it, at that thread's priority
            // rather than the writer's (see `WriterThread`).
            options.idle_timeout(None).max_lifetime(None);
            // An in-memory database exists once per connection: it has no separate readers.
            if sqlite_file(raw)?.is_some() {
                let mut reading = options.clone();
                reading.map_sqlx_sqlite_opts(|opts| {
                    opts.busy_timeout(SQLITE_BUSY_TIMEOUT)
                        .foreign_keys(true)
                        .pragma("cache_size", format!("-{}", SQLITE_READER_CACHE_KIB))
                });
                // Opened now, from here: a connection's SQLite thread runs at the priority of
                // the thread that opens it, and a reader opened by the engine's writer would
                // serve the API's reads at the engine's lower one. (Only when serving: a tool,
                // such as `otnd migrate`, has no engine and opens what it uses.)
                let serving = instance.is_some();
                let pool = |n: u32| {
                    let mut pool = reading.clone();
                    pool.max_connections(n)
                        .min_connections(if serving { n } else { 0 });
                    pool
                };
                readers = Some((pool(SQLITE_READERS), pool(SQLITE_ENGINE_READERS)));
            }
            options.max_connections(1);
            options.map_sqlx_sqlite_opts(|opts| {
                opts.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .foreign_keys(true)
                    // SQLite's default page cache is 2 MiB: a send's working set (opt-ins,
                    // deliveries and their indexes) would be read again from the OS on every
                    // step. Per connection, allocated only as pages are touched.
                    .pragma("cache_size", format!("-{}", SQLITE_CACHE_KIB))
            });
        } else {
            options.max_connections(20);
            if let Some(instance) = instance {
                // How a stuck instance's sessions are found and ended (see leases::acquire).
                let name = format!("{}{instance}", leases::APPLICATION_NAME_PREFIX);
                options.map_sqlx_postgres_opts(move |opts| opts.application_name(&name));
            }
        }
        let options_for_reads = options.clone();
        let writer = match url {
            DatabaseUrl::Sqlite(_) => Some(WriterThread::start()?),
            DatabaseUrl::Postgres(_) => None,
        };
        let connecting = Database::connect(options);
        let connected = match &writer {
            // SQLite's worker thread for the connection is started by the thread that opens it,
            // and runs at its priority: the writer's, an engine thread's.
            Some(writer) => writer
                .runtime
                .spawn(connecting)
                .await
                .context("The database writer's thread stopped while connecting")?,
            None => connecting.await,
        };
        let db = connected
            .with_context(|| format!("Failed to connect to the {} database", url.backend_name()))?;
        let (read, engine_read) = match readers {
            Some((api, engine)) => (
                Database::connect(api)
                    .await
                    .context("Failed to open the SQLite database's readers")?,
                Database::connect(engine)
                    .await
                    .context("Failed to open the SQLite database's readers")?,
            ),
            // PostgreSQL: the API's reads get a few connections of their own (while a
            // thousand pages step, every connection of the shared pool is taken, and a GetSend
            // waited seconds for one); the engine's share the writers' pool.
            None if matches!(url, DatabaseUrl::Postgres(_)) => {
                let mut api = options_for_reads;
                api.max_connections(POSTGRES_API_READERS);
                let read = Database::connect(api)
                    .await
                    .context("Failed to open the PostgreSQL readers' pool")?;
                (read, db.clone())
            }
            None => (db.clone(), db.clone()),
        };
        let committer = writer.as_ref().map(|w| w.committer(db.clone()));
        Ok(Store {
            db,
            read,
            engine_read,
            writer,
            committer,
            instance_lock: None,
        })
    }

    /// Runs `work`, a transaction on [`Store::db`], where writes are driven: on SQLite, on the
    /// writer's own thread; on PostgreSQL (many connections, each driven where it is awaited),
    /// here. Once begun, `work` runs to its end even if the caller stops waiting: a step's
    /// transaction is never cut off between its statements by a caller that went away.
    pub async fn write<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        match &self.writer {
            None => work.await,
            Some(writer) => writer.runtime.spawn(work).await.map_err(|err| {
                StoreError::Db(DbErr::Custom(format!(
                    "the database writer's thread stopped: {err}"
                )))
            })?,
        }
    }

    /// Runs `work` in a write transaction on [`Store::db`] and answers once it is committed. On
    /// SQLite the works queued while the writer is busy are committed together, in one
    /// transaction, in the order they came: a thousand pages' steps take a few dozen commits
    /// (each a round trip, and a write of every page of the file it changed) rather than a
    /// thousand. A group whose work fails is rolled back and its works run again each alone,
    /// so `work` may run twice, the first time in a transaction that never commits: it must
    /// change nothing but rows. Each run is given its own copy of `context` (what the work
    /// needs of the caller's). On PostgreSQL each work has a transaction of its own.
    pub async fn transact<C, T, F, Fut>(&self, context: C, work: F) -> Result<T, StoreError>
    where
        C: Clone + Send + 'static,
        T: Send + 'static,
        F: Fn(Shared, C) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        match &self.committer {
            Some(committer) => committer.transact(context, work).await,
            None => writer::alone(&self.db, context, work).await,
        }
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        Migrator::up(&self.db, None)
            .await
            .context("Failed to run database migrations")
    }

    pub async fn ping(&self) -> Result<(), DbErr> {
        self.db.ping().await
    }

    pub async fn close(self) {
        let _ = self.read.close().await;
        let _ = self.engine_read.close().await;
        let _ = self.db.close().await;
        // With every pool closed no clone can write any more: the file is free for the next
        // instance now, though a clone may outlive this one (a task or an actor not yet
        // dropped, in a process that goes on, such as one that embeds otnd).
        if let Some(lock) = &self.instance_lock {
            lock.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
        }
    }
}

/// The file a SQLite URL points at, or `None` for an in-memory database.
pub fn sqlite_file(url: &str) -> anyhow::Result<Option<PathBuf>> {
    let options = sea_orm::sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .with_context(|| "OTN_DATABASE_URL is not a SQLite URL sqlx understands".to_string())?;
    // sqlx opens `sqlite::memory:` as a database it names `file:sqlx-in-memory-<n>`: the name
    // asked for is read from the URL, as sqlx reads it.
    let asked = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or_default();
    let path = options.get_filename();
    let text = path.to_string_lossy();
    if text.is_empty() || asked == ":memory:" || url.contains("mode=memory") {
        return Ok(None);
    }
    Ok(Some(path.to_path_buf()))
}

/// Begins a transaction that writes. On SQLite it takes the write lock at once (`BEGIN
/// IMMEDIATE`): a transaction that began deferred, read, and then found at its first write that
/// another writer had committed since its read would fail at once (SQLITE_BUSY_SNAPSHOT, whatever
/// the busy timeout); begun immediate, it waits its turn instead. PostgreSQL ignores the mode.
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    })
    .await
}

/// Runs `work` in a write transaction of its own on `db` (see [`begin_write`]): committed if it
/// succeeds, rolled back if not.
pub async fn in_transaction<T>(
    db: &DatabaseConnection,
    work: impl AsyncFnOnce(&DatabaseTransaction) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let txn = begin_write(db).await?;
    match work(&txn).await {
        Ok(value) => {
            txn.commit().await?;
            Ok(value)
        }
        Err(err) => {
            let _ = txn.rollback().await;
            Err(err)
        }
    }
}

/// Milliseconds since the Unix epoch: how every time is stored.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Database errors, sorted into what the API must tell apart.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("already exists")]
    AlreadyExists,
    #[error("not found")]
    NotFound,
    /// The row changed (or moved to a state that forbids the write) since it was read.
    #[error("changed concurrently")]
    Conflict,
    /// Another row still refers to this one.
    #[error("still in use")]
    InUse,
    /// This instance no longer holds the page's lease at the generation it was given.
    #[error("the page's lease passed to another owner")]
    Fenced,
    /// A message to this recipient is on its way to Facebook; the request may be retried once
    /// it has been answered.
    #[error("a message to this recipient is in flight")]
    InFlight,
    #[error("a stored secret does not decrypt: {0}")]
    Sealed(#[from] crate::crypto::OpenError),
    #[error(transparent)]
    Db(DbErr),
}

impl From<DbErr> for StoreError {
    fn from(err: DbErr) -> Self {
        match err.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => StoreError::AlreadyExists,
            Some(SqlErr::ForeignKeyConstraintViolation(_)) => StoreError::InUse,
            _ if is_nul_in_text(&err) => StoreError::NotFound,
            _ => StoreError::Db(err),
        }
    }
}

/// PostgreSQL refuses a NUL character in text (SQLSTATE 22021), in a key looked up as much as
/// in a value stored. Values are validated before they reach the store; an id with a NUL in it
/// names nothing that can exist.
fn is_nul_in_text(err: &DbErr) -> bool {
    has_sqlstate(err, "22021")
}

/// Whether the database refused a statement with this SQLSTATE (e.g. `55P03`, lock timeout).
pub(crate) fn has_sqlstate(err: &DbErr, sqlstate: &str) -> bool {
    use sea_orm::RuntimeErr;
    match err {
        DbErr::Query(RuntimeErr::SqlxError(sqlx)) | DbErr::Exec(RuntimeErr::SqlxError(sqlx)) => {
            sqlx.as_database_error()
                .and_then(|db| db.code())
                .is_some_and(|code| code == sqlstate)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{PageId, StoryContent};
    use testing::store_tests;

    #[test]
    fn a_sqlite_url_names_its_file_and_an_in_memory_one_none() {
        let file = sqlite_file("sqlite:///var/lib/otnd/otnd.db?mode=rwc").unwrap();
        assert_eq!(file, Some(PathBuf::from("/var/lib/otnd/otnd.db")));
        assert_eq!(sqlite_file("sqlite::memory:").unwrap(), None);
        assert_eq!(sqlite_file("sqlite://:memory:").unwrap(), None);
        assert_eq!(sqlite_file("sqlite://shared.db?mode=memory").unwrap(), None);
    }

    /// One page actor per page is what keeps each token used once: a second instance on the
    /// file is refused, told who holds it, and may take it once the first lets go.
    #[test]
    fn a_second_instance_on_one_sqlite_file_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("otnd.db");
        let first = lock_sqlite_instance(&database).unwrap();
        let refused = lock_sqlite_instance(&database).unwrap_err().to_string();
        assert!(
            refused.contains(&format!("pid {}", std::process::id())),
            "{refused}"
        );
        drop(first);
        assert!(lock_sqlite_instance(&database).is_ok());
    }

    /// A story on `topic` of page 1, then `Conflict` if the work `fails`.
    async fn draft_then(
        db: &impl sea_orm::ConnectionTrait,
        topic: &str,
        fails: bool,
    ) -> Result<(), StoreError> {
        let page = PageId::from_trusted("1".into());
        let content = StoryContent::Text("Hi".into());
        let new = stories::NewStory {
            page_id: &page,
            topic,
            content: &content,
            include_window_users: false,
            segment_id: None,
            token_kinds: &[],
        };
        stories::create(db, new, now_ms()).await?;
        if fails {
            Err(StoreError::Conflict)
        } else {
            Ok(())
        }
    }

    async fn topics(t: &testing::TestStore) -> Vec<String> {
        let page = PageId::from_trusted("1".into());
        stories::list(t.db(), &page, None, None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.topic)
            .collect()
    }

    store_tests! {
        /// A transaction's work stands only if all of it succeeds.
        async fn work_in_a_transaction_stands_only_if_it_succeeds(t) {
            t.page("1").await;
            in_transaction(t.db(), async |txn| draft_then(txn, "kept", false).await)
                .await
                .unwrap();
            let failed =
                in_transaction(t.db(), async |txn| draft_then(txn, "dropped", true).await).await;
            assert!(matches!(failed, Err(StoreError::Conflict)));
            assert_eq!(topics(&t).await, ["kept"]);
        }

        /// The same through `transact`: on SQLite the writer's group commit, on PostgreSQL a
        /// transaction of the work's own.
        async fn transacted_work_stands_only_if_it_succeeds(t) {
            t.page("1").await;
            for (topic, fails) in [("kept", false), ("dropped", true)] {
                let outcome = t
                    .store
                    .transact((topic, fails), |txn, (topic, fails)| async move {
                        draft_then(&*txn, topic, fails).await
                    })
                    .await;
                assert_eq!(outcome.is_ok(), !fails);
            }
            assert_eq!(topics(&t).await, ["kept"]);
        }

        /// Refusals the API must tell apart: a missing parent, and an id that can name
        /// nothing (PostgreSQL refuses NUL in text; SQLite finds no such row).
        async fn database_refusals_are_sorted_into_what_the_api_tells_apart(t) {
            let page = t.page("1").await;
            let content = StoryContent::Text("Hi".into());
            let orphan = PageId::from_trusted("9".into());
            let new = stories::NewStory {
                page_id: &orphan,
                topic: "news",
                content: &content,
                include_window_users: false,
                segment_id: None,
                token_kinds: &[],
            };
            let refused = stories::create(t.db(), new, now_ms()).await;
            assert!(
                matches!(refused, Err(StoreError::InUse)),
                "{:?}",
                refused.err()
            );
            let nul = PageId::from_trusted("1\0".into());
            assert!(matches!(
                pages::get(t.db(), &nul).await,
                Err(StoreError::NotFound)
            ));
            assert!(pages::get(t.db(), &page).await.is_ok());
        }
    }
}
