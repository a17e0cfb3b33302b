//! The source step: a git repository at a ref → the files of one commit.
//!
//! [`fetch`] keeps one bare repository per URL in a cache
//! (`<cache>/<sha256 of the URL>`) and fetches into it incrementally, never
//! cloning again; it resolves the ref (branch, tag, full or short commit SHA)
//! and writes that commit's tree into a temporary directory, a [`Snapshot`],
//! from which the spec and `templates/` are read. The commit is the run's
//! revision (`git:<sha>`).
//!
//! SSH always verifies the server's host key against a known_hosts file (no
//! file, no SSH, whatever the scheme's case); HTTPS takes a token; `file://`
//! and local paths need nothing. Before anything connects, [`url::check`]
//! refuses credentials inside the URL and `http://` (unless allowed).
//! Credentials are only offered to the configured host and port, never to a
//! server a redirect leads to. A fetch is bounded in bytes, objects and wall
//! time ([`FetchLimits`]). No credential reaches a message: URLs are shown
//! with their userinfo redacted and every git error is scrubbed of the token
//! before it leaves.

pub mod known_hosts;
pub mod url;

use std::cell::RefCell;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use git2::{
    AutotagOption, CertificateCheckStatus, Cred, CredentialType, ErrorClass, ErrorCode,
    FetchOptions, FetchPrune, ObjectType, Oid, RemoteCallbacks, RemoteRedirect, Repository, Tree,
};
use sha2::{Digest, Sha256};

use crate::render::hex;
use crate::spec::{self, ClusterNetwork, LoadError};
use known_hosts::{HostKey, Verdict};
use url::{RepoUrl, Scheme, UrlError};

/// A secret string: never printed (`Debug` shows `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Where an HTTPS token comes from; a file is read at each fetch, so a
/// rotated Secret is picked up by a long-running reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Value(Secret),
    File(PathBuf),
}

/// Credentials for the repository. `Default`: none (file:// and public repos).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// OpenSSH known_hosts file; required for SSH URLs.
    pub known_hosts: Option<PathBuf>,
    /// Private key for SSH (unencrypted).
    pub ssh_key: Option<PathBuf>,
    /// Token for HTTPS, sent as the password of user `x-access-token` (a URL
    /// may not carry a user or token: [`url::check`]). Offered, like the SSH
    /// key, only to the configured URL's host and port.
    pub token: Option<Token>,
}

/// Bounds on one fetch, enforced as data arrives (libgit2's progress
/// callbacks): the fetch is stopped as soon as one is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// Bytes received (the pack). Default 512 MiB.
    pub max_bytes: u64,
    /// Objects in the pack, known from its header before it is downloaded. Default 1,000,000.
    pub max_objects: usize,
    /// Wall time from the start of the fetch. Checked whenever the server
    /// sends something; a server that sends nothing is cut off by the
    /// transport's own read timeout (2 minutes) instead. Default 5 minutes.
    pub timeout: Duration,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            max_bytes: 512 << 20,
            max_objects: 1_000_000,
            timeout: Duration::from_secs(300),
        }
    }
}

impl FetchLimits {
    /// Which limit `received` bytes and `objects` after `elapsed` exceed, if any.
    fn exceeded(&self, received: u64, objects: usize, elapsed: Duration) -> Option<String> {
        if received > self.max_bytes {
            Some(format!(
                "fetch stopped: {received} bytes received, over the limit of {} bytes (--fetch-max-bytes)",
                self.max_bytes
            ))
        } else if objects > self.max_objects {
            Some(format!(
                "fetch stopped: the pack has {objects} objects, over the limit of {} (--fetch-max-objects)",
                self.max_objects
            ))
        } else if elapsed >= self.timeout {
            Some(format!(
                "fetch stopped: still running after {:.1}s, over the limit of {}s (--fetch-timeout)",
                elapsed.as_secs_f64(),
                self.timeout.as_secs_f64()
            ))
        } else {
            None
        }
    }
}

