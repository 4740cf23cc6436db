//! Histories: what a platform, its users, Facebook and the machine do to otnd, as a list of
//! steps generated from a seed. Steps name what they act on by index (the 3rd send, the 2nd
//! story of a page); at execution an index is taken modulo what exists then, so a history with
//! steps removed (shrinking) still means something.

use std::fmt;

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

/// Pages of every history, and the topics their users opt in to.
pub(crate) const PAGES: [&str; 3] = ["9101", "9102", "9103"];
pub(crate) const TOPICS: [&str; 2] = ["Doors open", "Spring sale"];
/// Tags the steps put on users and build segments from.
pub(crate) const TAGS: [&str; 3] = ["vip", "churned", "beta"];

/// Sandbox faults switched on by one step. Every share is of the Graph calls made while it
/// holds; what is not named is off.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FaultSet {
    pub(crate) latency_ms: u64,
    pub(crate) error_rate: f64,
    pub(crate) timeout_rate: f64,
    pub(crate) reset_rate: f64,
    pub(crate) accept_then_fail_rate: f64,
    pub(crate) throttle_rate: f64,
}

impl fmt::Display for FaultSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.latency_ms > 0 {
            parts.push(format!("latency {} ms", self.latency_ms));
        }
        for (name, rate) in [
            ("5xx", self.error_rate),
            ("timeouts", self.timeout_rate),
            ("resets", self.reset_rate),
            ("accept-then-fail", self.accept_then_fail_rate),
            ("throttled", self.throttle_rate),
        ] {
            if rate > 0.0 {
                parts.push(format!("{name} {:.0}%", rate * 100.0));
            }
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        f.write_str(&parts.join(", "))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    /// CreateStory on a page and topic, for its opt-ins, with window users or not, aimed at one
    /// of the page's segments or not.
    CreateStory {
        page: usize,
        topic: usize,
        window: bool,
        segment: Option<usize>,
    },
    /// A story's content made new (UpdateStory), reviewed (PreviewStory), then StartSend with a
    /// new request id: every send's message differs, so the sandbox's ledger tells sends apart.
    StartSend {
        story: usize,
    },
    /// StartSend again with a request id used before: the same send comes back.
    RepeatStart {
        send: usize,
    },
    /// UpdateStory alone: the review is cleared until the next StartSend reviews it again.
    UpdateStory {
        story: usize,
    },
    PreviewStory {
        story: usize,
    },
    Pause {
        send: usize,
    },
    Resume {
        send: usize,
    },
    Cancel {
        send: usize,
    },
    /// UpdatePage's send rate.
    SetRate {
        page: usize,
        rate: u32,
    },
    /// UpdatePage with an access token Facebook refuses (190): the page's sends halt.
    BreakToken {
        page: usize,
    },
    /// UpdatePage with the right access token again.
    FixToken {
        page: usize,
    },
    /// DeleteSubscriber of one of the page's users.
    Erase {
        page: usize,
        user: usize,
    },
    /// TagSubscribers: the tag added to `users` of the page's users (or removed, `remove`).
    Tag {
        page: usize,
        tag: usize,
        users: usize,
        remove: bool,
    },
    /// CreateSegment: everyone with the tag, or everyone without it.
    CreateSegment {
        page: usize,
        tag: usize,
        without: bool,
    },
    /// New users opt in through the sandbox (signed webhooks, 100 events a POST); `expiring`:
    /// tokens that expire 70 s after they are issued, so they fall out of eligibility mid-history.
    OptIns {
        page: usize,
        topic: usize,
        count: u64,
        expiring: bool,
    },
    /// Users write to the page (signed webhooks): inside the 24-hour window.
    Interactions {
        page: usize,
        count: u64,
    },
    /// An opt-in webhook redelivered (same token, an older timestamp), as Facebook redelivers.
    Redeliver {
        page: usize,
        user: usize,
    },
    /// A read receipt for a user, timestamped a minute ago (out of order).
    LateRead {
        page: usize,
        user: usize,
    },
    Faults(FaultSet),
    FaultsOff,
    /// The page answered 10/1893063 (temporarily restricted), until `Unrestrict`.
    Restrict {
        page: usize,
    },
    Unrestrict,
    /// SIGKILL of the first instance, then a restart on the same database.
    Kill,
    /// SIGTERM of the first instance (it drains), then a restart.
    Term,
    /// The database out of reach for `ms` (PostgreSQL: every connection cut through a proxy;
    /// SQLite: another process holds the write lock).
    DatabaseAway {
        ms: u64,
    },
    Wait {
        ms: u64,
    },
    /// PostgreSQL: another instance joins the fleet.
    Join,
    /// PostgreSQL: the newest other instance leaves (SIGTERM).
    Leave,
    /// PostgreSQL: the newest other instance is killed (SIGKILL).
    KillOther,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::CreateStory {
                page,
                topic,
                window,
                segment,
            } => {
                write!(f, "CreateStory on page #{page}, topic #{topic}")?;
                if *window {
                    write!(f, ", window users too")?;
                }
                if let Some(segment) = segment {
                    write!(f, ", segment #{segment}")?;
                }
                Ok(())
            }
            Step::StartSend { story } => {
                write!(f, "UpdateStory, PreviewStory, StartSend of story #{story}")
            }
            Step::RepeatStart { send } => {
                write!(f, "StartSend again with send #{send}'s request id")
            }
            Step::UpdateStory { story } => write!(f, "UpdateStory #{story}"),
            Step::PreviewStory { story } => write!(f, "PreviewStory #{story}"),
            Step::Pause { send } => write!(f, "PauseSend #{send}"),
            Step::Resume { send } => write!(f, "ResumeSend #{send}"),
            Step::Cancel { send } => write!(f, "CancelSend #{send}"),
            Step::SetRate { page, rate } => write!(f, "UpdatePage #{page}: {rate}/s"),
            Step::BreakToken { page } => write!(f, "UpdatePage #{page}: a refused access token"),
            Step::FixToken { page } => write!(f, "UpdatePage #{page}: the right access token"),
            Step::Erase { page, user } => {
                write!(f, "DeleteSubscriber user #{user} of page #{page}")
            }
            Step::Tag {
                page,
                tag,
                users,
                remove,
            } => write!(
                f,
                "TagSubscribers page #{page}: {} {:?} {} {users} users",
                if *remove { "remove" } else { "add" },
                TAGS[tag % TAGS.len()],
                if *remove { "from" } else { "to" },
            ),
            Step::CreateSegment { page, tag, without } => write!(
                f,
                "CreateSegment page #{page}: {} {:?}",
                if *without { "without" } else { "with" },
                TAGS[tag % TAGS.len()]
            ),
            Step::OptIns {
                page,
                topic,
                count,
                expiring,
            } => write!(
                f,
                "{count} users of page #{page} opt in to topic #{topic}{}",
                if *expiring {
                    ", tokens expiring in 70 s"
                } else {
                    ""
                }
            ),
            Step::Interactions { page, count } => {
                write!(f, "{count} users write to page #{page}")
            }
            Step::Redeliver { page, user } => {
                write!(
                    f,
                    "webhook: user #{user} of page #{page}'s opt-in redelivered"
                )
            }
            Step::LateRead { page, user } => {
                write!(
                    f,
                    "webhook: a late read receipt of user #{user} of page #{page}"
                )
            }
            Step::Faults(faults) => write!(f, "sandbox faults: {faults}"),
            Step::FaultsOff => write!(f, "sandbox faults off"),
            Step::Restrict { page } => write!(f, "sandbox: page #{page} restricted"),
            Step::Unrestrict => write!(f, "sandbox: no page restricted"),
            Step::Kill => write!(f, "SIGKILL otnd, restart it"),
            Step::Term => write!(f, "SIGTERM otnd, restart it"),
            Step::DatabaseAway { ms } => write!(f, "the database away for {ms} ms"),
            Step::Wait { ms } => write!(f, "wait {ms} ms"),
            Step::Join => write!(f, "another instance joins"),
            Step::Leave => write!(f, "the newest other instance leaves (SIGTERM)"),
            Step::KillOther => write!(f, "the newest other instance is killed (SIGKILL)"),
        }
    }
}

