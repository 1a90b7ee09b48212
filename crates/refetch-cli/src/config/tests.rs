//! Tests of the configuration file: the example parses, every error names its key and line, and
//! `docs/configuration.md` documents every key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use refetch_http::{AuthConfig, BatchConfig, NotFoundConfig, SourceConfig, VersionConfig};
use refetch_sinks::SinkConfig;

use super::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn example_text() -> String {
    std::fs::read_to_string(repo().join("examples/refetch.example.toml")).expect("example exists")
}

fn env_all(name: &str) -> Option<String> {
    Some(format!("<{name}>"))
}

fn no_env(_: &str) -> Option<String> {
    None
}

const MINIMAL: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"

[[topics]]
name = "changes"
decoder = { kind = "json", type = "/type" }

[fetcher.sources.customer]
url = "http://127.0.0.1:1/customers/{id}"

[sink]
kind = "jsonl"
path = "out.jsonl"
"#;

fn load_text(text: &str) -> Result<Loaded, ConfigErrors> {
    load_str(text, Path::new("test.toml"), &env_all)
}

/// The one problem of a rejected file.
fn only(e: ConfigErrors) -> ConfigError {
    assert_eq!(e.len(), 1, "expected exactly one problem:\n{e}");
    e.errors.into_iter().next().expect("one")
}

/// `text` is rejected with exactly one problem.
fn rejected(text: &str) -> ConfigError {
    only(load_text(text).expect_err("must be rejected"))
}

/// `MINIMAL` with `extra` appended, expected to fail with one problem; returns it rendered.
fn error_of(extra: &str) -> (ConfigError, String) {
    let text = format!("{MINIMAL}{extra}");
    let e = rejected(&text);
    let shown = e.to_string();
    (e, shown)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .expect("needle in text")
}

#[test]
fn the_example_parses_and_means_what_it_says() {
    let text = example_text();
    let loaded = load_str(&text, Path::new("refetch.example.toml"), &env_all)
        .unwrap_or_else(|e| panic!("{e}"));
    let c = &loaded.config;
    assert_eq!(c.kafka.group_id, "crm-customers-to-postgres");
    assert_eq!(
        c.kafka.properties.get("sasl.password").map(String::as_str),
        Some("<KAFKA_PASSWORD>"),
        "${{VAR}} is resolved outside [fetcher]"
    );
    assert_eq!(c.engine.window, Duration::from_millis(300));
    assert_eq!(c.engine.max_wait, Duration::from_secs(5));
    let DecoderSection::Json(j) = &c.topics[0].decoder else {
        panic!("json decoder expected")
    };
    assert_eq!(j.routes[0].to_type, "customer");
    assert_eq!(j.fields.get("tenant").map(String::as_str), Some("/tenant"));
    let SinkConfig::Postgres(pg) = &c.sink else {
        panic!("postgres sink expected")
    };
    assert_eq!(
        pg.url.expose(),
        "postgres://refetch:<PG_PASSWORD>@db.internal:5432/crm_replica"
    );
    assert_eq!(pg.table, "customers");
    // Variables under [fetcher] are resolved like everywhere else (and stay out of Debug).
    let headers = &c.fetcher.sources["customer"].headers;
    assert_eq!(
        serde_json::to_value(&headers["X-Api-Key"]).expect("serializes"),
        serde_json::json!("<CRM_API_KEY>")
    );
    assert!(!format!("{:?}", c.fetcher).contains("CRM_API_KEY"));
    assert_eq!(
        c.kafka_config().topics,
        vec!["crm.changes", "crm-customers-to-postgres.retry"]
    );
    assert_eq!(c.ops.listen.to_string(), "127.0.0.1:9464");
    assert_eq!(c.log.format, LogFormat::Json);
    // Routing without a root version weakens cross-partition ordering: warned about.
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("routes `address` to `customer`")),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn the_minimal_file_gets_the_documented_defaults() {
    let c = load_text(MINIMAL).expect("loads").config;
    assert_eq!(c.engine.to_engine(), refetch::EngineConfig::default());
    assert_eq!(c.kafka.dead_letter_topic(), "g.dlq");
    assert_eq!(c.ops, OpsSection::default());
    assert_eq!(c.log.level, "info");
    let k = c.kafka_config();
    assert_eq!(k.group_protocol, refetch::GroupProtocol::Classic);
    assert_eq!(k.topics, vec!["changes"]);
}

