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

/// What kind of failure a fetch met, as far as the fetcher can tell.
///
/// The engine judges source health by these: when most recent outcomes of one source fail with
/// the same cause (every key answers 401, every key gets an HTML maintenance page), the source is
/// in outage, however "permanent" each single answer looks, and none of its keys is dead-lettered.
/// A cause that only one key meets while the others succeed is evidence about that key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum FailureCause {
    /// The source refused the credentials (HTTP 401/403, an expired token).
    Auth,
    /// The answer had the wrong content type (a login or maintenance page in HTML).
    ContentType,
    /// The body could not be decoded (not JSON, no id or version where one is configured).
    Decode,
    /// The source failed (HTTP 5xx).
    Server,
    /// The request timed out.
    Timeout,
    /// The source could not be reached (connection refused, DNS, TLS).
    Connect,
    /// The source asked to slow down (HTTP 429). Throttling, not failure: a breaker must not
    /// count it as a failed call.
    Throttled,
    /// The fetched state is older than the notified version (a replica or cache behind).
    Stale,
    /// No request could be made for this key (an id that cannot be placed in a URL): evidence
    /// about the key alone, never about its source.
    Key,
    /// Anything else (a 4xx for this key, a body over the size limit, ...).
    #[default]
    Other,
}

impl FailureCause {
    /// A stable label for metrics, logs and dead-letter headers.
    pub fn label(&self) -> &'static str {
        match self {
            FailureCause::Auth => "auth",
            FailureCause::ContentType => "content_type",
            FailureCause::Decode => "decode",
            FailureCause::Server => "server",
            FailureCause::Timeout => "timeout",
            FailureCause::Connect => "connect",
            FailureCause::Throttled => "throttled",
            FailureCause::Stale => "stale",
            FailureCause::Key => "key",
            FailureCause::Other => "other",
        }
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
        /// What kind of failure it was.
        cause: FailureCause,
    },
    /// The source will keep refusing this key (a 4xx other than 404/410/429, an unparsable body,
    /// an id that cannot be placed in a URL).
    #[error("permanent fetch error: {message}")]
    Permanent {
        /// What happened.
        message: String,
        /// What kind of failure it was.
        cause: FailureCause,
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
            cause: FailureCause::Other,
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        FetchError::Permanent {
            message: message.into(),
            cause: FailureCause::Other,
        }
    }

    /// A request that was not made (breaker open, shutting down), to be tried again after
    /// `retry_after` when given.
    pub fn not_attempted(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        FetchError::NotAttempted {
            message: message.into(),
            retry_after,
        }
    }

    /// The same error with `cause` (no effect on [`FetchError::NotAttempted`]).
    pub fn with_cause(mut self, new: FailureCause) -> Self {
        match &mut self {
            FetchError::Transient { cause, .. } | FetchError::Permanent { cause, .. } => {
                *cause = new
            }
            FetchError::NotAttempted { .. } => {}
        }
        self
    }

    /// The same error with a retry hint (no effect on a permanent error).
    pub fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        match &mut self {
            FetchError::Transient { retry_after, .. }
            | FetchError::NotAttempted { retry_after, .. } => *retry_after = after,
            FetchError::Permanent { .. } => {}
        }
        self
    }

    /// What kind of failure it was; `None` when no request was made.
    pub fn cause(&self) -> Option<FailureCause> {
        match self {
            FetchError::Transient { cause, .. } | FetchError::Permanent { cause, .. } => {
                Some(*cause)
            }
            FetchError::NotAttempted { .. } => None,
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
            | FetchError::Permanent { message, .. }
            | FetchError::NotAttempted { message, .. } => message,
        }
    }
}

/// How much of the consumer group's work this instance owns: partitions of the subscribed topics
/// it is assigned, out of all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OwnershipShare {
    /// Partitions assigned to this instance.
    pub owned: usize,
    /// Partitions of the subscribed topics in all (0 when unknown).
    pub total: usize,
}

impl OwnershipShare {
    /// The owned share in `[0, 1]`; 1 when the total is unknown.
    pub fn ratio(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            (self.owned as f64 / self.total as f64).clamp(0.0, 1.0)
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

    /// The source that serves `entity_type`: the unit of source health (outage detection, the
    /// gone guard) in the engine. Types served by one source share its health. The default is
    /// the entity type itself.
    fn source_name(&self, entity_type: &str) -> Arc<str> {
        Arc::from(entity_type)
    }

    /// The share of the subscribed topics' partitions that this instance owns changed (called
    /// after every assignment and revoke). A fetcher with a group-wide budget takes this share
    /// of it. The default ignores it.
    fn ownership_changed(&self, share: OwnershipShare) {
        let _ = share;
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
    fn source_name(&self, entity_type: &str) -> Arc<str> {
        (**self).source_name(entity_type)
    }
    fn ownership_changed(&self, share: OwnershipShare) {
        (**self).ownership_changed(share)
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
    fn source_name(&self, entity_type: &str) -> Arc<str> {
        (**self).source_name(entity_type)
    }
    fn ownership_changed(&self, share: OwnershipShare) {
        (**self).ownership_changed(share)
    }
    async fn fetch_batch(
        &self,
        requests: &[FetchRequest],
    ) -> Vec<Result<FetchOutcome, FetchError>> {
        (**self).fetch_batch(requests).await
    }
}
