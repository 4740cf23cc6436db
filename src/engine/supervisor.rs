use actix::{Actor, Context, Handler, Message};

use super::EngineStatus;
use crate::store::Store;

/// Owns the registry of page actors (none yet) and the engine's lifecycle.
pub struct Supervisor {
    #[allow(dead_code)] // read by the page actors the send engine adds
    store: Store,
    accepting_work: bool,
}

impl Supervisor {
    pub fn new(store: Store) -> Self {
        Supervisor {
            store,
            accepting_work: true,
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Status and shutdown requests are few; a small bound keeps a stuck engine visible.
        ctx.set_mailbox_capacity(64);
        tracing::debug!("engine supervisor started");
    }
}

#[derive(Message)]
#[rtype(result = "EngineStatus")]
pub struct GetStatus;

impl Handler<GetStatus> for Supervisor {
    type Result = EngineStatus;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> EngineStatus {
        EngineStatus {
            accepting_work: self.accepting_work,
            page_actors: 0,
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) {
        self.accepting_work = false;
        tracing::info!("engine stopped taking new work");
    }
}