#[test]
fn an_unknown_key_is_named_with_its_line_and_the_expected_keys() {
    let (e, shown) = error_of("\n[engine]\nwindoww = \"1s\"\n");
    let text = format!("{MINIMAL}\n[engine]\nwindoww = \"1s\"\n");
    assert_eq!(e.position.map(|p| p.0), Some(line_of(&text, "windoww")));
    assert!(shown.contains("unknown key `windoww`"), "{shown}");
    assert_eq!(e.path.as_deref(), Some("engine.windoww"));
    assert!(shown.contains("expected one of"), "{shown}");
    assert!(shown.starts_with("test.toml:"), "{shown}");
}

#[test]
fn a_bad_duration_says_what_was_expected() {
    let (e, shown) = error_of("\n[engine]\nwindow = \"fast\"\n");
    let text = format!("{MINIMAL}\n[engine]\nwindow = \"fast\"\n");
    assert_eq!(e.position.map(|p| p.0), Some(line_of(&text, "\"fast\"")));
    assert!(shown.contains("fast"), "{shown}");
    let (_, shown) = error_of("\n[engine]\nfetch_concurrency = \"many\"\n");
    assert!(shown.contains("expected"), "{shown}");
}

#[test]
fn an_unset_environment_variable_is_named_with_its_key_and_line() {
    let text = MINIMAL.replace(
        "group_id = \"g\"",
        "group_id = \"g\"\nproperties = { \"sasl.password\" = \"${KAFKA_PW}\" }",
    );
    let e = only(load_str(&text, Path::new("t.toml"), &no_env).expect_err("rejected"));
    let shown = e.to_string();
    assert!(
        shown.contains("environment variable `KAFKA_PW` is not set"),
        "{shown}"
    );
    assert_eq!(e.path.as_deref(), Some("kafka.properties.sasl.password"));
    assert_eq!(e.position.map(|p| p.0), Some(line_of(&text, "KAFKA_PW")));
    // `$${` is a literal.
    let text = MINIMAL.replace("out.jsonl", "$${HOME}.jsonl");
    let c = load_str(&text, Path::new("t.toml"), &no_env)
        .expect("loads")
        .config;
    let SinkConfig::Jsonl(j) = c.sink else {
        panic!("jsonl")
    };
    assert_eq!(j.path, PathBuf::from("${HOME}.jsonl"));
}

#[test]
fn engine_relations_name_the_key_and_its_line() {
    let extra = "\n[engine]\nwindow = \"5s\"\nmax_wait = \"1s\"\n";
    let (e, shown) = error_of(extra);
    let text = format!("{MINIMAL}{extra}");
    assert_eq!(e.path.as_deref(), Some("engine.max_wait"));
    assert_eq!(e.position.map(|p| p.0), Some(line_of(&text, "max_wait")));
    assert!(shown.contains("expected max_wait >= window"), "{shown}");

    let extra = "\n[engine]\nrebalance_drain = \"10m\"\n";
    let (e, shown) = error_of(extra);
    assert_eq!(e.path.as_deref(), Some("engine.rebalance_drain"));
    assert!(shown.contains("max.poll.interval.ms"), "{shown}");
}

#[test]
fn librdkafka_properties_that_break_commit_safety_are_refused() {
    let text = MINIMAL.replace(
        "group_id = \"g\"",
        "group_id = \"g\"\nproperties = { \"enable.auto.commit\" = \"true\" }",
    );
    let e = rejected(&text);
    assert_eq!(
        e.path.as_deref(),
        Some("kafka.properties.enable.auto.commit")
    );
    assert!(e.to_string().contains("automatic offset storing"), "{e}");
    assert_eq!(
        e.position.map(|p| p.0),
        Some(line_of(&text, "enable.auto.commit"))
    );

    let text = MINIMAL.replace(
        "group_id = \"g\"",
        "group_id = \"g\"\ngroup_protocol = \"consumer\"\nconsumer_properties = { \"session.timeout.ms\" = \"6000\" }",
    );
    let e = rejected(&text);
    assert_eq!(
        e.path.as_deref(),
        Some("kafka.consumer_properties.session.timeout.ms")
    );
    assert!(e.to_string().contains("group.protocol=consumer"), "{e}");

    let text = MINIMAL.replace(
        "group_id = \"g\"",
        "group_id = \"g\"\nproducer_properties = { acks = \"1\" }",
    );
    let e = rejected(&text);
    assert!(e.to_string().contains("acks=all"), "{e}");
}

