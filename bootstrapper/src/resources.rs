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
        _ => return None,
    })
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
