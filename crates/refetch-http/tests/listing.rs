//! Listings against the local source: every paging style pages through exactly the source's
//! entities, and listing requests share the source's concurrency limit and circuit breaker with
//! fetches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use refetch::{FetchError, Fetcher, Version};
use refetch_http::{BreakerConfig, HttpFetcher, ListingConfig, PageToken, Paging, SourceConfig};
use refetch_testkit::http_source::{Fault, HttpSource};
use serde_json::json;
use support::{fetcher, req, source, template};

fn listing(src: &HttpSource, paging: Paging) -> ListingConfig {
    let base = src.base_url();
    let (url, cursor_url) = match paging {
        Paging::Offset => (
            format!("{base}/customer?offset={{offset}}&limit={{limit}}"),
            None,
        ),
        Paging::Page => (
            format!("{base}/customer?page={{page}}&per_page={{limit}}"),
            None,
        ),
        Paging::Cursor => (
            format!("{base}/customer?limit={{limit}}"),
            Some(format!("{base}/customer?cursor={{cursor}}&limit={{limit}}")),
        ),
        Paging::Link => (format!("{base}/customer?limit={{limit}}"), None),
    };
    ListingConfig {
        url,
        paging,
        cursor_url,
        page_size: 6,
        total: Some("/total".into()),
        ..ListingConfig::default()
    }
}

async fn list_all(f: &HttpFetcher) -> (BTreeMap<String, Option<Version>>, usize) {
    let mut out = BTreeMap::new();
    let mut at: Option<PageToken> = None;
    let mut pages = 0;
    loop {
        let page = f.list_page("customer", at.as_ref()).await.unwrap();
        pages += 1;
        for item in page.items {
            assert!(out.insert(item.id, item.version).is_none(), "listed twice");
        }
        match page.next {
            Some(n) => at = Some(n),
            None => return (out, pages),
        }
    }
}

#[tokio::test]
async fn every_paging_style_lists_exactly_the_source() {
    let src = source().await;
    for i in 0..40 {
        src.put("customer", &format!("{i:02}"), json!({"i": i}));
    }
    // Ids that need encoding in a cursor, and a deleted entity (not listed).
    src.put("customer", "a/b c", json!({}));
    src.put("customer", "gone", json!({}));
    src.delete("customer", "gone");
    src.put("customer", "41", json!({"again": 1}));
    let want: BTreeMap<String, Option<Version>> = src
        .snapshot()
        .into_iter()
        .filter_map(|((_, id), s)| s.map(|(v, _)| (id, Some(Version::Int(v)))))
        .collect();
    assert_eq!(want.len(), 42);
    for paging in [Paging::Offset, Paging::Page, Paging::Cursor, Paging::Link] {
        let f = fetcher(SourceConfig {
            version: Some(refetch_http::VersionConfig {
                pointer: Some("/version".into()),
                header: None,
                kind: refetch::VersionKind::Integer,
            }),
            listing: Some(listing(&src, paging)),
            ..SourceConfig::new(template(&src))
        });
        let info = f.listing("customer").unwrap();
        assert_eq!(
            (info.paging, info.page_size, info.complete),
            (paging, 6, false)
        );
        let (got, pages) = list_all(&f).await;
        assert_eq!(got, want, "{paging:?}");
        assert!((7..=8).contains(&pages), "{paging:?}: {pages} pages");
        let first = f.list_page("customer", None).await.unwrap();
        assert_eq!(first.total, Some(42));
    }
}

#[tokio::test]
async fn listing_shares_the_concurrency_limit_and_the_breaker_with_fetches() {
    let src = source().await;
    for i in 0..10 {
        src.put("customer", &i.to_string(), json!({}));
    }
    src.set_latency(Duration::from_millis(30));
    let f = fetcher(SourceConfig {
        concurrency: 1,
        breaker: BreakerConfig {
            failures: 2,
            min_calls: 2,
            cooldown: Duration::from_secs(60),
            ..BreakerConfig::default()
        },
        listing: Some(listing(&src, Paging::Cursor)),
        ..SourceConfig::new(template(&src))
    });
    let fetches = (0..4).map(|i| {
        let f = &f;
        async move { f.fetch(&req(&i.to_string())).await.map(|_| ()) }
    });
    let lists = (0..3).map(|_| {
        let f = &f;
        async move { f.list_page("customer", None).await.map(|_| ()) }
    });
    let (a, b) = futures::join!(join_all(fetches), join_all(lists));
    assert!(a.iter().chain(b.iter()).all(Result::is_ok));
    assert_eq!(
        src.max_concurrent_requests(),
        1,
        "one request at a time in all"
    );

    // Failing listings open the breaker that fetches obey, and the other way round: the window
    // holds the 7 successes above, so the 7th failure makes half of the calls failed.
    src.set_latency(Duration::ZERO);
    src.set_fault(Some(Fault::Status(503)));
    for _ in 0..7 {
        assert!(!f.breaker_open("customer"));
        let e = f.list_page("customer", None).await.unwrap_err();
        assert!(matches!(e, FetchError::Transient { .. }), "{e:?}");
    }
    assert!(f.breaker_open("customer"));
    let before = src.total_requests();
    let e = f.fetch(&req("1")).await.unwrap_err();
    assert!(matches!(e, FetchError::NotAttempted { .. }), "{e:?}");
    let e = f.list_page("customer", None).await.unwrap_err();
    assert!(matches!(e, FetchError::NotAttempted { .. }), "{e:?}");
    assert_eq!(
        src.total_requests(),
        before,
        "no request while the breaker is open"
    );
}

