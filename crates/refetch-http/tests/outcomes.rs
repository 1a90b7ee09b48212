//! Every outcome class of the HTTP fetcher against a real local source.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use refetch::{FetchError, FetchOutcome, Fetcher, Validators, Version, VersionKind};
use refetch_http::{NotFoundConfig, SourceConfig, VersionConfig};
use refetch_testkit::http_source::Fault;
use serde_json::{Value, json};
use support::{fetcher, req, source, template};

fn found(outcome: Result<FetchOutcome, FetchError>) -> refetch::Entity {
    match outcome {
        Ok(FetchOutcome::Found(e)) => e,
        other => panic!("expected Found, got {other:?}"),
    }
}

fn transient(outcome: Result<FetchOutcome, FetchError>) -> (String, Option<Duration>) {
    match outcome {
        Err(FetchError::Transient {
            message,
            retry_after,
            ..
        }) => (message, retry_after),
        other => panic!("expected a transient error, got {other:?}"),
    }
}

fn permanent(outcome: Result<FetchOutcome, FetchError>) -> String {
    match outcome {
        Err(FetchError::Permanent { message, .. }) => message,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

#[tokio::test]
async fn found_with_version_from_body_or_header_and_envelope() {
    let src = source().await;
    src.put("customer", "1", json!({"name": "Ada"}));
    let v = src.put("customer", "1", json!({"name": "Ada L."}));

    let by_pointer = fetcher(SourceConfig {
        version: Some(VersionConfig {
            pointer: Some("/version".into()),
            header: None,
            kind: VersionKind::Integer,
        }),
        ..SourceConfig::new(template(&src))
    });
    let e = found(by_pointer.fetch(&req("1")).await);
    assert_eq!(e.version, Some(Version::Int(v)));
    assert_eq!(e.content_type.as_deref(), Some("application/json"));
    let body: Value = serde_json::from_slice(&e.body).expect("json");
    assert_eq!(body["data"]["name"], "Ada L.");

    let by_header = fetcher(SourceConfig {
        version: Some(VersionConfig {
            pointer: None,
            header: Some("X-Version".into()),
            kind: VersionKind::Integer,
        }),
        envelope: Some("/data".into()),
        ..SourceConfig::new(template(&src))
    });
    let e = found(by_header.fetch(&req("1")).await);
    assert_eq!(e.version, Some(Version::Int(v)));
    assert_eq!(&e.body[..], br#"{"name":"Ada L."}"#);
}

#[tokio::test]
async fn not_found_is_gone_unless_the_body_is_not_the_sources_answer() {
    let src = source().await;
    let plain = fetcher(SourceConfig::new(template(&src)));
    assert_eq!(plain.fetch(&req("missing")).await, Ok(FetchOutcome::Gone));
    src.fail_next(1, Fault::Status(410));
    assert_eq!(plain.fetch(&req("missing")).await, Ok(FetchOutcome::Gone));

    let strict = fetcher(SourceConfig {
        not_found: Some(NotFoundConfig {
            pointer: Some("/error".into()),
            equals: Some("not_found".into()),
            contains: None,
        }),
        ..SourceConfig::new(template(&src))
    });
    assert_eq!(strict.fetch(&req("missing")).await, Ok(FetchOutcome::Gone));
    src.put("customer", "1", json!({}));
    src.fail_next(1, Fault::GatewayNotFound);
    let (message, _) = transient(strict.fetch(&req("1")).await);
    assert!(
        message.contains("not the source's not-found answer"),
        "{message}"
    );
    // A misrouted request (a wrong template) gets the router's 404, not the source's.
    let misrouted = fetcher(SourceConfig {
        not_found: strict_matcher(),
        ..SourceConfig::new(format!("{}/api/customer/{{id}}", src.base_url()))
    });
    transient(misrouted.fetch(&req("1")).await);
}

fn strict_matcher() -> Option<NotFoundConfig> {
    Some(NotFoundConfig {
        pointer: None,
        equals: None,
        contains: Some("not_found".into()),
    })
}

#[tokio::test]
async fn conditional_fetches_send_validators_and_return_new_ones() {
    let src = source().await;
    src.put("customer", "1", json!({"a": 1}));
    let f = fetcher(SourceConfig::new(template(&src)));
    let first = found(f.fetch(&req("1")).await);
    let validators = first.validators.clone().expect("validators");
    assert_eq!(validators.etag.as_deref(), Some("\"v1\""));
    assert!(validators.last_modified.is_some());

    let mut conditional = req("1");
    conditional.validators = Some(validators.clone());
    assert_eq!(f.fetch(&conditional).await, Ok(FetchOutcome::Unchanged));
    let sent = src.recorded().pop().expect("recorded");
    assert_eq!(sent.header("if-none-match"), Some("\"v1\""));
    assert_eq!(
        sent.header("if-modified-since"),
        validators.last_modified.as_deref()
    );

    src.put("customer", "1", json!({"a": 2}));
    let second = found(f.fetch(&conditional).await);
    assert_eq!(
        second.validators.and_then(|v| v.etag).as_deref(),
        Some("\"v2\"")
    );

    // Only Last-Modified: the source compares dates.
    let mut by_date = req("1");
    by_date.validators = Some(Validators {
        etag: None,
        last_modified: Some("Fri, 01 Jan 2100 00:00:00 GMT".into()),
    });
    assert_eq!(f.fetch(&by_date).await, Ok(FetchOutcome::Unchanged));

    // A 304 to a request that carried no validators is not trusted.
    src.fail_next(1, Fault::Status(304));
    transient(f.fetch(&req("1")).await);
}

#[tokio::test]
async fn transient_failures_honour_retry_after() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    let f = fetcher(SourceConfig {
        breaker: refetch_http::BreakerConfig {
            failures: 0,
            ..Default::default()
        },
        ..SourceConfig::new(template(&src))
    });
    src.fail_next(1, Fault::Status(500));
    let (message, retry_after) = transient(f.fetch(&req("1")).await);
    assert_eq!((message.as_str(), retry_after), ("HTTP 500", None));

    src.fail_next(
        1,
        Fault::RetryAfter {
            status: 429,
            value: "7".into(),
        },
    );
    let (_, retry_after) = transient(f.fetch(&req("1")).await);
    assert_eq!(retry_after, Some(Duration::from_secs(7)));

    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(30);
    let date = jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&at)
        .expect("date");
    src.fail_next(
        1,
        Fault::RetryAfter {
            status: 503,
            value: date,
        },
    );
    let (_, retry_after) = transient(f.fetch(&req("1")).await);
    let retry_after = retry_after.expect("a hint");
    assert!(
        retry_after >= Duration::from_secs(28) && retry_after <= Duration::from_secs(30),
        "{retry_after:?}"
    );

    assert!(found(f.fetch(&req("1")).await).version.is_none());
}

#[tokio::test]
async fn other_client_errors_are_permanent() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    src.poison("customer", "1", Fault::Status(400));
    let f = fetcher(SourceConfig::new(template(&src)));
    assert_eq!(permanent(f.fetch(&req("1")).await), "HTTP 400");
    src.poison("customer", "1", Fault::Status(401));
    assert_eq!(permanent(f.fetch(&req("1")).await), "HTTP 401");
}

