//! How fast otnd takes opt-ins in through its webhook, on SQLite.
//!
//!     cargo bench --bench ingest [-- OPT_INS CONCURRENCY]
//!
//! Starts otnd (the library's BackgroundApp, as `otnd serve` runs) on a fresh SQLite file,
//! registers a page, then POSTs signed webhook bodies of 100 opt-in events each, as Facebook
//! does, from CONCURRENCY connections. Every token must be stored exactly once: the ledger is
//! checked through ListTopics at the end.

#[path = "in_process/mod.rs"]
mod common;
use common::PAGE;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use otnd::pb::{ListTopicsRequest, opt_in_service_client::OptInServiceClient};
use serde_json::json;

const APP_SECRET: &str = "bench-app-secret";
const EVENTS_PER_POST: usize = 100;
const TOPIC: &str = "Tickets on sale";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let opt_ins: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let posts = opt_ins.div_ceil(EVENTS_PER_POST);

    let bench = common::start_on_sqlite()?;
    let app = &bench.app;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(drive(app.grpc_port, app.http_port, posts, concurrency));
    let common::Bench { app, dir, .. } = bench;
    app.stop()?;
    drop(dir);
    result
}

async fn drive(
    grpc_port: u16,
    http_port: u16,
    posts: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let channel = common::connect_and_register(grpc_port, APP_SECRET).await?;

    // Bodies and signatures are made before the clock starts: only otnd is measured.
    let now = chrono::Utc::now().timestamp_millis();
    let bodies: Arc<Vec<(Vec<u8>, String)>> = Arc::new(
        (0..posts)
            .map(|post| {
                let events: Vec<_> = (0..EVENTS_PER_POST)
                    .map(|i| {
                        let n = post * EVENTS_PER_POST + i;
                        json!({"sender": {"id": format!("psid-{n}")}, "recipient": {"id": PAGE},
                               "timestamp": now,
                               "optin": {"type": "one_time_notif_req", "payload": TOPIC,
                                         "one_time_notif_token": format!("token-{n:012}-abcdefghijklmnopqrstuvwxyz")}})
                    })
                    .collect();
                let body = json!({"object": "page", "entry": [{"id": PAGE, "time": now, "messaging": events}]})
                    .to_string()
                    .into_bytes();
                let signature = format!(
                    "sha256={}",
                    hex::encode(otnd::crypto::hmac_sha256(APP_SECRET.as_bytes(), &body))
                );
                (body, signature)
            })
            .collect(),
    );

    let http = otnd::graph::http_client();
    let url = Arc::new(format!("http://127.0.0.1:{http_port}/webhook"));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, url, bodies, next) = (http.clone(), url.clone(), bodies.clone(), next.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0u64;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((body, signature)) = bodies.get(index) else {
                    break;
                };
                let sent = Instant::now();
                let response = http
                    .post(url.as_str())
                    .header("Content-Type", "application/json")
                    .header("X-Hub-Signature-256", signature)
                    .body(body.clone())
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => latencies.push(sent.elapsed()),
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        });
    }
    let mut latencies: Vec<Duration> = Vec::new();
    let mut failures = 0;
    while let Some(result) = workers.join_next().await {
        let (mut l, f) = result?;
        latencies.append(&mut l);
        failures += f;
    }
    let wall = started.elapsed().as_secs_f64();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };

    let ledger = OptInServiceClient::new(channel)
        .list_topics(ListTopicsRequest {
            page_id: PAGE.into(),
        })
        .await?
        .into_inner()
        .topics;
    let stored = ledger
        .iter()
        .find(|t| t.topic == TOPIC)
        .map_or(0, |t| t.active);
    let sent = (posts * EVENTS_PER_POST) as f64;

    println!("otnd webhook ingestion on SQLite: signed POSTs of {EVENTS_PER_POST} opt-ins");
    println!("  opt-ins posted             {}", posts * EVENTS_PER_POST);
    println!("  POSTs                      {posts} from {concurrency} connections");
    println!("  failed POSTs               {failures}");
    println!("  opt-ins stored (ledger)    {stored}");
    println!("  wall time                  {wall:.2} s");
    println!("  opt-ins/s                  {:.0}", sent / wall);
    println!(
        "  POST latency p50 / p99     {:.1} ms / {:.1} ms",
        percentile(0.50),
        percentile(0.99)
    );
    anyhow::ensure!(
        stored as usize == posts * EVENTS_PER_POST,
        "every opt-in stored once"
    );
    Ok(())
}
