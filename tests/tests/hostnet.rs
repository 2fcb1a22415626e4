//! Host-network traffic: the node's own sockets reach Services through the
//! socket hooks (cgroup v2 connect/sendmsg/recvmsg/getpeername), and only
//! the sockets of the agent's own network namespace are translated.
//!
//! Needs root. Run through `cargo xtask test`.

use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_tests::{
    manifests::{docs, dual_stack_port, one_port},
    rig::{
        in_ns, serve_all_pods, tcp_connect, tcp_hello, udp_hello, unspecified_like, Cluster,
        ClusterSpec, TcpServer, UdpServer,
    },
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

/// The pods' addresses: a0, a1 on node-a; b0, b1 on node-b.
const A1: &str = "10.244.1.11";
const B0: &str = "10.244.2.10";
const B1: &str = "10.244.2.11";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn start_agents(c: &mut Cluster, nodes: &[&str]) {
    c.start_agents(nodes, WAIT);
}

fn web(endpoints: &[(&str, &str)]) -> String {
    one_port("web", "10.96.0.10", 80, 8080, 30080, "TCP", endpoints)
}

fn dns(endpoints: &[(&str, &str)]) -> String {
    one_port("dns", "10.96.0.53", 53, 5353, 30053, "UDP", endpoints)
}

/// The pods' IPv6 addresses, as [`A1`], [`B0`], [`B1`].
const A1_6: &str = "fd00:244:1::11";
const B0_6: &str = "fd00:244:2::10";
const B1_6: &str = "fd00:244:2::11";

/// `web`, dual-stack: ClusterIPs 10.96.0.10 and fd00:96::10, endpoints of
/// both families.
fn web_dual(v4: &[(&str, &str)], v6: &[(&str, &str)]) -> String {
    dual_stack_port(
        "web",
        ("10.96.0.10", "fd00:96::10"),
        80,
        8080,
        30080,
        "TCP",
        v4,
        v6,
    )
}

/// `dns`, dual-stack: ClusterIPs 10.96.0.53 and fd00:96::53.
fn dns_dual(v4: &[(&str, &str)], v6: &[(&str, &str)]) -> String {
    dual_stack_port(
        "dns",
        ("10.96.0.53", "fd00:96::53"),
        53,
        5353,
        30053,
        "UDP",
        v4,
        v6,
    )
}

/// The endpoints a1, b0, b1 of one family.
fn three(v6: bool) -> [(&'static str, &'static str); 3] {
    if v6 {
        [(A1_6, "node-a"), (B0_6, "node-b"), (B1_6, "node-b")]
    } else {
        [(A1, "node-a"), (B0, "node-b"), (B1, "node-b")]
    }
}

/// A socket-hook counter of `node`'s agent.
fn sock_counter(c: &Cluster, node: &str, name: &str) -> u64 {
    let stats = c.inspect(node, &["stats"]);
    stats["sockets"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .and_then(|s| s["events"].as_u64())
        .unwrap_or_else(|| panic!("no socket counter {name}: {stats}"))
}

/// The per-Service counters of `svc` on `node`.
fn service_stats(c: &Cluster, node: &str, svc: &str) -> serde_json::Value {
    let stats = c.inspect(node, &["stats"]);
    stats["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == svc))
        .cloned()
        .unwrap_or_else(|| panic!("no counters of {svc}: {stats}"))
}

/// The pod a greeting came from: its first word.
fn greeter(line: &str) -> String {
    line.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Backend name → count over `n` TCP connections from `ns` to `dst`; each
/// connected socket must show `dst` as its peer.
fn tcp_spread(ns: &str, dst: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for i in 0..n {
        let (line, peer) =
            tcp_hello(ns, dst, IO).unwrap_or_else(|e| panic!("connection {i} to {dst}: {e}"));
        assert_eq!(peer, dst, "getpeername shows the frontend");
        let name = greeter(&line);
        *hits.entry(name).or_insert(0) += 1;
    }
    hits
}

/// One datagram from `ns` to `dst` on a connected socket: (reply, where
/// recvfrom says it came from, the socket's peer).
fn udp_connected_hello(ns: &str, dst: SocketAddr) -> io::Result<(String, SocketAddr, SocketAddr)> {
    in_ns(ns, || {
        let s = UdpSocket::bind(unspecified_like(dst))?;
        s.set_read_timeout(Some(IO))?;
        s.connect(dst)?;
        s.send(b"hello")?;
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf)?;
        let line = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
        Ok((line, from, s.peer_addr()?))
    })
}

#[test]
fn the_node_reaches_a_cluster_ip_over_tcp_and_sees_the_cluster_ip_as_its_peer() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnclip"));
    let _s = serve_all_pods(&c);
    c.write_manifest(
        "web.yaml",
        &web(&[(A1, "node-a"), (B0, "node-b"), (B1, "node-b")]),
    );
    start_agents(&mut c, &["a", "b"]);
    let node = c.node("a").ns.clone();
    let hits = tcp_spread(&node, sa("10.96.0.10:80"), 60);
    for backend in ["a1", "b0", "b1"] {
        assert!(
            hits.contains_key(backend),
            "{backend} never reached: {hits:?}"
        );
    }
    // Every connection is a new flow of the Service, counted where the
    // socket hook chose its backend.
    let web = service_stats(&c, "a", "test/web:p/TCP");
    assert_eq!(web["new_flows"], 60, "{web}");
    assert_eq!(web["drops"], 0, "{web}");
    assert!(sock_counter(&c, "a", "sock_translated") >= 60);
}

#[test]
fn the_node_reaches_a_cluster_ip_over_udp_and_replies_come_from_the_cluster_ip() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnudp"));
    let _s = serve_all_pods(&c);
    c.write_manifest(
        "dns.yaml",
        &dns(&[(A1, "node-a"), (B0, "node-b"), (B1, "node-b")]),
    );
    start_agents(&mut c, &["a", "b"]);
    let node = c.node("a").ns.clone();
    let vip = sa("10.96.0.53:53");
    let mut unconnected = BTreeMap::new();
    for i in 0..30 {
        let (line, from) =
            udp_hello(&node, vip, IO).unwrap_or_else(|e| panic!("unconnected datagram {i}: {e}"));
        assert_eq!(from, vip, "recvfrom shows the ClusterIP as the source");
        let name = greeter(&line);
        *unconnected.entry(name).or_insert(0) += 1;
    }
    assert!(
        unconnected.len() >= 2,
        "several backends answer: {unconnected:?}"
    );
    let mut connected = BTreeMap::new();
    for i in 0..30 {
        let (line, from, peer) = udp_connected_hello(&node, vip)
            .unwrap_or_else(|e| panic!("connected datagram {i}: {e}"));
        assert_eq!(
            from, vip,
            "recvfrom on a connected socket shows the ClusterIP"
        );
        assert_eq!(peer, vip, "getpeername shows the ClusterIP");
        let name = greeter(&line);
        *connected.entry(name).or_insert(0) += 1;
    }
    assert!(
        connected.len() >= 2,
        "several backends answer: {connected:?}"
    );
}

#[test]
fn an_unconnected_udp_socket_keeps_its_backend_and_gets_every_reply_from_the_cluster_ip() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnsock"));
    let _s = serve_all_pods(&c);
    c.write_manifest(
        "dns.yaml",
        &dns(&[(A1, "node-a"), (B0, "node-b"), (B1, "node-b")]),
    );
    start_agents(&mut c, &["a", "b"]);
    let node = c.node("a").ns.clone();
    let vip = sa("10.96.0.53:53");
    let names = in_ns(&node, || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(IO)).expect("timeout");
        let mut names = Vec::new();
        for i in 0..10 {
            s.send_to(b"q", vip).expect("send");
            let mut buf = [0u8; 2048];
            let (n, from) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("reply {i}: {e}"));
            assert_eq!(from, vip, "reply {i} comes from the ClusterIP");
            names.push(
                String::from_utf8_lossy(&buf[..n])
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        names
    });
    assert!(
        names.windows(2).all(|w| w[0] == w[1]),
        "one backend per socket: {names:?}"
    );
    // One socket, one backend: one new flow, however many datagrams.
    let dns = service_stats(&c, "a", "test/dns:p/UDP");
    assert_eq!(dns["new_flows"], 1, "{dns}");
}

