//! The grammars of the strings that reach a template: Kubernetes names
//! (DNS-1123 labels and subdomains), hosts (an IP address or a DNS-1123
//! subdomain) and OCI image references (distribution/reference's grammar).
//!
//! A value that passes one of these cannot carry a line break, a quote or a
//! YAML indicator that changes a rendered document's structure; the spec
//! checker, endpoint detection and the command-line flags all use them.
//! Messages escape the value they quote ([`shown`]), so a crafted value cannot
//! rewrite the terminal that shows the error.

use std::net::IpAddr;

use netboot_contract::errors::escape;

/// Why a string is not in its grammar. The message follows the field path in
/// `file:line:col: field: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("must not be empty")]
    Empty,
    #[error("`{value}` is not a valid {what}: {rule}")]
    Name {
        value: String,
        what: &'static str,
        rule: &'static str,
    },
    #[error("`{value}` is neither an IP address nor a valid DNS name (lowercase letters, digits, '-' and '.', at most 253 characters)")]
    Host { value: String },
    #[error("`{value}` is a URL; give only the host name or IP (the port goes in `port`)")]
    Url { value: String },
    #[error("`{value}` contains ':'; give the port in `port`")]
    Port { value: String },
    #[error("`{value}` is not a valid image {what}: {rule}")]
    Image {
        value: String,
        what: &'static str,
        rule: String,
    },
    #[error(
        "`{value}` must be an image repository without tag or digest (the tag goes in `version`)"
    )]
    Tagged { value: String },
    #[error("`{value}` contains a control or line-break character ({code})")]
    Control { value: String, code: String },
    #[error("`{value}` is not a valid git ref: {rule}")]
    GitRef { value: String, rule: &'static str },
    #[error("`{value}` is not a valid path in the repository: {rule}")]
    RepoPath { value: String, rule: &'static str },
}

/// A value as a message quotes it: on one line (newline and tab as `\n`,
/// `\t`), control, line-break and bidi characters escaped, cut after 200
/// characters.
pub fn shown(value: &str) -> String {
    let mut s: String = value.chars().take(200).collect();
    if s.len() < value.len() {
        s.push('…');
    }
    one_line(&s)
}

/// [`escape`], and newline and tab written as `\n` and `\t`: text that
/// cannot start a line of its own (say, a fake `file: ok`). Idempotent.
pub fn one_line(s: &str) -> String {
    escape(s).replace('\n', "\\n").replace('\t', "\\t")
}

const LABEL_RULE: &str =
    "use lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters";
const SUBDOMAIN_RULE: &str =
    "use lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit, at most 253 characters";

/// A DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters
/// (Namespaces, and names kubectl calls "DNS labels").
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: labels joined by '.', at most 253 characters
/// (the names of ConfigMaps, Secrets, DaemonSets, …).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// `s` as a DNS-1123 label; `what` names the kind of name in the message.
pub fn dns_label(s: &str, what: &'static str) -> Result<(), GrammarError> {
    if s.is_empty() {
        return Err(GrammarError::Empty);
    }
    if is_dns_label(s) {
        return Ok(());
    }
    Err(GrammarError::Name {
        value: shown(s),
        what,
        rule: LABEL_RULE,
    })
}

/// `s` as a DNS-1123 subdomain; `what` names the kind of name in the message.
pub fn dns_subdomain(s: &str, what: &'static str) -> Result<(), GrammarError> {
    if s.is_empty() {
        return Err(GrammarError::Empty);
    }
    if is_dns_subdomain(s) {
        return Ok(());
    }
    Err(GrammarError::Name {
        value: shown(s),
        what,
        rule: SUBDOMAIN_RULE,
    })
}

/// An API server host: an IP address or a DNS-1123 subdomain. Returns the IP
/// when it is one.
pub fn host(s: &str) -> Result<Option<IpAddr>, GrammarError> {
    if s.is_empty() {
        return Err(GrammarError::Empty);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Some(ip));
    }
    let value = shown(s);
    if s.contains("://") {
        return Err(GrammarError::Url { value });
    }
    if s.contains(':') {
        return Err(GrammarError::Port { value });
    }
    if is_dns_subdomain(s) {
        return Ok(None);
    }
    Err(GrammarError::Host { value })
}

/// Refuses C0 and C1 controls, DEL, and the Unicode line and paragraph
/// separators: what free-form values (git URLs, refs, paths) never contain.
pub fn no_controls(s: &str) -> Result<(), GrammarError> {
    match s
        .chars()
        .find(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        None => Ok(()),
        Some(c) => Err(GrammarError::Control {
            value: shown(s),
            code: format!("U+{:04X}", c as u32),
        }),
    }
}

const GIT_REF_RULE: &str =
    "a branch, tag or commit: no spaces, controls, `~^:?*[\\`, `..`, `@{`, `//`, \
    no leading '-', '/' or '.', no trailing '/', '.' or `.lock`";

