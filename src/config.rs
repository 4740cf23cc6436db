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

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use figment::{
    Figment, Metadata, Profile, Provider,
    providers::{Format, Serialized, Toml},
    value::{Dict, Map, Value},
};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use url::Url;

use crate::crypto::MasterKey;

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
}

/// The environment variable that names a config file when `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "OTN_CONFIG";

/// Shortest API key accepted: keys are bearer credentials, a short one can be guessed.
const MIN_API_KEY_LEN: usize = 16;

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
}

#[derive(Clone, Debug)]
pub enum DatabaseUrl {
    Sqlite(String),
    Postgres(SecretString),
}

impl DatabaseUrl {
    /// The URL to connect with. May hold a password: never log it.
    pub fn connection_string(&self) -> &str {
        match self {
            DatabaseUrl::Sqlite(url) => url,
            DatabaseUrl::Postgres(url) => url.expose_secret(),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            DatabaseUrl::Sqlite(_) => "sqlite",
            DatabaseUrl::Postgres(_) => "postgres",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Caller roles, weakest first, so that `role >= needed` is the permission check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// The configured API keys. Empty means the service answers anyone (loopback only).
#[derive(Default)]
pub struct ApiKeys(Vec<(Role, SecretBox<[u8]>)>);

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<_> = self.0.iter().map(|(role, _)| role.as_str()).collect();
        write!(f, "ApiKeys({roles:?})")
    }
}

impl ApiKeys {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The role of a presented key. Every configured key is compared in constant time, so the
    /// time taken says nothing about which key (or how much of one) matched.
    pub fn role_of(&self, presented: &[u8]) -> Option<Role> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for (role, key) in &self.0 {
            if bool::from(key.expose_secret().ct_eq(presented)) {
                found = Some(*role);
            }
        }
        found
    }

    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.trim().is_empty() {
            return Err("is set but empty; unset it to serve without keys (loopback only)".into());
        }
        let mut keys: Vec<(Role, SecretBox<[u8]>)> = Vec::new();
        for (index, entry) in raw.split(',').enumerate() {
            let position = index + 1;
            let entry = entry.trim();
            let Some((role, key)) = entry.split_once(':') else {
                return Err(format!(
                    "entry {position} is not `role:key` (expected e.g. admin:<key>,viewer:<key>)"
                ));
            };
            let role = match role.trim() {
                "admin" => Role::Admin,
                "operator" => Role::Operator,
                "viewer" => Role::Viewer,
                other => {
                    return Err(format!(
                        "entry {position} has unknown role '{other}' (roles: admin, operator, viewer)"
                    ));
                }
            };
            let key = key.trim();
            if key.len() < MIN_API_KEY_LEN {
                return Err(format!(
                    "entry {position} ({}) has a key shorter than {MIN_API_KEY_LEN} characters",
                    role.as_str()
                ));
            }
            if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "entry {position} ({}) has a key with whitespace or control characters",
                    role.as_str()
                ));
            }
            if keys
                .iter()
                .any(|(_, k)| k.expose_secret() == key.as_bytes())
            {
                return Err(format!("entry {position} repeats a key given earlier"));
            }
            keys.push((role, SecretBox::new(key.as_bytes().into())));
        }
        Ok(ApiKeys(keys))
    }
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

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "pretty" => Ok(LogFormat::Pretty),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("'{other}' is not a log format (pretty or json)")),
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "on" => Ok(true),
        "false" | "0" | "off" => Ok(false),
        other => Err(format!("'{other}' is not a boolean (true or false)")),
    }
}

