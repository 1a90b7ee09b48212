//! Listing sources: page through a source's collection endpoint (for backfill and reconcile).
//!
//! A notification-plus-pull pipeline only ever sees the entities that change. A *listing* is the
//! other half of the full-copy pattern: it names every entity that exists, page by page, so a new
//! target can be filled (`refetch backfill`) and drift can be found (`refetch reconcile`).
//!
//! A listing is configured per source (`[fetcher.sources.T.listing]`, see [`ListingConfig`]) and
//! pages in one of four styles ([`Paging`]): offset/limit, page number, cursor (a JSON pointer to
//! the next cursor in the body), or the `Link: <...>; rel="next"` header. Each item yields an id,
//! optionally a version, and (when the listing's items are complete entities) a body. The total
//! number of items, for progress and an ETA, comes from the body (`total = "/total"`) or from a
//! response header (`total = { header = "X-Total-Count" }`), see [`ListingTotal`].
//!
//! Every listing request goes through the *same* concurrency limit, rate limit and circuit
//! breaker as the entity type's fetches ([`HttpFetcher::list_page`]): a backfill takes its share
//! of the source's budget and never more, so change processing is not starved and the source is
//! not overloaded.
//!
//! Offset and page-number paging are best-effort: when entities are created or deleted while the
//! listing runs, items shift between pages and some are skipped or listed twice. Cursor and
//! `Link` paging over a stable sort order do not skip existing items. Reconcile repairs whatever a
//! listing missed.

use bytes::Bytes;
use refetch::decode::parse_version;
use refetch::{Entity, FetchError, Version, VersionKind};
use reqwest::header::{HeaderMap, HeaderName, LINK};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::fetcher::{ConfigError, HttpFetcher};
use crate::response;
use crate::template::{self, UrlTemplate};

/// How a listing endpoint pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Paging {
    /// `url` uses `{offset}` (0 first) and `{limit}`. Best-effort when the source changes.
    #[default]
    Offset,
    /// `url` uses `{page}` (starting at `first_page`) and `{limit}`. Best-effort like offsets.
    Page,
    /// `url` is the first page (may use `{limit}`); `cursor_url` uses `{cursor}` (and `{limit}`),
    /// the cursor being read from the body at `next_cursor`. The listing ends when it is absent,
    /// null or empty.
    Cursor,
    /// `url` is the first page; each answer's `Link: <...>; rel="next"` header names the next one
    /// (it must stay on the listing URL's scheme, host and port). The listing ends without one.
    Link,
}

/// A listing endpoint of a source: `[fetcher.sources.T.listing]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListingConfig {
    /// URL template of the listing (required), for example
    /// `https://crm.example/api/customers?offset={offset}&limit={limit}`. Placeholders:
    /// `{type}`, `{limit}`, and by paging style `{offset}` or `{page}`.
    pub url: String,
    /// `offset`, `page`, `cursor` or `link` (see the paging styles in `docs/backfill.md`).
    pub paging: Paging,
    /// With `paging = "cursor"`: URL template of the following pages, with `{cursor}`, for example
    /// `https://crm.example/api/customers?cursor={cursor}&limit={limit}`.
    pub cursor_url: Option<String>,
    /// Items asked for per page (`{limit}`).
    pub page_size: usize,
    /// The number of the first page with `paging = "page"`.
    pub first_page: u64,
    /// JSON pointer to the array of items in a page (`""` when the body is the array).
    pub items: String,
    /// JSON pointer to an item's id (a string or an integer).
    pub id: String,
    /// JSON pointer to an item's version. Unset: the source's `version.pointer`, if it has one.
    pub version: Option<String>,
    /// The kind of the items' versions. Unset: the source's `version.kind` (or `integer`).
    pub version_kind: Option<VersionKind>,
    /// With `paging = "cursor"`: JSON pointer to the next cursor in the body.
    pub next_cursor: String,
    /// Where the listing reports the total number of items, if it does (for progress and an
    /// ETA): a JSON pointer into the body (`total = "/total"`) or a response header
    /// (`total = { header = "X-Total-Count" }`). See [`ListingTotal`].
    pub total: Option<ListingTotal>,
    /// The items are complete entity states (the same JSON a fetch of the id returns), so a
    /// backfill may write them directly instead of fetching each id. Only items that carry a
    /// version are written directly; the others are fetched.
    pub complete: bool,
}

