//! Sends and deliveries: the engine's queue and its record.
//!
//! Every state change is an event of the domain's tables (`domain::send`), written as one
//! conditional statement whose `SET state` and `WHERE state IN (…)` come from the table, and
//! every counter moves by the rows that statement actually changed, in the same transaction. A
//! step applied twice therefore changes nothing the second time.
//!
//! A transaction that writes a send's deliveries first locks the send's row (PostgreSQL; on
//! SQLite every writer begins `IMMEDIATE`), so a cancel, a step, a recording and an erasure of
//! the same send never interleave. Only the page's owner (its actor, behind the page's lease)
//! claims, materialises, records and recovers; the database enforces the same rules underneath
//! (one delivery per recipient and send, one live delivery per opt-in, CHECK constraints).
//!
//! - [`lifecycle`]: starting a send, its own transitions, cancel, completion, reads;
//! - [`materialize`]: the audience, turned into deliveries as the send goes;
//! - [`claim`]: one step of a send (claim due deliveries, materialise more), and reconciliation;
//! - [`record`]: the answers of attempts;
//! - [`recovery`]: what an earlier life left in flight.

mod claim;
mod erasure;
mod lifecycle;
mod materialize;
mod record;
mod recovery;

use sea_orm::{ConnectionTrait, DatabaseBackend, FromQueryResult};

pub use claim::{Step, reconcile, step};
pub use erasure::{erase_recipient, hold_recipient};
pub use lifecycle::{
    NewSend, SendFilter, Started, apply, cancel, complete_if_done, find_by_request_id, get,
    halt_page, list, list_deliveries, page_sends, pages_with_work, start,
};
pub use record::{Answer, DeliveryError, Outcome, record};
pub use recovery::recover_in_flight;

use super::{StoreError, optins, sql::Sql};
use crate::domain::{
    DeliveryEvent, DeliveryState, OptInEvent, Route, SegmentRule, SendEvent, SendState, TokenKind,
};

/// Rows per multi-row statement. Each statement is a round trip to the database thread and,
/// on SQLite, a parse: fewer, larger statements cost less CPU per delivery (S0: 500 rows gave
/// about 25k/s, 1,000 or 2,000 about 29k/s on the 2-core machine), but each holds its rows'
/// parameters and SQL text at once (S3's peak RSS: 112 MiB at 1,000 rows, 145 MiB at 2,000).
/// A dozen parameters a row stay far under SQLite's 32,766 and PostgreSQL's 65,535.
const ROWS_PER_STATEMENT: usize = 1000;

/// The audience's materialisation: opt-ins first, then (when asked) users inside the window.
const PHASE_TOKEN: &str = "token";
const PHASE_WINDOW: &str = "window";
const PHASE_DONE: &str = "done";

pub mod send {
    use sea_orm::entity::prelude::*;

    use crate::domain::SendState;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sends")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub story_id: String,
        pub page_id: String,
        pub request_id: String,
        pub state: SendState,
        pub topic: String,
        pub message: String,
        pub include_window_users: bool,
        /// The kinds of token the audience takes, frozen from the story ('' is every kind).
        pub token_kinds: String,
        /// How long after a recurring notification to a subscriber this send holds another back.
        pub recurring_cooldown_ms: i64,
        pub segment_rule: Option<String>,
        pub audience_phase: String,
        pub audience_cursor: String,
        /// Deliveries materialised so far: it grows in batches as the send goes.
        pub total: i64,
        /// The audience counted when the send started (0 for sends older than the count):
        /// what progress reports as the total until the audience is all materialised.
        pub expected_total: i64,
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

    use crate::domain::{DeliveryState, Route};

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "deliveries")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub send_id: String,
        pub page_id: String,
        pub psid: String,
        pub route: Route,
        pub optin_id: Option<i64>,
        pub state: DeliveryState,
        pub attempts: i32,
        /// How many times the delivery was claimed: an answer is recorded only against the
        /// claim it answers.
        pub claim: i32,
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
        self.state.is_finished()
    }

    pub fn audience_done(&self) -> bool {
        self.audience_phase == PHASE_DONE
    }

    /// The kinds of token the audience takes.
    pub fn token_kinds(&self) -> Vec<TokenKind> {
        TokenKind::split(&self.token_kinds)
    }

    pub fn segment(&self) -> Option<SegmentRule> {
        self.segment_rule
            .as_deref()
            .and_then(|rule| serde_json::from_str(rule).ok())
    }
}

