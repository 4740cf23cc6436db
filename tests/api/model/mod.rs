//! The model-based checker: random, seeded histories of API operations, users' webhooks,
//! sandbox faults, crashes and database outages against the real `otnd` binary (and on
//! PostgreSQL, other instances joining, leaving and dying), each left to settle with the faults
//! off and then judged against the whole promise (see `check`). A broken history is shrunk
//! (steps taken away while it still breaks) and reported as numbered steps with its seed.
//!
//! - `OTN_MODEL_CASES`: histories per backend (4 by default: CI's budget);
//! - `OTN_MODEL_STEPS`: steps per history (30), `OTN_MODEL_PAGES`: pages (2, at most 3);
//! - `OTN_MODEL_SEED`: the first history's seed (the rest follow it); random by default, and
//!   printed, so `OTN_MODEL_SEED=<seed> OTN_MODEL_CASES=1` runs a reported history again;
//! - `OTN_MODEL_SHRINK_SECONDS`: how long a failure may be shrunk (300).
//!
//! The generated steps repeat exactly from a seed; their timing against otnd's own does not,
//! which is the point: each run explores other interleavings.

mod check;
mod history;
mod regressions;
mod world;

use std::time::{Duration, Instant};

use history::{PAGES, Shape, Step, describe, generate};
use world::World;

use crate::support::TestDatabase;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Budget {
    cases: u64,
    steps: usize,
    pages: usize,
    seed: Option<u64>,
    shrink: Duration,
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

fn budget() -> Budget {
    Budget {
        cases: env_number("OTN_MODEL_CASES", 4),
        steps: env_number("OTN_MODEL_STEPS", 30),
        pages: env_number("OTN_MODEL_PAGES", SHAPE_PAGES).clamp(1, PAGES.len()),
        seed: std::env::var("OTN_MODEL_SEED")
            .ok()
            .map(|s| s.parse().expect("OTN_MODEL_SEED is a number")),
        shrink: Duration::from_secs(env_number("OTN_MODEL_SHRINK_SECONDS", 300)),
    }
}

/// Pages of a history unless `OTN_MODEL_PAGES` says otherwise.
const SHAPE_PAGES: usize = 2;

/// How long a settled history may take to end every send.
const SETTLE: Duration = Duration::from_secs(90);

/// Runs `steps` from a fresh start and judges them: the broken rules, or none.
async fn run(backend: Backend, seed: u64, shape: Shape, steps: &[Step]) -> Vec<String> {
    run_and_tell(backend, seed, shape, steps).await.0
}

/// [`run`], and a line of what the history did.
async fn run_and_tell(
    backend: Backend,
    seed: u64,
    shape: Shape,
    steps: &[Step],
) -> (Vec<String>, String) {
    let db = match backend {
        Backend::Sqlite => TestDatabase::sqlite(),
        Backend::Postgres => TestDatabase::postgres("otnd_test")
            .await
            .expect("a PostgreSQL database"),
    };
    let mut world = World::new(&db, shape.pages, seed, shape.fleet).await;
    for (index, step) in steps.iter().enumerate() {
        world.run(index, step).await;
    }
    world.settle(SETTLE).await;
    let mut broken = check::violations(&world, &PAGES[..shape.pages]).await;
    let told = check::summary(&world).await;
    world.stop();
    if !broken.is_empty() {
        // What the history was told, to read the broken rules by.
        let mut refusals: std::collections::BTreeMap<String, usize> = Default::default();
        for r in &world.observed.refusals {
            *refusals
                .entry(format!("{} {:?}: {}", r.rpc, r.code, r.message))
                .or_default() += 1;
        }
        for (refusal, n) in refusals {
            broken.push(format!("(not a rule) answered {n}x {refusal}"));
        }
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("model-{seed}-{}.log", world::now_ms()));
        if std::fs::write(
            &path,
            world.observed.logs.join("\n\n=== next instance ===\n\n"),
        )
        .is_ok()
        {
            broken.push(format!(
                "(not a rule) the instances' logs: {}",
                path.display()
            ));
        }
    }
    (broken, told)
}

