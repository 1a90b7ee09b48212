use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes as AxumBytes;
use axum::extract::State;
use axum::http::{HeaderMap as AxumHeaders, Method as AxumMethod, StatusCode as AxumStatus, Uri};
use axum::response::IntoResponse;
use refetch::{Entity, EntityKey, Version};

use super::*;

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    content_type: Option<String>,
    version: Option<String>,
    version_kind: Option<String>,
    auth: Option<String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct Target {
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The last path segment decides the answer: `s<code>` answers that status (`s429` with
/// `Retry-After: 7`), `slow` answers after 5 s, `wait` after 50 ms, anything else 204.
async fn handle(
    State(target): State<Arc<Target>>,
    method: AxumMethod,
    uri: Uri,
    headers: AxumHeaders,
    body: AxumBytes,
) -> axum::response::Response {
    let now = target.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    target.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let path = uri.path().to_owned();
    target.seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: path.clone(),
        content_type: header("content-type"),
        version: header("x-entity-version"),
        version_kind: header("x-entity-version-kind"),
        auth: header("authorization"),
        body: body.to_vec(),
    });
    let last = path.rsplit('/').next().unwrap_or("").to_owned();
    match last.as_str() {
        "slow" => tokio::time::sleep(Duration::from_secs(5)).await,
        "wait" => tokio::time::sleep(Duration::from_millis(50)).await,
        _ => {}
    }
    target.in_flight.fetch_sub(1, Ordering::SeqCst);
    match last.strip_prefix('s').and_then(|c| c.parse::<u16>().ok()) {
        Some(429) => (AxumStatus::TOO_MANY_REQUESTS, [("retry-after", "7")]).into_response(),
        Some(code) => AxumStatus::from_u16(code)
            .unwrap_or(AxumStatus::IM_A_TEAPOT)
            .into_response(),
        None => AxumStatus::NO_CONTENT.into_response(),
    }
}

