//! Loading the eBPF object and attaching its programs through pinned links.
//!
//! Every attachment is a bpf_link pinned under `<bpffs>/links`, so programs
//! stay attached when the agent exits. A restarted agent finds the pins and
//! swaps its freshly loaded program into each link atomically
//! (`bpf_link_update`), so the datapath never has a gap.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
};
use lb_common::maps;
use tracing::{debug, info, warn};

use super::{
    bpffs, sys,
    xdp_mode::{self, Attachment, XdpPolicy},
};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Names a file holding another build of the eBPF object to load instead of
/// the built-in one: the benchmark's stage-by-stage builds (`lb_stop`, see
/// README, Benchmarks). Nothing else should set it.
pub const OBJECT_FILE_ENV: &str = "LB_EBPF_OBJECT_FILE";

/// The object to load: the built-in one, unless [`OBJECT_FILE_ENV`] names
/// another.
fn object() -> Result<std::borrow::Cow<'static, [u8]>> {
    let Some(path) = std::env::var_os(OBJECT_FILE_ENV) else {
        return Ok(EBPF_OBJECT.into());
    };
    warn!(path = %Path::new(&path).display(), "loading the eBPF object named by {OBJECT_FILE_ENV}");
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "read {} (named by {OBJECT_FILE_ENV})",
            Path::new(&path).display()
        )
    })?;
    Ok(bytes.into())
}

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
    /// Embryonic conntrack entries (two per flow not established yet).
    pub embryonic: u32,
    /// ClientIP affinity entries (one per client per Service port).
    pub affinity: u32,
    /// Source ranges (one per CIDR per Service port).
    pub src_ranges: u32,
    /// Slots of the flat Maglev array (rounded up to whole elements).
    pub maglev_slots: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: maps::SERVICES_MAX,
            backends: maps::BACKENDS_MAX,
            conntrack: maps::CONNTRACK_MAX,
            embryonic: maps::CT_EMBRYO_MAX,
            affinity: maps::AFFINITY_MAX,
            src_ranges: maps::SRC_RANGES_MAX,
            maglev_slots: lb_common::service::MAGLEV_SLOTS_DEFAULT,
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
    /// TC egress (node and pod interfaces).
    TcEgress,
    /// The pass-only XDP program (loaded on first use).
    XdpPass,
    /// The socket hooks' decision over a request frame (loaded on first
    /// use; see `lb_common::sock::TraceRequest`).
    SockTrace,
}

impl TestProgram {
    /// The program's name in the object (as `bpftool prog` shows it).
    pub fn name(self) -> &'static str {
        match self {
            TestProgram::XdpNode => Hook::Xdp.program(),
            TestProgram::TcNode => Hook::TcNode.program(),
            TestProgram::TcPod => Hook::TcPod.program(),
            TestProgram::TcEgress => Hook::TcPodEgress.program(),
            TestProgram::XdpPass => maps::PROG_XDP_PASS,
            TestProgram::SockTrace => maps::PROG_SOCK_TRACE,
        }
    }
}

/// Kinds of attachment, each with its own pin name prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    TcNode,
    TcPod,
    /// Egress of a node interface: replies of backends on the node itself
    /// to outside clients.
    TcNodeEgress,
    /// Egress of a pod interface: replies of backends on the node itself
    /// to the pod.
    TcPodEgress,
}

impl Hook {
    fn prefix(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp-",
            Hook::TcNode => "tcnode-",
            Hook::TcPod => "tcpod-",
            Hook::TcNodeEgress => "tcnodeout-",
            Hook::TcPodEgress => "tcpodout-",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Hook::Xdp => maps::PROG_XDP_NODE,
            Hook::TcNode => maps::PROG_TC_NODE,
            Hook::TcPod => maps::PROG_TC_POD,
            Hook::TcNodeEgress | Hook::TcPodEgress => maps::PROG_TC_EGRESS,
        }
    }

    /// Where a TC hook attaches (XDP has no such choice).
    fn tc_direction(self) -> TcAttachType {
        match self {
            Hook::TcNodeEgress | Hook::TcPodEgress => TcAttachType::Egress,
            Hook::Xdp | Hook::TcNode | Hook::TcPod => TcAttachType::Ingress,
        }
    }
}

