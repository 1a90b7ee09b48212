//! URL templates: where untrusted ids meet URLs.
//!
//! A template such as `https://crm.example/api/{type}/{id}?tenant={tenant}` is parsed and checked
//! once, when the fetcher is built: the scheme must be `http` or `https`, a host must be present,
//! no credentials may sit in the URL, no fragment is allowed, and placeholders may appear only in
//! the path or the query, never in the scheme or authority. Placeholder names must be known
//! (`id`, `type`, the batch placeholder `ids`, or a declared notification field).
//!
//! Rendering percent-encodes every value as *one* path segment (or one query value): every byte
//! that is not an RFC 3986 unreserved character (`A-Z a-z 0-9 - . _ ~`) is encoded, so `/`, `?`,
//! `#`, `%`, `@`, `:` and whitespace in an id can never change scheme, host or path. Encoding
//! alone does not neutralise dot segments: a segment that is empty, `.` or `..` (also after one
//! or more rounds of percent-decoding, so `.%2E` and `%2e%2e` too) would be normalised into the
//! parent or the collection by the URL parser or a server, so such values are refused with
//! [`RenderError`] before any request is made. Empty values are refused in the query as well.
//! Finally the rendered URL is parsed and compared with the template's scheme, host, port and
//! literal path prefix, as a second line of defence.

use std::borrow::Cow;
use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use url::Url;

/// Every byte except RFC 3986 unreserved characters is encoded.
pub(crate) const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes `value` as one path segment or one query value.
pub fn encode_component(value: &str) -> Cow<'_, str> {
    utf8_percent_encode(value, COMPONENT).into()
}

/// A placeholder value at render time.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    /// A raw (untrusted) value, encoded on insertion.
    Raw(&'a str),
    /// A list of raw values joined by a separator (each encoded, the separator inserted as is).
    List {
        /// The raw values.
        items: &'a [&'a str],
        /// The separator.
        separator: &'a str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder { name: String, in_query: bool },
}

/// A parsed and validated URL template.
#[derive(Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    source: String,
    parts: Vec<Part>,
    origin: (String, Option<String>, Option<u16>),
    path_start: usize,
    path_prefix: String,
}

impl fmt::Debug for UrlTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UrlTemplate({:?})", self.source)
    }
}

impl fmt::Display for UrlTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A template that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid URL template {template:?}: {reason}")]
pub struct TemplateError {
    /// The template as configured.
    pub template: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A value that cannot be placed in the URL. The fetcher turns it into a permanent error: the
/// key's notifications go to the dead-letter topic and no request is made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A placeholder would form an empty, `.` or `..` path segment (or a percent-encoded form).
    #[error("placeholder {{{name}}} would form a dot or empty path segment ({value:?})")]
    DotSegment {
        /// The placeholder.
        name: String,
        /// The offending segment, shortened.
        value: String,
    },
    /// An empty value.
    #[error("placeholder {{{name}}} is empty")]
    Empty {
        /// The placeholder.
        name: String,
    },
    /// The notification carries no value for a placeholder.
    #[error("no value for placeholder {{{name}}}")]
    Missing {
        /// The placeholder.
        name: String,
    },
    /// The rendered URL left the template's scheme, host or path (a bug guard; encoding should
    /// make this impossible).
    #[error("the rendered URL leaves the template's origin or path")]
    Escaped,
}

