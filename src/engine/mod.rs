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
use tokio::sync::watch;

pub use pacing::PacingSettings;
pub use progress::Progress;

use crate::{crypto::SecretCipher, graph::GraphClient, store::Store, store::StoreError};
use page::{Command, Control, Deps, Wake};
use progress::ProgressHub;
use supervisor::{GetStatus, PageAddr, Shutdown, Supervisor};

/// How long a request path waits for an actor before answering DEADLINE_EXCEEDED.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The one handle the API, HTTP and start-up code use to reach the engine.
#[derive(Clone)]
pub struct EngineHandle {
    supervisor: Addr<Supervisor>,
    hub: ProgressHub,
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
    /// Starts the engine's actors. Must be called inside a running `actix::System`.
    pub fn start(
        store: Store,
        cipher: SecretCipher,
        graph: GraphClient,
        pacing: PacingSettings,
    ) -> Self {
        let _ = metrics::prometheus();
        let arbiters = supervisor::start_arbiters();
        let pacer = pacing::Pacer::new(pacing);
        let pool = sender::SenderPool::start(&arbiters, graph, pacer.clone());
        let hub = ProgressHub::default();
        let deps = Deps {
            store,
            cipher,
            pool,
            pacer,
            hub: hub.clone(),
        };
        EngineHandle {
            supervisor: Supervisor::new(deps, arbiters).start(),
            hub,
        }
    }

    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        Ok(self.supervisor.send(GetStatus).timeout(ASK_TIMEOUT).await?)
    }

    async fn page(&self, page_id: &str) -> Result<Addr<page::PageActor>, EngineError> {
        self.supervisor
            .send(PageAddr(page_id.to_string()))
            .timeout(ASK_TIMEOUT)
            .await?
            .ok_or(EngineError::Stopped)
    }

    /// Tells the page's actor that its sends changed in the database (persist first, then
    /// wake: a lost wake-up only delays the work until the actor's next tick).
    pub async fn wake(&self, page_id: &str) -> Result<(), EngineError> {
        let page = self.page(page_id).await?;
        page.try_send(Wake).map_err(|err| match err {
            actix::dev::SendError::Full(_) => EngineError::Busy,
            actix::dev::SendError::Closed(_) => EngineError::Stopped,
        })
    }

    /// Pause, resume or cancel, in order with the page's own steps.
    pub async fn command(
        &self,
        page_id: &str,
        send_id: &str,
        command: Command,
    ) -> Result<crate::store::sends::Send, EngineError> {
        let page = self.page(page_id).await?;
        Ok(page
            .send(Control {
                send_id: send_id.to_string(),
                command,
            })
            .timeout(ASK_TIMEOUT)
            .await??)
    }

    /// Snapshots of a send, from `current` on.
    pub fn watch(&self, current: Progress) -> watch::Receiver<Progress> {
        self.hub.subscribe(current)
    }

    /// Stops taking new work and waits (at most `grace`) for work in flight to be recorded.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), EngineError> {
        Ok(self.supervisor.send(Shutdown).timeout(grace).await?)
    }
}
