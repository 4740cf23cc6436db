//! Upgrading a database an earlier version left behind: the lifecycle migration repairs what the
//! old engine could leave (pending deliveries in a cancelled send, opt-ins reserved for nothing,
//! released opt-ins still bound, counters that drifted), then its CHECK constraints hold, and
//! they hold exactly the domain's states.

use migration::{Migrator, MigratorTrait};
use otnd::domain::{DeliveryState, OptInState, SendState};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

use crate::{backend_tests, ledger, support::TestDatabase};

/// The migrations before the lifecycle one.
const BEFORE_LIFECYCLE: u32 = 5;

async fn run(db: &DatabaseConnection, sql: &str) {
    db.execute_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn state_of(db: &DatabaseConnection, table: &str, id: &str) -> String {
    db.query_one_raw(Statement::from_string(
        db.get_database_backend(),
        format!("SELECT state FROM {table} WHERE id = {id}"),
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get::<String>("", "state")
    .unwrap()
}

async fn upgrade(db: TestDatabase) {
    let conn = Database::connect(&db.url).await.unwrap();
    Migrator::up(&conn, Some(BEFORE_LIFECYCLE)).await.unwrap();
    // What the old engine could leave behind.
    for sql in [
        "INSERT INTO pages (id, name, access_token_enc, app_secret_enc, verify_token_enc, \
         send_rate_per_second, created_at, updated_at) VALUES ('1', 'Old', '', '', NULL, 10, 0, 0)",
        "INSERT INTO stories (id, page_id, topic, content, content_hash, include_window_users, \
         segment_id, reviewed_hash, reviewed_at, reviewer_psid, state, version, created_at, \
         updated_at) VALUES ('st', '1', 'T', '{}', 'h', FALSE, NULL, 'h', 0, NULL, 'sent', 1, 0, 0)",
        // A cancelled send whose counters drifted (in_flight below zero).
        "INSERT INTO sends (id, story_id, page_id, request_id, state, topic, message, \
         include_window_users, segment_rule, audience_phase, audience_cursor, total, in_flight, \
         sent, failed, skipped, unknown, last_error, created_at, started_at, finished_at, \
         updated_at) VALUES ('s1', 'st', '1', 'r1', 'cancelled', 'T', '{}', FALSE, NULL, 'done', \
         '', 9, -3, 1, 0, 0, 0, '', 0, 0, 0, 0)",
        // Opt-ins: 1 pending (plain), 2 pending after an ambiguous attempt, 3 sent but still
        // reserved, 4 failed (not refused) and reserved, 5 reserved by no delivery, 6 released
        // while its skipped delivery kept it.
        "INSERT INTO optins (id, page_id, psid, topic, token, opted_in_at, expires_at, state, \
         used_at, delivery_id) VALUES \
         (1, '1', 'u1', 'T', 't1', 0, 9999999999999, 'reserved', NULL, NULL), \
         (2, '1', 'u2', 'T', 't2', 0, 9999999999999, 'reserved', NULL, NULL), \
         (3, '1', 'u3', 'T', 't3', 0, 9999999999999, 'reserved', NULL, NULL), \
         (4, '1', 'u4', 'T', 't4', 0, 9999999999999, 'reserved', NULL, NULL), \
         (5, '1', 'u5', 'T', 't5', 0, 9999999999999, 'reserved', NULL, NULL), \
         (6, '1', 'u6', 'T', 't6', 0, 9999999999999, 'active', NULL, NULL)",
        "INSERT INTO deliveries (id, send_id, page_id, psid, route, optin_id, state, attempts, \
         ambiguous, confirmed_by_token, next_attempt_at, message_id, error_code, error_subcode, \
         error_message, updated_at) VALUES \
         (11, 's1', '1', 'u1', 'token', 1, 'pending', 1, FALSE, FALSE, 0, NULL, NULL, NULL, NULL, 0), \
         (12, 's1', '1', 'u2', 'token', 2, 'pending', 1, TRUE, FALSE, 0, NULL, NULL, NULL, NULL, 0), \
         (13, 's1', '1', 'u3', 'token', 3, 'sent', 1, FALSE, FALSE, 0, 'm3', NULL, NULL, NULL, 0), \
         (14, 's1', '1', 'u4', 'token', 4, 'failed', 5, FALSE, FALSE, 0, NULL, 2, NULL, 'x', 0), \
         (16, 's1', '1', 'u6', 'token', 6, 'skipped', 0, FALSE, FALSE, 0, NULL, NULL, NULL, NULL, 0), \
         (17, 's1', '1', 'w1', 'window', NULL, 'pending', 0, FALSE, FALSE, 0, NULL, NULL, NULL, NULL, 0)",
    ] {
        run(&conn, sql).await;
    }
    Migrator::up(&conn, None).await.unwrap();

    // The pending ones ended: unknown when an attempt may have landed, skipped otherwise.
    assert_eq!(state_of(&conn, "deliveries", "11").await, "skipped");
    assert_eq!(state_of(&conn, "deliveries", "12").await, "unknown");
    assert_eq!(state_of(&conn, "deliveries", "17").await, "skipped");
    // Opt-ins settled as the service settles them now.
    assert_eq!(state_of(&conn, "optins", "1").await, "active");
    assert_eq!(state_of(&conn, "optins", "2").await, "used");
    assert_eq!(state_of(&conn, "optins", "3").await, "used");
    assert_eq!(state_of(&conn, "optins", "4").await, "active");
    assert_eq!(state_of(&conn, "optins", "5").await, "active");
    let _ = conn.close().await;
    // Counters equal rows; no released opt-in is bound; nothing reserved for nothing.
    ledger::assert_rows_hold(&db.url, None).await;

    // The constraints hold exactly the domain's states.
    let conn = Database::connect(&db.url).await.unwrap();
    for state in DeliveryState::ALL {
        run(
            &conn,
            &format!("UPDATE deliveries SET state = '{state}' WHERE id = 13"),
        )
        .await;
    }
    for state in SendState::ALL {
        run(
            &conn,
            &format!("UPDATE sends SET state = '{state}' WHERE id = 's1'"),
        )
        .await;
    }
    for state in OptInState::ALL {
        run(
            &conn,
            &format!("UPDATE optins SET state = '{state}' WHERE id = 3"),
        )
        .await;
    }
    let backend = conn.get_database_backend();
    for refused in [
        "UPDATE deliveries SET state = 'delivered' WHERE id = 13",
        "UPDATE deliveries SET route = 'email' WHERE id = 13",
        "UPDATE deliveries SET optin_id = 5 WHERE id = 17",
        "UPDATE sends SET state = 'done' WHERE id = 's1'",
        "UPDATE sends SET in_flight = -1 WHERE id = 's1'",
        "UPDATE sends SET sent = total + 1 WHERE id = 's1'",
        "UPDATE optins SET state = 'spent' WHERE id = 3",
    ] {
        let outcome = conn
            .execute_raw(Statement::from_string(backend, refused))
            .await;
        assert!(outcome.is_err(), "the schema took: {refused}");
    }
    let _ = conn.close().await;
}

backend_tests! {
    async fn an_old_database_is_repaired_and_then_constrained_to_the_lifecycle(db) {
        upgrade(db).await;
    }
}
