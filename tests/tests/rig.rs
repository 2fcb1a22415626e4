//! The namespace rig on its own, without any agent: if these fail, a
//! failing scenario in `services.rs` says nothing about the datapath.
//!
//! Needs root (creates network namespaces). Run with
//! `cargo test -p lb-tests --test rig`.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Barrier, Mutex},
    time::Duration,
};

use lb_tests::rig::{
    sh, tcp_hello, udp_hello, wait_until, Cluster, ClusterSpec, EchoStream, TcpServer, UdpServer,
};

const IO: Duration = Duration::from_secs(3);

/// Namespaces whose name starts with `prefix`.
fn namespaces_with(prefix: &str) -> Vec<String> {
    sh(None, &["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Mount points at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&dir))
        .map(str::to_string)
        .collect()
}

fn assert_gone(prefix: &str, root: &Path) {
    assert_eq!(
        namespaces_with(prefix),
        Vec::<String>::new(),
        "namespaces left"
    );
    assert!(!root.exists(), "{} left", root.display());
    assert_eq!(mounts_under(root), Vec::<String>::new(), "mounts left");
}

fn rig_root(prefix: &str) -> PathBuf {
    Path::new("/run/lb-tests").join(prefix)
}

#[test]
fn pod_reaches_a_pod_on_the_other_node_with_its_own_address() {
    let c = Cluster::new(ClusterSpec::default().tag("p2p"));
    let (a0, b0) = (c.pod("a0"), c.pod("b0"));
    assert_eq!(a0.addr, Ipv4Addr::new(10, 244, 1, 10));
    assert_eq!(b0.addr, Ipv4Addr::new(10, 244, 2, 10));
    assert_eq!(b0.node, "node-b");
    let dst = SocketAddr::from((b0.addr, 8080));
    let _tcp = TcpServer::start(&b0.ns, dst, "b0");
    let _udp = UdpServer::start(&b0.ns, dst, "b0");

    let mut s = EchoStream::open(&a0.ns, dst, IO);
    assert_eq!(s.backend, "b0");
    assert_eq!(s.greeting, format!("b0 {}", s.local_addr()), "no NAT");
    assert_eq!(s.local_addr().ip(), a0.addr);
    assert_eq!(s.peer_addr(), dst);
    for i in 0..3 {
        assert_eq!(
            s.echo(&format!("ping {i}")).expect("echo"),
            format!("ping {i}")
        );
    }

    let (line, from) = udp_hello(&a0.ns, dst, IO).expect("UDP a0 -> b0");
    assert!(line.starts_with(&format!("b0 {}:", a0.addr)), "{line}");
    assert_eq!(from, dst, "the reply comes from the server's address");
}

#[test]
fn the_rig_is_dual_stack_pods_and_nodes_reach_each_other_over_ipv6() {
    let c = Cluster::new(ClusterSpec::default().tag("v6"));
    let (a0, b0) = (c.pod("a0"), c.pod("b0"));
    assert_eq!(a0.addr6, "fd00:244:1::10".parse::<Ipv6Addr>().expect("ip"));
    assert_eq!(b0.addr6, "fd00:244:2::10".parse::<Ipv6Addr>().expect("ip"));
    assert_eq!(
        c.pod("a1").addr6,
        "fd00:244:1::11".parse::<Ipv6Addr>().expect("ip")
    );
    assert_eq!(
        c.node("b").addr6,
        "fd00:99::2".parse::<Ipv6Addr>().expect("ip")
    );
    assert_eq!(c.node("b").pod_cidr6, "fd00:244:2::/64");
    // Pod to a pod on the other node, through both nodes' forwarding.
    let dst = SocketAddr::new(b0.addr6.into(), 8080);
    let _tcp = TcpServer::start(&b0.ns, dst, "b0");
    let _udp = UdpServer::start(&b0.ns, dst, "b0");
    let mut s = EchoStream::open(&a0.ns, dst, IO);
    assert_eq!(s.greeting, format!("b0 {}", s.local_addr()), "no NAT");
    assert_eq!(s.local_addr().ip(), IpAddr::V6(a0.addr6));
    s.round_trip();
    let (line, from) = udp_hello(&a0.ns, dst, IO).expect("UDP a0 -> b0 over IPv6");
    assert!(line.starts_with(&format!("b0 [{}]:", a0.addr6)), "{line}");
    assert_eq!(from, dst);
    // The outside client to a node.
    let node = c.node("a");
    let at = SocketAddr::new(node.addr6.into(), 9000);
    let _srv = TcpServer::start(&node.ns, at, &node.name);
    let (line, _) = tcp_hello(&c.client_ns(), at, IO).expect("client -> node-a over IPv6");
    assert!(line.starts_with("node-a [fd00:99::100]:"), "{line}");
    let forwarding = sh(
        Some(&node.ns),
        &["cat", "/proc/sys/net/ipv6/conf/all/forwarding"],
    );
    assert_eq!(forwarding.trim(), "1");
}

#[test]
fn client_reaches_every_node_on_the_fabric() {
    let c = Cluster::new(ClusterSpec::default().tag("client"));
    let client = c.client_ns();
    for letter in ["a", "b"] {
        let node = c.node(letter);
        let dst = SocketAddr::from((node.addr, 9000));
        let _srv = TcpServer::start(&node.ns, dst, &node.name);
        let (line, peer) =
            tcp_hello(&client, dst, IO).unwrap_or_else(|e| panic!("client -> {}: {e}", node.name));
        assert!(
            line.starts_with(&format!("{} 10.99.0.100:", node.name)),
            "{line}"
        );
        assert_eq!(peer, dst);
    }
    assert_eq!(c.node("a").addr, Ipv4Addr::new(10, 99, 0, 1));
    assert_eq!(c.node("b").pod_cidr, "10.244.2.0/24");
}

#[test]
fn layout_matches_what_the_agent_and_the_datapath_expect() {
    let c = Cluster::new(ClusterSpec {
        nodes: 3,
        pods_per_node: 1,
        ..ClusterSpec::default().tag("layout")
    });
    let names: Vec<&str> = c.pods().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a0", "b0", "c0"]);
    let fabric = format!("{}-fabric", c.prefix());
    let node = c.node("c");
    assert_eq!(node.addr, Ipv4Addr::new(10, 99, 0, 3));

    // Full checksums on every veth end: the datapath must compute them itself.
    for (ns, iface) in [
        (c.pod("c0").ns.as_str(), "eth0"),
        (node.ns.as_str(), "lxc0"),
        (node.ns.as_str(), "eth0"),
        (fabric.as_str(), "nc"),
    ] {
        let k = sh(Some(ns), &["ethtool", "-k", iface]);
        assert!(k.contains("tx-checksumming: off"), "{ns} {iface}:\n{k}");
    }
    // The users' shape: nothing on the far side of a node's wire, which
    // then takes no XDP frames (no program, no GRO).
    let k = sh(Some(&fabric), &["ethtool", "-k", "nc"]);
    assert!(k.contains("generic-receive-offload: off"), "{k}");
    let link = sh(Some(&fabric), &["ip", "link", "show", "nc"]);
    assert!(!link.contains("xdp"), "{link}");

    let routes = sh(Some(&node.ns), &["ip", "route"]);
    for want in [
        "10.244.1.0/24 via 10.99.0.1 dev eth0",
        "10.244.2.0/24 via 10.99.0.2 dev eth0",
        "10.244.3.10 dev lxc0",
    ] {
        assert!(routes.contains(want), "node-c lacks {want}:\n{routes}");
    }
    let routes = sh(Some(&c.pod("c0").ns), &["ip", "route"]);
    assert!(
        routes.contains("default via 10.244.3.1 dev eth0"),
        "{routes}"
    );
    for key in ["ip_forward", "conf/all/rp_filter", "conf/lxc0/rp_filter"] {
        let v = sh(
            Some(&node.ns),
            &["cat", &format!("/proc/sys/net/ipv4/{key}")],
        );
        let want = if key == "ip_forward" { "1" } else { "0" };
        assert_eq!(v.trim(), want, "node-c {key}");
    }
    assert!(node.bpffs().is_dir());
    assert!(c.manifests_dir().is_dir());
}

#[test]
fn clusters_built_in_parallel_do_not_interfere() {
    let barrier = Barrier::new(2);
    let prefixes = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for name in ["one", "two"] {
            let (barrier, prefixes) = (&barrier, &prefixes);
            s.spawn(move || {
                barrier.wait();
                let c = Cluster::new(ClusterSpec::default().tag(name));
                prefixes.lock().unwrap().push(c.prefix().to_string());
                let dst = SocketAddr::from((c.pod("b1").addr, 7000));
                let _srv = TcpServer::start(&c.pod("b1").ns, dst, name);
                // Both clusters live at once, same addresses: each must reach
                // its own server only.
                barrier.wait();
                for _ in 0..5 {
                    let (line, _) = tcp_hello(&c.pod("a1").ns, dst, IO).expect("a1 -> b1");
                    assert!(line.starts_with(&format!("{name} 10.244.1.11:")), "{line}");
                }
                barrier.wait();
            });
        }
    });
    let prefixes = prefixes.into_inner().unwrap();
    assert_ne!(prefixes[0], prefixes[1]);
    for p in &prefixes {
        assert_gone(p, &rig_root(p));
    }
}

