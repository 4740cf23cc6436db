//! Sends and deliveries: the engine's queue and its record.
//!
//! Every function that moves deliveries also moves the send's counters, in one transaction, so
//! a send's row always agrees with its deliveries. Only a page's actor calls the functions that
//! write deliveries or opt-ins (materialise, claim, record, recover, cancel); the database
//! enforces the same rules underneath (one delivery per recipient and send, one per opt-in).

use sea_orm::{
    Condition, ConnectionTrait, DatabaseConnection, DatabaseTransaction, FromQueryResult,
    QueryFilter, QueryOrder, QuerySelect, TransactionTrait, entity::prelude::*,
    sea_query::OnConflict,
};

use super::{StoreError, leases::Fence, sql::Sql, stories};
use crate::domain::{SegmentRule, WINDOW_MS};

pub const QUEUED: &str = "queued";
pub const RUNNING: &str = "running";
pub const PAUSED: &str = "paused";
pub const COMPLETED: &str = "completed";
pub const CANCELLED: &str = "cancelled";
pub const HALTED: &str = "halted";

/// States a send can still move out of.
pub const UNFINISHED: &[&str] = &[QUEUED, RUNNING, PAUSED, HALTED];

pub const ROUTE_TOKEN: &str = "token";
pub const ROUTE_WINDOW: &str = "window";

pub const PENDING: &str = "pending";
pub const IN_FLIGHT: &str = "in_flight";
pub const SENT: &str = "sent";
pub const FAILED: &str = "failed";
pub const SKIPPED: &str = "skipped";
pub const UNKNOWN: &str = "unknown";

const PHASE_TOKEN: &str = "token";
const PHASE_WINDOW: &str = "window";
const PHASE_DONE: &str = "done";

/// Rows per multi-row statement. Each statement is a round trip to the database thread and,
/// on SQLite, a parse: fewer, larger statements cost less CPU per delivery (S0: 500 rows gave
/// about 25k/s, 1,000 or 2,000 about 29k/s on the 2-core machine), but each holds its rows'
/// parameters and SQL text at once (S3's peak RSS: 112 MiB at 1,000 rows, 145 MiB at 2,000).
/// 11 parameters a row stay far under SQLite's 32,766 and PostgreSQL's 65,535.
const ROWS_PER_STATEMENT: usize = 1000;

pub mod send {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sends")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub story_id: String,
        pub page_id: String,
        pub request_id: String,
        pub state: String,
        pub topic: String,
        pub message: String,
        pub include_window_users: bool,
        pub segment_rule: Option<String>,
        pub audience_phase: String,
        pub audience_cursor: String,
        pub total: i64,
        pub in_flight: i64,
        pub sent: i64,
        pub failed: i64,
        pub skipped: i64,
        pub unknown: i64,
        pub last_error: String,
        pub created_at: i64,
        pub started_at: Option<i64>,
        pub finished_at: Option<i64>,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod delivery {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "deliveries")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub send_id: String,
        pub page_id: String,
        pub psid: String,
        pub route: String,
        pub optin_id: Option<i64>,
        pub state: String,
        pub attempts: i32,
        pub ambiguous: bool,
        pub confirmed_by_token: bool,
        pub next_attempt_at: i64,
        pub message_id: Option<String>,
        pub error_code: Option<i32>,
        pub error_subcode: Option<i32>,
        pub error_message: Option<String>,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub use send::Model as Send;

impl Send {
    pub fn pending(&self) -> i64 {
        (self.total - self.in_flight - self.sent - self.failed - self.skipped - self.unknown).max(0)
    }

    pub fn is_finished(&self) -> bool {
        !UNFINISHED.contains(&self.state.as_str())
    }

    pub fn audience_done(&self) -> bool {
        self.audience_phase == PHASE_DONE
    }