async fn target() -> (Arc<Target>, String) {
    let target = Arc::new(Target::default());
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(target.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (target, format!("http://{addr}"))
}

fn sink_for(base: &str, tweak: impl FnOnce(&mut HttpConfig)) -> HttpSink {
    let mut cfg = HttpConfig {
        url_template: format!("{base}/entities/{{type}}/{{id}}"),
        timeout: Duration::from_millis(500),
        ..HttpConfig::default()
    };
    tweak(&mut cfg);
    HttpSink::new(&cfg).unwrap()
}

fn upsert(id: &str) -> Change {
    Change::Upsert {
        key: EntityKey::new("customer", id),
        entity: Entity::json(format!(r#"{{"id":{id:?}}}"#), Some(Version::Int(3))),
    }
}

#[test]
fn segments_are_encoded_and_dot_ids_refused() {
    assert_eq!(encode_segment("a-b.c_d~e").unwrap(), "a-b.c_d~e");
    assert_eq!(encode_segment("../x").unwrap(), "..%2Fx");
    assert_eq!(encode_segment("a?b#c%d e").unwrap(), "a%3Fb%23c%25d%20e");
    assert_eq!(encode_segment("ä").unwrap(), "%C3%A4");
    for id in ["", ".", ".."] {
        assert!(
            matches!(encode_segment(id), Err(SinkError::Permanent { .. })),
            "{id:?}"
        );
    }
}

#[test]
fn templates_are_checked() {
    assert!(UrlTemplate::parse("http://h/{type}/{id}").is_ok());
    assert!(UrlTemplate::parse("https://h/x?id={id}").is_ok());
    for bad in [
        "http://{id}/x",
        "http://h/{tenant}/{id}",
        "http://h/{type}",
        "ftp://h/{id}",
        "h/{id}",
        "http://h/{id",
        "http://h/{id}}",
    ] {
        assert!(UrlTemplate::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn retry_after_takes_seconds_and_dates() {
    let v = |s: &str| HeaderValue::from_str(s).unwrap();
    assert_eq!(parse_retry_after(&v("12")), Some(Duration::from_secs(12)));
    assert_eq!(
        parse_retry_after(&v("Sun, 06 Nov 1994 08:49:37 GMT")),
        Some(Duration::ZERO)
    );
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(120);
    let text = jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&future)
        .unwrap();
    let d = parse_retry_after(&v(&text)).unwrap();
    assert!(
        d <= Duration::from_secs(120) && d >= Duration::from_secs(110),
        "{d:?}"
    );
    assert_eq!(parse_retry_after(&v("soon")), None);
}

#[tokio::test]
async fn puts_bodies_with_headers_and_deletes() {
    let (target, base) = target().await;
    let sink = sink_for(&base, |c| {
        c.headers
            .insert("Authorization".into(), "Bearer t0ken".into());
    });
    assert!(!format!("{sink:?}").contains("t0ken"));
    let report = sink
        .write(&[
            upsert("1"),
            Change::Delete {
                key: EntityKey::new("customer", "2"),
            },
            Change::Delete {
                key: EntityKey::new("customer", "s404"),
            },
        ])
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    let mut seen = target.seen.lock().unwrap().clone();
    seen.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(seen.len(), 3);
    let put = &seen[0];
    assert_eq!(
        (put.method.as_str(), put.path.as_str()),
        ("PUT", "/entities/customer/1")
    );
    assert_eq!(put.content_type.as_deref(), Some("application/json"));
    assert_eq!(put.version.as_deref(), Some("3"));
    assert_eq!(put.version_kind.as_deref(), Some("int"));
    assert_eq!(put.auth.as_deref(), Some("Bearer t0ken"));
    assert_eq!(put.body, br#"{"id":"1"}"#);
    assert_eq!(
        (seen[1].method.as_str(), seen[1].path.as_str()),
        ("DELETE", "/entities/customer/2")
    );
    assert!(seen[1].body.is_empty());
    assert_eq!(
        seen[2].path, "/entities/customer/s404",
        "a 404 on DELETE means already gone"
    );
}

#[tokio::test]
async fn hostile_ids_stay_one_path_segment() {
    let (target, base) = target().await;
    let sink = sink_for(&base, |_| {});
    let ids = ["../admin", "a/b", "x?y=1#z", "%2e%2e", "ä b", "..", ".", ""];
    let batch: Vec<Change> = ids.iter().map(|id| upsert(id)).collect();
    let report = sink.write(&batch).await.unwrap();
    let refused: Vec<usize> = report.failed.iter().map(|(i, _)| *i).collect();
    assert_eq!(refused, vec![5, 6, 7], "{report:?}");
    assert!(
        report
            .failed
            .iter()
            .all(|(_, e)| matches!(e, SinkError::Permanent { .. }))
    );
    let mut paths: Vec<String> = target
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    paths.sort();
    let mut expected: Vec<String> = ids[..5]
        .iter()
        .map(|id| format!("/entities/customer/{}", encode_segment(id).unwrap()))
        .collect();
    expected.sort();
    assert_eq!(paths, expected);
    for p in &paths {
        let segment = p.strip_prefix("/entities/customer/").unwrap();
        assert!(
            !segment.contains('/') && !segment.contains('?') && !segment.contains('#'),
            "{p}"
        );
    }
}

#[tokio::test]
async fn statuses_are_classified() {
    let (_target, base) = target().await;
    let sink = sink_for(&base, |_| {});
    // Other 4xx: that record alone, permanently.
    let report = sink
        .write(&[upsert("ok"), upsert("s400"), upsert("s422"), upsert("s301")])
        .await
        .unwrap();
    let refused: Vec<usize> = report.failed.iter().map(|(i, _)| *i).collect();
    assert_eq!(refused, vec![1, 2, 3]);
    // 429 with Retry-After, 5xx, 408: the batch, transiently.
    match sink.write(&[upsert("ok"), upsert("s429")]).await {
        Err(SinkError::Transient { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(7)));
        }
        other => panic!("expected transient, got {other:?}"),
    }
    for id in ["s500", "s503", "s408"] {
        let err = sink.write(&[upsert(id)]).await.unwrap_err();
        assert!(matches!(err, SinkError::Transient { .. }), "{id}: {err:?}");
    }
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_transient() {
    let (_target, base) = target().await;
    let sink = sink_for(&base, |c| c.timeout = Duration::from_millis(200));
    let err = sink.write(&[upsert("slow")]).await.unwrap_err();
    assert!(matches!(err, SinkError::Transient { .. }), "{err:?}");
    assert!(err.message().contains("timed out"), "{err}");

    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let refused = sink_for(&closed, |_| {});
    let err = refused.write(&[upsert("1")]).await.unwrap_err();
    assert!(matches!(err, SinkError::Transient { .. }), "{err:?}");
}

#[tokio::test]
async fn a_batch_runs_concurrently_within_the_bound() {
    let (target, base) = target().await;
    let sink = sink_for(&base, |c| c.concurrency = 3);
    let batch: Vec<Change> = (0..12)
        .map(|i| Change::Upsert {
            key: EntityKey::new(format!("t{i}"), "wait"),
            entity: Entity::json("{}", None),
        })
        .collect();
    sink.write(&batch).await.unwrap();
    let max = target.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=3).contains(&max), "max in flight {max}");
    assert_eq!(target.seen.lock().unwrap().len(), 12);
}
