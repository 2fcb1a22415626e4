//! Operability scenarios: the agent's own endpoints (metrics, health,
//! readiness) and where they listen, map capacity limits, JSON logs.
//!
//! Needs root. Run through `cargo xtask test`.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use lb_tests::{
    manifests::{docs, service, slice, with_local_policies, Ep},
    rig::{serve_all_pods, sh, tcp_hello, wait_until, Cluster, ClusterSpec},
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn http_get(ns: &str, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    lb_tests::rig::http_get(ns, addr, path, IO)
}

/// The value of the sample `series` (name with labels, exactly as printed)
/// in Prometheus text, if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A ClusterIP-only Service `name` on `vip:80` with endpoint a0 (port 8080).
fn cluster_ip_service(name: &str, vip: &str) -> String {
    let ep = Ep {
        addr: "10.244.1.10",
        node: "node-a",
        ready: true,
        terminating: false,
    };
    docs(&[
        service(name, vip, 80, 8080, None, "TCP"),
        slice(name, &format!("{name}-1"), 8080, "TCP", &[ep]),
    ])
}

/// TCP listening sockets of a namespace as `addr:port` strings (`ss -ltnH`).
fn tcp_listeners(ns: &str) -> BTreeSet<String> {
    sh(Some(ns), &["ss", "-ltnH"])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

#[test]
fn the_agent_listens_only_where_its_flags_say() {
    let mut c = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    });
    let svc = with_local_policies(
        &service("web", "10.96.0.10", 80, 8080, Some(30080), "TCP"),
        true,
        false,
    );
    let ep = Ep {
        addr: "10.244.1.10",
        node: "node-a",
        ready: true,
        terminating: false,
    };
    c.write_manifest(
        "web.yaml",
        &docs(&[
            format!("{svc}  healthCheckNodePort: 32000\n"),
            slice("web", "web-1", 8080, "TCP", &[ep]),
        ]),
    );
    let node_ns = c.node("a").ns.clone();
    c.node_mut("a").start_agent(&[
        "--metrics-addr",
        "127.0.0.1:19249",
        "--health-addr",
        "10.99.0.1:19256",
    ]);
    c.node("a").wait_agent_ready(WAIT);
    let want: BTreeSet<String> = ["127.0.0.1:19249", "10.99.0.1:19256", "10.99.0.1:32000"]
        .into_iter()
        .map(String::from)
        .collect();
    // The health check port opens with the first sync; the set must then
    // be exactly the flags' addresses and the node address's check port.
    wait_until(WAIT, "the agent's listeners are open", || {
        tcp_listeners(&node_ns).len() >= want.len()
    });
    assert_eq!(tcp_listeners(&node_ns), want);
    assert_eq!(
        sh(Some(&node_ns), &["ss", "-lunH"]).trim(),
        "",
        "the agent listens on no UDP port"
    );
    // And each answers there.
    assert_eq!(
        http_get(&node_ns, sa("10.99.0.1:19256"), "/healthz")
            .expect("healthz")
            .0,
        200
    );
    assert_eq!(
        http_get(&node_ns, sa("127.0.0.1:19249"), "/metrics")
            .expect("metrics")
            .0,
        200
    );
    assert_eq!(
        http_get(&node_ns, sa("10.99.0.1:32000"), "/")
            .expect("health check port")
            .0,
        200
    );
}

