//! The command line: subcommands, flags and their value parsers.
//!
//! Doc comments here are the `--help` text.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{
    check,
    datapath::{programs::MapSizes, xdp_mode::XdpPolicy},
    maglev,
    model::{AddressFilter, CidrList},
};
use lb_common::config::DEFAULT_SNAT_PORTS;

/// eBPF/XDP Service load balancer for Kubernetes: the node agent.
#[derive(Parser)]
#[command(version, about)]
pub(crate) struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum XdpModeArg {
    /// Per interface: generic (skb) mode on a veth, whose peer takes native
    /// XDP_TX frames only when it runs XDP itself; native elsewhere, or
    /// generic where the driver lacks native XDP.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode, for drivers without XDP support.
    Skb,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// Traffic from outside to a backend on another node is SNATed to this
    /// node, so replies come back through it.
    Snat,
    /// Direct server return: such traffic is encapsulated to the backend's
    /// node, which answers the client itself; the backend sees the client.
    Dsr,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum TraceProto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum TraceSocket {
    Connect,
    Sendmsg,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the agent: load and attach the datapath and keep its maps equal to
    /// the Services and EndpointSlices of the manifests folder or the
    /// Kubernetes API.
    Run(Box<RunArgs>),
    /// Say what this node supports and what `run` with the same flags
    /// would use: kernel, BTF, bpffs, cgroup v2, TCX, each interface's XDP
    /// mode and why, capabilities, map memory. Exits non-zero on what would
    /// stop `run`; creates nothing.
    Check(Box<CheckArgs>),
    /// Print the frontends, their backends and flags, as the maps hold them.
    Services(View),
    /// Print the datapath counters.
    Stats(View),
    /// Print every backend the maps hold.
    Backends(View),
    /// Print tracked flows, optionally filtered.
    Conntrack {
        #[command(flatten)]
        view: View,
        /// Only flows with this address on either side.
        #[arg(long)]
        addr: Option<IpAddr>,
        /// Only flows with this port on either side.
        #[arg(long)]
        port: Option<u16>,
        /// Only flows of this Service port (`namespace/name[:port]/PROTO` or its id).
        #[arg(long)]
        service: Option<String>,
    },
    /// Print a Service port's Maglev table: each backend's share, and with
    /// `-o json` every slot.
    Maglev {
        #[command(flatten)]
        view: View,
        /// `namespace/name[:port]/PROTO` as `services` prints it, or its id.
        service: String,
    },
    /// Run one hand-built packet through a private copy of the datapath
    /// (BPF_PROG_TEST_RUN; nothing live changes) and explain the verdict.
    Trace {
        #[command(flatten)]
        view: View,
        /// Protocol.
        #[arg(long, value_enum)]
        proto: TraceProto,
        /// Source address and port, `10.0.0.1:4000` or
        /// `[2001:db8::1]:4000` (with `--socket`: the address the socket is
        /// bound to, port ignored; default the node's).
        #[arg(long, required_unless_present = "socket")]
        src: Option<SocketAddr>,
        /// Destination address and port (with `--socket` on an IPv6
        /// socket, an IPv4-mapped `[::ffff:10.96.0.10]:80` is an IPv4
        /// destination, as the hooks take it).
        #[arg(long)]
        dst: SocketAddr,
        /// TCP flags as letters (S, A, F, R, P).
        #[arg(long, default_value = "S", value_parser = lb_agent::trace::parse_tcp_flags)]
        flags: u8,
        /// The interface the packet arrives on (its program runs, with FIB
        /// lookups through it); default: from a pod, without a device.
        #[arg(long, conflicts_with = "socket")]
        iface: Option<String>,
        /// Trace a node socket's call through the socket hooks instead of
        /// a packet: `connect` (TCP, connected UDP) or `sendmsg`
        /// (unconnected UDP).
        #[arg(long, value_enum)]
        socket: Option<TraceSocket>,
        /// With `--socket`: the socket's cookie, which the Maglev hash
        /// mixes in (default: a random one, as a new socket's).
        #[arg(long, requires = "socket")]
        cookie: Option<u64>,
    },
    /// Say why a Service answers as it does on this node: its frontends
    /// (programmed or not, and why), its endpoints and which take new
    /// flows, the target port each resolved to, and one line per problem
    /// with its fix. Reads the agent's last desired state and the pins.
    Explain {
        #[command(flatten)]
        view: View,
        /// `namespace/name`, `namespace/name:port` (a port's name), or
        /// `name` in namespace `default`.
        service: String,
        /// A client address: whether the source ranges admit it, and the
        /// backend a new flow from it would get (through the datapath's
        /// own programs, as `trace`; run in the node's network namespace).
        #[arg(long)]
        from: Option<IpAddr>,
    },
    /// Detach every program and remove every pin under the bpffs directory.
    Cleanup {
        /// The agent's bpffs directory.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs: PathBuf,
    },
}

impl Command {
    /// Makes the paths the command was given absolute: entering another
    /// mount namespace resets the working directory.
    pub(crate) fn resolve_paths(&mut self) -> Result<()> {
        match self {
            Command::Run(args) => args.resolve_paths()?,
            Command::Check(check) => check.run.resolve_paths()?,
            Command::Services(view)
            | Command::Stats(view)
            | Command::Backends(view)
            | Command::Conntrack { view, .. }
            | Command::Trace { view, .. }
            | Command::Explain { view, .. }
            | Command::Maglev { view, .. } => {
                view.bpffs = std::path::absolute(&view.bpffs).context("--bpffs")?;
            }
            Command::Cleanup { bpffs } => {
                *bpffs = std::path::absolute(&*bpffs).context("--bpffs")?;
            }
        }
        Ok(())
    }
}

/// Where the maps are pinned and how to print what they hold.
#[derive(clap::Args)]
pub(crate) struct View {
    /// The agent's bpffs directory.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    pub(crate) bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
}

impl View {
    /// Prints `value` as JSON, or as the table `render` makes of it.
    pub(crate) fn print<T: serde::Serialize>(
        &self,
        value: &T,
        render: impl Fn(&T) -> String,
    ) -> Result<()> {
        match self.output {
            Output::Table => print!("{}", render(value)),
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        }
        Ok(())
    }
}

/// `lb-agent check`: `run`'s flags, and how to print the answer.
#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// This node's name, as endpoints' `nodeName` spells it.
    #[arg(long)]
    pub(crate) node_name: String,
    /// External interfaces (XDP); NodePorts listen on their addresses.
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) iface: Vec<String>,
    /// Folder of Service and EndpointSlice manifests (YAML), watched live,
    /// instead of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub(crate) manifests: Option<PathBuf>,
    /// Kubeconfig file for the Kubernetes API; without it and without
    /// --manifests, the in-cluster configuration of the pod is used.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// Which node addresses serve NodePorts, as kube-proxy's flag:
    /// `primary` (the Node's first InternalIP, or the first --iface address
    /// with --manifests), or comma-separated CIDRs: every local address on
    /// any interface inside them (`0.0.0.0/0` for all).
    #[arg(long, default_value = "primary", value_parser = str::parse::<AddressFilter>)]
    pub(crate) nodeport_addresses: AddressFilter,
    /// This node's zone for topology-aware routing with --manifests (the
    /// API's Node label `topology.kubernetes.io/zone` otherwise).
    #[arg(long)]
    pub(crate) zone: Option<String>,
    /// Directory for pinned maps and links; a bpffs is mounted there if needed.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    pub(crate) bpffs: PathBuf,
    /// Glob patterns of the host-side pod interfaces (TC), e.g. `lxc*,veth*`.
    #[arg(long, value_delimiter = ',', default_value = "lxc*")]
    pub(crate) pod_ifaces: Vec<String>,
    /// Source ports for SNAT, MIN-MAX; keep clear of the node's ephemeral range.
    #[arg(long, default_value_t = format!("{}-{}", DEFAULT_SNAT_PORTS.0, DEFAULT_SNAT_PORTS.1))]
    pub(crate) snat_ports: String,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub(crate) xdp_mode: XdpModeArg,
    /// How Cluster-policy traffic from outside reaches a backend on another
    /// node (DSR needs the pod CIDRs routed between nodes).
    #[arg(long, value_enum, default_value_t = Mode::Snat)]
    pub(crate) mode: Mode,
    /// Networks (CIDRs, comma-separated) of the nodes whose DSR-wrapped
    /// packets this node unwraps, besides the Node objects' addresses in
    /// Kubernetes mode; wrapped packets from elsewhere are dropped. With
    /// --manifests nothing else is accepted.
    #[arg(long, default_value = "", value_parser = str::parse::<CidrList>)]
    pub(crate) dsr_peers: CidrList,
    /// Idle timeout of established TCP flows (seconds, or with s/m/h).
    #[arg(long, default_value = "24h", value_parser = parse_duration_s)]
    pub(crate) conntrack_tcp_timeout: u32,
    /// Idle timeout of TCP flows after FIN or RST.
    #[arg(long, default_value = "2m", value_parser = parse_duration_s)]
    pub(crate) conntrack_tcp_closing_timeout: u32,
    /// Idle timeout of UDP flows.
    #[arg(long, default_value = "30s", value_parser = parse_duration_s)]
    pub(crate) conntrack_udp_timeout: u32,
    /// Idle timeout of a flow not established yet (an embryonic flow: a
    /// SYN answered by no more than a SYN-ACK, a datagram without answer).
    #[arg(long, default_value = "5s", value_parser = parse_duration_s)]
    pub(crate) conntrack_embryonic_timeout: u32,
    /// Capacity of the embryonic conntrack map (LRU, apart from the main
    /// one, so that unanswered flows evict only each other; two entries
    /// per flow, about 160 bytes each, 10 MiB by default).
    #[arg(long, default_value_t = lb_common::maps::CT_EMBRYO_MAX)]
    pub(crate) conntrack_embryonic_size: u32,
    /// Capacity of the conntrack map (LRU: a full map evicts the idlest
    /// flow; two entries per flow; about 160 bytes each, 40 MiB by default).
    #[arg(long, default_value_t = lb_common::maps::CONNTRACK_MAX)]
    pub(crate) conntrack_size: u32,
    /// Capacity of the services map: frontends (one per address, port and
    /// protocol); also bounds the Service ports (Maglev tables, their
    /// records and counters). About 390 bytes plus 32 bytes per CPU per
    /// entry, 28 MiB on 2 CPUs by default; each Service port's Maglev table
    /// adds 4 bytes a slot when it has endpoints.
    #[arg(long, default_value_t = lb_common::maps::SERVICES_MAX)]
    pub(crate) services_size: u32,
    /// Capacity of the backends map, an array indexed by backend id (one
    /// entry per endpoint address and port; ids start at 1, so it holds
    /// one fewer; 24 bytes each, 1.5 MiB by default).
    #[arg(long, default_value_t = lb_common::maps::BACKENDS_MAX)]
    pub(crate) backends_size: u32,
    /// Capacity of the ClientIP affinity map (LRU; one entry per client per
    /// Service port with affinity; about 100 bytes each, 6.5 MiB by default).
    #[arg(long, default_value_t = lb_common::maps::AFFINITY_MAX)]
    pub(crate) affinity_size: u32,
    /// Capacity of the source-range map (one entry per
    /// `loadBalancerSourceRanges` CIDR per Service port; allocated as used,
    /// about 100 bytes each).
    #[arg(long, default_value_t = lb_common::maps::SRC_RANGES_MAX)]
    pub(crate) src_ranges_size: u32,
    /// Where Prometheus scrapes `/metrics`. Loopback and kube-proxy's metrics
    /// port by default: this agent replaces kube-proxy, so scrape configs
    /// written for it keep working, and nothing off the node sees the data.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub(crate) metrics_addr: SocketAddr,
    /// Where `/healthz` and `/readyz` answer. kube-proxy's healthz port on
    /// every address by default: kubelet probes and cloud load balancers
    /// check it from outside the node.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub(crate) health_addr: SocketAddr,
    /// `/healthz` and the healthCheckNodePorts answer 503 once a change has
    /// waited this long for its sync (kube-proxy's: twice its sync period).
    #[arg(long, default_value = "60s", value_parser = parse_duration_s)]
    pub(crate) health_timeout: u32,
    /// Maglev table size of every Service port: a prime from 251 to
    /// 131071 (4 bytes a slot; 1% balance holds up to size/100 backends).
    /// Without it each table has the smallest of 251, 1021, 4093, 16381,
    /// 65521 and 131071 slots that gives 100 per backend.
    #[arg(long, value_parser = parse_table_size)]
    pub(crate) maglev_table_size: Option<u32>,
    /// Size of the flat array every Maglev table is a region of, in slots
    /// (4 bytes each, allocated at once: 32 MiB by default). A changed
    /// table is written into free room before the old one is given back,
    /// so leave room for the tables that change at once besides those in
    /// use (a table of 3 to 10 backends takes 1024 slots).
    #[arg(long, default_value_t = lb_common::service::MAGLEV_SLOTS_DEFAULT)]
    pub(crate) maglev_slots: u32,
    /// Socket-level load balancing for the node's own sockets (cgroup v2
    /// hooks at the hierarchy's root, acting on this network namespace only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) socket_lb: bool,
    /// A cgroup v2 mount whose root the socket hooks attach to; default:
    /// the mounted one, else one mounted at /run/lb/cgroup2.
    #[arg(long)]
    pub(crate) cgroup2: Option<PathBuf>,
}