#[test]
fn decoder_mistakes_are_explained() {
    let both = MINIMAL.replace(
        "decoder = { kind = \"json\", type = \"/type\" }",
        "decoder = { kind = \"json\", type = \"/type\", fixed_type = \"customer\" }",
    );
    let e = rejected(&both);
    assert!(e.to_string().contains("not both"), "{e}");
    let neither = MINIMAL.replace(
        "decoder = { kind = \"json\", type = \"/type\" }",
        "decoder = { kind = \"json\" }",
    );
    let e = rejected(&neither);
    assert!(e.to_string().contains("`fixed_type`"), "{e}");
    let pointer = MINIMAL.replace("type = \"/type\"", "type = \"type\"");
    let e = rejected(&pointer);
    assert!(
        e.to_string().contains("JSON pointer starting with `/`"),
        "{e}"
    );
    assert_eq!(e.path.as_deref(), Some("topics[0].decoder.type"));
    let kind = MINIMAL.replace("kind = \"json\"", "kind = \"avro\"");
    let e = rejected(&kind);
    assert!(e.to_string().contains("unknown kind `avro`"), "{e}");
    assert_eq!(e.path.as_deref(), Some("topics[0].decoder.kind"));
    let no_topics = format!(
        "topics = []\n{}",
        MINIMAL.replace(
            "[[topics]]\nname = \"changes\"\ndecoder = { kind = \"json\", type = \"/type\" }\n",
            ""
        )
    );
    let e = rejected(&no_topics);
    assert!(e.to_string().contains("at least one [[topics]]"), "{e}");
}

#[test]
fn missing_sections_and_syntax_errors_point_at_the_file() {
    let e = load_text("[kafka]\nbrokers = \"b\"\n").expect_err("rejected");
    assert!(
        e.to_string().contains("missing required key `group_id`"),
        "{e}"
    );
    let e = rejected("[kafka\nbrokers = 1");
    assert_eq!(e.position.map(|p| p.0), Some(1));
    let e = only(load(Path::new("/nonexistent/refetch.toml")).expect_err("rejected"));
    assert!(e.to_string().contains("cannot read"), "{e}");
}

#[test]
fn the_retry_topic_decodes_entity_headers() {
    let headers = vec![
        (ENTITY_TYPE_HEADER.to_owned(), Some(b"customer".to_vec())),
        (ENTITY_ID_HEADER.to_owned(), Some(b"42".to_vec())),
    ];
    let view = refetch::RecordView {
        topic: "g.retry",
        partition: 0,
        offset: 3,
        key: None,
        payload: Some(b"{}"),
        headers: &headers,
        timestamp: None,
    };
    match HeaderKeyDecoder.decode(&view) {
        Ok(refetch::Decoded::Notification(n)) => {
            assert_eq!(n.key, refetch::EntityKey::new("customer", "42"));
        }
        other => panic!("expected a notification, got {other:?}"),
    }
    let view = refetch::RecordView {
        headers: &[],
        ..view
    };
    assert!(HeaderKeyDecoder.decode(&view).is_err());
}

// ---------------------------------------------------------------------------------------------
// docs/configuration.md documents every key.

/// Tables whose keys are user-chosen names: documented as a whole.
const FREE_MAPS: &[&str] = &[
    "kafka.properties",
    "kafka.consumer_properties",
    "kafka.producer_properties",
    "topics[].decoder.fields",
    "fetcher.sources.<type>.headers",
    "sink.headers",
    "sink.properties",
    "validate.health_urls",
];

fn key_paths(v: &toml::Value, path: &str, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            if FREE_MAPS.contains(&path) {
                out.insert(path.to_owned());
                return;
            }
            for (k, v) in t {
                let child = if path == "fetcher.sources" {
                    format!("{path}.<type>")
                } else if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                key_paths(v, &child, out);
            }
        }
        toml::Value::Array(items)
            if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
        {
            for item in items {
                key_paths(item, &format!("{path}[]"), out);
            }
        }
        _ => {
            out.insert(path.to_owned());
        }
    }
}

