//! A send's own life: started (idempotent on the request id), run, paused, resumed, halted,
//! cancelled and completed, each one event of `SendEvent` as one conditional statement.

use sea_orm::{
    Condition, ConnectionTrait, DatabaseConnection, DatabaseTransaction, FromQueryResult,
    QueryFilter, QueryOrder, QuerySelect, entity::prelude::*, sea_query::OnConflict,
};

use super::{
    CounterDelta, PHASE_DONE, PHASE_TOKEN, Send, SendChange, delivery, end_pending, send,
    unfinished, update_send,
};
use crate::{
    domain::{DeliveryState, SegmentRule, SendEvent, SendState},
    store::{StoreError, begin_write, sql::Sql, stories},
};

/// What StartSend freezes into the send.
pub struct NewSend<'a> {
    pub story: &'a stories::Model,
    pub request_id: &'a str,
    pub segment: Option<&'a SegmentRule>,
    /// Sends allowed queued or running at once, this one included.
    pub max_active: u64,
}

pub enum Started {
    Created(Send),
    /// The request id was used before; this is its send (maybe of another story).
    Existing(Send),
    /// Already `active` sends are queued or running, as many as allowed: nothing was written.
    Shed {
        active: u64,
    },
}

/// Creates the send (queued) and locks the story, in one transaction; or returns the send this
/// request id already made.
pub async fn start(
    txn: &DatabaseTransaction,
    new: NewSend<'_>,
    now: i64,
) -> Result<Started, StoreError> {
    let story = new.story;
    let model = Send {
        id: uuid::Uuid::new_v4().to_string(),
        story_id: story.id.clone(),
        page_id: story.page_id.clone(),
        request_id: new.request_id.to_string(),
        state: SendState::Queued,
        topic: story.topic.clone(),
        message: story.content.clone(),
        include_window_users: story.include_window_users,
        segment_rule: new
            .segment
            .map(|rule| serde_json::to_string(rule).expect("a segment rule serialises")),
        audience_phase: PHASE_TOKEN.into(),
        audience_cursor: String::new(),
        total: 0,
        in_flight: 0,
        sent: 0,
        failed: 0,
        skipped: 0,
        unknown: 0,
        last_error: String::new(),
        created_at: now,
        started_at: None,
        finished_at: None,
        updated_at: now,
    };
    let existing = || async move {
        send::Entity::find()
            .filter(send::Column::RequestId.eq(new.request_id))
            .one(txn)
            .await
    };
    // Counted in the transaction that adds the send: on SQLite (one writer) the bound is exact;
    // on PostgreSQL concurrent starts may overshoot it by the few racing with this one.
    let active = send::Entity::find()
        .filter(send::Column::State.is_in([SendState::Queued, SendState::Running]))
        .count(txn)
        .await?;
    if active >= new.max_active {
        let found = existing().await?;
        return Ok(match found {
            Some(send) => Started::Existing(send),
            None => Started::Shed { active },
        });
    }
    // No send starts on a page being deleted (see `pages::delete`), nor for a story deleted
    // meanwhile: the send's foreign keys check both rows in this statement (on PostgreSQL
    // with a share lock on each that `pages::delete`'s lock waits for).
    let inserted = send::Entity::insert(send::ActiveModel::from(model.clone()))
        .on_conflict(
            OnConflict::column(send::Column::RequestId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await
        .map_err(|err| match StoreError::from(err) {
            StoreError::InUse => StoreError::NotFound,
            other => other,
        })?;
    if inserted == 0 {
        let found = existing().await?.ok_or(StoreError::Conflict)?;
        return Ok(Started::Existing(found));
    }
    // The story is locked from here on: what was reviewed is what is sent.
    let locked = stories::Entity::update_many()
        .col_expr(
            stories::Column::State,
            Expr::value(stories::STATE_SENT.to_string()),
        )
        .col_expr(stories::Column::UpdatedAt, Expr::value(now))
        .filter(stories::Column::Id.eq(story.id.as_str()))
        .filter(stories::Column::ContentHash.eq(story.content_hash.as_str()))
        .exec(txn)
        .await?;
    if locked.rows_affected == 0 {
        // Edited (or deleted) since it was read: its review no longer holds.
        return Err(StoreError::Conflict);
    }
    Ok(Started::Created(model))
}

pub async fn find_by_request_id(
    db: &impl ConnectionTrait,
    request_id: &str,
) -> Result<Option<Send>, StoreError> {
    Ok(send::Entity::find()
        .filter(send::Column::RequestId.eq(request_id))
        .one(db)
        .await?)
}

pub async fn get(db: &impl ConnectionTrait, id: &str) -> Result<Send, StoreError> {
    send::Entity::find_by_id(id.to_string())
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)
}

pub struct SendFilter<'a> {
    pub page_id: &'a str,
    pub story_id: Option<&'a str>,
    pub state: Option<SendState>,
}

