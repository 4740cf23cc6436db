use sea_orm_migration::{
    prelude::*,
    sea_orm::{ConnectionTrait, DatabaseBackend},
};

/// The send lifecycle in the schema: the states and routes the service knows as CHECK
/// constraints, counters that can never go below zero or past the total, and a `claim` number
/// per delivery (an answer is recorded only against the claim it answers).
///
/// Before the constraints go on, what earlier versions could leave behind is repaired, so that
/// every row satisfies them and every send's counters equal its rows:
/// - deliveries left pending in a cancelled send end (`unknown` when an attempt may have
///   landed, `skipped` otherwise);
/// - opt-ins left `reserved` by deliveries that ended are settled the way the service now
///   settles them (spent, or released), and a released opt-in is unbound from its delivery;
/// - every send's counters are counted again from its deliveries.
///
/// SQLite cannot add a constraint to a table: `optins`, `sends` and `deliveries` are rebuilt
/// (in one transaction, the foreign keys kept pointing at the new tables).
#[derive(DeriveMigrationName)]
pub struct Migration;

const SEND_STATES: &[&str] = &[
    "queued",
    "running",
    "paused",
    "completed",
    "cancelled",
    "halted",
];
const DELIVERY_STATES: &[&str] = &[
    "pending",
    "in_flight",
    "sent",
    "failed",
    "skipped",
    "unknown",
];
const OPTIN_STATES: &[&str] = &["active", "reserved", "used", "rejected", "expired"];

/// `column = 'a' OR column = 'b' …`: on SQLite an `IN (…)` list in a CHECK constraint builds a
/// temporary index of its values each time a row is checked (it cost a third of SQLite's work in
/// an unpaced send); comparisons cost next to nothing.
fn one_of(column: &str, values: &[&str]) -> String {
    values
        .iter()
        .map(|v| format!("{column} = '{v}'"))
        .collect::<Vec<_>>()
        .join(" OR ")
}

fn send_checks() -> Vec<(&'static str, String)> {
    vec![
        ("ck_sends_state", one_of("state", SEND_STATES)),
        (
            "ck_sends_audience_phase",
            one_of("audience_phase", &["token", "window", "done"]),
        ),
        (
            "ck_sends_counters",
            "total >= 0 AND in_flight >= 0 AND sent >= 0 AND failed >= 0 AND skipped >= 0 \
             AND unknown >= 0 AND in_flight + sent + failed + skipped + unknown <= total"
                .into(),
        ),
    ]
}

fn delivery_checks() -> Vec<(&'static str, String)> {
    vec![
        ("ck_deliveries_state", one_of("state", DELIVERY_STATES)),
        ("ck_deliveries_route", one_of("route", &["token", "window"])),
        (
            "ck_deliveries_window_has_no_optin",
            "route = 'token' OR optin_id IS NULL".into(),
        ),
        (
            "ck_deliveries_counts",
            "attempts >= 0 AND claim >= 0".into(),
        ),
    ]
}

fn optin_checks() -> Vec<(&'static str, String)> {
    vec![("ck_optins_state", one_of("state", OPTIN_STATES))]
}