/// Options for [`fetch`].
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// `https://`, `ssh://`, `git@host:path`, `git://`, `file://`, a local path,
    /// or `http://` when `allow_insecure_http`. Schemes in any case.
    pub url: String,
    /// Branch, tag, or full or short (≥ 4 hex digits) commit SHA. Default `main`.
    /// 40 hex digits are always a commit, never a branch or tag of that name.
    pub git_ref: String,
    /// The cache: one bare repository per URL under it. Default [`default_cache_dir`].
    pub cache_dir: PathBuf,
    /// Credentials and known_hosts. Default none.
    pub auth: Auth,
    /// Fetch over plain `http://`. Default false: refused.
    pub allow_insecure_http: bool,
    /// Bounds on the fetch. Default [`FetchLimits::default`].
    pub limits: FetchLimits,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            url: String::new(),
            git_ref: "main".into(),
            cache_dir: default_cache_dir(),
            auth: Auth::default(),
            allow_insecure_http: false,
            limits: FetchLimits::default(),
        }
    }
}

/// `${NETBOOT_CACHE:-$HOME/.cache/netboot}/git`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("NETBOOT_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/netboot")))
        .unwrap_or_else(|| std::env::temp_dir().join("netboot-cache"));
    base.join("git")
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: git cache: {message}")]
    Cache { path: String, message: String },
    #[error("git {url}: {source}")]
    Url {
        url: String,
        #[source]
        source: UrlError,
    },
    #[error("git {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("git {url}: {message}")]
    Limit { url: String, message: String },
    #[error("git {url}: authentication failed: {message}")]
    Auth { url: String, message: String },
    #[error("git {url}: {message}")]
    HostKey { url: String, message: String },
    #[error("git {url}: ref `{git_ref}` not found ({known})")]
    UnknownRef {
        url: String,
        git_ref: String,
        known: String,
    },
    #[error("git {url}: {message}")]
    Checkout { url: String, message: String },
    #[error("{path}: {message}")]
    Path { path: String, message: String },
    /// The spec's own problems, every one by file position (they are the
    /// message, not a cause below it).
    #[error("{errors}\n(the spec at {revision}; nothing was applied)")]
    Spec { revision: String, errors: LoadError },
}

impl SourceError {
    /// The spec's individual problems, when that is what failed.
    pub fn spec_errors(&self) -> Option<&LoadError> {
        match self {
            SourceError::Spec { errors, .. } => Some(errors),
            _ => None,
        }
    }
}

/// One commit's files, in a temporary directory removed on drop.
#[derive(Debug)]
pub struct Snapshot {
    /// The full commit SHA.
    pub commit: String,
    /// The repository URL with credentials redacted.
    pub url: String,
    /// The ref as asked.
    pub git_ref: String,
    dir: tempfile::TempDir,
}

impl Snapshot {
    /// `git:<sha>`: the revision recorded in the inventory.
    pub fn revision(&self) -> String {
        format!("git:{}", self.commit)
    }

    /// Where the commit's files are.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The repository's `templates/`, when it has one.
    pub fn templates(&self) -> Option<PathBuf> {
        let t = self.root().join("templates");
        t.is_dir().then_some(t)
    }

    /// The spec at `path` (relative to the repository's root), checked;
    /// messages name it by that path.
    pub fn load_spec(&self, path: &str) -> Result<ClusterNetwork, SourceError> {
        let rel = repo_path(path)?;
        let file = self.root().join(&rel);
        let name = rel.display().to_string();
        let bytes = match std::fs::metadata(&file) {
            Ok(m) if m.is_file() && m.len() > spec::MAX_FILE_BYTES => {
                return Err(SourceError::Path {
                    path: name,
                    message: format!(
                        "file is {} bytes at {}; a spec may be at most {}",
                        m.len(),
                        self.revision(),
                        spec::MAX_FILE_BYTES
                    ),
                })
            }
            Ok(m) if m.is_file() => std::fs::read(&file).map_err(|e| SourceError::Path {
                path: name.clone(),
                message: e.to_string(),
            })?,
            _ => {
                return Err(SourceError::Path {
                    path: name,
                    message: format!(
                        "no such file in {} at {} ({})",
                        self.url,
                        self.revision(),
                        self.git_ref
                    ),
                })
            }
        };
        spec::parse_bytes(&name, &bytes).map_err(|errors| SourceError::Spec {
            revision: self.revision(),
            errors,
        })
    }