#[tokio::test]
async fn timeouts_connection_errors_and_cut_bodies_are_transient() {
    let src = source().await;
    src.put("customer", "1", json!({"long": "x".repeat(4000)}));
    let f = fetcher(SourceConfig {
        timeout: Duration::from_millis(300),
        breaker: refetch_http::BreakerConfig {
            failures: 0,
            ..Default::default()
        },
        ..SourceConfig::new(template(&src))
    });

    src.set_latency(Duration::from_secs(3));
    let (message, _) = transient(f.fetch(&req("1")).await);
    assert!(message.contains("timed out"), "{message}");
    src.set_latency(Duration::ZERO);

    src.fail_next(1, Fault::Trickle(Duration::from_millis(50)));
    let (message, _) = transient(f.fetch(&req("1")).await);
    assert!(message.contains("timed out"), "{message}");

    src.fail_next(1, Fault::DropMidBody);
    let (message, _) = transient(f.fetch(&req("1")).await);
    assert!(message.contains("mid-body"), "{message}");

    src.set_down(true).await.expect("down");
    let (message, _) = transient(f.fetch(&req("1")).await);
    assert!(message.contains("connection failed"), "{message}");
    src.set_down(false).await.expect("up");
    found(f.fetch(&req("1")).await);
}

#[tokio::test]
async fn bodies_over_the_limit_html_and_bad_json_are_permanent() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    let f = fetcher(SourceConfig {
        body_limit: 1024 * 1024,
        ..SourceConfig::new(template(&src))
    });
    src.fail_next(1, Fault::HugeBody(20 * 1024 * 1024));
    let started = Instant::now();
    assert_eq!(
        permanent(f.fetch(&req("1")).await),
        "body larger than 1048576 bytes"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    src.fail_next(1, Fault::Html);
    let message = permanent(f.fetch(&req("1")).await);
    assert!(message.contains("text/html"), "{message}");

    // JSON content type, body that is not JSON: the huge body is spaces only.
    let small = fetcher(SourceConfig::new(template(&src)));
    src.fail_next(1, Fault::HugeBody(10));
    let message = permanent(small.fetch(&req("1")).await);
    assert!(message.contains("not valid JSON"), "{message}");

    // Without JSON expectations the same body is fine.
    let raw = fetcher(SourceConfig {
        expect_json: false,
        ..SourceConfig::new(template(&src))
    });
    src.fail_next(1, Fault::Html);
    let e = found(raw.fetch(&req("1")).await);
    assert!(
        e.content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("text/html"))
    );
}

