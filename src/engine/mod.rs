//! The send engine: actix actors behind one facade, [`EngineHandle`]. Nothing outside this module
//! knows actix. The database is the queue; actors keep no state that is not also in a row.
//!
//! - the supervisor owns the page actors' registry and resumes unfinished sends at start-up;
//! - a page actor per page is the only writer of its opt-ins and deliveries (see `page`);
//! - the sender pool calls the Graph API, paced per page and app-wide (see `pacing`);
//! - the progress hub carries snapshots to watchers (see `progress`).

pub mod metrics;
mod pacing;
mod page;
mod policy;
pub mod progress;
mod sender;
mod supervisor;

use std::time::Duration;

use actix::{Actor, Addr, MailboxError};

pub use pacing::PacingSettings;
pub use progress::{Progress, StreamSlots, Subscription, WatchRefused};
pub use supervisor::LeaseSettings;

use crate::{
    crypto::SecretCipher,
    graph::GraphClient,
    store::{Store, StoreError, notify},
};
use page::{Command, Deps, Steered, Wake};
use progress::ProgressHub;
use supervisor::{GetStatus, PageAddr, PageChanged, Route, Shutdown, Supervisor};

/// How long a request path waits for an actor before answering DEADLINE_EXCEEDED.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The one handle the API, HTTP and start-up code use to reach the engine.
#[derive(Clone)]
pub struct EngineHandle {
    supervisor: Addr<Supervisor>,
    hub: ProgressHub,
    store: Store,
}

#[derive(Clone, Debug, PartialEq, Eq, actix::MessageResponse)]
pub struct EngineStatus {
    pub accepting_work: bool,
    pub page_actors: usize,
}

/// Why the engine could not take a request; the API maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is overloaded; retry later")]
    Busy,
    #[error("the engine did not answer in time")]
    Timeout,
    #[error("the engine has stopped")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<MailboxError> for EngineError {
    fn from(err: MailboxError) -> Self {
        match err {
            MailboxError::Closed => EngineError::Stopped,
            MailboxError::Timeout => EngineError::Timeout,
        }
    }
}

pub use page::Command as SendCommand;

