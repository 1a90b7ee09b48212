//! Trace export of `refetch run` against an in-process OTLP/HTTP receiver: spans arrive as
//! protobuf (decoded with `opentelemetry-proto`), a `fetch` span is the child of its `flight`
//! span in the same trace, sink batches have their span, and the source request carried a W3C
//! `traceparent` naming that fetch span. Without `[traces]` requests carry no `traceparent`.
//!
//! Needs a real broker: run with `scripts/test` (or `REFETCH_TEST_KAFKA=host:port cargo test -p
//! refetch-cli --test traces -- --include-ignored`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod obs_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use obs_support::Setup;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use refetch_testkit::kafka;
use refetch_testkit::process::{terminate, wait_for, wait_for_value};

/// What the receiver got: every span with its resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

async fn export(State(received): State<Received>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
    let mut out = received.lock().unwrap();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push((service.clone(), span));
            }
        }
    }
    ""
}

/// An OTLP/HTTP receiver on 127.0.0.1: its traces URL and what it received.
async fn receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route("/v1/traces", post(export))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1/traces"), received)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn fetch_spans_reach_the_collector_as_children_of_their_flight_and_the_source_sees_traceparent()
 {
    let setup = Setup::new("obs_traces", 1).await;
    let (endpoint, received) = receiver().await;
    let config = setup.config(
        "a",
        &format!("[traces]\nendpoint = \"{endpoint}\"\nservice_name = \"refetch-trace-test\"\n"),
    );
    // Export every 100 ms instead of every 5 s.
    let mut a = setup
        .start("a", &config, &[("OTEL_BSP_SCHEDULE_DELAY", "100")])
        .await;

    let ids: Vec<(String, i64)> = (0..5)
        .map(|i| {
            let id = format!("t{i}");
            let v = setup
                .source
                .put("customer", &id, serde_json::json!({"n": i}));
            (id, v)
        })
        .collect();
    setup.announce(&ids).await;

    let (fetch, flight) = wait_for_value(
        "a fetch span and its flight",
        Duration::from_secs(60),
        || {
            let received = received.clone();
            async move {
                let spans = received.lock().unwrap().clone();
                spans.iter().find_map(|(_, fetch)| {
                    if fetch.name != "fetch"
                        || attribute(fetch, "key").as_deref() != Some("customer:t0")
                    {
                        return None;
                    }
                    let flight = spans
                        .iter()
                        .find(|(_, s)| s.name == "flight" && s.span_id == fetch.parent_span_id)?;
                    Some((fetch.clone(), flight.1.clone()))
                })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", a.child.log()));
    assert_eq!(fetch.trace_id, flight.trace_id, "one trace");
    assert!(flight.parent_span_id.is_empty(), "the flight is the root");
    assert_eq!(attribute(&flight, "key").as_deref(), Some("customer:t0"));
    assert_eq!(attribute(&fetch, "outcome").as_deref(), Some("found"));
    assert!(
        fetch.start_time_unix_nano >= flight.start_time_unix_nano
            && fetch.end_time_unix_nano <= flight.end_time_unix_nano,
        "the fetch lies inside its flight"
    );
    // Client spans (kind 3 in OTLP).
    assert_eq!(fetch.kind, 3, "{fetch:?}");
    {
        let spans = received.lock().unwrap();
        assert!(
            spans
                .iter()
                .all(|(service, _)| service == "refetch-trace-test"),
            "service.name"
        );
    }
    wait_for("a sink batch span", Duration::from_secs(30), || {
        let received = received.clone();
        async move {
            received.lock().unwrap().iter().any(|(_, s)| {
                s.name == "sink_batch" && attribute(s, "sink").as_deref() == Some("sqlite")
            })
        }
    })
    .await
    .unwrap();

    // The source request of that fetch named it in its traceparent.
    let expected = format!("00-{}-{}-01", hex(&fetch.trace_id), hex(&fetch.span_id));
    let requests = setup.source.recorded();
    let request = requests
        .iter()
        .find(|r| r.target == "/customer/t0")
        .expect("the source was asked for t0");
    assert_eq!(request.header("traceparent"), Some(expected.as_str()));
    assert!(
        requests.iter().all(|r| r.header("traceparent").is_some()),
        "every request is traced"
    );

    let status = terminate(&mut a.child, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", a.child.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn without_traces_requests_carry_no_traceparent() {
    let setup = Setup::new("obs_untraced", 1).await;
    let config = setup.config("a", "");
    let mut a = setup.start("a", &config, &[]).await;
    let v = setup.source.put("customer", "u0", serde_json::json!({}));
    setup.announce(&[("u0".to_owned(), v)]).await;
    let ends = kafka::end_offsets(&setup.brokers, &setup.topic)
        .await
        .unwrap();
    wait_for(
        "the notification to be committed",
        Duration::from_secs(60),
        || {
            let (brokers, group, topic, ends) = (
                setup.brokers.clone(),
                setup.group.clone(),
                setup.topic.clone(),
                ends.clone(),
            );
            async move {
                kafka::committed_offsets(&brokers, &group, &topic)
                    .await
                    .is_ok_and(|c| c == ends)
            }
        },
    )
    .await
    .unwrap();
    let requests = setup.source.recorded();
    assert!(!requests.is_empty());
    assert!(requests.iter().all(|r| r.header("traceparent").is_none()));
    let status = terminate(&mut a.child, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", a.child.log());
}
