//! Stories, their review, and the estimate of who a send would reach.

use sea_orm::{
    ActiveValue::{NotSet, Set},
    ConnectionTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect,
    entity::prelude::*,
};

use super::{StoreError, eligibility, sql::Sql};
use crate::domain::{PageId, SegmentRule, StoryContent, TokenKind, content_hash};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "stories")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub page_id: String,
    pub topic: String,
    pub content: String,
    pub content_hash: String,
    pub include_window_users: bool,
    /// The kinds of token the audience takes, stored as a list ('' is every kind).
    pub token_kinds: String,
    pub segment_id: Option<String>,
    pub reviewed_hash: Option<String>,
    pub reviewed_at: Option<i64>,
    pub reviewer_psid: Option<String>,
    pub state: String,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

pub const STATE_DRAFT: &str = "draft";
pub const STATE_SENT: &str = "sent";

impl Model {
    /// The kinds of token the audience takes.
    pub fn token_kinds(&self) -> Vec<TokenKind> {
        TokenKind::split(&self.token_kinds)
    }

    /// Reviewed only while the content is exactly what the reviewer saw.
    pub fn reviewed(&self) -> bool {
        self.reviewed_hash.as_deref() == Some(self.content_hash.as_str())
    }

    pub fn story_content(&self) -> Option<StoryContent> {
        serde_json::from_str(&self.content)
            .ok()
            .and_then(|message| StoryContent::from_graph_message(&message))
    }

    /// The Graph message as stored (what sends and previews use).
    pub fn graph_message(&self) -> serde_json::Value {
        serde_json::from_str(&self.content).unwrap_or(serde_json::Value::Null)
    }
}

fn stored_content(content: &StoryContent) -> (String, String) {
    let json = content.to_graph_message().to_string();
    let hash = content_hash(&json);
    (json, hash)
}

pub struct NewStory<'a> {
    pub page_id: &'a PageId,
    pub topic: &'a str,
    pub content: &'a StoryContent,
    pub include_window_users: bool,
    pub token_kinds: &'a [TokenKind],
    pub segment_id: Option<&'a str>,
}

pub async fn create(
    db: &impl ConnectionTrait,
    story: NewStory<'_>,
    now: i64,
) -> Result<Model, StoreError> {
    let (content, hash) = stored_content(story.content);
    let model = Model {
        id: uuid::Uuid::new_v4().to_string(),
        page_id: story.page_id.as_str().to_string(),
        topic: story.topic.to_string(),
        content,
        content_hash: hash,
        include_window_users: story.include_window_users,
        token_kinds: TokenKind::join(story.token_kinds),
        segment_id: story.segment_id.map(str::to_string),
        reviewed_hash: None,
        reviewed_at: None,
        reviewer_psid: None,
        state: STATE_DRAFT.into(),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    Entity::insert(ActiveModel::from(model.clone()))
        .exec_without_returning(db)
        .await?;
    Ok(model)
}

pub async fn get(db: &impl ConnectionTrait, id: &str) -> Result<Model, StoreError> {
    Entity::find_by_id(id.to_string())
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)
}

pub async fn list(
    db: &impl ConnectionTrait,
    page_id: &PageId,
    topic: Option<&str>,
    after_id: Option<&str>,
    limit: u64,
) -> Result<Vec<Model>, StoreError> {
    let mut query = Entity::find()
        .filter(Column::PageId.eq(page_id.as_str()))
        .order_by_asc(Column::Id)
        .limit(limit);
    if let Some(topic) = topic {
        query = query.filter(Column::Topic.eq(topic));
    }
    if let Some(after) = after_id {
        query = query.filter(Column::Id.gt(after));
    }
    Ok(query.all(db).await?)
}

/// The rule of the story's segment, if it is aimed at one (a send freezes it; an estimate
/// applies it).
pub async fn segment_rule(
    db: &impl ConnectionTrait,
    story: &Model,
) -> Result<Option<SegmentRule>, StoreError> {
    match &story.segment_id {
        Some(id) => Ok(Some(super::audience::get_segment(db, id).await?.rule)),
        None => Ok(None),
    }
}

