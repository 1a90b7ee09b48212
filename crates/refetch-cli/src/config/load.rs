//! Loading a configuration file: parse, resolve `${VAR}`, deserialize, check, and point every
//! error at its line. Every error of a file is reported in one run.
//!
//! The document is parsed once into toml's spanned tree. Versions are rewritten into their one
//! shape ([`super::shapes`]) and `${VAR}` references in string values are replaced in that tree,
//! so spans still point into the file as written. Each top-level section is then deserialized on
//! its own from the tree: serde stops at the first problem, so each problem is recorded (with the
//! span of the offending key or value), the entry it points at is taken out, and the section is
//! deserialized again, until it deserializes or nothing more can be taken out. Tables selected by
//! `kind` (`[sink]`, `[topics.decoder]`, `auth`) are checked as the variant they name, so an
//! unknown key inside them is reported at its own line rather than at the table's header.
//! Finally the whole [`Config`] is deserialized from what is left, and the relations between
//! settings are checked ([`Config::check`], [`super::fetcher::check`]); those problems name a
//! key path, which is looked up in the tree for its line.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::messages::{humanize, missing_key};
use super::tree::{self, Node, Step, key};
use super::{
    BackfillSection, Config, EngineSection, KafkaSection, LogSection, OpsSection, ReconcileSection,
    TopicSection, ValidateSection,
};

/// At most this many problems are reported per section (a file of garbage stops somewhere).
const MAX_PER_SECTION: usize = 50;

/// One configuration problem, rendered as `file:line:column: message` with the offending line.
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
        if let Some(p) = self.path.as_deref().filter(|p| !p.is_empty()) {
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

/// Every problem found in one configuration file, in the order of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The problems (at least one).
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// The first problem in the file.
    pub fn first(&self) -> Option<&ConfigError> {
        self.errors.first()
    }

    /// How many problems were found.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Never true for errors returned by [`load`].
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The problem whose key path is `path`, if any.
    pub fn at(&self, path: &str) -> Option<&ConfigError> {
        self.errors.iter().find(|e| e.path.as_deref() == Some(path))
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors { errors: vec![e] }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        if self.errors.len() > 1 {
            let file = self.errors[0].file.display();
            write!(f, "\n\n{} errors in {file}", self.errors.len())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A loaded configuration and the warnings it produced.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration, with every `${VAR}` resolved.
    pub config: Config,
    /// Settings that work but weaken a guarantee, or use an old shape.
    pub warnings: Vec<String>,
}

/// Load and check the file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        position: None,
        path: None,
        message: format!("cannot read the configuration file: {e}"),
        line_text: None,
    })?;
    load_str(&text, path, &|name| std::env::var(name).ok())
}

/// Collects the problems of one file and renders their positions.
pub struct Collector<'a> {
    text: &'a str,
    file: &'a Path,
    errors: Vec<ConfigError>,
    /// Key paths already reported: a later problem at, above or below one of them is a
    /// consequence of it and is not reported again.
    reported: Vec<String>,
}

impl<'a> Collector<'a> {
    fn new(text: &'a str, file: &'a Path) -> Self {
        Collector {
            text,
            file,
            errors: Vec::new(),
            reported: Vec::new(),
        }
    }

    fn position(&self, at: usize) -> (usize, usize) {
        line_col(self.text, at)
    }

    /// Record a problem at `span` (if known) about key `path` (if known).
    pub fn push(&mut self, span: Option<Range<usize>>, path: Option<String>, message: String) {
        if let Some(p) = &path {
            if self.covered(p) {
                return;
            }
            self.reported.push(p.clone());
        }
        let position = span.map(|s| self.position(s.start));
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            position,
            path,
            message,
            line_text: position.and_then(|(l, _)| self.text.lines().nth(l - 1).map(str::to_owned)),
        });
    }

    /// Was a problem at, above or below `path` reported already?
    pub fn covered(&self, path: &str) -> bool {
        self.reported
            .iter()
            .any(|r| r == path || under(r, path) || under(path, r))
    }

    fn finish(mut self) -> Vec<ConfigError> {
        // Stable: problems without a position keep their order at the end.
        self.errors
            .sort_by_key(|e| e.position.unwrap_or((usize::MAX, usize::MAX)));
        self.errors
    }
}

/// Is `child` a key path inside `parent` (`a.b.c` inside `a.b`, `a[0]` inside `a`)?
fn under(child: &str, parent: &str) -> bool {
    !parent.is_empty()
        && child.len() > parent.len()
        && child.starts_with(parent)
        && matches!(child.as_bytes()[parent.len()], b'.' | b'[')
}