fn short(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Is `segment` a dot segment or empty, as such or after up to 4 rounds of percent-decoding?
pub(crate) fn is_dot_or_empty(segment: &str) -> bool {
    let mut current: Cow<'_, str> = Cow::Borrowed(segment);
    for _ in 0..5 {
        if matches!(&*current, "" | "." | "..") {
            return true;
        }
        let decoded = percent_decode_str(&current)
            .decode_utf8_lossy()
            .into_owned();
        if decoded == *current {
            return false;
        }
        current = Cow::Owned(decoded);
    }
    false
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl UrlTemplate {
    /// Parse and validate `template`; placeholders must be among `known`.
    pub fn parse(template: &str, known: &[&str]) -> Result<UrlTemplate, TemplateError> {
        let err = |reason: String| TemplateError {
            template: template.to_owned(),
            reason,
        };
        if template.contains('#') {
            return Err(err("a fragment (#) is never sent; remove it".into()));
        }
        let scheme_end = template
            .find("://")
            .ok_or_else(|| err("expected an absolute http:// or https:// URL".into()))?;
        let authority_start = scheme_end + 3;
        let path_start = template[authority_start..]
            .find(['/', '?'])
            .map(|i| i + authority_start)
            .unwrap_or(template.len());
        if path_start == authority_start {
            return Err(err("no host".into()));
        }
        let query_start = template.find('?');

        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        let mut offset = 0;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(err(format!("unmatched '}}' at {}", offset + open)));
            }
            let close = rest[open + 1..]
                .find(['{', '}'])
                .map(|i| i + open + 1)
                .filter(|&i| rest.as_bytes()[i] == b'}')
                .ok_or_else(|| err(format!("unclosed '{{' at {}", offset + open)))?;
            let name = &rest[open + 1..close];
            if !valid_name(name) {
                return Err(err(format!("invalid placeholder name {name:?}")));
            }
            if !known.contains(&name) {
                return Err(err(format!(
                    "unknown placeholder {{{name}}} (known: {})",
                    known.join(", ")
                )));
            }
            let at = offset + open;
            if at < path_start {
                return Err(err(format!(
                    "placeholder {{{name}}} sits in the scheme or host; only the path and query may hold placeholders"
                )));
            }
            literal.push_str(&rest[..open]);
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Placeholder {
                name: name.to_owned(),
                in_query: query_start.is_some_and(|q| at > q),
            });
            offset += close + 1;
            rest = &rest[close + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }

        // Validate the structure with every placeholder replaced by a harmless value.
        let probe: String = parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.as_str(),
                Part::Placeholder { .. } => "x",
            })
            .collect();
        let url = Url::parse(&probe).map_err(|e| err(format!("not a valid URL: {e}")))?;
        // A second probe with other values must land on the same origin: no placeholder may
        // influence scheme, host or port.
        let other: String = parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.as_str(),
                Part::Placeholder { .. } => "y",
            })
            .collect();
        let other = Url::parse(&other).map_err(|e| err(format!("not a valid URL: {e}")))?;
        if !(url.scheme() == other.scheme()
            && url.host_str() == other.host_str()
            && url.port_or_known_default() == other.port_or_known_default())
        {
            return Err(err("a placeholder sits in the scheme or host".into()));
        }
        if !matches!(url.scheme(), "http" | "https") {
            return Err(err(format!(
                "scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
            return Err(err("no host".into()));
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(err(
                "credentials in the URL; use `auth` or `headers` with ${ENV} instead".into(),
            ));
        }
        let path_prefix = template[path_start..]
            .split(['{', '?'])
            .next()
            .unwrap_or("")
            .to_owned();
        if !url.path().starts_with(&path_prefix) {
            return Err(err(format!(
                "the path {path_prefix:?} is not in normal form (write it percent-encoded, without dot segments)"
            )));
        }
        Ok(UrlTemplate {
            source: template.to_owned(),
            origin: (
                url.scheme().to_owned(),
                Some(host.to_owned()),
                url.port_or_known_default(),
            ),
            parts,
            path_start,
            path_prefix,
        })
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The placeholder names the template uses.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder { name, .. } => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Does the template use placeholder `name`?
    pub fn uses(&self, name: &str) -> bool {
        self.placeholders().any(|n| n == name)
    }

    /// Does placeholder `name` sit in the query?
    pub fn in_query(&self, name: &str) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Placeholder { name: n, in_query: true } if n == name))
    }

    /// Render the URL, looking placeholder values up with `value`.
    pub(crate) fn render<'a>(
        &self,
        value: impl Fn(&str) -> Option<Value<'a>>,
    ) -> Result<Url, RenderError> {
        let mut out = String::with_capacity(self.source.len() + 32);
        // The current path segment, in raw (unencoded) form, and whether a placeholder is in it.
        let mut segment = String::new();
        let mut segment_has_value: Option<&str> = None;
        let mut in_query = false;
        let check_segment = |segment: &str, name: Option<&str>| -> Result<(), RenderError> {
            match name {
                Some(name) if is_dot_or_empty(segment) => Err(RenderError::DotSegment {
                    name: name.to_owned(),
                    value: short(segment),
                }),
                _ => Ok(()),
            }
        };
        for part in &self.parts {
            match part {
                Part::Literal(l) => {
                    for c in l.chars() {
                        // Scheme and authority (before `path_start`) hold no placeholders.
                        if out.len() >= self.path_start && !in_query {
                            match c {
                                '/' => {
                                    check_segment(&segment, segment_has_value)?;
                                    segment.clear();
                                    segment_has_value = None;
                                }
                                '?' => {
                                    check_segment(&segment, segment_has_value)?;
                                    in_query = true;
                                }
                                _ => segment.push(c),
                            }
                        }
                        out.push(c);
                    }
                }
                Part::Placeholder { name, in_query: q } => {
                    let v =
                        value(name).ok_or_else(|| RenderError::Missing { name: name.clone() })?;
                    match v {
                        Value::Raw(raw) => {
                            if raw.is_empty() {
                                return Err(RenderError::Empty { name: name.clone() });
                            }
                            if !q {
                                segment.push_str(raw);
                                segment_has_value = Some(name);
                            }
                            out.push_str(&encode_component(raw));
                        }
                        Value::List { items, separator } => {
                            if items.is_empty() || items.iter().any(|i| i.is_empty()) {
                                return Err(RenderError::Empty { name: name.clone() });
                            }
                            for (i, item) in items.iter().enumerate() {
                                if i > 0 {
                                    out.push_str(separator);
                                    if !q {
                                        segment.push_str(separator);
                                    }
                                }
                                if !q {
                                    segment.push_str(item);
                                }
                                out.push_str(&encode_component(item));
                            }
                            if !q {
                                segment_has_value = Some(name);
                            }
                        }
                    }
                }
            }
        }
        if !in_query {
            check_segment(&segment, segment_has_value)?;
        }
        let url = Url::parse(&out).map_err(|_| RenderError::Escaped)?;
        let same_origin = url.scheme() == self.origin.0
            && url.host_str().map(str::to_owned) == self.origin.1
            && url.port_or_known_default() == self.origin.2;
        if !same_origin || !url.path().starts_with(&self.path_prefix) || url.fragment().is_some() {
            return Err(RenderError::Escaped);
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Result<UrlTemplate, TemplateError> {
        UrlTemplate::parse(s, &["id", "type", "tenant", "ids"])
    }

    fn render_id(tpl: &UrlTemplate, id: &str) -> Result<Url, RenderError> {
        tpl.render(|n| match n {
            "id" => Some(Value::Raw(id)),
            "type" => Some(Value::Raw("customer")),
            _ => None,
        })
    }

    #[test]
    fn rejects_bad_templates() {
        for (tpl, why) in [
            ("ftp://h/{id}", "scheme"),
            ("http:///{id}", "host"),
            ("http://{id}.example/x", "scheme or host"),
            ("http://h:{id}/x", "scheme or host"),
            ("http://u:p@h/{id}", "credentials"),
            ("http://h/{id}#x", "fragment"),
            ("http://h/{nope}", "unknown placeholder"),
            ("http://h/{id", "unclosed"),
            ("http://h/id}", "unmatched"),
            ("http://h/{i d}", "invalid placeholder"),
            ("/relative/{id}", "absolute"),
        ] {
            let e = t(tpl).expect_err(tpl);
            assert!(e.reason.contains(why), "{tpl}: {e}");
        }
    }

    #[test]
    fn knows_where_placeholders_sit() {
        let tpl = t("https://h/api/{type}/{id}?tenant={tenant}").expect("valid");
        assert!(!tpl.in_query("id"));
        assert!(tpl.in_query("tenant"));
        assert_eq!(tpl.path_prefix, "/api/");
        assert_eq!(
            tpl.placeholders().collect::<Vec<_>>(),
            ["type", "id", "tenant"]
        );
    }

    #[test]
    fn encodes_ids_as_one_segment() {
        let tpl = t("http://h:8080/c/{id}").expect("valid");
        for (id, path) in [
            ("a/b", "/c/a%2Fb"),
            ("../admin", "/c/..%2Fadmin"),
            ("?x=1", "/c/%3Fx%3D1"),
            ("#frag", "/c/%23frag"),
            ("%2F", "/c/%252F"),
            ("@host", "/c/%40host"),
            ("a b", "/c/a%20b"),
            ("é", "/c/%C3%A9"),
            ("http://evil.example", "/c/http%3A%2F%2Fevil.example"),
        ] {
            let url = render_id(&tpl, id).expect(id);
            assert_eq!(url.path(), path, "{id}");
            assert_eq!(url.host_str(), Some("h"));
            assert_eq!(url.query(), None);
        }
    }

    #[test]
    fn refuses_dot_and_empty_segments() {
        let tpl = t("http://h/c/{id}").expect("valid");
        for id in ["", ".", "..", ".%2E", "%2e%2e", "%2E", "%252e%252E", "%2e."] {
            assert!(render_id(&tpl, id).is_err(), "{id:?} must be refused");
        }
        // Dots inside a longer segment are harmless.
        assert_eq!(render_id(&tpl, "...").expect("ok").path(), "/c/...");
        let tpl = t("http://h/c/{id}.json").expect("valid");
        assert_eq!(render_id(&tpl, ".").expect("ok").path(), "/c/..json");
    }

    #[test]
    fn query_values_are_encoded_and_empty_is_refused() {
        let tpl = t("http://h/c?id={id}&x=1").expect("valid");
        let url = render_id(&tpl, "1&x=2#y").expect("ok");
        assert_eq!(url.query(), Some("id=1%26x%3D2%23y&x=1"));
        assert_eq!(
            render_id(&tpl, "..").expect("ok").query(),
            Some("id=..&x=1")
        );
        assert!(render_id(&tpl, "").is_err());
    }

    #[test]
    fn lists_join_encoded_items() {
        let tpl = t("http://h/c?ids={ids}").expect("valid");
        let items = ["1", "a b", "x/y"];
        let url = tpl
            .render(|n| {
                (n == "ids").then_some(Value::List {
                    items: &items,
                    separator: ",",
                })
            })
            .expect("ok");
        assert_eq!(url.query(), Some("ids=1,a%20b,x%2Fy"));
    }
}
