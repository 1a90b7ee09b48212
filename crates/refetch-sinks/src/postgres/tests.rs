use super::*;
use refetch::Entity;

#[test]
fn identifiers_are_quoted_with_inner_quotes_doubled() {
    assert_eq!(quote_ident("entities"), "\"entities\"");
    assert_eq!(quote_ident("we\"ird; drop"), "\"we\"\"ird; drop\"");
    assert!(check_ident("table", "").is_err());
    assert!(check_ident("table", &"x".repeat(64)).is_err());
    assert!(check_ident("table", "a\0b").is_err());
    let sql = Statements::new("\"s\".\"t\"", DeleteMode::Tombstone);
    assert!(sql.upsert.starts_with("INSERT INTO \"s\".\"t\" AS t"));
    assert!(sql.delete.contains("deleted = true"));
}

#[test]
fn record_errors_are_data_constraint_and_limit_classes_only() {
    for code in ["22P02", "22001", "23505", "23514", "54000"] {
        assert!(is_record_error(code), "{code}");
    }
    // Connection, serialization, deadlock, shutdown, missing table: the database's problem.
    for code in [
        "08006", "40001", "40P01", "57P01", "53300", "42P01", "25P02",
    ] {
        assert!(!is_record_error(code), "{code}");
    }
}

#[test]
fn rows_put_json_in_body_and_everything_else_in_body_raw() {
    let json = Change::Upsert {
        key: EntityKey::new("c", "1"),
        entity: Entity::json(r#"{"a":1}"#, Some(Version::Timestamp(9))),
    };
    let row = Row::new(&json, None);
    assert_eq!(row.json, Some(r#"{"a":1}"#));
    assert_eq!(row.raw, None);
    assert_eq!(
        (row.version, row.version_kind),
        (Some(9), Some("timestamp"))
    );
    assert_eq!(row.params().len(), 8);

    let nul = Change::Upsert {
        key: EntityKey::new("c", "2"),
        entity: Entity::json(r#"{"a":"\u0000"}"#, None),
    };
    let row = Row::new(&nul, None);
    assert_eq!(row.json, None);
    assert_eq!(row.raw, Some(&br#"{"a":"\u0000"}"#[..]));

    let del = Change::Delete {
        key: EntityKey::new("c", "3"),
    };
    assert_eq!(Row::new(&del, None).params().len(), 3);
}

#[tokio::test]
async fn connection_errors_never_show_the_password() {
    // Port 1 on 127.0.0.1: nothing listens, the connection is refused at once.
    let cfg = PostgresConfig {
        url: crate::Secret::new("postgres://app:hunter2@127.0.0.1:1/app"),
        connect_timeout: Duration::from_secs(2),
        ..PostgresConfig::default()
    };
    let err = PostgresSink::connect(&cfg)
        .await
        .expect_err("nothing listens on port 1");
    let shown = format!("{err} {err:?}");
    assert!(matches!(err, SinkBuildError::Unavailable { .. }), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("app:***@127.0.0.1:1"), "{shown}");

    let bad = PostgresConfig {
        url: crate::Secret::new("postgres://app:hunter2@127.0.0.1:notaport/app"),
        ..PostgresConfig::default()
    };
    let err = PostgresSink::connect(&bad).await.expect_err("invalid URL");
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
}
