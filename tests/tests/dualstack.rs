//! Dual-stack end to end: every Service here is dual-stack (RequireDualStack,
//! an IPv4 and an IPv6 ClusterIP, a slice of each family), and each
//! scenario runs over both families, so IPv6 is proven through the same
//! paths as IPv4, beside it: pods to ClusterIPs, outside clients to
//! NodePorts, LoadBalancer IPs and externalIPs on local and remote
//! backends (Cluster and Local policies), affinity, source ranges,
//! hairpin, refusal without endpoints, endpoint removal and a SIGKILL
//! restart under traffic.
//!
//! Needs root. Run through `cargo xtask test`.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_tests::{
    manifests::{docs, dual_stack_port},
    rig::{
        in_ns, serve_all_pods, sh, tcp_hello, udp_hello, unspecified_like, wait_until, Cluster,
        ClusterSpec, EchoStream,
    },
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

/// Both families, IPv4 first: every scenario runs over each.
const FAMILIES: [bool; 2] = [false, true];

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// A family's name in assertion messages.
fn fam(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// The pods' addresses of each family: (IPv4, IPv6, node).
const A0: (&str, &str, &str) = ("10.244.1.10", "fd00:244:1::10", "node-a");
const A1: (&str, &str, &str) = ("10.244.1.11", "fd00:244:1::11", "node-a");
const B0: (&str, &str, &str) = ("10.244.2.10", "fd00:244:2::10", "node-b");
const B1: (&str, &str, &str) = ("10.244.2.11", "fd00:244:2::11", "node-b");

/// A dual-stack Service port with these pods as endpoints in both families.
fn dual(
    name: &str,
    vips: (&str, &str),
    (port, target, node_port): (u16, u16, u16),
    proto: &str,
    pods: &[(&str, &str, &str)],
) -> String {
    let v4: Vec<(&str, &str)> = pods.iter().map(|(a, _, n)| (*a, *n)).collect();
    let v6: Vec<(&str, &str)> = pods.iter().map(|(_, a, n)| (*a, *n)).collect();
    dual_stack_port(name, vips, port, target, node_port, proto, &v4, &v6)
}

/// `web`: TCP, ClusterIPs 10.96.0.10 and fd00:96::10 port 80, NodePort 30080.
fn web(pods: &[(&str, &str, &str)]) -> String {
    dual(
        "web",
        ("10.96.0.10", "fd00:96::10"),
        (80, 8080, 30080),
        "TCP",
        pods,
    )
}

/// `dns`: UDP, ClusterIPs 10.96.0.53 and fd00:96::53 port 53, NodePort 30053.
fn dns(pods: &[(&str, &str, &str)]) -> String {
    dual(
        "dns",
        ("10.96.0.53", "fd00:96::53"),
        (53, 5353, 30053),
        "UDP",
        pods,
    )
}

/// A Service's first document (the Service itself) with `extra` spec lines
/// and `status`, and its slices after it.
fn amend(manifest: &str, spec_extra: &str, status: &str) -> String {
    let mut parts: Vec<String> = manifest.split("---\n").map(str::to_owned).collect();
    parts[0] = format!("{}{spec_extra}{status}", parts[0]);
    docs(&parts)
}

/// `web`'s ClusterIP of a family.
fn web_vip(v6: bool) -> SocketAddr {
    sa(if v6 {
        "[fd00:96::10]:80"
    } else {
        "10.96.0.10:80"
    })
}

/// `dns`'s ClusterIP of a family.
fn dns_vip(v6: bool) -> SocketAddr {
    sa(if v6 {
        "[fd00:96::53]:53"
    } else {
        "10.96.0.53:53"
    })
}

/// Node `letter`'s fabric address of a family.
fn node_ip(c: &Cluster, letter: &str, v6: bool) -> IpAddr {
    let n = c.node(letter);
    if v6 {
        n.addr6.into()
    } else {
        n.addr.into()
    }
}

/// The outside client's address of a family.
fn client_ip(v6: bool) -> IpAddr {
    (if v6 { "fd00:99::100" } else { "10.99.0.100" })
        .parse()
        .expect("ip")
}

/// A greeting `"<pod> <peer>"`: the pod and the client address it saw.
fn greeting(line: &str) -> (String, IpAddr) {
    let mut parts = line.split_whitespace();
    let name = parts.next().unwrap_or_default().to_owned();
    let peer = parts
        .next()
        .map(sa)
        .unwrap_or_else(|| panic!("no peer in {line:?}"));
    (name, peer.ip())
}

/// Backend → count over `n` TCP connections from `ns` to `dst`, each
/// backend's greeting checked with `saw` (pod name, peer address).
fn tcp_spread(
    ns: &str,
    dst: SocketAddr,
    n: usize,
    mut saw: impl FnMut(&str, IpAddr),
) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for i in 0..n {
        let (line, _) =
            tcp_hello(ns, dst, IO).unwrap_or_else(|e| panic!("connection {i} to {dst}: {e}"));
        let (name, peer) = greeting(&line);
        saw(&name, peer);
        *hits.entry(name).or_insert(0) += 1;
    }
    hits
}

