//! The deploy/ manifests are valid Kubernetes objects: every document
//! parses as its k8s-openapi type, and serializing that type gives back the
//! document exactly, so a misspelled or misplaced field (which the typed
//! parse would drop) fails here rather than at `kubectl apply`.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document under deploy/, with `file#index` for messages.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.expect("deploy/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read deploy file");
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}#{i}: not YAML: {e}", file.display()));
            if !value.is_null() {
                out.push((format!("{}#{i}", file.display()), value));
            }
        }
    }
    out
}

/// Parses `value` as `T` and checks the round trip gives it back.
fn typed<T: DeserializeOwned + Serialize>(name: &str, value: &Value) -> T {
    let t: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{name}: not a valid object of its kind: {e}"));
    let back = serde_json::to_value(&t).expect("serialize");
    assert_eq!(
        &back, value,
        "{name}: fields lost or changed in a typed round trip (unknown or misspelled?)"
    );
    t
}

#[test]
fn every_deploy_document_is_a_known_kind_that_round_trips_through_its_type() {
    let docs = documents();
    let mut kinds: Vec<String> = Vec::new();
    for (name, value) in &docs {
        let kind = format!(
            "{}/{}",
            value["apiVersion"].as_str().unwrap_or_default(),
            value["kind"].as_str().unwrap_or_default()
        );
        match kind.as_str() {
            "apps/v1/DaemonSet" => drop(typed::<DaemonSet>(name, value)),
            "v1/ServiceAccount" => drop(typed::<ServiceAccount>(name, value)),
            "v1/ConfigMap" => drop(typed::<ConfigMap>(name, value)),
            "rbac.authorization.k8s.io/v1/ClusterRole" => drop(typed::<ClusterRole>(name, value)),
            "rbac.authorization.k8s.io/v1/ClusterRoleBinding" => {
                drop(typed::<ClusterRoleBinding>(name, value));
            }
            other => panic!("{name}: unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "apps/v1/DaemonSet",
            "rbac.authorization.k8s.io/v1/ClusterRole",
            "rbac.authorization.k8s.io/v1/ClusterRoleBinding",
            "v1/ConfigMap",
            "v1/ServiceAccount",
        ]
    );
}

#[test]
fn the_round_trip_check_catches_a_misspelled_field() {
    let (name, mut value) = documents()
        .into_iter()
        .find(|(_, v)| v["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    value["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let caught = std::panic::catch_unwind(|| drop(typed::<DaemonSet>(&name, &value)));
    assert!(caught.is_err(), "a misspelled field must fail the check");
}

fn find<T: DeserializeOwned + Serialize>(kind: &str) -> T {
    let (name, value) = documents()
        .into_iter()
        .find(|(_, v)| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/"));
    typed(&name, &value)
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_uses() {
    let role: ClusterRole = find("ClusterRole");
    let mut grants: Vec<(String, String, String)> = Vec::new();
    for rule in role.rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    grants.push((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    grants.sort();
    let mut want: Vec<(String, String, String)> = [
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "services", "get"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "get"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    ]
    .iter()
    .map(|(g, r, v)| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))
    .collect();
    want.sort();
    assert_eq!(grants, want);
    let binding: ClusterRoleBinding = find("ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, "lb-agent");
    let account: ServiceAccount = find("ServiceAccount");
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(
        (Some(subject.name.as_str()), subject.namespace.as_deref()),
        (
            account.metadata.name.as_deref(),
            account.metadata.namespace.as_deref()
        )
    );
}

#[test]
fn the_daemonset_runs_everywhere_on_the_host_network_unprivileged_with_probes() {
    let ds: DaemonSet = find("DaemonSet");
    let pod = ds.spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("lb-agent"));
    let tolerations = pod.tolerations.expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let mut added = caps.add.clone().unwrap_or_default();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON"]);
    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/livez"),
        (c.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe.and_then(|p| p.http_get.as_ref()).expect("HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
    }
    let bpffs = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.host_path.as_ref())
        .expect("hostPath volume");
    assert_eq!(bpffs.path, "/sys/fs/bpf");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf");
    assert!(mount.is_some(), "the bpffs is mounted where --bpffs points");
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.iter().any(|a| a == "--bpffs=/sys/fs/bpf/lb"),
        "{args:?}"
    );
}
