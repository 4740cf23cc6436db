//! Typed settings: defaults that serve on one machine, an optional TOML file, `OTN_*` environment
//! overrides, layered by figment. Everything is validated at start and every problem is reported
//! at once, naming where the bad value came from. Secrets are held in `secrecy` types so that they
//! never reach a log.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment, Metadata, Profile, Provider,
    providers::{Format, Serialized, Toml},
    value::{Dict, Map, Value},
};
use url::Url;

use crate::crypto::MasterKey;

#[cfg(test)]
mod tests;
mod values;

pub use values::{ApiKeys, DatabaseUrl, LogFormat, Role, TlsFiles};
use values::{
    count, parse_bool, parse_cors_origins, parse_database_url, parse_existing_file,
    parse_graph_url, parse_graph_version, parse_hours, parse_in_range, parse_instance_id,
    parse_log_format, parse_master_key, parse_socket_addr, seconds,
};

/// Declares the settings, each once: its key (in the file; `OTN_<KEY>` in the environment), the
/// type it is read into, its default as a user would write it, and what reads and checks it.
macro_rules! settings {
    (@default) => { None };
    (@default $default:literal) => { Some($default) };
    ($($key:ident: $T:ty $(= $default:literal)?, $parse:expr;)*) => {
        /// Each setting's key and default, in the order its problems are reported.
        const SETTINGS: &[(&str, Option<&str>)] =
            &[$((stringify!($key), settings!(@default $($default)?))),*];

        /// Every setting as read; `None` where unset, or invalid (and a problem says why).
        struct Values { $($key: Option<$T>),* }

        impl Values {
            fn read(figment: &Figment, problems: &mut Vec<String>) -> Self {
                Values { $($key: read(figment, problems, stringify!($key), $parse)),* }
            }
        }
    };
}

settings! {
    database_url: DatabaseUrl = "sqlite://otnd.db?mode=rwc", parse_database_url;
    grpc_addr: SocketAddr = "127.0.0.1:50051", parse_socket_addr;
    http_addr: SocketAddr = "127.0.0.1:8080", parse_socket_addr;
    graph_url: Url = "https://graph.facebook.com", parse_graph_url;
    graph_version: String = "v24.0", parse_graph_version;
    master_key: MasterKey, parse_master_key;
    api_keys: ApiKeys, ApiKeys::parse;
    log_format: LogFormat = "pretty", parse_log_format;
    tls_cert: PathBuf, parse_existing_file;
    tls_key: PathBuf, parse_existing_file;
    request_timeout_seconds: Duration = "30", seconds(1, 3600);
    max_concurrent_requests: usize = "1024", count(1, 1_000_000);
    shutdown_grace_seconds: Duration = "10", seconds(1, 600);
    app_rate_per_second: Option<u32> = "0", |s| {
        parse_in_range(s, 0, 1_000_000).map(|n| u32::try_from(n).ok().filter(|&n| n > 0))
    };
    send_batch_max: usize = "50", count(1, crate::graph::MAX_BATCH_ITEMS as u64);
    enforce_page_rate: bool = "true", parse_bool;
    graph_timeout_seconds: Duration = "20", seconds(1, 600);
    max_active_sends: u64 = "100000", |s| parse_in_range(s, 1, 10_000_000);
    max_page_actors: usize = "1000", count(1, 100_000);
    max_watchers: usize = "1000", count(1, 1_000_000);
    max_watchers_per_send: usize = "100", count(1, 1_000_000);
    instance_id: String, parse_instance_id;
    lease_seconds: Duration = "10", seconds(2, 300);
    cors_origins: Vec<String>, parse_cors_origins;
    console: bool = "true", parse_bool;
    recurring_cooldown_hours: Duration = "48", parse_hours;
}

/// The environment variable that names a config file when `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "OTN_CONFIG";