/// What an update changes; `None` keeps a field.
#[derive(Default)]
pub struct StoryChanges<'a> {
    pub topic: Option<&'a str>,
    pub content: Option<&'a StoryContent>,
    pub include_window_users: Option<bool>,
    pub token_kinds: Option<&'a [TokenKind]>,
    /// `Some(None)` removes the segment.
    pub segment_id: Option<Option<&'a str>>,
}

/// Applies changes to the version that was read; `Conflict` when another writer got there first
/// or the story was sent meanwhile.
pub async fn update(
    db: &impl ConnectionTrait,
    current: &Model,
    changes: &StoryChanges<'_>,
    now: i64,
) -> Result<Model, StoreError> {
    let mut model = ActiveModel {
        id: Set(current.id.clone()),
        version: Set(current.version + 1),
        updated_at: Set(now),
        ..Default::default()
    };
    if let Some(topic) = changes.topic {
        model.topic = Set(topic.to_string());
    }
    if let Some(content) = changes.content {
        let (json, hash) = stored_content(content);
        model.content = Set(json);
        model.content_hash = Set(hash);
    }
    if let Some(include) = changes.include_window_users {
        model.include_window_users = Set(include);
    }
    if let Some(kinds) = changes.token_kinds {
        model.token_kinds = Set(TokenKind::join(kinds));
    }
    if let Some(segment) = changes.segment_id {
        model.segment_id = Set(segment.map(str::to_string));
    }
    let result = Entity::update_many()
        .set(model)
        .filter(Column::Id.eq(current.id.as_str()))
        .filter(Column::Version.eq(current.version))
        .filter(Column::State.eq(STATE_DRAFT))
        .exec(db)
        .await?;
    if result.rows_affected == 0 {
        return Err(StoreError::Conflict);
    }
    get(db, &current.id).await
}

pub async fn delete(db: &impl ConnectionTrait, current: &Model) -> Result<(), StoreError> {
    let result = Entity::delete_many()
        .filter(Column::Id.eq(current.id.as_str()))
        .filter(Column::State.eq(STATE_DRAFT))
        .exec(db)
        .await?;
    if result.rows_affected == 0 {
        return Err(StoreError::Conflict);
    }
    Ok(())
}

/// Records a review of the content whose hash the reviewer was sent. `Conflict` when the content
/// changed while the preview was on its way: that review vouches for nothing stored.
pub async fn record_review(
    db: &impl ConnectionTrait,
    story_id: &str,
    reviewed_hash: &str,
    reviewer_psid: &str,
    now: i64,
) -> Result<Model, StoreError> {
    let result = Entity::update_many()
        .set(ActiveModel {
            reviewed_hash: Set(Some(reviewed_hash.to_string())),
            reviewed_at: Set(Some(now)),
            reviewer_psid: Set(Some(reviewer_psid.to_string())),
            updated_at: Set(now),
            id: NotSet,
            ..Default::default()
        })
        .filter(Column::Id.eq(story_id))
        .filter(Column::ContentHash.eq(reviewed_hash))
        .exec(db)
        .await?;
    if result.rows_affected == 0 {
        return Err(StoreError::Conflict);
    }
    get(db, story_id).await
}

/// Who a send of the story would reach now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AudienceEstimate {
    pub token_recipients: u64,
    pub window_recipients: u64,
    pub excluded_expired: u64,
    pub excluded_by_segment: u64,
    /// Of `token_recipients`, those reached by a one-time token (the rest by a recurring one).
    pub one_time_recipients: u64,
    /// Of those reached by a recurring token, the ones the cooldown holds back now.
    pub recurring_in_cooldown: u64,
}

#[derive(FromQueryResult)]
struct TopicCounts {
    usable: i64,
    with_any: i64,
}

#[derive(FromQueryResult)]
struct Count {
    n: i64,
}

/// Who a send of the story would reach now, by the very conditions a send materialises with
/// (`eligibility`): distinct users with a usable opt-in on the topic (after the segment), users
/// inside the window without one, users whose opt-ins on the topic all lapsed (or will before
/// they could be presented), and users the segment leaves out.
pub async fn estimate(
    db: &impl ConnectionTrait,
    story: &Model,
    segment: Option<&SegmentRule>,
    recurring_cooldown_ms: i64,
    now: i64,
) -> Result<AudienceEstimate, StoreError> {
    estimate_counting(db, story, segment, Some(recurring_cooldown_ms), now).await
}

