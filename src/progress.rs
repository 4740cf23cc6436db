//! A send's progress on the terminal, fed by WatchSend: a live bar with the counts, rate, ETA and
//! last error when stderr is a terminal; otherwise (a log, a CI job) a plain line now and then,
//! so the output stays readable as text. Either way `finish` prints one summary line.

use std::{
    io::IsTerminal,
    sync::Mutex,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::pb::{SendProgress, SendState};

/// How often a plain progress line is printed when nothing else changes.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// The bar redraws at most this often; WatchSend sends about 10 changes a second.
const REDRAWS_PER_SECOND: u8 = 10;

pub struct SendBar {
    send_id: String,
    bar: ProgressBar,
    /// `Some` when stderr is not a terminal: when the last plain line was printed, and the
    /// state it showed (a change of state is printed at once).
    plain: Option<Mutex<Option<(Instant, i32)>>>,
    started: Instant,
}

impl SendBar {
    /// A bar for the send, drawn on stderr.
    pub fn new(send_id: &str) -> SendBar {
        let terminal = std::io::stderr().is_terminal();
        let bar = if terminal {
            ProgressBar::with_draw_target(
                Some(0),
                ProgressDrawTarget::stderr_with_hz(REDRAWS_PER_SECOND),
            )
        } else {
            ProgressBar::hidden()
        };
        let style = ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30.cyan/blue}] {pos}/{len} {wide_msg}",
        )
        .expect("the template is valid")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("send {send_id}"));
        if terminal {
            bar.enable_steady_tick(Duration::from_millis(250));
        }
        SendBar {
            send_id: send_id.to_string(),
            bar,
            plain: (!terminal).then(|| Mutex::new(None)),
            started: Instant::now(),
        }
    }

    pub fn update(&self, progress: &SendProgress) {
        self.bar.set_length(progress.total);
        self.bar.set_position(finished(progress));
        self.bar.set_message(live_message(progress));
        if let Some(plain) = &self.plain {
            let mut last = plain
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // The end is `finish`'s summary line; a plain line before it would say it twice.
            let ended = matches!(
                SendState::try_from(progress.state),
                Ok(SendState::Completed | SendState::Cancelled | SendState::Halted)
            );
            let due = !ended
                && match *last {
                    None => true,
                    Some((at, state)) => state != progress.state || at.elapsed() >= PLAIN_EVERY,
                };
            if due {
                *last = Some((Instant::now(), progress.state));
                eprintln!("send {}: {}", self.send_id, plain_line(progress));
            }
        }
    }

    /// Clears the bar, for a caller that says the outcome its own way (`otnd demo`).
    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }

    /// Clears the bar and prints the final line with the outcome.
    pub fn finish(&self, progress: &SendProgress) {
        self.bar.set_length(progress.total);
        self.bar.set_position(finished(progress));
        self.bar.finish_and_clear();
        eprintln!(
            "{}",
            summary_line(&self.send_id, progress, self.started.elapsed())
        );
    }
}

/// Deliveries that reached an end, whatever it was.
fn finished(p: &SendProgress) -> u64 {
    p.sent + p.failed + p.skipped + p.unknown
}

/// The state's short name, as otnctl prints it: `RUNNING`, `COMPLETED`.
pub fn state_name(state: i32) -> &'static str {
    SendState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SEND_STATE_")
                .trim_start_matches("UNSPECIFIED")
        })
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or("UNKNOWN_STATE")
}

fn counts(p: &SendProgress) -> String {
    format!(
        "sent {} · failed {} · skipped {} · unknown {}",
        p.sent, p.failed, p.skipped, p.unknown
    )
}

fn pace(p: &SendProgress) -> String {
    let eta = if finished(p) < p.total && p.eta_seconds > 0.0 {
        format!("ETA {}", duration(p.eta_seconds))
    } else {
        "ETA -".to_string()
    };
    format!("{:.0}/s · {eta}", p.rate_per_second)
}

fn live_message(p: &SendProgress) -> String {
    let mut message = format!("{} · {} · {}", state_name(p.state), counts(p), pace(p));
    if !p.last_error.is_empty() {
        message.push_str(" · last error: ");
        message.push_str(&one_line(&p.last_error));
    }
    message
}

fn plain_line(p: &SendProgress) -> String {
    format!(
        "{} {}/{} · {} · {}{}",
        state_name(p.state),
        finished(p),
        p.total,
        counts(p),
        pace(p),
        last_error_suffix(p)
    )
}

fn last_error_suffix(p: &SendProgress) -> String {
    if p.last_error.is_empty() {
        String::new()
    } else {
        format!(" · last error: {}", one_line(&p.last_error))
    }
}

/// The final line: the outcome, the counts, and for a send that did not complete, why.
pub fn summary_line(send_id: &str, p: &SendProgress, elapsed: Duration) -> String {
    let mut line = format!(
        "send {send_id}: {} · {}/{} finished · {} · in {}",
        state_name(p.state),
        finished(p),
        p.total,
        counts(p),
        duration(elapsed.as_secs_f64())
    );
    let state = SendState::try_from(p.state).unwrap_or(SendState::Unspecified);
    if matches!(state, SendState::Halted | SendState::Cancelled) {
        if p.last_error.is_empty() {
            line.push_str(" · reason: none recorded");
        } else {
            line.push_str(" · reason: ");
            line.push_str(&one_line(&p.last_error));
        }
    } else {
        line.push_str(&last_error_suffix(p));
    }
    line
}

/// A Facebook reason may span lines or hold escape sequences; the bar and the summary are one
/// line each, and nothing in them steers the terminal.
pub fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `4.2s`, `2m05s`, `1h02m`.
fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_string();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let whole = seconds.round() as u64;
    if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(state: SendState, last_error: &str) -> SendProgress {
        SendProgress {
            send_id: "s1".into(),
            state: state.into(),
            total: 10,
            sent: 7,
            failed: 1,
            skipped: 1,
            unknown: 1,
            rate_per_second: 250.0,
            last_error: last_error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_halted_or_cancelled_summary_names_the_reason_on_one_line() {
        let halted = progress(SendState::Halted, "(#190) Invalid\naccess\u{1b}[2J token");
        let line = summary_line("s1", &halted, Duration::from_millis(4200));
        assert_eq!(
            line,
            "send s1: HALTED · 10/10 finished · sent 7 · failed 1 · skipped 1 · unknown 1 · \
             in 4.2s · reason: (#190) Invalid access\\u{1b}[2J token"
        );
        let cancelled = progress(SendState::Cancelled, "");
        assert!(summary_line("s1", &cancelled, Duration::ZERO).ends_with("reason: none recorded"));
    }

    #[test]
    fn durations_read_as_a_person_would_say_them() {
        assert_eq!(duration(4.24), "4.2s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(3720.0), "1h02m");
        assert_eq!(duration(f64::NAN), "-");
    }

    #[test]
    fn state_names_drop_the_enum_prefix() {
        assert_eq!(state_name(SendState::Running.into()), "RUNNING");
        assert_eq!(state_name(0), "UNKNOWN_STATE");
        assert_eq!(state_name(99), "UNKNOWN_STATE");
    }
}
