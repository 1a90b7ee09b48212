//! One shape for a version wherever it appears.
//!
//! A version is configured as `version = { pointer = "/version", kind = "integer" }` in a
//! decoder, a route, a source and a listing (`kind` defaults to `"integer"`; a source may name a
//! `header` instead of a `pointer`). Before that shape existed, decoders and listings took a plain
//! pointer with a separate `version_kind`: that old shape still loads, with a warning that shows
//! the new one. This module rewrites the parsed document into what the typed sections read,
//! before they are deserialized, so spans keep pointing at the file as written.

use std::ops::Range;

use toml::de::DeValue;

use super::load::Collector;
use super::tree::{self, Node, Step, key};

/// A warning with the span it is about.
pub type SpannedWarning = (Range<usize>, String);

/// Rewrite every version of the document into the shape its section reads.
pub fn normalize(root: &mut Node<'_>, col: &mut Collector<'_>, warnings: &mut Vec<SpannedWarning>) {
    let topics = match tree::get(root, &[key("topics")]).map(|n| n.get_ref()) {
        Some(DeValue::Array(a)) => a.len(),
        _ => 0,
    };
    for i in 0..topics {
        let decoder = vec![key("topics"), Step::Index(i), key("decoder")];
        decoder_version(root, &decoder, col, warnings);
        let routes_path = tree::join(&decoder, &[key("routes")]);
        let routes = match tree::get(root, &routes_path).map(|n| n.get_ref()) {
            Some(DeValue::Array(a)) => a.len(),
            _ => 0,
        };
        for j in 0..routes {
            let route = tree::join(&routes_path, &[Step::Index(j)]);
            plain_pointer_to_table(root, &route, None, warnings);
        }
    }
    let sources: Vec<String> =
        match tree::get(root, &[key("fetcher"), key("sources")]).map(|n| n.get_ref()) {
            Some(DeValue::Table(t)) => t.iter().map(|(k, _)| k.get_ref().to_string()).collect(),
            _ => Vec::new(),
        };
    for s in sources {
        let source = vec![key("fetcher"), key("sources"), key(&s)];
        default_kind(root, &tree::join(&source, &[key("version")]));
        listing_version(root, &tree::join(&source, &[key("listing")]), col, warnings);
    }
}

/// `kind` defaults to `"integer"` in a source's version table too.
fn default_kind(root: &mut Node<'_>, version: &[Step]) {
    let Some(node) = tree::get_mut(root, version) else {
        return;
    };
    // An empty span: errors are never located at a key the file does not have.
    let span = node.span().start..node.span().start;
    if let DeValue::Table(t) = node.get_mut()
        && !t.contains_key("kind")
    {
        t.insert(
            tree::table_key(span.clone(), "kind"),
            tree::string(span, "integer"),
        );
    }
}

fn old_shape_warning(path: &[Step], pointer: &str, kind: Option<&str>) -> String {
    let kind = kind
        .map(|k| format!(", kind = \"{k}\""))
        .unwrap_or_default();
    format!(
        "`{}`: a plain pointer is the old shape of a version; write version = {{ pointer = \
         \"{pointer}\"{kind} }}",
        tree::display(path)
    )
}

/// A decoder's `version = "/v"` (+ `version_kind`) becomes `version = { pointer, kind }`.
fn decoder_version<'i>(
    root: &mut Node<'i>,
    decoder: &[Step],
    col: &mut Collector<'_>,
    warnings: &mut Vec<SpannedWarning>,
) {
    let Some(table) = tree::table_mut(root, decoder) else {
        return;
    };
    let kind = table.remove("version_kind");
    let has_version = table.contains_key("version");
    let version_is_table = matches!(
        table.get("version").map(|v| v.get_ref()),
        Some(DeValue::Table(_))
    );
    match (kind, has_version) {
        (Some(kind), false) => {
            col.push(
                Some(kind.span()),
                Some(tree::display(&tree::join(decoder, &[key("version_kind")]))),
                "`version_kind` without a version: write version = { pointer = \"/version\", \
                 kind = \"integer\" }"
                    .to_owned(),
            );
        }
        (Some(kind), true) if version_is_table => {
            col.push(
                Some(kind.span()),
                Some(tree::display(&tree::join(decoder, &[key("version_kind")]))),
                "set the kind inside the version table: version = { pointer = \"...\", kind = \
                 \"...\" }"
                    .to_owned(),
            );
        }
        (kind, _) => {
            plain_pointer_to_table(root, decoder, kind, warnings);
        }
    }
}

