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
    /// The audience as estimated when the send starts (see `Send::expected_total`).
    pub expected: u64,
    /// The recurring cooldown in force (see `Send::recurring_cooldown_ms`).
    pub recurring_cooldown_ms: i64,
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
        token_kinds: story.token_kinds.clone(),
        recurring_cooldown_ms: new.recurring_cooldown_ms,
        segment_rule: new
            .segment
            .map(|rule| serde_json::to_string(rule).expect("a segment rule serialises")),
        audience_phase: PHASE_TOKEN.into(),
        audience_cursor: String::new(),
        total: 0,
        expected_total: i64::try_from(new.expected).unwrap_or(i64::MAX),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{OptInState, PageId},
        store::{
            now_ms,
            testing::{TestStore, answer, retry, store_tests},
        },
    };

    async fn start_with(
        t: &TestStore,
        story: &stories::Model,
        request_id: &str,
        max_active: u64,
    ) -> Result<Started, StoreError> {
        t.txn(async |txn| {
            let new = NewSend {
                story,
                request_id,
                segment: None,
                max_active,
                expected: 0,
                recurring_cooldown_ms: 48 * 3_600_000,
            };
            start(txn, new, now_ms()).await
        })
        .await
    }

    async fn sends_of(t: &TestStore, page: &PageId) -> Vec<Send> {
        let filter = SendFilter {
            page_id: page.as_str(),
            story_id: None,
            state: None,
        };
        list(t.db(), filter, None, 100).await.unwrap()
    }

    #[test]
    fn done_is_judged_on_the_counters_as_the_change_leaves_them() {
        let sql_of = |phase: Option<&str>| {
            let mut sql = Sql::new(sea_orm::DatabaseBackend::Postgres);
            done_condition(
                &mut sql,
                phase,
                CounterDelta {
                    in_flight: -1,
                    sent: 1,
                    ..Default::default()
                },
            );
            sql.statement()
        };
        let after = " AND in_flight + $1 = 0 \
                     AND total + $2 = sent + $3 + failed + $4 + skipped + $5 + unknown + $6";
        assert_eq!(sql_of(Some(PHASE_DONE)).sql, format!("TRUE{after}"));
        assert_eq!(sql_of(Some(PHASE_TOKEN)).sql, format!("FALSE{after}"));
        let stored = sql_of(None);
        assert!(
            stored
                .sql
                .starts_with("audience_phase = $1 AND in_flight + $2 = 0"),
            "{}",
            stored.sql
        );
        assert_eq!(stored.values.unwrap().0[1], sea_orm::Value::from(-1_i64));
    }

    store_tests! {
        /// A retried StartSend answers with the send its first call made, and makes no other.
        async fn starting_twice_with_one_request_id_makes_one_send(t) {
            let page = t.page("1").await;
            let story = t.story(&page, "news", false).await;
            let Ok(Started::Created(created)) = t.start(&story, "r1").await else {
                panic!("created")
            };
            let Ok(Started::Existing(existing)) = t.start(&story, "r1").await else {
                panic!("existing")
            };
            assert_eq!(existing, created);
            assert_eq!(sends_of(&t, &page).await, [created]);
            assert_eq!(
                stories::get(t.db(), &story.id).await.unwrap().state,
                stories::STATE_SENT
            );
        }

        /// At the bound a new request is shed with nothing written, but a known request id is
        /// still answered with its send.
        async fn a_send_past_the_bound_is_shed_and_writes_nothing(t) {
            let page = t.page("1").await;
            let first = t.story(&page, "news", false).await;
            let Ok(Started::Created(queued)) = start_with(&t, &first, "r1", 1).await else {
                panic!("created")
            };
            let second = t.story(&page, "sport", false).await;
            let shed = start_with(&t, &second, "r2", 1).await;
            assert!(matches!(shed, Ok(Started::Shed { active: 1 })));
            assert_eq!(find_by_request_id(t.db(), "r2").await.unwrap(), None);
            assert_eq!(
                stories::get(t.db(), &second.id).await.unwrap().state,
                stories::STATE_DRAFT
            );
            let known = start_with(&t, &first, "r1", 1).await;
            assert!(matches!(known, Ok(Started::Existing(send)) if send == queued));
        }

        /// The send is of the content that was reviewed: a story edited since it was read is
        /// not started, and the transaction leaves no send behind.
        async fn a_story_edited_since_it_was_read_is_not_started(t) {
            let page = t.page("1").await;
            let read = t.story(&page, "news", false).await;
            let content = crate::domain::StoryContent::Text("Edited".into());
            let edit = stories::StoryChanges {
                content: Some(&content),
                ..Default::default()
            };
            stories::update(t.db(), &read, &edit, now_ms())
                .await
                .unwrap();
            let refused = t.start(&read, "r1").await;
            assert!(
                matches!(refused, Err(StoreError::Conflict)),
                "{:?}",
                refused.err()
            );
            assert_eq!(find_by_request_id(t.db(), "r1").await.unwrap(), None);
            assert_eq!(
                stories::get(t.db(), &read.id).await.unwrap().state,
                stories::STATE_DRAFT
            );
        }

        async fn a_story_deleted_since_it_was_read_is_not_found(t) {
            let page = t.page("1").await;
            let read = t.story(&page, "news", false).await;
            stories::delete(t.db(), &read).await.unwrap();
            let refused = t.start(&read, "r1").await;
            assert!(
                matches!(refused, Err(StoreError::NotFound)),
                "{:?}",
                refused.err()
            );
            assert!(sends_of(&t, &page).await.is_empty());
        }

        /// Every event from every state: it moves the send from the states the table says it
        /// leaves, and from any other answers Conflict with the row unchanged.
        async fn each_event_moves_a_send_only_from_the_states_it_leaves(t) {
            let page = t.page("1").await;
            for (i, from) in SendState::ALL.iter().enumerate() {
                for event in [
                    SendEvent::Run,
                    SendEvent::Pause,
                    SendEvent::Resume,
                    SendEvent::Halt,
                    SendEvent::Cancel,
                ] {
                    // Each its own topic: a completed send must find nobody to reach.
                    let send = t
                        .send_in(&page, &format!("t{i}-{}", event.as_str()), *from)
                        .await;
                    let moved = apply(t.db(), &send.id, event, None, now_ms()).await;
                    match from.on(event) {
                        Ok(to) => {
                            assert_eq!(moved.unwrap().state, to, "{from} --{}-->", event.as_str())
                        }
                        Err(_) => {
                            assert!(
                                matches!(moved, Err(StoreError::Conflict)),
                                "{from} --{}-->",
                                event.as_str()
                            );
                            assert_eq!(t.send_row(&send.id).await, send);
                        }
                    }
                }
            }
        }

        async fn pausing_twice_pauses_once(t) {
            let page = t.page("1").await;
            let send = t.send_in(&page, "news", SendState::Running).await;
            let paused = apply(t.db(), &send.id, SendEvent::Pause, None, now_ms())
                .await
                .unwrap();
            let again = apply(t.db(), &send.id, SendEvent::Pause, None, now_ms() + 1).await;
            assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
            assert_eq!(t.send_row(&send.id).await, paused);
        }

        async fn an_event_for_a_send_that_does_not_exist_is_not_found(t) {
            let missing = apply(t.db(), "nope", SendEvent::Pause, None, now_ms()).await;
            assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
        }

        /// A send resumed keeps when it first started; an error given replaces the last one.
        async fn resuming_keeps_the_first_start_and_sets_the_error_given(t) {
            let page = t.page("1").await;
            let send = t.send(&page, "news").await;
            let run = apply(t.db(), &send.id, SendEvent::Run, None, 100)
                .await
                .unwrap();
            apply(
                t.db(),
                &send.id,
                SendEvent::Halt,
                Some("token expired"),
                200,
            )
            .await
            .unwrap();
            let resumed = apply(t.db(), &send.id, SendEvent::Resume, None, 300)
                .await
                .unwrap();
            assert_eq!(run.started_at, Some(100));
            assert_eq!(
                (resumed.started_at, resumed.last_error.as_str()),
                (Some(100), "token expired")
            );
        }

        /// Only the page's sends that can halt (queued, running) halt, once.
        async fn halting_a_page_halts_its_queued_and_running_sends_once(t) {
            let (page, other) = (t.page("1").await, t.page("2").await);
            let queued = t.send_in(&page, "q", SendState::Queued).await;
            let running = t.send_in(&page, "r", SendState::Running).await;
            let paused = t.send_in(&page, "p", SendState::Paused).await;
            let elsewhere = t.send_in(&other, "r", SendState::Running).await;
            halt_page(t.db(), page.as_str(), "restricted", now_ms())
                .await
                .unwrap();
            let halted = t.send_row(&queued.id).await;
            assert_eq!(
                (halted.state, halted.last_error.as_str()),
                (SendState::Halted, "restricted")
            );
            assert_eq!(t.send_row(&running.id).await.state, SendState::Halted);
            assert_eq!(t.send_row(&paused.id).await, paused);
            assert_eq!(t.send_row(&elsewhere.id).await, elsewhere);
            halt_page(t.db(), page.as_str(), "again", now_ms() + 1)
                .await
                .unwrap();
            assert_eq!(t.send_row(&queued.id).await, halted);
        }

        /// Completed only when running, with the audience materialised and nothing open; the
        /// second time there is nothing to complete.
        async fn a_send_is_completed_once_and_only_when_done(t) {
            let page = t.page("1").await;
            let running = t.send_in(&page, "news", SendState::Running).await;
            assert_eq!(
                complete_if_done(t.db(), &running.id, now_ms())
                    .await
                    .unwrap(),
                None,
                "audience not materialised"
            );
            let fence = t.fence(&page).await;
            assert!(t.step(&fence, &running.id, 10).await.send.audience_done());
            let done = complete_if_done(t.db(), &running.id, now_ms())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(done.state, SendState::Completed);
            assert_eq!(
                complete_if_done(t.db(), &running.id, now_ms() + 1)
                    .await
                    .unwrap(),
                None
            );
            assert_eq!(t.send_row(&running.id).await, done);
            let (open, _, _) = t.claimed_send(&page, "sport", &["u"]).await;
            assert_eq!(
                complete_if_done(t.db(), &open.id, now_ms()).await.unwrap(),
                None,
                "one in flight"
            );
        }

        /// A cancel ends what waits (skipped, its opt-in back; or lost, its token spent where
        /// an earlier attempt may have landed) and leaves what is in flight to its answer.
        async fn cancelling_ends_pending_deliveries_and_leaves_those_in_flight(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b", "c"]).await;
            let answers = [
                answer(&send.id, &claimed[0], retry(now_ms(), false)),
                answer(&send.id, &claimed[1], retry(now_ms(), true)),
            ];
            t.record(&fence, &answers).await;
            let cancelled = cancel(t.db(), &send.id, now_ms()).await.unwrap();
            let counts = (
                cancelled.state,
                cancelled.skipped,
                cancelled.unknown,
                cancelled.in_flight,
            );
            assert_eq!(counts, (SendState::Cancelled, 1, 1, 1));
            let rows = t.deliveries(&send.id).await;
            let states: Vec<_> = rows.iter().map(|d| d.state).collect();
            assert_eq!(
                states,
                [
                    DeliveryState::Skipped,
                    DeliveryState::Unknown,
                    DeliveryState::InFlight
                ]
            );
            assert_eq!(
                rows[0].optin_id, None,
                "a skipped delivery lets its opt-in go"
            );
            assert_eq!(
                t.opt_in_row(claimed[0].optin_id.unwrap()).await.state,
                OptInState::Active
            );
            assert_eq!(
                t.opt_in_row(claimed[1].optin_id.unwrap()).await.state,
                OptInState::Used
            );
            assert_eq!(t.send_row(&send.id).await, cancelled);
        }

        async fn cancelling_twice_conflicts_and_changes_nothing(t) {
            let page = t.page("1").await;
            let send = t.send_in(&page, "news", SendState::Cancelled).await;
            let again = cancel(t.db(), &send.id, now_ms() + 1).await;
            assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
            assert_eq!(t.send_row(&send.id).await, send);
            let done = t.send_in(&page, "sport", SendState::Completed).await;
            assert!(matches!(
                cancel(t.db(), &done.id, now_ms()).await,
                Err(StoreError::Conflict)
            ));
            assert_eq!(t.send_row(&done.id).await, done);
        }

        /// An engine starting looks for sends to run and answers still owed; a page actor for
        /// every send not finished, or finished with answers owed.
        async fn the_pages_with_work_are_those_with_sends_to_run_or_answers_owed(t) {
            let (one, two, three, four) = (
                t.page("1").await,
                t.page("2").await,
                t.page("3").await,
                t.page("4").await,
            );
            t.send_in(&one, "news", SendState::Queued).await;
            t.send_in(&two, "news", SendState::Completed).await;
            let (owed, _, _) = t.claimed_send(&three, "news", &["u"]).await;
            cancel(t.db(), &owed.id, now_ms()).await.unwrap();
            let paused = t.send_in(&four, "news", SendState::Paused).await;
            let mut pages = pages_with_work(t.db()).await.unwrap();
            pages.sort();
            assert_eq!(pages, ["1", "3"]);
            let ids = |sends: Vec<Send>| sends.into_iter().map(|s| s.id).collect::<Vec<_>>();
            assert_eq!(ids(page_sends(t.db(), "4").await.unwrap()), [paused.id]);
            assert_eq!(ids(page_sends(t.db(), "3").await.unwrap()), [owed.id]);
            assert!(page_sends(t.db(), "2").await.unwrap().is_empty());
        }

        async fn deliveries_are_listed_by_state_after_the_one_given(t) {
            let page = t.page("1").await;
            let (send, claimed, fence) = t.claimed_send(&page, "news", &["a", "b", "c"]).await;
            t.record(
                &fence,
                &[answer(&send.id, &claimed[1], retry(now_ms(), false))],
            )
            .await;
            let ids =
                |rows: Vec<delivery::Model>| rows.into_iter().map(|d| d.id).collect::<Vec<_>>();
            let flying = list_deliveries(t.db(), &send.id, Some(DeliveryState::InFlight), None, 10)
                .await
                .unwrap();
            assert_eq!(ids(flying), [claimed[0].id, claimed[2].id]);
            let after = list_deliveries(t.db(), &send.id, None, Some(claimed[0].id), 1)
                .await
                .unwrap();
            assert_eq!(ids(after), [claimed[1].id]);
        }
    }
}
