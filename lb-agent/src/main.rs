//! `lb-agent`: run the node agent, inspect its maps, or remove everything.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{
    datapath::{
        bpffs, cgroup,
        maps::Maps,
        programs::{self, MapSizes, Programs},
        stale, upgrade,
    },
    endpoints::{self, Readiness},
    health::HealthServers,
    inspect, maglev,
    metrics::{Metrics, SyncRecorder},
    model::{self, Cidr, NodeInfo, Problem, ServicePortRef, Translator},
    reconcile::{addr_be, Reconciler},
    source::{self, manifests},
};
use lb_common::{config::DEFAULT_SNAT_PORTS, Config};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// eBPF/XDP Service load balancer for Kubernetes: the node agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    /// Let the kernel choose (native when the driver supports it).
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode, for drivers without XDP support.
    Skb,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Traffic from outside to a backend on another node is SNATed to this
    /// node, so replies come back through it.
    Snat,
    /// Direct server return: such traffic is encapsulated to the backend's
    /// node, which answers the client itself; the backend sees the client.
    Dsr,
}

#[derive(Clone, Copy, ValueEnum)]
enum TraceProto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach the datapath and keep its maps equal to
    /// the Services and EndpointSlices of the manifests folder or the
    /// Kubernetes API.
    Run(Box<RunArgs>),
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
        /// Source address and port.
        #[arg(long)]
        src: std::net::SocketAddrV4,
        /// Destination address and port.
        #[arg(long)]
        dst: std::net::SocketAddrV4,
        /// TCP flags as letters (S, A, F, R, P).
        #[arg(long, default_value = "S", value_parser = lb_agent::trace::parse_tcp_flags)]
        flags: u8,
        /// The interface the packet arrives on (its program runs, with FIB
        /// lookups through it); default: from a pod, without a device.
        #[arg(long)]
        iface: Option<String>,
    },
    /// Detach every program and remove every pin under the bpffs directory.
    Cleanup {
        /// The agent's bpffs directory.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs: PathBuf,
    },
}

