use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use actix::{
    Actor, ActorFutureExt, Addr, Arbiter, ArbiterHandle, AsyncContext, Context, Handler, Message,
    ResponseActFuture, WrapFuture,
};

use super::{
    EngineStatus,
    page::{Deps, Drain, Lost, PageActor, Wake},
};
use crate::store::{
    Store, StoreError,
    leases::{self, Fence},
    notify, sends,
};

/// Who this instance is among those sharing the database, and how long its leases last.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub instance: String,
    pub ttl: Duration,
    /// How often a lease round runs: renewals, and pages taken, shared out or given up.
    pub round_every: Duration,
    /// Most pages this instance runs at once; other pages' sends wait, queued, for a round that
    /// finds room.
    pub max_pages: usize,
}

struct Owned {
    fence: Fence,
    addr: Option<Addr<PageActor>>,
}

/// Owns the registry of page actors. A page's actor runs here only while this instance holds
/// the page's lease: the supervisor renews its leases every third of their life, takes pages
/// with unfinished sends that nobody holds (up to a fair share of them, the less loaded
/// instances first), gives pages back when it holds more than its share (drained first), and
/// stops the actor of a page whose lease it lost. Actors are spread over a few Arbiters and
/// restarted if one dies.
pub struct Supervisor {
    deps: Deps,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    pages: HashMap<String, Owned>,
    accepting_work: bool,
    leases: LeaseSettings,
    ticking: bool,
    /// Something asked for a round while one ran: another follows at once.
    tick_again: bool,
    /// Pages being handed over (draining, then released): still leased here, not to be taken
    /// back as an earlier life's.
    handing: HashSet<String>,
    /// When every page running here last read its sends again (see [`RESYNC_EVERY`]).
    last_resync: Instant,
    /// When this instance last beat and renewed its leases.
    last_renewal: Option<Instant>,
    /// Pages being handed over that were given new work meanwhile: once released, a round
    /// finds them a home at once.
    work_while_handing: HashSet<String>,
    /// Leases of drained pages waiting to be released together (and whether each page is
    /// handed over with work); `release_scheduled` once a release is on its way.
    releasing: Vec<(Fence, GiveUp)>,
    release_scheduled: bool,
}

/// How long drained pages' leases wait to be released together: a thousand small sends end
/// within moments of each other, and one statement gives all their pages up.
const RELEASE_TOGETHER: Duration = Duration::from_millis(50);

/// How often every page running here reads its sends from the database again, whether or not
/// it was told of a change: a wake-up can be lost (a NOTIFY that failed after the change it
/// announces had committed), and a send resumed or started elsewhere must not wait forever.
const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// Where requests about a page go.
#[derive(actix::MessageResponse)]
pub enum Route {
    /// This instance runs the page.
    Local(Addr<PageActor>),
    /// Another instance does (or nobody yet): the database and a notification reach it.
    Elsewhere,
    /// The engine is shutting down.
    Stopped,
}

impl Supervisor {
    pub fn new(deps: Deps, arbiters: Vec<ArbiterHandle>, leases: LeaseSettings) -> Self {
        Supervisor {
            deps,
            arbiters,
            next_arbiter: 0,
            pages: HashMap::new(),
            accepting_work: true,
            leases,
            ticking: false,
            tick_again: false,
            handing: HashSet::new(),
            last_resync: Instant::now(),
            last_renewal: None,
            work_while_handing: HashSet::new(),
            releasing: Vec::new(),
            release_scheduled: false,
        }
    }

    /// Every page actor running here reads its sends again.
    fn resync(&mut self) {
        self.last_resync = Instant::now();
        for addr in self.pages.values().filter_map(|o| o.addr.as_ref()) {
            if addr.connected() {
                addr.do_send(Wake);
            }
        }
    }

