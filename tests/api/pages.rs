//! PageService: every RPC, every validation rule, and write-only, encrypted secrets.

use otnd::{
    crypto::{MasterKey, SecretCipher},
    domain::PageId,
    pb::{
        CreatePageRequest, DeletePageRequest, GetPageRequest, ListPagesRequest, Page,
        UpdatePageRequest,
    },
    store::pages,
};
use prost::Message;
use sea_orm::{ConnectionTrait, Statement};
use secrecy::ExposeSecret;
use tonic::Code;

use crate::{
    backend_tests,
    support::{TEST_MASTER_KEY, TestApp, TestDatabase, spawn_app, violated_fields},
};

const ACCESS_TOKEN: &str = "EAAB-access-token-PLAINTEXT-1";
const APP_SECRET: &str = "app-secret-PLAINTEXT-2";
const VERIFY_TOKEN: &str = "verify-token-PLAINTEXT-3";

pub fn create_request(page_id: &str) -> CreatePageRequest {
    CreatePageRequest {
        page_id: page_id.to_string(),
        name: format!("Page {page_id}"),
        access_token: ACCESS_TOKEN.to_string(),
        app_secret: APP_SECRET.to_string(),
        verify_token: VERIFY_TOKEN.to_string(),
        send_rate_per_second: None,
    }
}

pub async fn create_page(app: &mut TestApp, page_id: &str) -> Page {
    app.pages
        .create_page(create_request(page_id))
        .await
        .expect("CreatePage")
        .into_inner()
        .page
        .expect("a page")
}