/// A history as numbered lines, for a failure's report.
pub(crate) fn describe(steps: &[Step]) -> String {
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| format!("  {i:>3}. {s}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a history may use.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) steps: usize,
    pub(crate) pages: usize,
    /// A fleet: PostgreSQL only.
    pub(crate) fleet: bool,
}

/// The history of `seed`: the same seed gives the same steps.
pub(crate) fn generate(seed: u64, shape: Shape) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let pages = shape.pages;
    let mut steps = Vec::with_capacity(shape.steps);
    // Sends need stories: begin with one story per page.
    for page in 0..pages {
        steps.push(Step::CreateStory {
            page,
            topic: rng.gen_range(0..TOPICS.len()),
            window: rng.gen_bool(0.5),
            segment: None,
        });
    }
    let mut stories = pages;
    let mut segments = 0usize;
    let mut sends = 0usize;
    while steps.len() < shape.steps {
        let page = rng.gen_range(0..pages);
        let roll = rng.gen_range(0..100u32);
        let step = match roll {
            0..=17 => {
                sends += 1;
                Step::StartSend {
                    story: rng.gen_range(0..stories),
                }
            }
            18..=21 => {
                stories += 1;
                Step::CreateStory {
                    page,
                    topic: rng.gen_range(0..TOPICS.len()),
                    window: rng.gen_bool(0.4),
                    segment: (segments > 0 && rng.gen_bool(0.5))
                        .then(|| rng.gen_range(0..segments)),
                }
            }
            22..=23 => Step::UpdateStory {
                story: rng.gen_range(0..stories),
            },
            24 => Step::PreviewStory {
                story: rng.gen_range(0..stories),
            },
            25..=26 if sends > 0 => Step::RepeatStart {
                send: rng.gen_range(0..sends),
            },
            27..=30 if sends > 0 => Step::Pause {
                send: rng.gen_range(0..sends),
            },
            31..=34 if sends > 0 => Step::Resume {
                send: rng.gen_range(0..sends),
            },
            35..=37 if sends > 0 => Step::Cancel {
                send: rng.gen_range(0..sends),
            },
            38..=39 => Step::SetRate {
                page,
                rate: *[20u32, 100, 300, 1000].choose(&mut rng).unwrap(),
            },
            40 => Step::BreakToken { page },
            41..=42 => Step::FixToken { page },
            43..=44 => Step::Erase {
                page,
                user: rng.gen_range(0..1000),
            },
            45..=46 => Step::Tag {
                page,
                tag: rng.gen_range(0..TAGS.len()),
                users: rng.gen_range(1..=150),
                remove: rng.gen_bool(0.25),
            },
            47 => {
                segments += 1;
                Step::CreateSegment {
                    page,
                    tag: rng.gen_range(0..TAGS.len()),
                    without: rng.gen_bool(0.5),
                }
            }
            48..=51 => Step::OptIns {
                page,
                topic: rng.gen_range(0..TOPICS.len()),
                count: rng.gen_range(1..=120),
                expiring: rng.gen_bool(0.2),
            },
            52..=53 => Step::Interactions {
                page,
                count: rng.gen_range(1..=15),
            },
            54..=55 => Step::Redeliver {
                page,
                user: rng.gen_range(0..1000),
            },
            56 => Step::LateRead {
                page,
                user: rng.gen_range(0..1000),
            },
            57..=63 => Step::Faults(fault_set(&mut rng)),
            64..=66 => Step::FaultsOff,
            67 => Step::Restrict { page },
            68 => Step::Unrestrict,
            69..=71 => Step::Kill,
            72 => Step::Term,
            73..=74 => Step::DatabaseAway {
                ms: rng.gen_range(100..=1500),
            },
            75..=76 if shape.fleet => Step::Join,
            77 if shape.fleet => Step::Leave,
            78 if shape.fleet => Step::KillOther,
            _ => Step::Wait {
                ms: rng.gen_range(20..=800),
            },
        };
        steps.push(step);
    }
    steps
}

