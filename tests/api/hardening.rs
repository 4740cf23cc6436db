//! The gRPC server's limits: request size, concurrency (shed with RESOURCE_EXHAUSTED), deadline.
//! A write is held in flight by locking the SQLite database from the test.

use std::time::Duration;

use otnd::pb::{CreatePageRequest, GetPageRequest, page_service_client::PageServiceClient};
use sea_orm::sqlx::{Connection, Executor, SqliteConnection};
use tonic::{Code, transport::Channel};

use crate::{
    pages::create_request,
    support::{TestDatabase, eventually, spawn_app, spawn_app_with, violated_fields},
};

/// Takes SQLite's write lock until `release` is called, so writes wait in the busy handler.
async fn lock_database(db: &TestDatabase) -> SqliteConnection {
    let mut conn = SqliteConnection::connect(&db.url).await.unwrap();
    conn.execute("BEGIN IMMEDIATE").await.unwrap();
    conn
}

async fn release(mut conn: SqliteConnection) {
    conn.execute("ROLLBACK").await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_one_mebibyte_are_refused_and_store_nothing() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app(&db).await;
    let status = app
        .pages
        .create_page(CreatePageRequest {
            name: "n".repeat(1024 * 1024 + 1),
            ..create_request("8001")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("1048576"), "{status:?}");
    let missing = app
        .pages
        .get_page(GetPageRequest {
            page_id: "8001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Just under the limit the request is decoded, and judged by the field's own rule.
    let status = app
        .pages
        .create_page(CreatePageRequest {
            name: "n".repeat(1000 * 1000),
            ..create_request("8001")
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["name"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_concurrency_limit_are_shed() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app_with(&db, &[("OTN_MAX_CONCURRENT_REQUESTS", "1")]).await;
    let lock = lock_database(&db).await;

    let hold = |mut pages: PageServiceClient<Channel>| {
        tokio::spawn(async move { pages.create_page(create_request("8101")).await })
    };
    let mut held = hold(app.pages.clone());
    // Generous: on a loaded CI machine (the fault suite and the fleet tests run alongside) the
    // held request can take seconds to reach the database lock.
    let shed = eventually(Duration::from_secs(20), "a request to be shed", || {
        // When the probe wins the only slot, the held request is the one shed: hold it again.
        if held.is_finished() {
            held = hold(app.pages.clone());
        }
        let mut pages = app.pages.clone();
        async move {
            match pages
                .get_page(GetPageRequest {
                    page_id: "8101".into(),
                })
                .await
            {
                Err(status) if status.code() == Code::ResourceExhausted => Some(status),
                _ => None,
            }
        }
    })
    .await;
    assert!(
        shed.message().contains("limit of 1 concurrent requests"),
        "{shed:?}"
    );

    release(lock).await;
    held.await
        .unwrap()
        .expect("the held request completes once the lock is gone");
    app.pages
        .get_page(GetPageRequest {
            page_id: "8101".into(),
        })
        .await
        .expect("served again once the slot is free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_deadline_gets_deadline_exceeded() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app_with(&db, &[("OTN_REQUEST_TIMEOUT_SECONDS", "1")]).await;
    let lock = lock_database(&db).await;
    let status = app
        .pages
        .create_page(create_request("8201"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("limit of 1 s"), "{status:?}");
    release(lock).await;
    app.pages
        .create_page(create_request("8202"))
        .await
        .expect("the service keeps working");
}