/// Who a send of the story would reach now, without the split by kind of token (StartSend's
/// count of its audience: two queries fewer).
pub async fn estimate_total(
    db: &impl ConnectionTrait,
    story: &Model,
    segment: Option<&SegmentRule>,
    now: i64,
) -> Result<AudienceEstimate, StoreError> {
    estimate_counting(db, story, segment, None, now).await
}

/// The estimate; split by kind (with the cooldown counted) when a cooldown is given.
async fn estimate_counting(
    db: &impl ConnectionTrait,
    story: &Model,
    segment: Option<&SegmentRule>,
    by_kind: Option<i64>,
    now: i64,
) -> Result<AudienceEstimate, StoreError> {
    let backend = db.get_database_backend();
    let page = story.page_id.as_str();
    let kinds = story.token_kinds();
    let aim = eligibility::Aim {
        page_id: page,
        topic: story.topic.as_str(),
        kinds: &kinds,
    };
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let count = |sql: Sql| async move {
        Count::find_by_statement(sql.statement())
            .one(db)
            .await
            .map(|row| row.map_or(0, |r| n(r.n)))
    };
    let segmented = |sql: &mut Sql, column: &str| {
        if let Some(rule) = segment {
            sql.push(" AND ");
            eligibility::in_segment(sql, column, page, rule);
        }
    };

    // A user with an active or expired opt-in on the topic has a usable one or only lapsed
    // ones: those with any, less the usable, are those whose opt-ins all lapsed.
    let mut totals = Sql::new(backend);
    totals.push("SELECT (SELECT COUNT(DISTINCT o.psid) FROM optins o WHERE ");
    eligibility::usable_optin(&mut totals, "o", aim, now);
    totals
        .push(") AS usable, (SELECT COUNT(DISTINCT o.psid) FROM optins o WHERE o.page_id = ")
        .bind(page)
        .push(" AND o.topic = ")
        .bind(aim.topic)
        .push(" AND o.state IN ('active', 'expired')) AS with_any");
    let counts = TopicCounts::find_by_statement(totals.statement())
        .one(db)
        .await?
        .ok_or_else(|| StoreError::Db(DbErr::Custom("the estimate returned no row".into())))?;
    let usable = n(counts.usable);

    let token_recipients = match segment {
        None => usable,
        Some(_) => {
            let mut sql = Sql::new(backend);
            sql.push("SELECT COUNT(DISTINCT o.psid) AS n FROM optins o WHERE ");
            eligibility::usable_optin(&mut sql, "o", aim, now);
            segmented(&mut sql, "o.psid");
            count(sql).await?
        }
    };

    // A user holding both kinds is reached by the one-time token (see `materialize`).
    let one_time = eligibility::Aim {
        kinds: &[TokenKind::OneTime],
        ..aim
    };
    let one_time_recipients = if by_kind.is_some() && kinds.contains(&TokenKind::OneTime) {
        let mut sql = Sql::new(backend);
        sql.push("SELECT COUNT(DISTINCT o.psid) AS n FROM optins o WHERE ");
        eligibility::usable_optin(&mut sql, "o", one_time, now);
        segmented(&mut sql, "o.psid");
        count(sql).await?
    } else {
        0
    };
    let recurring_in_cooldown = if let (Some(recurring_cooldown_ms), true) =
        (by_kind, kinds.contains(&TokenKind::Recurring))
    {
        let mut sql = Sql::new(backend);
        sql.push("SELECT COUNT(DISTINCT o.psid) AS n FROM optins o WHERE ");
        let recurring = eligibility::Aim {
            kinds: &[TokenKind::Recurring],
            ..aim
        };
        eligibility::usable_optin(&mut sql, "o", recurring, now);
        if kinds.contains(&TokenKind::OneTime) {
            sql.push(" AND NOT EXISTS (SELECT 1 FROM optins u WHERE u.psid = o.psid AND ");
            eligibility::usable_optin(&mut sql, "u", one_time, now);
            sql.push(")");
        }
        sql.push(" AND ");
        eligibility::in_cooldown(&mut sql, "o.psid", page, recurring_cooldown_ms, now);
        segmented(&mut sql, "o.psid");
        count(sql).await?
    } else {
        0
    };

    let window_recipients = if story.include_window_users {
        let mut sql = Sql::new(backend);
        sql.push("SELECT COUNT(*) AS n FROM subscribers s WHERE ");
        eligibility::window_user(&mut sql, "s", aim, now);
        segmented(&mut sql, "s.psid");
        count(sql).await?
    } else {
        0
    };

    Ok(AudienceEstimate {
        token_recipients,
        window_recipients,
        excluded_expired: n(counts.with_any).saturating_sub(usable),
        excluded_by_segment: usable.saturating_sub(token_recipients),
        one_time_recipients,
        recurring_in_cooldown,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{
        domain::{OPT_IN_LIFETIME_MS, Psid, Tag},
        store::{
            audience, now_ms,
            testing::{TestStore, store_tests},
        },
    };

    const COOLDOWN: i64 = 48 * 3_600_000;

    fn retopic(topic: &str) -> StoryChanges<'_> {
        StoryChanges {
            topic: Some(topic),
            ..Default::default()
        }
    }

    async fn tag(t: &TestStore, page: &PageId, psid: &str) {
        let psids = BTreeSet::from([Psid::parse(psid).unwrap()]);
        let add = BTreeSet::from([Tag::parse("x").unwrap()]);
        audience::tag_subscribers(t.db(), page, &psids, &add, &BTreeSet::new(), now_ms())
            .await
            .unwrap();
    }

    store_tests! {
        /// An edit applies to the version it was made on: a second edit from the same read
        /// (another writer's, or a retry) conflicts and leaves the first one's.
        async fn an_update_from_a_version_already_updated_conflicts(t) {
            let page = t.page("1").await;
            let read = t.draft(&page, "news", false).await;
            let updated = update(t.db(), &read, &retopic("sport"), now_ms())
                .await
                .unwrap();
            assert_eq!((updated.version, updated.topic.as_str()), (2, "sport"));
            let again = update(t.db(), &read, &retopic("weather"), now_ms()).await;
            assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
            assert_eq!(get(t.db(), &read.id).await.unwrap(), updated);
        }

        /// A story a send was started from is what was sent: it neither changes nor goes.
        async fn a_sent_story_is_neither_updated_nor_deleted(t) {
            let page = t.page("1").await;
            let story = t.story(&page, "news", false).await;
            t.start(&story, "r1").await.unwrap();
            let sent = get(t.db(), &story.id).await.unwrap();
            assert_eq!(sent.state, STATE_SENT);
            let edit = update(t.db(), &sent, &retopic("sport"), now_ms()).await;
            assert!(matches!(edit, Err(StoreError::Conflict)), "{edit:?}");
            assert!(matches!(
                delete(t.db(), &sent).await,
                Err(StoreError::Conflict)
            ));
            assert_eq!(get(t.db(), &story.id).await.unwrap(), sent);
        }

        async fn deleting_a_draft_twice_deletes_it_once(t) {
            let page = t.page("1").await;
            let draft = t.draft(&page, "news", false).await;
            delete(t.db(), &draft).await.unwrap();
            assert!(matches!(
                delete(t.db(), &draft).await,
                Err(StoreError::Conflict)
            ));
            assert!(matches!(
                get(t.db(), &draft.id).await,
                Err(StoreError::NotFound)
            ));
        }

        /// The reviewer saw the content whose hash came back: if it changed meanwhile, the
        /// review vouches for nothing stored.
        async fn a_review_of_content_that_changed_since_is_refused(t) {
            let page = t.page("1").await;
            let draft = t.draft(&page, "news", false).await;
            let content = StoryContent::Text("Changed".into());
            let edit = StoryChanges {
                content: Some(&content),
                ..Default::default()
            };
            let edited = update(t.db(), &draft, &edit, now_ms()).await.unwrap();
            let late = record_review(t.db(), &draft.id, &draft.content_hash, "r", now_ms()).await;
            assert!(matches!(late, Err(StoreError::Conflict)), "{late:?}");
            let stored = get(t.db(), &draft.id).await.unwrap();
            assert_eq!((stored.reviewed_at, stored.reviewed()), (None, false));
            assert_eq!(stored, edited);
        }

        /// A review recorded twice (a retried webhook) still vouches for the same content.
        async fn a_review_recorded_twice_stands(t) {
            let page = t.page("1").await;
            let draft = t.draft(&page, "news", false).await;
            record_review(t.db(), &draft.id, &draft.content_hash, "r", 10)
                .await
                .unwrap();
            let again = record_review(t.db(), &draft.id, &draft.content_hash, "r", 20)
                .await
                .unwrap();
            assert!(again.reviewed());
            assert_eq!(
                (again.version, again.reviewer_psid.as_deref()),
                (1, Some("r"))
            );
        }

        /// Reviewed holds while the content is the one reviewed: an edit of the content
        /// (not of the topic) takes it away.
        async fn an_edit_of_the_content_takes_the_review_away(t) {
            let page = t.page("1").await;
            let story = t.story(&page, "news", false).await;
            assert!(story.reviewed());
            let story = update(t.db(), &story, &retopic("sport"), now_ms())
                .await
                .unwrap();
            assert!(story.reviewed());
            let content = StoryContent::Text("Changed".into());
            let edit = StoryChanges {
                content: Some(&content),
                ..Default::default()
            };
            assert!(
                !update(t.db(), &story, &edit, now_ms())
                    .await
                    .unwrap()
                    .reviewed()
            );
        }

        async fn a_story_aimed_at_no_segment_has_no_rule(t) {
            let page = t.page("1").await;
            let draft = t.draft(&page, "news", false).await;
            assert_eq!(segment_rule(t.db(), &draft).await.unwrap(), None);
            let rule = SegmentRule {
                any_tags: ["x".to_string()].into(),
                ..Default::default()
            };
            let segment = audience::create_segment(t.db(), &page, "s", &rule, 1)
                .await
                .unwrap();
            let aim = StoryChanges {
                segment_id: Some(Some(segment.id.as_str())),
                ..Default::default()
            };
            let aimed = update(t.db(), &draft, &aim, now_ms()).await.unwrap();
            assert_eq!(segment_rule(t.db(), &aimed).await.unwrap(), Some(rule));
        }

        /// By token: a (usable) and c, of whom the segment keeps a; b's only opt-in lapsed; w
        /// wrote today without one.
        async fn the_estimate_counts_whom_a_send_would_reach_and_why_others_are_left_out(t) {
            let page = t.page("1").await;
            let now = now_ms();
            t.opt_in(&page, "a", "news", "t-a", now).await;
            t.opt_in(&page, "a", "news", "t-a2", now).await;
            t.opt_in(&page, "b", "news", "t-b", now - OPT_IN_LIFETIME_MS - 1)
                .await;
            t.opt_in(&page, "c", "news", "t-c", now).await;
            t.interaction(&page, "w", now).await;
            for psid in ["a", "w"] {
                tag(&t, &page, psid).await;
            }
            let story = t.draft(&page, "news", true).await;
            let everyone = estimate(t.db(), &story, None, COOLDOWN, now).await.unwrap();
            // a and c are in the window too, but reached by token.
            let expected = AudienceEstimate {
                token_recipients: 2,
                window_recipients: 1,
                excluded_expired: 1,
                excluded_by_segment: 0,
                one_time_recipients: 2,
                recurring_in_cooldown: 0,
            };
            assert_eq!(everyone, expected);
            let rule = SegmentRule {
                any_tags: ["x".to_string()].into(),
                ..Default::default()
            };
            let tagged = estimate(t.db(), &story, Some(&rule), COOLDOWN, now).await.unwrap();
            assert_eq!(
                tagged,
                AudienceEstimate {
                    token_recipients: 1,
                    excluded_by_segment: 1,
                    one_time_recipients: 1,
                    ..expected
                }
            );
            let token_only = t.draft(&page, "news", false).await;
            assert_eq!(
                estimate(t.db(), &token_only, None, COOLDOWN, now)
                    .await
                    .unwrap()
                    .window_recipients,
                0
            );
        }
    }
}
