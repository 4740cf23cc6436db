//! Telling the other instances that a page has work (PostgreSQL's LISTEN/NOTIFY, channel
//! `otnd_pages`). Best effort both ways: a lost notification only delays the work until the
//! owner's next lease round, which finds it anyway. On SQLite (one instance) there is nobody to
//! tell.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};

/// The channel instances tell each other on.
const PAGES_CHANNEL: &str = "otnd_pages";

/// Tells every instance (on PostgreSQL) that the page has work for its owner, or needs one.
pub async fn page_has_work(db: &DatabaseConnection, page_id: &str) {
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return;
    }
    let notify = Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [PAGES_CHANNEL.into(), page_id.into()],
    );
    if let Err(err) = db.execute_raw(notify).await {
        // The owner's pages read their sends again within half a minute anyway (its resync).
        tracing::warn!(page_id, error = %err, "could not notify the other instances");
    }
}

/// Calls `on_page` with the page of every notification from any instance, for as long as
/// `listening()` holds, and `on_listening` each time it (re)starts listening: what was announced
/// while it did not listen is lost. If the listening connection fails, it listens again after a
/// pause.
pub async fn listen(
    db: DatabaseConnection,
    mut on_page: impl FnMut(String),
    mut on_listening: impl FnMut(),
    listening: impl Fn() -> bool,
) {
    use sea_orm::sqlx::postgres::PgListener;
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return;
    }
    loop {
        let pool = db.get_postgres_connection_pool();
        let outcome = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener.listen(PAGES_CHANNEL).await?;
            // Whatever was announced while the channel was down is lost: it is read again.
            on_listening();
            loop {
                let notification = listener.recv().await?;
                on_page(notification.payload().to_string());
            }
            #[allow(unreachable_code)]
            Ok::<(), sea_orm::sqlx::Error>(())
        };
        if let Err(err) = outcome.await {
            if !listening() {
                return;
            }
            tracing::warn!(error = %err, "page notifications interrupted; listening again shortly");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{TestStore, postgres_tests};

    /// Waits (up to a deadline) for what the listener hands on.
    async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("within the deadline")
            .expect("the listener is still there")
    }

    /// One SQLite file serves one instance: there is nobody to tell, and nothing to hear.
    #[tokio::test]
    async fn on_sqlite_nobody_is_told_and_listening_ends_at_once() {
        let t = TestStore::sqlite().await;
        page_has_work(t.db(), "1").await;
        let heard = std::cell::Cell::new(0);
        let hear = || heard.set(heard.get() + 1);
        let listening = listen(t.db().clone(), |_| hear(), hear, || true);
        tokio::time::timeout(Duration::from_secs(10), listening)
            .await
            .expect("listen returns at once");
        assert_eq!(heard.get(), 0);
    }

    postgres_tests! {
        /// Another instance hears of the page once it listens, with the page's id.
        async fn a_listener_hears_which_page_has_work(t) {
            let (pages, mut heard) = tokio::sync::mpsc::unbounded_channel();
            let (started, mut listening) = tokio::sync::mpsc::unbounded_channel();
            let listener = tokio::spawn(listen(
                t.db().clone(),
                move |page| pages.send(page).unwrap(),
                move || started.send(()).unwrap(),
                || true,
            ));
            next(&mut listening).await;
            page_has_work(t.db(), "1234").await;
            assert_eq!(next(&mut heard).await, "1234");
            listener.abort();
        }
    }
}