/// A delivery handed to the sender pool.
#[derive(Clone, Debug, FromQueryResult)]
pub struct Claimed {
    pub id: i64,
    pub psid: String,
    pub route: Route,
    /// Attempts including this one.
    pub attempts: i32,
    /// The claim this attempt belongs to: its answer is recorded against it.
    pub claim: i32,
    /// An earlier attempt may have landed.
    pub ambiguous: bool,
    pub token: Option<String>,
    pub expires_at: Option<i64>,
    pub optin_id: Option<i64>,
}

impl Claimed {
    /// What deciding this attempt's answer needs of it.
    pub fn attempt(&self) -> Attempt {
        Attempt {
            route: self.route,
            attempts: self.attempts,
            claim: self.claim,
            ambiguous: self.ambiguous,
        }
    }
}

/// A claimed delivery as its answer is decided: kept while its call is out, without the
/// recipient and the token (a thousand pages' small sends keep a hundred thousand of these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub route: Route,
    /// Attempts including this one.
    pub attempts: i32,
    /// The claim this attempt belongs to.
    pub claim: i32,
    /// An earlier attempt may have landed.
    pub ambiguous: bool,
}

/// Counter changes, applied in the transaction that moved the deliveries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CounterDelta {
    total: i64,
    in_flight: i64,
    sent: i64,
    failed: i64,
    skipped: i64,
    unknown: i64,
}

impl CounterDelta {
    fn is_zero(&self) -> bool {
        *self == CounterDelta::default()
    }

    /// `n` deliveries moved from `from` to `to`.
    fn moved(&mut self, from: DeliveryState, to: DeliveryState, n: i64) {
        if let Some(counter) = self.counter(from) {
            *counter -= n;
        }
        if let Some(counter) = self.counter(to) {
            *counter += n;
        }
    }

    /// `n` deliveries gone from the send in `state` (an erasure).
    fn removed(&mut self, state: DeliveryState, n: i64) {
        self.total -= n;
        if let Some(counter) = self.counter(state) {
            *counter -= n;
        }
    }

    /// The counter of a state; pending has none: it is what the others leave of the total.
    fn counter(&mut self, state: DeliveryState) -> Option<&mut i64> {
        match state {
            DeliveryState::Pending => None,
            DeliveryState::InFlight => Some(&mut self.in_flight),
            DeliveryState::Sent => Some(&mut self.sent),
            DeliveryState::Failed => Some(&mut self.failed),
            DeliveryState::Skipped => Some(&mut self.skipped),
            DeliveryState::Unknown => Some(&mut self.unknown),
        }
    }
}

/// What one statement changes in a send's row.
#[derive(Clone, Copy, Debug, Default)]
struct SendChange<'a> {
    delta: CounterDelta,
    /// After a materialising step: the audience phase and cursor the send moves to.
    audience: Option<(&'a str, &'a str)>,
    /// The send's state moves too, if it is in a state the event leaves.
    event: Option<SendEvent>,
}

impl<'a> SendChange<'a> {
    fn counters(delta: CounterDelta) -> Self {
        SendChange {
            delta,
            ..SendChange::default()
        }
    }
}