/// Load and check configuration `text` (named `file` in errors), resolving `${VAR}` with `env`.
pub fn load_str(
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigErrors> {
    let mut col = Collector::new(text, file);
    let parsed = match DeTable::parse(text) {
        Ok(t) => t,
        Err(e) => {
            col.push(e.span(), None, humanize(e.message()));
            return Err(ConfigErrors {
                errors: col.finish(),
            });
        }
    };
    let span = parsed.span();
    let mut root: Node<'_> = Spanned::new(span, DeValue::Table(parsed.into_inner()));
    let pristine = root.clone();

    let mut spanned_warnings = Vec::new();
    super::shapes::normalize(&mut root, &mut col, &mut spanned_warnings);
    substitute(&mut root, &mut Vec::new(), env, &mut col);

    // Each known section on its own, so one broken section does not hide the others' problems.
    let mut unusable = Vec::new();
    for (name, check) in SECTIONS {
        let path = [key(name)];
        if let Some(node) = tree::get_mut(&mut root, &path)
            && !check(node, &path, &mut col)
        {
            unusable.push(*name);
        }
    }
    // Every missing required section, not just the first serde would name.
    for name in REQUIRED {
        if tree::get(&root, &[key(name)]).is_none() {
            col.push(
                Some(0..0),
                Some((*name).to_owned()),
                format!("missing required section `{name}` (see docs/configuration.md)"),
            );
            unusable.push(name);
        }
    }
    // The whole file: unknown top-level keys, sections not listed above.
    let mut rest = root;
    let mut taken_out = Vec::new();
    for name in &unusable {
        tree::remove(&mut rest, &[key(name)]);
        taken_out.push(vec![key(name)]);
    }
    let config = collect_removing::<Config>(&mut rest, &[], &mut col, taken_out);

    let mut warnings: Vec<String> = spanned_warnings
        .into_iter()
        .map(|(span, w)| {
            let (line, column) = line_col(text, span.start);
            format!("{}:{line}:{column}: {w}", file.display())
        })
        .collect();
    if let Some(config) = &config {
        let problems = config
            .check()
            .into_iter()
            .chain(super::fetcher::check(&config.fetcher));
        for invalid in problems {
            if col.covered(&invalid.path) {
                continue;
            }
            let span = tree::locate(&pristine, &invalid.path);
            col.push(span, Some(invalid.path), invalid.message);
        }
        warnings.extend(config.warnings());
    }
    let errors = col.finish();
    match config {
        Some(config) if errors.is_empty() => Ok(Loaded { config, warnings }),
        _ if errors.is_empty() => Err(ConfigError {
            file: file.to_path_buf(),
            position: None,
            path: None,
            message: "the configuration could not be read (no single problem could be named)"
                .to_owned(),
            line_text: None,
        }
        .into()),
        _ => Err(ConfigErrors { errors }),
    }
}

/// A section check: deserializes the section (recording its problems) and says whether it could
/// be deserialized at all in the end.
type SectionCheck = fn(&mut Node<'_>, &[Step], &mut Collector<'_>) -> bool;

/// Sections every file must have.
const REQUIRED: &[&str] = &["kafka", "topics", "fetcher", "sink"];

const SECTIONS: &[(&str, SectionCheck)] = &[
    ("kafka", section::<KafkaSection>),
    ("topics", topics),
    ("engine", section::<EngineSection>),
    ("fetcher", fetcher),
    ("sink", sink),
    ("ops", section::<OpsSection>),
    ("log", section::<LogSection>),
    ("validate", section::<ValidateSection>),
    ("backfill", section::<BackfillSection>),
    ("reconcile", section::<ReconcileSection>),
];

fn section<T: DeserializeOwned>(
    node: &mut Node<'_>,
    path: &[Step],
    col: &mut Collector<'_>,
) -> bool {
    collect_as::<T>(node, path, col).is_some()
}

fn topics(node: &mut Node<'_>, path: &[Step], col: &mut Collector<'_>) -> bool {
    let n = match node.get_ref() {
        DeValue::Array(a) => a.len(),
        _ => 0,
    };
    for i in 0..n {
        let rel = [Step::Index(i), key("decoder")];
        if let Some(decoder) = tree::get_mut(node, &rel) {
            tagged(decoder, &tree::join(path, &rel), DECODER_KINDS, col);
        }
    }
    section::<Vec<TopicSection>>(node, path, col)
}

fn sink(node: &mut Node<'_>, path: &[Step], col: &mut Collector<'_>) -> bool {
    delivery(node, path, col);
    tagged(node, path, SINK_KINDS, col);
    section::<refetch_sinks::SinkConfig>(node, path, col)
}

/// `delivery` exists on the sinks that can deliver exactly once; on any other sink
/// `"at_least_once"` is accepted (it is what they do) and `"exactly_once"` is refused with the
/// reason, instead of an unknown-key error.
fn delivery(node: &mut Node<'_>, path: &[Step], col: &mut Collector<'_>) {
    let DeValue::Table(t) = node.get_mut() else {
        return;
    };
    let kind = t
        .get("kind")
        .and_then(|k| k.get_ref().as_str())
        .map(str::to_owned);
    let Some(kind) = kind else {
        return;
    };
    if refetch_sinks::SinkConfig::supports_exactly_once(&kind) {
        return;
    }
    let Some((_, value)) = t.remove_entry("delivery") else {
        return;
    };
    if value.get_ref().as_str() == Some("at_least_once") {
        return;
    }
    let message = if value.get_ref().as_str() == Some("exactly_once") {
        format!(
            "the {kind} sink cannot deliver exactly once (it cannot commit its writes together \
             with the input offsets): use kind = \"postgres\" or kind = \"kafka\" for \
             delivery = \"exactly_once\", or remove the key (at-least-once)"
        )
    } else {
        "expected \"at_least_once\" or \"exactly_once\"".to_owned()
    };
    col.push(
        Some(value.span()),
        Some(tree::display(&tree::join(path, &[key("delivery")]))),
        message,
    );
}

fn fetcher(node: &mut Node<'_>, path: &[Step], col: &mut Collector<'_>) -> bool {
    let sources: Vec<String> = match tree::get(node, &[key("sources")]).map(|n| n.get_ref()) {
        Some(DeValue::Table(t)) => t.iter().map(|(k, _)| k.get_ref().to_string()).collect(),
        _ => Vec::new(),
    };
    for s in sources {
        let rel = [key("sources"), key(&s), key("auth")];
        if let Some(auth) = tree::get_mut(node, &rel) {
            tagged(auth, &tree::join(path, &rel), AUTH_KINDS, col);
        }
    }
    section::<refetch_http::HttpFetcherConfig>(node, path, col)
}

const DECODER_KINDS: &[(&str, SectionCheck)] = &[
    ("json", section::<super::JsonDecoderSection>),
    ("record_key", section::<super::RecordKeyDecoderSection>),
];

const SINK_KINDS: &[(&str, SectionCheck)] = &[
    ("postgres", section::<refetch_sinks::PostgresConfig>),
    ("kafka", section::<refetch_sinks::KafkaConfig>),
    ("http", section::<refetch_sinks::HttpConfig>),
    ("sqlite", section::<refetch_sinks::SqliteConfig>),
    ("jsonl", section::<refetch_sinks::JsonlConfig>),
    ("stdout", section::<refetch_sinks::StdoutConfig>),
];

const AUTH_KINDS: &[(&str, SectionCheck)] = &[
    ("bearer", section::<BearerAuth>),
    ("basic", section::<BasicAuth>),
];

/// The keys of `auth = { kind = "bearer", ... }` (checked here for the key's own line; the
/// fetcher's configuration reads the same keys).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct BearerAuth {
    token: String,
}