/// The loaded programs and the links this agent manages.
pub struct Programs {
    ebpf: Ebpf,
    links: PathBuf,
    /// Pins this process has attached or adopted.
    owned: HashSet<String>,
    xdp_policy: XdpPolicy,
    /// The XDP mode of each node interface attached so far, and why.
    xdp_attachments: Vec<Attachment>,
    /// Why the socket hooks could not be loaded, if they could not.
    sock_error: Option<anyhow::Error>,
}

impl Programs {
    /// Loads the object, creating or re-using the pinned maps under `bpffs`.
    pub fn load(bpffs: &Path, sizes: MapSizes, xdp_policy: XdpPolicy) -> Result<Self> {
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
            .map_max_entries(
                maps::MAGLEV,
                super::regions::chunks_for(sizes.maglev_slots as usize).max(1),
            )
            .map_max_entries(maps::BACKENDS, sizes.backends)
            .map_max_entries(maps::CONNTRACK, sizes.conntrack)
            .map_max_entries(maps::CT_EMBRYO, sizes.embryonic)
            .map_max_entries(maps::AFFINITY, sizes.affinity)
            .map_max_entries(maps::SRC_RANGES, sizes.src_ranges);
        let ebpf = loader.load(&object()?).context(
            "load the eBPF object (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with BTF)",
        )?;
        Self::verify(ebpf, bpffs, xdp_policy)
    }

    /// Loads a private copy for tracing: it reads the live frontends, Maglev
    /// tables, backends, source ranges and config through their pins (only
    /// the agent writes those), while its conntrack, affinity, fragment and
    /// counter maps are its own, small and empty, so that running it changes
    /// nothing the live datapath sees. It attaches nothing.
    pub fn load_shadow(bpffs: &Path) -> Result<Self> {
        let maps_dir = bpffs::maps_dir(bpffs);
        let mut loader = EbpfLoader::new();
        for name in AGENT_WRITTEN {
            let path = maps_dir.join(name);
            if !path.exists() {
                bail!(
                    "{} is missing: no datapath is pinned under {} (is the agent running?)",
                    path.display(),
                    bpffs.display()
                );
            }
            loader.map_pin_path(name, path);
        }
        loader
            .map_max_entries(maps::CONNTRACK, SHADOW_ENTRIES)
            .map_max_entries(maps::CT_EMBRYO, SHADOW_ENTRIES)
            .map_max_entries(maps::AFFINITY, SHADOW_ENTRIES)
            .map_max_entries(maps::FRAGS, SHADOW_ENTRIES)
            .map_max_entries(maps::SNAT_CURSORS, SHADOW_ENTRIES);
        let ebpf = loader
            .load(EBPF_OBJECT)
            .context("load a private copy of the eBPF object")?;
        let mut shadow = Self::verify(ebpf, bpffs, XdpPolicy::default())?;
        // Its program arrays are its own too: nothing live calls them.
        shadow.install_sctp()?;
        Ok(shadow)
    }

    /// Puts this object's SCTP checksum programs into the pinned program
    /// arrays the main programs tail-call when they rewrote an SCTP port.
    /// The arrays are shared with an older agent's programs, which then
    /// reach the new checksum programs (one record layout, `SCTP_CRC`):
    /// part of the swap to this agent's programs, made when the maps hold
    /// the desired state, just before the links are swapped. Pinned,
    /// because the kernel empties a program array when its last user
    /// reference goes, which this agent's exit would be.
    pub fn install_sctp(&mut self) -> Result<()> {
        for (name, array) in SCTP_CRC_PROGRAMS {
            let fd = self
                .ebpf
                .program(name)
                .with_context(|| format!("program {name} missing"))?
                .fd()
                .with_context(|| format!("program {name} not loaded"))?
                .try_clone()
                .with_context(|| format!("duplicate the descriptor of {name}"))?;
            let map = self.map_mut(array)?;
            aya::maps::ProgramArray::try_from(map)
                .with_context(|| format!("{array} is not a program array"))?
                .set(0, &fd, 0)
                .with_context(|| format!("put {name} into {array}"))?;
        }
        Ok(())
    }