/// Backend → count over `n` unconnected datagrams from `ns` to `dst`, each
/// reply coming from `dst`.
fn udp_spread(ns: &str, dst: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for i in 0..n {
        let (line, from) =
            udp_hello(ns, dst, IO).unwrap_or_else(|e| panic!("datagram {i} to {dst}: {e}"));
        assert_eq!(from, dst, "the reply comes from the frontend");
        *hits.entry(greeting(&line).0).or_insert(0) += 1;
    }
    hits
}

#[test]
fn pods_reach_a_dual_stack_cluster_ip_over_both_families_tcp_and_udp() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dsclip"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[A1, B0, B1]));
    c.write_manifest("dns.yaml", &dns(&[A1, B0, B1]));
    c.start_agents(&["a", "b"], WAIT);
    let a0 = c.pod("a0").clone();
    for v6 in FAMILIES {
        // No SNAT inside the cluster: the backend sees the pod's own
        // address of the frontend's family.
        let hits = tcp_spread(&a0.ns, web_vip(v6), 60, |name, peer| {
            assert_eq!(peer, a0.addr_of(v6), "{}: {name} saw {peer}", fam(v6));
        });
        let udp = udp_spread(&a0.ns, dns_vip(v6), 30);
        for backend in ["a1", "b0", "b1"] {
            assert!(
                hits.contains_key(backend),
                "{} TCP: {backend} never reached: {hits:?}",
                fam(v6)
            );
            assert!(
                udp.contains_key(backend),
                "{} UDP: {backend} never answered: {udp:?}",
                fam(v6)
            );
        }
    }
}

#[test]
fn outside_clients_reach_node_ports_over_both_families_on_local_and_remote_backends() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dsnp"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[A0, B0]));
    c.write_manifest("dns.yaml", &dns(&[A0, B0]));
    c.start_agents(&["a", "b"], WAIT);
    let client = c.client_ns();
    for v6 in FAMILIES {
        for (node, local, remote) in [("a", "a0", "b0"), ("b", "b0", "a0")] {
            let addr = node_ip(&c, node, v6);
            // A local backend sees the client; a remote one this node (SNAT).
            let hits = tcp_spread(&client, SocketAddr::new(addr, 30080), 40, |name, peer| {
                let want = if name == local { client_ip(v6) } else { addr };
                assert_eq!(peer, want, "{} node-{node}: {name} saw {peer}", fam(v6));
            });
            let udp = udp_spread(&client, SocketAddr::new(addr, 30053), 40);
            for want in [local, remote] {
                assert!(
                    hits.contains_key(want),
                    "{} node-{node} TCP: {hits:?}",
                    fam(v6)
                );
                assert!(
                    udp.contains_key(want),
                    "{} node-{node} UDP: {udp:?}",
                    fam(v6)
                );
            }
        }
    }
}