impl Default for ListingConfig {
    fn default() -> Self {
        ListingConfig {
            url: String::new(),
            paging: Paging::Offset,
            cursor_url: None,
            page_size: 100,
            first_page: 1,
            items: "/items".to_owned(),
            id: "/id".to_owned(),
            version: None,
            version_kind: None,
            next_cursor: "/next_cursor".to_owned(),
            total: None,
            complete: false,
        }
    }
}

/// Where a listing reports its total number of items.
///
/// In TOML a string is a JSON pointer into each page's body; a table names a response header
/// (or, spelled out, a pointer):
///
/// ```toml
/// total = "/total"                      # {"items": [...], "total": 1234}
/// total = { header = "X-Total-Count" }  # X-Total-Count: 1234
/// total = { pointer = "/meta/count" }
/// ```
///
/// The value is a non-negative integer (a JSON number, or a string of digits). A page whose total
/// is missing or unreadable simply has none; the listing goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListingTotal {
    /// A JSON pointer into the page's body, for example `/total`.
    Pointer(String),
    /// A response header, for example `X-Total-Count`.
    Header(String),
}

impl From<&str> for ListingTotal {
    /// A JSON pointer.
    fn from(pointer: &str) -> Self {
        ListingTotal::Pointer(pointer.to_owned())
    }
}

const TOTAL_SHAPE: &str = "a JSON pointer such as \"/total\", or a table such as \
     { header = \"X-Total-Count\" } or { pointer = \"/total\" }";

fn check_total_pointer(p: &str) -> Result<(), String> {
    if p.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "listing.total {p:?} is not a JSON pointer (it must start with '/'); for a response \
             header write total = {{ header = \"{p}\" }}"
        ))
    }
}

fn check_total_header(h: &str) -> Result<(), String> {
    HeaderName::from_bytes(h.as_bytes())
        .map(|_| ())
        .map_err(|_| format!("listing.total.header {h:?} is not a valid header name"))
}

