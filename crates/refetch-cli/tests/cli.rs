//! The command line as users meet it: help with examples, version, and configuration errors that
//! name the key and line with exit code 2.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn refetch(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_refetch"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_subcommand_with_examples() {
    let (code, out, _) = refetch(&["--help"]);
    assert_eq!(code, 0);
    for sub in ["run", "validate", "demo", "dlq", "fetch", "offsets"] {
        assert!(
            out.contains(&format!("\n  {sub} ")),
            "{sub} missing from:\n{out}"
        );
    }
    assert!(
        out.contains("refetch validate --config refetch.toml --connect"),
        "{out}"
    );
    let (code, out, _) = refetch(&["dlq", "redrive", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--to-retry-topic") && out.contains("--to-source-topic"),
        "{out}"
    );
    let (code, out, _) = refetch(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("refetch "), "{out}");
}

#[test]
fn configuration_errors_exit_2_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[kafka]\nbrokers = \"127.0.0.1:9092\"\ngroup_id = \"g\"\n\n[[topics]]\nname = \"t\"\n\
         decoder = { kind = \"json\", type = \"/type\" }\n\n[fetcher.sources.customer]\n\
         url = \"http://127.0.0.1:1/c/{id}\"\ntimeuot = \"1s\"\n\n[sink]\nkind = \"stdout\"\n",
    )
    .unwrap();
    for sub in [
        vec!["validate", "--config"],
        vec!["run", "--config"],
        vec!["offsets", "--config"],
        vec!["dlq", "list", "--config"],
    ] {
        let mut args = sub.clone();
        let p = path.to_str().unwrap();
        args.push(p);
        let (code, _, err) = refetch(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("bad.toml:11:1"), "{err}");
        assert!(err.contains("unknown field `timeuot`"), "{err}");
    }
    let (code, _, err) = refetch(&["validate", "--config", "/nonexistent.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read the configuration file"), "{err}");
}

#[test]
fn validate_accepts_the_example_when_its_variables_are_set() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/refetch.example.toml"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_refetch"))
        .args(["validate", "--config", example])
        .env("KAFKA_PASSWORD", "x")
        .env("CRM_API_KEY", "x")
        .env("PG_PASSWORD", "x")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok      configuration"), "{stdout}");
    assert!(
        stdout.contains("ok      fetcher: entity types customer"),
        "{stdout}"
    );
    assert!(
        stdout.contains("warning"),
        "the routing warning is shown: {stdout}"
    );

    // Without CRM_API_KEY the fetcher cannot be built: named, exit 1.
    let out = Command::new(env!("CARGO_BIN_EXE_refetch"))
        .args(["validate", "--config", example])
        .env("KAFKA_PASSWORD", "x")
        .env("PG_PASSWORD", "x")
        .env_remove("CRM_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAILED  fetcher") && stdout.contains("CRM_API_KEY"),
        "{stdout}"
    );

    // Without PG_PASSWORD the file itself is invalid: exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_refetch"))
        .args(["validate", "--config", example])
        .env("KAFKA_PASSWORD", "x")
        .env("CRM_API_KEY", "x")
        .env_remove("PG_PASSWORD")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("environment variable `PG_PASSWORD` is not set"),
        "{stderr}"
    );
    assert!(stderr.contains("`sink.url`"), "{stderr}");
}
