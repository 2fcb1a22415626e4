//! What depends on the node itself: which of its addresses serve NodePorts
//! and on which interfaces (a second NIC added while the agent runs), and
//! its zone, which decides whether topology hints are followed.
//!
//! Needs root. Run through `cargo xtask test`.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use lb_tests::{
    manifests::{docs, service},
    rig::{serve_all_pods, sh, tcp_hello, wait_until, Cluster, ClusterSpec},
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

/// The pods' addresses: a0, a1 on node-a; b0, b1 on node-b.
const A0: &str = "10.244.1.10";
const A1: &str = "10.244.1.11";
const B0: &str = "10.244.2.10";
const B1: &str = "10.244.2.11";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// Service `name` (ClusterIP `vip`:80, NodePort `node_port`, target 8080)
/// with one slice of ready endpoints `(address, node, zones hinted for)`;
/// an empty zone list writes no hints.
fn hinted_service(name: &str, vip: &str, node_port: u16, eps: &[(&str, &str, &[&str])]) -> String {
    let mut slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: test\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - name: p\n    protocol: TCP\n    port: 8080\nendpoints:\n"
    );
    for (addr, node, zones) in eps {
        slice.push_str(&format!(
            "  - addresses: [{addr}]\n    nodeName: {node}\n    conditions: {{ready: true}}\n"
        ));
        if !zones.is_empty() {
            let names: Vec<String> = zones.iter().map(|z| format!("{{name: {z}}}")).collect();
            slice.push_str(&format!(
                "    hints: {{forZones: [{}]}}\n",
                names.join(", ")
            ));
        }
    }
    docs(&[service(name, vip, 80, 8080, Some(node_port), "TCP"), slice])
}

/// Pod name → connections, over `n` TCP connections from `ns` to `dst`.
fn spread(ns: &str, dst: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for i in 0..n {
        let (line, _) =
            tcp_hello(ns, dst, IO).unwrap_or_else(|e| panic!("connection {i} to {dst}: {e}"));
        let name = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        *hits.entry(name).or_insert(0) += 1;
    }
    hits
}

#[test]
fn a_nodeport_is_served_on_a_second_interface_added_while_the_agent_runs() {
    let mut c = Cluster::new(ClusterSpec::default().tag("npwire"));
    let _s = serve_all_pods(&c);
    // One Service with a remote backend (SNAT through eth0), one with a
    // local one (the backend sees the client).
    c.write_manifest(
        "far.yaml",
        &hinted_service("far", "10.96.0.10", 30080, &[(B0, "node-b", &[])]),
    );
    c.write_manifest(
        "near.yaml",
        &hinted_service("near", "10.96.0.11", 30081, &[(A1, "node-a", &[])]),
    );
    c.node_mut("a")
        .start_agent(&["--nodeport-addresses", "10.99.0.0/24,10.98.0.0/24"]);
    c.node("a").wait_agent_ready(WAIT);
    assert_eq!(
        tcp_hello(&c.client_ns(), sa("10.99.0.1:30080"), IO)
            .expect("NodePort on eth0")
            .0
            .split_whitespace()
            .next(),
        Some("b0")
    );

    // A NIC appears, with an address inside the NodePort ranges.
    let wire = c.add_second_wire("a", "10.98.0.1/24", "10.98.0.100/24");
    wait_until(WAIT, "the NodePorts answer on eth1's address", || {
        tcp_hello(&wire, sa("10.98.0.1:30080"), Duration::from_millis(300))
            .is_ok_and(|(l, _)| l.starts_with("b0 "))
    });
    for _ in 0..5 {
        let (far, _) = tcp_hello(&wire, sa("10.98.0.1:30080"), IO).expect("far through eth1");
        assert!(far.starts_with("b0 "), "{far}");
        let (near, _) = tcp_hello(&wire, sa("10.98.0.1:30081"), IO).expect("near through eth1");
        assert!(near.starts_with("a1 10.98.0.100:"), "{near}");
    }
    let log = c.node("a").agent_log();
    assert!(
        log.lines()
            .any(|l| l.contains("XDP attached") && l.contains("iface=eth1")),
        "the node programs went onto eth1:\n{log}"
    );

    // The address leaves: the NodePort goes from it, and so do the programs.
    c.node_mut("a").stop_agent();
    c.node_mut("a").start_agent(&[]);
    c.node("a").wait_agent_ready(WAIT);
    let log = c.node("a").agent_log();
    assert!(
        log.contains("detached from an interface that no longer serves NodePorts"),
        "the default (primary) leaves eth1 out:\n{log}"
    );
    assert!(
        tcp_hello(&wire, sa("10.98.0.1:30080"), Duration::from_millis(500)).is_err(),
        "no NodePort on a non-primary address by default"
    );
    assert!(tcp_hello(&c.client_ns(), sa("10.99.0.1:30080"), IO).is_ok());
}

