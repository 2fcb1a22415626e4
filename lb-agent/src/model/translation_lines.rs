//! One table-driven test per line of the Translation list of the
//! Kubernetes-source issue, named after that line. The objects are the
//! same typed Services and EndpointSlices both sources hand to [`build`].

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use super::translate::tests::objects;
use super::{build, FrontendKind, Model, NodeInfo, Problem, Protocol, ServicePort, Topology};

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        addresses: vec!["192.168.1.10".parse().expect("ip")],
        zone: None,
    }
}

fn run(yaml: &str) -> (Model, Vec<Problem>) {
    let (services, slices) = objects(yaml);
    build(&services, &slices, &node())
}

/// Runs the translation and returns its debug log as well.
fn run_logged(yaml: &str) -> (Model, Vec<Problem>, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let (model, problems) = tracing::subscriber::with_default(subscriber, || run(yaml));
    let log = String::from_utf8_lossy(&buf.0.lock().expect("log buffer")).into_owned();
    (model, problems, log)
}

/// The one port of `ns/name` with this port name and protocol.
fn port<'a>(model: &'a Model, key: &str) -> &'a ServicePort {
    model
        .services
        .iter()
        .find(|(r, _)| format!("{r}/{:?}", r.protocol) == key)
        .map(|(_, sp)| sp)
        .unwrap_or_else(|| panic!("no {key} in {:?}", model.services.keys()))
}

fn frontends(sp: &ServicePort) -> Vec<(String, FrontendKind)> {
    sp.frontends
        .iter()
        .map(|f| (SocketAddr::new(f.addr, f.port).to_string(), f.kind))
        .collect()
}

fn endpoints(sp: &ServicePort) -> Vec<String> {
    sp.endpoints
        .iter()
        .map(|e| SocketAddr::new(e.addr, e.port).to_string())
        .collect()
}

fn no_problems(name: &str, problems: &[Problem]) {
    assert!(
        problems.is_empty(),
        "{name}: unexpected problems {problems:#?}"
    );
}

#[test]
fn clusterip_clusterips_nodeport_loadbalancer_and_externalips_become_frontends() {
    use FrontendKind::{ClusterIp as C, External as X, LoadBalancer as L, NodePort as N};
    /// (case, Service YAML, expected frontends)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, FrontendKind)]);
    let cases: &[Case<'_>] = &[
        (
            "ClusterIP",
            "metadata: {name: s}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
            &[("10.96.0.1:80", C)],
        ),
        (
            "clusterIPs: every family",
            "metadata: {name: s}\nspec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00:96::1'], ports: [{port: 80}]}",
            &[("10.96.0.1:80", C), ("[fd00:96::1]:80", C)],
        ),
        (
            "NodePort: ports[].nodePort on each node address",
            "metadata: {name: s}\nspec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}",
            &[("10.96.0.1:80", C), ("192.168.1.10:30080", N)],
        ),
        (
            "LoadBalancer: ingress IPs, and its nodePort",
            "metadata: {name: s}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2}]}}",
            &[("10.96.0.1:80", C), ("192.168.1.10:30080", N), ("198.51.100.1:80", L), ("198.51.100.2:80", L)],
        ),
        (
            "LoadBalancer with allocateLoadBalancerNodePorts: false has no NodePort",
            "metadata: {name: s}\nspec: {type: LoadBalancer, allocateLoadBalancerNodePorts: false, clusterIP: 10.96.0.1, ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}",
            &[("10.96.0.1:80", C), ("198.51.100.1:80", L)],
        ),
        (
            "externalIPs",
            "metadata: {name: s}\nspec: {clusterIP: 10.96.0.1, externalIPs: [203.0.113.1, 203.0.113.2], ports: [{port: 80}]}",
            &[("10.96.0.1:80", C), ("203.0.113.1:80", X), ("203.0.113.2:80", X)],
        ),
    ];
    for (name, yaml, want) in cases {
        let (model, problems) = run(yaml);
        no_problems(name, &problems);
        let want: Vec<(String, FrontendKind)> =
            want.iter().map(|(a, k)| ((*a).to_owned(), *k)).collect();
        assert_eq!(frontends(port(&model, "default/s/Tcp")), want, "{name}");
    }
}

