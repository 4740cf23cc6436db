//! What both benchmark programs need to run the real binaries: child processes that are killed
//! when dropped, started and waited for by a line they print, and read from `/proc`.
//! Each bench uses only part of it.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

pub const OTND: &str = env!("CARGO_BIN_EXE_otnd");

/// Set in the environment of a bench program started as graph-sandbox (see [`spawn_sandbox`]).
const SANDBOX_CHILD: &str = "OTND_BENCH_AS_GRAPH_SANDBOX";

/// graph-sandbox is another package of the workspace, so cargo builds no binary of it for these
/// programs: each runs it as a child of its own, this same program started again as the sandbox
/// (`graph_sandbox::cli`, the binary's own code), so that it keeps a process, CPU time and memory
/// of its own. Call first in `main`: in such a child, this serves until killed and exits.
pub fn serve_if_sandbox_child() {
    if std::env::var_os(SANDBOX_CHILD).is_some() {
        std::process::exit(i32::from(graph_sandbox::cli::run(std::env::args_os())));
    }
}

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Peak resident memory (VmHWM) in MiB and CPU seconds (user + system) so far.
    pub fn usage(&self) -> (f64, f64) {
        let pid = self.0.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm_kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        (hwm_kib / 1024.0, ticks / 100.0)
    }

    /// CPU seconds (user + system) so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.usage().1
    }

    /// Resets VmHWM to the current RSS (Linux >= 4.0): later peaks are the send's own.
    pub fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.0.id()), "5").is_ok()
    }
}

/// Starts a process and waits for a line containing `needle` on stdout or stderr.
pub fn spawn_until(mut command: Command, needle: &str) -> (Proc, String) {
    // Owned by a `Proc` at once: killed and reaped whatever happens next.
    let mut child = Proc(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts"),
    );
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no line with {needle:?}"));
        if line.contains(needle) {
            // Keep draining so that the child never blocks on a full pipe.
            // BENCH_ECHO=1 shows the children's output (with BENCH_OTND_LOG=otnd=debug, say).
            let echo = std::env::var_os("BENCH_ECHO").is_some();
            std::thread::spawn(move || {
                while let Ok(line) = rx.recv() {
                    if echo {
                        eprintln!("{line}");
                    }
                }
            });
            return (child, line);
        }
    }
}

/// A fresh sandbox on port 0 with `args`: the process and its base URL.
pub fn spawn_sandbox(args: &[&str]) -> (Proc, String) {
    let this_program = std::env::current_exe().expect("the bench program knows its path");
    let mut sandbox = Command::new(this_program);
    sandbox
        .env(SANDBOX_CHILD, "1")
        .args(["--addr", "127.0.0.1:0"])
        .args(args);
    let (sandbox, line) = spawn_until(sandbox, "graph-sandbox listening on");
    let url = format!("http://{}", line.rsplit(' ').next().unwrap());
    (sandbox, url)
}

/// The value of a JSON log field, e.g. `"grpc_addr":"127.0.0.1:4242"`.
pub fn json_field(line: &str, name: &str) -> String {
    let start = line.find(&format!("\"{name}\":\"")).unwrap() + name.len() + 4;
    line[start..].split('"').next().unwrap().to_string()
}

/// A PostgreSQL database of its own on the server `DATABASE_URL` names (by default the local
/// one), created for one run and dropped by [`PgDatabase::drop_now`].
pub struct PgDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        use sea_orm::{ConnectionTrait, Database};
        let admin_url = std::env::var("DATABASE_URL")
            .unwrap_or("postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("otnd_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(&admin_url).await.unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        admin.close().await.unwrap();
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&format!("/{name}"));
        PgDatabase {
            admin_url,
            name,
            url: url.to_string(),
        }
    }

    /// Drops it, closing whatever sessions are still open on it.
    pub async fn drop_now(self) {
        use sea_orm::{ConnectionTrait, Database};
        let admin = Database::connect(&self.admin_url).await.unwrap();
        let _ = admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
        let _ = admin.close().await;
    }
}
