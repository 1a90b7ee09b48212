//! Loading a configuration file: parse, resolve `${VAR}`, deserialize, check, and point every
//! error at its line.
//!
//! The document is parsed once into toml's spanned tree. `${VAR}` references in string values are
//! replaced in that tree (so the spans still point into the file as written), then the typed
//! [`Config`] is deserialized from it, so serde's errors ("unknown field `timeuot`, expected one
//! of ...") carry the span of the offending key or value. Errors found after deserialization
//! ([`Config::check`]) name a key path, which is looked up in the same tree for its line.
//!
//! Strings under `[fetcher]` are left as written: the HTTP fetcher resolves `${VAR}` in header and
//! auth values itself when it is built (and keeps the result out of `Debug` output).

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Config;

/// A configuration error, rendered as `file:line:column: message` with the offending line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<string>`).
    pub file: PathBuf,
    /// 1-based line and column, when the error has a place in the file.
    pub position: Option<(usize, usize)>,
    /// The key path, when known (`engine.max_wait`).
    pub path: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
    /// The line of the file the error points at.
    pub line_text: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": ")?;
        if let Some(p) = &self.path {
            write!(f, "`{p}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let (Some(text), Some((line, col))) = (&self.line_text, self.position) {
            let gutter = line.to_string().len();
            write!(
                f,
                "\n{:gutter$} |\n{line} | {text}\n{:gutter$} | {:>col$}",
                "", "", "^"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A loaded configuration and the warnings it produced.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration, with `${VAR}` resolved (except under `[fetcher]`).
    pub config: Config,
    /// Settings that work but weaken a guarantee.
    pub warnings: Vec<String>,
}

/// Load and check the file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        position: None,
        path: None,
        message: format!("cannot read the configuration file: {e}"),
        line_text: None,
    })?;
    load_str(&text, path, &|name| std::env::var(name).ok())
}

/// Load and check configuration `text` (named `file` in errors), resolving `${VAR}` with `env`.
pub fn load_str(
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    let err_at = |span: Option<std::ops::Range<usize>>, path: Option<String>, message: String| {
        let position = span.map(|s| line_col(text, s.start));
        ConfigError {
            file: file.to_path_buf(),
            position,
            path,
            message,
            line_text: position.and_then(|(l, _)| text.lines().nth(l - 1).map(str::to_owned)),
        }
    };
    let mut root = DeTable::parse(text).map_err(|e| err_at(e.span(), None, clean(e.message())))?;
    let pristine = root.clone();
    substitute_table(root.get_mut(), &mut Vec::new(), env)
        .map_err(|(span, path, message)| err_at(Some(span), Some(path), message))?;
    let config = Config::deserialize(toml::de::Deserializer::from(root))
        .map_err(|e| err_at(e.span(), None, clean(e.message())))?;
    if let Err(invalid) = config.check() {
        let span = locate(pristine.get_ref(), &invalid.path);
        return Err(err_at(span, Some(invalid.path), invalid.message));
    }
    let warnings = config.warnings();
    Ok(Loaded { config, warnings })
}

/// toml's messages sometimes end with a newline; keep one line.
fn clean(message: &str) -> String {
    message.trim().replace('\n', "; ")
}

/// 1-based line and column (in characters) of byte offset `at`.
pub fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

type SubstError = (std::ops::Range<usize>, String, String);

fn substitute_table(
    table: &mut DeTable<'_>,
    path: &mut Vec<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), SubstError> {
    for (key, value) in table.iter_mut() {
        // The HTTP fetcher resolves its own `${VAR}` (secrets stay out of Debug output).
        if path.is_empty() && key.get_ref().as_ref() == "fetcher" {
            continue;
        }
        path.push(key.get_ref().to_string());
        substitute_value(value, path, env)?;
        path.pop();
    }
    Ok(())
}

fn substitute_value(
    value: &mut Spanned<DeValue<'_>>,
    path: &mut Vec<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), SubstError> {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) if s.contains('$') => {
            let resolved = resolve_env(s, env).map_err(|m| (span, path.join("."), m))?;
            *s = Cow::Owned(resolved);
        }
        DeValue::Table(t) => substitute_table(t, path, env)?,
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(format!("[{i}]"));
                substitute_value(item, path, env)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

/// Replace every `${VAR}` in `s`; `$${` writes a literal `${`. A missing variable is an error
/// naming it (never a value).
pub fn resolve_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(end) = tail.find('}') else {
                return Err("unterminated `${`: expected `${NAME}`".to_owned());
            };
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable reference: expected \
                     letters, digits and `_`"
                ));
            }
            let Some(value) = env(name) else {
                return Err(format!("environment variable `{name}` is not set"));
            };
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// One step of a key path.
enum Seg {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let mut pieces = part.split('[');
        if let Some(name) = pieces.next().filter(|n| !n.is_empty()) {
            out.push(Seg::Key(name.to_owned()));
        }
        for idx in pieces {
            if let Ok(n) = idx.trim_end_matches(']').parse::<usize>() {
                out.push(Seg::Index(n));
            }
        }
    }
    out
}

/// The span of the key (or array item) at dotted `path` (`topics[0].decoder.id`), or of its
/// nearest existing parent.
fn locate(root: &DeTable<'_>, path: &str) -> Option<std::ops::Range<usize>> {
    let mut best = None;
    let mut current: Option<&Spanned<DeValue<'_>>> = None;
    for seg in parse_path(path) {
        let table = match current.map(Spanned::get_ref) {
            None => Some(root),
            Some(DeValue::Table(t)) => Some(t),
            _ => None,
        };
        let step = match (seg, table, current.map(Spanned::get_ref)) {
            (Seg::Key(k), Some(t), _) => t.get_key_value(k.as_str()).map(|(key, v)| {
                let span = if key.span().is_empty() {
                    v.span()
                } else {
                    key.span()
                };
                (span, v)
            }),
            (Seg::Index(i), _, Some(DeValue::Array(a))) => a.get(i).map(|v| (v.span(), v)),
            _ => None,
        };
        match step {
            Some((span, v)) => {
                best = Some(span);
                current = Some(v);
            }
            None => break,
        }
    }
    best
}
