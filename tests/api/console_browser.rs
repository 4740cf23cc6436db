//! The console in a real browser: headless Chromium driven over WebDriver (chromedriver, started
//! here on a free port). The page loads with no console error, a send's bar moves to 100%
//! without a reload, pause and cancel take effect (gRPC agrees), a viewer gets no steering
//! button, and a topic or a Facebook reason carrying markup is shown as text.
//!
//! Needs Debian's `chromium` and `chromium-driver`, which it installs when they are missing.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator, wd::WebDriverCompatibleCommand};
use otnd::pb::SendState;
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};

use crate::{
    console::keyed_app_with_a_send,
    support::{TestApp, TestDatabase, eventually, spawn_app},
};
use otnd_testkit::{PAGE, StorySpec, TOPIC, get_send, opt_in_users, reviewed_story, start_send};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const OPERATOR: &str = "operator-key-0123456";
const VIEWER: &str = "viewer-key-012345678";

const SCRIPT_TOPIC: &str = "<script>alert(1)</script>";
const IMG_REASON: &str = "(#100) <img src=x onerror=alert(1)> is not a user";

/// chromedriver on a free loopback port, killed when dropped.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    async fn start() -> Self {
        crate::support::debian::ensure_packages(&["chromium", "chromium-driver"]);
        for program in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(program).exists(),
                "{program} is missing: the console's browser test needs Chromium and its \
                 WebDriver; install them with `apt-get install chromium chromium-driver`"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let status = format!("{}/status", driver.url);
        eventually(Duration::from_secs(20), "chromedriver is ready", || {
            let status = status.clone();
            async move {
                let answer = graph_sandbox::http_client_builder()
                    .build()
                    .ok()?
                    .get(status)
                    .send()
                    .await
                    .ok()?;
                let body: Value = answer.json().await.ok()?;
                (body["value"]["ready"] == true).then_some(())
            }
        })
        .await;
        driver
    }

    /// A new headless Chromium session, 1280x900, its console kept for [`browser_errors`].
    async fn browser(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         "--hide-scrollbars"],
            }),
        );
        capabilities.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's log of the page's console (and of resources that failed to load).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// The console errors and warnings the page logged since the last call.