    /// Runs the verifier on every attachable program of a loaded object.
    /// The programs are verified side by side, one per core: the verifier
    /// is most of the agent's start, and a privileged load does not wait
    /// for another's.
    fn verify(mut ebpf: Ebpf, bpffs: &Path, xdp_policy: XdpPolicy) -> Result<Self> {
        // One hook per program: the two egress hooks share theirs.
        let packet: Vec<&str> = [Hook::Xdp, Hook::TcNode, Hook::TcPod, Hook::TcPodEgress]
            .into_iter()
            .map(Hook::program)
            .chain(SCTP_CRC_PROGRAMS.iter().map(|(name, _)| *name))
            .collect();
        let sock: Vec<&str> = super::cgroup::HOOKS.iter().map(|h| h.program).collect();
        let started = std::time::Instant::now();
        let mut progs: Vec<(&str, &mut aya::programs::Program)> = ebpf
            .programs_mut()
            .filter(|(name, _)| packet.contains(name) || sock.contains(name))
            .collect();
        if let Some(missing) = packet
            .iter()
            .chain(&sock)
            .find(|name| !progs.iter().any(|(n, _)| n == *name))
        {
            bail!("program {missing} missing");
        }
        // The packet programs first: they are the largest.
        progs.sort_by_key(|(name, _)| !packet.contains(name));
        let results = crate::parallel::map_each(progs, |(name, prog)| (name, verify_one(prog)));
        let mut sock_error = None;
        for (name, res) in results {
            match res {
                Ok(()) => {}
                // The socket hooks are an addition the packet path does
                // not need: a kernel that refuses them runs without (the
                // caller says so).
                Err(e) if sock.contains(&name) => {
                    sock_error.get_or_insert(e.context(format!("verifier rejected {name}")));
                }
                Err(e) => return Err(e.context(format!("verifier rejected {name}"))),
            }
        }
        debug!(took_ms = started.elapsed().as_millis(), "programs verified");
        Ok(Self {
            ebpf,
            links: bpffs::links_dir(bpffs),
            owned: HashSet::new(),
            xdp_policy,
            xdp_attachments: Vec::new(),
            sock_error,
        })
    }

    /// Why the socket hooks are not loaded, if they are not.
    pub fn sock_error(&self) -> Option<&anyhow::Error> {
        self.sock_error.as_ref()
    }

    /// Attaches the socket hooks at the root of the cgroup v2 hierarchy
    /// mounted at `cgroup` (see [`super::cgroup`]).
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<()> {
        if let Some(e) = &self.sock_error {
            bail!("the socket hooks are not loaded: {e:#}");
        }
        super::cgroup::attach(&mut self.ebpf, &self.links, cgroup)
    }