/// Where the maps are pinned and how to print what they hold.
#[derive(clap::Args)]
struct View {
    /// The agent's bpffs directory.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

impl View {
    /// Prints `value` as JSON, or as the table `render` makes of it.
    fn print<T: serde::Serialize>(&self, value: &T, render: impl Fn(&T) -> String) -> Result<()> {
        match self.output {
            Output::Table => print!("{}", render(value)),
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        }
        Ok(())
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name, as endpoints' `nodeName` spells it.
    #[arg(long)]
    node_name: String,
    /// External interfaces (XDP); NodePorts listen on their addresses.
    #[arg(long, value_delimiter = ',', required = true)]
    iface: Vec<String>,
    /// Folder of Service and EndpointSlice manifests (YAML), watched live,
    /// instead of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig file for the Kubernetes API; without it and without
    /// --manifests, the in-cluster configuration of the pod is used.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Only node addresses inside these CIDRs (comma-separated) serve
    /// NodePorts, as kube-proxy's flag; all of them when empty.
    #[arg(long, default_value = "", value_parser = parse_cidrs)]
    nodeport_addresses: Cidrs,
    /// Directory for pinned maps and links; a bpffs is mounted there if needed.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Glob patterns of the host-side pod interfaces (TC), e.g. `lxc*,veth*`.
    #[arg(long, value_delimiter = ',', default_value = "lxc*")]
    pod_ifaces: Vec<String>,
    /// Source ports for SNAT, MIN-MAX; keep clear of the node's ephemeral range.
    #[arg(long, default_value_t = format!("{}-{}", DEFAULT_SNAT_PORTS.0, DEFAULT_SNAT_PORTS.1))]
    snat_ports: String,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// How Cluster-policy traffic from outside reaches a backend on another
    /// node (DSR needs the pod CIDRs routed between nodes).
    #[arg(long, value_enum, default_value_t = Mode::Snat)]
    mode: Mode,
    /// Idle timeout of established TCP flows (seconds, or with s/m/h).
    #[arg(long, default_value = "24h", value_parser = parse_duration_s)]
    conntrack_tcp_timeout: u32,
    /// Idle timeout of TCP flows after FIN or RST.
    #[arg(long, default_value = "2m", value_parser = parse_duration_s)]
    conntrack_tcp_closing_timeout: u32,
    /// Idle timeout of UDP flows.
    #[arg(long, default_value = "30s", value_parser = parse_duration_s)]
    conntrack_udp_timeout: u32,
    /// Capacity of the conntrack map (LRU: a full map evicts the idlest
    /// flow; two entries per flow; about 160 bytes each, 40 MiB by default).
    #[arg(long, default_value_t = lb_common::maps::CONNTRACK_MAX)]
    conntrack_size: u32,
    /// Capacity of the services map: frontends (one per address, port and
    /// protocol); also bounds the Service ports (Maglev tables, their
    /// records and counters). About 390 bytes plus 32 bytes per CPU per
    /// entry, 28 MiB on 2 CPUs by default; each Service port's Maglev table
    /// adds 4 bytes a slot when it has endpoints.
    #[arg(long, default_value_t = lb_common::maps::SERVICES_MAX)]
    services_size: u32,
    /// Capacity of the backends map (one entry per endpoint address and
    /// port; about 100 bytes each, 6 MiB by default).
    #[arg(long, default_value_t = lb_common::maps::BACKENDS_MAX)]
    backends_size: u32,
    /// Capacity of the ClientIP affinity map (LRU; one entry per client per
    /// Service port with affinity; about 100 bytes each, 6.5 MiB by default).
    #[arg(long, default_value_t = lb_common::maps::AFFINITY_MAX)]
    affinity_size: u32,
    /// Capacity of the source-range map (one entry per
    /// `loadBalancerSourceRanges` CIDR per Service port; allocated as used,
    /// about 100 bytes each).
    #[arg(long, default_value_t = lb_common::maps::SRC_RANGES_MAX)]
    src_ranges_size: u32,
    /// Where Prometheus scrapes `/metrics`. Loopback and kube-proxy's metrics
    /// port by default: this agent replaces kube-proxy, so scrape configs
    /// written for it keep working, and nothing off the node sees the data.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_addr: SocketAddr,
    /// Where `/healthz` and `/readyz` answer. kube-proxy's healthz port on
    /// every address by default: kubelet probes and cloud load balancers
    /// check it from outside the node.
    #[arg(long, default_value = "0.0.0.0:10256")]
    health_addr: SocketAddr,
    /// Maglev table size of every Service port: a prime from 251 to
    /// 131071 (4 bytes a slot; 1% balance holds up to size/100 backends).
    /// Without it each table has the smallest of 251, 1021, 4093, 16381,
    /// 65521 and 131071 slots that gives 100 per backend.
    #[arg(long, value_parser = parse_table_size)]
    maglev_table_size: Option<u32>,
    /// Socket-level load balancing for the node's own sockets (cgroup v2
    /// hooks at the hierarchy's root, acting on this network namespace only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_lb: bool,
    /// A cgroup v2 mount whose root the socket hooks attach to; default:
    /// the mounted one, else one mounted at /run/lb/cgroup2.
    #[arg(long)]
    cgroup2: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(e) = real_main(cli) {
        error!("{e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    // kube-client logs every failed request at error level; while the API
    // is away that repeats, at each retry, the watch error the source
    // already logs once per outage.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn real_main(mut cli: Cli) -> Result<()> {
    // Entering another mount namespace resets the working directory, so
    // relative paths are resolved first.
    match &mut cli.command {
        Command::Run(args) => {
            args.bpffs = std::path::absolute(&args.bpffs).context("--bpffs")?;
            if let Some(dir) = &mut args.cgroup2 {
                *dir = std::path::absolute(&*dir).context("--cgroup2")?;
            }
            if let Some(dir) = &mut args.manifests {
                *dir = std::path::absolute(&*dir).context("--manifests")?;
            }
            if let Some(file) = &mut args.kubeconfig {
                *file = std::path::absolute(&*file).context("--kubeconfig")?;
            }
        }
        Command::Services(view)
        | Command::Stats(view)
        | Command::Backends(view)
        | Command::Conntrack { view, .. }
        | Command::Trace { view, .. }
        | Command::Maglev { view, .. } => {
            view.bpffs = std::path::absolute(&view.bpffs).context("--bpffs")?;
        }
        Command::Cleanup { bpffs } => {
            *bpffs = std::path::absolute(&*bpffs).context("--bpffs")?;
        }
    }
    // Before any thread exists: setns into a mount namespace needs that.
    bpffs::enter_outer_mount_ns()?;
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Services(view) => {
            let maps = Maps::open(&view.bpffs)?;
            view.print(&inspect::services(&maps)?, |v| inspect::services_table(v))
        }
        Command::Stats(view) => {
            let maps = Maps::open(&view.bpffs)?;
            let stats = inspect::with_socket_counters(inspect::stats(&maps)?, &view.bpffs)?;
            view.print(&stats, inspect::stats_table)
        }
        Command::Backends(view) => {
            let maps = Maps::open(&view.bpffs)?;
            view.print(&inspect::backends(&maps)?, |v| inspect::backends_table(v))
        }
        Command::Conntrack {
            view,
            addr,
            port,
            service,
        } => {
            let maps = Maps::open(&view.bpffs)?;
            let filter = inspect::FlowFilter {
                addr,
                port,
                service,
            };
            view.print(&inspect::conntrack(&maps, &filter)?, |v| {
                inspect::conntrack_table(v)
            })
        }
        Command::Maglev { view, service } => {
            let maps = Maps::open(&view.bpffs)?;
            view.print(&inspect::maglev(&maps, &service)?, |v| {
                inspect::maglev_table(v)
            })
        }
        Command::Trace {
            view,
            proto,
            src,
            dst,
            flags,
            iface,
        } => {
            let req = lb_agent::trace::Request {
                proto: match proto {
                    TraceProto::Tcp => lb_common::proto::TCP,
                    TraceProto::Udp => lb_common::proto::UDP,
                },
                src,
                dst,
                tcp_flags: flags,
                iface,
            };
            let report = lb_agent::trace::run(&view.bpffs, &req)?;
            view.print(&report, lb_agent::trace::table)
        }
        Command::Cleanup { bpffs } => {
            programs::cleanup(&bpffs)?;
            info!(bpffs = %bpffs.display(), "removed every program link and map pin");
            Ok(())
        }
    }
}

/// A comma-separated list of CIDRs; empty entries are ignored, so an empty
/// value (as a templated manifest may pass) means none.
#[derive(Clone, Debug, Default)]
struct Cidrs(Vec<Cidr>);

fn parse_cidrs(s: &str) -> Result<Cidrs, String> {
    s.split(',')
        .filter(|c| !c.trim().is_empty())
        .map(str::parse)
        .collect::<Result<Vec<Cidr>, String>>()
        .map(Cidrs)
}

/// Accepts only the Maglev table sizes the datapath is built for.
fn parse_table_size(s: &str) -> Result<u32, String> {
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
fn parse_duration_s(s: &str) -> Result<u32, String> {
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

fn parse_port_range(s: &str) -> Result<(u16, u16)> {
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

/// IPv4 addresses of the given interfaces, in interface order.
fn iface_addresses(ifaces: &[String]) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let all: Vec<_> = nix::ifaddrs::getifaddrs()
        .context("list interface addresses")?
        .collect();
    for iface in ifaces {
        for a in &all {
            if &a.interface_name != iface {
                continue;
            }
            if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
                out.push(IpAddr::V4(sin.ip()));
            }
        }
    }
    Ok(out)
}

fn run(args: &RunArgs) -> Result<()> {
    // Before anything is attached: a source that cannot work is an error
    // the user should see at once, not after programs are in place.
    if args.manifests.is_none()
        && args.kubeconfig.is_none()
        && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none()
    {
        bail!("no --manifests DIR or --kubeconfig FILE, and not in a pod (KUBERNETES_SERVICE_HOST is unset): pass one of the two flags");
    }
    let snat_ports = parse_port_range(&args.snat_ports)?;
    let patterns = args
        .pod_ifaces
        .iter()
        .map(|p| glob::Pattern::new(p).with_context(|| format!("--pod-ifaces: bad pattern {p}")))
        .collect::<Result<Vec<_>>>()?;
    bpffs::ensure(&args.bpffs)?;
    let xdp_mode = match args.xdp_mode {
        XdpModeArg::Auto => XdpMode::Default,
        XdpModeArg::Native => XdpMode::Driver,
        XdpModeArg::Skb => XdpMode::Skb,
    };
    let sizes = MapSizes {
        services: args.services_size,
        backends: args.backends_size,
        conntrack: args.conntrack_size,
        affinity: args.affinity_size,
        src_ranges: args.src_ranges_size,
    };
    let mut progs = Programs::load(&args.bpffs, sizes, xdp_mode)?;
    let mut maps = Maps::open(&args.bpffs)?;

    // The SNAT source is an address of the external interfaces in both
    // modes: it is what replies must come back to.
    let mut iface_addrs = iface_addresses(&args.iface)?;
    let timeouts = [
        args.conntrack_tcp_timeout,
        args.conntrack_tcp_closing_timeout,
        args.conntrack_udp_timeout,
    ];
    write_config(&mut maps, &iface_addrs, snat_ports, timeouts, args.mode)?;
    let sock_cgroup = cgroup::prepare(
        &args.bpffs,
        args.socket_lb,
        args.cgroup2.as_deref(),
        progs.sock_error(),
    );
    let old_pins = upgrade::older_pins(&args.bpffs)?;
    for (name, n) in upgrade::migrate(&args.bpffs, &old_pins)? {
        info!(map = %name, entries = n, "converted an older map layout");
    }

    let metrics = Arc::new(Metrics::new(&args.bpffs)?);
    let mut recorder = SyncRecorder::new(metrics.clone());

    let table_size = args
        .maglev_table_size
        .map_or(maglev::TableSize::Scaled, maglev::TableSize::Fixed);
    let mut reconciler = Reconciler::adopt(&maps.snapshot()?, table_size);
    let mut translator = Translator::default();
    info!(
        services = reconciler.service_count(),
        "adopted existing maps"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async {
        let (mut source, mut changes) = Source::start(args).await?;
        let mut link_events = link_events()?;
        let mut health = HealthServers::default();
        let mut reported = ProblemLog::default();
        let mut node = NodeInfo {
            name: args.node_name.clone(),
            addresses: Vec::new(),
        };
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("install SIGTERM handler")?;
        let ready = Readiness::default();
        let _metrics_server = endpoints::serve_metrics(args.metrics_addr, metrics)?;
        let _health_server = endpoints::serve_health(args.health_addr, ready.clone())?;

        // The manifests folder is complete at once; the API once listed.
        let mut due = true;
        // When the change a pending sync answers was first noticed.
        let mut seen: Option<Instant> = None;
        loop {
            if due {
                due = false;
                match source.load(&iface_addrs, &args.nodeport_addresses.0, &mut node, &mut translator) {
                    Ok(None) => {}
                    Ok(Some((source_problems, changed))) => {
                        let (problems, report) =
                            sync(source_problems, &translator, &changed, &node, &mut reconciler, &mut maps, &mut health);
                        if sock_cgroup.is_some() && report.deletes > 0 {
                            stale::after_sync(&args.bpffs, &maps);
                        }
                        let invalid = problems.len().saturating_sub(report.failures.len());
                        recorder.synced(seen.take(), invalid, &report);
                        // Refused Service ports (the tail of `problems`)
                        // are logged by the recorder's refusal log.
                        reported.log(&problems[..invalid]);
                        source.report(&problems);
                        if !ready.is_ready() {
                            // Programs are attached (or swapped, on a restart
                            // or upgrade) only now that the maps hold the
                            // whole desired state: new programs never see a
                            // half-filled map, and old ones keep theirs until
                            // the swap.
                            for iface in &args.iface {
                                progs.attach_node(iface)?;
                            }
                            progs.sync_pods(&patterns)?;
                            if let Some(dir) = &sock_cgroup {
                                if let Err(e) = progs.attach_sockets(dir) {
                                    warn!("socket-level load balancing is off: {e:#}");
                                }
                            }
                            upgrade::retire(&args.bpffs, &old_pins)?;
                            for pin in &old_pins {
                                info!(old = %pin.name, new = pin.current, "older map layout {}", upgrade::describe(pin));
                            }
                            ready.set_ready();
                            info!(
                                node = %node.name,
                                addresses = ?node.addresses,
                                metrics = %args.metrics_addr,
                                health = %args.health_addr,
                                "lb-agent ready"
                            );
                        }
                    }
                    // Without a first state there is nothing to keep.
                    Err(e) if !ready.is_ready() => return Err(e),
                    Err(e) => {
                        recorder.failed();
                        error!("reload failed, datapath keeps its last state: {e:#}");
                    }
                }
            }
            tokio::select! {
                Some(()) = changes.recv() => {
                    seen.get_or_insert_with(Instant::now);
                    // Coalesce a burst of changes into one sync.
                    tokio::time::sleep(source.debounce()).await;
                    while changes.try_recv().is_ok() {}
                    due = true;
                }
                Some(()) = link_events.recv() => {
                    while link_events.try_recv().is_ok() {}
                    // Before the first sync nothing is attached yet.
                    if ready.is_ready() {
                        if let Err(e) = progs.sync_pods(&patterns) {
                            warn!("pod interface sync failed: {e:#}");
                        }
                    }
                    match iface_addresses(&args.iface) {
                        Ok(addrs) if addrs != iface_addrs => {
                            info!(addresses = ?addrs, "interface addresses changed");
                            iface_addrs = addrs;
                            if let Err(e) = write_config(&mut maps, &iface_addrs, snat_ports, timeouts, args.mode) {
                                error!("rewriting the config after an address change failed: {e:#}");
                            }
                            seen.get_or_insert_with(Instant::now);
                            due = true;
                        }
                        Ok(_) => {}
                        Err(e) => warn!("reading interface addresses failed: {e:#}"),
                    }
                }
                _ = sigterm.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        info!("exiting; programs stay attached and maps stay pinned (`lb-agent cleanup` removes them)");
        Ok::<(), anyhow::Error>(())
    })
}

/// Where the Services and EndpointSlices come from.
enum Source {
    /// A folder of manifests, watched (the watcher lives as long as this).
    Manifests {
        dir: PathBuf,
        _watcher: notify::RecommendedWatcher,
        /// What changed since the last load.
        pending: manifests::Pending,
        /// The files as last read.
        folder: manifests::Folder,
    },
    /// The Kubernetes API.
    Kube {
        watch: source::kube::Watch,
        // Boxed: the largest variant by far, and there is one Source.
        events: Box<source::kube::EventPoster>,
        /// Whether the Node was missing at the last load (warned once).
        node_missing: std::cell::Cell<bool>,
    },
}

impl Source {
    /// Starts the source the flags name; the receiver wakes on changes.
    async fn start(args: &RunArgs) -> Result<(Self, mpsc::Receiver<()>)> {
        if let Some(dir) = &args.manifests {
            let (watcher, changes, pending) = manifests::watch(dir)?;
            return Ok((
                Self::Manifests {
                    dir: dir.clone(),
                    _watcher: watcher,
                    pending,
                    folder: manifests::Folder::default(),
                },
                changes,
            ));
        }
        let client = source::kube::connect(args.kubeconfig.as_deref()).await?;
        let (watch, changes) = source::kube::watch(&client, &args.node_name);
        let events = Box::new(source::kube::EventPoster::new(client, &args.node_name));
        Ok((
            Self::Kube {
                watch,
                events,
                node_missing: std::cell::Cell::new(false),
            },
            changes,
        ))
    }

    /// How long to wait for more changes before syncing: the events of
    /// one file write (create, write, close, rename) come within
    /// microseconds, and a sync that finds nothing new costs little, as
    /// only the files the events name are read; API changes (a rollout)
    /// come in longer bursts.
    fn debounce(&self) -> Duration {
        match self {
            Self::Manifests { .. } => Duration::from_millis(2),
            Self::Kube { .. } => Duration::from_millis(50),
        }
    }

    /// Reads what changed into `translator` (and the NodePort addresses
    /// into `node`); returns the problems of the source itself (files that
    /// cannot be read) and the Service ports whose translation may have
    /// changed, or `None` until the source has been read in full once.
    fn load(
        &mut self,
        iface_addrs: &[IpAddr],
        filter: &[Cidr],
        node: &mut NodeInfo,
        translator: &mut Translator,
    ) -> Result<Option<(Vec<Problem>, BTreeSet<ServicePortRef>)>> {
        match self {
            Self::Manifests {
                dir,
                pending,
                folder,
                ..
            } => {
                set_addresses(
                    node,
                    source::kube::filter_addresses(iface_addrs.to_vec(), filter),
                );
                // New node addresses change every Service: all files are
                // parsed again (the folder keeps their text, not objects).
                let mut scan = pending.take();
                if translator.node() != node {
                    scan = manifests::Scan::Reparse;
                }
                let mut changed = BTreeSet::new();
                folder
                    .refresh(dir, &scan, |folder, ids| {
                        changed.extend(translator.update(node, ids, |id| folder.inputs(id)));
                    })
                    .with_context(|| {
                        // Whatever the events named is read again next time.
                        pending.rescan();
                        format!("read manifests in {}", dir.display())
                    })?;
                Ok(Some((folder.problems(), changed)))
            }
            Self::Kube {
                watch,
                node_missing,
                ..
            } => {
                if !watch.is_synced() {
                    return Ok(None);
                }
                let this = watch.node();
                if this.is_none() && !node_missing.get() {
                    warn!("this agent's Node is not in the API (is --node-name right?): no NodePort addresses until it is");
                }
                node_missing.set(this.is_none());
                let addresses = this
                    .map(|n| source::kube::node_addresses(&n, filter))
                    .unwrap_or_default();
                set_addresses(node, addresses);
                // The API's objects come whole at every sync: every
                // Service is translated again.
                let objects = watch.objects();
                let groups = model::group(&objects.services, &objects.slices);
                let ids: Vec<model::Id> = groups.keys().chain(translator.ids()).cloned().collect();
                let changed =
                    translator.update(node, ids, |id| groups.get(id).cloned().unwrap_or_default());
                Ok(Some((objects.problems, changed)))
            }
        }
    }

    /// Tells the cluster about Services that cannot be programmed.
    fn report(&mut self, problems: &[Problem]) {
        if let Self::Kube { watch, events, .. } = self {
            events.report(watch, problems);
        }
    }
}

/// Sets the NodePort addresses of `node`, saying when they change.
fn set_addresses(node: &mut NodeInfo, addresses: Vec<IpAddr>) {
    if addresses != node.addresses {
        info!(addresses = ?addresses, "NodePort addresses");
        node.addresses = addresses;
    }
}

/// Logs each problem when it appears, not again at every sync while it lasts.
#[derive(Default)]
struct ProblemLog {
    last: std::collections::BTreeSet<(String, String)>,
}

impl ProblemLog {
    fn log(&mut self, problems: &[Problem]) {
        let now: std::collections::BTreeSet<(String, String)> = problems
            .iter()
            .map(|p| (p.object.clone(), p.message.clone()))
            .collect();
        for (object, message) in now.difference(&self.last) {
            warn!(%object, "skipped: {message}");
        }
        for (object, message) in self.last.difference(&now) {
            info!(%object, "resolved: {message}");
        }
        self.last = now;
    }
}

/// Writes the config map: the first IPv4 of `addresses` is the SNAT
/// source; `timeouts` are the TCP, TCP-closing and UDP idle timeouts in
/// seconds.
fn write_config(
    maps: &mut Maps,
    addresses: &[IpAddr],
    snat_ports: (u16, u16),
    timeouts: [u32; 3],
    mode: Mode,
) -> Result<()> {
    let node_addr4_be = addresses
        .iter()
        .find(|a| a.is_ipv4())
        .map_or(0, |a| addr_be(*a).0[0]);
    if node_addr4_be == 0 {
        warn!("no IPv4 address on the external interfaces: NodePorts to remote backends cannot be SNATed");
    }
    let cfg = Config {
        node_addr4_be,
        snat_port_min: snat_ports.0,
        snat_port_max: snat_ports.1,
        node_addr6_be: [0; 4],
        tcp_timeout_s: timeouts[0],
        tcp_closing_timeout_s: timeouts[1],
        udp_timeout_s: timeouts[2],
        flags: if mode == Mode::Dsr {
            lb_common::config::CONFIG_F_DSR
        } else {
            0
        },
    };
    maps.config.set(0, cfg, 0).context("write config map")
}

/// Makes the maps, and the health check ports, match the translated
/// model; returns every problem found (the source's, untranslatable input
/// and Service ports the maps refused) and what the reconciler did.
fn sync(
    source_problems: Vec<Problem>,
    translator: &Translator,
    changed: &BTreeSet<ServicePortRef>,
    node: &NodeInfo,
    reconciler: &mut Reconciler,
    maps: &mut Maps,
    health: &mut HealthServers,
) -> (Vec<Problem>, lb_agent::reconcile::Report) {
    let model = translator.model();
    let problems = translator.problems();
    let report = reconciler.apply_changed(model, changed, maps);
    health.update(&lb_agent::health::desired(model), &node.addresses);
    match maps.purge_affinity(|svc, backend| reconciler.is_active(svc, backend)) {
        Ok(0) => {}
        Ok(n) => debug!(
            entries = n,
            "dropped affinity entries of backends that take no new flows"
        ),
        Err(e) => warn!("purging affinity entries failed: {e:#}"),
    }
    info!(
        services = model.services.len(),
        writes = report.writes,
        deletes = report.deletes,
        failures = report.failures.len(),
        "synced"
    );
    let mut all = source_problems;
    all.extend(problems);
    all.extend(report.failures.iter().map(|f| f.to_problem()));
    (all, report)
}

/// Link and address changes in this network namespace, as a stream of
/// wake-ups (the receiver re-reads what it needs).
fn link_events() -> Result<mpsc::Receiver<()>> {
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    const RTMGRP_LINK: u32 = 0x1;
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    let mut socket = Socket::new(NETLINK_ROUTE).context("open netlink socket")?;
    socket
        .bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
        .context("subscribe to netlink link events")?;
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(65536);
            loop {
                buf.clear();
                if socket.recv(&mut buf, 0).is_err() {
                    // ENOBUFS after a burst: events were lost, which a
                    // wake-up covers, since the receiver rescans anyway.
                }
                if tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        })
        .context("start netlink thread")?;
    Ok(rx)
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

    #[test]
    fn nodeport_address_lists_parse_and_may_be_empty() {
        assert!(parse_cidrs("").is_ok_and(|c| c.0.is_empty()));
        let two = parse_cidrs("10.0.0.0/8, fd00::/64").map(|c| c.0.len());
        assert_eq!(two, Ok(2));
        assert!(parse_cidrs("10.0.0.0/8,nope").is_err());
    }
}
