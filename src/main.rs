use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use otnd::{
    config::{CONFIG_FILE_ENV, Settings},
    demo::{self, DemoArgs},
    startup::{self, Application},
    telemetry,
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// otnd: Facebook Messenger One-Time Notifications behind a gRPC API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file of settings (keys as in the README's table, without OTN_); OTN_* variables
    /// override it.
    #[arg(long, global = true, env = CONFIG_FILE_ENV)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the version.
    Version,
    /// See the whole job on this machine, without a Facebook account.
    ///
    /// graph-sandbox plays Facebook in this process; a demo page's users opt in through signed
    /// webhooks, a reviewed story is sent at the page's pace under a progress bar, and otnd
    /// keeps serving for the console. Ctrl-C stops it all and leaves only the SQLite file.
    /// Takes its settings from its flags only (no OTN_* variables, no --config).
    Demo(DemoArgs),
}

fn main() -> ExitCode {
    startup::disable_transparent_huge_pages();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and exit 0.
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => {
            // One line naming the flag and the rule; --help tells the rest.
            let rendered = err.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("otnd: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Version) => {
            println!("otnd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(Command::Demo(args)) => return demo::run(args),
        _ => {}
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprint!("otnd: {err}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log_format);
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::Migrate => migrate(settings),
        Command::Version | Command::Demo(_) => {
            unreachable!("handled before configuration is read")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = ?err, "otnd stopped with an error");
            eprintln!("otnd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("otnd-worker")
        .build()
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    let runtime = runtime()?;
    // Actors live in the actix System; the gRPC and HTTP servers run on the same tokio runtime.
    actix::System::with_tokio_rt(move || runtime).block_on(async move {
        // Listening for SIGTERM before anything else: a supervisor may stop otnd while it
        // starts.
        let stop = startup::shutdown_signal();
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "otnd starting");
        let app = Application::build(settings).await?;
        app.run_until_stopped(stop).await
    })
}

fn migrate(settings: Settings) -> anyhow::Result<()> {
    runtime()?.block_on(startup::migrate(&settings))
}
