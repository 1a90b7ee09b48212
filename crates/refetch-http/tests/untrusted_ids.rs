//! Untrusted ids and secrets: no id changes scheme, host or path; no secret leaks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use proptest::prelude::*;
use refetch::{EntityKey, FetchError, FetchOutcome, FetchRequest, Fetcher};
use refetch_http::{AuthConfig, ConfigError, HttpFetcher, SourceConfig};
use refetch_testkit::http_source::Fault;
use serde_json::{Value, json};
use support::{fetcher, req, source, template};

#[tokio::test]
async fn hostile_ids_reach_exactly_one_path_segment() {
    let src = source().await;
    let f = fetcher(SourceConfig::new(template(&src)));
    let long = "x/".repeat(5_000);
    let long_target = format!("/customer/{}", "x%2F".repeat(5_000));
    let table: Vec<(&str, &str)> = vec![
        ("../admin", "/customer/..%2Fadmin"),
        ("a/b", "/customer/a%2Fb"),
        ("?x=1", "/customer/%3Fx%3D1"),
        ("#frag", "/customer/%23frag"),
        ("%2F", "/customer/%252F"),
        ("%2e%2e%2fadmin", "/customer/%252e%252e%252fadmin"),
        ("http://evil.example", "/customer/http%3A%2F%2Fevil.example"),
        ("//evil.example/x", "/customer/%2F%2Fevil.example%2Fx"),
        ("@host", "/customer/%40host"),
        ("user:pw@host", "/customer/user%3Apw%40host"),
        (" a\tb\r\n", "/customer/%20a%09b%0D%0A"),
        ("é😀", "/customer/%C3%A9%F0%9F%98%80"),
        ("\\..\\", "/customer/%5C..%5C"),
        ("...", "/customer/..."),
        ("a..", "/customer/a.."),
        ("\0", "/customer/%00"),
        ("{id}", "/customer/%7Bid%7D"),
        (&long, &long_target),
    ];
    for (id, target) in &table {
        src.put("customer", id, json!({"id": id}));
        src.reset_counters();
        let outcome = f.fetch(&req(id)).await;
        let Ok(FetchOutcome::Found(entity)) = outcome else {
            panic!("{id:?}: expected Found, got {outcome:?}");
        };
        let body: Value = serde_json::from_slice(&entity.body).expect("json");
        assert_eq!(
            body["id"].as_str(),
            Some(*id),
            "the source found {id:?} itself"
        );
        let seen = src.recorded();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].target, *target, "{id:?}");
    }
}

#[tokio::test]
async fn dot_and_empty_ids_are_refused_before_any_request() {
    let src = source().await;
    let f = fetcher(SourceConfig::new(template(&src)));
    for id in ["", ".", "..", ".%2E", "%2e%2e", "%2E", "%252E%252e"] {
        let outcome = f.fetch(&req(id)).await;
        assert!(
            matches!(&outcome, Err(FetchError::Permanent { message, .. }) if message.contains("cannot be placed")),
            "{id:?}: {outcome:?}"
        );
    }
    assert_eq!(src.total_requests(), 0);
}

fn any_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just(".%2E".to_owned()),
        Just("%2e%2e".to_owned()),
        "[./%?#@:a-zA-Z0-9 ]{0,12}",
        any::<String>(),
    ]
}

