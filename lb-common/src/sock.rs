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

use crate::{pod, IpAddrBe};

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

pod!(SockConfig, SockRevKey, SockRevValue);
