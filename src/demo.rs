//! `otnd demo`: the whole job on one machine, without a Facebook account. graph-sandbox plays
//! Facebook in this process and otnd serves beside it on a new SQLite file; a demo page takes
//! opt-ins through the sandbox's signed webhooks, a story is reviewed, and a send runs at the
//! page's pace under a progress bar. Then it keeps serving, for the console, until Ctrl-C or
//! SIGTERM, which stop everything and leave nothing behind but the SQLite file.

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use graph_sandbox::{Faults, RunningSandbox, SandboxOptions};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::{
    config::Settings,
    crypto::MasterKey,
    domain::SendRate,
    pb::{
        CreatePageRequest, CreateStoryRequest, ListTopicsRequest, PreviewStoryRequest, SendState,
        StartSendRequest, StoryContent, WatchSendRequest,
        opt_in_service_client::OptInServiceClient, page_service_client::PageServiceClient,
        send_service_client::SendServiceClient, story_content::Kind,
        story_service_client::StoryServiceClient,
    },
    startup::{self, Application},
};

const PAGE: &str = "1029384756";
const PAGE_NAME: &str = "Demo page";
const TOPIC: &str = "Spring sale";
const STORY_TEXT: &str = "The spring sale is on: 20% off everything until Sunday.";
const PSID_PREFIX: &str = "demo-user-";
/// Someone on the page's team, who reads the story in their own Messenger before it goes out.
const REVIEWER: &str = "demo-reviewer";
const SEND_REQUEST_ID: &str = "otnd-demo";

/// The Graph API's answers take about this long in the sandbox (a fast day at Facebook).
const GRAPH_LATENCY_MS: u64 = 40;
const GRAPH_LATENCY_TAIL_MS: u64 = 20;

/// How long the demo waits without a single new opt-in before it gives up.
const OPT_INS_STALL: Duration = Duration::from_secs(30);
/// How long otnd's shutdown waits for open requests and streams (a console's WatchSend).
const SHUTDOWN_GRACE_SECONDS: u32 = 3;

/// `otnd demo`: its own settings, built from these flags only (no `OTN_*` variables, no config
/// file).
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The SQLite file to create; refused if it exists. It is all the demo leaves behind.
    #[arg(long, default_value = "otnd-demo.db")]
    database: PathBuf,
    /// How many users opt in (1 to 100000).
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    users: u32,
    /// The demo page's sends per second (1 to 300, Facebook's limit).
    #[arg(long, default_value_t = 300, value_parser = parse_rate)]
    rate: u32,
    /// Where otnd serves gRPC (port 0: any free port); a loopback address, as the demo has no
    /// API keys.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,
    /// Where otnd serves HTTP: the console, /healthz and the webhook (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
}

fn parse_rate(raw: &str) -> Result<u32, String> {
    let rate: u32 = raw
        .parse()
        .map_err(|_| format!("'{raw}' is not a whole number"))?;
    SendRate::parse(rate).map(SendRate::get)
}

