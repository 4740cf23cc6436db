//! The page actor: the only writer of its page's opt-ins and deliveries.
//!
//! Its database work happens in two kinds of steps, each an `AtomicResponse` so that no other
//! message (and no other step) runs until it is committed: a *pump* (recover, materialise,
//! claim pending deliveries and commit them `in_flight`, then hand them to the sender pool) and
//! a *flush* (record the answers that came back, all of them in one transaction). Two sends of
//! the page therefore never interleave their reservations, and nothing reaches Facebook that is
//! not committed in flight first. The actor's memory holds only what is also in a row, or what
//! recovery would settle the same way if it were lost.
//!
//! A pump steps each send in its own transaction: a send whose step fails waits (backing off)
//! while the others go on, and the claims of the steps that committed are handed on. Should a
//! step's commit fail, the deliveries it may have committed are found and put back by
//! reconciliation before the next claim (see `sends::reconcile`). The decisions themselves are
//! plain functions in [`decide`] and `policy`.

mod decide;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use actix::{
    ActorFutureExt, AsyncContext, AtomicResponse, Context, Handler, Message, ResponseActFuture,
    Supervised, WrapFuture, prelude::*,
};
use serde_json::Value;
use tokio::sync::oneshot;

use super::{
    metrics,
    pacing::Pacer,
    policy::{self, PageSignal},
    progress::{Progress, ProgressHub},
    sender::{Dispatch, Item, ItemResult, SenderPool, To},
};
use crate::{
    crypto::SecretCipher,
    domain::{PageCredentials, PageId, Route, SendEvent, SendState},
    graph::Failure,
    store::{
        Store, StoreError,
        leases::Fence,
        now_ms, pages,
        sends::{self, Answer, Attempt, Claimed, Outcome},
    },
};

/// How often an idle or waiting page looks for due work (retries, throttle holds, new sends).
const TICK: Duration = Duration::from_millis(200);
/// How often the page's rate and credentials are read again (UpdatePage takes effect).
const PAGE_RELOAD: Duration = Duration::from_secs(5);
/// Answers are recorded together: at once when this many wait, else after `FLUSH_DELAY` on an
/// unpaced page and `PACED_FLUSH_DELAY` on a paced one. A paced page's answers come a batch
/// (a sixth of a second's calls) at a time: recorded as they come, the transactions, not the
/// rows, would be most of the database's work (on PostgreSQL, a round trip each for the lease
/// check, the statements and the commit). A little over one batch's interval lets a send of
/// two batches (a page at 300/s sending to 100 users) record both, and end, in one step.
const FLUSH_AT: usize = 512;
const FLUSH_DELAY: Duration = Duration::from_millis(2);
const PACED_FLUSH_DELAY: Duration = Duration::from_millis(200);
/// Window over which a send's rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Deps {
    pub store: Store,
    pub cipher: SecretCipher,
    pub pool: SenderPool,
    pub pacer: Pacer,
    pub hub: ProgressHub,
}

#[derive(Clone)]
struct PageConfig {
    rate: u32,
    credentials: Arc<PageCredentials>,
}

struct ActiveSend {
    send: sends::Send,
    message: Arc<Value>,
    finished_at: VecDeque<(Instant, u64)>,
    /// Set once the send stops running here: its calls not yet made are not made.
    stopped: Arc<AtomicBool>,
}

impl ActiveSend {
    fn new(send: sends::Send) -> Self {
        let message = Arc::new(serde_json::from_str(&send.message).unwrap_or(Value::Null));
        ActiveSend {
            send,
            message,
            finished_at: VecDeque::new(),
            stopped: Arc::default(),
        }
    }

    /// Running again after a pause (perhaps before any step saw it paused): jobs made from now
    /// on may go; those made before stay stopped.
    fn run_again(&mut self) {
        if self.stopped.load(Ordering::SeqCst) {
            self.stopped = Arc::default();
        }
    }

    fn progress(&mut self) -> Progress {
        let now = Instant::now();
        while self
            .finished_at
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            self.finished_at.pop_front();
        }
        let mut progress = Progress::from_send(&self.send);
        if let Some((first, _)) = self.finished_at.front() {
            let span = now.duration_since(*first).as_secs_f64().max(1.0);
            let done: u64 = self.finished_at.iter().map(|(_, n)| n).sum();
            progress.rate_per_second = done as f64 / span;
            if progress.rate_per_second > 0.0 {
                progress.eta_seconds =
                    (progress.pending + progress.in_flight) as f64 / progress.rate_per_second;
            }
        }
        progress
    }
}

