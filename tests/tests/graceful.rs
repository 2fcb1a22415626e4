//! Maglev, session affinity and graceful endpoint changes with real traffic
//! in the namespace cluster.
//!
//! Needs root. Run through `cargo xtask test`.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use lb_tests::{
    manifests::{
        docs, service, slice, with_affinity, with_external_ips, with_load_balancer,
        with_local_policies, Ep,
    },
    rig::{
        in_ns, serve_all_pods, sh, tcp_hello, Cluster, ClusterSpec, EchoStream, PodServers, UdpFlow,
    },
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn ep<'a>(addr: &'a str, node: &'a str) -> Ep<'a> {
    Ep {
        addr,
        node,
        ready: true,
        terminating: false,
    }
}

fn start(c: &mut Cluster) -> PodServers {
    let servers = serve_all_pods(c);
    c.start_agents(&["a", "b"], WAIT);
    servers
}

fn backend_of(line: &str) -> String {
    line.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn web(eps: &[Ep<'_>]) -> String {
    docs(&[
        service("web", "10.96.0.10", 80, 8080, None, "TCP"),
        slice("web", "web-1", 8080, "TCP", eps),
    ])
}

#[test]
fn the_same_flow_reaches_the_same_backend_through_either_node() {
    let mut c = Cluster::new(ClusterSpec::default());
    let eps = [
        ep("10.244.1.10", "node-a"),
        ep("10.244.1.11", "node-a"),
        ep("10.244.2.10", "node-b"),
        ep("10.244.2.11", "node-b"),
    ];
    let svc = with_external_ips(
        &service("dns", "10.96.0.53", 53, 5353, None, "UDP"),
        &["10.99.0.50"],
    );
    c.write_manifest(
        "dns.yaml",
        &docs(&[svc, slice("dns", "dns-1", 5353, "UDP", &eps)]),
    );
    let _s = start(&mut c);
    let client = c.client_ns();
    // The external IP as an ECMP router would spread it: the same 5-tuple
    // first through node-a, then through node-b.
    let ask = |port: u16| {
        in_ns(&client, || {
            let s = UdpSocket::bind(("10.99.0.100", port))?;
            s.set_read_timeout(Some(IO))?;
            s.send_to(b"hello", sa("10.99.0.50:53"))?;
            let mut buf = [0u8; 256];
            let (n, from) = s.recv_from(&mut buf)?;
            assert_eq!(
                from,
                sa("10.99.0.50:53"),
                "the reply comes from the external IP"
            );
            Ok::<_, std::io::Error>(backend_of(&String::from_utf8_lossy(&buf[..n])))
        })
    };
    let mut via = [Vec::new(), Vec::new()];
    for (i, gw) in ["10.99.0.1", "10.99.0.2"].iter().enumerate() {
        sh(
            Some(&client),
            &["ip", "route", "replace", "10.99.0.50/32", "via", gw],
        );
        for port in 41000..41020 {
            via[i].push(ask(port).unwrap_or_else(|e| panic!("via {gw}, port {port}: {e}")));
        }
    }
    assert_eq!(via[0], via[1], "node-a and node-b pick the same backends");
    // Because the two agents built identical Maglev tables.
    let tables: Vec<Vec<String>> = ["a", "b"]
        .iter()
        .map(|n| {
            let maps =
                lb_agent::datapath::maps::Maps::open(&c.node(n).bpffs()).expect("open node maps");
            let snap = maps.snapshot().expect("snapshot");
            let svc_id = snap
                .infos
                .iter()
                .find(|(_, i)| i.name == "test/dns:p/UDP")
                .map(|(id, _)| *id)
                .expect("dns record");
            maps.service_table(&snap, svc_id)
                .expect("table")
                .iter()
                .map(|id| {
                    let b = snap.backends[id];
                    format!(
                        "{}:{}",
                        lb_common::addr::addr_from_be(b.addr_be, b.family),
                        u16::from_be(b.port_be)
                    )
                })
                .collect()
        })
        .collect();
    assert_eq!(
        tables[0].len(),
        lb_agent::maglev::TableSize::Scaled.for_backends(eps.len()) as usize
    );
    assert!(
        tables[0] == tables[1],
        "the two agents' Maglev tables differ"
    );
    let distinct: BTreeSet<&String> = via[0].iter().collect();
    assert!(distinct.len() > 1, "and flows spread: {distinct:?}");
}

#[test]
fn a_long_lived_stream_survives_twenty_changes_of_other_backends() {
    let mut c = Cluster::new(ClusterSpec::default());
    let all = ["10.244.1.11", "10.244.2.10", "10.244.2.11"];
    let node = |a: &str| {
        if a.starts_with("10.244.1.") {
            "node-a"
        } else {
            "node-b"
        }
    };
    let eps: Vec<Ep<'_>> = all.iter().map(|a| ep(a, node(a))).collect();
    c.write_manifest("web.yaml", &web(&eps));
    let _s = start(&mut c);
    let client = c.pod("a0").ns.clone();
    let mut stream = EchoStream::open(&client, sa("10.96.0.10:80"), IO);
    let mine = c
        .pods()
        .iter()
        .find(|p| p.name == stream.backend)
        .map(|p| p.addr.to_string())
        .expect("stream backend");
    let others: Vec<&str> = all.iter().copied().filter(|a| *a != mine).collect();
    for change in 0..20 {
        // Drop one of the other backends, then bring it back, in turn.
        let mut eps = vec![ep(&mine, node(&mine))];
        if change % 2 == 0 {
            eps.push(ep(
                others[(change / 2) % others.len()],
                node(others[(change / 2) % others.len()]),
            ));
        } else {
            eps.extend(others.iter().map(|a| ep(a, node(a))));
        }
        c.update_manifest("web.yaml", &web(&eps), WAIT);
        stream.round_trip();
    }
}

#[test]
fn a_terminating_endpoint_drains() {
    let mut c = Cluster::new(ClusterSpec::default());
    c.write_manifest(
        "web.yaml",
        &web(&[ep("10.244.1.11", "node-a"), ep("10.244.2.10", "node-b")]),
    );
    let _s = start(&mut c);
    let client = c.pod("a0").ns.clone();
    let mut stream = EchoStream::open(&client, sa("10.96.0.10:80"), IO);
    stream.round_trip();
    let (draining, other) = if stream.backend == "a1" {
        ("10.244.1.11", "10.244.2.10")
    } else {
        ("10.244.2.10", "10.244.1.11")
    };
    let node = |a: &str| {
        if a.starts_with("10.244.1.") {
            "node-a"
        } else {
            "node-b"
        }
    };
    let eps = [
        Ep {
            addr: draining,
            node: node(draining),
            ready: false,
            terminating: true,
        },
        ep(other, node(other)),
    ];
    c.update_manifest("web.yaml", &web(&eps), WAIT);
    for _ in 0..30 {
        let (line, _) = tcp_hello(&client, sa("10.96.0.10:80"), IO).expect("new connection");
        assert_ne!(
            backend_of(&line),
            stream.backend,
            "no new flow goes to the terminating endpoint"
        );
        stream.round_trip();
    }
}

#[test]
fn udp_moves_off_a_removed_backend_at_once() {
    let mut c = Cluster::new(ClusterSpec::default());
    let body = |eps: &[Ep<'_>]| {
        docs(&[
            service("dns", "10.96.0.53", 53, 5353, None, "UDP"),
            slice("dns", "dns-1", 5353, "UDP", eps),
        ])
    };
    c.write_manifest(
        "dns.yaml",
        &body(&[ep("10.244.1.11", "node-a"), ep("10.244.2.10", "node-b")]),
    );
    let _s = start(&mut c);
    let client = c.pod("a0").ns.clone();
    let flow = UdpFlow::open(&client, sa("10.96.0.53:53"), IO);
    let ask = || backend_of(&flow.ask());
    let first = ask();
    assert_eq!(ask(), first, "a UDP flow keeps its backend");
    let keep = if first == "a1" {
        ep("10.244.2.10", "node-b")
    } else {
        ep("10.244.1.11", "node-a")
    };
    c.update_manifest("dns.yaml", &body(&[keep]), WAIT);
    assert_ne!(
        ask(),
        first,
        "the very next datagram is answered by a live backend"
    );
}

#[test]
fn client_ip_affinity_holds_within_the_timeout_and_releases_after_it() {
    let mut c = Cluster::new(ClusterSpec::default());
    let eps = [
        ep("10.244.1.11", "node-a"),
        ep("10.244.2.10", "node-b"),
        ep("10.244.2.11", "node-b"),
    ];
    let svc = with_affinity(&service("web", "10.96.0.10", 80, 8080, None, "TCP"), 1);
    c.write_manifest(
        "web.yaml",
        &docs(&[svc, slice("web", "web-1", 8080, "TCP", &eps)]),
    );
    let _s = start(&mut c);
    let client = c.pod("a0").ns.clone();
    let hello = || {
        backend_of(
            &tcp_hello(&client, sa("10.96.0.10:80"), IO)
                .expect("connection")
                .0,
        )
    };
    let first = hello();
    for _ in 0..20 {
        assert_eq!(
            hello(),
            first,
            "new connections within the timeout keep the backend"
        );
    }
    // Idle for longer than the 1 s timeout, the next connection is placed
    // afresh by Maglev; it lands elsewhere with probability 2/3 each time.
    let mut released = false;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1300));
        if hello() != first {
            released = true;
            break;
        }
    }
    assert!(released, "affinity never released after its timeout");
}