    fn page(&mut self, page_id: &str) -> Option<Addr<PageActor>> {
        let owned = self.pages.get_mut(page_id)?;
        if let Some(addr) = &owned.addr
            && addr.connected()
        {
            return Some(addr.clone());
        }
        let index = self.next_arbiter % self.arbiters.len();
        self.next_arbiter += 1;
        let (id, deps, fence) = (page_id.to_string(), self.deps.clone(), owned.fence.clone());
        let addr = actix::Supervisor::start_in_arbiter(&self.arbiters[index], move |_| {
            PageActor::new(id, deps, fence, index)
        });
        owned.addr = Some(addr.clone());
        Some(addr)
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if !self.accepting_work {
            return;
        }
        if self.ticking {
            self.tick_again = true;
            return;
        }
        self.ticking = true;
        self.tick_again = false;
        let store = self.deps.store.clone();
        let settings = self.leases.clone();
        let running: HashSet<String> = self.pages.keys().chain(&self.handing).cloned().collect();
        // The heartbeat and the renewal of every lease held are due once a round; the rounds a
        // started send or a released page asks for in between only take pages. (A thousand
        // sends started at once asked for hundreds of rounds, and each rewrote every lease.)
        let renew = self
            .last_renewal
            .is_none_or(|at| at.elapsed() >= self.leases.round_every / 2);
        if renew {
            self.last_renewal = Some(Instant::now());
        }
        let held = (!renew).then(|| self.pages.values().map(|o| o.fence.clone()).collect());
        ctx.spawn(
            async move { lease_round(&store, &settings, &running, held).await }
                .into_actor(self)
                .map(|result, act, ctx| {
                    act.ticking = false;
                    match result {
                        Ok(round) => act.apply(round, ctx),
                        Err(err) => {
                            // The next round renews, whatever it was asked for.
                            act.last_renewal = None;
                            tracing::error!(error = %err, "could not renew or take page leases")
                        }
                    }
                    if act.tick_again {
                        act.tick(ctx);
                    }
                }),
        );
    }

    fn apply(&mut self, round: LeaseRound, ctx: &mut Context<Self>) {
        if !self.accepting_work {
            return;
        }
        if self.last_resync.elapsed() >= RESYNC_EVERY {
            self.resync();
        }
        let held: HashMap<String, Fence> = round
            .renewed
            .into_iter()
            .map(|f| (f.page_id.clone(), f))
            .collect();
        let lost: Vec<String> = self
            .pages
            .iter()
            .filter(|(page, owned)| held.get(*page) != Some(&owned.fence))
            .map(|(page, _)| page.clone())
            .collect();
        for page_id in lost {
            if let Some(Owned {
                addr: Some(addr), ..
            }) = self.pages.remove(&page_id)
            {
                tracing::warn!(%page_id, "lost the page's lease");
                addr.do_send(Lost { given_up: false });
            }
        }
        for fence in round.acquired {
            tracing::info!(page_id = %fence.page_id, generation = fence.generation,
                instance = %self.leases.instance, "took the page's lease; resuming its sends");
            let page_id = fence.page_id.clone();
            self.pages
                .insert(page_id.clone(), Owned { fence, addr: None });
            if let Some(addr) = self.page(&page_id) {
                addr.do_send(Wake);
            }
        }
        // Pages whose sends have all ended: given up, so that the fair share below counts only
        // pages with work, and a page that gets work again goes to whoever is least loaded.
        for page_id in round.idle {
            self.give_up(&page_id, ctx, GiveUp::Idle);
        }
        // More than a fair share (an instance joined): hand the surplus over, each page drained
        // first so that nothing it has in flight is left for recovery. Only while another
        // instance holds at least two pages fewer, and no more than half the difference: the
        // share is computed from one moment's view, and while sends are being started all over
        // the fleet that view lags, and pages moved back and forth for nothing (a move drains
        // the page and resumes it elsewhere).
        let surplus = pages_to_hand_over(self.pages.len(), round.target, round.least_loaded_other);
        let handing: Vec<String> = self.pages.keys().take(surplus).cloned().collect();
        for page_id in handing {
            self.give_up(&page_id, ctx, GiveUp::HandOver);
        }
    }

