//! # refetch
//!
//! The engine of the *notification-plus-pull* integration pattern (crate docs grow into a guide
//! as the engine lands).

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod decode;
pub mod error;
pub mod fetch;
pub mod key;
pub mod sink;

pub use async_trait::async_trait;
pub use decode::{Decoded, DecodeError, Notification, NotificationDecoder, RecordView};
pub use error::ErrorClass;
pub use fetch::{Entity, FetchError, FetchOutcome, FetchRequest, Fetcher, Validators};
pub use key::{EntityKey, Version, VersionKind};
pub use sink::{Change, Sink, SinkError, WriteReport};
