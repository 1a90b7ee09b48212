//! The checks behind the fuzz targets, shared with the replay tests of the normal test run
//! (`tests/fuzz_replay.rs` includes this file), so the corpus is exercised on every run.
//!
//! Each check feeds untrusted bytes to one parser and asserts its contract: no panic, and a
//! result that keeps the parser's promises.

#![allow(dead_code)]

use refetch::decode::{
    Decoded, JsonDecoder, NotificationDecoder, RecordKeyDecoder, RecordView, Route,
};
use refetch::{EntityKey, FetchRequest, VersionKind};
use refetch_http::{HttpFetcher, SourceConfig};

/// Decoders of every built-in kind, as configurations commonly set them up.
pub fn decoders() -> Vec<Box<dyn NotificationDecoder>> {
    vec![
        Box::new(
            JsonDecoder::fixed_type("customer", "/id").with_version("/v", VersionKind::Integer),
        ),
        Box::new(
            JsonDecoder::typed("/type", "/id")
                .with_version("/ts", VersionKind::Timestamp)
                .with_field("tenant", "/tenant")
                .with_route(Route {
                    from_type: "address".into(),
                    to_type: "customer".into(),
                    id_pointer: "/customer_id".into(),
                    version_pointer: None,
                }),
        ),
        // A nested pointer takes the full-parse path.
        Box::new(
            JsonDecoder::fixed_type("order", "/data/order/id")
                .with_version("/data/rev", VersionKind::Integer),
        ),
        Box::new(RecordKeyDecoder::new("customer")),
    ]
}

/// Decoding arbitrary bytes (as payload and as key) never panics, and a decoded notification
/// always has a non-empty id and type.
pub fn decode_json(data: &[u8]) {
    let split = data.len() / 3;
    let view = RecordView {
        topic: "t",
        partition: 0,
        offset: 0,
        key: Some(&data[..split]),
        payload: Some(data),
        headers: &[],
        timestamp: None,
    };
    for d in decoders() {
        if let Ok(Decoded::Notification(n)) = d.decode(&view) {
            assert!(!n.key.id().is_empty(), "empty id decoded from {data:?}");
            assert!(
                !n.key.entity_type().is_empty(),
                "empty type decoded from {data:?}"
            );
        }
    }
}

const HOST: &str = "source.example";

/// The fetcher the URL checks use, built once per process.
pub fn shared_fetcher() -> &'static HttpFetcher {
    static FETCHER: std::sync::LazyLock<HttpFetcher> = std::sync::LazyLock::new(fetcher);
    &FETCHER
}

fn fetcher() -> HttpFetcher {
    HttpFetcher::builder()
        .source(
            "path",
            SourceConfig::new(format!("http://{HOST}/api/v1/{{type}}/{{id}}/details")),
        )
        .source(
            "query",
            SourceConfig::new(format!("http://{HOST}/api/items?id={{id}}&expand=1")),
        )
        .build()
        .expect("valid templates")
}

/// An arbitrary id placed in URL templates either renders to a URL that keeps the template's
/// scheme, host and path shape (the id is exactly one path segment, or one query value), or is
/// refused before any request.
pub fn url_template(data: &[u8]) {
    let id = String::from_utf8_lossy(data);
    check_id(shared_fetcher(), &id);
}

/// [`url_template`] for one id string.
pub fn check_id(fetcher: &HttpFetcher, id: &str) {
    let url = fetcher.url_for(&FetchRequest::new(EntityKey::new("path", id)));
    if let Ok(url) = url {
        assert_eq!(url.scheme(), "http", "{id:?} -> {url}");
        assert_eq!(url.host_str(), Some(HOST), "{id:?} -> {url}");
        assert!(
            url.query().is_none() && url.fragment().is_none(),
            "{id:?} -> {url}"
        );
        let segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
        assert_eq!(
            segments.len(),
            5,
            "the id must stay one segment: {id:?} -> {url}"
        );
        assert_eq!(&segments[..3], ["api", "v1", "path"], "{id:?} -> {url}");
        assert_eq!(segments[4], "details", "{id:?} -> {url}");
        assert!(!matches!(segments[3], "" | "." | ".."), "{id:?} -> {url}");
    }
    let url = fetcher.url_for(&FetchRequest::new(EntityKey::new("query", id)));
    if let Ok(url) = url {
        assert_eq!(url.host_str(), Some(HOST), "{id:?} -> {url}");
        assert_eq!(url.path(), "/api/items", "{id:?} -> {url}");
        assert!(url.fragment().is_none(), "{id:?} -> {url}");
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        assert_eq!(
            pairs.len(),
            2,
            "the id must stay one query value: {id:?} -> {url}"
        );
        assert_eq!(
            pairs[0],
            ("id".to_owned(), id.to_owned()),
            "{id:?} -> {url}"
        );
        assert_eq!(
            pairs[1],
            ("expand".to_owned(), "1".to_owned()),
            "{id:?} -> {url}"
        );
    }
}

/// Arbitrary text as the HTTP fetcher's and the sinks' configuration never panics; a fetcher
/// configuration that parses either builds or is refused with an error.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = toml::from_str::<refetch_http::HttpFetcherConfig>(text) {
        let _ = HttpFetcher::from_config(cfg);
    }
    let _ = toml::from_str::<refetch_sinks::SinkConfig>(text);
}
