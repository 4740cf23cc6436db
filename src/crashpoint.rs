//! Crash points for the fault suite: `OTN_TEST_CRASH_AT=<point>[:<n>]` makes the process abort
//! (as a SIGKILL would stop it: no destructors, no drain) the n-th time (default 1st) execution
//! passes the named point. Unset, a crash point costs one load of an initialised `OnceLock`.
//!
//! Points:
//! - `in-flight-committed`: deliveries were committed `in_flight`, no Graph call made yet;
//! - `graph-answered`: Facebook answered a call, the answer is not recorded;
//! - `recording`: inside the transaction recording a batch of answers, part of it written.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering},
};

pub const ENV: &str = "OTN_TEST_CRASH_AT";
pub const POINTS: [&str; 3] = ["in-flight-committed", "graph-answered", "recording"];

struct Armed {
    point: String,
    at: u64,
    passed: AtomicU64,
}

fn armed() -> &'static Option<Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let raw = std::env::var(ENV).ok()?;
        let (point, at) = match raw.split_once(':') {
            Some((point, n)) => (point, n.parse().ok()?),
            None => (raw.as_str(), 1),
        };
        POINTS.contains(&point).then(|| Armed {
            point: point.to_string(),
            at,
            passed: AtomicU64::new(0),
        })
    })
}

/// Describes the armed crash point, if any, for the start-up log (and checks the setting).
pub fn describe() -> Result<Option<String>, String> {
    match (std::env::var(ENV).ok(), armed()) {
        (None, _) => Ok(None),
        (Some(_), Some(a)) => Ok(Some(format!("{} (pass {})", a.point, a.at))),
        (Some(raw), None) => Err(format!(
            "{ENV}='{raw}' is not <point>[:<n>] with a point among {POINTS:?}"
        )),
    }
}

/// Aborts the process the armed number of times execution passes `point`.
pub fn pass(point: &str) {
    if let Some(a) = armed()
        && a.point == point
        && a.passed.fetch_add(1, Ordering::SeqCst) + 1 == a.at
    {
        eprintln!("otnd: crash point '{point}' reached; aborting");
        std::process::abort();
    }
}
