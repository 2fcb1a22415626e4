//! What this node supports and what `lb-agent run` would use on it, before
//! anything is created in the kernel: `lb-agent check`, the summary `run`
//! logs at start, and the flag checks `run` makes before it creates a map.
//!
//! Everything here only reads (the kernel's version, `/sys`, `/proc`,
//! netlink): nothing is mounted, loaded or pinned, so a failed check leaves
//! the node as it was.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use lb_common::{
    affinity::{AffinityKey, AffinityValue},
    conntrack::{CtKey, CtValue},
    maps,
    service::{Backend, ServiceInfo, ServiceKey, ServiceValue, SrcRange},
    stats::SvcCounters,
};
use serde::Serialize;
use tracing::{error, info, warn};

use crate::datapath::{
    bpffs, cgroup,
    programs::{self, MapSizes},
    xdp_mode::{self, XdpPolicy},
};

/// The flags of `lb-agent run` that `check` reads: the same values, so
/// that `check` answers for the command line `run` gets.
#[derive(Clone, Debug)]
pub struct Flags {
    /// `--iface`.
    pub ifaces: Vec<String>,
    /// `--manifests`.
    pub manifests: Option<PathBuf>,
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--bpffs`.
    pub bpffs: PathBuf,
    /// `--cgroup2`.
    pub cgroup2: Option<PathBuf>,
    /// `--metrics-addr`.
    pub metrics_addr: SocketAddr,
    /// `--health-addr`.
    pub health_addr: SocketAddr,
    /// `--pod-ifaces`.
    pub pod_ifaces: Vec<String>,
    /// `--xdp-mode`.
    pub xdp_policy: XdpPolicy,
    /// The map size flags.
    pub sizes: MapSizes,
    /// `--socket-lb`.
    pub socket_lb: bool,
}

/// Every flag of `flags` that names something that is not there or not
/// usable, as one sentence each that starts with the flag. Empty when all
/// are fine. Reads only: `run` calls it before it creates anything.
pub fn flag_errors(flags: &Flags) -> Vec<String> {
    let mut out = Vec::new();
    for iface in &flags.ifaces {
        if programs::ifindex(iface).is_err() {
            out.push(format!(
                "--iface {iface}: no such interface in this network namespace"
            ));
        }
    }
    if let Some(dir) = &flags.manifests {
        match std::fs::metadata(dir) {
            Ok(m) if !m.is_dir() => out.push(format!(
                "--manifests {}: not a directory (give the folder that holds the YAML files)",
                dir.display()
            )),
            Ok(_) => {
                if let Err(e) = std::fs::read_dir(dir) {
                    out.push(format!(
                        "--manifests {}: cannot read the folder: {e}",
                        dir.display()
                    ));
                }
            }
            Err(e) => out.push(format!(
                "--manifests {}: {}",
                dir.display(),
                missing_or(&e, "no such directory")
            )),
        }
    }
    if let Some(file) = &flags.kubeconfig {
        match std::fs::read(file) {
            Err(e) => out.push(format!(
                "--kubeconfig {}: {}",
                file.display(),
                missing_or(&e, "no such file")
            )),
            Ok(_) => {
                if let Err(e) = kube::config::Kubeconfig::read_from(file) {
                    out.push(format!(
                        "--kubeconfig {}: not a kubeconfig: {e}",
                        file.display()
                    ));
                }
            }
        }
    }
    if let Ok(m) = std::fs::metadata(&flags.bpffs) {
        if !m.is_dir() {
            out.push(format!(
                "--bpffs {}: exists and is not a directory",
                flags.bpffs.display()
            ));
        }
    }
    if let Some(dir) = &flags.cgroup2 {
        if !dir.is_dir() {
            out.push(format!("--cgroup2 {}: no such directory", dir.display()));
        }
    }
    for p in &flags.pod_ifaces {
        if let Err(e) = glob::Pattern::new(p) {
            out.push(format!("--pod-ifaces {p}: not a glob pattern: {e}"));
        }
    }
    for (flag, addr) in [
        ("--metrics-addr", flags.metrics_addr),
        ("--health-addr", flags.health_addr),
    ] {
        // Listening and letting go at once: the agent binds it again once
        // its runtime runs, and finding out there would be after the maps.
        if let Err(e) = std::net::TcpListener::bind(addr) {
            out.push(format!("{flag} {addr}: cannot listen there: {e}"));
        }
    }
    if flags.metrics_addr == flags.health_addr && flags.metrics_addr.port() != 0 {
        out.push(format!(
            "--health-addr {}: the same address as --metrics-addr; give each its own",
            flags.health_addr
        ));
    }
    out
}

/// "no such …" for a missing path, else the error itself.
fn missing_or(e: &std::io::Error, missing: &str) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        missing.to_owned()
    } else {
        format!("cannot read it: {e}")
    }
}

/// How a finding of the check weighs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// `run` works, with something left out (said in the detail).
    Warn,
    /// `run` would stop.
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the check.
#[derive(Clone, Debug, Serialize)]
pub struct Item {
    /// What was checked (`kernel`, `btf`, `--iface eth0`, …).
    pub what: String,
    /// How it came out.
    pub status: Status,
    /// What was found, and for a warning or failure what to do.
    pub detail: String,
}

/// The XDP mode `run` would attach an interface in, and why.
#[derive(Clone, Debug, Serialize)]
pub struct InterfacePlan {
    /// The interface.
    pub iface: String,
    /// Its link kind (`veth`, …), `None` for a physical NIC.
    pub kind: Option<String>,
    /// The mode tried first (`native` or `skb`), as `lb_xdp_attach_info`
    /// and the `XDP attached` log line name it.
    pub mode: String,
    /// The mode tried when the first fails, if any.
    pub fallback: Option<String>,
    /// Why.
    pub reason: String,
    /// What holds the interface's XDP slot now.
    pub attached_now: String,
}

/// The kernel memory one map takes at its configured size (an estimate:
/// the kernel's per-entry overhead is that of a 64-bit build).
#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    /// The map's pinned name.
    pub map: &'static str,
    /// Its capacity.
    pub entries: u32,
    /// Bytes at that capacity.
    pub bytes: u64,
    /// Allocated up front (preallocated hash maps, arrays) or as used.
    pub preallocated: bool,
}

/// Everything `check` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// One line per requirement, in the order `run` meets them.
    pub items: Vec<Item>,
    /// The XDP plan of each `--iface` interface that exists.
    pub interfaces: Vec<InterfacePlan>,
    /// The sized maps' memory.
    pub maps: Vec<MapMemory>,
    /// Their sum (Maglev tables come on top: 4 bytes a slot per Service
    /// port with endpoints).
    pub map_bytes: u64,
}

impl Report {
    /// Whether something would stop `run`.
    pub fn fails(&self) -> bool {
        self.items.iter().any(|i| i.status == Status::Fail)
    }

    /// Logs the report, one line per item (as `run` does at start).
    pub fn log(&self) {
        for i in &self.items {
            match i.status {
                Status::Ok => info!(check = %i.what, "{}", i.detail),
                Status::Warn => warn!(check = %i.what, "{}", i.detail),
                Status::Fail => error!(check = %i.what, "{}", i.detail),
            }
        }
        info!(
            check = "map memory",
            "{} at the configured sizes",
            human_bytes(self.map_bytes)
        );
    }
}

/// Linux capabilities by number (uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The capabilities `run` needs, with what for.
const NEEDED_CAPS: [(u32, &str, &str); 3] = [
    (CAP_BPF, "CAP_BPF", "maps and programs"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN", "XDP and TC attachment"),
    (
        CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN",
        "bpffs and cgroup mounts, mount namespace",
    ),
];

/// Checks the node for `flags`: the flags themselves, the kernel's
/// features, the capabilities, each interface's XDP plan and the maps'
/// memory.
pub fn run(flags: &Flags) -> Report {
    let mut items = Vec::new();
    let mut item = |what: &str, status: Status, detail: String| {
        items.push(Item {
            what: what.to_owned(),
            status,
            detail,
        });
    };

    for e in flag_errors(flags) {
        let (flag, why) = e.split_once(": ").unwrap_or((e.as_str(), ""));
        item(flag, Status::Fail, why.to_owned());
    }

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|e| format!("unknown ({e})"), |r| r.trim().to_owned());
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(6, 1, 0) => {
            item("kernel", Status::Ok, format!("Linux {release}"));
        }
        Ok(_) => item(
            "kernel",
            Status::Warn,
            format!("Linux {release}: older than 6.1, which is the oldest tested; the verifier may refuse the programs"),
        ),
        Err(e) => item("kernel", Status::Warn, format!("Linux {release}: version unreadable: {e}")),
    }

    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        item(
            "btf",
            Status::Ok,
            "/sys/kernel/btf/vmlinux is there".to_owned(),
        );
    } else {
        item(
            "btf",
            Status::Fail,
            "/sys/kernel/btf/vmlinux is missing: the programs need a kernel built with CONFIG_DEBUG_INFO_BTF".to_owned(),
        );
    }

    let caps = effective_caps();
    let has = |cap: u32| caps.is_some_and(|c| c & (1 << cap) != 0);

    if bpffs::is_bpffs(&flags.bpffs) {
        item(
            "bpffs",
            Status::Ok,
            format!("{} is on a bpffs", flags.bpffs.display()),
        );
    } else if has(CAP_SYS_ADMIN) {
        item(
            "bpffs",
            Status::Ok,
            format!(
                "{} is not on a bpffs yet: run mounts one there",
                flags.bpffs.display()
            ),
        );
    } else {
        item(
            "bpffs",
            Status::Fail,
            format!(
                "{} is not on a bpffs and mounting one needs CAP_SYS_ADMIN: mount one (`mount -t bpf bpf {}`) or grant it",
                flags.bpffs.display(),
                flags.bpffs.display()
            ),
        );
    }

    let cgroup_root = flags.cgroup2.clone().or_else(cgroup::mounted_root);
    if !flags.socket_lb {
        item(
            "cgroup v2",
            Status::Ok,
            "not needed: --socket-lb false".to_owned(),
        );
    } else if let Some(dir) = cgroup_root {
        item(
            "cgroup v2",
            Status::Ok,
            format!("{}: the socket hooks attach at its root", dir.display()),
        );
    } else if has(CAP_SYS_ADMIN) {
        item(
            "cgroup v2",
            Status::Ok,
            format!(
                "none mounted: run mounts one at {} for the socket hooks",
                cgroup::DEFAULT_MOUNT
            ),
        );
    } else {
        item(
            "cgroup v2",
            Status::Warn,
            "none mounted and mounting one needs CAP_SYS_ADMIN: socket-level load balancing would be off".to_owned(),
        );
    }

    if programs::tcx_available() {
        item(
            "tc",
            Status::Ok,
            "TCX links (Linux 6.6 or later)".to_owned(),
        );
    } else {
        item(
            "tc",
            Status::Ok,
            "clsact filters (no TCX before Linux 6.6)".to_owned(),
        );
    }

    match caps {
        None => item(
            "capabilities",
            Status::Warn,
            "CapEff unreadable in /proc/self/status".to_owned(),
        ),
        Some(_) => {
            let missing: Vec<String> = NEEDED_CAPS
                .iter()
                .filter(|(cap, _, _)| !has(*cap))
                .map(|(_, name, what)| format!("{name} ({what})"))
                .collect();
            let names: Vec<&str> = NEEDED_CAPS.iter().map(|(_, n, _)| *n).collect();
            if missing.is_empty() {
                item(
                    "capabilities",
                    Status::Ok,
                    format!("held: {} (needed: the same)", names.join(", ")),
                );
            } else {
                item(
                    "capabilities",
                    Status::Fail,
                    format!(
                        "missing {}: run as root or grant them (needed: {})",
                        missing.join(", "),
                        names.join(", ")
                    ),
                );
            }
        }
    }

    let mut interfaces = Vec::new();
    for iface in &flags.ifaces {
        let Ok(index) = programs::ifindex(iface) else {
            continue;
        };
        let what = format!("--iface {iface}");
        match xdp_mode::link_facts(index) {
            Ok(facts) => {
                let plan = xdp_mode::plan(flags.xdp_policy, facts.kind.as_deref());
                let fallback = plan
                    .fallback
                    .map(|m| format!(", {m} if the driver refuses"))
                    .unwrap_or_default();
                item(
                    &what,
                    Status::Ok,
                    format!(
                        "XDP in {} mode{fallback}: {} (kind {}, XDP now: {})",
                        plan.mode,
                        plan.reason,
                        facts.kind.as_deref().unwrap_or("physical"),
                        facts.xdp
                    ),
                );
                interfaces.push(InterfacePlan {
                    iface: iface.clone(),
                    kind: facts.kind.clone(),
                    mode: plan.mode.to_string(),
                    fallback: plan.fallback.map(|m| m.to_string()),
                    reason: plan.reason.to_owned(),
                    attached_now: facts.xdp.to_string(),
                });
            }
            Err(e) => item(&what, Status::Fail, format!("netlink lookup failed: {e:#}")),
        }
    }

    let maps = map_memory(&flags.sizes);
    let map_bytes = maps.iter().map(|m| m.bytes).sum();
    Report {
        items,
        interfaces,
        maps,
        map_bytes,
    }
}

/// The effective capability set of this process (`CapEff` in
/// `/proc/self/status`).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The kernel's per-element overhead of a hash map entry (`struct
/// htab_elem` without its key and value, 64-bit).
const HTAB_ELEM: u64 = 48;
/// The overhead of an LPM trie node (`struct lpm_trie_node`, 64-bit).
const LPM_NODE: u64 = 32;

fn round8(n: usize) -> u64 {
    (n as u64).next_multiple_of(8)
}

/// The memory of each map whose size a flag sets, at `sizes`.
pub fn map_memory(sizes: &MapSizes) -> Vec<MapMemory> {
    use std::mem::size_of;
    let cpus = aya::util::nr_cpus().unwrap_or(1) as u64;
    let hash = |k: usize, v: usize| HTAB_ELEM + round8(k) + round8(v);
    let entry = |map, entries: u32, per: u64, preallocated| MapMemory {
        map,
        entries,
        bytes: u64::from(entries) * per,
        preallocated,
    };
    vec![
        entry(
            maps::SERVICES,
            sizes.services,
            hash(size_of::<ServiceKey>(), size_of::<ServiceValue>()),
            true,
        ),
        entry(
            maps::SVC_INFO,
            sizes.services,
            hash(4, size_of::<ServiceInfo>()),
            true,
        ),
        entry(
            maps::SVC_STATS,
            sizes.services.saturating_add(1),
            8 + cpus * round8(size_of::<SvcCounters>()),
            true,
        ),
        entry(
            maps::MAGLEV,
            crate::datapath::regions::chunks_for(sizes.maglev_slots as usize),
            round8(size_of::<lb_common::MaglevChunk>()),
            true,
        ),
        entry(
            maps::BACKENDS,
            sizes.backends,
            round8(size_of::<Backend>()),
            true,
        ),
        entry(
            maps::CONNTRACK,
            sizes.conntrack,
            hash(size_of::<CtKey>(), size_of::<CtValue>()),
            true,
        ),
        entry(
            maps::CT_EMBRYO,
            sizes.embryonic,
            hash(size_of::<CtKey>(), size_of::<CtValue>()),
            true,
        ),
        entry(
            maps::AFFINITY,
            sizes.affinity,
            hash(size_of::<AffinityKey>(), size_of::<AffinityValue>()),
            true,
        ),
        entry(
            maps::SRC_RANGES,
            sizes.src_ranges,
            LPM_NODE + round8(size_of::<SrcRange>()) + 4,
            false,
        ),
    ]
}

/// `n` bytes as KiB, MiB or GiB.
pub fn human_bytes(n: u64) -> String {
    const K: f64 = 1024.0;
    let f = n as f64;
    if f >= K * K * K {
        format!("{:.1} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.1} MiB", f / (K * K))
    } else {
        format!("{:.1} KiB", f / K)
    }
}

/// The report as `lb-agent check` prints it.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let width = r.items.iter().map(|i| i.what.len()).max().unwrap_or(0);
    for i in &r.items {
        let _ = writeln!(
            out,
            "{:<4}  {:<width$}  {}",
            i.status.as_str(),
            i.what,
            i.detail
        );
    }
    let _ = writeln!(
        out,
        "\nmap memory at the configured sizes: {} (estimate)",
        human_bytes(r.map_bytes)
    );
    for m in &r.maps {
        let _ = writeln!(
            out,
            "  {:<18} {:>9} entries  {:>10}{}",
            m.map,
            m.entries,
            human_bytes(m.bytes),
            if m.preallocated {
                ""
            } else {
                "  (at most; allocated as used)"
            }
        );
    }
    let _ = writeln!(
        out,
        "\n{}",
        if r.fails() {
            "run would stop: fix the FAIL lines"
        } else {
            "run can start"
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_memory_grows_with_the_size_flags() {
        let small = map_memory(&MapSizes {
            conntrack: 1000,
            ..MapSizes::default()
        });
        let big = map_memory(&MapSizes {
            conntrack: 2000,
            ..MapSizes::default()
        });
        let ct = |v: &[MapMemory]| {
            v.iter()
                .find(|m| m.map == maps::CONNTRACK)
                .map(|m| m.bytes)
                .unwrap_or_default()
        };
        assert_eq!(ct(&big), 2 * ct(&small));
        assert!(ct(&small) > 1000 * (HTAB_ELEM + 8));
    }

    #[test]
    fn missing_paths_are_named_by_their_flag() {
        let flags = Flags {
            ifaces: vec!["lb-nosuch0".to_owned()],
            manifests: Some(PathBuf::from("/nonexistent/lb-check")),
            kubeconfig: Some(PathBuf::from("/nonexistent/lb-kubeconfig")),
            bpffs: PathBuf::from("/nonexistent/lb-bpffs"),
            cgroup2: None,
            metrics_addr: "127.0.0.1:0".parse().expect("addr"),
            health_addr: "127.0.0.1:0".parse().expect("addr"),
            pod_ifaces: vec!["lxc*".to_owned(), "[".to_owned()],
            xdp_policy: XdpPolicy::Auto,
            sizes: MapSizes::default(),
            socket_lb: true,
        };
        let errors = flag_errors(&flags);
        let starts: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            starts,
            [
                "--iface lb-nosuch0",
                "--manifests /nonexistent/lb-check",
                "--kubeconfig /nonexistent/lb-kubeconfig",
                "--pod-ifaces [",
            ],
            "{errors:#?}"
        );
        assert!(errors[1].ends_with("no such directory"), "{}", errors[1]);
    }
}
