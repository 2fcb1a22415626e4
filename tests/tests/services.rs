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
    manifests::{docs, one_port, service, slice, with_external_ips, with_load_balancer, Ep},
    rig::{
        in_ns, serve_all_pods, sh, tcp_hello, udp_hello, wait_until, Cluster, ClusterSpec,
        EchoStream,
    },
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn start_agents(c: &mut Cluster) {
    c.start_agents(&["a", "b"], WAIT);
}

/// The pods' addresses: a0, a1 on node-a; b0, b1 on node-b.
const A0: &str = "10.244.1.10";
const A1: &str = "10.244.1.11";
const B0: &str = "10.244.2.10";
const B1: &str = "10.244.2.11";

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

/// Backend name → count over `n` TCP connections and `n` UDP datagrams
/// from the client to `dst` (same port for both), checking that a local
/// backend sees the client and a remote one `node_addr` (SNAT), and that
/// UDP replies come from `dst`.
fn external_spread(
    c: &Cluster,
    dst: SocketAddr,
    node_addr: &str,
    local: &str,
    n: usize,
) -> BTreeMap<String, usize> {
    let client = c.client_ns();
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let (line, _) = tcp_hello(&client, dst, IO)
            .unwrap_or_else(|e| panic!("TCP connection {i} to {dst}: {e}"));
        let mut parts = line.split_whitespace();
        let name = parts.next().unwrap_or_default().to_string();
        let peer = parts.next().unwrap_or_default().to_string();
        let want = if name == local {
            "10.99.0.100:".to_string()
        } else {
            format!("{node_addr}:")
        };
        assert!(peer.starts_with(&want), "{dst}: {name} saw {peer}");
        *seen.entry(format!("{name}/TCP")).or_insert(0) += 1;
        let (line, from) = udp_hello(&client, dst, IO)
            .unwrap_or_else(|e| panic!("UDP datagram {i} to {dst}: {e}"));
        assert_eq!(from, dst, "the UDP reply comes from the frontend");
        let name = line.split_whitespace().next().unwrap_or_default();
        *seen.entry(format!("{name}/UDP")).or_insert(0) += 1;
    }
    seen
}

#[test]
fn client_to_load_balancer_ips_and_external_ips_reaches_local_and_remote_backends() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    let eps = [(A0, "node-a"), (B0, "node-b")];
    // One TCP and one UDP Service on the same frontends: a LoadBalancer
    // ingress IP and an externalIP each.
    for (name, vip, proto, target, np) in [
        ("web", "10.96.0.10", "TCP", 8080, 30080),
        ("dns", "10.96.0.53", "UDP", 5353, 30053),
    ] {
        let svc = with_load_balancer(
            &with_external_ips(
                &service(name, vip, 80, target, Some(np), proto),
                &["10.99.1.2"],
            ),
            "10.99.1.1",
            &[],
        );
        let eps: Vec<Ep<'_>> = eps
            .iter()
            .map(|(addr, node)| Ep {
                addr,
                node,
                ready: true,
                terminating: false,
            })
            .collect();
        c.write_manifest(
            &format!("{name}.yaml"),
            &docs(&[svc, slice(name, &format!("{name}-1"), target, proto, &eps)]),
        );
    }
    start_agents(&mut c);
    // The client reaches the LoadBalancer IP through node-a and the
    // externalIP through node-b, as an upstream router would.
    let client = c.client_ns();
    for (ip, via) in [("10.99.1.1/32", "10.99.0.1"), ("10.99.1.2/32", "10.99.0.2")] {
        sh(Some(&client), &["ip", "route", "replace", ip, "via", via]);
    }
    for (dst, node, local, remote) in [
        ("10.99.1.1:80", "10.99.0.1", "a0", "b0"),
        ("10.99.1.2:80", "10.99.0.2", "b0", "a0"),
    ] {
        let seen = external_spread(&c, sa(dst), node, local, 40);
        for want in [local, remote] {
            for proto in ["TCP", "UDP"] {
                assert!(
                    seen.contains_key(&format!("{want}/{proto}")),
                    "{dst} via {node}: {want} never answered over {proto}: {seen:?}"
                );
            }
        }
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
    // The agent removes the pins (ingress and egress), then logs it: wait
    // for both.
    wait_until(
        WAIT,
        "the deleted pod's link pins are removed and logged",
        || {
            pins() == with_pod - 2
                && c.node("a")
                    .agent_log()
                    .contains("detached from pod interface")
        },
    );
}

