//! Hostile input, each with a defined outcome: dead-lettered with a reason and an error, or
//! retried until it converges; never a panic and never a skipped offset (every test ends with
//! the committed offsets at the end of the topic). The pipeline runs with the real HTTP fetcher
//! against local servers on 127.0.0.1 (the well-behaved `HttpSource`, or `RawHttpServer` for
//! answers a server library cannot produce) and the in-memory consumer; one test goes through
//! the real broker and reads the dead-letter topic back. The table in `docs/reliability.md` maps
//! every hostile input to its outcome and its test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use refetch::decode::{JsonDecoder, NotificationDecoder, RecordKeyDecoder};
use refetch::{
    Change, EngineConfig, EntityKey, Fetcher, MemoryDeadLetters, Sink, SinkError,
    UnknownTypePolicy, WriteReport, async_trait,
};
use refetch_http::{HttpFetcher, SourceConfig};
use refetch_integration_tests::{MemoryRun, start_in_memory};
use refetch_testkit::http_source::{Fault, HttpSource, HttpSourceOptions};
use refetch_testkit::memory::RecordingSink;
use refetch_testkit::process::wait_for;
use refetch_testkit::raw_http::{RawAnswer, RawHttpServer};
use serde_json::json;

const TOPIC: &str = "crm.customers";

type Run<S> = MemoryRun<S>;

fn cfg() -> EngineConfig {
    let mut c = EngineConfig {
        window: Duration::from_millis(10),
        max_wait: Duration::from_millis(100),
        commit_interval: Duration::from_millis(50),
        retry_budget: 3,
        sink_record_budget: 3,
        ..EngineConfig::default()
    };
    c.fetch_backoff.initial = Duration::from_millis(20);
    c.fetch_backoff.max = Duration::from_millis(200);
    c.sink_backoff.initial = Duration::from_millis(20);
    c.sink_backoff.max = Duration::from_millis(200);
    c
}

fn fetcher(base: &str, tweak: impl FnOnce(&mut SourceConfig)) -> HttpFetcher {
    let mut source = SourceConfig {
        url: format!("{base}/customer/{{id}}"),
        timeout: Duration::from_millis(800),
        // The breaker would answer "not attempted" for every key after a few failures in a row;
        // these tests want each hostile answer classified on its own.
        breaker: refetch_http::BreakerConfig {
            failures: 0,
            ..Default::default()
        },
        ..SourceConfig::default()
    };
    tweak(&mut source);
    HttpFetcher::builder()
        .source("customer", source)
        .build()
        .unwrap()
}

fn start<F: Fetcher, S: Sink + Clone>(
    fetcher: F,
    sink: S,
    decoder: impl NotificationDecoder + 'static,
    engine: EngineConfig,
) -> Run<S> {
    start_in_memory(TOPIC, 1, fetcher, sink, decoder, engine)
}

/// What these tests add to the shared in-memory harness.
trait RunExt {
    fn produce(&self, key: Option<&[u8]>, payload: &[u8]);
    fn notify(&self, id: &str);
    fn dead_by_id(&self) -> BTreeMap<String, (String, String, String)>;
}

impl<S> RunExt for Run<S> {
    fn produce(&self, key: Option<&[u8]>, payload: &[u8]) {
        self.topics.produce(TOPIC, 0, key, payload, 0);
    }

    fn notify(&self, id: &str) {
        self.produce(None, json!({ "id": id }).to_string().as_bytes());
    }

    /// Dead letters by entity id (or by payload prefix when the id is unknown):
    /// (reason, error class, error).
    fn dead_by_id(&self) -> BTreeMap<String, (String, String, String)> {
        self.dead
            .records()
            .iter()
            .map(|d| {
                let reason = d.header("refetch.reason").unwrap_or("").to_owned();
                let error = d.header("refetch.error").unwrap_or("").to_owned();
                let class = d.header("refetch.error.class").unwrap_or("").to_owned();
                assert!(!reason.is_empty(), "dead letter without a reason: {d:?}");
                assert!(!error.is_empty(), "dead letter without an error: {d:?}");
                let id = d
                    .header("refetch.entity.id")
                    .map(str::to_owned)
                    .unwrap_or_else(|| {
                        let p = d.payload.as_deref().unwrap_or_default();
                        String::from_utf8_lossy(&p[..p.len().min(24)]).into_owned()
                    });
                (id, (reason, class, error))
            })
            .collect()
    }
}