    /// One of the loaded object's maps (a shadow copy's private ones
    /// included), for seeding and reading back around a test run.
    pub fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the object"))
    }

    /// Attaches XDP, the TC fallback and the egress program to a node
    /// interface.
    pub fn attach_node(&mut self, ifname: &str) -> Result<()> {
        let ifindex = ifindex(ifname)?;
        self.attach(Hook::Xdp, ifname, ifindex)?;
        self.attach(Hook::TcNode, ifname, ifindex)?;
        self.attach(Hook::TcNodeEgress, ifname, ifindex)
    }

    /// Attaches the node programs to `required` (an error stops) and to
    /// `extra` (an error is logged: one odd interface must not stop the
    /// others), and detaches them from every other interface they were
    /// on: an interface that no longer carries a NodePort address, or one
    /// an earlier agent was given. Detached at once, so a program of an
    /// older release never goes on running on its own maps.
    pub fn sync_node(&mut self, required: &[String], extra: &[String]) -> Result<()> {
        let mut wanted = HashSet::new();
        for (iface, must) in required
            .iter()
            .map(|i| (i, true))
            .chain(extra.iter().map(|i| (i, false)))
        {
            match self.attach_node(iface) {
                Ok(()) => {}
                Err(e) if must => return Err(e),
                Err(e) => {
                    warn!(%iface, "NodePorts on this interface's addresses are not served: {e:#}");
                    continue;
                }
            }
            let idx = ifindex(iface)?;
            wanted.insert(pin_name(Hook::Xdp, idx));
            wanted.insert(pin_name(Hook::TcNode, idx));
        }
        let names: HashMap<u32, String> = interfaces()?.into_iter().collect();
        for hook in [Hook::Xdp, Hook::TcNode] {
            for pin in self.pins(hook)? {
                if wanted.contains(&pin) {
                    continue;
                }
                // The pin goes first; a link whose interface is gone may
                // refuse the detach, and goes with the pin anyway.
                if let Err(e) = sys::detach_link_pin(&self.links.join(&pin)) {
                    debug!(pin, "detach: {e:#}");
                }
                self.owned.remove(&pin);
                let iface = pin
                    .strip_prefix(hook.prefix())
                    .and_then(|i| i.parse().ok())
                    .and_then(|i: u32| names.get(&i).cloned())
                    .unwrap_or_default();
                if hook == Hook::Xdp {
                    self.xdp_attachments.retain(|a| a.iface != iface);
                }
                info!(pin, %iface, "detached from an interface that no longer serves NodePorts");
            }
        }
        Ok(())
    }

    /// The XDP mode each node interface got, and why.
    pub fn xdp_attachments(&self) -> &[Attachment] {
        &self.xdp_attachments
    }

    /// Attaches the pod programs (ingress and egress) to every interface
    /// matching `patterns` and detaches them from interfaces that are gone
    /// or no longer match.
    pub fn sync_pods(&mut self, patterns: &[glob::Pattern]) -> Result<()> {
        let wanted: BTreeSet<(u32, String)> = interfaces()?
            .into_iter()
            .filter(|(_, name)| patterns.iter().any(|p| p.matches(name)))
            .collect();
        for hook in [Hook::TcPod, Hook::TcPodEgress] {
            let wanted_pins: HashSet<String> =
                wanted.iter().map(|(idx, _)| pin_name(hook, *idx)).collect();
            for pin in self.pins(hook)? {
                if !wanted_pins.contains(&pin) {
                    // Removing the last reference detaches the link.
                    fs::remove_file(self.links.join(&pin))
                        .with_context(|| format!("unpin {pin}"))?;
                    self.owned.remove(&pin);
                    info!(pin, "detached from pod interface");
                }
            }
            for (idx, name) in &wanted {
                if let Err(e) = self.attach(hook, name, *idx) {
                    // One odd interface must not stop the others.
                    warn!(iface = %name, "attach to pod interface failed: {e:#}");
                }
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
        if hook == Hook::Xdp {
            return self.attach_xdp(ifname, ifindex, pin);
        }
        if !tcx_available() {
            self.attach_clsact(hook, ifname)?;
            self.owned.insert(pin);
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
        let prog: &mut SchedClassifier = self.program(hook)?.try_into()?;
        let id = prog.attach(ifname, hook.tc_direction()).with_context(|| {
            format!(
                "attach TC {:?} to {ifname} (TCX needs Linux 6.6 or later)",
                hook.tc_direction()
            )
        })?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        link.pin(&path)
            .with_context(|| format!("pin link {}", path.display()))?;
        info!(iface = ifname, pin, "attached");
        self.owned.insert(pin);
        Ok(())
    }

    /// Attaches XDP to a node interface in the mode [`xdp_mode::plan`]
    /// picks for it: a pinned link of that mode is re-adopted, one of
    /// another mode (an older agent's, or another `--xdp-mode`'s) is
    /// replaced, since a link keeps the mode it was made in. Logs the mode
    /// and why, and records it for the metrics.
    fn attach_xdp(&mut self, ifname: &str, ifindex: u32, pin: String) -> Result<()> {
        let facts = xdp_mode::link_facts(ifindex)
            .with_context(|| format!("look up {ifname} through netlink"))?;
        let plan = xdp_mode::plan(self.xdp_policy, facts.kind.as_deref());
        let path = self.links.join(&pin);

        let mut how = "new";
        if path.exists() {
            if facts.xdp.is(plan.mode) {
                match self.adopt(Hook::Xdp, &path) {
                    Ok(()) => {
                        self.xdp_attached(ifname, plan.mode, plan.reason, "re-adopted", pin);
                        return Ok(());
                    }
                    Err(e) => {
                        // A link left behind by a deleted interface: replace it.
                        debug!(pin, "stale pinned link ({e:#}); attaching afresh");
                        fs::remove_file(&path)
                            .with_context(|| format!("remove {}", path.display()))?;
                    }
                }
            } else {
                // The interface cannot hold programs of two modes: the old
                // one goes first. TC on the interface carries the packets
                // of the moment between.
                sys::detach_link_pin(&path).with_context(|| {
                    format!(
                        "replace the XDP link on {ifname}, attached in {} mode",
                        facts.xdp
                    )
                })?;
                how = match facts.xdp {
                    xdp_mode::Attached::Native => "replaced a native-mode link",
                    xdp_mode::Attached::Skb => "replaced an skb-mode link",
                    _ => "replaced a stale link",
                };
            }
        }
        let (mode, reason, link) = match self.xdp_link(ifname, ifindex, plan.mode) {
            Ok(link) => (plan.mode, plan.reason.to_string(), link),
            Err(e) => {
                let Some(fallback) = plan.fallback else {
                    return Err(e);
                };
                let link = self
                    .xdp_link(ifname, ifindex, fallback)
                    .with_context(|| format!("after native mode failed on {ifname}: {e:#}"))?;
                let reason = format!(
                    "{} (native mode failed: {})",
                    xdp_mode::REASON_NO_NATIVE,
                    e.root_cause()
                );
                (fallback, reason, link)
            }
        };
        link.pin(&path)
            .with_context(|| format!("pin link {}", path.display()))?;
        self.xdp_attached(ifname, mode, &reason, how, pin);
        Ok(())
    }

    /// Attaches the XDP program to interface `ifindex` in `mode`.
    fn xdp_link(&mut self, ifname: &str, ifindex: u32, mode: xdp_mode::Mode) -> Result<FdLink> {
        let prog: &mut Xdp = self.program(Hook::Xdp)?.try_into()?;
        let id = prog
            .attach_to_if_index(ifindex, mode.aya())
            .with_context(|| {
                format!(
                    "attach XDP to {ifname} in {mode} mode: another XDP program may be \
                     attached (check `ip link show {ifname}`){}",
                    if mode == xdp_mode::Mode::Native {
                        ", or the driver lacks native XDP (try --xdp-mode auto or skb)"
                    } else {
                        ""
                    }
                )
            })?;
        Ok(prog.take_link(id)?.try_into()?)
    }

    /// Logs an XDP attachment (one line per interface) and records it.
    fn xdp_attached(
        &mut self,
        ifname: &str,
        mode: xdp_mode::Mode,
        reason: &str,
        how: &str,
        pin: String,
    ) {
        info!(iface = %ifname, mode = %mode, reason, link = how, pin, "XDP attached");
        self.owned.insert(pin);
        self.xdp_attachments.retain(|a| a.iface != ifname);
        self.xdp_attachments.push(Attachment {
            iface: ifname.to_string(),
            mode,
            reason: reason.to_string(),
        });
    }

    /// Attaches a TC program the way kernels before 6.6 (no TCX) allow: a
    /// cls_bpf filter on the clsact qdisc, at a fixed priority and handle.
    /// Such a filter outlives the agent by itself (the kernel holds it, no
    /// pin is needed), and a restarted agent replaces the program in it
    /// atomically by priority and handle; it goes away with its interface.
    fn attach_clsact(&mut self, hook: Hook, ifname: &str) -> Result<()> {
        let prog: &mut SchedClassifier = self.program(hook)?.try_into()?;
        let direction = hook.tc_direction();
        let existing =
            SchedClassifierLink::attached(ifname, direction, CLSACT_PRIORITY, CLSACT_HANDLE, None)
                .with_context(|| format!("no interface {ifname}"))?;
        let (id, how) = match prog.attach_to_link(existing) {
            Ok(id) => (id, "replaced the program in the clsact filter"),
            Err(_) => {
                // EEXIST: the qdisc is there already, which is what we want.
                let _ = tc::qdisc_add_clsact(ifname);
                let id = prog
                    .attach_with_options(
                        ifname,
                        direction,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: CLSACT_PRIORITY,
                            handle: CLSACT_HANDLE,
                            ..NlOptions::default()
                        }),
                    )
                    .with_context(|| format!("attach a clsact {direction:?} filter to {ifname}"))?;
                (id, "attached a clsact filter (no TCX on this kernel)")
            }
        };
        // Dropping the link would detach it: the filter must stay when this
        // agent exits, like a pinned link.
        std::mem::forget(prog.take_link(id)?);
        info!(iface = ifname, "{how}");
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
            Hook::TcNode | Hook::TcPod | Hook::TcNodeEgress | Hook::TcPodEgress => {
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
        self.test_run_on(program, packet, None)
    }

    /// [`Self::test_run`] as if the packet arrived on interface `ifindex`
    /// (in the caller's network namespace), so that FIB lookups and the
    /// interface checks see a real device.
    pub fn test_run_on(
        &mut self,
        program: TestProgram,
        packet: &[u8],
        ifindex: Option<u32>,
    ) -> Result<(u32, Vec<u8>)> {
        let (ret, out, _) = self.test_run_timed(program, packet, ifindex, 1)?;
        Ok((ret, out))
    }

    /// Runs `program` on `packet` `repeat` times in one BPF_PROG_TEST_RUN
    /// (map side effects of every run are real) and returns the last
    /// return code and the kernel's mean time per run, which leaves out the
    /// syscall: the benchmarks' per-packet cost.
    pub fn test_run_repeat(
        &mut self,
        program: TestProgram,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration)> {
        let (ret, _, duration) = self.test_run_timed(program, packet, None, repeat.max(1))?;
        Ok((ret, duration))
    }

    fn test_run_timed(
        &mut self,
        program: TestProgram,
        packet: &[u8],
        ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, std::time::Duration)> {
        let name = program.name();
        // Room for packets that grow (an ICMP error is 28 bytes longer).
        let mut out = vec![0u8; packet.len() + 256];
        let prog = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?;
        let is_xdp = matches!(
            program,
            TestProgram::XdpNode | TestProgram::XdpPass | TestProgram::SockTrace
        );
        let ctx = ifindex.map(|i| test_ctx(is_xdp, i, packet.len()));
        let o = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: ctx.as_deref(),
            repeat,
            ..TestRunOptions::default()
        };
        let res = match program {
            TestProgram::XdpNode | TestProgram::XdpPass | TestProgram::SockTrace => {
                let xdp = <&mut Xdp>::try_from(prog)?;
                if xdp.fd().is_err() {
                    xdp.load()
                        .with_context(|| format!("verifier rejected {name}"))?;
                }
                xdp.test_run(o)
            }
            TestProgram::TcNode | TestProgram::TcPod | TestProgram::TcEgress => {
                <&mut SchedClassifier>::try_from(prog)?.test_run(o)
            }
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out, res.duration))
    }

    fn program(&mut self, hook: Hook) -> Result<&mut aya::programs::Program> {
        let name = hook.program();
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))
    }
}

