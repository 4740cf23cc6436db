//! How fast graph-sandbox answers single one-time-token sends on one core, with no faults.
//!
//!     cargo bench -p graph-sandbox --bench throughput [-- SENDS CONCURRENCY]
//!
//! The sandbox runs alone on one thread (a current-thread runtime); the client runs on another.
//! Besides wall-clock throughput it reads the sandbox thread's own CPU time (Linux
//! /proc/thread-self/schedstat), so "sends per sandbox CPU-second" holds even when the client is
//! the slower side. Every token is sent once; the sandbox's ledger must count each as accepted.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use graph_sandbox::{self as sandbox, SandboxOptions, Stats};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

const PAGE: &str = "100";
const PAGE_TOKEN: &str = "EAAB-bench";

/// CPU nanoseconds the calling thread has run.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Starts the sandbox on a thread of its own; returns its address and a probe of its CPU time.
fn start_sandbox() -> (
    std::net::SocketAddr,
    mpsc::UnboundedSender<oneshot::Sender<u64>>,
) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<oneshot::Sender<u64>>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ready_tx.send(listener.local_addr().unwrap()).unwrap();
            tokio::spawn(async move {
                // Runs on the sandbox's thread, so it reads that thread's CPU time.
                while let Some(reply) = probe_rx.recv().await {
                    let _ = reply.send(thread_cpu_ns());
                }
            });
            sandbox::serve(listener, SandboxOptions::default(), std::future::pending())
                .await
                .unwrap();
        });
    });
    (ready_rx.recv().unwrap(), probe_tx)
}

async fn sandbox_cpu_ns(probe: &mpsc::UnboundedSender<oneshot::Sender<u64>>) -> u64 {
    let (tx, rx) = oneshot::channel();
    probe.send(tx).unwrap();
    rx.await.unwrap()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sends: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let (addr, probe) = start_sandbox();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(addr, probe, sends, concurrency));
}

async fn run(
    addr: std::net::SocketAddr,
    probe: mpsc::UnboundedSender<oneshot::Sender<u64>>,
    sends: usize,
    concurrency: usize,
) {
    let base = format!("http://{addr}");
    let http = graph_sandbox::http_client_builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    http.post(format!("{base}/__sandbox/pages"))
        .json(&json!({"page_id": PAGE, "access_token": PAGE_TOKEN, "app_secret": "s"}))
        .send()
        .await
        .unwrap();
    let mut tokens: Vec<String> = Vec::with_capacity(sends);
    while tokens.len() < sends {
        let count = (sends - tokens.len()).min(100_000);
        let answer: serde_json::Value = http
            .post(format!("{base}/__sandbox/optins"))
            .json(
                &json!({"page_id": PAGE, "psid_prefix": format!("u{}-", tokens.len()),
                          "count": count, "payload": "bench", "deliver_webhook": false}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens.extend(serde_json::from_value::<Vec<String>>(answer["tokens"].clone()).unwrap());
    }
    let bodies: Arc<Vec<String>> = Arc::new(
        tokens
            .iter()
            .map(|t| json!({"recipient": {"one_time_notif_token": t}, "message": {"text": "Tickets are on sale"}}).to_string())
            .collect(),
    );
    let url = Arc::new(format!(
        "{base}/v24.0/me/messages?access_token={PAGE_TOKEN}"
    ));

    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = sandbox_cpu_ns(&probe).await;
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, url, bodies, next) = (http.clone(), url.clone(), bodies.clone(), next.clone());
        workers.spawn(async move {
            let mut failures = 0u64;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(index) else { break };
                let response = http
                    .post(url.as_str())
                    .header("Content-Type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                    }
                    _ => failures += 1,
                }
            }
            failures
        });
    }
    let mut failures = 0;
    while let Some(result) = workers.join_next().await {
        failures += result.unwrap();
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = (sandbox_cpu_ns(&probe).await - cpu_before) as f64 / 1e9;
    let stats: Stats = http
        .get(format!("{base}/__sandbox/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    println!("graph-sandbox: single one-time-token sends, no faults, sandbox on one thread");
    println!("  sends                        {sends}");
    println!("  client concurrency           {concurrency}");
    println!("  failed answers               {failures}");
    println!("  accepted by the sandbox      {}", stats.accepted);
    println!("  wall time                    {wall:.2} s");
    println!("  sends/s (wall clock)         {:.0}", sends as f64 / wall);
    println!("  sandbox thread CPU time      {cpu:.2} s");
    if cpu > 0.0 {
        println!("  sends per sandbox CPU-second {:.0}", sends as f64 / cpu);
    }
    assert_eq!(
        stats.accepted as usize, sends,
        "every token accepted exactly once"
    );
}
