//! Figures 2 and 3 in the namespace rig: UDP throughput through a NodePort
//! and TCP connections through a ClusterIP, for this project's agent,
//! kube-proxy's nftables and iptables rule sets, a MAC-rewriting XDP
//! forwarder (the machine's limit) and a direct connection.
//!
//! One rig per scale, with a node per contender so that nothing is torn
//! down between runs: node-a runs the agent, node-c holds kube-proxy's
//! nftables rules, node-d its iptables ones (both programmed by the real
//! kube-proxy where it can run), node-e the forwarder; node-b holds the
//! backends. All are the same kind of veth on the same bridge. Figure 2 is
//! measured in two shapes of the nodes' wires (see [`Shape`]): with an XDP
//! program on their far side, and as users' container nodes have them,
//! with nothing there.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_agent::{
    datapath::{
        bpffs,
        maps::Maps,
        programs::{self, MapSizes, Programs},
        xdp_mode::XdpPolicy,
    },
    model::{self, NodeInfo},
    reconcile::Reconciler,
    source::manifests,
};
use lb_tests::{
    packet::Packet,
    rig::{in_ns, sh, udp_hello, Cluster, ClusterSpec, UdpServer},
    xdp::{self, Prog},
};

use crate::{
    kubeapi,
    kubeproxy::{self, Svc},
    realproxy::{Mode, RealProxy},
    report::{Report, Verdict},
    stats::{quantile, Stat},
};

/// How much to measure.
pub struct Params {
    /// Services loaded, one rig each.
    pub scales: Vec<usize>,
    /// Runs per figure.
    pub runs: usize,
    /// Figure 2: how long each contender gets packets per run.
    pub window: Duration,
    /// Figure 3: how long each contender gets connections per run.
    pub conn_window: Duration,
    /// Whether to run figure 2.
    pub fig2: bool,
    /// Whether to run figure 3.
    pub fig3: bool,
}

/// Endpoints of every Service but the two measured ones.
const ENDPOINTS: usize = 10;
/// NodePort of Service `i` is `NODE_PORT_BASE + i`.
const NODE_PORT_BASE: u16 = 20000;
/// The backends' port.
const TARGET: u16 = 8080;
/// Maglev table size of the agent: the per-packet lookup is one array
/// index whatever the size, and small tables keep 10 000 Services quick.
const TABLE_SIZE: u32 = 251;
/// Flows of the generator: random source ports `SPORT_BASE..+FLOWS`.
const FLOWS: u16 = 256;
const SPORT_BASE: u16 = 40000;
/// Marks the generator's frames, so that the sink drops only those and a
/// functional check's datagrams get through.
const MAGIC: &[u8; 4] = b"LBGN";
/// Frames per BPF_PROG_TEST_RUN of the generator.
const CHUNK: u32 = 32_768;
/// Request and response size of figure 3.
const MSG: usize = 32;

/// The contenders of figure 2, in measuring order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Generator,
    Forwarder,
    Agent,
    Nft,
    Iptables,
}

const PATHS: [Path; 5] = [
    Path::Generator,
    Path::Forwarder,
    Path::Agent,
    Path::Nft,
    Path::Iptables,
];

impl Path {
    fn name(self, shape: Shape) -> &'static str {
        match (self, shape) {
            (Path::Generator, Shape::XdpPeer) => "generator alone (dropped at the first hop)",
            (Path::Generator, Shape::Plain) => "generator alone (across the bridge to node-b)",
            (Path::Forwarder, Shape::XdpPeer) => "(a) XDP forwarder (MAC rewrite + XDP_TX)",
            (Path::Forwarder, Shape::Plain) => {
                "(a) XDP forwarder in generic mode (MAC rewrite + XDP_TX)"
            }
            (Path::Agent, Shape::XdpPeer) => "(b) lb agent, --xdp-mode native",
            (Path::Agent, Shape::Plain) => "(b) lb agent, default flags",
            (Path::Nft, _) => "(c) kube-proxy nftables rules",
            (Path::Iptables, _) => "(d) kube-proxy iptables rules",
        }
    }

    /// The namespace letter of the node (or `None`: the client) it runs on.
    fn node(self) -> Option<&'static str> {
        match self {
            Path::Generator => None,
            Path::Forwarder => Some("e"),
            Path::Agent => Some("a"),
            Path::Nft => Some("c"),
            Path::Iptables => Some("d"),
        }
    }
}

/// What is on the far side of the nodes' wires (their `eth0`'s peers, the
/// ports of the fabric bridge) in figure 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// An XDP program on every fabric port (a wire that hands the
    /// generator's frames to node-b's port): a veth then takes the frames a
    /// node sends with XDP_TX at once, so the agent can run native XDP
    /// (forced with `--xdp-mode native`, since its default picks generic
    /// mode on a veth). The generator puts its frames straight onto the
    /// node's `eth0` (XDP_TX on the node's port). Only a rig can have this.
    XdpPeer,
    /// What users have (kind, k3d, any container node): nothing on the
    /// fabric ports. The generator's frames enter the bridge on the
    /// client's port as socket buffers and the bridge forwards them to the
    /// node, and everything a node sends crosses the bridge again. The
    /// agent runs with default flags; the forwarder in generic mode, as
    /// native XDP_TX frames are not delivered to a peer without XDP.
    Plain,
}

/// The shapes of figure 2, in measuring order.
const SHAPES: [Shape; 2] = [Shape::XdpPeer, Shape::Plain];

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::XdpPeer => "XDP-capable far side (an XDP program on every fabric port)",
            Shape::Plain => "users' shape (nothing on the far side of a node's veth)",
        }
    }

    /// The agent's flags in this shape.
    fn agent_flags(self) -> &'static [&'static str] {
        match self {
            Shape::XdpPeer => &["--xdp-mode", "native"],
            Shape::Plain => &[],
        }
    }
}

/// What the generator's frames are to the load balancers in figure 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Regime {
    /// [`FLOWS`] flows, all known before the first run: conntrack hits,
    /// and the rule sets' NAT chains only at a flow's first packet.
    Established,
    /// A random source address (within a /16) and port per frame: nearly
    /// every frame a flow never seen, over a range far larger than any
    /// conntrack table (a SYN flood or a DNS storm). Every packet pays for
    /// a new flow: the agent's Maglev pick and conntrack inserts, and the
    /// rule sets' walk of their Service chains.
    NewFlows,
}

/// The regimes of figure 2, in measuring order.
const REGIMES: [Regime; 2] = [Regime::Established, Regime::NewFlows];

impl Regime {
    fn name(self) -> &'static str {
        match self {
            Regime::Established => "established flows",
            Regime::NewFlows => "every packet a new flow",
        }
    }
}

/// What a connection of figure 3 goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Direct,
    Agent,
    Nft,
    Iptables,
}

/// The contenders of figure 3: each way through, from a pod of the
/// contender's node and from that node's own network namespace (where the
/// agent's socket hooks, and kube-proxy's output chains, do the work).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Conn {
    via: Via,
    from_node: bool,
}

const CONNS: [Conn; 8] = {
    const fn c(via: Via, from_node: bool) -> Conn {
        Conn { via, from_node }
    }
    [
        c(Via::Direct, false),
        c(Via::Agent, false),
        c(Via::Nft, false),
        c(Via::Iptables, false),
        c(Via::Direct, true),
        c(Via::Agent, true),
        c(Via::Nft, true),
        c(Via::Iptables, true),
    ]
};

impl Conn {
    fn name(self) -> String {
        let via = match self.via {
            Via::Direct => "direct to the backend (no load balancer)",
            Via::Agent if self.from_node => "lb agent (socket hooks)",
            Via::Agent => "lb agent",
            Via::Nft => "kube-proxy nftables rules",
            Via::Iptables => "kube-proxy iptables rules",
        };
        let from = if self.from_node { "node" } else { "pod" };
        format!("{via}, from the {from}")
    }

    /// The client pod: one on each contender's node.
    fn pod(self) -> &'static str {
        match self.via {
            Via::Direct => "e0",
            Via::Agent => "a0",
            Via::Nft => "c0",
            Via::Iptables => "d0",
        }
    }

    /// The client's network namespace: the pod's, or its node's.
    fn client_ns(self, cluster: &Cluster) -> String {
        let pod = cluster.pod(self.pod());
        if self.from_node {
            let letter = pod.node.trim_start_matches("node-");
            cluster.node(letter).ns.clone()
        } else {
            pod.ns.clone()
        }
    }

    /// The index in [`CONNS`] of the direct connection from the same kind
    /// of client: what this one is compared with.
    fn baseline(self) -> usize {
        if self.from_node {
            4
        } else {
            0
        }
    }
}