    pub fn segment(&self) -> Option<SegmentRule> {
        self.segment_rule
            .as_deref()
            .and_then(|rule| serde_json::from_str(rule).ok())
    }
}

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
    db: &DatabaseConnection,
    new: NewSend<'_>,
    now: i64,
) -> Result<Started, StoreError> {
    let story = new.story;
    let model = Send {
        id: uuid::Uuid::new_v4().to_string(),
        story_id: story.id.clone(),
        page_id: story.page_id.clone(),
        request_id: new.request_id.to_string(),
        state: QUEUED.into(),
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
    let txn = db.begin().await?;
    let existing = |txn| async move {
        send::Entity::find()
            .filter(send::Column::RequestId.eq(new.request_id))
            .one(txn)
            .await
    };
    // Counted in the transaction that adds the send: on SQLite (one writer) the bound is exact;
    // on PostgreSQL concurrent starts may overshoot it by the few racing with this one.
    let active = send::Entity::find()
        .filter(send::Column::State.is_in([QUEUED, RUNNING]))
        .count(&txn)
        .await?;
    if active >= new.max_active {
        let found = existing(&txn).await?;
        txn.commit().await?;
        return Ok(match found {
            Some(send) => Started::Existing(send),
            None => Started::Shed { active },
        });
    }
    let inserted = send::Entity::insert(send::ActiveModel::from(model.clone()))
        .on_conflict(
            OnConflict::column(send::Column::RequestId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
    if inserted == 0 {
        let found = existing(&txn).await?.ok_or(StoreError::Conflict)?;
        txn.commit().await?;
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
        .exec(&txn)
        .await?;
    if locked.rows_affected == 0 {
        // Edited (or deleted) since it was read: its review no longer holds.
        return Err(StoreError::Conflict);
    }
    txn.commit().await?;
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
    pub state: Option<&'a str>,
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
    state: Option<&str>,
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

/// Pages with work for an engine that starts: unfinished sends, or deliveries left in flight.
pub async fn pages_with_work(db: &impl ConnectionTrait) -> Result<Vec<String>, StoreError> {
    let rows = send::Entity::find()
        .select_only()
        .column(send::Column::PageId)
        .filter(
            Condition::any()
                .add(send::Column::State.is_in([QUEUED, RUNNING]))
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
                .add(send::Column::State.is_in(UNFINISHED.iter().copied()))
                .add(send::Column::InFlight.gt(0)),
        )
        .order_by_asc(send::Column::CreatedAt)
        .all(db)
        .await?)
}

/// Moves a send from one of `from` to `to`; `Conflict` when it is in none of them.
pub async fn transition(
    db: &impl ConnectionTrait,
    send_id: &str,
    from: &[&str],
    to: &str,
    last_error: Option<&str>,
    now: i64,
) -> Result<Send, StoreError> {
    let mut update = send::Entity::update_many()
        .col_expr(send::Column::State, Expr::value(to))
        .col_expr(send::Column::UpdatedAt, Expr::value(now))
        .filter(send::Column::Id.eq(send_id))
        .filter(send::Column::State.is_in(from.iter().copied()));
    if let Some(error) = last_error {
        update = update.col_expr(send::Column::LastError, Expr::value(error));
    }
    if to == RUNNING {
        // `now` is a number: inlined, it is as safe as a bound value and portable.
        update = update.col_expr(
            send::Column::StartedAt,
            Expr::cust(format!("COALESCE(started_at, {now})")),
        );
    }
    if !UNFINISHED.contains(&to) {
        update = update.col_expr(send::Column::FinishedAt, Expr::value(now));
    }
    if update.exec(db).await?.rows_affected == 0 {
        return match get(db, send_id).await {
            Ok(_) => Err(StoreError::Conflict),
            Err(err) => Err(err),
        };
    }
    get(db, send_id).await
}

/// Every running send of the page halts with `reason`: the page cannot send.
pub async fn halt_page(
    db: &impl ConnectionTrait,
    page_id: &str,
    reason: &str,
    now: i64,
) -> Result<(), StoreError> {
    send::Entity::update_many()
        .col_expr(send::Column::State, Expr::value(HALTED))
        .col_expr(send::Column::LastError, Expr::value(reason))
        .col_expr(send::Column::UpdatedAt, Expr::value(now))
        .filter(send::Column::PageId.eq(page_id))
        .filter(send::Column::State.is_in([QUEUED, RUNNING]))
        .exec(db)
        .await?;
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
        .bind(COMPLETED)
        .push(", finished_at = ")
        .bind(now)
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE id = ")
        .bind(send_id)
        .push(" AND state = ")
        .bind(RUNNING)
        .push(" AND audience_phase = ")
        .bind(PHASE_DONE)
        .push(" AND in_flight = 0 AND total = sent + failed + skipped + unknown RETURNING *");
    Ok(Send::find_by_statement(sql.statement()).one(db).await?)
}

/// Counter changes, applied in the transaction that moved the deliveries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterDelta {
    pub total: i64,
    pub in_flight: i64,
    pub sent: i64,
    pub failed: i64,
    pub skipped: i64,
    pub unknown: i64,
}

impl CounterDelta {
    fn is_zero(&self) -> bool {
        *self == CounterDelta::default()
    }
}

async fn apply_counters(
    db: &impl ConnectionTrait,
    send_id: &str,
    delta: CounterDelta,
    now: i64,
) -> Result<(), StoreError> {
    if !delta.is_zero() {
        update_send(db, send_id, delta, None, now).await?;
    }
    Ok(())
}

/// Moves the send's counters by `delta` and, after a materialising step, its audience phase and
/// cursor (only while it runs); returns the row as it is now, `None` when no running send took
/// the audience change.
async fn update_send(
    db: &impl ConnectionTrait,
    send_id: &str,
    delta: CounterDelta,
    audience: Option<(&str, &str)>,
    now: i64,
) -> Result<Option<Send>, StoreError> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("UPDATE sends SET total = total + ")
        .bind(delta.total)
        .push(", in_flight = in_flight + ")
        .bind(delta.in_flight)
        .push(", sent = sent + ")
        .bind(delta.sent)
        .push(", failed = failed + ")
        .bind(delta.failed)
        .push(", skipped = skipped + ")
        .bind(delta.skipped)
        .push(", unknown = unknown + ")
        .bind(delta.unknown)
        .push(", updated_at = ")
        .bind(now);
    if let Some((phase, cursor)) = audience {
        sql.push(", audience_phase = ")
            .bind(phase)
            .push(", audience_cursor = ")
            .bind(cursor);
    }
    sql.push(" WHERE id = ").bind(send_id);
    if audience.is_some() {
        // Paused or cancelled meanwhile (maybe by an instance that does not own the page):
        // nobody more is materialised.
        sql.push(" AND state = ").bind(RUNNING);
    }
    sql.push(" RETURNING *");
    Ok(Send::find_by_statement(sql.statement()).one(db).await?)
}

/// `(?, ?, ...)` groups for a multi-row VALUES list, one per row.
fn push_values<T>(sql: &mut Sql, rows: &[T], mut bind_row: impl FnMut(&mut Sql, &T)) {
    for (i, row) in rows.iter().enumerate() {
        sql.push(if i == 0 { "(" } else { ", (" });
        bind_row(sql, row);
        sql.push(")");
    }
}

fn push_id_list(sql: &mut Sql, ids: &[i64]) {
    sql.push("(");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.bind(*id);
    }
    sql.push(")");
}

async fn set_optin_state(
    db: &impl ConnectionTrait,
    optin_ids: &[i64],
    from: &[&str],
    to: &str,
    used_at: Option<i64>,
) -> Result<u64, StoreError> {
    let mut changed = 0;
    for chunk in optin_ids.chunks(ROWS_PER_STATEMENT) {
        let mut sql = Sql::new(db.get_database_backend());
        sql.push("UPDATE optins SET state = ").bind(to);
        if let Some(at) = used_at {
            sql.push(", used_at = ").bind(at);
        }
        sql.push(" WHERE id IN ");
        push_id_list(&mut sql, chunk);
        sql.push(" AND state IN (");
        for (i, state) in from.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(*state);
        }
        sql.push(")");
        changed += db.execute_raw(sql.statement()).await?.rows_affected();
    }
    Ok(changed)
}