#[tokio::test]
async fn a_listing_that_is_not_there_is_permanent() {
    let src = source().await;
    let mut l = listing(&src, Paging::Offset);
    l.url = format!("{}/nowhere/x?offset={{offset}}", src.base_url());
    let f = fetcher(SourceConfig {
        listing: Some(l),
        ..SourceConfig::new(template(&src))
    });
    let e = f.list_page("customer", None).await.unwrap_err();
    assert!(matches!(e, FetchError::Permanent { .. }), "{e:?}");
    let e = f.list_page("order", None).await.unwrap_err();
    assert!(e.to_string().contains("no listing"), "{e}");
}

#[tokio::test]
async fn the_total_may_come_from_a_response_header() {
    let src = source().await;
    for i in 0..13 {
        src.put("customer", &format!("{i:02}"), json!({}));
    }
    let by_header = |total: &str| {
        let cfg: ListingConfig = toml::from_str(&format!(
            "url = \"{}/customer?offset={{offset}}&limit={{limit}}\"\npage_size = 5\ntotal = {total}\n",
            src.base_url()
        ))
        .expect("valid");
        fetcher(SourceConfig {
            listing: Some(cfg),
            ..SourceConfig::new(template(&src))
        })
    };
    let header = by_header(r#"{ header = "X-Total-Count" }"#);
    let body = by_header(r#""/total""#);

    // The source reports the total in the body.
    assert_eq!(
        body.list_page("customer", None).await.unwrap().total,
        Some(13)
    );
    assert_eq!(
        header.list_page("customer", None).await.unwrap().total,
        None
    );

    // The source reports it only in a header (the body has no "total").
    src.set_total_header(Some("X-Total-Count"));
    let mut at = None;
    let mut totals = Vec::new();
    loop {
        let page = header.list_page("customer", at.as_ref()).await.unwrap();
        totals.push(page.total);
        match page.next {
            Some(next) => at = Some(next),
            None => break,
        }
    }
    assert_eq!(totals, [Some(13); 3], "on every page");
    assert_eq!(body.list_page("customer", None).await.unwrap().total, None);
}

#[test]
fn a_total_of_the_wrong_shape_is_a_clear_error() {
    let parse = |total: &str| {
        toml::from_str::<ListingConfig>(&format!(
            "url = \"http://h/c?offset={{offset}}\"\ntotal = {total}\n"
        ))
        .map(|c| c.total)
    };
    assert_eq!(
        parse(r#"{ header = "X-Total-Count" }"#).unwrap(),
        Some(refetch_http::ListingTotal::Header("X-Total-Count".into()))
    );
    assert_eq!(
        parse(r#"{ pointer = "/meta/count" }"#).unwrap(),
        Some(refetch_http::ListingTotal::Pointer("/meta/count".into()))
    );
    for (bad, says) in [
        (
            "42",
            "a JSON pointer such as \"/total\", or a table such as { header = \"X-Total-Count\" }",
        ),
        (
            r#""total""#,
            "for a response header write total = { header = \"total\" }",
        ),
        (r#"{ heder = "X-Total-Count" }"#, "unknown field `heder`"),
        (
            r#"{ header = "X Total" }"#,
            "\"X Total\" is not a valid header name",
        ),
        (
            r#"{ header = "X-Total-Count", pointer = "/total" }"#,
            "exactly one of header and pointer",
        ),
        ("{}", "exactly one of header and pointer"),
    ] {
        let e = parse(bad).expect_err(bad).to_string();
        assert!(e.contains(says), "{bad}: {e}");
        assert!(e.contains("line 2"), "the error points at the key: {e}");
        assert!(
            !e.contains("ListingTotal"),
            "no Rust type in the message: {e}"
        );
    }
}