#[derive(Debug)]
pub struct Settings {
    pub database_url: DatabaseUrl,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub graph_url: Url,
    pub graph_version: String,
    /// `None`: on SQLite a key file beside the database is used (and created on first start).
    pub master_key: Option<MasterKey>,
    pub api_keys: ApiKeys,
    pub log_format: LogFormat,
    pub tls: Option<TlsFiles>,
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// How long a shutdown waits for open requests and streams before closing them.
    pub shutdown_grace: Duration,
    /// Send API calls per second for the whole app, all pages together; `None`: no app limit.
    pub app_rate_per_second: Option<u32>,
    /// Most sends per Graph batch request (1: no batching). Paced pages batch less (see the
    /// engine's pacing): a batch never exceeds 1% of the page's rate.
    pub send_batch_max: usize,
    /// Pace each page at its `send_rate_per_second`. Off only for benchmarks against a sandbox.
    pub enforce_page_rate: bool,
    /// How long one Graph API call may take before it counts as timed out (and ambiguous).
    pub graph_timeout: Duration,
    /// Most sends queued or running at once; StartSend beyond it is RESOURCE_EXHAUSTED. The
    /// database is the queue (a queued send costs a row), so this only stops a runaway client;
    /// what costs memory is bounded by the two below.
    pub max_active_sends: u64,
    /// Most pages this instance runs at once (a page actor each, with its deliveries in
    /// flight); the sends of other pages wait, queued, until one of these ends.
    pub max_page_actors: usize,
    /// Most open streams (WatchSend and health Watch) at once; beyond, RESOURCE_EXHAUSTED.
    pub max_watchers: usize,
    /// Most WatchSend streams of one send at once.
    pub max_watchers_per_send: usize,
    /// This instance's name among those sharing a PostgreSQL database; one restarted under the
    /// same name takes its pages back at once. `None`: a new random name per start (on SQLite,
    /// which takes one instance, a fixed one).
    pub instance_id: Option<String>,
    /// How long a page's lease lasts without renewal: a dead instance's pages move to another
    /// within about this long. Renewed every third of it.
    pub lease_ttl: Duration,
    /// How long after a recurring notification to a subscriber otnd sends them no other
    /// (Facebook's rule, one per rolling 48 hours since September 2025; a setting because Meta
    /// has changed it before). A send started takes the value of its start.
    pub recurring_cooldown: Duration,
    /// Browser origins (`scheme://host[:port]`) allowed to call the gRPC port over grpc-web;
    /// empty: none, so no browser page of another origin can.
    pub cors_origins: Vec<String>,
    /// Serve the web console and its API on the HTTP listener. Without API keys it is served
    /// only when that listener is on loopback (see `startup`).
    pub console: bool,
}

/// What is wrong with the configuration: every problem found, each naming its source.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Settings {
    /// Loads from the process environment and an optional file (`--config`, else `OTN_CONFIG`).
    pub fn load(config_file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::load_from(config_file, &env)
    }

    /// Loads from the given variables (tests pass their own instead of the process environment).
    pub fn load_from(
        config_file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let defaults: BTreeMap<&str, &str> = SETTINGS
            .iter()
            .filter_map(|&(key, default)| Some((key, default?)))
            .collect();
        let mut figment = Figment::from(Serialized::defaults(defaults));
        let file = config_file
            .map(Path::to_path_buf)
            .or_else(|| env.get(CONFIG_FILE_ENV).map(PathBuf::from));
        if let Some(path) = file {
            figment = figment.merge(file_layer(&path)?);
        }
        // Only the known settings' variables: other `OTN_*` ones serve other purposes.
        let vars = SETTINGS.iter().filter_map(|(key, _)| {
            let value = env.get(&env_var(key))?;
            Some((key.to_string(), Value::from(value.clone())))
        });
        let metadata = Metadata::named("environment").interpolater(|_, keys| env_var(keys[0]));
        let figment = figment.merge(Layer(metadata, vars.collect()));

        let mut problems = Vec::new();
        let v = Values::read(&figment, &mut problems);
        let tls = match (v.tls_cert, v.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                problems.push(
                    "OTN_TLS_CERT and OTN_TLS_KEY go together: set both to serve TLS, or neither"
                        .into(),
                );
                None
            }
        };
        if let (Some(DatabaseUrl::Postgres(_)), None) = (&v.database_url, &v.master_key) {
            problems.push(
                "OTN_MASTER_KEY is required with PostgreSQL: page secrets are encrypted with it, \
                 and a key generated on one machine would not be shared with the others \
                 (32 random bytes, standard base64; e.g. `openssl rand -base64 32`)"
                    .into(),
            );
        }
        let api_keys = v.api_keys.unwrap_or_default();
        if let Some(addr) = v.grpc_addr
            && api_keys.is_empty()
            && !addr.ip().is_loopback()
        {
            problems.push(format!(
                "OTN_GRPC_ADDR {addr} is not a loopback address and OTN_API_KEYS is not set: \
                 without API keys otnd answers anyone, so it only listens on loopback. \
                 Set OTN_API_KEYS (role:key,...) to listen on {addr}"
            ));
        }

        let settings = (|| {
            Some(Settings {
                database_url: v.database_url?,
                grpc_addr: v.grpc_addr?,
                http_addr: v.http_addr?,
                graph_url: v.graph_url?,
                graph_version: v.graph_version?,
                master_key: v.master_key,
                api_keys,
                log_format: v.log_format?,
                tls,
                request_timeout: v.request_timeout_seconds?,
                max_concurrent_requests: v.max_concurrent_requests?,
                shutdown_grace: v.shutdown_grace_seconds?,
                app_rate_per_second: v.app_rate_per_second?,
                send_batch_max: v.send_batch_max?,
                enforce_page_rate: v.enforce_page_rate?,
                graph_timeout: v.graph_timeout_seconds?,
                max_active_sends: v.max_active_sends?,
                max_page_actors: v.max_page_actors?,
                max_watchers: v.max_watchers?,
                max_watchers_per_send: v.max_watchers_per_send?,
                instance_id: v.instance_id,
                lease_ttl: v.lease_seconds?,
                cors_origins: v.cors_origins.unwrap_or_default(),
                console: v.console?,
                recurring_cooldown: v.recurring_cooldown_hours?,
            })
        })();
        match settings {
            Some(settings) if problems.is_empty() => Ok(settings),
            _ if problems.is_empty() => Err(ConfigError {
                problems: vec!["a required setting has no value and no default".into()],
            }),
            _ => Err(ConfigError { problems }),
        }
    }
}