pub struct PageActor {
    page_id: String,
    deps: Deps,
    config: Option<PageConfig>,
    config_loaded: Option<Instant>,
    sends: Vec<ActiveSend>,
    /// Round-robin start among the running sends.
    turn: usize,
    /// Dispatched deliveries whose answers have not come back, by delivery id.
    dispatched: HashMap<i64, (Arc<str>, Attempt)>,
    /// Decided answers not yet recorded.
    unrecorded: Vec<Answer>,
    /// A halt an answer called for, made by the next recording.
    signals: Vec<PageSignal>,
    /// Sends whose last step failed: how many times in a row, and when to try again.
    retry_at: HashMap<String, (u32, Instant)>,
    /// A step failed, perhaps after committing claims it never handed on: reconcile first.
    needs_reconcile: bool,
    /// Claims wait until then (a throttled answer).
    hold_until: Option<Instant>,
    /// In-flight rows of an earlier life (or an uncertain commit) must be settled first.
    needs_recovery: bool,
    reload_sends: bool,
    pump_scheduled: bool,
    flush_scheduled: bool,
    draining: bool,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// Moves on when the page halts or resumes: jobs of an older generation are not attempted,
    /// and their page-level answers (sent with old credentials) halt nothing.
    gate: Arc<AtomicU64>,
    /// The page's lease as this actor was given it: checked in every transaction it writes.
    fence: Fence,
    /// The lease went to another owner: this actor writes nothing more and stays stopped.
    lost: bool,
    /// The Arbiter this actor runs on: a paced page's calls go to the sender there.
    arbiter: usize,
}

impl PageActor {
    pub fn new(page_id: String, deps: Deps, fence: Fence, arbiter: usize) -> Self {
        PageActor {
            page_id,
            arbiter,
            deps,
            fence,
            lost: false,
            config: None,
            config_loaded: None,
            sends: Vec::new(),
            turn: 0,
            dispatched: HashMap::new(),
            unrecorded: Vec::new(),
            signals: Vec::new(),
            retry_at: HashMap::new(),
            needs_reconcile: false,
            hold_until: None,
            needs_recovery: true,
            reload_sends: true,
            pump_scheduled: false,
            flush_scheduled: false,
            draining: false,
            drain_waiters: Vec::new(),
            gate: Arc::default(),
        }
    }

    /// Another instance holds the page now (or is about to): stop without writing anything.
    /// Deliveries in flight stay in flight for the new owner's recovery, as after a crash.
    /// `given_up`: the supervisor drained the page and gives its lease up (idle, or handed
    /// over), the ordinary end of a page's work, not a lease taken away.
    fn lose_the_page(&mut self, ctx: &mut Context<Self>, given_up: bool) {
        if self.lost {
            return;
        }
        if given_up {
            tracing::debug!(page_id = %self.page_id, generation = self.fence.generation,
                "the page was drained and its lease is given up; its actor stops here");
        } else {
            tracing::warn!(page_id = %self.page_id, generation = self.fence.generation,
                "this instance no longer holds the page's lease; its actor stops here");
        }
        self.lost = true;
        self.gate.fetch_add(1, Ordering::SeqCst);
        self.dispatched.clear();
        self.unrecorded.clear();
        for waiter in self.drain_waiters.drain(..) {
            let _ = waiter.send(());
        }
        ctx.stop();
    }

    fn in_flight(&self) -> usize {
        self.dispatched.len() + self.unrecorded.len()
    }

    fn schedule_pump(&mut self, ctx: &mut Context<Self>) {
        if !self.pump_scheduled && !self.lost {
            self.pump_scheduled = true;
            ctx.notify(Pump);
        }
    }

    fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        if !self.flush_scheduled && !self.lost {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
    }

