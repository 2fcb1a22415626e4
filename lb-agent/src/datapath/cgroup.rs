//! Socket-level load balancing: the cgroup v2 hooks on the node's own
//! sockets (lb-ebpf's `sock` module), their scope and their links.
//!
//! The hooks attach at the root of the cgroup v2 hierarchy, which every
//! process of the machine is in or under, so they see every socket; they
//! act only on sockets of the network namespace whose cookie the agent
//! writes into the sock config map ([`write_scope`]). Several agents on one
//! machine (one per node namespace, as in the test rigs) each attach their
//! own hooks, which the kernel runs one after the other, each translating
//! only its own namespace's sockets.
//!
//! Every hook is a bpf_link pinned under `<bpffs>/links` (`sock-connect4`,
//! …), like the XDP and TC attachments: it stays when the agent exits, a
//! restarted agent swaps its program into it atomically
//! (`BPF_LINK_UPDATE`), and `lb-agent cleanup` detaches it by removing the
//! pin. The hooks are a table ([`HOOKS`]) so that the IPv6 ones are rows,
//! not code.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, Map, MapData, PerCpuArray},
    programs::{
        links::{CgroupAttachMode, FdLink},
        CgroupSockAddr,
    },
    Ebpf,
};
use lb_common::{
    maps,
    sock::{SockConfig, STAT_COUNT, STAT_NAMES},
};
use nix::mount::{mount, MsFlags};
use tracing::{debug, info, warn};

use super::{
    bpffs,
    sys::{self, bpf, obj_get, Attr},
};

/// One socket hook: its program and its link pin.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// The program's name in the object.
    pub program: &'static str,
    /// The link's pin name under `<bpffs>/links`.
    pub pin: &'static str,
}

/// Every socket hook, of both families.
pub const HOOKS: [Hook; 8] = [
    Hook {
        program: maps::PROG_SOCK_CONNECT4,
        pin: "sock-connect4",
    },
    Hook {
        program: maps::PROG_SOCK_SENDMSG4,
        pin: "sock-sendmsg4",
    },
    Hook {
        program: maps::PROG_SOCK_RECVMSG4,
        pin: "sock-recvmsg4",
    },
    Hook {
        program: maps::PROG_SOCK_GETPEERNAME4,
        pin: "sock-getpeername4",
    },
    Hook {
        program: maps::PROG_SOCK_CONNECT6,
        pin: "sock-connect6",
    },
    Hook {
        program: maps::PROG_SOCK_SENDMSG6,
        pin: "sock-sendmsg6",
    },
    Hook {
        program: maps::PROG_SOCK_RECVMSG6,
        pin: "sock-recvmsg6",
    },
    Hook {
        program: maps::PROG_SOCK_GETPEERNAME6,
        pin: "sock-getpeername6",
    },
];

/// Where the agent mounts a cgroup v2 hierarchy when none is mounted (on
/// hosts whose default hierarchy is v1, it can still be mounted beside).
pub const DEFAULT_MOUNT: &str = "/run/lb/cgroup2";

/// The root of a cgroup v2 hierarchy: `explicit` when given (mounting one
/// there if it is not a cgroup2 mount yet), else the first cgroup2 mount
/// that shows the whole hierarchy, else one mounted at [`DEFAULT_MOUNT`].
pub fn root(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        if !is_cgroup2(dir) {
            mount_cgroup2(dir)?;
        }
        return Ok(dir.to_path_buf());
    }
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    if let Some(dir) = cgroup2_root_mount(&mountinfo) {
        return Ok(dir);
    }
    let dir = Path::new(DEFAULT_MOUNT);
    mount_cgroup2(dir)?;
    info!(
        path = DEFAULT_MOUNT,
        "mounted a cgroup v2 hierarchy for the socket hooks"
    );
    Ok(dir.to_path_buf())
}

