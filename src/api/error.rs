//! One error type for the API boundary and its one mapping to gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::{domain::Violations, engine::EngineError, store::StoreError};

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
    #[error(transparent)]
    Engine(#[from] EngineError),
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
            ApiError::Engine(err @ EngineError::Busy) => {
                Status::resource_exhausted(err.to_string())
            }
            ApiError::Engine(err @ EngineError::Timeout) => {
                Status::deadline_exceeded(err.to_string())
            }
            ApiError::Engine(err @ EngineError::Stopped) => Status::unavailable(err.to_string()),
            ApiError::Internal(cause) => {
                tracing::error!(error = ?cause, "request failed");
                Status::internal("internal error; the cause is in otnd's log")
            }
        }
    }
}
