//! The send engine's figures, measured on the real binaries: `otnd` and `graph-sandbox` run as
//! child processes, driven over gRPC and the sandbox's admin surface like any client would.
//!
//!     cargo bench --bench send_engine                 # every scenario
//!     cargo bench --bench send_engine -- s0 first     # some of them
//!
//! Scenarios:
//! - `s0`: 20,000 recipients on one page, sandbox without latency or limits, page pacing off
//!   (`OTN_ENFORCE_PAGE_RATE=false`), SQLite: deliveries per second from StartSend to COMPLETED.
//! - `first`: the time from StartSend's answer to the first message the sandbox accepts, with
//!   200,000 recipients to materialise (so materialising all of them first would show).
//! - `s1`: 20 pages x 300/s, sandbox latency 150 ms and a 300/s limit per page, 3,000
//!   recipients each: the achieved share of the limit, and 613s (must be 0).
//! - `mem`: 1,000,000 recipients on one page, unpaced: peak RSS of otnd (VmHWM) and CPU seconds.
//! - `peer`: the npm `messaging-api-messenger` client's `sendBatch` in a plain loop (1 and 8
//!   loops, no persistence) sending the same number of tokens to the same sandbox
//!   (`tests/peer/messaging-api-messenger/batch-loop.cjs`; needs Node.js and npm): the rate S0
//!   is compared with.
//!
//! Sizes can be changed with `S0_RECIPIENTS`, `S1_PER_PAGE`, `MEM_RECIPIENTS`, `FIRST_RECIPIENTS`.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use otnd::pb::{
    CreatePageRequest, CreateStoryRequest, GetSendRequest, ListTopicsRequest, PreviewStoryRequest,
    SendState, StartSendRequest, StoryContent, opt_in_service_client::OptInServiceClient,
    page_service_client::PageServiceClient, send_service_client::SendServiceClient,
    story_content::Kind, story_service_client::StoryServiceClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

const OTND: &str = env!("CARGO_BIN_EXE_otnd");
const SANDBOX: &str = env!("CARGO_BIN_EXE_graph-sandbox");
const TOPIC: &str = "Benchmark topic";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Peak resident memory (VmHWM) in MiB and CPU seconds (user + system) so far.
    fn usage(&self) -> (f64, f64) {
        let pid = self.0.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm_kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        (hwm_kib / 1024.0, ticks / 100.0)
    }
}

