//! Figures 2 and 3 in the namespace rig: UDP throughput through a NodePort
//! and TCP connections through a ClusterIP, for this project's agent,
//! kube-proxy's nftables and iptables rule sets, a MAC-rewriting XDP
//! forwarder (the machine's limit) and a direct connection.
//!
//! One rig per scale, with a node per contender so that nothing is torn
//! down between runs: node-a runs the agent, node-c holds the nftables rule
//! set, node-d the iptables one, node-e the forwarder; node-b holds the
//! backends. All are the same kind of veth on the same bridge.

use std::{
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
};

use crate::{
    kubeproxy::{self, Svc},
    report::{Report, Verdict},
    stats::{quantile, Stat},
    xdp::{self, Prog},
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
    fn name(self) -> &'static str {
        match self {
            Path::Generator => "generator alone (dropped at the first hop)",
            Path::Forwarder => "(a) XDP forwarder (MAC rewrite + XDP_TX)",
            Path::Agent => "(b) lb agent",
            Path::Nft => "(c) kube-proxy nftables rules",
            Path::Iptables => "(d) kube-proxy iptables rules",
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

/// The contenders of figure 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conn {
    Direct,
    Agent,
    Nft,
    Iptables,
}

const CONNS: [Conn; 4] = [Conn::Direct, Conn::Agent, Conn::Nft, Conn::Iptables];

impl Conn {
    fn name(self) -> &'static str {
        match self {
            Conn::Direct => "direct to the backend (no load balancer)",
            Conn::Agent => "lb agent",
            Conn::Nft => "kube-proxy nftables rules",
            Conn::Iptables => "kube-proxy iptables rules",
        }
    }

    /// The client pod: one on each contender's node.
    fn pod(self) -> &'static str {
        match self {
            Conn::Direct => "e0",
            Conn::Agent => "a0",
            Conn::Nft => "c0",
            Conn::Iptables => "d0",
        }
    }
}

/// Figure 2 at one scale: per contender, per run, packets per second sent
/// and delivered.
struct Throughput {
    sent: Vec<Vec<f64>>,
    delivered: Vec<Vec<f64>>,
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
    thru: Option<Throughput>,
    conns: Option<Connections>,
}