/// `reconcile.ref`: a branch, tag or commit as `git check-ref-format` allows
/// it, and not starting with '-' (it is passed as a command-line argument).
pub fn git_ref(s: &str) -> Result<(), GrammarError> {
    if s.is_empty() {
        return Err(GrammarError::Empty);
    }
    no_controls(s)?;
    let ok = !s.starts_with(['-', '/', '.'])
        && !s.ends_with(['/', '.'])
        && !s.ends_with(".lock")
        && s != "@"
        && !s.contains("..")
        && !s.contains("@{")
        && !s.contains("//")
        && !s.contains("/.")
        && !s.contains(".lock/")
        && !s.contains(|c: char| c.is_whitespace() || "~^:?*[\\".contains(c));
    if ok {
        return Ok(());
    }
    Err(GrammarError::GitRef {
        value: shown(s),
        rule: GIT_REF_RULE,
    })
}

const REPO_PATH_RULE: &str =
    "a relative path without `..`, not starting with '-' or '/', without controls or spaces";

/// `reconcile.path`: a relative path inside the repository. It is passed as
/// a positional argument, so it must not look like a flag.
pub fn repo_path(s: &str) -> Result<(), GrammarError> {
    if s.is_empty() {
        return Err(GrammarError::Empty);
    }
    no_controls(s)?;
    let ok = !s.starts_with(['-', '/'])
        && !s.contains(char::is_whitespace)
        && s.split('/').all(|part| !part.is_empty() && part != "..");
    if ok {
        return Ok(());
    }
    Err(GrammarError::RepoPath {
        value: shown(s),
        rule: REPO_PATH_RULE,
    })
}

/// A parsed OCI image reference: `[domain/]path[:tag][@sha256:<64 hex>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef<'a> {
    /// Domain and path, e.g. `ghcr.io/netboot/netboot`.
    pub repository: &'a str,
    pub tag: Option<&'a str>,
    /// `sha256:…`.
    pub digest: Option<&'a str>,
}

const REPOSITORY_RULE: &str = "expected [registry[:port]/]path with lowercase path components \
    (letters, digits, separated by '.', '_', '__' or '-'), at most 255 characters";
const TAG_RULE: &str =
    "a tag is a letter, digit or '_' followed by at most 127 letters, digits, '_', '.' or '-'";

/// distribution/reference's tag: `[\w][\w.-]{0,127}`.
pub fn is_tag(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphanumeric() || c == b'_')
        && s.len() <= 128
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `datapath.version`: an image tag.
pub fn image_tag(s: &str) -> Result<(), GrammarError> {
    if s.is_empty() {
        return Err(GrammarError::Empty);
    }
    if is_tag(s) {
        return Ok(());
    }
    Err(GrammarError::Image {
        value: shown(s),
        what: "tag",
        rule: TAG_RULE.into(),
    })
}

/// `datapath.image`: a repository without tag or digest (the tag goes in `version`).
pub fn image_repository(s: &str) -> Result<(), GrammarError> {
    let r = image_reference(s)?;
    if r.tag.is_some() || r.digest.is_some() {
        return Err(GrammarError::Tagged { value: shown(s) });
    }
    Ok(())
}

/// A full image reference: `[domain[:port]/]path[:tag][@sha256:<64 hex>]`.
pub fn image_reference(s: &str) -> Result<ImageRef<'_>, GrammarError> {
    if s.is_empty() {
        return Err(GrammarError::Empty);
    }
    let bad = |what: &'static str, rule: String| GrammarError::Image {
        value: shown(s),
        what,
        rule,
    };
    let (rest, digest) = match s.split_once('@') {
        Some((rest, d)) => {
            let hex = d.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(bad(
                    "digest",
                    "a digest is `sha256:` and 64 lowercase hex digits".into(),
                ));
            }
            (rest, Some(d))
        }
        None => (s, None),
    };
    // A ':' after the last '/' starts the tag; one before it is the registry's port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (repository, tag) = match rest[last_slash..].find(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        if !is_tag(t) {
            return Err(bad("tag", TAG_RULE.into()));
        }
    }
    if !is_repository(repository) {
        return Err(bad("repository", REPOSITORY_RULE.into()));
    }
    Ok(ImageRef {
        repository,
        tag,
        digest,
    })
}

/// `[domain/]path-component(/path-component)*`, at most 255 characters. The
/// first component is a domain when it has a '.' or ':' or is `localhost`.
fn is_repository(s: &str) -> bool {
    if s.is_empty() || s.len() > 255 {
        return false;
    }
    let (domain, path) = match s.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (Some(first), rest)
        }
        _ => (None, s),
    };
    domain.is_none_or(is_registry) && path.split('/').all(is_path_component)
}