#[test]
fn the_node_reaches_node_ports_on_its_own_address_and_on_the_other_nodes() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnnp"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(A1, "node-a"), (B0, "node-b")]));
    c.write_manifest("dns.yaml", &dns(&[(A1, "node-a"), (B0, "node-b")]));
    start_agents(&mut c, &["a", "b"]);
    let node = c.node("a").ns.clone();
    for addr in ["10.99.0.1", "10.99.0.2"] {
        let dst = sa(&format!("{addr}:30080"));
        let hits = tcp_spread(&node, dst, 30);
        assert!(
            hits.contains_key("a1") && hits.contains_key("b0"),
            "NodePort {dst} from node-a: {hits:?}"
        );
        let dst = sa(&format!("{addr}:30053"));
        for i in 0..10 {
            let (_, from) =
                udp_hello(&node, dst, IO).unwrap_or_else(|e| panic!("{dst} datagram {i}: {e}"));
            assert_eq!(from, dst, "the reply comes from the NodePort");
        }
    }
}

#[test]
fn a_service_without_endpoints_refuses_the_node_at_once() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnref"));
    c.write_manifest("web.yaml", &web(&[]));
    c.write_manifest("dns.yaml", &dns(&[]));
    start_agents(&mut c, &["a"]);
    let node = c.node("a").ns.clone();
    for dst in ["10.96.0.10:80", "10.99.0.1:30080"] {
        let started = Instant::now();
        let err = tcp_connect(&node, sa(dst), WAIT).expect_err("no endpoint to reach");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{dst}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{dst}: refused at once"
        );
    }
    let err = in_ns(&node, || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(sa("10.96.0.53:53"))
    })
    .expect_err("no endpoint to reach");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    let err = in_ns(&node, || {
        UdpSocket::bind("0.0.0.0:0")?.send_to(b"q", sa("10.96.0.53:53"))
    })
    .expect_err("no endpoint to reach");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    let web = service_stats(&c, "a", "test/web:p/TCP");
    assert_eq!(web["drops"], 2, "{web}");
    assert!(sock_counter(&c, "a", "sock_refused") >= 4);
}

