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
