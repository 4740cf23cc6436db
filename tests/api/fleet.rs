//! Scale-out: three `otnd` processes (the real binary) on one PostgreSQL database and one
//! sandbox. Each page is run by one instance at a time (its lease); a killed instance's pages
//! move to the others; a paused one that lost its pages records nothing after; any instance
//! answers any RPC. Runs only when `DATABASE_URL` names a PostgreSQL server.

use std::time::{Duration, Instant};

use otnd::pb::{SendState, WatchSendRequest, send_service_client::SendServiceClient};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::json;

use crate::{
    backend_tests,
    judge::{Harness, Node, judge_page, progress_of, start_send, wait_until},
    support::{TestDatabase, eventually},
};

const LEASE_SECONDS: &str = "3";

async fn instance(h: &Harness, name: &str) -> Node {
    h.start_with(&[
        ("OTN_INSTANCE_ID", name),
        ("OTN_LEASE_SECONDS", LEASE_SECONDS),
    ])
    .await
}

/// Who holds which page (unexpired leases), from the lease table.
async fn owners(db: &TestDatabase) -> Vec<(String, String)> {
    let conn = Database::connect(&db.url).await.unwrap();
    let rows = conn
        .query_all_raw(Statement::from_string(
            conn.get_database_backend(),
            format!(
                "SELECT page_id, owner FROM page_leases WHERE expires_at > {} ORDER BY page_id",
                otnd::store::now_ms()
            ),
        ))
        .await
        .unwrap();
    let owners = rows
        .iter()
        .map(|r| {
            (
                r.try_get::<String>("", "page_id").unwrap(),
                r.try_get::<String>("", "owner").unwrap(),
            )
        })
        .collect();
    conn.close().await.unwrap();
    owners
}

/// `pages` pages numbered from `first`, each with `h.recipients` opted in through the first
/// node, and a send started on each (on the nodes in turn): returns (page, send id) pairs.
async fn sends_on_pages(
    h: &Harness,
    nodes: &[&Node],
    first: usize,
    pages: usize,
    rate: u32,
) -> Vec<(String, String)> {
    let mut started = Vec::new();
    for i in first..first + pages {
        let page = format!("9{i:03}");
        let story = h.prepare_page(nodes[0], &page, rate).await;
        let node = nodes[i % nodes.len()];
        started.push((page.clone(), start_send(&node.channel, &story, &page).await));
    }
    started
}

async fn all_complete_and_judged(h: &Harness, node: &Node, sends: &[(String, String)]) {
    for (page, send_id) in sends {
        wait_until(&node.channel, send_id, "the send to complete", |s| {
            s.state() == SendState::Completed
        })
        .await;
        let p = judge_page(h, &node.channel, send_id, page).await;
        assert_eq!(
            (p.sent, p.failed, p.unknown),
            (h.recipients, 0, 0),
            "{page}: {p:?}"
        );
    }
}