/// Points for the plots: per figure, per contender, (Services, median).
pub struct Results {
    /// Figure 2: delivered Mpps.
    pub throughput: Vec<(String, Vec<(f64, f64)>)>,
    /// Figure 3: connections per second.
    pub connections: Vec<(String, Vec<(f64, f64)>)>,
}

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8)
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
    _links: Vec<xdp::Link>,
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
                // The fabric ports get the wire instead (below).
                xdp_far_side: false,
                ..ClusterSpec::default()
            }
            .tag("thru"),
        );
        cluster.add_pod_to("b", 1);
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

        // The rule sets load while the agent starts: each loader is one
        // process of its own, and 10 000 Services take them a minute.
        let dir = cluster.dir().to_path_buf();
        let c_ns = cluster.node("c").ns.clone();
        let d_ns = cluster.node("d").ns.clone();
        let (nft, ipt) = (kubeproxy::nft(&svcs), kubeproxy::iptables(&svcs));
        let (nft_s, ipt_s, agent_s) = std::thread::scope(|scope| {
            let nft = scope.spawn(|| {
                timed(|| {
                    for (k, tx) in nft.iter().enumerate() {
                        let file = dir.join(format!("kube-proxy-{k:03}.nft"));
                        std::fs::write(&file, tx).expect("write the nftables rules");
                        sh(Some(&c_ns), &["nft", "-f", &file.to_string_lossy()]);
                    }
                })
            });
            let ipt = scope.spawn(|| {
                timed(|| {
                    let file = dir.join("kube-proxy.iptables");
                    std::fs::write(&file, &ipt).expect("write the iptables rules");
                    sh(Some(&d_ns), &["iptables-restore", &file.to_string_lossy()]);
                })
            });
            let mut writes = 0;
            let agent = timed(|| writes = start_agent(&mut cluster, svcs.len()));
            let join = |h: std::thread::ScopedJoinHandle<'_, Duration>| {
                h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
            };
            (join(nft), join(ipt), (agent, writes))
        });
        let (agent_s, writes) = agent_s;
        let version = sh(None, &["iptables-restore", "--version"]);
        let _ = write!(
            setup,
            "agent ready in {:.1} s (maps seeded, then started; its first sync wrote {writes} \
             entries); in parallel, nftables rules loaded in {:.1} s ({} transactions), \
             iptables rules in {:.1} s ({})",
            agent_s.as_secs_f64(),
            nft_s.as_secs_f64(),
            nft.len(),
            ipt_s.as_secs_f64(),
            version.trim()
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

        let mut links = Vec::new();
        let sink = Prog::load("bench_sink", &xdp::sink(MAGIC)).expect("load the sink");
        for ns in [b_ns.clone(), cluster.client_ns()] {
            let link = in_ns(&ns, || {
                sink.attach(programs::ifindex("eth0")?).map_err(Into::into)
            })
            .unwrap_or_else(|e: anyhow::Error| panic!("attach the sink in {ns}: {e:#}"));
            links.push(link);
        }
        // The way back from the nodes to node-b is a wire, not the bridge:
        // the generator's frames are redirected from the node's fabric port
        // straight to node-b's, as frames without a socket buffer, so that
        // the figure is the node's cost and not the bridge's. Everything
        // else takes the bridge. Like the rig's pass-only program, it also
        // makes every fabric port take XDP_TX frames promptly.
        let fabric = cluster.fabric_ns();
        let ports = ["client", "na", "nb", "nc", "nd", "ne"];
        let wired = in_ns(&fabric, || -> anyhow::Result<Vec<xdp::Link>> {
            let wire = Prog::load("bench_wire", &xdp::wire(MAGIC, programs::ifindex("nb")?))
                .map_err(anyhow::Error::msg)?;
            let mut links = Vec::new();
            for port in ports {
                links.push(wire.attach(programs::ifindex(port)?)?);
            }
            Ok(links)
        })
        .unwrap_or_else(|e| panic!("attach the wire in the fabric: {e:#}"));
        links.extend(wired);
        let e_ns = cluster.node("e").ns.clone();
        let fwd = Prog::load("bench_fwd", &xdp::forwarder(b_mac, mac(&e_ns, "eth0")))
            .expect("load the forwarder");
        let link = in_ns(&e_ns, || {
            fwd.attach(programs::ifindex("eth0")?).map_err(Into::into)
        })
        .unwrap_or_else(|e: anyhow::Error| panic!("attach the forwarder: {e:#}"));
        links.push(link);

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
            _links: links,
            _udp_servers: udp_servers,
            _tcp_servers: tcp_servers,
            setup,
        };
        rig.check_paths();
        rig
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
            let ns = self.cluster.pod(c.pod()).ns.clone();
            let dst = self.conn_target(c);
            in_ns(&ns, || request(dst, Duration::from_secs(2)))
                .unwrap_or_else(|e| panic!("{} from {}: {dst}: {e}", c.name(), c.pod()));
        }
    }

    fn conn_target(&self, c: Conn) -> SocketAddr {
        match c {
            Conn::Direct => SocketAddr::new(self.cluster.pod("b0").addr.into(), TARGET),
            _ => SocketAddr::new(self.svcs[self.tcp].cluster_ip.into(), 80),
        }
    }

    /// The generator's frame for `path`: to the measured NodePort on the
    /// node's address and MAC.
    fn frame(&self, path: Path) -> (String, Vec<u8>) {
        let (port, ns, addr) = match path.node() {
            Some(l) => (
                format!("n{l}"),
                self.cluster.node(l).ns.clone(),
                Self::node_addr(l),
            ),
            None => (
                "client".to_string(),
                self.cluster.client_ns(),
                Ipv4Addr::new(10, 99, 0, 100),
            ),
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
        match path {
            Path::Generator => self.cluster.client_ns(),
            _ => self.cluster.node("b").ns.clone(),
        }
    }

    /// Sends for `window` along `path`: packets per second sent and
    /// delivered.
    fn blast(&self, path: Path, window: Duration) -> (f64, f64) {
        let (port, frame) = self.frame(path);
        let sink = self.sink_ns(path);
        let before = sink_count(&sink);
        let headers = frame[..xdp::HEADERS].try_into().expect("a whole frame");
        let gen = Prog::load("bench_gen", &xdp::generator(headers, SPORT_BASE, FLOWS))
            .expect("load the generator");
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

        let secs = took.as_secs_f64();
        (frames as f64 / secs, delivered as f64 / secs)
    }
}

