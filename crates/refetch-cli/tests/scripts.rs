//! The service scripts from a clone inside a folder other users cannot search (mode 0700, like a
//! checkout in root's home): `scripts/postgres` keeps PostgreSQL's data in a private folder under
//! /var/tmp that the `postgres` user can reach, and `scripts/kafka` runs its broker from the clone.
//! Private ports 39432 (PostgreSQL) and 39092/39093 (Kafka); the broker's jars are shared with this
//! checkout's cache when it has them, so nothing is downloaded again.
//!
//! Needs PostgreSQL's server binaries and Java (scripts/test installs both): `cargo test -p
//! refetch-cli --test scripts -- --include-ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use refetch_testkit::process::repo_root;

const PG_PORT: &str = "39432";
const KAFKA_PORT: &str = "39092";

/// Run `script args` from `clone` with `env`; (exit code, stdout, stderr).
fn script(
    clone: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> (i32, String, String) {
    let out = Command::new(clone.join("scripts").join(name))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("REFETCH_TEST_PG")
        .env_remove("REFETCH_TEST_KAFKA")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Stops a service of the clone even when the test fails half-way.
struct Down<'a> {
    clone: &'a Path,
    name: &'static str,
    env: Vec<(&'static str, String)>,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = script(self.clone, self.name, &["reset"], &self.env);
    }
}

fn psql() -> PathBuf {
    let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin/psql"))
                .collect()
        })
        .unwrap_or_default();
    bins.retain(|p| p.is_file());
    bins.sort();
    bins.pop().unwrap_or_else(|| PathBuf::from("psql"))
}

#[test]
#[ignore = "needs PostgreSQL's server binaries and Java: run scripts/test"]
fn the_service_scripts_work_from_a_clone_in_a_private_folder() {
    let private = tempfile::Builder::new()
        .prefix("refetch-private-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let clone = private.path().join("refetch");
    let root = repo_root();
    let status = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(&root)
        .arg(&clone)
        .status()
        .unwrap();
    assert!(status.success(), "git clone {}", root.display());
    // The scripts as they are in this checkout (committed or not).
    for entry in std::fs::read_dir(root.join("scripts")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, clone.join("scripts").join(path.file_name().unwrap())).unwrap();
    }

    // PostgreSQL: up, a query, status names a run folder outside the clone, down.
    let pg_env = vec![("REFETCH_PG_PORT", PG_PORT.to_owned())];
    let _pg = Down {
        clone: &clone,
        name: "postgres",
        env: pg_env.clone(),
    };
    let (code, out, err) = script(&clone, "postgres", &["up"], &pg_env);
    assert_eq!(code, 0, "scripts/postgres up from a mode-700 clone:\n{err}");
    let url = out
        .trim()
        .strip_prefix("export REFETCH_TEST_PG=")
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{PG_PORT}/refetch")
    );
    let q = Command::new(psql())
        .args(["-X", "-q", "-t", "-A", &url, "-c", "SELECT 40 + 2"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&q.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&q.stderr)
    );
    let (code, _, err) = script(&clone, "postgres", &["status"], &pg_env);
    assert_eq!(code, 0, "{err}");
    let data = err
        .split("data ")
        .nth(1)
        .map(|d| d.trim().to_owned())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(data.starts_with("/var/tmp/refetch-pg/"), "{data}");
    assert!(
        !data.starts_with(private.path().to_str().unwrap()),
        "{data}"
    );
    let (code, _, err) = script(&clone, "postgres", &["down"], &pg_env);
    assert_eq!(code, 0, "{err}");

    // Kafka: up and down from the clone, on private ports.
    let mut kafka_env = vec![("REFETCH_KAFKA_PORT", KAFKA_PORT.to_owned())];
    let jars = root.join(".cache/kafka");
    if jars.join("4.1.1/libs/.complete").is_file() || jars.is_dir() {
        kafka_env.push(("REFETCH_KAFKA_CACHE", jars.display().to_string()));
    }
    let _kafka = Down {
        clone: &clone,
        name: "kafka",
        env: kafka_env.clone(),
    };
    let (code, out, err) = script(&clone, "kafka", &["up"], &kafka_env);
    assert_eq!(code, 0, "scripts/kafka up from a mode-700 clone:\n{err}");
    assert_eq!(
        out.trim(),
        format!("export REFETCH_TEST_KAFKA=127.0.0.1:{KAFKA_PORT}")
    );
    let (code, _, err) = script(&clone, "kafka", &["status"], &kafka_env);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&clone.display().to_string()),
        "the broker's data is in the clone: {err}"
    );
    let (code, _, err) = script(&clone, "kafka", &["down"], &kafka_env);
    assert_eq!(code, 0, "{err}");
}