#[test]
fn two_agents_on_one_machine_translate_only_their_own_namespaces_sockets() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnscope"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(A1, "node-a"), (B0, "node-b")]));
    // Only node-b's agent runs: its hooks see node-a's sockets (one cgroup
    // hierarchy for the whole machine) and must leave them alone. node-a
    // has no route to the ClusterIP, so an untranslated connect fails.
    start_agents(&mut c, &["b"]);
    let a = c.node("a").ns.clone();
    let b = c.node("b").ns.clone();
    let vip = sa("10.96.0.10:80");
    let err = tcp_connect(&a, vip, IO).expect_err("node-a's socket is not translated");
    assert_ne!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert!(tcp_hello(&b, vip, IO).is_ok(), "node-b's own socket is");
    // With both agents running, each counts only its own node's sockets.
    start_agents(&mut c, &["a"]);
    let before_a = sock_counter(&c, "a", "sock_translated");
    let before_b = sock_counter(&c, "b", "sock_translated");
    for i in 0..10 {
        tcp_hello(&a, vip, IO).unwrap_or_else(|e| panic!("node-a connection {i}: {e}"));
    }
    assert_eq!(sock_counter(&c, "a", "sock_translated") - before_a, 10);
    assert_eq!(sock_counter(&c, "b", "sock_translated"), before_b);
}

