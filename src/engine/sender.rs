//! The sender pool: actors that call the Graph API for page actors, paced by the [`Pacer`].
//! A sender keeps no state: what it was asked to send is already `in_flight` in the database,
//! so a lost answer is settled by the page actor's recovery, never by guessing.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use actix::{Actor, Addr, ArbiterHandle, Context, Handler, Message, ResponseFuture};
use serde_json::Value;

use super::{metrics, pacing::Pacer};
use crate::{
    domain::PageCredentials,
    graph::{BatchSend, Delivered, Failure, GraphClient, Recipient},
};

/// Who one item goes to.
#[derive(Clone, Debug)]
pub enum To {
    Token(String),
    Recurring(String),
    Psid(String),
}

#[derive(Clone, Debug)]
pub struct Item {
    pub delivery_id: i64,
    pub to: To,
}

/// One Graph request's worth of items for one page (a single send, or a batch).
pub struct Dispatch {
    pub page_id: String,
    pub rate: u32,
    pub credentials: Arc<PageCredentials>,
    pub message: Arc<Value>,
    pub items: Vec<Item>,
    /// The page's generation now and when this job was made: when they differ (the page halted
    /// or was resumed meanwhile), the job is not attempted.
    pub gate: Arc<AtomicU64>,
    pub generation: u64,
    /// Set when the send stops running (paused, cancelled): its jobs still waiting for their
    /// turn are not attempted.
    pub stopped: Arc<AtomicBool>,
}

impl Dispatch {
    fn may_go(&self) -> bool {
        self.gate.load(Ordering::SeqCst) == self.generation && !self.stopped.load(Ordering::SeqCst)
    }
}

pub type ItemResult = (i64, Result<Delivered, Failure>);

/// What came of a job: an answer per item attempted, and the items not attempted (the page's
/// generation moved on, or the send stopped, while they waited for their turn).
#[derive(Debug, Default)]
pub struct Answered {
    pub results: Vec<ItemResult>,
    pub not_attempted: Vec<i64>,
}

impl Message for Dispatch {
    type Result = Answered;
}

pub struct Sender {
    graph: GraphClient,
    pacer: Pacer,
}

impl Actor for Sender {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Page actors never hold more than their in-flight cap here; this bounds the sum.
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<Dispatch> for Sender {
    type Result = ResponseFuture<Answered>;

    fn handle(&mut self, job: Dispatch, _: &mut Context<Self>) -> Self::Result {
        let graph = self.graph.clone();
        let pacer = self.pacer.clone();
        Box::pin(async move {
            let mut answered = Answered::default();
            let mut rest: &[Item] = &job.items;
            // In requests of the page's batch size at the moment each goes: a job made before
            // the page slowed down (a throttle, a budget learnt) does not go out in one burst.
            while !rest.is_empty() && job.may_go() {
                let size = pacer
                    .batch_size(&job.page_id, job.rate)
                    .clamp(1, rest.len());
                let ticket = pacer.acquire(&job.page_id, job.rate, size).await;
                if !job.may_go() {
                    break;
                }
                let (items, after) = rest.split_at(size);
                rest = after;
                let started = Instant::now();
                let (results, usage) = call(&graph, &job, items).await;
                pacer.observe(&job.page_id, ticket, &usage);
                metrics::graph_call(started.elapsed(), items.len());
                crate::crashpoint::pass("graph-answered");
                answered.results.extend(results);
            }
            answered.not_attempted = rest.iter().map(|item| item.delivery_id).collect();
            answered
        })
    }
}

/// One Graph request for `items` of the job: a send, or a batch.
async fn call(
    graph: &GraphClient,
    job: &Dispatch,
    items: &[Item],
) -> (Vec<ItemResult>, crate::graph::Usage) {
    fn recipient(to: &To) -> Recipient<'_> {
        match to {
            To::Token(token) => Recipient::Token(token.as_str()),
            To::Recurring(token) => Recipient::Recurring(token.as_str()),
            To::Psid(psid) => Recipient::Psid(psid.as_str()),
        }
    }
    if let [item] = items {
        let (result, usage) = graph
            .send_observed(&job.credentials, recipient(&item.to), &job.message)
            .await;
        return (vec![(item.delivery_id, result)], usage);
    }
    let sends: Vec<BatchSend<'_>> = items
        .iter()
        .map(|item| BatchSend {
            recipient: recipient(&item.to),
            message: &job.message,
        })
        .collect();
    let (answered, usage) = graph.send_batch(&job.credentials, &sends).await;
    let results = match answered {
        Ok(results) => items
            .iter()
            .map(|item| item.delivery_id)
            .zip(results)
            .collect(),
        // The request as a whole failed: every item shares its fate.
        Err(failure) => items
            .iter()
            .map(|item| (item.delivery_id, Err(failure.clone())))
            .collect(),
    };
    (results, usage)
}

#[derive(Clone)]
pub struct SenderPool {
    senders: Arc<Vec<Addr<Sender>>>,
    next: Arc<AtomicUsize>,
}

impl SenderPool {
    pub fn start(arbiters: &[ArbiterHandle], graph: GraphClient, pacer: Pacer) -> Self {
        let senders = arbiters
            .iter()
            .map(|arbiter| {
                // Each sender's calls travel on connections its own thread drives. The same
                // settings built a client at start-up; should another fail, the senders share.
                let graph = graph.with_own_connections().unwrap_or_else(|err| {
                    tracing::warn!(error = %err,
                        "could not build a Graph client for a sender; it shares the first one");
                    graph.clone()
                });
                let pacer = pacer.clone();
                Sender::start_in_arbiter(arbiter, move |_| Sender { graph, pacer })
            })
            .collect();
        SenderPool {
            senders: Arc::new(senders),
            next: Arc::default(),
        }
    }

    /// Hands a job to the sender on Arbiter `on`, or to the next sender (round robin: one
    /// page's calls use every core); the future resolves with one result per item (or a
    /// mailbox error if the sender is gone, which leaves the items in flight for recovery).
    pub fn dispatch(
        &self,
        job: Dispatch,
        on: Option<usize>,
    ) -> impl Future<Output = Result<Answered, actix::MailboxError>> + 'static {
        let n =
            on.unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed)) % self.senders.len();
        self.senders[n].send(job)
    }
}