pub async fn list(
    db: &impl ConnectionTrait,
    filter: SendFilter<'_>,
    after_id: Option<&str>,
    limit: u64,
) -> Result<Vec<Send>, StoreError> {
    let mut query = send::Entity::find()
        .filter(send::Column::PageId.eq(filter.page_id))
        .order_by_asc(send::Column::Id)
        .limit(limit);
    if let Some(story) = filter.story_id {
        query = query.filter(send::Column::StoryId.eq(story));
    }
    if let Some(state) = filter.state {
        query = query.filter(send::Column::State.eq(state));
    }
    if let Some(after) = after_id {
        query = query.filter(send::Column::Id.gt(after));
    }
    Ok(query.all(db).await?)
}

pub async fn list_deliveries(
    db: &impl ConnectionTrait,
    send_id: &str,
    state: Option<DeliveryState>,
    after_id: Option<i64>,
    limit: u64,
) -> Result<Vec<delivery::Model>, StoreError> {
    let mut query = delivery::Entity::find()
        .filter(delivery::Column::SendId.eq(send_id))
        .order_by_asc(delivery::Column::Id)
        .limit(limit);
    if let Some(state) = state {
        query = query.filter(delivery::Column::State.eq(state));
    }
    if let Some(after) = after_id {
        query = query.filter(delivery::Column::Id.gt(after));
    }
    Ok(query.all(db).await?)
}

/// Pages with work for an engine that starts: sends to run, or deliveries left in flight.
pub async fn pages_with_work(db: &impl ConnectionTrait) -> Result<Vec<String>, StoreError> {
    let rows = send::Entity::find()
        .select_only()
        .column(send::Column::PageId)
        .filter(
            Condition::any()
                .add(send::Column::State.is_in([SendState::Queued, SendState::Running]))
                .add(send::Column::InFlight.gt(0)),
        )
        .distinct()
        .into_tuple::<String>()
        .all(db)
        .await?;
    Ok(rows)
}

/// The page's sends that may still need the page actor (unfinished, or with deliveries in
/// flight), oldest first.
pub async fn page_sends(db: &impl ConnectionTrait, page_id: &str) -> Result<Vec<Send>, StoreError> {
    Ok(send::Entity::find()
        .filter(send::Column::PageId.eq(page_id))
        .filter(
            Condition::any()
                .add(send::Column::State.is_in(unfinished()))
                .add(send::Column::InFlight.gt(0)),
        )
        .order_by_asc(send::Column::CreatedAt)
        .all(db)
        .await?)
}

/// The send's `event` (run, pause, resume) as one conditional statement; `Conflict` when the
/// send is in none of the states the event leaves. `last_error` replaces the send's when given.
pub async fn apply(
    db: &impl ConnectionTrait,
    send_id: &str,
    event: SendEvent,
    last_error: Option<&str>,
    now: i64,
) -> Result<Send, StoreError> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("UPDATE sends SET state = ")
        .bind(event.target())
        .push(", updated_at = ")
        .bind(now);
    if let Some(error) = last_error {
        sql.push(", last_error = ").bind(error);
    }
    if event.target() == SendState::Running {
        sql.push(", started_at = COALESCE(started_at, ")
            .bind(now)
            .push(")");
    }
    if event.target().is_finished() {
        // A finished send materialises nobody else.
        sql.push(", finished_at = ")
            .bind(now)
            .push(", audience_phase = ")
            .bind(PHASE_DONE);
    }
    sql.push(" WHERE id = ").bind(send_id);
    guard(&mut sql, event);
    sql.push(" RETURNING *");
    match Send::find_by_statement(sql.statement()).one(db).await? {
        Some(send) => Ok(send),
        None => match get(db, send_id).await {
            Ok(_) => Err(StoreError::Conflict),
            Err(err) => Err(err),
        },
    }
}