fn key(id: &str) -> EntityKey {
    EntityKey::new("customer", id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_notification_payloads_are_dead_lettered_with_reasons() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for id in ["42", "ok", "a/b?c#d", "big"] {
        source.put("customer", id, json!({"n": id}));
    }
    let run = start(
        fetcher(&source.base_url(), |_| {}),
        RecordingSink::new(),
        JsonDecoder::fixed_type("customer", "/id"),
        cfg(),
    );
    let huge_id = "x".repeat(100 * 1024);
    // A 5 MB record whose id is fine: decoded (the padding is skipped) and fetched.
    let big_ok = format!(r#"{{"pad":"{}","id":"big"}}"#, "p".repeat(5 * 1024 * 1024));
    // A 5 MB record that is not JSON.
    let big_bad = format!("OVERSIZED {}", "q".repeat(5 * 1024 * 1024));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"MALFORMED {".to_vec(), "decode"),
        (br#"{"no_id":1}"#.to_vec(), "decode"),
        (br#"{"id":null}"#.to_vec(), "decode"),
        (br#"{"id":""}"#.to_vec(), "decode"),
        (br#"{"id":1.5}"#.to_vec(), "decode"),
        (br#"{"id":true}"#.to_vec(), "decode"),
        (br#"{"id":["a"]}"#.to_vec(), "decode"),
        (br#"{"id":{"x":1}}"#.to_vec(), "decode"),
        (b"[1,2,3]".to_vec(), "decode"),
        (b"\"just a string\"".to_vec(), "decode"),
        (b"{\"id\":\"\xff\xfe\"}".to_vec(), "decode"),
        (b"\xc3\x28 NONUTF8".to_vec(), "decode"),
        (Vec::new(), "decode"),
        (
            json!({ "id": huge_id }).to_string().into_bytes(),
            "id_too_long",
        ),
        (big_bad.into_bytes(), "decode"),
    ];
    for (payload, _) in &cases {
        run.produce(Some(b"k"), payload);
    }
    // Accepted ones: a numeric id, an id full of URL syntax, the oversized but valid record.
    run.produce(None, br#"{"id":42}"#);
    run.notify("a/b?c#d");
    run.produce(None, big_ok.as_bytes());
    run.notify("ok");
    // Ids that cannot be one path segment are refused before any request.
    run.notify(".");
    run.notify("..");
    run.committed_to_end(Duration::from_secs(60)).await;

    let dead = run.dead.records();
    let expected_decode = cases.iter().filter(|(_, r)| *r == "decode").count();
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| d.header("refetch.reason").unwrap_or(""))
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "decode").count(),
        expected_decode,
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "id_too_long").count(),
        1,
        "{reasons:?}"
    );
    for d in &dead {
        assert!(d.header("refetch.error").is_some_and(|e| !e.is_empty()));
        assert_eq!(d.header("refetch.source.topic"), Some(TOPIC));
        assert!(d.header("refetch.source.offset").is_some());
    }
    // The 100 KB id is never copied into a header whole.
    let too_long = dead
        .iter()
        .find(|d| d.header("refetch.reason") == Some("id_too_long"))
        .unwrap();
    assert!(
        too_long.headers.iter().all(|(_, v)| v.len() < 10 * 1024),
        "headers stay small"
    );
    let by_id = run.dead_by_id();
    for id in [".", ".."] {
        let (reason, class, error) = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{id} dead-lettered"));
        assert_eq!(
            (reason.as_str(), class.as_str()),
            ("fetch", "permanent"),
            "{error}"
        );
        assert_eq!(source.requests_for("customer", id), 0);
    }
    assert_eq!(dead.len(), expected_decode + 1 + 2, "{reasons:?}");
    let held = run.sink.held();
    for id in ["42", "ok", "a/b?c#d", "big"] {
        assert!(held.contains_key(&key(id)), "{id} reached the sink");
    }
    assert_eq!(held.len(), 4);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_key_ids_that_are_missing_empty_or_not_utf8_are_dead_lettered() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    source.put("customer", "7", json!({}));
    let run = start(
        fetcher(&source.base_url(), |_| {}),
        RecordingSink::new(),
        RecordKeyDecoder::new("customer"),
        cfg(),
    );
    run.produce(Some(b"\xff\xfe\xfd"), b"{}");
    run.produce(Some(b""), b"{}");
    run.produce(None, b"{}");
    run.produce(Some(b"7"), b"not even json: the payload is not read");
    run.committed_to_end(Duration::from_secs(30)).await;
    let dead = run.dead.records();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let errors: Vec<&str> = dead
        .iter()
        .map(|d| {
            assert_eq!(d.header("refetch.reason"), Some("decode"));
            d.header("refetch.error").unwrap_or("")
        })
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("not valid UTF-8")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.contains("empty")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("no key")), "{errors:?}");
    // The original key bytes are kept, invalid UTF-8 included.
    assert!(
        dead.iter()
            .any(|d| d.key.as_deref() == Some(&b"\xff\xfe\xfd"[..]))
    );
    assert_eq!(run.sink.held().len(), 1);
    run.stop().await;
}

async fn unknown_types_run(policy: UnknownTypePolicy) -> (MemoryDeadLetters, RecordingSink, u64) {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    source.put("customer", "1", json!({}));
    source.put("order", "1", json!({}));
    let mut c = cfg();
    c.unknown_types = policy;
    let run = start(
        fetcher(&source.base_url(), |_| {}),
        RecordingSink::new(),
        JsonDecoder::typed("/type", "/id"),
        c,
    );
    run.produce(None, br#"{"type":"order","id":"1"}"#);
    run.produce(None, br#"{"type":"","id":"1"}"#);
    run.produce(None, br#"{"type":"customer","id":"1"}"#);
    run.produce(None, br#"{"type":"../admin","id":"1"}"#);
    run.committed_to_end(Duration::from_secs(30)).await;
    let requests = source.total_requests();
    let dead = run.dead.clone();
    let sink = run.stop().await;
    (dead, sink, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_entity_types_are_ignored_or_dead_lettered_by_policy() {
    let (dead, sink, requests) = unknown_types_run(UnknownTypePolicy::Ignore).await;
    // The empty type is not a type at all: a decode error under either policy.
    let reasons: Vec<_> = dead
        .records()
        .iter()
        .map(|d| d.header("refetch.reason").unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        reasons,
        vec!["decode"],
        "ignored types are not dead-lettered"
    );
    assert_eq!(sink.held().len(), 1);
    assert_eq!(requests, 1, "only the served type is fetched");

    let (dead, sink, requests) = unknown_types_run(UnknownTypePolicy::DeadLetter).await;
    let records = dead.records();
    let mut unknown: Vec<_> = records
        .iter()
        .filter(|d| d.header("refetch.reason") == Some("unknown_type"))
        .map(|d| {
            assert_eq!(d.header("refetch.error.class"), Some("permanent"));
            d.header("refetch.error").unwrap_or("").to_owned()
        })
        .collect();
    unknown.sort();
    assert_eq!(
        unknown,
        vec![
            r#"no fetcher serves entity type "../admin""#,
            r#"no fetcher serves entity type "order""#
        ],
        "{records:?}"
    );
    assert_eq!(records.len(), 3);
    assert_eq!(sink.held().len(), 1);
    assert_eq!(requests, 1);
}

/// The dead-letter module promises `refetch.entity.type` / `refetch.entity.id` "where known";
/// for an unknown type both were decoded, so the record names them (an operator can list and
/// redrive these by entity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_dead_letters_name_their_entity() {
    let (dead, _, _) = unknown_types_run(UnknownTypePolicy::DeadLetter).await;
    for d in dead
        .records()
        .iter()
        .filter(|d| d.header("refetch.reason") == Some("unknown_type"))
    {
        assert!(d.header("refetch.entity.type").is_some(), "{d:?}");
        assert_eq!(d.header("refetch.entity.id"), Some("1"), "{d:?}");
    }
}

/// Answers a source can give that need raw bytes; each either converges (transient, healed
/// later) or ends as a dead letter with the expected error class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_source_answers_through_the_pipeline() {
    let raw = RawHttpServer::start().await.unwrap();
    let ten_mb = 10 * 1024 * 1024;
    // (id, answer, expected outcome: Some(class) = dead letter of that class, None = retried
    // until healed, then converged)
    let cases: Vec<(&str, RawAnswer, Option<&str>, &str)> = vec![
        (
            "html",
            RawAnswer::response(200, Some("text/html"), b"<html>login</html>"),
            Some("permanent"),
            "text/html",
        ),
        (
            "plain",
            RawAnswer::response(200, Some("text/plain"), br#"{"id":"plain"}"#),
            Some("permanent"),
            "text/plain",
        ),
        (
            "xml",
            RawAnswer::response(200, Some("application/xml"), b"<customer/>"),
            Some("permanent"),
            "application/xml",
        ),
        (
            "badjson",
            RawAnswer::response(200, Some("application/json"), b"{\"id\": oops"),
            Some("permanent"),
            "not valid JSON",
        ),
        (
            "declared10mb",
            RawAnswer::Bytes(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {ten_mb}\r\n\r\n{{"
                )
                .into_bytes(),
            ),
            Some("permanent"),
            "larger than",
        ),
        (
            "invalidchunk",
            RawAnswer::chunked(b"zz\r\n{}\r\n0\r\n\r\n"),
            None,
            "",
        ),
        (
            "truncatedchunk",
            RawAnswer::chunked(b"40\r\n{\"id\":\"trunc"),
            None,
            "",
        ),
        (
            "shortlength",
            RawAnswer::Bytes(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\":"
                    .to_vec(),
            ),
            None,
            "",
        ),
        (
            "garbage",
            RawAnswer::Bytes(b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()),
            None,
            "",
        ),
        (
            "slowloris",
            RawAnswer::Trickle(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"id\":\"slow\"}"
                    .to_vec(),
                Duration::from_millis(100),
            ),
            None,
            "",
        ),
        (
            "slowbody",
            RawAnswer::Trickle(
                {
                    let mut b = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n".to_vec();
                    b.extend(std::iter::repeat_n(b' ', 4000));
                    b
                },
                Duration::from_millis(5),
            ),
            None,
            "",
        ),
    ];
    for (id, answer, _, _) in &cases {
        raw.answer(id, answer.clone());
    }
    let mut c = cfg();
    // Transient answers keep failing for these keys while "ok" succeeds: without healing they
    // would be poison. A large budget keeps them in retry until they are healed below.
    c.retry_budget = 1000;
    let run = start(
        fetcher(&raw.base_url(), |_| {}),
        RecordingSink::new(),
        JsonDecoder::fixed_type("customer", "/id"),
        c,
    );
    for (id, _, _, _) in &cases {
        run.notify(id);
    }
    run.notify("ok");
    // Healthy keys keep succeeding meanwhile, many more than the hostile ones fail: the
    // evidence that those fail on their own (with most of a source failing, nothing would be
    // dead-lettered).
    let live = refetch_integration_tests::heartbeat_of(
        &run.topics,
        TOPIC,
        0,
        (0..50)
            .map(|i| json!({ "id": format!("ok{i}") }).to_string().into_bytes())
            .collect(),
        Duration::from_millis(10),
    );
    let permanent = cases.iter().filter(|c| c.2.is_some()).count();
    wait_for(
        "permanent answers to be dead-lettered",
        Duration::from_secs(30),
        || {
            let n = run.dead.records().len();
            async move { n >= permanent }
        },
    )
    .await
    .unwrap();
    // Every transient one was tried more than once and still holds the commit point.
    for (id, _, outcome, _) in &cases {
        if outcome.is_none() {
            wait_for("a retry", Duration::from_secs(30), || {
                let n = raw.requests_for(id);
                async move { n >= 2 }
            })
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        }
    }
    assert_eq!(
        run.topics.committed().values().copied().max().unwrap_or(0),
        5
    );
    drop(live);
    for (id, _, _, _) in &cases {
        raw.heal(id);
    }
    run.committed_to_end(Duration::from_secs(60)).await;
    let by_id = run.dead_by_id();
    for (id, _, outcome, needle) in &cases {
        match outcome {
            Some(class) => {
                let (reason, got_class, error) = by_id
                    .get(*id)
                    .unwrap_or_else(|| panic!("{id} dead-lettered"));
                assert_eq!(reason, "fetch", "{id}");
                assert_eq!(got_class, class, "{id}: {error}");
                assert!(error.contains(needle), "{id}: {error}");
            }
            None => {
                assert!(!by_id.contains_key(*id), "{id} must not be dead-lettered");
                assert!(run.sink.held().contains_key(&key(id)), "{id} converged");
            }
        }
    }
    assert!(run.sink.held().contains_key(&key("ok")));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_bodies_and_a_slow_trickle_against_the_timeout() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for id in ["huge", "trickle", "ok"] {
        source.put("customer", id, json!({"n": id}));
    }
    source.poison("customer", "huge", Fault::HugeBody(10 * 1024 * 1024));
    source.poison(
        "customer",
        "trickle",
        Fault::Trickle(Duration::from_millis(200)),
    );
    // The default budget: a trickle that never ends is poison (the rest of the source is
    // fine), so it is dead-lettered as a transient failure after its budget.
    let run = start(
        fetcher(&source.base_url(), |s| {
            s.timeout = Duration::from_millis(500)
        }),
        RecordingSink::new(),
        JsonDecoder::fixed_type("customer", "/id"),
        cfg(),
    );
    let started = std::time::Instant::now();
    for id in ["huge", "trickle", "ok"] {
        run.notify(id);
    }
    // "ok" keeps succeeding meanwhile: the evidence that the two others fail on their own.
    let live = refetch_integration_tests::heartbeat(
        &run.topics,
        TOPIC,
        0,
        json!({ "id": "ok" }).to_string().into_bytes(),
        Duration::from_millis(200),
    );
    wait_for("both to be dead-lettered", Duration::from_secs(60), || {
        let n = run.dead.records().len();
        async move { n >= 2 }
    })
    .await
    .unwrap();
    drop(live);
    run.committed_to_end(Duration::from_secs(60)).await;
    let by_id = run.dead_by_id();
    let (reason, class, error) = by_id.get("huge").expect("huge dead-lettered");
    assert_eq!((reason.as_str(), class.as_str()), ("fetch", "permanent"));
    assert!(error.contains("larger than"), "{error}");
    let (reason, class, error) = by_id.get("trickle").expect("trickle dead-lettered");
    assert_eq!((reason.as_str(), class.as_str()), ("fetch", "transient"));
    assert!(error.contains("timed out"), "{error}");
    assert_eq!(run.sink.held().len(), 1);
    // Each trickling attempt is cut at the timeout: the budget's attempts take seconds, not
    // the minutes a byte every 200 ms would need.
    assert!(started.elapsed() < Duration::from_secs(30));
    run.stop().await;
}

/// A sink that fails one key transiently forever while its batch-mates succeed.
#[derive(Clone)]
struct FailsOneKey {
    inner: RecordingSink,
    bad: Arc<EntityKey>,
}

#[async_trait]
impl Sink for FailsOneKey {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let (bad, good): (Vec<_>, Vec<_>) = batch
            .iter()
            .enumerate()
            .partition(|(_, c)| c.key() == &*self.bad);
        let good_changes: Vec<Change> = good.iter().map(|(_, c)| (*c).clone()).collect();
        let report = self.inner.write(&good_changes).await?;
        let mut failed: Vec<(usize, SinkError)> = report
            .failed
            .into_iter()
            .map(|(i, e)| (good[i].0, e))
            .collect();
        failed.extend(
            bad.iter()
                .map(|(i, _)| (*i, SinkError::transient("row lock timeout for this key"))),
        );
        Ok(WriteReport { failed })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_rejecting_single_records_dead_letters_only_those() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for i in 0..8 {
        source.put("customer", &i.to_string(), json!({"n": i}));
    }
    // Transient for one record, its batch-mates succeed: the record budget, then a dead letter.
    let sink = FailsOneKey {
        inner: RecordingSink::new(),
        bad: Arc::new(key("3")),
    };
    let run = start(
        fetcher(&source.base_url(), |_| {}),
        sink,
        JsonDecoder::fixed_type("customer", "/id"),
        cfg(),
    );
    for i in 0..8 {
        run.notify(&i.to_string());
    }
    run.committed_to_end(Duration::from_secs(60)).await;
    let by_id = run.dead_by_id();
    assert_eq!(by_id.len(), 1, "{by_id:?}");
    let (reason, class, error) = by_id.get("3").unwrap();
    assert_eq!((reason.as_str(), class.as_str()), ("sink", "transient"));
    assert!(error.contains("row lock timeout"), "{error}");
    assert_eq!(run.sink.inner.held().len(), 7);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rejecting_a_nul_id_dead_letters_that_record_alone() {
    use refetch_sinks::postgres::PostgresSink;
    use refetch_sinks::{PostgresConfig, Secret};
    let (_client, schema) = refetch_testkit::postgres::fresh_schema().await.unwrap();
    let sink = PostgresSink::connect(&PostgresConfig {
        url: Secret::new(refetch_testkit::postgres::url().unwrap()),
        schema,
        table: "entities".into(),
        create_table: true,
        ..PostgresConfig::default()
    })
    .await
    .unwrap();
    let sink = Arc::new(sink);
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    let nul = "a\u{0}b";
    for id in ["1", nul, "2", "3"] {
        source.put("customer", id, json!({"n": id}));
    }
    let run = start(
        fetcher(&source.base_url(), |_| {}),
        ArcSink(sink.clone()),
        JsonDecoder::fixed_type("customer", "/id"),
        cfg(),
    );
    for id in ["1", nul, "2", "3"] {
        run.notify(id);
    }
    run.committed_to_end(Duration::from_secs(60)).await;
    let dead = run.dead.records();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].header("refetch.reason"), Some("sink"));
    assert_eq!(dead[0].header("refetch.error.class"), Some("permanent"));
    assert_eq!(dead[0].header("refetch.entity.id"), Some(nul));
    for id in ["1", "2", "3"] {
        assert!(sink.get(&key(id)).await.unwrap().is_some(), "{id} written");
    }
    run.stop().await;
}

/// `Arc<PostgresSink>` as a clonable sink.
struct ArcSink<S>(Arc<S>);

impl<S> Clone for ArcSink<S> {
    fn clone(&self) -> Self {
        ArcSink(self.0.clone())
    }
}

#[async_trait]
impl<S: Sink> Sink for ArcSink<S> {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        self.0.write(batch).await
    }
}

/// Through the real broker and `refetch run`: hostile records, a 3 MB one among them (larger than
/// the dead-letter topic takes), end up in the dead-letter topic with reason, error and
/// coordinates; the oversized one truncated with its original size; every offset committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_reach_the_dead_letter_topic_of_a_real_broker() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use refetch_integration_tests::{Protocol, Scenario};
    use refetch_testkit::kafka;
    use refetch_testkit::process::terminate;

    let brokers = kafka::brokers().unwrap();
    let s = Scenario::new("hostile", Protocol::Classic, 1)
        .await
        .unwrap();
    // Let the notification topic take a 3 MB record (its dead-letter topic keeps the default).
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        kafka::client_config(&brokers).create().unwrap();
    let mut alter =
        rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&s.topic));
    alter = alter.set("max.message.bytes", "8388608");
    for r in admin
        .alter_configs([&alter], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    s.source.put("customer", "good", json!({"n": 1}));
    let producer: FutureProducer = kafka::client_config(&brokers)
        .set("message.max.bytes", "8388608")
        .set("acks", "all")
        .create()
        .unwrap();
    let big = format!("OVERSIZED {}", "q".repeat(3 * 1024 * 1024));
    let long_id = json!({ "id": "x".repeat(100 * 1024) }).to_string();
    /// (record key, payload, expected `refetch.reason`; empty: accepted).
    type Case<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, &'a str);
    let records: Vec<Case> = vec![
        (Some(b"k1"), Some(b"MALFORMED {"), "decode"),
        (Some(b"\xff\xfe"), Some(b"\xc3\x28\xff"), "decode"),
        (Some(b"k3"), None, "decode"),
        (Some(b"k4"), Some(long_id.as_bytes()), "id_too_long"),
        (Some(b"k5"), Some(big.as_bytes()), "decode"),
        (Some(b"k6"), Some(br#"{"id":"good"}"#), ""),
    ];
    for (key, payload, _) in &records {
        let mut r = FutureRecord::<[u8], [u8]>::to(&s.topic).partition(0);
        if let Some(k) = key {
            r = r.key(*k);
        }
        if let Some(p) = payload {
            r = r.payload(*p);
        }
        producer
            .send(r, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let mut child = s.spawn("run").unwrap();
    s.until_committed(Duration::from_secs(90), &[&child])
        .await
        .unwrap();
    let status = terminate(&mut child, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", child.log());
    let dead = kafka::read_all(
        &brokers,
        &format!("{}.dlq", s.group),
        true,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(dead.len(), 5, "{dead:?}");
    let text = |d: &kafka::ReadRecord, h: &str| {
        d.header(h)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    for d in &dead {
        let offset: usize = text(d, "refetch.source.offset").parse().unwrap();
        let (key, _, reason) = records[offset];
        assert_eq!(text(d, "refetch.reason"), reason, "offset {offset}");
        assert!(!text(d, "refetch.error").is_empty(), "offset {offset}");
        assert_eq!(text(d, "refetch.source.topic"), s.topic);
        assert_eq!(d.key.as_deref(), key, "the original key, byte for byte");
        let payload_len = d.payload.as_ref().map_or(0, Vec::len);
        assert!(
            payload_len < 1024 * 1024,
            "every dead letter fits the topic"
        );
        if offset == 4 {
            assert_eq!(
                text(d, "refetch.original.size"),
                big.len().to_string(),
                "the oversized record is written truncated with its size"
            );
        }
    }
    let (checked, diff) = s.differences().await.unwrap();
    assert_eq!((checked, diff.len()), (1, 0), "{diff:?}");
}