/// A configuration with every optional setting filled, in every variant.
fn full_configs() -> Vec<Config> {
    let example = load_str(&example_text(), Path::new("x"), &env_all)
        .expect("example loads")
        .config;
    let mut full = example.clone();
    full.kafka
        .producer_properties
        .insert("linger.ms".into(), "5".into());
    full.backfill.state_file = Some("state.json".into());
    full.reconcile.interval = Some(Duration::from_secs(3600));
    full.reconcile.topic = Some("a".into());
    let mut json = JsonDecoderSection {
        type_pointer: Some("/type".into()),
        version: Some(VersionSpec {
            pointer: "/v".into(),
            kind: refetch::VersionKind::Integer,
        }),
        ..JsonDecoderSection::default()
    };
    json.fields.insert("tenant".into(), "/tenant".into());
    json.routes.push(RouteSection {
        from_type: "address".into(),
        to_type: "customer".into(),
        id: "/customer_id".into(),
        version: Some(RouteVersion {
            pointer: "/customer_version".into(),
            kind: Some(refetch::VersionKind::Integer),
        }),
    });
    full.topics = vec![
        TopicSection {
            name: "a".into(),
            decoder: DecoderSection::Json(json),
        },
        TopicSection {
            name: "c".into(),
            decoder: DecoderSection::Json(JsonDecoderSection {
                fixed_type: Some("customer".into()),
                ..JsonDecoderSection::default()
            }),
        },
        TopicSection {
            name: "b".into(),
            decoder: DecoderSection::RecordKey(RecordKeyDecoderSection {
                entity_type: "customer".into(),
            }),
        },
    ];
    // Every optional source setting, in two valid sources (a version is read from a pointer or a
    // header, a not-found answer is matched by pointer or by substring).
    let mut source = SourceConfig {
        rate_limit: Some(1.0.into()),
        burst: Some(1),
        version: Some(VersionConfig {
            pointer: Some("/v".into()),
            header: None,
            kind: refetch::VersionKind::Integer,
        }),
        envelope: Some("/data".into()),
        not_found: Some(NotFoundConfig {
            pointer: Some("/error".into()),
            equals: Some("not_found".into()),
            contains: None,
        }),
        batch: Some(BatchConfig {
            url: "http://h/c?ids={ids}".into(),
            ..BatchConfig::default()
        }),
        listing: Some(refetch_http::ListingConfig {
            url: "http://h/c?limit={limit}".into(),
            paging: refetch_http::Paging::Cursor,
            cursor_url: Some("http://h/c?cursor={cursor}".into()),
            version: Some("/v".into()),
            version_kind: Some(refetch::VersionKind::Integer),
            total: Some("/total".into()),
            ..refetch_http::ListingConfig::default()
        }),
        auth: Some(AuthConfig::Basic {
            username: "u".into(),
            password: "p".into(),
        }),
        ..SourceConfig::new("http://h/{id}")
    };
    source.headers.insert("X-Api-Key".into(), "k".into());
    full.fetcher
        .sources
        .insert("customer".into(), source.clone());
    let mut out = vec![full.clone()];
    let mut bearer = full.clone();
    source.auth = Some(AuthConfig::Bearer { token: "t".into() });
    source.version = Some(VersionConfig {
        pointer: None,
        header: Some("X-Version".into()),
        kind: refetch::VersionKind::Integer,
    });
    source.not_found = Some(NotFoundConfig {
        pointer: None,
        equals: None,
        contains: Some("not found".into()),
    });
    source.batch = None;
    bearer.fetcher.sources.insert("customer".into(), source);
    out.push(bearer);
    let mut kafka_sink = refetch_sinks::KafkaConfig::default();
    kafka_sink.properties.insert("x".into(), "y".into());
    let mut http_sink = refetch_sinks::HttpConfig::default();
    http_sink.headers.insert("A".into(), "b".into());
    for sink in [
        SinkConfig::Postgres(Default::default()),
        SinkConfig::Kafka(kafka_sink),
        SinkConfig::Http(http_sink),
        SinkConfig::Sqlite(Default::default()),
        SinkConfig::Jsonl(Default::default()),
        SinkConfig::Stdout(Default::default()),
    ] {
        let mut c = full.clone();
        c.sink = sink;
        out.push(c);
    }
    out
}

#[test]
fn docs_configuration_md_documents_every_key() {
    let doc = std::fs::read_to_string(repo().join("docs/configuration.md"))
        .expect("docs/configuration.md exists");
    let mut paths = BTreeSet::new();
    for c in full_configs() {
        let v = toml::Value::try_from(&c).expect("serializes");
        key_paths(&v, "", &mut paths);
    }
    assert!(paths.len() > 80, "too few keys found: {paths:?}");
    for must in [
        "engine.window",
        "sink.kind",
        "fetcher.sources.<type>.url",
        "topics[].decoder.routes[].id",
    ] {
        assert!(paths.contains(must), "{must} not among {paths:?}");
    }
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| !doc.contains(&format!("`{p}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document these keys (write each as `path`): {missing:#?}"
    );
}

#[test]
fn every_full_configuration_round_trips_through_toml() {
    for c in full_configs() {
        let text = toml::to_string(&c).expect("serializes");
        let back = load_str(&text, Path::new("round-trip.toml"), &no_env);
        let back = back.unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back.config, c);
    }
}