/// Priority of the agent's clsact filters on kernels without TCX.
const CLSACT_PRIORITY: u16 = 1;
/// Handle of the agent's clsact filters on kernels without TCX.
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x1b);

/// Whether TC programs attach through TCX links (Linux 6.6); otherwise
/// through clsact filters.
pub fn tcx_available() -> bool {
    KernelVersion::current().map_or(true, |v| v >= KernelVersion::new(6, 6, 0))
}

/// The SCTP checksum programs and the program array each is tail-called
/// through (slot 0).
const SCTP_CRC_PROGRAMS: [(&str, &str); 2] = [
    (maps::PROG_XDP_SCTP_CRC, maps::SCTP_CRC_XDP),
    (maps::PROG_TC_SCTP_CRC, maps::SCTP_CRC_TC),
];

/// Maps only the agent writes, which a shadow copy shares with the live
/// datapath.
const AGENT_WRITTEN: [&str; 8] = [
    maps::SERVICES,
    maps::MAGLEV,
    maps::BACKENDS,
    maps::SRC_RANGES,
    maps::CONFIG,
    maps::SVC_INFO,
    maps::DSR_PEERS,
    maps::IFACE_ADDRS,
];

/// Capacity of a shadow copy's private conntrack, affinity and fragment maps.
const SHADOW_ENTRIES: u32 = 1024;