/// The first mounted cgroup v2 hierarchy that shows the whole hierarchy,
/// as [`root`] would take it, without mounting one.
pub fn mounted_root() -> Option<PathBuf> {
    cgroup2_root_mount(&fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// The mount point of the first cgroup2 mount in `mountinfo` whose root is
/// the hierarchy's root (`/`), as seen from this cgroup namespace.
fn cgroup2_root_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `id parent major:minor root mountpoint options [optional…] - fstype source super`
        let (head, tail) = line.split_once(" - ")?;
        let fstype = tail.split_whitespace().next()?;
        let mut fields = head.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(point)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_cgroup2(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

fn mount_cgroup2(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    mount(
        Some("cgroup2"),
        dir,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "mount a cgroup v2 hierarchy on {} (needs CAP_SYS_ADMIN; or pass --cgroup2 with a mounted one)",
            dir.display()
        )
    })?;
    if !is_cgroup2(dir) {
        bail!(
            "{} is still not a cgroup2 mount after mounting one",
            dir.display()
        );
    }
    Ok(())
}

/// The cookie of this thread's network namespace (`SO_NETNS_COOKIE`, Linux
/// 5.14), which the hooks compare with their socket's.
pub fn netns_cookie() -> Result<u64> {
    /// `SO_NETNS_COOKIE` from asm-generic/socket.h.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .context("open a socket to read the network namespace's cookie")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a u64 and `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("getsockopt SO_NETNS_COOKIE (needs Linux 5.14 or later)");
    }
    Ok(cookie)
}

/// Writes the hooks' scope: this network namespace's cookie.
pub fn write_scope(bpffs: &Path, netns_cookie: u64) -> Result<()> {
    let path = bpffs::maps_dir(bpffs).join(maps::SOCK_CONFIG);
    let map = Map::from_map_data(
        MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?,
    )?;
    let mut array: Array<MapData, SockConfig> = map
        .try_into()
        .with_context(|| format!("map {} has an unexpected layout", maps::SOCK_CONFIG))?;
    let cfg = SockConfig {
        netns_cookie,
        flags: 0,
        _pad: 0,
    };
    array
        .set(0, cfg, 0)
        .with_context(|| format!("write {}", maps::SOCK_CONFIG))
}

/// Attaches every socket hook at the root of the cgroup v2 hierarchy at
/// `cgroup`, through pinned links under `links`: an existing pin gets this
/// agent's program swapped in; a missing one is attached afresh.
pub fn attach(ebpf: &mut Ebpf, links: &Path, cgroup: &Path) -> Result<()> {
    let dir = fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
    for hook in HOOKS {
        let path = links.join(hook.pin);
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(hook.program)
            .with_context(|| format!("program {} missing", hook.program))?
            .try_into()?;
        if path.exists() {
            let prog_fd = prog.fd()?.as_fd().as_raw_fd();
            match update_pinned_link(&path, prog_fd) {
                Ok(()) => {
                    info!(pin = hook.pin, "re-adopted pinned socket hook");
                    continue;
                }
                Err(e) => {
                    debug!(
                        pin = hook.pin,
                        "stale pinned link ({e:#}); attaching afresh"
                    );
                    fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
                }
            }
        }
        // A link, not a legacy attachment: the kernel runs it beside other
        // programs on the same cgroup (other agents', systemd's).
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .with_context(|| {
                format!(
                    "attach {} to the cgroup v2 root {}",
                    hook.program,
                    cgroup.display()
                )
            })?;
        let link: FdLink = prog.take_link(id)?.try_into().with_context(|| {
            format!(
                "{}: the kernel gave no bpf_link (Linux 5.7+ needed)",
                hook.program
            )
        })?;
        link.pin(&path)
            .with_context(|| format!("pin link {}", path.display()))?;
        info!(pin = hook.pin, cgroup = %cgroup.display(), "attached socket hook");
    }
    Ok(())
}

