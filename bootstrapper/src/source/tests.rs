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
        auth: Auth::default(),
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

#[test]
fn transports() {
    assert_eq!(
        transport("ssh://git@h:2222/r.git"),
        Transport::Ssh {
            host: "h".into(),
            port: 2222
        }
    );
    assert_eq!(
        transport("ssh://[::1]:2222/r.git"),
        Transport::Ssh {
            host: "::1".into(),
            port: 2222
        }
    );
    assert_eq!(
        transport("git@github.example:o/r.git"),
        Transport::Ssh {
            host: "github.example".into(),
            port: 22
        }
    );
    assert_eq!(transport("https://h/r.git"), Transport::Http);
    assert_eq!(transport("/srv/r.git"), Transport::Other);
    assert_eq!(transport("file:///srv/r.git"), Transport::Other);
    assert_eq!(transport("git://127.0.0.1:9418/r.git"), Transport::Other);
}
