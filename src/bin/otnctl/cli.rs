//! The command line: every command, flag and fixed list of values. What clap cannot check by
//! itself (lengths, digits, a button's parts) is checked by the command before it connects,
//! with otnd's own rules (`otnd::domain`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use otnd::pb;

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success (for a watched send: it COMPLETED)
  1  the call failed: otnd answered with an error, or could not be reached
  2  bad arguments: nothing was sent to otnd
  3  the watched send HALTED (the page cannot send; resumable once fixed)
  4  the watched send was CANCELLED

Errors are one line on stderr: `otnctl: <gRPC code>: <otnd's message>`.";

#[derive(Debug, Parser)]
#[command(
    name = "otnctl",
    version,
    about = "The operator's command line of otnd: pages, topics, opt-ins, stories, sends and \
             their deliveries",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,

    /// How results are printed: a table for people, JSON for scripts (one object for a single
    /// result, an array for a list).
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Connection {
    /// otnd's gRPC address (http://… or, with --tls-ca, https://…).
    #[arg(
        long,
        env = "OTN_ADDR",
        global = true,
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,

    /// The API key, sent as `authorization: Bearer <key>`; needed when otnd has keys.
    #[arg(long, env = "OTN_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,

    /// The CA certificate (PEM) that signs otnd's TLS certificate, for https addresses.
    #[arg(long, env = "OTN_TLS_CA", global = true, value_name = "PEM_FILE")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Facebook Pages otnd sends for (writes need the admin role).
    #[command(subcommand)]
    Pages(PagesCommand),
    /// The opt-in ledger of a page, per topic: active, reserved, used, expired, rejected,
    /// expiring within 30 days.
    Topics {
        /// The page id (digits).
        page: String,
    },
    /// Opt-ins: the one-time tokens users gave, never the tokens themselves.
    #[command(subcommand)]
    Optins(OptInsCommand),
    /// Stories: the one message sent on a topic, written, aimed and reviewed.
    #[command(subcommand)]
    Story(StoryCommand),
    /// Sends: a reviewed story on its way to its audience.
    #[command(subcommand)]
    Send(SendCommand),
    /// A send's deliveries, one per recipient, with Facebook's answer.
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
}

#[derive(Debug, Subcommand)]
pub enum PagesCommand {
    /// Pages ordered by page id.
    List(ListArgs),
    Get {
        page: String,
    },
    /// Registers a page. The access token and app secret are required; give each by flag,
    /// environment, or (safer: not in the shell's history) a file or `-` for stdin.
    Create {
        /// Facebook's numeric page id.
        page: String,
        /// A name for operators (1..200 characters).
        #[arg(long)]
        name: String,
        /// The most Graph API sends per second for this page (1..300; otnd's default 40).
        #[arg(long, value_name = "PER_SECOND")]
        rate: Option<u32>,
        #[command(flatten)]
        secrets: CreateSecrets,
    },
    /// Changes the given fields only (rename, change the rate, rotate a secret).
    Update {
        page: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_name = "PER_SECOND")]
        rate: Option<u32>,
        #[command(flatten)]
        secrets: UpdateSecrets,
        /// Removes the webhook verify token.
        #[arg(long, conflicts_with_all = ["verify_token", "verify_token_file"])]
        clear_verify_token: bool,
    },
    /// Removes the page and everything of it (subscribers, opt-ins, stories, sends).
    Delete {
        page: String,
    },
}

/// Secrets on create: flag, environment, or file (`-` reads stdin).
#[derive(Debug, Args)]
pub struct CreateSecrets {
    /// The page access token Facebook issued.
    #[arg(
        long,
        env = "OTN_PAGE_ACCESS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub access_token: Option<String>,
    /// Reads the access token from a file (`-`: stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "access_token")]
    pub access_token_file: Option<PathBuf>,
    /// The Facebook app's secret.
    #[arg(
        long,
        env = "OTN_PAGE_APP_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub app_secret: Option<String>,
    /// Reads the app secret from a file (`-`: stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "app_secret")]
    pub app_secret_file: Option<PathBuf>,
    /// The token Facebook echoes when verifying the webhook (optional).
    #[arg(
        long,
        env = "OTN_PAGE_VERIFY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub verify_token: Option<String>,
    /// Reads the verify token from a file (`-`: stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "verify_token")]
    pub verify_token_file: Option<PathBuf>,
}