/// The keys of `auth = { kind = "basic", ... }`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct BasicAuth {
    username: String,
    password: String,
}

/// A table selected by `kind`: check its other keys as the variant `kind` names. The variant's
/// problems are reported at their own keys and taken out of the table.
fn tagged(
    node: &mut Node<'_>,
    path: &[Step],
    kinds: &[(&str, SectionCheck)],
    col: &mut Collector<'_>,
) {
    let DeValue::Table(t) = node.get_mut() else {
        return;
    };
    let Some((kind_key, kind_value)) = t.remove_entry("kind") else {
        return;
    };
    let check = kind_value
        .get_ref()
        .as_str()
        .and_then(|k| kinds.iter().find(|(name, _)| *name == k).map(|(_, c)| *c));
    match check {
        Some(check) => {
            check(node, path, col);
        }
        None => {
            let names: Vec<String> = kinds.iter().map(|(k, _)| format!("`{k}`")).collect();
            let found = match kind_value.get_ref() {
                DeValue::String(s) => format!("`{s}`"),
                other => format!("a value of type {}", other.type_str()),
            };
            col.push(
                Some(kind_value.span()),
                Some(tree::display(&tree::join(path, &[key("kind")]))),
                format!("unknown kind {found}, expected one of {}", names.join(", ")),
            );
        }
    }
    if let DeValue::Table(t) = node.get_mut() {
        t.insert(kind_key, kind_value);
    }
}

/// Deserialize `node` as `T`. Each problem is recorded with the span and key path it points at,
/// the entry is taken out of `node`, and deserialization is tried again; `None` when `T` could
/// not be deserialized in the end (a required key is missing or nothing could be taken out).
pub fn collect_as<T: DeserializeOwned>(
    node: &mut Node<'_>,
    path: &[Step],
    col: &mut Collector<'_>,
) -> Option<T> {
    collect_removing(node, path, col, Vec::new())
}