#[test]
fn local_traffic_policies_preserve_the_client_and_stay_on_the_node() {
    let mut c = Cluster::new(ClusterSpec::default());
    // One endpoint per node: a1 on node-a, b0 on node-b.
    let eps = [ep("10.244.1.11", "node-a"), ep("10.244.2.10", "node-b")];
    let external = with_local_policies(
        &service("web", "10.96.0.10", 80, 8080, Some(30080), "TCP"),
        true,
        false,
    );
    let internal = with_local_policies(
        &service("dns", "10.96.0.53", 53, 5353, None, "UDP"),
        false,
        true,
    );
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            external,
            slice("web", "web-1", 8080, "TCP", &eps),
            internal,
            slice("dns", "dns-1", 5353, "UDP", &eps),
        ]),
    );
    let _s = start(&mut c);
    let client = c.client_ns();
    // externalTrafficPolicy: Local: the local backend sees the client itself.
    for node in ["10.99.0.1", "10.99.0.2"] {
        for _ in 0..10 {
            let (line, _) = tcp_hello(&client, sa(&format!("{node}:30080")), IO)
                .expect("NodePort with a local endpoint");
            let local = if node == "10.99.0.1" { "a1" } else { "b0" };
            assert!(
                line.starts_with(&format!("{local} 10.99.0.100:")),
                "via {node}: {line}"
            );
        }
    }
    // internalTrafficPolicy: Local: pods reach only endpoints on their node.
    for (pod, local) in [("a0", "a1"), ("b1", "b0")] {
        let ns = c.pod(pod).ns.clone();
        for _ in 0..10 {
            let (line, _) =
                lb_tests::rig::udp_hello(&ns, sa("10.96.0.53:53"), IO).expect("ClusterIP");
            assert_eq!(backend_of(&line), local, "from {pod}");
        }
    }
    // A node without a local endpoint drops external traffic.
    c.update_manifest(
        "svc.yaml",
        &docs(&[
            with_local_policies(
                &service("web", "10.96.0.10", 80, 8080, Some(30080), "TCP"),
                true,
                false,
            ),
            slice("web", "web-1", 8080, "TCP", &[ep("10.244.1.11", "node-a")]),
        ]),
        WAIT,
    );
    let err = tcp_hello(&client, sa("10.99.0.2:30080"), Duration::from_millis(500))
        .expect_err("dropped on node-b");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "dropped, not refused: {err}"
    );
    tcp_hello(&client, sa("10.99.0.1:30080"), IO).expect("node-a still serves");
}

