//! Service semantics kube-proxy users rely on, with real traffic in the
//! namespace cluster: readiness loss does not end connections, Local
//! traffic policies bind only clients from outside, a Local Service
//! without any endpoint is refused like every other, and a ClusterIP port
//! no Service uses is refused.
//!
//! Needs root. Run through `cargo xtask test`.

use std::{
    fmt::Write as _,
    io,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use lb_tests::{
    manifests::{docs, service, with_external_ips, with_load_balancer, with_local_policies},
    rig::{
        in_ns, serve_all_pods, tcp_hello, Cluster, ClusterSpec, EchoStream, PodServers, UdpFlow,
    },
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);
/// How long a connection attempt waits before a silent drop is assumed.
const DROPPED: Duration = Duration::from_millis(500);

/// The pods' addresses: a0, a1 on node-a; b0, b1 on node-b.
const A1: &str = "10.244.1.11";
const B0: &str = "10.244.2.10";
const B1: &str = "10.244.2.11";

/// Conditions of a ready endpoint.
const READY: &str = "{ready: true}";
/// A failed readiness probe: not ready, not serving, not terminating.
const NOT_READY: &str = "{ready: false, serving: false, terminating: false}";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn start(c: &mut Cluster) -> PodServers {
    let servers = serve_all_pods(c);
    c.start_agents(&["a", "b"], WAIT);
    servers
}

/// The node a pod address is on, as the rig lays pods out.
fn node_of(addr: &str) -> &'static str {
    if addr.starts_with("10.244.1.") {
        "node-a"
    } else {
        "node-b"
    }
}

/// An EndpointSlice for Service `service` (port `p`) whose endpoints carry
/// the given conditions verbatim: `(address, conditions)`.
fn slice(service: &str, port: u16, proto: &str, endpoints: &[(&str, &str)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: test\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n  - name: p\n    protocol: {proto}\n    port: {port}\n"
    );
    if endpoints.is_empty() {
        s.push_str("endpoints: []\n");
    } else {
        s.push_str("endpoints:\n");
    }
    for (addr, conditions) in endpoints {
        let _ = write!(
            s,
            "  - addresses: [{addr}]\n    nodeName: {}\n    conditions: {conditions}\n",
            node_of(addr)
        );
    }
    s
}

/// The first word of a server's answer: the pod's name.
fn backend_of(line: &str) -> String {
    line.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The name of the pod whose address is `addr`.
fn name_of(c: &Cluster, addr: &str) -> String {
    c.pod_by_addr(addr).name.clone()
}

/// Expects a connection attempt from `ns` to `dst` to meet silence (a drop).
fn assert_dropped(ns: &str, dst: &str, what: &str) {
    let err = tcp_hello(ns, sa(dst), DROPPED).expect_err(what);
    assert_eq!(
        err.kind(),
        io::ErrorKind::TimedOut,
        "{what}: dropped, not refused: {err}"
    );
}

/// Expects a connection attempt from `ns` to `dst` to be refused at once.
fn assert_refused(ns: &str, dst: &str, what: &str) {
    let err = tcp_hello(ns, sa(dst), IO).expect_err(what);
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "{what}: refused: {err}"
    );
}