#[test]
fn outside_clients_reach_ipv6_load_balancer_ips_and_external_ips() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dslb"));
    let _s = serve_all_pods(&c);
    let ips = "  externalIPs: [10.99.1.2, 'fd00:99:1::2']\n";
    let status = "status:\n  loadBalancer:\n    ingress: [{ip: 10.99.1.1}, {ip: 'fd00:99:1::1'}]\n";
    let web_lb =
        amend(&web(&[A0, B0]), ips, status).replace("  type: NodePort\n", "  type: LoadBalancer\n");
    c.write_manifest("web.yaml", &web_lb);
    c.start_agents(&["a", "b"], WAIT);
    // The client reaches the LoadBalancer IPs through node-a and the
    // externalIPs through node-b, as an upstream router would.
    let client = c.client_ns();
    for (ip, via) in [
        ("10.99.1.1/32", "10.99.0.1"),
        ("10.99.1.2/32", "10.99.0.2"),
        ("fd00:99:1::1/128", "fd00:99::1"),
        ("fd00:99:1::2/128", "fd00:99::2"),
    ] {
        sh(Some(&client), &["ip", "route", "replace", ip, "via", via]);
    }
    for (dst, node, local, remote) in [
        ("[fd00:99:1::1]:80", "a", "a0", "b0"),
        ("[fd00:99:1::2]:80", "b", "b0", "a0"),
        ("10.99.1.1:80", "a", "a0", "b0"),
    ] {
        let dst = sa(dst);
        let node_addr = node_ip(&c, node, dst.is_ipv6());
        let hits = tcp_spread(&client, dst, 40, |name, peer| {
            let want = if name == local {
                client_ip(dst.is_ipv6())
            } else {
                node_addr
            };
            assert_eq!(peer, want, "{dst}: {name} saw {peer}");
        });
        assert!(
            hits.contains_key(local) && hits.contains_key(remote),
            "{dst}: {hits:?}"
        );
    }
}

#[test]
fn external_local_policy_keeps_the_ipv6_client_address_and_only_local_backends() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dslocal"));
    let _s = serve_all_pods(&c);
    c.write_manifest(
        "web.yaml",
        &amend(&web(&[A0, A1, B0]), "  externalTrafficPolicy: Local\n", ""),
    );
    c.start_agents(&["a", "b"], WAIT);
    let client = c.client_ns();
    for v6 in FAMILIES {
        let dst = SocketAddr::new(node_ip(&c, "a", v6), 30080);
        let hits = tcp_spread(&client, dst, 30, |name, peer| {
            assert_eq!(
                peer,
                client_ip(v6),
                "{}: {name} saw {peer}: no SNAT under Local",
                fam(v6)
            );
        });
        assert!(
            hits.keys().all(|b| b.starts_with('a')),
            "{}: only node-a's endpoints: {hits:?}",
            fam(v6)
        );
    }
}

#[test]
fn client_ip_affinity_holds_per_ipv6_client() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dsaff"));
    let _s = serve_all_pods(&c);
    c.write_manifest(
        "web.yaml",
        &amend(
            &web(&[A1, B0, B1]),
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
            "",
        ),
    );
    c.start_agents(&["a", "b"], WAIT);
    for v6 in FAMILIES {
        for pod in ["a0", "b1"] {
            let ns = c.pod(pod).ns.clone();
            let hits = tcp_spread(&ns, web_vip(v6), 20, |_, _| {});
            assert_eq!(
                hits.len(),
                1,
                "{} {pod}: one backend per client: {hits:?}",
                fam(v6)
            );
        }
    }
}