/// `GET /` on a health check port from the client: (status code, body).
fn health_check(c: &Cluster, addr: &str) -> std::io::Result<(u16, String)> {
    lb_tests::rig::http_get(&c.client_ns(), sa(addr), "/", IO)
}

#[test]
fn health_check_node_port_follows_the_local_endpoints() {
    let mut c = Cluster::new(ClusterSpec::default());
    let svc = |node_ep: Ep<'_>| {
        let s = with_local_policies(
            &service("web", "10.96.0.10", 80, 8080, Some(30080), "TCP"),
            true,
            false,
        );
        docs(&[
            format!("{s}  healthCheckNodePort: 32000\n"),
            slice("web", "web-1", 8080, "TCP", &[node_ep]),
        ])
    };
    c.write_manifest("web.yaml", &svc(ep("10.244.1.11", "node-a")));
    let _s = start(&mut c);
    let (code, body) = health_check(&c, "10.99.0.1:32000").expect("node-a answers");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        r#"{"service":{"namespace":"test","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}"#
    );
    assert_eq!(
        health_check(&c, "10.99.0.2:32000")
            .expect("node-b answers")
            .0,
        503
    );
    // The endpoint moves to node-b: both answers flip within a second.
    c.write_manifest("web.yaml", &svc(ep("10.244.2.10", "node-b")));
    lb_tests::rig::wait_until(Duration::from_secs(1), "the health checks flip", || {
        health_check(&c, "10.99.0.1:32000").is_ok_and(|(s, _)| s == 503)
            && health_check(&c, "10.99.0.2:32000").is_ok_and(|(s, _)| s == 200)
    });
}

