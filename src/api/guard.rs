//! What every gRPC call passes through before its service: a span naming the RPC, API-key
//! authentication and role check, load shedding, and a deadline. Health and reflection are open
//! to anyone and never shed, so that probes and `buf curl` keep working under load.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response};
use tokio::sync::Semaphore;
use tonic::{Status, body::Body};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::{
    config::{ApiKeys, Role},
    engine::StreamSlots,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

#[derive(Clone)]
pub struct GuardLayer {
    shared: Arc<Shared>,
}

struct Shared {
    api_keys: Arc<ApiKeys>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    timeout: Duration,
    /// Long-lived streams open at once (health Watch here; WatchSend takes its own).
    streams: StreamSlots,
}

impl GuardLayer {
    pub fn new(
        api_keys: Arc<ApiKeys>,
        max_in_flight: usize,
        timeout: Duration,
        streams: StreamSlots,
    ) -> Self {
        GuardLayer {
            shared: Arc::new(Shared {
                api_keys,
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                max_in_flight,
                timeout,
                streams,
            }),
        }
    }
}

/// Health Watch: a stream that never ends by itself, open to anyone.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// A response body that holds a stream's slot until the stream ends (the body is dropped).
struct HeldBody {
    body: Body,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What a method needs: `None` for the open infrastructure services. The console's API asks the
/// same question for the method each of its calls stands for, so the two never disagree.
pub(crate) fn required_role(path: &str) -> Option<Role> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    if service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.") {
        return None;
    }
    let reads = ["Get", "List", "Watch", "Estimate"];
    if reads.iter().any(|prefix| method.starts_with(prefix)) {
        return Some(Role::Viewer);
    }
    Some(match service {
        "otn.v1.PageService" => Role::Admin,
        s if s.starts_with("otn.v1.") => Role::Operator,
        // Nothing else is served; the strictest role keeps an unknown path from being a gap.
        _ => Role::Admin,
    })
}

fn bearer_token<B>(req: &Request<B>) -> Option<&[u8]> {
    bearer_token_of(req.headers())
}

/// The key of an `Authorization: Bearer <key>` header.
pub(crate) fn bearer_token_of(headers: &http::HeaderMap) -> Option<&[u8]> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    if scheme.eq_ignore_ascii_case(b"bearer ") {
        Some(value[7..].trim_ascii())
    } else {
        None
    }
}

impl Shared {
    fn authorize<B>(&self, req: &Request<B>, method: &str) -> Result<(), Status> {
        let Some(needed) = required_role(method) else {
            return Ok(());
        };
        if self.api_keys.is_empty() {
            return Ok(());
        }
        let Some(role) = bearer_token(req).and_then(|key| self.api_keys.role_of(key)) else {
            return Err(Status::unauthenticated(
                "missing or unknown API key: send the metadata `authorization: Bearer <key>`",
            ));
        };
        if role < needed {
            return Err(Status::permission_denied(format!(
                "the {} role may not call {}: it needs the {} role",
                role.as_str(),
                method.trim_start_matches('/'),
                needed.as_str()
            )));
        }
        Ok(())
    }
}

impl<S> Service<Request<Body>> for Guard<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The ready service is the one to call; a fresh clone takes its place (tower's idiom).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let method = req.uri().path().to_string();
        let span = tracing::info_span!(
            "rpc",
            method = %method.trim_start_matches('/'),
            page_id = tracing::field::Empty,
            send_id = tracing::field::Empty,
        );
        Box::pin(
            async move {
                let started = Instant::now();
                let open = required_role(&method).is_none();
                if let Err(status) = shared.authorize(&req, &method) {
                    tracing::info!(code = ?status.code(), "rpc refused");
                    return Ok(status.into_http());
                }
                let stream_slot = if method == HEALTH_WATCH {
                    match shared.streams.take() {
                        Ok(slot) => Some(slot),
                        Err(refused) => {
                            tracing::warn!("health watch shed: at the stream limit");
                            return Ok(Status::resource_exhausted(refused.to_string()).into_http());
                        }
                    }
                } else {
                    None
                };
                let _permit = if open {
                    None
                } else {
                    match shared.in_flight.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        Err(_) => {
                            tracing::warn!("rpc shed: at the concurrency limit");
                            return Ok(Status::resource_exhausted(format!(
                                "otnd is serving its limit of {} concurrent requests; retry with backoff",
                                shared.max_in_flight
                            ))
                            .into_http());
                        }
                    }
                };
                let response = match tokio::time::timeout(shared.timeout, inner.call(req)).await {
                    Ok(result) => undecodable_is_invalid(result?),
                    Err(_) => Status::deadline_exceeded(format!(
                        "the request took longer than otnd's limit of {} s",
                        shared.timeout.as_secs()
                    ))
                    .into_http(),
                };
                // Errors travel as trailers-only responses, so their status is in the headers;
                // a success's status comes later in the trailers.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                let response = match stream_slot {
                    Some(slot) => response.map(|body| Body::new(HeldBody { body, _slot: slot })),
                    None => response,
                };
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                if open {
                    tracing::debug!(?code, elapsed_ms, "rpc finished");
                } else {
                    tracing::info!(?code, elapsed_ms, "rpc finished");
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// A request that is not the method's protobuf message is the caller's fault: tonic answers it
/// with INTERNAL (gRPC's library convention), otnd with INVALID_ARGUMENT, keeping INTERNAL for
/// its own failures. Such an answer is trailers-only, so its status is in the headers.
fn undecodable_is_invalid(response: Response<Body>) -> Response<Body> {
    match Status::from_header_map(response.headers()) {
        Some(status)
            if status.code() == tonic::Code::Internal
                && status
                    .message()
                    .starts_with("failed to decode Protobuf message") =>
        {
            Status::invalid_argument(format!(
                "the request is not this method's protobuf message ({})",
                status.message()
            ))
            .into_http()
        }
        _ => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_by_method() {
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_role("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(
            required_role("/otn.v1.PageService/GetPage"),
            Some(Role::Viewer)
        );
        assert_eq!(
            required_role("/otn.v1.PageService/CreatePage"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role("/otn.v1.SendService/WatchSend"),
            Some(Role::Viewer)
        );
        assert_eq!(
            required_role("/otn.v1.SendService/StartSend"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role("/otn.v1.StoryService/EstimateAudience"),
            Some(Role::Viewer)
        );
        assert_eq!(required_role("/other.Service/Do"), Some(Role::Admin));
    }
}
