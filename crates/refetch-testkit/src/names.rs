//! Unique names for the things a test creates on a shared server: topics, consumer groups,
//! transactional ids, PostgreSQL schemas and tables.
//!
//! Every test against the real broker or database runs next to other tests (and other runs) on the same
//! server, so it never reuses a fixed name: it asks [`unique`] for one. Names are lowercase
//! `[a-z0-9_]`, start with a letter or `_`, and are at most [`MAX_LEN`] bytes, so one name is valid as a
//! Kafka topic, a group id and an unquoted SQL identifier at once.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

/// The longest name [`unique`] returns: PostgreSQL's identifier limit (63 bytes). Kafka allows 249.
pub const MAX_LEN: usize = 63;

/// How much of the caller's prefix is kept, leaving room for the time and random parts.
const MAX_PREFIX_LEN: usize = 40;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A fresh name: `prefix` (lowercased, other characters replaced by `_`, cut to 40 bytes), then the
/// current time in milliseconds (base 36), then 8 random characters. Two calls never return the same
/// name in practice (36^8 random suffixes per millisecond).
///
/// ```
/// let topic = refetch_testkit::names::unique("Orders-Changed");
/// assert!(topic.starts_with("orders_changed_"));
/// assert!(topic.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
/// ```
pub fn unique(prefix: &str) -> String {
    let mut name: String = prefix
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .take(MAX_PREFIX_LEN)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        // Empty, or starts with a digit: not a valid SQL identifier on its own.
        name.insert(0, 't');
    }
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    name.push('_');
    name.push_str(&base36(millis));
    name.push('_');
    let mut rng = rand::rng();
    for _ in 0..8 {
        name.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    name
}

fn base36(mut n: u128) -> String {
    if n == 0 {
        return "0".to_owned();
    }
    let mut digits = Vec::new();
    while n > 0 {
        let d = (n % 36) as usize;
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[d]);
        n /= 36;
    }
    digits.reverse();
    String::from_utf8_lossy(&digits).into_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn valid(name: &str) -> bool {
        name.len() <= MAX_LEN
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    #[test]
    fn names_are_valid_topics_groups_and_identifiers() {
        for prefix in [
            "orders",
            "Orders.Changed-v2",
            "",
            "42things",
            "émoji 🚀 prefix",
            &"x".repeat(300),
        ] {
            let name = unique(prefix);
            assert!(valid(&name), "{prefix:?} gave invalid name {name:?}");
        }
    }

    #[test]
    fn prefix_is_kept_in_lowercase_with_separators_replaced() {
        assert!(unique("Orders.Changed-v2").starts_with("orders_changed_v2_"));
        assert!(unique("42").starts_with("t42_"));
        assert!(unique("").starts_with("t_"));
    }

    #[test]
    fn names_do_not_repeat() {
        let names: HashSet<String> = (0..10_000).map(|_| unique("t")).collect();
        assert_eq!(names.len(), 10_000);
    }

    #[test]
    fn base36_matches_known_values() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(36 * 36 * 36 - 1), "zzz");
    }
}
