//! `[fetcher]` checked when the file loads, every problem at the key it is about.
//!
//! The HTTP fetcher validates its own configuration when it is built (URL templates, pointers,
//! header names, batch and listing settings, CA files). Loading builds each source on its own
//! (without sending anything, and without touching the process's metrics) and turns the
//! fetcher's error into a key path under `fetcher.sources.<type>`:
//! - a template error names the template, which is matched against the source's templates;
//! - other errors start with, or mention, the setting they are about (`batch.max must be ...`,
//!   `header name "x y" is invalid`), which is matched against the source's settings.
//!
//! The setting is then set aside (its optional table removed) and the source built again, so
//! several problems of one source are reported together.

use refetch_http::{ConfigError, HttpFetcher, HttpFetcherConfig, SourceConfig};

use super::Invalid;

/// The settings of a source (`SourceConfig`'s keys). A test keeps this list equal to the keys
/// the fetcher's configuration accepts.
pub(crate) const SOURCE_KEYS: &[&str] = &[
    "url",
    "fields",
    "headers",
    "auth",
    "timeout",
    "connect_timeout",
    "rate_limit",
    "burst",
    "concurrency",
    "breaker",
    "body_limit",
    "expect_json",
    "version",
    "envelope",
    "not_found",
    "follow_redirects_to_other_hosts",
    "max_redirects",
    "ca_file",
    "batch",
    "listing",
];

/// Build every source of `cfg` on its own; one [`Invalid`] per problem.
pub fn check(cfg: &HttpFetcherConfig) -> Vec<Invalid> {
    let mut out = Vec::new();
    for (entity_type, source) in &cfg.sources {
        let base = format!("fetcher.sources.{entity_type}");
        let mut source = source.clone();
        for _ in 0..16 {
            let Err(e) = build_one(entity_type, &source, &cfg.user_agent) else {
                break;
            };
            let (setting, message) = describe(entity_type, &source, &e);
            let path = match &setting {
                Some(s) => format!("{base}.{s}"),
                None => base.clone(),
            };
            out.push(Invalid::new(path, message));
            if !set_aside(&mut source, setting.as_deref()) {
                break;
            }
        }
    }
    out
}

/// Build a fetcher of this one source. Values are already resolved: `${VAR}` is not looked up
/// again. Metrics the fetcher registers go to a recorder that drops them (a reload must not reset
/// the running fetcher's gauges).
fn build_one(
    entity_type: &str,
    source: &SourceConfig,
    user_agent: &str,
) -> Result<(), ConfigError> {
    metrics::with_local_recorder(&metrics::NoopRecorder, || {
        HttpFetcher::builder()
            .user_agent(user_agent)
            .env(|_| None)
            .source(entity_type, source.clone())
            .build()
            .map(drop)
    })
}

/// The setting (relative to the source) a fetcher error is about, and the message without the
/// source's name (the key path names it).
fn describe(entity_type: &str, source: &SourceConfig, e: &ConfigError) -> (Option<String>, String) {
    let message = e.to_string();
    let message = message
        .strip_prefix(&format!("source {entity_type}: "))
        .unwrap_or(&message)
        .to_owned();
    let setting = match e {
        ConfigError::Template { error, .. } => template_key(source, &error.template),
        ConfigError::Env { setting, .. } => Some(setting.clone()),
        ConfigError::Invalid { message, .. } => setting_named_in(message),
    };
    (setting, message)
}

/// Which of the source's templates is `template`.
fn template_key(source: &SourceConfig, template: &str) -> Option<String> {
    let listing = source.listing.as_ref();
    [
        ("url", Some(source.url.as_str())),
        ("batch.url", source.batch.as_ref().map(|b| b.url.as_str())),
        ("listing.url", listing.map(|l| l.url.as_str())),
        (
            "listing.cursor_url",
            listing.and_then(|l| l.cursor_url.as_deref()),
        ),
    ]
    .into_iter()
    .find(|(_, t)| *t == Some(template))
    .map(|(k, _)| k.to_owned())
}

/// The first word of `message` that names a setting of a source (`batch.max`, `url`), or the
/// header a message about a header names.
pub(crate) fn setting_named_in(message: &str) -> Option<String> {
    // `header name "..."` quotes the name (which may hold spaces).
    if let Some((_, rest)) = message.split_once("header name \"")
        && let Some(name) = rest.split('"').next()
    {
        return Some(format!("headers.{name}"));
    }
    let words: Vec<&str> = message.split_whitespace().collect();
    for (i, raw) in words.iter().enumerate() {
        let word = raw.trim_matches(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'));
        if word == "header" {
            return match words.get(i + 1).map(|n| n.trim_matches('"')) {
                Some(name) if !name.is_empty() => Some(format!("headers.{name}")),
                _ => Some("headers".to_owned()),
            };
        }
        if word == "field" {
            return Some("fields".to_owned());
        }
        let first = word.split('.').next().unwrap_or("");
        if SOURCE_KEYS.contains(&first) {
            return Some(word.trim_end_matches('.').to_owned());
        }
    }
    None
}

/// Take the setting out of `source` so the rest can be checked; `false` when the source cannot
/// be built without it.
fn set_aside(source: &mut SourceConfig, setting: Option<&str>) -> bool {
    let Some(setting) = setting else {
        return false;
    };
    let defaults = SourceConfig::default();
    let first = setting.split('.').next().unwrap_or(setting);
    match first {
        "batch" => source.batch = None,
        "listing" => source.listing = None,
        "version" => source.version = None,
        "not_found" => source.not_found = None,
        "envelope" => source.envelope = None,
        "auth" => source.auth = None,
        "ca_file" => source.ca_file = None,
        "headers" => match setting.strip_prefix("headers.") {
            Some(name) => {
                source.headers.remove(name);
            }
            None => source.headers.clear(),
        },
        "burst" => source.burst = None,
        "rate_limit" => {
            source.rate_limit = None;
            source.burst = None;
        }
        "body_limit" => source.body_limit = defaults.body_limit,
        "timeout" | "connect_timeout" => {
            source.timeout = defaults.timeout;
            source.connect_timeout = defaults.connect_timeout;
        }
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_keys_are_the_fetchers_keys() {
        let e = toml::from_str::<SourceConfig>("zz_not_a_key = 1")
            .expect_err("unknown keys are refused");
        let message = e.message().to_owned();
        let listed: Vec<&str> = message.split('`').skip(3).step_by(2).collect();
        assert_eq!(listed, SOURCE_KEYS, "{message}");
    }

    #[test]
    fn messages_name_their_setting() {
        for (message, setting) in [
            ("url must contain {id}", Some("url")),
            ("batch.max must be at least 1", Some("batch.max")),
            ("header name \"a b\" is invalid", Some("headers.a b")),
            (
                "the value of header X-Key is not a valid header value",
                Some("headers.X-Key"),
            ),
            ("field name \"id\" is reserved", Some("fields")),
            (
                "timeout and connect_timeout must be positive",
                Some("timeout"),
            ),
            (
                "listing.total \"x\" is not a JSON pointer",
                Some("listing.total"),
            ),
            ("reading ca_file /nope: not found", Some("ca_file")),
            ("building the HTTP client: boom", None),
        ] {
            assert_eq!(setting_named_in(message).as_deref(), setting, "{message}");
        }
    }
}
