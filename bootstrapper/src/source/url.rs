//! Repository URLs: what scheme, host and port a URL names, and what netboot
//! refuses before any connection is made.
//!
//! Schemes are matched case-insensitively, as libgit2 matches them (`SSH://`
//! is SSH, and so needs known_hosts). A URL may not carry credentials (they
//! would show in the CronJob's arguments, the process list and logs), and
//! `http://` is refused unless the caller allows it.

/// How a URL is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Https,
    /// Plain HTTP: unencrypted and unauthenticated.
    Http,
    /// `ssh://` (also `git+ssh://`, `ssh+git://`) and scp-like `[user@]host:path`.
    Ssh,
    /// `git://`: the git daemon protocol, no credentials.
    Git,
    File,
    /// A path on this machine.
    Local,
}

/// A parsed repository URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoUrl {
    pub scheme: Scheme,
    /// Lowercase; IPv6 without brackets; empty for `file://` and paths.
    pub host: String,
    /// The explicit port, else the scheme's default (0 for `file://` and paths).
    pub port: u16,
    /// The user name in the URL (`ssh://git@host/…`), if any.
    pub user: Option<String>,
    /// The URL has a password (`user:password@`).
    pub has_password: bool,
}

/// Why a URL is refused. The messages do not repeat the URL (it may hold a
/// secret); the caller names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error(
        "not a git URL (expected https://, ssh://, [user@]host:path, git://, file:// or a path)"
    )]
    Unsupported,
    #[error("not a valid URL: {0}")]
    Invalid(&'static str),
    #[error("credentials in the URL are refused (they would show in the CronJob's arguments, the process list and logs): remove them and put the token in --token-file FILE, $NETBOOT_GIT_TOKEN or the git Secret's `token` key")]
    Credentials,
    #[error("http:// is refused: the token and the fetched spec would cross the network unencrypted and unauthenticated; use https:// or ssh://, or pass --allow-insecure-http on a network you trust")]
    InsecureHttp,
}

/// The scheme of `scheme://…`, lowercased, when the URL has one.
fn split_scheme(url: &str) -> Option<(String, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let ok = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    ok.then(|| (scheme.to_ascii_lowercase(), rest))
}

/// The URL with its scheme lowercased (`SSH://h/r` → `ssh://h/r`); anything
/// else unchanged.
pub fn normalize(url: &str) -> String {
    match split_scheme(url) {
        Some((scheme, rest)) => format!("{scheme}://{rest}"),
        None => url.to_string(),
    }
}

/// Parses a repository URL. It does not judge it: see [`check`].
pub fn parse(url: &str) -> Result<RepoUrl, UrlError> {
    if let Some((scheme, rest)) = split_scheme(url) {
        let (scheme, default_port) = match scheme.as_str() {
            "https" => (Scheme::Https, 443),
            "http" => (Scheme::Http, 80),
            "ssh" | "git+ssh" | "ssh+git" => (Scheme::Ssh, 22),
            "git" => (Scheme::Git, 9418),
            "file" => {
                return Ok(RepoUrl {
                    scheme: Scheme::File,
                    host: String::new(),
                    port: 0,
                    user: None,
                    has_password: false,
                })
            }
            _ => return Err(UrlError::Unsupported),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport)?;
        let (user, has_password) = match userinfo {
            None => (None, false),
            Some(u) => match u.split_once(':') {
                Some((name, _)) => (Some(name.to_string()), true),
                None => (Some(u.to_string()), false),
            },
        };
        return Ok(RepoUrl {
            scheme,
            host,
            port: port.unwrap_or(default_port),
            user,
            has_password,
        });
    }
    if url.contains("://") {
        return Err(UrlError::Unsupported);
    }
    if url.is_empty() {
        return Err(UrlError::Invalid("empty"));
    }
    // scp-like `[user@]host:path`: a colon before any slash.
    let (user, hostpath) = match url.split_once('@') {
        Some((u, rest)) if !u.contains('/') && !u.contains(':') => (Some(u), rest),
        _ => (None, url),
    };
    let host = if let Some(v6) = hostpath.strip_prefix('[') {
        v6.split_once("]:").map(|(h, _)| h)
    } else {
        hostpath
            .split_once(':')
            .map(|(h, _)| h)
            .filter(|h| !h.contains('/'))
    };
    match host {
        Some(h) if !h.is_empty() && !url.starts_with('/') && !url.starts_with('.') => Ok(RepoUrl {
            scheme: Scheme::Ssh,
            host: h.to_ascii_lowercase(),
            port: 22,
            user: user.map(str::to_string),
            has_password: false,
        }),
        _ => Ok(RepoUrl {
            scheme: Scheme::Local,
            host: String::new(),
            port: 0,
            user: None,
            has_password: false,
        }),
    }
}

fn split_host_port(hostport: &str) -> Result<(String, Option<u16>), UrlError> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or(UrlError::Invalid("unclosed `[` in the host"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or(UrlError::Invalid("bad port"))?),
            ),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(UrlError::Invalid("no host"));
    }
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or(UrlError::Invalid(
                    "the port is not a number from 1 to 65535",
                ))?,
        ),
    };
    Ok((host.to_ascii_lowercase(), port))
}