#[test]
fn headless_and_externalname_give_no_datapath_entries_noted_at_debug_level() {
    let cases = [
        (
            "clusterIP: None",
            "metadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}",
            "headless",
        ),
        (
            "clusterIPs: [None]",
            "metadata: {name: h}\nspec: {clusterIPs: [None], ports: [{port: 80}]}",
            "headless",
        ),
        (
            "ExternalName",
            "metadata: {name: h}\nspec: {type: ExternalName, externalName: example.org, ports: [{port: 80}]}",
            "ExternalName",
        ),
    ];
    for (name, yaml, note) in cases {
        let slice = "
metadata: {name: h-1, labels: {kubernetes.io/service-name: h}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]";
        let (model, problems, log) = run_logged(&format!("{yaml}\n---{slice}"));
        no_problems(name, &problems);
        assert!(model.services.is_empty(), "{name}: {model:?}");
        assert!(
            log.lines()
                .any(|l| l.contains("DEBUG") && l.contains("default/h") && l.contains(note)),
            "{name}: no debug line about it:\n{log}"
        );
        assert!(!log.contains("WARN"), "{name}: only debug:\n{log}");
    }
}

#[test]
fn multi_port_services_with_target_port_by_number_and_by_name_resolved_per_endpoint() {
    // The Service's targetPort is not what the datapath uses: the slice
    // controller resolved it per pod into the slice's ports, by port name.
    let service = "
metadata: {name: m}
spec:
  clusterIP: 10.96.0.1
  ports:
    - {name: http, port: 80, targetPort: web}
    - {name: admin, port: 81, targetPort: 9000}";
    /// (case, slices YAML, expected endpoints per Service port)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a [&'a str])]);
    let cases: &[Case<'_>] = &[
        (
            "two ports, number and name resolved from one slice",
            "
metadata: {name: m-1, labels: {kubernetes.io/service-name: m}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: admin, port: 9000}]
endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]",
            &[
                ("default/m:admin/Tcp", &["10.0.0.1:9000", "10.0.0.2:9000"]),
                ("default/m:http/Tcp", &["10.0.0.1:8080", "10.0.0.2:8080"]),
            ],
        ),
        (
            "the same name maps to different numbers for pods in different slices",
            "
metadata: {name: m-1, labels: {kubernetes.io/service-name: m}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: admin, port: 9000}]
endpoints: [{addresses: [10.0.0.1]}]
---
metadata: {name: m-2, labels: {kubernetes.io/service-name: m}}
addressType: IPv4
ports: [{name: http, port: 8081}, {name: admin, port: 9000}]
endpoints: [{addresses: [10.0.0.2]}]",
            &[
                ("default/m:admin/Tcp", &["10.0.0.1:9000", "10.0.0.2:9000"]),
                ("default/m:http/Tcp", &["10.0.0.1:8080", "10.0.0.2:8081"]),
            ],
        ),
        (
            "a slice that lacks a port contributes nothing to it",
            "
metadata: {name: m-1, labels: {kubernetes.io/service-name: m}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]",
            &[
                ("default/m:admin/Tcp", &[]),
                ("default/m:http/Tcp", &["10.0.0.1:8080"]),
            ],
        ),
    ];
    for (name, slices, want) in cases {
        let (model, problems) = run(&format!("{service}\n---{slices}"));
        no_problems(name, &problems);
        assert_eq!(model.services.len(), want.len(), "{name}");
        for (key, eps) in *want {
            assert_eq!(endpoints(port(&model, key)), *eps, "{name}: {key}");
        }
    }
}

#[test]
fn protocols_tcp_udp_and_sctp_are_carried_through() {
    for (proto, key) in [
        ("TCP", "default/p/Tcp"),
        ("UDP", "default/p/Udp"),
        ("SCTP", "default/p/Sctp"),
    ] {
        let (model, problems) = run(&format!(
            "
metadata: {{name: p}}
spec: {{clusterIP: 10.96.0.1, ports: [{{port: 80, protocol: {proto}}}]}}
---
metadata: {{name: p-1, labels: {{kubernetes.io/service-name: p}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: {proto}}}]
endpoints: [{{addresses: [10.0.0.1]}}]"
        ));
        no_problems(proto, &problems);
        let sp = port(&model, key);
        assert_eq!(endpoints(sp), ["10.0.0.1:8080"], "{proto}");
    }
    // A slice port of another protocol does not serve the Service port.
    let (model, _) = run("
metadata: {name: p}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80, protocol: SCTP}]}
---
metadata: {name: p-1, labels: {kubernetes.io/service-name: p}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.0.0.1]}]");
    assert!(port(&model, "default/p/Sctp").endpoints.is_empty());
    assert_eq!(
        model.services.keys().next().map(|r| r.protocol),
        Some(Protocol::Sctp)
    );
}

