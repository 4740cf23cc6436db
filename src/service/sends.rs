//! Sends as use cases: start one from a reviewed story (idempotent per request id, admitted
//! within the active-send limit), steer it, watch it, read it. Plain async functions over domain
//! and store types: the gRPC handlers only translate (see `api::sends`).

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch as signal};
use tokio_stream::wrappers::ReceiverStream;

use super::ServiceError;
use crate::{
    domain::{DeliveryState, Violations, char_len},
    engine::{EngineError, EngineHandle, Progress, SendCommand},
    store::{
        Store, StoreError, now_ms,
        sends::{self, NewSend, Send, Started},
        stories,
    },
};

/// Longest request id a client may choose.
pub const REQUEST_ID_MAX_CHARS: usize = 128;
/// A watch sends at most one snapshot per this interval (about 10 a second). A send whose page
/// runs elsewhere reaches the hub through its shared database poll (see `engine::progress`).
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// What the send use cases work with.
#[derive(Clone)]
pub struct Context {
    pub store: Store,
    pub engine: EngineHandle,
    /// Becomes true when the server shuts down: open watches end.
    pub stopping: signal::Receiver<bool>,
    /// Most sends queued or running at once (`OTN_MAX_ACTIVE_SENDS`).
    pub max_active_sends: u64,
    /// `OTN_RECURRING_COOLDOWN_HOURS`: a send keeps the value of its start.
    pub recurring_cooldown_ms: i64,
}

/// A request to start a story's send, its fields checked.
#[derive(Clone, Debug)]
pub struct StartSend {
    pub story_id: String,
    /// Chosen by the client: a retry with the same id answers with the same send.
    pub request_id: String,
}

impl StartSend {
    pub fn parse(story_id: String, request_id: String) -> Result<Self, Violations> {
        let mut v = Violations::new();
        if story_id.is_empty() {
            v.add("story_id", "is required");
        }
        let len = char_len(&request_id);
        if request_id.contains('\0') {
            v.add("request_id", "must not contain a NUL character");
        } else if len == 0 || len > REQUEST_ID_MAX_CHARS {
            v.add(
                "request_id",
                format!(
                    "must be 1 to {REQUEST_ID_MAX_CHARS} characters, chosen by the client so a \
                     retry is safe"
                ),
            );
        }
        v.finish(|| Some(()))?;
        Ok(StartSend {
            story_id,
            request_id,
        })
    }
}

/// Which deliveries of a send to list, and from where.
#[derive(Clone, Debug)]
pub struct DeliveryQuery {
    pub send_id: String,
    /// `None`: every state.
    pub state: Option<DeliveryState>,
    pub after: Option<i64>,
    pub limit: u64,
}

