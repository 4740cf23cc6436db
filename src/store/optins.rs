//! Opt-ins and opt-in requests: ingestion (webhook and RecordOptIn), the per-topic ledger, and
//! listing. "Expired" is computed from `expires_at` in every read, so no read depends on a sweep.

use std::collections::{BTreeMap, HashMap};

use sea_orm::{
    Condition, ConnectionTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect,
    entity::prelude::*,
    sea_query::{OnConflict, Query},
};

use super::{StoreError, audience, erasures, sql::Sql};
use crate::crypto::SecretCipher;
use crate::domain::{
    EventKind, IncomingEvent, NEVER_EXPIRES_MS, OPT_IN_LIFETIME_MS, OptInEvent, OptInState,
    OptInToken, PageId, Psid, RecurringTerms, SubscriptionChange, TokenKind, Topic,
};

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "optins")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub page_id: String,
    pub psid: String,
    pub topic: String,
    pub token: String,
    pub opted_in_at: i64,
    pub expires_at: i64,
    pub state: OptInState,
    pub used_at: Option<i64>,
    pub delivery_id: Option<String>,
    pub kind: TokenKind,
    /// A recurring opt-in's title, the subscriber's timezone and Facebook's
    /// `user_token_status`, as the opt-in gave them.
    pub title: Option<String>,
    pub timezone: Option<String>,
    pub token_status: Option<String>,
    /// When the last STOP or RESUME applied happened (the user's time, from the event).
    pub status_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

impl Model {
    /// When the token expires; none for a recurring token that does not.
    pub fn expiry(&self) -> Option<i64> {
        (self.expires_at != NEVER_EXPIRES_MS).then_some(self.expires_at)
    }
}

pub mod requests {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "optin_requests")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub page_id: String,
        pub psid: String,
        pub topic: String,
        pub title: String,
        pub sent_at: i64,
        pub message_id: String,
        pub kind: crate::domain::TokenKind,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Moves opt-ins by `event`, as one conditional statement per chunk: only those in a state the
/// event leaves move. A spent token records when. Returns how many moved.
pub async fn apply(
    db: &impl ConnectionTrait,
    event: OptInEvent,
    ids: &[i64],
    now: i64,
) -> Result<u64, StoreError> {
    let mut moved = 0;
    for chunk in ids.chunks(1000) {
        let mut sql = Sql::new(db.get_database_backend());
        sql.push("UPDATE optins SET state = ").bind(event.target());
        if event == OptInEvent::Spend {
            sql.push(", used_at = ").bind(now);
        }
        sql.push(" WHERE id IN (");
        for (i, id) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(*id);
        }
        sql.push(")");
        guard(&mut sql, event, "state");
        moved += db.execute_raw(sql.statement()).await?.rows_affected();
    }
    Ok(moved)
}