async fn postgres() -> Option<TestDatabase> {
    let db = TestDatabase::postgres("otnd_test").await;
    if db.is_none() {
        eprintln!("skipped: DATABASE_URL names no PostgreSQL server");
    }
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_the_pages_and_any_of_them_answers_for_any_page() {
    let Some(db) = postgres().await else { return };
    let h = Harness::new(&db, 300).await;
    let a = instance(&h, "a").await;
    let b = instance(&h, "b").await;
    let c = instance(&h, "c").await;
    h.faults(json!({"latency_ms": 20})).await;
    let sends = sends_on_pages(&h, &[&a, &b, &c], 1, 6, 300).await;

    // WatchSend on every instance sees each send through to COMPLETED, whoever runs it.
    let mut watchers = Vec::new();
    for (i, (_, send_id)) in sends.iter().enumerate() {
        let channel = [&a, &b, &c][i % 3].channel.clone();
        let send_id = send_id.clone();
        watchers.push(tokio::spawn(async move {
            let mut stream = SendServiceClient::new(channel)
                .watch_send(WatchSendRequest { send_id })
                .await
                .unwrap()
                .into_inner();
            let mut last = None;
            while let Some(message) = stream.message().await.unwrap() {
                last = message.progress;
            }
            last.unwrap()
        }));
    }
    all_complete_and_judged(&h, &a, &sends).await;
    for watcher in watchers {
        let last = tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the watch to end")
            .unwrap();
        assert_eq!(last.state(), SendState::Completed, "{last:?}");
    }
    // The leases are given up once the sends end: who ran what is in each instance's log.
    let ran = [&a, &b, &c]
        .iter()
        .filter(|n| n.served.log().contains("took the page's lease"))
        .count();
    assert!(ran >= 2, "the pages were not shared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_pages_are_given_up_and_new_work_still_finds_an_owner() {
    let Some(db) = postgres().await else { return };
    let h = Harness::new(&db, 200).await;
    let a = instance(&h, "a").await;
    let b = instance(&h, "b").await;
    let first = sends_on_pages(&h, &[&a, &b], 1, 4, 300).await;
    all_complete_and_judged(&h, &a, &first).await;
    // Nothing left to do on any page: no instance keeps a lease. (Instances once kept finished
    // pages, counted them in their share, and then took no new page at all.)
    eventually(
        Duration::from_secs(30),
        "the finished pages' leases to be given up",
        || {
            let db = &db;
            async move { owners(db).await.is_empty().then_some(()) }
        },
    )
    .await;
    let second = sends_on_pages(&h, &[&a, &b], 5, 4, 300).await;
    all_complete_and_judged(&h, &b, &second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_pages_move_and_every_send_completes_once() {
    let Some(db) = postgres().await else { return };
    let h = Harness::new(&db, 1500).await;
    let a = instance(&h, "a").await;
    let b = instance(&h, "b").await;
    let mut c = instance(&h, "c").await;
    h.faults(json!({"latency_ms": 20})).await;
    let sends = sends_on_pages(&h, &[&a, &b, &c], 1, 3, 300).await;
    eventually(Duration::from_secs(30), "instance c to run a page", || {
        let db = &db;
        async move { owners(db).await.iter().any(|(_, o)| o == "c").then_some(()) }
    })
    .await;
    let victims: Vec<String> = owners(&db)
        .await
        .into_iter()
        .filter(|(_, o)| o == "c")
        .map(|(p, _)| p)
        .collect();
    c.served.kill();
    let killed = Instant::now();
    eventually(Duration::from_secs(30), "c's pages to move", || {
        let (db, victims) = (&db, &victims);
        async move {
            let owners = owners(db).await;
            victims
                .iter()
                .all(|v| owners.iter().any(|(p, o)| p == v && o != "c"))
                .then_some(())
        }
    })
    .await;
    println!(
        "failover: c's pages {victims:?} taken over {:.1} s after the SIGKILL (lease {LEASE_SECONDS} s)",
        killed.elapsed().as_secs_f64()
    );
    all_complete_and_judged(&h, &a, &sends).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_that_lost_its_pages_records_nothing_after() {
    let Some(db) = postgres().await else { return };
    let h = Harness::new(&db, 1500).await;
    let a = instance(&h, "a").await;
    let stale = instance(&h, "stale").await;
    // Slow answers: the paused instance holds deliveries in flight when it is stopped.
    h.faults(json!({"latency_ms": 200})).await;
    let sends = sends_on_pages(&h, &[&a, &stale], 1, 2, 300).await;
    eventually(
        Duration::from_secs(30),
        "the stale instance to run a page",
        || {
            let db = &db;
            async move {
                owners(db)
                    .await
                    .iter()
                    .any(|(_, o)| o == "stale")
                    .then_some(())
            }
        },
    )
    .await;
    let owned = owners(&db).await;
    let (page, send_id) = sends
        .iter()
        .find(|(p, _)| owned.iter().any(|(q, o)| q == p && o == "stale"))
        .unwrap()
        .clone();
    wait_until(&a.channel, &send_id, "some sent", |s| {
        s.progress.as_ref().unwrap().sent >= 100
    })
    .await;
    stale.served.signal("STOP");
    eventually(
        Duration::from_secs(30),
        "the paused instance's pages to move",
        || {
            let db = &db;
            async move { (!owners(db).await.iter().any(|(_, o)| o == "stale")).then_some(()) }
        },
    )
    .await;
    all_complete_and_judged(&h, &a, &sends).await;
    let before = progress_of(&a.channel, &send_id).await;

    // Woken again, it still has answers to record and claims to make: all of it is fenced.
    stale.served.signal("CONT");
    stale
        .served
        .wait_for_line("no longer holds the page's lease", Duration::from_secs(30));
    let after = progress_of(&a.channel, &send_id).await;
    let counts = |s: &otnd::pb::Send| {
        let p = s.progress.as_ref().unwrap();
        (
            p.total,
            p.pending,
            p.in_flight,
            p.sent,
            p.failed,
            p.skipped,
            p.unknown,
        )
    };
    assert_eq!(
        counts(&before),
        counts(&after),
        "{page}: a stale write landed"
    );
    let p = judge_page(&h, &a.channel, &send_id, &page).await;
    assert_eq!((p.sent, p.unknown), (h.recipients, 0));
    assert_eq!(restarts(&stale), 0, "a fenced actor stops for good");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_joining_and_leaving_under_load_take_a_share_and_lose_nothing() {
    let Some(db) = postgres().await else { return };
    let h = Harness::new(&db, 1200).await;
    let a = instance(&h, "a").await;
    h.faults(json!({"latency_ms": 50})).await;
    // 60/s: each send lasts 20 s, long enough for the newcomers to arrive mid-send.
    let sends = sends_on_pages(&h, &[&a], 1, 6, 60).await;
    eventually(Duration::from_secs(30), "a to run every page", || {
        let db = &db;
        async move { (owners(db).await.len() == 6).then_some(()) }
    })
    .await;
    // Two join: each takes a share, handed over drained, without interrupting a send.
    let b = instance(&h, "b").await;
    let mut c = instance(&h, "c").await;
    eventually(
        Duration::from_secs(30),
        "the newcomers to take a share",
        || {
            let db = &db;
            async move {
                let owners = owners(db).await;
                let of = |name: &str| owners.iter().filter(|(_, o)| o == name).count();
                (of("b") >= 1 && of("c") >= 1).then_some(())
            }
        },
    )
    .await;
    // And one leaves cleanly: its pages are released at once, not after their leases expire.
    assert!(c.served.terminate(Duration::from_secs(20)).success());
    let left = Instant::now();
    eventually(Duration::from_secs(30), "c's pages to move", || {
        let db = &db;
        async move { (!owners(db).await.iter().any(|(_, o)| o == "c")).then_some(()) }
    })
    .await;
    println!(
        "c's pages taken over {:.1} s after it left",
        left.elapsed().as_secs_f64()
    );
    all_complete_and_judged(&h, &b, &sends).await;
    // a handed pages over: their actors stopped for good, not restarted over and over while
    // the hand-over still held their addresses (which once spun a core and timed this out).
    assert_eq!(restarts(&a), 0, "{}", a.served.log());
    assert_eq!(restarts(&c), 0);
}

/// How often the instance restarted a page actor: never, unless one failed.
fn restarts(node: &Node) -> usize {
    node.served.log().matches("page actor restarting").count()
}

/// The fence in the database alone: a takeover waits for a transaction that passed the old
/// owner's fence check (its lock wait gives up after 250 ms, and the round tries again later),
/// takes the page once that transaction has committed, and every later check of the old
/// owner's fence fails.
#[tokio::test]
async fn a_takeover_waits_for_a_fenced_write_then_fences_the_old_owner() {
    use otnd::store::{StoreError, leases};
    use sea_orm::TransactionTrait;

    let Some(db) = postgres().await else { return };
    let store = db.store().await;
    let conn = &store.db;
    // A lease that lapses at once (by the database's clock), as if its owner had stopped
    // renewing.
    let fence = free_lease(conn, "7001", "a", 0).await;

    // A step of the old owner passes its check (which does not look at the expiry) and has
    // not committed yet: the page is not taken from under it.
    let step = conn.begin().await.unwrap();
    fence.check(&step).await.unwrap();
    let taken = leases::acquire(conn, "7001", "b", 60_000).await.unwrap();
    assert_eq!(taken, None, "taken over under an open fenced write");

    step.commit().await.unwrap();
    let taken = leases::acquire(conn, "7001", "b", 60_000)
        .await
        .unwrap()
        .expect("taken over once the fenced write committed");
    assert_eq!(taken.generation, fence.generation + 1);

    // The old owner's next step is fenced; the new owner's passes.
    let late = conn.begin().await.unwrap();
    assert!(matches!(fence.check(&late).await, Err(StoreError::Fenced)));
    late.rollback().await.unwrap();
    let next = conn.begin().await.unwrap();
    taken.check(&next).await.unwrap();
    next.commit().await.unwrap();
    store.close().await;
}

/// Takes a page nobody holds: granted.
async fn free_lease(
    conn: &sea_orm::DatabaseConnection,
    page_id: &str,
    owner: &str,
    ttl_ms: i64,
) -> otnd::store::leases::Fence {
    otnd::store::leases::acquire(conn, page_id, owner, ttl_ms)
        .await
        .unwrap()
        .expect("a free page is granted")
}

/// libfaketime, which moves a process's wall clock (Debian's `faketime` package, installed when
/// missing).
fn libfaketime() -> String {
    crate::support::debian::ensure_packages(&["faketime"]);
    const PATHS: [&str; 2] = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ];
    PATHS
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("this test runs an instance with its clock moved, which needs libfaketime: apt-get install faketime")
        })
        .to_string()
}

/// Who holds the page, at which generation, by the database's clock.
async fn lease_of(db: &TestDatabase, page: &str) -> Option<(String, i64)> {
    let conn = Database::connect(&db.url).await.unwrap();
    let row = conn
        .query_one_raw(Statement::from_string(
            conn.get_database_backend(),
            format!(
                "SELECT owner, generation FROM page_leases WHERE page_id = '{page}' AND \
                 expires_at > CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
            ),
        ))
        .await
        .unwrap();
    conn.close().await.unwrap();
    row.map(|r| {
        (
            r.try_get::<String>("", "owner").unwrap(),
            r.try_get::<i64>("", "generation").unwrap(),
        )
    })
}

/// Defect: leases were compared with each instance's own clock, so an instance whose clock ran
/// 7 s ahead (of a 3-second lease) found every live lease expired and took it at every round.
/// Leases are judged by the database's clock now. Here the ahead-running instance is the real
/// binary with its wall clock moved by libfaketime (its timers, on the monotonic clock, are
/// left alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_clock_runs_ahead_takes_no_live_lease() {
    let Some(db) = postgres().await else { return };
    let preload = libfaketime();
    let h = Harness::new(&db, 200).await;
    let a = instance(&h, "a").await;
    h.faults(json!({"latency_ms": 20})).await;
    // 200 recipients at 20 a second: ten seconds of sending, a lease renewed every second.
    let sends = sends_on_pages(&h, &[&a], 1, 1, 20).await;
    let page = sends[0].0.clone();
    let held = eventually(Duration::from_secs(15), "a to hold the page", || {
        let (db, page) = (&db, page.clone());
        async move { lease_of(db, &page).await.filter(|(owner, _)| owner == "a") }
    })
    .await;
    let ahead = h
        .start_with(&[
            ("OTN_INSTANCE_ID", "ahead"),
            ("OTN_LEASE_SECONDS", LEASE_SECONDS),
            ("LD_PRELOAD", &preload),
            ("FAKETIME", "+7s"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ])
        .await;
    // Its clock does run ahead: its log's timestamps are seven seconds in the future.
    let ready = ahead
        .served
        .wait_for_line("otnd ready", Duration::from_secs(5));
    let stamp = crate::binary::json_field(&ready, "timestamp");
    let logged = chrono::DateTime::parse_from_rfc3339(&stamp).unwrap();
    let skew = logged.signed_duration_since(chrono::Utc::now());
    assert!(
        skew.num_seconds() >= 6,
        "libfaketime did not move the clock: {skew}"
    );
    // Three lease lengths: the lease stays a's, at the same generation, all along.
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        let now = lease_of(&db, &page).await;
        assert_eq!(now.as_ref(), Some(&held), "the lease moved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !ahead.served.log().contains("took the page's lease"),
        "{}",
        ahead.served.log()
    );
    all_complete_and_judged(&h, &a, &sends).await;
}

// Many pages in one statement, by the same rules as one: free and lapsed pages are granted (a
// lapsed one at a new generation), the owner's own are taken back at a new generation, and a
// page another owner holds unexpired is not, while the rest are.
backend_tests! {
    async fn leases_taken_together_follow_the_rules_of_one(db) {
        use otnd::store::leases;

        let store = db.store().await;
        let conn = &store.db;
        let held_by_b = free_lease(conn, "8002", "b", 60_000).await;
        let lapsed = free_lease(conn, "8003", "c", 0).await;
        let own = free_lease(conn, "8004", "a", 60_000).await;

        // Out of order and with a repeat: each page once, in one statement.
        let granted = leases::acquire_many(conn, &["8004", "8001", "8002", "8003", "8001"], "a", 60_000)
            .await
            .unwrap();
        let mut by_page: Vec<(String, i64)> = granted
            .iter()
            .map(|f| (f.page_id.clone(), f.generation))
            .collect();
        by_page.sort();
        assert_eq!(
            by_page,
            vec![
                ("8001".to_string(), 1),
                ("8003".to_string(), lapsed.generation + 1),
                ("8004".to_string(), own.generation + 1),
            ],
            "granted {granted:?}"
        );
        assert!(granted.iter().all(|f| f.owner == "a"));
        // The page b holds is still b's, at its generation: its fence still passes.
        let check = sea_orm::TransactionTrait::begin(conn).await.unwrap();
        held_by_b.check(&check).await.unwrap();
        check.commit().await.unwrap();
        // Nothing asked, nothing granted.
        assert!(leases::acquire_many(conn, &[], "a", 60_000).await.unwrap().is_empty());
        store.close().await;
    }
}
