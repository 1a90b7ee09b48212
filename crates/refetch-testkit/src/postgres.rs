//! The real PostgreSQL server that integration tests talk to, a fresh schema per test, and restarting
//! the server in the middle of a test.
//!
//! The server's URL comes from `REFETCH_TEST_PG` (`postgres://postgres@127.0.0.1:PORT/refetch`), which
//! `scripts/test` exports after `scripts/postgres up`. When it is unset, [`url`] fails with a message
//! saying how to run the test: a PostgreSQL test never passes by skipping.
//!
//! Tests share one database, so each works in its own schema from [`fresh_schema`]: the returned
//! client's `search_path` points at that schema, so unqualified table names land there.

use anyhow::{Context, bail};
use tokio_postgres::{Client, Config, NoTls};

use crate::process::{local_port_env, run_script, run_script_blocking};

/// The environment variable naming the server (`postgres://` URL).
pub const URL_ENV: &str = "REFETCH_TEST_PG";

/// The server URL from `REFETCH_TEST_PG`. Fails, naming `scripts/test`, when it is unset or empty.
pub fn url() -> anyhow::Result<String> {
    match std::env::var(URL_ENV) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => bail!(
            "{URL_ENV} is not set: this test needs a real PostgreSQL server. Run the suite with \
             scripts/test, or start one with `eval \"$(scripts/postgres up)\"` and run \
             `cargo test -- --include-ignored` in that shell"
        ),
    }
}

/// A new connection to the test server (no TLS: the server listens on 127.0.0.1 only). The
/// connection is driven by a task on the current tokio runtime and closes when the client is dropped.
pub async fn connect() -> anyhow::Result<Client> {
    let url = url()?;
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "test PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// A connection whose `search_path` is a newly created, uniquely named schema, and that schema's
/// name (to build connection settings for the code under test, e.g. `options=-csearch_path=NAME`).
pub async fn fresh_schema() -> anyhow::Result<(Client, String)> {
    let client = connect().await?;
    let schema = crate::names::unique("t");
    // The name is [a-z0-9_] (see names::unique), so it needs no quoting.
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema};"
        ))
        .await
        .with_context(|| format!("creating schema {schema}"))?;
    Ok((client, schema))
}

/// Restarts the test server (`scripts/postgres restart`: fast shutdown, which disconnects every
/// session, then start on the same data) and returns once it accepts connections again. Blocks the
/// calling thread for about a second: from async code use [`restart_server_async`], so the code under
/// test keeps running during the restart.
pub fn restart_server() -> anyhow::Result<()> {
    run_script_blocking("postgres", &["restart"], &script_env()?)?;
    Ok(())
}

/// [`restart_server`] for async tests: the runtime keeps running while the server restarts.
pub async fn restart_server_async() -> anyhow::Result<()> {
    run_script("postgres", &["restart"], &script_env()?).await?;
    Ok(())
}

/// Point `scripts/postgres` at the port of the server in `REFETCH_TEST_PG`.
fn script_env() -> anyhow::Result<Vec<(&'static str, String)>> {
    let url = url()?;
    let config: Config = url
        .parse()
        .with_context(|| format!("{URL_ENV} is not a valid PostgreSQL URL: {url}"))?;
    let address = match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(host)), Some(port)) => {
            Some(format!("{host}:{port}"))
        }
        _ => None,
    };
    Ok(local_port_env(address.as_deref(), "REFETCH_PG_PORT"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::process::wait_for_value;

    #[test]
    fn missing_url_fails_naming_the_test_command() {
        match std::env::var(URL_ENV) {
            Ok(v) if !v.trim().is_empty() => assert_eq!(url().ok(), Some(v.trim().to_owned())),
            _ => {
                let message = url().err().map(|e| e.to_string()).unwrap_or_default();
                assert!(message.contains("scripts/test"), "{message}");
                assert!(message.contains(URL_ENV), "{message}");
            }
        }
    }

    // One test covers schema creation and restart: a restart disconnects every session, so a second
    // PostgreSQL test running beside it in this binary would fail spuriously.
    #[tokio::test]
    #[ignore = "needs a real PostgreSQL: run scripts/test"]
    async fn fresh_schemas_are_isolated_and_committed_rows_survive_a_restart() -> anyhow::Result<()>
    {
        let (client, schema) = fresh_schema().await?;
        let (other, other_schema) = fresh_schema().await?;
        assert_ne!(schema, other_schema);
        client
            .batch_execute("CREATE TABLE entity (id text PRIMARY KEY, body jsonb NOT NULL)")
            .await?;
        other
            .batch_execute("CREATE TABLE entity (id text PRIMARY KEY)")
            .await?;
        client
            .execute(
                "INSERT INTO entity VALUES ($1, $2::text::jsonb)",
                &[&"a", &r#"{"v":1}"#],
            )
            .await?;
        let in_schema: i64 = client
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'entity'",
                &[&schema],
            )
            .await?
            .get(0);
        assert_eq!(in_schema, 1, "unqualified tables land in the test's schema");
        let other_rows: i64 = other
            .query_one("SELECT count(*) FROM entity", &[])
            .await?
            .get(0);
        assert_eq!(other_rows, 0, "another test's schema does not see the row");

        restart_server_async().await?;
        assert!(
            client.query_one("SELECT 1", &[]).await.is_err(),
            "a restart disconnects existing sessions"
        );
        let fresh = wait_for_value(
            "PostgreSQL to accept connections after the restart",
            Duration::from_secs(30),
            || async { connect().await.ok() },
        )
        .await?;
        let body: String = fresh
            .query_one(
                &format!("SELECT body::text FROM {schema}.entity WHERE id = 'a'"),
                &[],
            )
            .await?
            .get(0);
        assert_eq!(body, r#"{"v": 1}"#);
        Ok(())
    }
}