#[test]
fn metrics_and_readiness_report_the_datapath_and_the_sync() {
    let mut c = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    });
    let _s = serve_all_pods(&c);
    c.write_manifest("web.yaml", &cluster_ip_service("web", "10.96.0.10"));
    c.write_manifest(
        "empty.yaml",
        &docs(&[
            service("empty", "10.96.0.99", 80, 8080, None, "TCP"),
            slice("empty", "empty-1", 8080, "TCP", &[]),
        ]),
    );
    let node_ns = c.node("a").ns.clone();
    c.node_mut("a").start_agent(&[]);
    c.node("a").wait_agent_ready(WAIT);
    // The defaults: health on every address, metrics on loopback only.
    let (code, body) = http_get(&node_ns, sa("10.99.0.1:10256"), "/readyz").expect("readyz");
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    assert_eq!(
        http_get(&node_ns, sa("127.0.0.1:10256"), "/healthz")
            .expect("healthz")
            .0,
        200
    );
    assert!(
        http_get(&node_ns, sa("10.99.0.1:10249"), "/metrics").is_err(),
        "metrics are not served off loopback by default"
    );

    let pod = c.pod("a1").ns.clone();
    for _ in 0..3 {
        tcp_hello(&pod, sa("10.96.0.10:80"), IO).expect("web answers");
    }
    tcp_hello(&pod, sa("10.96.0.99:80"), IO).expect_err("empty refuses");
    let metrics = || {
        let (code, text) =
            http_get(&node_ns, sa("127.0.0.1:10249"), "/metrics").expect("scrape metrics");
        assert_eq!(code, 200, "{text}");
        text
    };
    let text = metrics();
    let web = r#"{namespace="test",name="web",port="p",proto="TCP",scope="cluster",family="IPv4"}"#;
    let empty =
        r#"{namespace="test",name="empty",port="p",proto="TCP",scope="cluster",family="IPv4"}"#;
    assert_eq!(
        sample(&text, &format!("lb_service_new_flows_total{web}")),
        Some(3.0),
        "{text}"
    );
    // Each connection: at least SYN, ACK, data and FIN each way.
    assert!(
        sample(&text, &format!("lb_service_packets_total{web}")).is_some_and(|n| n >= 12.0),
        "{text}"
    );
    assert!(
        sample(&text, &format!("lb_service_bytes_total{web}")).is_some_and(|n| n > 0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("lb_service_drops_total{web}")),
        Some(0.0)
    );
    assert!(
        sample(&text, &format!("lb_service_drops_total{empty}")).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, r#"lb_drops_total{reason="reject_no_endpoint"}"#).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // Two frontends, and each ClusterIP's address-only key (which refuses
    // its ports no Service uses).
    assert_eq!(
        sample(&text, r#"lb_map_entries{map="LB_SERVICES_V3"}"#),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"lb_map_capacity{map="LB_SERVICES_V3"}"#),
        Some(65536.0)
    );
    assert!(
        sample(&text, "lb_conntrack_entries").is_some_and(|n| n >= 6.0),
        "{text}"
    );
    assert_eq!(sample(&text, "lb_conntrack_evictions_total"), Some(0.0));
    assert_eq!(sample(&text, "lb_sync_errors_total"), Some(0.0));
    assert_eq!(sample(&text, "lb_refused_service_ports"), Some(0.0));
    assert_eq!(sample(&text, "lb_sync_problems"), Some(0.0));

    // A bad manifest is skipped, counted, and breaks nothing.
    let before = sample(&text, "lb_reconcile_latency_seconds_count").unwrap_or(0.0);
    c.write_manifest("bad.yaml", "kind: Service\nspec: [not a mapping\n");
    wait_until(WAIT, "the bad manifest is counted", || {
        sample(&metrics(), "lb_sync_problems") == Some(1.0)
    });
    tcp_hello(&pod, sa("10.96.0.10:80"), IO).expect("web still answers");

    // A change is timed from the file event to the maps.
    assert!(
        sample(&metrics(), "lb_reconcile_latency_seconds_count").is_some_and(|n| n > before),
        "the bad manifest's sync was timed"
    );
    let before = sample(&metrics(), "lb_reconcile_latency_seconds_count").unwrap_or(0.0);
    c.remove_manifest("empty.yaml");
    wait_until(WAIT, "a reconcile latency is recorded", || {
        sample(&metrics(), "lb_reconcile_latency_seconds_count").is_some_and(|n| n > before)
    });
}

#[test]
fn a_services_map_too_small_refuses_only_the_services_that_do_not_fit() {
    let mut c = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    });
    let _s = serve_all_pods(&c);
    for (name, vip) in [
        ("a", "10.96.0.11"),
        ("b", "10.96.0.12"),
        ("c", "10.96.0.13"),
    ] {
        c.write_manifest(&format!("{name}.yaml"), &cluster_ip_service(name, vip));
    }
    let node_ns = c.node("a").ns.clone();
    c.node_mut("a").start_agent(&["--services-size", "2"]);
    c.node("a").wait_agent_ready(WAIT);
    let pod = c.pod("a1").ns.clone();
    // Service ports are programmed in name order: a and b fit, c does not.
    tcp_hello(&pod, sa("10.96.0.11:80"), IO).expect("a works");
    tcp_hello(&pod, sa("10.96.0.12:80"), IO).expect("b works");
    tcp_hello(&pod, sa("10.96.0.13:80"), Duration::from_millis(500))
        .expect_err("c is not programmed");
    let log = c.node("a").agent_log();
    assert!(
        log.contains("map is full") && log.contains("--services-size"),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("Service port refused") && l.contains("test/c:p/TCP")),
        "{log}"
    );
    let metrics = || {
        http_get(&node_ns, sa("127.0.0.1:10249"), "/metrics")
            .expect("scrape")
            .1
    };
    let text = metrics();
    assert_eq!(
        sample(&text, "lb_refused_service_ports"),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("lb_map_full{") && l.ends_with(" 1")),
        "{text}"
    );

    // Another sync does not log the same refusal again.
    let syncs = c.node("a").syncs();
    c.write_manifest("a.yaml", &cluster_ip_service("a", "10.96.0.11"));
    c.node("a").wait_synced(syncs, WAIT);
    let refusals = |log: &str| log.matches("Service port refused").count();
    assert_eq!(refusals(&c.node("a").agent_log()), refusals(&log));

    // Room again: c is programmed, and the metric falls back.
    let syncs = c.node("a").syncs();
    c.remove_manifest("a.yaml");
    c.node("a").wait_synced(syncs, WAIT);
    tcp_hello(&pod, sa("10.96.0.13:80"), IO).expect("c works once a is gone");
    tcp_hello(&pod, sa("10.96.0.12:80"), IO).expect("b still works");
    assert_eq!(sample(&metrics(), "lb_refused_service_ports"), Some(0.0));
    assert!(c
        .node("a")
        .agent_log()
        .contains("Service port programmed after earlier refusal"));
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    let mut c = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    });
    c.write_manifest("web.yaml", &cluster_ip_service("web", "10.96.0.10"));
    c.write_manifest("bad.yaml", "kind: Service\nspec: [not a mapping\n");
    c.node_mut("a").start_agent(&["--log-format", "json"]);
    c.node("a").wait_agent_ready(WAIT);
    let log = c.node("a").agent_log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
        assert!(l["fields"]["message"].is_string(), "{l}");
    }
    let ready = lines
        .iter()
        .find(|l| l["fields"]["message"] == "lb-agent ready")
        .expect("the ready line");
    assert_eq!(ready["fields"]["node"], "node-a", "{ready}");
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN" && l.to_string().contains("bad.yaml")),
        "the bad manifest is reported as a structured warning: {log}"
    );
}