#[test]
fn readiness_loss_keeps_established_connections_and_leaving_the_slice_ends_them() {
    let mut c = Cluster::new(ClusterSpec::default());
    let web = |eps: &[(&str, &str)]| {
        docs(&[
            service("web", "10.96.0.10", 80, 8080, None, "TCP"),
            slice("web", 8080, "TCP", eps),
        ])
    };
    c.write_manifest("web.yaml", &web(&[(A1, READY), (B0, READY), (B1, READY)]));
    let _s = start(&mut c);
    let client = c.pod("a0").ns.clone();
    let mut streams: Vec<EchoStream> = (0..12)
        .map(|_| EchoStream::open(&client, sa("10.96.0.10:80"), IO))
        .collect();
    for s in &mut streams {
        s.round_trip();
    }
    // Keep one endpoint ready; the first stream's backend is among those
    // whose readiness probe fails, so at least one stream is at stake.
    let keep = [A1, B0, B1]
        .into_iter()
        .find(|a| name_of(&c, a) != streams[0].backend)
        .expect("another backend");
    let failed: Vec<&str> = [A1, B0, B1].into_iter().filter(|a| *a != keep).collect();
    let flipped: Vec<(&str, &str)> = [A1, B0, B1]
        .into_iter()
        .map(|a| (a, if a == keep { READY } else { NOT_READY }))
        .collect();
    c.update_manifest("web.yaml", &web(&flipped), WAIT);

    for (i, s) in streams.iter_mut().enumerate() {
        s.echo("after the readiness flip")
            .unwrap_or_else(|e| panic!("stream {i} to {} broke on readiness loss: {e}", s.backend));
    }
    let kept = name_of(&c, keep);
    for _ in 0..20 {
        let (line, _) = tcp_hello(&client, sa("10.96.0.10:80"), IO).expect("new connection");
        assert_eq!(
            backend_of(&line),
            kept,
            "new connections avoid the not-ready pods"
        );
    }
    for s in &mut streams {
        s.round_trip();
    }

    // Leaving the slice ends the not-ready pods' connections, visibly,
    // once the removed backend's grace (1 s, for handshakes in flight) is
    // over.
    c.update_manifest("web.yaml", &web(&[(keep, READY)]), WAIT);
    let gone: Vec<String> = failed.iter().map(|a| name_of(&c, a)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for (i, s) in streams.iter_mut().enumerate() {
        if gone.contains(&s.backend) {
            let err = loop {
                match s.echo("after removal") {
                    Err(e) => break e,
                    Ok(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Ok(_) => panic!("stream {i} to a removed endpoint still open after 10 s"),
                }
            };
            assert!(
                matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                ),
                "stream {i} to {} ends with a reset, not a timeout: {err}",
                s.backend
            );
        } else {
            s.echo("after removal")
                .unwrap_or_else(|e| panic!("stream {i} to the ready pod broke: {e}"));
        }
    }
}

#[test]
fn udp_flows_stay_on_a_not_ready_serving_endpoint_and_move_off_a_not_serving_one() {
    let mut c = Cluster::new(ClusterSpec::default());
    let dns = |eps: &[(&str, &str)]| {
        docs(&[
            service("dns", "10.96.0.53", 53, 5353, None, "UDP"),
            slice("dns", 5353, "UDP", eps),
        ])
    };
    c.write_manifest("dns.yaml", &dns(&[(A1, READY), (B0, READY)]));
    let _s = start(&mut c);
    let client = c.pod("a0").ns.clone();
    let flow = UdpFlow::open(&client, sa("10.96.0.53:53"), IO);
    let ask = || backend_of(&flow.ask());
    let first = ask();
    let (mine, other) = if first == name_of(&c, A1) {
        (A1, B0)
    } else {
        (B0, A1)
    };
    // Not ready with `serving` unset: serving, as kube-proxy reads it, so
    // the flow stays (kube-proxy clears UDP entries of non-serving ones).
    c.update_manifest(
        "dns.yaml",
        &dns(&[(mine, "{ready: false}"), (other, READY)]),
        WAIT,
    );
    for _ in 0..5 {
        assert_eq!(ask(), first, "the flow stays on a serving endpoint");
    }
    c.update_manifest("dns.yaml", &dns(&[(mine, NOT_READY), (other, READY)]), WAIT);
    assert_eq!(
        ask(),
        name_of(&c, other),
        "the very next datagram is answered by a ready endpoint"
    );
}

/// A NodePort Service with `externalTrafficPolicy: Local`, an externalIP
/// and a LoadBalancer ingress IP, whose endpoints are `eps`.
fn local_web(eps: &[(&str, &str)]) -> String {
    let svc = with_local_policies(
        &service("web", "10.96.0.10", 80, 8080, Some(30080), "TCP"),
        true,
        false,
    );
    let svc = with_load_balancer(&with_external_ips(&svc, &["10.97.0.1"]), "10.98.0.1", &[]);
    docs(&[svc, slice("web", 8080, "TCP", eps)])
}

#[test]
fn external_local_policy_binds_only_clients_from_outside() {
    let mut c = Cluster::new(ClusterSpec::default());
    // The only endpoint is on node-a.
    c.write_manifest("web.yaml", &local_web(&[(A1, READY)]));
    let _s = start(&mut c);
    let a1 = name_of(&c, A1);
    let frontends = ["10.99.0.2:30080", "10.97.0.1:80", "10.98.0.1:80"];
    // A pod on node-b, which has no local endpoint.
    let pod = c.pod("b0").ns.clone();
    // node-b itself (its own sockets: the socket hooks).
    let node = c.node("b").ns.clone();
    for (who, ns) in [("pod b0", &pod), ("node-b", &node)] {
        for dst in frontends {
            for _ in 0..3 {
                let (line, _) =
                    tcp_hello(ns, sa(dst), IO).unwrap_or_else(|e| panic!("{who} to {dst}: {e}"));
                assert_eq!(backend_of(&line), a1, "{who} to {dst}");
            }
        }
    }
    // A client from outside is bound to node-b's local endpoints: none.
    let client = c.client_ns();
    assert_dropped(&client, "10.99.0.2:30080", "outside client via node-b");
    let (line, _) = tcp_hello(&client, sa("10.99.0.1:30080"), IO).expect("via node-a");
    assert!(
        line.starts_with(&format!("{a1} 10.99.0.100:")),
        "node-a serves it locally and keeps the client's address: {line}"
    );
}

#[test]
fn local_policies_refuse_without_any_endpoint_and_drop_without_a_local_one() {
    let mut c = Cluster::new(ClusterSpec::default());
    let internal = |eps: &[(&str, &str)]| {
        let svc = with_local_policies(
            &service("api", "10.96.0.20", 80, 8080, None, "TCP"),
            false,
            true,
        );
        docs(&[svc, slice("api", 8080, "TCP", eps)])
    };
    c.write_manifest("web.yaml", &local_web(&[]));
    c.write_manifest("api.yaml", &internal(&[]));
    let _s = start(&mut c);
    let client = c.client_ns();
    let pod = c.pod("b0").ns.clone();
    // No endpoint anywhere: refused, like any Service without endpoints.
    assert_refused(
        &client,
        "10.99.0.2:30080",
        "external Local, no endpoint anywhere",
    );
    assert_refused(
        &pod,
        "10.96.0.20:80",
        "internal Local, no endpoint anywhere",
    );

    // Endpoints exist, on node-a only: node-b drops.
    c.update_manifest("web.yaml", &local_web(&[(A1, READY)]), WAIT);
    c.update_manifest("api.yaml", &internal(&[(A1, READY)]), WAIT);
    assert_dropped(
        &client,
        "10.99.0.2:30080",
        "external Local, endpoint elsewhere",
    );
    assert_dropped(&pod, "10.96.0.20:80", "internal Local, endpoint elsewhere");
    let a1 = name_of(&c, A1);
    let (line, _) = tcp_hello(&c.pod("a0").ns, sa("10.96.0.20:80"), IO).expect("node-a's pod");
    assert_eq!(backend_of(&line), a1);
}

#[test]
fn a_cluster_ip_port_no_service_uses_is_refused_to_pods_and_the_node() {
    let mut c = Cluster::new(ClusterSpec::default());
    c.write_manifest(
        "web.yaml",
        &docs(&[
            service("web", "10.96.0.10", 80, 8080, None, "TCP"),
            slice("web", 8080, "TCP", &[(A1, READY)]),
        ]),
    );
    let _s = start(&mut c);
    let pod = c.pod("b0").ns.clone();
    let node = c.node("b").ns.clone();
    for (who, ns) in [("pod b0", &pod), ("node-b", &node)] {
        tcp_hello(ns, sa("10.96.0.10:80"), IO)
            .unwrap_or_else(|e| panic!("{who}: the port in use: {e}"));
        assert_refused(
            ns,
            "10.96.0.10:81",
            &format!("{who}: TCP to a port no Service uses"),
        );
        // UDP to the ClusterIP: ICMP port unreachable (pods) or a refused
        // send (the node), either way ECONNREFUSED on a connected socket.
        let err = in_ns(ns, || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(sa("10.96.0.10:80"))?;
            s.set_read_timeout(Some(IO))?;
            s.send(b"q")?;
            let mut buf = [0u8; 64];
            s.recv(&mut buf).map(|_| ())
        })
        .expect_err("no UDP answer");
        assert_eq!(
            err.kind(),
            io::ErrorKind::ConnectionRefused,
            "{who}: UDP to a ClusterIP port no Service uses: {err}"
        );
    }
}