#[derive(FromQueryResult)]
struct AudienceSlice {
    n: i64,
    last: Option<String>,
}

#[derive(FromQueryResult)]
struct Inserted {
    id: i64,
    psid: String,
    optin_id: Option<i64>,
}

#[derive(FromQueryResult)]
struct Reserved {
    id: i64,
    token: String,
    expires_at: i64,
}

/// The columns every materialised delivery is inserted with, in this order.
const DELIVERY_COLUMNS: &str = "INSERT INTO deliveries (send_id, page_id, psid, route, optin_id, \
     state, attempts, ambiguous, confirmed_by_token, next_attempt_at, updated_at) ";

/// The recipients of a phase, as a `WHERE` condition on `optins o` (token phase) or
/// `subscribers s` (window phase): psid above `after`, and at most `through` when given.
fn audience_condition(
    sql: &mut Sql,
    send: &Send,
    phase: &str,
    now: i64,
    min_token_life_ms: i64,
    after: &str,
    through: Option<&str>,
) {
    let column = if phase == PHASE_TOKEN {
        sql.push("o.page_id = ")
            .bind(send.page_id.as_str())
            .push(" AND o.topic = ")
            .bind(send.topic.as_str())
            .push(" AND o.state = 'active' AND o.expires_at > ")
            .bind(now + min_token_life_ms);
        "o.psid"
    } else {
        sql.push("s.page_id = ")
            .bind(send.page_id.as_str())
            .push(" AND s.last_interaction_at > ")
            .bind(now - WINDOW_MS)
            .push(
                " AND NOT EXISTS (SELECT 1 FROM optins u WHERE u.page_id = s.page_id \
                 AND u.psid = s.psid AND u.topic = ",
            )
            .bind(send.topic.as_str())
            .push(" AND u.state = 'active' AND u.expires_at > ")
            .bind(now)
            .push(")");
        "s.psid"
    };
    sql.push(&format!(" AND {column} > ")).bind(after);
    if let Some(through) = through {
        sql.push(&format!(" AND {column} <= ")).bind(through);
    }
    if let Some(rule) = send.segment() {
        sql.push(" AND ");
        stories::in_segment(sql, column, &send.page_id, &rule);
    }
}

