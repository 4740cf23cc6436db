//! The fault suite: the real `otnd` binary against the sandbox under crashes, crash points,
//! Facebook's bad days, a slow Graph API, a database that goes away, and shutdowns; after each,
//! the judge diffs otnd's records against the sandbox's ledger (see `judge.rs`).
//!
//! `OTN_SOAK=1` makes the random-kill scenario a soak: 100,000 recipients and 50 kills.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use otnd::{
    domain::OPT_IN_LIFETIME_MS,
    pb::{
        CancelSendRequest, DeliveryState, ListSendsRequest, RecordOptInRequest, ResumeSendRequest,
        SendState, StartSendRequest, WatchSendRequest, opt_in_service_client::OptInServiceClient,
        send_service_client::SendServiceClient,
    },
};
use sea_orm::{ConnectOptions, ConnectionTrait, Database};
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::broadcast,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    backend_tests,
    judge::{
        Harness, Node, PAGE, TOPIC, judge, progress_of, psids_in, rss_mib, sent, start_send,
        wait_until,
    },
    support::{TestDatabase, eventually},
};

/// A small xorshift generator: the kill moments are random, and reproducible from the printed
/// seed (`OTN_FAULT_SEED`).
struct Dice(u64);

impl Dice {
    fn new() -> Self {
        let seed = std::env::var("OTN_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        println!("fault dice seed {seed} (OTN_FAULT_SEED={seed} repeats it)");
        Dice(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Deliveries a restart found in flight, from its "settled by recovery" log lines.
fn recovered(node: &Node) -> u64 {
    node.served
        .log()
        .lines()
        .filter(|l| l.contains("settled by recovery"))
        .filter_map(|l| {
            let at = l.find("\"recovered\":")? + "\"recovered\":".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

async fn health(node: &Node) -> ServingStatus {
    HealthClient::new(node.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Scenario 1: SIGKILL at random moments of a send, again and again, restarting each time.
async fn killed_at_random_moments(db: TestDatabase) {
    let soak = std::env::var_os("OTN_SOAK").is_some();
    let (recipients, kills) = if soak { (100_000, 50) } else { (20_000, 10) };
    // Facebook's most for a page: about 67 s for 20,000, over which the kills are spread.
    const RATE: u32 = 300;
    // The page's in-flight cap at this rate: the most a kill can leave ambiguous.
    const CAP: u64 = RATE as u64 / 2;
    let h = Harness::new(&db, recipients).await;
    let node = h.start().await;
    let story = h.prepare(&node, RATE).await;
    // Latency keeps deliveries in flight at each kill; some calls land and then fail.
    h.faults(json!({"latency_ms": 20, "accept_then_fail_rate": 0.02, "seed": 11}))
        .await;
    let send_id = start_send(&node.channel, &story, "random-kills").await;
    let mut dice = Dice::new();
    let mut node = node;
    for kill in 1..=kills {
        // Anywhere in the next 6 s: at start-up, mid-recovery, mid-materialisation, mid-batch.
        tokio::time::sleep(Duration::from_millis(50 + dice.below(6000))).await;
        let at = sent(&progress_of(&node.channel, &send_id).await);
        node.served.kill();
        node = h.start().await;
        println!("kill {kill}: {at} sent before it");
        let found = recovered(&node);
        assert!(
            found <= CAP,
            "a kill left {found} in flight, over the cap {CAP}"
        );
    }
    wait_until(&node.channel, &send_id, "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    let p = judge(&h, &node.channel, &send_id).await;
    assert_eq!(p.total, recipients);
    // Token deliveries found in flight are retried with the same token, never left unknown.
    assert_eq!(
        (p.sent, p.failed, p.unknown, p.skipped),
        (recipients, 0, 0, 0)
    );
    let status = node.served.terminate(Duration::from_secs(15));
    assert!(status.success(), "{}", node.served.log());
}

/// Scenario 2: A crash point aborts the process at one exact step; a plain restart finishes the send.
async fn crash_point(db: TestDatabase, point: &str) {
    const RECIPIENTS: u64 = 600;
    let h = Harness::new(&db, RECIPIENTS).await;
    let armed = format!("{point}:3");
    let mut node = h
        .start_with(&[(otnd::crashpoint::ENV, armed.as_str())])
        .await;
    let story = h.prepare(&node, 300).await;
    h.faults(json!({"latency_ms": 10})).await;
    let send_id = start_send(&node.channel, &story, point).await;
    let status = node.served.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{status:?}");
    node.served.wait_for_line(
        &format!("crash point '{point}' reached"),
        Duration::from_secs(1),
    );

    let mut node = h.start().await;
    wait_until(&node.channel, &send_id, "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    assert!(
        recovered(&node) > 0,
        "the crash left deliveries in flight: {}",
        node.served.log()
    );
    let p = judge(&h, &node.channel, &send_id).await;
    assert_eq!((p.sent, p.failed, p.unknown), (RECIPIENTS, 0, 0), "{p:?}");
    assert!(node.served.terminate(Duration::from_secs(15)).success());
}

/// Scenario 3: Every ambiguous answer Facebook can give, and throttling bursts, together.
async fn all_faults_together(db: TestDatabase) {
    const RECIPIENTS: u64 = 1500;
    let h = Harness::new(&db, RECIPIENTS).await;
    let node = h.start().await;
    let story = h.prepare(&node, 300).await;
    h.faults(json!({
        "latency_ms": 5, "accept_then_fail_rate": 0.03, "reset_rate": 0.02,
        "timeout_rate": 0.01, "timeout_hold_ms": 2500, "error_rate": 0.03,
        "throttle_rate": 0.01, "seed": 7
    }))
    .await;
    let send_id = start_send(&node.channel, &story, "all-faults").await;
    wait_until(&node.channel, &send_id, "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    let p = judge(&h, &node.channel, &send_id).await;
    assert_eq!((p.sent, p.failed, p.unknown), (RECIPIENTS, 0, 0), "{p:?}");
    let stats = h.sandbox_get("/__sandbox/stats").await;
    for kind in ["accept_then_fail", "reset", "timeout", "error", "throttle"] {
        let injected = stats["faults_injected"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains(kind))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum::<u64>();
        assert!(injected > 0, "no {kind} fault was injected: {stats}");
    }
}

/// Scenario 3b: With single use off at the sandbox, a token presented again after it was accepted would
/// message its user twice: refusals (5xx before processing, 613 and 80006 bursts) must never
/// make otnd present an accepted token again.
async fn refusals_with_single_use_off(db: TestDatabase) {
    const RECIPIENTS: u64 = 1000;
    let h = Harness::new(&db, RECIPIENTS).await;
    let node = h.start().await;
    let story = h.prepare(&node, 300).await;
    h.faults(json!({
        "latency_ms": 5, "error_rate": 0.1, "throttle_rate": 0.05,
        "enforce_single_use": false, "seed": 3
    }))
    .await;
    let send_id = start_send(&node.channel, &story, "single-use-off").await;
    wait_until(&node.channel, &send_id, "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    let p = judge(&h, &node.channel, &send_id).await;
    assert_eq!((p.sent, p.failed, p.unknown), (RECIPIENTS, 0, 0), "{p:?}");
}

/// Scenario 4: A slow Graph API (2-10 s a call): memory and queues bounded, health SERVING, WatchSend
/// live, and StartSend beyond the active-send limit shed rather than queued.
async fn slow_graph(db: TestDatabase) {
    const RATE: u32 = 100;
    let h = Harness::new(&db, 300)
        .await
        .with_env("OTN_GRAPH_TIMEOUT_SECONDS", "20")
        .with_env("OTN_MAX_ACTIVE_SENDS", "1");
    let mut node = h.start().await;
    let first = h.prepare(&node, RATE).await;
    let second = h.story(&node, "Second story").await;
    h.faults(json!({"latency_ms": 2000, "latency_tail_ms": 2000, "seed": 5}))
        .await;
    let mut sends = SendServiceClient::new(node.channel.clone());
    let one = start_send(&node.channel, &first, "slow-1").await;
    let shed = sends
        .start_send(StartSendRequest {
            story_id: second.clone(),
            request_id: "slow-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("OTN_MAX_ACTIVE_SENDS"), "{shed:?}");
    // A retry of a request that made its send is answered, never shed.
    assert_eq!(start_send(&node.channel, &first, "slow-1").await, one);

    // The watch is live: the current snapshot at once, then progress as answers come back.
    let started = Instant::now();
    let mut watch = sends
        .watch_send(WatchSendRequest {
            send_id: one.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = watch.message().await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(snapshot.progress.unwrap().sent, 0);
    loop {
        let snapshot = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .expect("a snapshot while Graph is slow")
            .unwrap()
            .unwrap();
        if snapshot.progress.unwrap().sent > 0 {
            break;
        }
    }
    assert_eq!(health(&node).await, ServingStatus::Serving);

    let metrics = node.metrics().await;
    let in_flight: f64 = metrics
        .lines()
        .find(|l| l.starts_with(&format!("otnd_deliveries_in_flight{{page_id=\"{PAGE}\"}}")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no in-flight gauge in {metrics}"));
    assert!(in_flight <= f64::from(RATE / 2), "{in_flight} in flight");
    let rss = rss_mib(node.served.pid());
    assert!(rss < 150.0, "{rss:.0} MiB resident");

    // Room again once a send ends: the shed request goes through when retried.
    sends
        .cancel_send(CancelSendRequest {
            send_id: one.clone(),
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the shed request to go through",
        || {
            let mut sends = sends.clone();
            let second = second.clone();
            async move {
                sends
                    .start_send(StartSendRequest {
                        story_id: second,
                        request_id: "slow-2".into(),
                    })
                    .await
                    .ok()
            }
        },
    )
    .await;
    node.served.kill();
}

/// Scenario 5a: PostgreSQL goes away mid-send (every connection cut, new ones refused) and comes back.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: broadcast::Sender<()>,
}

impl Proxy {
    pub(crate) async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = broadcast::channel(4);
        let (accepting, cutter) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !accepting.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = cutter.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        Proxy { addr, up, cut }
    }

    /// On PostgreSQL, a proxy the harness's instances reach the database through (so a test
    /// can cut it); none on SQLite, whose file cannot go away that way.
    pub(crate) async fn in_front_of(h: &mut Harness, db: &TestDatabase) -> Option<Self> {
        if db.sqlite_file.is_some() {
            return None;
        }
        let mut url = url::Url::parse(&db.url).unwrap();
        let target: SocketAddr =
            format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
                .parse()
                .unwrap();
        let proxy = Proxy::start(target).await;
        url.set_port(Some(proxy.addr.port())).unwrap();
        h.database_url = url.to_string();
        Some(proxy)
    }

    pub(crate) fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = self.cut.send(());
    }

    pub(crate) fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn database_goes_away(db: TestDatabase) {
    const RECIPIENTS: u64 = 1500;
    let mut h = Harness::new(&db, RECIPIENTS).await;
    let proxy = Proxy::in_front_of(&mut h, &db).await;
    let node = h.start().await;
    let story = h.prepare(&node, 300).await;
    h.faults(json!({"latency_ms": 20})).await;
    let send_id = start_send(&node.channel, &story, "db-away").await;
    wait_until(&node.channel, &send_id, "some sent", |s| sent(s) >= 200).await;

    let failure = "failed; retrying";
    match &proxy {
        Some(proxy) => {
            proxy.down();
            node.served.wait_for_line(failure, Duration::from_secs(30));
            proxy.up();
        }
        None => {
            // Another writer takes SQLite's write lock and holds it past otnd's busy timeout.
            let mut options = ConnectOptions::new(db.url.clone());
            options.max_connections(1).min_connections(1);
            let other = Database::connect(options).await.unwrap();
            other.execute_unprepared("BEGIN EXCLUSIVE").await.unwrap();
            node.served.wait_for_line(failure, Duration::from_secs(30));
            other.execute_unprepared("COMMIT").await.unwrap();
            other.close().await.unwrap();
        }
    }
    // The send resumes by itself and every Graph call had its intent committed first.
    wait_until(&node.channel, &send_id, "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    let p = judge(&h, &node.channel, &send_id).await;
    assert_eq!((p.sent, p.failed, p.unknown), (RECIPIENTS, 0, 0), "{p:?}");
    let mut node = node;
    assert!(node.served.terminate(Duration::from_secs(15)).success());
}

/// Scenario 6: SIGTERM mid-send: health NOT_SERVING at once, in-flight calls answered and recorded,
/// exit within 10 s, nothing left ambiguous.
async fn sigterm_drains(db: TestDatabase) {
    const RECIPIENTS: u64 = 1500;
    let h = Harness::new(&db, RECIPIENTS).await;
    let mut node = h.start().await;
    let story = h.prepare(&node, 300).await;
    h.faults(json!({"latency_ms": 1000})).await;
    let send_id = start_send(&node.channel, &story, "drain").await;
    wait_until(&node.channel, &send_id, "some sent", |s| sent(s) >= 100).await;
    // The real binary's metrics, mid-send.
    let metrics = node.metrics().await;
    for name in [
        "otnd_deliveries_total{outcome=\"sent\"}",
        "otnd_graph_call_seconds_bucket",
        &format!("otnd_deliveries_in_flight{{page_id=\"{PAGE}\"}}"),
        &format!("otnd_deliveries_pending{{page_id=\"{PAGE}\"}}"),
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    let asked = Instant::now();
    node.served.signal("TERM");
    eventually(
        Duration::from_secs(5),
        "NOT_SERVING during the drain",
        || {
            let health = HealthClient::new(node.channel.clone());
            async move {
                let mut health = health;
                let status = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .status();
                (status == ServingStatus::NotServing).then_some(())
            }
        },
    )
    .await;
    let status = node.served.wait_exit(Duration::from_secs(10));
    let drained = asked.elapsed();
    assert!(status.success(), "{}", node.served.log());
    assert!(drained < Duration::from_secs(10), "{drained:?}");
    node.served.wait_for_line(
        "every delivery in flight is recorded",
        Duration::from_secs(1),
    );

    let mut node = h.start().await;
    wait_until(&node.channel, &send_id, "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    assert_eq!(recovered(&node), 0, "{}", node.served.log());
    let p = judge(&h, &node.channel, &send_id).await;
    assert_eq!((p.sent, p.unknown), (RECIPIENTS, 0));
    assert!(node.served.terminate(Duration::from_secs(15)).success());
}

/// Scenario 7: Many clients start the same send at once: one send.
async fn concurrent_start_send(db: TestDatabase) {
    let h = Harness::new(&db, 50).await;
    let mut node = h.start().await;
    let story = h.prepare(&node, 300).await;
    let calls = (0..16).map(|_| {
        let channel = node.channel.clone();
        let story = story.clone();
        async move { start_send(&channel, &story, "everyone-at-once").await }
    });
    let ids = futures::future::join_all(calls).await;
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let listed = SendServiceClient::new(node.channel.clone())
        .list_sends(ListSendsRequest {
            page_id: PAGE.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sends;
    assert_eq!(listed.len(), 1, "{listed:?}");
    wait_until(&node.channel, &ids[0], "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    judge(&h, &node.channel, &ids[0]).await;
    assert!(node.served.terminate(Duration::from_secs(15)).success());
}

/// Scenario 8: Tokens that come within a minute of expiry while the send runs are never presented.
async fn expiry_boundary(db: TestDatabase) {
    const LASTING: u64 = 8;
    const EXPIRING: u64 = 10;
    const LIFE_LEFT_SECONDS: i64 = 62;
    let h = Harness::new(&db, LASTING).await;
    let mut node = h.start().await;
    // 2/s: the lasting users (psids "c…", sorted first) take about 4 s; by then the others'
    // tokens, with 62 s left at the start, have under a minute left.
    let story = h.prepare(&node, 2).await;
    // Opted in almost a year ago (through a gateway, which says when): the sandbox's tokens
    // and otnd's records expire together.
    let tokens = h
        .sandbox_post(
            "/__sandbox/optins",
            json!({"page_id": PAGE, "psid_prefix": "z", "count": EXPIRING, "payload": TOPIC,
                   "expires_in_seconds": LIFE_LEFT_SECONDS, "deliver_webhook": false}),
        )
        .await;
    let opted_in_ms = otnd::store::now_ms() - OPT_IN_LIFETIME_MS + LIFE_LEFT_SECONDS * 1000;
    for (i, token) in tokens["tokens"].as_array().unwrap().iter().enumerate() {
        OptInServiceClient::new(node.channel.clone())
            .record_opt_in(RecordOptInRequest {
                page_id: PAGE.into(),
                psid: format!("z{i}"),
                topic: TOPIC.into(),
                token: token.as_str().unwrap().into(),
                opt_in_time: Some(prost_types::Timestamp {
                    seconds: opted_in_ms / 1000,
                    nanos: ((opted_in_ms % 1000) * 1_000_000) as i32,
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let send_id = start_send(&node.channel, &story, "expiry").await;
    wait_until(&node.channel, &send_id, "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    let p = judge(&h, &node.channel, &send_id).await;
    let sent = psids_in(&node.channel, &send_id, DeliveryState::Sent).await;
    let late = sent.iter().filter(|psid| psid.starts_with('z')).count();
    assert_eq!(
        late, 0,
        "a token with under a minute left was presented: {p:?}"
    );
    assert_eq!((p.total, p.sent), (LASTING, LASTING), "{p:?}");
    let presented = h.sandbox_get("/__sandbox/stats").await["token_presentations"].clone();
    assert_eq!(
        presented, LASTING,
        "only the lasting tokens were ever presented"
    );
    assert!(node.served.terminate(Duration::from_secs(15)).success());
}

/// Scenario 9: The page is restricted mid-send: the send halts, nobody else is attempted, and after the
/// page is fixed ResumeSend completes it.
async fn page_failure_mid_send(db: TestDatabase) {
    const RECIPIENTS: u64 = 1500;
    let h = Harness::new(&db, RECIPIENTS).await;
    let mut node = h.start().await;
    let story = h.prepare(&node, 300).await;
    h.faults(json!({"latency_ms": 10})).await;
    let send_id = start_send(&node.channel, &story, "restricted").await;
    wait_until(&node.channel, &send_id, "some sent", |s| sent(s) >= 300).await;
    h.faults(json!({"latency_ms": 10, "restricted_pages": [PAGE]}))
        .await;
    wait_until(&node.channel, &send_id, "the send to halt", |s| {
        s.state() == SendState::Halted && s.progress.as_ref().unwrap().in_flight == 0
    })
    .await;
    let halted = progress_of(&node.channel, &send_id).await;
    let p = halted.progress.as_ref().unwrap();
    assert!(p.last_error.contains("1893063"), "{halted:?}");
    assert_eq!(
        (p.failed, p.unknown),
        (0, 0),
        "nobody failed for the page's fault"
    );
    let presented = h.sandbox_get("/__sandbox/stats").await["token_presentations"].clone();
    // The page is fixed; until someone resumes, nothing more is attempted.
    h.faults(json!({"latency_ms": 10})).await;
    let still = progress_of(&node.channel, &send_id).await;
    assert_eq!(still.state(), SendState::Halted);
    assert_eq!(
        h.sandbox_get("/__sandbox/stats").await["token_presentations"],
        presented
    );
    SendServiceClient::new(node.channel.clone())
        .resume_send(ResumeSendRequest {
            send_id: send_id.clone(),
        })
        .await
        .unwrap();
    wait_until(&node.channel, &send_id, "the send to complete", |s| {
        s.state() == SendState::Completed
    })
    .await;
    let p = judge(&h, &node.channel, &send_id).await;
    assert_eq!((p.sent, p.failed, p.unknown), (RECIPIENTS, 0, 0), "{p:?}");
    assert!(node.served.terminate(Duration::from_secs(15)).success());
}

backend_tests! {
    async fn sigkill_at_random_moments_ten_times_loses_and_duplicates_nothing(db) {
        killed_at_random_moments(db).await;
    }

    async fn crash_after_in_flight_is_committed_before_any_call(db) {
        crash_point(db, "in-flight-committed").await;
    }

    async fn crash_after_facebook_answered_before_the_answer_is_recorded(db) {
        crash_point(db, "graph-answered").await;
    }

    async fn crash_in_the_middle_of_recording_a_batch(db) {
        crash_point(db, "recording").await;
    }

    async fn every_ambiguous_answer_and_throttling_together(db) {
        all_faults_together(db).await;
    }

    async fn refusals_never_make_an_accepted_token_be_presented_again(db) {
        refusals_with_single_use_off(db).await;
    }

    async fn a_slow_graph_api_keeps_memory_bounded_and_sheds_new_sends(db) {
        slow_graph(db).await;
    }

    async fn the_database_going_away_mid_send_loses_nothing(db) {
        database_goes_away(db).await;
    }

    async fn sigterm_drains_within_ten_seconds_not_serving_meanwhile(db) {
        sigterm_drains(db).await;
    }

    async fn concurrent_start_sends_with_one_request_id_make_one_send(db) {
        concurrent_start_send(db).await;
    }

    async fn tokens_within_a_minute_of_expiry_are_never_presented(db) {
        expiry_boundary(db).await;
    }

    async fn a_page_restricted_mid_send_halts_and_resumes(db) {
        page_failure_mid_send(db).await;
    }
}
