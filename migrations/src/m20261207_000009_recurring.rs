use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DatabaseBackend},
};

/// Recurring notification tokens (`notification_messages`) in the same ledger and engine as
/// one-time tokens:
/// - `optins.kind` (`one_time` for every earlier row), the recurring opt-in's `title`,
///   `timezone` and `token_status` (Facebook's `user_token_status`), and `status_at`: the
///   time of the last STOP or RESUME applied, so that one arriving late cannot undo a newer one.
///   A stopped token is in the new state `stopped`.
/// - `deliveries.route` gains `recurring`. A recurring token is reusable, so it may be bound to
///   one delivery per send: the one-delivery-per-token key now holds for one-time tokens only.
///   A partial index on recurring deliveries finds who was messaged within the cooldown.
/// - `stories.token_kinds` and `sends.token_kinds`: which kinds of token a story's audience
///   takes ('' is every kind), frozen on the send when it starts with the recurring cooldown
///   in force then (`sends.recurring_cooldown_ms`).
/// - `optin_requests.kind`: the weekly rule for recurring opt-in requests counts those only.
///
/// SQLite cannot change a CHECK constraint: `optins` and `deliveries` are rebuilt, as the
/// lifecycle migration rebuilt them, in one transaction.
#[derive(DeriveMigrationName)]
pub struct Migration;

const DELIVERY_STATES: &str = "state = 'pending' OR state = 'in_flight' OR state = 'sent' \
     OR state = 'failed' OR state = 'skipped' OR state = 'unknown'";
const OPTIN_STATES: &str = "state = 'active' OR state = 'reserved' OR state = 'used' \
     OR state = 'rejected' OR state = 'expired' OR state = 'stopped'";
const ROUTES: &str = "route = 'token' OR route = 'window' OR route = 'recurring'";
const KINDS: &str = "kind = 'one_time' OR kind = 'recurring'";

/// Indexes of `deliveries` and `optins` as they stand after this migration (SQLite recreates
/// them after the rebuild; PostgreSQL keeps the ones it has and swaps the changed one).
const UNIQUE_ONE_TIME_TOKEN: &str =
    "CREATE UNIQUE INDEX uq_deliveries_optin ON deliveries (optin_id) WHERE route = 'token'";
/// A send's audience is read from this index alone: the kind joins the columns a step chooses
/// each user's token by.
const OPTINS_BY_TOPIC: &str = "CREATE INDEX idx_optins_page_topic_psid ON optins \
     (page_id, topic, psid, state, expires_at, kind)";
const RECURRING_BY_RECIPIENT: &str = "CREATE INDEX idx_deliveries_recurring ON deliveries \
     (page_id, psid, updated_at) WHERE route = 'recurring'";

fn sqlite_rebuild() -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE optins_new ( id integer NOT NULL PRIMARY KEY AUTOINCREMENT, \
             page_id varchar NOT NULL, psid varchar NOT NULL, topic varchar NOT NULL, \
             token varchar NOT NULL, opted_in_at integer NOT NULL, expires_at integer NOT NULL, \
             state varchar NOT NULL, used_at integer NULL, delivery_id varchar NULL, \
             kind varchar NOT NULL DEFAULT 'one_time', title varchar NULL, \
             timezone varchar NULL, token_status varchar NULL, status_at integer NULL, \
             FOREIGN KEY (page_id) REFERENCES pages (id) ON DELETE CASCADE, \
             CONSTRAINT ck_optins_state CHECK ({OPTIN_STATES}), \
             CONSTRAINT ck_optins_kind CHECK ({KINDS}) )"
        ),
        "INSERT INTO optins_new (id, page_id, psid, topic, token, opted_in_at, expires_at, state, \
         used_at, delivery_id) SELECT id, page_id, psid, topic, token, opted_in_at, expires_at, \
         state, used_at, delivery_id FROM optins"
            .into(),
        "DROP TABLE optins".into(),
        "ALTER TABLE optins_new RENAME TO optins".into(),
        "CREATE UNIQUE INDEX uq_optins_page_token ON optins (page_id, token)".into(),
        OPTINS_BY_TOPIC.into(),
        "CREATE INDEX idx_optins_page_psid ON optins (page_id, psid)".into(),
        format!(
            "CREATE TABLE deliveries_new ( id integer NOT NULL PRIMARY KEY AUTOINCREMENT, \
             send_id varchar NOT NULL, page_id varchar NOT NULL, psid varchar NOT NULL, \
             route varchar NOT NULL, optin_id integer NULL, state varchar NOT NULL, \
             attempts integer NOT NULL, claim integer NOT NULL DEFAULT 0, \
             ambiguous boolean NOT NULL, confirmed_by_token boolean NOT NULL, \
             next_attempt_at integer NOT NULL, message_id varchar NULL, error_code integer NULL, \
             error_subcode integer NULL, error_message text NULL, updated_at integer NOT NULL, \
             FOREIGN KEY (send_id) REFERENCES sends (id) ON DELETE CASCADE, \
             CONSTRAINT ck_deliveries_state CHECK ({DELIVERY_STATES}), \
             CONSTRAINT ck_deliveries_route CHECK ({ROUTES}), \
             CONSTRAINT ck_deliveries_window_has_no_optin CHECK \
             (route <> 'window' OR optin_id IS NULL), \
             CONSTRAINT ck_deliveries_counts CHECK (attempts >= 0 AND claim >= 0) )"
        ),
        "INSERT INTO deliveries_new (id, send_id, page_id, psid, route, optin_id, state, \
         attempts, claim, ambiguous, confirmed_by_token, next_attempt_at, message_id, error_code, \
         error_subcode, error_message, updated_at) SELECT id, send_id, page_id, psid, route, \
         optin_id, state, attempts, claim, ambiguous, confirmed_by_token, next_attempt_at, \
         message_id, error_code, error_subcode, error_message, updated_at FROM deliveries"
            .into(),
        "DROP TABLE deliveries".into(),
        "ALTER TABLE deliveries_new RENAME TO deliveries".into(),
        "CREATE UNIQUE INDEX uq_deliveries_send_psid ON deliveries (send_id, psid)".into(),
        UNIQUE_ONE_TIME_TOKEN.into(),
        "CREATE INDEX idx_deliveries_send_id ON deliveries (send_id, id)".into(),
        "CREATE INDEX idx_deliveries_pending ON deliveries (send_id, id) WHERE state = 'pending'"
            .into(),
        RECURRING_BY_RECIPIENT.into(),
    ]
}