/// Materialises up to `limit` more recipients of the send and claims them at once, in the
/// step's transaction: each user's first-expiring usable opt-in is reserved (token route), then,
/// when asked, users inside the window without one (window route); the segment applies to both.
/// The new deliveries are `in_flight` (attempt 1), ready for the sender pool. Returns them with
/// the audience phase and cursor the send moves to.
///
/// The recipients move from table to table inside the database: a step first finds the psid
/// range of its next `limit` users, then inserts their deliveries and reserves their opt-ins
/// with statements whose text does not depend on how many rows they move. Binding each row's
/// values instead cost a dozen parameters a delivery, and every new row count a fresh parse
/// of a statement with thousands of placeholders (20 ms and more on SQLite).
async fn materialize(
    txn: &DatabaseTransaction,
    send: &Send,
    now: i64,
    min_token_life_ms: i64,
    limit: u64,
) -> Result<(Vec<Claimed>, &'static str, String), StoreError> {
    let backend = txn.get_database_backend();
    let phase = match send.audience_phase.as_str() {
        PHASE_TOKEN => PHASE_TOKEN,
        PHASE_WINDOW => PHASE_WINDOW,
        _ => return Ok((Vec::new(), PHASE_DONE, String::new())),
    };
    let token_phase = phase == PHASE_TOKEN;
    let after = send.audience_cursor.as_str();

    // The next `limit` users of the phase: how many there are, and the last one's psid.
    let mut sql = Sql::new(backend);
    sql.push(if token_phase {
        "SELECT COUNT(*) AS n, MAX(psid) AS last FROM (SELECT DISTINCT o.psid AS psid \
         FROM optins o WHERE "
    } else {
        "SELECT COUNT(*) AS n, MAX(psid) AS last FROM (SELECT s.psid AS psid \
         FROM subscribers s WHERE "
    });
    audience_condition(&mut sql, send, phase, now, min_token_life_ms, after, None);
    sql.push(if token_phase {
        " ORDER BY o.psid LIMIT "
    } else {
        " ORDER BY s.psid LIMIT "
    })
    .bind(limit as i64)
    .push(") AS next_users");
    let slice = AudienceSlice::find_by_statement(sql.statement())
        .one(txn)
        .await?
        .unwrap_or(AudienceSlice { n: 0, last: None });
    let exhausted = (slice.n as u64) < limit;

    let mut claimed = Vec::new();
    if let Some(through) = slice.last.as_deref() {
        let mut sql = Sql::new(backend);
        sql.push(DELIVERY_COLUMNS)
            .push("SELECT ")
            .bind(send.id.as_str())
            .push(", ")
            .bind(send.page_id.as_str());
        if token_phase {
            sql.push(", r.psid, 'token', r.id, 'in_flight', 1, FALSE, FALSE, 0, ")
                .bind(now)
                .push(" FROM (");
            // Each user's first-expiring usable opt-in: SQLite takes the bare columns of a
            // MIN() aggregate from the row holding the minimum; PostgreSQL has DISTINCT ON.
            if backend == sea_orm::DatabaseBackend::Postgres {
                sql.push(
                    "SELECT DISTINCT ON (o.psid) o.psid AS psid, o.id AS id FROM optins o WHERE ",
                );
                audience_condition(
                    &mut sql,
                    send,
                    phase,
                    now,
                    min_token_life_ms,
                    after,
                    Some(through),
                );
                sql.push(" ORDER BY o.psid, o.expires_at, o.id");
            } else {
                sql.push("SELECT o.psid AS psid, o.id AS id, MIN(o.expires_at) AS first_expiry FROM optins o WHERE ");
                audience_condition(
                    &mut sql,
                    send,
                    phase,
                    now,
                    min_token_life_ms,
                    after,
                    Some(through),
                );
                sql.push(" GROUP BY o.psid");
            }
            // (The condition names `first_expiry` so that SQLite keeps the MIN() its bare
            // columns are chosen by; PostgreSQL's subquery has no such column.)
            sql.push(if backend == sea_orm::DatabaseBackend::Postgres {
                ") AS r WHERE TRUE ORDER BY r.psid"
            } else {
                ") AS r WHERE r.first_expiry IS NOT NULL ORDER BY r.psid"
            });
        } else {
            sql.push(", s.psid, 'window', CAST(NULL AS BIGINT), 'in_flight', 1, FALSE, FALSE, 0, ")
                .bind(now)
                .push(" FROM subscribers s WHERE ");
            audience_condition(
                &mut sql,
                send,
                phase,
                now,
                min_token_life_ms,
                after,
                Some(through),
            );
            sql.push(" ORDER BY s.psid");
        }
        // A user who already has this send's token delivery is skipped by the unique key.
        sql.push(" ON CONFLICT (send_id, psid) DO NOTHING RETURNING id, psid, optin_id");
        let inserted = Inserted::find_by_statement(sql.statement())
            .all(txn)
            .await?;
        let mut tokens = std::collections::HashMap::new();
        if token_phase && !inserted.is_empty() {
            // The rows just inserted are exactly the send's deliveries in this id range: only
            // this page's actor adds deliveries to the send, and its earlier ones are older.
            let first = inserted.iter().map(|row| row.id).min().unwrap_or_default();
            let last = inserted.iter().map(|row| row.id).max().unwrap_or_default();
            let mut sql = Sql::new(backend);
            sql.push(
                "UPDATE optins SET state = 'reserved' WHERE id IN (SELECT d.optin_id FROM \
                 deliveries d WHERE d.send_id = ",
            )
            .bind(send.id.as_str())
            .push(" AND d.id BETWEEN ")
            .bind(first)
            .push(" AND ")
            .bind(last)
            .push(") AND state = 'active' RETURNING id, token, expires_at");
            let reserved = Reserved::find_by_statement(sql.statement())
                .all(txn)
                .await?;
            if reserved.len() != inserted.len() {
                // Only this page's actor reserves opt-ins: another writer is at work.
                return Err(StoreError::Conflict);
            }
            tokens = reserved
                .into_iter()
                .map(|row| (row.id, (row.token, row.expires_at)))
                .collect();
        }
        claimed.reserve(inserted.len());
        for row in inserted {
            let (token, expires_at) = match row.optin_id.and_then(|id| tokens.remove(&id)) {
                Some((token, expires_at)) => (Some(token), Some(expires_at)),
                None if token_phase => return Err(StoreError::Conflict),
                None => (None, None),
            };
            claimed.push(Claimed {
                id: row.id,
                psid: row.psid,
                route: if token_phase {
                    ROUTE_TOKEN
                } else {
                    ROUTE_WINDOW
                }
                .to_string(),
                attempts: 1,
                ambiguous: false,
                token,
                expires_at,
                optin_id: row.optin_id,
            });
        }
        claimed.sort_by_key(|c| c.id);
    }

    let (next_phase, cursor) = match (exhausted, token_phase, send.include_window_users) {
        (false, _, _) => (phase, slice.last.unwrap_or_default()),
        (true, true, true) => (PHASE_WINDOW, String::new()),
        (true, _, _) => (PHASE_DONE, String::new()),
    };
    Ok((claimed, next_phase, cursor))
}

