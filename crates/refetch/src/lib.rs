//! # refetch
//!
//! The engine of the *notification-plus-pull* integration pattern. A source system publishes thin
//! change notifications on Kafka ("customer 42 changed", sometimes with a version); refetch
//! consumes them in a consumer group, **coalesces notifications per entity** in a trailing
//! debounce window capped by a max-wait, **fetches each entity once** through a [`Fetcher`],
//! **writes** it through a [`Sink`], and **commits a Kafka offset only after every notification
//! at or below it is durably handled**.
//!
//! ## What it guarantees
//! - **At-least-once, never skipped.** A partition's committed offset never passes a received
//!   notification that is not satisfied: written durably by a fetch that started after it, covered
//!   by a version the sink acknowledged, or dead-lettered with the broker's acknowledgement.
//!   Offsets are tracked in the order received, so compaction and transaction markers are safe.
//! - **No lost update.** A notification that arrives while its entity is being fetched starts a
//!   follow-up fetch; after the input goes quiet, the sink holds, for every entity, a state read
//!   after that entity's last notification.
//! - **Per-entity order.** At most one fetch-and-write per entity at a time in a process; writes
//!   for one entity reach the sink in the order their fetches ran.
//! - **Bounded work and memory.** An entity is fetched at most once per window plus one follow-up
//!   per flight; partitions pause (the consumer keeps polling) when caps on outstanding offsets,
//!   pending keys (business-action members included) or bytes (keys, bodies awaiting the sink,
//!   dead letters awaiting acknowledgement, records queued from the consumer) are reached.
//! - **Fenced assignments.** Every job carries the assignment (partition + epoch) it serves; when
//!   the assignment ends its jobs are dropped, so a former owner's write never lands after the
//!   new owner's while refetch still holds it, and a stale commit never reaches the broker.
//! - **Failures have defined outcomes.** Transient fetch errors retry with backoff and jitter,
//!   honouring retry-after; only attempts against a source that is healthy for other keys spend
//!   the retry budget, so an outage dead-letters nothing. Permanent errors, spent budgets,
//!   undecodable records and over-long ids go to a dead-letter topic. A sink that is down is
//!   retried without end while nothing is committed.
//!
//! What is *not* promised: order across different entities (except inside a business action,
//! see [`action`]), and, by default, exactly-once writes (a crash re-delivers notifications
//! after the last commit; sinks should upsert and guard on version). A *transactional* sink
//! ([`Sink::offset_store`]) gets exactly-once: every input offset covered by one committed write,
//! its transactions committing the input offsets with the writes (see `engine/txn.rs`).
//!
//! ## Embedding
//! Implement [`Fetcher`] and [`Sink`] (or use the built-in HTTP fetcher and sinks from the
//! `refetch-http` and `refetch-sinks` crates), choose a decoder, and run:
//!
//! ```no_run
//! use refetch::decode::JsonDecoder;
//! use refetch::{KafkaConfig, Pipeline, VersionKind};
//! # use refetch::{async_trait, Change, FetchError, FetchOutcome, FetchRequest, Fetcher, Sink, SinkError, WriteReport};
//! # struct MyFetcher; struct MySink;
//! # #[async_trait] impl Fetcher for MyFetcher {
//! #     async fn fetch(&self, _: &FetchRequest) -> Result<FetchOutcome, FetchError> { Ok(FetchOutcome::Gone) } }
//! # #[async_trait] impl Sink for MySink {
//! #     async fn write(&self, _: &[Change]) -> Result<WriteReport, SinkError> { Ok(WriteReport::all_durable()) } }
//!
//! # async fn run() -> Result<(), refetch::PipelineError> {
//! let kafka = KafkaConfig::new("localhost:9092", "crm-to-warehouse", vec!["crm.customers".into()]);
//! let pipeline = Pipeline::builder::<MyFetcher, MySink>()
//!     .kafka(kafka) // dead letters go to "crm-to-warehouse.dlq" unless configured otherwise
//!     .decoder(JsonDecoder::fixed_type("customer", "/id").with_version("/rev", VersionKind::Integer))
//!     .fetcher(MyFetcher)
//!     .sink(MySink)
//!     .build()?;
//! let handle = pipeline.handle(); // status, on-demand refresh, shutdown
//! pipeline
//!     .run(async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! A complete runnable program (custom fetcher and sink on librdkafka's in-process mock cluster)
//! is `examples/custom_pipeline.rs`: `cargo run -p refetch --example custom_pipeline`.
//!
//! ## Layout
//! | module | concept |
//! |---|---|
//! | [`key`] | entity keys and versions (integer or timestamp) |
//! | [`decode`] | Kafka record -> notification: JSON pointers, fixed types, aggregate routing, record keys |
//! | [`fetch`] / [`sink`] | the pluggable traits and their outcomes |
//! | [`error`] | the retry classification every error carries |
//! | [`assignment`] | a partition plus the epoch it is owned in; the fence every job carries |
//! | [`engine`] | the I/O-free state machine that coordinates the modules below |
//! | `partitions` (inside the engine) | the partitions owned: assignment, offsets, pause state, writes a revoke waits for |
//! | `intake` (inside the engine) | what a received record is: decode, screen ids and types |
//! | `coalesce` / `keys` (inside the engine) | pending notifications per key, single flight, follow-ups; the key table and its timers |
//! | `outcome` (inside the engine) | what a fetch or write result means: retries, budgets, stale reads, the gone guard |
//! | `acked` (inside the engine) | what the sink acknowledged: versions, validators, tombstones |
//! | [`action`] | business actions: members of one correlation id fetched and written in one batch |
//! | [`offsets`] | per-partition tracking of received offsets and the safe commit point |
//! | [`health`] | source health for retry budgets, and the gone-rate guard |
//! | [`dlq`] | dead-letter record layout, reasons, and dead letters awaiting acknowledgement |
//! | [`dispatch`] | running fetch, write and dead-letter jobs; sink batching, retries and fencing |
//! | `txn_writer` (inside the engine) | the writer of a transactional sink: writes, commits and aborts in one order |
//! | `engine/txn.rs` | exactly-once: provisional offsets, commit plans, aborts, starting from stored offsets |
//! | [`consumer`] / `kafka` | the consumer interface; librdkafka driver, rebalances, commits, dead-letter producer (feature `kafka`, on by default) |
//! | [`pipeline`] | builder, handle and the async runtime (shutdown, revokes, commits, backpressure) |
//! | [`config`] | engine settings and their validation |
//! | [`metrics`] / [`stats`] | metrics through the `metrics` facade; in-process counters |
//! | [`client_log`] | the Kafka client's repeated log lines, de-duplicated and rate-limited |
//! | [`clock`] | monotonic millisecond ticks (debounce runs on the wall clock, not stream time) |