/// Runs the demo; exit code 0 once stopped by Ctrl-C or SIGTERM, 2 for a bad flag or an existing
/// database file, 1 when something else fails.
pub fn run(args: DemoArgs) -> ExitCode {
    let database_url = match check(&args) {
        Ok(url) => url,
        Err(problem) => {
            eprintln!("otnd demo: {problem}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("otnd-worker")
        .build()
        .context("Failed to start the runtime")
        .and_then(|runtime| {
            actix::System::with_tokio_rt(move || runtime).block_on(demo(&args, database_url))
        });
    // The instance lock is the one file otnd keeps beside the database while it serves; the
    // demo's master key never touched the disk.
    remove_if_present(&sibling(&args.database, ".lock"));
    match outcome {
        Ok(()) => {
            let left: Vec<String> = leftovers(&args.database)
                .iter()
                .map(|path| path.display().to_string())
                .collect();
            match left.is_empty() {
                true => println!("otnd demo stopped; left behind: nothing"),
                false => println!("otnd demo stopped; left behind: {}", left.join(", ")),
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("otnd demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The flags' problems, one line; the database URL when there are none.
fn check(args: &DemoArgs) -> Result<String, String> {
    if !args.grpc_addr.ip().is_loopback() {
        return Err(format!(
            "--grpc-addr {} is not a loopback address: the demo serves without API keys, so \
             only on loopback",
            args.grpc_addr
        ));
    }
    let shown = args.database.display();
    if args.database.exists() {
        return Err(format!(
            "--database {shown} already exists: an earlier demo's secrets were sealed with a key \
             that is gone; remove it or name another file with --database"
        ));
    }
    let parent = match args.database.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(format!(
            "--database {shown}: the directory {} does not exist",
            parent.display()
        ));
    }
    let path = args
        .database
        .to_str()
        .ok_or_else(|| format!("--database {shown}: the path must be valid UTF-8"))?;
    Ok(format!("sqlite://{}?mode=rwc", escape_sqlite_path(path)))
}

/// What sqlx reads specially in a SQLite URL's file name, percent-encoded (it decodes the name):
/// `?` starts the options, `#` a fragment, `:memory:` an in-memory database.
fn escape_sqlite_path(path: &str) -> String {
    let mut escaped = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '%' => escaped.push_str("%25"),
            '?' => escaped.push_str("%3F"),
            '#' => escaped.push_str("%23"),
            ':' => escaped.push_str("%3A"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn sibling(database: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(database.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

fn remove_if_present(path: &Path) {
    if let Err(err) = std::fs::remove_file(path)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("otnd demo: could not remove {}: {err}", path.display());
    }
}

/// The database and whatever SQLite or otnd left beside it.
fn leftovers(database: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm", "-journal", ".lock", ".key"]
        .iter()
        .map(|suffix| sibling(database, suffix))
        .filter(|path| path.exists())
        .collect()
}

/// otnd's warnings and errors only (`RUST_LOG` refines it): the demo's own lines tell the story.
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Where a client reaches a listener bound to `addr` (the loopback for an unspecified address).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Everything between start and stop; runs inside the actix System, as `otnd serve` does.
async fn demo(args: &DemoArgs, database_url: String) -> anyhow::Result<()> {
    // First: a Ctrl-C while the rest starts is kept, and stops the demo as soon as it can.
    let stop = startup::shutdown_signal();
    tokio::pin!(stop);

    let sandbox = RunningSandbox::start(SandboxOptions {
        faults: Faults {
            latency_ms: GRAPH_LATENCY_MS,
            latency_tail_ms: GRAPH_LATENCY_TAIL_MS,
            ..Faults::default()
        },
        ..SandboxOptions::default()
    })
    .await
    .context("Failed to start graph-sandbox")?;
    let graph_url = format!("http://{}", sandbox.addr);

    let settings = settings(args, &database_url, &graph_url)?;
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(err) => {
            // It may have created the database before it failed (to listen, say): the file
            // did not exist before and holds nothing to see.
            for suffix in ["", "-wal", "-shm", "-journal"] {
                remove_if_present(&sibling(&args.database, suffix));
            }
            return Err(err);
        }
    };
    let grpc = reachable(SocketAddr::new(args.grpc_addr.ip(), app.grpc_port()));
    let http = reachable(SocketAddr::new(args.http_addr.ip(), app.http_port()));
    let (stop_app, app_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut app_task = actix::spawn(app.run_until_stopped(async move {
        let _ = app_stopped.await;
    }));

    println!("otnd demo: Facebook is played by graph-sandbox at {graph_url}, in this process");
    println!(
        "otnd serves on the new SQLite file {}",
        args.database.display()
    );
    println!("  console:  http://{http}/");
    println!("  gRPC:     {grpc}");

    let script = async {
        let channel = Channel::from_shared(format!("http://{grpc}"))?
            .connect()
            .await
            .context("Failed to connect to otnd's gRPC port")?;
        let job = Job {
            channel,
            sandbox: Admin::new(&graph_url)?,
            http,
            grpc,
            users: args.users,
            rate: args.rate,
        };
        job.run().await
    };
    let finished = tokio::select! {
        result = script => Some(result),
        () = &mut stop => None,
        ended = &mut app_task => Some(Err(stopped_on_its_own(ended))),
    };
    let result = match finished {
        Some(Ok(())) => {
            println!("otnd keeps serving: browse the console at http://{http}/. Ctrl-C to stop.");
            tokio::select! {
                () = &mut stop => Ok(()),
                ended = &mut app_task => Err(stopped_on_its_own(ended)),
            }
        }
        Some(Err(err)) => Err(err),
        None => Ok(()),
    };
    println!("stopping...");
    let _ = stop_app.send(());
    if !app_task.is_finished() {
        match app_task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("otnd demo: otnd's shutdown: {err:#}"),
            Err(err) => eprintln!("otnd demo: otnd's task failed: {err}"),
        }
    }
    drop(sandbox);
    result
}

/// Why otnd's servers ended before they were asked to.
fn stopped_on_its_own(ended: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match ended {
        Ok(Ok(())) => anyhow!("otnd stopped on its own"),
        Ok(Err(err)) => err,
        Err(err) => anyhow!(err).context("otnd's task failed"),
    }
}

fn settings(args: &DemoArgs, database_url: &str, graph_url: &str) -> anyhow::Result<Settings> {
    let env = [
        ("OTN_DATABASE_URL", database_url.to_string()),
        ("OTN_GRPC_ADDR", args.grpc_addr.to_string()),
        ("OTN_HTTP_ADDR", args.http_addr.to_string()),
        ("OTN_GRAPH_URL", graph_url.to_string()),
        (
            "OTN_SHUTDOWN_GRACE_SECONDS",
            SHUTDOWN_GRACE_SECONDS.to_string(),
        ),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value))
    .collect();
    let mut settings = Settings::load_from(None, &env).map_err(|err| anyhow!("{err}"))?;
    // A key of this run only, never written: the file beside the database that otnd would
    // otherwise create would be left behind.
    settings.master_key = Some(MasterKey::generate());
    Ok(settings)
}

/// The sandbox's admin surface (`/__sandbox/...`): what Facebook and its users do.
struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    fn new(base: &str) -> anyhow::Result<Self> {
        Ok(Admin {
            base: base.to_string(),
            http: crate::graph::http_client_builder()
                .build()
                .context("Failed to build an HTTP client")?,
        })
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}/__sandbox/{path}", self.base))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("graph-sandbox /__sandbox/{path}"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("graph-sandbox /__sandbox/{path} answered {status}: {body}");
        }
        Ok(())
    }
}

/// The demo's one job, through otnd's gRPC API and the sandbox, as a platform would run it.
struct Job {
    channel: Channel,
    sandbox: Admin,
    http: SocketAddr,
    grpc: SocketAddr,
    users: u32,
    rate: u32,
}

impl Job {
    async fn run(&self) -> anyhow::Result<()> {
        self.register_page().await?;
        self.opt_in().await?;
        let story_id = self.reviewed_story().await?;
        let send_id = self.start_send(&story_id).await?;
        self.watch(&send_id).await
    }

    /// The page in otnd (its secrets sealed with this run's key) and at "Facebook", whose
    /// webhooks go to otnd. The secrets are this run's own, and never shown.
    async fn register_page(&self) -> anyhow::Result<()> {
        let secret = || uuid::Uuid::new_v4().simple().to_string();
        let (access_token, app_secret) = (format!("EAAB{}", secret()), secret());
        PageServiceClient::new(self.channel.clone())
            .create_page(CreatePageRequest {
                page_id: PAGE.into(),
                name: PAGE_NAME.into(),
                access_token: access_token.clone(),
                app_secret: app_secret.clone(),
                verify_token: secret(),
                send_rate_per_second: Some(self.rate),
            })
            .await
            .context("CreatePage")?;
        let webhook = format!("http://{}/webhook", self.http);
        self.sandbox
            .post(
                "pages",
                json!({"page_id": PAGE, "access_token": access_token, "app_secret": app_secret,
                       "webhook_url": webhook}),
            )
            .await?;
        println!(
            "page {PAGE} ({PAGE_NAME:?}) registered in otnd and in the sandbox, sending {}/s; \
             its webhooks go to {webhook}",
            self.rate
        );
        Ok(())
    }

    /// The users press "Notify me"; the sandbox posts each opt-in, signed, to otnd's webhook.
    /// Returns once otnd's ledger holds them all.
    async fn opt_in(&self) -> anyhow::Result<()> {
        let users = u64::from(self.users);
        println!("{users} users opt in to {TOPIC:?} through signed webhooks...");
        let started = Instant::now();
        self.sandbox
            .post(
                "optins",
                json!({"page_id": PAGE, "psid_prefix": PSID_PREFIX, "count": users,
                       "payload": TOPIC, "deliver_webhook": true}),
            )
            .await?;
        let mut optins = OptInServiceClient::new(self.channel.clone());
        let (mut shown, mut last_change) = (0, Instant::now());
        loop {
            let active = optins
                .list_topics(ListTopicsRequest {
                    page_id: PAGE.into(),
                })
                .await
                .context("ListTopics")?
                .into_inner()
                .topics
                .iter()
                .find(|t| t.topic == TOPIC)
                .map_or(0, |t| t.active);
            if active != shown {
                println!("  {active:>6} of {users} opted in");
                (shown, last_change) = (active, Instant::now());
            }
            if active >= users {
                break;
            }
            if last_change.elapsed() > OPT_INS_STALL {
                bail!(
                    "opt-ins stopped arriving: {active} of {users} after {} s",
                    started.elapsed().as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        println!(
            "all {users} opted in, in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The story, reviewed: the reviewer writes to the page (which opens their 24-hour window
    /// at Facebook), and otnd previews the story to their Messenger, which records the review.
    async fn reviewed_story(&self) -> anyhow::Result<String> {
        let mut stories = StoryServiceClient::new(self.channel.clone());
        let story = stories
            .create_story(CreateStoryRequest {
                page_id: PAGE.into(),
                topic: TOPIC.into(),
                content: Some(StoryContent {
                    kind: Some(Kind::Text(STORY_TEXT.into())),
                }),
                ..Default::default()
            })
            .await
            .context("CreateStory")?
            .into_inner()
            .story
            .ok_or_else(|| anyhow!("CreateStory answered no story"))?;
        self.sandbox
            .post(
                "interactions",
                json!({"page_id": PAGE, "psid": REVIEWER, "text": "ready to review",
                       "deliver_webhook": false}),
            )
            .await?;
        stories
            .preview_story(PreviewStoryRequest {
                story_id: story.story_id.clone(),
                reviewer_psid: REVIEWER.into(),
            })
            .await
            .context("PreviewStory")?;
        println!(
            "story {} ({STORY_TEXT:?}) previewed to {REVIEWER}'s Messenger: reviewed",
            story.story_id
        );
        Ok(story.story_id)
    }

    async fn start_send(&self, story_id: &str) -> anyhow::Result<String> {
        let send = SendServiceClient::new(self.channel.clone())
            .start_send(StartSendRequest {
                story_id: story_id.into(),
                request_id: SEND_REQUEST_ID.into(),
            })
            .await
            .context("StartSend")?
            .into_inner()
            .send
            .ok_or_else(|| anyhow!("StartSend answered no send"))?;
        let id = &send.send_id;
        let grpc = self.grpc;
        println!(
            "send {id} started, at the page's {}/s; watch it too with",
            self.rate
        );
        println!("  cargo run --release --bin otnctl -- --addr http://{grpc} send watch {id}");
        println!(
            "  buf curl --protocol grpc --http2-prior-knowledge --data '{{\"send_id\":\"{id}\"}}' \
             http://{grpc}/otn.v1.SendService/WatchSend"
        );
        Ok(send.send_id)
    }

    /// Follows the send on WatchSend, under a progress bar, to its end.
    async fn watch(&self, send_id: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut stream = SendServiceClient::new(self.channel.clone())
            .watch_send(WatchSendRequest {
                send_id: send_id.into(),
            })
            .await
            .context("WatchSend")?
            .into_inner();
        let bar = crate::progress::SendBar::new(send_id);
        let mut last = None;
        while let Some(message) = stream.next().await {
            if let Some(progress) = message.context("WatchSend")?.progress {
                bar.update(&progress);
                last = Some(progress);
            }
        }
        let last = last.ok_or_else(|| anyhow!("WatchSend ended without a snapshot"))?;
        // The line below says how it ended, on stdout with the rest of the story.
        bar.clear();
        let state = match last.state() {
            SendState::Completed => "completed",
            SendState::Cancelled => "cancelled",
            SendState::Halted => "halted",
            other => other.as_str_name(),
        };
        println!(
            "send {send_id} {state}: {} sent, {} failed, {} skipped, {} unknown of {}, in {:.1} s{}",
            last.sent,
            last.failed,
            last.skipped,
            last.unknown,
            last.total,
            started.elapsed().as_secs_f64(),
            match last.last_error.as_str() {
                "" => String::new(),
                error => format!(" (last error: {})", crate::progress::one_line(error)),
            }
        );
        Ok(())
    }
}
