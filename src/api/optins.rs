//! OptInService: asking users to opt in, recording the tokens, and the ledger.

use tonic::{Request, Response, Status};

use super::{
    ServiceError, page_size, page_token, paginate,
    pb::{self, opt_in_service_server::OptInService},
    shared::{ensure_page, ms_from_timestamp, parse_page_id, parse_psid},
    time::timestamp_from_ms,
};
use crate::{
    crypto::SecretCipher,
    domain::{
        EventKind, IncomingEvent, OptInState, OptInToken, Topic, Violations, char_len, fingerprint,
    },
    graph::GraphClient,
    store::{
        Store, now_ms,
        optins::{self, OptInFilter},
        pages,
    },
};

/// Topics of opt-in requests (the payload Facebook echoes back).
const REQUEST_TOPIC_MAX_CHARS: usize = 200;
/// Facebook's limit on the template's title.
const TITLE_MAX_CHARS: usize = 65;
const PAGE_TOKEN_KIND: &str = "optins";

pub struct OptIns {
    store: Store,
    cipher: SecretCipher,
    graph: GraphClient,
}

impl OptIns {
    pub fn new(store: Store, cipher: SecretCipher, graph: GraphClient) -> Self {
        OptIns {
            store,
            cipher,
            graph,
        }
    }
}

impl From<OptInState> for pb::OptInState {
    fn from(state: OptInState) -> Self {
        match state {
            OptInState::Active => pb::OptInState::Active,
            OptInState::Reserved => pb::OptInState::Reserved,
            OptInState::Used => pb::OptInState::Used,
            OptInState::Rejected => pb::OptInState::Rejected,
            OptInState::Expired => pb::OptInState::Expired,
        }
    }
}