#[test]
fn backfill_and_reconcile_sections_have_defaults_and_are_checked() {
    let c = load_text(MINIMAL).expect("loads").config;
    assert_eq!(
        c.reconcile.interval, None,
        "scheduled reconcile is off by default"
    );
    assert_eq!(
        c.backfill.state_path(Path::new("/etc/refetch/crm.toml")),
        Path::new("/etc/refetch/crm.toml.backfill.json")
    );
    let text = format!(
        "{MINIMAL}\n[reconcile]\ninterval = \"6h\"\norphan_wait = \"5s\"\n[backfill]\nstate_file = \"/var/lib/refetch/state.json\"\n"
    );
    let c = load_text(&text).expect("loads").config;
    assert_eq!(c.reconcile.interval, Some(Duration::from_secs(6 * 3600)));
    assert_eq!(c.reconcile.orphan_wait, Duration::from_secs(5));
    assert_eq!(
        c.backfill.state_path(Path::new("x.toml")),
        Path::new("/var/lib/refetch/state.json")
    );
    for (extra, key) in [
        ("\n[reconcile]\npage_size = 0\n", "reconcile.page_size"),
        ("\n[reconcile]\ninterval = \"0s\"\n", "reconcile.interval"),
        ("\n[reconcile]\ntopic = \"elsewhere\"\n", "reconcile.topic"),
        ("\n[reconcile]\nintervall = \"1h\"\n", "intervall"),
    ] {
        let (_, shown) = error_of(extra);
        assert!(shown.contains(key), "{extra}: {shown}");
    }
}

// ---------------------------------------------------------------------------------------------
// Every problem at once, each at its key.

#[test]
fn every_problem_of_a_file_is_reported_at_once_in_file_order() {
    let text = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"
dead_letter_topik = "g.dlq"

[[topics]]
name = "changes"
decoder = { kind = "json", type = "/type", idd = "/id" }

[engine]
window = "5s"
max_wait = "1s"

[fetcher.sources.customer]
url = "http://127.0.0.1:1/customers/{idd}"
headers = { "X-Api-Key" = "${API_KEY}" }

[sink]
kind = "postgres"
url = "postgres://x@db/app"
tabel = "customers"
"#;
    let e = load_str(text, Path::new("many.toml"), &no_env).expect_err("rejected");
    let want = [
        ("kafka.dead_letter_topik", "dead_letter_topik"),
        ("topics[0].decoder.idd", "idd ="),
        ("engine.max_wait", "max_wait"),
        ("fetcher.sources.customer.url", "{idd}"),
        ("fetcher.sources.customer.headers.X-Api-Key", "API_KEY"),
        ("sink.tabel", "tabel"),
    ];
    let paths: Vec<&str> = e.errors.iter().filter_map(|x| x.path.as_deref()).collect();
    assert_eq!(paths, want.map(|(p, _)| p), "{e}");
    for (path, needle) in want {
        let err = e.at(path).expect("reported");
        assert_eq!(
            err.position.map(|p| p.0),
            Some(line_of(text, needle)),
            "{path}: {err}"
        );
        assert!(err.to_string().starts_with("many.toml:"), "{err}");
    }
    let shown = e.to_string();
    assert!(shown.ends_with("6 errors in many.toml"), "{shown}");
    assert!(shown.contains("unknown key `tabel`"), "{shown}");
    assert!(shown.contains("unknown key `idd`"), "{shown}");
    assert!(
        shown.contains("environment variable `API_KEY` is not set"),
        "{shown}"
    );
}

#[test]
fn keys_inside_kind_selected_tables_are_reported_at_their_own_line() {
    // [sink] and [topics.decoder] are selected by `kind`: their unknown keys and bad values are
    // reported at the key, not at the table's header.
    let text = MINIMAL
        .replace(
            "decoder = { kind = \"json\", type = \"/type\" }\n",
            "\n[topics.decoder]\nkind = \"json\"\ntype = \"/type\"\nfixd_type = \"x\"\n",
        )
        .replace(
            "path = \"out.jsonl\"",
            "path = \"out.jsonl\"\nmax_batch = \"many\"",
        );
    let e = load_text(&text).expect_err("rejected");
    let decoder = e.at("topics[0].decoder.fixd_type").expect("decoder key");
    assert_eq!(
        decoder.position,
        Some((line_of(&text, "fixd_type"), 1)),
        "{e}"
    );
    let sink = e.at("sink.max_batch").expect("sink key");
    assert_eq!(
        sink.position.map(|p| p.0),
        Some(line_of(&text, "max_batch")),
        "{e}"
    );
    assert!(
        sink.message.contains("expected a non-negative integer"),
        "{e}"
    );
    assert_eq!(e.len(), 2, "{e}");

    let text = MINIMAL.replace(
        "[fetcher.sources.customer]\n",
        "[fetcher.sources.customer]\nauth = { kind = \"bearer\", tokn = \"x\" }\n",
    );
    let e = rejected(&text);
    assert_eq!(
        e.path.as_deref(),
        Some("fetcher.sources.customer.auth.tokn"),
        "{e}"
    );
    assert_eq!(e.position.map(|p| p.0), Some(line_of(&text, "tokn")));
}

