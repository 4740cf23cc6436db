//! What each setting is and how its text is checked: the values configuration yields, whatever
//! layer (default, file, environment) they come from. Messages say what was expected; the
//! caller (see `super::read`) names where the text came from.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use url::Url;

use crate::crypto::MasterKey;

/// Shortest API key accepted: keys are bearer credentials, a short one can be guessed.
const MIN_API_KEY_LEN: usize = 16;

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

pub(super) fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "pretty" => Ok(LogFormat::Pretty),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("'{other}' is not a log format (pretty or json)")),
    }
}

pub(super) fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "on" => Ok(true),
        "false" | "0" | "off" => Ok(false),
        other => Err(format!("'{other}' is not a boolean (true or false)")),
    }
}

pub(super) fn parse_instance_id(s: &str) -> Result<String, String> {
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

pub(super) fn seconds(min: u64, max: u64) -> impl Fn(&str) -> Result<Duration, String> {
    move |s| parse_in_range(s, min, max).map(Duration::from_secs)
}

/// Hours, whole or decimal (`0.5`), from 0 up to a year: a cooldown of 0 holds nothing back.
pub(super) fn parse_hours(s: &str) -> Result<Duration, String> {
    let hours: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of hours"))?;
    if !(0.0..=8760.0).contains(&hours) {
        return Err(format!("must be between 0 and 8760 hours, got {s}"));
    }
    Ok(Duration::from_secs_f64(hours * 3600.0))
}

pub(super) fn count(min: u64, max: u64) -> impl Fn(&str) -> Result<usize, String> {
    move |s| parse_in_range(s, min, max).map(|n| n as usize)
}

pub(super) fn parse_database_url(s: &str) -> Result<DatabaseUrl, String> {
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

pub(super) fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("'{s}' is not a socket address (expected ip:port, e.g. 127.0.0.1:50051)")
    })
}

pub(super) fn parse_graph_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("'{s}' is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("'{s}' is not an http(s) URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("'{s}' must not carry a query or fragment"));
    }
    Ok(url)
}

pub(super) fn parse_graph_version(s: &str) -> Result<String, String> {
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

pub(super) fn parse_master_key(s: &str) -> Result<MasterKey, String> {
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

pub(super) fn parse_existing_file(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("'{s}' is not a readable file"))
    }
}

pub(super) fn parse_in_range(s: &str, min: u64, max: u64) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a whole number from {min} to {max}")),
    }
}

/// A comma-separated list of browser origins, each `http(s)://host[:port]` as a browser sends it
/// in `Origin` (no path, no trailing slash). `*` is refused: an origin allowed to call with an
/// operator's key should be named.
pub(super) fn parse_cors_origins(s: &str) -> Result<Vec<String>, String> {
    let mut origins = Vec::new();
    for (index, entry) in s.split(',').enumerate() {
        let entry = entry.trim();
        let position = index + 1;
        let url = Url::parse(entry).map_err(|_| {
            format!(
                "entry {position} '{entry}' is not an origin (e.g. https://console.example.com)"
            )
        })?;
        let origin = url.origin().ascii_serialization();
        if !matches!(url.scheme(), "http" | "https") || origin != entry {
            return Err(format!(
                "entry {position} '{entry}' is not an origin: scheme://host[:port] only, \
                 as a browser sends it (e.g. https://console.example.com)"
            ));
        }
        origins.push(origin);
    }
    Ok(origins)
}