/// Long-lived streams through web (backends a1 and b0): three from a0
/// through its ClusterIP, and from the client through its NodePort on
/// node-a, one to each backend (b0's crosses node-a's XDP both ways); and
/// a new connection of each kind at every round: what restarts and
/// upgrades must not break.
struct Traffic {
    pod: String,
    client: String,
    streams: Vec<EchoStream>,
}

/// web's NodePort on node-a.
const NODE_PORT_A: &str = "10.99.0.1:30080";

impl Traffic {
    fn start(c: &Cluster) -> Self {
        let pod = c.pod("a0").ns.clone();
        let client = c.client_ns();
        let mut streams: Vec<EchoStream> = (0..3)
            .map(|_| EchoStream::open(&pod, sa("10.96.0.10:80"), IO))
            .collect();
        let mut missing = vec!["a1", "b0"];
        for _ in 0..64 {
            if missing.is_empty() {
                break;
            }
            let s = EchoStream::open(&client, sa(NODE_PORT_A), IO);
            if let Some(k) = missing.iter().position(|b| *b == s.backend) {
                missing.remove(k);
                streams.push(s);
            }
        }
        assert!(missing.is_empty(), "no NodePort stream reached {missing:?}");
        Self {
            pod,
            client,
            streams,
        }
    }

    /// A new connection of each kind, and one echo on every stream; panics
    /// on failure.
    fn round(&mut self) {
        tcp_hello(&self.pod, sa("10.96.0.10:80"), IO).expect("a new connection to the ClusterIP");
        tcp_hello(&self.client, sa(NODE_PORT_A), IO).expect("a new connection to the NodePort");
        for s in &mut self.streams {
            s.round_trip();
        }
    }
}

#[test]
fn killing_and_restarting_the_agent_fails_no_connection() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(A1, "node-a"), (B0, "node-b")]));
    start_agents(&mut c);
    let mut traffic = Traffic::start(&c);
    traffic.round();
    c.node_mut("a").kill_agent();
    for _ in 0..10 {
        traffic.round();
    }
    c.node_mut("a").start_agent(&[]);
    // Traffic goes on while the new agent loads and adopts.
    let node = c.node("a");
    let mut during = 0;
    wait_until(WAIT, "the restarted agent is ready", || {
        traffic.round();
        during += 1;
        node.agent_log().matches("lb-agent ready").count() >= 2
    });
    for _ in 0..10 {
        traffic.round();
    }
    assert!(during > 0);
}

/// The pin name one layout version older than `name` (`LB_SERVICES_V2` →
/// `LB_SERVICES_V1`).
fn older(name: &str) -> String {
    let (fam, v) = name.rsplit_once("_V").expect("versioned map name");
    let v: u32 = v.parse().expect("version number");
    format!("{fam}_V{}", v - 1)
}

/// The backends node `n`'s map holds, by id, as `address:port`.
fn backend_ids(c: &Cluster, n: &str) -> BTreeMap<u32, String> {
    let maps = lb_agent::datapath::maps::Maps::open(&c.node(n).bpffs()).expect("open node maps");
    maps.backend_entries()
        .expect("read backends")
        .into_iter()
        .map(|(id, b)| {
            let addr = lb_common::addr::addr_from_be(b.addr_be, b.family);
            (id, format!("{addr}:{}", u16::from_be(b.port_be)))
        })
        .collect()
}

/// Replaces the backends array pinned in `maps` by a pin of the map's
/// first layout (`LB_BACKENDS_V1`, a hash map from id to backend) holding
/// the same backends under the same ids, as a release before the array
/// left it. The programs still attached keep the array they hold.
fn pin_backends_v1(maps: &std::path::Path) {
    use aya::maps::{HashMap, MapData};
    use lb_common::{maps::BACKENDS, Backend};
    let current = lb_agent::datapath::maps::Maps::open(maps.parent().expect("bpffs"))
        .expect("open maps")
        .backend_entries()
        .expect("read backends");
    let mut v1: HashMap<MapData, u32, Backend> = HashMap::create(1024, 0).expect("create map");
    for (id, b) in &current {
        v1.insert(id, b, 0).expect("insert backend");
    }
    let old = older(BACKENDS);
    assert_eq!(
        old, "LB_BACKENDS_V1",
        "the backends layout moved on: adapt this"
    );
    v1.pin(maps.join(&old)).expect("pin the old layout");
    std::fs::remove_file(maps.join(BACKENDS)).expect("unpin the array");
}

