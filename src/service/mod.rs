//! The use cases behind the API: what a request means, its rules and its answers, as plain async
//! functions over domain and store types. The gRPC adapter (`api`) parses into their inputs and
//! maps their outputs; the engine and the store do the work.

mod error;
pub mod optins;
pub mod sends;
pub mod stories;

pub use error::ServiceError;

use crate::{
    crypto::SecretCipher,
    domain::PageId,
    graph::GraphClient,
    store::{Store, pages},
};

/// What the use cases that call Facebook for a page (a review, an opt-in request) work with.
#[derive(Clone)]
pub struct GraphContext {
    pub store: Store,
    /// Opens the page's sealed credentials.
    pub cipher: SecretCipher,
    pub graph: GraphClient,
    /// `OTN_RECURRING_COOLDOWN_HOURS`, for estimates.
    pub recurring_cooldown_ms: i64,
}

/// NOT_FOUND unless the page is registered.
pub async fn ensure_page(store: &Store, page_id: &PageId) -> Result<(), ServiceError> {
    match pages::exists(&store.read, page_id).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ServiceError::NotFound(format!(
            "page {page_id} does not exist; register it with PageService.CreatePage"
        ))),
        Err(err) => Err(ServiceError::internal(err)),
    }
}