/// A delivery handed to the sender pool.
#[derive(Clone, Debug, FromQueryResult)]
pub struct Claimed {
    pub id: i64,
    pub psid: String,
    pub route: String,
    /// Attempts including this one.
    pub attempts: i32,
    pub ambiguous: bool,
    pub token: Option<String>,
    pub expires_at: Option<i64>,
    pub optin_id: Option<i64>,
}

/// What one step of a send did: the deliveries it committed `in_flight`, and the send's row
/// afterwards when anything moved.
pub struct Step {
    pub claimed: Vec<Claimed>,
    pub send: Option<Send>,
}

/// One step of a running send, in one transaction: up to `limit` due pending deliveries (retries
/// and recovered ones) first, then new recipients materialised while room is left, all committed
/// `in_flight` before anyone calls Facebook, with the send's counters and audience cursor.
/// `send` is the caller's latest row of the send (only its owner moves the audience cursor).
pub async fn step(
    db: &DatabaseConnection,
    fence: &Fence,
    send: &Send,
    now: i64,
    min_token_life_ms: i64,
    limit: u64,
) -> Result<Step, StoreError> {
    let txn = db.begin().await?;
    fence.check(&txn).await?;
    let (mut claimed, mut delta) = claim(&txn, &send.id, now, min_token_life_ms, limit).await?;
    let mut audience = None;
    if (claimed.len() as u64) < limit && !send.audience_done() {
        let want = limit - claimed.len() as u64;
        let (more, phase, cursor) = materialize(&txn, send, now, min_token_life_ms, want).await?;
        delta.total += more.len() as i64;
        delta.in_flight += more.len() as i64;
        claimed.extend(more);
        audience = Some((phase, cursor));
    }
    let row = match (delta.is_zero(), &audience) {
        (true, None) => None,
        (_, audience) => {
            let audience = audience.as_ref().map(|(p, c)| (*p, c.as_str()));
            let row = update_send(&txn, &send.id, delta, audience, now).await?;
            if row.is_none() {
                // Paused or cancelled meanwhile: nothing of this step stands; the actor reads
                // its sends again.
                return Err(StoreError::Conflict);
            }
            row
        }
    };
    txn.commit().await?;
    Ok(Step { claimed, send: row })
}

