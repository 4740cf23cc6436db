//! One error type for the API boundary and its one mapping to gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::{
    domain::Violations,
    engine::EngineError,
    graph::{Class, Failure},
    store::StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {0}")]
    Invalid(#[from] Violations),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Load shed: the server holds as much of this kind of work as it takes.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Facebook refused or failed a call made for this request.
    #[error("{0}")]
    Graph(crate::graph::Failure),
    /// Not the caller's fault: logged with its cause chain, answered with an opaque message.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(err.into())
    }

    /// Maps a store error for a request about `what` (e.g. "page 123").
    pub fn from_store(err: StoreError, what: impl FnOnce() -> String) -> Self {
        match err {
            StoreError::NotFound => ApiError::NotFound(format!("{} does not exist", what())),
            StoreError::AlreadyExists => {
                ApiError::AlreadyExists(format!("{} already exists", what()))
            }
            StoreError::Conflict => ApiError::FailedPrecondition(format!(
                "{} changed while this request ran; read it again and retry",
                what()
            )),
            StoreError::InUse => {
                ApiError::FailedPrecondition(format!("{} is still in use", what()))
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match err {
            ApiError::Invalid(violations) => {
                let details = ErrorDetails::with_bad_request(
                    violations
                        .0
                        .iter()
                        .map(|v| FieldViolation::new(&v.field, &v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, violations.summary(), details)
            }
            ApiError::NotFound(message) => Status::not_found(message),
            ApiError::AlreadyExists(message) => Status::already_exists(message),
            ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
            ApiError::ResourceExhausted(message) => Status::resource_exhausted(message),
            ApiError::Engine(err @ EngineError::Busy) => {
                Status::resource_exhausted(err.to_string())
            }
            ApiError::Engine(err @ EngineError::Timeout) => {
                Status::deadline_exceeded(err.to_string())
            }
            ApiError::Engine(err @ EngineError::Stopped) => Status::unavailable(err.to_string()),
            ApiError::Engine(EngineError::Store(err)) => {
                tracing::error!(error = ?err, "request failed in the engine");
                Status::internal("internal error; the cause is in otnd's log")
            }
            ApiError::Graph(failure) => graph_status(&failure),
            ApiError::Internal(cause) => {
                tracing::error!(error = ?cause, "request failed");
                Status::internal("internal error; the cause is in otnd's log")
            }
        }
    }
}

/// A Graph refusal as the gRPC code a caller can act on, with Facebook's own words.
fn graph_status(failure: &Failure) -> Status {
    let facebook = format!("Facebook: {failure}");
    let error = &failure.error;
    match (failure.class, error.code, error.subcode) {
        (Class::RecipientPermanent, 10, Some(2018278)) => Status::failed_precondition(format!(
            "the user is outside the 24-hour messaging window: they must message the page first ({facebook})"
        )),
        (Class::RecipientPermanent, 613, Some(1893016)) => Status::already_exists(format!(
            "an opt-in request for this topic was already sent to this user ({facebook})"
        )),
        (Class::RecipientPermanent, 100, Some(2018001)) => {
            Status::not_found(format!("the page has no such user ({facebook})"))
        }
        (Class::RecipientPermanent, _, _) => Status::failed_precondition(format!(
            "Facebook refused to message this user ({facebook})"
        )),
        (Class::PagePermanent, _, _) => Status::failed_precondition(format!(
            "the page cannot send: fix its access token or permissions (UpdatePage) or wait out the restriction ({facebook})"
        )),
        (Class::Throttled { wait }, _, _) => Status::resource_exhausted(format!(
            "Facebook is rate limiting this page; retry in {} s ({facebook})",
            wait.as_secs().max(1)
        )),
        (Class::Transient { .. }, _, _) => {
            Status::unavailable(format!("the Graph API failed; retry ({facebook})"))
        }
    }
}
