//! Ending the node's sockets whose backend left.
//!
//! A socket the hooks translated at `connect` talks to its backend directly:
//! no per-packet program sees it again, so when the backend leaves, the
//! socket would keep sending into the void (the failure users of
//! socket-level load balancing meet most: a DNS client's long-lived
//! connected UDP socket). After a sync that deleted backends, the agent
//! finds the translated sockets (the hooks' reverse entries: socket cookie
//! and backend) whose backend is no longer in the backends map (the test
//! the packet path makes for a tracked flow), and ends each connected one
//! that still points at it with `SOCK_DESTROY` over sock_diag netlink: its
//! next call fails with `ECONNABORTED`, and the application reconnects,
//! through the hooks, to a live backend. Unconnected UDP sockets need
//! nothing: their next datagram is translated again. A connected UDP
//! socket also ends when its backend stops serving (still listed, but
//! `BACKEND_F_NOT_SERVING`), the rule the packet path applies to UDP
//! flows; TCP sockets keep such a backend until it leaves the slices.
//!
//! `SOCK_DESTROY` needs `CONFIG_INET_DIAG_DESTROY` (and the TCP and UDP
//! diag modules). Where the kernel lacks it, such sockets are left as they
//! are, counted (`sock_stale`) and logged. (The kernel's own way, a BPF
//! socket iterator calling the `bpf_sock_destroy` kfunc, needs Linux 6.5
//! and kfunc calls, which aya-ebpf 0.2 cannot emit.)

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{
    family, maps, proto,
    service::BACKEND_F_NOT_SERVING,
    sock::{SockRevKey, SockRevValue, STAT_DESTROYED, STAT_STALE},
    IpAddrBe,
};
use tracing::{info, warn};

use super::{bpffs, cgroup};

/// What a sweep found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Connected sockets ended.
    pub destroyed: usize,
    /// Connected sockets that could not be ended.
    pub stale: usize,
    /// Reverse entries of gone backends removed.
    pub forgotten: usize,
}

/// A backend as the sweep knows it: address, port, family.
type BackendAddr = (IpAddrBe, u16, u8);

/// After a sync that deleted map entries: [`sweep`] against `backends`,
/// what the backends map holds now (the reconciler's mirror of it: reading
/// the map back would cost two syscalls per backend, 20 000 at 10 000
/// backends, after every change), logging (not failing) when it cannot.
pub fn after_sync<'a>(bpffs: &Path, backends: impl IntoIterator<Item = &'a lb_common::Backend>) {
    // Most syncs meet no translated socket at all: the set of live
    // backends (100 000 at 10 000 Services, some milliseconds to hash) is
    // built only when a reverse entry needs checking.
    if !has_reverse_entries(bpffs) {
        return;
    }
    let live: HashMap<BackendAddr, bool> = backends
        .into_iter()
        .map(|b| {
            let serving = b.flags & BACKEND_F_NOT_SERVING == 0;
            ((b.addr_be, b.port_be, b.family), serving)
        })
        .collect();
    if let Err(e) = sweep(bpffs, &live) {
        warn!("ending node sockets of backends that left failed: {e:#}");
    }
}

/// Whether the hooks' reverse map holds any entry (true when it cannot
/// be read: [`sweep`] then says why).
fn has_reverse_entries(bpffs: &Path) -> bool {
    let path = bpffs::maps_dir(bpffs).join(maps::SOCK_REV);
    let Ok(data) = MapData::from_pin(&path) else {
        return false;
    };
    let rev: Result<BpfHashMap<MapData, SockRevKey, SockRevValue>, _> =
        Map::from_map_data(data).and_then(TryInto::try_into);
    rev.map_or(true, |rev| rev.keys().next().is_some())
}

/// Ends the connected sockets of this network namespace that the hooks
/// translated to a backend no longer in `live` (address, port, family →
/// whether it serves), and forgets the reverse entries of such backends.
/// A UDP socket also ends when its backend stops serving, as a packet's
/// UDP flow moves then (the datapath's rule); TCP ones go on.
pub fn sweep(bpffs: &Path, live: &HashMap<BackendAddr, bool>) -> Result<Sweep> {
    let path = bpffs::maps_dir(bpffs).join(maps::SOCK_REV);
    let Ok(data) = MapData::from_pin(&path) else {
        return Ok(Sweep::default());
    };
    let mut rev: BpfHashMap<MapData, SockRevKey, SockRevValue> = Map::from_map_data(data)?
        .try_into()
        .with_context(|| format!("map {} has an unexpected layout", maps::SOCK_REV))?;
    // Reverse entries whose backend is gone (false) or only stopped
    // serving (true).
    let ended: Vec<(SockRevKey, bool)> = rev
        .keys()
        .filter_map(Result::ok)
        .filter_map(|k| match live.get(&(k.addr_be, k.port_be, k.family)) {
            None => Some((k, false)),
            Some(false) => Some((k, true)),
            Some(true) => None,
        })
        .collect();
    let mut out = Sweep::default();
    if ended.is_empty() {
        return Ok(out);
    }
    let wanted = |tcp: bool| -> HashMap<u64, (IpAddrBe, u16)> {
        ended
            .iter()
            .filter(|(k, not_serving)| k.family == family::V4 && !(tcp && *not_serving))
            .map(|(k, _)| (k.cookie, (k.addr_be, k.port_be)))
            .collect()
    };
    let gone: Vec<SockRevKey> = ended
        .iter()
        .filter(|(_, not_serving)| !not_serving)
        .map(|(k, _)| *k)
        .collect();
    let diag = Diag::open()?;
    for l4 in [proto::TCP, proto::UDP] {
        let wanted = wanted(l4 == proto::TCP);
        if wanted.is_empty() {
            continue;
        }
        let sockets = match diag.dump(l4) {
            Ok(s) => s,
            Err(e) => {
                warn!(proto = l4, "listing sockets failed (sock_diag): {e}");
                continue;
            }
        };
        for id in sockets {
            let Some((addr, port)) = wanted.get(&id.cookie()) else {
                continue;
            };
            // Only a socket still connected to the gone backend: an
            // unconnected one is translated again at its next datagram.
            if id.dst[0] != addr[0] || id.dport != *port {
                continue;
            }
            match diag.destroy(l4, &id) {
                Ok(()) => out.destroyed += 1,
                Err(e) => {
                    out.stale += 1;
                    warn!(
                        "a node socket still points at a backend that left, and cannot be ended \
                         (SOCK_DESTROY: {e}; the kernel needs CONFIG_INET_DIAG_DESTROY)"
                    );
                }
            }
        }
    }
    for key in &gone {
        if rev.remove(key).is_ok() {
            out.forgotten += 1;
        }
    }
    for (idx, n) in [(STAT_DESTROYED, out.destroyed), (STAT_STALE, out.stale)] {
        if n > 0 {
            cgroup::add_counter(bpffs, idx, n as u64)?;
        }
    }
    if out.destroyed > 0 || out.stale > 0 {
        info!(
            destroyed = out.destroyed,
            stale = out.stale,
            "node sockets connected to backends that left"
        );
    }
    Ok(out)
}

