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