    /// Stops running the page here: its actor drains (every delivery in flight recorded), then
    /// the lease is released for another round (here or elsewhere) to take.
    fn give_up(&mut self, page_id: &str, ctx: &mut Context<Self>, why: GiveUp) {
        let Some(owned) = self.pages.remove(page_id) else {
            return;
        };
        let handing_over = why == GiveUp::HandOver;
        if handing_over {
            tracing::info!(%page_id, "handing the page to a less loaded instance");
        } else {
            tracing::info!(%page_id, "the page has no unfinished send: giving its lease up");
        }
        self.handing.insert(page_id.to_string());
        ctx.spawn(
            async move {
                if let Some(addr) = &owned.addr {
                    let _ = addr.send(Drain).await;
                    addr.do_send(Lost { given_up: true });
                }
                owned.fence
            }
            .into_actor(self)
            .map(move |fence, act, ctx| {
                act.releasing.push((fence, why));
                if !act.release_scheduled {
                    act.release_scheduled = true;
                    ctx.run_later(RELEASE_TOGETHER, |act, ctx| act.release(ctx));
                }
            }),
        );
    }

    /// Releases the leases of the pages drained since the last release, in one statement.
    fn release(&mut self, ctx: &mut Context<Self>) {
        self.release_scheduled = false;
        let releasing = std::mem::take(&mut self.releasing);
        if releasing.is_empty() {
            return;
        }
        let db = self.deps.store.db.clone();
        ctx.spawn(
            async move {
                let fences: Vec<Fence> = releasing.iter().map(|(f, _)| f.clone()).collect();
                match leases::release_many(&db, &fences).await {
                    // A page handed over still has work: the other instances look for it now,
                    // not at their next round a third of a lease later (the page would stand
                    // still meanwhile).
                    Ok(_) => {
                        for (fence, why) in &releasing {
                            if *why == GiveUp::HandOver {
                                notify::page_has_work(&db, &fence.page_id).await;
                            }
                        }
                    }
                    Err(err) => tracing::warn!(pages = releasing.len(), error = %err,
                        "could not release the pages' leases; they expire by themselves"),
                }
                releasing
            }
            .into_actor(self)
            .map(|releasing, act, ctx| {
                let mut work_came = false;
                for (fence, why) in releasing {
                    act.handing.remove(&fence.page_id);
                    // Work came for the page meanwhile: a round finds it a home now rather
                    // than a third of a lease later (a page handed over is announced already).
                    work_came |=
                        act.work_while_handing.remove(&fence.page_id) && why == GiveUp::Idle;
                }
                if work_came {
                    act.tick(ctx);
                }
            }),
        );
    }
}

/// Why an instance stops running a page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GiveUp {
    /// Its sends have all ended.
    Idle,
    /// It still has work, which a less loaded instance is to take over.
    HandOver,
}

struct LeaseRound {
    renewed: Vec<Fence>,
    acquired: Vec<Fence>,
    /// Pages held here (among `renewed`) with no unfinished send and nothing in flight.
    idle: Vec<String>,
    /// This instance's fair share of the pages with work.
    target: usize,
    /// How many pages with work the least loaded other live instance holds (`None`: alone).
    least_loaded_other: Option<usize>,
}

/// Pages a round takes in one statement. A page's lease is a few bound values; the statement
/// stays far under both databases' parameter limits.
const LEASES_PER_STATEMENT: usize = 500;