fn probe_fetcher() -> HttpFetcher {
    HttpFetcher::builder()
        .source(
            "customer",
            SourceConfig {
                fields: vec!["tenant".into()],
                ..SourceConfig::new("https://api.example:8443/v1/customers/{id}/view?t={tenant}")
            },
        )
        .build()
        .expect("valid")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn rendered_urls_keep_scheme_host_and_path_or_refuse(id in any_id(), tenant in any_id()) {
        let f = probe_fetcher();
        let mut request = FetchRequest::new(EntityKey::new("customer", id.as_str()));
        request.fields = Some(vec![("tenant".into(), tenant.as_str().into())].into());
        match f.url_for(&request) {
            Ok(url) => {
                prop_assert_eq!(url.scheme(), "https");
                prop_assert_eq!(url.host_str(), Some("api.example"));
                prop_assert_eq!(url.port(), Some(8443));
                prop_assert!(url.fragment().is_none());
                let segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
                prop_assert_eq!(segments.len(), 4, "{}", url);
                prop_assert_eq!(&segments[..2], &["v1", "customers"]);
                prop_assert_eq!(segments[3], "view");
                let decoded = percent_encoding::percent_decode_str(segments[2]).decode_utf8_lossy();
                prop_assert_eq!(decoded.as_ref(), id.as_str());
                let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
                prop_assert_eq!(pairs.len(), 1);
                prop_assert_eq!(&pairs[0].0, "t");
                // `+` decodes as a space in form encoding; tenant ids never contain a raw `+`
                // because it is percent-encoded.
                prop_assert_eq!(&pairs[0].1, &tenant);
            }
            Err(FetchError::Permanent { .. }) => {
                let decodes_to_dots = |s: &str| {
                    let mut cur = s.to_owned();
                    for _ in 0..5 {
                        if matches!(cur.as_str(), "" | "." | "..") {
                            return true;
                        }
                        cur = percent_encoding::percent_decode_str(&cur).decode_utf8_lossy().into_owned();
                    }
                    false
                };
                prop_assert!(decodes_to_dots(&id) || tenant.is_empty(), "{:?} / {:?} refused", id, tenant);
            }
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

#[tokio::test]
async fn secrets_never_appear_in_debug_output_or_errors() {
    const TOKEN: &str = "tok-3b1f9c-secret";
    const KEY: &str = "key-77aa42-secret";
    const PASSWORD: &str = "pw-5e5e5e-secret";
    let env = |name: &str| match name {
        "TOKEN" => Some(TOKEN.to_owned()),
        "KEY" => Some(KEY.to_owned()),
        "PASSWORD" => Some(PASSWORD.to_owned()),
        _ => None,
    };
    let src = source().await;
    let other = source().await;
    src.put("customer", "1", json!({}));
    let bearer = SourceConfig {
        headers: [("X-Api-Key".to_owned(), "${KEY}".into())].into(),
        auth: Some(AuthConfig::Bearer {
            token: "${TOKEN}".into(),
        }),
        ..SourceConfig::new(template(&src))
    };
    let builder = HttpFetcher::builder()
        .env(env)
        .source("customer", bearer.clone());
    let mut texts = vec![format!("{builder:?}"), format!("{bearer:?}")];
    let f = builder.build().expect("builds");
    texts.push(format!("{f:?}"));

    // The secrets are sent...
    let ok = f.fetch(&req("1")).await;
    assert!(matches!(ok, Ok(FetchOutcome::Found(_))), "{ok:?}");
    let sent = src.recorded().pop().expect("request");
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    // ...but never printed.
    for fault in [
        Fault::Status(500),
        Fault::Status(401),
        Fault::Html,
        Fault::DropMidBody,
        Fault::Redirect(other.base_url()),
    ] {
        src.fail_next(1, fault);
        texts.push(format!("{:?}", f.fetch(&req("1")).await));
    }
    src.set_down(true).await.expect("down");
    let down = f.fetch(&req("1")).await;
    texts.push(format!(
        "{down:?} {}",
        down.as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default()
    ));
    src.set_down(false).await.expect("up");

    let basic = SourceConfig {
        auth: Some(AuthConfig::Basic {
            username: "svc".into(),
            password: "${PASSWORD}".into(),
        }),
        ..SourceConfig::new(template(&src))
    };
    let f = HttpFetcher::builder()
        .env(env)
        .source("customer", basic)
        .build()
        .expect("builds");
    texts.push(format!("{f:?}"));
    assert!(matches!(
        f.fetch(&req("1")).await,
        Ok(FetchOutcome::Found(_))
    ));
    let sent = src.recorded().pop().expect("request");
    assert_eq!(
        sent.header("authorization"),
        Some("Basic c3ZjOnB3LTVlNWU1ZS1zZWNyZXQ=")
    );

    // A missing variable is named, and the values of the others are not shown.
    let missing = HttpFetcher::builder()
        .env(env)
        .source(
            "customer",
            SourceConfig {
                headers: [
                    ("X-Api-Key".to_owned(), "${KEY}".into()),
                    ("X-Other".to_owned(), "${UNSET_VAR}".into()),
                ]
                .into(),
                ..SourceConfig::new(template(&src))
            },
        )
        .build()
        .expect_err("missing var");
    assert!(matches!(&missing, ConfigError::Env { .. }));
    assert!(missing.to_string().contains("UNSET_VAR"), "{missing}");
    texts.push(format!("{missing:?} {missing}"));

    let all = texts.join("\n");
    for secret in [TOKEN, KEY, PASSWORD, "c3ZjOnB3LTVlNWU1ZS1zZWNyZXQ="] {
        assert!(!all.contains(secret), "{secret} leaked in:\n{all}");
    }
}
