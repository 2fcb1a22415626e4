//! The agent on the Kubernetes API: a test API server in the rig's client
//! namespace speaks list+watch; objects created, changed and deleted
//! through it reach the maps and real traffic; an outage and a 410 Gone
//! lose nothing; unprogrammable Services get Events; the health port
//! follows the Node.
//!
//! Needs root. Run through `cargo xtask test`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_agent::{datapath::maps::Maps, inspect};
use lb_tests::{
    apiserver::{ApiServer, Kind},
    manifests::{node, service, slice, with_local_policies, Ep},
    rig::{
        http_get, in_ns, serve_all_pods, tcp_hello, udp_hello, wait_until, Cluster, ClusterSpec,
        EchoStream, PodServers,
    },
};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);
/// Where the test API server listens: the client namespace, on the fabric.
const API: &str = "10.99.0.100:6443";

/// The pods' addresses: a0, a1 on node-a; b0, b1 on node-b.
const A1: &str = "10.244.1.11";
const B0: &str = "10.244.2.10";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// A cluster, its API server and servers in every pod. Fields drop in
/// order: the API server and the pod servers before the namespaces.
struct Rig {
    api: ApiServer,
    _servers: PodServers,
    c: Cluster,
}

/// A cluster whose API holds both Nodes, with node-a's agent on the API
/// (plus `extra` flags) and ready.
fn rig(tag: &str, extra: &[&str]) -> Rig {
    let mut c = Cluster::new(ClusterSpec::default().tag(tag));
    let servers = serve_all_pods(&c);
    let api = ApiServer::start(&c.client_ns(), sa(API), c.dir());
    api.apply(&node("node-a", "10.99.0.1"));
    api.apply(&node("node-b", "10.99.0.2"));
    let kubeconfig = api.kubeconfig().to_owned();
    c.node_mut("a").start_agent_api(&kubeconfig, extra);
    c.node("a").wait_agent_ready(WAIT);
    Rig {
        api,
        _servers: servers,
        c,
    }
}

fn ep<'a>(addr: &'a str, node: &'a str) -> Ep<'a> {
    Ep {
        addr,
        node,
        ready: true,
        terminating: false,
    }
}