impl EngineHandle {
    /// Starts the engine's actors. Must be called inside a running `actix::System`. Watchers
    /// of sends take their streams from `slots`, at most `watchers_per_send` per send.
    pub fn start(
        store: Store,
        cipher: SecretCipher,
        graph: GraphClient,
        pacing: PacingSettings,
        leases: LeaseSettings,
        slots: StreamSlots,
        watchers_per_send: usize,
    ) -> Self {
        let _ = metrics::prometheus();
        let arbiters = supervisor::start_arbiters();
        let pacer = pacing::Pacer::new(pacing);
        let pool = sender::SenderPool::start(&arbiters, graph, pacer.clone());
        let hub = ProgressHub::new(Some(store.clone()), slots, watchers_per_send);
        let deps = Deps {
            store: store.clone(),
            cipher,
            pool,
            pacer,
            hub: hub.clone(),
        };
        let supervisor = Supervisor::new(deps, arbiters, leases).start();
        if store.db.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
            // Another instance says a page has new work: wake its actor if it runs here, else
            // try to take the page now rather than at the next round.
            let (wake, resync, alive) =
                (supervisor.clone(), supervisor.clone(), supervisor.clone());
            actix::spawn(crate::store::notify::listen(
                store.db.clone(),
                move |page_id| wake.do_send(PageChanged(page_id)),
                move || resync.do_send(supervisor::Resync),
                move || alive.connected(),
            ));
        }
        EngineHandle {
            supervisor,
            hub,
            store,
        }
    }

    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        Ok(self.supervisor.send(GetStatus).timeout(ASK_TIMEOUT).await?)
    }

    async fn route(&self, page_id: &str) -> Result<Route, EngineError> {
        Ok(self
            .supervisor
            .send(PageAddr(page_id.to_string()))
            .timeout(ASK_TIMEOUT)
            .await?)
    }

    /// Tells the page's owner that its sends changed in the database (persist first, then
    /// wake: a lost wake-up only delays the work until the owner's next resync, within half a
    /// minute). The owner may be this instance, another one (told through PostgreSQL), or
    /// nobody yet (this instance tries to take the page at once).
    pub async fn wake(&self, page_id: &str) -> Result<(), EngineError> {
        match self.route(page_id).await? {
            Route::Local(page) => page.try_send(Wake).map_err(|err| match err {
                actix::dev::SendError::Full(_) => EngineError::Busy,
                actix::dev::SendError::Closed(_) => EngineError::Stopped,
            }),
            Route::Elsewhere => {
                self.supervisor.do_send(PageChanged(page_id.to_string()));
                notify::page_has_work(&self.store.db, page_id).await;
                Ok(())
            }
            Route::Stopped => Err(EngineError::Stopped),
        }
    }

    /// Pause, resume or cancel: one path wherever the page runs. The change is written first,
    /// conditional on the state it leaves (`page::apply_command`: safe from any instance, since
    /// the owner's steps check the send's state in their own transactions), then the page's
    /// owner is told, as of any change to its sends. An actor here has caught up before this
    /// returns (a paused or cancelled send's calls not yet made are not made); an owner
    /// elsewhere hears it through PostgreSQL and reads its sends again.
    pub async fn command(
        &self,
        page_id: &str,
        send_id: &str,
        command: Command,
    ) -> Result<crate::store::sends::Send, EngineError> {
        let route = self.route(page_id).await?;
        if matches!(route, Route::Stopped) {
            return Err(EngineError::Stopped);
        }
        let (store, id) = (self.store.clone(), send_id.to_string());
        let send = self
            .store
            .write(async move { page::apply_command(&store, &id, command).await })
            .await?;
        self.hub.publish_steered(&send);
        match route {
            Route::Local(page) => {
                let told = page.send(Steered {
                    send: send.clone(),
                    command,
                });
                // The command is written: an actor that stopped meanwhile reads it when the page
                // runs again.
                if let Err(err) = told.timeout(ASK_TIMEOUT).await {
                    tracing::warn!(%page_id, %send_id, error = %err,
                        "the page's actor did not hear of the command; it reads it at its next step");
                }
            }
            Route::Elsewhere | Route::Stopped => {
                self.supervisor.do_send(PageChanged(page_id.to_string()));
                notify::page_has_work(&self.store.db, page_id).await;
            }
        }
        Ok(send)
    }

    /// The send's row as its page actor on this instance last committed it, when that is
    /// the send's current row: on SQLite, where this instance is the only one, every change to
    /// a running send goes through its actor or tells the hub (a command applied directly, an
    /// erasure); on PostgreSQL another instance may have changed it, so `None`. A finished
    /// send's last row is answered for a while after its end; a paused or halted send, or a
    /// running one whose actor restarted or stopped, is not (see `ProgressHub::row`).
    pub fn current_row(&self, send_id: &str) -> Option<std::sync::Arc<crate::store::sends::Send>> {
        if self.store.db.get_database_backend() != sea_orm::DatabaseBackend::Sqlite {
            return None;
        }
        self.hub.row(send_id)
    }

    /// Something other than the page's actor changed the page's sends (an erasure): their rows
    /// are read from the database until the actor commits again.
    pub fn sends_changed_elsewhere(&self, page_id: &str) {
        self.hub.forget_rows_of_page(page_id);
    }

    /// Snapshots of a send, from `current` on; refused beyond the watcher limits.
    pub fn watch(&self, current: Progress) -> Result<Subscription, WatchRefused> {
        self.hub.subscribe(current)
    }

    /// Stops taking new work and waits (at most `grace`) for work in flight to be recorded.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), EngineError> {
        Ok(self.supervisor.send(Shutdown).timeout(grace).await?)
    }
}