impl RunArgs {
    /// Makes the paths absolute (see [`Command::resolve_paths`]).
    fn resolve_paths(&mut self) -> Result<()> {
        self.bpffs = std::path::absolute(&self.bpffs).context("--bpffs")?;
        if let Some(dir) = &mut self.cgroup2 {
            *dir = std::path::absolute(&*dir).context("--cgroup2")?;
        }
        if let Some(dir) = &mut self.manifests {
            *dir = std::path::absolute(&*dir).context("--manifests")?;
        }
        if let Some(file) = &mut self.kubeconfig {
            *file = std::path::absolute(&*file).context("--kubeconfig")?;
        }
        Ok(())
    }

    /// What `--xdp-mode` asks for.
    pub(crate) fn xdp_policy(&self) -> XdpPolicy {
        match self.xdp_mode {
            XdpModeArg::Auto => XdpPolicy::Auto,
            XdpModeArg::Native => XdpPolicy::Native,
            XdpModeArg::Skb => XdpPolicy::Skb,
        }
    }

    /// The map size flags.
    pub(crate) fn sizes(&self) -> MapSizes {
        MapSizes {
            services: self.services_size,
            backends: self.backends_size,
            conntrack: self.conntrack_size,
            embryonic: self.conntrack_embryonic_size,
            affinity: self.affinity_size,
            src_ranges: self.src_ranges_size,
            maglev_slots: self.maglev_slots,
        }
    }

