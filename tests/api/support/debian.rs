//! Debian packages a few tests need (Chromium and its WebDriver for the console, libfaketime for
//! an instance with its clock moved). `cargo test` is the one command that runs the tests, on a
//! fresh machine too: a missing package is installed with apt-get (the tests run as root on
//! Debian, as CI does), and a test fails naming the package when that cannot be done. Nothing
//! is skipped.

use std::{
    process::{Command, Stdio},
    sync::Mutex,
};

/// One install at a time: apt-get holds dpkg's lock, and a second one would fail on it.
static INSTALLING: Mutex<()> = Mutex::new(());

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Installs those of `packages` that are missing.
pub fn ensure_packages(packages: &[&str]) {
    let _one_at_a_time = INSTALLING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return;
    }
    eprintln!(
        "installing Debian packages the tests need: {}",
        missing.join(" ")
    );
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    let done = apt(&["update", "-qq"]) && apt(&[&["install", "-y", "-qq"], &missing[..]].concat());
    assert!(
        done && missing.iter().all(|p| installed(p)),
        "these tests need the Debian packages {missing:?}, and `apt-get install` could not install \
         them here; install them (as root: `apt-get install -y {}`) and run the tests again",
        missing.join(" ")
    );
}