/// Figure 2 at one scale: per contender, per run, packets per second sent
/// and delivered.
struct Throughput {
    regime: Regime,
    sent: Vec<Vec<f64>>,
    delivered: Vec<Vec<f64>>,
    /// The agent's programs on the live path, from one more run of path
    /// (b) with the kernel's run-time statistics on.
    live: Vec<ProgCost>,
    /// New flows only: packets per second each rule set still delivered
    /// in the last of [`SUSTAINED`] windows sent without a flush of its
    /// conntrack table between them, as under a flood that does not stop.
    sustained: Vec<(Path, f64)>,
    /// Each run's sending time per contender.
    window: Duration,
}

/// Windows of a sustained flood (see [`Throughput::sustained`]).
const SUSTAINED: usize = 5;

/// One of the agent's programs over a window of path (b): what the kernel's
/// BPF run-time statistics (`BPF_ENABLE_STATS`) counted.
struct ProgCost {
    name: String,
    /// Runs in the window.
    runs: u64,
    /// Mean run time (ns).
    ns_per_run: f64,
    /// Runs per frame the generator sent in the window.
    runs_per_packet: f64,
    /// JIT image size (bytes).
    jited: u32,
}

/// The agent's programs, as `bpftool prog` names them.
const AGENT_PROGS: [&str; 4] = ["lb_xdp_node", "lb_tc_node", "lb_tc_pod", "lb_tc_egress"];

/// Run time, run count and JIT size of every loaded program named in
/// [`AGENT_PROGS`], by program id.
fn prog_stats() -> BTreeMap<u32, (String, u64, u64, u32)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|info| {
            let name = info.name_as_str()?.to_string();
            AGENT_PROGS.contains(&name.as_str()).then(|| {
                (
                    info.id(),
                    (
                        name,
                        info.run_time().as_nanos() as u64,
                        info.run_count(),
                        info.size_jitted(),
                    ),
                )
            })
        })
        .collect()
}

/// One window of path (b) with the kernel's run-time statistics on: each
/// agent program's cost per run and runs per delivered packet, which is
/// what figure 1 cannot time (the FIB lookup, SNAT, XDP_TX). Statistics
/// are off during the measured runs, since they add two clock reads to
/// every program run.
fn live_cost(rig: &Rig, window: Duration, regime: Regime) -> Vec<ProgCost> {
    let stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => fd,
        Err(e) => panic!("BPF_ENABLE_STATS (kernel 5.8+): {e}"),
    };
    let before = prog_stats();
    let (frames, _, _) = rig.blast_counts(Path::Agent, window, regime);
    let after = prog_stats();
    drop(stats);
    let packets = frames.max(1) as f64;
    let mut by_name: BTreeMap<String, (u64, u64, u32)> = BTreeMap::new();
    for (id, (name, time, runs, jited)) in after {
        let (t0, r0) = before.get(&id).map_or((0, 0), |b| (b.1, b.2));
        let e = by_name.entry(name).or_default();
        e.0 += time.saturating_sub(t0);
        e.1 += runs.saturating_sub(r0);
        e.2 = e.2.max(jited);
    }
    by_name
        .into_iter()
        .filter(|(_, (_, runs, _))| *runs > 0)
        .map(|(name, (time, runs, jited))| ProgCost {
            name,
            runs,
            ns_per_run: time as f64 / runs as f64,
            runs_per_packet: runs as f64 / packets,
            jited,
        })
        .collect()
}

/// Figure 3 at one scale: per contender, per run.
struct Connections {
    rate: Vec<Vec<f64>>,
    p50_us: Vec<Vec<f64>>,
    p99_us: Vec<Vec<f64>>,
    errors: Vec<usize>,
}

/// One scale's results.
struct Scale {
    n: usize,
    setup: String,
    /// Figure 2, per shape and regime measured.
    thru: Vec<(Shape, Throughput)>,
    conns: Option<Connections>,
}

impl Scale {
    /// Figure 2's established-flow regime in `shape`, if measured.
    fn established(&self, shape: Shape) -> Option<&(Shape, Throughput)> {
        self.thru
            .iter()
            .find(|(sh, t)| *sh == shape && t.regime == Regime::Established)
    }
}

/// Points for the plots: per figure, per contender, (Services, median).
pub struct Results {
    /// Figure 2: delivered Mpps.
    pub throughput: Vec<(String, Vec<(f64, f64)>)>,
    /// Figure 3: connections per second.
    pub connections: Vec<(String, Vec<(f64, f64)>)>,
}

/// Service `i`'s ClusterIP: from 10.96.0.2 up, as 10.96.0.1 is the API
/// server's own Service (for the real kube-proxy).
fn cluster_ip(i: usize) -> Ipv4Addr {
    let n = i + 2;
    Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8)
}

fn fake_endpoint(i: usize, j: usize) -> Ipv4Addr {
    let e = i * ENDPOINTS + j;
    Ipv4Addr::new(10, 128 + (e >> 16) as u8, (e >> 8) as u8, e as u8)
}

/// `n` Services: UDP NodePorts with 10 endpoints each, except the two in
/// the middle that are measured: a UDP NodePort (figure 2) and a TCP
/// ClusterIP (figure 3), both with the two pods of node-b as endpoints.
/// Returns them and the indices of the measured two.
fn services(n: usize, pods: &[Ipv4Addr]) -> (Vec<Svc>, usize, usize) {
    let (udp, tcp) = (n / 2, n / 2 + 1);
    let svcs = (0..n.max(tcp + 1))
        .map(|i| Svc {
            name: format!("svc-{i}"),
            cluster_ip: cluster_ip(i),
            port: 80,
            proto: if i == tcp { "tcp" } else { "udp" },
            node_port: (i != tcp).then(|| NODE_PORT_BASE + i as u16),
            target: TARGET,
            endpoints: if i == udp || i == tcp {
                pods.to_vec()
            } else {
                (0..ENDPOINTS).map(|j| fake_endpoint(i, j)).collect()
            },
        })
        .collect();
    (svcs, udp, tcp)
}

/// The MAC address of `ifname` in namespace `ns`.
fn mac(ns: &str, ifname: &str) -> [u8; 6] {
    let out = sh(None, &["ip", "-n", ns, "-o", "link", "show", ifname]);
    let hex = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {ifname} in {ns}: {out}"));
    let mut m = [0u8; 6];
    for (d, part) in m.iter_mut().zip(hex.split(':')) {
        *d = u8::from_str_radix(part, 16).unwrap_or_else(|e| panic!("MAC {hex}: {e}"));
    }
    m
}