/// ` AND <column> IN (<the states the event leaves>)`: an opt-in event's guard.
pub(crate) fn guard(sql: &mut Sql, event: OptInEvent, column: &str) {
    let sources = super::stored::quoted(&event.sources(), OptInState::as_str);
    sql.push(&format!(" AND {column} IN ({sources})"));
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngestReport {
    pub opt_ins_created: u64,
    pub events: u64,
    /// Events about erased users from before their erasure (or that only say they are there):
    /// dropped.
    pub dropped_erased: u64,
}

/// Stores the events of one or more pages in one transaction: every event's user is upserted
/// (first seen never moves later, last interaction never earlier), every new token becomes an
/// opt-in, and a token seen before changes nothing. Late events about erased users are dropped
/// (see `erasures`).
pub async fn ingest(
    db: &DatabaseConnection,
    cipher: &SecretCipher,
    pages: &[(PageId, Vec<IncomingEvent>)],
) -> Result<IngestReport, StoreError> {
    let txn = super::begin_write(db).await?;
    // Before the tombstones are read: an erasure of one of these users waits for this
    // transaction, or this one for it and then reads its tombstone.
    erasures::serialize_with_erasures(&txn, pages.iter().map(|(page, _)| page.as_str())).await?;
    let mut erased: HashMap<(&str, &str), i64> = HashMap::new();
    for (page_id, events) in pages {
        if !any_erasure(&txn, page_id).await? {
            continue;
        }
        let psids: std::collections::BTreeSet<&str> =
            events.iter().map(|e| e.psid.as_str()).collect();
        let digests: Vec<(String, &str)> = psids
            .into_iter()
            .map(|psid| (erasures::digest(cipher, page_id.as_str(), psid), psid))
            .collect();
        let keys: Vec<&str> = digests.iter().map(|(d, _)| d.as_str()).collect();
        let found = erasures::erased_at(&txn, page_id.as_str(), &keys).await?;
        for (digest, psid) in &digests {
            if let Some(at) = found.get(digest) {
                erased.insert((page_id.as_str(), *psid), *at);
            }
        }
    }

    let mut report = IngestReport::default();
    let mut subscribers: HashMap<(&str, &str), audience::SubscriberTouch> = HashMap::new();
    let mut optin_rows = Vec::new();
    let mut changes = Vec::new();
    let mut seen_tokens = std::collections::HashSet::new();
    for (page_id, events) in pages {
        for event in events {
            report.events += 1;
            if let Some(erased_at) = erased.get(&(page_id.as_str(), event.psid.as_str()))
                && erasures::is_late(
                    event.at_ms,
                    !matches!(event.kind, EventKind::Seen),
                    *erased_at,
                )
            {
                report.dropped_erased += 1;
                continue;
            }
            let interaction = match &event.kind {
                EventKind::Seen => None,
                _ => Some(event.at_ms),
            };
            subscribers
                .entry((page_id.as_str(), event.psid.as_str()))
                .and_modify(|touch| touch.merge(event.at_ms, interaction))
                .or_insert(audience::SubscriberTouch {
                    first_seen_at: event.at_ms,
                    last_interaction_at: interaction,
                });
            match &event.kind {
                EventKind::OptIn {
                    topic,
                    token,
                    recurring,
                } => {
                    if seen_tokens.insert((page_id.as_str(), token.as_str())) {
                        optin_rows.push(NewOptIn {
                            page_id,
                            psid: &event.psid,
                            topic,
                            token,
                            at: event.at_ms,
                            recurring: recurring.as_ref(),
                        });
                    }
                    if let Some(change) = recurring.as_ref().and_then(|terms| terms.change) {
                        changes.push(Change {
                            page_id,
                            which: Which::Token(token),
                            change,
                            at: event.at_ms,
                        });
                    }
                }
                EventKind::SubscriptionChange { topic, change } => changes.push(Change {
                    page_id,
                    which: Which::Subscriber(&event.psid, topic.as_ref()),
                    change: *change,
                    at: event.at_ms,
                }),
                EventKind::Interaction | EventKind::Seen => {}
            }
        }
    }

    audience::upsert_subscribers(&txn, &subscribers).await?;
    // Within SQLite's and PostgreSQL's limits on bound parameters per statement.
    for chunk in optin_rows.chunks(1000) {
        let mut insert = Query::insert();
        insert.into_table(Entity).columns([
            Column::PageId,
            Column::Psid,
            Column::Topic,
            Column::Token,
            Column::OptedInAt,
            Column::ExpiresAt,
            Column::State,
            Column::Kind,
            Column::Title,
            Column::Timezone,
            Column::TokenStatus,
            Column::StatusAt,
        ]);
        for row in chunk {
            let terms = row.recurring.cloned().unwrap_or_default();
            let (kind, expires_at) = match row.recurring {
                None => (
                    TokenKind::OneTime,
                    row.at.saturating_add(OPT_IN_LIFETIME_MS),
                ),
                Some(terms) => (
                    TokenKind::Recurring,
                    terms.expires_at.unwrap_or(NEVER_EXPIRES_MS),
                ),
            };
            // A token first seen with a STOP is kept, stopped: a RESUME may follow.
            let state = match terms.change {
                Some(SubscriptionChange::Stop) => OptInState::Stopped,
                _ => OptInState::Active,
            };
            insert.values_panic([
                row.page_id.as_str().into(),
                row.psid.as_str().into(),
                row.topic.as_str().into(),
                row.token.as_str().into(),
                row.at.into(),
                expires_at.into(),
                state.into(),
                kind.into(),
                terms.title.into(),
                terms.timezone.into(),
                terms.token_status.into(),
                terms.change.map(|_| row.at).into(),
            ]);
        }
        insert.on_conflict(
            OnConflict::columns([Column::PageId, Column::Token])
                .do_nothing()
                .to_owned(),
        );
        report.opt_ins_created += txn.execute(&insert).await?.rows_affected();
    }
    for change in &changes {
        change_subscription(&txn, change).await?;
    }
    txn.commit().await?;
    Ok(report)
}

struct NewOptIn<'a> {
    page_id: &'a PageId,
    psid: &'a Psid,
    topic: &'a Topic,
    token: &'a OptInToken,
    at: i64,
    recurring: Option<&'a RecurringTerms>,
}