    fn release_drain_waiters(&mut self) {
        if self.draining && self.in_flight() == 0 {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// The sends to drive are exactly `rows` (a reload: the page's running sends).
    fn replace_sends(&mut self, rows: Vec<sends::Send>) {
        let mut old: HashMap<String, ActiveSend> = self
            .sends
            .drain(..)
            .map(|a| (a.send.id.clone(), a))
            .collect();
        self.sends = rows
            .into_iter()
            .map(|row| match old.remove(&row.id) {
                Some(mut active) => {
                    active.send = row;
                    active.run_again();
                    active
                }
                None => ActiveSend::new(row),
            })
            .collect();
        for gone in old.values() {
            gone.stopped.store(true, Ordering::SeqCst);
            // No longer driven here: whatever row the hub holds of it may be older than the
            // database's (a step committed before the command that stopped it).
            self.deps.hub.forget_running_row(&gone.send.id);
        }
    }

    /// Counters as the database has them now, published; a send that stopped running (paused,
    /// halted, cancelled, completed) is no longer driven.
    fn refresh(&mut self, rows: Vec<sends::Send>) {
        let now = Instant::now();
        for row in rows {
            match self.sends.iter_mut().find(|a| a.send.id == row.id) {
                Some(active) => {
                    let ended = |s: &sends::Send| s.sent + s.failed + s.skipped + s.unknown;
                    let newly = ended(&row) - ended(&active.send);
                    if newly > 0 {
                        active
                            .finished_at
                            .push_back((now, u64::try_from(newly).unwrap_or(0)));
                    }
                    // Completed by a step or by the recording of its last answers.
                    if row.state == SendState::Completed && active.send.state != row.state {
                        tracing::info!(page_id = %self.page_id, send_id = %row.id,
                            sent = row.sent, failed = row.failed, skipped = row.skipped,
                            unknown = row.unknown, "send completed");
                    }
                    active.send = row;
                }
                // Not driven here (a cancelled send's last answers, say): its row is answered
                // from memory only once it is final.
                None if row.state.is_finished() => {
                    self.deps.hub.publish(Progress::from_send(&row), &row)
                }
                None => self.deps.hub.publish_undriven(&row),
            }
        }
        for active in &mut self.sends {
            let progress = active.progress();
            self.deps.hub.publish(progress, &active.send);
        }
        self.sends.retain(|a| {
            let running = a.send.state == SendState::Running;
            if !running {
                a.stopped.store(true, Ordering::SeqCst);
            }
            running
        });
        let pending: i64 = self.sends.iter().map(|a| a.send.pending()).sum();
        metrics::page_gauges(&self.page_id, self.in_flight(), pending);
        if let Some(view) = self.deps.pacer.view(&self.page_id) {
            metrics::page_pace(&self.page_id, view.pace, view.budget);
        }
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>, send_index: usize, claimed: Vec<Claimed>) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let batch = self.deps.pacer.batch_size(&self.page_id, config.rate);
        let active = &self.sends[send_index];
        let send_id: Arc<str> = Arc::from(active.send.id.as_str());
        let message = active.message.clone();
        for chunk in claimed.chunks(batch) {
            let items: Vec<Item> = chunk
                .iter()
                .map(|c| Item {
                    delivery_id: c.id,
                    to: match (&c.token, c.route) {
                        (Some(token), Route::Token) => To::Token(token.clone()),
                        (Some(token), Route::Recurring) => To::Recurring(token.clone()),
                        _ => To::Psid(c.psid.clone()),
                    },
                })
                .collect();
            for c in chunk {
                self.dispatched.insert(c.id, (send_id.clone(), c.attempt()));
            }
            let ids: Vec<i64> = chunk.iter().map(|c| c.id).collect();
            let generation = self.gate.load(Ordering::SeqCst);
            let job = Dispatch {
                page_id: self.page_id.clone(),
                rate: config.rate,
                credentials: config.credentials.clone(),
                message: message.clone(),
                items,
                gate: self.gate.clone(),
                generation,
                stopped: active.stopped.clone(),
            };
            // A paced page keeps at most half a second of calls in flight, which one thread
            // carries easily: its sender is the one on its own thread, so that a call and its
            // answer cross no threads (on a busy instance, waking another thread for each call
            // and answer cost more CPU than the call). An unpaced page spreads its calls over
            // every thread.
            let on = self.deps.pacer.is_paced().then_some(self.arbiter);
            ctx.spawn(self.deps.pool.dispatch(job, on).into_actor(self).map(
                move |answer, act: &mut PageActor, ctx| {
                    let results: Vec<ItemResult> = match answer {
                        Ok(answered) => {
                            if !answered.not_attempted.is_empty() {
                                act.not_attempted(&answered.not_attempted, ctx);
                            }
                            answered.results
                        }
                        // The sender is gone; it may have called Facebook: ambiguous.
                        Err(_) => ids
                            .iter()
                            .map(|id| {
                                (
                                    *id,
                                    Err(Failure::transport(
                                        "the sender stopped before answering".into(),
                                        true,
                                    )),
                                )
                            })
                            .collect(),
                    };
                    act.answers(results, generation, ctx);
                },
            ));
        }
    }

    fn answers(&mut self, results: Vec<ItemResult>, generation: u64, ctx: &mut Context<Self>) {
        let now = now_ms();
        let current = generation == self.gate.load(Ordering::SeqCst);
        let mut signals = Vec::new();
        for (id, result) in results {
            let Some((send_id, claimed)) = self.dispatched.remove(&id) else {
                continue;
            };
            let decision = policy::decide(&claimed, result, now);
            if current && decision.signal != PageSignal::None {
                signals.push(decision.signal);
            }
            self.unrecorded.push(Answer {
                send_id: send_id.to_string(),
                id,
                claim: claimed.claim,
                outcome: decision.outcome,
            });
        }
        self.react(&signals);
        self.flush_soon(ctx);
    }

    /// What the answers say of the page, acted on as they come: a throttle slows the page (or
    /// the app) and holds it now, not when the answers are recorded, which on a paced page is
    /// up to `PACED_FLUSH_DELAY` later. A halt waits for the recording that halts the sends.
    fn react(&mut self, signals: &[PageSignal]) {
        let read = decide::read_signals(signals);
        for (regain, app_wide) in &read.throttles {
            metrics::throttled(&self.page_id);
            self.deps.pacer.throttled(&self.page_id, *regain, *app_wide);
        }
        if let Some(wait) = read.hold_for {
            let until = Instant::now() + wait;
            if self.hold_until.is_none_or(|h| h < until) {
                self.hold_until = Some(until);
            }
        }
        if let Some(reason) = read.halt {
            self.signals.push(PageSignal::Halt { reason });
        }
    }

    /// One transaction for many answers: now when enough wait (or nothing else is coming),
    /// else a moment later.
    fn flush_soon(&mut self, ctx: &mut Context<Self>) {
        if self.unrecorded.len() >= FLUSH_AT || self.dispatched.is_empty() {
            self.schedule_flush(ctx);
        } else if !self.flush_scheduled && !self.lost {
            self.flush_scheduled = true;
            let delay = match self.deps.pacer.is_paced() {
                true => PACED_FLUSH_DELAY,
                false => FLUSH_DELAY,
            };
            ctx.run_later(delay, |_, ctx| ctx.notify(Flush));
        }
    }

    /// Room for a claim worth a database step: a quarter of the cap, or everything is back.
    fn worth_pumping(&self) -> bool {
        let Some(config) = &self.config else {
            return false;
        };
        decide::worth_pumping(
            self.deps.pacer.in_flight_cap(config.rate),
            self.deps.pacer.batch_size(&self.page_id, config.rate),
            self.in_flight(),
            self.dispatched.len(),
        )
    }

    /// Whether a step would do anything: recover, read the page or its sends again, claim or
    /// materialise with room worth a step, or see a send through to its end. A step that can
    /// only find nothing is skipped: on a paced page the tick would otherwise take a
    /// transaction every 200 ms for a handful of deliveries.
    fn wants_a_step(&self) -> bool {
        let config_due = self
            .config_loaded
            .is_none_or(|at| at.elapsed() >= PAGE_RELOAD);
        let in_progress = |a: &ActiveSend| {
            let send = &a.send;
            !send.audience_done() || send.pending() > 0 || send.in_flight == 0
        };
        self.needs_recovery
            || self.needs_reconcile
            || self.reload_sends
            || (!self.sends.is_empty()
                && (config_due || (self.worth_pumping() && self.sends.iter().any(in_progress))))
    }

    /// Jobs dropped before their call: back to pending, as if never claimed.
    fn not_attempted(&mut self, ids: &[i64], ctx: &mut Context<Self>) {
        let now = now_ms();
        for id in ids {
            if let Some((send_id, claimed)) = self.dispatched.remove(id) {
                self.unrecorded.push(Answer {
                    send_id: send_id.to_string(),
                    id: *id,
                    claim: claimed.claim,
                    outcome: policy::not_attempted(now),
                });
            }
        }
        self.schedule_flush(ctx);
    }

    /// Every delivery the actor has out or answered and not yet recorded.
    fn known(&self) -> std::collections::HashSet<i64> {
        self.dispatched
            .keys()
            .copied()
            .chain(self.unrecorded.iter().map(|a| a.id))
            .collect()
    }
}

impl Actor for PageActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.lost {
            // The supervised restart that follows the stop in `lose_the_page`. Stopping again
            // would only be restarted again, at once and for as long as anyone holds an
            // address of this actor: it idles instead, with nothing scheduled, and ends when
            // the last address is dropped.
            return;
        }
        // Requests from the API are few and answered quickly; work arrives through the database.
        ctx.set_mailbox_capacity(256);
        ctx.run_interval(TICK, |act, ctx| {
            if act.wants_a_step() && !act.draining {
                act.schedule_pump(ctx);
            }
            if !act.unrecorded.is_empty() {
                act.schedule_flush(ctx);
            }
        });
        self.schedule_pump(ctx);
        tracing::debug!(page_id = %self.page_id, "page actor started");
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Nobody drives the page's sends here any more: the database answers for them.
        self.deps.hub.forget_running_rows_of_page(&self.page_id);
    }
}

