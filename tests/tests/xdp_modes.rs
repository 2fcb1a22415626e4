//! XDP attach modes on the interfaces users' nodes have: a veth whose far
//! side runs no XDP program (kind, k3d, any container node), a veth whose
//! far side does, and a driver without native XDP. With default flags the
//! agent must forward on all of them, say which mode each interface got and
//! why, and keep saying so across restarts.
//!
//! Needs root. Run through `cargo xtask test`.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use lb_agent::datapath::xdp_mode::{REASON_FORCED_NATIVE, REASON_NO_NATIVE, REASON_VETH};
use lb_tests::{
    manifests::{docs, service, slice, Ep},
    rig::{http_get, serve_all_pods, sh, tcp_hello, udp_hello, wait_until, Cluster, ClusterSpec},
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// A TCP NodePort (30080) and a UDP NodePort (30053) whose endpoints are
/// both pods of node-b: through node-a, every packet is forwarded back out
/// of node-a's eth0 (SNAT, then XDP_TX), and every reply too.
fn remote_only_services() -> String {
    let eps = [
        Ep {
            addr: "10.244.2.10",
            node: "node-b",
            ready: true,
            terminating: false,
        },
        Ep {
            addr: "10.244.2.11",
            node: "node-b",
            ready: true,
            terminating: false,
        },
    ];
    docs(&[
        service("web", "10.96.0.10", 80, 8080, Some(30080), "TCP"),
        slice("web", "web-1", 8080, "TCP", &eps),
        service("dns", "10.96.0.53", 53, 5353, Some(30053), "UDP"),
        slice("dns", "dns-1", 5353, "UDP", &eps),
    ])
}

fn start_agents(c: &mut Cluster, a_flags: &[&str]) {
    c.node_mut("a").start_agent(a_flags);
    c.node_mut("b").start_agent(&[]);
    for n in ["a", "b"] {
        c.node(n).wait_agent_ready(WAIT);
    }
}

/// 40 TCP connections and 40 UDP datagrams from the client to node-a's
/// NodePorts all answered, by node-b's pods, which see node-a (SNAT).
fn node_a_forwards_to_node_b(c: &Cluster) {
    let client = c.client_ns();
    let mut seen = BTreeMap::new();
    for i in 0..40 {
        let (line, _) = tcp_hello(&client, sa("10.99.0.1:30080"), IO)
            .unwrap_or_else(|e| panic!("TCP connection {i} through node-a: {e}"));
        let mut words = line.split_whitespace();
        let backend = words.next().unwrap_or_default().to_string();
        let peer = words.next().unwrap_or_default();
        assert!(peer.starts_with("10.99.0.1:"), "{backend} saw {peer}");
        *seen.entry(backend).or_insert(0) += 1;
    }
    for i in 0..40 {
        let (line, from) = udp_hello(&client, sa("10.99.0.1:30053"), IO)
            .unwrap_or_else(|e| panic!("UDP datagram {i} through node-a: {e}"));
        assert_eq!(
            from,
            sa("10.99.0.1:30053"),
            "the reply comes from the NodePort"
        );
        let backend = line.split_whitespace().next().unwrap_or_default();
        *seen.entry(backend.to_string()).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        ["b0", "b1"],
        "{seen:?}"
    );
}

/// The XDP program slot of node-a's eth0 as `ip link` names it: `xdp`
/// (native), `xdpgeneric` (skb), or `none`.
fn xdp_slot(c: &Cluster, letter: &str) -> &'static str {
    let link = sh(Some(&c.node(letter).ns), &["ip", "link", "show", "eth0"]);
    if link.contains(" xdpgeneric") {
        "xdpgeneric"
    } else if link.contains(" xdp") {
        "xdp"
    } else {
        "none"
    }
}

/// The line the agent logs for an interface's XDP mode.
fn attached_line(iface: &str, mode: &str, reason: &str) -> String {
    format!("XDP attached iface={iface} mode={mode} reason=\"{reason}\"")
}