    /// Every `clusters/*.yaml` in the commit, sorted: the fleet.
    pub fn cluster_specs(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.root().join("clusters"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            .map(|n| format!("clusters/{n}"))
            .collect();
        out.sort();
        out
    }
}

/// A path inside the repository: relative, no `..`.
fn repo_path(path: &str) -> Result<PathBuf, SourceError> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(p.components().collect())
    } else {
        Err(SourceError::Path {
            path: path.into(),
            message: "must be a path inside the repository (relative, without `..`)".into(),
        })
    }
}

/// The URL as messages show it: the userinfo of http(s) URLs replaced by
/// `***`, an SSH URL's password too (its user name stays).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    let shown = if scheme.to_ascii_lowercase().contains("ssh") {
        match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***"),
            None => userinfo.to_string(),
        }
    } else {
        "***".to_string()
    };
    format!("{scheme}://{shown}@{host}{path}")
}

/// The userinfo of a `scheme://userinfo@host/…` URL.
fn userinfo(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    authority.rsplit_once('@').map(|(u, _)| u)
}

/// Removes every credential from a message: the raw URL, its userinfo (an
/// SSH user name may stay) and the token.
fn scrub(message: &str, url: &str, token: Option<&Secret>) -> String {
    let mut m = message.replace(url, &redact_url(url));
    if let Some(info) = userinfo(url).filter(|u| !u.is_empty()) {
        let web = url::parse(url).is_ok_and(|u| matches!(u.scheme, Scheme::Https | Scheme::Http));
        if web {
            m = m.replace(info, "***");
        }
        if let Some((_, password)) = info.split_once(':').filter(|(_, p)| !p.is_empty()) {
            m = m.replace(password, "***");
        }
    }
    if let Some(t) = token.filter(|t| !t.expose().is_empty()) {
        m = m.replace(t.expose(), "***");
    }
    m
}

/// Connect and read timeouts for git's network transports (libgit2 global options).
fn set_timeouts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: libgit2 global options, set once before any fetch of this
        // process starts (the Once serializes callers).
        unsafe {
            let _ = git2::opts::set_server_connect_timeout_in_milliseconds(30_000);
            let _ = git2::opts::set_server_timeout_in_milliseconds(120_000);
        }
    });
}

/// Fetches `opts.url` into the cache, resolves `opts.git_ref` and writes the
/// commit's tree into a [`Snapshot`]. Blocking: call it from
/// `tokio::task::spawn_blocking` in async code.
pub fn fetch(opts: &SourceOptions) -> Result<Snapshot, SourceError> {
    set_timeouts();
    let url = url::normalize(&opts.url);
    let shown = redact_url(&url);
    let parsed = url::check(&url, opts.allow_insecure_http).map_err(|source| SourceError::Url {
        url: shown.clone(),
        source,
    })?;
    let token = read_token(&opts.auth, &shown)?;
    let key = hex(&Sha256::digest(url.as_bytes()));
    let path = opts.cache_dir.join(&key);
    let cache_err = |message: String| SourceError::Cache {
        path: path.display().to_string(),
        message,
    };
    std::fs::create_dir_all(&opts.cache_dir).map_err(|e| cache_err(e.to_string()))?;
    // One fetch per cache entry at a time, across processes.
    let lock = File::create(opts.cache_dir.join(format!("{key}.lock")))
        .map_err(|e| cache_err(format!("lock: {e}")))?;
    lock.lock().map_err(|e| cache_err(format!("lock: {e}")))?;
    let repo = open_cache(&path).map_err(|e| cache_err(e.message().to_string()))?;
    fetch_into(&repo, opts, &url, &parsed, &shown, token.as_ref())?;
    let commit = resolve(&repo, &opts.git_ref).map_err(|known| SourceError::UnknownRef {
        url: shown.clone(),
        git_ref: opts.git_ref.clone(),
        known,
    })?;
    // $TMPDIR, or beside the cache where the root filesystem is read-only (the CronJob).
    let mut builder = tempfile::Builder::new();
    builder.prefix(".netboot-source-");
    let dir = builder
        .tempdir()
        .or_else(|_| builder.tempdir_in(&opts.cache_dir))
        .map_err(|e| SourceError::Checkout {
            url: shown.clone(),
            message: format!("temporary directory: {e}"),
        })?;
    let checkout_err = |e: String| SourceError::Checkout {
        url: shown.clone(),
        message: format!("commit {commit}: {e}"),
    };
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(|e| checkout_err(e.message().to_string()))?;
    write_tree(&repo, &tree, dir.path()).map_err(checkout_err)?;
    drop(lock);
    Ok(Snapshot {
        commit: commit.to_string(),
        url: shown,
        git_ref: opts.git_ref.clone(),
        dir,
    })
}

