//! graph-sandbox: a fake of the Graph API for tests, benchmarks and staging.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use otnd::sandbox::{self, SandboxOptions};

/// A faithful fake of the Graph API parts otnd uses; admin surface under /__sandbox/.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    addr: SocketAddr,
    /// Graph calls per page per second before answering 613 (default: no limit).
    #[arg(long)]
    rate_limit_per_page: Option<u32>,
    /// Milliseconds added to every Graph answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Tries per webhook POST before it is abandoned.
    #[arg(long, default_value_t = 8)]
    webhook_max_attempts: u32,
    /// Milliseconds before the first webhook retry; each later retry waits twice as long.
    #[arg(long, default_value_t = 500)]
    webhook_retry_base_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.rate_limit_per_page == Some(0) {
        eprintln!("graph-sandbox: --rate-limit-per-page must be at least 1");
        return ExitCode::from(2);
    }
    otnd::telemetry::init(otnd::config::LogFormat::Pretty);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("graph-sandbox: {err}");
            return ExitCode::FAILURE;
        }
    };
    let options = SandboxOptions {
        rate_limit_per_page: args.rate_limit_per_page,
        latency_ms: args.latency_ms,
        webhook_max_attempts: args.webhook_max_attempts.max(1),
        webhook_retry_base: Duration::from_millis(args.webhook_retry_base_ms),
    };
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "graph-sandbox listening");
        sandbox::serve(listener, options, otnd::startup::shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("graph-sandbox: {err}");
            ExitCode::FAILURE
        }
    }
}
