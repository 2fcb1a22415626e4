//! Property tests (fuzzing) of the agent's input handling: random and
//! mutated manifest text through the manifests loader, and random Service
//! and EndpointSlice objects through the translation and the reconciler.
//!
//! Properties: nothing panics, the translation does not depend on input
//! order, and everything that reaches the maps is valid (address family of
//! frontend and backends agree, ports non-zero, protocols the datapath
//! knows, NodePorts only on node addresses).
//!
//! 100 000 cases each (`FUZZ_CASES` overrides, e.g. for a longer soak).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort,
            ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{EndpointConditions, EndpointPort},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_agent::{
    model::{self, FrontendKind, NodeInfo, SliceEndpoint, SliceObject, MAX_AFFINITY_TIMEOUT_S},
    reconcile::{MemStore, Reconciler},
    source::manifests,
};
use lb_common::{family, proto};
use proptest::{prelude::*, sample::select, test_runner::Config};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn config() -> Config {
    Config {
        cases: cases(),
        // Failures are reported with their input; no files in the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Valid manifests the mutations start from: each kind of Service and a slice.
const SEEDS: [&str; 3] = [
    "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n    - name: http\n      protocol: TCP\n      port: 80\n      targetPort: 8080\n      nodePort: 30080\n",
    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: demo\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n  - name: http\n    protocol: TCP\n    port: 8080\nendpoints:\n  - addresses: [10.244.1.10]\n    nodeName: node-a\n    conditions: {ready: true}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: demo}\nspec:\n  type: LoadBalancer\n  clusterIPs: [10.96.0.11, 'fd00::11']\n  externalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  loadBalancerSourceRanges: [10.0.0.0/8]\n  ports: [{port: 53, protocol: UDP, nodePort: 30053}]\nstatus: {loadBalancer: {ingress: [{ip: 192.168.9.9}]}}\n---\n",
];

/// Pieces a mutation inserts: YAML syntax and values that mean something.
const PIECES: [&str; 24] = [
    ":",
    "-",
    " ",
    "\n",
    "  ",
    "[",
    "]",
    "{",
    "}",
    "'",
    "\"",
    "#",
    "---\n",
    "&a",
    "*a",
    "!!int ",
    "0",
    "65536",
    "-1",
    "None",
    "::",
    "fd00::1",
    "10.96.0.10",
    "\t",
];

#[derive(Clone, Debug)]
enum Edit {
    Insert(usize, &'static str),
    Delete(usize, usize),
    Duplicate(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), select(&PIECES[..])).prop_map(|(at, p)| Edit::Insert(at, p)),
        (any::<usize>(), 1..20usize).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), 1..40usize).prop_map(|(at, n)| Edit::Duplicate(at, n)),
    ]
}

/// The nearest char boundary at or below `at % (len + 1)`.
fn boundary(s: &str, at: usize) -> usize {
    let mut i = at % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(mut text: String, edits: &[Edit]) -> String {
    for e in edits {
        match *e {
            Edit::Insert(at, piece) => {
                let i = boundary(&text, at);
                text.insert_str(i, piece);
            }
            Edit::Delete(at, n) => {
                let i = boundary(&text, at);
                let j = boundary(&text, i + n.min(text.len() - i));
                text.replace_range(i..j.max(i), "");
            }
            Edit::Duplicate(at, n) => {
                let i = boundary(&text, at);
                let j = boundary(&text, i + n.min(text.len() - i)).max(i);
                let copy = text[i..j].to_string();
                text.insert_str(j, &copy);
            }
        }
    }
    text
}

/// Manifest text: a mutated seed (most cases), or arbitrary characters.
fn manifest_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (
            proptest::collection::vec(select(&SEEDS[..]), 1..4),
            proptest::collection::vec(edit(), 0..8),
        )
            .prop_map(|(seeds, edits)| apply(seeds.concat(), &edits)),
        1 => "[ -~\n\t:{}\\[\\]#&*!|>'\"-]{0,200}",
    ]
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        addresses: vec![
            "10.99.0.1".parse().expect("addr"),
            "fd00::99".parse().expect("addr"),
        ],
        zone: None,
    }
}

