//! Typed settings: defaults that serve on one machine, an optional TOML file, `OTN_*` environment
//! overrides. Everything is validated at start and every problem is reported at once, naming where
//! the bad value came from. Secrets are held in `secrecy` types so that they never reach a log.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use url::Url;

use crate::crypto::MasterKey;

/// Each setting: its key in the config file, its environment variable, and its default.
const SETTINGS: &[(&str, &str, Option<&str>)] = &[
    (
        "database_url",
        "OTN_DATABASE_URL",
        Some("sqlite://otnd.db?mode=rwc"),
    ),
    ("grpc_addr", "OTN_GRPC_ADDR", Some("127.0.0.1:50051")),
    ("http_addr", "OTN_HTTP_ADDR", Some("127.0.0.1:8080")),
    (
        "graph_url",
        "OTN_GRAPH_URL",
        Some("https://graph.facebook.com"),
    ),
    ("graph_version", "OTN_GRAPH_VERSION", Some("v24.0")),
    ("master_key", "OTN_MASTER_KEY", None),
    ("api_keys", "OTN_API_KEYS", None),
    ("log_format", "OTN_LOG_FORMAT", Some("pretty")),
    ("tls_cert", "OTN_TLS_CERT", None),
    ("tls_key", "OTN_TLS_KEY", None),
    (
        "request_timeout_seconds",
        "OTN_REQUEST_TIMEOUT_SECONDS",
        Some("30"),
    ),
    (
        "max_concurrent_requests",
        "OTN_MAX_CONCURRENT_REQUESTS",
        Some("1024"),
    ),
    (
        "shutdown_grace_seconds",
        "OTN_SHUTDOWN_GRACE_SECONDS",
        Some("10"),
    ),
    ("app_rate_per_second", "OTN_APP_RATE_PER_SECOND", Some("0")),
    ("send_batch_max", "OTN_SEND_BATCH_MAX", Some("50")),
    ("enforce_page_rate", "OTN_ENFORCE_PAGE_RATE", Some("true")),
    (
        "graph_timeout_seconds",
        "OTN_GRAPH_TIMEOUT_SECONDS",
        Some("20"),
    ),
    ("max_active_sends", "OTN_MAX_ACTIVE_SENDS", Some("100000")),
    ("max_page_actors", "OTN_MAX_PAGE_ACTORS", Some("1000")),
    ("max_watchers", "OTN_MAX_WATCHERS", Some("1000")),
    (
        "max_watchers_per_send",
        "OTN_MAX_WATCHERS_PER_SEND",
        Some("100"),
    ),
    ("instance_id", "OTN_INSTANCE_ID", None),
    ("lease_seconds", "OTN_LEASE_SECONDS", Some("10")),
];

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

/// Where a raw value came from, for error messages.
#[derive(Clone, Debug)]
enum Origin {
    Default,
    File(PathBuf, &'static str),
    Env(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "default"),
            Origin::File(path, key) => write!(f, "{key} in {}", path.display()),
            Origin::Env(var) => write!(f, "{var}"),
        }
    }
}

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
        let mut raw: BTreeMap<&'static str, (String, Origin)> = BTreeMap::new();
        for (key, _, default) in SETTINGS {
            if let Some(default) = default {
                raw.insert(key, (default.to_string(), Origin::Default));
            }
        }

        let file = config_file
            .map(Path::to_path_buf)
            .or_else(|| env.get(CONFIG_FILE_ENV).map(PathBuf::from));
        if let Some(path) = file {
            read_file_layer(&path, &mut raw)?;
        }
        for (key, var, _) in SETTINGS {
            if let Some(value) = env.get(*var) {
                raw.insert(key, (value.clone(), Origin::Env(var)));
            }
        }

        let mut problems = Vec::new();
        let mut field = |key: &str| raw.get(key).cloned();
        let settings = Parser {
            problems: &mut problems,
        }
        .settings(&mut field);
        match settings {
            Some(settings) if problems.is_empty() => Ok(settings),
            _ if problems.is_empty() => Err(ConfigError {
                problems: vec!["a required setting has no value and no default".into()],
            }),
            _ => Err(ConfigError { problems }),
        }
    }
}

fn read_file_layer(
    path: &Path,
    raw: &mut BTreeMap<&'static str, (String, Origin)>,
) -> Result<(), ConfigError> {
    let fail = |problem: String| ConfigError {
        problems: vec![problem],
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(format!("config file {}: {e}", path.display())))?;
    let table: toml::Table = text.parse().map_err(|e| {
        fail(format!(
            "config file {}: not valid TOML: {e}",
            path.display()
        ))
    })?;
    let mut problems = Vec::new();
    for (name, value) in table {
        let Some((key, _, _)) = SETTINGS.iter().find(|(key, _, _)| *key == name) else {
            let known: Vec<_> = SETTINGS.iter().map(|(key, _, _)| *key).collect();
            problems.push(format!(
                "config file {}: unknown setting '{name}' (known: {})",
                path.display(),
                known.join(", ")
            ));
            continue;
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                problems.push(format!(
                    "{key} in {}: expected a string or an integer, found {}",
                    path.display(),
                    other.type_str()
                ));
                continue;
            }
        };
        raw.insert(key, (text, Origin::File(path.to_path_buf(), key)));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

struct Parser<'a> {
    problems: &'a mut Vec<String>,
}

type Raw<'f> = dyn FnMut(&str) -> Option<(String, Origin)> + 'f;