#[tokio::test]
async fn redirects_to_another_host_are_not_followed_unless_configured() {
    let src = source().await;
    let other = source().await;
    src.put("customer", "1", json!({"at": "home"}));
    other.put("customer", "1", json!({"at": "elsewhere"}));
    let f = fetcher(SourceConfig::new(template(&src)));

    src.fail_next(1, Fault::Redirect(other.base_url()));
    let message = permanent(f.fetch(&req("1")).await);
    assert!(message.contains("another host"), "{message}");
    assert_eq!(other.total_requests(), 0);

    // Same host: followed.
    src.fail_next(1, Fault::Redirect(src.base_url()));
    let e = found(f.fetch(&req("1")).await);
    assert!(String::from_utf8_lossy(&e.body).contains("home"));

    // A redirect loop stops at the limit.
    src.set_fault(Some(Fault::Redirect(src.base_url())));
    let message = permanent(f.fetch(&req("1")).await);
    assert!(message.contains("too many redirects"), "{message}");
    src.clear_faults();

    let follows = fetcher(SourceConfig {
        follow_redirects_to_other_hosts: true,
        ..SourceConfig::new(template(&src))
    });
    src.fail_next(1, Fault::Redirect(other.base_url()));
    let e = found(follows.fetch(&req("1")).await);
    assert!(String::from_utf8_lossy(&e.body).contains("elsewhere"));
    assert_eq!(other.total_requests(), 1);
}

#[tokio::test]
async fn template_fields_are_filled_from_the_notification() {
    let src = source().await;
    src.put("customer", "7", json!({}));
    let f = fetcher(SourceConfig {
        fields: vec!["kind".into()],
        ..SourceConfig::new(format!("{}/{{kind}}/{{id}}", src.base_url()))
    });
    let mut r = req("7");
    r.fields = Some(vec![("kind".into(), "customer".into())].into());
    found(f.fetch(&r).await);
    let message = permanent(f.fetch(&req("7")).await);
    assert!(
        message.contains("no value for placeholder {kind}"),
        "{message}"
    );
}
