//! The Graph API sandbox. Its server is built in the next step of the project (issue 3); until
//! then this binary says so instead of pretending to serve.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("graph-sandbox: not built yet; see the project's open issues");
    ExitCode::from(2)
}
