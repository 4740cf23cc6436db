//! The API contract's RPCs whose issue is not done yet (the send engine's) answer UNIMPLEMENTED,
//! never a crash or INTERNAL.

use otnd::pb::{
    CancelSendRequest, GetSendRequest, ListDeliveriesRequest, ListSendsRequest, PauseSendRequest,
    ResumeSendRequest, WatchSendRequest,
};
use tonic::Code;

use crate::helpers::{TestDatabase, code_of, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_engine_rpcs_answer_unimplemented_until_it_lands() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app(&db).await;
    let sends = &mut app.sends;
    let codes = [
        code_of(sends.get_send(GetSendRequest::default()).await),
        code_of(sends.list_sends(ListSendsRequest::default()).await),
        code_of(sends.pause_send(PauseSendRequest::default()).await),
        code_of(sends.resume_send(ResumeSendRequest::default()).await),
        code_of(sends.cancel_send(CancelSendRequest::default()).await),
        code_of(sends.watch_send(WatchSendRequest::default()).await),
        code_of(
            sends
                .list_deliveries(ListDeliveriesRequest::default())
                .await,
        ),
    ];
    assert!(codes.iter().all(|c| *c == Code::Unimplemented), "{codes:?}");
}