fn parse_instance_id(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

fn seconds(min: u64, max: u64) -> impl Fn(&str) -> Result<Duration, String> {
    move |s| parse_in_range(s, min, max).map(Duration::from_secs)
}

fn count(min: u64, max: u64) -> impl Fn(&str) -> Result<usize, String> {
    move |s| parse_in_range(s, min, max).map(|n| n as usize)
}

fn parse_database_url(s: &str) -> Result<DatabaseUrl, String> {
    if s.starts_with("sqlite:") {
        return Ok(DatabaseUrl::Sqlite(s.to_string()));
    }
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        let url = Url::parse(s).map_err(|e| format!("not a valid PostgreSQL URL: {e}"))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err("PostgreSQL URL has no host".into());
        }
        return Ok(DatabaseUrl::Postgres(SecretString::from(s.to_string())));
    }
    Err("not a database URL: expected sqlite://<file>?mode=rwc or postgres://user@host/db".into())
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("'{s}' is not a socket address (expected ip:port, e.g. 127.0.0.1:50051)")
    })
}

fn parse_graph_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("'{s}' is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("'{s}' is not an http(s) URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("'{s}' must not carry a query or fragment"));
    }
    Ok(url)
}

fn parse_graph_version(s: &str) -> Result<String, String> {
    let valid = s
        .strip_prefix('v')
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(major, minor)| {
            !major.is_empty()
                && !minor.is_empty()
                && major.chars().all(|c| c.is_ascii_digit())
                && minor.chars().all(|c| c.is_ascii_digit())
        });
    if valid {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a Graph API version (expected vNN.N, e.g. v24.0)"
        ))
    }
}

fn parse_master_key(s: &str) -> Result<MasterKey, String> {
    let bytes = BASE64.decode(s).map_err(|_| {
        "is not standard base64 (expected 32 random bytes, base64-encoded)".to_string()
    })?;
    MasterKey::from_bytes(&bytes).ok_or_else(|| {
        format!(
            "decodes to {} bytes; a master key is exactly 32 bytes",
            bytes.len()
        )
    })
}

fn parse_existing_file(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("'{s}' is not a readable file"))
    }
}

