//! Processes in tests: pipeline binaries started and killed by crash tests, the repository's service
//! scripts (`scripts/kafka`, `scripts/postgres`), and [`wait_for`], the way a test waits for something
//! to become true.
//!
//! Crash and shutdown tests run the real `refetch` binary as a child, kill it at an awkward moment with
//! SIGKILL ([`kill9`]) or ask it to stop with SIGTERM ([`terminate`]), and then check what reached the
//! broker and the sink. A child's stdout and stderr go to a log file so a failing test can show what the
//! process said ([`ChildProcess::log`]). Children are killed when their handle is dropped, so a failed
//! assertion never leaks a running pipeline.
//!
//! Tests never sleep to synchronise: they poll a condition with a deadline through [`wait_for`] or
//! [`wait_for_value`], which fail with a message naming what did not happen in time.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

/// The root of the refetch repository (the folder holding `scripts/` and the workspace `Cargo.toml`),
/// found from this crate's manifest directory at compile time.
pub fn repo_root() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // crates/refetch-testkit -> repository root
    crate_dir
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| crate_dir.to_path_buf(), Path::to_path_buf)
}

/// A child process started by [`spawn`], with its stdout and stderr appended to a log file.
/// Dropping the handle kills the process (SIGKILL).
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    program: String,
    log_path: PathBuf,
}

impl ChildProcess {
    /// The OS process id, or `None` once the process has been waited for.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Where the process's stdout and stderr are written.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far (lossy UTF-8; empty if the log cannot be read).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking whether {} exited", self.program))
    }

    /// Waits up to `within` for the process to exit on its own. On timeout the process keeps running and
    /// the error carries the end of its log.
    pub async fn wait(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        match timeout(within, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("waiting for {}", self.program)),
            Err(_) => bail!(
                "{} did not exit within {within:?}; end of its log ({}):\n{}",
                self.program,
                self.log_path.display(),
                tail(&self.log(), 40)
            ),
        }
    }
}

/// Starts `program` with `args` and extra environment variables `env` (added to this process's
/// environment), appending its stdout and stderr to `log_file` (created with its parent folders).
/// Stdin is closed. The child is killed when the returned handle is dropped.
pub fn spawn<A, E, K, V>(
    program: impl AsRef<OsStr>,
    args: A,
    env: E,
    log_file: impl AsRef<Path>,
) -> anyhow::Result<ChildProcess>
where
    A: IntoIterator,
    A::Item: AsRef<OsStr>,
    E: IntoIterator<Item = (K, V)>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let program_name = program.as_ref().to_string_lossy().into_owned();
    let log_path = log_file.as_ref().to_path_buf();
    if let Some(parent) = log_path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the log folder {}", parent.display()))?;
    }
    let stdout = open_log(&log_path)?;
    let stderr = stdout
        .try_clone()
        .with_context(|| format!("duplicating the log handle {}", log_path.display()))?;
    let child = Command::new(program)
        .args(args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {program_name}"))?;
    Ok(ChildProcess {
        child,
        program: program_name,
        log_path,
    })
}

fn open_log(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the log file {}", path.display()))
}

/// Kills the process with SIGKILL (no shutdown code runs, nothing is flushed or committed) and waits
/// for it to be gone.
pub async fn kill9(child: &mut ChildProcess) -> anyhow::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        bail!(
            "{} had already exited ({status}) before kill9",
            child.program
        );
    }
    child
        .child
        .start_kill()
        .with_context(|| format!("sending SIGKILL to {}", child.program))?;
    child.wait(Duration::from_secs(30)).await
}

/// Asks the process to shut down with SIGTERM and waits up to `within` for it to exit; the exit status
/// is returned so the test can check for a clean exit.
pub async fn terminate(child: &mut ChildProcess, within: Duration) -> anyhow::Result<ExitStatus> {
    signal(child, "TERM").await?;
    child.wait(within).await
}