#[test]
fn an_upgrade_that_changes_map_layouts_fails_no_connection() {
    use lb_common::maps::{BACKENDS, SERVICES, STATS};
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    // b1 first (backend id 1), then a1 and b0 beside it, then b1 leaves:
    // the ids left (a gap at 1) are not those a rebuild from scratch would
    // give, so only a conversion that keeps them keeps the flows.
    c.write_manifest("web.yaml", &web(&[(B1, "node-b")]));
    start_agents(&mut c);
    c.write_manifest(
        "web.yaml",
        &web(&[(A1, "node-a"), (B0, "node-b"), (B1, "node-b")]),
    );
    wait_until(WAIT, "three backends", || backend_ids(&c, "a").len() == 3);
    c.write_manifest("web.yaml", &web(&[(A1, "node-a"), (B0, "node-b")]));
    // Gone from the map once its grace is over.
    wait_until(WAIT, "b1 is out of the backends map", || {
        backend_ids(&c, "a").len() == 2
    });
    let ids = backend_ids(&c, "a");
    assert!(!ids.contains_key(&1), "a gap at id 1: {ids:?}");
    let mut traffic = Traffic::start(&c);
    traffic.round();
    // Make the running datapath look like an older release's: its programs
    // keep their maps, which are now pinned under older layout names (the
    // backends as the hash map they were), so the new agent finds no pin of
    // the current layouts for these three.
    c.node_mut("a").stop_agent();
    let maps = c.node("a").bpffs().join("maps");
    pin_backends_v1(&maps);
    for name in [SERVICES, STATS] {
        std::fs::rename(maps.join(name), maps.join(older(name))).expect("rename pin");
    }
    traffic.round();
    c.node_mut("a").start_agent(&[]);
    let node = c.node("a");
    wait_until(WAIT, "the upgraded agent is ready", || {
        traffic.round();
        node.agent_log().matches("lb-agent ready").count() >= 2
    });
    for _ in 0..10 {
        traffic.round();
    }
    assert_eq!(backend_ids(&c, "a"), ids, "the backends kept their ids");
    let log = node.agent_log();
    for (name, fate) in [
        (SERVICES, "rebuilt from the desired state"),
        (BACKENDS, "converted into the new map"),
        (STATS, "counters restart from zero"),
    ] {
        let old = older(name);
        assert!(
            log.lines()
                .any(|l| l.contains(&old) && l.contains(name) && l.contains(fate)),
            "no log line says {old} was replaced by {name} ({fate}):\n{log}"
        );
        assert!(!maps.join(&old).exists(), "{old} is still pinned");
        assert!(maps.join(name).exists(), "{name} is not pinned");
    }
}

#[test]
fn inspection_commands_show_flows_tables_and_backends() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(A1, "node-a"), (B0, "node-b")]));
    start_agents(&mut c);
    let client = c.pod("a0").ns.clone();
    let stream = EchoStream::open(&client, sa("10.96.0.10:80"), IO);
    let flows = c.inspect(
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
    // The backend has sent its greeting: both entries are established.
    assert!(
        flows
            .iter()
            .all(|f| f["state"] == "established" && f["map"] == "LB_CT_V1"),
        "{flows:?}"
    );

    let table = c.inspect("a", &["maglev", "test/web:p/TCP"]);
    // The default size for two backends.
    let size = lb_agent::maglev::TableSize::Scaled.for_backends(2) as usize;
    assert_eq!(table["table"].as_array().map(Vec::len), Some(size));
    let shares = table["shares"].as_array().expect("shares");
    assert_eq!(shares.len(), 2);
    let total: u64 = shares.iter().filter_map(|s| s["slots"].as_u64()).sum();
    assert_eq!(total, size as u64);

    let backends = c.inspect("a", &["backends"]);
    let addrs: Vec<&str> = backends
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|b| b["address"].as_str())
        .collect();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(addrs.contains(&"10.244.1.11:8080") && addrs.contains(&"10.244.2.10:8080"));

    let stats = c.inspect("a", &["stats"]);
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