async fn get_status(app: &mut TestApp, page_id: &str) -> Code {
    match app
        .pages
        .get_page(GetPageRequest {
            page_id: page_id.to_string(),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn update(page_id: &str) -> UpdatePageRequest {
    UpdatePageRequest {
        page_id: page_id.to_string(),
        ..Default::default()
    }
}

/// Opens the stored secrets with the key the harness gave the app.
async fn stored_credentials(db: &TestDatabase, page_id: &str) -> otnd::domain::PageCredentials {
    let store = db.store().await;
    let cipher = SecretCipher::new(&MasterKey::from_bytes(&TEST_MASTER_KEY).unwrap());
    let credentials = pages::credentials(&store.db, &cipher, &PageId::parse(page_id).unwrap())
        .await
        .unwrap();
    store.close().await;
    credentials
}

backend_tests! {
    async fn create_then_get_returns_the_page_without_secrets(db) {
        let mut app = spawn_app(&db).await;
        let created = app.pages.create_page(create_request("1001")).await.unwrap().into_inner();
        let page = created.page.clone().unwrap();
        assert_eq!(page.page_id, "1001");
        assert_eq!(page.name, "Page 1001");
        assert_eq!(page.send_rate_per_second, 40, "the default rate");
        assert!(page.has_access_token && page.has_app_secret && page.has_verify_token);
        assert!(page.create_time.is_some() && page.update_time.is_some());

        let fetched = app.pages.get_page(GetPageRequest { page_id: "1001".into() })
            .await.unwrap().into_inner();
        assert_eq!(fetched.page.unwrap(), page);

        // Not one byte of any secret travels back.
        let wire = created.encode_to_vec();
        for secret in [ACCESS_TOKEN, APP_SECRET, VERIFY_TOKEN] {
            assert!(!wire.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
    }

    async fn a_taken_page_id_is_already_exists(db) {
        let mut app = spawn_app(&db).await;
        create_page(&mut app, "1002").await;
        let status = app.pages.create_page(create_request("1002")).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists);
        assert!(status.message().contains("page 1002 already exists"), "{status:?}");
    }

    async fn every_create_rule_is_enforced_and_nothing_is_stored(db) {
        let mut app = spawn_app(&db).await;
        let cases: Vec<(CreatePageRequest, &str)> = vec![
            (CreatePageRequest { page_id: "12a4".into(), ..create_request("0") }, "page_id"),
            (CreatePageRequest { page_id: "".into(), ..create_request("0") }, "page_id"),
            (CreatePageRequest { name: "".into(), ..create_request("2001") }, "name"),
            (CreatePageRequest { name: "   ".into(), ..create_request("2002") }, "name"),
            (CreatePageRequest { name: "n".repeat(201), ..create_request("2003") }, "name"),
            (CreatePageRequest { access_token: "".into(), ..create_request("2004") }, "access_token"),
            (CreatePageRequest { app_secret: "".into(), ..create_request("2005") }, "app_secret"),
            (CreatePageRequest { send_rate_per_second: Some(0), ..create_request("2006") }, "send_rate_per_second"),
            (CreatePageRequest { send_rate_per_second: Some(301), ..create_request("2007") }, "send_rate_per_second"),
        ];
        for (request, field) in cases {
            let page_id = request.page_id.clone();
            let status = app.pages.create_page(request).await.unwrap_err();
            assert_eq!(violated_fields(&status), [field], "{status:?}");
            assert!(status.message().starts_with(&format!("{field}: ")), "{status:?}");
            if !page_id.is_empty() && page_id.bytes().all(|b| b.is_ascii_digit()) {
                assert_eq!(get_status(&mut app, &page_id).await, Code::NotFound);
            }
        }

        // Every broken rule is reported at once.
        let status = app.pages.create_page(CreatePageRequest {
            page_id: "x".into(), name: "".into(), access_token: "".into(), app_secret: "".into(),
            verify_token: "".into(), send_rate_per_second: Some(500),
        }).await.unwrap_err();
        assert_eq!(
            violated_fields(&status),
            ["page_id", "name", "access_token", "app_secret", "send_rate_per_second"]
        );
    }

    async fn limits_are_inclusive_and_count_characters(db) {
        let mut app = spawn_app(&db).await;
        let page = app.pages.create_page(CreatePageRequest {
            name: "é".repeat(200),
            send_rate_per_second: Some(300),
            verify_token: "".into(),
            ..create_request("3001")
        }).await.unwrap().into_inner().page.unwrap();
        assert_eq!(page.name.chars().count(), 200);
        assert_eq!(page.send_rate_per_second, 300);
        assert!(!page.has_verify_token, "the verify token is optional");
        let page = app.pages.create_page(CreatePageRequest {
            send_rate_per_second: Some(1),
            ..create_request("3002")
        }).await.unwrap().into_inner().page.unwrap();
        assert_eq!(page.send_rate_per_second, 1);
    }

    async fn get_and_delete_of_a_missing_page_are_not_found(db) {
        let mut app = spawn_app(&db).await;
        assert_eq!(get_status(&mut app, "404").await, Code::NotFound);
        let status = app.pages.delete_page(DeletePageRequest { page_id: "404".into() })
            .await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("page 404 does not exist"), "{status:?}");
        let status = app.pages.get_page(GetPageRequest { page_id: "abc".into() })
            .await.unwrap_err();
        assert_eq!(violated_fields(&status), ["page_id"]);
    }

    async fn list_pages_walks_every_page_once_in_order(db) {
        let mut app = spawn_app(&db).await;
        for id in ["105", "101", "104", "102", "103"] {
            create_page(&mut app, id).await;
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut calls = 0;
        loop {
            let response = app.pages.list_pages(ListPagesRequest { page_size: 2, page_token: token })
                .await.unwrap().into_inner();
            calls += 1;
            assert!(response.pages.len() <= 2);
            seen.extend(response.pages.into_iter().map(|p| p.page_id));
            if response.next_page_token.is_empty() {
                break;
            }
            token = response.next_page_token;
        }
        assert_eq!(seen, ["101", "102", "103", "104", "105"]);
        assert_eq!(calls, 3);

        let all = app.pages.list_pages(ListPagesRequest::default()).await.unwrap().into_inner();
        assert_eq!(all.pages.len(), 5);
        assert!(all.next_page_token.is_empty());
    }

    async fn list_pages_refuses_bad_paging(db) {
        let mut app = spawn_app(&db).await;
        for (page_size, page_token, field) in [
            (-1, "", "page_size"),
            (1001, "", "page_size"),
            (10, "not-a-token", "page_token"),
            // A well-formed token from another kind of list.
            (10, "c3Rvcmllczox", "page_token"),
        ] {
            let status = app.pages.list_pages(ListPagesRequest {
                page_size, page_token: page_token.into(),
            }).await.unwrap_err();
            assert_eq!(violated_fields(&status), [field], "{page_size} {page_token}");
        }
        assert!(app.pages.list_pages(ListPagesRequest { page_size: 1000, page_token: "".into() })
            .await.is_ok());
    }

    async fn update_page_changes_only_what_is_set(db) {
        let mut app = spawn_app(&db).await;
        let before = create_page(&mut app, "4001").await;

        let after = app.pages.update_page(UpdatePageRequest {
            send_rate_per_second: Some(120),
            ..update("4001")
        }).await.unwrap().into_inner().page.unwrap();
        assert_eq!(after.send_rate_per_second, 120);
        assert_eq!(after.name, before.name);
        assert_eq!(after.create_time, before.create_time);
        let millis = |t: &Option<prost_types::Timestamp>| {
            let t = t.as_ref().unwrap();
            t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
        };
        assert!(millis(&after.update_time) >= millis(&before.update_time));

        let renamed = app.pages.update_page(UpdatePageRequest {
            name: Some("Renamed".into()),
            ..update("4001")
        }).await.unwrap().into_inner().page.unwrap();
        assert_eq!(renamed.name, "Renamed");
        assert_eq!(renamed.send_rate_per_second, 120);

        // An empty verify token removes it.
        let page = app.pages.update_page(UpdatePageRequest {
            verify_token: Some("".into()),
            ..update("4001")
        }).await.unwrap().into_inner().page.unwrap();
        assert!(!page.has_verify_token);
    }

    async fn update_page_rotates_secrets(db) {
        let mut app = spawn_app(&db).await;
        create_page(&mut app, "4002").await;
        app.pages.update_page(UpdatePageRequest {
            access_token: Some("EAAB-rotated-token".into()),
            app_secret: Some("rotated-app-secret".into()),
            ..update("4002")
        }).await.unwrap();
        let credentials = stored_credentials(&db, "4002").await;
        assert_eq!(credentials.access_token.expose_secret(), "EAAB-rotated-token");
        assert_eq!(credentials.app_secret.expose_secret(), "rotated-app-secret");
        assert_eq!(credentials.verify_token.unwrap().expose_secret(), VERIFY_TOKEN);
    }

    async fn update_page_refuses_bad_input_and_changes_nothing(db) {
        let mut app = spawn_app(&db).await;
        let before = create_page(&mut app, "4003").await;
        for (request, field) in [
            (UpdatePageRequest { send_rate_per_second: Some(0), ..update("4003") }, "send_rate_per_second"),
            (UpdatePageRequest { send_rate_per_second: Some(301), ..update("4003") }, "send_rate_per_second"),
            (UpdatePageRequest { name: Some("".into()), ..update("4003") }, "name"),
            (UpdatePageRequest { access_token: Some("".into()), ..update("4003") }, "access_token"),
            (UpdatePageRequest { app_secret: Some("".into()), ..update("4003") }, "app_secret"),
            (update("4003"), "update"),
            (UpdatePageRequest { name: Some("x".into()), ..update("40x3") }, "page_id"),
        ] {
            let status = app.pages.update_page(request).await.unwrap_err();
            assert_eq!(violated_fields(&status), [field]);
        }
        let after = app.pages.get_page(GetPageRequest { page_id: "4003".into() })
            .await.unwrap().into_inner().page.unwrap();
        assert_eq!(after, before);

        let status = app.pages.update_page(UpdatePageRequest {
            name: Some("x".into()), ..update("4999")
        }).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }

    async fn delete_page_removes_it(db) {
        let mut app = spawn_app(&db).await;
        create_page(&mut app, "5001").await;
        create_page(&mut app, "5002").await;
        app.pages.delete_page(DeletePageRequest { page_id: "5001".into() }).await.unwrap();
        assert_eq!(get_status(&mut app, "5001").await, Code::NotFound);
        assert_eq!(get_status(&mut app, "5002").await, Code::Ok);
        let listed = app.pages.list_pages(ListPagesRequest::default()).await.unwrap().into_inner();
        assert_eq!(listed.pages.iter().map(|p| p.page_id.as_str()).collect::<Vec<_>>(), ["5002"]);
    }

    async fn secrets_are_stored_encrypted(db) {
        let mut app = spawn_app(&db).await;
        create_page(&mut app, "6001").await;

        // The sealed columns hold no plaintext, yet open with the master key.
        let store = db.store().await;
        let row = store.db.query_one_raw(Statement::from_string(
            store.db.get_database_backend(),
            "SELECT access_token_enc, app_secret_enc, verify_token_enc FROM pages WHERE id = '6001'",
        )).await.unwrap().unwrap();
        for (column, secret) in [
            ("access_token_enc", ACCESS_TOKEN),
            ("app_secret_enc", APP_SECRET),
            ("verify_token_enc", VERIFY_TOKEN),
        ] {
            let sealed: Vec<u8> = row.try_get("", column).unwrap();
            assert!(sealed.len() > secret.len(), "{column} holds a sealed value");
            assert!(!sealed.windows(secret.len()).any(|w| w == secret.as_bytes()), "{column}");
        }
        store.close().await;
        let credentials = stored_credentials(&db, "6001").await;
        assert_eq!(credentials.access_token.expose_secret(), ACCESS_TOKEN);
        assert_eq!(credentials.app_secret.expose_secret(), APP_SECRET);

        // Nor is any secret anywhere in the SQLite files, the write-ahead log included.
        app.stop().await.unwrap();
        if let Some(file) = &db.sqlite_file {
            let dir = file.parent().unwrap();
            let mut scanned = 0;
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                scanned += bytes.len();
                for secret in [ACCESS_TOKEN, APP_SECRET, VERIFY_TOKEN] {
                    assert!(
                        !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                        "{secret} in clear in {}", path.display()
                    );
                }
            }
            assert!(scanned > 0);
        }
    }
}
