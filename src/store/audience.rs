//! Subscribers, their tags, and segments.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sea_orm::{
    ActiveValue::Set,
    ConnectionTrait, DatabaseConnection, QueryFilter, QueryOrder, QuerySelect,
    entity::prelude::*,
    sea_query::{Expr, OnConflict, Query},
};

use super::{StoreError, optins};
use crate::domain::{OptInState, PageId, Psid, SegmentRule, Tag};

pub mod subscribers {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "subscribers")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub page_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub psid: String,
        pub first_seen_at: i64,
        pub last_interaction_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod tags {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "subscriber_tags")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub page_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub psid: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub tag: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod segments {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "segments")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub page_id: String,
        pub name: String,
        pub rule: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What one batch of events says about a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriberTouch {
    pub first_seen_at: i64,
    pub last_interaction_at: Option<i64>,
}

impl SubscriberTouch {
    pub fn merge(&mut self, seen_at: i64, interaction: Option<i64>) {
        self.first_seen_at = self.first_seen_at.min(seen_at);
        self.last_interaction_at = match (self.last_interaction_at, interaction) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Upserts users so that `first_seen_at` never moves later and `last_interaction_at` never
/// earlier, whatever order events arrive in. One statement per chunk of users.
pub async fn upsert_subscribers(
    db: &impl ConnectionTrait,
    touches: &HashMap<(&str, &str), SubscriberTouch>,
) -> Result<(), StoreError> {
    use subscribers::{Column, Entity};
    let rows: Vec<_> = touches.iter().collect();
    for chunk in rows.chunks(1000) {
        let mut insert = Query::insert();
        insert.into_table(Entity).columns([
            Column::PageId,
            Column::Psid,
            Column::FirstSeenAt,
            Column::LastInteractionAt,
        ]);
        for ((page_id, psid), touch) in chunk {
            insert.values_panic([
                (*page_id).into(),
                (*psid).into(),
                touch.first_seen_at.into(),
                touch.last_interaction_at.into(),
            ]);
        }
        insert.on_conflict(
            OnConflict::columns([Column::PageId, Column::Psid])
                .value(
                    Column::FirstSeenAt,
                    Expr::cust(
                        "CASE WHEN excluded.first_seen_at < subscribers.first_seen_at \
                         THEN excluded.first_seen_at ELSE subscribers.first_seen_at END",
                    ),
                )
                .value(
                    Column::LastInteractionAt,
                    Expr::cust(
                        "CASE WHEN excluded.last_interaction_at IS NOT NULL AND \
                         (subscribers.last_interaction_at IS NULL OR \
                          excluded.last_interaction_at > subscribers.last_interaction_at) \
                         THEN excluded.last_interaction_at ELSE subscribers.last_interaction_at END",
                    ),
                )
                .to_owned(),
        );
        db.execute(&insert).await?;
    }
    Ok(())
}

/// A subscriber as GetSubscriber shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberView {
    pub psid: String,
    pub first_seen_at: i64,
    pub last_interaction_at: Option<i64>,
    pub tags: Vec<String>,
    pub topics: Vec<SubscriberTopic>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriberTopic {
    pub topic: String,
    pub counts: BTreeMap<OptInState, u32>,
    /// When the first usable opt-in on the topic expires.
    pub next_expiry: Option<i64>,
    /// Of the active opt-ins, the recurring tokens.
    pub recurring_active: u32,
}

pub async fn get_subscriber(
    db: &impl ConnectionTrait,
    page_id: &PageId,
    psid: &Psid,
    now: i64,
) -> Result<SubscriberView, StoreError> {
    let subscriber =
        subscribers::Entity::find_by_id((page_id.as_str().to_string(), psid.as_str().to_string()))
            .one(db)
            .await?
            .ok_or(StoreError::NotFound)?;
    let tags = tags::Entity::find()
        .filter(tags::Column::PageId.eq(page_id.as_str()))
        .filter(tags::Column::Psid.eq(psid.as_str()))
        .order_by_asc(tags::Column::Tag)
        .all(db)
        .await?
        .into_iter()
        .map(|t| t.tag)
        .collect();
    // A single user's opt-ins are few; they are counted here rather than in SQL.
    let rows = optins::Entity::find()
        .filter(optins::Column::PageId.eq(page_id.as_str()))
        .filter(optins::Column::Psid.eq(psid.as_str()))
        .all(db)
        .await?;
    let mut topics: BTreeMap<String, SubscriberTopic> = BTreeMap::new();
    for row in rows {
        let state = row.state.effective(row.expires_at, now);
        let topic = topics
            .entry(row.topic.clone())
            .or_insert_with(|| SubscriberTopic {
                topic: row.topic.clone(),
                ..SubscriberTopic::default()
            });
        *topic.counts.entry(state).or_default() += 1;
        if state == OptInState::Active && row.kind == crate::domain::TokenKind::Recurring {
            topic.recurring_active += 1;
        }
        // A recurring token without an expiry has none to report.
        if let (OptInState::Active, Some(expiry)) = (state, row.expiry()) {
            topic.next_expiry = Some(topic.next_expiry.map_or(expiry, |t| t.min(expiry)));
        }
    }
    Ok(SubscriberView {
        psid: subscriber.psid,
        first_seen_at: subscriber.first_seen_at,
        last_interaction_at: subscriber.last_interaction_at,
        tags,
        topics: topics.into_values().collect(),
    })
}

/// Adds and removes tags; unknown users become subscribers (a CRM may tag before they write).
/// Returns how many subscribers' tags changed.
pub async fn tag_subscribers(
    db: &DatabaseConnection,
    page_id: &PageId,
    psids: &BTreeSet<Psid>,
    add: &BTreeSet<Tag>,
    remove: &BTreeSet<Tag>,
    now: i64,
) -> Result<u64, StoreError> {
    let txn = super::begin_write(db).await?;
    let touches: HashMap<(&str, &str), SubscriberTouch> = psids
        .iter()
        .map(|psid| {
            (
                (page_id.as_str(), psid.as_str()),
                SubscriberTouch {
                    first_seen_at: now,
                    last_interaction_at: None,
                },
            )
        })
        .collect();
    upsert_subscribers(&txn, &touches).await?;
    let mut changed: BTreeSet<&str> = BTreeSet::new();
    let psid_list: Vec<&str> = psids.iter().map(Psid::as_str).collect();
    // One statement inserts a row per user and tag added: at most 1,000 rows (3,000 bound
    // values), far within SQLite's 32,766 and PostgreSQL's 65,535, however many of each.
    let per_statement = (1000 / add.len().max(1)).clamp(1, 500);
    for chunk in psid_list.chunks(per_statement) {
        if !remove.is_empty() {
            let removed = tags::Entity::find()
                .select_only()
                .column(tags::Column::Psid)
                .filter(tags::Column::PageId.eq(page_id.as_str()))
                .filter(tags::Column::Psid.is_in(chunk.iter().copied()))
                .filter(tags::Column::Tag.is_in(remove.iter().map(Tag::as_str)))
                .into_tuple::<String>()
                .all(&txn)
                .await?;
            tags::Entity::delete_many()
                .filter(tags::Column::PageId.eq(page_id.as_str()))
                .filter(tags::Column::Psid.is_in(chunk.iter().copied()))
                .filter(tags::Column::Tag.is_in(remove.iter().map(Tag::as_str)))
                .exec(&txn)
                .await?;
            for psid in removed {
                if let Some(known) = chunk.iter().find(|p| **p == psid) {
                    changed.insert(known);
                }
            }
        }
        if !add.is_empty() {
            let mut insert = Query::insert();
            insert.into_table(tags::Entity).columns([
                tags::Column::PageId,
                tags::Column::Psid,
                tags::Column::Tag,
            ]);
            for psid in chunk {
                for tag in add {
                    insert.values_panic([
                        page_id.as_str().into(),
                        (*psid).into(),
                        tag.as_str().into(),
                    ]);
                }
            }
            insert.on_conflict(
                OnConflict::columns([tags::Column::PageId, tags::Column::Psid, tags::Column::Tag])
                    .do_nothing()
                    .to_owned(),
            );
            // Which users gained a tag: those without every added tag before the insert.
            let before = tags::Entity::find()
                .filter(tags::Column::PageId.eq(page_id.as_str()))
                .filter(tags::Column::Psid.is_in(chunk.iter().copied()))
                .filter(tags::Column::Tag.is_in(add.iter().map(Tag::as_str)))
                .all(&txn)
                .await?;
            let mut had: HashMap<&str, usize> = HashMap::new();
            for row in &before {
                if let Some(known) = chunk.iter().find(|p| **p == row.psid) {
                    *had.entry(known).or_default() += 1;
                }
            }
            txn.execute(&insert).await?;
            for psid in chunk {
                if had.get(psid).copied().unwrap_or(0) < add.len() {
                    changed.insert(psid);
                }
            }
        }
    }
    txn.commit().await?;
    Ok(changed.len() as u64)
}

/// What an erasure removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Erasure {
    pub opt_ins: u64,
    pub deliveries: u64,
}

/// Erases a user of the page, in one transaction: their deliveries in every send (the sends'
/// counters follow; a pending one is never sent), opt-ins, opt-in requests, tags, subscriber row,
/// and their name as a story's reviewer; then remembers the erasure by `digest` (see
/// `erasures`). `NotFound`, with nothing written, when the page knew nothing of the user.
pub async fn delete_subscriber(
    db: &DatabaseConnection,
    page_id: &PageId,
    psid: &Psid,
    digest: &str,
    in_flight_wait: std::time::Duration,
) -> Result<Erasure, StoreError> {
    // Nothing may reach the user once the erasure has returned: their pending deliveries are
    // held back, and the erasure commits only in a transaction that finds none of theirs in
    // flight (an answer that comes back as "retry" makes one pending again: held again).
    let deadline = tokio::time::Instant::now() + in_flight_wait;
    let txn = loop {
        let txn = super::begin_write(db).await?;
        // Ingestion of the page's events waits for the erasure (or the erasure for it), so
        // that nothing ingested concurrently outlives it (see `erasures`).
        super::erasures::serialize_with_erasures(&txn, [page_id.as_str()]).await?;
        let now = super::now_ms();
        if super::sends::hold_recipient(&txn, page_id.as_str(), psid.as_str(), now).await? == 0 {
            break txn;
        }
        txn.commit().await?;
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::InFlight);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let now = super::now_ms();
    let deliveries =
        super::sends::erase_recipient(&txn, page_id.as_str(), psid.as_str(), now).await?;
    let opt_ins = optins::Entity::delete_many()
        .filter(optins::Column::PageId.eq(page_id.as_str()))
        .filter(optins::Column::Psid.eq(psid.as_str()))
        .exec(&txn)
        .await?
        .rows_affected;
    let requests = optins::requests::Entity::delete_many()
        .filter(optins::requests::Column::PageId.eq(page_id.as_str()))
        .filter(optins::requests::Column::Psid.eq(psid.as_str()))
        .exec(&txn)
        .await?
        .rows_affected;
    let tags = tags::Entity::delete_many()
        .filter(tags::Column::PageId.eq(page_id.as_str()))
        .filter(tags::Column::Psid.eq(psid.as_str()))
        .exec(&txn)
        .await?
        .rows_affected;
    let subscriber = subscribers::Entity::delete_by_id((
        page_id.as_str().to_string(),
        psid.as_str().to_string(),
    ))
    .exec(&txn)
    .await?
    .rows_affected;
    // The review stands (the content was reviewed); who reviewed it is personal.
    let reviews = super::stories::Entity::update_many()
        .col_expr(
            super::stories::Column::ReviewerPsid,
            Expr::value(Option::<String>::None),
        )
        .filter(super::stories::Column::PageId.eq(page_id.as_str()))
        .filter(super::stories::Column::ReviewerPsid.eq(psid.as_str()))
        .exec(&txn)
        .await?
        .rows_affected;
    let found = deliveries + opt_ins + requests + tags + subscriber + reviews > 0;
    if !found
        && super::pages::Entity::find_by_id(page_id.as_str().to_string())
            .one(&txn)
            .await?
            .is_none()
    {
        return Err(StoreError::NotFound);
    }
    // Remembered even when nothing was found: Facebook's webhook for the user's opt-in may
    // still be on its way, and it must not bring them in after they asked to be erased.
    super::erasures::remember(&txn, page_id.as_str(), digest, now).await?;
    txn.commit().await?;
    if !found {
        return Err(StoreError::NotFound);
    }
    Ok(Erasure {
        opt_ins,
        deliveries,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentRecord {
    pub id: String,
    pub page_id: String,
    pub name: String,
    pub rule: SegmentRule,
    pub created_at: i64,
}

impl TryFrom<segments::Model> for SegmentRecord {
    type Error = StoreError;

    fn try_from(m: segments::Model) -> Result<Self, StoreError> {
        let rule = serde_json::from_str(&m.rule).map_err(|e| {
            StoreError::Db(DbErr::Custom(format!(
                "segment {} has a bad rule: {e}",
                m.id
            )))
        })?;
        Ok(SegmentRecord {
            id: m.id,
            page_id: m.page_id,
            name: m.name,
            rule,
            created_at: m.created_at,
        })
    }
}

pub async fn create_segment(
    db: &impl ConnectionTrait,
    page_id: &PageId,
    name: &str,
    rule: &SegmentRule,
    now: i64,
) -> Result<SegmentRecord, StoreError> {
    let model = segments::Model {
        id: uuid::Uuid::new_v4().to_string(),
        page_id: page_id.as_str().to_string(),
        name: name.to_string(),
        rule: serde_json::to_string(rule).expect("a rule serializes"),
        created_at: now,
    };
    segments::Entity::insert(segments::ActiveModel {
        id: Set(model.id.clone()),
        page_id: Set(model.page_id.clone()),
        name: Set(model.name.clone()),
        rule: Set(model.rule.clone()),
        created_at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    SegmentRecord::try_from(model)
}

pub async fn list_segments(
    db: &impl ConnectionTrait,
    page_id: &PageId,
    after_name: Option<&str>,
    limit: u64,
) -> Result<Vec<SegmentRecord>, StoreError> {
    let mut query = segments::Entity::find()
        .filter(segments::Column::PageId.eq(page_id.as_str()))
        .order_by_asc(segments::Column::Name)
        .limit(limit);
    if let Some(after) = after_name {
        query = query.filter(segments::Column::Name.gt(after));
    }
    query
        .all(db)
        .await?
        .into_iter()
        .map(SegmentRecord::try_from)
        .collect()
}

pub async fn get_segment(db: &impl ConnectionTrait, id: &str) -> Result<SegmentRecord, StoreError> {
    segments::Entity::find_by_id(id.to_string())
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)?
        .try_into()
}

/// Deletes a segment no story uses (`InUse` otherwise; the foreign key is the backstop).
pub async fn delete_segment(db: &DatabaseConnection, id: &str) -> Result<(), StoreError> {
    let txn = super::begin_write(db).await?;
    let users = super::stories::Entity::find()
        .filter(super::stories::Column::SegmentId.eq(id))
        .count(&txn)
        .await?;
    if users > 0 {
        return Err(StoreError::InUse);
    }
    let deleted = segments::Entity::delete_by_id(id.to_string())
        .exec(&txn)
        .await?
        .rows_affected;
    if deleted == 0 {
        return Err(StoreError::NotFound);
    }
    txn.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        domain::{DeliveryState, OPT_IN_LIFETIME_MS, SendState},
        store::{
            erasures, now_ms,
            stories::{self, StoryChanges},
            testing::{TestStore, answer, cipher, retry, sent, store_tests},
        },
    };

    fn psids(names: &[&str]) -> BTreeSet<Psid> {
        names.iter().map(|p| Psid::parse(p).unwrap()).collect()
    }

    fn tags(names: &[&str]) -> BTreeSet<Tag> {
        names.iter().map(|t| Tag::parse(t).unwrap()).collect()
    }

    async fn tag(t: &TestStore, page: &PageId, who: &[&str], add: &[&str], remove: &[&str]) -> u64 {
        tag_subscribers(
            t.db(),
            page,
            &psids(who),
            &tags(add),
            &tags(remove),
            now_ms(),
        )
        .await
        .unwrap()
    }

    async fn tags_of(t: &TestStore, page: &PageId, psid: &str) -> Vec<String> {
        get_subscriber(t.db(), page, &Psid::parse(psid).unwrap(), now_ms())
            .await
            .unwrap()
            .tags
    }

    async fn touch(
        t: &TestStore,
        page: &PageId,
        seen: i64,
        interaction: Option<i64>,
    ) -> (i64, Option<i64>) {
        let touch = SubscriberTouch {
            first_seen_at: seen,
            last_interaction_at: interaction,
        };
        upsert_subscribers(t.db(), &HashMap::from([((page.as_str(), "u"), touch)]))
            .await
            .unwrap();
        let row = subscribers::Entity::find_by_id((page.to_string(), "u".to_string()))
            .one(t.db())
            .await
            .unwrap()
            .unwrap();
        (row.first_seen_at, row.last_interaction_at)
    }

    async fn erase(
        t: &TestStore,
        page: &PageId,
        psid: &str,
        wait: Duration,
    ) -> Result<Erasure, StoreError> {
        let digest = erasures::digest(&cipher(), page.as_str(), psid);
        delete_subscriber(t.db(), page, &Psid::parse(psid).unwrap(), &digest, wait).await
    }

    async fn tombstone(t: &TestStore, page: &PageId, psid: &str) -> Option<i64> {
        let digest = erasures::digest(&cipher(), page.as_str(), psid);
        erasures::erased_at(t.db(), page.as_str(), &[digest.as_str()])
            .await
            .unwrap()
            .into_values()
            .next()
    }

    fn any_of(tag: &str) -> SegmentRule {
        SegmentRule {
            any_tags: [tag.to_string()].into(),
            ..Default::default()
        }
    }

    #[test]
    fn merging_keeps_the_earliest_sighting_and_the_latest_interaction() {
        let mut touch = SubscriberTouch {
            first_seen_at: 100,
            last_interaction_at: None,
        };
        touch.merge(150, Some(150));
        touch.merge(50, None);
        assert_eq!(
            touch,
            SubscriberTouch {
                first_seen_at: 50,
                last_interaction_at: Some(150)
            }
        );
        touch.merge(120, Some(120));
        assert_eq!(touch.last_interaction_at, Some(150));
    }

    store_tests! {
        /// Events arrive in any order: first seen only moves earlier, the last interaction
        /// only later, and a sighting without one keeps it.
        async fn an_upsert_never_moves_first_seen_later_nor_the_last_interaction_earlier(t) {
            let page = t.page("1").await;
            assert_eq!(touch(&t, &page, 100, Some(200)).await, (100, Some(200)));
            assert_eq!(touch(&t, &page, 50, Some(150)).await, (50, Some(200)));
            assert_eq!(touch(&t, &page, 300, None).await, (50, Some(200)));
            assert_eq!(touch(&t, &page, 300, Some(500)).await, (50, Some(500)));
            assert_eq!(touch(&t, &page, 300, Some(500)).await, (50, Some(500)));
        }

        async fn a_subscriber_shows_their_opt_ins_by_state_at_now(t) {
            let page = t.page("1").await;
            let now = now_ms();
            t.opt_in(&page, "u", "news", "t1", now).await;
            t.opt_in(&page, "u", "news", "t2", now - OPT_IN_LIFETIME_MS)
                .await;
            let view = get_subscriber(t.db(), &page, &Psid::parse("u").unwrap(), now)
                .await
                .unwrap();
            let news = &view.topics[0];
            assert_eq!(
                news.counts,
                [(OptInState::Active, 1), (OptInState::Expired, 1)].into()
            );
            assert_eq!(news.next_expiry, Some(now + OPT_IN_LIFETIME_MS));
            let nobody = get_subscriber(t.db(), &page, &Psid::parse("v").unwrap(), now).await;
            assert!(matches!(nobody, Err(StoreError::NotFound)));
        }

        async fn tagging_twice_changes_a_subscriber_once(t) {
            let page = t.page("1").await;
            assert_eq!(tag(&t, &page, &["u", "v"], &["x"], &[]).await, 2);
            assert_eq!(tag(&t, &page, &["u", "v"], &["x"], &[]).await, 0);
            assert_eq!(
                tag(&t, &page, &["u"], &["x", "y"], &[]).await,
                1,
                "u gained y"
            );
            assert_eq!(tags_of(&t, &page, "u").await, ["x", "y"]);
        }

        async fn removing_a_tag_twice_changes_a_subscriber_once(t) {
            let page = t.page("1").await;
            tag(&t, &page, &["u"], &["x"], &[]).await;
            assert_eq!(tag(&t, &page, &["u"], &[], &["y"]).await, 0, "u had no y");
            assert_eq!(tag(&t, &page, &["u"], &[], &["x"]).await, 1);
            assert_eq!(tag(&t, &page, &["u"], &[], &["x"]).await, 0);
            assert!(tags_of(&t, &page, "u").await.is_empty());
        }

        /// A CRM may tag users before they write: they become subscribers, outside the window.
        async fn tagging_an_unknown_user_makes_a_subscriber_who_never_interacted(t) {
            let page = t.page("1").await;
            tag(&t, &page, &["u"], &["x"], &[]).await;
            let view = get_subscriber(t.db(), &page, &Psid::parse("u").unwrap(), now_ms())
                .await
                .unwrap();
            assert_eq!(
                (view.last_interaction_at, view.tags),
                (None, vec!["x".to_string()])
            );
        }

        /// Every row about the user goes (their delivery too, the send's counters following),
        /// the review stands without its reviewer's name, and the erasure is remembered.
        async fn erasing_a_subscriber_removes_every_row_about_them_and_remembers_it(t) {
            let page = t.page("1").await;
            let send = t.delivered_send(&page, "news", &["u", "v"]).await;
            tag(&t, &page, &["u"], &["x"], &[]).await;
            let draft = t.draft(&page, "sport", false).await;
            stories::record_review(t.db(), &draft.id, &draft.content_hash, "u", now_ms())
                .await
                .unwrap();
            let erased = erase(&t, &page, "u", Duration::ZERO).await.unwrap();
            assert_eq!(
                erased,
                Erasure {
                    opt_ins: 1,
                    deliveries: 1
                }
            );
            let row = t.send_row(&send.id).await;
            assert_eq!(
                (row.total, row.sent, row.state),
                (1, 1, SendState::Completed)
            );
            let left = t.recipients(&send.id).await;
            assert_eq!(left, ["v"]);
            let review = stories::get(t.db(), &draft.id).await.unwrap();
            assert_eq!(
                (review.reviewer_psid.as_deref(), review.reviewed()),
                (None, true)
            );
            let gone = get_subscriber(t.db(), &page, &Psid::parse("u").unwrap(), now_ms()).await;
            assert!(matches!(gone, Err(StoreError::NotFound)));
            assert!(tombstone(&t, &page, "u").await.is_some());
        }

        /// A second erasure finds nothing left; the tombstone stays (and stays the latest).
        async fn erasing_a_subscriber_twice_finds_nothing_the_second_time(t) {
            let page = t.page("1").await;
            t.opt_in(&page, "u", "news", "t1", now_ms()).await;
            erase(&t, &page, "u", Duration::ZERO).await.unwrap();
            let first = tombstone(&t, &page, "u").await.unwrap();
            let again = erase(&t, &page, "u", Duration::ZERO).await;
            assert!(matches!(again, Err(StoreError::NotFound)), "{again:?}");
            assert!(tombstone(&t, &page, "u").await.unwrap() >= first);
        }

        /// Their opt-in may still be on its way from Facebook: the erasure is remembered even
        /// when the page knew nothing of them yet.
        async fn erasing_a_user_the_page_never_knew_is_not_found_but_remembered(t) {
            let page = t.page("1").await;
            let unknown = erase(&t, &page, "u", Duration::ZERO).await;
            assert!(matches!(unknown, Err(StoreError::NotFound)), "{unknown:?}");
            assert!(tombstone(&t, &page, "u").await.is_some());
            let no_page = erase(&t, &PageId::from_trusted("9".into()), "u", Duration::ZERO).await;
            assert!(matches!(no_page, Err(StoreError::NotFound)), "{no_page:?}");
        }

        /// A message on its way to the user holds the erasure off; given up, the erasure
        /// changed nothing but their pending deliveries, which are held back for good.
        async fn an_erasure_with_a_message_in_flight_holds_back_the_rest_and_erases_nothing(t) {
            let page = t.page("1").await;
            let (waiting, claimed, fence) = t.claimed_send(&page, "sport", &["u"]).await;
            t.record(
                &fence,
                &[answer(&waiting.id, &claimed[0], retry(now_ms(), false))],
            )
            .await;
            let (flying, _, _) = t.claimed_send(&page, "news", &["u"]).await;
            let refused = erase(&t, &page, "u", Duration::ZERO).await;
            assert!(matches!(refused, Err(StoreError::InFlight)), "{refused:?}");
            assert_eq!(
                t.deliveries(&waiting.id).await[0].state,
                DeliveryState::Skipped
            );
            assert_eq!(
                t.deliveries(&flying.id).await[0].state,
                DeliveryState::InFlight
            );
            assert!(
                get_subscriber(t.db(), &page, &Psid::parse("u").unwrap(), now_ms())
                    .await
                    .is_ok()
            );
            assert!(tombstone(&t, &page, "u").await.is_none());
        }

        /// Given time, the erasure waits for the answer in flight, then erases.
        async fn an_erasure_waits_for_the_answer_in_flight_then_erases(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["u"]).await;
            let store = t.store.clone();
            let erasing = tokio::spawn(async move {
                let page = PageId::from_trusted("1".into());
                let digest = erasures::digest(&cipher(), "1", "u");
                let psid = Psid::parse("u").unwrap();
                delete_subscriber(&store.db, &page, &psid, &digest, Duration::from_secs(30)).await
            });
            t.record(&fence, &[answer(&send.id, &claimed[0], sent())])
                .await;
            let erased = erasing.await.unwrap().unwrap();
            assert_eq!(
                erased,
                Erasure {
                    opt_ins: 1,
                    deliveries: 1
                }
            );
            assert!(t.deliveries(&send.id).await.is_empty());
        }

        /// An opt-in ingested while the user is being erased (the webhook on its way when the
        /// erasure came) never outlives the erasure: the two are serialised per page, so the
        /// ingestion either commits first and its opt-in is erased, or reads the tombstone and
        /// drops the event. Raced 20 times; on PostgreSQL without the serialisation an opt-in
        /// was left behind (found by the model checker).
        async fn an_opt_in_ingested_during_an_erasure_never_outlives_it(t) {
            let page = t.page("1").await;
            for round in 0..20 {
                let psid = format!("u{round}");
                let before = now_ms();
                t.opt_in(&page, &psid, "news", &format!("first-{round}"), before).await;
                let ingesting = {
                    let db = t.store.db.clone();
                    let (page, psid) = (page.clone(), psid.clone());
                    tokio::spawn(async move {
                        let event = crate::domain::IncomingEvent {
                            psid: Psid::parse(&psid).unwrap(),
                            at_ms: before,
                            kind: crate::domain::EventKind::OptIn {
                                topic: crate::domain::Topic::parse("news").unwrap(),
                                token: crate::domain::OptInToken::parse(&format!("late-{round}"))
                                    .unwrap(),
                                recurring: None,
                            },
                        };
                        optins::ingest(&db, &cipher(), &[(page, vec![event])]).await
                    })
                };
                let digest = erasures::digest(&cipher(), "1", &psid);
                let user = Psid::parse(&psid).unwrap();
                delete_subscriber(t.db(), &page, &user, &digest, Duration::from_secs(5))
                    .await
                    .unwrap();
                ingesting.await.unwrap().unwrap();
                let left = optins::list(
                    t.db(),
                    &page,
                    &optins::OptInFilter {
                        psid: Some(user),
                        ..Default::default()
                    },
                    None,
                    10,
                    now_ms(),
                )
                .await
                .unwrap();
                assert!(left.is_empty(), "round {round}: {left:?}");
            }
        }

        async fn a_segment_a_story_is_aimed_at_is_not_deleted(t) {
            let page = t.page("1").await;
            let segment = create_segment(t.db(), &page, "fans", &any_of("x"), 1)
                .await
                .unwrap();
            let draft = t.draft(&page, "news", false).await;
            let aim = StoryChanges {
                segment_id: Some(Some(segment.id.as_str())),
                ..Default::default()
            };
            stories::update(t.db(), &draft, &aim, now_ms())
                .await
                .unwrap();
            let refused = delete_segment(t.db(), &segment.id).await;
            assert!(matches!(refused, Err(StoreError::InUse)), "{refused:?}");
            assert_eq!(get_segment(t.db(), &segment.id).await.unwrap(), segment);
        }

        async fn deleting_a_segment_twice_deletes_it_once(t) {
            let page = t.page("1").await;
            let segment = create_segment(t.db(), &page, "fans", &any_of("x"), 1)
                .await
                .unwrap();
            delete_segment(t.db(), &segment.id).await.unwrap();
            let again = delete_segment(t.db(), &segment.id).await;
            assert!(matches!(again, Err(StoreError::NotFound)), "{again:?}");
            assert!(matches!(
                get_segment(t.db(), &segment.id).await,
                Err(StoreError::NotFound)
            ));
        }

        async fn segments_are_listed_by_name_after_the_one_given(t) {
            let page = t.page("1").await;
            for name in ["c", "a", "b"] {
                create_segment(t.db(), &page, name, &any_of("x"), 1)
                    .await
                    .unwrap();
            }
            let names =
                |list: Vec<SegmentRecord>| list.into_iter().map(|s| s.name).collect::<Vec<_>>();
            assert_eq!(
                names(list_segments(t.db(), &page, None, 2).await.unwrap()),
                ["a", "b"]
            );
            assert_eq!(
                names(list_segments(t.db(), &page, Some("b"), 2).await.unwrap()),
                ["c"]
            );
        }
    }
}