impl Serialize for ListingTotal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            ListingTotal::Pointer(p) => serializer.serialize_str(p),
            ListingTotal::Header(h) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("header", h)?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for ListingTotal {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            header: Option<String>,
            pointer: Option<String>,
        }
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ListingTotal;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(TOTAL_SHAPE)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ListingTotal, E> {
                check_total_pointer(v).map_err(E::custom)?;
                Ok(ListingTotal::Pointer(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ListingTotal, A::Error> {
                use serde::de::Error;
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                match (t.header, t.pointer) {
                    (Some(h), None) => {
                        check_total_header(&h).map_err(A::Error::custom)?;
                        Ok(ListingTotal::Header(h))
                    }
                    (None, Some(p)) => {
                        check_total_pointer(&p).map_err(A::Error::custom)?;
                        Ok(ListingTotal::Pointer(p))
                    }
                    _ => Err(A::Error::custom(format!(
                        "listing.total needs exactly one of header and pointer: {TOTAL_SHAPE}"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// Where a listing page starts. Serializable, so a backfill can checkpoint it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "at", rename_all = "snake_case")]
pub enum PageToken {
    /// Offset paging: the offset.
    Offset(u64),
    /// Page-number paging: the page number.
    Page(u64),
    /// Cursor paging: the cursor.
    Cursor(String),
    /// `Link` paging: the next page's URL.
    Url(String),
}

/// One listed entity.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedItem {
    /// Its id.
    pub id: String,
    /// Its version, when the item carries one.
    pub version: Option<Version>,
    /// The entity state, when the listing is configured `complete` and the item carries a
    /// version.
    pub entity: Option<Entity>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    /// The items, in the order the source listed them.
    pub items: Vec<ListedItem>,
    /// Where the next page starts; `None` after the last page.
    pub next: Option<PageToken>,
    /// The total number of items, when the listing reports it.
    pub total: Option<u64>,
}

/// What a caller needs to know about a configured listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListingInfo {
    /// The paging style.
    pub paging: Paging,
    /// Items per page.
    pub page_size: usize,
    /// Whether items are complete entity states.
    pub complete: bool,
}

/// A compiled listing.
#[derive(Debug)]
pub(crate) struct Listing {
    url: UrlTemplate,
    cursor_url: Option<UrlTemplate>,
    paging: Paging,
    page_size: usize,
    first_page: u64,
    items: String,
    id: String,
    version: Option<(String, VersionKind)>,
    next_cursor: String,
    total: Option<TotalAt>,
    complete: bool,
}

/// A compiled [`ListingTotal`].
#[derive(Debug)]
enum TotalAt {
    Pointer(String),
    Header(HeaderName),
}

fn invalid(entity_type: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        entity_type: entity_type.to_owned(),
        message: message.into(),
    }
}

fn pointer(entity_type: &str, setting: &str, p: &str) -> Result<String, ConfigError> {
    if p.is_empty() || p.starts_with('/') {
        Ok(p.to_owned())
    } else {
        Err(invalid(
            entity_type,
            format!("listing.{setting} {p:?} is not a JSON pointer (it must start with '/')"),
        ))
    }
}

impl Listing {
    /// Check and compile `cfg`; `source_version` is the source's version pointer and kind.
    pub(crate) fn compile(
        entity_type: &str,
        cfg: &ListingConfig,
        source_version: Option<(Option<&str>, VersionKind)>,
    ) -> Result<Listing, ConfigError> {
        let template_err = |error| ConfigError::Template {
            entity_type: entity_type.to_owned(),
            error,
        };
        if cfg.url.is_empty() {
            return Err(invalid(entity_type, "listing.url is required"));
        }
        if cfg.page_size == 0 {
            return Err(invalid(entity_type, "listing.page_size must be at least 1"));
        }
        let known: &[&str] = match cfg.paging {
            Paging::Offset => &["type", "limit", "offset"],
            Paging::Page => &["type", "limit", "page"],
            Paging::Cursor | Paging::Link => &["type", "limit"],
        };
        let url = UrlTemplate::parse(&cfg.url, known).map_err(template_err)?;
        match cfg.paging {
            Paging::Offset if !url.uses("offset") => {
                return Err(invalid(entity_type, "listing.url must contain {offset}"));
            }
            Paging::Page if !url.uses("page") => {
                return Err(invalid(entity_type, "listing.url must contain {page}"));
            }
            _ => {}
        }
        let cursor_url = match (cfg.paging, &cfg.cursor_url) {
            (Paging::Cursor, Some(c)) => {
                let t =
                    UrlTemplate::parse(c, &["type", "limit", "cursor"]).map_err(template_err)?;
                if !t.uses("cursor") {
                    return Err(invalid(
                        entity_type,
                        "listing.cursor_url must contain {cursor}",
                    ));
                }
                Some(t)
            }
            (Paging::Cursor, None) => {
                return Err(invalid(
                    entity_type,
                    "listing.cursor_url is required with paging = \"cursor\"",
                ));
            }
            (_, Some(_)) => {
                return Err(invalid(
                    entity_type,
                    "listing.cursor_url is only used with paging = \"cursor\"",
                ));
            }
            (_, None) => None,
        };
        let kind = cfg
            .version_kind
            .or(source_version.map(|(_, k)| k))
            .unwrap_or(VersionKind::Integer);
        let version_pointer = match &cfg.version {
            Some(p) => Some(pointer(entity_type, "version", p)?),
            None => source_version.and_then(|(p, _)| p.map(str::to_owned)),
        };
        Ok(Listing {
            url,
            cursor_url,
            paging: cfg.paging,
            page_size: cfg.page_size,
            first_page: cfg.first_page,
            items: pointer(entity_type, "items", &cfg.items)?,
            id: pointer(entity_type, "id", &cfg.id)?,
            version: version_pointer.map(|p| (p, kind)),
            next_cursor: pointer(entity_type, "next_cursor", &cfg.next_cursor)?,
            total: match &cfg.total {
                None => None,
                Some(ListingTotal::Pointer(p)) => {
                    check_total_pointer(p).map_err(|m| invalid(entity_type, m))?;
                    Some(TotalAt::Pointer(p.clone()))
                }
                Some(ListingTotal::Header(h)) => Some(TotalAt::Header(
                    HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                        invalid(
                            entity_type,
                            format!("listing.total.header {h:?} is not a valid header name"),
                        )
                    })?,
                )),
            },
            complete: cfg.complete,
        })
    }

    pub(crate) fn info(&self) -> ListingInfo {
        ListingInfo {
            paging: self.paging,
            page_size: self.page_size,
            complete: self.complete,
        }
    }

    /// The URL of the page at `at` (`None`: the first page).
    pub(crate) fn page_url(
        &self,
        entity_type: &str,
        at: Option<&PageToken>,
    ) -> Result<Url, FetchError> {
        let limit = self.page_size.to_string();
        let render = |tpl: &UrlTemplate, extra: (&str, &str)| {
            tpl.render(|name| match name {
                "type" => Some(template::Value::Raw(entity_type)),
                "limit" => Some(template::Value::Raw(&limit)),
                n if n == extra.0 => Some(template::Value::Raw(extra.1)),
                _ => None,
            })
            .map_err(|e| FetchError::permanent(format!("cannot build the listing URL: {e}")))
        };
        let mismatch = || {
            FetchError::permanent(format!(
                "the checkpoint's page token {at:?} does not match paging = {:?}",
                self.paging
            ))
        };
        match (self.paging, at) {
            (Paging::Offset, None) => render(&self.url, ("offset", "0")),
            (Paging::Offset, Some(PageToken::Offset(o))) => {
                render(&self.url, ("offset", &o.to_string()))
            }
            (Paging::Page, None) => render(&self.url, ("page", &self.first_page.to_string())),
            (Paging::Page, Some(PageToken::Page(p))) => render(&self.url, ("page", &p.to_string())),
            (Paging::Cursor | Paging::Link, None) => render(&self.url, ("", "")),
            (Paging::Cursor, Some(PageToken::Cursor(c))) => match &self.cursor_url {
                Some(t) => render(t, ("cursor", c)),
                None => Err(mismatch()),
            },
            (Paging::Link, Some(PageToken::Url(u))) => {
                let first = render(&self.url, ("", ""))?;
                let next = Url::parse(u)
                    .map_err(|e| FetchError::permanent(format!("invalid next-page URL: {e}")))?;
                if same_origin(&first, &next) {
                    Ok(next)
                } else {
                    Err(FetchError::permanent(format!(
                        "the next-page link leaves the listing's origin ({})",
                        next.host_str().unwrap_or("?")
                    )))
                }
            }
            _ => Err(mismatch()),
        }
    }

    /// Interpret one page's answer.
    pub(crate) fn parse_page(
        &self,
        at: Option<&PageToken>,
        url: &Url,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<ListPage, FetchError> {
        let link = headers
            .get_all(LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let link = (!link.is_empty()).then_some(link);
        let doc: Value = serde_json::from_slice(body)
            .map_err(|e| response::decode_error(format!("listing body is not valid JSON: {e}")))?;
        let Some(Value::Array(raw_items)) = doc.pointer(&self.items) else {
            return Err(response::decode_error(format!(
                "listing body has no array at {:?}",
                self.items
            )));
        };
        let mut items = Vec::with_capacity(raw_items.len());
        for item in raw_items {
            let id = match item.pointer(&self.id) {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
                _ => {
                    tracing::warn!(pointer = %self.id, "listing item without an id; skipped");
                    continue;
                }
            };
            let version = self.version.as_ref().and_then(|(p, kind)| {
                item.pointer(p)
                    .filter(|v| !v.is_null())
                    .and_then(|v| parse_version(v, *kind).ok())
            });
            let entity = match (self.complete, version) {
                (true, Some(v)) => {
                    let bytes = serde_json::to_vec(item).map_err(|e| {
                        FetchError::permanent(format!("re-encoding a listing item: {e}"))
                    })?;
                    Some(Entity::json(bytes, Some(v)))
                }
                _ => None,
            };
            items.push(ListedItem {
                id,
                version,
                entity,
            });
        }
        let full = raw_items.len() >= self.page_size;
        let next = match self.paging {
            Paging::Offset => {
                let o = match at {
                    Some(PageToken::Offset(o)) => *o,
                    _ => 0,
                };
                full.then(|| PageToken::Offset(o + raw_items.len() as u64))
            }
            Paging::Page => {
                let p = match at {
                    Some(PageToken::Page(p)) => *p,
                    _ => self.first_page,
                };
                full.then(|| PageToken::Page(p + 1))
            }
            Paging::Cursor => match doc.pointer(&self.next_cursor) {
                _ if raw_items.is_empty() => None,
                Some(Value::String(s)) if !s.is_empty() => Some(PageToken::Cursor(s.clone())),
                Some(Value::Number(n)) => Some(PageToken::Cursor(n.to_string())),
                _ => None,
            },
            Paging::Link => match link.as_deref().and_then(next_link) {
                _ if raw_items.is_empty() => None,
                Some(target) => Some(PageToken::Url(
                    url.join(&target)
                        .map_err(|e| {
                            FetchError::permanent(format!("invalid Link rel=\"next\": {e}"))
                        })?
                        .to_string(),
                )),
                None => None,
            },
        };
        let total = match &self.total {
            None => None,
            Some(TotalAt::Pointer(p)) => doc.pointer(p).and_then(|v| match v {
                Value::String(s) => s.trim().parse().ok(),
                v => v.as_u64(),
            }),
            Some(TotalAt::Header(h)) => headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        };
        Ok(ListPage { items, next, total })
    }
}

/// The target of the `rel="next"` entry of a `Link` header value (RFC 8288), if any.
pub fn next_link(header: &str) -> Option<String> {
    for part in header.split(',') {
        let part = part.trim();
        let Some(rest) = part.strip_prefix('<') else {
            continue;
        };
        let Some((target, params)) = rest.split_once('>') else {
            continue;
        };
        let is_next = params.split(';').any(|p| {
            let p = p.trim();
            p.strip_prefix("rel=")
                .map(|v| v.trim_matches('"'))
                .is_some_and(|v| v.split_whitespace().any(|r| r.eq_ignore_ascii_case("next")))
        });
        if is_next {
            return Some(target.to_owned());
        }
    }
    None
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

impl HttpFetcher {
    /// The listing configured for `entity_type`, if any.
    pub fn listing(&self, entity_type: &str) -> Option<ListingInfo> {
        self.listing_of(entity_type).map(Listing::info)
    }

    /// Load one page of `entity_type`'s listing: the first with `at = None`, otherwise the page a
    /// previous [`ListPage::next`] named. The request shares the source's concurrency limit, rate
    /// limit and circuit breaker with fetches. Errors are classified like fetch errors: 429, 5xx
    /// and transport failures are transient (retry), anything else (including a 404) permanent.
    pub async fn list_page(
        &self,
        entity_type: &str,
        at: Option<&PageToken>,
    ) -> Result<ListPage, FetchError> {
        let Some(listing) = self.listing_of(entity_type) else {
            return Err(FetchError::permanent(format!(
                "no listing is configured for type {entity_type:?}"
            )));
        };
        let url = listing.page_url(entity_type, at)?;
        self.list_request(entity_type, url.clone(), |headers, body| {
            listing.parse_page(at, &url, headers, body)
        })
        .await
    }
}

/// Read a listing answer: the headers and the body, under the body limit. A status other than
/// 2xx is classified like a fetch's (see [`crate::response`]); a 404 is permanent (a listing
/// endpoint that is not there); with `expect_json`, a content type other than JSON is a
/// permanent `ContentType` error.
pub(crate) async fn read_listing(
    mut resp: reqwest::Response,
    body_limit: usize,
    expect_json: bool,
) -> Result<(HeaderMap, Bytes), FetchError> {
    let code = resp.status().as_u16();
    if !(200..=299).contains(&code) {
        return Err(response::status_error(&resp, "listing answered HTTP"));
    }
    let headers = resp.headers().clone();
    if expect_json
        && let Some(ct) = response::content_type(&headers)
        && !response::is_json_content_type(&ct)
    {
        return Err(FetchError::permanent(format!(
            "listing answered with content type {ct:?} where JSON is expected"
        ))
        .with_cause(refetch::FailureCause::ContentType));
    }
    let body = response::read_body(&mut resp, body_limit).await?;
    Ok((headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(toml_text: &str) -> Result<Listing, ConfigError> {
        let cfg: ListingConfig = toml::from_str(toml_text).unwrap();
        Listing::compile("c", &cfg, Some((Some("/version"), VersionKind::Integer)))
    }

    #[test]
    fn link_headers_name_the_next_page() {
        assert_eq!(
            next_link(r#"<http://h/c?page=1>; rel="prev", <http://h/c?page=3>; rel="next""#),
            Some("http://h/c?page=3".to_owned())
        );
        assert_eq!(
            next_link(r#"</c?cursor=9>; rel=next"#),
            Some("/c?cursor=9".into())
        );
        assert_eq!(next_link(r#"<http://h/c?page=1>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn configuration_is_checked() {
        assert!(compile(r#"url = "http://h/c?offset={offset}&limit={limit}""#).is_ok());
        for (bad, why) in [
            (r#"url = "http://h/c?limit={limit}""#, "{offset}"),
            (r#"url = "http://h/c?p={page}""#, "{page}"),
            (r#"url = "http://h/c""#, "{offset}"),
            (
                r#"url = "http://h/c"
paging = "cursor""#,
                "cursor_url",
            ),
            (
                r#"url = "http://h/c?offset={offset}"
page_size = 0"#,
                "page_size",
            ),
            (
                r#"url = "http://h/c?offset={offset}"
items = "items""#,
                "JSON pointer",
            ),
        ] {
            let e = compile(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn pages_follow_each_style() {
        let body = Bytes::from(
            r#"{"items":[{"id":"a","version":3},{"id":7,"version":1},{"nope":1}],"next_cursor":"7","total":40}"#,
        );
        let url = Url::parse("http://h/c").unwrap();
        let offset = compile(
            r#"url = "http://h/c?offset={offset}&limit={limit}"
page_size = 2
total = "/total""#,
        )
        .unwrap();
        let p = offset
            .parse_page(Some(&PageToken::Offset(4)), &url, &HeaderMap::new(), &body)
            .unwrap();
        assert_eq!(p.items.len(), 2, "the item without an id is skipped");
        assert_eq!(p.items[1].id, "7");
        assert_eq!(p.items[0].version, Some(Version::Int(3)));
        assert!(p.items[0].entity.is_none(), "not complete");
        assert_eq!(p.next, Some(PageToken::Offset(7)));
        assert_eq!(p.total, Some(40));

        let short = compile(
            r#"url = "http://h/c?page={page}"
paging = "page"
page_size = 5
complete = true"#,
        )
        .unwrap();
        let p = short
            .parse_page(None, &url, &HeaderMap::new(), &body)
            .unwrap();
        assert_eq!(p.next, None, "a short page is the last");
        assert!(p.items[0].entity.is_some());
        assert_eq!(
            short
                .page_url("c", Some(&PageToken::Page(3)))
                .unwrap()
                .as_str(),
            "http://h/c?page=3"
        );

        let cursor = compile(
            r#"url = "http://h/c?limit={limit}"
paging = "cursor"
cursor_url = "http://h/c?cursor={cursor}&limit={limit}""#,
        )
        .unwrap();
        let p = cursor
            .parse_page(None, &url, &HeaderMap::new(), &body)
            .unwrap();
        assert_eq!(p.next, Some(PageToken::Cursor("7".into())));
        assert_eq!(
            cursor
                .page_url("c", Some(&PageToken::Cursor("a b/c".into())))
                .unwrap()
                .as_str(),
            "http://h/c?cursor=a%20b%2Fc&limit=100"
        );
        assert!(cursor.page_url("c", Some(&PageToken::Offset(1))).is_err());

        let link = compile(
            r#"url = "http://h/c"
paging = "link""#,
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(LINK, r#"</c?cursor=7>; rel="next""#.parse().unwrap());
        let p = link.parse_page(None, &url, &headers, &body).unwrap();
        assert_eq!(p.next, Some(PageToken::Url("http://h/c?cursor=7".into())));
        let away = PageToken::Url("http://elsewhere/c?cursor=7".into());
        assert!(link.page_url("c", Some(&away)).is_err(), "no other origin");
    }
}
