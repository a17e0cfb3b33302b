//! GitOps: the spec and templates from git (file://, a git daemon, an sshd
//! with host key verification), `netboot reconcile` applying new commits and
//! reverts, correcting drift on the local real cluster, and a fleet with a
//! broken member, and the CronJob's ServiceAccount doing a handover and a
//! restore with only the RBAC netboot renders for it.
//!
//! Servers the tests start (git daemon, sshd) listen on 127.0.0.1 only, on a
//! free port, and are killed by the PID the test spawned. Tests that change
//! the cluster run one at a time (`serial`) from the baseline (`reset`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    admin_writes_since, audit_len, audit_line, audit_writes_since, cluster_lock, kube_proxy,
    netboot_env, recreate_kube_proxy, rt, scenario, serial, Run,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace};
use kube::api::{Api, ListParams, Patch, PatchParams};
use netboot_harness::cluster::{repo_root, SharedCluster};
use serde_json::{json, Value};

// ---------------------------------------------------------------- git fixtures

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=netboot-test",
            "-c",
            "user.email=test@netboot.invalid",
        ])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "advice.detachedHead=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git (apt-get install git)");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare repository (what netboot fetches) and a work tree pushing to it.
struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    fn new() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q", "--bare", "repo.git"]);
        git(dir.path(), &["init", "-q", "work"]);
        git(
            &dir.path().join("work"),
            &["remote", "add", "origin", "../repo.git"],
        );
        Repo { dir }
    }

    fn bare(&self) -> PathBuf {
        self.dir.path().join("repo.git")
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare().display())
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Writes `files` and pushes a commit to main; returns its SHA.
    fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (path, text) in files {
            let p = self.work().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        git(&self.work(), &["add", "-A"]);
        git(&self.work(), &["commit", "-q", "-m", message]);
        git(&self.work(), &["push", "-q", "origin", "HEAD:main"]);
        git(&self.work(), &["rev-parse", "HEAD"])
    }

    fn revert_last(&self) -> String {
        git(&self.work(), &["revert", "--no-edit", "HEAD"]);
        git(&self.work(), &["push", "-q", "origin", "HEAD:main"]);
        git(&self.work(), &["rev-parse", "HEAD"])
    }
}

fn local_spec() -> String {
    std::fs::read_to_string(repo_root().join("clusters/local.yaml")).unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str, child: &mut Child) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited before listening: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what} did not listen on 127.0.0.1:{port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process this test started; killed by its PID on drop.
struct Daemon {
    child: Child,
    what: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped {} (pid {})", self.what, self.child.id());
    }
}

/// `git daemon` serving `base` on 127.0.0.1:port (git-daemon itself, so the
/// PID we kill is the server's).
fn git_daemon(base: &Path) -> (Daemon, u16) {
    let exec_path = git(base, &["--exec-path"]);
    let port = free_port();
    let mut child = Command::new(Path::new(&exec_path).join("git-daemon"))
        .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .arg(base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git-daemon (apt-get install git)");
    wait_port(port, "git daemon", &mut child);
    (
        Daemon {
            child,
            what: "git daemon",
        },
        port,
    )
}

fn ssh_keygen(path: &Path) -> String {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "netboot-test", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(st.success());
    std::fs::read_to_string(path.with_extension("pub")).unwrap()
}

/// An sshd on 127.0.0.1 with its own host key, accepting one client key for
/// the current user. Returns the daemon, its port, the host's public key
/// line and the client's private key path.
struct Sshd {
    _daemon: Daemon,
    port: u16,
    host_pub: String,
    client_key: PathBuf,
}

fn sshd(dir: &Path) -> Sshd {
    let sshd_bin = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("sshd (apt-get install openssh-server)");
    // sshd insists on its privilege separation directory.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let host_pub = ssh_keygen(&dir.join("host_key"));
    let client_pub = ssh_keygen(&dir.join("client_key"));
    std::fs::write(dir.join("authorized_keys"), client_pub).unwrap();
    let port = free_port();
    let config = format!(
        "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
         AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\nLogLevel VERBOSE\n",
        d = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), config).unwrap();
    let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
    let mut child = Command::new(sshd_bin)
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_port(port, "sshd", &mut child);
    Sshd {
        _daemon: Daemon {
            child,
            what: "sshd",
        },
        port,
        host_pub,
        client_key: dir.join("client_key"),
    }
}

fn user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}

// ---------------------------------------------------------------- offline: fetching and failing safely