/// Statements that bring rows of earlier versions into line (portable SQL).
const REPAIRS: &[&str] = &[
    // Pending deliveries of finished sends end: spent when an attempt may have landed...
    "UPDATE optins SET state = 'used' WHERE state = 'reserved' AND id IN (SELECT d.optin_id \
     FROM deliveries d JOIN sends s ON s.id = d.send_id WHERE d.state = 'pending' \
     AND d.ambiguous AND s.state IN ('completed', 'cancelled'))",
    "UPDATE deliveries SET state = 'unknown', error_message = 'the send was cancelled while an \
     earlier attempt that may have landed waited to be settled' WHERE state = 'pending' \
     AND ambiguous AND send_id IN (SELECT id FROM sends WHERE state IN ('completed', 'cancelled'))",
    // ...skipped otherwise.
    "UPDATE deliveries SET state = 'skipped', error_message = 'the send was cancelled before \
     this delivery''s turn' WHERE state = 'pending' AND send_id IN (SELECT id FROM sends \
     WHERE state IN ('completed', 'cancelled'))",
    // The opt-in follows its delivery's end: sent or maybe sent, spent...
    "UPDATE optins SET state = 'used' WHERE state = 'reserved' AND id IN (SELECT optin_id \
     FROM deliveries WHERE state IN ('sent', 'unknown') AND optin_id IS NOT NULL)",
    // ...ended before any attempt could land (or reserved by no delivery at all), released.
    "UPDATE optins SET state = 'active' WHERE state = 'reserved' AND id NOT IN (SELECT optin_id \
     FROM deliveries WHERE state IN ('pending', 'in_flight', 'sent', 'unknown') \
     AND optin_id IS NOT NULL)",
    // A released opt-in is bound to no delivery, so that a later send can reserve it.
    "UPDATE deliveries SET optin_id = NULL WHERE state IN ('skipped', 'failed') \
     AND optin_id IN (SELECT id FROM optins WHERE state = 'active')",
    // Counters, counted from the rows.
    "UPDATE sends SET \
     total = (SELECT COUNT(*) FROM deliveries d WHERE d.send_id = sends.id), \
     in_flight = (SELECT COUNT(*) FROM deliveries d WHERE d.send_id = sends.id AND d.state = 'in_flight'), \
     sent = (SELECT COUNT(*) FROM deliveries d WHERE d.send_id = sends.id AND d.state = 'sent'), \
     failed = (SELECT COUNT(*) FROM deliveries d WHERE d.send_id = sends.id AND d.state = 'failed'), \
     skipped = (SELECT COUNT(*) FROM deliveries d WHERE d.send_id = sends.id AND d.state = 'skipped'), \
     unknown = (SELECT COUNT(*) FROM deliveries d WHERE d.send_id = sends.id AND d.state = 'unknown')",
];