fn read_token(auth: &Auth, shown: &str) -> Result<Option<Secret>, SourceError> {
    match &auth.token {
        None => Ok(None),
        Some(Token::Value(s)) => Ok(Some(s.clone())),
        Some(Token::File(p)) => std::fs::read_to_string(p)
            .map(|t| Some(Secret::new(t.trim())))
            .map_err(|e| SourceError::Auth {
                url: shown.into(),
                message: format!("token file {}: {e}", p.display()),
            }),
    }
}

/// The cached bare repository, created on first use; a cache that no longer
/// opens is started afresh.
fn open_cache(path: &Path) -> Result<Repository, git2::Error> {
    if path.exists() {
        match Repository::open_bare(path) {
            Ok(r) => return Ok(r),
            Err(e) => {
                tracing::warn!(
                    "{}: unusable git cache ({}); starting it afresh",
                    path.display(),
                    e.message()
                );
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
    Repository::init_bare(path)
}

const REFSPECS: &[&str] = &[
    "+refs/heads/*:refs/remotes/origin/*",
    "+refs/tags/*:refs/tags/*",
];

fn fetch_into(
    repo: &Repository,
    opts: &SourceOptions,
    url: &str,
    parsed: &RepoUrl,
    shown: &str,
    token: Option<&Secret>,
) -> Result<(), SourceError> {
    let ssh = parsed.scheme == Scheme::Ssh;
    if ssh {
        let (host, port) = (&parsed.host, parsed.port);
        if opts.auth.known_hosts.is_none() {
            return Err(SourceError::HostKey {
                url: shown.into(),
                message: format!(
                    "no known_hosts file to verify {}'s host key: pass --known-hosts FILE or put known_hosts in $NETBOOT_GIT_CREDENTIALS",
                    known_hosts::host_name(host, port)
                ),
            });
        }
    }
    let known_hosts_text = match &opts.auth.known_hosts {
        Some(p) if ssh => Some(
            std::fs::read_to_string(p).map_err(|e| SourceError::HostKey {
                url: shown.into(),
                message: format!("known_hosts {}: {e}", p.display()),
            })?,
        ),
        _ => None,
    };
    // Why a callback refused, as libgit2 reports callback errors only generically.
    let refused: RefCell<Option<SourceError>> = RefCell::new(None);
    let mut attempts = 0u32;
    let mut cb = RemoteCallbacks::new();
    let started = Instant::now();
    // Records and reports a limit the fetch has gone over.
    let over_limit = |received: u64, objects: usize| -> bool {
        match opts.limits.exceeded(received, objects, started.elapsed()) {
            Some(message) => {
                let mut r = refused.borrow_mut();
                if r.is_none() {
                    *r = Some(SourceError::Limit {
                        url: shown.into(),
                        message,
                    });
                }
                true
            }
            None => false,
        }
    };
    let port = parsed.port;
    cb.certificate_check(|cert, hostname| {
        let Some(hk) = cert.as_hostkey() else {
            // TLS: libgit2's own certificate verification decides.
            return Ok(CertificateCheckStatus::CertificatePassthrough);
        };
        let Some(text) = known_hosts_text.as_deref().filter(|_| ssh) else {
            // An SSH host key where no SSH was expected: fail closed.
            let e = format!(
                "{hostname}: an SSH host key was offered but the URL was not recognised as SSH, so there is no known_hosts to verify it; refusing to connect"
            );
            *refused.borrow_mut() = Some(SourceError::HostKey {
                url: shown.into(),
                message: e.clone(),
            });
            return Err(git2::Error::from_str(&e));
        };
        let Some(blob) = hk.hostkey() else {
            let e = format!("{hostname}: the SSH server's host key is not available to verify");
            *refused.borrow_mut() = Some(SourceError::HostKey {
                url: shown.into(),
                message: e.clone(),
            });
            return Err(git2::Error::from_str(&e));
        };
        let key = HostKey::from_blob(blob);
        let name = known_hosts::host_name(hostname, port);
        let file = opts
            .auth
            .known_hosts
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let message = match known_hosts::verify(text, hostname, port, &key) {
            Verdict::Match => return Ok(CertificateCheckStatus::CertificateOk),
            Verdict::Unknown { other_types } if other_types.is_empty() => format!(
                "host key of {name} is unknown: {key} is not in known_hosts {file}; refusing to connect (verify the fingerprint out of band and add the key)"
            ),
            Verdict::Unknown { other_types } => format!(
                "host key of {name} is unknown: the server offered {key}, known_hosts {file} lists only {} for it; refusing to connect",
                other_types.join(", ")
            ),
            Verdict::Changed { line, known } => format!(
                "host key of {name} has CHANGED: the server offered {key}, known_hosts {file}:{line} has {known}; refusing to connect (possible man-in-the-middle)"
            ),
            Verdict::Revoked { line } => format!(
                "host key of {name} is revoked ({file}:{line}): {key}; refusing to connect"
            ),
        };
        *refused.borrow_mut() = Some(SourceError::HostKey {
            url: shown.into(),
            message: message.clone(),
        });
        Err(git2::Error::from_str(&message))
    });
    cb.credentials(|asked, username, allowed| {
        if !url::same_server(parsed, asked) {
            // A redirect (or anything else) led elsewhere: that server gets nothing.
            let other = url::parse(asked).map(|u| u.host).unwrap_or_default();
            let m = format!(
                "the server `{other}` asked for credentials, but they are only given to `{}` (port {}), the repository's server; none were sent",
                parsed.host, parsed.port
            );
            *refused.borrow_mut() = Some(SourceError::Auth {
                url: shown.into(),
                message: m.clone(),
            });
            return Err(git2::Error::from_str(&m));
        }
        attempts += 1;
        if attempts > 1 {
            let m = "the server refused the credentials".to_string();
            *refused.borrow_mut() = Some(SourceError::Auth {
                url: shown.into(),
                message: m.clone(),
            });
            return Err(git2::Error::from_str(&m));
        }
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(username.unwrap_or("git"));
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            if let Some(key) = &opts.auth.ssh_key {
                return Cred::ssh_key(username.unwrap_or("git"), None, key, None);
            }
            let m = "the server wants an SSH key: pass --ssh-key FILE or put ssh-privatekey in $NETBOOT_GIT_CREDENTIALS".to_string();
            *refused.borrow_mut() = Some(SourceError::Auth {
                url: shown.into(),
                message: m.clone(),
            });
            return Err(git2::Error::from_str(&m));
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            if let Some(t) = token {
                return Cred::userpass_plaintext(username.unwrap_or("x-access-token"), t.expose());
            }
            let m = "the server wants credentials: pass --token-file FILE or set NETBOOT_GIT_TOKEN".to_string();
            *refused.borrow_mut() = Some(SourceError::Auth {
                url: shown.into(),
                message: m.clone(),
            });
            return Err(git2::Error::from_str(&m));
        }
        Err(git2::Error::from_str("no supported credential type"))
    });
    cb.transfer_progress(|p| {
        let objects = p.total_objects().max(p.received_objects());
        !over_limit(p.received_bytes() as u64, objects)
    });
    cb.sideband_progress(|_| !over_limit(0, 0));
    let mut fo = FetchOptions::new();
    fo.remote_callbacks(cb)
        .prune(FetchPrune::On)
        .download_tags(AutotagOption::None)
        // A redirect of the first request only (e.g. to add `.git`); credentials
        // still go only to the configured server (the credentials callback).
        .follow_redirects(RemoteRedirect::Initial);
    let result = repo
        .remote_anonymous(url)
        .and_then(|mut remote| remote.fetch(REFSPECS, Some(&mut fo), None));
    drop(fo);
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            if let Some(r) = refused.into_inner() {
                return Err(r);
            }
            let message = scrub(e.message(), url, token);
            if e.code() == ErrorCode::Auth
                || e.class() == ErrorClass::Ssh && message.contains("auth")
            {
                Err(SourceError::Auth {
                    url: shown.into(),
                    message,
                })
            } else if e.code() == ErrorCode::Certificate {
                Err(SourceError::HostKey {
                    url: shown.into(),
                    message,
                })
            } else {
                Err(SourceError::Fetch {
                    url: shown.into(),
                    message: format!("fetch failed: {message}"),
                })
            }
        }
    }
}