#[test]
fn udp_datagrams_larger_than_the_mtu_cross_the_cluster_ip_in_fragments() {
    let mut c = Cluster::new(ClusterSpec::default());
    // One remote backend that echoes whole datagrams, so both directions
    // are fragmented: the client's on the way in, the backend's on the way
    // back.
    let backend = c.pod("b0").ns.clone();
    let sock = in_ns(&backend, || std::net::UdpSocket::bind(sa("0.0.0.0:5353")))
        .expect("bind the echo server");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], peer);
            }
        }
    });
    c.write_manifest("dns.yaml", &dns(&[(B0, "node-b")]));
    start_agents(&mut c);

    let client = c.pod("a0").ns.clone();
    let payload: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
    let (reply, from) = in_ns(&client, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(IO))?;
        s.send_to(&payload, sa("10.96.0.53:53"))?;
        let mut buf = vec![0u8; 65536];
        let (n, from) = s.recv_from(&mut buf)?;
        buf.truncate(n);
        Ok::<_, std::io::Error>((buf, from))
    })
    .expect("a 6000-byte datagram through the ClusterIP is echoed");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo.join().expect("echo thread");
    assert_eq!(
        from,
        sa("10.96.0.53:53"),
        "the reply comes from the ClusterIP"
    );
    assert!(
        reply == payload,
        "the echo is the datagram sent, byte for byte"
    );
    // Node a saw the client's later fragments go out and the backend's come
    // back, each translated through its first fragment.
    let stats = c.inspect("a", &["stats"]);
    let tracked = stats
        .as_array()
        .or_else(|| stats["counters"].as_array())
        .and_then(|cs| cs.iter().find(|x| x["name"] == "frag_tracked"))
        .and_then(|x| x["packets"].as_u64())
        .unwrap_or_else(|| panic!("no frag_tracked counter in {stats}"));
    assert!(
        tracked >= 8,
        "6000 bytes each way is 4+ fragments each: {tracked}"
    );
}

/// `lb-agent trace ARGS -o json` inside node `node`'s network namespace.
fn trace(c: &Cluster, node: &str, args: &[&str]) -> serde_json::Value {
    let bin = lb_tests::rig::agent_bin();
    let bpffs = c.node(node).bpffs();
    let mut all = vec![
        bin.to_str().expect("utf-8 path"),
        "trace",
        "-o",
        "json",
        "--bpffs",
        bpffs.to_str().expect("utf-8 path"),
    ];
    all.extend_from_slice(args);
    let out = lb_tests::rig::sh(Some(&c.node(node).ns), &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("trace printed no JSON ({e}): {out}"))
}

/// Node `node`'s tracked flows and its new_flow counter.
fn live_state(c: &Cluster, node: &str) -> (usize, u64) {
    let flows = c
        .inspect(node, &["conntrack"])
        .as_array()
        .map_or(0, Vec::len);
    let stats = c.inspect(node, &["stats"]);
    let new_flows = stats
        .as_array()
        .or_else(|| stats["counters"].as_array())
        .and_then(|cs| cs.iter().find(|x| x["name"] == "new_flow"))
        .and_then(|x| x["packets"].as_u64())
        .unwrap_or_else(|| panic!("no new_flow counter in {stats}"));
    (flows, new_flows)
}

