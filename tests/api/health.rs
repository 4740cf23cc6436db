//! grpc.health.v1, server reflection (v1 and v1alpha) and the HTTP /healthz.

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::support::{TestApp, TestDatabase, spawn_app, spawn_app_with};

const OUR_SERVICES: [&str; 5] = [
    "otn.v1.AudienceService",
    "otn.v1.OptInService",
    "otn.v1.PageService",
    "otn.v1.SendService",
    "otn.v1.StoryService",
];

/// One reflection request on a fresh stream, for either protocol version (the two generated
/// modules have the same shape).
macro_rules! reflect {
    ($version:ident, $app:expr, $request:ident($argument:expr)) => {{
        use $version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest,
        };
        let mut client = ServerReflectionClient::new($app.channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::$request($argument)),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        responses.next().await.unwrap().unwrap().message_response
    }};
}

macro_rules! list_services {
    ($version:ident, $app:expr) => {{
        use $version::server_reflection_response::MessageResponse;
        match reflect!($version, $app, ListServices(String::new())) {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }};
}

pub async fn list_services_v1(app: &TestApp) -> Vec<String> {
    list_services!(v1, app)
}

/// The reflection service describes the health service's messages too, which is what lets
/// `buf curl` and grpcurl call Health/Check with reflection alone.
async fn files_describing(app: &TestApp, symbol: &str) -> usize {
    use v1::server_reflection_response::MessageResponse;
    match reflect!(v1, app, FileContainingSymbol(symbol.to_string())) {
        Some(MessageResponse::FileDescriptorResponse(files)) => files.file_descriptor_proto.len(),
        other => panic!("no descriptor for {symbol}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_five_services_and_health_in_both_versions() {
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db).await;
    for services in [list_services!(v1, app), list_services!(v1alpha, app)] {
        for service in OUR_SERVICES {
            assert!(
                services.contains(&service.to_string()),
                "{service} in {services:?}"
            );
        }
        assert!(
            services.contains(&"grpc.health.v1.Health".to_string()),
            "{services:?}"
        );
    }
    assert!(files_describing(&app, "grpc.health.v1.Health").await > 0);
    assert!(files_describing(&app, "otn.v1.SendService").await > 0);
    assert!(files_describing(&app, "otn.v1.CreatePageRequest").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_for_the_server_and_each_service() {
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db).await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in std::iter::once("").chain(OUR_SERVICES) {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    let body = otnd::graph::http_client()
        .get(app.http_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(body.status(), 200);
    assert_eq!(body.text().await.unwrap(), "serving\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_shutdown_begins() {
    let db = TestDatabase::sqlite();
    let app = spawn_app_with(&db, &[("OTN_SHUTDOWN_GRACE_SECONDS", "1")]).await;
    let mut health = HealthClient::new(app.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let stopping = tokio::spawn(app.stop());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a health update during shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    // The open Watch stream does not keep the service alive past its grace period.
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finishes within the grace period")
        .unwrap()
        .unwrap();
}
