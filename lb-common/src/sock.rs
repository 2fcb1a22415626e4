//! Socket-level load balancing: what the cgroup socket hooks share with the
//! agent.
//!
//! The node's own sockets (and those of hostNetwork pods) are translated
//! when they connect or send: the hooks rewrite the socket address from a
//! frontend to the chosen backend, so the packets carry the backend from the
//! start and need no per-packet NAT. Replies and `getpeername` are rewritten
//! back to the frontend through a [`SockRevKey`] → [`SockRevValue`] entry
//! that the forward hook leaves behind.
//!
//! The hooks are attached at the root of the cgroup v2 hierarchy, so they
//! see every socket of the machine; they act only on sockets of the network
//! namespace whose cookie the agent writes into [`SockConfig`].

use crate::{hash, pod, IpAddrBe, Tuple};

/// Scope of the socket hooks (the single entry of the sock config map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConfig {
    /// Cookie of the agent's network namespace (`SO_NETNS_COOKIE`); 0 until
    /// the agent has written it, which keeps the hooks idle.
    pub netns_cookie: u64,
    /// `SOCK_F_*` bits.
    pub flags: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockConfig>() == 16);

/// A translated socket's backend, as a reply or `getpeername` shows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// The socket's cookie (`bpf_get_socket_cookie`), unique per boot.
    pub cookie: u64,
    /// Backend address, network byte order.
    pub addr_be: IpAddrBe,
    /// Backend port, network byte order.
    pub port_be: u16,
    /// Address family ([`crate::family`]).
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 32);

/// The frontend a socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    /// Frontend address, network byte order.
    pub addr_be: IpAddrBe,
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// Address family ([`crate::family`]).
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// The Service port's id.
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 24);

/// Default capacity of the reverse map (LRU; one entry per translated
/// socket and backend).
pub const SOCK_REV_MAX: u32 = 65536;

/// A connect or datagram to a frontend was given a backend.
pub const STAT_TRANSLATED: u32 = 0;
/// A connect or datagram to a frontend without an endpoint was refused
/// (`ECONNREFUSED`).
pub const STAT_REFUSED: u32 = 1;
/// A reply's source or a `getpeername` was shown as the frontend.
pub const STAT_REVERSED: u32 = 2;
/// A connect or datagram from outside `loadBalancerSourceRanges` (refused,
/// `EPERM`).
pub const STAT_SOURCE_RANGE: u32 = 3;
/// A node socket connected to a backend that left, found by the agent and
/// ended (`ECONNABORTED` at its next call).
pub const STAT_DESTROYED: u32 = 4;
/// A node socket connected to a backend that left, which the agent could not
/// end (see the README: the kernel lacks a way to).
pub const STAT_STALE: u32 = 5;
/// Number of socket counters.
pub const STAT_COUNT: u32 = 6;

/// Socket counter names by index, as `lb-agent stats` and metrics show them.
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "sock_translated",
    "sock_refused",
    "sock_reversed",
    "sock_drop_source_range",
    "sock_destroyed",
    "sock_stale",
];

/// A socket's flow hash: the tuple's, whose source port is 0 at `connect`,
/// with the socket's cookie mixed in, so the node's connections spread over
/// the backends as the packet path's flows do (see the hooks' module doc).
#[inline(always)]
#[must_use]
pub const fn sock_hash(t: &Tuple, cookie: u64) -> u32 {
    let h = hash::mix(t.hash(), cookie as u32);
    hash::finish(hash::mix(h, (cookie >> 32) as u32))
}

/// A forward hook's call for `lb_sock_trace` to decide, as the frame it
/// runs on: what `lb-agent trace --socket` asks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRequest {
    /// The socket's cookie (a real socket's is unique per boot).
    pub cookie: u64,
    /// The address the socket connects or sends to, network byte order.
    pub dst_be: IpAddrBe,
    /// The socket's bound source, or zero for an unbound one (the node's
    /// address is used, as by the hooks).
    pub client_be: IpAddrBe,
    /// The port it connects or sends to, network byte order.
    pub dst_port_be: u16,
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// Address family ([`crate::family`]).
    pub family: u8,
    /// 1: `connect`; 0: an unconnected datagram's `sendmsg`.
    pub connect: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<TraceRequest>() == 48);

/// The hook left the address alone: not a frontend.
pub const TRACE_PASS: u32 = 0;
/// The hook rewrote the address to the result's backend.
pub const TRACE_TRANSLATED: u32 = 1;
/// The hook failed the call with the result's errno.
pub const TRACE_REFUSED: u32 = 2;

/// What `lb_sock_trace` decided, written over its frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceResult {
    /// `TRACE_*`.
    pub verdict: u32,
    /// The errno a refused call fails with.
    pub errno: u32,
    /// The Service port matched (0: none).
    pub svc_id: u32,
    /// The backend chosen, when translated.
    pub backend_id: u32,
    /// Its address, network byte order.
    pub addr_be: IpAddrBe,
    /// Its port, network byte order.
    pub port_be: u16,
    /// Its family.
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// The client address the decision used (the node's for an unbound
    /// socket), network byte order.
    pub client_be: IpAddrBe,
}
const _: () = assert!(core::mem::size_of::<TraceResult>() == 52);

/// Bytes of a frame: the larger of the request and the result (XDP
/// test runs take at least an Ethernet header, which both exceed).
pub const TRACE_FRAME_LEN: usize = 52;
const _: () = assert!(
    TRACE_FRAME_LEN >= core::mem::size_of::<TraceRequest>()
        && TRACE_FRAME_LEN >= core::mem::size_of::<TraceResult>()
);

impl TraceRequest {
    /// The frame `lb_sock_trace` runs on.
    #[must_use]
    pub fn frame(&self) -> [u8; TRACE_FRAME_LEN] {
        let mut f = [0u8; TRACE_FRAME_LEN];
        // SAFETY: `Self` is `repr(C)` integers without implicit padding
        // (size asserted), and the frame is at least as long.
        unsafe {
            core::ptr::write_unaligned(f.as_mut_ptr().cast::<Self>(), *self);
        }
        f
    }
}

impl TraceResult {
    /// The result `lb_sock_trace` left in its frame; `None` if too short.
    #[must_use]
    pub fn from_frame(frame: &[u8]) -> Option<Self> {
        if frame.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: long enough (checked), and any bytes are a valid value
        // of these integers.
        Some(unsafe { core::ptr::read_unaligned(frame.as_ptr().cast::<Self>()) })
    }
}

pod!(
    SockConfig,
    SockRevKey,
    SockRevValue,
    TraceRequest,
    TraceResult
);