/// Starts a process and waits for a line containing `needle` on stdout or stderr.
fn spawn_until(mut command: Command, needle: &str) -> (Proc, String) {
    // Owned by a `Proc` at once: killed and reaped whatever happens next.
    let mut child = Proc(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts"),
    );
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no line with {needle:?}"));
        if line.contains(needle) {
            // Keep draining so that the child never blocks on a full pipe.
            // BENCH_ECHO=1 shows the children's output (with BENCH_OTND_LOG=otnd=debug, say).
            let echo = std::env::var_os("BENCH_ECHO").is_some();
            std::thread::spawn(move || {
                while let Ok(line) = rx.recv() {
                    if echo {
                        eprintln!("{line}");
                    }
                }
            });
            return (child, line);
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    otnd: Proc,
    sandbox_proc: Proc,
    sandbox_url: String,
    channel: Channel,
    http: String,
}

async fn setup(sandbox_args: &[&str], otnd_env: &[(&str, &str)]) -> Setup {
    let mut sandbox = Command::new(SANDBOX);
    sandbox.args(["--addr", "127.0.0.1:0"]).args(sandbox_args);
    let (sandbox, line) = spawn_until(sandbox, "graph-sandbox listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let sandbox_url = format!("http://{addr}");

    let dir = tempfile::tempdir().unwrap();
    let mut otnd = Command::new(OTND);
    otnd.current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "OTN_DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.path().join("otnd.db").display()),
        )
        .env("OTN_MASTER_KEY", STANDARD.encode([9u8; 32]))
        .env("OTN_GRAPH_URL", &sandbox_url)
        .env("OTN_GRPC_ADDR", "127.0.0.1:0")
        .env("OTN_HTTP_ADDR", "127.0.0.1:0")
        .env("OTN_LOG_FORMAT", "json")
        .env(
            "RUST_LOG",
            std::env::var("BENCH_OTND_LOG").unwrap_or("warn,otnd::startup=info".into()),
        )
        .envs(otnd_env.iter().copied());
    let (otnd, ready) = spawn_until(otnd, "otnd ready");
    let field = |name: &str| {
        let start = ready.find(&format!("\"{name}\":\"")).unwrap() + name.len() + 4;
        ready[start..].split('"').next().unwrap().to_string()
    };
    let channel = Channel::from_shared(format!("http://{}", field("grpc_addr")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Setup {
        _dir: dir,
        otnd,
        sandbox_proc: sandbox,
        sandbox_url,
        channel,
        http: field("http_addr"),
    }
}

impl Setup {
    async fn sandbox(&self, path: &str, body: Option<Value>) -> Value {
        let client = otnd::graph::http_client();
        let request = match body {
            Some(body) => client
                .post(format!("{}{path}", self.sandbox_url))
                .json(&body),
            None => client.get(format!("{}{path}", self.sandbox_url)),
        };
        request.send().await.unwrap().json().await.unwrap()
    }

    /// Registers a page, opts `recipients` users in through signed webhooks, and writes and
    /// reviews a story; returns the story id.
    async fn page_with_story(&self, page: &str, recipients: u64) -> String {
        PageServiceClient::new(self.channel.clone())
            .create_page(CreatePageRequest {
                page_id: page.into(),
                name: format!("Bench {page}"),
                access_token: format!("EAAB-{page}"),
                app_secret: format!("secret-{page}"),
                verify_token: String::new(),
                send_rate_per_second: Some(300),
            })
            .await
            .unwrap();
        self.sandbox(
            "/__sandbox/pages",
            Some(
                json!({"page_id": page, "access_token": format!("EAAB-{page}"),
                "app_secret": format!("secret-{page}"),
                "webhook_url": format!("http://{}/webhook", self.http)}),
            ),
        )
        .await;
        let mut left = recipients;
        let mut start = 0;
        while left > 0 {
            let count = left.min(100_000);
            self.sandbox(
                "/__sandbox/optins",
                Some(
                    json!({"page_id": page, "psid_prefix": format!("u{start}-"), "count": count,
                    "payload": TOPIC, "deliver_webhook": true}),
                ),
            )
            .await;
            left -= count;
            start += count;
        }
        let mut optins = OptInServiceClient::new(self.channel.clone());
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let topics = optins
                .list_topics(ListTopicsRequest {
                    page_id: page.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .topics;
            if topics
                .iter()
                .any(|t| t.topic == TOPIC && t.active == recipients)
            {
                break;
            }
            assert!(Instant::now() < deadline, "opt-ins did not arrive");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut stories = StoryServiceClient::new(self.channel.clone());
        let story = stories
            .create_story(CreateStoryRequest {
                page_id: page.into(),
                topic: TOPIC.into(),
                content: Some(StoryContent {
                    kind: Some(Kind::Text("Tickets are on sale".into())),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .story
            .unwrap();
        self.sandbox(
            "/__sandbox/interactions",
            Some(json!({"page_id": page, "psid": "reviewer", "text": "ok", "deliver_webhook": false})),
        )
        .await;
        stories
            .preview_story(PreviewStoryRequest {
                story_id: story.story_id.clone(),
                reviewer_psid: "reviewer".into(),
            })
            .await
            .unwrap();
        story.story_id
    }

    async fn start(&self, story_id: &str) -> String {
        SendServiceClient::new(self.channel.clone())
            .start_send(StartSendRequest {
                story_id: story_id.into(),
                request_id: format!("bench-{story_id}"),
            })
            .await
            .unwrap()
            .into_inner()
            .send
            .unwrap()
            .send_id
    }

    async fn wait_completed(&self, send_ids: &[String]) -> Vec<otnd::pb::SendProgress> {
        let mut sends = SendServiceClient::new(self.channel.clone());
        let mut done = Vec::new();
        for id in send_ids {
            loop {
                let send = sends
                    .get_send(GetSendRequest {
                        send_id: id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .send
                    .unwrap();
                if send.state() == SendState::Completed {
                    done.push(send.progress.unwrap());
                    break;
                }
                assert!(
                    matches!(send.state(), SendState::Running | SendState::Queued),
                    "{send:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        done
    }

    async fn stats(&self) -> Value {
        self.sandbox("/__sandbox/stats", None).await
    }
}

async fn s0() {
    let recipients = env_or("S0_RECIPIENTS", 20_000);
    let s = setup(&[], &[("OTN_ENFORCE_PAGE_RATE", "false")]).await;
    let story = s.page_with_story("1000", recipients).await;
    let (_, cpu_before) = s.otnd.usage();
    let (_, sandbox_before) = s.sandbox_proc.usage();
    let started = Instant::now();
    let send = s.start(&story).await;
    let done = s.wait_completed(&[send]).await;
    let elapsed = started.elapsed().as_secs_f64();
    let stats = s.stats().await;
    let (rss, cpu) = s.otnd.usage();
    let (_, sandbox_cpu) = s.sandbox_proc.usage();
    assert_eq!(done[0].sent, recipients);
    println!(
        "S0  unthrottled, no latency, SQLite: {recipients} recipients in {elapsed:.2} s = {:.0} deliveries/s \
         (CPU while sending: otnd {:.2} s, sandbox {:.2} s; otnd peak RSS {rss:.0} MiB; duplicates {}, \
         tokens accepted twice {})",
        recipients as f64 / elapsed,
        cpu - cpu_before,
        sandbox_cpu - sandbox_before,
        stats["recipients_with_duplicate_content"],
        stats["tokens_accepted_more_than_once"]
    );
}

async fn first_call() {
    let recipients = env_or("FIRST_RECIPIENTS", 200_000);
    let s = setup(&["--rate-limit-per-page", "300"], &[]).await;
    let story = s.page_with_story("2000", recipients).await;
    let accepted_before = s.stats().await["accepted"].as_u64().unwrap();
    let mut sends = SendServiceClient::new(s.channel.clone());
    let started = Instant::now();
    let send = sends
        .start_send(StartSendRequest {
            story_id: story,
            request_id: "first".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .send
        .unwrap();
    let answered = started.elapsed();
    loop {
        if s.stats().await["accepted"].as_u64().unwrap() > accepted_before {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    let first = started.elapsed();
    println!(
        "first call: {recipients} recipients, 300/s page: StartSend answered in {:.1} ms, \
         first message accepted by the sandbox {:.1} ms after StartSend was called",
        answered.as_secs_f64() * 1000.0,
        first.as_secs_f64() * 1000.0
    );
    let _ = sends
        .cancel_send(otnd::pb::CancelSendRequest {
            send_id: send.send_id,
        })
        .await;
}

async fn s1() {
    let per_page = env_or("S1_PER_PAGE", 3_000);
    let pages = 20;
    let s = setup(
        &["--latency-ms", "150", "--rate-limit-per-page", "300"],
        &[],
    )
    .await;
    let mut stories = Vec::new();
    for p in 0..pages {
        stories.push(s.page_with_story(&format!("{}", 3000 + p), per_page).await);
    }
    let (_, cpu_before) = s.otnd.usage();
    let (_, sandbox_before) = s.sandbox_proc.usage();
    let started = Instant::now();
    let mut ids = Vec::new();
    for story in &stories {
        ids.push(s.start(story).await);
    }
    let done = s.wait_completed(&ids).await;
    let elapsed = started.elapsed().as_secs_f64();
    let total: u64 = done.iter().map(|p| p.sent).sum();
    let stats = s.stats().await;
    let limit = 300.0 * f64::from(pages);
    // The last page's last answer arrives 150 ms after its call: not time spent sending.
    let sending = elapsed - 0.15;
    // Steady state, from the sandbox's ledger: each page's calls between its first and last
    // second, over that span.
    let messages = s.sandbox("/__sandbox/messages", None).await;
    let mut per_page: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for m in messages["messages"].as_array().unwrap() {
        if m["token"].is_string() {
            per_page
                .entry(m["page_id"].as_str().unwrap().to_string())
                .or_default()
                .push(m["time_ms"].as_i64().unwrap());
        }
    }
    let shares: Vec<f64> = per_page
        .values_mut()
        .map(|times| {
            times.sort_unstable();
            let (first, last) = (times[0] + 1000, times[times.len() - 1] - 1000);
            let inside = times.iter().filter(|&&t| t >= first && t < last).count();
            inside as f64 / ((last - first) as f64 / 1000.0) / 300.0
        })
        .collect();
    if std::env::var_os("BENCH_S1_SECONDS").is_some() {
        for (page, times) in per_page.iter().take(2) {
            let mut seconds: std::collections::BTreeMap<i64, usize> = Default::default();
            for t in times {
                *seconds.entry(t / 1000).or_default() += 1;
            }
            let gaps: Vec<i64> = times
                .windows(2)
                .map(|w| w[1] - w[0])
                .filter(|g| *g > 15)
                .collect();
            println!(
                "page {page}: per second {:?}; gaps over 15 ms: {gaps:?}",
                seconds.values().collect::<Vec<_>>()
            );
        }
    }
    // From the first call any page made to the last one (the sandbox's clock): ramp included.
    let all: Vec<i64> = per_page.values().flatten().copied().collect();
    let span_s = (all.iter().max().unwrap() - all.iter().min().unwrap()) as f64 / 1000.0;
    let span_share = all.len() as f64 / span_s / limit;
    let steady = shares.iter().sum::<f64>() / shares.len() as f64;
    let worst = shares.iter().copied().fold(f64::INFINITY, f64::min);
    let (rss, cpu) = s.otnd.usage();
    let (_, sandbox_cpu) = s.sandbox_proc.usage();
    println!(
        "S1  share of the limit: {steady:.3} in steady state (each page's calls after its first \
         and before its last second; lowest page {worst:.3}), {span_share:.3} from the first call \
         to the last; CPU while sending: otnd {:.1} s, sandbox {:.1} s",
        cpu - cpu_before,
        sandbox_cpu - sandbox_before
    );
    println!(
        "S1  {pages} pages x 300/s, 150 ms latency: {total} deliveries in {elapsed:.2} s = {:.0}/s, \
         {:.3} of the {limit:.0}/s limit (613 answers: {}, otnd CPU {cpu:.1} s, peak RSS {rss:.0} MiB)",
        total as f64 / sending,
        total as f64 / sending / limit,
        stats["rate_limited"]
    );
}

async fn mem() {
    let recipients = env_or("MEM_RECIPIENTS", 1_000_000);
    let s = setup(&[], &[("OTN_ENFORCE_PAGE_RATE", "false")]).await;
    let story = s.page_with_story("4000", recipients).await;
    let (rss_loaded, _) = s.otnd.usage();
    // Resets VmHWM (Linux >= 4.0): the peak below is the send's, not the loading's.
    let _ = std::fs::write(format!("/proc/{}/clear_refs", s.otnd.0.id()), "5");
    let started = Instant::now();
    let send = s.start(&story).await;
    let done = s.wait_completed(&[send]).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (rss, cpu) = s.otnd.usage();
    println!(
        "mem {recipients} recipients, unpaced: peak RSS while sending {rss:.0} MiB (peak while \
         loading the opt-ins {rss_loaded:.0} MiB), sent {} in {elapsed:.1} s = {:.0}/s, otnd CPU {cpu:.1} s",
        done[0].sent,
        done[0].sent as f64 / elapsed
    );
}

async fn peer() {
    let tokens = env_or("S0_RECIPIENTS", 20_000);
    let source =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peer/messaging-api-messenger");
    let dir = tempfile::tempdir().unwrap();
    for file in ["package.json", "package-lock.json", "batch-loop.cjs"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let npm = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir.path())
        .status()
        .expect("npm runs");
    assert!(npm.success(), "npm ci failed");
    for loops in [1, 8] {
        let mut sandbox = Command::new(SANDBOX);
        sandbox.args(["--addr", "127.0.0.1:0"]);
        let (sandbox, line) = spawn_until(sandbox, "graph-sandbox listening on");
        let url = format!("http://{}", line.rsplit(' ').next().unwrap());
        let client = otnd::graph::http_client();
        client
            .post(format!("{url}/__sandbox/pages"))
            .json(&json!({"page_id": "5000", "access_token": "EAAB-peer", "app_secret": "peer"}))
            .send()
            .await
            .unwrap();
        let issued: Value = client
            .post(format!("{url}/__sandbox/optins"))
            .json(
                &json!({"page_id": "5000", "psid_prefix": "p", "count": tokens,
                "payload": TOPIC, "deliver_webhook": false}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let list: Vec<&str> = issued["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let file = dir.path().join("tokens.txt");
        std::fs::write(&file, list.join("\n")).unwrap();
        let (_, cpu_before) = sandbox.usage();
        let output = Command::new("node")
            .arg("batch-loop.cjs")
            .current_dir(dir.path())
            .env("SANDBOX_URL", &url)
            .env("PAGE_TOKEN", "EAAB-peer")
            .env("APP_SECRET", "peer")
            .env("TOKENS_FILE", &file)
            .env("LOOPS", loops.to_string())
            .output()
            .expect("node runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: Value = serde_json::from_slice(&output.stdout).unwrap();
        let (_, cpu) = sandbox.usage();
        println!(
            "peer messaging-api-messenger sendBatch, {loops} loop(s): {} of {tokens} accepted in \
             {:.2} s = {:.0} sends/s (sandbox CPU {:.2} s)",
            result["accepted"],
            result["seconds"].as_f64().unwrap(),
            result["per_second"].as_f64().unwrap(),
            cpu - cpu_before
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; scenario names are the other arguments.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "send engine benchmark, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    runtime.block_on(async {
        if run("s0") {
            s0().await;
        }
        if run("first") {
            first_call().await;
        }
        if run("s1") {
            s1().await;
        }
        if run("mem") {
            mem().await;
        }
        if run("peer") {
            peer().await;
        }
    });
}