/// Puts Service `name` (ClusterIP `vip`:80 → 8080, NodePort `node_port`)
/// and its one slice into the API.
fn put_web(api: &ApiServer, name: &str, vip: &str, node_port: u16, endpoints: &[Ep<'_>]) {
    api.apply(&service(name, vip, 80, 8080, Some(node_port), "TCP"));
    api.apply(&slice(name, &format!("{name}-1"), 8080, "TCP", endpoints));
}

/// What node-a's maps program: Service port name → backend addresses.
fn programmed(c: &Cluster) -> BTreeMap<String, Vec<String>> {
    let maps = Maps::open(&c.node("a").bpffs()).expect("open node-a's maps");
    inspect::services(&maps)
        .expect("read node-a's maps")
        .into_iter()
        .map(|s| {
            let mut b: Vec<String> = s.backends.into_iter().map(|b| b.address).collect();
            b.sort();
            (s.name, b)
        })
        .collect()
}

/// The pod a TCP connection to `dst` from the client lands on, if any.
fn lands_on(c: &Cluster, dst: &str, timeout: Duration) -> Option<String> {
    tcp_hello(&c.client_ns(), sa(dst), timeout)
        .ok()
        .and_then(|(line, _)| line.split_whitespace().next().map(str::to_owned))
}

#[test]
fn service_and_slices_created_through_the_api_carry_traffic_within_one_second() {
    let r = rig("kfast", &[]);
    let pod = r.c.pod("a0").ns.clone();
    let created = Instant::now();
    put_web(&r.api, "web", "10.96.0.10", 30080, &[ep(B0, "node-b")]);
    // From outside through the NodePort and from a pod through the ClusterIP.
    wait_until(
        Duration::from_secs(1),
        "NodePort and ClusterIP answer within 1 s of the create",
        || {
            let short = Duration::from_millis(100);
            lands_on(&r.c, "10.99.0.1:30080", short).as_deref() == Some("b0")
                && tcp_hello(&pod, sa("10.96.0.10:80"), short)
                    .is_ok_and(|(l, _)| l.starts_with("b0 "))
        },
    );
    let took = created.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn objects_created_modified_and_deleted_through_the_api_change_maps_and_traffic() {
    let r = rig("kcrud", &[]);
    // Created.
    put_web(&r.api, "web", "10.96.0.10", 30080, &[ep(B0, "node-b")]);
    wait_until(WAIT, "web programmed with b0", || {
        programmed(&r.c).get("test/web:p/TCP") == Some(&vec![format!("{B0}:8080")])
    });
    assert_eq!(lands_on(&r.c, "10.99.0.1:30080", IO).as_deref(), Some("b0"));

    // The slice modified: b0 replaced by a1.
    r.api
        .apply(&slice("web", "web-1", 8080, "TCP", &[ep(A1, "node-a")]));
    wait_until(WAIT, "web's backend is a1", || {
        programmed(&r.c).get("test/web:p/TCP") == Some(&vec![format!("{A1}:8080")])
    });
    for _ in 0..5 {
        assert_eq!(lands_on(&r.c, "10.99.0.1:30080", IO).as_deref(), Some("a1"));
    }

    // The Service modified: another NodePort; the old one goes.
    r.api
        .apply(&service("web", "10.96.0.10", 80, 8080, Some(30081), "TCP"));
    wait_until(WAIT, "the new NodePort answers", || {
        lands_on(&r.c, "10.99.0.1:30081", Duration::from_millis(300)).as_deref() == Some("a1")
    });
    assert_eq!(
        lands_on(&r.c, "10.99.0.1:30080", Duration::from_millis(500)),
        None
    );

    // A second Service, UDP, then the first deleted: only the second stays.
    r.api
        .apply(&service("dns", "10.96.0.53", 53, 5353, Some(30053), "UDP"));
    r.api
        .apply(&slice("dns", "dns-1", 5353, "UDP", &[ep(B0, "node-b")]));
    wait_until(WAIT, "dns answers", || {
        udp_hello(
            &r.c.client_ns(),
            sa("10.99.0.1:30053"),
            Duration::from_millis(300),
        )
        .is_ok_and(|(l, _)| l.starts_with("b0 "))
    });
    assert!(r.api.delete(Kind::Service, "test", "web"));
    wait_until(WAIT, "web removed from the maps", || {
        let p = programmed(&r.c);
        !p.contains_key("test/web:p/TCP") && p.contains_key("test/dns:p/UDP")
    });
    assert_eq!(
        lands_on(&r.c, "10.99.0.1:30081", Duration::from_millis(500)),
        None
    );
    // Its slice alone is held, not programmed; the Service coming back
    // brings it back.
    r.api
        .apply(&service("web", "10.96.0.10", 80, 8080, Some(30081), "TCP"));
    wait_until(WAIT, "web back with its held slice", || {
        programmed(&r.c).get("test/web:p/TCP") == Some(&vec![format!("{A1}:8080")])
    });
}

#[test]
fn api_outage_of_ten_seconds_breaks_no_traffic_and_changes_made_during_it_apply_after() {
    let mut r = rig("kout", &[]);
    put_web(&r.api, "web", "10.96.0.10", 30080, &[ep(B0, "node-b")]);
    wait_until(WAIT, "web answers", || {
        lands_on(&r.c, "10.99.0.1:30080", Duration::from_millis(300)).is_some()
    });
    let mut stream = EchoStream::open(&r.c.client_ns(), sa("10.99.0.1:30080"), IO);
    stream.round_trip();

    r.api.stop();
    // The change is made while the agent cannot see it.
    r.api
        .apply(&service("dns", "10.96.0.53", 53, 5353, Some(30053), "UDP"));
    r.api
        .apply(&slice("dns", "dns-1", 5353, "UDP", &[ep(B0, "node-b")]));
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(10) {
        stream.round_trip();
        let landed = lands_on(&r.c, "10.99.0.1:30080", IO);
        assert_eq!(
            landed.as_deref(),
            Some("b0"),
            "new connection during the outage"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = r.c.node("a").agent_log();
    assert!(
        log.contains("watch failed"),
        "the agent saw the outage:\n{log}"
    );
    assert!(
        udp_hello(
            &r.c.client_ns(),
            sa("10.99.0.1:30053"),
            Duration::from_millis(300)
        )
        .is_err(),
        "the change is not seen before the API returns"
    );

    r.api.resume();
    wait_until(WAIT, "the change made during the outage applies", || {
        udp_hello(
            &r.c.client_ns(),
            sa("10.99.0.1:30053"),
            Duration::from_millis(300),
        )
        .is_ok_and(|(l, _)| l.starts_with("b0 "))
    });
    stream.round_trip();
    assert_eq!(
        programmed(&r.c).get("test/web:p/TCP"),
        Some(&vec![format!("{B0}:8080")])
    );
}

#[test]
fn gone_410_forces_a_relist_that_converges_and_removes_only_what_is_gone() {
    let r = rig("k410", &[]);
    put_web(&r.api, "web", "10.96.0.10", 30080, &[ep(B0, "node-b")]);
    put_web(&r.api, "old", "10.96.0.11", 30081, &[ep(B0, "node-b")]);
    wait_until(WAIT, "web and old programmed", || {
        let p = programmed(&r.c);
        p.contains_key("test/web:p/TCP") && p.contains_key("test/old:p/TCP")
    });
    let mut stream = EchoStream::open(&r.c.client_ns(), sa("10.99.0.1:30080"), IO);
    let lists = r.api.lists(Kind::Service);

    // Changes made after the history is compacted: only a relist shows
    // them.
    r.api.expire_history(|api| {
        assert!(api.delete(Kind::Service, "test", "old"));
        put_web(api, "new", "10.96.0.12", 30082, &[ep(A1, "node-a")]);
    });
    wait_until(WAIT, "the agent relists Services", || {
        r.api.lists(Kind::Service) > lists
    });
    wait_until(WAIT, "the relisted state is programmed", || {
        let p = programmed(&r.c);
        !p.contains_key("test/old:p/TCP")
            && p.get("test/new:p/TCP") == Some(&vec![format!("{A1}:8080")])
            && p.get("test/web:p/TCP") == Some(&vec![format!("{B0}:8080")])
    });
    assert_eq!(lands_on(&r.c, "10.99.0.1:30082", IO).as_deref(), Some("a1"));
    // web was never gone: its flow and its entries went on.
    stream.round_trip();
    let log = r.c.node("a").agent_log();
    assert!(
        log.contains("too old resource version"),
        "the 410 Gone is logged:\n{log}"
    );
}

#[test]
fn unprogrammable_services_get_one_event_each_and_the_rest_keep_working() {
    // Room for three frontends: web's ClusterIP and NodePort, and one more.
    let r = rig("kevent", &["--services-size", "3"]);
    put_web(&r.api, "web", "10.96.0.10", 30080, &[ep(B0, "node-b")]);
    wait_until(WAIT, "web answers", || {
        lands_on(&r.c, "10.99.0.1:30080", Duration::from_millis(300)).as_deref() == Some("b0")
    });
    // sig and zz-full need two frontends each, one too many.
    // The first posts fail: they are tried again at the next sync.
    r.api.refuse_events(true);
    r.api.apply(
        &service("sig", "10.96.0.20", 3868, 3868, None, "SCTP")
            .replace("  ports:\n", "  externalIPs: [10.99.0.51]\n  ports:\n"),
    );
    r.api.apply(
        &service("zz-full", "10.96.0.21", 80, 8080, None, "TCP")
            .replace("  ports:\n", "  externalIPs: [10.99.0.50]\n  ports:\n"),
    );
    let events_for = |name: &str| -> Vec<serde_json::Value> {
        r.api
            .events()
            .into_iter()
            .filter(|e| e["regarding"]["name"] == name)
            .collect()
    };
    // The agent logs a failed post just before it queues the retry.
    wait_until(WAIT, "both Events tried and failed", || {
        r.c.node("a")
            .agent_log()
            .matches("posting event failed")
            .count()
            >= 2
    });
    // web may have had an Event of its own (no endpoint yet, if it synced
    // before its slice came): only these two Services' are in question.
    assert!(events_for("sig").is_empty() && events_for("zz-full").is_empty());
    r.api.refuse_events(false);
    r.api.apply(&slice(
        "web",
        "web-1",
        8080,
        "TCP",
        &[ep(B0, "node-b"), ep(A1, "node-a")],
    ));
    wait_until(WAIT, "an Event for each unprogrammable Service", || {
        !events_for("sig").is_empty() && !events_for("zz-full").is_empty()
    });
    let sig = &events_for("sig")[0];
    assert_eq!(sig["type"], "Warning");
    assert_eq!(sig["regarding"]["kind"], "Service");
    assert_eq!(sig["regarding"]["namespace"], "test");
    assert!(
        sig["regarding"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty()),
        "{sig}"
    );
    assert!(
        sig["note"].as_str().is_some_and(|n| n.contains("SCTP")),
        "{sig}"
    );
    assert!(sig["eventTime"].is_string(), "{sig}");
    let full = &events_for("zz-full")[0];
    assert!(
        full["note"].as_str().is_some_and(|n| n.contains("zz-full")),
        "{full}"
    );
    let log = r.c.node("a").agent_log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("test/sig")),
        "a log line names sig:\n{log}"
    );

    // More syncs while the problems last post nothing new.
    let syncs = r.c.node("a").syncs();
    r.api
        .apply(&slice("web", "web-1", 8080, "TCP", &[ep(A1, "node-a")]));
    r.c.node("a").wait_synced(syncs, WAIT);
    wait_until(WAIT, "web moved to a1", || {
        lands_on(&r.c, "10.99.0.1:30080", Duration::from_millis(300)).as_deref() == Some("a1")
    });
    assert_eq!(events_for("sig").len(), 1, "{:?}", r.api.events());
    assert_eq!(events_for("zz-full").len(), 1, "{:?}", r.api.events());
}

#[test]
fn nodeport_addresses_filter_the_nodes_api_addresses() {
    // node-a's API addresses: 10.99.0.1 and, here, one more that the
    // filter leaves out.
    let mut c = Cluster::new(ClusterSpec::default().tag("knpa"));
    let _servers = serve_all_pods(&c);
    let api = ApiServer::start(&c.client_ns(), sa(API), c.dir());
    api.apply(&node("node-a", "10.99.0.1").replace(
        "    - {type: Hostname",
        "    - {type: ExternalIP, address: 10.98.0.1}\n    - {type: Hostname",
    ));
    put_web(&api, "web", "10.96.0.10", 30080, &[ep(B0, "node-b")]);
    let kubeconfig = api.kubeconfig().to_owned();
    c.node_mut("a")
        .start_agent_api(&kubeconfig, &["--nodeport-addresses", "10.99.0.0/24"]);
    c.node("a").wait_agent_ready(WAIT);
    let maps = Maps::open(&c.node("a").bpffs()).expect("maps");
    let services = inspect::services(&maps).expect("services");
    let frontends: Vec<&str> = services
        .iter()
        .flat_map(|s| s.frontends.iter().map(|f| f.frontend.as_str()))
        .collect();
    assert!(frontends.contains(&"10.99.0.1:30080/TCP"), "{frontends:?}");
    assert!(
        !frontends.iter().any(|f| f.starts_with("10.98.0.1:")),
        "{frontends:?}"
    );
    assert_eq!(lands_on(&c, "10.99.0.1:30080", IO).as_deref(), Some("b0"));
    drop(api);
}

/// What a node's maps program, without what depends on the node: Service
/// port → (frontends other than NodePorts, backend addresses).
fn programmed_anywhere(c: &Cluster, letter: &str) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    let maps = Maps::open(&c.node(letter).bpffs()).expect("open maps");
    inspect::services(&maps)
        .expect("read maps")
        .into_iter()
        .map(|s| {
            let mut f: Vec<String> = s
                .frontends
                .into_iter()
                .filter(|f| !f.kinds.contains(&"NodePort"))
                .map(|f| f.frontend)
                .collect();
            f.sort();
            let mut b: Vec<String> = s.backends.into_iter().map(|b| b.address).collect();
            b.sort();
            (s.name, (f, b))
        })
        .collect()
}

#[test]
fn the_api_and_the_manifests_folder_program_the_same_services_from_the_same_objects() {
    let mut r = rig("ksame", &[]);
    let objects = [
        service("web", "10.96.0.10", 80, 8080, Some(30080), "TCP"),
        slice(
            "web",
            "web-1",
            8080,
            "TCP",
            &[ep(B0, "node-b"), ep(A1, "node-a")],
        ),
        service("dns", "10.96.0.53", 53, 5353, None, "UDP")
            .replace("  ports:\n", "  externalIPs: [10.99.0.53]\n  ports:\n"),
        slice("dns", "dns-1", 5353, "UDP", &[ep(B0, "node-b")]),
        // A slice whose Service does not exist, and a bad Service.
        slice("ghost", "ghost-1", 8080, "TCP", &[ep(B0, "node-b")]),
        service("bad", "10.96.0.999", 80, 8080, None, "TCP"),
    ];
    for (i, o) in objects.iter().enumerate() {
        r.api.apply(o);
        r.c.write_manifest(&format!("{i}.yaml"), o);
    }
    r.c.node_mut("b").start_agent(&[]);
    r.c.node("b").wait_agent_ready(WAIT);
    wait_until(WAIT, "node-a has both Services from the API", || {
        programmed_anywhere(&r.c, "a").len() == 2
    });
    let from_api = programmed_anywhere(&r.c, "a");
    assert_eq!(from_api, programmed_anywhere(&r.c, "b"));
    assert_eq!(
        from_api.get("test/dns:p/UDP"),
        Some(&(
            vec![
                "10.96.0.53:53/UDP".to_owned(),
                "10.99.0.53:53/UDP".to_owned()
            ],
            vec![format!("{B0}:5353")]
        ))
    );
}

#[test]
fn an_agent_started_without_the_api_is_not_ready_and_keeps_the_pinned_state() {
    let mut r = rig("kready", &[]);
    put_web(&r.api, "web", "10.96.0.10", 30080, &[ep(B0, "node-b")]);
    wait_until(WAIT, "web answers", || {
        lands_on(&r.c, "10.99.0.1:30080", Duration::from_millis(300)).is_some()
    });
    let kubeconfig = r.api.kubeconfig().to_owned();
    r.c.node_mut("a").stop_agent();
    r.api.stop();
    r.c.node_mut("a")
        .start_agent_api(&kubeconfig, &["--health-timeout", "1s"]);
    let failures = |c: &Cluster| c.node("a").agent_log().matches("watch failed").count();
    wait_until(WAIT, "the new agent finds the API away", || {
        failures(&r.c) >= 3
    });
    // Its first sync is late: load balancers see it fail, kubelet does not.
    wait_until(WAIT, "healthz 503 once the first sync is late", || {
        node_a_health(&r.c, "/healthz").is_some_and(|(s, b)| s == 503 && b["lastUpdated"].is_null())
    });
    assert_eq!(node_a_health(&r.c, "/livez").map(|(s, _)| s), Some(200));
    let log = r.c.node("a").agent_log();
    assert_eq!(
        log.matches("lb-agent ready").count(),
        1,
        "ready only once, before:\n{log}"
    );
    // Nothing was flushed: the maps the earlier agent wrote still serve.
    assert_eq!(lands_on(&r.c, "10.99.0.1:30080", IO).as_deref(), Some("b0"));
    r.api.resume();
    r.c.node("a").wait_agent_ready(WAIT);
    assert_eq!(lands_on(&r.c, "10.99.0.1:30080", IO).as_deref(), Some("b0"));
    assert!(
        healthz_is(&r.c, 200, true),
        "{:?}",
        node_a_health(&r.c, "/healthz")
    );
    let log = r.c.node("a").agent_log();
    assert!(
        log.contains("synced services=1 writes=0 deletes=0"),
        "the first sync after the outage rewrites nothing:\n{log}"
    );
}

#[test]
fn every_nodes_addresses_are_dsr_peers_and_follow_the_api() {
    let r = rig("kdsr", &["--dsr-peers", "10.77.0.0/16"]);
    let peers = |c: &Cluster| -> Vec<String> {
        let maps = Maps::open(&c.node("a").bpffs()).expect("maps");
        let mut out: Vec<String> = maps
            .dsr_peers
            .keys()
            .map(|k| {
                let k = k.expect("peer key");
                let a = std::net::Ipv4Addr::from(k.data().addr_be[0].to_ne_bytes());
                format!(
                    "{a}/{}",
                    k.prefix_len() - lb_common::dsr::DSR_PEER_HEAD_BITS
                )
            })
            .collect();
        out.sort();
        out
    };
    // Written before the agent is ready: both Nodes and the flag's network.
    assert_eq!(
        peers(&r.c),
        ["10.77.0.0/16", "10.99.0.1/32", "10.99.0.2/32"],
        "the peers map"
    );
    // A third Node joins: its address becomes a peer.
    r.api.apply(&node("node-c", "10.99.0.3"));
    wait_until(WAIT, "node-c's address is a DSR peer", || {
        peers(&r.c).contains(&"10.99.0.3/32".to_string())
    });
}

/// A change of this agent's Node (here its zone) translates every Service
/// again, so each must be translated from its objects, not from nothing.
#[test]
fn a_change_of_the_nodes_zone_keeps_every_service() {
    let r = rig("kzone", &[]);
    put_web(&r.api, "web", "10.96.0.10", 30080, &[ep(B0, "node-b")]);
    put_web(&r.api, "db", "10.96.0.11", 30081, &[ep(A1, "node-a")]);
    let both = |c: &Cluster| {
        let p = programmed(c);
        p.get("test/web:p/TCP") == Some(&vec![format!("{B0}:8080")])
            && p.get("test/db:p/TCP") == Some(&vec![format!("{A1}:8080")])
    };
    wait_until(WAIT, "web and db programmed", || both(&r.c));
    let zones = |c: &Cluster| c.node("a").agent_log().matches("node zone").count();
    let before = zones(&r.c);
    r.api.apply(&node("node-a", "10.99.0.1").replace(
        "  name: node-a\n",
        "  name: node-a\n  labels: {topology.kubernetes.io/zone: z1}\n",
    ));
    wait_until(WAIT, "the agent sees the new zone", || zones(&r.c) > before);
    // Syncs run one after another: once a Service put after the zone's
    // sync is programmed, that sync is done.
    put_web(&r.api, "late", "10.96.0.12", 30082, &[ep(B0, "node-b")]);
    wait_until(WAIT, "late programmed", || {
        programmed(&r.c).contains_key("test/late:p/TCP")
    });
    assert!(both(&r.c), "after the zone changed: {:?}", programmed(&r.c));
    assert_eq!(lands_on(&r.c, "10.99.0.1:30080", IO).as_deref(), Some("b0"));
}

/// `GET path` on node-a's health port from the client: (status, JSON body).
fn node_a_health(c: &Cluster, path: &str) -> Option<(u16, serde_json::Value)> {
    let (code, body) = http_get(&c.client_ns(), sa("10.99.0.1:10256"), path, IO).ok()?;
    Some((code, serde_json::from_str(&body).ok()?))
}

/// Whether node-a's `/healthz` answers `code` with `nodeEligible` as given.
fn healthz_is(c: &Cluster, code: u16, eligible: bool) -> bool {
    node_a_health(c, "/healthz").is_some_and(|(s, b)| s == code && b["nodeEligible"] == eligible)
}

#[test]
fn a_node_tainted_for_deletion_or_being_deleted_turns_healthz_to_503_within_a_sync() {
    let r = rig("khealth", &[]);
    let (code, body) = node_a_health(&r.c, "/healthz").expect("healthz answers JSON");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["nodeEligible"], true, "{body}");
    assert!(
        body["lastUpdated"].is_string() && body["currentTime"].is_string(),
        "{body}"
    );

    // The cluster autoscaler's taint: a sync later, load balancers drain it.
    let syncs = r.c.node("a").syncs();
    r.api.apply(&format!(
        "{}spec:\n  taints:\n    - {{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}}\n",
        node("node-a", "10.99.0.1")
    ));
    r.c.node("a").wait_synced(syncs, WAIT);
    assert!(
        healthz_is(&r.c, 503, false),
        "{:?}",
        node_a_health(&r.c, "/healthz")
    );
    // Liveness does not follow the node: restarting the agent helps nothing.
    assert_eq!(node_a_health(&r.c, "/livez").map(|(s, _)| s), Some(200));
    // Traffic still flows: only new load balancer picks avoid the node.
    put_web(&r.api, "web", "10.96.0.10", 30080, &[ep(B0, "node-b")]);
    wait_until(WAIT, "web answers on the drained node", || {
        lands_on(&r.c, "10.99.0.1:30080", Duration::from_millis(300)).as_deref() == Some("b0")
    });

    // The taint lifted, then the Node being deleted.
    r.api.apply(&node("node-a", "10.99.0.1"));
    wait_until(WAIT, "healthz 200 once the taint is gone", || {
        healthz_is(&r.c, 200, true)
    });
    let syncs = r.c.node("a").syncs();
    r.api.apply(&node("node-a", "10.99.0.1").replace(
        "  name: node-a\n",
        "  name: node-a\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n",
    ));
    r.c.node("a").wait_synced(syncs, WAIT);
    assert!(
        healthz_is(&r.c, 503, false),
        "{:?}",
        node_a_health(&r.c, "/healthz")
    );
    let log = r.c.node("a").agent_log();
    assert!(
        log.contains("ToBeDeletedByClusterAutoscaler") && log.contains("being deleted"),
        "the agent says why:\n{log}"
    );

    // The Node gone: still not eligible, and its NodePorts keep working
    // on the last known address until it is back.
    let syncs = r.c.node("a").syncs();
    assert!(r.api.delete(Kind::Node, "", "node-a"));
    r.c.node("a").wait_synced(syncs, WAIT);
    assert!(
        healthz_is(&r.c, 503, false),
        "{:?}",
        node_a_health(&r.c, "/healthz")
    );
    assert_eq!(lands_on(&r.c, "10.99.0.1:30080", IO).as_deref(), Some("b0"));
    r.api.apply(&node("node-a", "10.99.0.1"));
    wait_until(WAIT, "healthz 200 once the Node is back", || {
        healthz_is(&r.c, 200, true)
    });
}

