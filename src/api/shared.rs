//! Parsing and checks that several services share.

use prost_types::Timestamp;

use super::{ServiceError, pb};
pub use crate::service::ensure_page;
use crate::{
    domain::{PageId, Psid, TokenKind, Violations},
    store::Store,
};

/// A token kind as the domain's; `None` for TOKEN_KIND_UNSPECIFIED.
pub fn token_kind(raw: i32) -> Result<Option<TokenKind>, String> {
    match pb::TokenKind::try_from(raw) {
        Ok(pb::TokenKind::Unspecified) => Ok(None),
        Ok(pb::TokenKind::OneTime) => Ok(Some(TokenKind::OneTime)),
        Ok(pb::TokenKind::Recurring) => Ok(Some(TokenKind::Recurring)),
        Err(_) => Err(format!(
            "{raw} is not a TokenKind (TOKEN_KIND_ONE_TIME or TOKEN_KIND_RECURRING)"
        )),
    }
}

impl From<TokenKind> for pb::TokenKind {
    fn from(kind: TokenKind) -> Self {
        match kind {
            TokenKind::OneTime => pb::TokenKind::OneTime,
            TokenKind::Recurring => pb::TokenKind::Recurring,
        }
    }
}

/// A story's token kinds: each a kind, at most once; none is every kind.
pub fn token_kinds(raw: &[i32]) -> Result<Vec<TokenKind>, String> {
    let mut kinds = Vec::new();
    for value in raw {
        match token_kind(*value)? {
            None => return Err("lists TOKEN_KIND_UNSPECIFIED, which is no kind".into()),
            Some(kind) if kinds.contains(&kind) => {
                return Err(format!(
                    "lists {} twice",
                    pb::TokenKind::from(kind).as_str_name()
                ));
            }
            Some(kind) => kinds.push(kind),
        }
    }
    Ok(kinds)
}

/// The kinds a story stores, as the API lists them: empty for every kind.
pub fn token_kinds_to_proto(stored: &str) -> Vec<i32> {
    if stored.is_empty() {
        return Vec::new();
    }
    TokenKind::split(stored)
        .into_iter()
        .map(|kind| pb::TokenKind::from(kind) as i32)
        .collect()
}

/// Parses a page id and tags the RPC's span with it.
pub fn parse_page_id(raw: &str) -> Result<PageId, String> {
    let id = PageId::parse(raw)?;
    tracing::Span::current().record("page_id", id.as_str());
    Ok(id)
}

pub fn parse_psid(raw: &str) -> Result<Psid, String> {
    Psid::parse(raw)
}

/// The page, page size and page token of a List RPC over one registered page's rows.
pub async fn page_listing(
    store: &Store,
    page_id: &str,
    page_size: i32,
    page_token: &str,
    kind: &str,
) -> Result<(PageId, u64, Option<String>), ServiceError> {
    let mut v = Violations::new();
    let page_id = v.check("page_id", parse_page_id(page_id));
    let size = v.check("page_size", super::page_size(page_size));
    let after = v.check("page_token", super::page_token::decode(kind, page_token));
    let (page_id, size, after) = v.finish(|| Some((page_id?, size?, after?)))?;
    ensure_page(store, &page_id).await?;
    Ok((page_id, size, after))
}

/// A protobuf Timestamp as epoch milliseconds, refusing values no clock would give.
pub fn ms_from_timestamp(time: &Timestamp) -> Result<i64, String> {
    if !(0..1_000_000_000).contains(&time.nanos) {
        return Err("nanos must be from 0 to 999999999".into());
    }
    // 0001-01-01 to 9999-12-31, the range protobuf allows.
    if !(-62_135_596_800..=253_402_300_799).contains(&time.seconds) {
        return Err("is outside the range of a timestamp".into());
    }
    Ok(time.seconds * 1000 + i64::from(time.nanos) / 1_000_000)
}
