//! Error classification shared by every pluggable part.
//!
//! The engine never inspects error messages: it acts on the [`ErrorClass`] that a
//! [`FetchError`](crate::FetchError) or [`SinkError`](crate::SinkError) carries.

use std::time::Duration;

/// What the engine should do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth trying again later, optionally not before `retry_after`.
    Transient {
        /// A lower bound for the next attempt given by the other side (for example `Retry-After`).
        retry_after: Option<Duration>,
    },
    /// Trying again will not help; the record goes to the dead-letter topic.
    Permanent,
}

impl ErrorClass {
    /// A transient class without a retry hint.
    pub const TRANSIENT: ErrorClass = ErrorClass::Transient { retry_after: None };

    /// `true` for [`ErrorClass::Transient`].
    pub fn is_transient(&self) -> bool {
        matches!(self, ErrorClass::Transient { .. })
    }

    /// The retry hint of a transient class.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ErrorClass::Transient { retry_after } => *retry_after,
            ErrorClass::Permanent => None,
        }
    }

    /// A short stable label (`transient` / `permanent`) for headers and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ErrorClass::Transient { .. } => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}
