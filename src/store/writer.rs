//! SQLite's one writer: a thread of its own that drives every write transaction, and commits the
//! work of callers that queue together in one transaction (group commit).

use std::sync::Arc;

use anyhow::Context;
use futures::future::BoxFuture;
use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr};
use tokio::sync::{mpsc, oneshot};

use super::{StoreError, begin_write};

/// A write transaction, shared by the works of a group. Each work holds a clone only while it
/// runs: the transaction is committed (which takes it back) once they all have.
pub type Shared = Arc<DatabaseTransaction>;

/// The most works committed together. Each waits for the group's commit: a bound keeps the
/// first one's wait short (a page's step takes about 2 ms in S5: a group of 32, some 60 ms).
const MAX_GROUP: usize = 32;

/// A thread of its own that drives the transactions on SQLite's one writer connection. A
/// transaction holds the connection from its BEGIN to its COMMIT, and each of its statements is
/// a round trip between the thread that awaits it and SQLite's worker thread. Awaited on the
/// engine's threads, which also make the HTTP calls of hundreds of pages, every round trip
/// waited its turn there while every other writer waited for the connection (S5: a thousand
/// small sends, 1.05x the peer before, about 1.3x after).
///
/// It runs at the API's priority, not the engine's: with many pages it is the one thing every
/// page waits for, and lowered it ran at a tenth of a busy core's share (S5: 1.63-1.82x the
/// peer at nice 10, 1.77-1.89x at nice 0, same runs).
#[derive(Clone, Debug)]
pub(super) struct WriterThread {
    pub(super) runtime: tokio::runtime::Handle,
    /// Dropped with the last clone of the store: the thread then ends.
    _stop: Arc<oneshot::Sender<()>>,
}

impl WriterThread {
    pub(super) fn start() -> anyhow::Result<Self> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready, started) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("otnd-db-writer".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = ready.send(Err(err));
                        return;
                    }
                };
                let _ = ready.send(Ok(runtime.handle().clone()));
                // Drives the spawned transactions until the store is dropped.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .context("Failed to start the database writer's thread")?;
        let runtime = started
            .recv()
            .context("The database writer's thread ended before it started")?
            .context("Failed to start the database writer's runtime")?;
        Ok(WriterThread {
            runtime,
            _stop: Arc::new(stop),
        })
    }

    /// Starts committing the works queued with [`Committer::transact`] on `db`, on this thread.
    pub(super) fn committer(&self, db: DatabaseConnection) -> Committer {
        let (jobs, queue) = mpsc::unbounded_channel();
        self.runtime.spawn(commit_groups(db, queue));
        Committer { jobs }
    }
}

/// Where works are queued for the writer's thread.
#[derive(Clone, Debug)]
pub(super) struct Committer {
    jobs: mpsc::UnboundedSender<Box<dyn Job>>,
}

impl Committer {
    /// See [`Store::transact`](super::Store::transact).
    pub(super) async fn transact<C, T, F, Fut>(&self, context: C, work: F) -> Result<T, StoreError>
    where
        C: Clone + Send + 'static,
        T: Send + 'static,
        F: Fn(Shared, C) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (job, answer) = Work::queued(context, work);
        self.jobs.send(job).map_err(|_| writer_stopped())?;
        answer.await.map_err(|_| writer_stopped())?
    }
}

fn writer_stopped() -> StoreError {
    StoreError::Db(DbErr::Custom(
        "the database writer's thread stopped".to_string(),
    ))
}

/// A queued work, with the type of its value erased so that works of any kind share a group.
trait Job: Send {
    /// Runs the work in `txn`, keeping its value for [`Job::answer`].
    fn run(&mut self, txn: Shared) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Hands the value (or `outcome`'s error) to whoever queued the work.
    fn answer(self: Box<Self>, outcome: Result<(), StoreError>);
}

/// A work and what it is given at each run: its own copy of `context`.
struct Work<C, T, F> {
    context: C,
    work: F,
    value: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

type Answer<T> = oneshot::Receiver<Result<T, StoreError>>;

impl<C, T, F> Work<C, T, F> {
    fn queued(context: C, work: F) -> (Box<Self>, Answer<T>) {
        let (reply, answer) = oneshot::channel();
        let work = Work {
            context,
            work,
            value: None,
            reply,
        };
        (Box::new(work), answer)
    }
}

impl<C, T, F, Fut> Job for Work<C, T, F>
where
    C: Clone + Send + 'static,
    T: Send + 'static,
    F: Fn(Shared, C) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    fn run(&mut self, txn: Shared) -> BoxFuture<'_, Result<(), StoreError>> {
        let running = (self.work)(txn, self.context.clone());
        Box::pin(async move {
            self.value = Some(running.await?);
            Ok(())
        })
    }

