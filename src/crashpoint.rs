//! Crash points for the fault suite, on the `fail` crate: `OTN_TEST_CRASH_AT=<point>[:<n>]`
//! makes the process abort (as a SIGKILL would stop it: no destructors, no drain) the n-th time
//! (default 1st) execution passes the named point.
//!
//! Only a build with the `failpoints` feature has them (the tests turn it on); in any other
//! build a crash point is an empty function, and an armed `OTN_TEST_CRASH_AT` is refused at
//! start rather than ignored.
//!
//! Points:
//! - `in-flight-committed`: deliveries were committed `in_flight`, no Graph call made yet;
//! - `graph-answered`: Facebook answered a call, the answer is not recorded;
//! - `recording`: inside the transaction recording a batch of answers, part of it written.

pub const ENV: &str = "OTN_TEST_CRASH_AT";
pub const POINTS: [&str; 3] = ["in-flight-committed", "graph-answered", "recording"];

/// `<point>[:<n>]`, checked: the point and on which pass (1 or more) it aborts.
fn parse(raw: &str) -> Result<(&str, u64), String> {
    let (point, at) = match raw.split_once(':') {
        Some((point, n)) => (point, n.parse::<u64>().ok().filter(|n| *n >= 1)),
        None => (raw, Some(1)),
    };
    match at {
        Some(at) if POINTS.contains(&point) => Ok((point, at)),
        _ => Err(format!(
            "{ENV}='{raw}' is not <point>[:<n>] with a point among {POINTS:?} and n at least 1"
        )),
    }
}

/// Arms the crash point `OTN_TEST_CRASH_AT` names, if any, and describes it for the start-up
/// log. Refused when the setting is malformed, or when this build has no crash points.
pub fn arm() -> Result<Option<String>, String> {
    let Ok(raw) = std::env::var(ENV) else {
        return Ok(None);
    };
    let (point, at) = parse(&raw)?;
    arm_point(point, at)?;
    Ok(Some(format!("{point} (pass {at})")))
}

/// Whether a crash point was armed: unarmed, a pass costs one load (the benchmarks' binary is
/// built with the feature too, as a dev-dependency turns it on).
#[cfg(feature = "failpoints")]
static ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(feature = "failpoints")]
fn arm_point(point: &str, at: u64) -> Result<(), String> {
    // Passes before the n-th go through untouched; the n-th takes the `return` action, whose
    // closure in `pass` aborts.
    let actions = match at {
        1 => "return".to_string(),
        n => format!("{}*off->return", n - 1),
    };
    fail::cfg(point, &actions)?;
    ARMED.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
fn arm_point(_: &str, _: u64) -> Result<(), String> {
    Err(format!(
        "{ENV} is set, but this otnd was built without crash points (the `failpoints` \
         feature, for tests only)"
    ))
}

/// Aborts the process the armed number of times execution passes `point`.
#[cfg(feature = "failpoints")]
pub fn pass(point: &str) {
    if !ARMED.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    fail::fail_point!(point, |_| {
        eprintln!("otnd: crash point '{point}' reached; aborting");
        std::process::abort()
    });
}

/// Nothing: this build has no crash points.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn pass(_: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_point_setting_names_a_known_point_and_a_pass_from_one() {
        assert_eq!(parse("recording"), Ok(("recording", 1)));
        assert_eq!(parse("graph-answered:3"), Ok(("graph-answered", 3)));
        for bad in [
            "",
            "nowhere",
            "recording:",
            "recording:0",
            "recording:x",
            "recording:-1",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(
                err.contains(ENV) && err.contains("in-flight-committed"),
                "{bad}: {err}"
            );
        }
    }
}
