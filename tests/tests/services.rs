//! End-to-end scenarios: real TCP and UDP through the agent and the datapath
//! in a cluster of network namespaces (client, two nodes, two pods per node).
//!
//! Needs root. Run through `cargo xtask test`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    manifests::{docs, service, slice, Ep},
    rig::{
        in_ns, serve_all_pods, tcp_hello, udp_hello, wait_until, Cluster, ClusterSpec, EchoStream,
    },
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn start_agents(c: &mut Cluster) {
    for n in ["a", "b"] {
        c.node_mut(n).start_agent(&[]);
    }
    for n in ["a", "b"] {
        c.node(n).wait_agent_ready(WAIT);
    }
}

/// The pods' addresses: a0, a1 on node-a; b0, b1 on node-b.
const A0: &str = "10.244.1.10";
const A1: &str = "10.244.1.11";
const B0: &str = "10.244.2.10";
const B1: &str = "10.244.2.11";

/// One Service port with one slice of ready endpoints (address, node).
fn one_port(
    name: &str,
    vip: &str,
    port: u16,
    target: u16,
    node_port: u16,
    proto: &str,
    endpoints: &[(&str, &str)],
) -> String {
    let eps: Vec<Ep<'_>> = endpoints
        .iter()
        .map(|(a, n)| Ep {
            addr: a,
            node: n,
            ready: true,
            terminating: false,
        })
        .collect();
    docs(&[
        service(name, vip, port, target, Some(node_port), proto),
        slice(name, &format!("{name}-1"), target, proto, &eps),
    ])
}

fn web(endpoints: &[(&str, &str)]) -> String {
    one_port("web", "10.96.0.10", 80, 8080, 30080, "TCP", endpoints)
}

fn dns(endpoints: &[(&str, &str)]) -> String {
    one_port("dns", "10.96.0.53", 53, 5353, 30053, "UDP", endpoints)
}

/// Backend name → count over `n` TCP connections from `ns` to `dst`,
/// checking each reply line names the expected client address.
fn tcp_spread(
    ns: &str,
    dst: SocketAddr,
    n: usize,
    seen_as: Option<&str>,
) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for i in 0..n {
        let (line, _) =
            tcp_hello(ns, dst, IO).unwrap_or_else(|e| panic!("connection {i} to {dst}: {e}"));
        let mut parts = line.split_whitespace();
        let name = parts.next().unwrap_or_default().to_string();
        if let (Some(want), Some(peer)) = (seen_as, parts.next()) {
            assert!(
                peer.starts_with(&format!("{want}:")),
                "{name} saw {peer}, expected {want}"
            );
        }
        *hits.entry(name).or_insert(0) += 1;
    }
    hits
}

#[test]
fn pod_to_cluster_ip_tcp_reaches_every_backend_on_both_nodes() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest(
        "web.yaml",
        &web(&[(A1, "node-a"), (B0, "node-b"), (B1, "node-b")]),
    );
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    // The backend sees the pod's own address: no SNAT inside the cluster.
    let hits = tcp_spread(&client, sa("10.96.0.10:80"), 200, Some(A0));
    for backend in ["a1", "b0", "b1"] {
        let name = c.pod(backend).name.clone();
        assert!(
            hits.get(&name).copied().unwrap_or(0) > 0,
            "{name} never reached: {hits:?}"
        );
    }
    assert_eq!(hits.values().sum::<usize>(), 200);
}

#[test]
fn pod_to_cluster_ip_udp_answers_from_the_cluster_ip() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest(
        "dns.yaml",
        &dns(&[(A1, "node-a"), (B0, "node-b"), (B1, "node-b")]),
    );
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    let mut names = BTreeMap::new();
    for i in 0..60 {
        let (line, from) = udp_hello(&client, sa("10.96.0.53:53"), IO)
            .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
        assert_eq!(
            from,
            sa("10.96.0.53:53"),
            "the reply comes from the ClusterIP"
        );
        *names
            .entry(
                line.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            )
            .or_insert(0) += 1;
    }
    assert!(names.len() >= 2, "several backends answer: {names:?}");
}