#[test]
fn affinity_traffic_policies_health_check_port_source_ranges_and_traffic_distribution_are_carried()
{
    type Check = fn(&ServicePort) -> bool;
    let cases: &[(&str, &str, Check)] = &[
        ("sessionAffinity None", "", |sp| sp.affinity_timeout_s == 0),
        (
            "sessionAffinity ClientIP, default timeout",
            "sessionAffinity: ClientIP",
            |sp| sp.affinity_timeout_s == 10_800,
        ),
        (
            "sessionAffinity ClientIP with its timeout",
            "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
            |sp| sp.affinity_timeout_s == 60,
        ),
        (
            "externalTrafficPolicy Local",
            "externalTrafficPolicy: Local",
            |sp| sp.external_local && !sp.internal_local,
        ),
        (
            "externalTrafficPolicy Cluster",
            "externalTrafficPolicy: Cluster",
            |sp| !sp.external_local,
        ),
        (
            "internalTrafficPolicy Local",
            "internalTrafficPolicy: Local",
            |sp| sp.internal_local && !sp.external_local,
        ),
        (
            "healthCheckNodePort",
            "externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
            |sp| sp.health_check_node_port == 32000,
        ),
        (
            "loadBalancerSourceRanges",
            "loadBalancerSourceRanges: [10.1.0.0/16, 10.2.3.4/32]",
            |sp| {
                sp.source_ranges
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    == ["10.1.0.0/16", "10.2.3.4/32"]
            },
        ),
        ("trafficDistribution unset", "", |sp| {
            sp.traffic_distribution.is_none()
        }),
        (
            "trafficDistribution PreferClose",
            "trafficDistribution: PreferClose",
            |sp| sp.traffic_distribution.as_deref() == Some("PreferClose"),
        ),
        (
            "trafficDistribution PreferSameNode",
            "trafficDistribution: PreferSameNode",
            |sp| sp.traffic_distribution.as_deref() == Some("PreferSameNode"),
        ),
    ];
    for (name, fields, check) in cases {
        let yaml = format!(
            "
metadata: {{name: s}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  ports: [{{port: 80, nodePort: 30080}}]
  {fields}
status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.1}}]}}}}"
        );
        let (model, problems) = run(&yaml);
        no_problems(name, &problems);
        let sp = port(&model, "default/s/Tcp");
        assert!(check(sp), "{name}: {sp:#?}");
    }
}

/// The Service every EndpointSlice case below belongs to.
const WEB: &str = "metadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}";

/// A slice of `web` named `web-<suffix>` with these endpoints (YAML flow
/// list items) and address type.
fn slice(suffix: &str, address_type: &str, endpoints: &str) -> String {
    format!(
        "
metadata: {{name: web-{suffix}, labels: {{kubernetes.io/service-name: web}}}}
addressType: {address_type}
ports: [{{port: 8080}}]
endpoints: [{endpoints}]"
    )
}

#[test]
fn endpoint_conditions_ready_serving_and_terminating() {
    // (conditions, ready, serving, terminating, takes new flows)
    let cases = [
        ("{}", true, true, false, true),
        ("{ready: true}", true, true, false, true),
        // `serving` unset is serving, as kube-proxy reads it (not `ready`).
        ("{ready: false}", false, true, false, false),
        ("{ready: false, serving: false}", false, false, false, false),
        ("{ready: false, serving: true}", false, true, false, false),
        (
            "{ready: false, serving: true, terminating: true}",
            false,
            true,
            true,
            false,
        ),
        (
            "{ready: false, serving: false, terminating: true}",
            false,
            false,
            true,
            false,
        ),
    ];
    for (conditions, ready, serving, terminating, active) in cases {
        // A ready neighbour, so that serving-terminating endpoints do not
        // take new flows (they do only when nothing is ready).
        let (model, problems) = run(&format!(
            "{WEB}\n---{}",
            slice(
                "1",
                "IPv4",
                &format!("{{addresses: [10.0.0.1], conditions: {conditions}}}, {{addresses: [10.0.0.9]}}")
            )
        ));
        no_problems(conditions, &problems);
        let sp = port(&model, "default/web/Tcp");
        let e = sp.endpoints[0];
        assert_eq!(
            (e.ready, e.serving, e.terminating),
            (ready, serving, terminating),
            "{conditions}"
        );
        assert_eq!(
            sp.active_endpoints().iter().any(|a| a.addr == e.addr),
            active,
            "{conditions}"
        );
    }
    // With nothing ready, serving terminating endpoints take new flows.
    let (model, _) = run(&format!(
        "{WEB}\n---{}",
        slice(
            "1",
            "IPv4",
            "{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: true}}"
        )
    ));
    let active: Vec<IpAddr> = port(&model, "default/web/Tcp")
        .active_endpoints()
        .iter()
        .map(|e| e.addr)
        .collect();
    assert_eq!(active, ["10.0.0.1".parse::<IpAddr>().expect("ip")]);
}

