//! The API contract's not-yet-built services answer UNIMPLEMENTED (never a crash or INTERNAL).

use otnd::pb::{CreateStoryRequest, GetSendRequest, StartSendRequest, WatchSendRequest};
use tonic::Code;

use crate::helpers::{TestDatabase, code_of, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_whose_issue_is_not_done_answer_unimplemented() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app(&db).await;
    let codes = [
        code_of(
            app.stories
                .create_story(CreateStoryRequest::default())
                .await,
        ),
        code_of(app.sends.start_send(StartSendRequest::default()).await),
        code_of(app.sends.get_send(GetSendRequest::default()).await),
        code_of(app.sends.watch_send(WatchSendRequest::default()).await),
    ];
    assert!(codes.iter().all(|c| *c == Code::Unimplemented), "{codes:?}");
}