fn env_var(key: &str) -> String {
    format!("OTN_{}", key.to_ascii_uppercase())
}

/// Values with where they came from: the file's and the environment's. Not figment's `Toml` and
/// `Env` providers: `Toml`'s parse error quotes the offending line, perhaps a secret; `Env` reads
/// only the process environment, takes names in any case and parses values (`0123` would arrive
/// as 123, `[x]` as an array), where each check must see the text as written.
struct Layer(Metadata, Dict);

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.0.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.1.clone()))
    }
}

/// The file's values, refused whole (each problem named) if any key is unknown or not a scalar.
fn file_layer(path: &Path) -> Result<Layer, ConfigError> {
    let shown = path.display().to_string();
    let fail = |why: String| ConfigError {
        problems: vec![format!("config file {shown}: {why}")],
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    // Where and what, but not the offending line: it may hold a secret.
    let dict: Dict = Toml::from_str(&text).map_err(|e| {
        let before = e
            .span()
            .and_then(|span| text.get(..span.start))
            .unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        let what = e.message().trim().replace('\n', "; ");
        fail(format!(
            "not valid TOML at line {line}, column {column}: {what}"
        ))
    })?;
    let metadata = Metadata::from("config file", path)
        .interpolater(move |_, keys| format!("{} in {shown}", keys[0]));
    let mut problems = Vec::new();
    for (key, value) in &dict {
        if !SETTINGS.iter().any(|(known, _)| known == key) {
            let known: Vec<_> = SETTINGS.iter().map(|(key, _)| *key).collect();
            problems.push(format!(
                "config file {}: unknown setting '{key}' (known: {})",
                path.display(),
                known.join(", ")
            ));
        } else if let Err(found) = text_of(value) {
            let origin = metadata.interpolate(&Profile::Default, &[key]);
            problems.push(format!("{origin}: {found}"));
        }
    }
    match problems.is_empty() {
        true => Ok(Layer(metadata, dict)),
        false => Err(ConfigError { problems }),
    }
}

/// A scalar's text as written (TOML integers and booleans as they print).
fn text_of(value: &Value) -> Result<String, String> {
    let found = match value {
        Value::String(_, s) => return Ok(s.clone()),
        Value::Char(_, c) => return Ok(c.to_string()),
        Value::Bool(_, b) => return Ok(b.to_string()),
        Value::Num(_, n) => match n.to_i128() {
            Some(n) => return Ok(n.to_string()),
            None => "float",
        },
        Value::Array(..) => "array",
        // How the toml crate hands a date or time to serde.
        Value::Dict(_, dict) if dict.contains_key("$__toml_private_datetime") => "datetime",
        Value::Dict(..) => "table",
        Value::Empty(..) => "nothing",
    };
    Err(format!("expected a string or an integer, found {found}"))
}

/// One setting from the top layer that has it, or `None` with a problem naming that layer.
fn read<T>(
    figment: &Figment,
    problems: &mut Vec<String>,
    key: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    let value = figment.find_value(key).ok()?;
    match text_of(&value).and_then(|text| parse(text.trim())) {
        Ok(parsed) => Some(parsed),
        Err(why) => {
            let origin = figment
                .find_metadata(key)
                .map_or(key.to_string(), |metadata| {
                    metadata.interpolate(&Profile::Default, &[key])
                });
            problems.push(format!("{origin}: {why}"));
            None
        }
    }
}