/// The history with steps taken away while it still breaks a rule (delta debugging: halves,
/// then quarters, down to single steps), within `budget`.
async fn shrink(
    backend: Backend,
    seed: u64,
    shape: Shape,
    mut steps: Vec<Step>,
    mut broken: Vec<String>,
    budget: Duration,
) -> (Vec<Step>, Vec<String>, usize) {
    let deadline = Instant::now() + budget;
    let mut runs = 0;
    let mut chunk = steps.len().div_ceil(2);
    while chunk >= 1 && Instant::now() < deadline {
        let mut start = 0;
        while start < steps.len() && Instant::now() < deadline {
            let mut candidate = steps.clone();
            candidate.drain(start..(start + chunk).min(steps.len()));
            runs += 1;
            let again = run(backend, seed, shape, &candidate).await;
            if again.is_empty() {
                start += chunk;
            } else {
                steps = candidate;
                broken = again;
            }
        }
        if chunk == 1 {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    (steps, broken, runs)
}

/// What the histories held, for the summary line.
#[derive(Default)]
struct Tally {
    histories: u64,
    operations: u64,
    faults: u64,
    kills: u64,
}

impl Tally {
    fn add(&mut self, steps: &[Step]) {
        self.histories += 1;
        for step in steps {
            match step {
                Step::Kill | Step::KillOther => {
                    self.kills += 1;
                    self.faults += 1;
                }
                Step::Faults(_)
                | Step::Restrict { .. }
                | Step::BreakToken { .. }
                | Step::DatabaseAway { .. }
                | Step::Term
                | Step::Leave => self.faults += 1,
                Step::Wait { .. } | Step::FaultsOff | Step::Unrestrict => {}
                _ => self.operations += 1,
            }
        }
    }
}

async fn model(backend: Backend) {
    if backend == Backend::Postgres && TestDatabase::postgres("otnd_test").await.is_none() {
        eprintln!("skipped: DATABASE_URL names no PostgreSQL server");
        return;
    }
    let budget = budget();
    let shape = Shape {
        steps: budget.steps,
        pages: budget.pages,
        fleet: backend == Backend::Postgres,
    };
    let first = budget.seed.unwrap_or_else(rand::random);
    println!(
        "model on {backend:?}: {} histories of {} steps, first seed {first} \
         (again: OTN_MODEL_SEED=<seed> OTN_MODEL_CASES=1)",
        budget.cases, budget.steps
    );
    let started = Instant::now();
    let mut tally = Tally::default();
    for case in 0..budget.cases {
        let seed = first.wrapping_add(case);
        let steps = generate(seed, shape);
        println!("history {case}: seed {seed}");
        let began = Instant::now();
        let (broken, told) = run_and_tell(backend, seed, shape, &steps).await;
        tally.add(&steps);
        let mut this = Tally::default();
        this.add(&steps);
        println!(
            "history {case}: seed {seed}, {} in {:.1} s ({} operations, {} faults, {} kills): \
             {told}",
            if broken.is_empty() { "kept" } else { "BROKEN" },
            began.elapsed().as_secs_f64(),
            this.operations,
            this.faults,
            this.kills,
        );
        if !broken.is_empty() {
            let first_report = broken.join("\n- ");
            let (shrunk, still, runs) =
                shrink(backend, seed, shape, steps.clone(), broken, budget.shrink).await;
            panic!(
                "history of seed {seed} on {backend:?} broke the promise:\n- {first_report}\n\n\
                 shrunk in {runs} runs from {} to {} steps, which break:\n- {}\n\n{}\n\n\
                 again: OTN_MODEL_SEED={seed} OTN_MODEL_CASES=1 OTN_MODEL_STEPS={} \
                 OTN_MODEL_PAGES={} cargo test --test api model::",
                steps.len(),
                shrunk.len(),
                still.join("\n- "),
                describe(&shrunk),
                budget.steps,
                budget.pages,
            );
        }
    }
    println!(
        "model on {backend:?}: {} histories kept the promise ({} operations, {} faults of which \
         {} kills) in {:.0} s",
        tally.histories,
        tally.operations,
        tally.faults,
        tally.kills,
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_keep_the_promise_on_sqlite() {
    model(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_keep_the_promise_on_postgres() {
    model(Backend::Postgres).await;
}