/// `host[:port]`: domain components (letters of either case, digits, inner
/// '-') joined by '.', or `[IPv6]`; the port all digits.
fn is_registry(s: &str) -> bool {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return false;
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after.strip_prefix(':') {
            Some(p) => ("", Some(p)),
            None if after.is_empty() => ("", None),
            None => return false,
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let host_ok = s.starts_with('[')
        || host.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !c.starts_with('-')
                && !c.ends_with('-')
        });
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        for ok in ["a", "kube-proxy", "a1", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a b",
            "a\u{2028}b",
            &"a".repeat(64),
        ] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
        for ok in ["kube-proxy.v2", "a.b.c", "x1.y-2"] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        let long = format!("{}.{}", "a".repeat(63), "b".repeat(190));
        for bad in [
            "a..b",
            ".a",
            "a.",
            "a.-b",
            "a\nb",
            "kube-proxy\u{85}x",
            long.as_str(),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad:?}");
        }
        assert!(dns_label("", "name") == Err(GrammarError::Empty));
    }

    #[test]
    fn hosts() {
        assert_eq!(host("172.18.0.2").unwrap(), "172.18.0.2".parse().ok());
        assert_eq!(host("fd00::1").unwrap(), "fd00::1".parse().ok());
        assert_eq!(host("api.prod.example.internal").unwrap(), None);
        for bad in [
            "https://a.b",
            "a.b:6443",
            "API.example.com",
            "a b",
            "evil\u{2028}hostPID: true",
            "\"quoted\"",
            "",
        ] {
            assert!(host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn image_references() {
        let digest = format!("sha256:{}", "a".repeat(64));
        type Parsed<'a> = Option<(&'a str, Option<&'a str>)>;
        let cases: &[(&str, Parsed)] = &[
            (
                "ghcr.io/netboot/netboot",
                Some(("ghcr.io/netboot/netboot", None)),
            ),
            (
                "ghcr.io/netboot/netboot:0.1.0",
                Some(("ghcr.io/netboot/netboot", Some("0.1.0"))),
            ),
            (
                "localhost:5000/a/b:v_1",
                Some(("localhost:5000/a/b", Some("v_1"))),
            ),
            ("registry:5000/x", Some(("registry:5000/x", None))),
            ("busybox", Some(("busybox", None))),
            (
                "library/busy__box.x-y---z",
                Some(("library/busy__box.x-y---z", None)),
            ),
            (
                "[fd00::1]:5000/img:1",
                Some(("[fd00::1]:5000/img", Some("1"))),
            ),
            (
                "Upper.Registry.io/img",
                Some(("Upper.Registry.io/img", None)),
            ),
            ("ghcr.io/Netboot/netboot", None),
            ("ghcr.io/netboot/netboot:", None),
            ("ghcr.io/netboot/netboot:-x", None),
            ("ghcr.io/netboot//netboot", None),
            ("ghcr.io/netboot/netboot:1.0\nhostPID: true", None),
            ("ghcr.io/netboot/net boot", None),
            ("ghcr.io/netboot/netboot@sha256:abc", None),
            ("a/b_-c", None),
            ("a/.b", None),
            ("reg:port/x", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = image_reference(input).ok().map(|r| (r.repository, r.tag));
            assert_eq!(got, *want, "{input:?}");
        }
        let with_digest = format!("ghcr.io/netboot/netboot:1.0@{digest}");
        let r = image_reference(&with_digest).unwrap();
        assert_eq!(r.digest, Some(digest.as_str()));
        assert_eq!(r.tag, Some("1.0"));
        assert!(image_reference(&format!("ghcr.io/x@{}", digest.to_uppercase())).is_err());
        assert!(image_repository("ghcr.io/x/agent").is_ok());
        assert!(image_repository("ghcr.io/x/agent:1.0").is_err());
        assert!(image_repository(&format!("ghcr.io/x/agent@{digest}")).is_err());
        assert!(image_repository(&format!("x/{}", "a".repeat(260))).is_err());
    }

    #[test]
    fn git_refs_and_paths() {
        for ok in ["main", "v1.4.0", "release/1.x", "0123abcd", "feature_a-b"] {
            assert!(git_ref(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-f", "a..b", "a b", "a:b", "a\nb", "x.lock", "/a", "a/", "a//b", "@", "a@{1}",
            "a/.b",
        ] {
            assert!(git_ref(bad).is_err(), "{bad:?}");
        }
        for ok in [
            "clusters/prod.yaml",
            "a",
            "x/y/z.yaml",
            "\"odd'#{{name}}.yaml",
        ] {
            assert!(repo_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "--all",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a b",
            "a\u{85}b",
        ] {
            assert!(repo_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags() {
        assert!(is_tag("0.1.0") && is_tag("_x") && is_tag(&"a".repeat(128)));
        assert!(!is_tag("") && !is_tag(".x") && !is_tag("-x") && !is_tag(&"a".repeat(129)));
        assert!(!is_tag("1.0\u{2029}x") && !is_tag("v1+build"));
    }

    #[test]
    fn messages_escape_what_they_quote() {
        let e = dns_label("kube\u{1b}[32mok\r", "name")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\u{1b}') && !e.contains('\r'), "{e}");
        assert!(e.contains("\\u{001b}"), "{e}");
        let e = no_controls("a\u{2028}b").unwrap_err().to_string();
        assert!(e.contains("U+2028") && !e.contains('\u{2028}'), "{e}");
        let long = "x".repeat(10_000);
        assert!(host(&format!("{long}!")).unwrap_err().to_string().len() < 600);
    }
}
