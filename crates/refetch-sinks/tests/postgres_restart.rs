//! The PostgreSQL sink survives a server restart: writes during and after the restart fail only
//! transiently, and once the server is back every batch is written (the pool replaces the broken
//! connections). A test binary of its own, because the restart disconnects every session.
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use refetch::{Change, Entity, EntityKey, Sink, SinkError, Version};
use refetch_sinks::postgres::PostgresSink;
use refetch_sinks::{PostgresConfig, Secret};
use refetch_testkit::postgres as pg;

fn change(i: usize) -> Change {
    Change::Upsert {
        key: EntityKey::new("customer", i.to_string()),
        entity: Entity::json(format!(r#"{{"i":{i}}}"#), Some(Version::Int(i as i64))),
    }
}

/// Write `batch` until it is acknowledged, as the engine would; every failure must be transient.
async fn write_until_durable(sink: &PostgresSink, batch: &[Change]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut transient = 0;
    loop {
        match sink.write(batch).await {
            Ok(report) if report.failed.is_empty() => return Ok(transient),
            Ok(report) => bail!("records refused: {report:?}"),
            Err(SinkError::Transient { .. }) if Instant::now() < deadline => {
                transient += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("write failed after {transient} transient errors: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run scripts/test"]
async fn writes_recover_after_a_server_restart() -> anyhow::Result<()> {
    let (session, schema) = pg::fresh_schema().await?;
    let sink = PostgresSink::connect(&PostgresConfig {
        url: Secret::new(pg::url()?),
        schema: schema.clone(),
        table: "entities".into(),
        create_table: true,
        pool_size: 2,
        connect_timeout: Duration::from_secs(2),
        ..PostgresConfig::default()
    })
    .await?;
    let sink = Arc::new(sink);
    // Warm the pool so it holds connections the restart will break.
    write_until_durable(&sink, &[change(0)]).await?;

    // A writer keeps writing batches while the server restarts under it, and a few more after.
    let restarted = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let sink = sink.clone();
        let restarted = restarted.clone();
        async move {
            let (mut next, mut transient, mut after) = (1, 0, 0);
            while after < 5 {
                let batch: Vec<Change> = (next..next + 10).map(change).collect();
                transient += write_until_durable(&sink, &batch).await?;
                next += 10;
                if restarted.load(Ordering::SeqCst) {
                    after += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok((next, transient))
        }
    });
    pg::restart_server_async()
        .await
        .context("restarting PostgreSQL")?;
    restarted.store(true, Ordering::SeqCst);
    let (written, transient) = writer.await??;
    assert!(
        session.simple_query("SELECT 1").await.is_err(),
        "the restart really happened: sessions from before it are gone"
    );
    eprintln!("restart survived: {written} records, {transient} transient errors on the way");

    for i in 0..written {
        let held = sink
            .held_version(&EntityKey::new("customer", i.to_string()))
            .await?;
        assert_eq!(held, Some(Version::Int(i as i64)), "entity {i}");
    }
    Ok(())
}