fn parse_in_range(s: &str, min: u64, max: u64) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a whole number from {min} to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, &env)
    }

    fn problems(vars: &[(&str, &str)]) -> String {
        load(vars).unwrap_err().to_string()
    }

    /// Loads a file holding `toml` under `vars`; also gives the file's path as problems show it.
    fn load_file(toml: &str, vars: &[(&str, &str)]) -> (Result<Settings, ConfigError>, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otnd.toml");
        std::fs::write(&path, toml).unwrap();
        let env = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let shown = path.display().to_string();
        (Settings::load_from(Some(&path), &env), shown)
    }

    fn file_problems(toml: &str, vars: &[(&str, &str)]) -> (String, String) {
        let (result, path) = load_file(toml, vars);
        (result.unwrap_err().to_string(), path)
    }

    fn assert_contains_all<S: AsRef<str>>(text: &str, expected: impl IntoIterator<Item = S>) {
        for expected in expected {
            let expected = expected.as_ref();
            assert!(text.contains(expected), "expected {expected:?} in: {text}");
        }
    }

    #[test]
    fn defaults_serve_on_one_machine() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(settings.http_addr.to_string(), "127.0.0.1:8080");
        assert!(
            matches!(&settings.database_url, DatabaseUrl::Sqlite(url) if url == "sqlite://otnd.db?mode=rwc")
        );
        assert_eq!(settings.log_format, LogFormat::Pretty);
        assert!(settings.api_keys.is_empty());
        assert!(settings.master_key.is_none());
        // A campaign of thousands of sends is queued, not refused: queued sends are rows.
        assert!(settings.max_active_sends >= 10_000);
    }

    #[test]
    fn every_problem_is_reported_with_its_variable() {
        let text = problems(&[
            ("OTN_GRPC_ADDR", "localhost"),
            ("OTN_GRAPH_URL", "ftp://x"),
            ("OTN_LOG_FORMAT", "xml"),
        ]);
        assert!(
            text.contains("OTN_GRPC_ADDR: 'localhost' is not a socket address"),
            "{text}"
        );
        assert!(
            text.contains("OTN_GRAPH_URL: 'ftp://x' is not an http(s) URL"),
            "{text}"
        );
        assert!(
            text.contains("OTN_LOG_FORMAT: 'xml' is not a log format"),
            "{text}"
        );
    }

    #[test]
    fn malformed_api_keys_are_refused() {
        for (raw, expected) in [
            ("admin", "entry 1 is not `role:key`"),
            ("root:0123456789abcdef", "unknown role 'root'"),
            ("admin:short", "shorter than 16"),
            (
                "admin:0123456789abcdef,viewer:0123456789abcdef",
                "repeats a key",
            ),
            ("", "is set but empty"),
        ] {
            let text = problems(&[("OTN_API_KEYS", raw)]);
            assert!(text.contains("OTN_API_KEYS"), "{text}");
            assert!(text.contains(expected), "{raw:?}: {text}");
        }
    }

    #[test]
    fn api_keys_map_to_roles() {
        let keys = ApiKeys::parse("admin:aaaaaaaaaaaaaaaa, viewer:vvvvvvvvvvvvvvvv").unwrap();
        assert_eq!(keys.role_of(b"aaaaaaaaaaaaaaaa"), Some(Role::Admin));
        assert_eq!(keys.role_of(b"vvvvvvvvvvvvvvvv"), Some(Role::Viewer));
        assert_eq!(keys.role_of(b"aaaaaaaaaaaaaaa"), None);
        assert!(!format!("{keys:?}").contains("aaaa"));
    }

    #[test]
    fn non_loopback_without_keys_is_refused_naming_api_keys() {
        let text = problems(&[("OTN_GRPC_ADDR", "0.0.0.0:50051")]);
        assert!(text.contains("OTN_API_KEYS"), "{text}");
        load(&[
            ("OTN_GRPC_ADDR", "0.0.0.0:50051"),
            ("OTN_API_KEYS", "admin:0123456789abcdef"),
        ])
        .unwrap();
    }

    #[test]
    fn postgres_needs_a_master_key() {
        let text = problems(&[("OTN_DATABASE_URL", "postgres://postgres@127.0.0.1/otnd")]);
        assert!(
            text.contains("OTN_MASTER_KEY is required with PostgreSQL"),
            "{text}"
        );
        let key = BASE64.encode([7u8; 32]);
        load(&[
            ("OTN_DATABASE_URL", "postgres://postgres@127.0.0.1/otnd"),
            ("OTN_MASTER_KEY", &key),
        ])
        .unwrap();
    }

    #[test]
    fn master_key_must_be_32_bytes_of_base64() {
        assert!(problems(&[("OTN_MASTER_KEY", "not base64!")]).contains("not standard base64"));
        let short = BASE64.encode([1u8; 16]);
        assert!(problems(&[("OTN_MASTER_KEY", &short)]).contains("decodes to 16 bytes"));
    }

    #[test]
    fn bad_database_url_is_named() {
        let text = problems(&[("OTN_DATABASE_URL", "mysql://x")]);
        assert!(
            text.contains("OTN_DATABASE_URL: not a database URL"),
            "{text}"
        );
    }

    #[test]
    fn file_layer_sits_under_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otnd.toml");
        std::fs::write(
            &path,
            "grpc_addr = \"127.0.0.1:7000\"\nhttp_addr = \"127.0.0.1:7001\"\nrequest_timeout_seconds = 5\n",
        )
        .unwrap();
        let env = [("OTN_HTTP_ADDR".to_string(), "127.0.0.1:7002".to_string())]
            .into_iter()
            .collect();
        let settings = Settings::load_from(Some(&path), &env).unwrap();
        assert_eq!(settings.grpc_addr.port(), 7000);
        assert_eq!(settings.http_addr.port(), 7002);
        assert_eq!(settings.request_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otnd.toml");
        std::fs::write(&path, "grpc_adr = \"127.0.0.1:7000\"\n").unwrap();
        let err = Settings::load_from(Some(&path), &BTreeMap::new()).unwrap_err();
        assert!(
            err.to_string().contains("unknown setting 'grpc_adr'"),
            "{err}"
        );
    }

    #[test]
    fn unknown_file_keys_are_named_with_the_file_and_the_known_keys() {
        let (text, path) = file_problems("grpc_adr = \"127.0.0.1:7000\"\n", &[]);
        let known = SETTINGS.iter().map(|(key, _)| *key).collect::<Vec<_>>();
        assert_contains_all(
            &text,
            [format!(
                "config file {path}: unknown setting 'grpc_adr' (known: {})",
                known.join(", ")
            )],
        );
    }

    #[test]
    fn environment_values_reach_the_checks_as_written() {
        // Leading zeros read as decimal (010 is ten seconds), and a problem quotes the value as
        // written: nothing parses a variable before its own check does.
        let master_key = BASE64.encode([7u8; 32]);
        assert!(master_key.ends_with('='));
        let settings = load(&[
            ("OTN_LEASE_SECONDS", "010"),
            ("OTN_INSTANCE_ID", "0123"),
            ("OTN_ENFORCE_PAGE_RATE", "0"),
            ("OTN_MASTER_KEY", &master_key),
            (
                "OTN_API_KEYS",
                "admin:0123456789abcdef,viewer:true567890abcdef",
            ),
        ])
        .unwrap();
        assert_eq!(settings.lease_ttl, Duration::from_secs(10));
        assert_eq!(settings.instance_id.as_deref(), Some("0123"));
        assert!(!settings.enforce_page_rate);
        assert!(settings.master_key.is_some());
        assert_eq!(
            settings.api_keys.role_of(b"true567890abcdef"),
            Some(Role::Viewer)
        );
        let text = problems(&[
            ("OTN_LEASE_SECONDS", "0400"),
            ("OTN_MAX_ACTIVE_SENDS", "1e5"),
            ("OTN_GRAPH_VERSION", "[x]"),
            ("OTN_LOG_FORMAT", "true"),
        ]);
        assert_contains_all(
            &text,
            [
                "OTN_LEASE_SECONDS: '0400' is not a whole number from 2 to 300",
                "OTN_MAX_ACTIVE_SENDS: '1e5' is not a whole number from 1 to 10000000",
                "OTN_GRAPH_VERSION: '[x]' is not a Graph API version",
                "OTN_LOG_FORMAT: 'true' is not a log format",
            ],
        );
    }

    #[test]
    fn a_file_value_of_another_type_is_refused_naming_key_and_file() {
        // Refused even where the environment overrides it: the file itself is wrong.
        let (text, path) = file_problems(
            "grpc_addr = [\"127.0.0.1:7000\"]\nlease_seconds = 1.5\ngraph_url = 1979-05-27\n\
             [log_format]\nx = 1\n",
            &[("OTN_GRPC_ADDR", "127.0.0.1:7000")],
        );
        assert_contains_all(
            &text,
            [
                ("grpc_addr", "array"),
                ("lease_seconds", "float"),
                ("graph_url", "datetime"),
                ("log_format", "table"),
            ]
            .map(|(key, found)| {
                format!("{key} in {path}: expected a string or an integer, found {found}")
            }),
        );
        let (settings, _) = load_file("lease_seconds = 3\nenforce_page_rate = false\n", &[]);
        let settings = settings.unwrap();
        assert_eq!(settings.lease_ttl, Duration::from_secs(3));
        assert!(!settings.enforce_page_rate);
    }

    #[test]
    fn unknown_environment_variables_are_ignored() {
        let settings = load(&[
            ("OTN_TEST_CRASH_AT", "x"),
            ("OTN_MODEL_SEED", "x"),
            ("OTN_API_KEY", "x"),
            ("OTN_GRPC_ADR", "x"),
            ("otn_grpc_addr", "x"),
            ("GRPC_ADDR", "x"),
        ])
        .unwrap();
        assert_eq!(settings.grpc_addr.to_string(), "127.0.0.1:50051");
        assert!(settings.api_keys.is_empty());
    }

    #[test]
    fn problems_from_file_and_environment_are_reported_together() {
        let (text, path) = file_problems(
            "grpc_addr = \"localhost\"\nlease_seconds = 1000\nlog_format = \"xml\"\n",
            &[("OTN_HTTP_ADDR", "8080"), ("OTN_LOG_FORMAT", "yaml")],
        );
        assert_contains_all(
            &text,
            [
                format!("grpc_addr in {path}: 'localhost' is not a socket address (expected"),
                format!("lease_seconds in {path}: '1000' is not a whole number from 2 to 300"),
                "OTN_HTTP_ADDR: '8080' is not a socket address".into(),
                "OTN_LOG_FORMAT: 'yaml' is not a log format".into(),
            ],
        );
        assert!(
            !text.contains("xml"),
            "the environment's value is the one checked: {text}"
        );
    }

    #[test]
    fn a_bad_file_is_one_problem_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let err = Settings::load_from(Some(&missing), &BTreeMap::new()).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_contains_all(
            &err.to_string(),
            [format!("config file {}: ", missing.display())],
        );
        let (result, path) = load_file("grpc_addr = \n", &[("OTN_LOG_FORMAT", "xml")]);
        let err = result.unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_contains_all(
            &err.to_string(),
            [format!("config file {path}: not valid TOML at line 1")],
        );
    }

    #[test]
    fn no_problem_and_no_debug_output_shows_a_secret() {
        let secret = "s3cr3tS3cr3tS3cr3t";
        let mut texts = vec![problems(&[
            ("OTN_MASTER_KEY", secret),
            ("OTN_API_KEYS", &format!("admin:{secret},viewer:{secret}")),
            (
                "OTN_DATABASE_URL",
                &format!("postgres://otnd:{secret}@/otnd"),
            ),
        ])];
        for toml in [
            format!("master_key = [\"{secret}\"]"),
            format!("master_key = \"{secret}"),
            format!("master_key = {secret}"),
            format!("api_keys = \"root:{secret}\""),
            format!("database_url = \"postgres://otnd:{secret}@db:99999/otnd\""),
        ] {
            texts.push(file_problems(&toml, &[]).0);
        }
        let master_key = BASE64.encode([42u8; 32]);
        let url = format!("postgres://otnd:{secret}@db/otnd");
        let settings = load(&[
            ("OTN_MASTER_KEY", &master_key),
            ("OTN_API_KEYS", &format!("admin:{secret}")),
            ("OTN_DATABASE_URL", &url),
        ])
        .unwrap();
        texts.push(format!("{settings:?}"));
        for text in texts {
            assert!(
                !text.contains("s3cr3t") && !text.contains(&master_key),
                "{text}"
            );
        }
    }

    #[test]
    fn the_readme_table_lists_every_setting_with_its_default() {
        let readme = include_str!("../README.md");
        let rows = readme
            .lines()
            .skip_while(|line| !line.starts_with("| variable | default |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'));
        let mut documented = BTreeMap::new();
        for row in rows {
            let cells: Vec<_> = row.trim_start_matches("| ").split(" | ").collect();
            // A literal default is a backticked value opening the cell: `30`, `0` (none).
            let literal = cells[1]
                .strip_prefix('`')
                .and_then(|rest| rest.split_once('`'));
            for var in cells[0].split(" / ") {
                let var = var.trim_matches('`').to_string();
                let twice = documented.insert(var.clone(), literal.map(|(value, _)| value));
                assert!(twice.is_none(), "README has two rows for {var}");
            }
        }
        let listed: BTreeSet<_> = documented.keys().cloned().collect();
        let settings: BTreeSet<_> = SETTINGS.iter().map(|(key, _)| env_var(key)).collect();
        assert!(
            listed == settings,
            "only in README: {:?}; only in the settings: {:?}",
            listed.difference(&settings).collect::<Vec<_>>(),
            settings.difference(&listed).collect::<Vec<_>>()
        );
        for (key, default) in SETTINGS {
            let var = env_var(key);
            assert_eq!(documented[&var], *default, "README's default for {var}");
        }
    }
}