    fn answer(self: Box<Self>, outcome: Result<(), StoreError>) {
        let Work { value, reply, .. } = *self;
        let answer = outcome.and_then(|()| {
            value.ok_or_else(|| {
                StoreError::Db(DbErr::Custom("a work ended without its value".into()))
            })
        });
        // Whoever queued it may have stopped waiting: the work stands all the same.
        let _ = reply.send(answer);
    }
}

/// Takes what is queued, as one group, whenever the connection is free: under load the works
/// that queued while a group ran make the next one; alone, a work is a group of one.
async fn commit_groups(db: DatabaseConnection, mut queue: mpsc::UnboundedReceiver<Box<dyn Job>>) {
    while let Some(first) = queue.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        commit_group(&db, group).await;
    }
}

async fn commit_group(db: &DatabaseConnection, mut group: Vec<Box<dyn Job>>) {
    if group.len() == 1 {
        let mut job = group.pop().expect("a group of one");
        let outcome = run_alone(db, job.as_mut()).await;
        job.answer(outcome);
        return;
    }
    let txn = match begin_write(db).await {
        Ok(txn) => Arc::new(txn),
        // The next group would wait as long again (another process holds the file): every
        // work of this one is told, as each alone would have been.
        Err(err) => {
            answer_all(group, err);
            return;
        }
    };
    let mut failed = false;
    for job in group.iter_mut() {
        if job.run(txn.clone()).await.is_err() {
            failed = true;
            break;
        }
    }
    if failed {
        // What the failed work (or one before it) wrote must not stand with the others: each
        // runs again alone, and answers with what it finds then.
        if let Ok(txn) = Arc::try_unwrap(txn) {
            let _ = txn.rollback().await;
        }
        for mut job in group {
            let outcome = run_alone(db, job.as_mut()).await;
            job.answer(outcome);
        }
        return;
    }
    match end(txn, true).await {
        Ok(()) => {
            for job in group {
                job.answer(Ok(()));
            }
        }
        // Whether a failed COMMIT landed is unknown, to the group as to one work alone: each
        // is told, and deals with it as with its own.
        Err(err) => answer_all(group, err),
    }
}

/// Runs `work` in a transaction of its own, here: committed if it succeeds, rolled back if not.
pub(super) async fn alone<C, T, F, Fut>(
    db: &DatabaseConnection,
    context: C,
    work: F,
) -> Result<T, StoreError>
where
    C: Clone + Send + 'static,
    T: Send + 'static,
    F: Fn(Shared, C) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let (mut job, answer) = Work::queued(context, work);
    let outcome = run_alone(db, job.as_mut()).await;
    job.answer(outcome);
    answer.await.map_err(|_| writer_stopped())?
}

/// Runs one work in a transaction of its own: committed if it succeeds, rolled back if not.
async fn run_alone(db: &DatabaseConnection, job: &mut dyn Job) -> Result<(), StoreError> {
    let txn = Arc::new(begin_write(db).await?);
    let outcome = job.run(txn.clone()).await;
    match outcome {
        Ok(()) => end(txn, true).await.map_err(StoreError::from),
        Err(err) => {
            let _ = end(txn, false).await;
            Err(err)
        }
    }
}

/// Commits (or rolls back) a transaction every work has given back.
async fn end(txn: Shared, commit: bool) -> Result<(), DbErr> {
    let txn = Arc::try_unwrap(txn).map_err(|_| {
        DbErr::Custom("a work kept the transaction past its end; it is rolled back".into())
    })?;
    if commit {
        txn.commit().await
    } else {
        txn.rollback().await
    }
}