pub(crate) mod acked;
pub mod action;
pub mod assignment;
pub mod client_log;
pub mod clock;
pub(crate) mod coalesce;
pub mod config;
pub mod consumer;
pub mod decode;
pub mod dispatch;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod health;
pub(crate) mod intake;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod key;
pub(crate) mod keys;
pub mod metrics;
pub mod offsets;
pub(crate) mod outcome;
pub(crate) mod partitions;
pub mod pipeline;
pub mod sink;
pub mod stats;
pub(crate) mod txn_writer;

pub use action::{ActionConfig, ActionFailurePolicy, ActionTag};
pub use assignment::{Assignment, Epoch, Fence, TopicPartition};
pub use async_trait::async_trait;
pub use config::{Backoff, EngineConfig, GoneGuardConfig, UnknownTypePolicy};
pub use consumer::{ConsumerChannels, GroupMetadata, MemoryConsumer};
pub use decode::{DecodeError, Decoded, Notification, NotificationDecoder, RecordView};
pub use dispatch::{DeadLetterWriter, MemoryDeadLetters};
pub use dlq::Coordinate;
pub use engine::RefreshOutcome;
pub use error::ErrorClass;
pub use fetch::{
    Entity, FailureCause, FetchError, FetchOutcome, FetchRequest, Fetcher, OwnershipShare,
    Validators,
};
#[cfg(feature = "kafka")]
pub use kafka::{GroupProtocol, KafkaConfig};
pub use key::{EntityKey, Version, VersionKind};
pub use offsets::StoredOffset;
pub use pipeline::{Pipeline, PipelineBuilder, PipelineError, PipelineHandle, RunReport, Status};
pub use sink::{
    Change, Delivery, OffsetStore, Sink, SinkError, TransactionCommit, TransactionError,
    WriteContext, WriteReport,
};
