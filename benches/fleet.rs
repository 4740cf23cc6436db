//! Scale-out figures on PostgreSQL, measured on the real binaries (see BENCHMARKS.md):
//!
//!     cargo bench --bench fleet                 # throughput with 1 and 3 instances, failover
//!
//! - throughput: 50 pages x 300/s (`FLEET_PAGES`), sandbox latency 150 ms and a 300/s limit per
//!   page, `FLEET_PER_PAGE` recipients each (default 1,500), with 1 and then 3 instances on a
//!   fresh database each: deliveries per second from the first StartSend to the last send
//!   COMPLETED, and the share of the 15,000/s limit.
//! - failover: 3 instances sending on up to 12 pages (recipients enough to outlast the kill);
//!   the one holding the most pages is SIGKILLed; the time until another instance holds every
//!   one of its pages (lease `FLEET_LEASE_SECONDS`, default 10).
//!
//! `BENCH_ECHO=1` shows the children's output (otnd logs at `warn`).
//!
//! `FLEET_CPU_PER_INSTANCE` (cores, e.g. `0.25`; default off) gives every otnd its own CPU
//! budget, a cgroup with that quota: how instances on machines of their own would scale, where
//! one machine's few cores would otherwise be shared by all of them, the sandbox and PostgreSQL.
//! Needs a writable cgroup `cpu` controller (v2 `cpu.max` or v1 `cpu.cfs_quota_us`).
//!
//! PostgreSQL: `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) names the
//! server; each run creates its own database and drops it.

#[path = "support/mod.rs"]
mod support;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use otnd::pb::{
    CreatePageRequest, CreateStoryRequest, GetSendRequest, ListTopicsRequest, PreviewStoryRequest,
    SendState, StartSendRequest, StoryContent, opt_in_service_client::OptInServiceClient,
    page_service_client::PageServiceClient, send_service_client::SendServiceClient,
    story_content::Kind, story_service_client::StoryServiceClient,
};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};
use support::{OTND, Proc, env_or, json_field, spawn_sandbox, spawn_with};
use tonic::transport::Channel;

const TOPIC: &str = "Fleet topic";

/// A cgroup whose processes share `cores` of CPU time, removed when dropped (after its
/// processes are gone).
struct CpuBudget {
    dir: PathBuf,
}

impl CpuBudget {
    fn new(name: &str, cores: f64) -> Result<CpuBudget, String> {
        const PERIOD_US: u64 = 100_000;
        let quota_us = ((cores * PERIOD_US as f64) as u64).max(1_000);
        let unified = std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
            .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "cpu"));
        let (dir, file, value) = if unified {
            let dir = PathBuf::from(format!("/sys/fs/cgroup/{name}"));
            (dir, "cpu.max", format!("{quota_us} {PERIOD_US}"))
        } else {
            let dir = PathBuf::from(format!("/sys/fs/cgroup/cpu/{name}"));
            (dir, "cpu.cfs_quota_us", quota_us.to_string())
        };
        let budget = CpuBudget { dir };
        let _ = std::fs::create_dir(&budget.dir);
        if !unified {
            std::fs::write(budget.dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())
                .map_err(|e| format!("{}: {e}", budget.dir.display()))?;
        }
        std::fs::write(budget.dir.join(file), value)
            .map_err(|e| format!("{}/{file}: {e}", budget.dir.display()))?;
        Ok(budget)
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("{}/cgroup.procs: {e}", self.dir.display()));
    }
}