#[test]
fn a_packet_xdp_leaves_to_tc_is_counted_once_for_its_service() {
    let mut c = Cluster::new(ClusterSpec::default());
    let _s = serve_all_pods(&c);
    let ep = Ep {
        addr: "10.244.2.10",
        node: "node-b",
        ready: true,
        terminating: false,
    };
    c.write_manifest(
        "dns.yaml",
        &docs(&[
            service("dns", "10.96.0.53", 53, 5353, Some(30053), "UDP"),
            slice("dns", "dns-1", 5353, "UDP", &[ep]),
        ]),
    );
    for n in ["a", "b"] {
        c.node_mut(n).start_agent(&[]);
    }
    for n in ["a", "b"] {
        c.node(n).wait_agent_ready(WAIT);
    }
    // Node-a's only backend is on node-b: XDP opens the flow and leaves the
    // request to TC, which sends it on; the answer comes back through XDP.
    let (line, from) =
        lb_tests::rig::udp_hello(&c.client_ns(), sa("10.99.0.1:30053"), IO).expect("answer");
    assert!(line.starts_with("b0 "), "{line}");
    assert_eq!(from, sa("10.99.0.1:30053"));
    let (_, text) =
        http_get(&c.node("a").ns, sa("127.0.0.1:10249"), "/metrics").expect("scrape node-a");
    let dns = r#"{namespace="test",name="dns",port="p",proto="UDP",scope="cluster",family="IPv4"}"#;
    assert_eq!(
        sample(&text, r#"lb_packets_total{outcome="xdp_to_tc"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("lb_service_packets_total{dns}")),
        Some(2.0),
        "request and answer, each once: {text}"
    );
    assert_eq!(
        sample(&text, &format!("lb_service_new_flows_total{dns}")),
        Some(1.0)
    );
}