/// `struct inet_diag_sockid` (network byte order, as the kernel gives it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<SockId>() == 48);

impl SockId {
    /// The socket's cookie, as `bpf_get_socket_cookie` gives it.
    fn cookie(&self) -> u64 {
        u64::from(self.cookie[0]) | (u64::from(self.cookie[1]) << 32)
    }
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}
const _: () = assert!(std::mem::size_of::<Request>() == 56);

impl Request {
    /// An IPv4 request for protocol `l4` in any state, about socket `id`
    /// (all sockets, for a dump: the zero id).
    fn v4(l4: u8, id: SockId) -> Self {
        Self {
            family: libc::AF_INET as u8,
            protocol: l4,
            ext: 0,
            pad: 0,
            states: u32::MAX,
            id,
        }
    }
}

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy)]
struct NlHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}
const NLHDR: usize = std::mem::size_of::<NlHdr>();

/// `NETLINK_SOCK_DIAG`.
const NETLINK_SOCK_DIAG: i32 = 4;
/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY`.
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// Offset of `id` in `struct inet_diag_msg` (family, state, timer, retrans).
const MSG_ID_OFFSET: usize = 4;

/// A sock_diag netlink socket in this thread's network namespace.
struct Diag {
    fd: OwnedFd,
}

impl Diag {
    fn open() -> Result<Self> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("open a sock_diag netlink socket");
        }
        // SAFETY: a new descriptor we own.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn send(&self, kind: u16, flags: u16, req: &Request) -> io::Result<()> {
        let mut buf = vec![0u8; NLHDR + std::mem::size_of::<Request>()];
        let hdr = NlHdr {
            len: buf.len() as u32,
            kind,
            flags,
            seq: 1,
            pid: 0,
        };
        // SAFETY: the buffer holds both structs, written unaligned.
        unsafe {
            std::ptr::write_unaligned(buf.as_mut_ptr().cast::<NlHdr>(), hdr);
            std::ptr::write_unaligned(buf.as_mut_ptr().add(NLHDR).cast::<Request>(), *req);
        }
        // SAFETY: the buffer outlives the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads messages until the dump ends (or one answer, for an ack),
    /// handing each payload to `each`; an error message becomes `Err`.
    fn receive(&self, dump: bool, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: the buffer outlives the call.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0;
            let n = n as usize;
            while off + NLHDR <= n {
                // SAFETY: bounds checked above; read unaligned.
                let hdr: NlHdr = unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
                let len = hdr.len as usize;
                if len < NLHDR || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink message",
                    ));
                }
                let payload = &buf[off + NLHDR..off + len];
                match hdr.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = payload
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        return if errno == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-errno))
                        };
                    }
                    _ => each(payload),
                }
                off += (len + 3) & !3;
            }
            if !dump {
                return Ok(());
            }
        }
    }

    /// Every IPv4 socket of protocol `l4` in this network namespace.
    fn dump(&self, l4: u8) -> io::Result<Vec<SockId>> {
        let req = Request::v4(l4, SockId::default());
        self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
        let mut out = Vec::new();
        self.receive(true, |payload| {
            if payload.len() >= MSG_ID_OFFSET + std::mem::size_of::<SockId>() {
                // SAFETY: bounds checked; read unaligned.
                let id: SockId =
                    unsafe { std::ptr::read_unaligned(payload.as_ptr().add(MSG_ID_OFFSET).cast()) };
                out.push(id);
            }
        })?;
        Ok(out)
    }

    /// Ends one socket (`SOCK_DESTROY`), named by its id and cookie.
    fn destroy(&self, l4: u8, id: &SockId) -> io::Result<()> {
        let req = Request::v4(l4, *id);
        self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
        self.receive(false, |_| {})
    }
}