impl Drop for CpuBudget {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

struct Fleet {
    admin_url: String,
    db_name: String,
    db_url: String,
    sandbox_url: String,
    _sandbox: Proc,
    nodes: Vec<(String, Proc, Channel, String)>,
    /// Cores each instance may use (`FLEET_CPU_PER_INSTANCE`), and the cgroups that hold them:
    /// after `nodes`, so that they are removed once their processes are gone.
    cpu_per_instance: Option<f64>,
    budgets: Vec<CpuBudget>,
}

impl Fleet {
    async fn new(cpu_per_instance: Option<f64>) -> Fleet {
        let admin_url = std::env::var("DATABASE_URL")
            .unwrap_or("postgres://postgres@127.0.0.1:5432/postgres".into());
        let db_name = format!("otnd_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(&admin_url).await.unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {db_name}"))
            .await
            .unwrap();
        admin.close().await.unwrap();
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&format!("/{db_name}"));
        let (sandbox, sandbox_url) =
            spawn_sandbox(&["--latency-ms", "150", "--rate-limit-per-page", "300"]);
        Fleet {
            admin_url,
            db_name,
            db_url: url.to_string(),
            sandbox_url,
            _sandbox: sandbox,
            nodes: Vec::new(),
            cpu_per_instance,
            budgets: Vec::new(),
        }
    }

    async fn start(&mut self, name: &str, lease_seconds: u64) {
        let dir = std::env::temp_dir();
        let mut otnd = Command::new(OTND);
        otnd.current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("OTN_DATABASE_URL", &self.db_url)
            .env("OTN_MASTER_KEY", STANDARD.encode([9u8; 32]))
            .env("OTN_GRAPH_URL", &self.sandbox_url)
            .env("OTN_GRPC_ADDR", "127.0.0.1:0")
            .env("OTN_HTTP_ADDR", "127.0.0.1:0")
            .env("OTN_LOG_FORMAT", "json")
            .env("OTN_INSTANCE_ID", name)
            .env("OTN_LEASE_SECONDS", lease_seconds.to_string())
            .env("RUST_LOG", "warn,otnd::startup=info");
        let budget = self.cpu_per_instance.map(|cores| {
            CpuBudget::new(&format!("{}_{name}", self.db_name), cores)
                .unwrap_or_else(|e| panic!("FLEET_CPU_PER_INSTANCE needs a cgroup: {e}"))
        });
        let (proc, ready) = spawn_with(otnd, "otnd ready", |pid| {
            if let Some(budget) = &budget {
                budget.add(pid);
            }
        });
        self.budgets.extend(budget);
        let channel = Channel::from_shared(format!("http://{}", json_field(&ready, "grpc_addr")))
            .unwrap()
            .connect()
            .await
            .unwrap();
        self.nodes.push((
            name.to_string(),
            proc,
            channel,
            json_field(&ready, "http_addr"),
        ));
    }

    async fn sandbox(&self, path: &str, body: Value) -> Value {
        otnd::graph::http_client()
            .post(format!("{}{path}", self.sandbox_url))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Pages with opt-ins and a reviewed story each, set up through the first instance.
    async fn pages(&self, pages: u64, per_page: u64) -> Vec<String> {
        let (_, _, channel, http) = &self.nodes[0];
        let mut stories = Vec::new();
        for i in 0..pages {
            let page = format!("7{i:04}");
            PageServiceClient::new(channel.clone())
                .create_page(CreatePageRequest {
                    page_id: page.clone(),
                    name: format!("Fleet {page}"),
                    access_token: format!("EAAB-{page}"),
                    app_secret: format!("secret-{page}"),
                    verify_token: String::new(),
                    send_rate_per_second: Some(300),
                })
                .await
                .unwrap();
            self.sandbox(
                "/__sandbox/pages",
                json!({"page_id": page, "access_token": format!("EAAB-{page}"),
                       "app_secret": format!("secret-{page}"),
                       "webhook_url": format!("http://{http}/webhook")}),
            )
            .await;
            self.sandbox(
                "/__sandbox/optins",
                json!({"page_id": page, "psid_prefix": "u", "count": per_page,
                       "payload": TOPIC, "deliver_webhook": true}),
            )
            .await;
            self.sandbox(
                "/__sandbox/interactions",
                json!({"page_id": page, "psid": "boss", "text": "ok", "deliver_webhook": false}),
            )
            .await;
        }
        for i in 0..pages {
            let page = format!("7{i:04}");
            loop {
                let topics = OptInServiceClient::new(channel.clone())
                    .list_topics(ListTopicsRequest {
                        page_id: page.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .topics;
                if topics
                    .iter()
                    .any(|t| t.topic == TOPIC && t.active == per_page)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut client = StoryServiceClient::new(channel.clone());
            let story = client
                .create_story(CreateStoryRequest {
                    page_id: page.clone(),
                    topic: TOPIC.into(),
                    content: Some(StoryContent {
                        kind: Some(Kind::Text("Fleet".into())),
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .story
                .unwrap();
            client
                .preview_story(PreviewStoryRequest {
                    story_id: story.story_id.clone(),
                    reviewer_psid: "boss".into(),
                })
                .await
                .unwrap();
            stories.push(story.story_id);
        }
        stories
    }

    /// Starts every story's send (on the instances in turn); returns the send ids.
    async fn start_sends(&self, stories: &[String]) -> Vec<String> {
        let mut sends = Vec::new();
        for (i, story) in stories.iter().enumerate() {
            let channel = &self.nodes[i % self.nodes.len()].2;
            let send = SendServiceClient::new(channel.clone())
                .start_send(StartSendRequest {
                    story_id: story.clone(),
                    request_id: format!("fleet-{i}"),
                })
                .await
                .unwrap()
                .into_inner()
                .send
                .unwrap();
            sends.push(send.send_id);
        }
        sends
    }

    async fn wait_completed(&self, sends: &[String]) -> u64 {
        let mut sent = 0;
        for id in sends {
            loop {
                let channel = &self.nodes[self.nodes.len() - 1].2;
                let send = SendServiceClient::new(channel.clone())
                    .get_send(GetSendRequest {
                        send_id: id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .send
                    .unwrap();
                if send.state() == SendState::Completed {
                    sent += send.progress.unwrap().sent;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        sent
    }

    async fn owners(&self) -> Vec<(String, String)> {
        let conn = Database::connect(&self.db_url).await.unwrap();
        let rows = conn
            .query_all_raw(Statement::from_string(
                conn.get_database_backend(),
                format!(
                    "SELECT page_id, owner FROM page_leases WHERE expires_at > {}",
                    otnd::store::now_ms()
                ),
            ))
            .await
            .unwrap();
        conn.close().await.unwrap();
        rows.iter()
            .map(|r| {
                (
                    r.try_get::<String>("", "page_id").unwrap(),
                    r.try_get::<String>("", "owner").unwrap(),
                )
            })
            .collect()
    }

    async fn drop_database(self) {
        let Fleet {
            admin_url,
            db_name,
            nodes,
            budgets,
            ..
        } = self;
        drop(nodes);
        drop(budgets);
        let admin = Database::connect(&admin_url).await.unwrap();
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
            .await;
        let _ = admin.close().await;
    }
}

async fn throughput(instances: usize, pages: u64, per_page: u64, cpu: Option<f64>) -> f64 {
    let mut fleet = Fleet::new(cpu).await;
    for i in 0..instances {
        fleet.start(&format!("n{i}"), 10).await;
    }
    let stories = fleet.pages(pages, per_page).await;
    let cpu_before: Vec<f64> = fleet.nodes.iter().map(|n| n.1.cpu_seconds()).collect();
    let started = Instant::now();
    let sends = fleet.start_sends(&stories).await;
    let sent = fleet.wait_completed(&sends).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(sent, pages * per_page);
    let rate = sent as f64 / elapsed;
    let limit = (pages * 300) as f64;
    let budget = cpu.map_or("no CPU budget".to_string(), |c| format!("{c} cores each"));
    println!(
        "fleet, {instances} instance(s), {budget}: {pages} pages x {per_page} recipients, {sent} \
         sent in {elapsed:.1} s = {rate:.0} deliveries/s, {:.3} of the {limit:.0}/s limit",
        rate / limit
    );
    for ((name, proc, ..), before) in fleet.nodes.iter().zip(cpu_before) {
        let used = proc.cpu_seconds() - before;
        let of_budget = cpu.map_or(String::new(), |c| {
            format!(", {:.0}% of its budget", 100.0 * used / (c * elapsed))
        });
        println!("  {name}: {used:.1} CPU-s while sending{of_budget}");
    }
    fleet.drop_database().await;
    rate
}

async fn failover(pages: u64, per_page: u64, lease_seconds: u64, cpu: Option<f64>) {
    let mut fleet = Fleet::new(cpu).await;
    for i in 0..3 {
        fleet.start(&format!("n{i}"), lease_seconds).await;
    }
    let stories = fleet.pages(pages, per_page).await;
    let sends = fleet.start_sends(&stories).await;
    // Sending, with the pages spread: the busiest instance dies.
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let owners = fleet.owners().await;
        assert!(
            Instant::now() < deadline,
            "after 120 s only {} of the {pages} pages had an owner",
            owners.len()
        );
        if owners.len() as u64 == pages {
            let mut counts = std::collections::BTreeMap::new();
            for (_, o) in &owners {
                *counts.entry(o.clone()).or_insert(0) += 1;
            }
            break counts.into_iter().max_by_key(|(_, n)| *n).unwrap().0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let theirs: Vec<String> = fleet
        .owners()
        .await
        .into_iter()
        .filter(|(_, o)| *o == victim)
        .map(|(p, _)| p)
        .collect();
    let index = fleet.nodes.iter().position(|n| n.0 == victim).unwrap();
    let (_, proc, ..) = fleet.nodes.remove(index);
    drop(proc);
    let killed = Instant::now();
    loop {
        let owners = fleet.owners().await;
        if theirs
            .iter()
            .all(|p| owners.iter().any(|(q, o)| q == p && *o != victim))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let moved = killed.elapsed().as_secs_f64();
    let sent = fleet.wait_completed(&sends).await;
    assert_eq!(sent, pages * per_page);
    println!(
        "failover: instance {victim} (holding {} of {pages} pages) SIGKILLed mid-send; another \
         instance held all of them {moved:.1} s later (lease {lease_seconds} s); every send \
         completed, {sent} sent",
        theirs.len()
    );
    fleet.drop_database().await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let pages = env_or("FLEET_PAGES", 50);
    let per_page = env_or("FLEET_PER_PAGE", 1500);
    let lease = env_or("FLEET_LEASE_SECONDS", 10);
    let cpu = std::env::var("FLEET_CPU_PER_INSTANCE").ok().map(|v| {
        v.parse::<f64>()
            .ok()
            .filter(|c| *c > 0.0)
            .unwrap_or_else(|| panic!("FLEET_CPU_PER_INSTANCE: cores, above 0 (not {v:?})"))
    });
    println!(
        "fleet benchmark, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    runtime.block_on(async {
        let one = throughput(1, pages, per_page, cpu).await;
        let three = throughput(3, pages, per_page, cpu).await;
        println!("3 instances / 1 instance: {:.2}x", three / one);
        // Sends that outlast the kill and the takeover (a lease and its rounds) by far.
        let failover_per_page = per_page.max(300 * (lease + 10));
        failover(pages.min(12), failover_per_page, lease, cpu).await;
    });
}
