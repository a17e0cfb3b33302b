#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

/// A work repository to commit into, with `origin`'s URL.
struct Upstream {
    dir: tempfile::TempDir,
    repo: Repository,
}

impl Upstream {
    fn new() -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init_opts(
            dir.path(),
            git2::RepositoryInitOptions::new().initial_head("main"),
        )
        .unwrap();
        Upstream { dir, repo }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    /// Writes `files` (path, content; None deletes) and commits them on HEAD.
    fn commit(&self, files: &[(&str, Option<&str>)], message: &str) -> Oid {
        let mut index = self.repo.index().unwrap();
        for (path, content) in files {
            let full = self.dir.path().join(path);
            match content {
                Some(c) => {
                    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                    std::fs::write(&full, c).unwrap();
                    index.add_path(Path::new(path)).unwrap();
                }
                None => {
                    std::fs::remove_file(&full).unwrap();
                    index.remove_path(Path::new(path)).unwrap();
                }
            }
        }
        index.write().unwrap();
        let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.invalid").unwrap();
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        self.repo
            .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
            .unwrap()
    }
}

const SPEC: &str = "apiVersion: netboot.io/v1alpha1\nkind: ClusterNetwork\nmetadata:\n  name: a\nspec:\n  cluster:\n    serviceCIDR: 10.96.0.0/16\n    podCIDR: 10.244.0.0/16\n";

fn opts(url: String, git_ref: &str, cache: &Path) -> SourceOptions {
    SourceOptions {
        url,
        git_ref: git_ref.into(),
        cache_dir: cache.to_path_buf(),
        ..SourceOptions::default()
    }
}

#[test]
fn resolves_branches_tags_and_commits_and_names_what_exists() {
    let up = Upstream::new();
    let first = up.commit(&[("clusters/a.yaml", Some(SPEC))], "one");
    up.repo
        .tag_lightweight("v1", &up.repo.find_object(first, None).unwrap(), false)
        .unwrap();
    let second = up.commit(
        &[("clusters/a.yaml", Some(&SPEC.replace("name: a", "name: b")))],
        "two",
    );
    let cache = tempfile::tempdir().unwrap();
    let at = |r: &str| fetch(&opts(up.url(), r, cache.path())).map(|s| s.commit);
    assert_eq!(at("main").unwrap(), second.to_string());
    assert_eq!(at("refs/heads/main").unwrap(), second.to_string());
    assert_eq!(at("v1").unwrap(), first.to_string());
    assert_eq!(at(&first.to_string()).unwrap(), first.to_string());
    assert_eq!(at(&first.to_string()[..8]).unwrap(), first.to_string());
    let e = at("nope").unwrap_err().to_string();
    assert!(
        e.contains("ref `nope` not found") && e.contains("branches: main; tags: v1"),
        "{e}"
    );
    let snap = fetch(&opts(up.url(), "v1", cache.path())).unwrap();
    assert_eq!(snap.revision(), format!("git:{first}"));
    assert_eq!(snap.load_spec("clusters/a.yaml").unwrap().name, "a");
    assert_eq!(snap.cluster_specs(), ["clusters/a.yaml"]);
    assert!(snap.templates().is_none());
}

#[test]
fn fetches_incrementally_into_one_cache_and_prunes_deleted_branches() {
    let up = Upstream::new();
    up.commit(&[("clusters/a.yaml", Some(SPEC))], "one");
    let head = up.repo.head().unwrap().peel_to_commit().unwrap();
    up.repo.branch("feature", &head, false).unwrap();
    let cache = tempfile::tempdir().unwrap();
    fetch(&opts(up.url(), "feature", cache.path())).unwrap();
    let entries: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(entries.len(), 1, "one bare repository per URL");
    let repo_dir = entries[0].path();
    assert_eq!(
        repo_dir.file_name().unwrap().to_str().unwrap(),
        hex(&Sha256::digest(up.url().as_bytes()))
    );
    // A marker in the cache survives the next fetch: it is fetched into, not cloned again.
    std::fs::write(repo_dir.join("marker"), "x").unwrap();
    let next = up.commit(
        &[
            ("clusters/b.yaml", Some(&SPEC.replace("name: a", "name: b"))),
            ("templates/extra.yaml.hbs", Some("# extra\n")),
        ],
        "two",
    );
    let snap = fetch(&opts(up.url(), "main", cache.path())).unwrap();
    assert_eq!(snap.commit, next.to_string());
    assert!(repo_dir.join("marker").exists());
    assert_eq!(snap.cluster_specs(), ["clusters/a.yaml", "clusters/b.yaml"]);
    assert_eq!(snap.templates(), Some(snap.root().join("templates")));
    // A deleted branch no longer resolves.
    up.repo
        .find_branch("feature", git2::BranchType::Local)
        .unwrap()
        .delete()
        .unwrap();
    let e = fetch(&opts(up.url(), "feature", cache.path())).unwrap_err();
    assert!(matches!(e, SourceError::UnknownRef { .. }), "{e}");
}