/// A stand-in agent: logs its arguments and the ready line, then waits to be
/// signalled; `cleanup` returns at once so Drop does not hang on it.
fn fake_agent(dir: &Path) -> PathBuf {
    let bin = dir.join("fake-agent");
    fs::write(
        &bin,
        "#!/bin/sh\n\
         case \"$1\" in\n\
         run) echo \"args: $*\"; echo 'lb-agent ready'; exec sleep 600;;\n\
         *) echo \"$*\" >> \"$(dirname \"$0\")/other-calls\";;\n\
         esac\n",
    )
    .expect("write fake agent");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn agents_run_in_their_node_and_drop_removes_every_trace() {
    let tools = std::env::temp_dir().join(format!("lb-rig-fake-{}", std::process::id()));
    fs::create_dir_all(&tools).expect("tools dir");
    let bin = fake_agent(&tools);
    let mut c = Cluster::new(ClusterSpec::default().tag("drop").agent_bin(&bin));
    let (prefix, root) = (c.prefix().to_string(), rig_root(c.prefix()));

    c.write_manifest("svc.yaml", "kind: Service\n");
    let entries: Vec<_> = fs::read_dir(c.manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, ["svc.yaml"], "no temp file left behind");
    c.remove_manifest("svc.yaml");

    let node = c.node_mut("a");
    node.start_agent(&["--extra", "1"]);
    node.wait_agent_ready(IO);
    let log = node.agent_log();
    let bpffs = node.bpffs();
    for want in [
        "run --node-name node-a --iface eth0 --pod-ifaces lxc*".to_string(),
        format!("--bpffs {}", bpffs.display()),
        format!("--manifests {}", root.join("manifests").display()),
        "--extra 1".to_string(),
    ] {
        assert!(log.contains(&want), "agent args lack {want}:\n{log}");
    }
    let pid = node.agent_pid().expect("running");
    let netns = |p: &str| fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    assert_eq!(
        netns(&format!("/proc/{pid}/ns/net")).unwrap(),
        netns(&format!("/var/run/netns/{prefix}-node-a")).unwrap(),
        "the agent runs in its node's namespace"
    );

    // A restart must wait for a new ready line, not the old one.
    node.stop_agent();
    assert!(!pid_alive(pid));
    node.start_agent(&[]);
    node.wait_agent_ready(IO);
    assert_eq!(node.agent_log().matches("lb-agent ready").count(), 2);
    let pid = node.agent_pid().expect("running again");

    // What a real agent leaves behind: a bpffs mounted in the node directory.
    sh(
        None,
        &["mount", "-t", "bpf", "bpf", bpffs.to_str().unwrap()],
    );
    assert_eq!(mounts_under(&root).len(), 1);

    drop(c);
    assert!(!pid_alive(pid), "Drop kills the agent");
    let calls = fs::read_to_string(tools.join("other-calls")).unwrap_or_default();
    assert!(
        calls.contains(&format!("cleanup --bpffs {}", bpffs.display())),
        "Drop runs `cleanup` on every node: {calls:?}"
    );
    assert_gone(&prefix, &root);
    let _ = fs::remove_dir_all(&tools);
}

#[test]
fn a_panicking_test_still_tears_down() {
    let made = Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let c = Cluster::new(ClusterSpec {
            nodes: 1,
            pods_per_node: 1,
            ..ClusterSpec::default().tag("panic")
        });
        *made.lock().unwrap() = c.prefix().to_string();
        panic!("the scenario fails");
    });
    assert!(result.is_err());
    let prefix = made.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert_gone(&prefix, &rig_root(&prefix));
}

#[test]
#[should_panic(expected = "timed out after 50ms waiting for: the impossible")]
fn wait_until_names_what_it_waited_for() {
    wait_until(Duration::from_millis(50), "the impossible", || false);
}