/// Claims up to `limit` due pending deliveries of the send, in order, `in_flight` in the step's
/// transaction. A token that would expire before it can be used is never presented: its
/// delivery is skipped (or, if an earlier attempt may have landed, marked unknown) and the
/// opt-in expired. Returns the claimed deliveries and the counters they move.
async fn claim(
    txn: &DatabaseTransaction,
    send_id: &str,
    now: i64,
    min_token_life_ms: i64,
    limit: u64,
) -> Result<(Vec<Claimed>, CounterDelta), StoreError> {
    let backend = txn.get_database_backend();
    let mut sql = Sql::new(backend);
    sql.push(
        "SELECT d.id, d.psid, d.route, d.attempts + 1 AS attempts, d.ambiguous, o.token, \
         o.expires_at, d.optin_id FROM deliveries d LEFT JOIN optins o ON o.id = d.optin_id \
         WHERE d.send_id = ",
    )
    .bind(send_id)
    .push(" AND d.state = 'pending' AND d.next_attempt_at <= ")
    .bind(now)
    .push(" ORDER BY d.id LIMIT ")
    .bind(limit as i64);
    let rows = Claimed::find_by_statement(sql.statement()).all(txn).await?;
    let (usable, lapsed): (Vec<Claimed>, Vec<Claimed>) = rows.into_iter().partition(|c| {
        c.route == ROUTE_WINDOW
            || (c.token.is_some() && c.expires_at.is_some_and(|e| e > now + min_token_life_ms))
    });
    let mut delta = CounterDelta::default();
    let ids: Vec<i64> = usable.iter().map(|c| c.id).collect();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut sql = Sql::new(backend);
        sql.push(
            "UPDATE deliveries SET state = 'in_flight', attempts = attempts + 1, updated_at = ",
        )
        .bind(now)
        .push(" WHERE id IN ");
        push_id_list(&mut sql, chunk);
        // Still pending: a cancel (which may come from another instance) skips pending rows.
        sql.push(" AND state = 'pending'");
        if txn.execute_raw(sql.statement()).await?.rows_affected() != chunk.len() as u64 {
            return Err(StoreError::Conflict);
        }
    }
    delta.in_flight = ids.len() as i64;
    if !lapsed.is_empty() {
        let (maybe_landed, never_sent): (Vec<&Claimed>, Vec<&Claimed>) =
            lapsed.iter().partition(|c| c.ambiguous);
        let end = |rows: Vec<&Claimed>, state: &'static str, why: &'static str| {
            (rows.iter().map(|c| c.id).collect::<Vec<_>>(), state, why)
        };
        for (ids, state, why) in [
            end(
                never_sent,
                SKIPPED,
                "the opt-in expired before its turn; its token was never presented",
            ),
            end(
                maybe_landed,
                UNKNOWN,
                "an earlier attempt may have landed, and the token expired before it could be confirmed",
            ),
        ] {
            for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                let mut sql = Sql::new(backend);
                sql.push("UPDATE deliveries SET state = ")
                    .bind(state)
                    .push(", error_message = ")
                    .bind(why)
                    .push(", updated_at = ")
                    .bind(now)
                    .push(" WHERE id IN ");
                push_id_list(&mut sql, chunk);
                txn.execute_raw(sql.statement()).await?;
            }
            if state == SKIPPED {
                delta.skipped += ids.len() as i64;
            } else {
                delta.unknown += ids.len() as i64;
            }
        }
        let optins: Vec<i64> = lapsed.iter().filter_map(|c| c.optin_id).collect();
        set_optin_state(txn, &optins, &["reserved", "active"], "expired", None).await?;
    }
    Ok((usable, delta))
}

