//! Every SendService RPC refuses an empty request with INVALID_ARGUMENT naming the field (never a
//! crash, INTERNAL or UNIMPLEMENTED), and an unknown send with NOT_FOUND.

use otnd::pb::{
    CancelSendRequest, GetSendRequest, ListDeliveriesRequest, ListSendsRequest, PauseSendRequest,
    ResumeSendRequest, StartSendRequest, WatchSendRequest,
};
use tonic::Code;

use crate::support::{TestDatabase, code_of, spawn_app, violated_fields};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rpcs_name_the_missing_field_and_an_unknown_send() {
    let db = TestDatabase::sqlite();
    let mut app = spawn_app(&db).await;
    let sends = &mut app.sends;
    let empty = [
        (
            sends
                .start_send(StartSendRequest::default())
                .await
                .map(|_| ())
                .unwrap_err(),
            vec!["story_id", "request_id"],
        ),
        (
            sends.get_send(GetSendRequest::default()).await.unwrap_err(),
            vec!["send_id"],
        ),
        (
            sends
                .list_sends(ListSendsRequest::default())
                .await
                .unwrap_err(),
            vec!["page_id"],
        ),
        (
            sends
                .pause_send(PauseSendRequest::default())
                .await
                .unwrap_err(),
            vec!["send_id"],
        ),
        (
            sends
                .resume_send(ResumeSendRequest::default())
                .await
                .unwrap_err(),
            vec!["send_id"],
        ),
        (
            sends
                .cancel_send(CancelSendRequest::default())
                .await
                .unwrap_err(),
            vec!["send_id"],
        ),
        (
            sends
                .watch_send(WatchSendRequest::default())
                .await
                .map(|_| ())
                .unwrap_err(),
            vec!["send_id"],
        ),
        (
            sends
                .list_deliveries(ListDeliveriesRequest::default())
                .await
                .unwrap_err(),
            vec!["send_id"],
        ),
    ];
    for (status, fields) in empty {
        assert_eq!(violated_fields(&status), fields, "{status:?}");
    }

    let missing = [
        code_of(
            sends
                .get_send(GetSendRequest {
                    send_id: "nope".into(),
                })
                .await,
        ),
        code_of(
            sends
                .cancel_send(CancelSendRequest {
                    send_id: "nope".into(),
                })
                .await,
        ),
        code_of(
            sends
                .list_deliveries(ListDeliveriesRequest {
                    send_id: "nope".into(),
                    ..Default::default()
                })
                .await,
        ),
    ];
    assert!(missing.iter().all(|c| *c == Code::NotFound), "{missing:?}");
    let bad_state = sends
        .list_deliveries(ListDeliveriesRequest {
            send_id: "nope".into(),
            state: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad_state), ["state"]);
}