fn checks_sql(checks: &[(&'static str, String)]) -> String {
    checks
        .iter()
        .map(|(name, check)| format!(", CONSTRAINT {name} CHECK ({check})"))
        .collect()
}

/// The three tables as they are, with the constraints and `claim` added (SQLite).
fn sqlite_rebuild() -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE optins_new ( id integer NOT NULL PRIMARY KEY AUTOINCREMENT, \
             page_id varchar NOT NULL, psid varchar NOT NULL, topic varchar NOT NULL, \
             token varchar NOT NULL, opted_in_at integer NOT NULL, expires_at integer NOT NULL, \
             state varchar NOT NULL, used_at integer NULL, delivery_id varchar NULL, \
             FOREIGN KEY (page_id) REFERENCES pages (id) ON DELETE CASCADE{} )",
            checks_sql(&optin_checks())
        ),
        "INSERT INTO optins_new (id, page_id, psid, topic, token, opted_in_at, expires_at, state, \
         used_at, delivery_id) SELECT id, page_id, psid, topic, token, opted_in_at, expires_at, \
         state, used_at, delivery_id FROM optins"
            .into(),
        "DROP TABLE optins".into(),
        "ALTER TABLE optins_new RENAME TO optins".into(),
        "CREATE UNIQUE INDEX uq_optins_page_token ON optins (page_id, token)".into(),
        "CREATE INDEX idx_optins_page_topic_psid ON optins (page_id, topic, psid, state, expires_at)"
            .into(),
        "CREATE INDEX idx_optins_page_psid ON optins (page_id, psid)".into(),
        format!(
            "CREATE TABLE sends_new ( id varchar NOT NULL PRIMARY KEY, story_id varchar NOT NULL, \
             page_id varchar NOT NULL, request_id varchar NOT NULL, state varchar NOT NULL, \
             topic varchar NOT NULL, message text NOT NULL, include_window_users boolean NOT NULL, \
             segment_rule text NULL, audience_phase varchar NOT NULL, \
             audience_cursor varchar NOT NULL, total integer NOT NULL, in_flight integer NOT NULL, \
             sent integer NOT NULL, failed integer NOT NULL, skipped integer NOT NULL, \
             unknown integer NOT NULL, last_error text NOT NULL, created_at integer NOT NULL, \
             started_at integer NULL, finished_at integer NULL, updated_at integer NOT NULL, \
             FOREIGN KEY (story_id) REFERENCES stories (id) ON DELETE RESTRICT, \
             FOREIGN KEY (page_id) REFERENCES pages (id) ON DELETE CASCADE{} )",
            checks_sql(&send_checks())
        ),
        "INSERT INTO sends_new SELECT id, story_id, page_id, request_id, state, topic, message, \
         include_window_users, segment_rule, audience_phase, audience_cursor, total, in_flight, \
         sent, failed, skipped, unknown, last_error, created_at, started_at, finished_at, \
         updated_at FROM sends"
            .into(),
        // Deliveries point at the new sends table: dropping the old one (an implicit DELETE)
        // then cascades into nothing, and renaming it carries the reference along.
        format!(
            "CREATE TABLE deliveries_new ( id integer NOT NULL PRIMARY KEY AUTOINCREMENT, \
             send_id varchar NOT NULL, page_id varchar NOT NULL, psid varchar NOT NULL, \
             route varchar NOT NULL, optin_id integer NULL, state varchar NOT NULL, \
             attempts integer NOT NULL, claim integer NOT NULL DEFAULT 0, \
             ambiguous boolean NOT NULL, confirmed_by_token boolean NOT NULL, \
             next_attempt_at integer NOT NULL, message_id varchar NULL, error_code integer NULL, \
             error_subcode integer NULL, error_message text NULL, updated_at integer NOT NULL, \
             FOREIGN KEY (send_id) REFERENCES sends_new (id) ON DELETE CASCADE{} )",
            checks_sql(&delivery_checks())
        ),
        "INSERT INTO deliveries_new (id, send_id, page_id, psid, route, optin_id, state, \
         attempts, claim, ambiguous, confirmed_by_token, next_attempt_at, message_id, error_code, \
         error_subcode, error_message, updated_at) SELECT id, send_id, page_id, psid, route, \
         optin_id, state, attempts, attempts, ambiguous, confirmed_by_token, next_attempt_at, \
         message_id, error_code, error_subcode, error_message, updated_at FROM deliveries"
            .into(),
        "DROP TABLE deliveries".into(),
        "DROP TABLE sends".into(),
        "ALTER TABLE sends_new RENAME TO sends".into(),
        "ALTER TABLE deliveries_new RENAME TO deliveries".into(),
        "CREATE UNIQUE INDEX uq_sends_request_id ON sends (request_id)".into(),
        "CREATE INDEX idx_sends_page_created ON sends (page_id, created_at)".into(),
        "CREATE INDEX idx_sends_state ON sends (state)".into(),
        "CREATE UNIQUE INDEX uq_deliveries_send_psid ON deliveries (send_id, psid)".into(),
        "CREATE UNIQUE INDEX uq_deliveries_optin ON deliveries (optin_id)".into(),
        "CREATE INDEX idx_deliveries_send_id ON deliveries (send_id, id)".into(),
        "CREATE INDEX idx_deliveries_pending ON deliveries (send_id, id) WHERE state = 'pending'"
            .into(),
    ]
}

fn postgres_alter() -> Vec<String> {
    let mut statements = vec![
        "ALTER TABLE deliveries ADD COLUMN claim integer NOT NULL DEFAULT 0".to_string(),
        "UPDATE deliveries SET claim = attempts".to_string(),
    ];
    for (table, checks) in [
        ("optins", optin_checks()),
        ("sends", send_checks()),
        ("deliveries", delivery_checks()),
    ] {
        for (name, check) in checks {
            statements.push(format!(
                "ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({check})"
            ));
        }
    }
    statements
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// One transaction on SQLite too: the rebuild is all or nothing, on one connection.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for repair in REPAIRS {
            db.execute_unprepared(repair).await?;
        }
        let statements = match db.get_database_backend() {
            DatabaseBackend::Sqlite => sqlite_rebuild(),
            _ => postgres_alter(),
        };
        for statement in statements {
            db.execute_unprepared(&statement).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DatabaseBackend::Sqlite {
            return Err(DbErr::Migration(
                "the lifecycle constraints are not undone on SQLite: restore a backup taken \
                 before the upgrade instead"
                    .into(),
            ));
        }
        for (table, checks) in [
            ("optins", optin_checks()),
            ("sends", send_checks()),
            ("deliveries", delivery_checks()),
        ] {
            for (name, _) in checks {
                db.execute_unprepared(&format!("ALTER TABLE {table} DROP CONSTRAINT {name}"))
                    .await?;
            }
        }
        db.execute_unprepared("ALTER TABLE deliveries DROP COLUMN claim")
            .await?;
        Ok(())
    }
}