/// Checks everything a translation emits, and what the reconciler writes.
fn check_model(services: &[Service], slices: &[SliceObject]) -> Result<(), TestCaseError> {
    let node = node();
    let (model, problems) = model::build(services, slices, &node);

    // Order of the input does not matter.
    let rev_services: Vec<Service> = services.iter().rev().cloned().collect();
    let rev_slices: Vec<SliceObject> = slices.iter().rev().cloned().collect();
    let (model2, problems2) = model::build(&rev_services, &rev_slices, &node);
    prop_assert_eq!(&model, &model2, "model depends on input order");
    prop_assert_eq!(&problems, &problems2, "problems depend on input order");

    let mut frontends = BTreeSet::new();
    for (r, sp) in &model.services {
        prop_assert!(!r.name.is_empty() && !r.namespace.is_empty(), "{r:?}");
        prop_assert!(!sp.frontends.is_empty(), "{r}: port without frontend");
        for f in &sp.frontends {
            prop_assert!(f.port != 0, "{r}: frontend port 0");
            if f.kind == FrontendKind::NodePort {
                prop_assert!(
                    node.addresses.contains(&f.addr),
                    "{r}: NodePort on {}",
                    f.addr
                );
            }
            prop_assert!(
                frontends.insert((f.addr, f.port, r.protocol, r.clone()))
                    || sp
                        .frontends
                        .iter()
                        .filter(|g| g.addr == f.addr && g.port == f.port)
                        .count()
                        > 1,
                "{r}: frontend {f:?} twice"
            );
        }
        for e in &sp.endpoints {
            prop_assert!(e.port != 0, "{r}: endpoint port 0");
        }
        prop_assert!(sp.affinity_timeout_s <= MAX_AFFINITY_TIMEOUT_S);
        for c in &sp.source_ranges {
            let max = if c.addr.is_ipv4() { 32 } else { 128 };
            prop_assert!(c.prefix <= max, "{r}: range {c:?}");
        }
    }
    // No two Service ports share a frontend.
    let mut owners: BTreeMap<(IpAddr, u16, model::Protocol), &model::ServicePortRef> =
        BTreeMap::new();
    for (addr, port, protocol, r) in &frontends {
        if let Some(other) = owners.insert((*addr, *port, *protocol), r) {
            prop_assert_eq!(other, r, "frontend {}:{} owned twice", addr, port);
        }
    }

    // What reaches the maps.
    let mut store = MemStore::default();
    let report = Reconciler::new(251).apply(&model, &mut store);
    // Nothing may fail.
    prop_assert!(report.failures.is_empty(), "{:?}", report.failures);
    for (key, value) in &store.snap.services {
        prop_assert!(
            key.addr_family() == family::V4 || key.addr_family() == family::V6,
            "{key:?}"
        );
        if key.is_address_only() {
            // A ClusterIP as a whole: no Service port, no table.
            prop_assert!(
                value.svc_id == 0 && value.slots.is_none() && !key.is_in_cluster(),
                "{key:?}"
            );
            continue;
        }
        prop_assert!(key.port_be != 0, "{key:?}");
        prop_assert!(
            [proto::TCP, proto::UDP, proto::SCTP].contains(&key.proto),
            "{key:?}"
        );
        if key.addr_family() == family::V4 {
            prop_assert!(key.addr_be[1..] == [0, 0, 0], "{key:?}");
        }
        let Some(slots) = value.slots else {
            continue;
        };
        let table = store.snap.tables.get(&slots.table);
        prop_assert!(
            table.is_some_and(|t| t.len() == slots.count as usize),
            "{key:?}"
        );
        for id in table.into_iter().flatten() {
            let b = store.snap.backends.get(id);
            prop_assert!(b.is_some(), "{key:?}: table names missing backend {id}");
            let b = b.expect("checked");
            prop_assert!(b.port_be != 0, "{key:?}: backend {b:?}");
            prop_assert_eq!(
                b.family,
                key.addr_family(),
                "frontend {:?} leads to a backend of another family {:?}",
                key,
                b
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Fuzz: mutated and random manifest files through the loader and on
    /// through translation: no panic, and whatever parses translates validly.
    #[test]
    fn fuzz_manifest_parsing_never_panics_and_translates_validly(text in manifest_text()) {
        let objects = manifests::load_text("fuzz.yaml", &text);
        check_model(&objects.services, &objects.slices)?;
    }

    /// Fuzz: random Services and EndpointSlices through `model::build` and
    /// the reconciler: no panic, order-independent, every frontend valid.
    #[test]
    fn fuzz_service_translation_emits_only_valid_frontends(
        services in proptest::collection::vec(service(), 0..4),
        slices in proptest::collection::vec(endpoint_slice(), 0..4),
    ) {
        check_model(&services, &slices)?;
    }
}

const ADDRS: [&str; 12] = [
    "10.96.0.1",
    "10.96.0.2",
    "10.99.0.1",
    "fd00::1",
    "fd00::99",
    "0.0.0.0",
    "::",
    "255.255.255.255",
    "bogus",
    "",
    "None",
    "10.96.0.1/32",
];

fn opt_str(pool: &'static [&'static str]) -> impl Strategy<Value = Option<String>> {
    proptest::option::of(select(pool).prop_map(String::from))
}

fn strs(pool: &'static [&'static str], max: usize) -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(select(pool).prop_map(String::from), 0..max)
}