/// Sends a signal by name (`"TERM"`, `"INT"`, `"HUP"`, ...) with the system `kill` command.
pub async fn signal(child: &ChildProcess, name: &str) -> anyhow::Result<()> {
    let Some(pid) = child.id() else {
        bail!("{} has already exited", child.program);
    };
    let out = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .output()
        .await
        .context("running kill")?;
    if !out.status.success() {
        bail!(
            "kill -{name} {pid} ({}) failed: {}",
            child.program,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Polls `condition` until it returns `true`, for at most `within`. Polls quickly at first (10 ms), then
/// backs off to every 200 ms. Fails with "timed out after ... waiting for {what}".
pub async fn wait_for<F, Fut>(what: &str, within: Duration, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_value(what, within, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `probe` until it returns `Some(value)`, for at most `within`, and returns the value.
/// Same polling and failure as [`wait_for`].
pub async fn wait_for_value<T, F, Fut>(
    what: &str,
    within: Duration,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Runs `scripts/<name>` from the repository with `args` and extra environment `env`, and returns its
/// stdout. Fails with the script's stderr when it exits non-zero.
pub async fn run_script(
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> anyhow::Result<String> {
    let script = repo_root().join("scripts").join(name);
    let out = Command::new(&script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    script_result(&script, args, out)
}

/// [`run_script`] for code that is not async (blocks the calling thread).
pub fn run_script_blocking(
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> anyhow::Result<String> {
    let script = repo_root().join("scripts").join(name);
    let out = std::process::Command::new(&script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    script_result(&script, args, out)
}

fn script_result(
    script: &Path,
    args: &[&str],
    out: std::process::Output,
) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "{} {} failed ({}):\n{}",
            script.display(),
            args.join(" "),
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 40)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `scripts/kafka` with `args` (`"restart"`, `"kill9"`, `"up"`, `"status"`, ...) against the
/// broker the tests use: when `REFETCH_TEST_KAFKA` names a port on this machine, the script is pointed
/// at that port (`REFETCH_KAFKA_PORT`), so a test on a private broker restarts that one.
/// `restart` and `kill9` keep the broker's data; `up` waits until it is ready again.
pub async fn kafka_script(args: &[&str]) -> anyhow::Result<String> {
    let env = local_port_env(
        std::env::var(crate::kafka::BROKERS_ENV).ok().as_deref(),
        "REFETCH_KAFKA_PORT",
    );
    run_script("kafka", args, &env).await
}

/// `REFETCH_*_PORT=<port>` for an address `host:port` on this machine, unless the variable is set.
pub(crate) fn local_port_env(
    address: Option<&str>,
    var: &'static str,
) -> Vec<(&'static str, String)> {
    if std::env::var_os(var).is_some() {
        return Vec::new();
    }
    let Some(address) = address else {
        return Vec::new();
    };
    // Only the first bootstrap server matters: the scripts run a single node.
    let first = address.split(',').next().unwrap_or_default().trim();
    match first.rsplit_once(':') {
        Some((host, port))
            if matches!(host, "127.0.0.1" | "localhost") && port.parse::<u16>().is_ok() =>
        {
            vec![(var, port.to_owned())]
        }
        _ => Vec::new(),
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn repo_root_holds_the_scripts_and_the_workspace() {
        let root = repo_root();
        assert!(
            root.join("scripts").join("kafka").is_file(),
            "{}",
            root.display()
        );
        assert!(root.join("Cargo.toml").is_file());
    }

    #[tokio::test]
    async fn spawned_output_goes_to_the_log_and_exit_status_is_reported() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(crate::names::unique("process_log"));
        let log = dir.join("child.log");
        let mut child = spawn(
            "sh",
            ["-c", "echo out-$GREETING; echo err-$GREETING >&2; exit 3"],
            [("GREETING", "hello")],
            &log,
        )?;
        let status = child.wait(Duration::from_secs(10)).await?;
        assert_eq!(status.code(), Some(3));
        let text = child.log();
        assert!(text.contains("out-hello"), "{text}");
        assert!(text.contains("err-hello"), "{text}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn kill9_stops_a_process_that_ignores_sigterm() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(crate::names::unique("process_kill"));
        let mut child = spawn(
            "sh",
            [
                "-c",
                "trap '' TERM; echo started; while :; do sleep 0.05; done",
            ],
            std::iter::empty::<(&str, &str)>(),
            dir.join("child.log"),
        )?;
        wait_for("the child to start", Duration::from_secs(10), || {
            let started = child.log().contains("started");
            async move { started }
        })
        .await?;
        signal(&child, "TERM").await?;
        assert!(
            child.wait(Duration::from_millis(300)).await.is_err(),
            "the child must survive SIGTERM, it traps it"
        );
        let status = kill9(&mut child).await?;
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn terminate_returns_the_exit_status_of_a_graceful_shutdown() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(crate::names::unique("process_term"));
        let mut child = spawn(
            "sh",
            [
                "-c",
                "trap 'echo bye; exit 0' TERM; echo started; while :; do sleep 0.05; done",
            ],
            std::iter::empty::<(&str, &str)>(),
            dir.join("child.log"),
        )?;
        wait_for("the child to start", Duration::from_secs(10), || {
            let started = child.log().contains("started");
            async move { started }
        })
        .await?;
        let status = terminate(&mut child, Duration::from_secs(10)).await?;
        assert!(status.success(), "{status}");
        assert!(child.log().contains("bye"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn wait_for_returns_once_the_condition_holds() -> anyhow::Result<()> {
        let calls = Arc::new(AtomicUsize::new(0));
        let value = wait_for_value("the third poll", Duration::from_secs(10), || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move { (n >= 3).then_some(n) }
        })
        .await?;
        assert_eq!(value, 3);
        Ok(())
    }

    #[tokio::test]
    async fn wait_for_fails_naming_what_did_not_happen() {
        let started = Instant::now();
        let err = wait_for("the impossible", Duration::from_millis(150), || async {
            false
        })
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("waiting for the impossible"), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn failing_scripts_report_their_stderr() {
        let err = run_script("kafka", &["no-such-subcommand"], &[])
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("no-such-subcommand") && err.contains("Usage"),
            "{err}"
        );
    }

    #[test]
    fn script_port_follows_a_local_test_address() {
        let env = local_port_env(Some("127.0.0.1:29092"), "REFETCH_TEST_ONLY_UNSET_PORT");
        assert_eq!(
            env,
            vec![("REFETCH_TEST_ONLY_UNSET_PORT", "29092".to_owned())]
        );
        assert!(
            local_port_env(Some("kafka.example:9092"), "REFETCH_TEST_ONLY_UNSET_PORT").is_empty()
        );
        assert!(local_port_env(None, "REFETCH_TEST_ONLY_UNSET_PORT").is_empty());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