#[test]
fn trace_explains_verdicts_without_touching_live_state() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(A1, "node-a"), (B0, "node-b")]));
    // The traced NodePort flow below falls in a slot of the local backend
    // in a 16381-slot table (and is handed from XDP to TC in a smaller
    // one, where the remote backend owns its slot): the size is fixed.
    for n in ["a", "b"] {
        c.node_mut(n).start_agent(&["--maglev-table-size", "16381"]);
    }
    for n in ["a", "b"] {
        c.node(n).wait_agent_ready(WAIT);
    }
    // An open stream from a0, whose flow the trace must find.
    let a0 = c.pod("a0").ns.clone();
    let mut stream = EchoStream::open(&a0, sa("10.96.0.10:80"), IO);
    stream.round_trip();
    let before = live_state(&c, "a");

    // A new connection from outside to the NodePort, arriving on eth0.
    let r = trace(
        &c,
        "a",
        &[
            "--proto",
            "tcp",
            "--src",
            "10.99.0.100:41000",
            "--dst",
            "10.99.0.1:30080",
            "--iface",
            "eth0",
        ],
    );
    assert_eq!(r["stages"][0]["program"], "lb_xdp_node", "{r}");
    assert!(
        r["frontend"].as_str().is_some_and(|f| f.contains("web")),
        "{r}"
    );
    let backend = r["backend"].as_str().unwrap_or_default().to_string();
    assert!(
        backend.starts_with(&format!("{A1}:8080")) || backend.starts_with(&format!("{B0}:8080")),
        "{r}"
    );
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|w| w.starts_with("Maglev")),
        "{r}"
    );
    let last = r["stages"]
        .as_array()
        .and_then(|s| s.last())
        .expect("a stage");
    let leaves = last["output"]["dst"].as_str().unwrap_or_default();
    assert!(
        backend.starts_with(leaves),
        "the packet leaves for {leaves}: {r}"
    );

    // The same, for people.
    let bpffs = c.node("a").bpffs();
    let text = lb_tests::rig::sh(
        Some(&c.node("a").ns),
        &[
            lb_tests::rig::agent_bin().to_str().expect("utf-8 path"),
            "trace",
            "--bpffs",
            bpffs.to_str().expect("utf-8 path"),
            "--proto",
            "tcp",
            "--src",
            "10.99.0.100:41000",
            "--dst",
            "10.99.0.1:30080",
            "--iface",
            "eth0",
        ],
    );
    println!("{text}");
    assert!(
        text.contains("frontend  test/web") && text.contains("why       Maglev"),
        "{text}"
    );

    // The stream's next packet, from a0's interface: conntrack keeps it on
    // the backend the live entry names.
    let local = stream.local_addr().to_string();
    let r = trace(
        &c,
        "a",
        &[
            "--proto",
            "tcp",
            "--src",
            &local,
            "--dst",
            "10.96.0.10:80",
            "--flags",
            "A",
            "--iface",
            "lxc0",
        ],
    );
    assert_eq!(r["stages"][0]["program"], "lb_tc_pod", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|w| w.starts_with("conntrack")),
        "{r}"
    );
    let flows = c.inspect(
        "a",
        &[
            "conntrack",
            "--port",
            &stream.local_addr().port().to_string(),
        ],
    );
    let live_backend = flows
        .as_array()
        .and_then(|f| f.iter().find(|f| f["direction"] == "forward"))
        .and_then(|f| f["new_dst"].as_str())
        .expect("the stream's forward entry")
        .to_string();
    assert!(
        r["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with(&live_backend)),
        "trace {r} vs live {live_backend}"
    );

    // Nothing listens there.
    let r = trace(
        &c,
        "a",
        &[
            "--proto",
            "udp",
            "--src",
            "10.99.0.100:41000",
            "--dst",
            "10.96.0.77:53",
        ],
    );
    assert_eq!(r["stages"][0]["outcome"][0], "pass_no_service", "{r}");
    assert!(r["frontend"].is_null() && r["backend"].is_null(), "{r}");

    // Three traces later, the live maps hold what they held.
    assert_eq!(live_state(&c, "a"), before, "trace changed live state");
    stream.round_trip();
}

// DSR's scenario runs over both families in tests/tests/dualstack.rs.

