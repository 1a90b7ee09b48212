//! Batched fetches through a multi-id endpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use refetch::{FetchError, FetchOutcome, Fetcher, Version, VersionKind};
use refetch_http::{BatchConfig, HttpFetcher, MissingKey, SourceConfig, VersionConfig};
use refetch_testkit::http_source::{Fault, HttpSource};
use serde_json::{Value, json};
use support::{fetcher, req, source, template};

fn batched(src: &HttpSource, missing: MissingKey) -> HttpFetcher {
    fetcher(SourceConfig {
        version: Some(VersionConfig {
            pointer: Some("/version".into()),
            header: None,
            kind: VersionKind::Integer,
        }),
        batch: Some(BatchConfig {
            url: format!("{}/customer?ids={{ids}}", src.base_url()),
            max: 10,
            missing,
            ..BatchConfig::default()
        }),
        ..SourceConfig::new(template(src))
    })
}

fn targets(src: &HttpSource) -> Vec<String> {
    src.recorded().into_iter().map(|r| r.target).collect()
}

fn body_id(outcome: &Result<FetchOutcome, FetchError>) -> String {
    match outcome {
        Ok(FetchOutcome::Found(e)) => {
            let v: Value = serde_json::from_slice(&e.body).expect("json");
            v["id"].as_str().unwrap_or_default().to_owned()
        }
        other => panic!("expected Found, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_keys_are_retried_alone_and_separator_ids_never_batched() {
    let src = source().await;
    src.put("customer", "1", json!({"n": 1}));
    src.put("customer", "2", json!({"n": 2}));
    src.put("customer", "2", json!({"n": 2}));
    src.put("customer", "x,y", json!({"n": 3}));
    src.put("customer", "a b", json!({"n": 4}));
    let f = batched(&src, MissingKey::Retry);
    assert_eq!(f.batch_limit("customer"), 10);
    assert_eq!(f.batch_limit("order"), 1);

    let requests: Vec<_> = ["1", "2", "3", "x,y", "a b"]
        .iter()
        .map(|id| req(id))
        .collect();
    let out = f.fetch_batch(&requests).await;
    assert_eq!(out.len(), 5);
    assert_eq!(body_id(&out[0]), "1");
    assert_eq!(body_id(&out[1]), "2");
    match &out[1] {
        Ok(FetchOutcome::Found(e)) => assert_eq!(e.version, Some(Version::Int(2))),
        other => panic!("{other:?}"),
    }
    assert_eq!(out[2], Ok(FetchOutcome::Gone), "missing, then 404 alone");
    assert_eq!(body_id(&out[3]), "x,y");
    assert_eq!(body_id(&out[4]), "a b");

    let mut seen = targets(&src);
    seen.sort();
    assert_eq!(
        seen,
        [
            "/customer/3",
            "/customer/x%2Cy",
            "/customer?ids=1,2,3,a%20b",
        ]
    );
}

#[tokio::test]
async fn missing_keys_are_gone_when_configured() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    let f = batched(&src, MissingKey::Gone);
    let out = f.fetch_batch(&[req("1"), req("3")]).await;
    assert_eq!(body_id(&out[0]), "1");
    assert_eq!(out[1], Ok(FetchOutcome::Gone));
    assert_eq!(targets(&src), ["/customer?ids=1,3"]);
}

#[tokio::test]
async fn batch_failures_apply_to_every_key_or_fall_back_to_single_fetches() {
    let src = source().await;
    for id in ["1", "2", "3"] {
        src.put("customer", id, json!({}));
    }
    let f = batched(&src, MissingKey::Retry);
    let requests = [req("1"), req("2"), req("3")];

    src.fail_next(1, Fault::Status(503));
    let out = f.fetch_batch(&requests).await;
    assert!(
        out.iter()
            .all(|r| matches!(r, Err(FetchError::Transient { .. }))),
        "{out:?}"
    );
    assert_eq!(src.total_requests(), 1);

    // A permanent refusal of the batch (one poisoned id) is sorted out per key.
    src.reset_counters();
    src.poison("customer", "2", Fault::Status(400));
    let out = f.fetch_batch(&requests).await;
    assert_eq!(body_id(&out[0]), "1");
    assert!(
        matches!(out[1], Err(FetchError::Permanent { .. })),
        "{out:?}"
    );
    assert_eq!(body_id(&out[2]), "3");
    assert_eq!(src.total_requests(), 4);

    // Ids that cannot be placed in a URL are refused without disturbing the others.
    src.clear_faults();
    src.reset_counters();
    let out = f.fetch_batch(&[req("1"), req(".."), req("3")]).await;
    assert!(matches!(out[1], Err(FetchError::Permanent { .. })));
    assert_eq!(body_id(&out[2]), "3");
    assert_eq!(targets(&src), ["/customer?ids=1,3"]);
}

#[tokio::test]
async fn large_batches_are_split_at_the_limit() {
    let src = source().await;
    let ids: Vec<String> = (0..25).map(|i| i.to_string()).collect();
    for id in &ids {
        src.put("customer", id, json!({}));
    }
    let f = batched(&src, MissingKey::Retry);
    let requests: Vec<_> = ids.iter().map(|id| req(id)).collect();
    let out = f.fetch_batch(&requests).await;
    for (id, r) in ids.iter().zip(&out) {
        assert_eq!(&body_id(r), id);
    }
    assert_eq!(src.total_requests(), 3);
}
