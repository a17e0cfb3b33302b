//! The reconciler's Prometheus metrics and the small HTTP server that serves
//! them (`GET /metrics` in the OpenMetrics text format, `GET /healthz`).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub cluster: String,
    /// `unchanged`, `applied`, `failed`, `rolled-back`, `suspended`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub repo: String,
    pub r#ref: String,
    pub revision: String,
}

type HistogramFamily = Family<ClusterLabels, Histogram, fn() -> Histogram>;

/// Everything the reconciler reports. Clusters are labelled by
/// `metadata.name` (or the spec path when the spec did not load).
pub struct Metrics {
    registry: Registry,
    pub duration: HistogramFamily,
    pub results: Family<ResultLabels, Counter>,
    pub drift_corrections: Family<ClusterLabels, Counter>,
    pub drifted_objects: Family<ClusterLabels, Gauge>,
    pub last_success: Family<ClusterLabels, Gauge<f64, AtomicU64>>,
    pub source_info: Family<SourceLabels, Gauge>,
    pub source_failures: Counter,
}

fn duration_histogram() -> Histogram {
    // 0.25 s … ~17 min.
    Histogram::new(exponential_buckets(0.25, 2.0, 13))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let duration = HistogramFamily::new_with_constructor(duration_histogram);
        let results = Family::<ResultLabels, Counter>::default();
        let drift_corrections = Family::<ClusterLabels, Counter>::default();
        let drifted_objects = Family::<ClusterLabels, Gauge>::default();
        let last_success = Family::<ClusterLabels, Gauge<f64, AtomicU64>>::default();
        let source_info = Family::<SourceLabels, Gauge>::default();
        let source_failures = Counter::default();
        registry.register_with_unit(
            "netboot_reconcile_duration",
            "Time one cluster's reconcile took",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "netboot_reconcile_results",
            "Reconciles by outcome: unchanged, applied, failed, rolled-back, suspended",
            results.clone(),
        );
        registry.register(
            "netboot_drift_corrections",
            "Objects changed by hand that a reconcile put back",
            drift_corrections.clone(),
        );
        registry.register(
            "netboot_drifted_objects",
            "Objects found drifted at the last reconcile (corrected, or only reported when suspended)",
            drifted_objects.clone(),
        );
        registry.register_with_unit(
            "netboot_last_success_timestamp",
            "When a reconcile last succeeded (Unix time)",
            Unit::Seconds,
            last_success.clone(),
        );
        registry.register(
            "netboot_source",
            "The git source: repository, ref and the commit resolved at the last fetch (value 1)",
            source_info.clone(),
        );
        registry.register(
            "netboot_source_fetch_failures",
            "Fetches of the git source that failed",
            source_failures.clone(),
        );
        Metrics {
            registry,
            duration,
            results,
            drift_corrections,
            drifted_objects,
            last_success,
            source_info,
            source_failures,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }

    /// Replaces the source info series with the current one.
    pub fn set_source(&self, repo: &str, git_ref: &str, revision: &str) {
        self.source_info.clear();
        self.source_info
            .get_or_create(&SourceLabels {
                repo: repo.into(),
                r#ref: git_ref.into(),
                revision: revision.into(),
            })
            .set(1);
    }

    pub fn cluster(name: &str) -> ClusterLabels {
        ClusterLabels {
            cluster: name.into(),
        }
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let m = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = respond(stream, &m).await {
                        tracing::debug!("metrics connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn respond(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // The request head only; bodies are not read.
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(head, Ok(Ok(()))) {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&buf);
    let mut words = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let path = path.split('?').next().unwrap_or_default();
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::default();
        m.results
            .get_or_create(&ResultLabels {
                cluster: "local".into(),
                outcome: "applied".into(),
            })
            .inc();
        m.drift_corrections
            .get_or_create(&Metrics::cluster("local"))
            .inc_by(2);
        m.duration
            .get_or_create(&Metrics::cluster("local"))
            .observe(1.5);
        m.last_success
            .get_or_create(&Metrics::cluster("local"))
            .set(1.7e9);
        m.set_source("file:///r", "main", "git:abc");
        m.set_source("file:///r", "main", "git:def");
        let text = m.encode();
        for want in [
            "netboot_reconcile_results_total{cluster=\"local\",outcome=\"applied\"} 1",
            "netboot_drift_corrections_total{cluster=\"local\"} 2",
            "netboot_reconcile_duration_seconds_count{cluster=\"local\"} 1",
            "netboot_last_success_timestamp_seconds{cluster=\"local\"} 1700000000.0",
            "netboot_source{repo=\"file:///r\",ref=\"main\",revision=\"git:def\"} 1",
            "netboot_source_fetch_failures_total 0",
        ] {
            assert!(text.contains(want), "missing {want}:\n{text}");
        }
        assert!(!text.contains("git:abc"), "the old revision stays:\n{text}");
    }

    /// The exposition has exactly the families the contract lists (which the
    /// shipped dashboard and alert rules are checked against).
    #[test]
    fn exposition_has_the_contracts_families() {
        use netboot_contract::metrics;
        // A family shows in the exposition once it has a series.
        let m = Metrics::default();
        let local = Metrics::cluster("local");
        m.duration.get_or_create(&local).observe(1.0);
        m.results
            .get_or_create(&ResultLabels {
                cluster: "local".into(),
                outcome: "failed".into(),
            })
            .inc();
        m.drift_corrections.get_or_create(&local).inc();
        m.drifted_objects.get_or_create(&local).set(1);
        m.last_success.get_or_create(&local).set(1.7e9);
        m.set_source("file:///r", "main", "git:abc");
        m.source_failures.inc();
        assert_eq!(
            metrics::exposed_families(&m.encode()),
            metrics::families(metrics::RECONCILER)
        );
    }

    #[tokio::test]
    async fn serves_metrics_over_http_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        let server = tokio::spawn(serve(listener, m));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let r = get("/metrics").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK") && r.contains("# EOF"),
            "{r}"
        );
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