/// An unknown ref is refused before any cluster is contacted.
#[test]
fn apply_from_git_with_an_unknown_ref_exits_2_before_touching_a_cluster() {
    let repo = Repo::new();
    repo.commit(&[("clusters/local.yaml", &local_spec())], "local");
    let cache = tempfile::tempdir().unwrap();
    let run = netboot_env(
        &[
            "apply",
            "--repo",
            &repo.url(),
            "--ref",
            "nope",
            "clusters/local.yaml",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        cache.path(),
        &[],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("ref `nope` not found") && run.stderr.contains("branches: main"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("nothing was applied"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("/nonexistent/kubeconfig"),
        "the cluster must not be contacted: {}",
        run.stderr
    );
}

/// A spec that does not check at the new commit: its errors by position, nothing applied.
#[test]
fn apply_from_git_with_a_broken_spec_exits_2_naming_the_position() {
    let repo = Repo::new();
    let broken = local_spec().replace("serviceCIDR:", "serviceCidr:");
    let sha = repo.commit(&[("clusters/local.yaml", &broken)], "typo");
    let cache = tempfile::tempdir().unwrap();
    let run = netboot_env(
        &[
            "plan",
            "--repo",
            &repo.url(),
            "clusters/local.yaml",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        cache.path(),
        &[],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("error: clusters/local.yaml:9:5: spec.cluster.serviceCidr: unknown field; did you mean `serviceCIDR`?"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("the spec at git:{sha}; nothing was applied")),
        "{}",
        run.stderr
    );
}

/// Nothing listens: a clear error naming the repository, exit 2.
#[test]
fn an_unreachable_git_server_exits_2() {
    let cache = tempfile::tempdir().unwrap();
    let url = format!("git://127.0.0.1:{}/repo.git", free_port());
    let run = netboot_env(
        &[
            "reconcile",
            "--once",
            "--metrics-addr",
            "off",
            "--repo",
            &url,
            "clusters/local.yaml",
        ],
        cache.path(),
        &[],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains(&format!("git {url}: fetch failed")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("nothing was applied"), "{}", run.stderr);
}

/// Tokens and passwords never reach stderr or stdout, whatever fails: a URL
/// that carries credentials is refused (pointing at --token-file) without
/// echoing them; a token from a file or the environment is scrubbed from a
/// failed connection's error.
#[test]
fn credentials_never_appear_in_output() {
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    let with_creds = format!("https://deploy:pa55w0rd-xyz@127.0.0.1:{port}/org/repo.git");
    let clean = format!("https://127.0.0.1:{port}/org/repo.git");
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "tok-FILE-123456\n").unwrap();
    for url in [&with_creds, &clean] {
        for (extra, env) in [
            (vec!["--token-file", token.path().to_str().unwrap()], vec![]),
            (vec![], vec![("NETBOOT_GIT_TOKEN", "tok-ENV-654321")]),
        ] {
            let mut args = vec!["apply", "--repo", url, "clusters/local.yaml", "-o", "json"];
            args.extend(extra);
            let run = netboot_env(&args, cache.path(), &env);
            assert_eq!(run.code, 2);
            let all = format!("{}{}", run.stdout, run.stderr);
            for secret in [
                "pa55w0rd-xyz",
                "deploy:",
                "tok-FILE-123456",
                "tok-ENV-654321",
            ] {
                assert!(!all.contains(secret), "{secret} leaked: {all}");
            }
            if url == &with_creds {
                assert!(
                    all.contains(&format!(
                        "git https://***@127.0.0.1:{port}/org/repo.git: credentials in the URL are refused"
                    )) && all.contains("--token-file"),
                    "{all}"
                );
            } else {
                assert!(all.contains(&format!("git {clean}: fetch failed")), "{all}");
            }
        }
    }
}

/// `http://` is refused before anything connects unless
/// --allow-insecure-http, and the message says why.
#[test]
fn plain_http_is_refused_without_the_flag_before_connecting() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let cache = tempfile::tempdir().unwrap();
    let url = format!("HTTP://127.0.0.1:{port}/repo.git");
    let run = netboot_env(
        &[
            "plan",
            "--repo",
            &url,
            "clusters/local.yaml",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        cache.path(),
        &[],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains(&format!(
            "git http://127.0.0.1:{port}/repo.git: http:// is refused"
        )) && run.stderr.contains("unencrypted")
            && run.stderr.contains("--allow-insecure-http"),
        "{}",
        run.stderr
    );
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing may connect"
    );
}

/// The limits' flags reach the fetch, and the error names the limit and the flag.
#[test]
fn a_fetch_over_its_size_limit_exits_2_naming_the_flag() {
    let repo = Repo::new();
    repo.commit(&[("clusters/local.yaml", &local_spec())], "local");
    let cache = tempfile::tempdir().unwrap();
    let run = netboot_env(
        &[
            "plan",
            "--repo",
            &repo.url(),
            "--fetch-max-bytes",
            "100",
            "clusters/local.yaml",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        cache.path(),
        &[],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("fetch stopped")
            && run
                .stderr
                .contains("over the limit of 100 bytes (--fetch-max-bytes)")
            && run.stderr.contains("nothing was applied"),
        "{}",
        run.stderr
    );
}

/// A tiny HTTP server on 127.0.0.1: answers every request with `respond`
/// (given the request head) and records the heads. The thread ends with the
/// test process.
fn http_server(
    respond: impl Fn(&str) -> String + Send + 'static,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            while let Ok(n) = reader.read_line(&mut head) {
                if n == 0 || head.ends_with("\r\n\r\n") {
                    break;
                }
            }
            let reply = respond(&head);
            log.lock().unwrap().push(head);
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    (port, seen)
}

fn has_authorization(heads: &[String]) -> bool {
    heads
        .iter()
        .any(|h| h.to_ascii_lowercase().contains("\nauthorization:"))
}

/// Credentials go only to the repository's own server: one that asks gets
/// the token; a redirect to another host (`localhost` instead of
/// `127.0.0.1`, both this machine) that asks gets nothing, and the error says so.
#[test]
fn a_redirect_to_another_host_gets_no_credentials() {
    const UNAUTHORIZED: &str = "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "tok-REDIRECT-777\n").unwrap();
    let fetch = |url: &str| {
        let cache = tempfile::tempdir().unwrap();
        netboot_env(
            &[
                "plan",
                "--repo",
                url,
                "--allow-insecure-http",
                "--token-file",
                token.path().to_str().unwrap(),
                "clusters/local.yaml",
                "--kubeconfig",
                "/nonexistent/kubeconfig",
            ],
            cache.path(),
            &[],
        )
    };

    // The repository's own server asks: it gets the token (and refuses it).
    let (own, own_seen) = http_server(|_| UNAUTHORIZED.to_string());
    let run = fetch(&format!("http://127.0.0.1:{own}/repo.git"));
    assert_eq!(run.code, 2);
    assert!(
        has_authorization(&own_seen.lock().unwrap()),
        "the repository's server must be offered the token: {:?}",
        own_seen.lock().unwrap()
    );
    assert!(
        run.stderr.contains("the server refused the credentials"),
        "{}",
        run.stderr
    );

    // A redirect to another host that asks: nothing is sent.
    let (other, other_seen) = http_server(|_| UNAUTHORIZED.to_string());
    let (origin, origin_seen) = http_server(move |head| {
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        format!(
            "HTTP/1.1 302 Found\r\nLocation: http://localhost:{other}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    });
    let run = fetch(&format!("http://127.0.0.1:{origin}/repo.git"));
    assert_eq!(run.code, 2);
    assert!(
        !other_seen.lock().unwrap().is_empty(),
        "the redirect must have been followed: {}",
        run.stderr
    );
    assert!(
        !has_authorization(&other_seen.lock().unwrap()),
        "{:?}",
        other_seen.lock().unwrap()
    );
    assert!(!has_authorization(&origin_seen.lock().unwrap()));
    assert!(
        run.stderr.contains(&format!(
            "the server `localhost` asked for credentials, but they are only given to `127.0.0.1` (port {origin})"
        )) && run.stderr.contains("none were sent"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("tok-REDIRECT-777"), "{}", run.stderr);
}

/// The CronJob's arguments, as rendered, parse and fetch: they only fail at
/// the in-cluster config, which a test process does not have.
#[test]
fn the_cronjob_args_match_the_cli() {
    let repo = Repo::new();
    let spec = format!(
        "{}  reconcile:\n    repo: {}\n    interval: 10m\n    secretName: netboot-git\n",
        local_spec(),
        repo.url()
    );
    repo.commit(&[("clusters/local.yaml", &spec)], "reconciled");
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("local.yaml"), &spec).unwrap();
    let out = netboot_env(
        &[
            "render",
            "-o",
            "json",
            dir.path().join("local.yaml").to_str().unwrap(),
        ],
        cache.path(),
        &[],
    )
    .json();
    let cronjob = out["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "CronJob")
        .expect("a CronJob");
    let args: Vec<String> = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        args,
        [
            "reconcile",
            "--once",
            "--metrics-addr",
            "off",
            "--in-cluster",
            "--repo",
            &repo.url(),
            "--ref",
            "main",
            "clusters/local.yaml"
        ]
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = netboot_env(
        &args,
        cache.path(),
        &[
            ("KUBERNETES_SERVICE_HOST", ""),
            ("KUBERNETES_SERVICE_PORT", ""),
        ],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains(&format!("source {} main at git:", repo.url())),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("in-cluster"), "{}", run.stderr);
}

// ---------------------------------------------------------------- git daemon and sshd

/// The plan reads the commit from a git daemon.
#[test]
fn fetches_over_the_git_protocol() {
    let repo = Repo::new();
    let sha = repo.commit(&[("clusters/local.yaml", &local_spec())], "local");
    let (_daemon, port) = git_daemon(repo.dir.path());
    // A plan only reads, but not while another test resets the cluster.
    let _g = serial();
    let _cross = cluster_lock();
    let c = rt().block_on(SharedCluster::get());
    let cache = tempfile::tempdir().unwrap();
    let url = format!("git://127.0.0.1:{port}/repo.git");
    let run = netboot_env(
        &[
            "plan",
            "-o",
            "json",
            "--repo",
            &url,
            "clusters/local.yaml",
            "--kubeconfig",
            c.kubeconfig.to_str().unwrap(),
        ],
        cache.path(),
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["revision"], format!("git:{sha}"));
    // The next fetch reuses the cache (one repository for the URL).
    let next = repo.commit(&[("README.md", "fleet\n")], "readme");
    let run = netboot_env(
        &[
            "plan",
            "-o",
            "json",
            "--repo",
            &url,
            "clusters/local.yaml",
            "--kubeconfig",
            c.kubeconfig.to_str().unwrap(),
        ],
        cache.path(),
        &[],
    );
    assert_eq!(run.json()["revision"], format!("git:{next}"));
    assert_eq!(
        std::fs::read_dir(cache.path().join("git"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .count(),
        1
    );
}

/// SSH: a host key listed in known_hosts lets the fetch through; an unknown
/// or changed one is refused naming the host and the fingerprint; no
/// known_hosts at all is refused too.
#[test]
fn ssh_verifies_the_host_key_against_known_hosts() {
    let repo = Repo::new();
    let sha = repo.commit(&[("clusters/local.yaml", &local_spec())], "local");
    let dir = tempfile::tempdir().unwrap();
    let server = sshd(dir.path());
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        user(),
        server.port,
        repo.bare().display()
    );
    let host = format!("[127.0.0.1]:{}", server.port);
    let host_key: Vec<&str> = server.host_pub.split_whitespace().collect();
    let fingerprint = {
        let out = Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(dir.path().join("host_key.pub"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let known = dir.path().join("known_hosts");
    let key = server.client_key.to_str().unwrap().to_string();
    // `--kubeconfig` that does not exist: the run fails right after the fetch, which is what is tested.
    let fetch = |known_hosts: Option<&Path>| {
        let cache = tempfile::tempdir().unwrap();
        let mut args = vec![
            "plan".to_string(),
            "--repo".into(),
            url.clone(),
            "clusters/local.yaml".into(),
            "--ssh-key".into(),
            key.clone(),
            "--kubeconfig".into(),
            "/nonexistent/kubeconfig".into(),
        ];
        if let Some(k) = known_hosts {
            args.extend(["--known-hosts".into(), k.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        netboot_env(&args, cache.path(), &[])
    };

    // Hit.
    std::fs::write(
        &known,
        format!("# test\n{host} {} {}\n", host_key[0], host_key[1]),
    )
    .unwrap();
    let run = fetch(Some(&known));
    assert!(
        run.stderr
            .contains(&format!("source: {url} main at git:{sha}")),
        "the fetch must succeed: {}\n--- sshd log\n{}",
        run.stderr,
        std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default()
    );
    // The same through $NETBOOT_GIT_CREDENTIALS (the CronJob's mounted Secret).
    let creds = tempfile::tempdir().unwrap();
    std::fs::copy(&known, creds.path().join("known_hosts")).unwrap();
    std::fs::copy(&server.client_key, creds.path().join("ssh-privatekey")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let run = netboot_env(
        &[
            "plan",
            "--repo",
            &url,
            "clusters/local.yaml",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        cache.path(),
        &[("NETBOOT_GIT_CREDENTIALS", creds.path().to_str().unwrap())],
    );
    assert!(
        run.stderr.contains(&format!("at git:{sha}")),
        "{}",
        run.stderr
    );

    // Miss: the host is not listed.
    std::fs::write(
        &known,
        format!("other.example {} {}\n", host_key[0], host_key[1]),
    )
    .unwrap();
    // An uppercase scheme is SSH too: verified, and refused here.
    let cache = tempfile::tempdir().unwrap();
    let upper = url.replacen("ssh://", "SSH://", 1);
    let run = netboot_env(
        &[
            "plan",
            "--repo",
            &upper,
            "clusters/local.yaml",
            "--ssh-key",
            &key,
            "--known-hosts",
            known.to_str().unwrap(),
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        cache.path(),
        &[],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains(&format!("host key of {host} is unknown")),
        "{}",
        run.stderr
    );
    let run = fetch(Some(&known));
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains(&format!("host key of {host} is unknown"))
            && run.stderr.contains(&fingerprint),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("source:"), "{}", run.stderr);

    // Changed: the host is listed with another key.
    let other = ssh_keygen(&dir.path().join("other_key"));
    let other: Vec<&str> = other.split_whitespace().collect();
    std::fs::write(&known, format!("{host} {} {}\n", other[0], other[1])).unwrap();
    let run = fetch(Some(&known));
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains(&format!("host key of {host} has CHANGED"))
            && run.stderr.contains(&format!("{}:1", known.display()))
            && run.stderr.contains(&fingerprint),
        "{}",
        run.stderr
    );

    // No known_hosts: refused before connecting.
    let run = fetch(None);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains(&format!("no known_hosts file to verify {host}'s host key")),
        "{}",
        run.stderr
    );
}

// ---------------------------------------------------------------- reconcile on the local cluster

fn kubeconfig(c: &SharedCluster) -> String {
    c.kubeconfig.to_str().unwrap().to_string()
}

fn reconcile_once(
    c: &SharedCluster,
    repo: &Repo,
    cache: &Path,
    specs: &[&str],
    extra: &[&str],
) -> (Run, Value) {
    let url = repo.url();
    let kc = kubeconfig(c);
    let mut args = vec![
        "reconcile",
        "--once",
        "-o",
        "json",
        "--metrics-addr",
        "off",
        "--repo",
        &url,
        "--kubeconfig",
        &kc,
    ];
    args.extend(extra);
    args.extend(specs);
    let run = netboot_env(&args, cache, &[]);
    let report = run.json();
    (run, report)
}

fn cluster_result<'a>(report: &'a Value, cluster: &str) -> &'a Value {
    report["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cluster"] == cluster)
        .unwrap_or_else(|| panic!("no result for {cluster}: {report:#}"))
}

fn drifted(result: &Value) -> Vec<String> {
    result["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["object"].as_str().unwrap().to_string())
        .collect()
}

async fn agent_config(c: &SharedCluster) -> String {
    Api::<ConfigMap>::namespaced(c.client.clone(), "netboot-system")
        .get("netboot-datapath-config")
        .await
        .unwrap()
        .data
        .unwrap()["config.yaml"]
        .clone()
}

async fn inventory_revision(c: &SharedCluster) -> String {
    Api::<ConfigMap>::namespaced(c.client.clone(), "netboot-system")
        .get("netboot-inventory")
        .await
        .unwrap()
        .data
        .unwrap()["revision"]
        .clone()
}

/// A new commit is applied on the next pass (a spec change, not drift); a
/// revert applies back; the pass after finds nothing to do.
#[test]
fn a_new_commit_is_applied_on_the_next_pass_and_a_revert_applies_back() {
    scenario(|c| async move {
        let repo = Repo::new();
        let first = repo.commit(&[("clusters/local.yaml", &local_spec())], "local");
        let cache = tempfile::tempdir().unwrap();

        let (run, report) = reconcile_once(&c, &repo, cache.path(), &["clusters/local.yaml"], &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(report["revision"], format!("git:{first}"));
        assert_eq!(cluster_result(&report, "local")["result"], "applied");
        assert_eq!(inventory_revision(&c).await, format!("git:{first}"));
        let (ds, _) = kube_proxy(&c.client).await;
        assert!(ds.is_none(), "replace mode: kube-proxy handed over");

        let changed = repo.commit(
            &[(
                "clusters/local.yaml",
                &local_spec().replace(
                    "sessionAffinityTimeoutSeconds: 10800",
                    "sessionAffinityTimeoutSeconds: 3600",
                ),
            )],
            "shorter affinity",
        );
        let (run, report) = reconcile_once(&c, &repo, cache.path(), &["clusters/local.yaml"], &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let r = cluster_result(&report, "local");
        assert_eq!(r["result"], "applied");
        assert_eq!(r["changes"], "2 configured, 12 unchanged", "{r:#}");
        assert!(drifted(r).is_empty(), "a commit is not drift: {r:#}");
        assert!(agent_config(&c)
            .await
            .contains("sessionAffinityTimeoutSeconds: 3600"));
        assert_eq!(inventory_revision(&c).await, format!("git:{changed}"));

        let reverted = repo.revert_last();
        let (run, report) = reconcile_once(&c, &repo, cache.path(), &["clusters/local.yaml"], &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(cluster_result(&report, "local")["result"], "applied");
        assert!(agent_config(&c)
            .await
            .contains("sessionAffinityTimeoutSeconds: 10800"));
        assert_eq!(inventory_revision(&c).await, format!("git:{reverted}"));

        // Nothing new: unchanged, and not one write.
        let mark = audit_len(&c);
        let (_, report) = reconcile_once(&c, &repo, cache.path(), &["clusters/local.yaml"], &[]);
        assert_eq!(cluster_result(&report, "local")["result"], "unchanged");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let writes = admin_writes_since(&c, mark);
        assert!(writes.is_empty(), "an unchanged pass wrote: {writes:#?}");
    });
}

/// kube-proxy re-created by hand while the spec replaces it: the next pass
/// removes it again and reports it as drift.
#[test]
fn kube_proxy_recreated_by_hand_is_removed_again_and_reported() {
    scenario(|c| async move {
        let repo = Repo::new();
        repo.commit(&[("clusters/local.yaml", &local_spec())], "local");
        let cache = tempfile::tempdir().unwrap();
        let (run, _) = reconcile_once(&c, &repo, cache.path(), &["clusters/local.yaml"], &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);

        recreate_kube_proxy(&c);
        let (run, report) = reconcile_once(&c, &repo, cache.path(), &["clusters/local.yaml"], &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let r = cluster_result(&report, "local");
        assert_eq!(r["result"], "applied");
        assert_eq!(
            drifted(r),
            [
                "DaemonSet/kube-system/kube-proxy",
                "ConfigMap/kube-system/kube-proxy"
            ]
        );
        assert!(run.stderr.contains("local: drift corrected at git:") && run.stderr.contains("DaemonSet/kube-system/kube-proxy (re-created by hand; the spec replaces kube-proxy)"), "{}", run.stderr);
        let (ds, cm) = kube_proxy(&c.client).await;
        assert!(
            ds.is_none() && cm.is_none(),
            "kube-proxy must be gone again"
        );
    });
}

/// `spec.reconcile.suspend`: a hand edit is reported as drift and left alone; nothing is written.
#[test]
fn a_suspended_cluster_reports_drift_and_writes_nothing() {
    scenario(|c| async move {
        let repo = Repo::new();
        repo.commit(&[("clusters/local.yaml", &local_spec())], "local");
        let cache = tempfile::tempdir().unwrap();
        let (run, _) = reconcile_once(&c, &repo, cache.path(), &["clusters/local.yaml"], &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let suspended = format!(
            "{}  reconcile:\n    repo: {}\n    suspend: true\n",
            local_spec(),
            repo.url()
        );
        repo.commit(&[("clusters/local.yaml", &suspended)], "suspend");
        let dss: Api<DaemonSet> = Api::namespaced(c.client.clone(), "netboot-system");
        let edit = json!({"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": 2}}}});
        dss.patch(
            "netboot-datapath",
            &PatchParams::default(),
            &Patch::Merge(&edit),
        )
        .await
        .unwrap();

        let mark = audit_len(&c);
        let (run, report) = reconcile_once(&c, &repo, cache.path(), &["clusters/local.yaml"], &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let r = cluster_result(&report, "local");
        assert_eq!(r["result"], "suspended");
        assert_eq!(drifted(r), ["DaemonSet/netboot-system/netboot-datapath"]);
        assert!(run.stderr.contains("local: drift (suspended, nothing written): DaemonSet/netboot-system/netboot-datapath (changed by hand)"), "{}", run.stderr);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let writes = admin_writes_since(&c, mark);
        assert!(writes.is_empty(), "a suspended pass wrote: {writes:#?}");
        let events: Api<Event> = Api::namespaced(c.client.clone(), "netboot-system");
        let detected: Vec<String> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("DriftDetected"))
            .filter_map(|e| e.message)
            .collect();
        assert!(
            detected
                .iter()
                .any(|m| m.contains("DaemonSet/netboot-system/netboot-datapath")),
            "a DriftDetected event names the drifted DaemonSet: {detected:?}"
        );
        let ds = dss.get("netboot-datapath").await.unwrap();
        assert_eq!(
            serde_json::to_value(&ds.spec.unwrap().update_strategy).unwrap()["rollingUpdate"]
                ["maxUnavailable"],
            2,
            "the hand edit stays while suspended"
        );
    });
}

/// Reads a child's output lines into a shared buffer (and echoes them).
fn collect(
    stream: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
    tx: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream)
            .lines()
            .map_while(std::result::Result::ok)
        {
            eprintln!("  | {line}");
            into.lock().unwrap().push(line.clone());
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    });
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// The running loop: the agent DaemonSet and its ConfigMap edited by hand are
/// put back on the next pass and reported (log, Event, metrics); SIGTERM
/// ends it with exit 0.
#[test]
fn the_loop_corrects_hand_edits_and_reports_them() {
    scenario(|c| async move {
        let repo = Repo::new();
        let sha = repo.commit(&[("clusters/local.yaml", &local_spec())], "local");
        let cache = tempfile::tempdir().unwrap();
        let mut reconciler = Daemon {
            what: "netboot reconcile",
            child: Command::new(env!("CARGO_BIN_EXE_netboot"))
                .args([
                    "reconcile",
                    "-o",
                    "json",
                    "--interval",
                    "2s",
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--repo",
                    &repo.url(),
                    "--kubeconfig",
                    &kubeconfig(&c),
                    "clusters/local.yaml",
                ])
                .current_dir(repo_root())
                .env_remove("KUBECONFIG")
                .env("NETBOOT_CACHE", cache.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        };
        let child = &mut reconciler.child;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, passes) = mpsc::channel();
        collect(
            child.stdout.take().unwrap(),
            Arc::new(Mutex::new(Vec::new())),
            Some(tx),
        );
        collect(child.stderr.take().unwrap(), log.clone(), None);
        let next_pass = |what: &str| -> Value {
            let line = passes
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|e| panic!("no pass ({what}): {e}"));
            serde_json::from_str(&line).unwrap()
        };
        let first = next_pass("first");
        assert_eq!(
            cluster_result(&first, "local")["result"],
            "applied",
            "{first:#}"
        );
        let port: u16 = {
            let found = || {
                log.lock()
                    .unwrap()
                    .iter()
                    .find(|l| l.contains("metrics on http://"))
                    .cloned()
            };
            let start = Instant::now();
            while found().is_none() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let l = found().expect("the metrics address in the log");
            l.split("127.0.0.1:")
                .nth(1)
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };

        // Hand edits: the rollout budget of the agents and their configuration.
        let dss: Api<DaemonSet> = Api::namespaced(c.client.clone(), "netboot-system");
        let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "netboot-system");
        dss.patch(
            "netboot-datapath",
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": 3}}}}),
            ),
        )
        .await
        .unwrap();
        let config = agent_config(&c).await;
        let edited = config.replace(
            "sessionAffinityTimeoutSeconds: 10800",
            "sessionAffinityTimeoutSeconds: 1",
        );
        assert_ne!(config, edited);
        cms.patch(
            "netboot-datapath-config",
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {"config.yaml": edited}})),
        )
        .await
        .unwrap();

        let start = Instant::now();
        let corrected = loop {
            let pass = next_pass("after the edits");
            let r = cluster_result(&pass, "local").clone();
            if !drifted(&r).is_empty() {
                break r;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no drift correction within 60s"
            );
        };
        assert_eq!(corrected["result"], "applied");
        assert_eq!(
            drifted(&corrected),
            [
                "ConfigMap/netboot-system/netboot-datapath-config",
                "DaemonSet/netboot-system/netboot-datapath"
            ]
        );
        assert_eq!(agent_config(&c).await, config, "the configuration is back");
        let ds = dss.get("netboot-datapath").await.unwrap();
        assert_eq!(
            serde_json::to_value(&ds.spec.unwrap().update_strategy).unwrap()["rollingUpdate"]
                ["maxUnavailable"],
            1
        );

        let text = scrape(port);
        eprintln!("--- /metrics\n{text}");
        assert_eq!(
            metric(&text, "netboot_drift_corrections_total{cluster=\"local\"}"),
            Some(2.0),
            "{text}"
        );
        assert!(
            metric(
                &text,
                "netboot_reconcile_results_total{cluster=\"local\",outcome=\"applied\"}"
            )
            .unwrap()
                >= 2.0,
            "{text}"
        );
        assert!(
            metric(
                &text,
                "netboot_last_success_timestamp_seconds{cluster=\"local\"}"
            )
            .unwrap()
                > 1.7e9,
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "netboot_source{{repo=\"{}\",ref=\"main\",revision=\"git:{sha}\"}} 1",
                repo.url()
            )),
            "{text}"
        );
        assert!(
            text.contains("netboot_reconcile_duration_seconds_count{cluster=\"local\"}"),
            "{text}"
        );
        {
            let lines = log.lock().unwrap();
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("local: drift corrected at git:")
                        && l.contains(
                            "DaemonSet/netboot-system/netboot-datapath (changed by hand)"
                        )),
                "{lines:#?}"
            );
        }
        let events: Api<Event> = Api::namespaced(c.client.clone(), "netboot-system");
        let drift_events: Vec<String> = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("DriftCorrected"))
            .filter_map(|e| e.message)
            .collect();
        assert!(
            drift_events
                .iter()
                .any(|m| m.contains("ConfigMap/netboot-system/netboot-datapath-config")),
            "{drift_events:?}"
        );

        // SIGTERM: the loop ends cleanly.
        // SAFETY: kill(2) on the PID of the child this test spawned.
        let rc = unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
        assert_eq!(rc, 0);
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("reconcile did not exit within 60s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
        assert!(log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("shutting down")));
    });
}

/// A fleet of three specs in one repository, one of them broken at this
/// commit. The local cluster is one cluster, so the three point at three
/// kubeconfig contexts of it: `local` is reconciled for real; `shadow` (its
/// own name and namespace) is suspended — two live specs on one cluster
/// would fight over kube-proxy and the nodes' BPF programs — so it plans and
/// reports without writing; `broken` fails its check. The broken one fails
/// alone: the other two finish their passes.
#[test]
fn a_fleet_with_a_broken_spec_still_reconciles_the_others() {
    scenario(|c| async move {
        // One kubeconfig, three contexts, one cluster.
        let kc: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&c.kubeconfig).unwrap()).unwrap();
        let mut kc = serde_json::to_value(kc).unwrap();
        let ctx = kc["contexts"][0]["context"].clone();
        kc["contexts"] = json!(["fleet-local", "fleet-shadow", "fleet-broken"]
            .iter()
            .map(|n| json!({"name": n, "context": ctx}))
            .collect::<Vec<_>>());
        kc["current-context"] = json!("fleet-local");
        let dir = tempfile::tempdir().unwrap();
        let fleet_kc = dir.path().join("kubeconfig");
        std::fs::write(&fleet_kc, serde_yaml::to_string(&kc).unwrap()).unwrap();

        let repo = Repo::new();
        let with_context = |spec: String, ctx: &str| {
            spec.replace("  cluster:\n", &format!("  cluster:\n    context: {ctx}\n"))
        };
        let local = with_context(local_spec(), "fleet-local");
        let shadow = format!(
            "{}  reconcile:\n    repo: {}\n    suspend: true\n",
            with_context(local_spec(), "fleet-shadow")
                .replace("name: local", "name: shadow")
                .replace("spec:\n", "spec:\n  namespace: netboot-shadow\n"),
            repo.url()
        );
        let broken = with_context(local_spec(), "fleet-broken")
            .replace("name: local", "name: broken")
            .replace("podCIDR: 10.244.0.0/16", "podCIDR: 10.96.0.0/12");
        let sha = repo.commit(
            &[
                ("clusters/local.yaml", &local),
                ("clusters/shadow.yaml", &shadow),
                ("clusters/broken.yaml", &broken),
            ],
            "fleet",
        );

        let cache = tempfile::tempdir().unwrap();
        let url = repo.url();
        let run = netboot_env(
            &[
                "reconcile",
                "--once",
                "--all",
                "-o",
                "json",
                "--metrics-addr",
                "off",
                "--repo",
                &url,
                "--kubeconfig",
                fleet_kc.to_str().unwrap(),
            ],
            cache.path(),
            &[],
        );
        assert_eq!(run.code, 2, "a failed member makes the pass fail");
        let report = run.json();
        assert_eq!(report["revision"], format!("git:{sha}"));
        let specs: Vec<&str> = report["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["spec"].as_str().unwrap())
            .collect();
        assert_eq!(
            specs,
            [
                "clusters/broken.yaml",
                "clusters/local.yaml",
                "clusters/shadow.yaml"
            ]
        );

        let broken = cluster_result(&report, "broken");
        assert_eq!(broken["result"], "failed");
        let error = broken["error"].as_str().unwrap();
        assert!(
            error.starts_with("clusters/broken.yaml:")
                && error.contains("spec.cluster.podCIDR")
                && error.contains("overlaps serviceCIDR"),
            "{error}"
        );
        assert!(
            broken["retryInSeconds"].as_u64().is_some(),
            "a failed cluster backs off: {broken:#}"
        );

        let local = cluster_result(&report, "local");
        assert_eq!(local["result"], "applied", "{local:#}");
        let (ds, _) = kube_proxy(&c.client).await;
        assert!(ds.is_none(), "local was reconciled: kube-proxy handed over");

        let shadow = cluster_result(&report, "shadow");
        assert_eq!(shadow["result"], "suspended", "{shadow:#}");
        assert!(
            shadow["changes"].as_str().unwrap().contains("created"),
            "shadow's plan: {shadow:#}"
        );
        let ns: Api<Namespace> = Api::all(c.client.clone());
        assert!(
            ns.get_opt("netboot-shadow").await.unwrap().is_none(),
            "a suspended spec writes nothing"
        );
    });
}

// ---------------------------------------------------------------- the CronJob's RBAC

const RECONCILER: &str = "system:serviceaccount:netboot-system:netboot-reconciler";

/// The admin kubeconfig, acting as the reconciler's ServiceAccount (what the
/// CronJob's pod is), with the groups a ServiceAccount token carries.
fn impersonating_kubeconfig(c: &SharedCluster, dir: &Path) -> String {
    let mut kc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&c.kubeconfig).unwrap()).unwrap();
    for u in kc["users"].as_sequence_mut().unwrap() {
        let user = u["user"].as_mapping_mut().unwrap();
        user.insert("as".into(), RECONCILER.into());
        user.insert(
            "as-groups".into(),
            serde_yaml::to_value([
                "system:serviceaccounts",
                "system:serviceaccounts:netboot-system",
                "system:authenticated",
            ])
            .unwrap(),
        );
    }
    let path = dir.join("reconciler.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    path.to_str().unwrap().to_string()
}