/// Secrets on update: only what is given explicitly, so that a variable left in the environment
/// never rotates a secret by surprise.
#[derive(Debug, Args)]
pub struct UpdateSecrets {
    /// A new page access token.
    #[arg(long, value_name = "TOKEN")]
    pub access_token: Option<String>,
    /// Reads the new access token from a file (`-`: stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "access_token")]
    pub access_token_file: Option<PathBuf>,
    /// A new app secret.
    #[arg(long, value_name = "SECRET")]
    pub app_secret: Option<String>,
    /// Reads the new app secret from a file (`-`: stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "app_secret")]
    pub app_secret_file: Option<PathBuf>,
    /// A new webhook verify token.
    #[arg(long, value_name = "TOKEN")]
    pub verify_token: Option<String>,
    /// Reads the new verify token from a file (`-`: stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "verify_token")]
    pub verify_token_file: Option<PathBuf>,
}

/// Paging of a List call.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Rows per call (1..1000; otnd's default 50).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub page_size: Option<i32>,
    /// Continues a listing where a previous call stopped.
    #[arg(long)]
    pub page_token: Option<String>,
    /// Follows every page to the end of the list.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum OptInsCommand {
    /// A page's opt-ins, optionally of one topic, one user, one state.
    List {
        page: String,
        /// Exact topic (case and punctuation count).
        #[arg(long)]
        topic: Option<String>,
        /// One user's page-scoped id.
        #[arg(long)]
        psid: Option<String>,
        #[arg(long, value_enum)]
        state: Option<OptInStateArg>,
        /// One kind of token.
        #[arg(long, value_enum)]
        kind: Option<TokenKindArg>,
        #[command(flatten)]
        list: ListArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoryCommand {
    /// Writes a story: a text, or a button template with 1 to 3 buttons.
    Create {
        page: String,
        /// The exact topic whose opt-ins receive the story.
        #[arg(long)]
        topic: String,
        #[command(flatten)]
        content: ContentArgs,
        /// Also send, as a standard message, to users inside the 24-hour window without an
        /// opt-in on the topic.
        #[arg(long)]
        include_window_users: bool,
        /// Restricts the audience to a segment.
        #[arg(long, value_name = "SEGMENT_ID")]
        segment: Option<String>,
        /// The kinds of token the audience is reached by (repeat or comma-separate); every
        /// kind when not given.
        #[arg(long = "token-kind", value_enum, value_delimiter = ',')]
        token_kinds: Vec<TokenKindArg>,
    },
    /// Changes the given fields; a content change clears the review.
    Update {
        story: String,
        #[arg(long)]
        topic: Option<String>,
        #[command(flatten)]
        content: ContentArgs,
        #[arg(long, value_name = "BOOL")]
        include_window_users: Option<bool>,
        #[arg(long, value_name = "SEGMENT_ID", conflicts_with = "no_segment")]
        segment: Option<String>,
        /// Removes the segment: everyone on the topic.
        #[arg(long)]
        no_segment: bool,
        /// The kinds of token the audience is reached by (repeat or comma-separate).
        #[arg(
            long = "token-kind",
            value_enum,
            value_delimiter = ',',
            conflicts_with = "all_token_kinds"
        )]
        token_kinds: Vec<TokenKindArg>,
        /// Reaches the audience by every kind of token.
        #[arg(long)]
        all_token_kinds: bool,
    },
    Get {
        story: String,
    },
    /// A page's stories, optionally of one topic.
    List {
        page: String,
        #[arg(long)]
        topic: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Sends the story to a reviewer in Messenger and records the review.
    Preview {
        story: String,
        /// The reviewer's PSID; they must have written to the page within 24 hours.
        #[arg(long, value_name = "PSID")]
        reviewer: String,
    },
    /// Counts who a send would reach now.
    Estimate {
        story: String,
    },
}

