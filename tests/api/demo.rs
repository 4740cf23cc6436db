//! `otnd demo`, the real binary: the whole job to a completed send, the console's port and the
//! gRPC port answering meanwhile; Ctrl-C or SIGTERM at any moment exits 0 and leaves only the
//! SQLite file; an existing database file and bad flags are refused with one line, exit code 2.

use std::{path::Path, time::Duration};

use otnd::pb::{GetSendRequest, SendState, send_service_client::SendServiceClient};
use tonic::transport::Channel;

use crate::binary::{Served, otnd};

/// Generous: a debug build on a busy machine, two servers starting, a migration.
const COMPLETES_WITHIN: Duration = Duration::from_secs(120);
const EXITS_WITHIN: Duration = Duration::from_secs(30);

/// `otnd demo` in `dir`, on a database there and ports of its own.
fn start_demo(dir: &Path, users: &str, rate: &str) -> Served {
    let database = dir.join("demo.db");
    let args = [
        "demo",
        "--database",
        database.to_str().unwrap(),
        "--users",
        users,
        "--rate",
        rate,
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ];
    Served::spawn(otnd(dir, &args, &[]))
}

/// The last word of a printed line (an address, a URL).
fn last_word(line: &str) -> String {
    line.split_whitespace().last().unwrap().to_string()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn the_demo_completes_its_send_serves_on_and_leaves_only_its_database_after_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = start_demo(dir.path(), "300", "300");
    let console = last_word(&demo.wait_for_line("console:", COMPLETES_WITHIN));
    let grpc = last_word(&demo.wait_for_line("gRPC:", COMPLETES_WITHIN));
    let completed = demo.wait_for_line(" completed: ", COMPLETES_WITHIN);
    assert!(
        completed.contains("300 sent, 0 failed, 0 skipped, 0 unknown of 300"),
        "{completed}"
    );
    let send_id = completed.split_whitespace().nth(1).unwrap().to_string();
    demo.wait_for_line("Ctrl-C to stop", COMPLETES_WITHIN);
    let output = demo.log();
    assert!(
        output.contains("--bin otnctl -- --addr") && output.contains("buf curl"),
        "{output}"
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let healthz = otnd::graph::http_client()
            .get(format!("{console}healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(healthz.status(), 200, "GET {console}healthz");
        let channel = Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let send = SendServiceClient::new(channel)
            .get_send(GetSendRequest {
                send_id: send_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .send
            .unwrap();
        assert_eq!(send.state(), SendState::Completed);
        let progress = send.progress.unwrap();
        assert_eq!(
            (
                progress.total,
                progress.sent,
                progress.failed,
                progress.unknown
            ),
            (300, 300, 0, 0),
            "{progress:?}"
        );
    });
    drop(runtime);

    demo.signal("INT");
    let status = demo.wait_exit(EXITS_WITHIN);
    assert_eq!(status.code(), Some(0), "{}", demo.log());
    assert_eq!(files_in(dir.path()), ["demo.db"], "{}", demo.log());
}

#[test]
fn ctrl_c_while_users_opt_in_exits_0_and_leaves_only_the_database() {
    let dir = tempfile::tempdir().unwrap();
    // Many users: their opt-ins are still arriving when the signal comes.
    let mut demo = start_demo(dir.path(), "100000", "300");
    demo.wait_for_line("users opt in", COMPLETES_WITHIN);
    demo.signal("INT");
    let status = demo.wait_exit(EXITS_WITHIN);
    assert_eq!(status.code(), Some(0), "{}", demo.log());
    let output = demo.log();
    assert!(
        !output.contains("started"),
        "the send never began: {output}"
    );
    assert!(output.contains("left behind"), "{output}");
    assert_eq!(files_in(dir.path()), ["demo.db"], "{output}");
}

#[test]
fn sigterm_while_the_send_runs_exits_0_and_leaves_only_the_database() {
    let dir = tempfile::tempdir().unwrap();
    // 2,000 users at 50 a second: the send runs for 40 seconds.
    let mut demo = start_demo(dir.path(), "2000", "50");
    demo.wait_for_line(" started, ", COMPLETES_WITHIN);
    demo.signal("TERM");
    let status = demo.wait_exit(EXITS_WITHIN);
    assert_eq!(status.code(), Some(0), "{}", demo.log());
    let output = demo.log();
    assert!(
        !output.contains(" completed: "),
        "stopped mid-send: {output}"
    );
    assert_eq!(files_in(dir.path()), ["demo.db"], "{output}");
}

#[test]
fn an_existing_database_file_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("demo.db"), "an earlier demo").unwrap();
    let output = otnd(dir.path(), &["demo", "--database", "demo.db"], &[])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("--database demo.db already exists")
            && stderr.contains("remove it or name another file"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("demo.db")).unwrap(),
        "an earlier demo"
    );
    assert_eq!(files_in(dir.path()), ["demo.db"]);
}

#[test]
fn a_demo_that_cannot_listen_says_where_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = otnd(
        dir.path(),
        &["demo", "--grpc-addr", &addr, "--http-addr", "127.0.0.1:0"],
        &[],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("Failed to listen for gRPC on {addr}")),
        "{stderr}"
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
}

#[test]
fn bad_flags_are_refused_with_one_line_naming_the_flag() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--users", "0"], &["--users", "1..=100000"]),
        (&["--users", "100001"], &["--users", "1..=100000"]),
        (&["--users", "many"], &["--users", "many"]),
        (&["--rate", "0"], &["--rate", "from 1 to 300"]),
        (&["--rate", "1000"], &["--rate", "from 1 to 300"]),
        (&["--grpc-addr", "localhost"], &["--grpc-addr"]),
        (
            &["--grpc-addr", "0.0.0.0:50051"],
            &["--grpc-addr", "loopback"],
        ),
        (&["--http-addr", "8080"], &["--http-addr"]),
        (
            &["--database", "no/such/dir/x.db"],
            &["--database", "does not exist"],
        ),
        (&["--frobnicate"], &["--frobnicate"]),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (args, expected) in cases {
        let mut all = vec!["demo"];
        all.extend_from_slice(args);
        let output = otnd(dir.path(), &all, &[]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        for needle in *expected {
            assert!(stderr.contains(needle), "{args:?}: {needle:?} in {stderr}");
        }
    }
    assert!(files_in(dir.path()).is_empty(), "nothing was created");
}