/// `version = "/p"` under `parent` becomes `version = { pointer = "/p", kind = ... }` with a
/// warning; `kind` is the old `version_kind` value, if any.
fn plain_pointer_to_table<'i>(
    root: &mut Node<'i>,
    parent: &[Step],
    kind: Option<Node<'i>>,
    warnings: &mut Vec<SpannedWarning>,
) {
    let Some(table) = tree::table_mut(root, parent) else {
        return;
    };
    let Some(version) = table.get_mut("version") else {
        return;
    };
    let DeValue::String(pointer) = version.get_ref() else {
        return;
    };
    let pointer = pointer.to_string();
    let span = version.span();
    let kind_text = kind
        .as_ref()
        .and_then(|k| k.get_ref().as_str().map(str::to_owned));
    warnings.push((
        span.clone(),
        old_shape_warning(
            &tree::join(parent, &[key("version")]),
            &pointer,
            kind_text.as_deref(),
        ),
    ));
    let mut new = toml::de::DeTable::new();
    new.insert(
        tree::table_key(span.clone(), "pointer"),
        tree::string(span.clone(), pointer),
    );
    if let Some(k) = kind {
        let kspan = k.span();
        // The old key's value keeps its span, so a bad kind is reported where it was written.
        new.insert(tree::table_key(kspan, "kind"), k);
    }
    *version = toml::Spanned::new(span, DeValue::Table(new));
}

/// A listing's `version = { pointer, kind }` becomes the listing's `version` + `version_kind`;
/// the old plain pointer loads with a warning.
fn listing_version(
    root: &mut Node<'_>,
    listing: &[Step],
    col: &mut Collector<'_>,
    warnings: &mut Vec<SpannedWarning>,
) {
    let path = tree::join(listing, &[key("version")]);
    let Some(table) = tree::table_mut(root, listing) else {
        return;
    };
    let Some(version) = table.get("version").cloned() else {
        return;
    };
    match version.get_ref() {
        DeValue::String(p) => {
            let kind = table
                .get("version_kind")
                .and_then(|k| k.get_ref().as_str().map(str::to_owned));
            warnings.push((version.span(), old_shape_warning(&path, p, kind.as_deref())));
        }
        DeValue::Table(_) => {
            if let Some(k) = table.get("version_kind") {
                col.push(
                    Some(k.span()),
                    Some(tree::display(&tree::join(listing, &[key("version_kind")]))),
                    "set the kind inside the version table: version = { pointer = \"...\", \
                     kind = \"...\" }"
                        .to_owned(),
                );
                table.remove("version_kind");
            }
            let mut probe = version.clone();
            let spec: Option<super::VersionSpec> = super::load::collect_as(&mut probe, &path, col);
            table.remove("version");
            if let Some(spec) = spec {
                let DeValue::Table(t) = version.get_ref() else {
                    return;
                };
                let pointer_span = t.get("pointer").map_or(version.span(), |p| p.span());
                table.insert(
                    tree::table_key(version.span(), "version"),
                    tree::string(pointer_span, spec.pointer),
                );
                if let Some(kind) = t.get("kind") {
                    table.insert(tree::table_key(kind.span(), "version_kind"), kind.clone());
                }
            }
        }
        // Anything else: the listing's own deserialization names the problem.
        _ => {}
    }
}
