//! Connecting to the cluster: a kubeconfig (file and context, as kubectl
//! takes them) or the pod's service account.

use std::path::PathBuf;

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
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster configuration: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("kubeconfig: {0}")]
    Infer(#[from] kube::config::KubeconfigError),
    #[error("building the client for {server}: {source}")]
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

pub async fn connect(target: &Target) -> Result<Connection, ConnectError> {
    let config = if target.in_cluster {
        Config::incluster()?
    } else {
        let options = KubeConfigOptions {
            context: target.context.clone(),
            ..Default::default()
        };
        let path = target
            .kubeconfig
            .clone()
            .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from));
        match path {
            Some(path) => {
                let name = path.display().to_string();
                let kc =
                    Kubeconfig::read_from(&path).map_err(|source| ConnectError::Kubeconfig {
                        path: name.clone(),
                        source,
                    })?;
                Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .map_err(|source| ConnectError::Kubeconfig { path: name, source })?
            }
            None => Config::from_kubeconfig(&options).await?,
        }
    };
    client_for(config)
}

/// A client for a config (a copy with another server URL, for instance).
pub fn client_for(config: Config) -> Result<Connection, ConnectError> {
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config.clone())
        .map_err(|source| ConnectError::Client { server, source })?;
    Ok(Connection { client, config })
}