#[test]
fn load_balancer_source_ranges_admit_and_drop_ipv6_clients() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dssrc"));
    let _s = serve_all_pods(&c);
    let status = "status:\n  loadBalancer:\n    ingress: [{ip: 10.99.1.1}, {ip: 'fd00:99:1::1'}]\n";
    let lb = |ranges: &str| {
        amend(
            &web(&[A0, B0]),
            &format!("  loadBalancerSourceRanges: [{ranges}]\n"),
            status,
        )
        .replace("  type: NodePort\n", "  type: LoadBalancer\n")
    };
    // The client (10.99.0.100, fd00:99::100) is inside the IPv6 range only.
    c.write_manifest("web.yaml", &lb("10.1.0.0/16, 'fd00:99::/64'"));
    c.start_agents(&["a", "b"], WAIT);
    let client = c.client_ns();
    sh(
        Some(&client),
        &["ip", "route", "replace", "10.99.1.1/32", "via", "10.99.0.1"],
    );
    sh(
        Some(&client),
        &[
            "ip",
            "route",
            "replace",
            "fd00:99:1::1/128",
            "via",
            "fd00:99::1",
        ],
    );
    tcp_hello(&client, sa("[fd00:99:1::1]:80"), IO).expect("inside the IPv6 range");
    assert!(
        tcp_hello(&client, sa("10.99.1.1:80"), Duration::from_millis(500)).is_err(),
        "outside the IPv4 ranges"
    );
    c.update_manifest("web.yaml", &lb("10.99.0.0/24, 'fd00:c1::/64'"), WAIT);
    tcp_hello(&client, sa("10.99.1.1:80"), IO).expect("inside the IPv4 range now");
    assert!(
        tcp_hello(&client, sa("[fd00:99:1::1]:80"), Duration::from_millis(500)).is_err(),
        "outside the IPv6 range now"
    );
}

#[test]
fn a_pod_reaching_its_own_dual_stack_service_gets_its_answer_over_both_families() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dshair"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[A0]));
    c.write_manifest("dns.yaml", &dns(&[A0]));
    c.start_agents(&["a", "b"], WAIT);
    let a0 = c.pod("a0").ns.clone();
    for v6 in FAMILIES {
        let node = node_ip(&c, "a", v6);
        for _ in 0..5 {
            let (line, _) = tcp_hello(&a0, web_vip(v6), IO).expect("hairpin TCP");
            // The pod sees its node, so its answer comes back through the
            // datapath and out as the ClusterIP.
            assert_eq!(greeting(&line), ("a0".to_owned(), node), "{}", fam(v6));
            let (line, from) = udp_hello(&a0, dns_vip(v6), IO).expect("hairpin UDP");
            assert_eq!(greeting(&line).0, "a0");
            assert_eq!(from, dns_vip(v6));
        }
    }
}

#[test]
fn a_dual_stack_service_without_endpoints_refuses_over_both_families() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dsref"));
    c.write_manifest("web.yaml", &web(&[]));
    c.write_manifest("dns.yaml", &dns(&[]));
    c.start_agents(&["a", "b"], WAIT);
    let a0 = c.pod("a0").ns.clone();
    let client = c.client_ns();
    for v6 in FAMILIES {
        for (ns, dst) in [
            (&a0, web_vip(v6)),
            (&client, SocketAddr::new(node_ip(&c, "b", v6), 30080)),
        ] {
            let started = Instant::now();
            let err = tcp_hello(ns, dst, IO).expect_err("no endpoint");
            assert_eq!(
                err.kind(),
                io::ErrorKind::ConnectionRefused,
                "{dst}: a reset: {err}"
            );
            assert!(started.elapsed() < IO, "{dst}: refused at once");
        }
        let dst = dns_vip(v6);
        let err = in_ns(&a0, || {
            let s = UdpSocket::bind(unspecified_like(dst))?;
            s.connect(dst)?;
            s.set_read_timeout(Some(IO))?;
            s.send(b"anyone?")?;
            s.recv(&mut [0u8; 64])
        })
        .expect_err("no endpoint");
        assert_eq!(
            err.kind(),
            io::ErrorKind::ConnectionRefused,
            "{dst}: port unreachable: {err}"
        );
    }
}

