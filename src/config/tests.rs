//! The configuration as a user writes it: defaults, file, environment, every problem at once.

use std::collections::BTreeSet;

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};

use super::{values::*, *};

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
    let readme = include_str!("../../README.md");
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

#[test]
fn cors_origins_are_named_origins_only() {
    let settings = load(&[(
        "OTN_CORS_ORIGINS",
        "https://console.example.com, http://127.0.0.1:3000",
    )])
    .unwrap();
    assert_eq!(
        settings.cors_origins,
        ["https://console.example.com", "http://127.0.0.1:3000"]
    );
    assert!(
        load(&[]).unwrap().cors_origins.is_empty(),
        "none by default"
    );
    for (raw, expected) in [
        ("*", "entry 1 '*' is not an origin"),
        ("https://a.example/", "scheme://host[:port] only"),
        ("https://a.example,https://b.example/path", "entry 2"),
        ("ftp://a.example", "scheme://host[:port] only"),
        ("", "entry 1 '' is not an origin"),
    ] {
        let text = problems(&[("OTN_CORS_ORIGINS", raw)]);
        assert!(text.contains("OTN_CORS_ORIGINS"), "{text}");
        assert!(text.contains(expected), "{raw:?}: {text}");
    }
}