/// How one attempt ended, as the engine decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Sent {
        id: i64,
        message_id: Option<String>,
        confirmed_by_token: bool,
        optin_id: Option<i64>,
    },
    Failed {
        id: i64,
        error: DeliveryError,
        /// Facebook refused the token for good: the opt-in is `rejected`.
        reject_optin: Option<i64>,
    },
    /// Back to pending, due at `at`.
    Retry {
        id: i64,
        at: i64,
        ambiguous: bool,
        /// Throttling and page failures are nobody's attempt: they do not count.
        refund_attempt: bool,
        error: DeliveryError,
    },
    /// A standard message that may have landed: never retried.
    Unknown { id: i64, error: DeliveryError },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryError {
    pub code: Option<i32>,
    pub subcode: Option<i32>,
    pub message: String,
}

/// Records outcomes of in-flight deliveries of one send (a batch, one transaction); returns the
/// send's row afterwards.
pub async fn record(
    db: &DatabaseConnection,
    fence: &Fence,
    send_id: &str,
    outcomes: &[Outcome],
    now: i64,
) -> Result<Option<Send>, StoreError> {
    if outcomes.is_empty() {
        return Ok(None);
    }
    let backend = db.get_database_backend();
    let txn = db.begin().await?;
    fence.check(&txn).await?;
    let mut delta = CounterDelta {
        in_flight: -(outcomes.len() as i64),
        ..Default::default()
    };
    let mut sent = Vec::new();
    let mut failed = Vec::new();
    let mut retry = Vec::new();
    let mut unknown = Vec::new();
    let mut used_optins = Vec::new();
    let mut rejected_optins = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Sent { optin_id, .. } => {
                sent.push(outcome);
                used_optins.extend(*optin_id);
            }
            Outcome::Failed { reject_optin, .. } => {
                failed.push(outcome);
                rejected_optins.extend(*reject_optin);
            }
            Outcome::Retry { .. } => retry.push(outcome),
            Outcome::Unknown { .. } => unknown.push(outcome),
        }
    }
    delta.sent = sent.len() as i64;
    delta.failed = failed.len() as i64;
    delta.unknown = unknown.len() as i64;

    for chunk in sent.chunks(ROWS_PER_STATEMENT) {
        let mut sql = Sql::new(backend);
        sql.push("UPDATE deliveries SET state = 'sent', message_id = v.column2, confirmed_by_token = v.column3, error_code = NULL, error_subcode = NULL, error_message = NULL, updated_at = ")
            .bind(now)
            .push(" FROM (VALUES ");
        push_values(&mut sql, chunk, |sql, o| {
            if let Outcome::Sent {
                id,
                message_id,
                confirmed_by_token,
                ..
            } = o
            {
                sql.bind(*id)
                    .push(", ")
                    .bind(message_id.clone())
                    .push(", ")
                    .bind(*confirmed_by_token);
            }
        });
        sql.push(") AS v WHERE deliveries.id = v.column1");
        txn.execute_raw(sql.statement()).await?;
        crate::crashpoint::pass("recording");
    }
    let error_rows = |rows: &[&Outcome], state: &str, sql: &mut Sql| {
        sql.push("UPDATE deliveries SET state = ")
            .bind(state.to_string())
            .push(
                ", error_code = v.column2, error_subcode = v.column3, error_message = v.column4, \
                 next_attempt_at = v.column5, ambiguous = (ambiguous OR v.column6), \
                 attempts = attempts - v.column7, updated_at = ",
            )
            .bind(now)
            .push(" FROM (VALUES ");
        push_values(sql, rows, |sql, o| {
            let (id, error, at, ambiguous, refund) = match o {
                Outcome::Failed { id, error, .. } | Outcome::Unknown { id, error } => {
                    (*id, error, 0, false, 0)
                }
                Outcome::Retry {
                    id,
                    at,
                    ambiguous,
                    refund_attempt,
                    error,
                } => (*id, error, *at, *ambiguous, i32::from(*refund_attempt)),
                Outcome::Sent { .. } => unreachable!("sent outcomes are recorded above"),
            };
            sql.bind(id)
                .push(", ")
                .bind(error.code)
                .push(", ")
                .bind(error.subcode)
                .push(", ")
                .bind(error.message.clone())
                .push(", ")
                .bind(at)
                .push(", ")
                .bind(ambiguous)
                .push(", ")
                .bind(refund);
        });
        sql.push(") AS v WHERE deliveries.id = v.column1");
    };
    for (rows, state) in [(&failed, FAILED), (&retry, PENDING), (&unknown, UNKNOWN)] {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut sql = Sql::new(backend);
            error_rows(chunk, state, &mut sql);
            txn.execute_raw(sql.statement()).await?;
        }
    }
    set_optin_state(&txn, &used_optins, &["reserved"], "used", Some(now)).await?;
    set_optin_state(&txn, &rejected_optins, &["reserved"], "rejected", None).await?;
    let row = update_send(&txn, send_id, delta, None, now).await?;
    txn.commit().await?;
    Ok(row)
}