/// Whose recurring tokens a STOP or RESUME is about.
enum Which<'a> {
    Token(&'a OptInToken),
    /// The user's on the topic, or on every topic.
    Subscriber(&'a Psid, Option<&'a Topic>),
}

struct Change<'a> {
    page_id: &'a PageId,
    which: Which<'a>,
    change: SubscriptionChange,
    at: i64,
}

/// Applies a STOP or RESUME to the recurring tokens it names, unless a newer one (by the
/// user's time) was applied already: webhooks arrive late and out of order, and a STOP sent
/// before a RESUME must not win because it came after it. A token moves only from the state the
/// change leaves (a rejected or expired token stays so); the change's time is kept either way.
async fn change_subscription(
    db: &impl ConnectionTrait,
    change: &Change<'_>,
) -> Result<u64, StoreError> {
    let event = match change.change {
        SubscriptionChange::Stop => OptInEvent::Stop,
        SubscriptionChange::Resume => OptInEvent::Resume,
    };
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("UPDATE optins SET state = CASE WHEN 1 = 1");
    guard(&mut sql, event, "state");
    sql.push(" THEN ")
        .bind(event.target())
        .push(" ELSE state END, status_at = ")
        .bind(change.at)
        .push(" WHERE page_id = ")
        .bind(change.page_id.as_str())
        .push(" AND kind = ")
        .bind(TokenKind::Recurring);
    match change.which {
        Which::Token(token) => {
            sql.push(" AND token = ").bind(token.as_str());
        }
        Which::Subscriber(psid, topic) => {
            sql.push(" AND psid = ").bind(psid.as_str());
            if let Some(topic) = topic {
                sql.push(" AND topic = ").bind(topic.as_str());
            }
        }
    }
    sql.push(" AND (status_at IS NULL OR status_at < ")
        .bind(change.at)
        .push(")");
    Ok(db.execute_raw(sql.statement()).await?.rows_affected())
}

/// Whether anyone of the page was ever erased (most pages: no, and nothing more is looked up).
async fn any_erasure(db: &impl ConnectionTrait, page_id: &PageId) -> Result<bool, StoreError> {
    let mut sql = Sql::new(db.get_database_backend());
    sql.push("SELECT 1 AS one FROM erasures WHERE page_id = ")
        .bind(page_id.as_str())
        .push(" LIMIT 1");
    Ok(db.query_one_raw(sql.statement()).await?.is_some())
}

pub async fn find_by_token(
    db: &impl ConnectionTrait,
    page_id: &PageId,
    token: &OptInToken,
) -> Result<Model, StoreError> {
    Entity::find()
        .filter(Column::PageId.eq(page_id.as_str()))
        .filter(Column::Token.eq(token.as_str()))
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)
}

/// An opt-in request otnd sent.
pub struct SentRequest<'a> {
    pub page_id: &'a PageId,
    pub psid: &'a Psid,
    pub topic: &'a Topic,
    pub title: &'a str,
    pub kind: TokenKind,
    pub message_id: &'a str,
    pub sent_at: i64,
}

