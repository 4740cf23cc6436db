//! What survives a restart: pages and their secrets, on SQLite and PostgreSQL; the generated key
//! file; and a start with the wrong master key is refused.

use otnd::{
    crypto::{MasterKey, SecretCipher, key_file_for},
    domain::PageId,
    pb::GetPageRequest,
    store::{Store, pages},
};
use otnd_testkit::get_send;
use secrecy::ExposeSecret;

use crate::{
    backend_tests,
    console::completed_send,
    pages::create_page,
    support::{TestDatabase, settings_for, spawn_app, spawn_app_with, try_spawn},
};

backend_tests! {
    async fn pages_survive_a_restart(db) {
        let mut app = spawn_app(&db).await;
        let created = create_page(&mut app, "9001").await;
        app.stop().await.unwrap();

        let mut app = spawn_app(&db).await;
        let fetched = app.pages.get_page(GetPageRequest { page_id: "9001".into() })
            .await.unwrap().into_inner().page.unwrap();
        assert_eq!(fetched, created);
    }

    // Defect: an otnd in a process that goes on (embedded, or a test) kept its SQLite
    // instance lock after it stopped once it had run a send, so it could not be started again
    // on the same file until the process ended.
    async fn an_instance_that_ran_a_send_stops_and_starts_again_in_the_same_process(db) {
        let mut app = spawn_app(&db).await;
        let send_id = completed_send(&mut app, 5).await;
        app.stop().await.unwrap();

        let app = spawn_app(&db).await;
        let done = get_send(&app.channel, &send_id).await;
        assert_eq!(done.progress.unwrap().sent, 5);
    }

    async fn another_master_key_is_refused_at_start(db) {
        let mut app = spawn_app(&db).await;
        create_page(&mut app, "9002").await;
        app.stop().await.unwrap();

        let other_key = base64_key([7; 32]);
        let settings = settings_for(&db, &[("OTN_MASTER_KEY", &other_key)]).unwrap();
        let error = try_spawn(settings).await.err().expect("the start is refused");
        assert!(error.contains("master key does not open the secrets"), "{error}");

        // The right key still works: nothing was changed by the refused start.
        let mut app = spawn_app(&db).await;
        app.pages.get_page(GetPageRequest { page_id: "9002".into() }).await.unwrap();
    }
}

fn base64_key(bytes: [u8; 32]) -> String {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_master_key_sqlite_generates_a_private_key_file_and_reuses_it() {
    let db = TestDatabase::sqlite();
    let no_key = [("OTN_MASTER_KEY", "")];
    let mut app = spawn_app_with(&db, &no_key).await;
    create_page(&mut app, "9101").await;
    app.stop().await.unwrap();

    let key_file = key_file_for(db.sqlite_file.as_ref().unwrap());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key file is private");
    }

    let mut app = spawn_app_with(&db, &no_key).await;
    app.pages
        .get_page(GetPageRequest {
            page_id: "9101".into(),
        })
        .await
        .unwrap();
    app.stop().await.unwrap();

    // The file's key is the one the secrets were sealed with.
    let (key, _) = MasterKey::load_or_create_file(&key_file).unwrap();
    let settings = settings_for(&db, &[]).unwrap();
    let store = Store::connect(&settings.database_url).await.unwrap();
    let credentials = pages::credentials(
        &store.db,
        &SecretCipher::new(&key),
        &PageId::parse("9101").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        credentials.access_token.expose_secret(),
        crate::pages::create_request("9101").access_token
    );
    store.close().await;
}