/// Packets the sink on `ns`'s `eth0` has dropped (counted by the veth).
fn sink_count(ns: &str) -> u64 {
    sh(Some(ns), &["ethtool", "-S", "eth0"])
        .lines()
        .filter(|l| l.contains("xdp_drops:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
        .sum()
}

/// The sink's count once frames still in flight have landed: it stops
/// moving within milliseconds of the generator's last batch.
fn settled_count(ns: &str) -> u64 {
    let mut last = sink_count(ns);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = sink_count(ns);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// The rig of one scale with every contender ready.
struct Rig {
    cluster: Cluster,
    svcs: Vec<Svc>,
    udp: usize,
    tcp: usize,
    shape: Shape,
    /// The sinks on node-b and the client.
    _sinks: Vec<xdp::Link>,
    /// The wire on the fabric ports ([`Shape::XdpPeer`] only).
    wire: Vec<xdp::Link>,
    forwarder: Prog,
    forwarding: Option<xdp::Link>,
    _udp_servers: Vec<UdpServer>,
    _tcp_servers: Vec<RrServer>,
    setup: String,
}

impl Rig {
    fn node_addr(letter: &str) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, letter.as_bytes()[0] - b'a' + 1)
    }

    fn new(n: usize) -> Self {
        let mut cluster = Cluster::new(
            ClusterSpec {
                nodes: 5,
                pods_per_node: 1,
                // The fabric ports get the wire (below) in the XDP-capable
                // shape, and nothing in the users' shape.
                xdp_far_side: false,
                ..ClusterSpec::default()
            }
            .tag("thru"),
        );
        cluster.add_pod_to("b", 1);
        // A node has a default route (here: the client's namespace as the
        // upstream router). kube-proxy's rule sets need it for the node's
        // own connections: `connect` looks up a route for the ClusterIP
        // before the output chain's DNAT runs. The agent's socket hooks
        // translate before that lookup and need none.
        for letter in ["a", "c", "d", "e"] {
            let ns = cluster.node(letter).ns.clone();
            sh(
                Some(&ns),
                &["ip", "route", "add", "default", "via", "10.99.0.100"],
            );
        }
        let pods = [cluster.pod("b0").addr, cluster.pod("b1").addr];
        let (svcs, udp, tcp) = services(n, &pods);
        let mut setup = String::new();

        // One file per Service: the agent pads each document of a file to
        // keep line numbers, so one file of 10 000 Services takes gigabytes.
        let t = timed(|| {
            for (i, svc) in svcs.iter().enumerate() {
                cluster.write_manifest(&format!("svc-{i:06}.yaml"), &svc.manifest());
            }
        });
        let _ = write!(setup, "manifests written in {:.1} s; ", t.as_secs_f64());

        // The rule sets are programmed while the agent starts.
        let dir = cluster.dir().to_path_buf();
        let client_ns = cluster.client_ns();
        let rule_nodes = [
            (Mode::Nftables, "c", cluster.node("c").ns.clone()),
            (Mode::Iptables, "d", cluster.node("d").ns.clone()),
        ];
        let (rules, agent_s) = std::thread::scope(|scope| {
            let rules = scope.spawn(|| rule_sets(&dir, &client_ns, &rule_nodes, &svcs));
            let mut writes = 0;
            let agent = timed(|| {
                writes = start_agent(&mut cluster, svcs.len(), Shape::XdpPeer.agent_flags());
            });
            let rules = rules
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (rules, (agent, writes))
        });
        let (agent_s, writes) = agent_s;
        let _ = write!(
            setup,
            "agent ready in {:.1} s (maps seeded, then started; its first sync wrote {writes} \
             entries); in parallel, {rules}",
            agent_s.as_secs_f64(),
        );

        let b_ns = cluster.node("b").ns.clone();
        let b_mac = mac(&b_ns, "eth0");
        let b_addr = Self::node_addr("b").to_string();
        let b_mac_s = b_mac.map(|x| format!("{x:02x}")).join(":");
        for letter in ["a", "c", "d", "e"] {
            let ns = cluster.node(letter).ns.clone();
            // A resolved neighbour from the start: XDP's FIB lookup then
            // finds node-b's MAC at once, and none of the runs waits on ARP.
            sh(
                None,
                &[
                    "ip",
                    "-n",
                    &ns,
                    "neigh",
                    "replace",
                    &b_addr,
                    "lladdr",
                    &b_mac_s,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            );
            // veth takes frames sent to it (XDP_TX, live frames) only with
            // NAPI on: an XDP program or GRO. Nodes c and d have no program.
            sh(Some(&ns), &["ethtool", "-K", "eth0", "gro", "on"]);
        }
        // Every node's MAC on its port from the start: the users' shape
        // sends through the bridge, which must not flood while it learns.
        let fabric = cluster.fabric_ns();
        for letter in ["a", "b", "c", "d", "e"] {
            let ns = cluster.node(letter).ns.clone();
            let m = mac(&ns, "eth0").map(|x| format!("{x:02x}")).join(":");
            let port = format!("n{letter}");
            sh(
                Some(&fabric),
                &[
                    "bridge", "fdb", "replace", &m, "dev", &port, "master", "static",
                ],
            );
        }

        let mut sinks = Vec::new();
        let sink = Prog::load("bench_sink", &xdp::sink(MAGIC)).expect("load the sink");
        for ns in [b_ns.clone(), cluster.client_ns()] {
            let link = in_ns(&ns, || {
                sink.attach(programs::ifindex("eth0")?).map_err(Into::into)
            })
            .unwrap_or_else(|e: anyhow::Error| panic!("attach the sink in {ns}: {e:#}"));
            sinks.push(link);
        }
        // The way back from the nodes to node-b is a wire, not the bridge:
        // the generator's frames are redirected from the node's fabric port
        // straight to node-b's, as frames without a socket buffer, so that
        // the figure is the node's cost and not the bridge's. Everything
        // else takes the bridge. Being XDP, it also makes every fabric port
        // take XDP_TX frames promptly (the XDP-capable far side).
        let ports = ["client", "na", "nb", "nc", "nd", "ne"];
        let wire = in_ns(&fabric, || -> anyhow::Result<Vec<xdp::Link>> {
            let wire = Prog::load("bench_wire", &xdp::wire(MAGIC, programs::ifindex("nb")?))
                .map_err(anyhow::Error::msg)?;
            let mut links = Vec::new();
            for port in ports {
                links.push(wire.attach(programs::ifindex(port)?)?);
            }
            Ok(links)
        })
        .unwrap_or_else(|e| panic!("attach the wire in the fabric: {e:#}"));
        let e_ns = cluster.node("e").ns.clone();
        let forwarder = Prog::load("bench_fwd", &xdp::forwarder(b_mac, mac(&e_ns, "eth0")))
            .expect("load the forwarder");
        let forwarding = in_ns(&e_ns, || {
            forwarder
                .attach(programs::ifindex("eth0")?)
                .map_err(Into::into)
        })
        .unwrap_or_else(|e: anyhow::Error| panic!("attach the forwarder: {e:#}"));

        let mut udp_servers = Vec::new();
        let mut tcp_servers = Vec::new();
        for pod in ["b0", "b1"] {
            let p = cluster.pod(pod).clone();
            let at = SocketAddr::new(p.addr.into(), TARGET);
            udp_servers.push(UdpServer::start(&p.ns, at, pod));
            tcp_servers.push(RrServer::start(&p.ns, at));
        }
        let rig = Self {
            cluster,
            svcs,
            udp,
            tcp,
            shape: Shape::XdpPeer,
            _sinks: sinks,
            wire,
            forwarder,
            forwarding: Some(forwarding),
            _udp_servers: udp_servers,
            _tcp_servers: tcp_servers,
            setup,
        };
        rig.check_paths();
        rig
    }

    /// Turns the rig into `shape` (from [`Shape::XdpPeer`], the shape it is
    /// built in): the far side of every wire, the nodes' GRO, the
    /// forwarder's mode and the agent's flags (it restarts, re-adopting its
    /// maps and links as after any restart). Checks every path again.
    fn reshape(&mut self, shape: Shape) {
        if shape == self.shape {
            return;
        }
        assert_eq!(shape, Shape::Plain, "the rig is built XDP-capable");
        self.wire.clear();
        // Users' nodes have GRO off on their eth0, veth's default.
        for letter in ["a", "c", "d", "e"] {
            let ns = self.cluster.node(letter).ns.clone();
            sh(Some(&ns), &["ethtool", "-K", "eth0", "gro", "off"]);
        }
        // Native XDP_TX frames would not reach the fabric port now.
        self.forwarding = None;
        let e_ns = self.cluster.node("e").ns.clone();
        let fwd = &self.forwarder;
        self.forwarding = Some(
            in_ns(&e_ns, || {
                fwd.attach_generic(programs::ifindex("eth0")?)
                    .map_err(Into::into)
            })
            .unwrap_or_else(|e: anyhow::Error| panic!("attach the forwarder (generic): {e:#}")),
        );
        let mut args = agent_args(self.svcs.len());
        args.extend(shape.agent_flags().iter().map(ToString::to_string));
        let node = self.cluster.node_mut("a");
        node.stop_agent();
        node.start_agent(&args.iter().map(String::as_str).collect::<Vec<_>>());
        node.wait_agent_ready(Duration::from_secs(120));
        self.shape = shape;
        self.forget_flows();
        self.check_paths();
    }

    /// Empties the netfilter connection tracking of the rule sets' nodes
    /// (`conntrack -F`), so that each shape and figure starts from the same
    /// state as the first: after the new-flow regime their tables are full
    /// of unreplied flows holding every masquerade port towards the
    /// backends, and no new flow gets through for 30 s (the UDP timeout).
    /// The agent's conntrack needs no such help: it evicts (LRU).
    fn forget_flows(&self) {
        let conntrack = kubeapi::debian_bin("/usr/sbin/conntrack", "conntrack")
            .unwrap_or_else(|e| panic!("conntrack: {e}"));
        for letter in ["c", "d"] {
            let ns = &self.cluster.node(letter).ns;
            // It exits 1 when there was nothing to flush.
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(&conntrack)
                .arg("-F")
                .output();
        }
    }

    /// Each load balancer answers a real datagram to the measured NodePort
    /// and a real connection to the measured ClusterIP from a backend:
    /// otherwise its figures would measure a broken path.
    fn check_paths(&self) {
        let np = self.svcs[self.udp].node_port.expect("a NodePort");
        for letter in ["a", "c", "d"] {
            let dst = SocketAddr::new(Self::node_addr(letter).into(), np);
            let (reply, _) = udp_hello(&self.cluster.client_ns(), dst, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("no answer from NodePort {dst} on node-{letter}: {e}"));
            assert!(
                reply.starts_with('b'),
                "NodePort {dst} on node-{letter} answered {reply:?}, not a backend"
            );
        }
        for c in CONNS {
            let ns = c.client_ns(&self.cluster);
            let dst = self.conn_target(c);
            in_ns(&ns, || request(dst, Duration::from_secs(2)))
                .unwrap_or_else(|e| panic!("{} ({ns}): {dst}: {e}", c.name()));
        }
    }

    fn conn_target(&self, c: Conn) -> SocketAddr {
        match c.via {
            Via::Direct => SocketAddr::new(self.cluster.pod("b0").addr.into(), TARGET),
            _ => SocketAddr::new(self.svcs[self.tcp].cluster_ip.into(), 80),
        }
    }

    /// The generator's frame for `path` and the fabric port it runs on: to
    /// the measured NodePort on the node's address and MAC. In the users'
    /// shape it runs on the client's port and the bridge carries the frame;
    /// the generator alone then sends to node-b across the bridge.
    fn frame(&self, path: Path) -> (String, Vec<u8>) {
        let (port, ns, addr) = match (path.node(), self.shape) {
            (Some(l), Shape::XdpPeer) => (
                format!("n{l}"),
                self.cluster.node(l).ns.clone(),
                Self::node_addr(l),
            ),
            (None, Shape::XdpPeer) => (
                "client".to_string(),
                self.cluster.client_ns(),
                Ipv4Addr::new(10, 99, 0, 100),
            ),
            (l, Shape::Plain) => {
                let l = l.unwrap_or("b");
                (
                    "client".to_string(),
                    self.cluster.node(l).ns.clone(),
                    Self::node_addr(l),
                )
            }
        };
        let np = self.svcs[self.udp].node_port.expect("a NodePort");
        let mut payload = MAGIC.to_vec();
        payload.resize(18, 0);
        let mut p = Packet::udp(
            SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 100), SPORT_BASE),
            SocketAddrV4::new(addr, np),
            &payload,
        );
        p.dst_mac = mac(&ns, "eth0");
        p.src_mac = mac(&self.cluster.client_ns(), "eth0");
        if let lb_tests::packet::L4::Udp { no_checksum, .. } = &mut p.l4 {
            *no_checksum = true;
        }
        (port, p.bytes())
    }

    /// Where `path`'s packets are counted.
    fn sink_ns(&self, path: Path) -> String {
        match (path, self.shape) {
            (Path::Generator, Shape::XdpPeer) => self.cluster.client_ns(),
            _ => self.cluster.node("b").ns.clone(),
        }
    }

    /// Sends for `window` along `path`: packets per second sent and
    /// delivered.
    fn blast(&self, path: Path, window: Duration, regime: Regime) -> (f64, f64) {
        let (frames, delivered, took) = self.blast_counts(path, window, regime);
        let secs = took.as_secs_f64();
        (frames as f64 / secs, delivered as f64 / secs)
    }

    /// [`Rig::blast`]'s frames sent, packets delivered and sending time.
    fn blast_counts(&self, path: Path, window: Duration, regime: Regime) -> (u64, u64, Duration) {
        let (port, frame) = self.frame(path);
        let sink = self.sink_ns(path);
        let before = sink_count(&sink);
        let headers = frame[..xdp::HEADERS].try_into().expect("a whole frame");
        let inject = match self.shape {
            Shape::XdpPeer => xdp::Inject::Tx,
            Shape::Plain => xdp::Inject::Pass,
        };
        let insns = match regime {
            Regime::Established => xdp::generator(headers, SPORT_BASE, FLOWS, inject),
            Regime::NewFlows => xdp::udp_flood(headers, inject),
        };
        let gen = Prog::load("bench_gen", &insns).expect("load the generator");
        let gen = &gen;
        let (frames, took) = in_ns(&self.cluster.fabric_ns(), || {
            let ifindex = programs::ifindex(&port).expect("the node's fabric port");
            let (mut frames, mut took) = (0u64, Duration::ZERO);
            while took < window {
                took += gen
                    .send(ifindex, &frame, CHUNK)
                    .unwrap_or_else(|e| panic!("generator (live frames) on {port}: {e}"));
                frames += u64::from(CHUNK);
            }
            (frames, took)
        });
        let delivered = settled_count(&sink) - before;
        (frames, delivered, took)
    }
}

