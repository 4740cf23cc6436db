//! AudienceService: subscribers, their window and tags, and segments.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use tonic::{Request, Response, Status};

use super::{
    ServiceError, paginate,
    pb::{self, audience_service_server::AudienceService},
    shared::{ensure_page, ms_from_timestamp, page_listing, parse_page_id, parse_psid},
    time::timestamp_from_ms,
};
use crate::{
    crypto::SecretCipher,
    domain::{OptInState, PageId, Psid, SegmentRule, Violations, WINDOW_MS, char_len, parse_tags},
    engine::EngineHandle,
    store::{
        Store,
        audience::{self, SegmentRecord, SubscriberTouch, SubscriberView},
        erasures, now_ms,
    },
};

/// Most subscribers one TagSubscribers call changes.
const MAX_PSIDS_PER_CALL: usize = 10_000;
/// Most tags one TagSubscribers call adds and removes, together.
const MAX_TAGS_PER_CALL: usize = 100;
const SEGMENT_NAME_MAX_CHARS: usize = 100;
const PAGE_TOKEN_KIND: &str = "segments";

pub struct Audience {
    store: Store,
    cipher: SecretCipher,
    /// Told when an erasure moved the counters of a page's sends.
    engine: EngineHandle,
    /// How long DeleteSubscriber waits for a message to the user that is in flight to be
    /// answered before it answers UNAVAILABLE.
    erasure_wait: Duration,
}

impl Audience {
    /// `graph_timeout` bounds how long a Graph call may stay unanswered; an erasure waits that
    /// long and a little more for one to the user it erases.
    pub fn new(
        store: Store,
        cipher: SecretCipher,
        engine: EngineHandle,
        graph_timeout: Duration,
    ) -> Self {
        Audience {
            store,
            cipher,
            engine,
            erasure_wait: graph_timeout + Duration::from_secs(5),
        }
    }

    async fn subscriber(
        &self,
        page_id: &PageId,
        psid: &Psid,
    ) -> Result<pb::Subscriber, ServiceError> {
        let now = now_ms();
        let view = audience::get_subscriber(&self.store.read, page_id, psid, now)
            .await
            .map_err(|e| {
                ServiceError::from_store(e, || format!("subscriber {psid} of page {page_id}"))
            })?;
        Ok(subscriber_to_proto(page_id.as_str(), view, now))
    }
}

/// The (page, user) pair GetSubscriber and DeleteSubscriber address.
fn subscriber_key(page_id: &str, psid: &str) -> Result<(PageId, Psid), ServiceError> {
    let mut v = Violations::new();
    let page_id = v.check("page_id", parse_page_id(page_id));
    let psid = v.check("psid", parse_psid(psid));
    Ok(v.finish(|| Some((page_id?, psid?)))?)
}

fn subscriber_to_proto(page_id: &str, view: SubscriberView, now: i64) -> pb::Subscriber {
    let window_close = view.last_interaction_at.map(|at| at + WINDOW_MS);
    let count = |topic: &audience::SubscriberTopic, state: OptInState| {
        topic.counts.get(&state).copied().unwrap_or(0)
    };
    pb::Subscriber {
        page_id: page_id.to_string(),
        psid: view.psid,
        first_seen_time: Some(timestamp_from_ms(view.first_seen_at)),
        last_interaction_time: view.last_interaction_at.map(timestamp_from_ms),
        window_open: window_close.is_some_and(|close| close > now),
        window_close_time: window_close.map(timestamp_from_ms),
        tags: view.tags,
        topics: view
            .topics
            .iter()
            .map(|topic| pb::SubscriberTopic {
                topic: topic.topic.clone(),
                active: count(topic, OptInState::Active),
                reserved: count(topic, OptInState::Reserved),
                used: count(topic, OptInState::Used),
                expired: count(topic, OptInState::Expired),
                rejected: count(topic, OptInState::Rejected),
                next_expire_time: topic.next_expiry.map(timestamp_from_ms),
                stopped: count(topic, OptInState::Stopped),
                recurring_active: topic.recurring_active,
            })
            .collect(),
    }
}

