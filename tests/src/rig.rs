//! A cluster of network namespaces: a fabric bridge, an external client,
//! nodes with an `eth0` on the bridge, and pods behind veth pairs on each
//! node (docs/architecture.md, The test rig).
//!
//! A node's `eth0` is a veth whose far side, a port of the bridge, runs
//! nothing, as on kind, k3d or any container node: that is where users'
//! nodes differ from a NIC (a veth delivers native XDP_TX frames only to a
//! peer that runs XDP), so the tests run in that shape.
//! [`ClusterSpec::xdp_far_side`] gives the ports an XDP program instead,
//! for the tests that compare the two.
//!
//! Every name carries a unique prefix so tests run in parallel; nothing is
//! created in the root network namespace, and everything is removed on drop,
//! also when a test panics. Addresses are fixed because each cluster has
//! namespaces of its own:
//!
//! | what | IPv4 | IPv6 |
//! | --- | --- | --- |
//! | client `eth0` | 10.99.0.100/24 | fd00:99::100/64 |
//! | node-a, node-b `eth0` | 10.99.0.1/24, 10.99.0.2/24 | fd00:99::1/64, fd00:99::2/64 |
//! | pods on node-a, node-b | 10.244.1.10+j, 10.244.2.10+j (/32, gateway .1) | fd00:244:1::10+j, fd00:244:2::10+j (/128, gateway ::1) |
//!
//! Every cluster is dual-stack: each namespace has both families (IPv6
//! from fd00::/8, the unique local range, so nothing is routable outside;
//! `nodad`, so no address waits for duplicate detection), nodes forward
//! both, and each node routes the other nodes' pod prefixes of both
//! families. IPv6 pod addresses count `j` in hex digits spelled like the
//! IPv4 ones (`fd00:244:1::10` is pod `a0`), so a test reads them alike.

use std::{
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{setns, CloneFlags};

/// Shape of a cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Number of nodes (node-a, node-b, …).
    pub nodes: usize,
    /// Pods per node.
    pub pods_per_node: usize,
    /// Short tag in every name, so `ip netns list` shows which test made what.
    pub tag: String,
    /// The agent binary; `None` means [`agent_bin`].
    pub agent_bin: Option<PathBuf>,
    /// Whether the far side of every node's `eth0` (its port on the
    /// fabric bridge) runs an XDP program (pass-only): an XDP-capable far
    /// side, which takes the frames a node sends with native XDP_TX at
    /// once. Users' nodes never have one, hence the default `false`.
    pub xdp_far_side: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 2,
            tag: String::new(),
            agent_bin: None,
            xdp_far_side: false,
        }
    }
}

impl ClusterSpec {
    /// Sets the tag; kept to 8 characters of `[a-z0-9]` so names stay short.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .take(8)
            .collect();
        self
    }

    /// Uses another agent binary for this cluster only (an env var would
    /// leak into tests running in parallel).
    pub fn agent_bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.agent_bin = Some(bin.into());
        self
    }
}

/// A pod: a namespace behind a veth pair on its node.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Short name (`a0`, `b1`): node letter and index.
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address.
    pub addr: Ipv4Addr,
    /// Its IPv6 address.
    pub addr6: Ipv6Addr,
    /// Its node's name (`node-a`).
    pub node: String,
}

impl Pod {
    /// Its address of the family of `v6`'s choosing.
    pub fn addr_of(&self, v6: bool) -> IpAddr {
        if v6 {
            self.addr6.into()
        } else {
            self.addr.into()
        }
    }
}

/// A node: a namespace with `eth0` on the fabric and the pods' host ends.
pub struct Node {
    /// Name as agents and EndpointSlices spell it (`node-a`).
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the fabric.
    pub addr: Ipv4Addr,
    /// Its IPv6 address on the fabric.
    pub addr6: Ipv6Addr,
    /// The CIDR its pods' addresses come from (`10.244.1.0/24`).
    pub pod_cidr: String,
    /// The prefix its pods' IPv6 addresses come from (`fd00:244:1::/64`).
    pub pod_cidr6: String,
    dir: PathBuf,
    manifests: PathBuf,
    bin: PathBuf,
    agent: Option<Child>,
    ready_lines: usize,
}

