//! Loading the eBPF object and attaching its programs through pinned links.
//!
//! Every attachment is a bpf_link pinned under `<bpffs>/links`, so programs
//! stay attached when the agent exits. A restarted agent finds the pins and
//! swaps its freshly loaded program into each link atomically
//! (`bpf_link_update`), so the datapath never has a gap.

use std::{
    collections::{BTreeSet, HashSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
};
use lb_common::maps;
use tracing::{debug, info, warn};

use super::bpffs;

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Map capacities chosen at load time (only used when a map is created; an
/// existing pin keeps its size).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Frontends.
    pub services: u32,
    /// Backends.
    pub backends: u32,
    /// Conntrack entries (two per flow).
    pub conntrack: u32,
    /// ClientIP affinity entries (one per client per Service port).
    pub affinity: u32,
    /// Source ranges (one per CIDR per Service port).
    pub src_ranges: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: maps::SERVICES_MAX,
            backends: maps::BACKENDS_MAX,
            conntrack: maps::CONNTRACK_MAX,
            affinity: maps::AFFINITY_MAX,
            src_ranges: maps::SRC_RANGES_MAX,
        }
    }
}

/// The programs [`Programs::test_run`] can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestProgram {
    /// XDP on a node interface.
    XdpNode,
    /// TC ingress on a node interface.
    TcNode,
    /// TC ingress on a pod interface.
    TcPod,
}

/// Kinds of attachment, each with its own pin name prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    TcNode,
    TcPod,
}

impl Hook {
    fn prefix(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp-",
            Hook::TcNode => "tcnode-",
            Hook::TcPod => "tcpod-",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Hook::Xdp => maps::PROG_XDP_NODE,
            Hook::TcNode => maps::PROG_TC_NODE,
            Hook::TcPod => maps::PROG_TC_POD,
        }
    }
}

/// The loaded programs and the links this agent manages.
pub struct Programs {
    ebpf: Ebpf,
    links: PathBuf,
    /// Pins this process has attached or adopted.
    owned: HashSet<String>,
    xdp_mode: XdpMode,
}

