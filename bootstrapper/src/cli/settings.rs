//! Arguments plus the spec, resolved once into the library's settings.

use std::time::Duration;

use anyhow::Context;
use netboot::cluster::{self, Connection, Target};
use netboot::converge::Settings;
use netboot::render::{hex, RenderOptions};
use netboot::spec;
use sha2::{Digest, Sha256};

use super::args::ApplyArgs;

pub async fn resolve(args: &ApplyArgs) -> anyhow::Result<(Settings, Connection)> {
    let file = args.spec.display().to_string();
    let spec = spec::load(&args.spec)?;
    let bytes = std::fs::read(&args.spec).with_context(|| format!("{file}: read"))?;
    let revision = format!("file:sha256:{}", &hex(&Sha256::digest(&bytes))[..12]);
    let target = Target {
        kubeconfig: args.cluster.kubeconfig.clone(),
        context: args
            .cluster
            .context
            .clone()
            .or_else(|| spec.cluster.context.clone()),
        in_cluster: args.cluster.in_cluster || spec.cluster.in_cluster,
    };
    let conn = cluster::connect(&target)
        .await
        .with_context(|| format!("{file}: connecting to cluster {}", spec.name))?;
    let settings = Settings {
        spec,
        spec_file: file,
        revision,
        render: RenderOptions {
            templates: args.templates.dir.clone(),
            api_server: None,
        },
        force: args.force,
        lock_wait: Duration::from_secs(args.lock_timeout),
        probe_image: args.probe_image.clone(),
        retry: args.retry,
        skip_validation: args.skip_validation,
    };
    Ok((settings, conn))
}