/// The path of the agent binary under test.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("LB_AGENT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb-agent"),
        PathBuf::from,
    )
}

/// The line the agent logs once its first full sync is done.
const READY: &str = "lb-agent ready";

impl Node {
    /// The agent's bpffs directory.
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// Starts the agent under `ip netns exec` on the cluster's manifests
    /// folder, appending to its log.
    pub fn start_agent(&mut self, extra: &[&str]) {
        let manifests = self.manifests.clone();
        self.spawn_agent(&["--manifests".as_ref(), manifests.as_os_str()], extra);
    }

    /// Starts the agent on the Kubernetes API that `kubeconfig` points at.
    pub fn start_agent_api(&mut self, kubeconfig: &Path, extra: &[&str]) {
        self.spawn_agent(&["--kubeconfig".as_ref(), kubeconfig.as_os_str()], extra);
    }

    fn spawn_agent(&mut self, source: &[&std::ffi::OsStr], extra: &[&str]) {
        assert!(self.agent.is_none(), "{}: agent already running", self.name);
        self.ready_lines = self.agent_log().matches(READY).count();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open agent log");
        let bin = &self.bin;
        assert!(
            bin.exists(),
            "no agent binary at {} (build it or set LB_AGENT_BIN)",
            bin.display()
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(bin)
            .args([
                "run",
                "--node-name",
                &self.name,
                "--iface",
                "eth0",
                "--pod-ifaces",
                "lxc*",
            ])
            .args(source)
            .arg("--bpffs")
            .arg(self.bpffs())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.agent = Some(child);
    }

    /// Waits until the agent started last has logged its first full sync,
    /// for `timeout` but never less than [`AGENT_START`].
    pub fn wait_agent_ready(&self, timeout: Duration) {
        let timeout = patience(timeout.max(AGENT_START));
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.agent_log();
            if log.matches(READY).count() > self.ready_lines {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: agent not ready after {timeout:?}:\n{log}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many reconciliations the agent has logged.
    pub fn syncs(&self) -> usize {
        self.agent_log().matches("synced services=").count()
    }

    /// Waits until the agent has logged more than `before` reconciliations.
    pub fn wait_synced(&self, before: usize, timeout: Duration) {
        wait_until(
            timeout,
            &format!("{} reconciles a change", self.name),
            || self.syncs() > before,
        );
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop_agent(&mut self) {
        self.signal_agent(nix::sys::signal::Signal::SIGTERM);
    }

    /// Kills the agent with SIGKILL and waits for it.
    pub fn kill_agent(&mut self) {
        self.signal_agent(nix::sys::signal::Signal::SIGKILL);
    }

    fn signal_agent(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(mut child) = self.agent.take() {
            // `ip netns exec` execs the agent, so the child's pid is the agent's.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, sig);
            let _ = child.wait();
        }
    }

    /// The running agent's pid (`ip netns exec` execs it, so it is the child's).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Everything the agent has logged so far.
    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// A whole test cluster; dropping it removes every trace.
pub struct Cluster {
    prefix: String,
    root: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    namespaces: Vec<String>,
    /// Pass-only XDP on the fabric ports ([`ClusterSpec::xdp_far_side`]),
    /// held for the cluster's lifetime.
    fabric_xdp: Option<aya::Ebpf>,
    bin: PathBuf,
}

/// Runs a command (under `ip netns exec NS` when `ns` is given) and returns
/// its stdout; panics with stdout and stderr when it fails.
pub fn sh(ns: Option<&str>, args: &[&str]) -> String {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(args);
            c
        }
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    };
    let out = cmd.output().unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} in {ns:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ip -n NS ARGS…`.
fn ip(ns: &str, args: &str) {
    let mut all = vec!["ip", "-n", ns];
    all.extend(args.split_whitespace());
    sh(None, &all);
}

/// Sets a sysctl inside a namespace.
fn sysctl(ns: &str, key: &str, value: &str) {
    in_ns(ns, || {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        fs::write(&path, value).unwrap_or_else(|e| panic!("write {path} in {ns}: {e}"));
    });
}

/// Checksum offload off on a veth end (TOOLCHAIN.md: XDP cannot see a
/// partial checksum, so tests must carry full ones as real NICs do).
fn veth_offloads(ns: &str, ifname: &str) {
    sh(Some(ns), &["ethtool", "-K", ifname, "tx", "off"]);
}

fn node_letter(i: usize) -> char {
    (b'a' + i as u8) as char
}

/// Node `i`'s IPv6 address on the fabric (`fd00:99::1` for node-a).
fn node_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, hex_like(i + 1))
}

/// Pod `j` of node `i`'s IPv6 address (`fd00:244:1::10` for a0).
fn pod_addr6(i: usize, j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, hex_like(i + 1), 0, 0, 0, 0, hex_like(10 + j))
}

/// The group whose hex digits spell `n` in decimal (12 → 0x12), so IPv6
/// addresses read like their IPv4 twins; `n` below 10 000.
fn hex_like(n: usize) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("a number below 10 000")
}

impl Cluster {
    /// Node `node`'s datapath counter `name`, in packets (`lb-agent stats`).
    pub fn node_counter(&self, node: &str, name: &str) -> u64 {
        let stats = self.inspect(node, &["stats"]);
        stats
            .as_array()
            .or_else(|| stats["counters"].as_array())
            .and_then(|cs| cs.iter().find(|x| x["name"] == name))
            .and_then(|x| x["packets"].as_u64())
            .unwrap_or_else(|| panic!("no {name} counter in {stats}"))
    }

    /// Runs `lb-agent ARGS -o json --bpffs <node's>` and parses its output.
    pub fn inspect(&self, node: &str, args: &[&str]) -> serde_json::Value {
        let out = std::process::Command::new(agent_bin())
            .args(args)
            .args(["-o", "json", "--bpffs"])
            .arg(self.node(node).bpffs())
            .output()
            .expect("run lb-agent");
        assert!(
            out.status.success(),
            "lb-agent {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("lb-agent {args:?} printed no JSON: {e}"))
    }

    /// Builds the cluster; panics with the failing command's output.
    pub fn new(spec: ClusterSpec) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(
            (1..=26).contains(&spec.nodes) && spec.pods_per_node <= 200,
            "unsupported cluster shape {spec:?}"
        );
        // The whole pid, not a part of it: test binaries of other crates or
        // other engineers may run at the same time, and netns names are global.
        let mut prefix = format!(
            "lb{:x}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        if !spec.tag.is_empty() {
            prefix = format!("{prefix}-{}", spec.tag);
        }
        let root = PathBuf::from("/run/lb-tests").join(&prefix);
        let mut c = Self {
            prefix,
            root,
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            fabric_xdp: None,
            bin: spec.agent_bin.clone().unwrap_or_else(agent_bin),
        };
        // Drop cleans up whatever was made before a failure.
        c.build(&spec);
        c
    }

    fn add_ns(&mut self, suffix: &str) -> String {
        let ns = format!("{}-{suffix}", self.prefix);
        sh(None, &["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&ns, "link set lo up");
        ns
    }

    fn build(&mut self, spec: &ClusterSpec) {
        fs::create_dir_all(self.root.join("manifests")).expect("create rig directory");
        let fabric = self.add_ns("fabric");
        ip(&fabric, "link add br0 type bridge");
        ip(&fabric, "link set br0 up");
        let client = self.add_ns("client");
        self.plug(&client, "10.99.0.100/24", "fd00:99::100/64", "client");

        for i in 0..spec.nodes {
            let letter = node_letter(i);
            let name = format!("node-{letter}");
            let ns = self.add_ns(&name);
            for key in [
                "net.ipv4.ip_forward",
                "net.ipv6.conf.all.forwarding",
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.default.rp_filter",
            ] {
                sysctl(
                    &ns,
                    key,
                    if key.ends_with("forward") || key.ends_with("forwarding") {
                        "1"
                    } else {
                        "0"
                    },
                );
            }
            let addr = Ipv4Addr::new(10, 99, 0, i as u8 + 1);
            let addr6 = node_addr6(i);
            self.plug(
                &ns,
                &format!("{addr}/24"),
                &format!("{addr6}/64"),
                &format!("n{letter}"),
            );
            sysctl(&ns, "net.ipv4.conf.eth0.rp_filter", "0");
            let dir = self.root.join(&name);
            fs::create_dir_all(dir.join("bpffs")).expect("create node directory");
            self.nodes.push(Node {
                name: name.clone(),
                ns: ns.clone(),
                addr,
                addr6,
                pod_cidr: format!("10.244.{}.0/24", i + 1),
                pod_cidr6: format!("fd00:244:{}::/64", i + 1),
                dir,
                manifests: self.root.join("manifests"),
                bin: self.bin.clone(),
                agent: None,
                ready_lines: 0,
            });
            for j in 0..spec.pods_per_node {
                self.add_pod(i, j);
            }
        }
        if !spec.xdp_far_side {
            return self.route_pod_cidrs(spec);
        }
        let ports: Vec<String> = (0..spec.nodes)
            .map(|i| format!("n{}", node_letter(i)))
            .collect();
        let ebpf = in_ns(&fabric, || {
            let names: Vec<&str> = ports.iter().map(String::as_str).collect();
            lb_agent::datapath::programs::attach_xdp_pass(&names)
        })
        .unwrap_or_else(|e| panic!("attach XDP pass on the fabric: {e:#}"));
        self.fabric_xdp = Some(ebpf);
        self.route_pod_cidrs(spec);
    }

    /// Each node routes the other nodes' pod CIDRs through them.
    fn route_pod_cidrs(&mut self, spec: &ClusterSpec) {
        for i in 0..spec.nodes {
            for k in 0..spec.nodes {
                if i != k {
                    let ns = self.nodes[i].ns.clone();
                    ip(
                        &ns,
                        &format!("route add 10.244.{}.0/24 via 10.99.0.{}", k + 1, k + 1),
                    );
                    ip(
                        &ns,
                        &format!("-6 route add fd00:244:{}::/64 via {}", k + 1, node_addr6(k)),
                    );
                }
            }
        }
    }

    /// Connects `ns`'s new `eth0` to the fabric bridge, with an address
    /// of each family.
    fn plug(&mut self, ns: &str, cidr: &str, cidr6: &str, port: &str) {
        let fabric = self.fabric_ns();
        sh(
            None,
            &[
                "ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
                "netns", &fabric,
            ],
        );
        ip(&fabric, &format!("link set {port} master br0 up"));
        veth_offloads(&fabric, port);
        ip(ns, &format!("addr add {cidr} dev eth0"));
        ip(ns, &format!("-6 addr add {cidr6} dev eth0 nodad"));
        ip(ns, "link set eth0 up");
        veth_offloads(ns, "eth0");
    }

    /// Adds a pod to a running cluster (node letter, index), as a scheduler
    /// would; returns its short name.
    pub fn add_pod_to(&mut self, letter: &str, j: usize) -> String {
        let node = self
            .nodes
            .iter()
            .position(|n| n.name == format!("node-{letter}"))
            .expect("node");
        self.add_pod(node, j);
        self.pods.last().map(|p| p.name.clone()).unwrap_or_default()
    }

    /// Deletes a pod's namespace, and with it the veth pair.
    pub fn delete_pod(&mut self, name: &str) {
        let pod = self.pods.iter().position(|p| p.name == name).expect("pod");
        let ns = self.pods.remove(pod).ns;
        sh(None, &["ip", "netns", "del", &ns]);
        self.namespaces.retain(|n| *n != ns);
    }

    fn add_pod(&mut self, node: usize, j: usize) {
        let letter = node_letter(node);
        let name = format!("{letter}{j}");
        let ns = self.add_ns(&format!("pod-{name}"));
        let node_ns = self.nodes[node].ns.clone();
        let gw = format!("10.244.{}.1", node + 1);
        let addr = Ipv4Addr::new(10, 244, node as u8 + 1, 10 + j as u8);
        let gw6 = format!("fd00:244:{}::1", node + 1);
        let addr6 = pod_addr6(node, j);
        let host = format!("lxc{j}");
        sh(
            None,
            &[
                "ip", "link", "add", &host, "netns", &node_ns, "type", "veth", "peer", "name",
                "eth0", "netns", &ns,
            ],
        );
        ip(&node_ns, &format!("addr add {gw}/32 dev {host}"));
        ip(&node_ns, &format!("link set {host} up"));
        ip(&node_ns, &format!("route add {addr}/32 dev {host}"));
        ip(&node_ns, &format!("-6 addr add {gw6}/128 dev {host} nodad"));
        ip(&node_ns, &format!("-6 route add {addr6}/128 dev {host}"));
        sysctl(&node_ns, &format!("net.ipv4.conf.{host}.rp_filter"), "0");
        veth_offloads(&node_ns, &host);
        ip(&ns, &format!("addr add {addr}/32 dev eth0"));
        ip(&ns, &format!("-6 addr add {addr6}/128 dev eth0 nodad"));
        ip(&ns, "link set eth0 up");
        ip(&ns, &format!("route add {gw} dev eth0 scope link"));
        ip(&ns, &format!("route add default via {gw}"));
        ip(&ns, &format!("-6 route add {gw6} dev eth0"));
        ip(&ns, &format!("-6 route add default via {gw6}"));
        veth_offloads(&ns, "eth0");
        self.pods.push(Pod {
            name,
            ns,
            addr,
            addr6,
            node: self.nodes[node].name.clone(),
        });
    }

    /// Gives node `letter` a second wire, as when a NIC is added: an `eth1`
    /// with `node_cidr`, whose far end is the `eth0` (with `client_cidr`)
    /// of a new client namespace, returned. Nothing else is on that wire.
    pub fn add_second_wire(&mut self, letter: &str, node_cidr: &str, client_cidr: &str) -> String {
        let node_ns = self.node(letter).ns.clone();
        let ns = self.add_ns(&format!("wire-{letter}"));
        sh(
            None,
            &[
                "ip", "link", "add", "eth1", "netns", &node_ns, "type", "veth", "peer", "name",
                "eth0", "netns", &ns,
            ],
        );
        sysctl(&node_ns, "net.ipv4.conf.eth1.rp_filter", "0");
        veth_offloads(&node_ns, "eth1");
        veth_offloads(&ns, "eth0");
        ip(&node_ns, &format!("addr add {node_cidr} dev eth1"));
        ip(&node_ns, "link set eth1 up");
        ip(&ns, &format!("addr add {client_cidr} dev eth0"));
        ip(&ns, "link set eth0 up");
        ns
    }

    /// Wires node `a` straight to node `b`, as a second network between
    /// them: an `eth1` in each, with `a_cidr` and `b_cidr`. Routes are the
    /// caller's.
    pub fn link_nodes(&mut self, a: &str, b: &str, a_cidr: &str, b_cidr: &str) {
        let (a_ns, b_ns) = (self.node(a).ns.clone(), self.node(b).ns.clone());
        sh(
            None,
            &[
                "ip", "link", "add", "eth1", "netns", &a_ns, "type", "veth", "peer", "name",
                "eth1", "netns", &b_ns,
            ],
        );
        for (ns, cidr) in [(&a_ns, a_cidr), (&b_ns, b_cidr)] {
            sysctl(ns, "net.ipv4.conf.eth1.rp_filter", "0");
            veth_offloads(ns, "eth1");
            ip(ns, &format!("addr add {cidr} dev eth1"));
            ip(ns, "link set eth1 up");
        }
    }

    /// The unique prefix of this cluster's names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The fabric bridge's namespace, which holds the fabric end of every
    /// `eth0` (`client`, `na`, `nb`, …).
    pub fn fabric_ns(&self) -> String {
        format!("{}-fabric", self.prefix)
    }

    /// The external client's namespace.
    pub fn client_ns(&self) -> String {
        format!("{}-client", self.prefix)
    }

    /// The node with this letter (`"a"`).
    pub fn node(&self, letter: &str) -> &Node {
        let name = format!("node-{letter}");
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    /// The node with this letter, to start or stop its agent.
    pub fn node_mut(&mut self, letter: &str) -> &mut Node {
        let name = format!("node-{letter}");
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    /// Every pod.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod with this short name (`"a0"`).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The pod with this address (of either family).
    pub fn pod_by_addr(&self, addr: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.addr.to_string() == addr || p.addr6.to_string() == addr)
            .unwrap_or_else(|| panic!("no pod at {addr}"))
    }

    /// The cluster's own directory under `/run/lb-tests`, removed on drop.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The folder every node's agent watches.
    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    /// Starts the agents of `nodes` (letters) on the manifests folder and
    /// waits until each has done its first full sync.
    pub fn start_agents(&mut self, nodes: &[&str], timeout: Duration) {
        for n in nodes {
            self.node_mut(n).start_agent(&[]);
        }
        for n in nodes {
            self.node(n).wait_agent_ready(timeout);
        }
    }

    /// Writes a manifest and waits until every running agent has
    /// reconciled it.
    pub fn update_manifest(&self, name: &str, body: &str, timeout: Duration) {
        let running: Vec<(&Node, usize)> = self
            .nodes
            .iter()
            .filter(|n| n.agent.is_some())
            .map(|n| (n, n.syncs()))
            .collect();
        self.write_manifest(name, body);
        for (node, before) in running {
            node.wait_synced(before, timeout);
        }
    }

    /// Writes a manifest file atomically (temp name, then rename), so an
    /// agent never reads half of it.
    pub fn write_manifest(&self, name: &str, body: &str) {
        let dir = self.manifests_dir();
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, body).expect("write manifest");
        fs::rename(&tmp, dir.join(name)).expect("rename manifest");
    }

    /// Removes a manifest file.
    pub fn remove_manifest(&self, name: &str) {
        fs::remove_file(self.manifests_dir().join(name)).expect("remove manifest");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill_agent();
            let bpffs = node.bpffs();
            let _ = Command::new(&node.bin)
                .args(["cleanup", "--bpffs"])
                .arg(&bpffs)
                .output();
            // An agent started more than once may have stacked mounts.
            for _ in 0..8 {
                if nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
        self.fabric_xdp = None;
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Runs `f` on a thread inside network namespace `ns` (setns is per thread;
/// sockets keep the namespace they were made in).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = Path::new("/var/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file =
                fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `GET path` over HTTP/1.1 to `addr` from inside network namespace `ns`,
/// reading until the server closes: (status code, body).
pub fn http_get(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    in_ns(ns, || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        Ok((status, body))
    })
}

/// The shortest wait for an agent's first full sync. Its start is mostly
/// the kernel verifying the programs, which takes seconds alone and several
/// times that when the suite starts many agents at once on a busy machine:
/// a scenario's own deadlines are for what it tests, not for that.
pub const AGENT_START: Duration = Duration::from_secs(60);

/// `timeout` stretched by `LB_TEST_SLOWDOWN` (a whole factor, 1 when unset):
/// under software emulation (`cargo xtask vm-test`) the verifier and the
/// agent's start take many times longer, while what the tests wait for is
/// the same.
pub fn patience(timeout: Duration) -> Duration {
    let factor = std::env::var("LB_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    timeout * factor
}

/// Polls `cond` until it holds, panicking with `what` after `timeout`
/// (stretched by [`patience`]).
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let timeout = patience(timeout);
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A background server that stops on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server: greets each connection with `"<name> <peer>\n"`, then
/// echoes until EOF.
pub struct TcpServer {
    _server: Server,
}

impl TcpServer {
    /// Listens on `bind` inside `ns`.
    pub fn start(ns: &str, bind: SocketAddr, name: &str) -> Self {
        let listener = in_ns(ns, || TcpListener::bind(bind))
            .unwrap_or_else(|e| panic!("bind {bind} in {ns}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let name = name.clone();
                        let flag = flag.clone();
                        std::thread::spawn(move || serve_tcp(conn, peer, &name, &flag));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            _server: Server {
                stop,
                thread: Some(thread),
            },
        }
    }
}

fn serve_tcp(mut conn: TcpStream, peer: SocketAddr, name: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    if conn
        .write_all(format!("{name} {peer}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A UDP server: answers each datagram with `"<name> <peer>\n"`.
pub struct UdpServer {
    _server: Server,
}

impl UdpServer {
    /// Binds `bind` inside `ns`.
    pub fn start(ns: &str, bind: SocketAddr, name: &str) -> Self {
        let sock = in_ns(ns, || UdpSocket::bind(bind))
            .unwrap_or_else(|e| panic!("bind {bind} in {ns}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(format!("{name} {peer}\n").as_bytes(), peer);
                }
            }
        });
        Self {
            _server: Server {
                stop,
                thread: Some(thread),
            },
        }
    }
}

/// Connects from `ns` to `dst` and returns the server's greeting line and
/// the address the client socket is connected to.
pub fn tcp_hello(ns: &str, dst: SocketAddr, timeout: Duration) -> io::Result<(String, SocketAddr)> {
    in_ns(ns, || {
        let s = TcpStream::connect_timeout(&dst, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let peer = s.peer_addr()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        if line.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the greeting",
            ));
        }
        Ok((line.trim_end().to_string(), peer))
    })
}

/// The wildcard address and port 0 of `dst`'s family: what a client
/// socket to `dst` binds.
pub fn unspecified_like(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    }
}

/// Sends one datagram from `ns` to `dst` on an unconnected socket and
/// returns the reply and the address it came from.
pub fn udp_hello(ns: &str, dst: SocketAddr, timeout: Duration) -> io::Result<(String, SocketAddr)> {
    in_ns(ns, || {
        let s = UdpSocket::bind(unspecified_like(dst))?;
        s.set_read_timeout(Some(timeout))?;
        s.send_to(b"hello", dst)?;
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok((
            String::from_utf8_lossy(&buf[..n]).trim_end().to_string(),
            from,
        ))
    })
}

/// Opens a TCP connection from `ns` to `dst`, with `timeout` for the connect
/// and for every read and write after it.
pub fn tcp_connect(ns: &str, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_ns(ns, || {
        let s = TcpStream::connect_timeout(&dst, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    })
}

/// The port every pod's [`TcpServer`] listens on in [`serve_all_pods`].
pub const POD_TCP_PORT: u16 = 8080;
/// The port every pod's [`UdpServer`] listens on in [`serve_all_pods`].
pub const POD_UDP_PORT: u16 = 5353;

/// Servers in every pod, stopped when dropped.
pub struct PodServers {
    _tcp: Vec<TcpServer>,
    _udp: Vec<UdpServer>,
}

/// A connected UDP socket in a namespace: one flow, asked in turn.
pub struct UdpFlow {
    sock: UdpSocket,
}

impl UdpFlow {
    /// Connects a new socket in `ns` to `dst`, replies awaited for `timeout`.
    pub fn open(ns: &str, dst: SocketAddr, timeout: Duration) -> Self {
        let sock = in_ns(ns, || UdpSocket::bind(unspecified_like(dst))).expect("socket");
        sock.connect(dst).expect("connect");
        sock.set_read_timeout(Some(timeout)).expect("timeout");
        Self { sock }
    }

    /// Sends a datagram and returns the answer's text.
    pub fn ask(&self) -> String {
        self.sock.send(b"q").expect("send");
        let mut buf = [0u8; 256];
        let n = self.sock.recv(&mut buf).expect("answer");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// Starts a TCP server on [`POD_TCP_PORT`] and a UDP server on
/// [`POD_UDP_PORT`] in every pod, on each of its two addresses, each
/// answering with the pod's name.
pub fn serve_all_pods(c: &Cluster) -> PodServers {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for p in c.pods() {
        for addr in [p.addr_of(false), p.addr_of(true)] {
            tcp.push(TcpServer::start(
                &p.ns,
                SocketAddr::new(addr, POD_TCP_PORT),
                &p.name,
            ));
            udp.push(UdpServer::start(
                &p.ns,
                SocketAddr::new(addr, POD_UDP_PORT),
                &p.name,
            ));
        }
    }
    PodServers {
        _tcp: tcp,
        _udp: udp,
    }
}

/// A long-lived TCP stream to a [`TcpServer`], to check that a flow survives
/// changes around it (agent restarts, endpoint updates): every round trip
/// must come back intact.
pub struct EchoStream {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The server's greeting, `"<name> <peer-ip>:<peer-port>"`.
    pub greeting: String,
    /// The name of the server (pod) that answered: the greeting's first word.
    pub backend: String,
    sent: usize,
}

impl EchoStream {
    /// Connects from `ns` to `dst` and reads the greeting; panics on failure.
    pub fn open(ns: &str, dst: SocketAddr, timeout: Duration) -> Self {
        Self::try_open(ns, dst, timeout).unwrap_or_else(|e| panic!("open stream to {dst}: {e}"))
    }

    /// Like [`EchoStream::open`], for tests that expect the connection to fail.
    pub fn try_open(ns: &str, dst: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let s = tcp_connect(ns, dst, timeout)?;
        let writer = s.try_clone()?;
        let mut reader = BufReader::new(s);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        if greeting.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the greeting",
            ));
        }
        let greeting = greeting.trim_end().to_string();
        let backend = greeting
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(Self {
            reader,
            writer,
            greeting,
            backend,
            sent: 0,
        })
    }

    /// Sends `msg` as one line and returns the line that comes back; an
    /// error or a different line means the flow broke.
    pub fn echo(&mut self, msg: &str) -> io::Result<String> {
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        let mut back = String::new();
        if self.reader.read_line(&mut back)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream closed",
            ));
        }
        Ok(back.trim_end().to_string())
    }

    /// Sends a numbered line and expects it back, panicking otherwise.
    pub fn round_trip(&mut self) {
        self.sent += 1;
        let msg = format!("ping {}", self.sent);
        match self.echo(&msg) {
            Ok(back) => assert_eq!(back, msg, "stream echo {}", self.sent),
            Err(e) => panic!("stream round trip {}: {e}", self.sent),
        }
    }

    /// The client socket's own address (what the server should see, absent NAT).
    pub fn local_addr(&self) -> SocketAddr {
        self.writer.local_addr().expect("local address")
    }

    /// The address the client socket is connected to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.writer.peer_addr().expect("peer address")
    }
}
