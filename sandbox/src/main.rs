//! graph-sandbox: a fake of the Graph API for tests, benchmarks and staging.

use std::process::ExitCode;

// The fake shares a machine with otnd in tests and benchmarks: what it spends in the allocator
// is taken from the service under test.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ExitCode::from(graph_sandbox::cli::run(std::env::args_os()))
}