pub async fn record_request(
    db: &impl ConnectionTrait,
    request: SentRequest<'_>,
) -> Result<(), StoreError> {
    let SentRequest {
        page_id,
        psid,
        topic,
        title,
        kind,
        message_id,
        sent_at,
    } = request;
    requests::Entity::insert(requests::ActiveModel {
        id: sea_orm::ActiveValue::NotSet,
        page_id: sea_orm::ActiveValue::Set(page_id.as_str().into()),
        psid: sea_orm::ActiveValue::Set(psid.as_str().into()),
        topic: sea_orm::ActiveValue::Set(topic.as_str().into()),
        title: sea_orm::ActiveValue::Set(title.into()),
        sent_at: sea_orm::ActiveValue::Set(sent_at),
        message_id: sea_orm::ActiveValue::Set(message_id.into()),
        kind: sea_orm::ActiveValue::Set(kind),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// When otnd last sent the user a recurring opt-in request with this title, if it did after
/// `since`: Facebook takes one per title per user per week.
pub async fn last_recurring_request(
    db: &impl ConnectionTrait,
    page_id: &PageId,
    psid: &Psid,
    title: &str,
    since: i64,
) -> Result<Option<i64>, StoreError> {
    let last = requests::Entity::find()
        .filter(requests::Column::PageId.eq(page_id.as_str()))
        .filter(requests::Column::Psid.eq(psid.as_str()))
        .filter(requests::Column::Kind.eq(TokenKind::Recurring))
        .filter(requests::Column::Title.eq(title))
        .filter(requests::Column::SentAt.gt(since))
        .order_by_desc(requests::Column::SentAt)
        .one(db)
        .await?;
    Ok(last.map(|r| r.sent_at))
}

/// The counts of one topic's opt-ins (of one kind of token, or of all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub active: u64,
    pub reserved: u64,
    pub used: u64,
    pub expired: u64,
    pub rejected: u64,
    pub stopped: u64,
    pub expiring_soon: u64,
    pub subscribers: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.active += other.active;
        self.reserved += other.reserved;
        self.used += other.used;
        self.expired += other.expired;
        self.rejected += other.rejected;
        self.stopped += other.stopped;
        self.expiring_soon += other.expiring_soon;
    }
}

/// The ledger of one topic: every opt-in counted once by its state, in total and per kind of
/// token (`subscribers` of the total counts each user once, whatever tokens they hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicLedger {
    pub topic: String,
    pub total: Counts,
    pub by_kind: Vec<(TokenKind, Counts)>,
    pub requests_sent: u64,
}

#[derive(FromQueryResult)]
struct LedgerRow {
    topic: String,
    kind: TokenKind,
    active: i64,
    reserved: i64,
    used: i64,
    expired: i64,
    rejected: i64,
    stopped: i64,
    expiring_soon: i64,
    subscribers: i64,
}

#[derive(FromQueryResult)]
struct SubscribersRow {
    topic: String,
    subscribers: i64,
}

#[derive(FromQueryResult)]
struct RequestsRow {
    topic: String,
    requests_sent: i64,
}

/// How long before its expiry an opt-in counts as "expiring soon".
pub const EXPIRING_SOON_MS: i64 = 30 * 24 * 60 * 60 * 1000;

