//! Histories the model checker found broken, shrunk, kept as they were printed: each must now
//! keep the promise. (The fixes each also have a test of their own where a plain test could
//! say it; these replay the history itself.)

use super::{
    Backend, SHAPE_PAGES,
    history::{FaultSet, Shape, Step},
    run,
};

/// Runs `steps` on `backend` and fails with every broken rule.
async fn replay(backend: Backend, steps: &[Step]) {
    if backend == Backend::Postgres && crate::helpers::TestDatabase::postgres().await.is_none() {
        eprintln!("skipped: DATABASE_URL names no PostgreSQL server");
        return;
    }
    let shape = Shape {
        steps: steps.len(),
        pages: SHAPE_PAGES,
        fleet: backend == Backend::Postgres,
    };
    let broken = run(backend, 0, shape, steps).await;
    assert!(broken.is_empty(), "broken:\n- {}", broken.join("\n- "));
}

/// Seed 15923524938460171470 on PostgreSQL: a send still running, its deliveries pending, 90 s
/// after everything had settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_join_then_the_database_goes_away() {
    replay(
        Backend::Postgres,
        &[
            Step::CreateStory {
                page: 0,
                topic: 1,
                window: true,
                segment: None,
            },
            Step::StartSend { story: 0 },
            Step::Pause { send: 0 },
            Step::Join,
            Step::Join,
            Step::Faults(FaultSet::default()),
            Step::StartSend { story: 0 },
            Step::StartSend { story: 0 },
            Step::DatabaseAway { ms: 1100 },
        ],
    )
    .await;
}

/// Seed 6753207792766298916 on PostgreSQL: "after SIGTERM otnd exited with signal: 15" (the
/// handler was installed only once serving began; see `binary::a_sigterm_while_starting_is_a_clean_stop`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_just_after_a_restart() {
    replay(
        Backend::Postgres,
        &[
            Step::UpdateStory { story: 0 },
            Step::Wait { ms: 740 },
            Step::OptIns {
                page: 1,
                topic: 0,
                count: 31,
                expiring: false,
            },
            Step::DatabaseAway { ms: 1079 },
            Step::OptIns {
                page: 0,
                topic: 0,
                count: 114,
                expiring: true,
            },
            Step::Kill,
            Step::Term,
            Step::Wait { ms: 101 },
        ],
    )
    .await;
}

/// Seed 1025681561650078307 on SQLite: "user u5-26 of page 9101 was erased but has rows in
/// subscribers, optins" (erased before their opt-in's webhook arrived; see
/// `erasure::a_user_erased_before_their_opt_in_arrives_is_not_brought_in`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erased_while_their_opt_in_is_on_its_way() {
    replay(
        Backend::Sqlite,
        &[
            Step::OptIns {
                page: 0,
                topic: 1,
                count: 78,
                expiring: false,
            },
            Step::Erase { page: 0, user: 740 },
        ],
    )
    .await;
}