/// One round of lease work: heartbeat, renew what is held, take unheld pages with work up to a
/// fair share. With `held` (the leases the actors here run under), the heartbeat and renewal
/// are not due: the round only takes pages and gives up idle ones.
async fn lease_round(
    store: &Store,
    settings: &LeaseSettings,
    running: &HashSet<String>,
    held: Option<Vec<Fence>>,
) -> Result<LeaseRound, StoreError> {
    let db = &store.db;
    // What the round only reads comes from the engine's readers: every write it leads to is
    // conditional (a page another instance took meanwhile is simply not granted).
    let read = &store.engine_read;
    let ttl_ms = settings.ttl.as_millis() as i64;
    let mut renewed = match held {
        Some(held) => held,
        None => {
            leases::heartbeat(db, &settings.instance).await?;
            leases::renew(db, &settings.instance, ttl_ms).await?
        }
    };
    // Leases of this instance's name that no actor here runs: an earlier life of this instance
    // (restarted under the same name) held them. Taken again, with a new generation, which
    // fences that life should it still be about.
    let mut acquired = Vec::new();
    let orphans: Vec<String> = renewed
        .iter()
        .filter(|f| !running.contains(&f.page_id))
        .map(|f| f.page_id.clone())
        .collect();
    renewed.retain(|f| running.contains(&f.page_id));
    let orphans: Vec<&str> = orphans.iter().map(String::as_str).collect();
    for chunk in orphans.chunks(LEASES_PER_STATEMENT) {
        acquired.extend(leases::acquire_many(db, chunk, &settings.instance, ttl_ms).await?);
    }
    let work = sends::pages_with_work(read).await?;
    let with_work: HashSet<&str> = work.iter().map(String::as_str).collect();
    let live = leases::live_instances(read, ttl_ms).await?.max(1) as usize;
    let held: HashSet<&str> = renewed
        .iter()
        .chain(&acquired)
        .map(|f| f.page_id.as_str())
        .collect();
    // Held pages whose sends have all ended are given up (see `apply`); the fair share counts
    // pages with work only, or instances holding finished pages would take no new ones.
    let idle: Vec<String> = renewed
        .iter()
        .filter(|f| !with_work.contains(f.page_id.as_str()))
        .map(|f| f.page_id.clone())
        .collect();
    let mut busy = held.iter().filter(|p| with_work.contains(*p)).count();
    // A fair share of the pages with work, and never more pages than this instance may run.
    let target = work.len().div_ceil(live).min(settings.max_pages);
    // Only pages nobody holds (or whose lease lapsed): trying one another instance holds would
    // wait on its steps' row locks for nothing.
    let taken = leases::held_by_others(read, &settings.instance).await?;
    let wanted: Vec<&String> = work
        .iter()
        .filter(|p| !held.contains(p.as_str()) && !taken.contains_key(p.as_str()))
        .collect();
    // The least loaded other live instance's pages with work (0 for one that holds none).
    let mut loads: HashMap<&str, usize> = HashMap::new();
    for (page, owner) in &taken {
        if with_work.contains(page.as_str()) {
            *loads.entry(owner.as_str()).or_default() += 1;
        }
    }
    let least_loaded_other = if live <= 1 {
        None
    } else if loads.len() < live - 1 {
        Some(0)
    } else {
        loads.values().copied().min()
    };
    if !wanted.is_empty() && busy < target {
        // The less loaded an instance, the sooner it tries: new pages go to the least loaded.
        let half_round = settings.round_every / 2;
        let wait = match live {
            1 => Duration::ZERO,
            _ => Duration::from_millis(25 * busy as u64).min(half_round),
        };
        tokio::time::sleep(wait).await;
        // A round must end well within a lease, or this instance's own leases would lapse.
        let until = std::time::Instant::now() + half_round;
        // Every page held counts against the instance's limit, those still draining too.
        let mut held_here = held.len();
        let mut wanted = wanted.into_iter().map(String::as_str);
        loop {
            let room = target
                .saturating_sub(busy)
                .min(settings.max_pages.saturating_sub(held_here))
                .min(LEASES_PER_STATEMENT);
            let chunk: Vec<&str> = wanted.by_ref().take(room).collect();
            if chunk.is_empty() || std::time::Instant::now() > until {
                break;
            }
            let granted = leases::acquire_many(db, &chunk, &settings.instance, ttl_ms).await?;
            busy += granted.len();
            held_here += granted.len();
            acquired.extend(granted);
        }
    }
    Ok(LeaseRound {
        renewed,
        acquired,
        idle,
        target,
        least_loaded_other,
    })
}

/// How many of the `mine` pages with work to hand over: what is above the fair share (`target`,
/// plus one of slack), but no more than half the gap to the least loaded other live instance
/// (none when there is no other, or when it holds within one page of this one).
fn pages_to_hand_over(mine: usize, target: usize, least_loaded_other: Option<usize>) -> usize {
    least_loaded_other.map_or(0, |least| {
        mine.saturating_sub(target + 1)
            .min(mine.saturating_sub(least) / 2)
    })
}