#[test]
fn removing_an_ipv6_endpoint_moves_new_connections_and_spares_other_streams() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dsrm"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[A1, B0, B1]));
    c.start_agents(&["a", "b"], WAIT);
    let a0 = c.pod("a0").ns.clone();
    let vip = web_vip(true);
    let mut stream = EchoStream::open(&a0, vip, IO);
    stream.round_trip();
    let all = [A1, B0, B1];
    let gone = all
        .iter()
        .map(|p| c.pod_by_addr(p.1).name.clone())
        .find(|n| *n != stream.backend)
        .expect("another backend");
    let keep: Vec<(&str, &str, &str)> = all
        .iter()
        .copied()
        .filter(|p| c.pod_by_addr(p.1).name != gone)
        .collect();
    c.write_manifest("web.yaml", &web(&keep));
    let mut clean = 0;
    wait_until(
        WAIT,
        "new IPv6 connections avoid the removed backend",
        || {
            stream.round_trip();
            let hits = tcp_spread(&a0, vip, 1, |_, _| {});
            clean = if hits.contains_key(&gone) {
                0
            } else {
                clean + 1
            };
            clean >= 30
        },
    );
    for _ in 0..20 {
        stream.round_trip();
    }
}

#[test]
fn killing_and_restarting_the_agent_fails_no_ipv6_connection() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dskill"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[A1, B0]));
    c.start_agents(&["a", "b"], WAIT);
    let a0 = c.pod("a0").ns.clone();
    let client = c.client_ns();
    let node_port = SocketAddr::new(node_ip(&c, "a", true), 30080);
    let mut streams: Vec<EchoStream> = (0..3)
        .map(|_| EchoStream::open(&a0, web_vip(true), IO))
        .collect();
    streams.extend((0..3).map(|_| EchoStream::open(&client, node_port, IO)));
    let round = |streams: &mut Vec<EchoStream>| {
        tcp_hello(&a0, web_vip(true), IO).expect("a new connection to the IPv6 ClusterIP");
        tcp_hello(&client, node_port, IO).expect("a new connection to the IPv6 NodePort");
        for s in streams.iter_mut() {
            s.round_trip();
        }
    };
    round(&mut streams);
    c.node_mut("a").kill_agent();
    for _ in 0..10 {
        round(&mut streams);
    }
    c.node_mut("a").start_agent(&[]);
    let mut during = 0;
    wait_until(WAIT, "the restarted agent is ready", || {
        round(&mut streams);
        during += 1;
        c.node("a").agent_log().matches("lb-agent ready").count() >= 2
    });
    for _ in 0..10 {
        round(&mut streams);
    }
    assert!(during > 0);
}

/// The nodes' fabric addresses of both families, as `--dsr-peers` takes them.
const DSR_PEERS: &str = "10.99.0.1/32,10.99.0.2/32,fd00:99::1/128,fd00:99::2/128";

