//! The `graph-sandbox` command line: flags for every fault, serving until a signal.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;

use crate::{self as sandbox, Faults, SandboxOptions};

/// A faithful fake of the Graph API parts otnd uses; admin surface under /__sandbox/.
/// Every fault flag can also be changed at run time with POST /__sandbox/faults.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    addr: SocketAddr,
    /// Graph calls per page per wall-clock second before answering 613 (default: no limit).
    #[arg(long)]
    rate_limit_per_page: Option<u32>,
    /// Every page's capacity: calls in any rolling second before 80006 (default: no limit).
    #[arg(long)]
    page_capacity_per_second: Option<u32>,
    /// How long a page that reached its capacity stays refused, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    capacity_block_ms: u64,
    /// The app's calls in any rolling second, all pages together, before code 4.
    #[arg(long)]
    app_capacity_per_second: Option<u32>,
    /// Milliseconds added to every Graph answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Mean milliseconds of an exponential long tail added to the latency.
    #[arg(long, default_value_t = 0)]
    latency_tail_ms: u64,
    /// Share of sends answered 500/code 1 or 503/code 2.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Share of sends held past the client's timeout.
    #[arg(long, default_value_t = 0.0)]
    timeout_rate: f64,
    /// How long a timed-out send is held, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    timeout_hold_ms: u64,
    /// Share of sends whose connection is dropped without an answer.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    /// Share of sends accepted, then answered with a 500 or a dropped connection.
    #[arg(long, default_value_t = 0.0)]
    accept_then_fail_rate: f64,
    /// Share of sends answered 613 or 80006 (throttled).
    #[arg(long, default_value_t = 0.0)]
    throttle_rate: f64,
    /// Minutes the throttled answers ask the caller to wait.
    #[arg(long, default_value_t = 0)]
    throttle_regain_minutes: u32,
    /// A page answered 10/1893063 (temporarily restricted); repeat for several.
    #[arg(long = "restricted-page")]
    restricted_pages: Vec<String>,
    /// Let a used token through again, so that duplicate deliveries become visible.
    #[arg(long)]
    allow_token_reuse: bool,
    /// Seed of the fault dice, for reproducible runs.
    #[arg(long)]
    seed: Option<u64>,
    /// The least seconds between two recurring messages to one subscriber before 4/2018354.
    #[arg(long, default_value_t = crate::world::RECURRING_COOLDOWN_SECONDS)]
    recurring_cooldown_seconds: u64,
    /// Tries per webhook POST before it is abandoned.
    #[arg(long, default_value_t = 8)]
    webhook_max_attempts: u32,
    /// Milliseconds before the first webhook retry; each later retry waits twice as long.
    #[arg(long, default_value_t = 500)]
    webhook_retry_base_ms: u64,
}

impl Args {
    fn faults(&self) -> Faults {
        Faults {
            latency_ms: self.latency_ms,
            latency_tail_ms: self.latency_tail_ms,
            error_rate: self.error_rate,
            timeout_rate: self.timeout_rate,
            timeout_hold_ms: self.timeout_hold_ms,
            reset_rate: self.reset_rate,
            accept_then_fail_rate: self.accept_then_fail_rate,
            throttle_rate: self.throttle_rate,
            throttle_regain_minutes: self.throttle_regain_minutes,
            restricted_pages: self.restricted_pages.clone(),
            enforce_single_use: !self.allow_token_reuse,
            rate_limit_per_page: self.rate_limit_per_page,
            page_capacity_per_second: self.page_capacity_per_second,
            capacity_block_ms: self.capacity_block_ms,
            app_capacity_per_second: self.app_capacity_per_second,
            seed: self.seed,
            recurring_cooldown_seconds: self.recurring_cooldown_seconds,
            enforce_recurring_gap: true,
        }
    }
}

/// Keeps transparent huge pages off this process: where THP is `always`, the allocator's
/// returned-and-refaulted memory costs a zeroed 2 MiB page per fault, CPU taken from the service
/// under test on the same machine. Linux only; elsewhere, or if refused, nothing changes.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and reads or writes no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C elsewhere). The handlers are installed when this is
/// called, so a signal that arrives before the server serves is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the sandbox as its binary does, with `args` as its command line (the program's name
/// first): listens until SIGTERM or SIGINT. Returns the exit status: 0 after a signal, 2 on bad
/// flags, 1 when it cannot serve. Programs that need it as
/// a process of their own without the binary at hand (benchmarks) call this in a child.
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    disable_transparent_huge_pages();
    let args = Args::parse_from(args);
    let faults = args.faults();
    if let Err(why) = faults.validate() {
        eprintln!("graph-sandbox: {why}");
        return 2;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("graph-sandbox: {err}");
            return 1;
        }
    };
    let options = SandboxOptions {
        faults,
        webhook_max_attempts: args.webhook_max_attempts.max(1),
        webhook_retry_base: Duration::from_millis(args.webhook_retry_base_ms),
    };
    let result = runtime.block_on(async move {
        let stop = shutdown_signal();
        let listener = tokio::net::TcpListener::bind(args.addr).await?;
        // On stdout, plainly, for scripts that start it on port 0.
        println!("graph-sandbox listening on {}", listener.local_addr()?);
        sandbox::serve(listener, options, stop).await
    });
    match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("graph-sandbox: {err}");
            1
        }
    }
}