/// [`collect_as`] of a node from which the keys `removed` were taken out already (they are not
/// reported as missing).
fn collect_removing<T: DeserializeOwned>(
    node: &mut Node<'_>,
    path: &[Step],
    col: &mut Collector<'_>,
    mut removed: Vec<Vec<Step>>,
) -> Option<T> {
    for _ in 0..MAX_PER_SECTION {
        let e = match T::deserialize(ValueDeserializer::from(node.clone())) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        let message = humanize(e.message());
        let span = e.span();
        if let Some(missing) = missing_key(&message) {
            // A key this loop took out (for a bad value) is not missing a second time.
            let ours = removed
                .iter()
                .any(|r| matches!(r.last(), Some(Step::Key(k)) if k == missing));
            if !ours {
                col.push(span, Some(tree::display(path)), message);
            }
            return None;
        }
        let rel = span
            .as_ref()
            .and_then(|s| tree::find_at(node, s.start))
            .filter(|rel| !rel.is_empty());
        let Some(rel) = rel else {
            col.push(span, Some(tree::display(path)), message);
            return None;
        };
        col.push(span, Some(tree::display(&tree::join(path, &rel))), message);
        if !tree::remove(node, &rel) {
            return None;
        }
        removed.push(rel);
    }
    None
}

/// 1-based line and column (in characters) of byte offset `at`.
pub fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Values the HTTP fetcher resolves `${VAR}` in once more when it is built: after substitution
/// their `${` is written `$${`, so a resolved secret that contains `${` stays as it is.
fn resolved_again_by_the_fetcher(path: &[Step]) -> bool {
    match path {
        [
            Step::Key(f),
            Step::Key(s),
            Step::Key(_),
            Step::Key(h),
            Step::Key(_),
        ] if f == "fetcher" && s == "sources" && h == "headers" => true,
        [
            Step::Key(f),
            Step::Key(s),
            Step::Key(_),
            Step::Key(a),
            Step::Key(k),
        ] if f == "fetcher" && s == "sources" && a == "auth" => {
            matches!(k.as_str(), "token" | "username" | "password")
        }
        _ => false,
    }
}

/// Replace `${VAR}` in every string of the tree; each failing reference is recorded (and its
/// value left empty).
fn substitute(
    node: &mut Node<'_>,
    path: &mut Vec<Step>,
    env: &dyn Fn(&str) -> Option<String>,
    col: &mut Collector<'_>,
) {
    let span = node.span();
    match node.get_mut() {
        DeValue::String(s) if s.contains('$') => match resolve_env(s, env) {
            Ok(resolved) => {
                let resolved = if resolved_again_by_the_fetcher(path) {
                    resolved.replace("${", "$${")
                } else {
                    resolved
                };
                *s = resolved.into();
            }
            Err(message) => {
                col.push(Some(span), Some(tree::display(path)), message);
                *s = "".into();
            }
        },
        DeValue::Table(t) => {
            for (k, v) in t.iter_mut() {
                path.push(Step::Key(k.get_ref().to_string()));
                substitute(v, path, env, col);
                path.pop();
            }
        }
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(Step::Index(i));
                substitute(item, path, env, col);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Replace every `${VAR}` in `s`:
/// - `${VAR}`: the variable's value; unset is an error naming it (never a value);
/// - `${VAR:-default}`: `default` when the variable is unset or empty;
/// - `${VAR:?message}`: an error with `message` when the variable is unset or empty;
/// - `$${` writes a literal `${`.
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
            let inner = &tail[..end];
            let (name, op) = match inner.find(":-").or_else(|| inner.find(":?")) {
                Some(i) => (&inner[..i], Some((&inner[i..i + 2], &inner[i + 2..]))),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{inner}}}` is not a valid environment variable reference: expected \
                     `${{NAME}}`, `${{NAME:-default}}` or `${{NAME:?message}}` (NAME: letters, \
                     digits and `_`)"
                ));
            }
            let value = env(name);
            match (value, op) {
                (Some(v), None) => out.push_str(&v),
                (None, None) => return Err(format!("environment variable `{name}` is not set")),
                (Some(v), Some(_)) if !v.is_empty() => out.push_str(&v),
                (_, Some((":-", default))) => out.push_str(default),
                (v, Some((_, message))) => {
                    let state = if v.is_some() { "empty" } else { "not set" };
                    return Err(if message.is_empty() {
                        format!("environment variable `{name}` is {state}")
                    } else {
                        format!("environment variable `{name}` is {state}: {message}")
                    });
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}