impl Parser<'_> {
    fn settings(mut self, raw: &mut Raw<'_>) -> Option<Settings> {
        let database_url = self.parse(raw, "database_url", parse_database_url);
        let grpc_addr = self.parse(raw, "grpc_addr", parse_socket_addr);
        let http_addr = self.parse(raw, "http_addr", parse_socket_addr);
        let graph_url = self.parse(raw, "graph_url", parse_graph_url);
        let graph_version = self.parse(raw, "graph_version", parse_graph_version);
        let master_key = self.parse(raw, "master_key", parse_master_key);
        let api_keys = self
            .parse(raw, "api_keys", ApiKeys::parse)
            .unwrap_or_default();
        let log_format = self.parse(raw, "log_format", |s| match s {
            "pretty" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("'{other}' is not a log format (pretty or json)")),
        });
        let tls_cert = self.parse(raw, "tls_cert", parse_existing_file);
        let tls_key = self.parse(raw, "tls_key", parse_existing_file);
        let request_timeout = self.parse(raw, "request_timeout_seconds", |s| {
            parse_in_range(s, 1, 3600).map(Duration::from_secs)
        });
        let max_concurrent_requests = self.parse(raw, "max_concurrent_requests", |s| {
            parse_in_range(s, 1, 1_000_000).map(|n| n as usize)
        });

        let shutdown_grace = self.parse(raw, "shutdown_grace_seconds", |s| {
            parse_in_range(s, 1, 600).map(Duration::from_secs)
        });

        let app_rate_per_second = self.parse(raw, "app_rate_per_second", |s| {
            parse_in_range(s, 0, 1_000_000).map(|n| u32::try_from(n).ok().filter(|&n| n > 0))
        });
        let send_batch_max = self.parse(raw, "send_batch_max", |s| {
            parse_in_range(s, 1, crate::graph::MAX_BATCH_ITEMS as u64).map(|n| n as usize)
        });
        let enforce_page_rate = self.parse(raw, "enforce_page_rate", |s| match s {
            "true" | "1" | "on" => Ok(true),
            "false" | "0" | "off" => Ok(false),
            other => Err(format!("'{other}' is not a boolean (true or false)")),
        });
        let graph_timeout = self.parse(raw, "graph_timeout_seconds", |s| {
            parse_in_range(s, 1, 600).map(Duration::from_secs)
        });
        let max_active_sends = self.parse(raw, "max_active_sends", |s| {
            parse_in_range(s, 1, 10_000_000)
        });
        let max_page_actors = self.parse(raw, "max_page_actors", |s| {
            parse_in_range(s, 1, 100_000).map(|n| n as usize)
        });
        let max_watchers = self.parse(raw, "max_watchers", |s| {
            parse_in_range(s, 1, 1_000_000).map(|n| n as usize)
        });
        let max_watchers_per_send = self.parse(raw, "max_watchers_per_send", |s| {
            parse_in_range(s, 1, 1_000_000).map(|n| n as usize)
        });
        let instance_id = self.parse(raw, "instance_id", |s| {
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
        });
        let lease_ttl = self.parse(raw, "lease_seconds", |s| {
            parse_in_range(s, 2, 300).map(Duration::from_secs)
        });

        let tls = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                self.problems.push(
                    "OTN_TLS_CERT and OTN_TLS_KEY go together: set both to serve TLS, or neither"
                        .into(),
                );
                None
            }
        };

        if let (Some(DatabaseUrl::Postgres(_)), None) = (&database_url, &master_key) {
            self.problems.push(
                "OTN_MASTER_KEY is required with PostgreSQL: page secrets are encrypted with it, \
                 and a key generated on one machine would not be shared with the others \
                 (32 random bytes, standard base64; e.g. `openssl rand -base64 32`)"
                    .into(),
            );
        }
        if let Some(addr) = grpc_addr
            && api_keys.is_empty()
            && !addr.ip().is_loopback()
        {
            self.problems.push(format!(
                "OTN_GRPC_ADDR {addr} is not a loopback address and OTN_API_KEYS is not set: \
                 without API keys otnd answers anyone, so it only listens on loopback. \
                 Set OTN_API_KEYS (role:key,...) to listen on {addr}"
            ));
        }

        Some(Settings {
            database_url: database_url?,
            grpc_addr: grpc_addr?,
            http_addr: http_addr?,
            graph_url: graph_url?,
            graph_version: graph_version?,
            master_key,
            api_keys,
            log_format: log_format?,
            tls,
            request_timeout: request_timeout?,
            max_concurrent_requests: max_concurrent_requests?,
            shutdown_grace: shutdown_grace?,
            app_rate_per_second: app_rate_per_second?,
            send_batch_max: send_batch_max?,
            enforce_page_rate: enforce_page_rate?,
            graph_timeout: graph_timeout?,
            max_active_sends: max_active_sends?,
            max_page_actors: max_page_actors?,
            max_watchers: max_watchers?,
            max_watchers_per_send: max_watchers_per_send?,
            instance_id,
            lease_ttl: lease_ttl?,
        })
    }

    fn parse<T>(
        &mut self,
        raw: &mut Raw<'_>,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let (value, origin) = raw(key)?;
        match parse(value.trim()) {
            Ok(parsed) => Some(parsed),
            Err(why) => {
                self.problems.push(format!("{origin}: {why}"));
                None
            }
        }
    }
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
}