#[test]
fn zone_hints_are_followed_when_every_endpoint_has_one_and_ignored_otherwise() {
    let mut c = Cluster::new(ClusterSpec::default().tag("zones"));
    let _s = serve_all_pods(&c);
    // a0 and b0 are hinted for zone-a, a1 and b1 for zone-b.
    c.write_manifest(
        "hinted.yaml",
        &hinted_service(
            "hinted",
            "10.96.0.10",
            30080,
            &[
                (A0, "node-a", &["zone-a"]),
                (A1, "node-a", &["zone-b"]),
                (B0, "node-b", &["zone-a"]),
                (B1, "node-b", &["zone-b"]),
            ],
        ),
    );
    // The same, but b1 has no hint: the hints are not followed.
    c.write_manifest(
        "partial.yaml",
        &hinted_service(
            "partial",
            "10.96.0.11",
            30081,
            &[
                (A0, "node-a", &["zone-a"]),
                (A1, "node-a", &["zone-b"]),
                (B0, "node-b", &["zone-a"]),
                (B1, "node-b", &[]),
            ],
        ),
    );
    c.node_mut("a").start_agent(&["--zone", "zone-a"]);
    c.node("a").wait_agent_ready(WAIT);
    let client = c.client_ns();
    let pod = c.pod("a1").ns.clone();

    // From outside (NodePort) and from a pod (ClusterIP): zone-a's only.
    for (ns, dst) in [(&client, "10.99.0.1:30080"), (&pod, "10.96.0.10:80")] {
        let hits = spread(ns, sa(dst), 40);
        let names: Vec<&str> = hits.keys().map(String::as_str).collect();
        assert_eq!(names, ["a0", "b0"], "{dst}: {hits:?}");
    }
    // Ignored: all four get connections.
    let hits = spread(&client, sa("10.99.0.1:30081"), 60);
    let names: Vec<&str> = hits.keys().map(String::as_str).collect();
    assert_eq!(names, ["a0", "a1", "b0", "b1"], "{hits:?}");
}

#[test]
fn a_nodeport_to_a_remote_backend_is_snated_to_the_address_of_the_interface_it_leaves_by() {
    let mut c = Cluster::new(ClusterSpec::default().tag("egress"));
    let _s = serve_all_pods(&c);
    // A second network between the nodes, and node-b's pods behind it:
    // node-a reaches b0 by eth1, whose address is not the node's.
    c.link_nodes("a", "b", "10.97.0.1/24", "10.97.0.2/24");
    let node_a = c.node("a").ns.clone();
    sh(
        Some(&node_a),
        &[
            "ip",
            "route",
            "replace",
            "10.244.2.0/24",
            "via",
            "10.97.0.2",
        ],
    );
    c.write_manifest(
        "far.yaml",
        &hinted_service("far", "10.96.0.10", 30080, &[(B0, "node-b", &[])]),
    );
    // The rig gives every agent `--iface eth0`; eth1 joins it.
    c.node_mut("a").start_agent(&["--iface", "eth1"]);
    c.node("a").wait_agent_ready(WAIT);

    for _ in 0..5 {
        let (line, _) =
            tcp_hello(&c.client_ns(), sa("10.99.0.1:30080"), IO).expect("NodePort to b0");
        let peer = line.split_whitespace().nth(1).unwrap_or_default();
        let peer: SocketAddr = peer
            .parse()
            .unwrap_or_else(|e| panic!("greeting {line:?}: {e}"));
        assert_eq!(
            peer.ip().to_string(),
            "10.97.0.1",
            "b0 sees eth1's address: {line}"
        );
        // Clear of the node's own ephemeral ports (Linux's default range
        // in the node's namespace).
        assert!(
            !(32768..=60999).contains(&peer.port()),
            "{line}: a port of the node's ephemeral range"
        );
    }
}