fn fault_set(rng: &mut StdRng) -> FaultSet {
    let mut faults = FaultSet {
        latency_ms: *[0u64, 0, 20, 100, 300].choose(rng).unwrap(),
        ..FaultSet::default()
    };
    // One or two kinds at once, each on a share of the calls.
    for _ in 0..rng.gen_range(1..=2) {
        let rate = *[0.05, 0.1, 0.3, 0.6].choose(rng).unwrap();
        match rng.gen_range(0..5) {
            0 => faults.error_rate = rate,
            1 => faults.timeout_rate = rate / 3.0,
            2 => faults.reset_rate = rate / 3.0,
            3 => faults.accept_then_fail_rate = rate / 3.0,
            _ => faults.throttle_rate = rate,
        }
    }
    // The sandbox takes shares that add up to at most 1.
    let total = faults.error_rate
        + faults.timeout_rate
        + faults.reset_rate
        + faults.accept_then_fail_rate
        + faults.throttle_rate;
    if total > 0.9 {
        let scale = 0.9 / total;
        faults.error_rate *= scale;
        faults.timeout_rate *= scale;
        faults.reset_rate *= scale;
        faults.accept_then_fail_rate *= scale;
        faults.throttle_rate *= scale;
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_history() {
        let shape = Shape {
            steps: 60,
            pages: 3,
            fleet: true,
        };
        assert_eq!(generate(7, shape), generate(7, shape));
        assert_ne!(generate(7, shape), generate(8, shape));
        assert_eq!(generate(7, shape).len(), 60);
    }
}