impl Programs {
    /// Loads the object, creating or re-using the pinned maps under `bpffs`.
    pub fn load(bpffs: &Path, sizes: MapSizes, xdp_mode: XdpMode) -> Result<Self> {
        let maps_dir = bpffs::maps_dir(bpffs);
        let paths: Vec<(&str, PathBuf)> = maps::ALL
            .iter()
            .map(|name| (*name, maps_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(maps::SERVICES, sizes.services)
            .map_max_entries(maps::SVC_INFO, sizes.services)
            .map_max_entries(maps::SVC_STATS, sizes.services.saturating_add(1))
            .map_max_entries(maps::MAGLEV, sizes.services)
            .map_max_entries(maps::BACKENDS, sizes.backends)
            .map_max_entries(maps::CONNTRACK, sizes.conntrack)
            .map_max_entries(maps::AFFINITY, sizes.affinity)
            .map_max_entries(maps::SRC_RANGES, sizes.src_ranges);
        let mut ebpf = loader.load(EBPF_OBJECT).context(
            "load the eBPF object (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with BTF)",
        )?;
        for hook in [Hook::Xdp, Hook::TcNode, Hook::TcPod] {
            let name = hook.program();
            let prog = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?;
            let res = match hook {
                Hook::Xdp => <&mut Xdp>::try_from(prog)?.load(),
                Hook::TcNode | Hook::TcPod => <&mut SchedClassifier>::try_from(prog)?.load(),
            };
            res.with_context(|| format!("verifier rejected {name}"))?;
        }
        Ok(Self {
            ebpf,
            links: bpffs::links_dir(bpffs),
            owned: HashSet::new(),
            xdp_mode,
        })
    }

    /// Attaches XDP and the TC fallback to a node interface.
    pub fn attach_node(&mut self, ifname: &str) -> Result<()> {
        let ifindex = ifindex(ifname)?;
        self.attach(Hook::Xdp, ifname, ifindex)?;
        self.attach(Hook::TcNode, ifname, ifindex)
    }

    /// Attaches the pod program to every interface matching `patterns` and
    /// detaches it from interfaces that are gone or no longer match.
    pub fn sync_pods(&mut self, patterns: &[glob::Pattern]) -> Result<()> {
        let wanted: BTreeSet<(u32, String)> = interfaces()?
            .into_iter()
            .filter(|(_, name)| patterns.iter().any(|p| p.matches(name)))
            .collect();
        let wanted_pins: HashSet<String> = wanted
            .iter()
            .map(|(idx, _)| pin_name(Hook::TcPod, *idx))
            .collect();
        for pin in self.pins(Hook::TcPod)? {
            if !wanted_pins.contains(&pin) {
                // Removing the last reference detaches the link.
                fs::remove_file(self.links.join(&pin)).with_context(|| format!("unpin {pin}"))?;
                self.owned.remove(&pin);
                info!(pin, "detached from pod interface");
            }
        }
        for (idx, name) in &wanted {
            if let Err(e) = self.attach(Hook::TcPod, name, *idx) {
                // One odd interface must not stop the others.
                warn!(iface = %name, "attach to pod interface failed: {e:#}");
            }
        }
        Ok(())
    }

    fn pins(&self, hook: Hook) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in
            fs::read_dir(&self.links).with_context(|| format!("read {}", self.links.display()))?
        {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(hook.prefix()) {
                out.push(name);
            }
        }
        Ok(out)
    }

    fn attach(&mut self, hook: Hook, ifname: &str, ifindex: u32) -> Result<()> {
        let pin = pin_name(hook, ifindex);
        if self.owned.contains(&pin) {
            return Ok(());
        }
        let path = self.links.join(&pin);
        if path.exists() {
            match self.adopt(hook, &path) {
                Ok(()) => {
                    info!(iface = ifname, pin, "re-adopted pinned link");
                    self.owned.insert(pin);
                    return Ok(());
                }
                Err(e) => {
                    // A link left behind by a deleted interface: replace it.
                    debug!(pin, "stale pinned link ({e:#}); attaching afresh");
                    fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
                }
            }
        }
        let link: FdLink = match hook {
            Hook::Xdp => {
                let mode = self.xdp_mode;
                let prog: &mut Xdp = self.program(hook)?.try_into()?;
                let id = prog.attach_to_if_index(ifindex, mode).with_context(|| {
                    format!(
                        "attach XDP to {ifname}: another XDP program may be attached \
                         (check `ip link show {ifname}`), or the driver lacks native XDP \
                         (try --xdp-mode skb)"
                    )
                })?;
                prog.take_link(id)?.try_into()?
            }
            Hook::TcNode | Hook::TcPod => {
                let prog: &mut SchedClassifier = self.program(hook)?.try_into()?;
                let id = prog
                    .attach(ifname, TcAttachType::Ingress)
                    .with_context(|| {
                        format!("attach TC ingress to {ifname} (TCX needs Linux 6.6 or later)")
                    })?;
                prog.take_link(id)?.try_into()?
            }
        };
        link.pin(&path)
            .with_context(|| format!("pin link {}", path.display()))?;
        info!(iface = ifname, pin, "attached");
        self.owned.insert(pin);
        Ok(())
    }

    /// Swaps this agent's program into a pinned link left by an earlier one.
    fn adopt(&mut self, hook: Hook, path: &Path) -> Result<()> {
        let link: FdLink = PinnedLink::from_pin(path)?.into();
        match hook {
            Hook::Xdp => {
                let prog: &mut Xdp = self.program(hook)?.try_into()?;
                let id = prog.attach_to_link(XdpLink::try_from(link)?)?;
                // Keep the link alive through its pin only, not this process.
                drop(prog.take_link(id)?);
            }
            Hook::TcNode | Hook::TcPod => {
                let prog: &mut SchedClassifier = self.program(hook)?.try_into()?;
                let id = prog.attach_to_link(SchedClassifierLink::try_from(link)?)?;
                drop(prog.take_link(id)?);
            }
        }
        Ok(())
    }

    /// Runs one program on `packet` with BPF_PROG_TEST_RUN (no interface
    /// involved; map side effects are real) and returns its return code and
    /// the packet as it left the program.
    pub fn test_run(&mut self, program: TestProgram, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        let hook = match program {
            TestProgram::XdpNode => Hook::Xdp,
            TestProgram::TcNode => Hook::TcNode,
            TestProgram::TcPod => Hook::TcPod,
        };
        // Room for packets that grow (an ICMP error is 28 bytes longer).
        let mut out = vec![0u8; packet.len() + 256];
        let prog = self.program(hook)?;
        let o = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let res = match hook {
            Hook::Xdp => <&mut Xdp>::try_from(prog)?.test_run(o),
            Hook::TcNode | Hook::TcPod => <&mut SchedClassifier>::try_from(prog)?.test_run(o),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {}", hook.program()))?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    fn program(&mut self, hook: Hook) -> Result<&mut aya::programs::Program> {
        let name = hook.program();
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))
    }
}

/// Loads the object without pins and attaches its pass-only XDP program to
/// `ifaces` (in the calling thread's network namespace); the returned handle
/// keeps the attachments alive. Test rigs use it on the fabric side of veths.
pub fn attach_xdp_pass(ifaces: &[&str]) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    // Nothing but the pass program runs: keep the unused maps tiny.
    for name in [
        maps::SERVICES,
        maps::SVC_INFO,
        maps::SVC_STATS,
        maps::MAGLEV,
        maps::AFFINITY,
        maps::SRC_RANGES,
        maps::BACKENDS,
        maps::CONNTRACK,
    ] {
        loader.map_max_entries(name, 16);
    }
    let mut ebpf = loader.load(EBPF_OBJECT).context("load the eBPF object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(maps::PROG_XDP_PASS)
        .context("pass program missing")?
        .try_into()?;
    prog.load()?;
    for iface in ifaces {
        prog.attach(iface, XdpMode::Default)
            .with_context(|| format!("attach the pass program to {iface}"))?;
    }
    Ok(ebpf)
}

fn pin_name(hook: Hook, ifindex: u32) -> String {
    format!("{}{ifindex}", hook.prefix())
}

/// The index of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let idx = nix::net::if_::if_nametoindex(name)
        .with_context(|| format!("no interface {name} in this network namespace"))?;
    if idx == 0 {
        bail!("no interface {name}");
    }
    Ok(idx)
}

/// Every interface of this network namespace, as (index, name).
pub fn interfaces() -> Result<Vec<(u32, String)>> {
    let list = nix::net::if_::if_nameindex().context("list interfaces")?;
    Ok(list
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect())
}

/// Removes every pin under `bpffs` (links first, so programs detach before
/// their maps go) and the directories the agent made.
pub fn cleanup(bpffs: &Path) -> Result<()> {
    for dir in [bpffs::links_dir(bpffs), bpffs::maps_dir(bpffs)] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        fs::remove_dir(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(())
}