#[test]
fn a_health_check_node_port_that_cannot_be_bound_gets_a_warning_event_and_opens_once_free() {
    let r = rig("khcnp", &[]);
    // Something else holds the port on node-a's address.
    let squatter = in_ns(&r.c.node("a").ns, || {
        std::net::TcpListener::bind("10.99.0.1:32000").expect("hold port 32000")
    });
    let svc = with_local_policies(
        &service("web", "10.96.0.10", 80, 8080, Some(30080), "TCP"),
        true,
        false,
    );
    r.api.apply(&format!("{svc}  healthCheckNodePort: 32000\n"));
    r.api
        .apply(&slice("web", "web-1", 8080, "TCP", &[ep(A1, "node-a")]));
    wait_until(WAIT, "a Warning Event about the check port", || {
        r.api.events().iter().any(|e| {
            e["regarding"]["name"] == "web"
                && e["reason"] == "FailedToStartServiceHealthcheck"
                && e["type"] == "Warning"
                && e["note"].as_str().is_some_and(|n| n.contains("32000"))
        })
    });
    drop(squatter);
    // The next sync binds it.
    r.api.apply(&slice(
        "web",
        "web-1",
        8080,
        "TCP",
        &[ep(A1, "node-a"), ep(B0, "node-b")],
    ));
    wait_until(WAIT, "the check port answers 200", || {
        http_get(&r.c.client_ns(), sa("10.99.0.1:32000"), "/", IO).is_ok_and(|(s, b)| {
            s == 200 && b.contains("\"localEndpoints\":1,\"serviceProxyHealthy\":true")
        })
    });
}