/// Writes made as the reconciler's ServiceAccount since `from` in the audit log.
fn reconciler_writes_since(c: &SharedCluster, from: u64) -> Vec<String> {
    audit_writes_since(c, from)
        .iter()
        .filter(|e| e["impersonatedUser"]["username"] == RECONCILER)
        .map(|e| format!("{} {}", e["responseStatus"]["code"], audit_line(e)))
        .collect()
}

/// The CronJob's ServiceAccount, with exactly the RBAC netboot renders for it,
/// can do the whole job: hand kube-proxy over (backup, delete, rules cleared,
/// validation probes and their cleanup) and restore it. The first install is
/// an admin's (it creates the account); every later pass runs as the account.
#[test]
fn the_reconciler_service_account_can_hand_over_and_restore_kube_proxy() {
    scenario(|c| async move {
        let repo = Repo::new();
        let with_reconcile =
            |spec: String| format!("{spec}  reconcile:\n    repo: {}\n", repo.url());
        let coexist = with_reconcile(
            local_spec().replace("kubeProxyReplacement: true", "kubeProxyReplacement: false"),
        );
        let replace = with_reconcile(local_spec());
        repo.commit(
            &[("clusters/local.yaml", &coexist)],
            "coexist, with a reconciler",
        );
        let cache = tempfile::tempdir().unwrap();
        let (run, _) = reconcile_once(&c, &repo, cache.path(), &["clusters/local.yaml"], &[]);
        assert_eq!(run.code, 0, "the admin's first install: {}", run.stderr);

        let kc = impersonating_kubeconfig(&c, cache.path());
        let url = repo.url();
        let as_reconciler = || {
            let args = [
                "reconcile",
                "--once",
                "-o",
                "json",
                "--metrics-addr",
                "off",
                "--repo",
                &url,
                "--kubeconfig",
                &kc,
                "clusters/local.yaml",
            ];
            let run = netboot_env(&args, cache.path(), &[]);
            let report = run.json();
            (run, report)
        };

        repo.commit(&[("clusters/local.yaml", &replace)], "replace kube-proxy");
        let mark = audit_len(&c);
        let (run, report) = as_reconciler();
        assert_eq!(run.code, 0, "handover as the reconciler: {}", run.stderr);
        assert_eq!(
            cluster_result(&report, "local")["result"],
            "applied",
            "{report:#}"
        );
        assert!(
            kube_proxy(&c.client).await.0.is_none(),
            "kube-proxy handed over"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let writes = reconciler_writes_since(&c, mark);
        assert!(
            writes
                .iter()
                .any(|w| w
                    .contains("delete /apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy")),
            "the handover's writes were made as the reconciler: {writes:#?}"
        );
        let denied: Vec<&String> = writes.iter().filter(|w| w.starts_with("403")).collect();
        assert!(denied.is_empty(), "denied: {denied:#?}");

        repo.commit(&[("clusters/local.yaml", &coexist)], "back to coexist");
        let (run, report) = as_reconciler();
        assert_eq!(run.code, 0, "restore as the reconciler: {}", run.stderr);
        assert_eq!(
            cluster_result(&report, "local")["result"],
            "applied",
            "{report:#}"
        );
        let (ds, cm) = kube_proxy(&c.client).await;
        assert!(
            ds.is_some() && cm.is_some(),
            "kube-proxy restored from the backup"
        );
    });
}