#[test]
fn endpoint_node_name_and_zone() {
    // (endpoint fields, local, zone)
    let cases = [
        ("nodeName: node-a, zone: z1", true, Some("z1")),
        ("nodeName: node-b, zone: z2", false, Some("z2")),
        ("nodeName: node-a", true, None),
        ("zone: z1", false, Some("z1")),
        ("{}", false, None),
    ];
    for (fields, local, zone) in cases {
        let fields = if fields == "{}" {
            String::new()
        } else {
            format!(", {fields}")
        };
        let (model, problems) = run(&format!(
            "{WEB}\n---{}",
            slice("1", "IPv4", &format!("{{addresses: [10.0.0.1]{fields}}}"))
        ));
        no_problems(&fields, &problems);
        let sp = port(&model, "default/web/Tcp");
        assert_eq!(sp.endpoints[0].local, local, "{fields}");
        let got = sp
            .topology
            .get(&sp.endpoints[0].addr)
            .and_then(|t| t.zone.as_deref());
        assert_eq!(got, zone, "{fields}");
    }
}

#[test]
fn endpoint_hints_for_zones_and_nodes() {
    let cases: [(&str, Option<Topology>); 3] = [
        ("", None),
        (
            ", hints: {forZones: [{name: z1}, {name: z2}]}",
            Some(Topology {
                zone: Some("z1".into()),
                for_zones: vec!["z1".into(), "z2".into()],
                for_nodes: vec![],
            }),
        ),
        (
            ", hints: {forZones: [{name: z1}], forNodes: [{name: node-a}]}",
            Some(Topology {
                zone: Some("z1".into()),
                for_zones: vec!["z1".into()],
                for_nodes: vec!["node-a".into()],
            }),
        ),
    ];
    for (hints, want) in cases {
        let zone = if hints.is_empty() { "" } else { ", zone: z1" };
        let (model, problems) = run(&format!(
            "{WEB}\n---{}",
            slice(
                "1",
                "IPv4",
                &format!("{{addresses: [10.0.0.1]{zone}{hints}}}")
            )
        ));
        no_problems(hints, &problems);
        let sp = port(&model, "default/web/Tcp");
        assert_eq!(sp.topology.values().next(), want.as_ref(), "{hints}");
    }
}

#[test]
fn many_slices_per_service_merged_and_an_address_in_two_slices_counted_once() {
    let cases: &[(&str, Vec<String>, &[&str])] = &[
        (
            "three slices merged",
            vec![
                slice("1", "IPv4", "{addresses: [10.0.0.1]}"),
                slice(
                    "2",
                    "IPv4",
                    "{addresses: [10.0.0.2]}, {addresses: [10.0.0.3]}",
                ),
                slice("3", "IPv4", "{addresses: [10.0.0.4]}"),
            ],
            &[
                "10.0.0.1:8080",
                "10.0.0.2:8080",
                "10.0.0.3:8080",
                "10.0.0.4:8080",
            ],
        ),
        (
            "a pod moving between slices is one endpoint, its best state wins",
            vec![
                slice(
                    "1",
                    "IPv4",
                    "{addresses: [10.0.0.1], conditions: {ready: false}}",
                ),
                slice(
                    "2",
                    "IPv4",
                    "{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}",
                ),
            ],
            &["10.0.0.1:8080", "10.0.0.2:8080"],
        ),
        (
            "the same address twice in one slice",
            vec![slice(
                "1",
                "IPv4",
                "{addresses: [10.0.0.1]}, {addresses: [10.0.0.1]}",
            )],
            &["10.0.0.1:8080"],
        ),
    ];
    for (name, slices, want) in cases {
        let (model, problems) = run(&format!("{WEB}\n---{}", slices.join("\n---")));
        no_problems(name, &problems);
        let sp = port(&model, "default/web/Tcp");
        assert_eq!(endpoints(sp), *want, "{name}");
        assert!(sp.endpoints.iter().all(|e| e.ready), "{name}: {sp:?}");
    }
}