fn opt_in_to_proto(row: optins::Model, now: i64) -> pb::OptIn {
    pb::OptIn {
        opt_in_id: row.id.to_string(),
        page_id: row.page_id,
        psid: row.psid,
        topic: row.topic,
        token_fingerprint: fingerprint(&row.token),
        opt_in_time: Some(timestamp_from_ms(row.opted_in_at)),
        expire_time: Some(timestamp_from_ms(row.expires_at)),
        state: pb::OptInState::from(row.state.effective(row.expires_at, now)).into(),
        use_time: row.used_at.map(timestamp_from_ms),
        delivery_id: row.delivery_id.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl OptInService for OptIns {
    async fn send_opt_in_request(
        &self,
        request: Request<pb::SendOptInRequestRequest>,
    ) -> Result<Response<pb::SendOptInRequestResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let page_id = v.check("page_id", parse_page_id(&req.page_id));
        let psid = v.check("psid", parse_psid(&req.psid));
        let topic = v.check(
            "topic",
            Topic::parse_within(&req.topic, REQUEST_TOPIC_MAX_CHARS),
        );
        let title = if req.title.is_empty() {
            match &topic {
                Some(topic) if char_len(topic.as_str()) <= TITLE_MAX_CHARS => {
                    Some(topic.as_str().to_string())
                }
                Some(_) => v.check::<String>(
                    "title",
                    Err(format!(
                        "is required when the topic is longer than {TITLE_MAX_CHARS} characters"
                    )),
                ),
                None => None,
            }
        } else if char_len(&req.title) > TITLE_MAX_CHARS {
            v.check::<String>(
                "title",
                Err(format!(
                    "must be at most {TITLE_MAX_CHARS} characters, got {}",
                    char_len(&req.title)
                )),
            )
        } else {
            Some(req.title.clone())
        };
        let (page_id, psid, topic, title) = v
            .finish(|| Some((page_id?, psid?, topic?, title?)))
            .map_err(ServiceError::from)?;
        let credentials = pages::credentials(&self.store.db, &self.cipher, &page_id)
            .await
            .map_err(|e| ServiceError::from_store(e, || format!("page {page_id}")))?;
        let delivered = self
            .graph
            .send_optin_request(&credentials, psid.as_str(), &title, topic.as_str())
            .await
            .map_err(|failure| {
                tracing::info!(%failure, "opt-in request refused");
                ServiceError::Graph(failure)
            })?;
        optins::record_request(
            &self.store.db,
            &page_id,
            &psid,
            &topic,
            &title,
            &delivered.message_id,
            now_ms(),
        )
        .await
        .map_err(ServiceError::internal)?;
        tracing::info!(message_id = %delivered.message_id, "opt-in request sent");
        Ok(Response::new(pb::SendOptInRequestResponse {
            message_id: delivered.message_id,
        }))
    }

    async fn record_opt_in(
        &self,
        request: Request<pb::RecordOptInRequest>,
    ) -> Result<Response<pb::RecordOptInResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let page_id = v.check("page_id", parse_page_id(&req.page_id));
        let psid = v.check("psid", parse_psid(&req.psid));
        let topic = v.check("topic", Topic::parse(&req.topic));
        let token = v.check("token", OptInToken::parse(&req.token));
        let at = match &req.opt_in_time {
            None => Some(now_ms()),
            Some(time) => v.check("opt_in_time", ms_from_timestamp(time)),
        };
        let (page_id, psid, topic, token, at) = v
            .finish(|| Some((page_id?, psid?, topic?, token?, at?)))
            .map_err(ServiceError::from)?;
        ensure_page(&self.store, &page_id).await?;
        let event = IncomingEvent {
            psid,
            at_ms: at,
            kind: EventKind::OptIn {
                topic,
                token: token.clone(),
            },
        };
        let report = optins::ingest(
            &self.store.db,
            &self.cipher,
            &[(page_id.clone(), vec![event])],
        )
        .await
        .map_err(ServiceError::internal)?;
        if report.dropped_erased > 0 {
            return Err(ServiceError::FailedPrecondition(format!(
                "subscriber {} of page {page_id} was erased after this opt-in; only what the \
                 user does after the erasure is recorded",
                req.psid
            ))
            .into());
        }
        let row = optins::find_by_token(&self.store.read, &page_id, &token)
            .await
            .map_err(ServiceError::internal)?;
        Ok(Response::new(pb::RecordOptInResponse {
            opt_in: Some(opt_in_to_proto(row, now_ms())),
            created: report.opt_ins_created == 1,
        }))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let page_id = parse_page_id(&request.get_ref().page_id)
            .map_err(|rule| ServiceError::from(Violations::single("page_id", rule)))?;
        ensure_page(&self.store, &page_id).await?;
        let ledger = optins::ledger(&self.store.read, &page_id, now_ms())
            .await
            .map_err(ServiceError::internal)?;
        Ok(Response::new(pb::ListTopicsResponse {
            topics: ledger
                .into_iter()
                .map(|t| pb::TopicSummary {
                    topic: t.topic,
                    active: t.active,
                    reserved: t.reserved,
                    used: t.used,
                    expired: t.expired,
                    rejected: t.rejected,
                    expiring_soon: t.expiring_soon,
                    requests_sent: t.requests_sent,
                    subscribers: t.subscribers,
                })
                .collect(),
        }))
    }

    async fn list_opt_ins(
        &self,
        request: Request<pb::ListOptInsRequest>,
    ) -> Result<Response<pb::ListOptInsResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let page_id = v.check("page_id", parse_page_id(&req.page_id));
        let topic = if req.topic.is_empty() {
            Some(None)
        } else {
            v.check("topic", Topic::parse(&req.topic).map(Some))
        };
        let psid = if req.psid.is_empty() {
            Some(None)
        } else {
            v.check("psid", parse_psid(&req.psid).map(Some))
        };
        let state = match pb::OptInState::try_from(req.state) {
            Ok(pb::OptInState::Unspecified) => Some(None),
            Ok(pb::OptInState::Active) => Some(Some(OptInState::Active)),
            Ok(pb::OptInState::Reserved) => Some(Some(OptInState::Reserved)),
            Ok(pb::OptInState::Used) => Some(Some(OptInState::Used)),
            Ok(pb::OptInState::Rejected) => Some(Some(OptInState::Rejected)),
            Ok(pb::OptInState::Expired) => Some(Some(OptInState::Expired)),
            Err(_) => v.check::<Option<OptInState>>(
                "state",
                Err(format!("{} is not an OptInState", req.state)),
            ),
        };
        let size = v.check("page_size", page_size(req.page_size));
        let after = v.check(
            "page_token",
            page_token::decode(PAGE_TOKEN_KIND, &req.page_token).and_then(|after| {
                after
                    .map(|id| {
                        id.parse::<i64>()
                            .map_err(|_| "is not a token this list returned".to_string())
                    })
                    .transpose()
            }),
        );
        let (page_id, filter, size, after) = v
            .finish(|| {
                Some((
                    page_id?,
                    OptInFilter {
                        topic: topic?,
                        psid: psid?,
                        state: state?,
                    },
                    size?,
                    after?,
                ))
            })
            .map_err(ServiceError::from)?;
        ensure_page(&self.store, &page_id).await?;
        let now = now_ms();
        let rows = optins::list(&self.store.read, &page_id, &filter, after, size + 1, now)
            .await
            .map_err(ServiceError::internal)?;
        let (rows, next_page_token) =
            paginate(rows, size, PAGE_TOKEN_KIND, |last| last.id.to_string());
        Ok(Response::new(pb::ListOptInsResponse {
            opt_ins: rows
                .into_iter()
                .map(|row| opt_in_to_proto(row, now))
                .collect(),
            next_page_token,
        }))
    }
}
