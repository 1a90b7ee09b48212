//! The [`Fetcher`] trait: pull the current state of an entity from its source.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::decode::Fields;
use crate::error::ErrorClass;
use crate::key::{EntityKey, Version};

/// Validators of a previously written state, for conditional fetches (`If-None-Match`,
/// `If-Modified-Since`). The engine keeps them per key and fills them only from sink
/// acknowledgements, so a 304 always refers to a state the sink durably holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    /// An entity tag (`ETag`), verbatim.
    pub etag: Option<String>,
    /// A `Last-Modified` value, verbatim.
    pub last_modified: Option<String>,
}

impl Validators {
    /// `true` when neither validator is set.
    pub fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none()
    }
}

/// A fetched entity state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    /// The body as the source returned it (or as an envelope extractor produced it).
    pub body: Bytes,
    /// The content type, for example `application/json`.
    pub content_type: Option<String>,
    /// The entity's version, when the source reports one.
    pub version: Option<Version>,
    /// Validators for the next conditional fetch.
    pub validators: Option<Validators>,
}

impl Entity {
    /// A JSON entity with an optional version.
    pub fn json(body: impl Into<Bytes>, version: Option<Version>) -> Self {
        Entity {
            body: body.into(),
            content_type: Some("application/json".to_owned()),
            version,
            validators: None,
        }
    }
}

/// What a fetch found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The entity exists; here is its current state.
    Found(Entity),
    /// The entity was deleted at the source (it becomes a delete in the sink, under the gone guard).
    Gone,
    /// A conditional fetch said nothing changed since the validators were issued; nothing is written.
    Unchanged,
}

impl FetchOutcome {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FetchOutcome::Found(_) => "found",
            FetchOutcome::Gone => "gone",
            FetchOutcome::Unchanged => "unchanged",
        }
    }
}

/// One key to fetch, with what the engine knows about it.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// The entity to fetch.
    pub key: EntityKey,
    /// Extra fields decoded from the newest notification (for URL templates), if any.
    pub fields: Option<Fields>,
    /// Validators of the state the sink holds, for a conditional fetch.
    pub validators: Option<Validators>,
    /// The highest version any coalesced notification announced; a lower fetched version is a
    /// stale read.
    pub min_version: Option<Version>,
}

impl FetchRequest {
    /// A plain request for `key`.
    pub fn new(key: EntityKey) -> Self {
        FetchRequest {
            key,
            fields: None,
            validators: None,
            min_version: None,
        }
    }

    /// The value of a decoded field by name.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| &**v)
    }
}

/// Why a fetch failed, classified for the engine.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    /// The source failed in a way that may pass (5xx, 429, timeout, connection error, stale read).
    #[error("transient fetch error: {message}")]
    Transient {
        /// What happened (never containing secrets).
        message: String,
        /// The source's retry hint, if any.
        retry_after: Option<Duration>,
    },
    /// The source will keep refusing this key (a 4xx other than 404/410/429, an unparsable body,
    /// an id that cannot be placed in a URL).
    #[error("permanent fetch error: {message}")]
    Permanent {
        /// What happened.
        message: String,
    },
    /// No request was made: a circuit breaker is open or the fetcher is shutting down. It does
    /// not count against the key's retry budget.
    #[error("fetch not attempted: {message}")]
    NotAttempted {
        /// Why no request was made.
        message: String,
        /// When trying again makes sense.
        retry_after: Option<Duration>,
    },
}

impl FetchError {
    /// A transient error without a retry hint.
    pub fn transient(message: impl Into<String>) -> Self {
        FetchError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        FetchError::Permanent {
            message: message.into(),
        }
    }

    /// The classification the engine acts on.
    pub fn class(&self) -> ErrorClass {
        match self {
            FetchError::Transient { retry_after, .. }
            | FetchError::NotAttempted { retry_after, .. } => ErrorClass::Transient {
                retry_after: *retry_after,
            },
            FetchError::Permanent { .. } => ErrorClass::Permanent,
        }
    }

    /// Whether this failure spends the key's retry budget (an attempt that reached the source).
    pub fn counts_against_budget(&self) -> bool {
        matches!(self, FetchError::Transient { .. })
    }

    /// The message without the classification prefix.
    pub fn message(&self) -> &str {
        match self {
            FetchError::Transient { message, .. }
            | FetchError::Permanent { message }
            | FetchError::NotAttempted { message, .. } => message,
        }
    }
}

/// Pulls the current state of entities from a source system.
///
/// Implementations must be cheap to share (`Arc`) and safe to call concurrently: the engine runs
/// many fetches at once, but never two for the same key. They should classify errors carefully:
/// a permanent error dead-letters the key's notifications, a transient one is retried with backoff.
///
/// ```
/// use refetch::{async_trait, Entity, FetchError, FetchOutcome, FetchRequest, Fetcher, Version};
///
/// struct Constant;
///
/// #[async_trait]
/// impl Fetcher for Constant {
///     async fn fetch(&self, req: &FetchRequest) -> Result<FetchOutcome, FetchError> {
///         if req.key.id().is_empty() {
///             return Err(FetchError::permanent("empty id"));
///         }
///         let body = format!(r#"{{"id":{:?}}}"#, req.key.id());
///         Ok(FetchOutcome::Found(Entity::json(body, Some(Version::Int(1)))))
///     }
/// }
/// ```
#[async_trait]
pub trait Fetcher: Send + Sync + 'static {
    /// Fetch one entity.
    async fn fetch(&self, request: &FetchRequest) -> Result<FetchOutcome, FetchError>;

    /// Does this fetcher serve `entity_type`? Notifications of other types are ignored (and
    /// counted) or dead-lettered, as configured.
    fn handles(&self, entity_type: &str) -> bool {
        let _ = entity_type;
        true
    }

    /// How many keys of `entity_type` one [`Fetcher::fetch_batch`] call may take (1: no batching).
    fn batch_limit(&self, entity_type: &str) -> usize {
        let _ = entity_type;
        1
    }

    /// Fetch several keys of one type at once. Returns one result per request, in order. The
    /// default fetches them one after another.
    async fn fetch_batch(
        &self,
        requests: &[FetchRequest],
    ) -> Vec<Result<FetchOutcome, FetchError>> {
        let mut out = Vec::with_capacity(requests.len());
        for r in requests {
            out.push(self.fetch(r).await);
        }
        out
    }
}

#[async_trait]
impl<F: Fetcher + ?Sized> Fetcher for Arc<F> {
    async fn fetch(&self, request: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        (**self).fetch(request).await
    }
    fn handles(&self, entity_type: &str) -> bool {
        (**self).handles(entity_type)
    }
    fn batch_limit(&self, entity_type: &str) -> usize {
        (**self).batch_limit(entity_type)
    }
    async fn fetch_batch(
        &self,
        requests: &[FetchRequest],
    ) -> Vec<Result<FetchOutcome, FetchError>> {
        (**self).fetch_batch(requests).await
    }
}

#[async_trait]
impl<F: Fetcher + ?Sized> Fetcher for Box<F> {
    async fn fetch(&self, request: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        (**self).fetch(request).await
    }
    fn handles(&self, entity_type: &str) -> bool {
        (**self).handles(entity_type)
    }
    fn batch_limit(&self, entity_type: &str) -> usize {
        (**self).batch_limit(entity_type)
    }
    async fn fetch_batch(
        &self,
        requests: &[FetchRequest],
    ) -> Vec<Result<FetchOutcome, FetchError>> {
        (**self).fetch_batch(requests).await
    }
}
