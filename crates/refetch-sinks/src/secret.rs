//! Secrets in configuration: values that must never appear in `Debug` output, logs or errors.
//!
//! Connection URLs carry passwords (`postgres://app:hunter2@db/app`) and HTTP sinks carry
//! `Authorization` headers. [`Secret`] holds such a value: it deserializes from a plain string,
//! and its `Debug`/`Display` print a redacted form ([`redact_url`] for URLs: the password is
//! replaced by `***`, everything else is kept so operators can still see which host is meant).

use std::fmt;

/// A configuration string that may contain a secret. `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wrap a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself, for handing to a driver. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The value with any password removed (see [`redact_url`]), safe to log.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Redact the password in a URL (`scheme://user:password@host/...` becomes
/// `scheme://user:***@host/...`) or in a libpq key/value string (`password=...` becomes
/// `password=***`). A value that is neither is returned as is when it has no `@` and no
/// `password`, otherwise it is fully masked, because a secret in an unknown format must not leak.
pub fn redact_url(value: &str) -> String {
    if let Some(scheme_end) = value.find("://") {
        let rest = &value[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            let tail = &rest[at..];
            return redact_query(&format!("{}://{masked}{tail}", &value[..scheme_end]));
        }
        return redact_query(value);
    }
    if value.contains("password") {
        // libpq key/value form: mask the value after `password=`.
        let mut out = Vec::new();
        for part in value.split_whitespace() {
            if part.starts_with("password=") {
                out.push("password=***".to_owned());
            } else {
                out.push(part.to_owned());
            }
        }
        return out.join(" ");
    }
    if value.contains('@') {
        return "***".to_owned();
    }
    value.to_owned()
}

/// Mask `password=` query parameters (`?sslmode=require&password=x`).
fn redact_query(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_owned();
    };
    let (head, query) = url.split_at(q + 1);
    let parts: Vec<String> = query
        .split('&')
        .map(|p| {
            if p.to_ascii_lowercase().starts_with("password=") {
                "password=***".to_owned()
            } else {
                p.to_owned()
            }
        })
        .collect();
    format!("{head}{}", parts.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_masked_user_and_host_kept() {
        let s = Secret::new("postgres://app:hunter2@db.example:5432/app?sslmode=disable");
        let shown = format!("{s:?} {s}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app:***@db.example:5432/app"), "{shown}");
    }

    #[test]
    fn password_with_at_sign_is_masked_entirely() {
        let shown = redact_url("postgres://app:p@ss@db/app");
        assert!(!shown.contains("p@ss"), "{shown}");
        assert!(!shown.contains("ss@"), "{shown}");
        assert_eq!(shown, "postgres://app:***@db/app");
    }

    #[test]
    fn key_value_and_query_passwords_are_masked() {
        assert_eq!(
            redact_url("host=db user=app password=hunter2"),
            "host=db user=app password=***"
        );
        assert_eq!(
            redact_url("postgres://db/app?user=app&password=hunter2"),
            "postgres://db/app?user=app&password=***"
        );
    }

    #[test]
    fn urls_without_credentials_are_unchanged() {
        assert_eq!(
            redact_url("http://127.0.0.1:8080/x/{id}"),
            "http://127.0.0.1:8080/x/{id}"
        );
        assert_eq!(redact_url("postgres://db/app"), "postgres://db/app");
    }
}
