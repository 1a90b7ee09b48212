//! Body and version representation shared by the sinks.
//!
//! Every sink stores a body as JSON when it *is* JSON (a JSON or absent content type and a body
//! that parses), so it stays queryable (`jsonb`, embedded JSON in JSON Lines), and as raw bytes
//! otherwise. Versions are stored as a number plus a kind (`int` / `timestamp`), because the kind
//! decides how a held version satisfies notifications (equal timestamps never do).

use refetch::{Entity, Version};

/// The stored name of a version kind.
pub(crate) const KIND_INT: &str = "int";
/// The stored name of a timestamp version kind.
pub(crate) const KIND_TIMESTAMP: &str = "timestamp";

/// Split a version into the number and kind name that sinks store.
pub(crate) fn version_parts(v: Option<Version>) -> (Option<i64>, Option<&'static str>) {
    match v {
        Some(Version::Int(n)) => (Some(n), Some(KIND_INT)),
        Some(Version::Timestamp(n)) => (Some(n), Some(KIND_TIMESTAMP)),
        None => (None, None),
    }
}

/// Rebuild a version from stored parts. An unknown kind with a number is read as an integer
/// version (tables written by hand or by older versions without a kind column value).
pub(crate) fn version_from_parts(value: Option<i64>, kind: Option<&str>) -> Option<Version> {
    let value = value?;
    Some(match kind {
        Some(KIND_TIMESTAMP) => Version::Timestamp(value),
        _ => Version::Int(value),
    })
}

/// Is `content_type` a JSON media type (`application/json`, `application/*+json`, `text/json`)?
/// An absent content type counts as "maybe JSON": the body decides.
pub(crate) fn content_type_may_be_json(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else {
        return true;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// The body as JSON text when it is JSON (see the module docs), else `None`.
pub(crate) fn json_text(entity: &Entity) -> Option<&str> {
    if !content_type_may_be_json(entity.content_type.as_deref()) {
        return None;
    }
    let text = std::str::from_utf8(&entity.body).ok()?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    Some(text)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4).
pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let idx = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (i, x) in idx.iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(B64[*x as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decode standard base64 with padding; `None` when the text is not valid base64.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return None;
    }
    let value = |c: u8| -> Option<u32> { B64.iter().position(|&x| x == c).map(|p| p as u32) };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (ci, chunk) in bytes.chunks(4).enumerate() {
        let last = ci == bytes.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors_and_round_trips() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
        }
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(base64_decode(&base64_encode(&all)), Some(all));
        assert_eq!(base64_decode("Zm9=v"), None);
        assert_eq!(base64_decode("Zg=a"), None);
        assert_eq!(base64_decode("Zg"), None);
    }

    #[test]
    fn json_detection_needs_a_json_type_and_a_parsable_body() {
        let json = Entity::json(r#"{"a":1}"#, None);
        assert_eq!(json_text(&json), Some(r#"{"a":1}"#));
        let mut text = Entity::json("not json", None);
        assert_eq!(json_text(&text), None);
        text.body = bytes::Bytes::from_static(b"{}");
        text.content_type = Some("text/plain".into());
        assert_eq!(json_text(&text), None);
        text.content_type = Some("application/vnd.api+json; charset=utf-8".into());
        assert_eq!(json_text(&text), Some("{}"));
        text.content_type = None;
        assert_eq!(json_text(&text), Some("{}"));
    }

    #[test]
    fn versions_round_trip_through_parts() {
        for v in [Version::Int(-3), Version::Timestamp(1_700_000_000_000_000)] {
            let (n, k) = version_parts(Some(v));
            assert_eq!(version_from_parts(n, k), Some(v));
        }
        assert_eq!(version_from_parts(None, Some(KIND_INT)), None);
        assert_eq!(version_from_parts(Some(4), None), Some(Version::Int(4)));
    }
}