/// A story's content on the command line.
#[derive(Debug, Args)]
pub struct ContentArgs {
    /// The message (1..2000 characters), or with --button the template's text (1..640).
    #[arg(long)]
    pub text: Option<String>,
    /// A template button, up to 3: TYPE TITLE VALUE, TYPE one of web-url (VALUE: an http(s) URL),
    /// postback (VALUE: the payload, 1..1000 characters), phone-number (VALUE: +15105551234).
    /// Titles are 1..20 characters.
    #[arg(
        long,
        num_args = 3,
        value_names = ["TYPE", "TITLE", "VALUE"],
        action = clap::ArgAction::Append,
        allow_hyphen_values = true
    )]
    pub button: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum SendCommand {
    /// Starts a reviewed story's send.
    Start {
        story: String,
        /// Makes a retry safe: the same id answers with the same send (1..128 characters;
        /// a new random id when absent).
        #[arg(long)]
        request_id: Option<String>,
        /// Follows the send to its end with a progress bar (exit codes as for `send watch`).
        #[arg(long)]
        watch: bool,
    },
    Get {
        send: String,
    },
    /// A page's sends, optionally of one story, in one state.
    List {
        page: String,
        #[arg(long, value_name = "STORY_ID")]
        story: Option<String>,
        #[arg(long, value_enum)]
        state: Option<SendStateArg>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// No new attempts; attempts in flight finish.
    Pause {
        send: String,
    },
    /// Resumes a paused or halted send.
    Resume {
        send: String,
    },
    /// Skips every pending delivery and releases its opt-in.
    Cancel {
        send: String,
    },
    /// A live progress bar until the send ends: exit 0 when it COMPLETED, 3 when it HALTED,
    /// 4 when it was CANCELLED.
    Watch {
        send: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// One page of a send's deliveries (or --all).
    List {
        send: String,
        #[arg(long, value_enum)]
        state: Option<DeliveryStateArg>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Every delivery of the send to stdout, written page by page as it is read.
    Export {
        send: String,
        #[arg(long, value_enum)]
        format: ExportFormat,
        #[arg(long, value_enum)]
        state: Option<DeliveryStateArg>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Csv,
    Jsonl,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OptInStateArg {
    Active,
    Reserved,
    Used,
    Rejected,
    Expired,
    Stopped,
}

/// A kind of token: one-time notification or recurring notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TokenKindArg {
    OneTime,
    Recurring,
}

impl From<TokenKindArg> for pb::TokenKind {
    fn from(kind: TokenKindArg) -> Self {
        match kind {
            TokenKindArg::OneTime => pb::TokenKind::OneTime,
            TokenKindArg::Recurring => pb::TokenKind::Recurring,
        }
    }
}

impl From<OptInStateArg> for pb::OptInState {
    fn from(state: OptInStateArg) -> Self {
        match state {
            OptInStateArg::Active => pb::OptInState::Active,
            OptInStateArg::Reserved => pb::OptInState::Reserved,
            OptInStateArg::Used => pb::OptInState::Used,
            OptInStateArg::Rejected => pb::OptInState::Rejected,
            OptInStateArg::Expired => pb::OptInState::Expired,
            OptInStateArg::Stopped => pb::OptInState::Stopped,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SendStateArg {
    Queued,
    Running,
    Paused,
    Completed,
    Cancelled,
    Halted,
}

impl From<SendStateArg> for pb::SendState {
    fn from(state: SendStateArg) -> Self {
        match state {
            SendStateArg::Queued => pb::SendState::Queued,
            SendStateArg::Running => pb::SendState::Running,
            SendStateArg::Paused => pb::SendState::Paused,
            SendStateArg::Completed => pb::SendState::Completed,
            SendStateArg::Cancelled => pb::SendState::Cancelled,
            SendStateArg::Halted => pb::SendState::Halted,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeliveryStateArg {
    Pending,
    InFlight,
    Sent,
    Failed,
    Skipped,
    Unknown,
}

impl From<DeliveryStateArg> for pb::DeliveryState {
    fn from(state: DeliveryStateArg) -> Self {
        match state {
            DeliveryStateArg::Pending => pb::DeliveryState::Pending,
            DeliveryStateArg::InFlight => pb::DeliveryState::InFlight,
            DeliveryStateArg::Sent => pb::DeliveryState::Sent,
            DeliveryStateArg::Failed => pb::DeliveryState::Failed,
            DeliveryStateArg::Skipped => pb::DeliveryState::Skipped,
            DeliveryStateArg::Unknown => pb::DeliveryState::Unknown,
        }
    }
}
