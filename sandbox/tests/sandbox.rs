//! graph-sandbox on its own: the binary as scripts and benchmarks start it, and the in-process
//! sandbox as a Graph client sees it. Nothing of otnd is used here.

use std::io::BufRead;

use graph_sandbox::{RunningSandbox, SandboxOptions, wire};
use serde_json::{Value, json};

const PAGE: &str = "111";
const PAGE_TOKEN: &str = "EAAB-page-111";
const APP_SECRET: &str = "app-secret-111";

fn http_client() -> reqwest::Client {
    graph_sandbox::http_client_builder()
        .build()
        .expect("a plain HTTP client builds")
}

/// The binary started with `args` on a free port: the process and the address it printed.
fn start_binary(args: &[&str]) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_graph-sandbox"))
        .args(["--addr", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("graph-sandbox listening on "), "{line}");
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    (child, addr)
}

/// `GET url`, its JSON body.
async fn get_json(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

fn token_send(token: &str, text: &str) -> Value {
    json!({"recipient": {"one_time_notif_token": token}, "message": {"text": text}})
}

/// The real `graph-sandbox` binary: fault flags apply from the start and survive a reset; bad
/// flags exit 2 saying why.
#[tokio::test]
async fn the_binary_takes_its_faults_as_flags() {
    let binary = env!("CARGO_BIN_EXE_graph-sandbox");
    let refused = std::process::Command::new(binary)
        .args(["--error-rate", "2"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("error_rate must be from 0 to 1"));

    let (mut child, addr) = start_binary(&[
        "--restricted-page",
        PAGE,
        "--rate-limit-per-page",
        "5",
        "--recurring-cooldown-seconds",
        "7",
    ]);
    let http = http_client();
    let admin = |path: &'static str, body: Value| {
        let request = http.post(format!("http://{addr}{path}")).json(&body);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let faults = admin("/__sandbox/reset", json!({})).await;
    assert_eq!(faults, json!({}));
    let faults = get_json(&http, format!("http://{addr}/__sandbox/faults")).await;
    assert_eq!(
        faults["restricted_pages"],
        json!([PAGE]),
        "reset returns to the flags"
    );
    assert_eq!(faults["rate_limit_per_page"], 5);
    assert_eq!(faults["recurring_cooldown_seconds"], 7);
    assert_eq!(faults["enforce_recurring_gap"], true);
    admin(
        "/__sandbox/pages",
        json!({"page_id": PAGE, "access_token": PAGE_TOKEN, "app_secret": APP_SECRET}),
    )
    .await;
    let token = admin(
        "/__sandbox/optins",
        json!({"page_id": PAGE, "psid": "u1", "payload": "t"}),
    )
    .await;
    let answer: Value = http
        .post(format!(
            "http://{addr}/v24.0/me/messages?access_token={PAGE_TOKEN}"
        ))
        .json(&token_send(token["token"].as_str().unwrap(), "x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["error"]["error_subcode"], 1893063, "{answer}");
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM stops the binary cleanly (exit 0), as a supervisor or a benchmark stops it.
#[cfg(unix)]
#[test]
fn a_sigterm_stops_the_binary_cleanly() {
    let (mut child, _) = start_binary(&[]);
    // SAFETY: kill takes plain integers.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
}

/// The judge: a one-time token is accepted once, refused as used after, with the appsecret_proof
/// checked; the stats count what it saw.
#[tokio::test]
async fn a_token_is_accepted_once_and_the_stats_count_the_second_try() {
    let sandbox = RunningSandbox::start(SandboxOptions::default())
        .await
        .unwrap();
    let base = format!("http://{}", sandbox.addr);
    let http = http_client();
    let post = |path: String, body: Value| {
        let request = http.post(format!("{base}{path}")).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    post(
        "/__sandbox/pages".into(),
        json!({"page_id": PAGE, "access_token": PAGE_TOKEN, "app_secret": APP_SECRET}),
    )
    .await;
    let (_, optin) = post(
        "/__sandbox/optins".into(),
        json!({"page_id": PAGE, "psid": "u1", "payload": "t"}),
    )
    .await;
    let token = optin["token"].as_str().unwrap();
    let proof = wire::appsecret_proof(APP_SECRET, PAGE_TOKEN);
    let send = |body: Value| {
        let mut body = body;
        body["access_token"] = json!(PAGE_TOKEN);
        body["appsecret_proof"] = json!(proof);
        post("/v24.0/me/messages".into(), body)
    };
    let (status, first) = send(token_send(token, "hello")).await;
    assert_eq!(status, 200, "{first}");
    assert!(first["message_id"].is_string(), "{first}");
    let (status, second) = send(token_send(token, "hello again")).await;
    assert_eq!(status, 400, "{second}");
    let (status, forged) = {
        let mut body = token_send(token, "x");
        body["access_token"] = json!(PAGE_TOKEN);
        body["appsecret_proof"] = json!(wire::appsecret_proof("not-the-secret", PAGE_TOKEN));
        post("/v24.0/me/messages".into(), body).await
    };
    assert_eq!(status, 400, "a wrong appsecret_proof is refused: {forged}");

    let stats = get_json(&http, format!("{base}/__sandbox/stats")).await;
    assert_eq!(stats["accepted"], 1, "{stats}");
    assert_eq!(stats["tokens_presented_more_than_once"], 1, "{stats}");
    assert_eq!(stats["tokens_accepted_more_than_once"], 0, "{stats}");
}