#[test]
fn client_to_node_port_on_each_node_reaches_local_and_remote_backends() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(A0, "node-a"), (B0, "node-b")]));
    c.write_manifest("dns.yaml", &dns(&[(A0, "node-a"), (B0, "node-b")]));
    start_agents(&mut c);
    let client = c.client_ns().to_string();
    for (node, addr, local, remote) in [
        ("a", "10.99.0.1", "a0", "b0"),
        ("b", "10.99.0.2", "b0", "a0"),
    ] {
        let local = c.pod(local).name.clone();
        let remote = c.pod(remote).name.clone();
        let mut seen = BTreeMap::new();
        for i in 0..40 {
            let (line, _) = tcp_hello(&client, sa(&format!("{addr}:30080")), IO)
                .unwrap_or_else(|e| panic!("node-{node} TCP connection {i}: {e}"));
            let mut parts = line.split_whitespace();
            let name = parts.next().unwrap_or_default().to_string();
            let peer = parts.next().unwrap_or_default().to_string();
            // A local backend sees the client; a remote one sees this node (SNAT).
            let want = if name == local {
                "10.99.0.100:"
            } else {
                &format!("{addr}:")
            };
            assert!(peer.starts_with(want), "node-{node}: {name} saw {peer}");
            *seen.entry(name).or_insert(0) += 1;
        }
        assert!(
            seen.contains_key(&local) && seen.contains_key(&remote),
            "node-{node} TCP: {seen:?}"
        );

        let mut seen = BTreeMap::new();
        for i in 0..40 {
            let dst = sa(&format!("{addr}:30053"));
            let (line, from) = udp_hello(&client, dst, IO)
                .unwrap_or_else(|e| panic!("node-{node} UDP datagram {i}: {e}"));
            assert_eq!(from, dst, "the UDP reply comes from the NodePort");
            *seen
                .entry(
                    line.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                )
                .or_insert(0) += 1;
        }
        assert!(
            seen.contains_key(&local) && seen.contains_key(&remote),
            "node-{node} UDP: {seen:?}"
        );
    }
}

#[test]
fn removing_a_backend_moves_new_connections_and_spares_other_streams() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    let all = [(A1, "node-a"), (B0, "node-b"), (B1, "node-b")];
    c.write_manifest("web.yaml", &web(&all));
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    let mut stream = EchoStream::open(&client, sa("10.96.0.10:80"), IO);
    stream.round_trip();
    // Remove a backend other than the stream's.
    let names: Vec<(String, (&str, &str))> = all
        .iter()
        .map(|(a, n)| (c.pod_by_addr(a).name.clone(), (*a, *n)))
        .collect();
    let (gone, _) = names
        .iter()
        .find(|(name, _)| *name != stream.backend)
        .expect("another backend")
        .clone();
    let keep: Vec<(&str, &str)> = names
        .iter()
        .filter(|(n, _)| *n != gone)
        .map(|(_, e)| *e)
        .collect();
    c.write_manifest("web.yaml", &web(&keep));
    let changed = Instant::now();
    // Within a second, 30 new connections in a row avoid the removed backend.
    let mut clean = 0;
    wait_until(
        Duration::from_secs(1),
        "new connections avoid the removed backend",
        || {
            stream.round_trip();
            let hits = tcp_spread(&client, sa("10.96.0.10:80"), 1, None);
            if hits.contains_key(&gone) {
                clean = 0
            } else {
                clean += 1
            }
            clean >= 30
        },
    );
    eprintln!("removal took effect within {:?}", changed.elapsed());
    for _ in 0..20 {
        stream.round_trip();
    }
}

#[test]
fn deleted_service_is_refused_and_works_again_when_recreated() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(B0, "node-b")]));
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    tcp_hello(&client, sa("10.96.0.10:80"), IO).expect("works at first");
    c.remove_manifest("web.yaml");
    wait_until(WAIT, "the deleted Service stops answering", || {
        tcp_hello(&client, sa("10.96.0.10:80"), Duration::from_millis(300)).is_err()
    });
    c.write_manifest("web.yaml", &web(&[(B0, "node-b")]));
    wait_until(WAIT, "the re-created Service answers", || {
        tcp_hello(&client, sa("10.96.0.10:80"), Duration::from_millis(300)).is_ok()
    });
}