#[test]
fn a_spec_is_named_by_its_path_in_the_repository() {
    let up = Upstream::new();
    up.commit(
        &[(
            "clusters/bad.yaml",
            Some(&SPEC.replace("podCIDR", "podCidr")),
        )],
        "bad",
    );
    let cache = tempfile::tempdir().unwrap();
    let snap = fetch(&opts(up.url(), "main", cache.path())).unwrap();
    let e = snap.load_spec("clusters/bad.yaml").unwrap_err().to_string();
    assert!(
        e.starts_with("clusters/bad.yaml:8:5: spec.cluster.podCidr: unknown field"),
        "{e}"
    );
    assert!(e.contains(&format!(
        "the spec at {}; nothing was applied",
        snap.revision()
    )));
    let e = snap.load_spec("../etc/passwd").unwrap_err().to_string();
    assert!(e.contains("must be a path inside the repository"), "{e}");
    let e = snap
        .load_spec("clusters/none.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("clusters/none.yaml: no such file in file://"),
        "{e}"
    );
}

#[test]
fn an_unreachable_repository_is_an_error_naming_it() {
    let cache = tempfile::tempdir().unwrap();
    let e = fetch(&opts(
        "file:///nonexistent/repo.git".into(),
        "main",
        cache.path(),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("git file:///nonexistent/repo.git: fetch failed"),
        "{e}"
    );
}

#[test]
fn ssh_without_known_hosts_is_refused_before_connecting() {
    let cache = tempfile::tempdir().unwrap();
    // Port 9 on loopback: nothing is contacted anyway.
    let e = fetch(&opts(
        "ssh://git@127.0.0.1:9/repo.git".into(),
        "main",
        cache.path(),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no known_hosts file to verify [127.0.0.1]:9's host key"),
        "{e}"
    );
}

#[test]
fn credentials_never_appear_in_messages() {
    assert_eq!(
        redact_url("https://user:s3cr3t@git.example/r.git"),
        "https://***@git.example/r.git"
    );
    assert_eq!(
        redact_url("https://tok3n@git.example/r.git"),
        "https://***@git.example/r.git"
    );
    assert_eq!(
        redact_url("ssh://git:pw@git.example:22/r.git"),
        "ssh://git:***@git.example:22/r.git"
    );
    assert_eq!(redact_url("git@git.example:r.git"), "git@git.example:r.git");
    let url = "https://user:s3cr3t@127.0.0.1:1/r.git";
    let m = scrub(
        &format!("failed to connect to {url}: user s3cr3t tok-123"),
        url,
        Some(&Secret::new("tok-123")),
    );
    assert!(
        !m.contains("s3cr3t") && !m.contains("tok-123") && !m.contains("user:"),
        "{m}"
    );
    assert_eq!(format!("{:?}", Secret::new("tok-123")), "***");
}

/// A branch or tag named like a commit's full SHA must not redirect a
/// pinned ref to another commit: 40 hex digits are always the commit.
#[test]
fn a_full_sha_is_the_commit_even_when_a_branch_or_tag_is_named_like_it() {
    let up = Upstream::new();
    let pinned = up.commit(&[("clusters/a.yaml", Some(SPEC))], "pinned");
    let other = up.commit(
        &[(
            "clusters/a.yaml",
            Some(&SPEC.replace("name: a", "name: evil")),
        )],
        "other",
    );
    let other_commit = up.repo.find_commit(other).unwrap();
    up.repo
        .branch(&pinned.to_string(), &other_commit, false)
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let snap = fetch(&opts(up.url(), &pinned.to_string(), cache.path())).unwrap();
    assert_eq!(snap.commit, pinned.to_string());
    assert_eq!(snap.load_spec("clusters/a.yaml").unwrap().name, "a");
    // The same with a tag of that name (and the branch gone).
    up.repo
        .find_branch(&pinned.to_string(), git2::BranchType::Local)
        .unwrap()
        .delete()
        .unwrap();
    up.repo
        .tag_lightweight(&pinned.to_string(), other_commit.as_object(), false)
        .unwrap();
    let snap = fetch(&opts(up.url(), &pinned.to_string(), cache.path())).unwrap();
    assert_eq!(snap.commit, pinned.to_string());
    // The branch is still reachable by its full ref name.
    up.repo
        .branch(&pinned.to_string(), &other_commit, false)
        .unwrap();
    let snap = fetch(&opts(
        up.url(),
        &format!("refs/heads/{pinned}"),
        cache.path(),
    ))
    .unwrap();
    assert_eq!(snap.commit, other.to_string());
    // A full SHA that is no commit of the repository is unknown, whatever the branches are named.
    let missing = "0123456789abcdef0123456789abcdef01234567";
    up.repo.branch(missing, &other_commit, false).unwrap();
    let e = fetch(&opts(up.url(), missing, cache.path())).unwrap_err();
    assert!(
        matches!(e, SourceError::UnknownRef { .. }) && e.to_string().contains("a full commit SHA"),
        "{e}"
    );
}

#[test]
fn ssh_in_any_case_and_scp_like_urls_need_known_hosts() {
    let cache = tempfile::tempdir().unwrap();
    // Refused before anything connects (port 9 on loopback: nothing is contacted anyway).
    for url in [
        "SSH://git@127.0.0.1:9/repo.git",
        "Git+Ssh://git@127.0.0.1:9/repo.git",
        "git@127.0.0.1:repo.git",
    ] {
        let e = fetch(&opts(url.into(), "main", cache.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no known_hosts file to verify"), "{url}: {e}");
    }
}

#[test]
fn plain_http_and_credentials_in_the_url_are_refused_before_connecting() {
    let cache = tempfile::tempdir().unwrap();
    let e = fetch(&opts(
        "HTTP://127.0.0.1:9/repo.git".into(),
        "main",
        cache.path(),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("git http://127.0.0.1:9/repo.git: http:// is refused")
            && e.contains("--allow-insecure-http"),
        "{e}"
    );
    for url in [
        "https://deploy:s3cr3t@127.0.0.1:9/repo.git",
        "https://ghp_s3cr3t@127.0.0.1:9/repo.git",
    ] {
        let mut o = opts(url.into(), "main", cache.path());
        o.allow_insecure_http = true;
        let e = fetch(&o).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, SourceError::Url { .. }), "{m}");
        assert!(
            m.contains("credentials in the URL are refused") && m.contains("--token-file"),
            "{m}"
        );
        assert!(!m.contains("s3cr3t"), "{m}");
    }
}

/// Each limit stops a fetch (file://, where the pack is built locally) with
/// a message naming the limit and its flag; nothing is left resolvable.
#[test]
fn a_fetch_over_a_limit_is_stopped_naming_the_limit_and_its_flag() {
    let up = Upstream::new();
    // 64 KiB that do not compress (a pack of it is well over 1 KiB).
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let big: String = (0..(64 << 10) / 16)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{x:016x}")
        })
        .collect();
    up.commit(
        &[("clusters/a.yaml", Some(SPEC)), ("big.txt", Some(&big))],
        "one",
    );
    let cases = [
        (
            FetchLimits {
                max_bytes: 1024,
                ..FetchLimits::default()
            },
            "over the limit of 1024 bytes (--fetch-max-bytes)",
        ),
        (
            FetchLimits {
                max_objects: 2,
                ..FetchLimits::default()
            },
            "over the limit of 2 (--fetch-max-objects)",
        ),
        (
            FetchLimits {
                timeout: Duration::ZERO,
                ..FetchLimits::default()
            },
            "over the limit of 0s (--fetch-timeout)",
        ),
    ];
    for (limits, want) in cases {
        let cache = tempfile::tempdir().unwrap();
        let mut o = opts(up.url(), "main", cache.path());
        o.limits = limits;
        let e = fetch(&o).unwrap_err();
        assert!(
            matches!(e, SourceError::Limit { .. }) && e.to_string().contains(want),
            "{want}: {e}"
        );
        o.limits = FetchLimits::default();
        fetch(&o).unwrap();
    }
}

#[test]
fn limits_are_checked_in_order() {
    let l = FetchLimits {
        max_bytes: 100,
        max_objects: 10,
        timeout: Duration::from_secs(60),
    };
    let s = Duration::from_secs;
    assert_eq!(l.exceeded(100, 10, s(59)), None);
    assert!(l
        .exceeded(101, 10, s(1))
        .unwrap()
        .contains("101 bytes received"));
    assert!(l
        .exceeded(0, 11, s(1))
        .unwrap()
        .contains("the pack has 11 objects"));
    assert!(l.exceeded(0, 0, s(60)).unwrap().contains("--fetch-timeout"));
}