#[test]
fn fetcher_problems_name_their_key_and_line() {
    let text = MINIMAL.replace(
        "[fetcher.sources.customer]\nurl = \"http://127.0.0.1:1/customers/{id}\"\n",
        r#"[fetcher.sources.customer]
url = "http://127.0.0.1:1/customers/{id}"
auth = { kind = "bearer", token = "${CRM_TOKEN}" }
batch = { url = "http://127.0.0.1:1/customers?ids={ids}", max = 0 }

[fetcher.sources.customer.listing]
url = "http://127.0.0.1:1/customers?offset={offset}&limit={limit}"
total = "total"

[fetcher.sources.order]
url = "http://127.0.0.1:1/orders/{order_id}"
"#,
    );
    let e = load_str(&text, Path::new("f.toml"), &no_env).expect_err("rejected");
    for (path, needle, what) in [
        (
            "fetcher.sources.customer.auth.token",
            "CRM_TOKEN",
            "`CRM_TOKEN` is not set",
        ),
        (
            "fetcher.sources.customer.batch.max",
            "max = 0",
            "batch.max must be at least 1",
        ),
        (
            "fetcher.sources.customer.listing.total",
            "total = ",
            "JSON pointer",
        ),
        ("fetcher.sources.order.url", "{order_id}", "order_id"),
    ] {
        let err = e
            .at(path)
            .unwrap_or_else(|| panic!("{path} not reported:\n{e}"));
        assert_eq!(
            err.position.map(|p| p.0),
            Some(line_of(&text, needle)),
            "{err}"
        );
        assert!(err.message.contains(what), "{err}");
    }
    assert_eq!(e.len(), 4, "{e}");
}

