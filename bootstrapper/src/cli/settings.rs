//! Arguments plus the spec, resolved once into the library's settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use netboot::cluster::{self, Connection, Target};
use netboot::converge::Settings;
use netboot::reconcile::{ReconcileOptions, Targets};
use netboot::render::{hex, RenderOptions};
use netboot::source::{self, Auth, FetchLimits, Secret, Snapshot, SourceOptions, Token};
use netboot::spec;
use sha2::{Digest, Sha256};

use super::args::{ApplyArgs, ClusterArgs, ReconcileArgs, SourceArgs};

/// Directory of mounted git credentials (the CronJob's Secret): `known_hosts`,
/// `ssh-privatekey` (or `identity`), `token`.
const CREDENTIALS_ENV: &str = "NETBOOT_GIT_CREDENTIALS";
/// An HTTPS token itself.
const TOKEN_ENV: &str = "NETBOOT_GIT_TOKEN";

/// The git source, when `--repo` is given: flags first, then the environment.
pub fn source_options(args: &SourceArgs) -> Option<SourceOptions> {
    let url = args.repo.clone()?;
    let creds = std::env::var_os(CREDENTIALS_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let in_creds = |names: &[&str]| -> Option<PathBuf> {
        let dir = creds.as_ref()?;
        names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
    };
    let token = match (&args.token_file, std::env::var(TOKEN_ENV)) {
        (Some(f), _) => Some(Token::File(f.clone())),
        (None, Ok(t)) if !t.is_empty() => Some(Token::Value(Secret::new(t))),
        _ => in_creds(&["token"]).map(Token::File),
    };
    Some(SourceOptions {
        url,
        git_ref: args.git_ref.clone(),
        cache_dir: source::default_cache_dir(),
        auth: Auth {
            known_hosts: args
                .known_hosts
                .clone()
                .or_else(|| in_creds(&["known_hosts"])),
            ssh_key: args
                .ssh_key
                .clone()
                .or_else(|| in_creds(&["ssh-privatekey", "identity"])),
            token,
        },
        allow_insecure_http: args.allow_insecure_http,
        limits: FetchLimits {
            max_bytes: args.fetch_max_bytes,
            max_objects: args.fetch_max_objects,
            timeout: args.fetch_timeout,
        },
    })
}

/// Fetches the source off the async threads; says which commit it got.
pub async fn fetch(opts: &SourceOptions) -> anyhow::Result<Snapshot> {
    let o = opts.clone();
    let snap = tokio::task::spawn_blocking(move || source::fetch(&o))
        .await
        .context("the git fetch task")?
        .map_err(|e| anyhow::anyhow!("{e}; nothing was applied"))?;
    eprintln!(
        "source: {} {} at {}",
        snap.url,
        snap.git_ref,
        snap.revision()
    );
    Ok(snap)
}

/// Settings, the connection, and the git snapshot the spec and templates
/// come from (kept until the command ends: the templates are read from it).
pub async fn resolve(args: &ApplyArgs) -> anyhow::Result<(Settings, Connection, Option<Snapshot>)> {
    let file = args.spec.display().to_string();
    let (spec, revision, templates, snapshot) = match source_options(&args.source) {
        Some(opts) => {
            if args.templates.dir.is_some() {
                anyhow::bail!(
                    "--templates (or NETBOOT_TEMPLATES) and --repo: with --repo the templates come from the repository's templates/; drop one"
                );
            }
            let snap = fetch(&opts).await?;
            let spec = snap.load_spec(&file)?;
            (spec, snap.revision(), snap.templates(), Some(snap))
        }
        None => {
            let spec = spec::load(&args.spec)?;
            (
                spec,
                file_revision(&args.spec, &file)?,
                args.templates.dir.clone(),
                None,
            )
        }
    };
    let conn = connect(&args.cluster, &spec, &file).await?;
    let settings = Settings {
        spec,
        spec_file: file,
        revision,
        render: RenderOptions {
            templates,
            api_server: None,
        },
        force: args.force,
        lock_wait: Duration::from_secs(args.lock_timeout),
        probe_image: args.probe_image.clone(),
        retry: args.retry,
        skip_validation: args.skip_validation,
        host_network_probes: true,
        // The CLI's progress goes to stderr; results go to stdout.
        progress: netboot::converge::Progress(std::sync::Arc::new(|line: &str| {
            eprintln!("{line}")
        })),
    };
    Ok((settings, conn, snapshot))
}

/// Connects to the spec's cluster: the flags first, then the spec's
/// `cluster.context` / `cluster.inCluster`.
async fn connect(
    cluster: &ClusterArgs,
    spec: &spec::ClusterNetwork,
    file: &str,
) -> anyhow::Result<Connection> {
    let target = Target {
        kubeconfig: cluster.kubeconfig.clone(),
        context: cluster
            .context
            .clone()
            .or_else(|| spec.cluster.context.clone()),
        in_cluster: cluster.in_cluster || spec.cluster.in_cluster,
    };
    cluster::connect(&target)
        .await
        .with_context(|| format!("{file}: connecting to cluster {}", spec.name))
}

/// The spec (a file, or from `--repo`) and its cluster, for commands that
/// only read the cluster and need no templates (`flows`).
pub async fn spec_and_connection(
    path: &Path,
    source: &SourceArgs,
    cluster: &ClusterArgs,
) -> anyhow::Result<(spec::ClusterNetwork, Connection)> {
    let file = path.display().to_string();
    let spec = match source_options(source) {
        Some(opts) => fetch(&opts).await?.load_spec(&file)?,
        None => spec::load(path)?,
    };
    let conn = connect(cluster, &spec, &file).await?;
    Ok((spec, conn))
}

fn file_revision(path: &Path, file: &str) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{file}: read"))?;
    Ok(format!(
        "file:sha256:{}",
        &hex(&Sha256::digest(&bytes))[..12]
    ))
}

/// `netboot reconcile`'s options.
pub fn reconcile(args: &ReconcileArgs) -> anyhow::Result<ReconcileOptions> {
    let source = source_options(&args.source)
        .context("reconcile needs --repo URL: the desired state comes from git")?;
    Ok(ReconcileOptions {
        source,
        targets: if args.all {
            Targets::All
        } else {
            Targets::Specs(args.specs.clone())
        },
        interval: args.interval,
        cluster: Target {
            kubeconfig: args.cluster.kubeconfig.clone(),
            context: args.cluster.context.clone(),
            in_cluster: args.cluster.in_cluster,
        },
        force: args.force,
        lock_wait: Duration::from_secs(args.lock_timeout),
        probe_image: args.probe_image.clone(),
        skip_validation: args.skip_validation,
        ..ReconcileOptions::default()
    })
}
