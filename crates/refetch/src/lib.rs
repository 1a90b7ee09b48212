//! # refetch
//!
//! The engine of the *notification-plus-pull* integration pattern (crate docs grow into a guide
//! as the engine lands).

pub mod clock;
pub(crate) mod coalesce;
pub mod config;
pub mod decode;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod health;
pub mod key;
pub mod metrics;
pub mod offsets;
pub mod sink;
pub mod stats;

pub use async_trait::async_trait;
pub use config::{Backoff, EngineConfig, GoneGuardConfig, UnknownTypePolicy};
pub use decode::{Decoded, DecodeError, Notification, NotificationDecoder, RecordView};
pub use engine::TopicPartition;
pub use error::ErrorClass;
pub use fetch::{Entity, FetchError, FetchOutcome, FetchRequest, Fetcher, Validators};
pub use key::{EntityKey, Version, VersionKind};
pub use sink::{Change, Sink, SinkError, WriteReport};
