//! Pruning: objects the inventory lists that left the desired set are deleted,
//! in reverse kind-rank order — but only if the live object still carries
//! netboot's labels for this cluster. Nothing netboot did not create is ever
//! deleted.

use kube::api::DeleteParams;
use kube::Client;

use crate::apply::{describe, Action, Change, ChangeSet};
use crate::manifest::{ObjectId, CLUSTER_LABEL, MANAGED_BY};
use crate::resources::dynamic_api;

/// Deletes `stale` objects (sorted here in reverse apply order). With
/// `dry_run`, reports what it would delete.
pub async fn prune(
    client: &Client,
    cluster: &str,
    stale: &[ObjectId],
    dry_run: bool,
    changes: &mut ChangeSet,
) -> Result<(), String> {
    let mut stale = stale.to_vec();
    stale.sort();
    stale.reverse();
    for id in stale {
        let Some(api) = dynamic_api(client, &id) else {
            changes
                .entries
                .push(skipped(&id, "kind not managed by this netboot version"));
            continue;
        };
        let Some(live) = api
            .get_opt(&id.name)
            .await
            .map_err(|e| format!("{id}: {}", describe(&e)))?
        else {
            changes.entries.push(skipped(&id, "already gone"));
            continue;
        };
        let labels = live.metadata.labels.unwrap_or_default();
        let ours = labels.get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
            && labels.get(CLUSTER_LABEL).map(String::as_str) == Some(cluster);
        if !ours {
            changes.entries.push(skipped(
                &id,
                "not labelled as netboot's for this cluster; left alone",
            ));
            continue;
        }
        if !dry_run {
            api.delete(&id.name, &DeleteParams::background())
                .await
                .map_err(|e| format!("{id}: {}", describe(&e)))?;
        }
        changes.entries.push(Change {
            id,
            action: Action::Pruned,
            diff: String::new(),
            reason: None,
            hash: String::new(),
        });
    }
    Ok(())
}

fn skipped(id: &ObjectId, reason: &str) -> Change {
    Change {
        id: id.clone(),
        action: Action::Skipped,
        diff: String::new(),
        reason: Some(reason.into()),
        hash: String::new(),
    }
}
