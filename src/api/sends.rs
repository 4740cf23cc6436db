//! SendService: start a reviewed story's send, steer it, watch it, list what happened.

use std::{pin::Pin, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{
    ApiError, page_size, page_token, paginate,
    pb::{self, send_service_server::SendService},
    shared::page_listing,
    time::timestamp_from_ms,
};
use crate::{
    domain::{DeliveryState, Route, SendState, Violations, char_len},
    engine::{EngineError, EngineHandle, Progress, SendCommand},
    store::{
        Store, StoreError, now_ms,
        sends::{self, NewSend, Started},
        stories,
    },
};

const REQUEST_ID_MAX_CHARS: usize = 128;
const SENDS_TOKEN_KIND: &str = "sends";
const DELIVERIES_TOKEN_KIND: &str = "deliveries";
/// WatchSend sends at most one snapshot per this interval (about 10 a second). A send whose page
/// runs elsewhere reaches the hub through its shared database poll (see `engine::progress`).
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

pub struct Sends {
    store: Store,
    engine: EngineHandle,
    /// Becomes true when the server shuts down: open watches end.
    stopping: watch::Receiver<bool>,
    max_active_sends: u64,
}

impl Sends {
    pub fn new(
        store: Store,
        engine: EngineHandle,
        stopping: watch::Receiver<bool>,
        max_active_sends: u64,
    ) -> Self {
        Sends {
            store,
            engine,
            stopping,
            max_active_sends,
        }
    }

    async fn load(&self, send_id: &str) -> Result<sends::Send, ApiError> {
        if send_id.is_empty() {
            return Err(Violations::single("send_id", "is required").into());
        }
        let send = sends::get(&self.store.read, send_id)
            .await
            .map_err(|e| ApiError::from_store(e, || format!("send {send_id}")))?;
        tracing::Span::current().record("page_id", send.page_id.as_str());
        tracing::Span::current().record("send_id", send.id.as_str());
        Ok(send)
    }

    /// The send as a read sees it: a running (or lately finished) send's row as its page actor
    /// here last committed it, so that reads wait for no database reader while the engine
    /// writes (see `EngineHandle::current_row`); else the database's.
    async fn current(&self, send_id: &str) -> Result<Arc<sends::Send>, ApiError> {
        match self.engine.current_row(send_id) {
            Some(row) => {
                tracing::Span::current().record("page_id", row.page_id.as_str());
                tracing::Span::current().record("send_id", row.id.as_str());
                Ok(row)
            }
            None => Ok(Arc::new(self.load(send_id).await?)),
        }
    }

    async fn command(&self, send_id: &str, command: SendCommand) -> Result<pb::Send, ApiError> {
        let send = self.load(send_id).await?;
        match self.engine.command(&send.page_id, &send.id, command).await {
            Ok(send) => Ok(send_to_proto(&send)),
            Err(EngineError::Store(StoreError::Conflict)) => {
                let current = self.load(send_id).await?;
                let (allowed, done) = match command {
                    SendCommand::Pause => ("queued or running", "paused"),
                    SendCommand::Resume => ("paused or halted", "resumed"),
                    SendCommand::Cancel => ("queued, running, paused or halted", "cancelled"),
                };
                Err(ApiError::FailedPrecondition(format!(
                    "send {} is {}; only a {allowed} send can be {done}",
                    current.id, current.state
                )))
            }
            Err(EngineError::Store(err)) => {
                Err(ApiError::from_store(err, || format!("send {send_id}")))
            }
            Err(err) => Err(err.into()),
        }
    }
}

impl From<SendState> for pb::SendState {
    fn from(state: SendState) -> Self {
        match state {
            SendState::Queued => pb::SendState::Queued,
            SendState::Running => pb::SendState::Running,
            SendState::Paused => pb::SendState::Paused,
            SendState::Completed => pb::SendState::Completed,
            SendState::Cancelled => pb::SendState::Cancelled,
            SendState::Halted => pb::SendState::Halted,
        }
    }
}

/// A List filter: unspecified means every state.
impl From<pb::SendState> for Option<SendState> {
    fn from(state: pb::SendState) -> Self {
        match state {
            pb::SendState::Unspecified => None,
            pb::SendState::Queued => Some(SendState::Queued),
            pb::SendState::Running => Some(SendState::Running),
            pb::SendState::Paused => Some(SendState::Paused),
            pb::SendState::Completed => Some(SendState::Completed),
            pb::SendState::Cancelled => Some(SendState::Cancelled),
            pb::SendState::Halted => Some(SendState::Halted),
        }
    }
}

impl From<DeliveryState> for pb::DeliveryState {
    fn from(state: DeliveryState) -> Self {
        match state {
            DeliveryState::Pending => pb::DeliveryState::Pending,
            DeliveryState::InFlight => pb::DeliveryState::InFlight,
            DeliveryState::Sent => pb::DeliveryState::Sent,
            DeliveryState::Failed => pb::DeliveryState::Failed,
            DeliveryState::Skipped => pb::DeliveryState::Skipped,
            DeliveryState::Unknown => pb::DeliveryState::Unknown,
        }
    }
}

/// A List filter: unspecified means every state.
impl From<pb::DeliveryState> for Option<DeliveryState> {
    fn from(state: pb::DeliveryState) -> Self {
        match state {
            pb::DeliveryState::Unspecified => None,
            pb::DeliveryState::Pending => Some(DeliveryState::Pending),
            pb::DeliveryState::InFlight => Some(DeliveryState::InFlight),
            pb::DeliveryState::Sent => Some(DeliveryState::Sent),
            pb::DeliveryState::Failed => Some(DeliveryState::Failed),
            pb::DeliveryState::Skipped => Some(DeliveryState::Skipped),
            pb::DeliveryState::Unknown => Some(DeliveryState::Unknown),
        }
    }
}

impl From<Route> for pb::Route {
    fn from(route: Route) -> Self {
        match route {
            Route::Token => pb::Route::Token,
            Route::Window => pb::Route::Window,
        }
    }
}

pub fn progress_to_proto(progress: &Progress) -> pb::SendProgress {
    pb::SendProgress {
        send_id: progress.send_id.clone(),
        state: pb::SendState::from(progress.state).into(),
        total: progress.total,
        pending: progress.pending,
        in_flight: progress.in_flight,
        sent: progress.sent,
        failed: progress.failed,
        skipped: progress.skipped,
        unknown: progress.unknown,
        rate_per_second: progress.rate_per_second,
        eta_seconds: progress.eta_seconds,
        last_error: progress.last_error.clone(),
    }
}

pub fn send_to_proto(send: &sends::Send) -> pb::Send {
    pb::Send {
        send_id: send.id.clone(),
        story_id: send.story_id.clone(),
        page_id: send.page_id.clone(),
        state: pb::SendState::from(send.state).into(),
        progress: Some(progress_to_proto(&Progress::from_send(send))),
        create_time: Some(timestamp_from_ms(send.created_at)),
        start_time: send.started_at.map(timestamp_from_ms),
        finish_time: send.finished_at.map(timestamp_from_ms),
        request_id: send.request_id.clone(),
    }
}

fn delivery_to_proto(d: sends::delivery::Model) -> pb::Delivery {
    pb::Delivery {
        delivery_id: d.id.to_string(),
        psid: d.psid,
        route: pb::Route::from(d.route).into(),
        state: pb::DeliveryState::from(d.state).into(),
        message_id: d.message_id.unwrap_or_default(),
        error_code: d.error_code.unwrap_or_default(),
        error_subcode: d.error_subcode.unwrap_or_default(),
        error_message: d.error_message.unwrap_or_default(),
        attempts: u32::try_from(d.attempts).unwrap_or(0),
        confirmed_by_token: d.confirmed_by_token,
        update_time: Some(timestamp_from_ms(d.updated_at)),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchSendResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SendService for Sends {
    async fn start_send(
        &self,
        request: Request<pb::StartSendRequest>,
    ) -> Result<Response<pb::StartSendResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        if req.story_id.is_empty() {
            v.add("story_id", "is required");
        }
        let len = char_len(&req.request_id);
        if req.request_id.contains('\0') {
            v.add("request_id", "must not contain a NUL character");
        } else if len == 0 || len > REQUEST_ID_MAX_CHARS {
            v.add(
                "request_id",
                format!("must be 1 to {REQUEST_ID_MAX_CHARS} characters, chosen by the client so a retry is safe"),
            );
        }
        v.finish(|| Some(())).map_err(ApiError::from)?;

        // A retry of a request that already made its send answers with that send, whatever
        // happened to the story since. The reads before the transaction are on the readers:
        // `sends::start` checks again, under its lock, everything they found (the request id,
        // the story's reviewed content), and the one writer stays free for the engine.
        if let Some(existing) = sends::find_by_request_id(&self.store.read, &req.request_id)
            .await
            .map_err(ApiError::internal)?
        {
            return same_request(existing, &req.story_id);
        }

        let story = stories::get(&self.store.read, &req.story_id)
            .await
            .map_err(|e| ApiError::from_store(e, || format!("story {}", req.story_id)))?;
        tracing::Span::current().record("page_id", story.page_id.as_str());
        if !story.reviewed() {
            let what_to_do = match story.reviewed_at {
                None => "it has never been reviewed".to_string(),
                Some(_) => format!(
                    "its content changed after {} reviewed it",
                    story.reviewer_psid.as_deref().unwrap_or("the reviewer")
                ),
            };
            return Err(ApiError::FailedPrecondition(format!(
                "story {} cannot be sent: {what_to_do}; call StoryService.PreviewStory to send \
                 the current content to a reviewer, then start the send again",
                story.id
            ))
            .into());
        }
        let segment = stories::segment_rule(&self.store.read, &story)
            .await
            .map_err(ApiError::internal)?;
        let max_active = self.max_active_sends;
        let context = (
            Arc::new(story.clone()),
            Arc::<str>::from(req.request_id.as_str()),
            Arc::new(segment),
        );
        let starting =
            self.store
                .transact(context, move |txn, (row, request_id, segment)| async move {
                    let new = NewSend {
                        story: &row,
                        request_id: &request_id,
                        segment: segment.as_ref().as_ref(),
                        max_active,
                    };
                    sends::start(&txn, new, now_ms()).await
                });
        let started = starting.await.map_err(|e| match e {
            StoreError::Conflict => ApiError::FailedPrecondition(format!(
                "story {} changed while the send was being started; review it again",
                story.id
            )),
            // The story, or its page, was deleted since it was read.
            StoreError::NotFound => {
                ApiError::from_store(StoreError::NotFound, || format!("story {}", story.id))
            }
            other => ApiError::internal(other),
        })?;
        let send = match started {
            Started::Existing(existing) => return same_request(existing, &req.story_id),
            Started::Shed { active } => {
                return Err(ApiError::ResourceExhausted(format!(
                    "{active} sends are queued or running, the most this server takes at once \
                     (OTN_MAX_ACTIVE_SENDS); retry with the same request_id when one finishes"
                ))
                .into());
            }
            Started::Created(send) => send,
        };
        tracing::Span::current().record("send_id", send.id.as_str());
        tracing::info!(send_id = %send.id, story_id = %story.id, topic = %send.topic, "send started");
        // The send is committed: a lost wake-up only waits for the page actor's next tick.
        if let Err(err) = self.engine.wake(&send.page_id).await {
            tracing::warn!(send_id = %send.id, error = %err, "could not wake the page actor");
        }
        Ok(Response::new(pb::StartSendResponse {
            send: Some(send_to_proto(&send)),
        }))
    }

    async fn get_send(
        &self,
        request: Request<pb::GetSendRequest>,
    ) -> Result<Response<pb::GetSendResponse>, Status> {
        let send = self.current(&request.get_ref().send_id).await?;
        Ok(Response::new(pb::GetSendResponse {
            send: Some(send_to_proto(&send)),
        }))
    }

    async fn list_sends(
        &self,
        request: Request<pb::ListSendsRequest>,
    ) -> Result<Response<pb::ListSendsResponse>, Status> {
        let req = request.into_inner();
        let state = pb::SendState::try_from(req.state).map_err(|_| {
            ApiError::from(Violations::single(
                "state",
                format!("{} is not a SendState", req.state),
            ))
        })?;
        let (page_id, size, after) = page_listing(
            &self.store,
            &req.page_id,
            req.page_size,
            &req.page_token,
            SENDS_TOKEN_KIND,
        )
        .await?;
        let rows = sends::list(
            &self.store.read,
            sends::SendFilter {
                page_id: page_id.as_str(),
                story_id: (!req.story_id.is_empty()).then_some(req.story_id.as_str()),
                state: state.into(),
            },
            after.as_deref(),
            size + 1,
        )
        .await
        .map_err(ApiError::internal)?;
        let (rows, next_page_token) = paginate(rows, size, SENDS_TOKEN_KIND, |s| s.id.clone());
        Ok(Response::new(pb::ListSendsResponse {
            sends: rows.iter().map(send_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn pause_send(
        &self,
        request: Request<pb::PauseSendRequest>,
    ) -> Result<Response<pb::PauseSendResponse>, Status> {
        let send = self
            .command(&request.get_ref().send_id, SendCommand::Pause)
            .await?;
        Ok(Response::new(pb::PauseSendResponse { send: Some(send) }))
    }

    async fn resume_send(
        &self,
        request: Request<pb::ResumeSendRequest>,
    ) -> Result<Response<pb::ResumeSendResponse>, Status> {
        let send = self
            .command(&request.get_ref().send_id, SendCommand::Resume)
            .await?;
        Ok(Response::new(pb::ResumeSendResponse { send: Some(send) }))
    }

    async fn cancel_send(
        &self,
        request: Request<pb::CancelSendRequest>,
    ) -> Result<Response<pb::CancelSendResponse>, Status> {
        let send = self
            .command(&request.get_ref().send_id, SendCommand::Cancel)
            .await?;
        Ok(Response::new(pb::CancelSendResponse { send: Some(send) }))
    }

    async fn watch_send(
        &self,
        request: Request<pb::WatchSendRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let send = self.current(&request.get_ref().send_id).await?;
        let subscription = self
            .engine
            .watch(Progress::from_send(&send))
            .map_err(|refused| ApiError::ResourceExhausted(refused.to_string()))?;
        let mut stopping = self.stopping.clone();
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            // Held as long as the stream: the watcher's place among the limited ones.
            let mut subscription = subscription;
            let snapshots = &mut subscription.snapshots;
            loop {
                let progress = snapshots.borrow_and_update().clone();
                let finished = progress.is_finished();
                let message = pb::WatchSendResponse {
                    progress: Some(progress_to_proto(&progress)),
                };
                // A slow client waits here alone: the channel keeps only the newest snapshot.
                if tx.send(Ok(message)).await.is_err() || finished {
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
                            // The hub let go of the channel: the send ended. Its final state is
                            // in the database.
                            if let Ok(last) = sends::get(&store.read, &progress.send_id).await {
                                let last = Progress::from_send(&last);
                                let _ = tx.send(Ok(pb::WatchSendResponse {
                                    progress: Some(progress_to_proto(&last)),
                                })).await;
                            }
                            return;
                        }
                    }
                    _ = stopping.changed() => return,
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let state = match pb::DeliveryState::try_from(req.state) {
            Ok(state) => Some(Option::<DeliveryState>::from(state)),
            Err(_) => {
                v.add("state", format!("{} is not a DeliveryState", req.state));
                None
            }
        };
        let size = v.check("page_size", page_size(req.page_size));
        let after = v.check(
            "page_token",
            page_token::decode(DELIVERIES_TOKEN_KIND, &req.page_token).and_then(|after| {
                after
                    .map(|a| {
                        a.parse::<i64>()
                            .map_err(|_| "is not a next_page_token this list returned".to_string())
                    })
                    .transpose()
            }),
        );
        if req.send_id.is_empty() {
            v.add("send_id", "is required");
        }
        let (state, size, after) = v
            .finish(|| Some((state?, size?, after?)))
            .map_err(ApiError::from)?;
        let send = self.load(&req.send_id).await?;
        let rows = sends::list_deliveries(&self.store.read, &send.id, state, after, size + 1)
            .await
            .map_err(ApiError::internal)?;
        let (rows, next_page_token) =
            paginate(rows, size, DELIVERIES_TOKEN_KIND, |d| d.id.to_string());
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries: rows.into_iter().map(delivery_to_proto).collect(),
            next_page_token,
        }))
    }
}

/// A request id seen before: the same story gets its send back; another is a client bug.
fn same_request(
    existing: sends::Send,
    story_id: &str,
) -> Result<Response<pb::StartSendResponse>, Status> {
    if existing.story_id != story_id {
        return Err(ApiError::AlreadyExists(format!(
            "request_id {} already started send {} of story {}; use a new request_id for \
             another send",
            existing.request_id, existing.id, existing.story_id
        ))
        .into());
    }
    Ok(Response::new(pb::StartSendResponse {
        send: Some(send_to_proto(&existing)),
    }))
}