#[test]
fn service_without_endpoints_refuses_with_reset_and_port_unreachable() {
    let mut c = Cluster::new(ClusterSpec::default());
    c.write_manifest("web.yaml", &web(&[]));
    c.write_manifest("dns.yaml", &dns(&[]));
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    let started = Instant::now();
    let err = tcp_hello(&client, sa("10.96.0.10:80"), IO).expect_err("no endpoint");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "TCP gets a reset: {err}"
    );
    assert!(started.elapsed() < IO, "refused at once, not timed out");
    let err = in_ns(&client, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect(sa("10.96.0.53:53"))?;
        s.set_read_timeout(Some(IO))?;
        s.send(b"anyone?")?;
        s.recv(&mut [0u8; 64])
    })
    .expect_err("no endpoint");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "UDP gets port unreachable: {err}"
    );
}

#[test]
fn bad_manifests_are_reported_and_the_rest_keeps_working() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(B0, "node-b")]));
    c.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n  spec: [\n",
    );
    c.write_manifest(
        "bad-ip.yaml",
        &service("bad-ip", "10.96.0.999", 80, 8080, None, "TCP"),
    );
    c.write_manifest(
        "port-zero.yaml",
        &service("port-zero", "10.96.0.20", 0, 8080, None, "TCP"),
    );
    c.write_manifest(
        "unknown.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm, namespace: test}\n",
    );
    c.write_manifest(
        "dup.yaml",
        &service("zz-duplicate", "10.96.0.10", 80, 9090, None, "TCP"),
    );
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    let (line, _) = tcp_hello(&client, sa("10.96.0.10:80"), IO).expect("the good Service works");
    assert!(
        line.starts_with(&c.pod("b0").name),
        "the first claimant keeps the frontend: {line}"
    );
    let log = c.node("a").agent_log();
    for needle in [
        "broken.yaml",
        "10.96.0.999",
        "bad-ip",
        "port-zero",
        "ConfigMap",
        "zz-duplicate",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(needle)),
            "no warning naming {needle}:\n{log}"
        );
    }
}

#[test]
fn restarted_agent_readopts_pins_and_keeps_an_open_connection() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(B0, "node-b"), (A1, "node-a")]));
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    let mut stream = EchoStream::open(&client, sa("10.96.0.10:80"), IO);
    stream.round_trip();
    c.node_mut("a").stop_agent();
    // With the agent gone the datapath keeps working.
    stream.round_trip();
    tcp_hello(&client, sa("10.96.0.10:80"), IO).expect("new connections while the agent is down");
    c.node_mut("a").start_agent(&[]);
    c.node("a").wait_agent_ready(WAIT);
    let log = c.node("a").agent_log();
    assert!(
        log.contains("re-adopted pinned link"),
        "links re-adopted:\n{log}"
    );
    assert!(
        log.contains("synced services=1 writes=0 deletes=0"),
        "maps re-adopted unchanged:\n{log}"
    );
    for _ in 2..10 {
        stream.round_trip();
    }
}

#[test]
fn pod_interfaces_that_appear_later_are_attached_and_detached() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(B0, "node-b")]));
    start_agents(&mut c);
    let name = c.add_pod_to("a", 7);
    let ns = c.pod(&name).ns.clone();
    // Only the datapath on the new lxc7 can take this pod to the ClusterIP.
    wait_until(
        WAIT,
        "a pod created after the agent reaches the ClusterIP",
        || tcp_hello(&ns, sa("10.96.0.10:80"), Duration::from_millis(300)).is_ok(),
    );
    let links = c.node("a").bpffs().join("links");
    let pins = || std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0);
    let with_pod = pins();
    c.delete_pod(&name);
    // The agent removes the pin, then logs it: wait for both.
    wait_until(
        WAIT,
        "the deleted pod's link pin is removed and logged",
        || {
            pins() == with_pod - 1
                && c.node("a")
                    .agent_log()
                    .contains("detached from pod interface")
        },
    );
}

#[test]
fn killing_and_restarting_the_agent_fails_no_connection() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(A1, "node-a"), (B0, "node-b")]));
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    let mut streams: Vec<EchoStream> = (0..3)
        .map(|_| EchoStream::open(&client, sa("10.96.0.10:80"), IO))
        .collect();
    let connect_and_echo = |streams: &mut [EchoStream]| {
        tcp_hello(&client, sa("10.96.0.10:80"), IO).expect("a new connection");
        for s in streams.iter_mut() {
            s.round_trip();
        }
    };
    connect_and_echo(&mut streams);
    c.node_mut("a").kill_agent();
    for _ in 0..10 {
        connect_and_echo(&mut streams);
    }
    c.node_mut("a").start_agent(&[]);
    // Traffic goes on while the new agent loads and adopts.
    let node = c.node("a");
    let mut during = 0;
    wait_until(WAIT, "the restarted agent is ready", || {
        connect_and_echo(&mut streams);
        during += 1;
        node.agent_log().matches("lb-agent ready").count() >= 2
    });
    for _ in 0..10 {
        connect_and_echo(&mut streams);
    }
    assert!(during > 0);
}

