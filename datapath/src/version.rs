//! A `metadata.resourceVersion`, held without a string when it is a number.

use std::fmt;

/// An object's `metadata.resourceVersion`. Clients must treat it as opaque
/// and compare it only for equality, which is all the agent does with it (a
/// relist writes only the objects whose version changed). The API server's
/// are decimal numbers (etcd revisions): such a one is held as that number,
/// with no allocation, any other exactly as it came. Only a number's
/// canonical form is held as a number (`"012"` stays text), so two versions
/// are equal exactly when their strings are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    /// A canonical decimal number.
    Number(u64),
    /// Anything else, as it came.
    Text(Box<str>),
}

impl Version {
    /// `s` as a version.
    pub fn new(s: &str) -> Self {
        let canonical = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        match s.parse::<u64>() {
            Ok(n) if canonical => Self::Number(n),
            _ => Self::Text(s.into()),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_equal_exactly_when_their_strings_are() {
        let strings = [
            "0",
            "00",
            "7",
            "07",
            "123",
            "0123",
            "18446744073709551615",
            "18446744073709551616",
            "",
            "+1",
            "-1",
            "1 ",
            "abc",
            "١٢٣",
        ];
        for a in strings {
            assert_eq!(Version::new(a).to_string(), a, "{a:?} does not round-trip");
            for b in strings {
                assert_eq!(Version::new(a) == Version::new(b), a == b, "{a:?} vs {b:?}");
            }
        }
        // The API server's: no string held.
        assert_eq!(Version::new("4711"), Version::Number(4711));
        assert_eq!(std::mem::size_of::<Option<Version>>(), 24);
    }
}
