//! Optional TLS on the gRPC listener (OTN_TLS_CERT / OTN_TLS_KEY).

use otnd::pb::{GetPageRequest, page_service_client::PageServiceClient};
use tonic::{Code, transport::Channel};

use crate::support::{TestDatabase, settings_for, try_spawn_tls};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_serves_tls_when_given_a_certificate_and_refuses_plaintext() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();

    let db = TestDatabase::sqlite();
    let settings = settings_for(
        &db,
        &[
            ("OTN_TLS_CERT", cert.to_str().unwrap()),
            ("OTN_TLS_KEY", key.to_str().unwrap()),
        ],
    )
    .unwrap();
    let mut app = try_spawn_tls(settings, Some(certified.cert.pem().as_bytes()))
        .await
        .unwrap();
    let status = app
        .pages
        .get_page(GetPageRequest {
            page_id: "1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "served over TLS: {status:?}");

    let plaintext = Channel::from_shared(format!("http://127.0.0.1:{}", app.grpc_port))
        .unwrap()
        .connect_lazy();
    let refused = PageServiceClient::new(plaintext)
        .get_page(GetPageRequest {
            page_id: "1".into(),
        })
        .await
        .unwrap_err();
    assert_ne!(
        refused.code(),
        Code::NotFound,
        "plaintext must not reach the service"
    );
}

#[test]
fn half_a_tls_configuration_is_refused() {
    let db = TestDatabase::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "x").unwrap();
    let error = settings_for(&db, &[("OTN_TLS_CERT", cert.to_str().unwrap())]).unwrap_err();
    assert!(
        error.contains("OTN_TLS_CERT and OTN_TLS_KEY go together"),
        "{error}"
    );
}
