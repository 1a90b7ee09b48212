//! What a table sink holds for one key, as its read helpers return it.

use refetch::{EntityKey, Version};

/// A body as a table sink stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredBody {
    /// A JSON body (the `body` column), parsed.
    Json(serde_json::Value),
    /// Any other body (the `body_raw` column), verbatim.
    Raw(Vec<u8>),
}

/// One row of a table sink.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEntity {
    /// The entity.
    pub key: EntityKey,
    /// The version written with the state (kept on a tombstone).
    pub version: Option<Version>,
    /// The content type written with the state.
    pub content_type: Option<String>,
    /// The state, `None` for a tombstone.
    pub body: Option<StoredBody>,
    /// `true` for a tombstone row.
    pub deleted: bool,
}

/// A held key and version, as [`list_versions`](crate::postgres::PostgresSink::list_versions)
/// pages them for reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldVersion {
    /// The entity.
    pub key: EntityKey,
    /// Its held version, if it has one.
    pub version: Option<Version>,
    /// `true` for a tombstone row.
    pub deleted: bool,
}

/// Build a [`StoredBody`] from the two body columns (`body` as JSON text, `body_raw`).
pub(crate) fn stored_body(json: Option<String>, raw: Option<Vec<u8>>) -> Option<StoredBody> {
    if let Some(text) = json {
        return Some(match serde_json::from_str(&text) {
            Ok(v) => StoredBody::Json(v),
            Err(_) => StoredBody::Raw(text.into_bytes()),
        });
    }
    raw.map(StoredBody::Raw)
}