    /// The flags `check` reads, shared with `run`.
    pub(crate) fn check_flags(&self) -> check::Flags {
        check::Flags {
            ifaces: self.iface.clone(),
            manifests: self.manifests.clone(),
            kubeconfig: self.kubeconfig.clone(),
            bpffs: self.bpffs.clone(),
            cgroup2: self.cgroup2.clone(),
            metrics_addr: self.metrics_addr,
            health_addr: self.health_addr,
            pod_ifaces: self.pod_ifaces.clone(),
            xdp_policy: self.xdp_policy(),
            sizes: self.sizes(),
            socket_lb: self.socket_lb,
        }
    }
}

/// Accepts only the Maglev table sizes the datapath is built for.
pub(crate) fn parse_table_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if maglev::TABLE_SIZES.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} is not one of the supported primes {:?}",
            maglev::TABLE_SIZES
        ))
    }
}

/// Parses `90`, `90s`, `15m` or `24h` into seconds.
pub(crate) fn parse_duration_s(s: &str) -> Result<u32, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u32 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 2m or 24h"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Parses the `--snat-ports` range `MIN-MAX`.
pub(crate) fn parse_port_range(s: &str) -> Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("--snat-ports {s}: expected MIN-MAX"))?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .with_context(|| format!("--snat-ports: bad port {a}"))?,
        b.trim()
            .parse()
            .with_context(|| format!("--snat-ports: bad port {b}"))?,
    );
    if a == 0 || a > b {
        bail!("--snat-ports {s}: need 1 <= MIN <= MAX");
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kube_proxy_flags() {
        assert_eq!(parse_duration_s("90"), Ok(90));
        assert_eq!(parse_duration_s("30s"), Ok(30));
        assert_eq!(parse_duration_s("2m"), Ok(120));
        assert_eq!(parse_duration_s("24h"), Ok(86_400));
        assert!(parse_duration_s("5d").is_err());
        assert!(parse_duration_s("h").is_err());
        assert!(parse_duration_s("9999999999h").is_err());
    }

    #[test]
    fn port_ranges_are_checked() {
        assert_eq!(parse_port_range("61000-65535").ok(), Some((61000, 65535)));
        assert!(parse_port_range("65535-61000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("61000").is_err());
        assert_eq!(parse_table_size("16381"), Ok(16381));
        assert!(parse_table_size("16384").is_err());
    }
}
