//! OpenSSH `known_hosts` verification for git over SSH. The server's host key
//! must be listed for its host (`host`, or `[host]:port` off port 22, plain or
//! hashed `|1|salt|hash`); a different key of the same type is a changed key,
//! a key under `@revoked` is refused, and a host that is not listed is
//! unknown. Nothing is ever added to the file.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// A server's host key: its type (`ssh-ed25519`, …) and wire-format blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    pub kind: String,
    pub blob: Vec<u8>,
}

impl HostKey {
    /// From the wire-format blob, whose first field names the key type.
    pub fn from_blob(blob: &[u8]) -> HostKey {
        let kind = blob
            .get(..4)
            .and_then(|n| <[u8; 4]>::try_from(n).ok())
            .map(|n| u32::from_be_bytes(n) as usize)
            .and_then(|n| blob.get(4..4 + n))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_else(|| "unknown".into());
        HostKey {
            kind,
            blob: blob.to_vec(),
        }
    }

    /// As `ssh-keygen -l` shows it: `SHA256:<base64 without padding>`.
    pub fn fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(Sha256::digest(&self.blob))
        )
    }
}

impl std::fmt::Display for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.fingerprint())
    }
}

/// What known_hosts says about a host and the key it offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Listed with this key.
    Match,
    /// Not listed with a key of this type. `other_types` names the key types
    /// it is listed with, if any.
    Unknown { other_types: Vec<String> },
    /// Listed with another key of the same type (line number, 1-based).
    Changed { line: usize, known: HostKey },
    /// The key is marked `@revoked` (line number).
    Revoked { line: usize },
}

/// How known_hosts names a host: `host` on port 22, else `[host]:port`.
pub fn host_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Checks `key` offered by `host:port` against known_hosts `text`.
pub fn verify(text: &str, host: &str, port: u16, key: &HostKey) -> Verdict {
    let name = host_name(host, port);
    let mut found = false;
    let mut changed = None;
    let mut other_types = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (marker, hosts) = match fields.next() {
            Some(m) if m.starts_with('@') => (Some(m), fields.next()),
            first => (None, first),
        };
        let (Some(hosts), Some(kind), Some(b64)) = (hosts, fields.next(), fields.next()) else {
            continue;
        };
        if !hosts_match(hosts, &name) {
            continue;
        }
        let Ok(blob) = STANDARD.decode(b64) else {
            continue;
        };
        match marker {
            Some("@revoked") if blob == key.blob => return Verdict::Revoked { line: i + 1 },
            Some(_) => continue,
            None => {}
        }
        if kind == key.kind && blob == key.blob {
            found = true;
        } else if kind == key.kind {
            changed.get_or_insert((
                i + 1,
                HostKey {
                    kind: kind.to_string(),
                    blob,
                },
            ));
        } else if !other_types.iter().any(|t| t == kind) {
            other_types.push(kind.to_string());
        }
    }
    match (found, changed) {
        (true, _) => Verdict::Match,
        (false, Some((line, known))) => Verdict::Changed { line, known },
        (false, None) => Verdict::Unknown { other_types },
    }
}

/// A comma-separated host pattern list: hashed entries, `*`/`?` wildcards,
/// and `!negation` (a negated match rules the line out).
fn hosts_match(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_match(hashed, name);
    }
    let mut matched = false;
    for p in patterns.split(',') {
        match p.strip_prefix('!') {
            Some(neg) if glob(neg, name) => return false,
            Some(_) => {}
            None => matched |= glob(p, name),
        }
    }
    matched
}

/// `|1|salt|hash`: base64 HMAC-SHA1 of the name keyed with the salt.
fn hashed_match(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (STANDARD.decode(salt), STANDARD.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(kind: &str, body: &[u8]) -> HostKey {
        let mut blob = (kind.len() as u32).to_be_bytes().to_vec();
        blob.extend_from_slice(kind.as_bytes());
        blob.extend_from_slice(body);
        HostKey::from_blob(&blob)
    }

    fn line(hosts: &str, k: &HostKey) -> String {
        format!("{hosts} {} {}\n", k.kind, STANDARD.encode(&k.blob))
    }

    #[test]
    fn plain_and_bracketed_names() {
        let k = key("ssh-ed25519", b"one");
        let text = line("example.org,[127.0.0.1]:2222", &k);
        assert_eq!(verify(&text, "127.0.0.1", 2222, &k), Verdict::Match);
        assert_eq!(verify(&text, "example.org", 22, &k), Verdict::Match);
        // Port 2222 is not port 22: `127.0.0.1` alone would not list it.
        assert!(matches!(
            verify(&text, "127.0.0.1", 22, &k),
            Verdict::Unknown { .. }
        ));
        assert_eq!(k.kind, "ssh-ed25519");
        assert!(k.fingerprint().starts_with("SHA256:"));
    }

    #[test]
    fn changed_key_of_the_same_type_is_named_with_its_line() {
        let k = key("ssh-ed25519", b"one");
        let other = key("ssh-ed25519", b"two");
        let text = format!("# comment\n{}", line("[h]:2222", &other));
        assert_eq!(
            verify(&text, "h", 2222, &k),
            Verdict::Changed {
                line: 2,
                known: other
            }
        );
    }

    #[test]
    fn other_key_types_only_is_unknown_and_says_so() {
        let k = key("ssh-ed25519", b"one");
        let rsa = key("ssh-rsa", b"r");
        assert_eq!(
            verify(&line("h", &rsa), "h", 22, &k),
            Verdict::Unknown {
                other_types: vec!["ssh-rsa".into()]
            }
        );
    }

    #[test]
    fn hashed_names_wildcards_negation_and_revoked() {
        let k = key("ssh-ed25519", b"one");
        // `ssh-keygen -H` style, salt "salt".
        let salt = b"0123456789abcdefghij";
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
        mac.update(b"[git.example]:2222");
        let hashed = format!(
            "|1|{}|{}",
            STANDARD.encode(salt),
            STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(
            verify(&line(&hashed, &k), "git.example", 2222, &k),
            Verdict::Match
        );
        assert!(matches!(
            verify(&line(&hashed, &k), "other.example", 2222, &k),
            Verdict::Unknown { .. }
        ));
        assert_eq!(
            verify(&line("*.example", &k), "git.example", 22, &k),
            Verdict::Match
        );
        assert!(matches!(
            verify(&line("*.example,!git.example", &k), "git.example", 22, &k),
            Verdict::Unknown { .. }
        ));
        let revoked = format!("@revoked {}{}", line("*", &k), line("h", &k));
        assert_eq!(verify(&revoked, "h", 22, &k), Verdict::Revoked { line: 1 });
    }
}