#[test]
fn dsr_mode_shows_the_client_to_the_backend_and_answers_from_the_backends_node() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dsdsr"));
    let _s = serve_all_pods(&c);
    // The only backends live on node b; the client comes in through node a.
    c.write_manifest("web.yaml", &web(&[B0]));
    c.write_manifest("dns.yaml", &dns(&[B0]));
    for n in ["a", "b"] {
        c.node_mut(n)
            .start_agent(&["--mode", "dsr", "--dsr-peers", DSR_PEERS]);
    }
    for n in ["a", "b"] {
        c.node(n).wait_agent_ready(WAIT);
    }
    let client = c.client_ns();
    for v6 in FAMILIES {
        let f = fam(v6);
        let node_a = node_ip(&c, "a", v6);
        let (tcp_front, udp_front) = (
            SocketAddr::new(node_a, 30080),
            SocketAddr::new(node_a, 30053),
        );
        let encap_before = c.node_counter("a", "dsr_encap");
        let decap_before = c.node_counter("b", "dsr_decap");
        let too_big_before = c.node_counter("a", "dsr_too_big");
        for i in 0..5 {
            let (line, _) = tcp_hello(&client, tcp_front, IO)
                .unwrap_or_else(|e| panic!("{f}: TCP connection {i} through node a: {e}"));
            assert_eq!(
                greeting(&line),
                ("b0".to_owned(), client_ip(v6)),
                "{f}: the backend sees the client"
            );
            let (line, from) = udp_hello(&client, udp_front, IO)
                .unwrap_or_else(|e| panic!("{f}: UDP datagram {i} through node a: {e}"));
            assert_eq!(
                greeting(&line),
                ("b0".to_owned(), client_ip(v6)),
                "{f}: the backend sees the client"
            );
            assert_eq!(from, udp_front, "{f}: the answer comes from the frontend");
        }
        // A large transfer: full-size segments no longer fit once wrapped,
        // the client is told so (ICMP fragmentation needed, ICMPv6 packet
        // too big) and sends smaller ones.
        let mut stream = EchoStream::open(&client, tcp_front, IO);
        let big: String = (0..60_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let back = stream
            .echo(&big)
            .unwrap_or_else(|e| panic!("{f}: a 60 kB echo through DSR: {e}"));
        assert!(back == big, "{f}: the echo is what was sent");

        // Node a wrapped every packet and translated no reply: the replies
        // left node b straight for the client, which node b's reply
        // entries show.
        assert!(c.node_counter("a", "dsr_encap") >= encap_before + 10, "{f}");
        assert!(
            c.node_counter("a", "dsr_too_big") > too_big_before,
            "{f}: the client was told to send smaller"
        );
        assert!(c.node_counter("b", "dsr_decap") >= decap_before + 10, "{f}");
        let on_a = c.inspect("a", &["conntrack"]);
        assert!(
            on_a.as_array()
                .is_some_and(|f| !f.is_empty() && f.iter().all(|f| f["direction"] == "forward")),
            "{f}: node a holds forward entries only: {on_a}"
        );
        let on_b = c.inspect("b", &["conntrack", "--addr", &client_ip(v6).to_string()]);
        assert!(
            on_b.as_array().is_some_and(|e| e
                .iter()
                .any(|e| e["direction"] == "reply" && e["new_src"] == tcp_front.to_string())),
            "{f}: node b rewrites the backend's replies to the frontend: {on_b}"
        );
    }
}

#[test]
fn the_health_check_node_port_answers_on_both_families_node_addresses() {
    let mut c = Cluster::new(ClusterSpec::default().tag("dshc"));
    let local = |pods: &[(&str, &str, &str)]| {
        amend(
            &web(pods),
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            "",
        )
    };
    c.write_manifest("web.yaml", &local(&[A0]));
    c.start_agents(&["a", "b"], WAIT);
    let client = c.client_ns();
    let check = |node: &str, v6: bool| {
        let addr = SocketAddr::new(node_ip(&c, node, v6), 32000);
        lb_tests::rig::http_get(&client, addr, "/", IO)
            .unwrap_or_else(|e| panic!("{}: node-{node}'s check port: {e}", fam(v6)))
    };
    for v6 in FAMILIES {
        let (code, body) = check("a", v6);
        assert_eq!(
            code,
            200,
            "{}: node-a has a local endpoint: {body}",
            fam(v6)
        );
        // The count is the Service's, over both families' slices.
        let local: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        assert!(
            local["localEndpoints"].as_u64() >= Some(1),
            "{}: {body}",
            fam(v6)
        );
        let (code, body) = check("b", v6);
        assert_eq!(code, 503, "{}: node-b has none: {body}", fam(v6));
    }
    // The endpoint moves to node-b: the answers flip on both families.
    c.update_manifest("web.yaml", &local(&[B0]), WAIT);
    wait_until(WAIT, "the health checks flip on both families", || {
        FAMILIES
            .iter()
            .all(|&v6| check("a", v6).0 == 503 && check("b", v6).0 == 200)
    });
}
