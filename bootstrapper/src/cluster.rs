//! Connecting to the cluster: a kubeconfig (file and context, as kubectl
//! takes them) or the pod's service account.

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Where the cluster is. `Default` follows `$KUBECONFIG` and its current context.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// A kubeconfig file; default `$KUBECONFIG`, then `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// A context in it; default the current context (or the spec's `cluster.context`).
    pub context: Option<String>,
    /// Use the pod's service account instead of a kubeconfig.
    pub in_cluster: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("kubeconfig {path} ({from})")]
    Kubeconfig {
        path: String,
        /// Where the path came from: `--kubeconfig`, `$KUBECONFIG` or the default.
        from: &'static str,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no kubeconfig found: looked at --kubeconfig (not given), $KUBECONFIG (not set), \
         {default} (does not exist) and in-cluster credentials (--in-cluster not given); \
         pass --kubeconfig FILE, set KUBECONFIG=FILE, or run in a pod with --in-cluster"
    )]
    NotFound { default: String },
    #[error("in-cluster configuration")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("API server {server} unreachable")]
    Unreachable {
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error("building the client for {server}")]
    Client {
        server: String,
        #[source]
        source: kube::Error,
    },
}

/// A connected client and the server URL it talks to.
#[derive(Clone)]
pub struct Connection {
    pub client: Client,
    pub config: Config,
}

impl Connection {
    pub fn server(&self) -> String {
        self.config.cluster_url.to_string()
    }
}

/// Connects as kubectl does: `--kubeconfig`, else `$KUBECONFIG` (a
/// colon-separated list, merged), else `~/.kube/config`; `--in-cluster` uses
/// the pod's service account instead.
pub async fn connect(target: &Target) -> Result<Connection, ConnectError> {
    let config = if target.in_cluster {
        Config::incluster()?
    } else {
        kubeconfig_config(target).await?
    };
    let conn = client_for(config)?;
    // One read before anything else, so an unreachable server is named as
    // such (kubectl: "the connection to the server … was refused"), not as
    // the first object some later step happened to read.
    if let Err(source) = conn.client.apiserver_version().await {
        return Err(ConnectError::Unreachable {
            server: conn.server(),
            source,
        });
    }
    Ok(conn)
}

async fn kubeconfig_config(target: &Target) -> Result<Config, ConnectError> {
    let options = KubeConfigOptions {
        context: target.context.clone(),
        ..Default::default()
    };
    let (kubeconfig, path, from) = read_kubeconfig(target)?;
    Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|source| ConnectError::Kubeconfig { path, from, source })
}

/// The kubeconfig kubectl would read, the path(s) it came from and how they were chosen.
fn read_kubeconfig(target: &Target) -> Result<(Kubeconfig, String, &'static str), ConnectError> {
    let read = |path: &Path, from: &'static str| {
        Kubeconfig::read_from(path).map_err(|source| ConnectError::Kubeconfig {
            path: path.display().to_string(),
            from,
            source,
        })
    };
    if let Some(path) = &target.kubeconfig {
        return Ok((
            read(path, "--kubeconfig")?,
            path.display().to_string(),
            "--kubeconfig",
        ));
    }
    if let Some(list) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        let from = "$KUBECONFIG";
        let mut merged: Option<Kubeconfig> = None;
        for path in std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()) {
            let kc = read(&path, from)?;
            merged = Some(match merged {
                None => kc,
                Some(m) => m.merge(kc).map_err(|source| ConnectError::Kubeconfig {
                    path: path.display().to_string(),
                    from,
                    source,
                })?,
            });
        }
        let shown = list.to_string_lossy().into_owned();
        if let Some(kc) = merged {
            return Ok((kc, shown, from));
        }
    }
    let default = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".kube/config"))
        .unwrap_or_else(|| PathBuf::from("~/.kube/config"));
    if default.exists() {
        return Ok((
            read(&default, "default")?,
            default.display().to_string(),
            "default",
        ));
    }
    Err(ConnectError::NotFound {
        default: default.display().to_string(),
    })
}

/// A client for a config (a copy with another server URL, for instance).
pub fn client_for(config: Config) -> Result<Connection, ConnectError> {
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config.clone())
        .map_err(|source| ConnectError::Client { server, source })?;
    Ok(Connection { client, config })
}