/// Tells every work of a group that it failed with `err` (the first as it is, the others by its
/// text: a database error is not copied).
fn answer_all(group: Vec<Box<dyn Job>>, err: DbErr) {
    let text = err.to_string();
    let mut first = Some(err);
    for job in group {
        let err = match first.take() {
            Some(err) => StoreError::from(err),
            None => StoreError::Db(DbErr::Custom(text.clone())),
        };
        job.answer(Err(err));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    use sea_orm::{ConnectionTrait, DbErr, FromQueryResult, Statement};
    use tokio::sync::oneshot;

    use crate::{
        config::DatabaseUrl,
        store::{Shared, Store, StoreError},
    };

    async fn scratch_store(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("w.db").display());
        let store = Store::connect(&DatabaseUrl::Sqlite(url)).await.unwrap();
        store
            .db
            .execute_unprepared("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .await
            .unwrap();
        store
    }

    /// What [`insert`] inserts, where it counts its runs, and whether it then fails.
    type Insert = (&'static str, Arc<AtomicUsize>, bool);

    /// A work that inserts `key`, counting its runs, and then fails if `fail`.
    async fn insert(txn: Shared, (key, runs, fail): Insert) -> Result<&'static str, StoreError> {
        runs.fetch_add(1, Ordering::SeqCst);
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "INSERT INTO t (k) VALUES (?)",
            [key.into()],
        ))
        .await?;
        if fail {
            return Err(StoreError::Db(DbErr::Custom(format!("{key} fails"))));
        }
        Ok(key)
    }

    async fn keys(store: &Store) -> Vec<String> {
        #[derive(FromQueryResult)]
        struct Row {
            k: String,
        }
        Row::find_by_statement(Statement::from_string(
            store.db.get_database_backend(),
            "SELECT k FROM t ORDER BY k",
        ))
        .all(&store.db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.k)
        .collect()
    }

    /// Queues one insert per `(key, fails)` while the writer is held inside another transaction,
    /// so that they make one group, then lets the writer go. Returns each work's answer and how
    /// many times it ran.
    async fn queued_together(
        store: &Store,
        works: &[(&'static str, bool)],
    ) -> Vec<(Result<&'static str, StoreError>, usize)> {
        let (release, released) = oneshot::channel::<()>();
        let (started, running) = oneshot::channel::<()>();
        let gates = Arc::new(Mutex::new(Some((started, released))));
        let holding = store.clone();
        let holder = tokio::spawn(async move {
            holding
                .transact(gates, |_txn, gates| async move {
                    let taken = gates.lock().unwrap().take();
                    if let Some((started, released)) = taken {
                        let _ = started.send(());
                        let _ = released.await;
                    }
                    Ok(())
                })
                .await
                .unwrap();
        });
        running.await.unwrap();
        let queued: Vec<_> = works
            .iter()
            .map(|&(key, fails)| {
                let runs = Arc::new(AtomicUsize::new(0));
                let (store, context) = (store.clone(), (key, runs.clone(), fails));
                let answer = tokio::spawn(async move { store.transact(context, insert).await });
                (runs, answer)
            })
            .collect();
        // Every work is queued before the writer is free again.
        tokio::task::yield_now().await;
        drop(release);
        holder.await.unwrap();
        let mut answers = Vec::new();
        for (runs, work) in queued {
            let answer = work.await.unwrap();
            answers.push((answer, runs.load(Ordering::SeqCst)));
        }
        answers
    }

    #[tokio::test]
    async fn works_queued_together_each_run_once_and_all_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch_store(&dir).await;
        let works = [("a", false), ("b", false), ("c", false), ("d", false)];
        for (key, (answer, runs)) in ["a", "b", "c", "d"]
            .iter()
            .zip(queued_together(&store, &works).await)
        {
            assert_eq!(answer.ok().as_ref(), Some(key));
            assert_eq!(runs, 1, "no work ran twice");
        }
        assert_eq!(keys(&store).await, ["a", "b", "c", "d"]);
    }

    #[tokio::test]
    async fn a_failing_work_leaves_nothing_and_the_others_of_its_group_commit_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch_store(&dir).await;
        let answers = queued_together(&store, &[("a", false), ("b", true), ("c", false)]).await;
        assert_eq!(answers[0].0.as_ref().ok(), Some(&"a"));
        assert!(
            matches!(&answers[1].0, Err(StoreError::Db(DbErr::Custom(m))) if m == "b fails"),
            "the failing work answers its own error: {:?}",
            answers[1].0.as_ref().err()
        );
        assert_eq!(answers[2].0.as_ref().ok(), Some(&"c"));
        // a and b ran in the group that was rolled back, and again alone; c, after b in the
        // group, ran alone only.
        let runs: Vec<usize> = answers.iter().map(|(_, runs)| *runs).collect();
        assert_eq!(runs, [2, 2, 1]);
        assert_eq!(
            keys(&store).await,
            ["a", "c"],
            "nothing of the failing work stands, and nothing twice"
        );
    }

    #[tokio::test]
    async fn a_work_alone_that_fails_is_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch_store(&dir).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let failed = store.transact(("x", runs.clone(), true), insert).await;
        assert!(failed.is_err());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(keys(&store).await.is_empty());
        let ok = store.transact(("y", runs.clone(), false), insert).await;
        assert_eq!(ok.ok(), Some("y"));
        assert_eq!(keys(&store).await, ["y"]);
    }
}
