//! SendService: the send use cases (`service::sends`) over gRPC.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{
    ServiceError, page_size, page_token, paginate,
    pb::{self, send_service_server::SendService},
    shared::page_listing,
    time::timestamp_from_ms,
};
use crate::{
    domain::{DeliveryState, Route, SendState, Violations},
    engine::{Progress, SendCommand},
    service::sends::{self as cases, Context, DeliveryQuery, StartSend},
    store::sends,
};

const SENDS_TOKEN_KIND: &str = "sends";
const DELIVERIES_TOKEN_KIND: &str = "deliveries";

pub struct Sends {
    cx: Context,
}

impl Sends {
    pub fn new(cx: Context) -> Self {
        Sends { cx }
    }
}

impl TryFrom<pb::StartSendRequest> for StartSend {
    type Error = ServiceError;

    fn try_from(req: pb::StartSendRequest) -> Result<Self, ServiceError> {
        Ok(StartSend::parse(req.story_id, req.request_id)?)
    }
}

impl TryFrom<pb::ListDeliveriesRequest> for DeliveryQuery {
    type Error = ServiceError;

    fn try_from(req: pb::ListDeliveriesRequest) -> Result<Self, ServiceError> {
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
        let (state, size, after) = v.finish(|| Some((state?, size?, after?)))?;
        Ok(DeliveryQuery {
            send_id: req.send_id,
            state,
            after,
            // One row more than asked: it proves there is a next page.
            limit: size + 1,
        })
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
            Route::Recurring => pb::Route::Recurring,
        }
    }
}

impl From<&Progress> for pb::SendProgress {
    fn from(progress: &Progress) -> Self {
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
}

impl From<&sends::Send> for pb::Send {
    fn from(send: &sends::Send) -> Self {
        pb::Send {
            send_id: send.id.clone(),
            story_id: send.story_id.clone(),
            page_id: send.page_id.clone(),
            state: pb::SendState::from(send.state).into(),
            progress: Some((&Progress::from_send(send)).into()),
            create_time: Some(timestamp_from_ms(send.created_at)),
            start_time: send.started_at.map(timestamp_from_ms),
            finish_time: send.finished_at.map(timestamp_from_ms),
            request_id: send.request_id.clone(),
        }
    }
}

impl From<sends::delivery::Model> for pb::Delivery {
    fn from(d: sends::delivery::Model) -> Self {
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
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchSendResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SendService for Sends {
    async fn start_send(
        &self,
        request: Request<pb::StartSendRequest>,
    ) -> Result<Response<pb::StartSendResponse>, Status> {
        let send = cases::start(&self.cx, request.into_inner().try_into()?).await?;
        Ok(Response::new(pb::StartSendResponse {
            send: Some((&send).into()),
        }))
    }

    async fn get_send(
        &self,
        request: Request<pb::GetSendRequest>,
    ) -> Result<Response<pb::GetSendResponse>, Status> {
        let send = cases::current(&self.cx, &request.get_ref().send_id).await?;
        Ok(Response::new(pb::GetSendResponse {
            send: Some(send.as_ref().into()),
        }))
    }

    async fn list_sends(
        &self,
        request: Request<pb::ListSendsRequest>,
    ) -> Result<Response<pb::ListSendsResponse>, Status> {
        let req = request.into_inner();
        let state = pb::SendState::try_from(req.state).map_err(|_| {
            ServiceError::from(Violations::single(
                "state",
                format!("{} is not a SendState", req.state),
            ))
        })?;
        let (page_id, size, after) = page_listing(
            &self.cx.store,
            &req.page_id,
            req.page_size,
            &req.page_token,
            SENDS_TOKEN_KIND,
        )
        .await?;
        let rows = sends::list(
            &self.cx.store.read,
            sends::SendFilter {
                page_id: page_id.as_str(),
                story_id: (!req.story_id.is_empty()).then_some(req.story_id.as_str()),
                state: state.into(),
            },
            after.as_deref(),
            size + 1,
        )
        .await
        .map_err(ServiceError::internal)?;
        let (rows, next_page_token) = paginate(rows, size, SENDS_TOKEN_KIND, |s| s.id.clone());
        Ok(Response::new(pb::ListSendsResponse {
            sends: rows.iter().map(pb::Send::from).collect(),
            next_page_token,
        }))
    }

    async fn pause_send(
        &self,
        request: Request<pb::PauseSendRequest>,
    ) -> Result<Response<pb::PauseSendResponse>, Status> {
        let send = cases::steer(&self.cx, &request.get_ref().send_id, SendCommand::Pause).await?;
        Ok(Response::new(pb::PauseSendResponse {
            send: Some((&send).into()),
        }))
    }

    async fn resume_send(
        &self,
        request: Request<pb::ResumeSendRequest>,
    ) -> Result<Response<pb::ResumeSendResponse>, Status> {
        let send = cases::steer(&self.cx, &request.get_ref().send_id, SendCommand::Resume).await?;
        Ok(Response::new(pb::ResumeSendResponse {
            send: Some((&send).into()),
        }))
    }

    async fn cancel_send(
        &self,
        request: Request<pb::CancelSendRequest>,
    ) -> Result<Response<pb::CancelSendResponse>, Status> {
        let send = cases::steer(&self.cx, &request.get_ref().send_id, SendCommand::Cancel).await?;
        Ok(Response::new(pb::CancelSendResponse {
            send: Some((&send).into()),
        }))
    }

    async fn watch_send(
        &self,
        request: Request<pb::WatchSendRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let progress = cases::watch(&self.cx, &request.get_ref().send_id).await?;
        let stream = progress.map(|progress| {
            Ok(pb::WatchSendResponse {
                progress: Some((&progress).into()),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        let query = DeliveryQuery::try_from(request.into_inner())?;
        let rows = cases::deliveries(&self.cx, &query).await?;
        let size = query.limit - 1;
        let (rows, next_page_token) =
            paginate(rows, size, DELIVERIES_TOKEN_KIND, |d| d.id.to_string());
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries: rows.into_iter().map(pb::Delivery::from).collect(),
            next_page_token,
        }))
    }
}
