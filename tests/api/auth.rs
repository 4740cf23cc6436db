//! API keys and roles: viewer reads, operator also writes audience/opt-ins/stories/sends, admin
//! also manages pages; health and reflection need no key.

use otnd::pb::{GetPageRequest, RecordInteractionRequest};
use tonic::{Code, Request, metadata::MetadataValue};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    pages::create_request,
    support::{TestApp, TestDatabase, code_of, spawn_app_with},
};

const ADMIN: &str = "admin-key-0123456789";
const OPERATOR: &str = "operator-key-0123456";
const VIEWER: &str = "viewer-key-012345678";

async fn app_with_keys(db: &TestDatabase) -> TestApp {
    let keys = format!("admin:{ADMIN},operator:{OPERATOR},viewer:{VIEWER}");
    spawn_app_with(db, &[("OTN_API_KEYS", &keys)]).await
}

fn with_key<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {key}")).unwrap(),
        );
    }
    request
}

/// The code each call gets: a read (GetPage), an admin write (CreatePage) and an operator write
/// (RecordInteraction).
async fn codes(app: &mut TestApp, key: Option<&str>, page_id: &str) -> (Code, Code, Code) {
    let read = code_of(
        app.pages
            .get_page(with_key(
                GetPageRequest {
                    page_id: "1".into(),
                },
                key,
            ))
            .await,
    );
    let admin_write = code_of(
        app.pages
            .create_page(with_key(create_request(page_id), key))
            .await,
    );
    let interaction = RecordInteractionRequest {
        page_id: "1".into(),
        psid: "2".into(),
        interaction_time: None,
    };
    let operator_write = code_of(
        app.audience
            .record_interaction(with_key(interaction, key))
            .await,
    );
    (read, admin_write, operator_write)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_what_it_is_granted_and_no_more() {
    let db = TestDatabase::sqlite();
    let mut app = app_with_keys(&db).await;
    app.pages
        .create_page(with_key(create_request("1"), Some(ADMIN)))
        .await
        .unwrap();

    use Code::*;
    assert_eq!(
        codes(&mut app, None, "10").await,
        (Unauthenticated, Unauthenticated, Unauthenticated),
        "no key"
    );
    assert_eq!(
        codes(&mut app, Some("wrong-key-0123456789"), "11").await,
        (Unauthenticated, Unauthenticated, Unauthenticated),
        "unknown key"
    );
    assert_eq!(
        codes(&mut app, Some(VIEWER), "12").await,
        (Ok, PermissionDenied, PermissionDenied),
        "viewer"
    );
    assert_eq!(
        codes(&mut app, Some(OPERATOR), "13").await,
        (Ok, PermissionDenied, Ok),
        "operator"
    );
    assert_eq!(
        codes(&mut app, Some(ADMIN), "14").await,
        (Ok, Ok, Ok),
        "admin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_what_is_missing() {
    let db = TestDatabase::sqlite();
    let mut app = app_with_keys(&db).await;
    let status = app
        .pages
        .create_page(with_key(create_request("20"), None))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("authorization: Bearer"),
        "{status:?}"
    );
    let status = app
        .pages
        .create_page(with_key(create_request("20"), Some(VIEWER)))
        .await
        .unwrap_err();
    assert!(
        status
            .message()
            .contains("viewer role may not call otn.v1.PageService/CreatePage")
            && status.message().contains("admin"),
        "{status:?}"
    );
    // A key in another case of the scheme is still a bearer key.
    let mut request = Request::new(GetPageRequest {
        page_id: "20".into(),
    });
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("bearer {VIEWER}")).unwrap(),
    );
    assert_eq!(
        app.pages.get_page(request).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_need_no_key() {
    let db = TestDatabase::sqlite();
    let app = app_with_keys(&db).await;
    let mut health = HealthClient::new(app.channel.clone());
    let response = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let services = crate::health::list_services_v1(&app).await;
    assert!(
        services.contains(&"otn.v1.PageService".to_string()),
        "{services:?}"
    );
}
