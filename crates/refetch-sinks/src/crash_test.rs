//! Crash tests: a test re-executes its own test binary as a child that writes through a sink,
//! prints `acked` once the write is acknowledged, and then waits; the parent kills it with
//! SIGKILL as soon as it reads `acked` and checks that the data is there.

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The line a child prints once its write is acknowledged.
const ACKED: &str = "REFETCH-CHILD-ACKED";

/// In the child, the path it must write to (from `env`); `None` in the parent.
pub(crate) fn child_target(env: &str) -> Option<PathBuf> {
    std::env::var_os(env).map(PathBuf::from)
}

/// Run `write` to completion, print `acked`, then block until killed.
pub(crate) fn act_as_child(write: impl Future<Output = ()>) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(write);
    let mut out = std::io::stdout().lock();
    // libtest has printed "test <name> ... " without a newline: start a fresh line.
    writeln!(out, "\n{ACKED}").unwrap();
    out.flush().unwrap();
    drop(out);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Start this test binary running only `test_name` with `env=path`, wait (up to a minute) for
/// it to print `acked`, then SIGKILL it and reap it.
pub(crate) fn run_child_until_acked(test_name: &str, env: &str, path: &Path) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == ACKED {
                let _ = tx.send(());
                break;
            }
        }
    });
    let acked = rx.recv_timeout(Duration::from_secs(60));
    // Child::kill sends SIGKILL on Unix: no destructors, no flushing, no exit handlers.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        acked.is_ok(),
        "child never printed `acked` (exit status {status})"
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "child was not killed by SIGKILL: {status}"
        );
    }
}
