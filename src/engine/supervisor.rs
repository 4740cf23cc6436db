use std::collections::HashMap;

use actix::{
    Actor, ActorFutureExt, Addr, Arbiter, ArbiterHandle, AsyncContext, Context, Handler, Message,
    ResponseActFuture, WrapFuture,
};

use super::{
    EngineStatus,
    page::{Deps, Drain, PageActor, Wake},
};
use crate::store::sends;

/// Owns the registry of page actors: starts them on demand, spread over a few Arbiters, starts a
/// new one when one has died, and at start-up wakes every page with unfinished work.
pub struct Supervisor {
    deps: Deps,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    pages: HashMap<String, Addr<PageActor>>,
    accepting_work: bool,
}

impl Supervisor {
    pub fn new(deps: Deps, arbiters: Vec<ArbiterHandle>) -> Self {
        Supervisor {
            deps,
            arbiters,
            next_arbiter: 0,
            pages: HashMap::new(),
            accepting_work: true,
        }
    }

    fn page(&mut self, page_id: &str) -> Addr<PageActor> {
        if let Some(addr) = self.pages.get(page_id)
            && addr.connected()
        {
            return addr.clone();
        }
        let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
        self.next_arbiter += 1;
        let (id, deps) = (page_id.to_string(), self.deps.clone());
        let addr = actix::Supervisor::start_in_arbiter(arbiter, move |_| PageActor::new(id, deps));
        self.pages.insert(page_id.to_string(), addr.clone());
        addr
    }
}

/// Arbiters for the engine's actors: one per core, at least two.
pub fn start_arbiters() -> Vec<ArbiterHandle> {
    let n = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    (0..n)
        .map(|_| {
            let arbiter = Arbiter::new();
            let handle = arbiter.handle();
            // The arbiter's thread lives as long as its handles; the System stops it.
            std::mem::forget(arbiter);
            handle
        })
        .collect()
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        // Resume what an earlier life left unfinished: the database is the queue.
        let store = self.deps.store.clone();
        ctx.spawn(
            async move { sends::pages_with_work(&store.db).await }
                .into_actor(self)
                .map(|result, act, _| match result {
                    Ok(pages) => {
                        for page_id in pages {
                            tracing::info!(%page_id, "resuming the page's unfinished sends");
                            act.page(&page_id).do_send(Wake);
                        }
                    }
                    Err(err) => tracing::error!(error = %err, "could not list unfinished sends"),
                }),
        );
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
            page_actors: self.pages.values().filter(|a| a.connected()).count(),
        }
    }
}

/// The page's actor (started if needed), or `None` once the engine stopped taking work.
#[derive(Message)]
#[rtype(result = "Option<Addr<PageActor>>")]
pub struct PageAddr(pub String);

impl Handler<PageAddr> for Supervisor {
    type Result = Option<Addr<PageActor>>;

    fn handle(&mut self, msg: PageAddr, _: &mut Context<Self>) -> Option<Addr<PageActor>> {
        self.accepting_work.then(|| self.page(&msg.0))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.accepting_work = false;
        tracing::info!("engine stopped taking new work; waiting for deliveries in flight");
        let drains: Vec<_> = self
            .pages
            .values()
            .filter(|a| a.connected())
            .map(|a| a.send(Drain))
            .collect();
        Box::pin(
            async move {
                futures::future::join_all(drains).await;
                tracing::info!("every delivery in flight is recorded");
            }
            .into_actor(self),
        )
    }
}