/// Whether a socket call failed for good (not just a read timeout).
fn ended(r: &io::Result<usize>) -> bool {
    matches!(r, Err(e) if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

#[test]
fn a_removed_backends_connected_node_sockets_are_ended() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnstale"));
    let _s = serve_all_pods(&c);
    let both = [(A1, "node-a"), (B0, "node-b")];
    c.write_manifest("dns.yaml", &dns(&both));
    c.write_manifest("web.yaml", &web(&both));
    start_agents(&mut c, &["a", "b"]);
    let node = c.node("a").ns.clone();
    let vip = sa("10.96.0.53:53");
    let udp = in_ns(&node, || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.connect(vip)?;
        Ok::<_, io::Error>(s)
    })
    .expect("connected UDP socket");
    let mut buf = [0u8; 2048];
    let mut backend = None;
    for _ in 0..20 {
        udp.send(b"q").expect("send");
        if let Ok(n) = udp.recv(&mut buf) {
            let line = String::from_utf8_lossy(&buf[..n]).to_string();
            backend = line.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    let backend = backend.expect("the UDP backend answers");
    let mut stream = tcp_connect(&node, sa("10.96.0.10:80"), IO).expect("TCP connection");
    let mut greeting = [0u8; 64];
    let n = io::Read::read(&mut stream, &mut greeting).expect("greeting");
    let tcp_backend = String::from_utf8_lossy(&greeting[..n])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();

    // Both backends leave their Service (the other one stays).
    let addr_of = |name: &str| if name == "a1" { A1 } else { B0 };
    let keep = |gone: &str| -> Vec<(&str, &str)> {
        both.iter()
            .copied()
            .filter(|(a, _)| *a != addr_of(gone))
            .collect()
    };
    let before = c.node("a").syncs();
    c.write_manifest("dns.yaml", &dns(&keep(&backend)));
    c.write_manifest("web.yaml", &web(&keep(&tcp_backend)));
    c.node("a").wait_synced(before, WAIT);
    lb_tests::rig::wait_until(WAIT, "the UDP socket is ended", || {
        let _ = udp.send(b"q");
        ended(&udp.recv(&mut buf))
    });
    lb_tests::rig::wait_until(WAIT, "the TCP socket is ended", || {
        ended(&io::Write::write(&mut stream, b"ping\n").and_then(|_| {
            stream.set_read_timeout(Some(Duration::from_millis(200)))?;
            io::Read::read(&mut stream, &mut greeting)
        }))
    });
    // The sweep counts its ends once it has made them all, a moment after
    // the sockets see them.
    lb_tests::rig::wait_until(WAIT, "both ends counted", || {
        sock_counter(&c, "a", "sock_destroyed") >= 2
    });
    // A new socket reaches the backend that stayed.
    let (line, from, _) = udp_connected_hello(&node, vip).expect("a new socket is answered");
    assert_eq!(from, vip);
    assert!(!line.starts_with(&backend), "{line}");
}

#[test]
fn socket_hooks_outlive_the_agent_are_re_adopted_and_go_with_cleanup() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnrest"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&[(A1, "node-a"), (B0, "node-b")]));
    start_agents(&mut c, &["a"]);
    let node = c.node("a").ns.clone();
    let vip = sa("10.96.0.10:80");
    tcp_hello(&node, vip, IO).expect("through the hooks");
    // No agent: the pinned hooks keep translating.
    c.node_mut("a").stop_agent();
    tcp_hello(&node, vip, IO).expect("while no agent runs");
    start_agents(&mut c, &["a"]);
    let log = c.node("a").agent_log();
    assert_eq!(
        log.matches("re-adopted pinned socket hook").count(),
        8,
        "the restarted agent swaps its programs into the eight links (four per family):\n{log}"
    );
    tcp_hello(&node, vip, IO).expect("after the restart");
    c.node_mut("a").stop_agent();
    let out = std::process::Command::new(lb_tests::rig::agent_bin())
        .args(["cleanup", "--bpffs"])
        .arg(c.node("a").bpffs())
        .output()
        .expect("run lb-agent cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Untranslated, the ClusterIP has no route from the node.
    let err = tcp_connect(&node, vip, IO).expect_err("no hooks after cleanup");
    assert_ne!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
}

/// A Service whose endpoint is a process in node-a's own namespace (a
/// hostNetwork pod, or the API server behind `kubernetes`): its replies
/// leave node-a through egress, where they must be translated back.
#[test]
fn an_endpoint_on_the_nodes_own_address_answers_pods_outside_clients_and_nodes() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnhost"));
    let node_a = c.node("a").ns.clone();
    let _tcp = TcpServer::start(&node_a, sa("0.0.0.0:9090"), "host-a");
    // Bound to the node's address, as a host-network UDP server that wants
    // its replies to come from the address asked must be (or answer with
    // IP_PKTINFO): unbound, the kernel would answer a pod from the address
    // of the pod's route, which no translation expects (kube-proxy's
    // neither).
    let _udp = UdpServer::start(&node_a, sa("10.99.0.1:9090"), "host-a");
    c.write_manifest(
        "host.yaml",
        &docs(&[
            one_port(
                "host",
                "10.96.0.90",
                90,
                9090,
                30090,
                "TCP",
                &[("10.99.0.1", "node-a")],
            ),
            one_port(
                "hostu",
                "10.96.0.91",
                91,
                9090,
                30091,
                "UDP",
                &[("10.99.0.1", "node-a")],
            ),
        ]),
    );
    start_agents(&mut c, &["a", "b"]);
    let clients = [
        ("a pod of the endpoint's node", c.pod("a0").ns.clone()),
        ("a pod of the other node", c.pod("b0").ns.clone()),
        ("the endpoint's node", node_a.clone()),
        ("the other node", c.node("b").ns.clone()),
    ];
    for (who, ns) in &clients {
        for dst in ["10.96.0.90:90", "10.99.0.1:30090", "10.99.0.2:30090"] {
            let dst = sa(dst);
            let (line, peer) =
                tcp_hello(ns, dst, IO).unwrap_or_else(|e| panic!("{who} to {dst}: {e}"));
            assert!(line.starts_with("host-a "), "{who} to {dst}: {line}");
            assert_eq!(peer, dst, "{who} to {dst}: the peer is the frontend");
        }
        let dst = sa("10.96.0.91:91");
        let (line, from) =
            udp_hello(ns, dst, IO).unwrap_or_else(|e| panic!("{who} to {dst} over UDP: {e}"));
        assert!(line.starts_with("host-a "), "{who} to {dst}: {line}");
        assert_eq!(from, dst, "{who}: the reply comes from the ClusterIP");
    }
    let client = c.client_ns().to_string();
    for dst in ["10.99.0.1:30090", "10.99.0.2:30090"] {
        let dst = sa(dst);
        let (line, peer) =
            tcp_hello(&client, dst, IO).unwrap_or_else(|e| panic!("outside to {dst}: {e}"));
        assert!(line.starts_with("host-a "), "outside to {dst}: {line}");
        assert_eq!(peer, dst, "outside to {dst}");
    }
    for dst in ["10.99.0.1:30091", "10.99.0.2:30091"] {
        let dst = sa(dst);
        let (line, from) =
            udp_hello(&client, dst, IO).unwrap_or_else(|e| panic!("outside to {dst}: {e}"));
        assert!(line.starts_with("host-a "), "outside to {dst}: {line}");
        assert_eq!(
            from, dst,
            "outside to {dst} over UDP: the reply comes from the NodePort"
        );
    }
}

/// The kernel's cookie of `fd`'s socket (`SO_COOKIE`), which the socket
/// hooks mix into their Maglev hash.
fn socket_cookie(fd: &impl std::os::fd::AsRawFd) -> u64 {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a u64 and `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
    cookie
}

/// `lb-agent trace --socket` on `node` (JSON).
fn trace_socket(c: &Cluster, node: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["trace", "--socket"];
    all.extend_from_slice(args);
    c.inspect(node, &all)
}

/// The pod name of a backend as trace prints it (`address:port (id N)`).
fn pod_of(backend: &serde_json::Value) -> &'static str {
    let addr = backend
        .as_str()
        .and_then(|b| b.split(':').next())
        .unwrap_or_else(|| panic!("no backend address in {backend}"));
    match addr {
        A1 => "a1",
        B0 => "b0",
        B1 => "b1",
        other => panic!("{other} is no endpoint of the Service"),
    }
}

#[test]
fn trace_names_the_backend_a_node_socket_gets_at_connect() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hntrace"));
    let _s = serve_all_pods(&c);
    let endpoints = [(A1, "node-a"), (B0, "node-b"), (B1, "node-b")];
    c.write_manifest("web.yaml", &web(&endpoints));
    c.write_manifest("dns.yaml", &dns(&endpoints));
    c.write_manifest(
        "empty.yaml",
        &one_port("empty", "10.96.0.20", 80, 8080, 30090, "TCP", &[]),
    );
    start_agents(&mut c, &["a"]);
    let node = c.node("a").ns.clone();

    // Real sockets: the trace, given a socket's cookie, must name the
    // backend the live hook gave that socket, for TCP and connected UDP.
    let mut seen = BTreeMap::new();
    for i in 0..12 {
        let (got, cookie) = in_ns(&node, || {
            let s = std::net::TcpStream::connect_timeout(&sa("10.96.0.10:80"), IO)?;
            s.set_read_timeout(Some(IO))?;
            let mut line = String::new();
            io::BufRead::read_line(&mut io::BufReader::new(&s), &mut line)?;
            Ok::<_, io::Error>((line, socket_cookie(&s)))
        })
        .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let got = greeter(&got);
        let cookie = cookie.to_string();
        let t = trace_socket(
            &c,
            "a",
            &[
                "connect",
                "--proto",
                "tcp",
                "--dst",
                "10.96.0.10:80",
                "--cookie",
                &cookie,
            ],
        );
        assert_eq!(t["verdict"], "translated", "{t}");
        assert_eq!(t["frontend"], "test/web:p/TCP", "{t}");
        assert_eq!(pod_of(&t["backend"]), got, "socket {i}: {t}");
        assert!(
            t["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("Maglev: socket hash")),
            "{t}"
        );
        *seen.entry(got).or_insert(0) += 1;
    }
    assert!(seen.len() > 1, "twelve sockets, one backend: {seen:?}");
    for i in 0..6 {
        let (got, cookie) = in_ns(&node, || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(IO))?;
            s.connect(sa("10.96.0.53:53"))?;
            s.send(b"hello")?;
            let mut buf = [0u8; 2048];
            let n = s.recv(&mut buf)?;
            Ok::<_, io::Error>((
                String::from_utf8_lossy(&buf[..n]).to_string(),
                socket_cookie(&s),
            ))
        })
        .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
        let got = greeter(&got);
        let cookie = cookie.to_string();
        for call in ["connect", "sendmsg"] {
            let t = trace_socket(
                &c,
                "a",
                &[
                    call,
                    "--proto",
                    "udp",
                    "--dst",
                    "10.96.0.53:53",
                    "--cookie",
                    &cookie,
                ],
            );
            assert_eq!(t["verdict"], "translated", "{t}");
            assert_eq!(pod_of(&t["backend"]), got, "{call} {i}: {t}");
        }
    }

    // Refusals say why; a non-frontend is left alone.
    let t = trace_socket(
        &c,
        "a",
        &["connect", "--proto", "tcp", "--dst", "10.96.0.20:80"],
    );
    assert_eq!(t["verdict"], "refused", "{t}");
    assert_eq!(t["errno"], "ECONNREFUSED", "{t}");
    assert_eq!(t["frontend"], "test/empty:p/TCP", "{t}");
    let t = trace_socket(
        &c,
        "a",
        &["connect", "--proto", "tcp", "--dst", "10.96.0.10:81"],
    );
    assert_eq!(t["verdict"], "refused", "{t}");
    assert!(t["frontend"].is_null(), "{t}");
    let t = trace_socket(
        &c,
        "a",
        &["connect", "--proto", "tcp", "--dst", "10.99.0.2:22"],
    );
    assert_eq!(t["verdict"], "untouched", "{t}");
    // The trace ran on a private copy: the live counters did not move.
    assert_eq!(service_stats(&c, "a", "test/empty:p/TCP")["drops"], 0);
}

#[test]
fn the_node_reaches_a_dual_stack_service_over_both_families_tcp_and_udp() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnv6"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web_dual(&three(false), &three(true)));
    c.write_manifest("dns.yaml", &dns_dual(&three(false), &three(true)));
    start_agents(&mut c, &["a", "b"]);
    let node = c.node("a").ns.clone();
    for (vip, vip_udp) in [
        (sa("10.96.0.10:80"), sa("10.96.0.53:53")),
        (sa("[fd00:96::10]:80"), sa("[fd00:96::53]:53")),
    ] {
        let hits = tcp_spread(&node, vip, 40);
        for backend in ["a1", "b0", "b1"] {
            assert!(
                hits.contains_key(backend),
                "{vip}: {backend} never reached: {hits:?}"
            );
        }
        // A backend of the frontend's own family: its greeting shows a
        // client address of that family.
        let (line, _) = tcp_hello(&node, vip, IO).expect("greeting");
        let client = line
            .split_whitespace()
            .nth(1)
            .expect("greeting names the client");
        assert_eq!(sa(client).is_ipv4(), vip.is_ipv4(), "{vip}: {line}");
        let mut names = BTreeMap::new();
        for i in 0..20 {
            let (line, from) = udp_hello(&node, vip_udp, IO)
                .unwrap_or_else(|e| panic!("{vip_udp} datagram {i}: {e}"));
            assert_eq!(from, vip_udp, "recvfrom shows the ClusterIP");
            *names.entry(greeter(&line)).or_insert(0) += 1;
            let (_, from, peer) = udp_connected_hello(&node, vip_udp)
                .unwrap_or_else(|e| panic!("{vip_udp} connected datagram {i}: {e}"));
            assert_eq!(
                (from, peer),
                (vip_udp, vip_udp),
                "the connected socket sees the ClusterIP"
            );
        }
        assert!(
            names.len() >= 2,
            "{vip_udp}: several backends answer: {names:?}"
        );
    }
    // One Service port, one table per family: the counters add up.
    let web = service_stats(&c, "a", "test/web:p/TCP");
    assert_eq!(web["drops"], 0, "{web}");
    assert!(sock_counter(&c, "a", "sock_translated") >= 80);
}

#[test]
fn an_ipv6_socket_reaches_an_ipv4_service_by_its_mapped_address_and_sees_it_mapped() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnmap"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web(&three(false)));
    c.write_manifest("dns.yaml", &dns(&three(false)));
    start_agents(&mut c, &["a"]);
    let node = c.node("a").ns.clone();
    // An IPv6 socket: the flow is IPv4, to an IPv4 backend, shown mapped.
    let vip = sa("[::ffff:10.96.0.10]:80");
    let hits = tcp_spread(&node, vip, 30);
    assert!(hits.len() >= 2, "several backends: {hits:?}");
    let vip_udp = sa("[::ffff:10.96.0.53]:53");
    for i in 0..10 {
        let (line, from) =
            udp_hello(&node, vip_udp, IO).unwrap_or_else(|e| panic!("mapped datagram {i}: {e}"));
        assert_eq!(from, vip_udp, "recvfrom shows the mapped ClusterIP");
        assert!(
            ["a1", "b0", "b1"].contains(&greeter(&line).as_str()),
            "{line}"
        );
        let (_, from, peer) = udp_connected_hello(&node, vip_udp)
            .unwrap_or_else(|e| panic!("mapped connected datagram {i}: {e}"));
        assert_eq!((from, peer), (vip_udp, vip_udp));
    }
}

#[test]
fn an_ipv6_frontend_without_endpoints_refuses_the_node_at_once() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnref6"));
    c.write_manifest("web.yaml", &web_dual(&[], &[]));
    c.write_manifest("dns.yaml", &dns_dual(&[], &[]));
    start_agents(&mut c, &["a"]);
    let node = c.node("a").ns.clone();
    for dst in [
        "[fd00:96::10]:80",
        "[fd00:99::1]:30080",
        "[::ffff:10.96.0.10]:80",
    ] {
        let started = Instant::now();
        let err = tcp_connect(&node, sa(dst), WAIT).expect_err("no endpoint to reach");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{dst}: {err}");
        // Well inside the connect timeout: the hook fails the call, no
        // SYN waits (a second is too tight under the VM's emulation; the
        // hook's own counter below says who refused).
        assert!(started.elapsed() < WAIT / 2, "{dst}: refused at once");
    }
    let vip = sa("[fd00:96::53]:53");
    let err =
        in_ns(&node, || UdpSocket::bind("[::]:0")?.connect(vip)).expect_err("no endpoint to reach");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    let err = in_ns(&node, || UdpSocket::bind("[::]:0")?.send_to(b"q", vip))
        .expect_err("no endpoint to reach");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    // A port no Service uses on an IPv6 ClusterIP is refused too.
    let err = tcp_connect(&node, sa("[fd00:96::10]:81"), WAIT).expect_err("no such port");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert!(sock_counter(&c, "a", "sock_refused") >= 6);
}

#[test]
fn the_node_reaches_node_ports_on_its_own_ipv6_address() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnnp6"));
    let _s = serve_all_pods(&c);
    let (v4, v6) = (
        [(A1, "node-a"), (B0, "node-b")],
        [(A1_6, "node-a"), (B0_6, "node-b")],
    );
    c.write_manifest("web.yaml", &web_dual(&v4, &v6));
    c.write_manifest("dns.yaml", &dns_dual(&v4, &v6));
    start_agents(&mut c, &["a"]);
    let node = c.node("a").ns.clone();
    let dst = sa("[fd00:99::1]:30080");
    let hits = tcp_spread(&node, dst, 30);
    assert!(
        hits.contains_key("a1") && hits.contains_key("b0"),
        "NodePort {dst} from node-a: {hits:?}"
    );
    let dst = sa("[fd00:99::1]:30053");
    for i in 0..10 {
        let (_, from) =
            udp_hello(&node, dst, IO).unwrap_or_else(|e| panic!("{dst} datagram {i}: {e}"));
        assert_eq!(from, dst, "the reply comes from the NodePort");
    }
    // The NodePorts of an IPv4-only Service stay off the IPv6 address:
    // kube-proxy serves a Service in its own families.
    c.update_manifest("web.yaml", &web(&v4), WAIT);
    let err = tcp_connect(&node, sa("[fd00:99::1]:30080"), IO).expect_err("not a frontend now");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(
        sock_counter(&c, "a", "sock_refused"),
        0,
        "the stack refused it, not a hook"
    );
}

#[test]
fn load_balancer_source_ranges_bind_the_nodes_own_ipv6_sockets() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hnsrc6"));
    let _s = serve_all_pods(&c);
    let lb = |ranges: &str| {
        format!(
            "{}  loadBalancerSourceRanges: [{ranges}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 10.50.0.7}}, {{ip: 'fd00:50::7'}}]\n",
            web_dual(&three(false), &three(true))
                .split("---\n")
                .next()
                .expect("the Service")
                .replace("  type: NodePort\n", "  type: LoadBalancer\n")
        )
    };
    let slices: Vec<String> = web_dual(&three(false), &three(true))
        .split("---\n")
        .skip(1)
        .map(str::to_owned)
        .collect();
    let with = |ranges: &str| {
        let mut all = vec![lb(ranges)];
        all.extend(slices.iter().cloned());
        docs(&all)
    };
    // The node's sockets are unbound: their client is the node's address
    // of the family, 10.99.0.1 or fd00:99::1, outside these ranges.
    c.write_manifest("web.yaml", &with("10.1.0.0/16, 'fd00:c1::/64'"));
    start_agents(&mut c, &["a"]);
    let node = c.node("a").ns.clone();
    for dst in ["[fd00:50::7]:80", "10.50.0.7:80"] {
        let err = tcp_connect(&node, sa(dst), IO).expect_err("outside the ranges");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{dst}: {err}");
    }
    assert_eq!(sock_counter(&c, "a", "sock_drop_source_range"), 2);
    // The ClusterIPs are not guarded.
    tcp_hello(&node, sa("[fd00:96::10]:80"), IO).expect("the ClusterIP is open");
    // Inside the ranges (the IPv6 one only): that family admits the node.
    c.update_manifest("web.yaml", &with("10.1.0.0/16, 'fd00:99::/64'"), WAIT);
    tcp_hello(&node, sa("[fd00:50::7]:80"), IO).expect("inside the IPv6 range");
    let err = tcp_connect(&node, sa("10.50.0.7:80"), IO).expect_err("still outside the IPv4 ones");
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
}

/// The pod a traced backend (`address:port (id N)`) is, by address.
fn pod_named(c: &Cluster, backend: &serde_json::Value) -> String {
    let addr = backend
        .as_str()
        .and_then(|b| b.split_whitespace().next())
        .map(sa)
        .unwrap_or_else(|| panic!("no backend address in {backend}"));
    c.pod_by_addr(&addr.ip().to_string()).name.clone()
}

#[test]
fn trace_names_the_backend_of_an_ipv6_or_mapped_node_socket() {
    let mut c = Cluster::new(ClusterSpec::default().tag("hntr6"));
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &web_dual(&three(false), &three(true)));
    start_agents(&mut c, &["a"]);
    let node = c.node("a").ns.clone();
    for dst in ["[fd00:96::10]:80", "[::ffff:10.96.0.10]:80"] {
        for i in 0..6 {
            let (got, cookie) = in_ns(&node, || {
                let s = std::net::TcpStream::connect_timeout(&sa(dst), IO)?;
                s.set_read_timeout(Some(IO))?;
                let mut line = String::new();
                io::BufRead::read_line(&mut io::BufReader::new(&s), &mut line)?;
                Ok::<_, io::Error>((line, socket_cookie(&s)))
            })
            .unwrap_or_else(|e| panic!("{dst} connection {i}: {e}"));
            let cookie = cookie.to_string();
            let t = trace_socket(
                &c,
                "a",
                &[
                    "connect", "--proto", "tcp", "--dst", dst, "--cookie", &cookie,
                ],
            );
            assert_eq!(t["verdict"], "translated", "{t}");
            // The table of the flow's family: an IPv4-mapped address is IPv4.
            let table = if dst.contains("::ffff:") {
                "test/web:p/TCP"
            } else {
                "test/web:p/TCP@v6"
            };
            assert_eq!(t["frontend"], table, "{t}");
            assert_eq!(
                pod_named(&c, &t["backend"]),
                greeter(&got),
                "{dst} socket {i}: {t}"
            );
            let client = if dst.contains("::ffff:") {
                "10.99.0.1"
            } else {
                "fd00:99::1"
            };
            assert_eq!(t["client"], client, "{t}");
        }
    }
    let t = trace_socket(
        &c,
        "a",
        &["connect", "--proto", "tcp", "--dst", "[fd00:96::10]:81"],
    );
    assert_eq!(t["verdict"], "refused", "{t}");
    // A packet trace takes IPv6 too: it builds an IPv6 frame and reads it
    // back (what the datapath does with it is the datapath tests' matter).
    let t = c.inspect(
        "a",
        &[
            "trace",
            "--proto",
            "tcp",
            "--src",
            "[fd00:244:1::10]:4000",
            "--dst",
            "[fd00:96::10]:80",
        ],
    );
    assert_eq!(t["input"]["proto"], "TCP", "{t}");
    assert_eq!(t["input"]["src"], "[fd00:244:1::10]:4000", "{t}");
    assert_eq!(t["input"]["dst"], "[fd00:96::10]:80", "{t}");
    assert_eq!(t["input"]["tcp_flags"], "S", "{t}");
}