/// Applies `change` to the send's row: counters, audience, and (when the event's guard holds,
/// a completion only when the counters after the change say every delivery ended) its state;
/// returns the row as it is now.
async fn update_send(
    db: &impl ConnectionTrait,
    send_id: &str,
    change: SendChange<'_>,
    now: i64,
) -> Result<Option<Send>, StoreError> {
    let delta = change.delta;
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
    if let Some((phase, cursor)) = change.audience {
        sql.push(", audience_phase = ")
            .bind(phase)
            .push(", audience_cursor = ")
            .bind(cursor);
    }
    if let Some(event) = change.event {
        // Every expression of a SET sees the row as it was: the guard is written once for
        // each column the event moves.
        let when = |sql: &mut Sql| {
            sql.push(" CASE WHEN ");
            lifecycle::guard_condition(sql, event);
            if event == SendEvent::Complete {
                sql.push(" AND ");
                lifecycle::done_condition(sql, change.audience.map(|(phase, _)| phase), delta);
            }
            sql.push(" THEN ");
        };
        sql.push(", state =");
        when(&mut sql);
        sql.bind(event.target()).push(" ELSE state END");
        match event.target() {
            SendState::Running => {
                sql.push(", started_at =");
                when(&mut sql);
                sql.push("COALESCE(started_at, ")
                    .bind(now)
                    .push(") ELSE started_at END");
            }
            target if target.is_finished() => {
                sql.push(", finished_at =");
                when(&mut sql);
                sql.bind(now).push(" ELSE finished_at END");
            }
            _ => {}
        }
    }
    sql.push(" WHERE id = ").bind(send_id).push(" RETURNING *");
    Ok(Send::find_by_statement(sql.statement()).one(db).await?)
}

/// Locks the send's row for the rest of the transaction (PostgreSQL: writers of one send queue
/// here; SQLite's writers are serialised by `BEGIN IMMEDIATE`) and reads it.
async fn lock_send(db: &impl ConnectionTrait, send_id: &str) -> Result<Send, StoreError> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT * FROM sends WHERE id = ").bind(send_id);
    if db.get_database_backend() == DatabaseBackend::Postgres {
        sql.push(" FOR UPDATE");
    }
    Send::find_by_statement(sql.statement())
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)
}

/// ` SET state = '<target>'`'s text for a delivery event: the state comes from the table.
fn set_state(sql: &mut Sql, event: DeliveryEvent) {
    sql.push(&format!("state = '{}'", event.target().as_str()));
}

/// ` AND <column> = '<from>'`: the state a statement moves deliveries out of by `event`, which
/// the lifecycle table must allow (a statement the table does not allow is a bug, refused here
/// before it runs).
fn leaving(
    sql: &mut Sql,
    event: DeliveryEvent,
    from: DeliveryState,
    column: &str,
) -> Result<(), StoreError> {
    from.on(event)
        .map_err(|illegal| StoreError::Db(sea_orm::DbErr::Custom(illegal.to_string())))?;
    sql.push(&format!(" AND {column} = '{}'", from.as_str()));
    Ok(())
}

/// Moves the deliveries `which` selects (it writes the `WHERE …` after the `WHERE`) out of `from`
/// by `event`, giving `why` as their message; `set` may add columns. Returns the rows moved.
async fn move_with_reason(
    db: &impl ConnectionTrait,
    event: DeliveryEvent,
    from: DeliveryState,
    why: &str,
    now: i64,
    set: impl FnOnce(&mut Sql),
    which: impl FnOnce(&mut Sql),
) -> Result<Vec<Moved>, StoreError> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("UPDATE deliveries SET ");
    set_state(&mut sql, event);
    set(&mut sql);
    sql.push(", error_message = ")
        .bind(why)
        .push(", updated_at = ")
        .bind(now)
        .push(" WHERE ");
    which(&mut sql);
    leaving(&mut sql, event, from, "state")?;
    sql.push(" RETURNING id, optin_id");
    Ok(Moved::find_by_statement(sql.statement()).all(db).await?)
}

/// Ends the send's pending deliveries (those `which` narrows down with `AND …`), for `cause` (e.g. "the send was
/// cancelled"): those no attempt of which can have landed are skipped and their opt-ins
/// released for a later send; those whose earlier attempt may have landed are `unknown` and
/// their tokens spent (never presented again). Returns the counter change.
async fn end_pending(
    db: &impl ConnectionTrait,
    send_id: &str,
    cause: &str,
    now: i64,
    which: impl Fn(&mut Sql),
) -> Result<CounterDelta, StoreError> {
    let mut delta = CounterDelta::default();
    for (event, ambiguous, why) in [
        (
            DeliveryEvent::Skip,
            false,
            format!("{cause} before this delivery's turn"),
        ),
        (
            DeliveryEvent::Lose,
            true,
            format!("{cause} while an earlier attempt that may have landed waited to be settled"),
        ),
    ] {
        let moved = move_with_reason(
            db,
            event,
            DeliveryState::Pending,
            &why,
            now,
            |_| {},
            |sql| {
                sql.push("send_id = ").bind(send_id);
                which(sql);
                sql.push(" AND ambiguous = ").bind(ambiguous);
            },
        )
        .await?;
        settle_optins(db, &moved, event.target(), false, now).await?;
        delta.moved(DeliveryState::Pending, event.target(), moved.len() as i64);
    }
    Ok(delta)
}