impl Supervised for PageActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        if self.lost {
            return;
        }
        // Answers of the last life are lost with its futures; their rows are still in flight,
        // and recovery settles them exactly as after a crash. Until it has, the database
        // answers for the page's running sends.
        self.deps.hub.forget_running_rows_of_page(&self.page_id);
        tracing::warn!(page_id = %self.page_id, "page actor restarting");
        self.dispatched.clear();
        self.unrecorded.clear();
        self.signals.clear();
        self.sends.clear();
        self.retry_at.clear();
        self.needs_recovery = true;
        self.needs_reconcile = false;
        self.reload_sends = true;
        self.pump_scheduled = false;
        self.flush_scheduled = false;
    }
}

/// Something changed in the database for this page (a send started, the page was updated).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wake;

impl Handler<Wake> for PageActor {
    type Result = ();

    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        self.reload_sends = true;
        self.config_loaded = None;
        self.schedule_pump(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Pump;

struct PumpPlan {
    recover: bool,
    /// Deliveries the actor has out or unrecorded, when a reconciliation is due.
    reconcile: Option<std::collections::HashSet<i64>>,
    reload_sends: bool,
    reload_config: bool,
    capacity: usize,
    /// How many deliveries the actor has out: with `capacity` unknown (the page's settings not
    /// yet read), the step works it out from the settings it reads.
    first_claim: Option<ClaimRoom>,
    sends: Vec<sends::Send>,
    turn: usize,
    /// Sends waiting after a failed step (see `decide::step_order`).
    retry_at: HashMap<String, (u32, Instant)>,
}

/// What a step needs to size its own claim once it has read the page's rate.
struct ClaimRoom {
    in_flight: usize,
    draining: bool,
    held: bool,
}

#[derive(Default)]
struct PumpResult {
    recovered: u64,
    reconciled: bool,
    config: Option<PageConfig>,
    reloaded: Option<Vec<sends::Send>>,
    claims: Vec<(String, Vec<Claimed>)>,
    refreshed: Vec<sends::Send>,
    completed: Vec<sends::Send>,
    /// Sends whose step failed, and why.
    failed: Vec<(String, StoreError)>,
}

/// One pump. The page-wide parts (recovery, reconciliation, reading the page and its sends)
/// fail the pump as a whole; each send's step stands alone: one that fails is reported in the
/// result, and the claims of the others are returned to be handed on.
async fn pump(
    deps: Deps,
    page_id: String,
    fence: Fence,
    mut plan: PumpPlan,
) -> Result<PumpResult, StoreError> {
    let store = &deps.store;
    // What a step only reads (its sends, the page's settings) comes from the readers: on
    // SQLite the writer is one connection every page's steps queue for. Every write that
    // follows a read is conditional on the state it leaves, so a read a moment old is safe.
    let read = &deps.store.engine_read;
    let now = now_ms();
    let mut result = PumpResult::default();
    // The page's sends, read once for recovery and the reload below.
    let mut listed = None;
    if plan.recover {
        let mut rows = sends::page_sends(read, &page_id).await?;
        for send in &mut rows {
            // The counter moves in the transactions that move the deliveries: it is exact.
            if send.in_flight > 0 {
                let recovering = {
                    let (db, fence, send_id) = (store.db.clone(), fence.clone(), send.id.clone());
                    async move { sends::recover_in_flight(&db, &fence, &send_id, now).await }
                };
                let n = store.write(recovering).await?;
                if n > 0 {
                    tracing::warn!(page_id, send_id = %send.id, recovered = n,
                        "deliveries found in flight settled by recovery");
                }
                result.recovered += n;
                *send = sends::get(read, &send.id).await?;
            }
        }
        listed = Some(rows);
    }
    if let Some(known) = &plan.reconcile {
        let rows = match &listed {
            Some(rows) => rows.clone(),
            None => sends::page_sends(read, &page_id).await?,
        };
        let with_flight: Vec<&sends::Send> = rows.iter().filter(|s| s.in_flight > 0).collect();
        for send in with_flight {
            let reconciling = {
                let (db, fence, send_id) = (store.db.clone(), fence.clone(), send.id.clone());
                let known = known.clone();
                async move { sends::reconcile(&db, &fence, &send_id, &known, now).await }
            };
            let n = store.write(reconciling).await?;
            if n > 0 {
                tracing::warn!(page_id, send_id = %send.id, reconciled = n,
                    "deliveries a failed step left in flight, never attempted, are pending again");
            }
        }
        result.reconciled = true;
        listed = None;
    }
    if plan.reload_config {
        let id = PageId::parse(&page_id).map_err(|e| StoreError::Db(sea_orm::DbErr::Custom(e)))?;
        let record = pages::get(read, &id).await?;
        let credentials = pages::credentials(read, &deps.cipher, &id).await?;
        let rate = record.send_rate_per_second;
        result.config = Some(PageConfig {
            rate,
            credentials: Arc::new(credentials),
        });
        // The actor's first step: it claims at once rather than in a second step (with many
        // small sends, one step fewer for every page on the one writer).
        if let Some(room) = &plan.first_claim {
            plan.capacity = decide::claim_capacity(
                Some(deps.pacer.in_flight_cap(rate)),
                room.in_flight,
                room.draining,
                room.held,
            );
        }
    }
    let mut running = plan.sends;
    if plan.reload_sends || plan.recover || plan.reconcile.is_some() {
        let listed = match listed {
            Some(rows) => rows,
            None => sends::page_sends(read, &page_id).await?,
        };
        // Queued sends are run by their first step below (or, left without one, after it).
        let rows: Vec<sends::Send> = listed
            .into_iter()
            .filter(|send| matches!(send.state, SendState::Queued | SendState::Running))
            .collect();
        result.reloaded = Some(rows.clone());
        running = rows;
    }
    let order = {
        let views: Vec<decide::SendView<'_>> = running
            .iter()
            .map(|send| decide::SendView {
                id: &send.id,
                nothing_to_claim: send.audience_done() && send.pending() == 0,
            })
            .collect();
        decide::step_order(&views, plan.turn, &plan.retry_at, Instant::now())
    };
    let mut capacity = plan.capacity;
    for index in order {
        if capacity == 0 {
            break;
        }
        let send = &running[index];
        // Retries and recovered deliveries first, then new recipients, claimed as they are
        // materialised.
        let limit = capacity as u64;
        let stepping = store.transact(
            (fence.clone(), send.id.clone()),
            move |txn, (fence, send_id)| async move {
                sends::step(&txn, &fence, &send_id, now, limit, true).await
            },
        );
        match stepping.await {
            Ok(step) => {
                capacity -= step.claimed.len();
                result.refreshed.push(step.send);
                if !step.claimed.is_empty() {
                    crate::crashpoint::pass("in-flight-committed");
                    result.claims.push((send.id.clone(), step.claimed));
                }
            }
            Err(StoreError::Fenced) => return Err(StoreError::Fenced),
            Err(err) => result.failed.push((send.id.clone(), err)),
        }
    }
    // Queued sends no step reached (no room left) run now, so that they show as running.
    for send in running.iter().filter(|s| s.state == SendState::Queued) {
        if result.refreshed.iter().any(|row| row.id == send.id) {
            continue;
        }
        let running = store.transact(send.id.clone(), move |txn, send_id| async move {
            sends::apply(&*txn, &send_id, SendEvent::Run, None, now).await
        });
        match running.await {
            Ok(row) => result.refreshed.push(row),
            // Paused or cancelled meanwhile (from any instance): not to be run.
            Err(StoreError::Conflict) => {}
            Err(err) => return Err(err),
        }
    }
    // A send that had nothing to claim may be done.
    for send in &running {
        if result.claims.iter().any(|(id, _)| *id == send.id)
            || result.failed.iter().any(|(id, _)| *id == send.id)
        {
            continue;
        }
        let latest = result
            .refreshed
            .iter()
            .find(|row| row.id == send.id)
            .unwrap_or(send);
        if latest.in_flight == 0
            && latest.audience_done()
            && let Some(done) = store
                .transact(send.id.clone(), move |txn, send_id| async move {
                    sends::complete_if_done(&*txn, &send_id, now).await
                })
                .await?
        {
            result.refreshed.retain(|row| row.id != send.id);
            result.completed.push(done);
        }
    }
    Ok(result)
}

impl Handler<Pump> for PageActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Pump, _: &mut Context<Self>) -> Self::Result {
        self.pump_scheduled = false;
        if self.lost {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let held = self.hold_until.is_some_and(|until| until > Instant::now());
        let cap = self
            .config
            .as_ref()
            .map(|c| self.deps.pacer.in_flight_cap(c.rate));
        let capacity = decide::claim_capacity(cap, self.in_flight(), self.draining, held);
        let recover = self.needs_recovery && self.in_flight() == 0;
        let plan = PumpPlan {
            recover,
            reconcile: (self.needs_reconcile && !recover).then(|| self.known()),
            reload_sends: self.reload_sends,
            reload_config: self.config.is_none()
                || self
                    .config_loaded
                    .is_none_or(|at| at.elapsed() >= PAGE_RELOAD),
            // Nothing is claimed before the page's settings are known: the step that reads
            // them sizes the claim.
            capacity,
            first_claim: cap.is_none().then_some(ClaimRoom {
                in_flight: self.in_flight(),
                draining: self.draining,
                held,
            }),
            sends: self.sends.iter().map(|a| a.send.clone()).collect(),
            turn: self.turn,
            retry_at: self.retry_at.clone(),
        };
        if plan.reload_config {
            self.config_loaded = Some(Instant::now());
        }
        self.turn = self.turn.wrapping_add(1);
        self.reload_sends = false;
        // On the page's own thread: only the transactions go to the writer (see
        // `Store::transact`), which serves nothing else while pages wait for it.
        let fut = pump(
            self.deps.clone(),
            self.page_id.clone(),
            self.fence.clone(),
            plan,
        );
        let began = Instant::now();
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            move |result, act, ctx| match result {
                Err(StoreError::Fenced) => act.lose_the_page(ctx, false),
                Err(err) => {
                    tracing::error!(page_id = %act.page_id, error = %err, "page step failed; retrying");
                    // Reading the page or its sends again, or recovering, failed before any
                    // send's step: the sends are read again next time.
                    act.reload_sends = true;
                    if act.config.is_none() {
                        act.config_loaded = None;
                    }
                }
                Ok(result) => {
                    if recover {
                        act.needs_recovery = false;
                        metrics::recovered(result.recovered);
                    }
                    if result.reconciled {
                        act.needs_reconcile = false;
                    }
                    if let Some(config) = result.config {
                        act.config = Some(config);
                    }
                    if let Some(rows) = result.reloaded {
                        act.replace_sends(rows);
                    }
                    let now = Instant::now();
                    for (send_id, err) in &result.failed {
                        let failures = act.retry_at.get(send_id).map_or(1, |(n, _)| n + 1);
                        let wait = decide::step_retry_delay(failures);
                        tracing::error!(page_id = %act.page_id, %send_id, error = %err,
                            failures, retry_in_ms = wait.as_millis() as u64,
                            "send step failed; the page's other sends go on");
                        act.retry_at.insert(send_id.clone(), (failures, now + wait));
                        // The step may have committed claims it could not hand on.
                        act.needs_reconcile = true;
                    }
                    for row in result.refreshed.iter().chain(&result.completed) {
                        act.retry_at.remove(&row.id);
                    }
                    let claimed_any = !result.claims.is_empty();
                    tracing::debug!(page_id = %act.page_id,
                        claimed = result.claims.iter().map(|(_, c)| c.len()).sum::<usize>(),
                        in_flight = act.in_flight(), took_ms = began.elapsed().as_secs_f64() * 1e3,
                        "pump step");
                    for (send_id, claimed) in result.claims {
                        if let Some(index) = act.sends.iter().position(|a| a.send.id == send_id) {
                            act.dispatch(ctx, index, claimed);
                        }
                    }
                    let mut rows = result.refreshed;
                    rows.extend(result.completed);
                    act.refresh(rows);
                    // More may be claimable at once (a full claim); otherwise the tick or the
                    // next answers bring the next step.
                    if claimed_any && act.in_flight() < act.config.as_ref().map_or(0, |c| act.deps.pacer.in_flight_cap(c.rate)) {
                        act.schedule_pump(ctx);
                    }
                }
            },
        )))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for PageActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        self.flush_scheduled = false;
        if self.lost {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let answers = std::mem::take(&mut self.unrecorded);
        // Only halts wait here: throttles were acted on as their answers came (`react`).
        let halt = decide::read_signals(&std::mem::take(&mut self.signals)).halt;
        if let Some(reason) = &halt {
            // Jobs still waiting for their turn are not attempted.
            self.gate.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(page_id = %self.page_id, %reason, "halting the page's sends");
        }
        let counts = count_outcomes(&answers);
        let began = Instant::now();
        let recorded = answers.len();
        let nothing = answers.is_empty() && halt.is_none();
        let context = (
            Arc::<str>::from(self.page_id.as_str()),
            self.fence.clone(),
            Arc::new(answers.clone()),
            halt.clone().map(Arc::<str>::from),
        );
        let store = self.deps.store.clone();
        let fut = async move {
            if nothing {
                return Ok(Vec::new());
            }
            let recording = store.transact(
                context,
                |txn, (page_id, fence, to_record, reason)| async move {
                    let halt = reason.as_deref().map(|r| (&*page_id, r));
                    sends::record(&txn, &fence, &to_record, halt, now_ms()).await
                },
            );
            recording.await
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            move |result, act, ctx| {
                match result {
                    Err(StoreError::Fenced) => act.lose_the_page(ctx, false),
                    Err(err) => {
                        tracing::error!(page_id = %act.page_id, error = %err,
                            "recording outcomes failed; retrying");
                        // One transaction: nothing of it stands unless its commit's answer was
                        // lost, and recording an answer again changes nothing. Record it all
                        // again later.
                        let mut answers = answers;
                        answers.append(&mut act.unrecorded);
                        act.unrecorded = answers;
                        if let Some(reason) = halt {
                            act.signals.push(PageSignal::Halt { reason });
                        }
                    }
                    Ok(rows) => {
                        tracing::debug!(page_id = %act.page_id, recorded,
                            took_ms = began.elapsed().as_secs_f64() * 1e3, "flush step");
                        for (outcome, n) in counts {
                            metrics::outcome(outcome, n);
                        }
                        act.refresh(rows);
                        if halt.is_some() {
                            act.reload_sends = true;
                        }
                        act.release_drain_waiters();
                        if !act.draining && act.worth_pumping() {
                            act.schedule_pump(ctx);
                        }
                    }
                }
            },
        )))
    }
}