/// Swaps `prog_fd` into the link pinned at `path` (`BPF_LINK_UPDATE`): the
/// hook never goes missing, unlike a detach and attach.
fn update_pinned_link(path: &Path, prog_fd: i32) -> Result<()> {
    let link = obj_get(path)?;
    /// `enum bpf_cmd`'s `BPF_LINK_UPDATE`.
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr: Attr = [0; 128];
    let update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is large enough and zeroed past the struct, as the
    // kernel requires of a `union bpf_attr`.
    unsafe {
        std::ptr::write_unaligned(attr.as_mut_ptr().cast::<LinkUpdate>(), update);
    }
    bpf(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
    Ok(())
}

/// Whether every socket hook is attached under `bpffs` (their link pins).
pub fn attached(bpffs: &Path) -> bool {
    let links = bpffs::links_dir(bpffs);
    HOOKS.iter().all(|h| links.join(h.pin).exists())
}

/// The socket-hook counters summed over CPUs, by name; none when the map
/// is not pinned (an agent without socket hooks).
pub fn counters(bpffs: &Path) -> Result<Vec<(&'static str, u64)>> {
    let path = bpffs::maps_dir(bpffs).join(maps::SOCK_STATS);
    let Ok(data) = MapData::from_pin(&path) else {
        return Ok(Vec::new());
    };
    let stats: PerCpuArray<MapData, u64> = Map::from_map_data(data)?
        .try_into()
        .with_context(|| format!("map {} has an unexpected layout", maps::SOCK_STATS))?;
    let mut out = Vec::with_capacity(STAT_COUNT as usize);
    for (idx, name) in STAT_NAMES.iter().enumerate() {
        let per_cpu = stats
            .get(&(idx as u32), 0)
            .with_context(|| format!("read {}", maps::SOCK_STATS))?;
        out.push((*name, per_cpu.iter().sum()));
    }
    Ok(out)
}

/// Adds `n` to socket counter `idx` (the counters the agent keeps itself,
/// such as sockets it ended); it writes CPU 0's slot, which the hooks
/// share, so an increment by a hook at the same moment may be lost.
pub fn add_counter(bpffs: &Path, idx: u32, n: u64) -> Result<()> {
    let path = bpffs::maps_dir(bpffs).join(maps::SOCK_STATS);
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    let mut stats: PerCpuArray<MapData, u64> = Map::from_map_data(data)?.try_into()?;
    let mut values: Vec<u64> = stats.get(&idx, 0)?.iter().copied().collect();
    if let Some(first) = values.first_mut() {
        *first += n;
    }
    let values = aya::maps::PerCpuValues::try_from(values)
        .map_err(|e| anyhow::anyhow!("per-CPU values: {e}"))?;
    stats
        .set(idx, values, 0)
        .with_context(|| format!("write {}", maps::SOCK_STATS))
}

/// Gets socket-level load balancing ready at the agent's start: writes the
/// hooks' scope (this network namespace) and finds or mounts the cgroup v2
/// hierarchy, whose root the caller attaches the hooks to once the maps
/// hold the desired state. `None` when it is off: turned off by the user
/// (any hooks an earlier agent left are detached), or not loadable on this
/// kernel (`load_error`), which is logged with what it leaves out.
pub fn prepare(
    bpffs: &Path,
    enabled: bool,
    explicit: Option<&Path>,
    load_error: Option<&anyhow::Error>,
) -> Option<PathBuf> {
    if !enabled {
        detach(bpffs);
        info!("socket-level load balancing is off (--socket-lb false)");
        return None;
    }
    let ready = load_error
        .map_or(Ok(()), |e| Err(anyhow::anyhow!("{e:#}")))
        .and_then(|()| write_scope(bpffs, netns_cookie()?))
        .and_then(|()| root(explicit));
    match ready {
        Ok(dir) => Some(dir),
        Err(e) => {
            warn!(
                "socket-level load balancing is off: {e:#}; the node's own sockets (and \
                 hostNetwork pods) do not reach Services (pods and outside clients do)"
            );
            None
        }
    }
}

/// Removes the socket hooks' link pins under `bpffs`, detaching them.
pub fn detach(bpffs: &Path) {
    let links = bpffs::links_dir(bpffs);
    for hook in HOOKS {
        let path = links.join(hook.pin);
        if path.exists() {
            match sys::detach_link_pin(&path) {
                Ok(()) => info!(pin = hook.pin, "detached socket hook"),
                Err(e) => warn!(pin = hook.pin, "detaching socket hook failed: {e:#}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_cgroup2_mount_is_found_in_mountinfo() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:39 /kubepods/x /sys/fs/cgroup/pod rw - cgroup2 cgroup2 rw
41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_root_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(
            cgroup2_root_mount("31 23 0:28 / /x rw - tmpfs tmpfs rw"),
            None
        );
    }
}