/// node-a's `lb_xdp_attach_info` samples, as printed.
fn attach_info(c: &Cluster) -> Vec<String> {
    let (status, body) = http_get(&c.node("a").ns, sa("127.0.0.1:10249"), "/metrics", IO)
        .expect("scrape node-a's metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| l.starts_with("lb_xdp_attach_info{"))
        .map(str::to_string)
        .collect()
}

fn a_veth_node_forwards_nodeport_to_a_remote_backend(xdp_far_side: bool, tag: &str) {
    let mut c = Cluster::new(ClusterSpec {
        xdp_far_side,
        ..ClusterSpec::default().tag(tag)
    });
    let _s = serve_all_pods(&c);
    c.write_manifest("svc.yaml", &remote_only_services());
    start_agents(&mut c, &[]);
    // Default flags: a veth gets generic mode whatever its far side runs,
    // since that can change under the agent's feet.
    let log = c.node("a").agent_log();
    assert!(
        log.contains(&attached_line("eth0", "skb", REASON_VETH)),
        "{log}"
    );
    assert_eq!(xdp_slot(&c, "a"), "xdpgeneric");
    node_a_forwards_to_node_b(&c);
    assert_eq!(
        attach_info(&c),
        [format!(
            "lb_xdp_attach_info{{iface=\"eth0\",mode=\"skb\",reason=\"{REASON_VETH}\"}} 1"
        )]
    );
}

#[test]
fn a_veth_whose_peer_runs_no_xdp_forwards_nodeport_to_a_remote_backend() {
    a_veth_node_forwards_nodeport_to_a_remote_backend(false, "plain");
}

#[test]
fn a_veth_whose_peer_runs_xdp_forwards_nodeport_to_a_remote_backend_in_either_mode() {
    a_veth_node_forwards_nodeport_to_a_remote_backend(true, "xdppeer");
    // Native mode works here too, as the far side takes XDP frames: the
    // bench's XDP-capable shape.
    let mut c = Cluster::new(ClusterSpec {
        xdp_far_side: true,
        ..ClusterSpec::default().tag("native")
    });
    let _s = serve_all_pods(&c);
    c.write_manifest("svc.yaml", &remote_only_services());
    start_agents(&mut c, &["--xdp-mode", "native"]);
    let log = c.node("a").agent_log();
    assert!(
        log.contains(&attached_line("eth0", "native", REASON_FORCED_NATIVE)),
        "{log}"
    );
    assert_eq!(xdp_slot(&c, "a"), "xdp");
    node_a_forwards_to_node_b(&c);
}

#[test]
fn a_restarted_agent_replaces_an_xdp_link_of_another_mode_and_readopts_its_own() {
    let mut c = Cluster::new(ClusterSpec::default().tag("modes"));
    let _s = serve_all_pods(&c);
    c.write_manifest("svc.yaml", &remote_only_services());
    // What an older agent (or one told so) leaves: a native link on a veth.
    start_agents(&mut c, &["--xdp-mode", "native"]);
    assert_eq!(xdp_slot(&c, "a"), "xdp");
    let links = c.node("a").bpffs().join("links");
    let xdp_pins = || {
        std::fs::read_dir(&links)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("xdp-"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(xdp_pins(), 1);

    c.node_mut("a").kill_agent();
    c.node_mut("a").start_agent(&[]);
    c.node("a").wait_agent_ready(WAIT);
    let log = c.node("a").agent_log();
    assert!(
        log.contains(&format!(
            "{} link=\"replaced a native-mode link\"",
            attached_line("eth0", "skb", REASON_VETH)
        )),
        "{log}"
    );
    assert_eq!(xdp_slot(&c, "a"), "xdpgeneric");
    assert_eq!(xdp_pins(), 1);
    node_a_forwards_to_node_b(&c);

    // The same flags again: the link is kept, not replaced.
    c.node_mut("a").stop_agent();
    c.node_mut("a").start_agent(&[]);
    c.node("a").wait_agent_ready(WAIT);
    let log = c.node("a").agent_log();
    assert!(
        log.contains(&format!(
            "{} link=\"re-adopted\"",
            attached_line("eth0", "skb", REASON_VETH)
        )),
        "{log}"
    );
    assert_eq!(xdp_slot(&c, "a"), "xdpgeneric");
    node_a_forwards_to_node_b(&c);
    assert_eq!(attach_info(&c).len(), 1, "{:?}", attach_info(&c));
}

#[test]
fn auto_falls_back_to_generic_mode_where_the_driver_lacks_native_xdp() {
    let mut c = Cluster::new(ClusterSpec {
        nodes: 1,
        pods_per_node: 1,
        ..ClusterSpec::default().tag("nonative")
    });
    let ns = c.node("a").ns.clone();
    // A bridge has no native XDP.
    sh(Some(&ns), &["ip", "link", "add", "lbbr0", "type", "bridge"]);
    sh(Some(&ns), &["ip", "link", "set", "lbbr0", "up"]);
    c.node_mut("a").start_agent(&["--iface", "lbbr0"]);
    c.node("a").wait_agent_ready(WAIT);
    let log = c.node("a").agent_log();
    let fallback = format!(
        "XDP attached iface=lbbr0 mode=skb reason=\"{REASON_NO_NATIVE} (native mode failed: "
    );
    assert!(log.contains(&fallback), "{log}");
    assert!(
        log.contains(&attached_line("eth0", "skb", REASON_VETH)),
        "{log}"
    );
    let link = sh(Some(&ns), &["ip", "link", "show", "lbbr0"]);
    assert!(link.contains(" xdpgeneric"), "{link}");

    // Forced native mode refuses such a driver and says what to do.
    c.node_mut("a").stop_agent();
    c.node_mut("a")
        .start_agent(&["--iface", "lbbr0", "--xdp-mode", "native"]);
    wait_until(WAIT, "the agent refuses native mode on lbbr0", || {
        c.node("a")
            .agent_log()
            .contains("the driver lacks native XDP (try --xdp-mode auto or skb)")
    });
}
