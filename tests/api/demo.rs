//! `otnd demo`, the real binary: the whole job to a completed send, the console's port and the
//! gRPC port answering meanwhile; Ctrl-C or SIGTERM at any moment exits 0 and leaves only the
//! SQLite file; an existing database file and bad flags are refused with one line, exit code 2.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use otnd::pb::{GetSendRequest, SendState, send_service_client::SendServiceClient};
use tonic::transport::Channel;

use crate::binary::otnd;

/// Generous: a debug build on a busy machine, two servers starting, a migration.
const COMPLETES_WITHIN: Duration = Duration::from_secs(120);
const EXITS_WITHIN: Duration = Duration::from_secs(30);

/// A running `otnd demo` whose stdout is collected line by line.
struct Demo {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: mpsc::Receiver<()>,
}

impl Demo {
    fn start(dir: &Path, users: &str, rate: &str) -> Self {
        let database = dir.join("demo.db");
        let database = database.to_str().unwrap();
        let args = [
            "demo",
            "--database",
            database,
            "--users",
            users,
            "--rate",
            rate,
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ];
        let mut child = otnd(dir, &args, &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, new_line) = mpsc::channel();
        let echo = std::env::var_os("OTN_TEST_ECHO").is_some();
        for (stream, pipe) in [
            (
                "out",
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            ),
            ("err", Box::new(child.stderr.take().unwrap())),
        ] {
            let (sink, tx) = (lines.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[demo {stream}] {line}");
                    }
                    sink.lock().unwrap().push(format!("{stream}: {line}"));
                    let _ = tx.send(());
                }
            });
        }
        Demo {
            child,
            lines,
            new_line,
        }
    }

    /// Waits for a line of stdout containing `needle`; the line, without the stream's tag.
    fn wait_for_line(&self, needle: &str, deadline: Duration) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with("out: ") && l.contains(needle))
            {
                return line["out: ".len()..].to_string();
            }
            let left = deadline
                .checked_sub(started.elapsed())
                .unwrap_or_else(|| panic!("no line with {needle:?}:\n{}", self.output()));
            let _ = self.new_line.recv_timeout(left);
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Sends a signal (`INT`, `TERM`) and returns at once.
    fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{name}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < deadline,
                "otnd demo did not exit within {deadline:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let mut demo = Demo::start(dir.path(), "300", "300");
    let console = last_word(&demo.wait_for_line("console:", COMPLETES_WITHIN));
    let grpc = last_word(&demo.wait_for_line("gRPC:", COMPLETES_WITHIN));
    let completed = demo.wait_for_line(" completed: ", COMPLETES_WITHIN);
    assert!(
        completed.contains("300 sent, 0 failed, 0 skipped, 0 unknown of 300"),
        "{completed}"
    );
    let send_id = completed.split_whitespace().nth(1).unwrap().to_string();
    demo.wait_for_line("Ctrl-C to stop", COMPLETES_WITHIN);
    let output = demo.output();
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
    assert_eq!(status.code(), Some(0), "{}", demo.output());
    assert_eq!(files_in(dir.path()), ["demo.db"], "{}", demo.output());
}

#[test]
fn ctrl_c_while_users_opt_in_exits_0_and_leaves_only_the_database() {
    let dir = tempfile::tempdir().unwrap();
    // Many users: their opt-ins are still arriving when the signal comes.
    let mut demo = Demo::start(dir.path(), "100000", "300");
    demo.wait_for_line("users opt in", COMPLETES_WITHIN);
    demo.signal("INT");
    let status = demo.wait_exit(EXITS_WITHIN);
    assert_eq!(status.code(), Some(0), "{}", demo.output());
    let output = demo.output();
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
    let mut demo = Demo::start(dir.path(), "2000", "50");
    demo.wait_for_line(" started, ", COMPLETES_WITHIN);
    demo.signal("TERM");
    let status = demo.wait_exit(EXITS_WITHIN);
    assert_eq!(status.code(), Some(0), "{}", demo.output());
    let output = demo.output();
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