fn segment_to_proto(segment: SegmentRecord) -> pb::Segment {
    pb::Segment {
        segment_id: segment.id,
        page_id: segment.page_id,
        name: segment.name,
        rule: Some(pb::SegmentRule {
            all_tags: segment.rule.all_tags.into_iter().collect(),
            any_tags: segment.rule.any_tags.into_iter().collect(),
            none_tags: segment.rule.none_tags.into_iter().collect(),
        }),
        create_time: Some(timestamp_from_ms(segment.created_at)),
    }
}

#[tonic::async_trait]
impl AudienceService for Audience {
    async fn record_interaction(
        &self,
        request: Request<pb::RecordInteractionRequest>,
    ) -> Result<Response<pb::RecordInteractionResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let page_id = v.check("page_id", parse_page_id(&req.page_id));
        let psid = v.check("psid", parse_psid(&req.psid));
        let at = match &req.interaction_time {
            None => Some(now_ms()),
            Some(time) => v.check("interaction_time", ms_from_timestamp(time)),
        };
        let (page_id, psid, at) = v
            .finish(|| Some((page_id?, psid?, at?)))
            .map_err(ServiceError::from)?;
        ensure_page(&self.store, &page_id).await?;
        let digest = erasures::digest(&self.cipher, page_id.as_str(), psid.as_str());
        let erased = erasures::erased_at(&self.store.db, page_id.as_str(), &[digest.as_str()])
            .await
            .map_err(ServiceError::internal)?;
        if let Some(erased_at) = erased.get(&digest)
            && erasures::is_late(at, true, *erased_at)
        {
            return Err(ServiceError::FailedPrecondition(format!(
                "subscriber {psid} of page {page_id} was erased after this interaction; only \
                 what the user does after the erasure is recorded"
            ))
            .into());
        }
        let touch = HashMap::from([(
            (page_id.as_str(), psid.as_str()),
            SubscriberTouch {
                first_seen_at: at,
                last_interaction_at: Some(at),
            },
        )]);
        audience::upsert_subscribers(&self.store.db, &touch)
            .await
            .map_err(ServiceError::internal)?;
        Ok(Response::new(pb::RecordInteractionResponse {
            subscriber: Some(self.subscriber(&page_id, &psid).await?),
        }))
    }

    async fn tag_subscribers(
        &self,
        request: Request<pb::TagSubscribersRequest>,
    ) -> Result<Response<pb::TagSubscribersResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let page_id = v.check("page_id", parse_page_id(&req.page_id));
        if req.psids.is_empty() || req.psids.len() > MAX_PSIDS_PER_CALL {
            v.add(
                "psids",
                format!(
                    "must list 1 to {MAX_PSIDS_PER_CALL} subscribers, got {}",
                    req.psids.len()
                ),
            );
        }
        let psids: BTreeSet<Psid> = req
            .psids
            .iter()
            .enumerate()
            .filter_map(|(i, raw)| v.check(&format!("psids[{i}]"), parse_psid(raw)))
            .collect();
        let named = req.add_tags.len() + req.remove_tags.len();
        if named > MAX_TAGS_PER_CALL {
            v.add(
                "add_tags",
                format!(
                    "add_tags and remove_tags name at most {MAX_TAGS_PER_CALL} tags together, \
                     got {named}"
                ),
            );
            return Err(ServiceError::from(v).into());
        }
        let add = parse_tags("add_tags", &req.add_tags, &mut v);
        let remove = parse_tags("remove_tags", &req.remove_tags, &mut v);
        if req.add_tags.is_empty() && req.remove_tags.is_empty() {
            v.add(
                "add_tags",
                "add_tags or remove_tags must name at least one tag",
            );
        }
        if let Some(both) = add.intersection(&remove).next() {
            v.add(
                "remove_tags",
                format!("'{}' is also in add_tags", both.as_str()),
            );
        }
        let page_id = v.finish(|| page_id).map_err(ServiceError::from)?;
        ensure_page(&self.store, &page_id).await?;
        let updated =
            audience::tag_subscribers(&self.store.db, &page_id, &psids, &add, &remove, now_ms())
                .await
                .map_err(ServiceError::internal)?;
        Ok(Response::new(pb::TagSubscribersResponse {
            updated: updated as u32,
        }))
    }

    async fn get_subscriber(
        &self,
        request: Request<pb::GetSubscriberRequest>,
    ) -> Result<Response<pb::GetSubscriberResponse>, Status> {
        let req = request.into_inner();
        let (page_id, psid) = subscriber_key(&req.page_id, &req.psid)?;
        Ok(Response::new(pb::GetSubscriberResponse {
            subscriber: Some(self.subscriber(&page_id, &psid).await?),
        }))
    }

    async fn delete_subscriber(
        &self,
        request: Request<pb::DeleteSubscriberRequest>,
    ) -> Result<Response<pb::DeleteSubscriberResponse>, Status> {
        let req = request.into_inner();
        let (page_id, psid) = subscriber_key(&req.page_id, &req.psid)?;
        let digest = erasures::digest(&self.cipher, page_id.as_str(), psid.as_str());
        let erased = audience::delete_subscriber(
            &self.store.db,
            &page_id,
            &psid,
            &digest,
            self.erasure_wait,
        )
        .await
        .map_err(|e| {
            ServiceError::from_store(e, || format!("subscriber {psid} of page {page_id}"))
        })?;
        self.engine.sends_changed_elsewhere(page_id.as_str());
        tracing::info!(
            opt_ins_deleted = erased.opt_ins,
            deliveries_deleted = erased.deliveries,
            "subscriber erased"
        );
        Ok(Response::new(pb::DeleteSubscriberResponse {
            opt_ins_deleted: u32::try_from(erased.opt_ins).unwrap_or(u32::MAX),
            deliveries_deleted: u32::try_from(erased.deliveries).unwrap_or(u32::MAX),
        }))
    }

    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> Result<Response<pb::CreateSegmentResponse>, Status> {
        let req = request.into_inner();
        let mut v = Violations::new();
        let page_id = v.check("page_id", parse_page_id(&req.page_id));
        let name_len = char_len(&req.name);
        if req.name.trim().is_empty() || name_len > SEGMENT_NAME_MAX_CHARS {
            v.add(
                "name",
                format!("must be 1 to {SEGMENT_NAME_MAX_CHARS} characters and not blank"),
            );
        }
        let rule = req.rule.unwrap_or_default();
        let rule = match SegmentRule::parse("rule", &rule.all_tags, &rule.any_tags, &rule.none_tags)
        {
            Ok(rule) => Some(rule),
            Err(broken) => {
                v.0.extend(broken.0);
                None
            }
        };
        let (page_id, rule) = v
            .finish(|| Some((page_id?, rule?)))
            .map_err(ServiceError::from)?;
        ensure_page(&self.store, &page_id).await?;
        let segment =
            audience::create_segment(&self.store.db, &page_id, &req.name, &rule, now_ms())
                .await
                .map_err(|e| {
                    ServiceError::from_store(e, || {
                        format!("segment '{}' of page {page_id}", req.name)
                    })
                })?;
        Ok(Response::new(pb::CreateSegmentResponse {
            segment: Some(segment_to_proto(segment)),
        }))
    }

    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let req = request.into_inner();
        let (page_id, size, after) = page_listing(
            &self.store,
            &req.page_id,
            req.page_size,
            &req.page_token,
            PAGE_TOKEN_KIND,
        )
        .await?;
        let segments =
            audience::list_segments(&self.store.read, &page_id, after.as_deref(), size + 1)
                .await
                .map_err(ServiceError::internal)?;
        let (segments, next_page_token) =
            paginate(segments, size, PAGE_TOKEN_KIND, |last| last.name.clone());
        Ok(Response::new(pb::ListSegmentsResponse {
            segments: segments.into_iter().map(segment_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> Result<Response<pb::DeleteSegmentResponse>, Status> {
        let id = request.into_inner().segment_id;
        if id.is_empty() {
            return Err(ServiceError::from(Violations::single("segment_id", "is required")).into());
        }
        audience::delete_segment(&self.store.db, &id)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::InUse => ServiceError::FailedPrecondition(format!(
                    "segment {id} is used by a story: change or delete the story first"
                )),
                e => ServiceError::from_store(e, || format!("segment {id}")),
            })?;
        Ok(Response::new(pb::DeleteSegmentResponse {}))
    }
}
