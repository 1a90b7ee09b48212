//! The parsed TOML document as a tree with spans: finding the key an error points at, removing
//! it, and finding the line of a key path.
//!
//! Every value of `toml`'s [`DeValue`] tree keeps the byte range it came from, so a key path
//! (`fetcher.sources.customer.headers.X-Api-Key`) or an error's byte offset can be turned into
//! a line and column of the file as written.

use std::borrow::Cow;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

/// A value of the tree with its span.
pub type Node<'i> = Spanned<DeValue<'i>>;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// `a.b[0].c` for a list of steps (empty for the document itself).
pub fn display(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

/// `path` extended by `more`.
pub fn join(path: &[Step], more: &[Step]) -> Vec<Step> {
    let mut out = path.to_vec();
    out.extend_from_slice(more);
    out
}

/// A key step.
pub fn key(k: &str) -> Step {
    Step::Key(k.to_owned())
}

fn contains(span: &Range<usize>, at: usize) -> bool {
    span.start <= at && at < span.end
}

/// The path (relative to `node`) of the deepest key or array item whose key or value span
/// contains byte offset `at`.
pub fn find_at(node: &Node<'_>, at: usize) -> Option<Vec<Step>> {
    let mut best: Option<Vec<Step>> = None;
    let mut path = Vec::new();
    walk_find(node.get_ref(), at, &mut path, &mut best);
    best
}

fn walk_find(value: &DeValue<'_>, at: usize, path: &mut Vec<Step>, best: &mut Option<Vec<Step>>) {
    let consider = |path: &Vec<Step>, best: &mut Option<Vec<Step>>| {
        if best.as_ref().is_none_or(|b| b.len() < path.len()) {
            *best = Some(path.clone());
        }
    };
    match value {
        DeValue::Table(t) => {
            for (k, v) in t.iter() {
                path.push(Step::Key(k.get_ref().to_string()));
                if contains(&k.span(), at) || contains(&v.span(), at) {
                    consider(path, best);
                }
                walk_find(v.get_ref(), at, path, best);
                path.pop();
            }
        }
        DeValue::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(Step::Index(i));
                if contains(&v.span(), at) {
                    consider(path, best);
                }
                walk_find(v.get_ref(), at, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The value at `path` (relative to `node`).
pub fn get<'a, 'i>(node: &'a Node<'i>, path: &[Step]) -> Option<&'a Node<'i>> {
    let mut current = node;
    for step in path {
        current = match (step, current.get_ref()) {
            (Step::Key(k), DeValue::Table(t)) => t.get(k.as_str())?,
            (Step::Index(i), DeValue::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(current)
}

/// The value at `path` (relative to `node`), mutably.
pub fn get_mut<'a, 'i>(node: &'a mut Node<'i>, path: &[Step]) -> Option<&'a mut Node<'i>> {
    let mut current = node;
    for step in path {
        current = match (step, current.get_mut()) {
            (Step::Key(k), DeValue::Table(t)) => t.get_mut(k.as_str())?,
            (Step::Index(i), DeValue::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(current)
}

/// The table at `path`, mutably.
pub fn table_mut<'a, 'i>(node: &'a mut Node<'i>, path: &[Step]) -> Option<&'a mut DeTable<'i>> {
    match get_mut(node, path)?.get_mut() {
        DeValue::Table(t) => Some(t),
        _ => None,
    }
}

/// Remove the key or array item at `path`; `false` when there is none.
pub fn remove(node: &mut Node<'_>, path: &[Step]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    let Some(parent) = get_mut(node, parent) else {
        return false;
    };
    match (last, parent.get_mut()) {
        (Step::Key(k), DeValue::Table(t)) => t.remove(k.as_str()).is_some(),
        (Step::Index(i), DeValue::Array(a)) if *i < a.len() => {
            let mut kept = DeArray::new();
            for (j, item) in a.iter().enumerate() {
                if j != *i {
                    kept.push(item.clone());
                }
            }
            *a = kept;
            true
        }
        _ => false,
    }
}

/// A new string value with `span`.
pub fn string<'i>(span: Range<usize>, s: impl Into<Cow<'i, str>>) -> Node<'i> {
    Spanned::new(span, DeValue::String(s.into()))
}

/// A table key with `span`.
pub fn table_key<'i>(span: Range<usize>, k: &str) -> Spanned<Cow<'i, str>> {
    Spanned::new(span, Cow::Owned(k.to_owned()))
}

/// Parse a dotted key path as written by [`display`] (`topics[0].decoder.id`).
pub fn parse(path: &str) -> Vec<Step> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let mut pieces = part.split('[');
        if let Some(name) = pieces.next().filter(|n| !n.is_empty()) {
            out.push(Step::Key(name.to_owned()));
        }
        for idx in pieces {
            if let Ok(n) = idx.trim_end_matches(']').parse::<usize>() {
                out.push(Step::Index(n));
            }
        }
    }
    out
}

/// The span of the key (or array item) at dotted `path`, or of its nearest existing parent.
///
/// Keys may themselves contain dots (`kafka.properties."enable.auto.commit"`, written in a path
/// as `kafka.properties.enable.auto.commit`): at each table the longest run of the remaining
/// parts that names a key wins.
pub fn locate(root: &Node<'_>, path: &str) -> Option<Range<usize>> {
    let steps = parse(path);
    let mut best = None;
    let mut current = root;
    let mut i = 0;
    while i < steps.len() {
        let next = match (&steps[i], current.get_ref()) {
            (Step::Key(_), DeValue::Table(t)) => {
                // Longest run of key steps first.
                let mut found = None;
                let run = steps[i..]
                    .iter()
                    .take_while(|s| matches!(s, Step::Key(_)))
                    .count();
                for len in (1..=run).rev() {
                    let joined: Vec<&str> = steps[i..i + len]
                        .iter()
                        .filter_map(|s| match s {
                            Step::Key(k) => Some(k.as_str()),
                            Step::Index(_) => None,
                        })
                        .collect();
                    let name = joined.join(".");
                    if let Some((k, v)) = t.get_key_value(name.as_str()) {
                        let span = if k.span().is_empty() {
                            v.span()
                        } else {
                            k.span()
                        };
                        found = Some((span, v, len));
                        break;
                    }
                }
                found
            }
            (Step::Index(n), DeValue::Array(a)) => a.get(*n).map(|v| (v.span(), v, 1)),
            _ => None,
        };
        match next {
            Some((span, v, len)) => {
                best = Some(span);
                current = v;
                i += len;
            }
            None => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Node<'_> {
        let t = DeTable::parse(text).expect("parses");
        let span = t.span();
        Spanned::new(span, DeValue::Table(t.into_inner()))
    }

    #[test]
    fn paths_display_and_parse_back() {
        let p = vec![key("topics"), Step::Index(2), key("decoder"), key("id")];
        assert_eq!(display(&p), "topics[2].decoder.id");
        assert_eq!(parse("topics[2].decoder.id"), p);
    }

    #[test]
    fn an_offset_finds_its_deepest_key_and_keys_with_dots_are_located() {
        let text = "[a]\nb = { c = 1, d = \"x\" }\n\n[[t]]\nn = 1\n[[t]]\nn = 2\nm = 3\n\n[p]\n\"x.y\" = \"z\"\n";
        let root = doc(text);
        let at = text.find("d =").expect("d");
        assert_eq!(find_at(&root, at), Some(vec![key("a"), key("b"), key("d")]));
        let at = text.find("m =").expect("m");
        assert_eq!(
            find_at(&root, at),
            Some(vec![key("t"), Step::Index(1), key("m")])
        );
        let span = locate(&root, "p.x.y").expect("found");
        assert_eq!(&text[span], "\"x.y\"");
        let span = locate(&root, "a.b.nope").expect("parent");
        assert_eq!(&text[span], "b");
        let mut root = root;
        assert!(remove(&mut root, &[key("t"), Step::Index(0)]));
        assert!(get(&root, &[key("t"), Step::Index(0), key("m")]).is_some());
        assert!(get(&root, &[key("t"), Step::Index(1)]).is_none());
    }
}
