//! OptInService: asking users to opt in, recording the tokens, and the ledger.

use tonic::{Request, Response, Status};

use super::{
    ServiceError, page_size, page_token, paginate,
    pb::{self, opt_in_service_server::OptInService},
    shared::{ensure_page, ms_from_timestamp, parse_page_id, parse_psid, token_kind},
    time::timestamp_from_ms,
};
use crate::{
    domain::{
        EventKind, IncomingEvent, OptInState, OptInToken, RECURRING_TITLE_MAX_CHARS,
        RecurringTerms, SubscriptionChange, TokenKind, Topic, Violations, fingerprint,
        recurring_text,
    },
    service::{
        GraphContext,
        optins::{self as cases, OptInRequest, OptInRequestInput},
    },
    store::{
        now_ms,
        optins::{self, OptInFilter},
    },
};

const PAGE_TOKEN_KIND: &str = "optins";

pub struct OptIns {
    cx: GraphContext,
}

impl OptIns {
    pub fn new(cx: GraphContext) -> Self {
        OptIns { cx }
    }
}

impl TryFrom<pb::SendOptInRequestRequest> for OptInRequest {
    type Error = ServiceError;

    fn try_from(req: pb::SendOptInRequestRequest) -> Result<Self, ServiceError> {
        let kind = token_kind(req.kind);
        let call_to_action = match pb::CallToAction::try_from(req.call_to_action) {
            Ok(pb::CallToAction::Unspecified) => Ok(None),
            Ok(pb::CallToAction::Allow) => Ok(Some("ALLOW")),
            Ok(pb::CallToAction::Frequency) => Ok(Some("FREQUENCY")),
            Ok(pb::CallToAction::Get) => Ok(Some("GET")),
            Ok(pb::CallToAction::GetUpdates) => Ok(Some("GET_UPDATES")),
            Ok(pb::CallToAction::OptIn) => Ok(Some("OPT_IN")),
            Ok(pb::CallToAction::SignUp) => Ok(Some("SIGN_UP")),
            Err(_) => Err(format!("{} is not a CallToAction", req.call_to_action)),
        };
        let input = OptInRequestInput {
            topic: &req.topic,
            title: &req.title,
            kind: kind.clone().ok().flatten(),
            image_url: &req.image_url,
            timezone: &req.timezone,
            call_to_action,
            reoptin: req.reoptin,
        };
        let parsed = OptInRequest::parse(parse_page_id(&req.page_id), parse_psid(&req.psid), input);
        match (parsed, kind) {
            (Ok(request), Ok(_)) => Ok(request),
            (Err(mut v), Err(why)) => {
                v.add("kind", why);
                Err(v.into())
            }
            (Ok(_), Err(why)) => Err(Violations::single("kind", why).into()),
            (Err(v), Ok(_)) => Err(v.into()),
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
            OptInState::Stopped => pb::OptInState::Stopped,
        }
    }
}

fn opt_in_to_proto(row: optins::Model, now: i64) -> pb::OptIn {
    let expiry = row.expiry();
    pb::OptIn {
        opt_in_id: row.id.to_string(),
        page_id: row.page_id,
        psid: row.psid,
        topic: row.topic,
        token_fingerprint: fingerprint(&row.token),
        opt_in_time: Some(timestamp_from_ms(row.opted_in_at)),
        expire_time: expiry.map(timestamp_from_ms),
        state: pb::OptInState::from(row.state.effective(row.expires_at, now)).into(),
        use_time: row.used_at.map(timestamp_from_ms),
        delivery_id: row.delivery_id.unwrap_or_default(),
        kind: pb::TokenKind::from(row.kind).into(),
        title: row.title.unwrap_or_default(),
        timezone: row.timezone.unwrap_or_default(),
        token_status: row.token_status.unwrap_or_default(),
    }
}

