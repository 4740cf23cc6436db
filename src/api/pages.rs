//! PageService: pages and their write-only secrets.

use tonic::{Request, Response, Status};

use super::{
    ServiceError, page_size, page_token, paginate,
    pb::{self, page_service_server::PageService},
    time::timestamp_from_ms,
};
use crate::{
    crypto::SecretCipher,
    domain::{NewPage, PageChanges, PageId, Violations},
    store::{Store, pages, pages::PageRecord},
};

const PAGE_TOKEN_KIND: &str = "pages";

pub struct Pages {
    store: Store,
    cipher: SecretCipher,
}

impl Pages {
    pub fn new(store: Store, cipher: SecretCipher) -> Self {
        Pages { store, cipher }
    }
}

fn to_proto(page: PageRecord) -> pb::Page {
    pb::Page {
        page_id: page.id.to_string(),
        name: page.name,
        send_rate_per_second: page.send_rate_per_second,
        has_access_token: page.has_access_token,
        has_app_secret: page.has_app_secret,
        has_verify_token: page.has_verify_token,
        create_time: Some(timestamp_from_ms(page.created_at_ms)),
        update_time: Some(timestamp_from_ms(page.updated_at_ms)),
    }
}

fn parse_page_id(raw: &str) -> Result<PageId, ServiceError> {
    let id = PageId::parse(raw).map_err(|rule| Violations::single("page_id", rule))?;
    tracing::Span::current().record("page_id", id.as_str());
    Ok(id)
}

fn page_name(id: &PageId) -> impl FnOnce() -> String + '_ {
    move || format!("page {id}")
}

#[tonic::async_trait]
impl PageService for Pages {
    async fn create_page(
        &self,
        request: Request<pb::CreatePageRequest>,
    ) -> Result<Response<pb::CreatePageResponse>, Status> {
        let req = request.into_inner();
        let page = NewPage::parse(
            &req.page_id,
            &req.name,
            &req.access_token,
            &req.app_secret,
            &req.verify_token,
            req.send_rate_per_second,
        )
        .map_err(ServiceError::from)?;
        tracing::Span::current().record("page_id", page.id.as_str());
        let created = pages::create(&self.store.db, &self.cipher, &page)
            .await
            .map_err(|e| ServiceError::from_store(e, page_name(&page.id)))?;
        tracing::info!(
            send_rate_per_second = created.send_rate_per_second,
            "page created"
        );
        Ok(Response::new(pb::CreatePageResponse {
            page: Some(to_proto(created)),
        }))
    }

    async fn get_page(
        &self,
        request: Request<pb::GetPageRequest>,
    ) -> Result<Response<pb::GetPageResponse>, Status> {
        let id = parse_page_id(&request.get_ref().page_id)?;
        let page = pages::get(&self.store.read, &id)
            .await
            .map_err(|e| ServiceError::from_store(e, page_name(&id)))?;
        Ok(Response::new(pb::GetPageResponse {
            page: Some(to_proto(page)),
        }))
    }

    async fn list_pages(
        &self,
        request: Request<pb::ListPagesRequest>,
    ) -> Result<Response<pb::ListPagesResponse>, Status> {
        let req = request.into_inner();
        let mut violations = Violations::new();
        let size = violations.check("page_size", page_size(req.page_size));
        let after = violations.check(
            "page_token",
            page_token::decode(PAGE_TOKEN_KIND, &req.page_token),
        );
        let (size, after) = violations
            .finish(|| Some((size?, after?)))
            .map_err(ServiceError::from)?;
        let rows = pages::list(&self.store.read, after.as_deref(), size + 1)
            .await
            .map_err(ServiceError::internal)?;
        let (rows, next_page_token) = paginate(rows, size, PAGE_TOKEN_KIND, |last| {
            last.id.as_str().to_string()
        });
        Ok(Response::new(pb::ListPagesResponse {
            pages: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_page(
        &self,
        request: Request<pb::UpdatePageRequest>,
    ) -> Result<Response<pb::UpdatePageResponse>, Status> {
        let req = request.into_inner();
        let id = parse_page_id(&req.page_id)?;
        let changes = PageChanges::parse(
            req.name.as_deref(),
            req.access_token.as_deref(),
            req.app_secret.as_deref(),
            req.verify_token.as_deref(),
            req.send_rate_per_second,
        )
        .map_err(ServiceError::from)?;
        let updated = pages::update(&self.store.db, &self.cipher, &id, &changes)
            .await
            .map_err(|e| ServiceError::from_store(e, page_name(&id)))?;
        // Which fields changed is worth a log line; their values never are.
        tracing::info!(
            name = changes.name.is_some(),
            access_token = changes.access_token.is_some(),
            app_secret = changes.app_secret.is_some(),
            verify_token = changes.verify_token.is_some(),
            send_rate_per_second = changes.send_rate.map(|r| r.get()),
            "page updated"
        );
        Ok(Response::new(pb::UpdatePageResponse {
            page: Some(to_proto(updated)),
        }))
    }

    async fn delete_page(
        &self,
        request: Request<pb::DeletePageRequest>,
    ) -> Result<Response<pb::DeletePageResponse>, Status> {
        let id = parse_page_id(&request.get_ref().page_id)?;
        match pages::delete(&self.store.db, &id)
            .await
            .map_err(|e| ServiceError::from_store(e, page_name(&id)))?
        {
            pages::Deletion::Deleted => {
                tracing::info!("page deleted");
                Ok(Response::new(pb::DeletePageResponse {}))
            }
            pages::Deletion::SendsUnfinished(sends) => {
                let listed: Vec<String> = sends
                    .iter()
                    .take(5)
                    .map(|(send, state)| format!("{send} ({state})"))
                    .collect();
                Err(ServiceError::FailedPrecondition(format!(
                    "page {id} has {} sends that are not finished: {}{}; cancel them \
                     (SendService.CancelSend) and wait until nothing is in flight, then delete \
                     the page",
                    sends.len(),
                    listed.join(", "),
                    if sends.len() > 5 { ", ..." } else { "" }
                ))
                .into())
            }
        }
    }
}