/// How long the real kube-proxy may take for its first sync: iptables
/// mode takes minutes at 10 000 Services.
const FIRST_SYNC_PATIENCE: Duration = Duration::from_secs(900);

/// Programs `nodes` (mode, node letter, namespace) with `svcs`: with the
/// real kube-proxy where it can ([`real_rule_sets`]), else with rule sets
/// shaped like its own, node by node. Returns what it did, for the report.
fn rule_sets(
    dir: &std::path::Path,
    client_ns: &str,
    nodes: &[(Mode, &str, String)],
    svcs: &[Svc],
) -> String {
    // What a failed kube-proxy may have programmed goes first: nothing else
    // on these nodes uses netfilter.
    let emulate = |node: &(Mode, &str, String), why: &str| {
        eprintln!(
            "bench: figures 2/3: node-{}: the real kube-proxy ({}) cannot serve ({why}); \
             loading rules shaped like its own",
            node.1,
            node.0.flag()
        );
        sh(Some(&node.2), &["nft", "flush", "ruleset"]);
        emulated_rule_sets(dir, std::slice::from_ref(node), svcs, why)
    };
    match real_rule_sets(dir, client_ns, nodes, svcs) {
        Err(why) => nodes
            .iter()
            .map(|node| emulate(node, &why))
            .collect::<Vec<_>>()
            .join("; "),
        Ok((api, done)) => {
            let parts: Vec<String> = nodes
                .iter()
                .zip(done)
                .map(|(node, res)| res.unwrap_or_else(|why| emulate(node, &why)))
                .collect();
            format!("{api}: {}", parts.join("; "))
        }
    }
}