/// A recurring opt-in's terms from RecordOptIn; the fields that only a recurring token has are
/// refused with a one-time one.
fn recurring_terms(
    req: &pb::RecordOptInRequest,
    kind: Option<TokenKind>,
    v: &mut Violations,
) -> Option<RecurringTerms> {
    let change = match pb::SubscriptionChange::try_from(req.change) {
        Ok(pb::SubscriptionChange::Unspecified) => None,
        Ok(pb::SubscriptionChange::Stop) => Some(SubscriptionChange::Stop),
        Ok(pb::SubscriptionChange::Resume) => Some(SubscriptionChange::Resume),
        Err(_) => {
            v.add(
                "change",
                format!("{} is not a SubscriptionChange", req.change),
            );
            None
        }
    };
    if kind != Some(TokenKind::Recurring) {
        for (field, given) in [
            ("title", !req.title.is_empty()),
            ("timezone", !req.timezone.is_empty()),
            ("token_status", !req.token_status.is_empty()),
            ("expire_time", req.expire_time.is_some()),
            ("change", req.change != 0),
        ] {
            if given {
                v.add(
                    field,
                    "is for recurring tokens only (kind TOKEN_KIND_RECURRING)",
                );
            }
        }
        return None;
    }
    let mut text = |field: &str, raw: &str, max: usize| -> Option<String> {
        let len = crate::domain::char_len(raw);
        if len > max {
            v.add(
                field,
                format!("must be at most {max} characters, got {len}"),
            );
        } else if raw.chars().any(char::is_control) {
            v.add(field, "must not contain control characters");
        }
        recurring_text(raw, max)
    };
    let title = text("title", &req.title, RECURRING_TITLE_MAX_CHARS);
    let timezone = text("timezone", &req.timezone, 64);
    let token_status = text("token_status", &req.token_status, 32);
    let expires_at = req
        .expire_time
        .as_ref()
        .and_then(|time| v.check("expire_time", ms_from_timestamp(time)));
    Some(RecurringTerms {
        title,
        timezone,
        expires_at,
        token_status,
        change,
    })
}

#[tonic::async_trait]
impl OptInService for OptIns {
    async fn send_opt_in_request(
        &self,
        request: Request<pb::SendOptInRequestRequest>,
    ) -> Result<Response<pb::SendOptInRequestResponse>, Status> {
        let message_id = cases::request_opt_in(&self.cx, &request.into_inner().try_into()?).await?;
        Ok(Response::new(pb::SendOptInRequestResponse { message_id }))
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
        let kind = v.check("kind", token_kind(req.kind));
        let recurring = recurring_terms(&req, kind.flatten(), &mut v);
        let (page_id, psid, topic, token, at) = v
            .finish(|| Some((page_id?, psid?, topic?, token?, at?)))
            .map_err(ServiceError::from)?;
        ensure_page(&self.cx.store, &page_id).await?;
        let event = IncomingEvent {
            psid,
            at_ms: at,
            kind: EventKind::OptIn {
                topic,
                token: token.clone(),
                recurring,
            },
        };
        let report = optins::ingest(
            &self.cx.store.db,
            &self.cx.cipher,
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
        let row = optins::find_by_token(&self.cx.store.read, &page_id, &token)
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
        ensure_page(&self.cx.store, &page_id).await?;
        let ledger = optins::ledger(&self.cx.store.read, &page_id, now_ms())
            .await
            .map_err(ServiceError::internal)?;
        Ok(Response::new(pb::ListTopicsResponse {
            topics: ledger
                .into_iter()
                .map(|t| pb::TopicSummary {
                    topic: t.topic,
                    active: t.total.active,
                    reserved: t.total.reserved,
                    used: t.total.used,
                    expired: t.total.expired,
                    rejected: t.total.rejected,
                    expiring_soon: t.total.expiring_soon,
                    requests_sent: t.requests_sent,
                    subscribers: t.total.subscribers,
                    stopped: t.total.stopped,
                    by_kind: t
                        .by_kind
                        .into_iter()
                        .map(|(kind, c)| pb::TokenKindCounts {
                            kind: pb::TokenKind::from(kind).into(),
                            active: c.active,
                            reserved: c.reserved,
                            used: c.used,
                            expired: c.expired,
                            rejected: c.rejected,
                            stopped: c.stopped,
                            expiring_soon: c.expiring_soon,
                            subscribers: c.subscribers,
                        })
                        .collect(),
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
            Ok(pb::OptInState::Stopped) => Some(Some(OptInState::Stopped)),
            Err(_) => v.check::<Option<OptInState>>(
                "state",
                Err(format!("{} is not an OptInState", req.state)),
            ),
        };
        let kind = v.check("kind", token_kind(req.kind));
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
                        kind: kind?,
                    },
                    size?,
                    after?,
                ))
            })
            .map_err(ServiceError::from)?;
        ensure_page(&self.cx.store, &page_id).await?;
        let now = now_ms();
        let rows = optins::list(&self.cx.store.read, &page_id, &filter, after, size + 1, now)
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
