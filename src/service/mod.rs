//! The use cases behind the API: what a request means, its rules and its answers, as plain async
//! functions over domain and store types. The gRPC adapter (`api`) parses into their inputs and
//! maps their outputs; the engine and the store do the work.

mod error;
pub mod sends;
pub mod stories;

pub use error::ServiceError;

use crate::{
    domain::PageId,
    store::{Store, pages},
};

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