/// Runs `lb-agent ARGS -o json --bpffs <node's>` and parses its output.
fn inspect(c: &Cluster, node: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(lb_tests::rig::agent_bin())
        .args(args)
        .args(["-o", "json", "--bpffs"])
        .arg(c.node(node).bpffs())
        .output()
        .expect("run lb-agent");
    assert!(
        out.status.success(),
        "lb-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("lb-agent {args:?} printed no JSON: {e}"))
}

#[test]
fn inspection_commands_show_flows_tables_and_backends() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(A1, "node-a"), (B0, "node-b")]));
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    let stream = EchoStream::open(&client, sa("10.96.0.10:80"), IO);
    let flows = inspect(
        &c,
        "a",
        &[
            "conntrack",
            "--service",
            "test/web:p/TCP",
            "--port",
            &stream.local_addr().port().to_string(),
        ],
    );
    let flows = flows.as_array().expect("a list of flows");
    let dirs: Vec<&str> = flows
        .iter()
        .filter_map(|f| f["direction"].as_str())
        .collect();
    assert!(
        dirs.contains(&"forward") && dirs.contains(&"reply"),
        "both directions of the stream: {flows:?}"
    );
    let fwd = flows
        .iter()
        .find(|f| f["direction"] == "forward")
        .expect("forward entry");
    assert_eq!(fwd["dst"], "10.96.0.10:80");
    assert_eq!(fwd["src"], stream.local_addr().to_string());

    let table = inspect(&c, "a", &["maglev", "test/web:p/TCP"]);
    assert_eq!(table["table"].as_array().map(Vec::len), Some(16381));
    let shares = table["shares"].as_array().expect("shares");
    assert_eq!(shares.len(), 2);
    let total: u64 = shares.iter().filter_map(|s| s["slots"].as_u64()).sum();
    assert_eq!(total, 16381);

    let backends = inspect(&c, "a", &["backends"]);
    let addrs: Vec<&str> = backends
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|b| b["address"].as_str())
        .collect();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(addrs.contains(&"10.244.1.11:8080") && addrs.contains(&"10.244.2.10:8080"));

    let stats = inspect(&c, "a", &["stats"]);
    let new_flows = stats["counters"]
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["name"] == "new_flow")
        .and_then(|s| s["packets"].as_u64());
    assert!(new_flows.is_some_and(|n| n >= 1), "{stats:?}");
    let web = stats["services"]
        .as_array()
        .expect("per-Service counters")
        .iter()
        .find(|s| s["name"] == "test/web:p/TCP")
        .cloned()
        .unwrap_or_else(|| panic!("web's counters: {stats}"));
    assert_eq!(web["new_flows"], 1, "one stream: {web}");
    assert!(web["packets"].as_u64().is_some_and(|n| n >= 3), "{web}");
    assert!(web["bytes"].as_u64().is_some_and(|n| n > 0), "{web}");
    assert_eq!(web["drops"], 0, "{web}");
}

#[test]
fn a_pod_reaching_its_own_service_gets_its_answer() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    // a0 is the only backend of both Services and their client too.
    c.write_manifest("web.yaml", &web(&[(A0, "node-a")]));
    c.write_manifest("dns.yaml", &dns(&[(A0, "node-a")]));
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    for _ in 0..5 {
        let (line, _) = tcp_hello(&client, sa("10.96.0.10:80"), IO).expect("hairpin TCP");
        // The pod sees the connection coming from its node, so its answer
        // goes back through the datapath and out as the ClusterIP.
        assert!(line.starts_with("a0 10.99.0.1:"), "{line}");
        let (line, from) = udp_hello(&client, sa("10.96.0.53:53"), IO).expect("hairpin UDP");
        assert!(line.starts_with("a0 10.99.0.1:"), "{line}");
        assert_eq!(from, sa("10.96.0.53:53"));
    }
}
