//! Secrets: configured values that may hold credentials, resolved from the environment.
//!
//! Header values and auth fields are written in configuration as text with `${VAR}` references
//! (for example `"Bearer ${CRM_TOKEN}"`). They are resolved once, when the fetcher is built; a
//! missing variable is a configuration error that names the variable, never its value. Both the
//! configured text and the resolved value live in types whose `Debug` and `Display` print
//! `***`, so neither logs, `Debug` output nor error messages can carry them, and the header
//! values built from them are marked sensitive for the HTTP stack.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A configured value that may contain `${VAR}` references and may itself be a secret.
/// `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wrap a configured value.
    pub fn new(value: impl Into<String>) -> Self {
        SecretString(value.into())
    }

    /// Resolve every `${VAR}` through `env`. `$${` writes a literal `${`.
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, MissingVar> {
        let mut out = String::with_capacity(self.0.len());
        let mut rest = self.0.as_str();
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at..];
            if let Some(tail) = after.strip_prefix("$${") {
                out.push_str("${");
                rest = tail;
            } else if let Some(tail) = after.strip_prefix("${") {
                let end = tail.find('}').ok_or(MissingVar {
                    name: String::new(),
                    unterminated: true,
                })?;
                let name = &tail[..end];
                let value = env(name).ok_or_else(|| MissingVar {
                    name: name.to_owned(),
                    unterminated: false,
                })?;
                out.push_str(&value);
                rest = &tail[end + 1..];
            } else {
                out.push('$');
                rest = &after[1..];
            }
        }
        out.push_str(rest);
        Ok(Secret(out))
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for SecretString {
    fn from(s: &str) -> Self {
        SecretString(s.to_owned())
    }
}

/// A `${VAR}` that could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingVar {
    /// The variable's name (empty when the reference is unterminated).
    pub name: String,
    /// The reference has no closing `}`.
    pub unterminated: bool,
}

impl fmt::Display for MissingVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unterminated {
            f.write_str("a ${ reference has no closing }")
        } else {
            write!(f, "environment variable {} is not set", self.name)
        }
    }
}

/// A resolved secret value. `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for building a request. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cr3t".to_owned())
    }

    #[test]
    fn resolves_references_and_hides_values() {
        let s = SecretString::new("Bearer ${TOKEN} $${literal} $5");
        let r = s.resolve(&env).expect("resolves");
        assert_eq!(r.expose(), "Bearer s3cr3t ${literal} $5");
        assert_eq!(format!("{r:?} {r} {s:?}"), "*** *** ***");
    }

    #[test]
    fn missing_variables_are_named() {
        let e = SecretString::new("${NOPE}")
            .resolve(&env)
            .expect_err("missing");
        assert_eq!(e.to_string(), "environment variable NOPE is not set");
        let e = SecretString::new("${TOKEN")
            .resolve(&env)
            .expect_err("unterminated");
        assert!(e.unterminated);
    }
}
