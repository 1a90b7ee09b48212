//! # refetch
//!
//! The engine of the *notification-plus-pull* integration pattern (crate docs grow into a guide
//! as the engine lands).

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
pub mod kafka;
pub mod key;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod sink;
pub mod stats;

pub use async_trait::async_trait;
pub use config::{Backoff, EngineConfig, GoneGuardConfig, UnknownTypePolicy};
pub use consumer::{ConsumerChannels, MemoryConsumer};
pub use decode::{DecodeError, Decoded, Notification, NotificationDecoder, RecordView};
pub use dispatch::{DeadLetterWriter, MemoryDeadLetters};
pub use engine::RefreshOutcome;
pub use engine::TopicPartition;
pub use error::ErrorClass;
pub use fetch::{Entity, FetchError, FetchOutcome, FetchRequest, Fetcher, Validators};
pub use kafka::{GroupProtocol, KafkaConfig};
pub use key::{EntityKey, Version, VersionKind};
pub use pipeline::{Pipeline, PipelineBuilder, PipelineError, PipelineHandle, RunReport, Status};
pub use sink::{Change, Sink, SinkError, WriteReport};
