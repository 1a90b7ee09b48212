//! Every failure the fetcher returns carries its class and its `FailureCause`, exactly as the
//! table in `docs/http-fetcher.md` states, against a real local source (and a real DNS lookup
//! and TLS handshake that fail).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use refetch::{FailureCause, FetchError, FetchOutcome, Fetcher};
use refetch_http::{
    BatchConfig, BreakerConfig, HttpFetcher, ListingConfig, NotFoundConfig, Paging, SourceConfig,
    VersionConfig,
};
use refetch_testkit::http_source::Fault;
use serde_json::json;
use support::{req, source, template};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Transient,
    Permanent,
}

fn classify<T: std::fmt::Debug>(r: Result<T, FetchError>) -> (Class, FailureCause, String) {
    match r {
        Err(FetchError::Transient { cause, message, .. }) => (Class::Transient, cause, message),
        Err(FetchError::Permanent { cause, message }) => (Class::Permanent, cause, message),
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// A source config without a breaker, so each answer is classified on its own.
fn plain(url: String) -> SourceConfig {
    SourceConfig {
        breaker: BreakerConfig {
            failures: 0,
            ..BreakerConfig::default()
        },
        timeout: Duration::from_millis(500),
        ..SourceConfig::new(url)
    }
}

fn build(cfg: SourceConfig) -> HttpFetcher {
    HttpFetcher::builder()
        .source("customer", cfg)
        .build()
        .expect("valid configuration")
}

#[tokio::test]
async fn http_answers_carry_their_class_and_cause() {
    use Class::{Permanent as P, Transient as T};
    use FailureCause::*;
    let src = source().await;
    src.put("customer", "1", json!({"name": "Ada"}));
    let f = build(SourceConfig {
        body_limit: 64 * 1024,
        not_found: Some(NotFoundConfig {
            pointer: Some("/error".into()),
            equals: Some("not_found".into()),
            contains: None,
        }),
        ..plain(template(&src))
    });
    let other = source().await;
    let cases: Vec<(Fault, Class, FailureCause)> = vec![
        (Fault::Status(401), P, Auth),
        (Fault::Status(403), P, Auth),
        (Fault::Html, P, ContentType),
        // JSON content type, a body of spaces: not decodable.
        (Fault::HugeBody(10), P, Decode),
        (Fault::Status(500), T, Server),
        (Fault::Status(502), T, Server),
        (Fault::Status(503), T, Server),
        (Fault::Status(408), T, Timeout),
        (Fault::Status(429), T, Throttled),
        (
            Fault::RetryAfter {
                status: 429,
                value: "3".into(),
            },
            T,
            Throttled,
        ),
        (Fault::Status(400), P, Other),
        (Fault::Status(422), P, Other),
        (Fault::Status(409), P, Other),
        // A gateway's 404, not the source's own not-found answer.
        (Fault::GatewayNotFound, T, Server),
        // 304 to a request that sent no validators.
        (Fault::Status(304), T, Server),
        (Fault::Redirect(other.base_url()), P, Other),
        (Fault::HugeBody(1024 * 1024), P, Other),
        (Fault::DropMidBody, T, Connect),
        (Fault::Trickle(Duration::from_millis(100)), T, Timeout),
    ];
    for (fault, class, cause) in cases {
        src.fail_next(1, fault.clone());
        let (got_class, got_cause, message) = classify(f.fetch(&req("1")).await);
        assert_eq!(
            (got_class, got_cause),
            (class, cause),
            "{fault:?}: {message}"
        );
    }
    // 429 keeps its Retry-After.
    src.fail_next(
        1,
        Fault::RetryAfter {
            status: 429,
            value: "3".into(),
        },
    );
    match f.fetch(&req("1")).await {
        Err(FetchError::Transient { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(3)));
        }
        other => panic!("{other:?}"),
    }
    // The source recovered: a plain success, nothing left queued.
    assert!(matches!(
        f.fetch(&req("1")).await,
        Ok(FetchOutcome::Found(_))
    ));
}

#[tokio::test]
async fn decoding_rules_fail_as_decode() {
    let src = source().await;
    src.put("customer", "1", json!({"name": "Ada"}));
    for cfg in [
        SourceConfig {
            version: Some(VersionConfig {
                pointer: Some("/no/version".into()),
                header: None,
                kind: refetch::VersionKind::Integer,
            }),
            ..plain(template(&src))
        },
        SourceConfig {
            version: Some(VersionConfig {
                pointer: None,
                header: Some("X-No-Version".into()),
                kind: refetch::VersionKind::Integer,
            }),
            ..plain(template(&src))
        },
        SourceConfig {
            envelope: Some("/no/envelope".into()),
            ..plain(template(&src))
        },
    ] {
        let (class, cause, message) = classify(build(cfg).fetch(&req("1")).await);
        assert_eq!(
            (class, cause),
            (Class::Permanent, FailureCause::Decode),
            "{message}"
        );
    }
}

#[tokio::test]
async fn transport_failures_are_timeout_or_connect() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    let f = build(plain(template(&src)));

    src.set_latency(Duration::from_secs(3));
    let (class, cause, m) = classify(f.fetch(&req("1")).await);
    assert_eq!(
        (class, cause),
        (Class::Transient, FailureCause::Timeout),
        "{m}"
    );
    src.set_latency(Duration::ZERO);

    src.set_down(true).await.expect("down");
    let (class, cause, m) = classify(f.fetch(&req("1")).await);
    assert_eq!(
        (class, cause),
        (Class::Transient, FailureCause::Connect),
        "{m}"
    );
    src.set_down(false).await.expect("up");

    // A name that does not resolve (`.invalid` never does).
    let dns = build(plain(
        "http://refetch-no-such-host.invalid/customer/{id}".into(),
    ));
    let (class, cause, m) = classify(dns.fetch(&req("1")).await);
    assert_eq!(
        (class, cause),
        (Class::Transient, FailureCause::Connect),
        "{m}"
    );

    // TLS to a port that speaks plain HTTP: the handshake fails.
    let tls = build(plain(format!("https://{}/customer/{{id}}", src.addr())));
    let (class, cause, m) = classify(tls.fetch(&req("1")).await);
    assert_eq!(
        (class, cause),
        (Class::Transient, FailureCause::Connect),
        "{m}"
    );

    // An id that cannot be a path segment: refused before any request.
    let before = src.total_requests();
    let (class, cause, m) = classify(f.fetch(&req("..")).await);
    assert_eq!((class, cause), (Class::Permanent, FailureCause::Key), "{m}");
    assert_eq!(src.total_requests(), before);
}