#[test]
fn load_balancer_source_ranges_admit_one_client_and_drop_another() {
    let mut c = Cluster::new(ClusterSpec::default());
    let svc = with_load_balancer(
        &service("dns", "10.96.0.53", 53, 5353, None, "UDP"),
        "10.99.0.50",
        &["10.99.0.100/32"],
    );
    c.write_manifest(
        "dns.yaml",
        &docs(&[
            svc,
            slice(
                "dns",
                "dns-1",
                5353,
                "UDP",
                &[ep("10.244.1.11", "node-a"), ep("10.244.2.10", "node-b")],
            ),
        ]),
    );
    let _s = start(&mut c);
    let client = c.client_ns();
    sh(
        Some(&client),
        &["ip", "addr", "add", "10.99.0.101/24", "dev", "eth0"],
    );
    sh(
        Some(&client),
        &[
            "ip",
            "route",
            "replace",
            "10.99.0.50/32",
            "via",
            "10.99.0.1",
        ],
    );
    let ask = |src: &str, timeout: Duration| {
        in_ns(&client, || {
            let s = UdpSocket::bind((src, 0))?;
            s.set_read_timeout(Some(timeout))?;
            s.send_to(b"hello", sa("10.99.0.50:53"))?;
            let mut buf = [0u8; 256];
            s.recv_from(&mut buf)
                .map(|(n, from)| (String::from_utf8_lossy(&buf[..n]).to_string(), from))
        })
    };
    let (line, from) = ask("10.99.0.100", IO).expect("the allowed client is answered");
    assert_eq!(from, sa("10.99.0.50:53"), "{line}");
    let err =
        ask("10.99.0.101", Duration::from_millis(500)).expect_err("the other client is dropped");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    let out = std::process::Command::new(lb_tests::rig::agent_bin())
        .args(["stats", "-o", "json", "--bpffs"])
        .arg(c.node("a").bpffs())
        .output()
        .expect("lb-agent stats");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let dropped = stats["counters"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "drop_source_range"))
        .and_then(|s| s["packets"].as_u64());
    assert_eq!(dropped, Some(1), "{stats}");
}
