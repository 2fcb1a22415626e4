//! SCTP Services end to end: a ClusterIP from a pod and a NodePort from
//! outside, both with a targetPort other than the Service port, so every
//! packet's port and CRC32c are rewritten on the way in and back.
//!
//! The packets are SCTP's own, built and read on raw sockets
//! (`lb_tests::sctp`): the development kernel has no SCTP stack. Needs
//! root. Run through `cargo xtask test`.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use lb_tests::{
    manifests::one_port,
    rig::{Cluster, ClusterSpec},
    sctp::{hello, Responder},
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().expect("test address")
}

/// Backend name → answers over `n` packets from `ns` to `dst` (source
/// ports from `first_port` on), checking that each answer comes from
/// `dst` with a valid CRC32c and that the backend saw the source `seen_as`
/// gives for it.
fn spread(
    ns: &str,
    dst: SocketAddrV4,
    first_port: u16,
    n: u16,
    seen_as: impl Fn(&str, u16) -> String,
) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for port in first_port..first_port + n {
        let (answer, text) =
            hello(ns, port, dst, IO).unwrap_or_else(|e| panic!("packet from port {port}: {e}"));
        assert_eq!(answer.from, dst, "the answer comes from the frontend");
        assert!(answer.crc_ok, "the answer's CRC32c is wrong: {answer:?}");
        let mut parts = text.split_whitespace();
        let name = parts.next().unwrap_or_default().to_string();
        let peer = parts.next().unwrap_or_default();
        let want = seen_as(&name, port);
        assert!(
            peer.starts_with(&want),
            "{name} saw {peer}, expected {want}"
        );
        *hits.entry(name).or_insert(0) += 1;
    }
    hits
}

#[test]
fn sctp_reaches_a_cluster_ip_from_a_pod_and_a_node_port_from_outside() {
    let mut c = Cluster::new(ClusterSpec::default());
    let responders: Vec<Responder> = c
        .pods()
        .iter()
        .map(|p| Responder::start(&p.ns, 3869, &p.name))
        .collect();
    let (a0, b0) = (c.pod("a0").clone(), c.pod("b0").clone());
    c.write_manifest(
        "sig.yaml",
        &one_port(
            "sig",
            "10.96.0.40",
            3868,
            3869,
            30868,
            "SCTP",
            &[
                (&a0.addr.to_string(), "node-a"),
                (&b0.addr.to_string(), "node-b"),
            ],
        ),
    );
    c.start_agents(&["a", "b"], WAIT);

    // A pod's packets reach both backends with its own address.
    let a1 = c.pod("a1").clone();
    let hits = spread(&a1.ns, sa("10.96.0.40:3868"), 41000, 30, |_, port| {
        format!("{}:{port}", a1.addr)
    });
    assert!(
        hits.contains_key(&a0.name) && hits.contains_key(&b0.name),
        "ClusterIP: {hits:?}"
    );

    // From outside, through each node: a local backend sees the client,
    // a remote one the node (SNAT, to a port of its own).
    let client = c.client_ns().to_string();
    for (node, addr, local, first_port) in [
        ("a", "10.99.0.1", &a0.name, 42000),
        ("b", "10.99.0.2", &b0.name, 43000),
    ] {
        let hits = spread(
            &client,
            sa(&format!("{addr}:30868")),
            first_port,
            30,
            |name, port| {
                if name == local {
                    format!("10.99.0.100:{port}")
                } else {
                    format!("{addr}:")
                }
            },
        );
        assert_eq!(hits.len(), 2, "NodePort on node-{node}: {hits:?}");
    }
    for (r, p) in responders.iter().zip(c.pods()) {
        assert_eq!(r.bad_crc(), 0, "{} got packets with a wrong CRC32c", p.name);
    }
}