/// Starts the story's send, once per request id: a retry of a request that already made its
/// send answers with that send, whatever happened to the story since. The story must be
/// reviewed as it is now, and fewer than `max_active_sends` sends queued or running.
pub async fn start(cx: &Context, request: StartSend) -> Result<Send, ServiceError> {
    // The reads before the transaction are on the readers: `sends::start` checks again, under
    // its lock, everything they found (the request id, the story's reviewed content), and the one
    // writer stays free for the engine.
    if let Some(existing) = sends::find_by_request_id(&cx.store.read, &request.request_id)
        .await
        .map_err(ServiceError::internal)?
    {
        return same_request(existing, &request.story_id);
    }

    let story = stories::get(&cx.store.read, &request.story_id)
        .await
        .map_err(|e| ServiceError::from_store(e, || format!("story {}", request.story_id)))?;
    tracing::Span::current().record("page_id", story.page_id.as_str());
    if !story.reviewed() {
        let what_to_do = match story.reviewed_at {
            None => "it has never been reviewed".to_string(),
            Some(_) => format!(
                "its content changed after {} reviewed it",
                story.reviewer_psid.as_deref().unwrap_or("the reviewer")
            ),
        };
        return Err(ServiceError::FailedPrecondition(format!(
            "story {} cannot be sent: {what_to_do}; call StoryService.PreviewStory to send the \
             current content to a reviewer, then start the send again",
            story.id
        )));
    }
    let segment = stories::segment_rule(&cx.store.read, &story)
        .await
        .map_err(ServiceError::internal)?;
    // Counted now, by the conditions the send will materialise with, so that its progress
    // has a total (and an ETA) from the start; the deliveries themselves come in batches.
    let recurring_cooldown_ms = cx.recurring_cooldown_ms;
    let audience = stories::estimate_total(&cx.store.read, &story, segment.as_ref(), now_ms())
        .await
        .map_err(ServiceError::internal)?;
    let expected = audience.token_recipients + audience.window_recipients;
    let max_active = cx.max_active_sends;
    let context = (
        Arc::new(story.clone()),
        Arc::<str>::from(request.request_id.as_str()),
        Arc::new(segment),
    );
    let starting = cx
        .store
        .transact(context, move |txn, (row, request_id, segment)| async move {
            let new = NewSend {
                story: &row,
                request_id: &request_id,
                segment: segment.as_ref().as_ref(),
                max_active,
                expected,
                recurring_cooldown_ms,
            };
            sends::start(&txn, new, now_ms()).await
        });
    let started = starting.await.map_err(|e| match e {
        StoreError::Conflict => ServiceError::FailedPrecondition(format!(
            "story {} changed while the send was being started; review it again",
            story.id
        )),
        // The story, or its page, was deleted since it was read.
        StoreError::NotFound => {
            ServiceError::from_store(StoreError::NotFound, || format!("story {}", story.id))
        }
        other => ServiceError::internal(other),
    })?;
    let send = match started {
        Started::Existing(existing) => return same_request(existing, &request.story_id),
        Started::Shed { active } => {
            return Err(ServiceError::ResourceExhausted(format!(
                "{active} sends are queued or running, the most this server takes at once \
                 (OTN_MAX_ACTIVE_SENDS); retry with the same request_id when one finishes"
            )));
        }
        Started::Created(send) => send,
    };
    tracing::Span::current().record("send_id", send.id.as_str());
    tracing::info!(send_id = %send.id, story_id = %story.id, topic = %send.topic, "send started");
    // The send is committed: a lost wake-up only waits for the page actor's next tick.
    if let Err(err) = cx.engine.wake(&send.page_id).await {
        tracing::warn!(send_id = %send.id, error = %err, "could not wake the page actor");
    }
    Ok(send)
}

/// A request id seen before: the same story gets its send back; another is a client bug.
fn same_request(existing: Send, story_id: &str) -> Result<Send, ServiceError> {
    if existing.story_id != story_id {
        return Err(ServiceError::AlreadyExists(format!(
            "request_id {} already started send {} of story {}; use a new request_id for \
             another send",
            existing.request_id, existing.id, existing.story_id
        )));
    }
    Ok(existing)
}

/// The send as the database has it.
pub async fn get(cx: &Context, send_id: &str) -> Result<Send, ServiceError> {
    if send_id.is_empty() {
        return Err(Violations::single("send_id", "is required").into());
    }
    let send = sends::get(&cx.store.read, send_id)
        .await
        .map_err(|e| ServiceError::from_store(e, || format!("send {send_id}")))?;
    tag_span(&send);
    Ok(send)
}

/// The send as a read sees it: a running (or lately finished) send's row as its page actor here
/// last committed it, so that reads wait for no database reader while the engine writes (see
/// `EngineHandle::current_row`); else the database's.
pub async fn current(cx: &Context, send_id: &str) -> Result<Arc<Send>, ServiceError> {
    match cx.engine.current_row(send_id) {
        Some(row) => {
            tag_span(&row);
            Ok(row)
        }
        None => Ok(Arc::new(get(cx, send_id).await?)),
    }
}