/// Arbiters for the engine's actors: one per core the process may use (a container's CPU
/// quota counts). More threads than cores only hand work between threads: on an instance held
/// to a tenth of a core, waking one thread for another cost more CPU than the calls.
pub fn start_arbiters() -> Vec<ArbiterHandle> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..n)
        .map(|_| {
            let arbiter = Arbiter::with_tokio_rt(|| {
                crate::startup::lower_engine_thread_priority();
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the engine's thread builds its runtime")
            });
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
        // The first round resumes what an earlier life left unfinished (the database is the
        // queue); later ones keep the leases and share the pages.
        self.tick(ctx);
        ctx.run_interval(self.leases.round_every, |act, ctx| act.tick(ctx));
        tracing::debug!(instance = %self.leases.instance, "engine supervisor started");
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
            page_actors: self
                .pages
                .values()
                .filter(|o| o.addr.as_ref().is_some_and(Addr::connected))
                .count(),
        }
    }
}

/// Where requests about the page go.
#[derive(Message)]
#[rtype(result = "Route")]
pub struct PageAddr(pub String);

impl Handler<PageAddr> for Supervisor {
    type Result = Route;

    fn handle(&mut self, msg: PageAddr, _: &mut Context<Self>) -> Route {
        if !self.accepting_work {
            return Route::Stopped;
        }
        match self.page(&msg.0) {
            Some(addr) => Route::Local(addr),
            None => Route::Elsewhere,
        }
    }
}

/// A page has new work somewhere in the fleet (a send started or was steered on any instance):
/// wake its actor if it runs here, else try to take the page now rather than at the next round.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PageChanged(pub String);

/// Changes may have gone unannounced (the notification channel was down): every page running
/// here reads its sends again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync;

impl Handler<Resync> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Resync, _: &mut Context<Self>) {
        if self.accepting_work {
            self.resync();
        }
    }
}

impl Handler<PageChanged> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: PageChanged, ctx: &mut Context<Self>) {
        if !self.accepting_work {
            return;
        }
        match self.page(&msg.0) {
            Some(addr) => addr.do_send(Wake),
            None => {
                if self.handing.contains(&msg.0) {
                    self.work_while_handing.insert(msg.0);
                }
                self.tick(ctx)
            }
        }
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
        let owned: Vec<Owned> = self.pages.drain().map(|(_, o)| o).collect();
        let waiting: Vec<Fence> = self.releasing.drain(..).map(|(f, _)| f).collect();
        let drains: Vec<_> = owned
            .iter()
            .filter_map(|o| o.addr.as_ref())
            .filter(|a| a.connected())
            .map(|a| a.send(Drain))
            .collect();
        let db = self.deps.store.db.clone();
        let instance = self.leases.instance.clone();
        Box::pin(
            async move {
                futures::future::join_all(drains).await;
                tracing::info!("every delivery in flight is recorded");
                // Give the pages up at once, so another instance takes them without waiting
                // for the leases to expire (those drained before, waiting to be released
                // together, too).
                let fences: Vec<Fence> = owned
                    .iter()
                    .map(|o| o.fence.clone())
                    .chain(waiting)
                    .collect();
                let _ = leases::release_many(&db, &fences).await;
                let _ = leases::leave(&db, &instance).await;
            }
            .into_actor(self),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::pages_to_hand_over;

    #[test]
    fn a_joining_instance_gets_a_share_and_a_balanced_fleet_moves_nothing() {
        // 50 pages on one instance, a second joins with none: the surplus over 25 (+1) goes.
        assert_eq!(pages_to_hand_over(50, 25, Some(0)), 24);
        // Alone: nothing to hand to.
        assert_eq!(pages_to_hand_over(50, 17, None), 0);
        // 17/17/16 while sends are still being started and the share reads 7: nobody moves.
        assert_eq!(pages_to_hand_over(17, 7, Some(16)), 0);
        assert_eq!(pages_to_hand_over(17, 7, Some(17)), 0);
        // An instance emptied at the end of its sends takes half the gap, not the whole surplus.
        assert_eq!(pages_to_hand_over(10, 4, Some(0)), 5);
        // At or within one of the share: nothing, whatever the others hold.
        assert_eq!(pages_to_hand_over(18, 17, Some(0)), 0);
    }
}