/// A delivery a statement moved, as it was bound.
#[derive(Clone, Copy, Debug, FromQueryResult)]
struct Moved {
    id: i64,
    optin_id: Option<i64>,
}

/// Settles the opt-ins of deliveries that just ended in `ended`: spent, rejected, or released
/// (and then unbound from the delivery, so that a later send can reserve them).
async fn settle_optins(
    db: &impl ConnectionTrait,
    moved: &[Moved],
    ended: DeliveryState,
    token_refused: bool,
    now: i64,
) -> Result<(), StoreError> {
    let Some(event) = ended.optin_event(token_refused) else {
        return Ok(());
    };
    let optins: Vec<i64> = moved.iter().filter_map(|m| m.optin_id).collect();
    if optins.is_empty() {
        return Ok(());
    }
    optins::apply(db, event, &optins, now).await?;
    if event == OptInEvent::Release {
        let deliveries: Vec<i64> = moved
            .iter()
            .filter(|m| m.optin_id.is_some())
            .map(|m| m.id)
            .collect();
        for chunk in deliveries.chunks(ROWS_PER_STATEMENT) {
            let mut sql = Sql::new(db.get_database_backend());
            // Only a one-time token is bound to one delivery ever; a recurring delivery keeps
            // naming the token it used.
            sql.push("UPDATE deliveries SET optin_id = NULL WHERE route = 'token' AND id IN ");
            push_id_list(&mut sql, chunk);
            db.execute_raw(sql.statement()).await?;
        }
    }
    Ok(())
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

/// The send states a send can still move out of, for reads that want unfinished sends.
fn unfinished() -> Vec<SendState> {
    SendState::ALL
        .iter()
        .copied()
        .filter(|s| !s.is_finished())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        now_ms,
        testing::{TestStore, store_tests},
    };

    fn sent_one() -> CounterDelta {
        let mut delta = CounterDelta::default();
        delta.moved(DeliveryState::InFlight, DeliveryState::Sent, 1);
        delta
    }

    async fn change(t: &TestStore, send_id: &str, change: SendChange<'static>) -> Send {
        t.txn(async |txn| update_send(txn, send_id, change, now_ms()).await)
            .await
            .unwrap()
            .unwrap()
    }

    #[test]
    fn moving_deliveries_moves_their_counters_and_pending_has_none() {
        let mut delta = CounterDelta::default();
        delta.moved(DeliveryState::Pending, DeliveryState::InFlight, 3);
        delta.moved(DeliveryState::InFlight, DeliveryState::Pending, 1);
        assert_eq!(
            delta,
            CounterDelta {
                in_flight: 2,
                ..Default::default()
            }
        );
        delta.removed(DeliveryState::InFlight, 2);
        assert_eq!(
            delta,
            CounterDelta {
                total: -2,
                ..Default::default()
            }
        );
        assert!(!delta.is_zero());
        assert!(CounterDelta::default().is_zero());
    }

    /// What is pending is what the other counters leave of the total, never below nothing.
    #[test]
    fn a_send_reads_its_pending_deliveries_phase_and_segment_from_its_row() {
        let row = send::Model {
            id: "s".into(),
            story_id: "st".into(),
            page_id: "1".into(),
            request_id: "r".into(),
            state: SendState::Running,
            topic: "news".into(),
            message: "{}".into(),
            include_window_users: false,
            segment_rule: Some("not json".into()),
            audience_phase: PHASE_DONE.into(),
            audience_cursor: String::new(),
            total: 10,
            expected_total: 0,
            in_flight: 2,
            sent: 3,
            failed: 1,
            skipped: 1,
            unknown: 1,
            last_error: String::new(),
            created_at: 0,
            started_at: None,
            finished_at: None,
            updated_at: 0,
            token_kinds: String::new(),
            recurring_cooldown_ms: 48 * 3_600_000,
        };
        assert_eq!(row.pending(), 2);
        assert_eq!(
            Send {
                sent: 9,
                ..row.clone()
            }
            .pending(),
            0
        );
        assert!(
            row.audience_done()
                && !Send {
                    audience_phase: PHASE_TOKEN.into(),
                    ..row.clone()
                }
                .audience_done()
        );
        assert_eq!(
            row.segment(),
            None,
            "a rule that does not parse applies no segment"
        );
        let rule = SegmentRule {
            none_tags: ["x".to_string()].into(),
            ..Default::default()
        };
        let aimed = Send {
            segment_rule: Some(serde_json::to_string(&rule).unwrap()),
            ..row
        };
        assert_eq!(aimed.segment(), Some(rule));
    }

    /// A statement the lifecycle table does not allow is refused before it runs.
    #[test]
    fn a_move_the_table_does_not_allow_is_refused_before_it_is_written() {
        let mut sql = Sql::new(DatabaseBackend::Sqlite);
        assert!(
            leaving(
                &mut sql,
                DeliveryEvent::Claim,
                DeliveryState::InFlight,
                "state"
            )
            .is_err()
        );
        assert_eq!(sql.statement().sql, "");
        leaving(
            &mut sql,
            DeliveryEvent::Claim,
            DeliveryState::Pending,
            "d.state",
        )
        .unwrap();
        assert_eq!(sql.statement().sql, " AND d.state = 'pending'");
        set_state(&mut sql, DeliveryEvent::Lose);
        assert!(sql.statement().sql.ends_with("state = 'unknown'"));
    }

    #[test]
    fn lists_of_values_and_ids_are_one_group_per_row() {
        let mut sql = Sql::new(DatabaseBackend::Postgres);
        push_values(&mut sql, &[(1, 2), (3, 4)], |sql, (a, b)| {
            sql.bind(*a as i64).push(", ").bind(*b as i64);
        });
        sql.push(" ");
        push_id_list(&mut sql, &[7, 8]);
        assert_eq!(sql.statement().sql, "($1, $2), ($3, $4) ($5, $6)");
    }

    store_tests! {
        /// A completion rides on a change of counters only when the counters after it say
        /// every delivery ended; a completed send is not completed again.
        async fn a_change_completes_the_send_only_once_its_counters_say_done(t) {
            let page = t.page("1").await;
            let (send, _, _) = t.claimed_send(&page, "news", &["a", "b"]).await;
            let complete = SendChange {
                event: Some(SendEvent::Complete),
                ..SendChange::counters(sent_one())
            };
            let first = change(&t, &send.id, complete).await;
            assert_eq!(
                (first.state, first.sent, first.finished_at),
                (SendState::Running, 1, None)
            );
            let done = change(&t, &send.id, complete).await;
            assert_eq!(
                (done.state, done.sent, done.in_flight),
                (SendState::Completed, 2, 0)
            );
            let finish = SendChange {
                event: Some(SendEvent::Complete),
                ..SendChange::default()
            };
            let again = change(&t, &send.id, finish).await;
            assert_eq!(
                (again.state, again.finished_at),
                (SendState::Completed, done.finished_at)
            );
        }

        /// Before its audience is materialised a send is not done, whatever its counters.
        async fn a_send_whose_audience_is_not_materialised_is_not_completed(t) {
            let page = t.page("1").await;
            let send = t.send_in(&page, "news", SendState::Running).await;
            let complete = SendChange {
                event: Some(SendEvent::Complete),
                ..SendChange::default()
            };
            assert_eq!(
                change(&t, &send.id, complete).await.state,
                SendState::Running
            );
            let audience = SendChange {
                audience: Some((PHASE_DONE, "")),
                ..complete
            };
            assert_eq!(
                change(&t, &send.id, audience).await.state,
                SendState::Completed
            );
        }

        async fn a_send_that_does_not_exist_is_not_found_when_locked(t) {
            let missing = t.txn(async |txn| lock_send(txn, "nope").await).await;
            assert!(
                matches!(missing, Err(StoreError::NotFound)),
                "{:?}",
                missing.err()
            );
        }
    }
}
