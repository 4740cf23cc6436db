//! The send engine's figures, measured on the real binaries: `otnd` and `graph-sandbox` run as
//! child processes, driven over gRPC and the sandbox's admin surface like any client would.
//! BENCHMARKS.md says what each scenario does and how each figure is defined.
//!
//!     cargo bench --bench send_engine                 # every scenario, then one summary table
//!     cargo bench --bench send_engine -- s0 peer      # some of them
//!
//! Scenarios:
//! - `s0`: 20,000 recipients on one page, sandbox without latency or limits, page pacing off
//!   (`OTN_ENFORCE_PAGE_RATE=false`), SQLite: deliveries per second from StartSend to COMPLETED
//!   (the median of `BENCH_RUNS` runs).
//! - `peer`: the npm `messaging-api-messenger` client against the same sandbox with as many
//!   tokens: `sendBatch` (50 per request) in 1 and in 8 plain loops, and single `sendMessage`
//!   calls 64 in flight (`sandbox/tests/peer/messaging-api-messenger/*-loop.cjs`; needs Node.js and npm).
//!   S0 and the peer take turns, run by run; the table gives S0's rate divided by each.
//! - `first`: the time from StartSend to the first message the sandbox accepts, with 200,000
//!   recipients to materialise on a page paced at 300/s.
//! - `s1`: 20 pages x 300/s, sandbox latency 150 ms and a 300/s limit per page, 3,000
//!   recipients each: the achieved share of the limit, and 613s (must be 0).
//! - `s1-mixed`: S1 to an audience of half one-time and half recurring tokens (each page's
//!   users in two blocks): the same share, the same targets.
//! - `s2`: S1 with 2% of the sandbox's answers throttled at random (613 or 80006): the share of
//!   the limit in steady state, nothing dropped.
//! - `s4`: S1's 20 pages configured at 300/s, but the sandbox gives each only 200 calls in any
//!   rolling second (its business-use-case capacity, reported in the usage header; at it, 80006
//!   and the page refused for a minute): the share of that true capacity, and the share of
//!   calls throttled.
//! - `s3` (alias `mem`): 1,000,000 recipients on one topic of one page, unpaced: peak RSS.
//!
//! Every otnd scenario also measures, during the send: time to first call, progress lag
//! (WatchSend against the sandbox's ledger of acceptances, or its accepted count polled every
//! 5 ms), GetSend latency (called every 10 ms), CPU seconds of otnd and of the sandbox, peak RSS
//! (VmHWM, reset after loading) and duplicates (the sandbox's counters).
//!
//! Sizes: `S0_RECIPIENTS`, `S1_PER_PAGE`, `S2_PER_PAGE`, `S4_PER_PAGE`, `S3_RECIPIENTS` (or `MEM_RECIPIENTS`),
//! `FIRST_RECIPIENTS`, `BENCH_RUNS` (runs of S0 and of each peer mode, default 3).
//! `BENCH_PROBES=0` turns the probes off (to see what they cost).

// The allocator graph-sandbox's binary uses, for the sandbox this program runs as a child of its
// own (see `support::serve_if_sandbox_child`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use futures::stream::{self, StreamExt};
use otnd::pb::{
    GetSendRequest, ListTopicsRequest, SendProgress, SendState, StartSendRequest, WatchSendRequest,
    opt_in_service_client::OptInServiceClient, send_service_client::SendServiceClient,
};
use otnd_testkit::{Sandbox, StorySpec};
use serde_json::{Value, json};
use support::{OTND, Proc, env_or, json_field, spawn_sandbox, spawn_until};
use tokio::{task::JoinHandle, time::MissedTickBehavior};
use tonic::transport::Channel;

const TOPIC: &str = "Benchmark topic";
/// The Graph rate limit per page in S1 and S2, and the pace of `first`'s page.
const PAGE_LIMIT: u32 = 300;
/// S4's true capacity of every page, calls in any rolling second.
const S4_CAPACITY: u32 = 200;
/// S1's, S2's and S4's sandbox latency.
const LATENCY_MS: u64 = 150;
/// The sandbox's accepted count is polled this often during a send...
const STATS_EVERY: Duration = Duration::from_millis(5);
/// ...and this often until the first message is accepted (time to first call).
const STATS_EVERY_BEFORE_FIRST: Duration = Duration::from_millis(1);
/// GetSend is called this often while a send runs.
const GET_SEND_EVERY: Duration = Duration::from_millis(10);
/// Events in each opt-in webhook POST the sandbox makes (DESIGN.md: up to 100).
const WEBHOOK_EVENTS_PER_POST: u64 = 100;
/// S3's target: 150 MB.
const S3_RSS_TARGET_MIB: f64 = 150e6 / (1024.0 * 1024.0);

/// `BENCH_PROBES=0` turns off what watches a send (WatchSend, GetSend every 10 ms, the stats
/// polls), to see what they cost: first call, progress lag and GetSend are then not measured.
fn probes() -> bool {
    std::env::var("BENCH_PROBES").map_or(true, |v| v != "0")
}

fn send_deadline() -> Duration {
    Duration::from_secs(env_or("BENCH_SEND_DEADLINE_S", 1800))
}

struct Setup {
    _dir: tempfile::TempDir,
    otnd: Proc,
    sandbox_proc: Proc,
    sandbox_url: String,
    /// The sandbox's admin surface.
    sandbox: Sandbox,
    client: reqwest::Client,
    channel: Channel,
    grpc_url: String,
    http: String,
    /// Opt-ins are half one-time, half recurring tokens (S1 mixed).
    mixed: bool,
}