/// Parses `url` and refuses what netboot does not fetch from: credentials in
/// an http(s) URL (any user-info: a token is often put as the user name), a
/// password in any URL, and `http://` unless `allow_insecure_http`.
pub fn check(url: &str, allow_insecure_http: bool) -> Result<RepoUrl, UrlError> {
    let parsed = parse(url)?;
    let web = matches!(parsed.scheme, Scheme::Https | Scheme::Http);
    if parsed.has_password || (web && parsed.user.is_some()) {
        return Err(UrlError::Credentials);
    }
    if parsed.scheme == Scheme::Http && !allow_insecure_http {
        return Err(UrlError::InsecureHttp);
    }
    Ok(parsed)
}

/// Whether credentials for `configured` may be given to `asked` (the URL
/// libgit2 asks credentials for, after any redirect): the same host (case
/// aside) and port. Anything that does not parse gets none.
pub fn same_server(configured: &RepoUrl, asked: &str) -> bool {
    match parse(asked) {
        Ok(a) => !a.host.is_empty() && a.host == configured.host && a.port == configured.port,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(url: &str) -> (Scheme, String, u16) {
        let u = parse(url).unwrap();
        (u.scheme, u.host, u.port)
    }

    #[test]
    fn schemes_are_matched_whatever_their_case() {
        for url in [
            "ssh://git@Git.Example:2222/r.git",
            "SSH://git@git.example:2222/r.git",
            "Git+SSH://git.example:2222/r.git",
        ] {
            assert_eq!(at(url), (Scheme::Ssh, "git.example".into(), 2222), "{url}");
        }
        assert_eq!(at("HTTPS://H/r.git"), (Scheme::Https, "h".into(), 443));
        assert_eq!(at("Http://h:8080/r.git"), (Scheme::Http, "h".into(), 8080));
        assert_eq!(
            at("GIT://127.0.0.1/r"),
            (Scheme::Git, "127.0.0.1".into(), 9418)
        );
        assert_eq!(at("FILE:///srv/r.git").0, Scheme::File);
        assert_eq!(normalize("SSH://git@H/r.git"), "ssh://git@H/r.git");
        assert_eq!(normalize("/srv/r.git"), "/srv/r.git");
        assert_eq!(parse("ftp://h/r"), Err(UrlError::Unsupported));
    }

    #[test]
    fn scp_like_urls_are_ssh_and_paths_are_local() {
        assert_eq!(
            at("git@Git.Example:o/r.git"),
            (Scheme::Ssh, "git.example".into(), 22)
        );
        assert_eq!(
            at("git.example:o/r.git"),
            (Scheme::Ssh, "git.example".into(), 22)
        );
        assert_eq!(at("git@[::1]:o/r.git"), (Scheme::Ssh, "::1".into(), 22));
        assert_eq!(
            at("ssh://[::1]:2222/r.git"),
            (Scheme::Ssh, "::1".into(), 2222)
        );
        assert_eq!(at("/srv/r.git").0, Scheme::Local);
        assert_eq!(at("./r:x").0, Scheme::Local);
        assert_eq!(at("dir/r.git").0, Scheme::Local);
    }

    #[test]
    fn credentials_in_urls_and_plain_http_are_refused() {
        for url in [
            "https://user:tok@h/r.git",
            "https://ghp_token@h/r.git",
            "HTTPS://x-access-token:tok@h/r.git",
            "ssh://git:password@h/r.git",
            "http://tok@h/r.git",
        ] {
            assert_eq!(check(url, true), Err(UrlError::Credentials), "{url}");
        }
        assert!(check("ssh://git@h/r.git", false).is_ok());
        assert!(check("git@h:r.git", false).is_ok());
        assert_eq!(check("http://h/r.git", false), Err(UrlError::InsecureHttp));
        assert_eq!(check("HTTP://h/r.git", false), Err(UrlError::InsecureHttp));
        assert!(check("http://h/r.git", true).is_ok());
        assert!(check("https://h/r.git", false).is_ok());
        let m = UrlError::Credentials.to_string();
        assert!(
            m.contains("--token-file")
                && m.contains("NETBOOT_GIT_TOKEN")
                && m.contains("`token` key")
        );
        assert!(UrlError::InsecureHttp
            .to_string()
            .contains("--allow-insecure-http"));
    }

    #[test]
    fn credentials_go_only_to_the_configured_host_and_port() {
        let https = parse("https://Git.Example/o/r.git").unwrap();
        assert!(same_server(&https, "https://git.example/o/r.git"));
        assert!(same_server(&https, "https://GIT.EXAMPLE:443/other.git"));
        assert!(!same_server(&https, "https://evil.example/o/r.git"));
        assert!(!same_server(
            &https,
            "https://git.example.evil.example/o/r.git"
        ));
        assert!(!same_server(&https, "https://git.example:8443/o/r.git"));
        assert!(!same_server(&https, "http://git.example/o/r.git"));
        assert!(!same_server(&https, "not a url://"));
        let ssh = parse("git@git.example:o/r.git").unwrap();
        assert!(same_server(&ssh, "git@git.example:o/r.git"));
        assert!(same_server(&ssh, "ssh://git@git.example/o/r.git"));
        assert!(!same_server(&ssh, "ssh://git@other.example/o/r.git"));
        let file = parse("file:///srv/r.git").unwrap();
        assert!(!same_server(&file, "file:///srv/r.git"));
    }
}
