//! The kinds netboot manages, mapped to their API resources without a
//! discovery round trip, and dynamic `Api`s for them.

use k8s_openapi::api::{
    admissionregistration::v1 as adm, apps::v1 as apps, batch::v1 as batch, core::v1 as core,
    rbac::v1 as rbac,
};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::Client;

use crate::manifest::ObjectId;

/// The API resource of a kind netboot manages, and whether it is namespaced.
pub fn api_resource(kind: &str) -> Option<(ApiResource, bool)> {
    Some(match kind {
        "Namespace" => (ApiResource::erase::<core::Namespace>(&()), false),
        "ServiceAccount" => (ApiResource::erase::<core::ServiceAccount>(&()), true),
        "ClusterRole" => (ApiResource::erase::<rbac::ClusterRole>(&()), false),
        "ClusterRoleBinding" => (ApiResource::erase::<rbac::ClusterRoleBinding>(&()), false),
        "Role" => (ApiResource::erase::<rbac::Role>(&()), true),
        "RoleBinding" => (ApiResource::erase::<rbac::RoleBinding>(&()), true),
        "ValidatingAdmissionPolicy" => (
            ApiResource::erase::<adm::ValidatingAdmissionPolicy>(&()),
            false,
        ),
        "ValidatingAdmissionPolicyBinding" => (
            ApiResource::erase::<adm::ValidatingAdmissionPolicyBinding>(&()),
            false,
        ),
        "ConfigMap" => (ApiResource::erase::<core::ConfigMap>(&()), true),
        "Secret" => (ApiResource::erase::<core::Secret>(&()), true),
        "Service" => (ApiResource::erase::<core::Service>(&()), true),
        "DaemonSet" => (ApiResource::erase::<apps::DaemonSet>(&()), true),
        "Deployment" => (ApiResource::erase::<apps::Deployment>(&()), true),
        "Pod" => (ApiResource::erase::<core::Pod>(&()), true),
        "CronJob" => (ApiResource::erase::<batch::CronJob>(&()), true),
        "PrometheusRule" => (prometheus_rule(), true),
        _ => return None,
    })
}

/// The Prometheus Operator's PrometheusRule (a CRD: present only where the
/// operator's CRDs are installed; see [`served`]).
fn prometheus_rule() -> ApiResource {
    use crate::observability::{
        PROMETHEUS_RULE_GROUP, PROMETHEUS_RULE_PLURAL, PROMETHEUS_RULE_VERSION,
    };
    ApiResource {
        group: PROMETHEUS_RULE_GROUP.into(),
        version: PROMETHEUS_RULE_VERSION.into(),
        api_version: format!("{PROMETHEUS_RULE_GROUP}/{PROMETHEUS_RULE_VERSION}"),
        kind: "PrometheusRule".into(),
        plural: PROMETHEUS_RULE_PLURAL.into(),
    }
}

/// Kinds netboot renders that a cluster may not serve: CRDs of optional
/// add-ons. Apply asks discovery before it touches one ([`served`]).
pub fn optional(kind: &str) -> bool {
    kind == "PrometheusRule"
}

/// Whether the API server serves `kind` (discovery of its group version):
/// `Ok(false)` when the group version or the resource is unknown (the CRD
/// is not installed), an error for anything else.
pub async fn served(client: &Client, kind: &str) -> Result<bool, kube::Error> {
    let Some((ar, _)) = api_resource(kind) else {
        return Ok(false);
    };
    match client.list_api_group_resources(&ar.api_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == ar.plural)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// A dynamic `Api` for the object's kind, scoped to its namespace.
pub fn dynamic_api(client: &Client, id: &ObjectId) -> Option<Api<DynamicObject>> {
    let (ar, namespaced) = api_resource(&id.kind)?;
    Some(match (namespaced, &id.namespace) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::KIND_RANK;

    #[test]
    fn every_ranked_kind_has_a_resource() {
        for kind in KIND_RANK {
            let (ar, _) = api_resource(kind).unwrap_or_else(|| panic!("{kind}"));
            assert_eq!(ar.kind, *kind);
        }
    }
}