/// Per topic of the page, counted by the database (no rows are loaded).
pub async fn ledger(
    db: &impl ConnectionTrait,
    page_id: &PageId,
    now: i64,
) -> Result<Vec<TopicLedger>, StoreError> {
    let backend = db.get_database_backend();
    let soon = now + EXPIRING_SOON_MS;
    // `now` and `soon` are integers this code computed, so they are written into the SQL.
    let mut ledger = Sql::new(backend);
    ledger.push(&format!(
        "SELECT topic, kind, \
           SUM(CASE WHEN state = 'active' AND expires_at > {now} THEN 1 ELSE 0 END) AS active, \
           SUM(CASE WHEN state = 'reserved' THEN 1 ELSE 0 END) AS reserved, \
           SUM(CASE WHEN state = 'used' THEN 1 ELSE 0 END) AS used, \
           SUM(CASE WHEN state = 'expired' OR (state = 'active' AND expires_at <= {now}) THEN 1 ELSE 0 END) AS expired, \
           SUM(CASE WHEN state = 'rejected' THEN 1 ELSE 0 END) AS rejected, \
           SUM(CASE WHEN state = 'stopped' THEN 1 ELSE 0 END) AS stopped, \
           SUM(CASE WHEN state = 'active' AND expires_at > {now} AND expires_at <= {soon} THEN 1 ELSE 0 END) AS expiring_soon, \
           COUNT(DISTINCT psid) AS subscribers \
         FROM optins WHERE page_id = "
    ))
    .bind(page_id.as_str())
    .push(" GROUP BY topic, kind");
    let rows = LedgerRow::find_by_statement(ledger.statement())
        .all(db)
        .await?;
    let mut distinct = Sql::new(backend);
    distinct
        .push("SELECT topic, COUNT(DISTINCT psid) AS subscribers FROM optins WHERE page_id = ")
        .bind(page_id.as_str())
        .push(" GROUP BY topic");
    let distinct = SubscribersRow::find_by_statement(distinct.statement())
        .all(db)
        .await?;
    let mut requests = Sql::new(backend);
    requests
        .push("SELECT topic, COUNT(*) AS requests_sent FROM optin_requests WHERE page_id = ")
        .bind(page_id.as_str())
        .push(" GROUP BY topic");
    let requests = RequestsRow::find_by_statement(requests.statement())
        .all(db)
        .await?;

    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    let mut topics: BTreeMap<String, TopicLedger> = BTreeMap::new();
    for row in rows {
        let counts = Counts {
            active: count(row.active),
            reserved: count(row.reserved),
            used: count(row.used),
            expired: count(row.expired),
            rejected: count(row.rejected),
            stopped: count(row.stopped),
            expiring_soon: count(row.expiring_soon),
            subscribers: count(row.subscribers),
        };
        let topic = topics
            .entry(row.topic.clone())
            .or_insert_with(|| TopicLedger {
                topic: row.topic,
                ..TopicLedger::default()
            });
        topic.total.add(&counts);
        topic.by_kind.push((row.kind, counts));
    }
    for row in distinct {
        if let Some(topic) = topics.get_mut(&row.topic) {
            topic.total.subscribers = count(row.subscribers);
        }
    }
    for topic in topics.values_mut() {
        topic.by_kind.sort_by_key(|(kind, _)| *kind);
    }
    for row in requests {
        topics
            .entry(row.topic.clone())
            .or_insert_with(|| TopicLedger {
                topic: row.topic.clone(),
                ..TopicLedger::default()
            })
            .requests_sent = count(row.requests_sent);
    }
    Ok(topics.into_values().collect())
}

/// Which opt-ins to list.
#[derive(Clone, Debug, Default)]
pub struct OptInFilter {
    pub topic: Option<Topic>,
    pub psid: Option<Psid>,
    pub state: Option<OptInState>,
    pub kind: Option<TokenKind>,
}

