//! The Kubernetes client: credentials from the kubeconfig or the in-cluster
//! service account, but the server address ALWAYS from `apiServer` in
//! config.yaml, so the agent never depends on a ClusterIP (which it serves).

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Errors of building the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig could not be read.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// In-cluster credentials are missing.
    #[error("in-cluster service account: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    /// The API URL does not parse.
    #[error("apiServer URL {url}: {message}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The client could not be created.
    #[error("kube client: {0}")]
    Client(#[source] kube::Error),
}

/// Builds the kube config with the server replaced by `api_url`.
pub async fn config(kubeconfig: Option<&Path>, api_url: &str) -> Result<kube::Config, ClientError> {
    let mut cfg = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).map_err(|source| ClientError::Kubeconfig {
                path: p.display().to_string(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: p.display().to_string(),
                    source,
                })?
        }
        // The DNS variant needs no KUBERNETES_SERVICE_* env (a ClusterIP); the URL is replaced anyway.
        None => kube::Config::incluster_dns().map_err(ClientError::InCluster)?,
    };
    cfg.cluster_url =
        api_url
            .parse()
            .map_err(|e: http_uri_error::InvalidUri| ClientError::Url {
                url: api_url.into(),
                message: e.to_string(),
            })?;
    Ok(cfg)
}

/// Builds the client (see [`config`]).
pub async fn build(kubeconfig: Option<&Path>, api_url: &str) -> Result<kube::Client, ClientError> {
    let cfg = config(kubeconfig, api_url).await?;
    kube::Client::try_from(cfg).map_err(ClientError::Client)
}

mod http_uri_error {
    pub use hyper::http::uri::InvalidUri;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn server_is_replaced_by_api_server() {
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: 'https://10.96.0.1:443', insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
",
        )
        .unwrap();
        let cfg = config(Some(&kc), "https://127.0.0.1:6443").await.unwrap();
        assert_eq!(cfg.cluster_url.to_string(), "https://127.0.0.1:6443/");
    }
}
