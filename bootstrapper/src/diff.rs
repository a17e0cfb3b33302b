//! What differs between a live object and what netboot would make of it.

use serde_json::Value;
use similar::TextDiff;

/// Fields the server owns: they never count as drift.
const SERVER_FIELDS: &[&str] = &[
    "managedFields",
    "resourceVersion",
    "generation",
    "uid",
    "creationTimestamp",
    "selfLink",
];

/// The object without server-owned metadata and status.
pub fn normalize(object: &Value) -> Value {
    let mut v = object.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("status");
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            for f in SERVER_FIELDS {
                meta.remove(*f);
            }
            if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
                annotations.remove("deprecated.daemonset.template.generation");
                annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        }
    }
    v
}

/// True when the two differ in anything but server-owned fields.
pub fn drifted(live: &Value, desired: &Value) -> bool {
    normalize(live) != normalize(desired)
}

/// A unified diff of the two as YAML, `live` → `desired`, empty when equal.
pub fn unified(live: Option<&Value>, desired: &Value, id: &str) -> String {
    let yaml = |v: &Value| {
        serde_yaml::to_string(&normalize(v)).unwrap_or_else(|e| format!("# unprintable: {e}\n"))
    };
    let before = live.map(yaml).unwrap_or_default();
    let after = yaml(desired);
    if before == after {
        return String::new();
    }
    TextDiff::from_lines(&before, &after)
        .unified_diff()
        .context_radius(3)
        .header(&format!("live/{id}"), &format!("desired/{id}"))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_fields_are_not_drift() {
        let a = json!({"metadata": {"name": "x", "resourceVersion": "1", "managedFields": []}, "data": {"a": "1"}, "status": {}});
        let b = json!({"metadata": {"name": "x", "resourceVersion": "2"}, "data": {"a": "1"}});
        assert!(!drifted(&a, &b));
        assert!(unified(Some(&a), &b, "ConfigMap/x").is_empty());
    }

    #[test]
    fn a_changed_value_is_drift_with_a_diff() {
        let a = json!({"metadata": {"name": "x"}, "data": {"a": "1"}});
        let b = json!({"metadata": {"name": "x"}, "data": {"a": "2"}});
        assert!(drifted(&a, &b));
        let d = unified(Some(&a), &b, "ConfigMap/x");
        assert!(d.contains("-  a: '1'") && d.contains("+  a: '2'"), "{d}");
    }
}
