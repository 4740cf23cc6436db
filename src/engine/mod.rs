//! The send engine: actix actors behind one facade, [`EngineHandle`]. Nothing outside this module
//! knows actix. The database is the queue; actors keep no state that is not also in a row.
//!
//! For now the engine is the supervisor alone; page actors and the sender pool arrive with the
//! send engine.

mod supervisor;

use std::time::Duration;

use actix::{Actor, Addr, MailboxError};

use crate::store::Store;
use supervisor::{GetStatus, Shutdown, Supervisor};

/// How long a request path waits for an actor before answering DEADLINE_EXCEEDED.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The one handle the API, HTTP and start-up code use to reach the engine.
#[derive(Clone)]
pub struct EngineHandle {
    supervisor: Addr<Supervisor>,
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
}

impl From<MailboxError> for EngineError {
    fn from(err: MailboxError) -> Self {
        match err {
            MailboxError::Closed => EngineError::Stopped,
            MailboxError::Timeout => EngineError::Timeout,
        }
    }
}

impl EngineHandle {
    /// Starts the engine's actors. Must be called inside a running `actix::System`.
    pub fn start(store: Store) -> Self {
        EngineHandle {
            supervisor: Supervisor::new(store).start(),
        }
    }

    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        Ok(self.supervisor.send(GetStatus).timeout(ASK_TIMEOUT).await?)
    }

    /// Stops taking new work and waits for work in flight to be recorded.
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        Ok(self.supervisor.send(Shutdown).timeout(ASK_TIMEOUT).await?)
    }
}
