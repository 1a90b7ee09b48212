//! The command line as users meet it: help with examples that wraps to the terminal, version,
//! completions, configuration errors that name the key and line with exit code 2 (all of them at
//! once), `validate --deny-warnings`, read-only commands stopped by a signal, and the module map.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn refetch(args: &[&str]) -> (i32, String, String) {
    refetch_env(args, &[])
}

fn refetch_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_refetch"))
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
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
    for sub in [
        "run",
        "validate",
        "demo",
        "dlq",
        "fetch",
        "offsets",
        "backfill",
        "reconcile",
        "completions",
    ] {
        assert!(
            out.contains(&format!("\n  {sub} ")),
            "{sub} missing from:\n{out}"
        );
    }
    assert!(
        out.contains("refetch validate -c refetch.toml --connect"),
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
fn help_wraps_to_the_terminal_width() {
    // Not a terminal here: clap reads the width from COLUMNS, as it does when the size is unknown.
    for width in [60usize, 80, 100] {
        let columns = width.to_string();
        for args in [
            vec!["--help"],
            vec!["run", "--help"],
            vec!["validate", "--help"],
            vec!["offsets", "--help"],
            vec!["backfill", "--help"],
        ] {
            let (code, out, _) = refetch_env(&args, &[("COLUMNS", &columns)]);
            assert_eq!(code, 0);
            let widest = out.lines().map(|l| l.chars().count()).max().unwrap_or(0);
            assert!(
                widest <= width,
                "{args:?} at {width} columns has a line of {widest}:\n{out}"
            );
        }
    }
    // Paragraphs are not wrapped by hand: a wide terminal gets long lines.
    let (_, out, _) = refetch_env(&["run", "--help"], &[("COLUMNS", "200")]);
    assert!(
        out.lines().any(|l| l.chars().count() > 120),
        "paragraphs use the width:\n{out}"
    );
}

#[test]
fn completions_are_generated_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = refetch(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for word in ["refetch", "validate", "reconcile", "config", "reset-to"] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
    // The bash script is valid bash.
    let (_, script, _) = refetch(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refetch.bash");
    std::fs::write(&path, script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let (code, _, err) = refetch(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
}

const BAD: &str = "[kafka]\nbrokers = \"127.0.0.1:9092\"\ngroup_id = \"g\"\n\n[[topics]]\nname = \"t\"\n\
     decoder = { kind = \"json\", type = \"/type\" }\n\n[fetcher.sources.customer]\n\
     url = \"http://127.0.0.1:1/c/{id}\"\ntimeuot = \"1s\"\n\n[sink]\nkind = \"stdout\"\n";

#[test]
fn configuration_errors_exit_2_naming_key_and_line_in_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, BAD).unwrap();
    let p = path.to_str().unwrap();
    for args in [
        vec!["validate", "--config", p],
        vec!["validate", "--config", p, "--connect"],
        vec!["run", "--config", p],
        vec!["offsets", "--config", p],
        vec!["dlq", "list", "--config", p],
        vec!["dlq", "redrive", "--config", p, "--all"],
        vec!["fetch", "--config", p, "--key", "customer:1"],
        vec!["backfill", "--config", p],
        vec!["reconcile", "--config", p],
    ] {
        let (code, _, err) = refetch(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("bad.toml:11:1"), "{err}");
        assert!(
            err.contains("`fetcher.sources.customer.timeuot`: unknown key `timeuot`"),
            "{err}"
        );
    }
    let (code, _, err) = refetch(&["validate", "--config", "/nonexistent.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read the configuration file"), "{err}");
}

/// A configuration with three mistakes in three sections (the closing note shows its output).
const THREE_MISTAKES: &str = r#"[kafka]
brokers = "127.0.0.1:9092"
group_id = "crm-to-warehouse"

[[topics]]
name = "crm.changes"
decoder = { kind = "json", fixed_type = "customer", version = "/version", version_kind = "integer" }

[engine]
window = "2s"
max_wait = "500ms"

[fetcher.sources.customer]
url = "https://crm.example/api/customers/{customer_id}"

[sink]
kind = "postgres"
url = "postgres://refetch@db.internal/warehouse"
tabel = "customers"
"#;

#[test]
fn validate_reports_every_mistake_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refetch.toml");
    std::fs::write(&path, THREE_MISTAKES).unwrap();
    let (code, out, err) = refetch(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    eprintln!("--- refetch validate on a file with mistakes ---\n{err}");
    for (line, what) in [
        (11, ["`engine.max_wait`", "expected max_wait >= window"]),
        (
            14,
            [
                "`fetcher.sources.customer.url`",
                "unknown placeholder {customer_id}",
            ],
        ),
        (19, ["`sink.tabel`", "unknown key `tabel`"]),
    ] {
        let at = format!("refetch.toml:{line}:1: ");
        assert!(
            err.lines()
                .any(|l| l.contains(&at) && what.iter().all(|w| l.contains(w))),
            "{at} {what:?} missing:\n{err}"
        );
    }
    assert!(err.contains("3 errors in"), "{err}");
}

#[test]
fn an_invalid_listing_total_is_a_configuration_error() {
    // Issue 19 item 4: exit 2, with the key and its line.
    let text = BAD.replace(
        "timeuot = \"1s\"\n",
        "\n[fetcher.sources.customer.listing]\nurl = \"http://127.0.0.1:1/c?offset={offset}\"\ntotal = \"total\"\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("listing.toml");
    std::fs::write(&path, &text).unwrap();
    let (code, out, err) = refetch(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    // The place is the value's (`total = "total"`: column 9).
    let line = text.lines().position(|l| l.starts_with("total")).unwrap() + 1;
    assert!(
        err.contains(&format!(
            "listing.toml:{line}:9: `fetcher.sources.customer.listing.total`"
        )),
        "{err}"
    );
}

fn example() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/refetch.example.toml"
    )
}

#[test]
fn validate_accepts_the_example_when_its_variables_are_set() {
    let all = [
        ("KAFKA_PASSWORD", "x"),
        ("CRM_API_KEY", "x"),
        ("PG_PASSWORD", "x"),
    ];
    let (code, stdout, stderr) = refetch_env(&["validate", "--config", example()], &all);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("ok      configuration"), "{stdout}");
    assert!(
        stdout.contains("ok      fetcher: entity types customer"),
        "{stdout}"
    );
    assert!(
        stdout.contains("warning"),
        "the routing warning is shown: {stdout}"
    );
    // --deny-warnings makes that warning an error.
    let (code, _, stderr) = refetch_env(
        &["validate", "--config", example(), "--deny-warnings"],
        &all,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--deny-warnings"), "{stderr}");
    assert!(
        stderr.contains("routes `address` to `customer`"),
        "{stderr}"
    );

    // Each missing variable is a configuration error at its key, [fetcher] included: exit 2.
    for (missing, key) in [
        (
            "CRM_API_KEY",
            "`fetcher.sources.customer.headers.X-Api-Key`",
        ),
        ("PG_PASSWORD", "`sink.url`"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_refetch"))
            .args(["validate", "--config", example()])
            .envs(all.iter().copied().filter(|(k, _)| *k != missing))
            .env_remove(missing)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("environment variable `{missing}` is not set")),
            "{stderr}"
        );
        assert!(stderr.contains(key), "{stderr}");
    }
}

#[test]
fn a_clean_file_passes_deny_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, BAD.replace("timeuot = \"1s\"\n", "")).unwrap();
    let (code, out, err) = refetch(&[
        "validate",
        "--config",
        path.to_str().unwrap(),
        "--deny-warnings",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // An old version shape is a warning, so --deny-warnings refuses it.
    std::fs::write(
        &path,
        BAD.replace("timeuot = \"1s\"\n", "")
            .replace("type = \"/type\" }", "type = \"/type\", version = \"/v\" }"),
    )
    .unwrap();
    let (code, _, err) = refetch(&[
        "validate",
        "--config",
        path.to_str().unwrap(),
        "--deny-warnings",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("old shape of a version"), "{err}");
}

#[test]
fn read_only_commands_stop_at_once_on_a_signal() {
    // `validate --connect` against a broker that never answers waits for metadata; SIGTERM
    // (and SIGINT, SIGHUP) end it at once with 130.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unreachable.toml");
    // A port nothing listens on: librdkafka keeps retrying until the 10 s metadata timeout.
    std::fs::write(
        &path,
        BAD.replace("timeuot = \"1s\"\n", "")
            .replace("127.0.0.1:9092", "127.0.0.1:9"),
    )
    .unwrap();
    for signal in ["TERM", "INT", "HUP"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_refetch"))
            .args(["validate", "--connect", "--config", path.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the first line: the handlers are installed before the file is read.
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
        assert!(first.starts_with("ok      configuration"), "{first}");
        let started = std::time::Instant::now();
        let kill = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "SIG{signal}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "SIG{signal} took {:?}",
            started.elapsed()
        );
    }
}

/// The subcommand modules of `src/` (and what they share) form no circle: backfill, reconcile and
/// run used to import each other.
#[test]
fn the_cli_modules_form_no_circle() {
    use std::collections::{BTreeMap, BTreeSet};
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    // Test code may use anything: only the code that ships counts.
    let code = |path: std::path::PathBuf| -> String {
        if path.file_name().is_some_and(|n| n == "tests.rs") {
            return String::new();
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        match text.find("#[cfg(test)]") {
            Some(at) => text[..at].to_owned(),
            None => text,
        }
    };
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let mut text = code(path.clone());
            // A module's folder (`ops/`) belongs to it.
            if let Ok(dir) = std::fs::read_dir(src.join(&name)) {
                for f in dir {
                    text.push_str(&code(f.unwrap().path()));
                }
            }
            modules.insert(name, text);
        } else if path.join("mod.rs").is_file() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let mut text = String::new();
            for f in std::fs::read_dir(&path).unwrap() {
                text.push_str(&code(f.unwrap().path()));
            }
            modules.insert(name, text);
        }
    }
    let names: BTreeSet<String> = modules.keys().filter(|m| *m != "main").cloned().collect();
    // `crate::x` references, and `x::` in `use crate::{a, x}` groups.
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in &modules {
        let mut deps = BTreeSet::new();
        for other in &names {
            if other == m {
                continue;
            }
            let direct = text.contains(&format!("crate::{other}::"))
                || text.contains(&format!("crate::{other};"))
                || text.contains(&format!("crate::{other} "));
            let grouped = text.lines().any(|l| {
                l.trim_start().starts_with("use crate::{")
                    && l.split(['{', '}', ',', ' ']).any(|w| w == other)
            });
            if direct || grouped {
                deps.insert(other.clone());
            }
        }
        edges.insert(m.clone(), deps);
    }
    // Depth-first search for a cycle.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_owned());
        for d in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for m in edges.keys().filter(|m| *m != "main") {
        if let Some(cycle) = visit(m, &edges, &mut Vec::new(), &mut done) {
            panic!("module circle: {}", cycle.join(" -> "));
        }
    }
    // What they share is in one module they all use.
    for must in ["refresh", "config"] {
        for user in ["backfill", "reconcile"] {
            assert!(edges[user].contains(must), "{user} uses {must}");
        }
    }
}