#[test]
fn endpoint_slice_address_type_is_respected() {
    // (addressType, endpoints, expected endpoints, expected problem)
    let cases: &[(&str, &str, &[&str], Option<&str>)] = &[
        ("IPv4", "{addresses: [10.0.0.1]}", &["10.0.0.1:8080"], None),
        (
            "IPv6",
            "{addresses: ['fd00::1']}",
            &["[fd00::1]:8080"],
            None,
        ),
        ("FQDN", "{addresses: [pod.example.org]}", &[], None),
        (
            "IPv4",
            "{addresses: ['fd00::1']}, {addresses: [10.0.0.2]}",
            &["10.0.0.2:8080"],
            Some("is not an IPv4 address as addressType says"),
        ),
        (
            "IPv6",
            "{addresses: [10.0.0.1]}",
            &[],
            Some("is not an IPv6 address as addressType says"),
        ),
    ];
    for (address_type, eps, want, problem) in cases {
        let name = format!("{address_type} {eps}");
        let (model, problems) = run(&format!("{WEB}\n---{}", slice("1", address_type, eps)));
        assert_eq!(endpoints(port(&model, "default/web/Tcp")), *want, "{name}");
        match problem {
            None => no_problems(&name, &problems),
            Some(p) => assert!(
                problems.len() == 1 && problems[0].message.contains(p),
                "{name}: {problems:#?}"
            ),
        }
    }
}

#[test]
fn slices_whose_service_does_not_exist_yet_are_held_until_it_does() {
    // A source keeps every slice it is given; translation ignores the ones
    // without a Service, quietly, and uses them as soon as it appears.
    let slices = [
        slice("1", "IPv4", "{addresses: [10.0.0.1]}"),
        slice("2", "IPv4", "{addresses: [10.0.0.2]}"),
    ]
    .join("\n---");
    let cases: &[(&str, String, &[&str])] = &[
        ("slices alone", slices.clone(), &[]),
        (
            "the Service arrives",
            format!("{WEB}\n---{slices}"),
            &["10.0.0.1:8080", "10.0.0.2:8080"],
        ),
    ];
    for (name, yaml, want) in cases {
        let (model, problems) = run(yaml);
        no_problems(name, &problems);
        let got: Vec<String> = model.services.values().flat_map(endpoints).collect();
        assert_eq!(got, *want, "{name}");
    }
}

#[test]
fn service_proxy_name_label_and_headless_slices_are_skipped_as_kube_proxy_does() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "a Service labelled service-proxy-name",
            format!(
                "metadata: {{name: web, labels: {{service.kubernetes.io/service-proxy-name: other}}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n---{}",
                slice("1", "IPv4", "{addresses: [10.0.0.1]}")
            ),
            &[],
        ),
        (
            "a slice labelled headless",
            format!(
                "{WEB}\n---{}",
                slice("1", "IPv4", "{addresses: [10.0.0.1]}").replace(
                    "kubernetes.io/service-name: web",
                    "kubernetes.io/service-name: web, service.kubernetes.io/headless: ''"
                )
            ),
            &["default/web/Tcp"],
        ),
        (
            "a slice labelled service-proxy-name",
            format!(
                "{WEB}\n---{}",
                slice("1", "IPv4", "{addresses: [10.0.0.1]}").replace(
                    "kubernetes.io/service-name: web",
                    "kubernetes.io/service-name: web, service.kubernetes.io/service-proxy-name: other"
                )
            ),
            &["default/web/Tcp"],
        ),
    ];
    for (name, yaml, ports) in cases {
        let (model, problems) = run(yaml);
        no_problems(name, &problems);
        let got: Vec<String> = model
            .services
            .keys()
            .map(|r| format!("{r}/{:?}", r.protocol))
            .collect();
        assert_eq!(got, *ports, "{name}");
        assert!(
            model.services.values().all(|sp| sp.endpoints.is_empty()),
            "{name}: the labelled slice added endpoints: {model:?}"
        );
    }
}
