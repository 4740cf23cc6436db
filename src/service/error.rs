//! What a use case answers when it cannot do what was asked: one error type for every caller
//! (the gRPC API maps it to statuses, see `api::error`), saying whose fault it is and what the
//! caller can do about it.

use crate::{domain::Violations, engine::EngineError, store::StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
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
    /// Cannot be done this moment; the same request may be retried.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Facebook refused or failed a call made for this request.
    #[error("{0}")]
    Graph(crate::graph::Failure),
    /// Not the caller's fault: logged with its cause chain, answered with an opaque message.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ServiceError {
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        ServiceError::Internal(err.into())
    }

    /// Maps a store error for a request about `what` (e.g. "page 123").
    pub fn from_store(err: StoreError, what: impl FnOnce() -> String) -> Self {
        match err {
            StoreError::NotFound => ServiceError::NotFound(format!("{} does not exist", what())),
            StoreError::AlreadyExists => {
                ServiceError::AlreadyExists(format!("{} already exists", what()))
            }
            StoreError::Conflict => ServiceError::FailedPrecondition(format!(
                "{} changed while this request ran; read it again and retry",
                what()
            )),
            StoreError::InUse => {
                ServiceError::FailedPrecondition(format!("{} is still in use", what()))
            }
            StoreError::InFlight => ServiceError::Unavailable(format!(
                "a message to {} is still on its way to Facebook; retry once it is answered",
                what()
            )),
            other => ServiceError::internal(other),
        }
    }
}