/// The commit a ref names: a full commit SHA (always a commit, whatever
/// branches or tags are called), a branch, a tag (peeled), or a unique SHA
/// prefix of at least 4 hex digits (after branches and tags). Err: what refs
/// there are.
fn resolve(repo: &Repository, git_ref: &str) -> Result<Oid, String> {
    if git_ref.len() == 40 && git_ref.chars().all(|c| c.is_ascii_hexdigit()) {
        // A full SHA is a commit, never a branch or tag that is named like one.
        return Oid::from_str(git_ref)
            .and_then(|oid| repo.find_object(oid, None))
            .and_then(|o| o.peel_to_commit())
            .map(|c| c.id())
            .map_err(|_| {
                "a full commit SHA, but no commit with it is on any branch or tag of the repository"
                    .to_string()
            });
    }
    let name = git_ref
        .strip_prefix("refs/heads/")
        .or_else(|| git_ref.strip_prefix("origin/"))
        .unwrap_or(git_ref);
    let tag = git_ref.strip_prefix("refs/tags/").unwrap_or(git_ref);
    for full in [
        format!("refs/remotes/origin/{name}"),
        format!("refs/tags/{tag}"),
    ] {
        if let Ok(r) = repo.find_reference(&full) {
            if let Ok(c) = r.peel_to_commit() {
                return Ok(c.id());
            }
        }
    }
    if git_ref.len() >= 4 && git_ref.len() < 40 && git_ref.chars().all(|c| c.is_ascii_hexdigit()) {
        if let Ok(obj) = repo.revparse_single(git_ref) {
            if let Ok(c) = obj.peel_to_commit() {
                return Ok(c.id());
            }
        }
    }
    let mut branches = Vec::new();
    let mut tags = Vec::new();
    if let Ok(refs) = repo.references() {
        for r in refs.flatten() {
            match r.name() {
                Some(n) if n.starts_with("refs/remotes/origin/") => {
                    branches.push(n.trim_start_matches("refs/remotes/origin/").to_string())
                }
                Some(n) if n.starts_with("refs/tags/") => {
                    tags.push(n.trim_start_matches("refs/tags/").to_string())
                }
                _ => {}
            }
        }
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
        }
    };
    Err(format!(
        "no branch, tag or commit of that name; branches: {}; tags: {}",
        list(&branches),
        list(&tags)
    ))
}

/// Writes a tree's blobs under `dir`. Symlinks and submodules are skipped
/// (nothing may point outside the snapshot).
fn write_tree(repo: &Repository, tree: &Tree<'_>, dir: &Path) -> Result<(), String> {
    for entry in tree.iter() {
        let Some(name) = entry.name() else { continue };
        if name == ".." || name == "." || name.contains('/') {
            continue;
        }
        let path = dir.join(name);
        match entry.kind() {
            Some(ObjectType::Tree) => {
                std::fs::create_dir_all(&path).map_err(|e| format!("{name}: {e}"))?;
                let sub = repo
                    .find_tree(entry.id())
                    .map_err(|e| format!("{name}: {}", e.message()))?;
                write_tree(repo, &sub, &path)?;
            }
            Some(ObjectType::Blob) if entry.filemode() != 0o120000 => {
                let blob = repo
                    .find_blob(entry.id())
                    .map_err(|e| format!("{name}: {}", e.message()))?;
                std::fs::write(&path, blob.content()).map_err(|e| format!("{name}: {e}"))?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