/// Has the real kube-proxy program each of `nodes` (mode, node letter,
/// namespace) with `svcs`, through the real kube-apiserver in the client's
/// namespace, then stops it and the API server and leaves the rules: they
/// are what is measured, and nothing of kube-proxy's runs during the
/// measurements. Returns what it did in all and on each node, for the
/// report; `Err` says why it cannot run here at all, a node's `Err` why it
/// did not program that node.
#[allow(clippy::type_complexity)]
fn real_rule_sets(
    dir: &std::path::Path,
    client_ns: &str,
    nodes: &[(Mode, &str, String)],
    svcs: &[Svc],
) -> Result<(String, Vec<Result<String, String>>), String> {
    let t = Instant::now();
    let api = kubeapi::RealApi::start(client_ns, dir)?;
    let api_s = t.elapsed();
    let t = Instant::now();
    let mut objects: Vec<String> = nodes
        .iter()
        .map(|(_, l, _)| {
            lb_tests::manifests::node(&format!("node-{l}"), &Rig::node_addr(l).to_string())
        })
        .collect();
    objects.extend(svcs.iter().flat_map(Svc::objects));
    api.apply_all(objects)?;
    let objects_s = t.elapsed();
    let proxies = nodes
        .iter()
        .map(|(mode, l, ns)| {
            let started = Instant::now();
            RealProxy::start(*mode, ns, dir, &api.kubeconfig, &format!("node-{l}"))
                .map(|kp| (kp, *mode, *l, started))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let deadline = Instant::now() + FIRST_SYNC_PATIENCE;
    let done = proxies
        .into_iter()
        .map(|(kp, mode, l, started)| {
            kp.wait_sync(0, deadline).map_err(|_| {
                format!(
                    "its first sync of {} Services did not end in {} s",
                    svcs.len(),
                    FIRST_SYNC_PATIENCE.as_secs()
                )
            })?;
            let took = started.elapsed();
            let frontends = kp.frontends()?;
            // `default/kubernetes` has no endpoints here, and so no frontend.
            if frontends != svcs.len() {
                return Err(format!(
                    "it programmed {frontends} of {} Services",
                    svcs.len()
                ));
            }
            kp.leave_rules();
            Ok(format!(
                "it programmed node-{l} ({} mode) in {:.1} s",
                mode.flag(),
                took.as_secs_f64(),
            ))
        })
        .collect();
    drop(api);
    let tools = format!(
        "{}, {}",
        sh(None, &["nft", "--version"]).trim(),
        sh(None, &["iptables-restore", "--version"]).trim()
    );
    Ok((
        format!(
            "the real kube-proxy v1.32.13 (`../shared/k8s`, default flags but the mode; the \
             machine's {tools}), from the real kube-apiserver (up in {:.1} s, its {} objects \
             written in {:.1} s), timed to its first sync, then stopped with its rules left",
            api_s.as_secs_f64(),
            2 * svcs.len() + nodes.len(),
            objects_s.as_secs_f64(),
        ),
        done,
    ))
}

/// Loads rule sets shaped like kube-proxy's (see `kubeproxy.rs`) on
/// `nodes`, when the real one cannot run (`why`); each loader is one
/// process of its own, and 10 000 Services take them a minute. Returns
/// what it did, for the report.
fn emulated_rule_sets(
    dir: &std::path::Path,
    nodes: &[(Mode, &str, String)],
    svcs: &[Svc],
    why: &str,
) -> String {
    let done: Vec<String> = std::thread::scope(|scope| {
        let loaders: Vec<_> = nodes
            .iter()
            .map(|(mode, l, ns)| {
                scope.spawn(move || {
                    let took = timed(|| match mode {
                        Mode::Nftables => {
                            for (k, tx) in kubeproxy::nft(svcs).iter().enumerate() {
                                let file = dir.join(format!("kube-proxy-{k:03}.nft"));
                                std::fs::write(&file, tx).expect("write the nftables rules");
                                sh(Some(ns), &["nft", "-f", &file.to_string_lossy()]);
                            }
                        }
                        Mode::Iptables => {
                            let file = dir.join("kube-proxy.iptables");
                            std::fs::write(&file, kubeproxy::iptables(svcs))
                                .expect("write the iptables rules");
                            sh(Some(ns), &["iptables-restore", &file.to_string_lossy()]);
                        }
                    });
                    format!(
                        "node-{l}'s {} rules in {:.1} s",
                        mode.flag(),
                        took.as_secs_f64()
                    )
                })
            })
            .collect();
        loaders
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let version = sh(None, &["iptables-restore", "--version"]);
    format!(
        "rule sets shaped like kube-proxy's (the real one did not serve: {why}) loaded with \
         `nft -f` and `iptables-restore` ({}): {}",
        version.trim(),
        done.join(", ")
    )
}

/// Starts the agent on node-a with every Service. Its maps are seeded
/// first, through the agent's own translation and reconciler with the
/// Maglev tables written in batches: a cold start writes each table with
/// its own outer-map update, which waits for an RCU grace period, and takes
/// minutes at 10 000 Services (figure 4). The agent adopts the pinned maps
/// as after a restart, finds every table right and writes none. Returns
/// the writes of its first sync, as it logged them.
fn start_agent(cluster: &mut Cluster, n: usize, flags: &[&str]) -> u64 {
    let bpffs = cluster.node("a").bpffs();
    bpffs::ensure(&bpffs).expect("mount node-a's bpffs");
    let sizes = map_sizes(n);
    {
        let _progs =
            Programs::load(&bpffs, sizes, XdpPolicy::Auto).expect("load node-a's programs");
        let mut maps = Maps::open(&bpffs).expect("open node-a's maps");
        let objects = manifests::load_dir(&cluster.manifests_dir()).expect("read the manifests");
        let node = NodeInfo {
            name: "node-a".into(),
            addresses: vec![IpAddr::V4(Rig::node_addr("a"))],
            zone: None,
        };
        let (model, problems) = model::build(&objects.services, &objects.slices, &node);
        assert!(problems.is_empty(), "bad bench manifests: {problems:?}");
        let mut reconciler = Reconciler::new(TABLE_SIZE);
        // The reconciler writes the tables in batches before the frontends.
        let report = reconciler.apply(&model, &mut maps);
        assert!(report.failures.is_empty(), "seeding failed: {report:?}");
    }
    let node = cluster.node_mut("a");
    let mut args = agent_args(n);
    args.extend(flags.iter().map(ToString::to_string));
    node.start_agent(&args.iter().map(String::as_str).collect::<Vec<_>>());
    node.wait_agent_ready(Duration::from_secs(120));
    // Its first sync's map writes: 0 when it adopted the seeded maps whole.
    node.agent_log()
        .lines()
        .find_map(|l| {
            l.split("writes=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(u64::MAX)
}

/// The agent's map sizes for `n` Services.
fn map_sizes(n: usize) -> MapSizes {
    MapSizes {
        services: (2 * n + 1024).next_power_of_two() as u32,
        backends: (n * ENDPOINTS + 1024).next_power_of_two() as u32,
        // Every table twice (a changed table is written beside the old one).
        maglev_slots: (2 * n * TABLE_SIZE.next_multiple_of(16) as usize + (1 << 16))
            .next_power_of_two() as u32,
        ..MapSizes::default()
    }
}

/// The agent's flags for `n` Services, but for the XDP mode.
fn agent_args(n: usize) -> Vec<String> {
    let sizes = map_sizes(n);
    [
        "--maglev-table-size".to_string(),
        TABLE_SIZE.to_string(),
        "--services-size".to_string(),
        sizes.services.to_string(),
        "--backends-size".to_string(),
        sizes.backends.to_string(),
        "--maglev-slots".to_string(),
        sizes.maglev_slots.to_string(),
    ]
    .into()
}

/// A backend for figure 3: answers one request per connection and closes
/// first, so TIME_WAIT stays on the server and the client can reuse ports.
struct RrServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RrServer {
    fn start(ns: &str, at: SocketAddr) -> Self {
        let listener = in_ns(ns, || TcpListener::bind(at))
            .unwrap_or_else(|e| panic!("bind {at} in {ns}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: one valid pollfd, for the listener that outlives it.
                if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                    continue;
                }
                if let Ok((conn, _)) = listener.accept() {
                    let _ = answer(conn);
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RrServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; MSG];
    conn.read_exact(&mut buf)?;
    conn.write_all(&buf)
}

/// One connection: connect, a request, its response, and the close the
/// server starts. Returns the request-to-response time.
fn request(dst: SocketAddr, timeout: Duration) -> io::Result<Duration> {
    let mut s = TcpStream::connect_timeout(&dst, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [7u8; MSG];
    let t = Instant::now();
    s.write_all(&buf)?;
    s.read_exact(&mut buf)?;
    let rr = t.elapsed();
    if s.read(&mut buf)? != 0 {
        return Err(io::Error::other("more than one response"));
    }
    Ok(rr)
}

/// Connections from pod namespace `ns` to `dst` for `window`, one at a
/// time: (connections per second, request/response times in µs, errors).
fn connect_loop(ns: &str, dst: SocketAddr, window: Duration) -> (f64, Vec<f64>, usize) {
    in_ns(ns, || {
        let t = Instant::now();
        let mut rr = Vec::new();
        let mut errors = 0;
        while t.elapsed() < window {
            match request(dst, Duration::from_secs(1)) {
                Ok(d) => rr.push(d.as_secs_f64() * 1e6),
                Err(_) => errors += 1,
            }
        }
        (rr.len() as f64 / t.elapsed().as_secs_f64(), rr, errors)
    })
}

/// Figure 2 in the rig's present shape.
fn throughput(rig: &Rig, p: &Params, regime: Regime) -> Throughput {
    let mut t = Throughput {
        regime,
        sent: vec![Vec::new(); PATHS.len()],
        delivered: vec![Vec::new(); PATHS.len()],
        live: Vec::new(),
        sustained: Vec::new(),
        window: p.window,
    };
    // Conntrack entries of every flow exist before the first run (and in
    // the new-flow regime, the tables are full before it).
    for path in PATHS {
        rig.blast(path, Duration::from_millis(50), regime);
    }
    for run in 0..p.runs {
        // Each run of new flows measures what a new flow costs, from the
        // same empty conntrack tables; what a flood that goes on does to
        // the rule sets is measured after the runs.
        if regime == Regime::NewFlows {
            rig.forget_flows();
        }
        for (k, path) in PATHS.iter().enumerate() {
            let (sent, delivered) = rig.blast(*path, p.window, regime);
            t.sent[k].push(sent);
            t.delivered[k].push(delivered);
        }
        eprintln!(
            "bench: figure 2: {} Services, {:?}, {regime:?}, run {run}: {}",
            rig.svcs.len(),
            rig.shape,
            t.delivered
                .iter()
                .map(|d| format!("{:.0}", d[run]))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    t.live = live_cost(rig, p.window, regime);
    if regime == Regime::NewFlows {
        rig.forget_flows();
        for path in [Path::Nft, Path::Iptables] {
            let mut last = 0.0;
            for _ in 0..SUSTAINED {
                last = rig.blast(path, p.window, regime).1;
            }
            t.sustained.push((path, last));
        }
        rig.forget_flows();
    }
    t
}

fn run_scale(p: &Params, n: usize) -> Scale {
    eprintln!("bench: figures 2/3: rig with {n} Services");
    let mut rig = Rig::new(n);
    eprintln!("bench: figures 2/3: {}", rig.setup);
    let mut thru = Vec::new();
    // Figure 3 is measured in the shape the rig is built in; the shapes of
    // figure 2 follow each other, the users' shape last.
    if p.fig2 {
        for regime in REGIMES {
            thru.push((rig.shape, throughput(&rig, p, regime)));
        }
    }
    let conns = p.fig3.then(|| {
        rig.forget_flows();
        let mut c = Connections {
            rate: vec![Vec::new(); CONNS.len()],
            p50_us: vec![Vec::new(); CONNS.len()],
            p99_us: vec![Vec::new(); CONNS.len()],
            errors: vec![0; CONNS.len()],
        };
        for run in 0..p.runs {
            for (k, conn) in CONNS.iter().enumerate() {
                let ns = conn.client_ns(&rig.cluster);
                let (rate, rr, errors) = connect_loop(&ns, rig.conn_target(*conn), p.conn_window);
                c.rate[k].push(rate);
                c.p50_us[k].extend(quantile(&rr, 0.5));
                c.p99_us[k].extend(quantile(&rr, 0.99));
                c.errors[k] += errors;
            }
            eprintln!(
                "bench: figure 3: {n} Services, run {run}: {}",
                c.rate
                    .iter()
                    .map(|r| format!("{:.0}", r[run]))
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
        }
        c
    });
    if p.fig2 {
        let built = rig.shape;
        for shape in SHAPES.into_iter().filter(|s| *s != built) {
            let t = timed(|| rig.reshape(shape));
            eprintln!(
                "bench: figure 2: {n} Services, now {shape:?} (agent restarted in {:.1} s)",
                t.as_secs_f64()
            );
            for regime in REGIMES {
                thru.push((shape, throughput(&rig, p, regime)));
            }
        }
    }
    let setup = rig.setup.clone();
    drop(rig);
    Scale {
        n,
        setup,
        thru,
        conns,
    }
}

/// Runs figures 2 and 3 (those asked for) at every scale.
pub fn run(p: &Params, report: &mut Report) -> Results {
    let scales: Vec<Scale> = p.scales.iter().map(|n| run_scale(p, *n)).collect();
    let mut results = Results {
        throughput: Vec::new(),
        connections: Vec::new(),
    };
    if p.fig2 {
        report_throughput(p, &scales, report);
        for shape in SHAPES {
            for (k, path) in PATHS.iter().enumerate() {
                let points = scales
                    .iter()
                    .filter_map(|s| {
                        let (_, t) = s.established(shape)?;
                        Some((s.n as f64, Stat::of(&t.delivered[k])?.median / 1e6))
                    })
                    .collect();
                let label = match shape {
                    Shape::XdpPeer => format!("{}, XDP-capable far side", path.name(shape)),
                    Shape::Plain => format!("{}, users' shape", path.name(shape)),
                };
                results.throughput.push((label, points));
            }
        }
    }
    if p.fig3 {
        report_connections(p, &scales, report);
        for (k, conn) in CONNS.iter().enumerate() {
            let points = scales
                .iter()
                .filter_map(|s| {
                    let c = s.conns.as_ref()?;
                    Some((s.n as f64, Stat::of(&c.rate[k])?.median))
                })
                .collect();
            results.connections.push((conn.name(), points));
        }
    }
    results
}

fn show(s: Option<Stat>, scale: f64, digits: usize) -> String {
    s.map_or_else(
        || "-".into(),
        |s| {
            Stat {
                median: s.median * scale,
                min: s.min * scale,
                max: s.max * scale,
            }
            .show(digits)
        },
    )
}

/// The verdict of a target that applies only at 10 000 Services.
fn verdict(applies: bool, ok: bool) -> Verdict {
    match (applies, ok) {
        (false, _) => Verdict::Info,
        (true, true) => Verdict::Pass,
        (true, false) => Verdict::Miss,
    }
}

fn report_throughput(p: &Params, scales: &[Scale], report: &mut Report) {
    let mut s = String::from("## Figure 2: throughput (namespace rig)\n\n");
    let _ = writeln!(
        s,
        "Method: a rig of five nodes on one bridge, each contender on a node of its own \
         so nothing is torn down between runs: node-a runs the agent; node-c holds \
         kube-proxy's nftables rules for the same Services and node-d its iptables rules, \
         programmed by the real kube-proxy v1.32.13 (from `../shared/k8s`, through the real \
         kube-apiserver, then stopped with its rules left in place) wherever it can run, and \
         otherwise rule sets generated to look like its output (table `kube-proxy`: verdict \
         maps on address, protocol and port, a chain per Service and per endpoint, `numgen \
         random`, DNAT, masquerade by mark; KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-* with \
         `statistic` probabilities, KUBE-MARK-MASQ, KUBE-POSTROUTING) loaded with `nft -f` \
         and `iptables-restore`: each scale's set-up line below says which; node-e runs \
         the forwarder, an XDP program that only writes node-b's MAC and its own and sends \
         the frame back out (XDP_TX): the limit of this machine. Services: UDP NodePorts \
         with {ENDPOINTS} endpoints each; the measured one is in the middle of the list, \
         with the two pods of node-b as endpoints. Before measuring in each shape, every \
         load balancer answers a real datagram through the measured NodePort from a \
         backend. The agent's maps are seeded with its own translation and reconciler \
         (tables written in batches) before it starts, because a cold start writes every \
         table with an RCU grace period of its own (minutes at 10 000 Services, figure 4); \
         it adopts them as after a restart and rewrites nothing. Generator: \
         BPF_PROG_TEST_RUN in live-frames mode (as xdp-trafficgen), run in the fabric \
         namespace: 60-byte UDP frames to the NodePort from {FLOWS} source ports chosen at \
         random per frame (the flows exist before the first run, so conntrack and the \
         agent see established flows, and the rule sets' NAT chains only a flow's first \
         packet), one thread, batches of 64; an XDP sink on node-b's eth0 counts and drops \
         them (veth `xdp_drops`): delivered packets per second of the generator's time. \
         Everything runs on the generator's CPU in one softirq chain, so a rate is the \
         inverse of the whole chain's cost per packet, and 'ns per packet' differences \
         between rows are the differences in the nodes' work. {} runs of {:.1} s per \
         contender, in turn; ratios are per run.\n\n\
         Two shapes of the nodes' wires (each node's eth0 is a veth whose far side is a \
         port of the fabric bridge):\n\n\
         - {}: an XDP program on every fabric port hands the generator's frames straight \
         to node-b's port (a wire, so that the bridge's cost does not drown the nodes'), \
         and being XDP it makes the port take frames a node sends with XDP_TX at once. \
         The generator runs on the node's port (XDP_TX), so frames go straight onto the \
         node's eth0 as from a NIC. The agent is forced to native XDP \
         (`--xdp-mode native`). 'Generator alone': its frames dropped by the same sink on \
         the first hop (the client's eth0).\n\
         - {}: nothing on the fabric ports and GRO off on the nodes' eth0 (veth's \
         default), as on kind, k3d or any container node. The generator runs on the \
         client's port and passes its frames to the bridge (XDP_PASS: socket buffers), \
         which forwards them to the node, and whatever the node sends crosses the bridge \
         to node-b. The agent runs with default flags (restarted, re-adopting its maps \
         and links); the forwarder runs in generic mode, because a veth delivers native \
         XDP_TX frames only to a peer that runs XDP. 'Generator alone': the frames cross \
         the bridge straight to node-b.\n\n\
         Two regimes in each shape: established flows (as above), and every packet a new \
         flow: the generator gives each frame a random source address within the \
         client's /16 and a random source port (2^32 flows, far more than any conntrack \
         table holds; the IP checksum balanced by the identification field, the UDP \
         checksum left out), like a flood from spoofed sources or a DNS storm. Every \
         load balancer then does a new flow's whole work per packet: the agent picks by \
         Maglev, inserts its conntrack entries and claims a SNAT port; the rule sets walk \
         their Service chains and nf_conntrack creates (and soon evicts) an entry per \
         packet. The tables fill during the 50 ms before the first run. The rule sets then \
         run out of masquerade ports: nf_conntrack keeps an unanswered UDP flow 30 s, each \
         one holding one of about 64 k source ports per backend, so after some 130 k new \
         flows to the two backends nf_nat finds no free tuple and drops the packet after \
         searching for one, and their rates fall by orders of magnitude within the first \
         runs (see the min and max). That is what a kube-proxy node does under such a \
         flood, not an effect of the rig. The agent's reply entries of unanswered flows \
         are embryonic ones, in an LRU map with a short timeout, so their ports come back \
         as the map evicts them.\n",
        p.runs,
        p.window.as_secs_f64(),
        Shape::XdpPeer.name(),
        Shape::Plain.name(),
    );
    for sc in scales {
        for (shape, t) in &sc.thru {
            throughput_table(&mut s, sc, *shape, t, report);
        }
        // What a node costs per packet beyond the rest of the chain (the
        // generator alone, in the same run): the users' shape's frames also
        // cross the bridge as socket buffers, which every contender pays.
        let node_cost = |shape: Shape, k: usize| {
            let (_, t) = sc.established(shape)?;
            Stat::of(
                &t.delivered[k]
                    .iter()
                    .zip(&t.delivered[0])
                    .map(|(d, g)| 1e9 / d - 1e9 / g)
                    .collect::<Vec<_>>(),
            )
        };
        if let (Some(plain), Some(xdp), Some(nft)) = (
            node_cost(Shape::Plain, 2),
            node_cost(Shape::XdpPeer, 2),
            node_cost(Shape::Plain, 3),
        ) {
            report.row(
                &format!(
                    "agent's ns per packet, users' shape / XDP-capable at {} Services",
                    sc.n
                ),
                format!("{:.2}", plain.median / xdp.median),
                "-",
                Verdict::Info,
                format!(
                    "ns per packet above the generator alone: {} with default flags on a veth \
                     with nothing on its far side (generic XDP), {} forced native with XDP \
                     there (medians of different phases); nftables in the users' shape: {}",
                    plain.show(0),
                    xdp.show(0),
                    nft.show(0)
                ),
            );
        }
    }
    report.sections.push(s);
}

/// One shape's table of figure 2 at one scale, and its summary rows.
fn throughput_table(s: &mut String, sc: &Scale, shape: Shape, t: &Throughput, report: &mut Report) {
    let agent = &t.delivered[2];
    let _ = writeln!(
        s,
        "### {} Services, {}, {}\n\nSet-up: {}.\n\n| path | delivered (Mpps) | sent (Mpps) | ns per packet | b / this |\n|---|---|---|---|---|",
        sc.n,
        shape.name(),
        t.regime.name(),
        sc.setup
    );
    for (k, path) in PATHS.iter().enumerate() {
        let ns: Vec<f64> = t.delivered[k].iter().map(|d| 1e9 / d).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            path.name(shape),
            show(Stat::of(&t.delivered[k]), 1e-6, 3),
            show(Stat::of(&t.sent[k]), 1e-6, 3),
            show(Stat::of(&ns), 1.0, 0),
            show(Stat::ratio(agent, &t.delivered[k]), 1.0, 2),
        );
    }
    s.push('\n');
    if !t.sustained.is_empty() {
        let _ = writeln!(
            s,
            "Each run above starts with the rule sets' conntrack tables emptied (`conntrack \
             -F`), so it measures what a new flow costs them. Under a flood that goes on, \
             their tables fill with unreplied flows that hold the masquerade ports towards \
             the backends for the UDP timeout (30 s), and new flows find none: in the last \
             of {SUSTAINED} windows of {:.1} s sent back to back without emptying, {}.\n",
            t.window.as_secs_f64(),
            t.sustained
                .iter()
                .map(|(path, pps)| format!("{} delivered {pps:.0} packets/s", path.name(shape)))
                .collect::<Vec<_>>()
                .join(" and ")
        );
    }
    match t.regime {
        Regime::Established => established_rows(sc, shape, t, report),
        Regime::NewFlows => new_flow_rows(sc, shape, t, report),
    }
    if !t.live.is_empty() {
        let _ = writeln!(
            s,
            "The agent's programs on path (b), from one more window with the kernel's \
             BPF run-time statistics on (they add two clock reads a run, so the \
             window above ran without):\n\n| program | runs | ns per run | runs per \
             frame sent | JIT image (bytes) |\n|---|---|---|---|---|"
        );
        for c in &t.live {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.2} | {} |",
                c.name, c.runs, c.ns_per_run, c.runs_per_packet, c.jited
            );
        }
        s.push('\n');
    }
    let gen = Stat::of(&t.delivered[0]);
    let fwd_rate = Stat::of(&t.delivered[1]);
    if let (Some(g), Some(f)) = (gen, fwd_rate) {
        let _ = writeln!(
            s,
            "Generator alone: {:.3} Mpps against {:.3} Mpps delivered through the \
             forwarder: the generator {} the bottleneck.\n",
            g.median / 1e6,
            f.median / 1e6,
            if g.median > f.median * 1.05 {
                "is not"
            } else {
                "may be"
            }
        );
    }
}

/// Figure 2's summary rows for the established-flow regime at one scale
/// and shape.
fn established_rows(sc: &Scale, shape: Shape, t: &Throughput, report: &mut Report) {
    let agent = &t.delivered[2];
    let ratio = |k: usize| Stat::ratio(agent, &t.delivered[k]);
    let (fwd, nft, ipt) = (ratio(1), ratio(3), ratio(4));
    let limit = Stat::ratio(&t.delivered[1], &t.delivered[3]);
    // The targets were set for the XDP-capable rig; the users' shape is
    // reported beside it.
    let big = sc.n >= 10_000 && shape == Shape::XdpPeer;
    let mut scale_note = if sc.n >= 10_000 {
        String::new()
    } else {
        format!(" (at {} Services)", sc.n)
    };
    let tag = match shape {
        Shape::XdpPeer => "",
        Shape::Plain => {
            scale_note.push_str(" (users' shape: generic forwarder, agent with default flags)");
            ", users' shape"
        }
    };
    if let Some(r) = fwd {
        let extra = Stat::of(
            &t.delivered[2]
                .iter()
                .zip(&t.delivered[1])
                .map(|(b, a)| 1e9 / b - 1e9 / a)
                .collect::<Vec<_>>(),
        );
        let ok = r.median >= 0.9;
        report.row(
            &format!("throughput b/a at {} Services{tag}", sc.n),
            r.show(2),
            if big { "≥ 0.9" } else { "-" },
            verdict(big, ok),
            if ok || shape == Shape::Plain {
                scale_note.clone()
            } else {
                format!(
                    "{:.0}% short{scale_note}: the agent adds {} ns per packet to the \
                     forwarder's chain: its whole NodePort path to a remote backend \
                     (frontend and conntrack lookups, SNAT and DNAT rewrite, FIB \
                     lookup, counters), which figure 1 cannot time (no FIB route in a \
                     test run)",
                    (0.9 - r.median) / 0.9 * 100.0,
                    show(extra, 1.0, 0)
                )
            },
        );
    }
    if let Some(r) = nft {
        let ok = r.median >= 5.0;
        report.row(
            &format!("throughput b/c at {} Services{tag}", sc.n),
            r.show(2),
            if big { "≥ 5" } else { "-" },
            verdict(big, ok),
            if ok || shape == Shape::Plain {
                scale_note.clone()
            } else {
                format!(
                    "{:.1}× short of 5×{scale_note}: even the forwarder reaches only \
                     {} × the nftables rate here (a/c), because every packet also pays \
                     for the generator, the veth hops and the sink, which no load \
                     balancer can save; and with established flows the rule set is \
                     consulted once per flow, so its size hardly matters",
                    5.0 / r.median,
                    show(limit, 1.0, 2)
                )
            },
        );
    }
    if let Some(r) = ipt {
        report.row(
            &format!("throughput b/d at {} Services{tag}", sc.n),
            r.show(2),
            "-",
            Verdict::Info,
            String::new(),
        );
    }
}

/// Figure 2's summary rows for the new-flow regime at one scale and shape:
/// the agent against the rule sets (the targets, at 10 000 Services in the
/// XDP-capable shape, as for the established regime) and the forwarder.
fn new_flow_rows(sc: &Scale, shape: Shape, t: &Throughput, report: &mut Report) {
    let agent = &t.delivered[2];
    let big = sc.n >= 10_000 && shape == Shape::XdpPeer;
    let tag = match shape {
        Shape::XdpPeer => "",
        Shape::Plain => ", users' shape",
    };
    // What the agent pays per packet above the forwarder: the new flow's
    // whole cost on the live path (figure 1 times it without the FIB).
    let extra = Stat::of(
        &agent
            .iter()
            .zip(&t.delivered[1])
            .map(|(b, a)| 1e9 / b - 1e9 / a)
            .collect::<Vec<_>>(),
    );
    let rows: [(usize, &str, Option<f64>); 3] = [
        (1, "b/a", None),
        (3, "b/c", Some(5.0)),
        (4, "b/d", Some(10.0)),
    ];
    for (k, name, target) in rows {
        let Some(r) = Stat::ratio(agent, &t.delivered[k]) else {
            continue;
        };
        let applies = big && target.is_some();
        let ok = target.is_none_or(|x| r.median >= x);
        let note = match (k, ok) {
            (1, _) => format!(
                "the agent adds {} ns per packet to the forwarder's chain when every packet \
                 is a new flow",
                show(extra, 1.0, 0)
            ),
            (_, true) => String::new(),
            (_, false) => format!(
                "{:.1}× short: the agent's new-flow path costs {} ns per packet above the \
                 forwarder (Maglev pick, conntrack inserts in both directions, SNAT port \
                 claim: figure 1's stage breakdown)",
                target.unwrap_or(1.0) / r.median,
                show(extra, 1.0, 0)
            ),
        };
        report.row(
            &format!("new-flow regime {name} at {} Services{tag}", sc.n),
            r.show(2),
            &match (applies, target) {
                (true, Some(x)) => format!("≥ {x}"),
                _ => "-".to_string(),
            },
            verdict(applies, ok),
            note,
        );
    }
}

fn report_connections(p: &Params, scales: &[Scale], report: &mut Report) {
    let mut s = String::from("## Figure 3: connection rate and request latency\n\n");
    let _ = writeln!(
        s,
        "Method: the rigs of figure 2, in the XDP-capable shape (measured before the \
         switch to the users' shape; the agent's XDP program sees only the replies, \
         which it passes to the stack in either mode). A client pod on each \
         contender's node connects to \
         the measured TCP ClusterIP (two endpoints, the pods of node-b), or for 'direct' \
         from node-e's pod straight to a backend pod; then the same from each node's own \
         network namespace (the agent's node translates at connect time with its socket \
         hooks; kube-proxy's rule sets DNAT in their output chains and masquerade); one \
         connection at a time: connect, \
         a {MSG}-byte request, the {MSG}-byte response, and the close the server starts \
         (so the client can reuse ports). Servers: one thread per backend pod, answering \
         in turn. Connections per second over {:.1} s per contender per run, in turn; \
         request/response time: from writing the request to reading the whole response, \
         p50 and p99 within each run. {} runs; median [min–max] over runs; ratios per \
         run.\n",
        p.conn_window.as_secs_f64(),
        p.runs
    );
    for sc in scales {
        let Some(c) = &sc.conns else { continue };
        let _ = writeln!(
            s,
            "### {} Services\n\n| path | connections/s | vs direct | req/resp p50 (µs) | req/resp p99 (µs) | failed |\n|---|---|---|---|---|---|",
            sc.n
        );
        for (k, conn) in CONNS.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                conn.name(),
                show(Stat::of(&c.rate[k]), 1.0, 0),
                show(Stat::ratio(&c.rate[k], &c.rate[conn.baseline()]), 1.0, 2),
                show(Stat::of(&c.p50_us[k]), 1.0, 1),
                show(Stat::of(&c.p99_us[k]), 1.0, 1),
                c.errors[k],
            );
        }
        s.push('\n');
        if let Some(r) = Stat::ratio(&c.rate[1], &c.rate[2]) {
            report.row(
                &format!("connections/s lb / nftables at {} Services", sc.n),
                r.show(2),
                "-",
                Verdict::Info,
                format!(
                    "per s: lb {}, nftables {}, direct {}",
                    show(Stat::of(&c.rate[1]), 1.0, 0),
                    show(Stat::of(&c.rate[2]), 1.0, 0),
                    show(Stat::of(&c.rate[0]), 1.0, 0)
                ),
            );
        }
        if let Some(r) = Stat::ratio(&c.rate[5], &c.rate[6]) {
            report.row(
                &format!("node connections/s lb / nftables at {} Services", sc.n),
                r.show(2),
                "-",
                Verdict::Info,
                format!(
                    "per s from the node: lb (socket hooks) {}, nftables {}, direct {}",
                    show(Stat::of(&c.rate[5]), 1.0, 0),
                    show(Stat::of(&c.rate[6]), 1.0, 0),
                    show(Stat::of(&c.rate[4]), 1.0, 0)
                ),
            );
        }
        if let Some(r) = Stat::ratio(&c.p99_us[1], &c.p99_us[0]) {
            report.row(
                &format!("req/resp p99 lb / direct at {} Services", sc.n),
                r.show(2),
                "-",
                Verdict::Info,
                format!(
                    "µs: lb {}, nftables {}, direct {}",
                    show(Stat::of(&c.p99_us[1]), 1.0, 1),
                    show(Stat::of(&c.p99_us[2]), 1.0, 1),
                    show(Stat::of(&c.p99_us[0]), 1.0, 1)
                ),
            );
        }
        let failed: usize = c.errors.iter().sum();
        if failed > 0 {
            report.failed(
                &format!("figure 3 at {} Services", sc.n),
                &format!("{failed} connection(s) failed (see the table)"),
            );
        }
    }
    report.sections.push(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_services_sit_in_the_middle_with_the_pods() {
        let pods = [Ipv4Addr::new(10, 244, 2, 10), Ipv4Addr::new(10, 244, 2, 11)];
        let (svcs, udp, tcp) = services(10_000, &pods);
        assert_eq!((svcs.len(), udp, tcp), (10_000, 5000, 5001));
        assert_eq!(svcs[udp].endpoints, pods);
        assert_eq!((svcs[tcp].proto, svcs[tcp].node_port), ("tcp", None));
        assert_eq!(svcs[9999].node_port, Some(29999));
        assert_eq!(svcs[9999].endpoints.len(), ENDPOINTS);
        // 10.96.0.1 is the API server's own: they start at 10.96.0.2.
        assert_eq!(svcs[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 2));
        assert_eq!(svcs[9999].cluster_ip, Ipv4Addr::new(10, 96, 39, 17));
    }
}