fn count_outcomes(answers: &[Answer]) -> Vec<(&'static str, u64)> {
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    for answer in answers {
        let name = match answer.outcome {
            Outcome::Sent {
                confirmed_by_token: true,
                ..
            } => "sent_confirmed_by_token",
            Outcome::Sent { .. } => "sent",
            Outcome::Failed { .. } => "failed",
            Outcome::TokenStopped { .. } => "failed_token_stopped",
            Outcome::Declined { .. } => "skipped_by_facebook",
            Outcome::Retry { .. } => "retry",
            Outcome::Unknown { .. } => "unknown",
        };
        *counts.entry(name).or_default() += 1;
    }
    counts.into_iter().collect()
}

/// Operator commands, serialised with the page's steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Cancel,
}

/// A command was applied to one of the page's sends (see `EngineHandle::command`): the actor
/// catches up with the row it left.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Steered {
    pub send: sends::Send,
    pub command: Command,
}

impl Handler<Steered> for PageActor {
    type Result = ();

    fn handle(&mut self, msg: Steered, ctx: &mut Context<Self>) {
        let send = &msg.send;
        tracing::info!(page_id = %self.page_id, send_id = %send.id, state = %send.state,
            command = ?msg.command, "send command applied");
        if let Some(active) = self.sends.iter_mut().find(|a| a.send.id == send.id) {
            if send.state == SendState::Running {
                active.run_again();
            } else {
                // Calls still waiting for their turn are not made.
                active.stopped.store(true, Ordering::SeqCst);
            }
        }
        if msg.command == Command::Resume {
            // A fixed page: read its credentials again, and stop holding; answers to calls made
            // before now halt nothing.
            self.gate.fetch_add(1, Ordering::SeqCst);
            self.config_loaded = None;
            self.hold_until = None;
        }
        self.reload_sends = true;
        self.schedule_pump(ctx);
    }
}

/// Pause, resume or cancel as a change of the send's rows: safe from any instance (the owner's
/// own steps re-check the send's state in their transactions). The owner reads its sends again
/// when woken.
pub async fn apply_command(
    store: &Store,
    send_id: &str,
    command: Command,
) -> Result<sends::Send, StoreError> {
    let db = &store.db;
    let now = now_ms();
    match command {
        Command::Pause => sends::apply(db, send_id, SendEvent::Pause, None, now).await,
        Command::Resume => sends::apply(db, send_id, SendEvent::Resume, Some(""), now).await,
        Command::Cancel => sends::cancel(db, send_id, now).await,
    }
}

/// The page's lease is gone (lost, or given up after a drain: `given_up`): stop for good.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Lost {
    pub given_up: bool,
}

impl Handler<Lost> for PageActor {
    type Result = ();

    fn handle(&mut self, lost: Lost, ctx: &mut Context<Self>) {
        self.lose_the_page(ctx, lost.given_up);
    }
}

/// Stop claiming; answer when every delivery in flight is recorded.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

impl Handler<Drain> for PageActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        self.release_drain_waiters();
        Box::pin(
            async move {
                let _ = rx.await;
            }
            .into_actor(self),
        )
    }
}
