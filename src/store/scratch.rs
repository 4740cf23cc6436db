//! A database of a test's own: a SQLite file in a temporary directory, or a uniquely named
//! database on the PostgreSQL server `DATABASE_URL` (or `OTN_TEST_DATABASE_URL`) names, dropped
//! with it. The store's unit tests and the integration tests both start from one, so it is
//! compiled for them only (`cfg(test)`, or the `testing` feature the tests turn on); a build
//! for use has none of it.

use std::path::PathBuf;

use sea_orm::{ConnectionTrait, Database};

/// A database of this test's own, removed when dropped.
pub struct ScratchDatabase {
    pub url: String,
    /// The SQLite file (its directory is removed with it).
    pub sqlite_file: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
    postgres_drop: Option<(String, String)>,
}

/// The PostgreSQL server tests also run on, if one is configured.
pub fn postgres_admin_url() -> Option<String> {
    ["OTN_TEST_DATABASE_URL", "DATABASE_URL"]
        .iter()
        .filter_map(|var| std::env::var(var).ok())
        .find(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"))
}

impl ScratchDatabase {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = dir.path().join("otnd.db");
        ScratchDatabase {
            url: format!("sqlite://{}?mode=rwc", file.display()),
            sqlite_file: Some(file),
            _dir: Some(dir),
            postgres_drop: None,
        }
    }

    /// A new database named `{prefix}_{random}` on the configured server, or `None` when no
    /// PostgreSQL is configured. A configured server that cannot be reached fails the test:
    /// skipping would hide it.
    pub async fn postgres(prefix: &str) -> Option<Self> {
        let admin_url = postgres_admin_url()?;
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("DATABASE_URL names a PostgreSQL that is not reachable: {e}")
        });
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        let _ = admin.close().await;
        let mut url = url::Url::parse(&admin_url).expect("DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        Some(ScratchDatabase {
            url: url.to_string(),
            sqlite_file: None,
            _dir: None,
            postgres_drop: Some((admin_url, name)),
        })
    }

    /// The store on this database, as a tool would open it (no instance lock), migrated.
    pub async fn store(&self) -> super::Store {
        let store = super::Store::connect(&self.database_url())
            .await
            .expect("the store connects");
        store.migrate().await.expect("the migrations run");
        store
    }

    /// The database's URL as settings hold it.
    pub fn database_url(&self) -> crate::config::DatabaseUrl {
        match self.sqlite_file {
            Some(_) => crate::config::DatabaseUrl::Sqlite(self.url.clone()),
            None => crate::config::DatabaseUrl::Postgres(self.url.clone().into()),
        }
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.postgres_drop.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread with a
        // runtime of its own removes the database (and ends the sessions still on it).
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                if let Ok(admin) = Database::connect(&admin_url).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}
