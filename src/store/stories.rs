//! Stories, their review, and the estimate of who a send would reach.

use sea_orm::{
    ActiveValue::{NotSet, Set},
    ConnectionTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect,
    entity::prelude::*,
};

use super::{StoreError, eligibility, sql::Sql};
use crate::domain::{PageId, SegmentRule, StoryContent, content_hash};

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
    now: i64,
) -> Result<AudienceEstimate, StoreError> {
    let backend = db.get_database_backend();
    let page = story.page_id.as_str();
    let topic = story.topic.as_str();
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let count = |sql: Sql| async move {
        Count::find_by_statement(sql.statement())
            .one(db)
            .await
            .map(|row| row.map_or(0, |r| n(r.n)))
    };

    // A user with an active or expired opt-in on the topic has a usable one or only lapsed
    // ones: those with any, less the usable, are those whose opt-ins all lapsed.
    let mut totals = Sql::new(backend);
    totals.push("SELECT (SELECT COUNT(DISTINCT o.psid) FROM optins o WHERE ");
    eligibility::usable_optin(&mut totals, "o", page, topic, now);
    totals
        .push(") AS usable, (SELECT COUNT(DISTINCT o.psid) FROM optins o WHERE o.page_id = ")
        .bind(page)
        .push(" AND o.topic = ")
        .bind(topic)
        .push(" AND o.state IN ('active', 'expired')) AS with_any");
    let counts = TopicCounts::find_by_statement(totals.statement())
        .one(db)
        .await?
        .ok_or_else(|| StoreError::Db(DbErr::Custom("the estimate returned no row".into())))?;
    let usable = n(counts.usable);

    let token_recipients = match segment {
        None => usable,
        Some(rule) => {
            let mut sql = Sql::new(backend);
            sql.push("SELECT COUNT(DISTINCT o.psid) AS n FROM optins o WHERE ");
            eligibility::usable_optin(&mut sql, "o", page, topic, now);
            sql.push(" AND ");
            eligibility::in_segment(&mut sql, "o.psid", page, rule);
            count(sql).await?
        }
    };

    let window_recipients = if story.include_window_users {
        let mut sql = Sql::new(backend);
        sql.push("SELECT COUNT(*) AS n FROM subscribers s WHERE ");
        eligibility::window_user(&mut sql, "s", page, topic, now);
        if let Some(rule) = segment {
            sql.push(" AND ");
            eligibility::in_segment(&mut sql, "s.psid", page, rule);
        }
        count(sql).await?
    } else {
        0
    };

    Ok(AudienceEstimate {
        token_recipients,
        window_recipients,
        excluded_expired: n(counts.with_any).saturating_sub(usable),
        excluded_by_segment: usable.saturating_sub(token_recipients),
    })
}
