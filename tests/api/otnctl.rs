//! otnctl, the real binary, against a running otnd and the Graph sandbox: tables and JSON,
//! secrets that never come back, a send watched to its end (exit codes by outcome), exports
//! that parse back, roles and keys, and bad arguments refused before any call.

use std::{
    io::Write,
    net::TcpListener,
    process::{Command, Stdio},
    time::Duration,
};

use otnd::pb::UpdatePageRequest;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    support::{
        TestApp, TestDatabase, eventually, settings_for, spawn_app, spawn_app_with, try_spawn_tls,
    },
};
use otnd_testkit::{PAGE, StorySpec, TOPIC, opt_in_users, reviewed_story, start_send};

const ADMIN: &str = "admin-key-0123456789";
const VIEWER: &str = "viewer-key-012345678";

/// What one run of otnctl did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: stdout is not JSON: {self:?}"))
    }

    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "otnctl failed: {self:?}");
        self
    }
}

/// otnctl with `args`, `env` added to a clean OTN_* environment, `stdin` fed to it.
async fn otnctl_at(addr: &str, env: &[(&str, &str)], stdin: Option<&str>, args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_otnctl"));
    command
        .args(args)
        .env("OTN_ADDR", addr)
        .env_remove("OTN_API_KEY")
        .env_remove("OTN_TLS_CA")
        .env_remove("OTN_PAGE_ACCESS_TOKEN")
        .env_remove("OTN_PAGE_APP_SECRET")
        .env_remove("OTN_PAGE_VERIFY_TOKEN")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stdin = stdin.map(str::to_string);
    let output = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("otnctl starts");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("a piped stdin")
                .write_all(text.as_bytes())
                .expect("otnctl reads stdin");
        }
        child.wait_with_output().expect("otnctl ends")
    })
    .await
    .expect("the runner");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn otnctl(app: &TestApp, key: Option<&str>, args: &[&str]) -> Run {
    let addr = format!("http://127.0.0.1:{}", app.grpc_port);
    match key {
        Some(key) => otnctl_at(&addr, &[("OTN_API_KEY", key)], None, args).await,
        None => otnctl_at(&addr, &[], None, args).await,
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().port()
}

/// Asserts otnctl failed with one line `otnctl: <code>: …` and exit code 1.
fn assert_call_failed(run: &Run, code: &str) {
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "one line: {run:?}");
    assert!(
        run.stderr.starts_with(&format!("otnctl: {code}: ")),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_created_listed_and_read_and_their_secrets_never_come_back() {
    let db = TestDatabase::sqlite();
    let keys = format!("admin:{ADMIN},viewer:{VIEWER}");
    let app = spawn_app_with(&db, &[("OTN_API_KEYS", &keys)]).await;
    let addr = format!("http://127.0.0.1:{}", app.grpc_port);
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "EAAB-ctl-token-7777\n").unwrap();

    // The token from a file, the app secret from stdin, the verify token from the environment.
    let created = otnctl_at(
        &addr,
        &[
            ("OTN_API_KEY", ADMIN),
            ("OTN_PAGE_VERIFY_TOKEN", "ctl-verify-token-5555"),
        ],
        Some("ctl-app-secret-6666\n"),
        &[
            "pages",
            "create",
            "1001",
            "--name",
            "Concert hall",
            "--rate",
            "120",
            "--access-token-file",
            token_file.path().to_str().unwrap(),
            "--app-secret-file",
            "-",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    let page = created.json();
    assert_eq!(page["page_id"], "1001", "{page}");
    assert_eq!(page["send_rate_per_second"], 120, "{page}");
    assert_eq!(
        (
            &page["has_access_token"],
            &page["has_app_secret"],
            &page["has_verify_token"]
        ),
        (&Value::Bool(true), &Value::Bool(true), &Value::Bool(true)),
        "{page}"
    );
    chrono::DateTime::parse_from_rfc3339(page["create_time"].as_str().unwrap())
        .expect("RFC 3339 timestamps");

    // A second page, its secrets by flag.
    let second = otnctl(
        &app,
        Some(ADMIN),
        &[
            "pages",
            "create",
            "1002",
            "--name",
            "Jazz club",
            "--access-token",
            "EAAB-ctl-token-8888",
            "--app-secret",
            "ctl-app-secret-9999",
        ],
    )
    .await
    .ok();
    assert!(second.stdout.contains("Jazz club"), "{second:?}");

    let table = otnctl(&app, Some(VIEWER), &["pages", "list"]).await.ok();
    for expected in [
        "PAGE",
        "NAME",
        "1001",
        "Concert hall",
        "1002",
        "Jazz club",
        "set",
    ] {
        assert!(table.stdout.contains(expected), "{expected}: {table:?}");
    }
    let listed = otnctl(&app, Some(VIEWER), &["pages", "list", "-o", "json"])
        .await
        .ok()
        .json();
    let ids: Vec<&str> = listed
        .as_array()
        .expect("a list is an array")
        .iter()
        .map(|p| p["page_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["1001", "1002"]);
    let paged = otnctl(
        &app,
        Some(VIEWER),
        &["pages", "list", "--page-size", "1", "-o", "json"],
    )
    .await
    .ok();
    assert_eq!(paged.json().as_array().unwrap().len(), 1, "{paged:?}");
    assert!(paged.stderr.contains("--page-token"), "{paged:?}");
    let all = otnctl(
        &app,
        Some(VIEWER),
        &["pages", "list", "--page-size", "1", "--all", "-o", "json"],
    )
    .await
    .ok();
    assert_eq!(all.json().as_array().unwrap().len(), 2, "{all:?}");

    let got = otnctl(&app, Some(VIEWER), &["pages", "get", "1001"])
        .await
        .ok();
    assert!(got.stdout.contains("Concert hall"), "{got:?}");
    let updated = otnctl(
        &app,
        Some(ADMIN),
        &[
            "pages",
            "update",
            "1001",
            "--rate",
            "60",
            "--clear-verify-token",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(updated["send_rate_per_second"], 60, "{updated}");
    assert_eq!(updated["has_verify_token"], false, "{updated}");
    let missing = otnctl(&app, Some(VIEWER), &["pages", "get", "999"]).await;
    assert_call_failed(&missing, "NOT_FOUND");

    let help = otnctl_at(&addr, &[("OTN_API_KEY", ADMIN)], None, &["--help"])
        .await
        .ok();
    assert!(help.stdout.contains("OTN_API_KEY"), "{help:?}");
    assert!(help.stdout.contains("Exit codes"), "{help:?}");

    for run in [&created, &second, &table, &got, &help, &missing] {
        for secret in [
            "EAAB-ctl-token",
            "ctl-app-secret",
            "ctl-verify-token",
            ADMIN,
            VIEWER,
        ] {
            assert!(
                !run.stdout.contains(secret) && !run.stderr.contains(secret),
                "{secret} printed: {run:?}"
            );
        }
    }

    let deleted = otnctl(&app, Some(ADMIN), &["pages", "delete", "1002"])
        .await
        .ok();
    assert!(deleted.stderr.contains("deleted page 1002"), "{deleted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_and_opt_ins_show_the_ledger() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app(&db).await;
    app.register_page(PAGE).await;
    opt_in_users(&app.channel, &app.sandbox(), PAGE, TOPIC, "fan-", 7, None).await;

    let table = otnctl(&app, None, &["topics", PAGE]).await.ok();
    for expected in ["TOPIC", "ACTIVE", "EXPIRING", TOPIC] {
        assert!(table.stdout.contains(expected), "{expected}: {table:?}");
    }
    let topics = otnctl(&app, None, &["topics", PAGE, "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(topics[0]["topic"], TOPIC, "{topics}");
    assert_eq!(topics[0]["active"], 7, "{topics}");
    assert_eq!(topics[0]["expiring_soon"], 0, "{topics}");

    let opt_ins = otnctl(
        &app,
        None,
        &[
            "optins", "list", PAGE, "--state", "active", "--all", "-o", "json",
        ],
    )
    .await
    .ok()
    .json();
    let opt_ins = opt_ins.as_array().unwrap();
    assert_eq!(opt_ins.len(), 7);
    assert!(
        opt_ins.iter().all(|o| o["state"] == "ACTIVE"),
        "{opt_ins:?}"
    );
    let one = otnctl(
        &app,
        None,
        &["optins", "list", PAGE, "--psid", "fan-3", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(one[0]["psid"], "fan-3", "{one}");
    let none = otnctl(&app, None, &["optins", "list", PAGE, "--state", "used"])
        .await
        .ok();
    assert!(none.stderr.contains("no opt-ins"), "{none:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_story_is_written_previewed_and_estimated() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app(&db).await;
    app.register_page(PAGE).await;
    let sandbox = app.sandbox();
    opt_in_users(&app.channel, &sandbox, PAGE, TOPIC, "fan-", 4, None).await;

    let story = otnctl(
        &app,
        None,
        &[
            "story",
            "create",
            PAGE,
            "--topic",
            TOPIC,
            "--text",
            "Doors open at 8",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    let story_id = story["story_id"].as_str().unwrap().to_string();
    assert_eq!(story["content"]["text"], "Doors open at 8", "{story}");
    assert_eq!(story["state"], "DRAFT", "{story}");
    assert_eq!(story["reviewed"], false, "{story}");

    let template = otnctl(
        &app,
        None,
        &[
            "story",
            "create",
            PAGE,
            "--topic",
            TOPIC,
            "--text",
            "Tickets are out",
            "--button",
            "web-url",
            "Buy",
            "https://tickets.example/buy",
            "--button",
            "phone-number",
            "Call us",
            "+15105551234",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    let buttons = &template["content"]["button_template"]["buttons"];
    assert_eq!(buttons[0]["type"], "WEB_URL", "{template}");
    assert_eq!(buttons[1]["payload"], "+15105551234", "{template}");
    let warned = otnctl(
        &app,
        None,
        &[
            "story",
            "create",
            PAGE,
            "--topic",
            "doors open",
            "--text",
            "hi",
        ],
    )
    .await
    .ok();
    assert!(
        warned.stderr.contains("warning: "),
        "a near miss: {warned:?}"
    );

    sandbox.interact(PAGE, "boss", false).await;
    let previewed = otnctl(
        &app,
        None,
        &[
            "story",
            "preview",
            &story_id,
            "--reviewer",
            "boss",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    assert_eq!(previewed.json()["reviewed"], true, "{previewed:?}");
    assert_eq!(previewed.json()["reviewer_psid"], "boss", "{previewed:?}");

    let estimate = otnctl(&app, None, &["story", "estimate", &story_id, "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(estimate["token_recipients"], 4, "{estimate}");
    let table = otnctl(&app, None, &["story", "estimate", &story_id])
        .await
        .ok();
    assert!(table.stdout.contains("TOKEN RECIPIENTS"), "{table:?}");

    let updated = otnctl(
        &app,
        None,
        &[
            "story",
            "update",
            &story_id,
            "--text",
            "Doors open at 9",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        updated["reviewed"], false,
        "new content needs a new review: {updated}"
    );
    let listed = otnctl(&app, None, &["story", "list", PAGE, "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    // Text from elsewhere (a topic, Facebook's reasons) never steers the terminal of a table.
    otnctl(
        &app,
        None,
        &[
            "story",
            "create",
            PAGE,
            "--topic",
            "red\u{1b}[31m alert",
            "--text",
            "x",
        ],
    )
    .await
    .ok();
    let table = otnctl(&app, None, &["story", "list", PAGE]).await.ok();
    assert!(!table.stdout.contains('\u{1b}'), "{table:?}");
    assert!(table.stdout.contains("red\\u{1b}[31m alert"), "{table:?}");
    let got = otnctl(&app, None, &["story", "get", &story_id]).await.ok();
    assert!(got.stdout.contains("Doors open at 9"), "{got:?}");
    let missing = otnctl(&app, None, &["story", "get", "no-such-story"]).await;
    assert_call_failed(&missing, "NOT_FOUND");
}

backend_tests! {
    async fn a_watched_send_completes_and_its_deliveries_export_as_csv_and_jsonl(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        let sandbox = app.sandbox();
        opt_in_users(&app.channel, &sandbox, PAGE, TOPIC, "fan-", 25, None).await;
        let story_id = reviewed_story(&app.channel, &sandbox, StorySpec::default()).await;

        let watched = otnctl(&app, None, &["send", "start", &story_id, "--request-id", "ctl-1",
            "--watch", "-o", "json"]).await;
        assert_eq!(watched.code, 0, "{watched:?}");
        // stderr is not a terminal here: plain lines, and the summary last.
        let summary = watched.stderr.lines().last().unwrap_or_default();
        assert!(summary.contains("COMPLETED") && summary.contains("25/25 finished"),
            "{watched:?}");
        let send = watched.json();
        assert_eq!(send["state"], "COMPLETED", "{send}");
        assert_eq!(send["sent"], 25, "{send}");
        let send_id = send["send_id"].as_str().unwrap().to_string();
        // Watching an ended send ends at once, with its outcome.
        let again = otnctl(&app, None, &["send", "watch", &send_id]).await;
        assert_eq!(again.code, 0, "{again:?}");

        let csv_run = otnctl(&app, None, &["deliveries", "export", &send_id, "--format", "csv"])
            .await.ok();
        let mut reader = csv::Reader::from_reader(csv_run.stdout.as_bytes());
        let headers = reader.headers().unwrap().clone();
        for column in ["psid", "route", "state", "attempts", "message_id", "error_code",
                       "error_subcode", "error_message", "update_time"] {
            assert!(headers.iter().any(|h| h == column), "{column}: {headers:?}");
        }
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 25, "{csv_run:?}");
        let state = headers.iter().position(|h| h == "state").unwrap();
        assert!(rows.iter().all(|r| &r[state] == "SENT"), "{csv_run:?}");
        assert!(csv_run.stderr.contains("exported 25 deliveries"), "{csv_run:?}");

        let jsonl = otnctl(&app, None, &["deliveries", "export", &send_id, "--format", "jsonl"])
            .await.ok();
        let lines: Vec<Value> = jsonl.stdout.lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object a line")).collect();
        assert_eq!(lines.len(), 25);
        let mut psids: Vec<&str> = lines.iter().map(|d| d["psid"].as_str().unwrap()).collect();
        psids.sort_unstable();
        psids.dedup();
        assert_eq!(psids.len(), 25, "every recipient once");
        assert!(lines.iter().all(|d| d["route"] == "TOKEN" && d["attempts"] == 1), "{lines:?}");

        let failed = otnctl(&app, None, &["deliveries", "export", &send_id, "--format", "csv",
            "--state", "failed"]).await.ok();
        assert_eq!(failed.stdout.lines().count(), 1, "the header alone: {failed:?}");
        let listed = otnctl(&app, None, &["deliveries", "list", &send_id, "--page-size", "10"])
            .await.ok();
        assert!(listed.stdout.contains("SENT") && listed.stderr.contains("--page-token"),
            "{listed:?}");
        let sends = otnctl(&app, None, &["send", "list", PAGE, "--state", "completed", "-o",
            "json"]).await.ok().json();
        assert_eq!(sends[0]["send_id"], send_id.as_str(), "{sends}");
    }

    async fn a_watched_send_that_halts_exits_3_with_the_reason_and_resumes_to_0(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        let sandbox = app.sandbox();
        opt_in_users(&app.channel, &sandbox, PAGE, TOPIC, "fan-", 10, None).await;
        let story_id = reviewed_story(&app.channel, &sandbox, StorySpec::default()).await;
        // Facebook restricts the page (10/1893063): the send halts, waiting for an operator.
        sandbox.faults(json!({"restricted_pages": [PAGE]})).await;

        let watched = otnctl(&app, None, &["send", "start", &story_id, "--watch"]).await;
        assert_eq!(watched.code, 3, "HALTED exits 3: {watched:?}");
        let summary = watched.stderr.lines().last().unwrap_or_default();
        assert!(summary.contains("HALTED") && summary.contains("reason: ")
            && summary.contains("1893063"), "{watched:?}");
        let send_id = watched.stderr.lines()
            .find_map(|l| l.strip_prefix("started send "))
            .expect("the send's id is printed first")
            .to_string();

        sandbox.faults(json!({})).await;
        let resumed = otnctl(&app, None, &["send", "resume", &send_id]).await.ok();
        assert!(resumed.stdout.contains("RUNNING"), "{resumed:?}");
        let watched = otnctl(&app, None, &["send", "watch", &send_id]).await;
        assert_eq!(watched.code, 0, "{watched:?}");
        assert!(watched.stderr.contains("10/10 finished"), "{watched:?}");
    }

    async fn a_send_is_paused_resumed_and_a_cancelled_watch_exits_with_its_reason(db) {
        let mut app = spawn_app(&db).await;
        app.register_page(PAGE).await;
        app.pages.update_page(UpdatePageRequest {
            page_id: PAGE.into(),
            send_rate_per_second: Some(2),
            ..Default::default()
        }).await.unwrap();
        let sandbox = app.sandbox();
        opt_in_users(&app.channel, &sandbox, PAGE, TOPIC, "fan-", 40, None).await;
        let story_id = reviewed_story(&app.channel, &sandbox, StorySpec::default()).await;
        let send = start_send(&app.channel, &story_id, "slow-1").await;

        let paused = otnctl(&app, None, &["send", "pause", &send.send_id, "-o", "json"])
            .await.ok().json();
        assert_eq!(paused["state"], "PAUSED", "{paused}");
        let resumed = otnctl(&app, None, &["send", "resume", &send.send_id, "-o", "json"])
            .await.ok().json();
        assert_eq!(resumed["state"], "RUNNING", "{resumed}");

        let addr = format!("http://127.0.0.1:{}", app.grpc_port);
        let id = send.send_id.clone();
        let watcher = tokio::spawn(async move {
            otnctl_at(&addr, &[], None, &["send", "watch", &id]).await
        });
        // The watch has its first progress before the send is cancelled (a watch that started
        // after would end the same way, from the first snapshot).
        eventually(Duration::from_secs(20), "a delivery or two", || {
            let channel = app.channel.clone();
            let id = send.send_id.clone();
            async move {
                let s = otnd_testkit::get_send(&channel, &id).await;
                (s.progress.unwrap_or_default().sent >= 1).then_some(())
            }
        }).await;
        let cancelled = otnctl(&app, None, &["send", "cancel", &send.send_id]).await.ok();
        assert!(cancelled.stdout.contains("CANCELLED"), "{cancelled:?}");

        let watched = tokio::time::timeout(Duration::from_secs(30), watcher)
            .await.expect("the watch ends with the send").unwrap();
        assert_eq!(watched.code, 4, "CANCELLED exits 4: {watched:?}");
        let summary = watched.stderr.lines().last().unwrap_or_default();
        assert!(summary.contains("CANCELLED") && summary.contains("reason:"), "{watched:?}");
        let again = otnctl(&app, None, &["send", "cancel", &send.send_id]).await;
        assert_call_failed(&again, "FAILED_PRECONDITION");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_roles_are_otnds_and_each_refusal_is_one_line() {
    let db = TestDatabase::sqlite();
    let keys = format!("admin:{ADMIN},viewer:{VIEWER}");
    let app = spawn_app_with(&db, &[("OTN_API_KEYS", &keys)]).await;

    let refused = otnctl(&app, Some(VIEWER), &["send", "pause", "some-send"]).await;
    assert_call_failed(&refused, "PERMISSION_DENIED");
    assert!(refused.stderr.contains("operator role"), "{refused:?}");
    let refused = otnctl(
        &app,
        Some(VIEWER),
        &[
            "pages",
            "create",
            "5",
            "--name",
            "n",
            "--access-token",
            "t0k",
            "--app-secret",
            "s3c",
        ],
    )
    .await;
    assert_call_failed(&refused, "PERMISSION_DENIED");

    let missing = otnctl(&app, None, &["pages", "list"]).await;
    assert_call_failed(&missing, "UNAUTHENTICATED");
    let unknown = otnctl(&app, Some("not-a-key-at-all-000"), &["pages", "list"]).await;
    assert_call_failed(&unknown, "UNAUTHENTICATED");
    assert!(!unknown.stderr.contains("not-a-key"), "{unknown:?}");
    let export = otnctl(
        &app,
        Some(VIEWER),
        &["deliveries", "export", "no-such-send", "--format", "jsonl"],
    )
    .await;
    assert_call_failed(&export, "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_exit_2_without_contacting_otnd() {
    // Nothing listens there: a message about the connection would mean otnctl called.
    let addr = format!("http://127.0.0.1:{}", closed_port());
    let too_many_buttons: Vec<&str> = ["story", "create", "1", "--topic", "t", "--text", "x"]
        .into_iter()
        .chain((0..4).flat_map(|_| ["--button", "postback", "Go", "go"]))
        .collect();
    let long_request_id = "r".repeat(129);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["pages", "get", "12ab"], "digits"),
        (vec!["pages", "list", "--page-size", "5000"], "5000"),
        (vec!["send", "list", "1", "--state", "bogus"], "bogus"),
        (vec!["send", "start", ""], "STORY"),
        (
            vec!["send", "start", "s", "--request-id", &long_request_id],
            "--request-id",
        ),
        (
            vec!["pages", "create", "1", "--name", "n", "--app-secret", "s"],
            "access token",
        ),
        (
            vec![
                "pages",
                "create",
                "1",
                "--name",
                "",
                "--access-token",
                "t",
                "--app-secret",
                "s",
            ],
            "--name",
        ),
        (
            vec![
                "pages",
                "create",
                "1",
                "--name",
                "n",
                "--access-token",
                "t",
                "--app-secret",
                "s",
                "--rate",
                "301",
            ],
            "--rate",
        ),
        (vec!["pages", "update", "1"], "nothing to change"),
        (too_many_buttons, "1 to 3 buttons"),
        (
            vec!["story", "create", "1", "--topic", "t", "--text", ""],
            "content.text",
        ),
        (
            vec![
                "story", "create", "1", "--topic", "t", "--text", "x", "--button", "web-url", "Go",
                "ftp://x",
            ],
            "http",
        ),
        (
            vec![
                "story", "create", "1", "--topic", "t", "--text", "x", "--button", "fax", "Go", "1",
            ],
            "fax",
        ),
        (
            vec!["story", "preview", "s1", "--reviewer", "has space"],
            "--reviewer",
        ),
        (vec!["deliveries", "export", "s1", "--format", "xml"], "xml"),
        (vec!["optins", "list", "1", "--state", "gone"], "gone"),
        (vec!["--addr", "ftp://host:1", "pages", "list"], "--addr"),
        (
            vec!["--addr", "https://localhost:1", "pages", "list"],
            "--tls-ca",
        ),
    ];
    for (args, says) in cases {
        let run = otnctl_at(&addr, &[], None, &args).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains(says),
            "{args:?} should say {says}: {run:?}"
        );
        assert!(!run.stderr.contains("UNAVAILABLE"), "{args:?}: {run:?}");
    }
    let run = otnctl_at(
        &addr,
        &[("OTN_API_KEY", "bad\u{7f}key")],
        None,
        &["pages", "list"],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(!run.stderr.contains("bad\u{7f}key"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_otnd_is_one_line() {
    let addr = format!("http://127.0.0.1:{}", closed_port());
    let run = otnctl_at(&addr, &[], None, &["pages", "list"]).await;
    assert_call_failed(&run, "UNAVAILABLE");
    assert!(run.stderr.contains("cannot connect to otnd at"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otnctl_speaks_tls_trusting_only_the_ca_it_is_given() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, other) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("other.pem"),
    );
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    std::fs::write(&other, stranger.cert.pem()).unwrap();
    let db = TestDatabase::sqlite();
    let settings = settings_for(
        &db,
        &[
            ("OTN_TLS_CERT", cert.to_str().unwrap()),
            ("OTN_TLS_KEY", key.to_str().unwrap()),
        ],
    )
    .unwrap();
    let app = try_spawn_tls(settings, Some(certified.cert.pem().as_bytes()))
        .await
        .unwrap();
    let addr = format!("https://localhost:{}", app.grpc_port);

    let trusted = otnctl_at(
        &addr,
        &[("OTN_TLS_CA", cert.to_str().unwrap())],
        None,
        &["pages", "list"],
    )
    .await
    .ok();
    assert!(trusted.stderr.contains("no pages"), "{trusted:?}");
    let untrusted = otnctl_at(
        &addr,
        &[("OTN_TLS_CA", other.to_str().unwrap())],
        None,
        &["pages", "list"],
    )
    .await;
    assert_call_failed(&untrusted, "UNAVAILABLE");
    let plaintext = otnctl_at(
        &format!("http://127.0.0.1:{}", app.grpc_port),
        &[],
        None,
        &["pages", "list"],
    )
    .await;
    assert_eq!(plaintext.code, 1, "{plaintext:?}");
    assert_eq!(plaintext.stderr.lines().count(), 1, "{plaintext:?}");
}
