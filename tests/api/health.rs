//! grpc.health.v1, server reflection (v1 and v1alpha) and the HTTP /healthz.

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::helpers::{TestApp, TestDatabase, spawn_app, spawn_app_with};

const OUR_SERVICES: [&str; 5] = [
    "otn.v1.AudienceService",
    "otn.v1.OptInService",
    "otn.v1.PageService",
    "otn.v1.SendService",
    "otn.v1.StoryService",
];

pub async fn list_services_v1(app: &TestApp) -> Vec<String> {
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn list_services_v1alpha(app: &TestApp) -> Vec<String> {
    use v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// The reflection service describes the health service's messages too, which is what lets
/// `buf curl` and grpcurl call Health/Check with reflection alone.
async fn file_containing_symbol_v1(app: &TestApp, symbol: &str) -> usize {
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_string())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => files.file_descriptor_proto.len(),
        other => panic!("no descriptor for {symbol}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_five_services_and_health_in_both_versions() {
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db).await;
    for services in [
        list_services_v1(&app).await,
        list_services_v1alpha(&app).await,
    ] {
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
    assert!(file_containing_symbol_v1(&app, "grpc.health.v1.Health").await > 0);
    assert!(file_containing_symbol_v1(&app, "otn.v1.SendService").await > 0);
    assert!(file_containing_symbol_v1(&app, "otn.v1.CreatePageRequest").await > 0);
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
    let body = reqwest::get(app.http_url("/healthz")).await.unwrap();
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