/// ` AND state IN (<the states a send event leaves>)`.
fn guard(sql: &mut Sql, event: SendEvent) {
    sql.push(" AND ");
    guard_condition(sql, event);
}

/// `state IN (<the states a send event leaves>)`.
pub(super) fn guard_condition(sql: &mut Sql, event: SendEvent) {
    let sources = crate::store::stored::quoted(&event.sources(), SendState::as_str);
    sql.push(&format!("state IN ({sources})"));
}

/// Every delivery of the send ended, once `delta` is applied to its counters (and its audience
/// is in `phase` when given, else as the row has it): the audience is materialised, nothing is
/// in flight, and everything counted has ended.
pub(super) fn done_condition(sql: &mut Sql, phase: Option<&str>, delta: CounterDelta) {
    match phase {
        Some(phase) => sql.push(if phase == PHASE_DONE { "TRUE" } else { "FALSE" }),
        None => sql.push("audience_phase = ").bind(PHASE_DONE),
    };
    sql.push(" AND in_flight + ")
        .bind(delta.in_flight)
        .push(" = 0 AND total + ")
        .bind(delta.total)
        .push(" = sent + ")
        .bind(delta.sent)
        .push(" + failed + ")
        .bind(delta.failed)
        .push(" + skipped + ")
        .bind(delta.skipped)
        .push(" + unknown + ")
        .bind(delta.unknown);
}

/// Every send of the page that can halt halts with `reason`: the page cannot send.
pub async fn halt_page(
    db: &impl ConnectionTrait,
    page_id: &str,
    reason: &str,
    now: i64,
) -> Result<(), StoreError> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("UPDATE sends SET state = ")
        .bind(SendEvent::Halt.target())
        .push(", last_error = ")
        .bind(reason)
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE page_id = ")
        .bind(page_id);
    guard(&mut sql, SendEvent::Halt);
    db.execute_raw(sql.statement()).await?;
    Ok(())
}

/// A running send whose audience is materialised and whose every delivery ended: completed.
/// Returns the completed row, or `None` when the send is not done (or not running).
pub async fn complete_if_done(
    db: &impl ConnectionTrait,
    send_id: &str,
    now: i64,
) -> Result<Option<Send>, StoreError> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("UPDATE sends SET state = ")
        .bind(SendEvent::Complete.target())
        .push(", finished_at = ")
        .bind(now)
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE id = ")
        .bind(send_id);
    guard(&mut sql, SendEvent::Complete);
    sql.push(" AND ");
    done_condition(&mut sql, None, CounterDelta::default());
    sql.push(" RETURNING *");
    Ok(Send::find_by_statement(sql.statement()).one(db).await?)
}

/// Cancels the send, from any instance. In one transaction that starts by moving (and so
/// locking) the send's row: pending deliveries no attempt of which can have landed are skipped
/// and their opt-ins released for a later send; pending ones whose earlier attempt may have
/// landed are `unknown` and their tokens spent (never presented again). Deliveries in flight
/// finish, and are recorded as the cancelled send's (see `record`).
pub async fn cancel(db: &DatabaseConnection, send_id: &str, now: i64) -> Result<Send, StoreError> {
    let txn = begin_write(db).await?;
    apply(&txn, send_id, SendEvent::Cancel, None, now).await?;
    let delta = end_pending(&txn, send_id, "the send was cancelled", now, |_| {}).await?;
    let send = update_send(&txn, send_id, SendChange::counters(delta), now)
        .await?
        .ok_or(StoreError::NotFound)?;
    txn.commit().await?;
    Ok(send)
}
