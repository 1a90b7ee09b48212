//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`) through the same checks the fuzz targets
//! run, and runs property tests of 10,000+ cases over the same parsers, so every test run
//! exercises them without cargo-fuzz or a nightly toolchain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../fuzz/checks.rs"]
mod checks;

use proptest::prelude::*;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

#[test]
fn decode_json_corpus() {
    let inputs = corpus("decode_json");
    assert!(!inputs.is_empty());
    for input in inputs {
        checks::decode_json(&input);
    }
}

#[test]
fn url_template_corpus() {
    let inputs = corpus("url_template");
    assert!(!inputs.is_empty());
    for input in inputs {
        checks::url_template(&input);
    }
}

#[test]
fn config_toml_corpus() {
    let inputs = corpus("config_toml");
    assert!(!inputs.is_empty());
    for input in inputs {
        checks::config_toml(&input);
    }
}

/// JSON objects with ids of every shape, versions of every kind, and noise members.
fn notification_json() -> impl Strategy<Value = Vec<u8>> {
    let id = prop_oneof![
        any::<String>().prop_map(serde_json::Value::String),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        Just(serde_json::Value::Null),
        Just(serde_json::json!([1, 2])),
        Just(serde_json::json!({"nested": true})),
    ];
    let version = prop_oneof![
        any::<i64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::String),
        Just(serde_json::json!("2026-11-26T10:00:00+01:00")),
    ];
    (id, version, any::<String>(), prop::option::of("[a-z]{1,8}")).prop_map(|(id, v, noise, ty)| {
        let mut o =
            serde_json::json!({"id": id, "v": v, "ts": v, "noise": noise, "customer_id": id});
        if let Some(t) = ty {
            o["type"] = serde_json::Value::String(t);
        }
        serde_json::to_vec(&o).unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, .. ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic_on_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        checks::decode_json(&data);
    }

    #[test]
    fn decoders_never_panic_on_json(data in notification_json()) {
        checks::decode_json(&data);
    }

    #[test]
    fn ids_never_escape_url_templates(id in prop_oneof![
        any::<String>(),
        "[./%a-zA-Z0-9?#@:&=]{0,12}",
        Just(".%2E".to_owned()),
        Just("%2e%2e".to_owned()),
    ]) {
        checks::check_id(checks::shared_fetcher(), &id);
    }

    #[test]
    fn configuration_parsing_never_panics(text in "[\\[\\]a-z_.=\" {}0-9:/\n-]{0,120}") {
        checks::config_toml(text.as_bytes());
    }
}