fn postgres_alter() -> Vec<String> {
    vec![
        "ALTER TABLE optins ADD COLUMN kind varchar NOT NULL DEFAULT 'one_time'".into(),
        "ALTER TABLE optins ADD COLUMN title varchar NULL".into(),
        "ALTER TABLE optins ADD COLUMN timezone varchar NULL".into(),
        "ALTER TABLE optins ADD COLUMN token_status varchar NULL".into(),
        "ALTER TABLE optins ADD COLUMN status_at bigint NULL".into(),
        "ALTER TABLE optins DROP CONSTRAINT ck_optins_state".into(),
        format!("ALTER TABLE optins ADD CONSTRAINT ck_optins_state CHECK ({OPTIN_STATES})"),
        format!("ALTER TABLE optins ADD CONSTRAINT ck_optins_kind CHECK ({KINDS})"),
        "ALTER TABLE deliveries DROP CONSTRAINT ck_deliveries_route".into(),
        format!("ALTER TABLE deliveries ADD CONSTRAINT ck_deliveries_route CHECK ({ROUTES})"),
        "ALTER TABLE deliveries DROP CONSTRAINT ck_deliveries_window_has_no_optin".into(),
        "ALTER TABLE deliveries ADD CONSTRAINT ck_deliveries_window_has_no_optin CHECK \
         (route <> 'window' OR optin_id IS NULL)"
            .into(),
        "DROP INDEX idx_optins_page_topic_psid".into(),
        OPTINS_BY_TOPIC.into(),
        "DROP INDEX uq_deliveries_optin".into(),
        UNIQUE_ONE_TIME_TOKEN.into(),
        RECURRING_BY_RECIPIENT.into(),
    ]
}

/// Columns added alike on both backends.
const COMMON: &[&str] = &[
    "ALTER TABLE stories ADD COLUMN token_kinds varchar NOT NULL DEFAULT ''",
    "ALTER TABLE sends ADD COLUMN token_kinds varchar NOT NULL DEFAULT ''",
    "ALTER TABLE sends ADD COLUMN recurring_cooldown_ms bigint NOT NULL DEFAULT 172800000",
    "ALTER TABLE optin_requests ADD COLUMN kind varchar NOT NULL DEFAULT 'one_time'",
    "CREATE INDEX idx_optin_requests_page_psid ON optin_requests (page_id, psid, sent_at)",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// One transaction on SQLite too: the rebuild is all or nothing, on one connection.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let statements = match db.get_database_backend() {
            DatabaseBackend::Sqlite => sqlite_rebuild(),
            _ => postgres_alter(),
        };
        for statement in statements
            .iter()
            .map(String::as_str)
            .chain(COMMON.iter().copied())
        {
            db.execute_unprepared(statement).await?;
        }
        Ok(())
    }

    async fn down(&self, _manager: &SchemaManager) -> Result<(), DbErr> {
        Err(DbErr::Migration(
            "recurring tokens are not undone: restore a backup taken before the upgrade instead"
                .into(),
        ))
    }
}