/// Starts the agent on node-a with every Service. Its maps are seeded
/// first, through the agent's own translation and reconciler with the
/// Maglev tables written in batches: a cold start writes each table with
/// its own outer-map update, which waits for an RCU grace period, and takes
/// minutes at 10 000 Services (figure 4). The agent adopts the pinned maps
/// as after a restart, finds every table right and writes none. Returns
/// the writes of its first sync, as it logged them.
fn start_agent(cluster: &mut Cluster, n: usize) -> u64 {
    let bpffs = cluster.node("a").bpffs();
    bpffs::ensure(&bpffs).expect("mount node-a's bpffs");
    let sizes = MapSizes {
        services: (2 * n + 1024).next_power_of_two() as u32,
        backends: (n * ENDPOINTS + 1024).next_power_of_two() as u32,
        ..MapSizes::default()
    };
    {
        let _progs =
            Programs::load(&bpffs, sizes, XdpPolicy::Auto).expect("load node-a's programs");
        let mut maps = Maps::open(&bpffs).expect("open node-a's maps");
        let objects = manifests::load_dir(&cluster.manifests_dir()).expect("read the manifests");
        let node = NodeInfo {
            name: "node-a".into(),
            addresses: vec![IpAddr::V4(Rig::node_addr("a"))],
        };
        let (model, problems) = model::build(&objects.services, &objects.slices, &node);
        assert!(problems.is_empty(), "bad bench manifests: {problems:?}");
        let mut reconciler = Reconciler::new(TABLE_SIZE);
        // The reconciler writes the tables in batches before the frontends.
        let report = reconciler.apply(&model, &mut maps);
        assert!(report.failures.is_empty(), "seeding failed: {report:?}");
    }
    let (svc_size, be_size) = (sizes.services.to_string(), sizes.backends.to_string());
    let node = cluster.node_mut("a");
    node.start_agent(&[
        "--maglev-table-size",
        &TABLE_SIZE.to_string(),
        "--services-size",
        &svc_size,
        "--backends-size",
        &be_size,
    ]);
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

fn run_scale(p: &Params, n: usize) -> Scale {
    eprintln!("bench: figures 2/3: rig with {n} Services");
    let rig = Rig::new(n);
    eprintln!("bench: figures 2/3: {}", rig.setup);
    let thru = p.fig2.then(|| {
        let mut t = Throughput {
            sent: vec![Vec::new(); PATHS.len()],
            delivered: vec![Vec::new(); PATHS.len()],
        };
        // Conntrack entries of every flow exist before the first run.
        for path in PATHS {
            rig.blast(path, Duration::from_millis(50));
        }
        for run in 0..p.runs {
            for (k, path) in PATHS.iter().enumerate() {
                let (sent, delivered) = rig.blast(*path, p.window);
                t.sent[k].push(sent);
                t.delivered[k].push(delivered);
            }
            eprintln!(
                "bench: figure 2: {n} Services, run {run}: {}",
                t.delivered
                    .iter()
                    .map(|d| format!("{:.0}", d[run]))
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
        }
        t
    });
    let conns = p.fig3.then(|| {
        let mut c = Connections {
            rate: vec![Vec::new(); CONNS.len()],
            p50_us: vec![Vec::new(); CONNS.len()],
            p99_us: vec![Vec::new(); CONNS.len()],
            errors: vec![0; CONNS.len()],
        };
        for run in 0..p.runs {
            for (k, conn) in CONNS.iter().enumerate() {
                let ns = rig.cluster.pod(conn.pod()).ns.clone();
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
        for (k, path) in PATHS.iter().enumerate() {
            let points = scales
                .iter()
                .filter_map(|s| {
                    let t = s.thru.as_ref()?;
                    Some((s.n as f64, Stat::of(&t.delivered[k])?.median / 1e6))
                })
                .collect();
            results.throughput.push((path.name().to_string(), points));
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
            results.connections.push((conn.name().to_string(), points));
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
         so nothing is torn down between runs: node-a runs the agent; node-c holds the \
         nftables rule set kube-proxy's nftables mode would program for the same Services \
         (table `kube-proxy`: verdict maps on address, protocol and port, a chain per \
         Service and per endpoint, `numgen random`, DNAT, masquerade by mark); node-d the \
         iptables one (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-* with `statistic` \
         probabilities, KUBE-MARK-MASQ, KUBE-POSTROUTING); both generated from the Service \
         list the agent reads and loaded with `nft -f` and `iptables-restore`; node-e runs \
         the forwarder, an XDP program that only writes node-b's MAC and its own and sends \
         the frame back out (XDP_TX): the limit of this machine. Services: UDP NodePorts \
         with {ENDPOINTS} endpoints each; the measured one is in the middle of the list, \
         with the two pods of node-b as endpoints. Before measuring, every load balancer \
         answers a real datagram through the measured NodePort from a backend. The agent's \
         maps are seeded with its own translation and reconciler (tables written in \
         batches) before it starts, because a cold start writes every table with an RCU \
         grace period of its own (minutes at 10 000 Services, figure 4); it adopts them as \
         after a restart and rewrites nothing. Generator: BPF_PROG_TEST_RUN in live-frames \
         mode (as xdp-trafficgen), run in the fabric namespace on the node's port, so \
         frames go straight onto the node's eth0 as from a NIC: 60-byte UDP frames to the \
         NodePort from {FLOWS} source ports chosen at random per frame (the flows exist \
         before the first run, so conntrack and the agent see established flows, and the \
         rule sets' NAT chains only a flow's first packet), one thread, batches of 64. On \
         the way out, the node's fabric port hands the generator's frames straight to \
         node-b's port (an XDP redirect: a wire, so that the bridge's cost does not drown \
         the nodes'); an XDP sink on node-b's eth0 counts and drops them (veth \
         `xdp_drops`): delivered packets per second of the generator's time. Everything \
         runs on the generator's CPU in one softirq chain (generator, node, wire, sink), \
         so a rate is the inverse of the whole chain's cost per packet, and 'ns per \
         packet' differences between rows are the differences in the nodes' work. \
         'Generator alone': its frames dropped by the same sink on the first hop (the \
         client's eth0); above the forwarder's rate, the generator is not the bottleneck. \
         {} runs of {:.1} s per contender, in turn; ratios are per run.\n",
        p.runs,
        p.window.as_secs_f64()
    );
    for sc in scales {
        let Some(t) = &sc.thru else { continue };
        let agent = &t.delivered[2];
        let _ = writeln!(
            s,
            "### {} Services\n\nSet-up: {}.\n\n| path | delivered (Mpps) | sent (Mpps) | ns per packet | b / this |\n|---|---|---|---|---|",
            sc.n, sc.setup
        );
        for (k, path) in PATHS.iter().enumerate() {
            let ns: Vec<f64> = t.delivered[k].iter().map(|d| 1e9 / d).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                path.name(),
                show(Stat::of(&t.delivered[k]), 1e-6, 3),
                show(Stat::of(&t.sent[k]), 1e-6, 3),
                show(Stat::of(&ns), 1.0, 0),
                show(Stat::ratio(agent, &t.delivered[k]), 1.0, 2),
            );
        }
        s.push('\n');
        let ratio = |k: usize| Stat::ratio(agent, &t.delivered[k]);
        let (fwd, nft, ipt) = (ratio(1), ratio(3), ratio(4));
        let limit = Stat::ratio(&t.delivered[1], &t.delivered[3]);
        let big = sc.n >= 10_000;
        let scale_note = if big {
            String::new()
        } else {
            format!(" (at {} Services)", sc.n)
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
                &format!("throughput b/a at {} Services", sc.n),
                r.show(2),
                if big { "≥ 0.9" } else { "-" },
                verdict(big, ok),
                if ok {
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
                &format!("throughput b/c at {} Services", sc.n),
                r.show(2),
                if big { "≥ 5" } else { "-" },
                verdict(big, ok),
                if ok {
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
                &format!("throughput b/d at {} Services", sc.n),
                r.show(2),
                "-",
                Verdict::Info,
                String::new(),
            );
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
    report.sections.push(s);
}

fn report_connections(p: &Params, scales: &[Scale], report: &mut Report) {
    let mut s = String::from("## Figure 3: connection rate and request latency\n\n");
    let _ = writeln!(
        s,
        "Method: the rigs of figure 2. A client pod on each contender's node connects to \
         the measured TCP ClusterIP (two endpoints, the pods of node-b), or for 'direct' \
         from node-e's pod straight to a backend pod; one connection at a time: connect, \
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
                show(Stat::ratio(&c.rate[k], &c.rate[0]), 1.0, 2),
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
        assert_eq!(svcs[9999].cluster_ip, Ipv4Addr::new(10, 96, 39, 15));
    }
}
