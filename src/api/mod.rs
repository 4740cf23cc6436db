//! The gRPC surface: the only module that knows protobuf. Services are thin: parse into domain
//! types (`TryFrom`), call a use case (`crate::service`) or the store, map the result back
//! (`From`).

mod audience;
mod error;
pub(crate) mod guard;
mod optins;
mod pages;
mod sends;
pub(crate) mod shared;
mod stories;
mod time;

pub use audience::Audience;
pub use guard::GuardLayer;
pub use optins::OptIns;
pub use pages::Pages;
pub use sends::Sends;
pub use stories::Stories;

use crate::service::ServiceError;

/// The generated code of `proto/otn/v1`, clients included.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("otn.v1");

    /// The encoded descriptors of every otn.v1 file, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/otn_descriptor.bin"));
}

/// The largest request otnd decodes.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Default and largest page sizes of List RPCs.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 1000;

/// Reads a List request's page size: 0 means the default.
pub fn page_size(raw: i32) -> Result<u64, String> {
    match raw {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > 0 && (n as u64) <= MAX_PAGE_SIZE => Ok(n as u64),
        n => Err(format!(
            "must be from 0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}, got {n}"
        )),
    }
}

/// Cuts a list fetched with one row more than `size` to `size`, and says where the next page
/// starts: the extra row proves there is one.
pub fn paginate<T>(
    mut rows: Vec<T>,
    size: u64,
    kind: &str,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    if rows.len() as u64 > size {
        rows.truncate(size as usize);
        let next = rows
            .last()
            .map(|last| page_token::encode(kind, &key(last)))
            .unwrap_or_default();
        (rows, next)
    } else {
        (rows, String::new())
    }
}

/// Page tokens are opaque to clients: the key to continue after, tagged with what it lists so a
/// token from one list is refused by another.
pub mod page_token {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

    pub fn encode(kind: &str, after: &str) -> String {
        URL_SAFE_NO_PAD.encode(format!("{kind}:{after}"))
    }

    pub fn decode(kind: &str, token: &str) -> Result<Option<String>, String> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid =
            || "is not a next_page_token this list returned; start again without one".to_string();
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        match text.split_once(':') {
            Some((k, after)) if k == kind && !after.is_empty() => Ok(Some(after.to_string())),
            _ => Err(invalid()),
        }
    }
}