fn tag_span(send: &Send) {
    tracing::Span::current().record("page_id", send.page_id.as_str());
    tracing::Span::current().record("send_id", send.id.as_str());
}

/// Pauses, resumes or cancels the send; a send in a state the command cannot leave is
/// FAILED_PRECONDITION naming its state.
pub async fn steer(
    cx: &Context,
    send_id: &str,
    command: SendCommand,
) -> Result<Send, ServiceError> {
    let send = get(cx, send_id).await?;
    match cx.engine.command(&send.page_id, &send.id, command).await {
        Ok(send) => Ok(send),
        Err(EngineError::Store(StoreError::Conflict)) => {
            let current = get(cx, send_id).await?;
            let (allowed, done) = match command {
                SendCommand::Pause => ("queued or running", "paused"),
                SendCommand::Resume => ("paused or halted", "resumed"),
                SendCommand::Cancel => ("queued, running, paused or halted", "cancelled"),
            };
            Err(ServiceError::FailedPrecondition(format!(
                "send {} is {}; only a {allowed} send can be {done}",
                current.id, current.state
            )))
        }
        Err(EngineError::Store(err)) => {
            Err(ServiceError::from_store(err, || format!("send {send_id}")))
        }
        Err(err) => Err(err.into()),
    }
}

/// The send's progress from now to its end: the current snapshot first, then at most one per
/// [`WATCH_INTERVAL`] while it moves, its end at once. Ends with the send, when the receiver is
/// dropped, or when the server stops. RESOURCE_EXHAUSTED beyond the watcher limits.
pub async fn watch(cx: &Context, send_id: &str) -> Result<ReceiverStream<Progress>, ServiceError> {
    let send = current(cx, send_id).await?;
    let subscription = cx
        .engine
        .watch(Progress::from_send(&send))
        .map_err(|refused| ServiceError::ResourceExhausted(refused.to_string()))?;
    let mut stopping = cx.stopping.clone();
    let store = cx.store.clone();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        // Held as long as the stream: the watcher's place among the limited ones.
        let mut subscription = subscription;
        let snapshots = &mut subscription.snapshots;
        loop {
            let progress = snapshots.borrow_and_update().clone();
            let finished = progress.is_finished();
            let send_id = progress.send_id.clone();
            // A slow client waits here alone: the channel keeps only the newest snapshot.
            if tx.send(progress).await.is_err() || finished {
                return;
            }
            // At most one snapshot per interval, but the send's end goes out at once: a
            // dashboard (or a caller waiting for it) should not wait out the interval.
            let pause = tokio::time::sleep(WATCH_INTERVAL);
            tokio::pin!(pause);
            let mut moved_meanwhile = false;
            loop {
                tokio::select! {
                    () = &mut pause => break,
                    _ = stopping.changed() => return,
                    changed = snapshots.changed() => match changed {
                        Ok(()) => {
                            moved_meanwhile = true;
                            if snapshots.borrow().is_finished() {
                                break;
                            }
                        }
                        // The hub let go: handled below.
                        Err(_) => break,
                    },
                }
            }
            if moved_meanwhile {
                continue;
            }
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        // The hub let go of the channel: the send ended. Its final state is in
                        // the database.
                        if let Ok(last) = sends::get(&store.read, &send_id).await {
                            let _ = tx.send(Progress::from_send(&last)).await;
                        }
                        return;
                    }
                }
                _ = stopping.changed() => return,
                () = tx.closed() => return,
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// A page of the send's deliveries, in id order from after `query.after`.
pub async fn deliveries(
    cx: &Context,
    query: &DeliveryQuery,
) -> Result<Vec<sends::delivery::Model>, ServiceError> {
    let send = get(cx, &query.send_id).await?;
    sends::list_deliveries(
        &cx.store.read,
        &send.id,
        query.state,
        query.after,
        query.limit,
    )
    .await
    .map_err(ServiceError::internal)
}