#[tokio::test]
async fn listing_and_batch_failures_are_classified_like_fetches() {
    let src = source().await;
    for i in 0..3 {
        src.put("customer", &i.to_string(), json!({}));
    }
    let f = Arc::new(build(SourceConfig {
        listing: Some(ListingConfig {
            url: format!(
                "{}/customer?offset={{offset}}&limit={{limit}}",
                src.base_url()
            ),
            paging: Paging::Offset,
            ..ListingConfig::default()
        }),
        batch: Some(BatchConfig {
            url: format!("{}/customer?ids={{ids}}", src.base_url()),
            ..BatchConfig::default()
        }),
        ..plain(template(&src))
    }));
    for (fault, class, cause) in [
        (Fault::Status(401), Class::Permanent, FailureCause::Auth),
        (Fault::Status(503), Class::Transient, FailureCause::Server),
        (
            Fault::Status(429),
            Class::Transient,
            FailureCause::Throttled,
        ),
        (Fault::Html, Class::Permanent, FailureCause::ContentType),
        (Fault::HugeBody(10), Class::Permanent, FailureCause::Decode),
    ] {
        src.fail_next(1, fault.clone());
        let (c, k, m) = classify(f.list_page("customer", None).await);
        assert_eq!((c, k), (class, cause), "listing, {fault:?}: {m}");
    }
    // A transient batch failure is every key's, with its cause.
    src.fail_next(1, Fault::Status(503));
    let results = f.fetch_batch(&[req("0"), req("1"), req("2")]).await;
    for r in results {
        let (c, k, m) = classify(r);
        assert_eq!((c, k), (Class::Transient, FailureCause::Server), "{m}");
    }
    // A login page for the batch and for each key alone: every key says ContentType.
    src.fail_next(4, Fault::Html);
    let results = f.fetch_batch(&[req("0"), req("1"), req("2")]).await;
    for r in results {
        let (c, k, m) = classify(r);
        assert_eq!((c, k), (Class::Permanent, FailureCause::ContentType), "{m}");
    }
}

#[tokio::test]
async fn each_type_is_its_own_source() {
    let src = source().await;
    let f = HttpFetcher::builder()
        .source("customer", SourceConfig::new(template(&src)))
        .source(
            "order",
            SourceConfig::new(format!("{}/order/{{id}}", src.base_url())),
        )
        .build()
        .expect("valid");
    assert_eq!(&*f.source_name("customer"), "customer");
    assert_eq!(&*f.source_name("order"), "order");
    assert_eq!(&*f.source_name("unknown"), "unknown");
}