async fn setup(sandbox_args: &[&str], otnd_env: &[(&str, &str)]) -> Setup {
    let (sandbox, sandbox_url) = spawn_sandbox(sandbox_args);
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
    let field = |name: &str| json_field(&ready, name);
    let grpc_url = format!("http://{}", field("grpc_addr"));
    let channel = Channel::from_shared(grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    Setup {
        _dir: dir,
        grpc_url,
        otnd,
        sandbox_proc: sandbox,
        sandbox: Sandbox::new(&sandbox_url),
        sandbox_url,
        client: graph_sandbox::http_client_builder().build().unwrap(),
        channel,
        http: field("http_addr"),
        mixed: false,
    }
}

impl Setup {
    /// Registers a page in otnd and in the sandbox.
    async fn register_page(&self, page: &str) {
        otnd_testkit::register_page(
            &self.channel,
            &self.sandbox,
            &self.http,
            page,
            Some(PAGE_LIMIT),
        )
        .await;
    }

    /// Opts `recipients` users of the page in through signed webhooks; the webhook POSTs that
    /// takes.
    async fn opt_in(&self, page: &str, recipients: u64) -> u64 {
        let mut posts = 0;
        let mut left = recipients;
        let mut start = 0;
        while left > 0 {
            let count = left.min(100_000);
            if self.mixed {
                // Half one-time tokens, half recurring ones (in alternate blocks of psids, so
                // that a page's send moves from one kind to the other as it goes).
                let one_time = count / 2;
                self.sandbox
                    .opt_in(page, TOPIC, &format!("u{start}-o-"), one_time, None)
                    .await;
                self.sandbox
                    .opt_in_recurring(page, TOPIC, &format!("u{start}-r-"), count - one_time)
                    .await;
                posts += one_time.div_ceil(WEBHOOK_EVENTS_PER_POST)
                    + (count - one_time).div_ceil(WEBHOOK_EVENTS_PER_POST);
                left -= count;
                start += count;
                continue;
            }
            self.sandbox
                .opt_in(page, TOPIC, &format!("u{start}-"), count, None)
                .await;
            left -= count;
            start += count;
            posts += count.div_ceil(WEBHOOK_EVENTS_PER_POST);
        }
        posts
    }

    async fn webhook_posts_delivered(&self) -> u64 {
        self.stats().await["webhook_posts_delivered"]
            .as_u64()
            .unwrap()
    }

    /// Waits until otnd has acknowledged `posts` webhook POSTs more than `before`: the
    /// sandbox's counters are cheap to poll, unlike counting a million opt-ins.
    async fn wait_posts(&self, before: u64, posts: u64) {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let stats = self.stats().await;
            assert_eq!(stats["webhook_posts_abandoned"], 0, "{stats}");
            if stats["webhook_posts_delivered"].as_u64().unwrap() - before >= posts {
                return;
            }
            assert!(Instant::now() < deadline, "opt-ins did not arrive: {stats}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes a story on the page's topic and reviews it; returns its id.
    async fn reviewed_story(&self, page: &str) -> String {
        let spec = StorySpec {
            page,
            topic: TOPIC,
            text: "Tickets are on sale",
            reviewer: "reviewer",
            ..StorySpec::default()
        };
        otnd_testkit::reviewed_story(&self.channel, &self.sandbox, spec).await
    }

    /// Registers a page, opts `recipients` users in through signed webhooks, and writes and
    /// reviews a story; returns the story id.
    async fn page_with_story(&self, page: &str, recipients: u64) -> String {
        self.register_page(page).await;
        let loading = Instant::now();
        let posts_before = self.webhook_posts_delivered().await;
        let posts = self.opt_in(page, recipients).await;
        self.wait_posts(posts_before, posts).await;
        // ListTopics then confirms.
        let list_topics = self.wait_active(page, recipients).await;
        if recipients >= 100_000 {
            println!(
                "    page {page}: {recipients} opt-ins through signed webhooks in {:.1} s \
                 (then ListTopics answered in {:.0} ms)",
                loading.elapsed().as_secs_f64(),
                ms(list_topics)
            );
        }
        self.reviewed_story(page).await
    }

    /// `pages.len()` pages with `recipients` opt-ins and a reviewed story each, set up many at
    /// a time; (page, story id) in order.
    async fn pages_with_stories(&self, pages: &[String], recipients: u64) -> Vec<(String, String)> {
        const AT_ONCE: usize = 32;
        let loading = Instant::now();
        stream::iter(pages)
            .for_each_concurrent(AT_ONCE, |page| self.register_page(page))
            .await;
        let posts_before = self.webhook_posts_delivered().await;
        let posts: u64 = stream::iter(pages)
            .map(|page| self.opt_in(page, recipients))
            .buffer_unordered(AT_ONCE)
            .collect::<Vec<u64>>()
            .await
            .iter()
            .sum();
        self.wait_posts(posts_before, posts).await;
        stream::iter(pages)
            .for_each_concurrent(AT_ONCE, |page| async move {
                self.wait_active(page, recipients).await;
            })
            .await;
        let stories: Vec<(String, String)> = stream::iter(pages)
            .map(|page| async move { (page.clone(), self.reviewed_story(page).await) })
            .buffered(AT_ONCE)
            .collect()
            .await;
        println!(
            "    {} pages, {recipients} opt-ins each through signed webhooks, and their \
             reviewed stories in {:.1} s",
            pages.len(),
            loading.elapsed().as_secs_f64()
        );
        stories
    }

    /// Polls until the page's topic has `n` active opt-ins; how long the last ListTopics took.
    async fn wait_active(&self, page: &str, n: u64) -> Duration {
        let mut optins = OptInServiceClient::new(self.channel.clone());
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let asked = Instant::now();
            let topics = optins
                .list_topics(ListTopicsRequest {
                    page_id: page.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .topics;
            if topics.iter().any(|t| t.topic == TOPIC && t.active == n) {
                return asked.elapsed();
            }
            assert!(Instant::now() < deadline, "opt-ins did not arrive");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stats(&self) -> Value {
        self.sandbox.stats().await
    }

    /// Every token message the sandbox accepted, by page: the sandbox's clock (Unix ms), sorted.
    async fn ledger(&self) -> BTreeMap<String, Vec<i64>> {
        let messages = self.sandbox.get("/__sandbox/messages").await;
        let mut per_page: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for m in messages["messages"].as_array().unwrap() {
            if m["token"].is_string() {
                per_page
                    .entry(m["page_id"].as_str().unwrap().to_string())
                    .or_default()
                    .push(m["time_ms"].as_i64().unwrap());
            }
        }
        for times in per_page.values_mut() {
            times.sort_unstable();
        }
        per_page
    }

    /// Starts a send of each (page, story), one after the other, and measures it until every
    /// one is COMPLETED.
    async fn measure(&self, sends_of: &[(String, String)]) -> Measured {
        self.measure_starting(sends_of, Starts::OneByOne).await
    }

    async fn measure_starting(&self, sends_of: &[(String, String)], starts: Starts) -> Measured {
        let (rss_load, _) = self.otnd.usage();
        let peak_reset = self.otnd.reset_peak();
        let stats_before = self.stats().await;
        let baseline = stats_before["accepted"].as_u64().unwrap();
        let (_, cpu_before) = self.otnd.usage();
        let (_, sandbox_cpu_before) = self.sandbox_proc.usage();
        let stop = Arc::new(AtomicBool::new(false));
        let probes = probes();
        let poller = probes.then(|| {
            tokio::spawn(poll_accepted(
                self.client.clone(),
                format!("{}/__sandbox/stats", self.sandbox_url),
                baseline,
                stop.clone(),
            ))
        });

        let mut sends = SendServiceClient::new(self.channel.clone());
        let started = Instant::now();
        let started_wall = std::time::SystemTime::now();
        let mut ids = Vec::new();
        let mut watchers: Vec<JoinHandle<Vec<Snapshot>>> = Vec::new();
        let start = |story: String| {
            let mut sends = sends.clone();
            async move {
                sends
                    .start_send(StartSendRequest {
                        request_id: format!("bench-{story}"),
                        story_id: story,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .send
                    .unwrap()
                    .send_id
            }
        };
        let watched = match starts {
            Starts::OneByOne => usize::MAX,
            Starts::AllAtOnce { watched } => watched,
        };
        match starts {
            Starts::OneByOne => {
                for (_, story) in sends_of {
                    let id = start(story.clone()).await;
                    if probes {
                        watchers.push(tokio::spawn(watch(self.channel.clone(), id.clone())));
                    }
                    ids.push(id);
                }
            }
            Starts::AllAtOnce { .. } => {
                let starting: Vec<_> = sends_of
                    .iter()
                    .map(|(_, story)| tokio::spawn(start(story.clone())))
                    .collect();
                for started in starting {
                    ids.push(started.await.unwrap());
                }
                if probes {
                    for id in ids.iter().take(watched) {
                        watchers.push(tokio::spawn(watch(self.channel.clone(), id.clone())));
                    }
                }
            }
        }
        let start_answered = started.elapsed();
        // The probe is a client of its own, as a dashboard would be: its own connection and
        // thread, so that it never waits behind this process's watchers and starts.
        let sampler = probes.then(|| {
            let (url, ids, stop) = (self.grpc_url.clone(), ids.clone(), stop.clone());
            tokio::task::spawn_blocking(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
                    // A dashboard's connection is warm: its first call (HTTP/2's settings
                    // exchange) is not a read of a send.
                    let mut warm = SendServiceClient::new(channel.clone());
                    let _ = warm
                        .get_send(GetSendRequest {
                            send_id: ids[0].clone(),
                        })
                        .await;
                    sample_get_send(channel, ids, stop).await
                })
            })
        });

        let deadline = started + send_deadline();
        let mut streams = Vec::new();
        for watcher in watchers {
            let left = deadline.saturating_duration_since(Instant::now());
            streams.push(
                tokio::time::timeout(left, watcher)
                    .await
                    .expect("the sends finish before the deadline")
                    .unwrap(),
            );
        }
        // Without probes, nothing streamed: GetSend polls tell when each send ended.
        streams.resize_with(ids.len(), Vec::new);
        // The streams end after the send ends; GetSend confirms (and waits, should a stream
        // have ended early). A send ended when otnd recorded it finished (its finish_time, on
        // this machine's clock): the sends are polled one after another, and the thousandth
        // poll of a campaign comes a thousand round trips after the first.
        let mut done = Vec::new();
        let mut finished_at = Vec::new();
        for (id, stream) in ids.iter().zip(&streams) {
            let (send, polled_at) = wait_finished(&mut sends, id, deadline).await;
            let streamed = stream.last().filter(|s| is_finished(s.state)).map(|s| s.at);
            let seen = streamed.unwrap_or(polled_at);
            let recorded = send
                .finish_time
                .as_ref()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                .and_then(|t| t.duration_since(started_wall).ok())
                .map(|after| started + after);
            finished_at.push(recorded.map_or(seen, |r| r.min(seen)));
            done.push(send.progress.unwrap());
        }
        let all_finished = *finished_at.iter().max().unwrap();
        let (_, cpu_after) = self.otnd.usage();
        let (_, sandbox_cpu_after) = self.sandbox_proc.usage();
        let (rss_send, _) = self.otnd.usage();
        stop.store(true, Ordering::SeqCst);
        let get_send_ms = match sampler {
            Some(sampler) => sampler.await.unwrap(),
            None => Vec::new(),
        };
        let polls = match poller {
            Some(poller) => poller.await.unwrap(),
            None => Vec::new(),
        };
        let stats = self.stats().await;

        let total: u64 = done.iter().map(|p| p.sent).sum();
        // The ledger gives each page's k-th acceptance to the millisecond; it is fetched where
        // it stays small, else the polled accepted count stands in (exact for one send).
        let ledger = if total <= env_or("BENCH_LEDGER_MAX", 200_000) {
            Some(self.ledger().await)
        } else {
            None
        };
        let lags = match &ledger {
            Some(ledger) => ledger_lags(ledger, sends_of, &streams),
            None => polled_lags(&polls, &streams),
        };
        let reached = |k: u64| polls.iter().find(|p| p.1 >= k).map(|p| p.0);
        let completion_lag_ms = reached(total)
            .map(|last_accepted| all_finished.saturating_duration_since(last_accepted))
            .map(ms);
        let count = |name: &str| {
            stats[name].as_u64().unwrap_or(0) - stats_before[name].as_u64().unwrap_or(0)
        };
        Measured {
            elapsed: all_finished.duration_since(started).as_secs_f64(),
            done,
            start_answered_ms: ms(start_answered),
            first_call_ms: reached(1).map(|t| ms(t.duration_since(started))),
            lags,
            lag_source: if ledger.is_some() { "ledger" } else { "polled" },
            ledger,
            completion_lag_ms,
            get_send_ms,
            cpu_otnd: cpu_after - cpu_before,
            cpu_sandbox: sandbox_cpu_after - sandbox_cpu_before,
            rss_load,
            rss_send,
            peak_reset,
            duplicate_recipients: count("recipients_with_duplicate_content"),
            tokens_accepted_twice: count("tokens_accepted_more_than_once"),
            tokens_presented_twice: count("tokens_presented_more_than_once"),
            rate_limited: count("rate_limited"),
            rejected: count("rejected"),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn is_finished(state: SendState) -> bool {
    !matches!(
        state,
        SendState::Running | SendState::Queued | SendState::Unspecified
    )
}

/// One WatchSend message, as received.
struct Snapshot {
    at: Instant,
    /// The same moment on the wall clock (Unix ms), to compare with the sandbox's ledger.
    wall_ms: f64,
    sent: u64,
    state: SendState,
}

fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

async fn watch(channel: Channel, send_id: String) -> Vec<Snapshot> {
    let mut stream = SendServiceClient::new(channel)
        .watch_send(WatchSendRequest { send_id })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Ok(Some(message)) = stream.message().await {
        let at = Instant::now();
        let wall_ms = wall_ms();
        let progress = message.progress.unwrap();
        seen.push(Snapshot {
            at,
            wall_ms,
            sent: progress.sent,
            state: progress.state(),
        });
    }
    seen
}

/// Polls GetSend until the send has ended; its final progress and when that was seen.
async fn wait_finished(
    sends: &mut SendServiceClient<Channel>,
    id: &str,
    deadline: Instant,
) -> (otnd::pb::Send, Instant) {
    loop {
        let send = sends
            .get_send(GetSendRequest { send_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .send
            .unwrap();
        let seen = Instant::now();
        if is_finished(send.state()) {
            assert_eq!(send.state(), SendState::Completed, "{send:?}");
            return (send, seen);
        }
        assert!(
            Instant::now() < deadline,
            "the send did not finish: {send:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sandbox's accepted count (above `baseline`) over time: each value with the moment a
/// poll first answered it (the answer's arrival: at most one interval and a round trip late).
async fn poll_accepted(
    client: reqwest::Client,
    url: String,
    baseline: u64,
    stop: Arc<AtomicBool>,
) -> Vec<(Instant, u64)> {
    let mut seen: Vec<(Instant, u64)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if let Ok(response) = client.get(&url).send().await
            && let Ok(stats) = response.json::<Value>().await
        {
            let at = Instant::now();
            let accepted = stats["accepted"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(baseline);
            if seen.last().is_none_or(|last| accepted > last.1) {
                seen.push((at, accepted));
            }
        }
        let any = seen.last().is_some_and(|last| last.1 > 0);
        tokio::time::sleep(if any {
            STATS_EVERY
        } else {
            STATS_EVERY_BEFORE_FIRST
        })
        .await;
    }
    seen
}

/// GetSend latencies (ms), one call every `GET_SEND_EVERY` over the sends in turn.
async fn sample_get_send(channel: Channel, ids: Vec<String>, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut sends = SendServiceClient::new(channel);
    let mut tick = tokio::time::interval(GET_SEND_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut latencies = Vec::new();
    for id in ids.iter().cycle() {
        tick.tick().await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let began = Instant::now();
        let answer = sends
            .get_send(GetSendRequest {
                send_id: id.clone(),
            })
            .await;
        if answer.is_ok() {
            latencies.push(ms(began.elapsed()));
        }
    }
    latencies
}

/// Progress lag from the ledger: for each WatchSend message of the send on page p reporting
/// `sent` = k > 0, its arrival minus the moment the sandbox accepted p's k-th message.
fn ledger_lags(
    ledger: &BTreeMap<String, Vec<i64>>,
    sends_of: &[(String, String)],
    streams: &[Vec<Snapshot>],
) -> Vec<f64> {
    let mut lags = Vec::new();
    for ((page, _), stream) in sends_of.iter().zip(streams) {
        let Some(times) = ledger.get(page) else {
            continue;
        };
        for s in stream {
            if s.sent > 0
                && let Some(&accepted) = times.get(s.sent as usize - 1)
            {
                lags.push((s.wall_ms - accepted as f64).max(0.0));
            }
        }
    }
    lags
}

/// Progress lag from the polled accepted count: for each WatchSend message (the sends' latest
/// `sent` added up to k > 0), its arrival minus the first poll that saw k; never negative.
fn polled_lags(polls: &[(Instant, u64)], streams: &[Vec<Snapshot>]) -> Vec<f64> {
    let mut snapshots: Vec<(Instant, usize, u64)> = streams
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.iter().map(move |s| (s.at, i, s.sent)))
        .collect();
    snapshots.sort_by_key(|s| s.0);
    let mut latest = vec![0u64; streams.len()];
    let mut lags = Vec::new();
    for (at, send, sent) in snapshots {
        latest[send] = sent;
        let k: u64 = latest.iter().sum();
        if k == 0 {
            continue;
        }
        let first = polls.partition_point(|p| p.1 < k);
        if let Some((reached, _)) = polls.get(first) {
            lags.push(ms(at.saturating_duration_since(*reached)));
        }
    }
    lags
}

/// Nearest-rank percentile of `values` (`p` from 0 to 1).
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

struct Measured {
    /// From the first StartSend call to the moment every send was seen COMPLETED.
    elapsed: f64,
    done: Vec<SendProgress>,
    start_answered_ms: f64,
    first_call_ms: Option<f64>,
    lags: Vec<f64>,
    /// Where the lags' acceptance times come from: "ledger" or "polled".
    lag_source: &'static str,
    /// Token messages the sandbox accepted, by page, when fetched.
    ledger: Option<BTreeMap<String, Vec<i64>>>,
    completion_lag_ms: Option<f64>,
    get_send_ms: Vec<f64>,
    cpu_otnd: f64,
    cpu_sandbox: f64,
    rss_load: f64,
    rss_send: f64,
    peak_reset: bool,
    duplicate_recipients: u64,
    tokens_accepted_twice: u64,
    tokens_presented_twice: u64,
    rate_limited: u64,
    /// Calls the sandbox refused, for any reason (throttles included).
    rejected: u64,
}

impl Measured {
    fn sent(&self) -> u64 {
        self.done.iter().map(|p| p.sent).sum()
    }

    fn duplicates(&self) -> u64 {
        self.duplicate_recipients + self.tokens_accepted_twice + self.tokens_presented_twice
    }

    fn rate(&self) -> f64 {
        self.sent() as f64 / self.elapsed
    }

    /// The figures every otnd scenario prints.
    fn describe(&self, recipients: u64) -> String {
        let p = |v: &[f64], q| percentile(v, q).map_or("-".into(), |v| format!("{v:.1}"));
        format!(
            "sent {} of {recipients} in {:.2} s = {:.0}/s; StartSend answered in {:.1} ms, first \
             call after {}; progress lag p50 {} p99 {} ms over {} snapshots ({}), completion seen {} \
             after the last acceptance; GetSend p50 {} p99 {} ms over {} calls; CPU otnd {:.2} s, \
             sandbox {:.2} s; otnd peak RSS {:.0} MiB while sending{} ({:.0} MiB before); \
             duplicate recipients {}, tokens accepted twice {}, presented twice {}; 613/80006 \
             answers {}",
            self.sent(),
            self.elapsed,
            self.rate(),
            self.start_answered_ms,
            fmt_ms(self.first_call_ms),
            p(&self.lags, 0.5),
            p(&self.lags, 0.99),
            self.lags.len(),
            self.lag_source,
            fmt_ms(self.completion_lag_ms),
            p(&self.get_send_ms, 0.5),
            p(&self.get_send_ms, 0.99),
            self.get_send_ms.len(),
            self.cpu_otnd,
            self.cpu_sandbox,
            self.rss_send,
            if self.peak_reset {
                ""
            } else {
                " (VmHWM could not be reset: whole run)"
            },
            self.rss_load,
            self.duplicate_recipients,
            self.tokens_accepted_twice,
            self.tokens_presented_twice,
            self.rate_limited,
        )
    }

    /// A table row with the figures every otnd scenario has.
    fn row(&self, name: String) -> Row {
        Row {
            name,
            rate: Some(self.rate()),
            duplicates: Some(self.duplicates()),
            rss_mib: Some(self.rss_send),
            first_call_ms: self.first_call_ms,
            lag_p99_ms: percentile(&self.lags, 0.99),
            get_send_p99_ms: percentile(&self.get_send_ms, 0.99),
            cpu_otnd: Some(self.cpu_otnd),
            cpu_sandbox: Some(self.cpu_sandbox),
            ..Row::default()
        }
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} ms"))
}

/// One line of the summary table.
#[derive(Default)]
struct Row {
    name: String,
    rate: Option<f64>,
    share: Option<String>,
    duplicates: Option<u64>,
    rss_mib: Option<f64>,
    first_call_ms: Option<f64>,
    lag_p99_ms: Option<f64>,
    get_send_p99_ms: Option<f64>,
    /// otnd's; for a peer row, the Node.js client's.
    cpu_otnd: Option<f64>,
    cpu_sandbox: Option<f64>,
    target: String,
    met: Option<bool>,
    /// Why a target was missed besides the figure itself (lost deliveries, 613s).
    note: String,
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

fn print_table(rows: &[Row], ratios: &[String]) {
    let mut out = String::new();
    out.push_str(
        "| scenario | deliveries/s | share of limit | duplicates | peak RSS MiB | first call ms \
         | progress lag p99 ms | GetSend p99 ms | CPU s otnd (peer: node) | CPU s sandbox \
         | target | met? |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes".to_string(),
            Some(false) if r.note.is_empty() => "**no**".to_string(),
            Some(false) => format!("**no**: {}", r.note),
            None => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {met} |",
            r.name,
            cell(r.rate, 0),
            r.share.clone().unwrap_or("-".into()),
            r.duplicates.map_or("-".into(), |d| d.to_string()),
            cell(r.rss_mib, 0),
            cell(r.first_call_ms, 1),
            cell(r.lag_p99_ms, 1),
            cell(r.get_send_p99_ms, 1),
            cell(r.cpu_otnd, 2),
            cell(r.cpu_sandbox, 2),
            if r.target.is_empty() { "-" } else { &r.target },
        );
    }
    if !ratios.is_empty() {
        out.push('\n');
    }
    for ratio in ratios {
        let _ = writeln!(out, "- {ratio}");
    }
    println!("\n{out}");
}

async fn s0_once(recipients: u64) -> Measured {
    let s = setup(&[], &[("OTN_ENFORCE_PAGE_RATE", "false")]).await;
    let story = s.page_with_story("1000", recipients).await;
    s.measure(&[("1000".into(), story)]).await
}

fn s0_recipients() -> u64 {
    env_or("S0_RECIPIENTS", 20_000)
}

/// S0's row: its median run by deliveries/s.
fn s0_row(mut measured: Vec<Measured>) -> Row {
    let recipients = s0_recipients();
    let runs = measured.len();
    measured.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let rates: Vec<String> = measured
        .iter()
        .map(|m| format!("{:.0}", m.rate()))
        .collect();
    let median = &measured[runs / 2];
    println!(
        "S0  deliveries/s over {runs} runs: {} (median {:.0})",
        rates.join(", "),
        median.rate()
    );
    let mut row = median.row(format!(
        "S0: {recipients} recipients, unthrottled, no latency (median of {runs})"
    ));
    let lost = median.sent() != recipients;
    row.met = Some(!lost && median.duplicates() == 0);
    row.note = check_note(lost, median);
    row
}

/// Why a run fails whatever its figure: deliveries lost, or duplicates.
fn check_note(lost: bool, m: &Measured) -> String {
    let mut notes = Vec::new();
    if lost {
        notes.push(format!("sent {}", m.sent()));
    }
    if m.duplicates() > 0 {
        notes.push(format!("{} duplicates", m.duplicates()));
    }
    notes.join(", ")
}

async fn first_call() -> Row {
    let recipients = env_or("FIRST_RECIPIENTS", 200_000);
    let limit = PAGE_LIMIT.to_string();
    let s = setup(&["--rate-limit-per-page", &limit], &[]).await;
    let story = s.page_with_story("2000", recipients).await;
    let baseline = s.stats().await["accepted"].as_u64().unwrap();
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
    let deadline = started + Duration::from_secs(30);
    // Polled as `measure` does before the first acceptance: late by one interval at most.
    let first = loop {
        if s.stats().await["accepted"].as_u64().unwrap() > baseline {
            break Some(ms(started.elapsed()));
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(STATS_EVERY_BEFORE_FIRST).await;
    };
    println!(
        "first call: {recipients} recipients, {PAGE_LIMIT}/s page: StartSend answered in {:.1} ms, \
         first message accepted by the sandbox {} after StartSend was called",
        ms(answered),
        fmt_ms(first)
    );
    let _ = sends
        .cancel_send(otnd::pb::CancelSendRequest {
            send_id: send.send_id,
        })
        .await;
    Row {
        name: format!("first: {recipients} recipients, {PAGE_LIMIT}/s page"),
        first_call_ms: first,
        target: "≤ 200 ms (README)".into(),
        met: first.map(|f| f <= 200.0),
        ..Row::default()
    }
}

/// How a measurement starts its sends.
#[derive(Clone, Copy)]
enum Starts {
    /// Each StartSend once the one before is answered, every send watched.
    OneByOne,
    /// Every StartSend at once; the first `watched` sends are watched, the others polled.
    AllAtOnce { watched: usize },
}

/// Shares of the limit from the sandbox's ledger: (steady, lowest page's steady, first call to
/// last). Steady: each page's accepted calls after its first and before its last second, over
/// that span; none for a page that sent for less than about three seconds.
fn shares(
    per_page: &BTreeMap<String, Vec<i64>>,
    per_second: f64,
) -> (Option<f64>, Option<f64>, f64) {
    let shares: Vec<f64> = per_page
        .values()
        .filter_map(|times| {
            let (first, last) = (times[0] + 1000, times[times.len() - 1] - 1000);
            let inside = times.iter().filter(|&&t| t >= first && t < last).count();
            (last - first >= 1000)
                .then(|| inside as f64 / ((last - first) as f64 / 1000.0) / per_second)
        })
        .collect();
    if std::env::var_os("BENCH_S1_SECONDS").is_some() {
        for (page, times) in per_page.iter().take(2) {
            let mut seconds: BTreeMap<i64, usize> = BTreeMap::new();
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
    let all: Vec<i64> = per_page.values().flatten().copied().collect();
    let span_s = (all.iter().max().unwrap() - all.iter().min().unwrap()) as f64 / 1000.0;
    let span_share = all.len() as f64 / span_s / (per_second * per_page.len() as f64);
    let steady = (!shares.is_empty()).then(|| shares.iter().sum::<f64>() / shares.len() as f64);
    let worst = shares.iter().copied().reduce(f64::min);
    (steady, worst, span_share)
}

/// What a paced scenario's sandbox does besides its 150 ms latency and 300/s limit per page.
#[derive(Clone, Copy)]
enum Facebook {
    /// S1: nothing else.
    Clean,
    /// S1 mixed: nothing else, to an audience of half one-time and half recurring tokens.
    CleanMixed,
    /// S2: this share of answers throttled at random (613 or 80006).
    RandomThrottles(f64),
    /// S4: every page's true capacity (calls in any rolling second), below the 300/s otnd's
    /// pages are configured with; at it, 80006 and a minute refused.
    Capacity(u32),
}

/// S1, S2 and S4: 20 pages configured at 300/s, 150 ms latency.
async fn paced(name: &str, per_page: u64, facebook: Facebook) -> Row {
    let pages = 20;
    let limit = PAGE_LIMIT.to_string();
    let latency = LATENCY_MS.to_string();
    let mut sandbox_args = vec!["--latency-ms", &latency, "--rate-limit-per-page", &limit];
    let capacity = match facebook {
        Facebook::Capacity(capacity) => Some(capacity.to_string()),
        _ => None,
    };
    if let Some(capacity) = &capacity {
        sandbox_args.extend(["--page-capacity-per-second", capacity.as_str()]);
    }
    let mut s = setup(&sandbox_args, &[]).await;
    s.mixed = matches!(facebook, Facebook::CleanMixed);
    let mut stories = Vec::new();
    for p in 0..pages {
        let page = format!("{}", 3000 + p);
        let story = s.page_with_story(&page, per_page).await;
        stories.push((page, story));
    }
    if let Facebook::RandomThrottles(throttle_rate) = facebook {
        // Only now: the reviews' previews above must not be throttled.
        let mut faults = s.sandbox.get("/__sandbox/faults").await;
        faults["throttle_rate"] = json!(throttle_rate);
        let set = s.sandbox.post("/__sandbox/faults", faults).await;
        assert_eq!(set["throttle_rate"], json!(throttle_rate), "{set}");
    }
    let m = s.measure(&stories).await;
    let recipients = per_page * pages;
    if s.mixed {
        let stats = s.stats().await;
        println!(
            "{name}  the sandbox accepted {} recurring notifications of {} messages; \
             recipients messaged twice within the gap {}",
            stats["recurring_accepted"],
            stats["accepted"],
            stats["recipients_messaged_twice_within_gap"]
        );
    }
    // The share is of what Facebook really allows each page.
    let per_second = match facebook {
        Facebook::Capacity(capacity) => f64::from(capacity),
        _ => f64::from(PAGE_LIMIT),
    };
    let ledger = match &m.ledger {
        Some(ledger) => ledger.clone(),
        None => s.ledger().await,
    };
    let (steady, worst, span) = shares(&ledger, per_second);
    // The last answers arrive one latency after their calls: not time spent sending.
    let overall =
        m.sent() as f64 / (m.elapsed - LATENCY_MS as f64 / 1000.0) / (per_second * pages as f64);
    let calls = m.sent() + m.rejected;
    let throttled_share = m.rate_limited as f64 / calls.max(1) as f64;
    let what = match facebook {
        Facebook::Clean => String::new(),
        Facebook::CleanMixed => ", half one-time and half recurring tokens".into(),
        Facebook::RandomThrottles(rate) => format!(", {:.0}% throttled at random", rate * 100.0),
        Facebook::Capacity(capacity) => format!(", true capacity {capacity}/s a page"),
    };
    println!(
        "{name}  {pages} pages x {PAGE_LIMIT}/s, {LATENCY_MS} ms latency{what}: {}",
        m.describe(recipients)
    );
    println!(
        "{name}  share of {per_second:.0}/s a page: {} in steady state (lowest page {}), \
         {span:.3} from the first call to the last (sandbox clock), {overall:.3} from StartSend \
         to COMPLETED; {} of {calls} calls throttled ({:.2}%)",
        cell(steady, 3),
        cell(worst, 3),
        m.rate_limited,
        throttled_share * 100.0
    );
    let mut row = m.row(format!(
        "{name}: {pages} pages x {PAGE_LIMIT}/s, {LATENCY_MS} ms latency{what}, {per_page}/page"
    ));
    row.share = Some(format!("{} steady, {overall:.3} overall", cell(steady, 3)));
    let lost = m.sent() != recipients;
    let mut note = check_note(lost, &m);
    if m.rate_limited > 0 {
        note = [
            note,
            format!(
                "{} throttled ({:.2}%)",
                m.rate_limited,
                throttled_share * 100.0
            ),
        ]
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    }
    let clean = !lost && m.duplicates() == 0;
    let steady_at_least = |share: f64| steady.is_some_and(|s| s >= share);
    (row.target, row.met) = match facebook {
        Facebook::Clean | Facebook::CleanMixed => (
            "≥ 0.98 of the limit (steady), no 613".into(),
            Some(clean && steady_at_least(0.98) && m.rate_limited == 0),
        ),
        Facebook::RandomThrottles(_) => (
            "≥ 0.90 of the limit (steady), nothing lost".into(),
            Some(clean && steady_at_least(0.90)),
        ),
        Facebook::Capacity(_) => (
            "≥ 0.90 of the true capacity (steady), ≤ 1% throttled".into(),
            Some(clean && steady_at_least(0.90) && throttled_share <= 0.01),
        ),
    };
    row.note = note;
    row
}

/// S5's target for otnd's peak RSS: 200 MB.
const S5_RSS_TARGET_MIB: f64 = 200e6 / (1024.0 * 1024.0);

/// S5: many tenants. 1,000 pages x 100 recipients, every StartSend at once, the default
/// configuration (pages paced at 300/s), sandbox without latency or limits; then the peer's
/// sendBatch over as many tokens, in the same run.
async fn s5(postgres: bool, peer_dir: Option<&std::path::Path>) -> Row {
    let pages = env_or("S5_PAGES", 1_000);
    let per_page = env_or("S5_PER_PAGE", 100);
    let backend = if postgres { "PostgreSQL" } else { "SQLite" };
    let database = match postgres {
        true => Some(support::PgDatabase::create().await),
        false => None,
    };
    let env: Vec<(&str, &str)> = database
        .iter()
        .map(|db| ("OTN_DATABASE_URL", db.url.as_str()))
        .collect();
    let s = setup(&[], &env).await;
    let page_ids: Vec<String> = (0..pages).map(|p| (100_000 + p).to_string()).collect();
    let stories = s.pages_with_stories(&page_ids, per_page).await;
    let m = s
        .measure_starting(&stories, Starts::AllAtOnce { watched: 50 })
        .await;
    drop(s);
    if let Some(database) = database {
        database.drop_now().await;
    }
    let recipients = pages * per_page;
    let name = format!("S5 ({backend})");
    println!(
        "{name}  {pages} pages x {per_page} recipients, every StartSend at once, default \
         configuration: {}",
        m.describe(recipients)
    );
    let mut row = m.row(format!(
        "{name}: {pages} pages x {per_page}, all started at once, default configuration"
    ));
    let completed = m
        .done
        .iter()
        .filter(|p| p.state() == SendState::Completed)
        .count() as u64;
    let lost = m.sent() != recipients;
    let mut note = check_note(lost, &m);
    if completed != pages {
        note = format!(
            "{note} {} of {pages} sends not COMPLETED",
            pages - completed
        );
    }
    let fine =
        !lost && completed == pages && m.duplicates() == 0 && m.rss_send <= S5_RSS_TARGET_MIB;
    row.target =
        format!("≥ 2× the peer's sendBatch (1 loop), RSS ≤ 200 MB ({S5_RSS_TARGET_MIB:.0} MiB)");
    match peer_dir {
        Some(dir) => {
            let peer = peer_run(dir, PeerMode::Batch { loops: 1 }, 1, 1, recipients).await;
            let ratio = m.rate() / peer.rate;
            println!(
                "{name}  otnd {:.0}/s, the peer's sendBatch (1 loop) {:.0}/s over as many \
                 tokens: {ratio:.2}×",
                m.rate(),
                peer.rate
            );
            row.share = Some(format!("{ratio:.2}× the peer's {:.0}/s", peer.rate));
            row.met = Some(fine && ratio >= 2.0);
        }
        None => {
            row.target.push_str(": peer not run");
            row.met = None;
        }
    }
    row.note = note;
    row
}

async fn s3() -> Row {
    let recipients = std::env::var("S3_RECIPIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| env_or("MEM_RECIPIENTS", 1_000_000));
    let s = setup(&[], &[("OTN_ENFORCE_PAGE_RATE", "false")]).await;
    let story = s.page_with_story("4000", recipients).await;
    let m = s.measure(&[("4000".into(), story)]).await;
    println!(
        "S3  {recipients} opt-ins on one topic, unpaced: {}",
        m.describe(recipients)
    );
    let mut row = m.row(format!("S3: {recipients} opt-ins on one topic, unpaced"));
    let lost = m.sent() != recipients;
    row.target = format!("peak RSS ≤ 150 MB ({S3_RSS_TARGET_MIB:.0} MiB)");
    row.met = Some(m.rss_send <= S3_RSS_TARGET_MIB && !lost && m.duplicates() == 0);
    row.note = check_note(lost, &m);
    row
}

#[derive(Clone, Copy)]
enum PeerMode {
    Batch { loops: u32 },
    Single { in_flight: u32 },
}

impl PeerMode {
    fn label(self) -> String {
        match self {
            PeerMode::Batch { loops: 1 } => "sendBatch, 1 loop".into(),
            PeerMode::Batch { loops } => format!("sendBatch, {loops} loops"),
            PeerMode::Single { in_flight } => format!("single sendMessage, {in_flight} in flight"),
        }
    }
}

struct PeerRun {
    rate: f64,
    accepted: u64,
    seconds: f64,
    node_cpu: f64,
    node_rss: f64,
    sandbox_cpu: f64,
    duplicates: u64,
}

async fn peer_once(dir: &std::path::Path, mode: PeerMode, tokens: u64) -> PeerRun {
    let (sandbox, url) = spawn_sandbox(&[]);
    let client = otnd::graph::http_client();
    let admin = |path: &str, body: Value| {
        let request = client.post(format!("{url}{path}")).json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{response:?}");
            response.json::<Value>().await.unwrap()
        }
    };
    admin(
        "/__sandbox/pages",
        json!({"page_id": "5000", "access_token": "EAAB-peer", "app_secret": "peer"}),
    )
    .await;
    let issued = admin(
        "/__sandbox/optins",
        json!({"page_id": "5000", "psid_prefix": "p", "count": tokens,
            "payload": TOPIC, "deliver_webhook": false}),
    )
    .await;
    let list: Vec<&str> = issued["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let file = dir.join("tokens.txt");
    std::fs::write(&file, list.join("\n")).unwrap();
    let (_, cpu_before) = sandbox.usage();
    let mut node = Command::new("node");
    node.current_dir(dir)
        .env("SANDBOX_URL", &url)
        .env("PAGE_TOKEN", "EAAB-peer")
        .env("APP_SECRET", "peer")
        .env("TOKENS_FILE", &file);
    match mode {
        PeerMode::Batch { loops } => node.arg("batch-loop.cjs").env("LOOPS", loops.to_string()),
        PeerMode::Single { in_flight } => node
            .arg("single-loop.cjs")
            .env("IN_FLIGHT", in_flight.to_string()),
    };
    let output = node.output().expect("node runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, cpu_after) = sandbox.usage();
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    let stats = Sandbox::new(&url).stats().await;
    let count = |name: &str| stats[name].as_u64().unwrap_or(0);
    PeerRun {
        rate: result["per_second"].as_f64().unwrap(),
        accepted: result["accepted"].as_u64().unwrap(),
        seconds: result["seconds"].as_f64().unwrap(),
        node_cpu: result["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
        node_rss: result["max_rss_mib"].as_f64().unwrap_or(f64::NAN),
        sandbox_cpu: cpu_after - cpu_before,
        duplicates: count("recipients_with_duplicate_content")
            + count("tokens_accepted_more_than_once")
            + count("tokens_presented_more_than_once"),
    }
}

const PEER_MODES: [PeerMode; 3] = [
    PeerMode::Batch { loops: 1 },
    PeerMode::Batch { loops: 8 },
    PeerMode::Single { in_flight: 64 },
];

/// The peer scripts with their npm dependencies installed (`npm ci`), in a directory of their own.
fn install_peer() -> tempfile::TempDir {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sandbox/tests/peer/messaging-api-messenger");
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "package.json",
        "package-lock.json",
        "batch-loop.cjs",
        "single-loop.cjs",
    ] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let npm = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .status()
        .expect("npm runs");
    assert!(npm.success(), "npm ci failed");
    dir
}

/// One peer run, printed.
async fn peer_run(
    dir: &std::path::Path,
    mode: PeerMode,
    run: u64,
    runs: u64,
    tokens: u64,
) -> PeerRun {
    let r = peer_once(dir, mode, tokens).await;
    println!(
        "peer messaging-api-messenger {}, run {run}/{runs}: {} of {tokens} accepted in {:.2} s \
         = {:.0} sends/s (node CPU {:.2} s, peak RSS {:.0} MiB; sandbox CPU {:.2} s; \
         duplicates {})",
        mode.label(),
        r.accepted,
        r.seconds,
        r.rate,
        r.node_cpu,
        r.node_rss,
        r.sandbox_cpu,
        r.duplicates
    );
    r
}

/// A peer mode's row: its median run by sends/s, and that rate.
fn peer_row(mode: PeerMode, mut measured: Vec<PeerRun>) -> (PeerMode, f64, Row) {
    let tokens = s0_recipients();
    let runs = measured.len();
    measured.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let median = &measured[runs / 2];
    let row = Row {
        name: format!("peer: {} ({tokens} tokens, median of {runs})", mode.label()),
        rate: Some(median.rate),
        duplicates: Some(median.duplicates),
        rss_mib: Some(median.node_rss),
        cpu_otnd: Some(median.node_cpu),
        cpu_sandbox: Some(median.sandbox_cpu),
        note: if median.accepted == tokens {
            String::new()
        } else {
            format!("accepted {}", median.accepted)
        },
        ..Row::default()
    };
    (mode, median.rate, row)
}

const SCENARIOS: [&str; 10] = [
    "s0",
    "peer",
    "first",
    "s1",
    "s1-mixed",
    "s2",
    "s3",
    "s4",
    "s5",
    "s5-postgres",
];

fn main() {
    support::serve_if_sandbox_child();
    // `cargo bench` passes `--bench`; scenario names are the other arguments.
    let mut wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| if a == "mem" { "s3".into() } else { a })
        .collect();
    if wanted.is_empty() || wanted.iter().any(|w| w == "all") {
        wanted = SCENARIOS.iter().map(|s| s.to_string()).collect();
    }
    for w in &wanted {
        assert!(
            SCENARIOS.contains(&w.as_str()),
            "unknown scenario {w:?}: one of {SCENARIOS:?}, mem or all"
        );
    }
    let run = |name: &str| wanted.iter().any(|w| w == name);
    let runs = env_or("BENCH_RUNS", 3).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "send engine benchmark, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let began = Instant::now();
    let (rows, ratios) = runtime.block_on(async {
        let mut rows = Vec::new();
        // S0 and the peer take turns, round by round: both see the same machine.
        let peer_dir = (run("peer") || run("s5") || run("s5-postgres")).then(install_peer);
        let mut s0_runs = Vec::new();
        let mut peer_runs: Vec<Vec<PeerRun>> = PEER_MODES.iter().map(|_| Vec::new()).collect();
        for round in 1..=runs {
            if run("s0") {
                let recipients = s0_recipients();
                let m = s0_once(recipients).await;
                println!(
                    "S0  unthrottled, no latency, SQLite, run {round}/{runs}: {}",
                    m.describe(recipients)
                );
                s0_runs.push(m);
            }
            if let Some(dir) = peer_dir.as_ref().filter(|_| run("peer")) {
                for (mode, measured) in PEER_MODES.iter().zip(&mut peer_runs) {
                    measured.push(peer_run(dir.path(), *mode, round, runs, s0_recipients()).await);
                }
            }
        }
        let s0_row = (!s0_runs.is_empty()).then(|| s0_row(s0_runs));
        let peers: Vec<(PeerMode, f64, Row)> = if run("peer") {
            PEER_MODES
                .iter()
                .zip(peer_runs)
                .map(|(mode, measured)| peer_row(*mode, measured))
                .collect()
        } else {
            Vec::new()
        };
        let mut ratios = Vec::new();
        if let Some(mut row) = s0_row {
            let s0_rate = row.rate.unwrap_or(0.0);
            for (mode, rate, _) in &peers {
                ratios.push(format!(
                    "otnd S0 / peer {}: {:.2}×",
                    mode.label(),
                    s0_rate / rate
                ));
            }
            row.target = "≥ 2× the peer's sendBatch (1 loop)".into();
            let batch = peers
                .iter()
                .find(|(mode, ..)| matches!(mode, PeerMode::Batch { loops: 1 }));
            match batch {
                Some((_, rate, _)) => {
                    row.met = Some(row.met.unwrap_or(true) && s0_rate >= 2.0 * rate);
                }
                None => {
                    row.target.push_str(": peer not run");
                    row.met = None;
                }
            }
            rows.push(row);
        }
        rows.extend(peers.into_iter().map(|(.., row)| row));
        if run("first") {
            rows.push(first_call().await);
        }
        if run("s1") {
            rows.push(paced("S1", env_or("S1_PER_PAGE", 3_000), Facebook::Clean).await);
        }
        if run("s1-mixed") {
            let per_page = env_or("S1_PER_PAGE", 3_000);
            rows.push(paced("S1 mixed", per_page, Facebook::CleanMixed).await);
        }
        if run("s2") {
            let throttles = Facebook::RandomThrottles(0.02);
            rows.push(paced("S2", env_or("S2_PER_PAGE", 3_000), throttles).await);
        }
        if run("s4") {
            let capacity = Facebook::Capacity(S4_CAPACITY);
            rows.push(paced("S4", env_or("S4_PER_PAGE", 3_000), capacity).await);
        }
        if run("s3") {
            rows.push(s3().await);
        }
        let peer = peer_dir.as_ref().map(|dir| dir.path());
        if run("s5") {
            rows.push(s5(false, peer).await);
        }
        if run("s5-postgres") {
            rows.push(s5(true, peer).await);
        }
        (rows, ratios)
    });
    print_table(&rows, &ratios);
    println!(
        "whole run {:.0} s; {} cores",
        began.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