fn port_number() -> impl Strategy<Value = i32> {
    prop_oneof![
        select(&[0, 1, 53, 80, 30080, 65535, 65536, -1][..]),
        any::<i32>(),
    ]
}

fn meta(names: &'static [&'static str]) -> impl Strategy<Value = ObjectMeta> {
    (
        opt_str(names),
        opt_str(&["default", "demo", ""]),
        proptest::option::of(select(&["a", "b", "lb"][..])),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(name, namespace, owner, other_proxy)| {
            let mut labels = BTreeMap::new();
            if let Some(o) = owner {
                labels.insert("kubernetes.io/service-name".to_string(), o.to_string());
            }
            if other_proxy {
                labels.insert(
                    "service.kubernetes.io/service-proxy-name".to_string(),
                    "other".to_string(),
                );
            }
            ObjectMeta {
                name,
                namespace,
                labels: Some(labels),
                ..ObjectMeta::default()
            }
        })
}

fn service_port() -> impl Strategy<Value = ServicePort> {
    (
        opt_str(&["http", "dns", ""]),
        opt_str(&["TCP", "UDP", "SCTP", "ICMP", "tcp"]),
        port_number(),
        proptest::option::of(port_number()),
    )
        .prop_map(|(name, protocol, port, node_port)| ServicePort {
            name,
            protocol,
            port,
            node_port,
            ..ServicePort::default()
        })
}