/// After a crash (or an actor restart): every delivery of the page's sends still `in_flight`
/// may or may not have reached Facebook. A token delivery goes back to pending, marked
/// ambiguous, so that its retry with the same token settles it; a standard message becomes
/// `unknown` and is never retried. Returns how many deliveries were recovered.
pub async fn recover_in_flight(
    db: &DatabaseConnection,
    fence: &Fence,
    send_id: &str,
    now: i64,
) -> Result<u64, StoreError> {
    let backend = db.get_database_backend();
    let txn = db.begin().await?;
    fence.check(&txn).await?;
    let mut retried = Sql::new(backend);
    retried
        .push("UPDATE deliveries SET state = 'pending', ambiguous = ")
        .bind(true)
        .push(", next_attempt_at = 0, updated_at = ")
        .bind(now)
        .push(" WHERE send_id = ")
        .bind(send_id)
        .push(" AND state = 'in_flight' AND route = 'token'");
    let retried = txn.execute_raw(retried.statement()).await?.rows_affected();
    let mut unknown = Sql::new(backend);
    unknown
        .push("UPDATE deliveries SET state = 'unknown', error_message = ")
        .bind(
            "otnd stopped while this standard message was in flight; it may or may not have landed",
        )
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE send_id = ")
        .bind(send_id)
        .push(" AND state = 'in_flight' AND route = 'window'");
    let unknown = txn.execute_raw(unknown.statement()).await?.rows_affected();
    // Every delivery of the send that was in flight has just moved: none is left.
    let mut fix = Sql::new(backend);
    fix.push("UPDATE sends SET in_flight = 0, unknown = unknown + ")
        .bind(unknown as i64)
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE id = ")
        .bind(send_id);
    txn.execute_raw(fix.statement()).await?;
    txn.commit().await?;
    Ok(retried + unknown)
}

/// Cancels the send: pending deliveries are skipped and their opt-ins released to `active`.
/// Deliveries in flight finish and are recorded as usual.
pub async fn cancel(db: &DatabaseConnection, send_id: &str, now: i64) -> Result<Send, StoreError> {
    let backend = db.get_database_backend();
    let txn = db.begin().await?;
    let current = get(&txn, send_id).await?;
    if current.is_finished() {
        return Err(StoreError::Conflict);
    }
    // Skip first, then release exactly the opt-ins of the rows skipped: a claim racing from the
    // page's owner (cancel may run on any instance) either took a row first, and its token
    // stays reserved for the delivery in flight, or finds it skipped.
    #[derive(FromQueryResult)]
    struct Skipped {
        optin_id: Option<i64>,
    }
    let mut skip = Sql::new(backend);
    skip.push("UPDATE deliveries SET state = 'skipped', error_message = ")
        .bind("the send was cancelled before this delivery's turn")
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE send_id = ")
        .bind(send_id)
        .push(" AND state = 'pending' RETURNING optin_id");
    let rows = Skipped::find_by_statement(skip.statement())
        .all(&txn)
        .await?;
    let skipped = rows.len();
    let released: Vec<i64> = rows.into_iter().filter_map(|r| r.optin_id).collect();
    set_optin_state(&txn, &released, &["reserved"], "active", None).await?;
    apply_counters(
        &txn,
        send_id,
        CounterDelta {
            skipped: skipped as i64,
            ..Default::default()
        },
        now,
    )
    .await?;
    let cancelled = transition(&txn, send_id, UNFINISHED, CANCELLED, None, now).await?;
    // A cancelled send materialises nobody else.
    send::Entity::update_many()
        .col_expr(send::Column::AudiencePhase, Expr::value(PHASE_DONE))
        .filter(send::Column::Id.eq(send_id))
        .exec(&txn)
        .await?;
    txn.commit().await?;
    Ok(Send {
        audience_phase: PHASE_DONE.into(),
        ..cancelled
    })
}
