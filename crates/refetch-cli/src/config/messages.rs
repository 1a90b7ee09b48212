//! serde's and toml's error messages, reworded for people who write TOML, not Rust.
//!
//! serde describes what it expected in terms of the Rust type being filled (`expected struct
//! VersionConfig`, `expected usize`, `expected internally tagged enum SinkConfig`). A user
//! writing a configuration file knows tables, strings and numbers, so those phrases are
//! replaced; everything else (the value found, the list of known keys) is kept.

/// Reword one message.
pub fn humanize(message: &str) -> String {
    let message = message.trim().replace('\n', "; ");
    let mut out = String::with_capacity(message.len());
    let mut rest = message.as_str();
    while let Some(at) = rest.find("expected ") {
        let (before, after) = rest.split_at(at + "expected ".len());
        out.push_str(before);
        let (replacement, consumed) = expected_phrase(after);
        out.push_str(&replacement);
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out.replace("missing field", "missing required key")
        .replace("unknown field", "unknown key")
}

/// What follows `expected `: the replacement and how many bytes it replaces.
fn expected_phrase(after: &str) -> (String, usize) {
    for (rust, human) in [
        ("struct VersionConfig", VERSION_TABLE),
        ("struct VersionSpec", VERSION_TABLE),
        (
            "struct RouteVersion",
            "a table such as { pointer = \"/customer_version\" }",
        ),
        ("internally tagged enum", "a table with a `kind` key"),
        ("adjacently tagged enum", "a table with a `kind` key"),
    ] {
        if let Some(tail) = after.strip_prefix(rust) {
            // Drop the Rust type name that follows a tagged-enum phrase.
            let name_len = if rust.ends_with("enum") {
                tail.trim_start()
                    .split(|c: char| !c.is_alphanumeric())
                    .next()
                    .map_or(0, |n| tail.len() - tail.trim_start().len() + n.len())
            } else {
                0
            };
            return (human.to_owned(), rust.len() + name_len);
        }
    }
    for (prefix, human) in [
        ("struct ", "a table"),
        ("enum ", "one of the documented values"),
    ] {
        if let Some(tail) = after.strip_prefix(prefix) {
            let name = tail
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .next()
                .unwrap_or("");
            return (human.to_owned(), prefix.len() + name.len());
        }
    }
    let word_len = after
        .find(|c: char| !c.is_alphanumeric())
        .unwrap_or(after.len());
    let word = &after[..word_len];
    let human = match word {
        "usize" | "u8" | "u16" | "u32" | "u64" | "u128" => "a non-negative integer",
        "isize" | "i8" | "i16" | "i32" | "i64" | "i128" => "an integer",
        "f32" | "f64" => "a number",
        "char" => "a single character",
        _ => {
            return match after {
                a if a.starts_with("a map") => ("a table".to_owned(), "a map".len()),
                a if a.starts_with("a sequence") => ("an array".to_owned(), "a sequence".len()),
                a if a.starts_with("a borrowed string") => {
                    ("a string".to_owned(), "a borrowed string".len())
                }
                _ => (String::new(), 0),
            };
        }
    };
    (human.to_owned(), word_len)
}

/// The shape of a version, wherever one is configured.
pub const VERSION_TABLE: &str = "a table such as { pointer = \"/version\", kind = \"integer\" } (kind: \"integer\" or \"timestamp\")";

/// The name in `missing required key `x``, if the message is one.
pub fn missing_key(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing required key `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_types_are_replaced_by_what_a_toml_writer_knows() {
        assert_eq!(
            humanize("invalid type: string \"/v\", expected struct VersionConfig"),
            format!("invalid type: string \"/v\", expected {VERSION_TABLE}")
        );
        assert_eq!(
            humanize("invalid type: string \"many\", expected usize"),
            "invalid type: string \"many\", expected a non-negative integer"
        );
        assert_eq!(
            humanize("invalid type: integer `3`, expected internally tagged enum SinkConfig"),
            "invalid type: integer `3`, expected a table with a `kind` key"
        );
        assert_eq!(
            humanize("invalid type: string \"x\", expected struct BreakerConfig"),
            "invalid type: string \"x\", expected a table"
        );
        assert_eq!(
            humanize("invalid type: integer `1`, expected a sequence"),
            "invalid type: integer `1`, expected an array"
        );
        assert_eq!(
            humanize("unknown field `windoww`, expected one of `window`, `max_wait`"),
            "unknown key `windoww`, expected one of `window`, `max_wait`"
        );
        assert_eq!(missing_key("missing required key `url`"), Some("url"));
        assert_eq!(humanize("expected a string"), "expected a string");
    }
}
