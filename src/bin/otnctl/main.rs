//! otnctl: the operator's command line of otnd, over otnd's gRPC API.
//!
//! Every argument is checked before anything is sent (a usage error, exit 2); a failed call is
//! one line, `otnctl: <gRPC code>: <otnd's message>` (exit 1); watching a send ends with the
//! send's outcome (0 completed, 3 halted, 4 cancelled).

mod cli;
mod client;
mod output;
mod pages;
mod secrets;
mod sends;
mod stories;

use clap::{CommandFactory, Parser, error::ErrorKind};
use otnd::domain::{PageId, Psid, Topic};

use crate::{
    cli::{Cli, Command},
    client::{Conn, Failure},
};

/// What a command ends with when it did not fail.
pub type Outcome = Result<ExitCode, Failure>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    Success = 0,
    Halted = 3,
    Cancelled = 4,
}

fn main() {
    let cli = Cli::parse();
    // Checked here, before any command runs, so a bad address never waits for a network.
    let conn = Conn::new(&cli.connection);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("otnctl: cannot start: {e}");
            std::process::exit(1);
        });
    let outcome = runtime.block_on(run(cli.command, cli.output, &conn));
    match outcome {
        Ok(code) => std::process::exit(code as i32),
        Err(failure) => {
            eprintln!("otnctl: {failure}");
            std::process::exit(1);
        }
    }
}

async fn run(command: Command, output: cli::Output, conn: &Conn) -> Outcome {
    match command {
        Command::Pages(command) => pages::run(command, output, conn).await,
        Command::Topics { page } => pages::topics(&page, output, conn).await,
        Command::Optins(command) => pages::optins(command, output, conn).await,
        Command::Story(command) => stories::run(command, output, conn).await,
        Command::Send(command) => sends::run(command, output, conn).await,
        Command::Deliveries(command) => sends::deliveries(command, output, conn).await,
    }
}

/// A bad argument, reported the way clap reports its own (with the usage), exit code 2. Nothing
/// has been sent to otnd when this is called.
pub fn usage_error(message: impl std::fmt::Display) -> ! {
    Cli::command()
        .error(ErrorKind::ValueValidation, message)
        .exit()
}

/// Checks a value with otnd's own rule, naming the argument when it is broken.
pub fn check<T>(argument: &str, parsed: Result<T, String>) -> T {
    parsed.unwrap_or_else(|rule| usage_error(format!("{argument}: {rule}")))
}

pub fn page_id(raw: &str) -> String {
    check("PAGE", PageId::parse(raw));
    raw.to_string()
}

pub fn psid(argument: &str, raw: &str) -> String {
    check(argument, Psid::parse(raw));
    raw.to_string()
}

/// Topics are stored exactly as given; stories and opt-in filters take otnd's topic rule.
pub fn topic(argument: &str, raw: &str) -> String {
    check(argument, Topic::parse(raw));
    raw.to_string()
}

/// Story, send and delivery ids are otnd's; all that can be said before asking is that one is
/// given, of a sane length and on one line.
pub fn id(argument: &str, raw: &str) -> String {
    const MAX_ID_CHARS: usize = 128;
    if raw.trim().is_empty() {
        usage_error(format!("{argument}: must not be empty"));
    }
    if raw.chars().count() > MAX_ID_CHARS || raw.chars().any(char::is_control) {
        usage_error(format!(
            "{argument}: must be at most {MAX_ID_CHARS} characters without control characters"
        ));
    }
    raw.to_string()
}

/// Reads a List call's pages: one (saying on stderr how to get the next), or with `--all` every
/// one. `fetch(page_size, page_token)` makes one call.
pub async fn list_pages<T, F, Fut>(list: &cli::ListArgs, mut fetch: F) -> Result<Vec<T>, Failure>
where
    F: FnMut(i32, String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let size = list.page_size.unwrap_or(0);
    let mut token = list.page_token.clone().unwrap_or_default();
    let mut rows = Vec::new();
    loop {
        let (mut page, next) = fetch(size, token).await?;
        rows.append(&mut page);
        if next.is_empty() {
            return Ok(rows);
        }
        if !list.all {
            eprintln!("more rows: --page-token {next} (or --all)");
            return Ok(rows);
        }
        token = next;
    }
}

/// Checks a listing's flags (clap checks the page size's range).
pub fn check_list(list: &cli::ListArgs) {
    if let Some(token) = &list.page_token {
        id("--page-token", token);
    }
}