/// A counter (or a histogram's `_count`) from node-a's metrics.
fn metric(c: &Cluster, name: &str) -> f64 {
    let (status, body) = http_get(&c.node("a").ns, sa("127.0.0.1:10249"), "/metrics", IO)
        .expect("scrape node-a's metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

/// Endpoint `k` of the burst: an address outside every pod's.
fn burst_ep(k: usize) -> String {
    format!("10.250.{}.{}", k / 250, k % 250 + 1)
}

#[test]
fn a_watch_event_translates_only_its_service_and_a_burst_of_changes_takes_few_syncs() {
    const SERVICES: usize = 200;
    let r = rig("kincr", &[]);
    let vip = |i: usize| format!("10.96.1.{}", i + 1);
    for i in 0..SERVICES {
        let name = format!("s{i}");
        r.api.apply(&service(&name, &vip(i), 80, 8080, None, "TCP"));
        r.api.apply(&slice(
            &name,
            &format!("{name}-1"),
            8080,
            "TCP",
            &[ep(B0, "node-b")],
        ));
    }
    wait_until(WAIT, "every Service programmed", || {
        programmed(&r.c).len() == SERVICES
    });
    let translated = || metric(&r.c, "lb_translated_services_total");
    let syncs = || metric(&r.c, "lb_reconcile_latency_seconds_count");

    // One slice changed: one Service translated again, not all of them.
    let before = translated();
    r.api
        .apply(&slice("s7", "s7-1", 8080, "TCP", &[ep(A1, "node-a")]));
    wait_until(WAIT, "s7's backend is a1", || {
        programmed(&r.c).get("test/s7:p/TCP") == Some(&vec![format!("{A1}:8080")])
    });
    assert_eq!(translated() - before, 1.0, "one slice changed");

    // A slice moved to another Service (its label changed): both change.
    let before = translated();
    r.api
        .apply(&slice("s9", "s7-1", 8080, "TCP", &[ep(A1, "node-a")]));
    wait_until(WAIT, "s7-1's endpoint serves s9 and no longer s7", || {
        let p = programmed(&r.c);
        p.get("test/s7:p/TCP").is_none_or(Vec::is_empty)
            && p.get("test/s9:p/TCP") == Some(&vec![format!("{A1}:8080"), format!("{B0}:8080")])
    });
    assert_eq!(
        translated() - before,
        2.0,
        "the Services the slice left and joined"
    );

    // A burst of 1000 changes as fast as the API takes them: a few syncs.
    let (before, syncs_before) = (translated(), syncs());
    let started = Instant::now();
    for k in 0..1000 {
        let i = k % SERVICES;
        let name = format!("s{i}");
        let addr = burst_ep(k);
        r.api.apply(&slice(
            &name,
            &format!("{name}-1"),
            8080,
            "TCP",
            &[ep(&addr, "node-b")],
        ));
    }
    let written = started.elapsed();
    wait_until(WAIT, "the last change of every Service programmed", || {
        let p = programmed(&r.c);
        (1000 - SERVICES..1000).all(|k| {
            p.get(&format!("test/s{}:p/TCP", k % SERVICES))
                == Some(&vec![format!("{}:8080", burst_ep(k))])
        })
    });
    let (took, n) = (syncs() - syncs_before, translated() - before);
    eprintln!("burst written in {written:?}: {took} syncs, {n} Services translated");
    assert!(
        took <= 20.0,
        "1000 changes written in {written:?} took {took} syncs"
    );
    assert!(n <= 1000.0, "{n} Services translated for 1000 changes");
}