/// Up to `limit` opt-ins of the page by id, after `after_id`.
pub async fn list(
    db: &impl ConnectionTrait,
    page_id: &PageId,
    filter: &OptInFilter,
    after_id: Option<i64>,
    limit: u64,
    now: i64,
) -> Result<Vec<Model>, StoreError> {
    let mut query = Entity::find()
        .filter(Column::PageId.eq(page_id.as_str()))
        .order_by_asc(Column::Id)
        .limit(limit);
    if let Some(after) = after_id {
        query = query.filter(Column::Id.gt(after));
    }
    if let Some(topic) = &filter.topic {
        query = query.filter(Column::Topic.eq(topic.as_str()));
    }
    if let Some(psid) = &filter.psid {
        query = query.filter(Column::Psid.eq(psid.as_str()));
    }
    if let Some(kind) = filter.kind {
        query = query.filter(Column::Kind.eq(kind));
    }
    query = match filter.state {
        None => query,
        Some(OptInState::Active) => query
            .filter(Column::State.eq(OptInState::Active))
            .filter(Column::ExpiresAt.gt(now)),
        Some(OptInState::Expired) => query.filter(
            Condition::any()
                .add(Column::State.eq(OptInState::Expired))
                .add(
                    Condition::all()
                        .add(Column::State.eq(OptInState::Active))
                        .add(Column::ExpiresAt.lte(now)),
                ),
        ),
        Some(state) => query.filter(Column::State.eq(state)),
    };
    Ok(query.all(db).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::OptInEvent::{Lapse, Release, Reserve, Spend},
        store::{
            now_ms,
            testing::{TestStore, cipher, store_tests},
        },
    };

    async fn state(t: &TestStore, id: i64) -> (OptInState, Option<i64>) {
        let row = t.opt_in_row(id).await;
        (row.state, row.used_at)
    }

    fn opt_in_event(psid: &str, at: i64, token: &str) -> IncomingEvent {
        IncomingEvent {
            psid: Psid::parse(psid).unwrap(),
            at_ms: at,
            kind: EventKind::OptIn {
                topic: Topic::parse("news").unwrap(),
                token: OptInToken::parse(token).unwrap(),
                recurring: None,
            },
        }
    }

    async fn ingested(t: &TestStore, page: &PageId, events: Vec<IncomingEvent>) -> IngestReport {
        ingest(t.db(), &cipher(), &[(page.clone(), events)])
            .await
            .unwrap()
    }

    #[test]
    fn an_event_is_guarded_by_the_states_it_leaves() {
        let mut sql = Sql::new(sea_orm::DatabaseBackend::Sqlite);
        guard(&mut sql, Lapse, "o.state");
        assert_eq!(
            sql.statement().sql,
            " AND o.state IN ('active', 'reserved', 'stopped')"
        );
    }

    store_tests! {
        async fn reserving_an_opt_in_twice_reserves_it_once(t) {
            let page = t.page("1").await;
            let id = t.opt_in(&page, "u", "news", "t1", now_ms()).await.id;
            assert_eq!(apply(t.db(), Reserve, &[id], 1).await.unwrap(), 1);
            assert_eq!(apply(t.db(), Reserve, &[id], 2).await.unwrap(), 0);
            assert_eq!(state(&t, id).await, (OptInState::Reserved, None));
        }

        /// Of the opt-ins named, only those in a state the event leaves move.
        async fn an_event_moves_only_the_opt_ins_in_a_state_it_leaves(t) {
            let page = t.page("1").await;
            let active = t.opt_in(&page, "a", "news", "t1", now_ms()).await.id;
            let reserved = t.opt_in(&page, "b", "news", "t2", now_ms()).await.id;
            apply(t.db(), Reserve, &[reserved], 1).await.unwrap();
            assert_eq!(
                apply(t.db(), Release, &[active, reserved], 2)
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(state(&t, active).await.0, OptInState::Active);
            assert_eq!(state(&t, reserved).await.0, OptInState::Active);
            assert_eq!(apply(t.db(), Spend, &[active], 3).await.unwrap(), 0);
            assert_eq!(state(&t, active).await, (OptInState::Active, None));
        }

        /// A token is spent once, and when it was spent is the first time's.
        async fn spending_a_token_twice_records_the_first_use_only(t) {
            let page = t.page("1").await;
            let id = t.opt_in(&page, "u", "news", "t1", now_ms()).await.id;
            apply(t.db(), Reserve, &[id], 1).await.unwrap();
            assert_eq!(apply(t.db(), Spend, &[id], 100).await.unwrap(), 1);
            assert_eq!(apply(t.db(), Spend, &[id], 200).await.unwrap(), 0);
            assert_eq!(state(&t, id).await, (OptInState::Used, Some(100)));
            assert_eq!(
                apply(t.db(), Lapse, &[id], 300).await.unwrap(),
                0,
                "a used token stays used"
            );
        }

        async fn a_lapse_expires_active_and_reserved_opt_ins_alike(t) {
            let page = t.page("1").await;
            let active = t.opt_in(&page, "a", "news", "t1", now_ms()).await.id;
            let reserved = t.opt_in(&page, "b", "news", "t2", now_ms()).await.id;
            apply(t.db(), Reserve, &[reserved], 1).await.unwrap();
            assert_eq!(
                apply(t.db(), Lapse, &[active, reserved], 2).await.unwrap(),
                2
            );
            assert_eq!(state(&t, active).await.0, OptInState::Expired);
            assert_eq!(state(&t, reserved).await.0, OptInState::Expired);
        }

        /// Facebook redelivers webhooks: a token seen before (in this batch or an earlier one,
        /// for whichever user) changes nothing.
        async fn ingesting_a_token_twice_stores_it_once_as_first_seen(t) {
            let page = t.page("1").await;
            let now = now_ms();
            let first = ingested(
                &t,
                &page,
                vec![opt_in_event("u", now, "t1"), opt_in_event("u", now, "t1")],
            )
            .await;
            assert_eq!((first.events, first.opt_ins_created), (2, 1));
            let again = ingested(&t, &page, vec![opt_in_event("v", now + 5, "t1")]).await;
            assert_eq!((again.events, again.opt_ins_created), (1, 0));
            let stored = list(t.db(), &page, &OptInFilter::default(), None, 10, now)
                .await
                .unwrap();
            assert_eq!(stored.len(), 1);
            assert_eq!((stored[0].psid.as_str(), stored[0].opted_in_at), ("u", now));
        }

        /// After an erasure, what only says the user is there, or happened before it, is
        /// dropped; a new opt-in after it brings the user back.
        async fn events_about_an_erased_user_are_dropped_unless_they_act_after_the_erasure(t) {
            let page = t.page("1").await;
            let erased_at = now_ms();
            let digest = erasures::digest(&cipher(), page.as_str(), "u");
            erasures::remember(t.db(), page.as_str(), &digest, erased_at)
                .await
                .unwrap();
            let seen = IncomingEvent {
                psid: Psid::parse("u").unwrap(),
                at_ms: erased_at + 10,
                kind: EventKind::Seen,
            };
            let events = vec![
                opt_in_event("u", erased_at - 1, "before"),
                seen,
                opt_in_event("u", erased_at + 10, "after"),
                opt_in_event("v", erased_at - 1, "someone-else"),
            ];
            let report = ingested(&t, &page, events).await;
            assert_eq!(
                (report.events, report.dropped_erased, report.opt_ins_created),
                (4, 2, 2)
            );
            let tokens: Vec<String> =
                list(t.db(), &page, &OptInFilter::default(), None, 10, erased_at)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|o| o.token)
                    .collect();
            assert_eq!(tokens, ["after", "someone-else"]);
        }

        async fn an_unknown_token_is_not_found(t) {
            let page = t.page("1").await;
            let token = OptInToken::parse("nope").unwrap();
            assert!(matches!(
                find_by_token(t.db(), &page, &token).await,
                Err(StoreError::NotFound)
            ));
        }

        /// Each opt-in counts once, by its state as read now: an active one past its expiry is
        /// expired; requests count for their topic even where no opt-in is.
        async fn the_ledger_counts_each_opt_in_by_its_state_at_now(t) {
            let page = t.page("1").await;
            let now = now_ms();
            let day = 24 * 60 * 60 * 1000;
            t.opt_in(&page, "a", "news", "active", now).await;
            t.opt_in(
                &page,
                "a",
                "news",
                "soon",
                now - OPT_IN_LIFETIME_MS + 10 * day,
            )
            .await;
            t.opt_in(&page, "b", "news", "lapsed", now - OPT_IN_LIFETIME_MS - 1)
                .await;
            let used = t.opt_in(&page, "c", "news", "used", now).await.id;
            let reserved = t.opt_in(&page, "d", "news", "reserved", now).await.id;
            apply(t.db(), Reserve, &[used, reserved], now)
                .await
                .unwrap();
            apply(t.db(), Spend, &[used], now).await.unwrap();
            let psid = Psid::parse("e").unwrap();
            for topic in ["news", "sport"] {
                let topic = Topic::parse(topic).unwrap();
                let request = SentRequest {
                    page_id: &page,
                    psid: &psid,
                    topic: &topic,
                    title: "Title",
                    kind: TokenKind::OneTime,
                    message_id: "m1",
                    sent_at: now,
                };
                record_request(t.db(), request).await.unwrap();
            }
            let ledger = ledger(t.db(), &page, now).await.unwrap();
            let counts = Counts {
                active: 2,
                reserved: 1,
                used: 1,
                expired: 1,
                rejected: 0,
                stopped: 0,
                expiring_soon: 1,
                subscribers: 4,
            };
            let news = TopicLedger {
                topic: "news".into(),
                total: counts.clone(),
                by_kind: vec![(TokenKind::OneTime, counts)],
                requests_sent: 1,
            };
            let sport = TopicLedger {
                topic: "sport".into(),
                requests_sent: 1,
                ..Default::default()
            };
            assert_eq!(ledger, [news, sport]);
        }

        /// A recurring token is kept with its terms and no expiry; STOP and RESUME move it in
        /// the user's order, a late one changing nothing; one without the token applies to the
        /// user's tokens on the topic; a token first seen with a STOP is kept, stopped.
        async fn recurring_tokens_stop_and_resume_in_the_users_order(t) {
            use crate::domain::SubscriptionChange::{Resume, Stop};
            let page = t.page("1").await;
            let token = t.recurring_opt_in(&page, "u", "deals", "rt", None).await;
            assert_eq!(
                (token.kind, token.state, token.expiry(), token.timezone.as_deref()),
                (TokenKind::Recurring, OptInState::Active, None, Some("Europe/London"))
            );
            let at = now_ms();
            t.recurring_opt_in(&page, "u", "deals", "rt", Some((Stop, at))).await;
            assert_eq!(t.opt_in_by_token(&page, "rt").await.state, OptInState::Stopped);
            // A RESUME from before the STOP, arriving late: nothing moves.
            let late = t.recurring_opt_in(&page, "u", "deals", "rt", Some((Resume, at - 5))).await;
            assert_eq!(late.state, OptInState::Stopped);
            // A RESUME without the token, after the STOP.
            let event = IncomingEvent {
                psid: Psid::parse("u").unwrap(),
                at_ms: at + 5,
                kind: EventKind::SubscriptionChange {
                    topic: Some(Topic::parse("deals").unwrap()),
                    change: Resume,
                },
            };
            ingested(&t, &page, vec![event.clone()]).await;
            assert_eq!(t.opt_in_by_token(&page, "rt").await.state, OptInState::Active);
            // The same again (a redelivery) changes nothing, nor does a resume of another topic.
            ingested(&t, &page, vec![event]).await;
            assert_eq!(t.opt_in_by_token(&page, "rt").await.status_at, Some(at + 5));
            let first_seen_stopped =
                t.recurring_opt_in(&page, "v", "deals", "rv", Some((Stop, at))).await;
            assert_eq!(first_seen_stopped.state, OptInState::Stopped);
            // A one-time token is never stopped by a STOP of its user.
            let one_time = t.opt_in(&page, "u", "deals", "ot", at).await;
            let stop_all = IncomingEvent {
                psid: Psid::parse("u").unwrap(),
                at_ms: at + 10,
                kind: EventKind::SubscriptionChange { topic: None, change: Stop },
            };
            ingested(&t, &page, vec![stop_all]).await;
            assert_eq!(t.opt_in_row(one_time.id).await.state, OptInState::Active);
            assert_eq!(t.opt_in_by_token(&page, "rt").await.state, OptInState::Stopped);

            let ledger = ledger(t.db(), &page, now_ms()).await.unwrap();
            let deals = &ledger[0];
            assert_eq!(
                (deals.total.active, deals.total.stopped, deals.total.subscribers),
                (1, 2, 2)
            );
            let kinds: Vec<(TokenKind, u64, u64)> = deals
                .by_kind
                .iter()
                .map(|(kind, c)| (*kind, c.active, c.stopped))
                .collect();
            assert_eq!(
                kinds,
                [(TokenKind::OneTime, 1, 0), (TokenKind::Recurring, 0, 2)]
            );
            let recurring_only = OptInFilter {
                kind: Some(TokenKind::Recurring),
                ..Default::default()
            };
            let listed = list(t.db(), &page, &recurring_only, None, 10, now_ms()).await.unwrap();
            assert_eq!(listed.len(), 2);
        }

        async fn listing_by_state_reads_each_opt_in_as_it_is_at_now(t) {
            let page = t.page("1").await;
            let now = now_ms();
            let live = t.opt_in(&page, "a", "news", "live", now).await.id;
            let lapsed = t
                .opt_in(&page, "b", "news", "lapsed", now - OPT_IN_LIFETIME_MS)
                .await
                .id;
            let other = t.opt_in(&page, "a", "sport", "other", now).await.id;
            let (db, page) = (t.db(), &page);
            let ids = |filter: OptInFilter, after: Option<i64>| async move {
                list(db, page, &filter, after, 10, now)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|o| o.id)
                    .collect::<Vec<_>>()
            };
            let by_state = |state| OptInFilter {
                state: Some(state),
                ..Default::default()
            };
            assert_eq!(ids(by_state(OptInState::Active), None).await, [live, other]);
            assert_eq!(ids(by_state(OptInState::Expired), None).await, [lapsed]);
            let news = OptInFilter {
                topic: Some(Topic::parse("news").unwrap()),
                ..Default::default()
            };
            assert_eq!(ids(news, Some(live)).await, [lapsed]);
            let of_a = OptInFilter {
                psid: Some(Psid::parse("a").unwrap()),
                ..Default::default()
            };
            assert_eq!(ids(of_a, None).await, [live, other]);
        }
    }
}