/// A BPF_PROG_TEST_RUN context naming the ingress interface: `xdp_md`'s
/// `ingress_ifindex` (offset 12 of 24 bytes; `data_end`, offset 4, must
/// then be the packet's length) or `__sk_buff`'s `ifindex` (offset 40 of 192
/// bytes, the only device field the kernel accepts).
fn test_ctx(xdp: bool, ifindex: u32, packet_len: usize) -> Vec<u8> {
    let put =
        |ctx: &mut [u8], off: usize, v: u32| ctx[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    if xdp {
        let mut ctx = vec![0u8; 24];
        put(&mut ctx, 4, packet_len as u32);
        put(&mut ctx, 12, ifindex);
        ctx
    } else {
        let mut ctx = vec![0u8; 192];
        put(&mut ctx, 40, ifindex);
        ctx
    }
}

/// Which of the agent's programs is attached to interface `ifindex`, from
/// the link pins under `bpffs`.
pub fn attached_program(bpffs: &Path, ifindex: u32) -> Option<TestProgram> {
    let links = bpffs::links_dir(bpffs);
    [
        (Hook::Xdp, TestProgram::XdpNode),
        (Hook::TcPod, TestProgram::TcPod),
        (Hook::TcNode, TestProgram::TcNode),
    ]
    .into_iter()
    .find(|(hook, _)| links.join(pin_name(*hook, ifindex)).exists())
    .map(|(_, p)| p)
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
        maps::CT_EMBRYO,
        maps::SOCK_REV,
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

/// Removes every pin under `bpffs` (links first, each detached at once, so
/// no hook runs once this returns and programs go before their maps) and the
/// directories the agent made.
pub fn cleanup(bpffs: &Path) -> Result<()> {
    if !tcx_available() {
        // Without TCX the TC programs sit in clsact filters, not pins: remove
        // ours (by priority and handle) from every interface that has one.
        for (_, name) in interfaces()? {
            for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
                if let Ok(link) = SchedClassifierLink::attached(
                    &name,
                    direction,
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                ) {
                    use aya::programs::Link as _;
                    let _ = link.detach();
                }
            }
        }
    }
    for dir in [bpffs::links_dir(bpffs), bpffs::maps_dir(bpffs)] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let links = dir == bpffs::links_dir(bpffs);
        for entry in entries {
            let path = entry?.path();
            if links {
                sys::detach_link_pin(&path)?;
            } else {
                fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
            }
        }
        fs::remove_dir(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(())
}

/// Runs the verifier on one program of the kinds this object has.
fn verify_one(prog: &mut aya::programs::Program) -> Result<()> {
    use aya::programs::Program;
    match prog {
        Program::Xdp(p) => p.load()?,
        Program::SchedClassifier(p) => p.load()?,
        Program::CgroupSockAddr(p) => p.load()?,
        other => bail!("unexpected program type {:?}", other.prog_type()),
    }
    Ok(())
}