#[test]
fn a_large_upload_through_a_cluster_ip_completes_over_a_smaller_mtu_link() {
    use std::io::{Read, Write};
    let mut c = Cluster::new(ClusterSpec::default());
    // b0 counts what it receives and answers with the count: the data flows
    // one way only, towards the small link (a veth drops frames larger than
    // its receiver's MTU without a word, so nothing big may flow back).
    let backend = c.pod("b0").ns.clone();
    let listener =
        in_ns(&backend, || std::net::TcpListener::bind(sa("0.0.0.0:9000"))).expect("bind the sink");
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(WAIT))?;
        let mut buf = vec![0u8; 65536];
        let mut total = 0usize;
        loop {
            match conn.read(&mut buf)? {
                0 => break,
                n => total += n,
            }
        }
        conn.write_all(format!("{total}\n").as_bytes())
    });
    c.write_manifest(
        "sink.yaml",
        &one_port(
            "sink",
            "10.96.0.30",
            80,
            9000,
            30090,
            "TCP",
            &[(B0, "node-b")],
        ),
    );
    start_agents(&mut c);
    // Node b's link to b0 carries at most 1000 bytes: node b, a plain
    // router here, answers bigger packets with "fragmentation needed",
    // which must reach a0 about the ClusterIP, not about b0.
    lb_tests::rig::sh(
        None,
        &[
            "ip",
            "-n",
            &c.node("b").ns,
            "link",
            "set",
            "lxc0",
            "mtu",
            "1000",
        ],
    );
    let client = c.pod("a0").ns.clone();
    let data = vec![0x5au8; 300_000];
    let answer = in_ns(&client, || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&sa("10.96.0.30:80"), IO)?;
        s.set_write_timeout(Some(WAIT))?;
        s.set_read_timeout(Some(WAIT))?;
        s.write_all(&data)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })
    .expect("300 kB through the ClusterIP over the 1000-byte link");
    sink.join().expect("sink thread").expect("sink");
    assert_eq!(answer.trim(), "300000");
    assert!(
        c.node_counter("a", "icmp_error") >= 1,
        "node a translated the fragmentation-needed error"
    );
}

/// The nodes' addresses on the fabric, as `--dsr-peers` takes them.
const DSR_PEERS: &str = "10.99.0.1/32,10.99.0.2/32";

/// Sends `inner` (an IP packet) from namespace `ns` to `node` wrapped as
/// DSR wraps it (IP protocol 253, a shim naming `backend`), through a raw
/// socket: the kernel adds the outer header with `ns`'s own address.
fn send_wrapped(ns: &str, node: std::net::Ipv4Addr, backend: std::net::SocketAddrV4, inner: &[u8]) {
    let mut payload = vec![lb_common::dsr::SHIM_MAGIC, lb_common::dsr::SHIM_VERSION];
    payload.extend_from_slice(&backend.port().to_be_bytes());
    payload.extend_from_slice(&backend.ip().octets());
    payload.extend_from_slice(inner);
    in_ns(ns, || {
        // SAFETY: plain socket calls on a descriptor owned here; the
        // address is a valid sockaddr_in of the size passed.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW,
                i32::from(lb_common::dsr::IPPROTO_LB),
            );
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(node.octets()),
                },
                sin_zero: [0; 8],
            };
            let sent = libc::sendto(
                fd,
                payload.as_ptr().cast(),
                payload.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(sent, payload.len() as isize, "send a wrapped packet: {err}");
        }
    });
}

#[test]
fn wrapped_packets_from_a_host_that_is_not_a_node_are_dropped_and_counted() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    c.write_manifest("dns.yaml", &dns(&[(B0, "node-b")]));
    for n in ["a", "b"] {
        c.node_mut(n)
            .start_agent(&["--mode", "dsr", "--dsr-peers", DSR_PEERS]);
    }
    for n in ["a", "b"] {
        c.node(n).wait_agent_ready(WAIT);
    }
    // The outside client forges what node a would send node b: a datagram
    // "from" any address, to the backend.
    let backend = std::net::SocketAddrV4::new(B0.parse().expect("addr"), 5353);
    let forged = lb_tests::packet::Packet::udp(
        "10.99.0.100:41000".parse().expect("addr"),
        "10.99.0.1:30053".parse().expect("addr"),
        b"forged",
    )
    .bytes();
    let node_b = std::net::Ipv4Addr::new(10, 99, 0, 2);
    send_wrapped(&c.client_ns(), node_b, backend, &forged[14..]);
    wait_until(WAIT, "node b counts the forged packet", || {
        c.node_counter("b", "drop_dsr_peer") >= 1
    });
    assert_eq!(c.node_counter("b", "dsr_decap"), 0, "nothing unwrapped");

    // The same datagram through node a, a node, is served by the backend.
    let client = c.client_ns();
    let (line, from) = udp_hello(&client, sa("10.99.0.1:30053"), IO)
        .unwrap_or_else(|e| panic!("UDP through node a: {e}"));
    assert!(line.starts_with("b0 10.99.0.100:"), "{line}");
    assert_eq!(from, sa("10.99.0.1:30053"));
    assert!(
        c.node_counter("b", "dsr_decap") >= 1,
        "node a's wrap served"
    );
    assert_eq!(c.node_counter("b", "drop_dsr_peer"), 1);
}