#[test]
fn environment_variables_have_defaults_and_required_messages() {
    let env = |name: &str| match name {
        "SET" => Some("value".to_owned()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    for (text, resolved) in [
        ("${SET}", "value"),
        ("${EMPTY}", ""),
        ("${UNSET:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),
        ("${SET:-fallback}", "value"),
        ("a-${UNSET:-}-b", "a--b"),
        ("${SET:?needed}", "value"),
        ("$${SET}", "${SET}"),
    ] {
        assert_eq!(resolve_env(text, &env).as_deref(), Ok(resolved), "{text}");
    }
    assert_eq!(
        resolve_env("${UNSET:?set it to the CRM token}", &env),
        Err("environment variable `UNSET` is not set: set it to the CRM token".to_owned())
    );
    assert_eq!(
        resolve_env("${EMPTY:?needed}", &env),
        Err("environment variable `EMPTY` is empty: needed".to_owned())
    );
    assert!(resolve_env("${9 bad}", &env).is_err());
    // In the file, in every section, [fetcher] included.
    let text = MINIMAL
        .replace("127.0.0.1:9092", "${BROKERS:-127.0.0.1:19092}")
        .replace(
            "[fetcher.sources.customer]\n",
            "[fetcher.sources.customer]\nheaders = { \"X-Key\" = \"${KEY:?export KEY=... first}\" }\n",
        );
    let e = only(load_str(&text, Path::new("t.toml"), &no_env).expect_err("rejected"));
    assert_eq!(
        e.path.as_deref(),
        Some("fetcher.sources.customer.headers.X-Key")
    );
    assert!(e.message.ends_with(": export KEY=... first"), "{e}");
    let loaded = load_str(&text, Path::new("t.toml"), &|n| {
        (n == "KEY").then(|| "k-${not a ref}".to_owned())
    })
    .expect("loads");
    assert_eq!(loaded.config.kafka.brokers, "127.0.0.1:19092");
    // A resolved secret that contains `${` is not resolved a second time by the fetcher.
    crate::wiring::build_fetcher(&loaded.config.fetcher).expect("the fetcher builds");
}

/// Rust type names a user should never read in a configuration error.
fn names_a_rust_type(message: &str) -> bool {
    let words = message.split(|c: char| !c.is_alphanumeric() && c != '_');
    words.into_iter().any(|w| {
        matches!(
            w,
            "usize" | "u8" | "u16" | "u32" | "u64" | "i32" | "i64" | "f64" | "struct" | "enum"
        ) || (w.len() > 3
            && w.chars().next().is_some_and(char::is_uppercase)
            && w.chars().skip(1).any(char::is_uppercase)
            && !w.chars().all(|c| c.is_uppercase() || c == '_'))
    })
}

#[test]
fn a_version_has_one_shape_everywhere() {
    let text = MINIMAL
        .replace(
            "decoder = { kind = \"json\", type = \"/type\" }\n",
            "[topics.decoder]\nkind = \"json\"\ntype = \"/type\"\nversion = { pointer = \"/rev\", kind = \"timestamp\" }\n[[topics.decoder.routes]]\nfrom_type = \"address\"\nto_type = \"customer\"\nid = \"/customer_id\"\nversion = { pointer = \"/customer_rev\" }\n",
        )
        .replace(
            "[fetcher.sources.customer]\n",
            "[fetcher.sources.customer]\nversion = { pointer = \"/version\" }\nlisting = { url = \"http://127.0.0.1:1/c?offset={offset}\", version = { pointer = \"/v\", kind = \"timestamp\" } }\n",
        );
    let loaded = load_text(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        loaded.warnings.iter().all(|w| !w.contains("old shape")),
        "{:?}",
        loaded.warnings
    );
    let c = &loaded.config;
    let DecoderSection::Json(j) = &c.topics[0].decoder else {
        panic!("json")
    };
    assert_eq!(
        j.version,
        Some(VersionSpec {
            pointer: "/rev".into(),
            kind: refetch::VersionKind::Timestamp
        })
    );
    assert_eq!(
        j.routes[0].version.as_ref().map(|v| v.pointer.as_str()),
        Some("/customer_rev")
    );
    let source = &c.fetcher.sources["customer"];
    assert_eq!(
        source.version.as_ref().map(|v| v.kind),
        Some(refetch::VersionKind::Integer),
        "kind defaults to integer in a source too"
    );
    let listing = source.listing.as_ref().expect("listing");
    assert_eq!(listing.version.as_deref(), Some("/v"));
    assert_eq!(listing.version_kind, Some(refetch::VersionKind::Timestamp));

    // The old shape loads, with a warning that shows the new one.
    let old = MINIMAL.replace(
        "type = \"/type\" }",
        "type = \"/type\", version = \"/rev\", version_kind = \"timestamp\" }",
    );
    let loaded = load_text(&old).unwrap_or_else(|e| panic!("{e}"));
    let DecoderSection::Json(j) = &loaded.config.topics[0].decoder else {
        panic!("json")
    };
    assert_eq!(
        j.version.as_ref().map(|v| v.kind),
        Some(refetch::VersionKind::Timestamp)
    );
    let w = loaded
        .warnings
        .iter()
        .find(|w| w.contains("old shape"))
        .expect("warned");
    assert!(
        w.contains("version = { pointer = \"/rev\", kind = \"timestamp\" }"),
        "{w}"
    );
    assert!(
        w.starts_with(&format!("test.toml:{}:", line_of(&old, "version ="))),
        "{w}"
    );

    // A wrong shape says what is expected, in TOML terms, at the key.
    for (from, to, path) in [
        (
            "type = \"/type\" }",
            "type = \"/type\", version = 3 }",
            "topics[0].decoder.version",
        ),
        (
            "[fetcher.sources.customer]\n",
            "[fetcher.sources.customer]\nversion = \"/version\"\n",
            "fetcher.sources.customer.version",
        ),
        (
            "[fetcher.sources.customer]\n",
            "[fetcher.sources.customer]\nversion = { pointer = \"/v\", knd = \"integer\" }\n",
            "fetcher.sources.customer.version.knd",
        ),
        (
            "type = \"/type\" }",
            "type = \"/type\", version = { pointer = \"/v\", kind = \"number\" } }",
            "topics[0].decoder.version.kind",
        ),
    ] {
        let text = MINIMAL.replace(from, to);
        let e = rejected(&text);
        assert_eq!(e.path.as_deref(), Some(path), "{e}");
        assert!(!names_a_rust_type(&e.message), "{e}");
        if !path.ends_with("knd") && !path.ends_with("kind") {
            assert!(
                e.message
                    .contains("{ pointer = \"/version\", kind = \"integer\" }"),
                "{e}"
            );
        }
    }
}

#[test]
fn errors_speak_toml_not_rust() {
    for extra in [
        "\n[engine]\nfetch_concurrency = \"many\"\n",
        "\n[engine]\nunhealthy_ratio = \"half\"\n",
        "\n[engine]\ngone_guard = 5\n",
        "\n[ops]\nenabled = \"yes\"\n",
        "\n[log]\nformat = \"xml\"\n",
        "\n[validate]\nhealth_urls = [1]\n",
        "\n[reconcile]\nsample = -1\n",
    ] {
        let (e, shown) = error_of(extra);
        assert!(!names_a_rust_type(&e.message), "{extra}: {shown}");
    }
    let e = rejected(&MINIMAL.replace("kind = \"jsonl\"\npath = \"out.jsonl\"", "kind = 3"));
    assert!(!names_a_rust_type(&e.message), "{e}");
}

#[test]
fn a_listen_address_is_an_ip_address_and_the_error_says_so() {
    let (e, shown) = error_of("\n[ops]\nlisten = \"localhost:0\"\n");
    assert_eq!(e.path.as_deref(), Some("ops.listen"));
    assert!(
        shown.contains("not a host name; write \"127.0.0.1:0\""),
        "{shown}"
    );
    let (_, shown) = error_of("\n[ops]\nlisten = \"9464\"\n");
    assert!(shown.contains("such as \"127.0.0.1:9464\""), "{shown}");
    let text = format!("{MINIMAL}\n[ops]\nlisten = \"[::1]:0\"\n");
    assert!(load_text(&text).is_ok());
}

#[test]
fn missing_sections_are_all_named() {
    let e = load_text("[kafka]\nbrokers = \"b\"\ngroup_id = \"g\"\n").expect_err("rejected");
    let paths: Vec<&str> = e.errors.iter().filter_map(|x| x.path.as_deref()).collect();
    for section in ["topics", "fetcher", "sink"] {
        assert!(paths.contains(&section), "{section}: {e}");
    }
    assert_eq!(e.len(), 3, "{e}");
}

#[test]
fn exactly_once_is_refused_on_a_sink_that_cannot_deliver_it() {
    let text = MINIMAL.replace(
        "kind = \"jsonl\"",
        "kind = \"jsonl\"\ndelivery = \"exactly_once\"",
    );
    let e = rejected(&text);
    assert_eq!(e.path.as_deref(), Some("sink.delivery"), "{e}");
    assert!(e.message.contains("cannot deliver exactly once"), "{e}");
    assert!(e.message.contains("postgres"), "{e}");
    // At-least-once is what every sink does: saying so is accepted.
    load_text(&MINIMAL.replace(
        "kind = \"jsonl\"",
        "kind = \"jsonl\"\ndelivery = \"at_least_once\"",
    ))
    .expect("at_least_once is accepted");
    let e =
        rejected(&MINIMAL.replace("kind = \"jsonl\"", "kind = \"jsonl\"\ndelivery = \"twice\""));
    assert_eq!(e.path.as_deref(), Some("sink.delivery"), "{e}");
}

const KAFKA_SINK: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"

[[topics]]
name = "changes"
decoder = { kind = "json", type = "/type" }

[fetcher.sources.customer]
url = "http://127.0.0.1:1/customers/{id}"

[sink]
kind = "kafka"
brokers = "127.0.0.1:9092"
topic = "entities"
delivery = "exactly_once"
"#;

#[test]
fn exactly_once_into_kafka_needs_a_transactional_id_and_a_timeout_above_the_commit_interval() {
    let e = rejected(KAFKA_SINK);
    assert_eq!(
        e.path.as_deref(),
        Some("sink.transactional_id_prefix"),
        "{e}"
    );
    let named = format!("{KAFKA_SINK}transactional_id_prefix = \"orders\"\ninstance_id = \"a\"\n");
    let loaded = load_text(&named).expect("valid");
    let SinkConfig::Kafka(k) = &loaded.config.sink else {
        panic!("kafka sink expected");
    };
    assert_eq!(k.delivery, refetch::Delivery::ExactlyOnce);
    assert_eq!(
        refetch_sinks::kafka::transactional_id(k).as_deref(),
        Ok("orders-a")
    );
    let e = rejected(&format!(
        "{named}transaction_timeout = \"5s\"\n[engine]\ncommit_interval = \"5s\"\n"
    ));
    assert_eq!(e.path.as_deref(), Some("sink.transaction_timeout"), "{e}");
    assert!(e.message.contains("commit_interval"), "{e}");
}