async fn browser_errors(client: &Client) -> Vec<String> {
    let log = client.issue_cmd(BrowserLog).await.expect("the browser log");
    let entries = log
        .as_array()
        .or_else(|| log["value"].as_array())
        .cloned()
        .unwrap_or_default();
    entries
        .iter()
        .filter(|e| matches!(e["level"].as_str(), Some("SEVERE" | "WARNING")))
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn js(client: &Client, script: &str, args: Vec<Value>) -> Value {
    client
        .execute(script, args)
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// The card of the send as the page shows it: state, percentage, and its steering buttons shown.
async fn card(client: &Client, send_id: &str) -> Option<Value> {
    let found = js(
        client,
        "const card = [...document.querySelectorAll('article.send')]
             .find((c) => c.dataset.sendId === arguments[0]);
         if (!card) return null;
         return {
           state: card.querySelector('.state').textContent,
           percent: card.querySelector('.percent').textContent,
           steer: [...card.querySelectorAll('button.steer')].filter((b) => !b.hidden)
             .map((b) => b.textContent),
           error: card.querySelector('.last-error').textContent,
         };",
        vec![send_id.into()],
    )
    .await;
    (!found.is_null()).then_some(found)
}

async fn wait_for_card(
    client: &Client,
    send_id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let done = &done;
    eventually(Duration::from_secs(60), what, || async move {
        card(client, send_id).await.filter(|c| done(c))
    })
    .await
}

async fn click_steer(client: &Client, send_id: &str, label: &str) {
    let css = format!(
        "article.send[data-send-id='{send_id}'] button.steer.{}",
        label.to_lowercase()
    );
    client
        .find(Locator::Css(&css))
        .await
        .unwrap_or_else(|e| panic!("{label} button: {e}"))
        .click()
        .await
        .expect("a click");
}

fn percent(card: &Value) -> f64 {
    card["percent"]
        .as_str()
        .and_then(|p| p.trim_end_matches('%').parse().ok())
        .unwrap_or(-1.0)
}

async fn screenshot(client: &Client) {
    let png = client.screenshot().await.expect("a screenshot");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console.png");
    std::fs::write(&path, png).expect("the screenshot is saved");
}

async fn register_paced_page(app: &TestApp, rate: u32) {
    let http = format!("127.0.0.1:{}", app.http_port);
    otnd_testkit::register_page(&app.channel, &app.sandbox(), &http, PAGE, Some(rate)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_and_steers_sends_in_chromium() {
    let driver = Chromedriver::start().await;
    let db = TestDatabase::sqlite();
    let app = spawn_app(&db).await;
    register_paced_page(&app, 50).await;
    let sandbox = app.sandbox();
    opt_in_users(&app.channel, &sandbox, PAGE, TOPIC, "fan-", 300, None).await;
    opt_in_users(&app.channel, &sandbox, PAGE, SCRIPT_TOPIC, "x-", 3, None).await;
    let story = reviewed_story(&app.channel, &sandbox, StorySpec::default()).await;

    let browser = driver.browser().await;
    let client = &browser;
    client
        .set_window_size(1280, 900)
        .await
        .expect("the window size");
    client
        .goto(&app.http_url("/"))
        .await
        .expect("the console loads");
    // The topics table, a script tag's text among them.
    eventually(Duration::from_secs(20), "the topics are shown", || async move {
        let topics = js(
            client,
            "return [...document.querySelectorAll('#topics td.topic-name')].map((t) => t.textContent);",
            vec![],
        )
        .await;
        topics
            .as_array()
            .filter(|t| t.len() == 2)
            .map(|t| t.iter().map(|v| v.as_str().unwrap().to_string()).collect::<Vec<_>>())
    })
    .await
    .contains(&SCRIPT_TOPIC.to_string())
    .then_some(())
    .expect("the script topic is listed as text");
    // Marks this document: a reload would lose it.
    js(
        client,
        "window.stillTheSamePage = true; return null;",
        vec![],
    )
    .await;

    // A send started elsewhere appears, and its bar moves to 100% as progress streams in.
    let first = start_send(&app.channel, &story, "browser-1").await;
    let seen = std::sync::Mutex::new(Vec::new());
    let (seen_ref, first_id) = (&seen, first.send_id.as_str());
    let last = eventually(
        Duration::from_secs(60),
        "the bar reaches 100%",
        || async move {
            let now = card(client, first_id).await?;
            seen_ref.lock().unwrap().push(percent(&now));
            (now["state"] == "completed").then_some(now)
        },
    )
    .await;
    let seen = seen.into_inner().unwrap();
    assert_eq!(last["percent"], "100.0%", "{last}");
    assert!(
        seen.iter().any(|p| *p > 0.0 && *p < 100.0),
        "the bar was seen between 0% and 100%: {seen:?}"
    );
    assert_eq!(
        js(client, "return window.stillTheSamePage === true;", vec![]).await,
        true,
        "no reload"
    );

    // A second send, paused and then cancelled from the page; gRPC agrees each time.
    opt_in_users(&app.channel, &sandbox, PAGE, TOPIC, "late-", 500, None).await;
    let second_story = reviewed_story(
        &app.channel,
        &sandbox,
        StorySpec {
            text: "Second wave: the doors open at noon",
            ..StorySpec::default()
        },
    )
    .await;
    let second = start_send(&app.channel, &second_story, "browser-2").await;
    wait_for_card(client, &second.send_id, "the second send under way", |c| {
        c["state"] == "running" && percent(c) >= 10.0
    })
    .await;
    click_steer(client, &second.send_id, "Pause").await;
    let paused = wait_for_card(client, &second.send_id, "the send shown paused", |c| {
        c["state"] == "paused"
    })
    .await;
    assert_eq!(paused["steer"], json!(["Resume", "Cancel"]), "{paused}");
    assert_eq!(
        get_send(&app.channel, &second.send_id).await.state(),
        SendState::Paused
    );
    screenshot(client).await;

    click_steer(client, &second.send_id, "Cancel").await;
    let cancelled = wait_for_card(client, &second.send_id, "the send shown cancelled", |c| {
        c["state"] == "cancelled"
    })
    .await;
    assert_eq!(cancelled["steer"], json!([]), "{cancelled}");
    assert_eq!(
        get_send(&app.channel, &second.send_id).await.state(),
        SendState::Cancelled
    );

    // Facebook's reason for a delivery, carrying markup, as the deliveries table shows it.
    let db_conn = Database::connect(&db.url).await.expect("the database");
    db_conn
        .execute_unprepared(&format!(
            "UPDATE deliveries SET error_code = 100, error_subcode = 2018001, \
             error_message = '{IMG_REASON}' \
             WHERE id = (SELECT MIN(id) FROM deliveries WHERE send_id = '{}')",
            first.send_id
        ))
        .await
        .expect("a delivery with a reason");
    let show = format!(
        "article.send[data-send-id='{}'] button.show-deliveries",
        first.send_id
    );
    client
        .find(Locator::Css(&show))
        .await
        .expect("the deliveries button")
        .click()
        .await
        .expect("a click");
    let reasons = eventually(Duration::from_secs(20), "the deliveries are listed", || async move {
        let reasons = js(
            client,
            "return [...document.querySelectorAll('#deliveries td.reason')].map((t) => t.textContent);",
            vec![],
        )
        .await;
        reasons.as_array().filter(|r| r.len() == 50).cloned()
    })
    .await;
    assert_eq!(reasons[0], IMG_REASON);
    let injected = js(
        client,
        "return document.querySelectorAll('body script, body img, body iframe').length;",
        vec![],
    )
    .await;
    assert_eq!(injected, 0, "no element was made from otnd's data");
    assert!(
        client.get_alert_text().await.is_err(),
        "no alert was raised"
    );

    let errors = browser_errors(client).await;
    assert!(errors.is_empty(), "the browser console: {errors:#?}");
    browser.close().await.expect("the session ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_steering_buttons_in_chromium() {
    let driver = Chromedriver::start().await;
    let (_db, app, send_id) = keyed_app_with_a_send().await;

    let browser = driver.browser().await;
    let client = &browser;
    client
        .goto(&app.http_url("/"))
        .await
        .expect("the console loads");

    sign_in(client, VIEWER).await;
    let viewer = wait_for_card(client, &send_id, "the send is shown", |c| {
        c["state"] == "completed"
    })
    .await;
    assert_eq!(viewer["percent"], "100.0%", "{viewer}");
    let shown = js(
        client,
        "return {
           steer: document.querySelectorAll('button.steer').length,
           deliveries: document.querySelectorAll('button.show-deliveries').length,
           role: document.getElementById('role').textContent,
           cookie: document.cookie,
           url: location.href,
         };",
        vec![],
    )
    .await;
    assert_eq!(shown["steer"], 0, "{shown}");
    assert_eq!(shown["deliveries"], 1, "{shown}");
    assert_eq!(shown["role"], "role: viewer", "{shown}");
    assert_eq!(shown["cookie"], "", "{shown}");
    assert!(!shown["url"].as_str().unwrap().contains(VIEWER), "{shown}");

    // Another key: an operator gets the buttons (hidden while the send is completed).
    client
        .find(Locator::Id("forget-key"))
        .await
        .expect("the button")
        .click()
        .await
        .expect("a click");
    sign_in(client, OPERATOR).await;
    eventually(
        Duration::from_secs(20),
        "the operator's buttons",
        || async move {
            let steer = js(
                client,
                "return document.querySelectorAll('button.steer').length;",
                vec![],
            )
            .await;
            (steer == 3).then_some(())
        },
    )
    .await;

    let errors = browser_errors(client).await;
    assert!(errors.is_empty(), "the browser console: {errors:#?}");
    browser.close().await.expect("the session ends");
}

/// Types the key into the console's key field and uses it.
async fn sign_in(client: &Client, key: &str) {
    let field = client
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("#key"))
        .await
        .expect("the key is asked for");
    let shown = &field;
    eventually(
        Duration::from_secs(20),
        "the key field is shown",
        || async move { shown.is_displayed().await.ok().filter(|shown| *shown) },
    )
    .await;
    field.send_keys(key).await.expect("typing");
    client
        .find(Locator::Id("sign-in"))
        .await
        .expect("the button")
        .click()
        .await
        .expect("a click");
}