fn service() -> impl Strategy<Value = Service> {
    let spec = (
        opt_str(&[
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
            "Weird",
        ]),
        opt_str(&ADDRS),
        proptest::option::of(strs(&ADDRS, 3)),
        proptest::option::of(strs(&ADDRS, 3)),
        proptest::collection::vec(service_port(), 0..4),
        (
            opt_str(&["Local", "Cluster", "x"]),
            opt_str(&["Local", "Cluster", "x"]),
            opt_str(&["None", "ClientIP", "x"]),
            proptest::option::of(select(&[0, 1, 60, 86_400, 86_401, -1][..])),
            proptest::option::of(strs(
                &[
                    "10.0.0.0/8",
                    "::/0",
                    "1.2.3.4/33",
                    "x",
                    "10.0.0.1/32",
                    "fd00::/129",
                ],
                3,
            )),
            proptest::option::of(port_number()),
        ),
    );
    let ingress =
        proptest::collection::vec((opt_str(&ADDRS), opt_str(&["VIP", "Proxy", "x"])), 0..3);
    (meta(&["a", "b", "lb", ""]), spec, ingress).prop_map(
        |(metadata, (type_, cluster_ip, cluster_ips, external_ips, ports, rest), ingress)| {
            let (etp, itp, affinity, timeout, ranges, hc) = rest;
            Service {
                metadata,
                spec: Some(ServiceSpec {
                    type_,
                    cluster_ip,
                    cluster_ips,
                    external_ips,
                    ports: Some(ports),
                    external_traffic_policy: etp,
                    internal_traffic_policy: itp,
                    session_affinity: affinity,
                    session_affinity_config: timeout.map(|t| SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: Some(t),
                        }),
                    }),
                    load_balancer_source_ranges: ranges,
                    health_check_node_port: hc,
                    ..ServiceSpec::default()
                }),
                status: Some(ServiceStatus {
                    load_balancer: Some(LoadBalancerStatus {
                        ingress: Some(
                            ingress
                                .into_iter()
                                .map(|(ip, ip_mode)| LoadBalancerIngress {
                                    ip,
                                    ip_mode,
                                    ..LoadBalancerIngress::default()
                                })
                                .collect(),
                        ),
                    }),
                    ..ServiceStatus::default()
                }),
            }
        },
    )
}

fn endpoint() -> impl Strategy<Value = SliceEndpoint> {
    (
        strs(&ADDRS, 3),
        opt_str(&["node-a", "node-b", ""]),
        proptest::option::of((
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
        )),
    )
        .prop_map(|(addresses, node_name, conditions)| SliceEndpoint {
            addresses,
            node_name,
            conditions: conditions.map(|(ready, serving, terminating)| EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..SliceEndpoint::default()
        })
}

fn endpoint_slice() -> impl Strategy<Value = SliceObject> {
    (
        meta(&["a-1", "a-2", "b-1", ""]),
        select(&["IPv4", "IPv6", "FQDN", "x"][..]),
        proptest::option::of(proptest::collection::vec(
            (
                opt_str(&["http", "dns", ""]),
                opt_str(&["TCP", "UDP", "SCTP", "ICMP"]),
                proptest::option::of(port_number()),
            ),
            0..3,
        )),
        proptest::option::of(proptest::collection::vec(endpoint(), 0..4)),
    )
        .prop_map(|(metadata, address_type, ports, endpoints)| SliceObject {
            metadata,
            address_type: address_type.to_string(),
            ports: ports.map(|ps| {
                ps.into_iter()
                    .map(|(name, protocol, port)| EndpointPort {
                        name,
                        protocol,
                        port,
                        ..EndpointPort::default()
                    })
                    .collect()
            }),
            endpoints,
        })
}

/// Regression: a Service port with an IPv4 clusterIP and an IPv6 slice put
/// IPv6 backends into the IPv4 frontend's table, which the datapath would
/// have written into IPv4 headers. Found by the translation fuzz.
#[test]
fn an_ipv4_frontend_never_leads_to_ipv6_backends() {
    let svc: Service = serde_yaml::from_str(
        "metadata: {name: a, namespace: d}\nspec: {clusterIPs: [10.96.0.1, 'fd00::1'], ports: [{port: 80}]}\n",
    )
    .expect("test Service");
    let v6: SliceObject = serde_yaml::from_str(
        "metadata: {name: a-1, namespace: d, labels: {kubernetes.io/service-name: a}}\naddressType: IPv6\nports: [{port: 80}]\nendpoints: [{addresses: ['fd00::10']}]\n",
    )
    .expect("test slice");
    let v4: SliceObject = serde_yaml::from_str(
        "metadata: {name: a-2, namespace: d, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.244.1.10]}]\n",
    )
    .expect("test slice");
    check_model(std::slice::from_ref(&svc), std::slice::from_ref(&v6)).expect("v6 endpoints only");
    check_model(&[svc], &[v6, v4]).expect("dual-stack");
}
