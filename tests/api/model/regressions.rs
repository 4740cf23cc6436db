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
    if backend == Backend::Postgres
        && crate::support::TestDatabase::postgres("otnd_test")
            .await
            .is_none()
    {
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

/// Seed 11777471088946264373 on PostgreSQL: "user w7-6 of page 9102 was erased but has rows in
/// deliveries", and got the story 340 ms after the erasure returned. A step materialising a
/// window send read the user before the erasure committed and inserted their delivery after
/// it; the erasure now locks the page's unfinished sends first, as a step does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_while_a_window_send_materialises() {
    let story = |page, topic, window| Step::CreateStory {
        page,
        topic,
        window,
        segment: None,
    };
    replay(
        Backend::Postgres,
        &[
            story(0, 1, true),
            story(1, 1, true),
            Step::Wait { ms: 418 },
            Step::Interactions { page: 1, count: 13 },
            Step::Tag {
                page: 1,
                tag: 2,
                users: 41,
                remove: false,
            },
            Step::Wait { ms: 88 },
            Step::Wait { ms: 449 },
            Step::StartSend { story: 0 },
            Step::StartSend { story: 1 },
            Step::Wait { ms: 81 },
            Step::Resume { send: 1 },
            Step::StartSend { story: 1 },
            Step::Erase { page: 1, user: 658 },
            Step::Erase { page: 1, user: 745 },
            Step::Resume { send: 1 },
            Step::Wait { ms: 489 },
            story(0, 0, false),
            Step::OptIns {
                page: 1,
                topic: 1,
                count: 95,
                expiring: false,
            },
            story(0, 0, true),
            Step::Interactions { page: 1, count: 11 },
            Step::Wait { ms: 118 },
            Step::Wait { ms: 567 },
            Step::Faults(FaultSet {
                accept_then_fail_rate: 0.02,
                ..FaultSet::default()
            }),
        ],
    )
    .await;
}
