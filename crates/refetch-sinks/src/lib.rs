//! # refetch-sinks
//!
//! The built-in [`Sink`](refetch::Sink)s of refetch: where fetched entity states are written.
//!
//! A sink's acknowledgement is what lets refetch commit Kafka offsets, so every sink here returns
//! `Ok` only once the batch is durable in its target (a committed transaction, a delivery report
//! from every broker replica, a 2xx response, an `fsync`). Errors carry the engine's retry
//! classification: *transient* errors (the target is down, overloaded, restarting) are retried
//! without end, *permanent* ones are reported per record in
//! [`WriteReport::failed`](refetch::WriteReport) so only the bad record is dead-lettered.
//!
//! | module | target | cargo feature |
//! |---|---|---|
//! | [`postgres`] | a PostgreSQL table, version-guarded upserts, one transaction per batch (or, exactly-once, per commit with the input offsets) | `postgres` |
//! | [`kafka`] | a (compacted) Kafka topic keyed by entity, idempotent producer, `acks=all` (or, exactly-once, transactional with the input offsets) | `kafka` |
//! | [`http`] | `PUT`/`DELETE` to an HTTP endpoint built from a URL template | `http` |
//! | [`sqlite`] | an embedded SQLite database (WAL, `synchronous=FULL`) | `sqlite` |
//! | [`jsonl`] | an append-only JSON Lines file, `fsync`ed before acknowledging | always |
//! | [`stdout`] | one line per change on standard output, for trying things out | always |
//!
//! The binary picks a sink from configuration with [`SinkConfig`] and [`build_sink`].

#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod body;
pub mod config;
#[cfg(test)]
mod crash_test;
mod factory;
pub mod metrics;
pub mod secret;

#[cfg(feature = "http")]
pub mod http;
pub mod jsonl;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod stdout;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod stored;

pub use config::{
    DeleteMode, HttpConfig, JsonlConfig, KafkaConfig, PostgresConfig, SinkConfig, SqliteConfig,
    StdoutConfig,
};
pub use factory::{SinkBuildError, build_sink};
pub use secret::Secret;
