//! Direct server return: the encapsulation between nodes.
//!
//! The node that receives a new flow from outside for a backend on another
//! node does not SNAT it: it wraps the client's packet, unchanged, in an
//! outer IP header of the flow's family to the backend's node (IPv4
//! protocol or IPv6 next header [`IPPROTO_LB`]) followed by a [`Shim`]
//! naming the chosen backend (over IPv6, its address follows the shim).
//! The backend's node unwraps it, rewrites the destination to the backend,
//! and remembers how to rewrite the backend's replies so that they leave
//! with the frontend as source, straight to the client. The kernel needs no
//! tunnel module: our programs add and remove the [`encap_len`] bytes
//! themselves.
//!
//! A wrapped packet names any backend with any client address, so a node
//! unwraps only those whose outer source is one of the cluster's nodes
//! ([`DsrPeer`], written by the agent from the Node objects or a flag).

use crate::{pod, IpAddrBe};

/// IP protocol (IPv6 next header) of the outer header: 253, reserved for experimentation
/// (RFC 3692), so nothing else on the fabric claims it.
pub const IPPROTO_LB: u8 = 253;
/// First byte of the shim, a sanity check against stray protocol-253 packets.
pub const SHIM_MAGIC: u8 = 0x4c;
/// Version of the shim layout.
pub const SHIM_VERSION: u8 = 1;
/// Bytes added in front of the client's IPv4 header: outer IPv4 and shim.
pub const ENCAP_LEN: usize = 28;
/// Bytes added in front of the client's IPv6 header: outer IPv6 (40), the
/// shim, and the backend's 16-byte address after it.
pub const ENCAP_LEN_V6: usize = 64;
/// Where the backend's IPv6 address follows the shim, from the outer
/// header's end.
pub const SHIM_ADDR6_OFF: usize = core::mem::size_of::<Shim>();

/// Bytes a wrap of family `fam` ([`crate::family`]) adds: the outer header
/// is of the client's family, as the nodes reach each other's pods over it.
#[inline(always)]
pub const fn encap_len(fam: u8) -> usize {
    if fam == crate::family::V6 {
        ENCAP_LEN_V6
    } else {
        ENCAP_LEN
    }
}

/// What follows the outer IP header: the backend the client's flow goes to.
/// The layout is the same over both families; an IPv6 backend's address,
/// which does not fit, follows it (at [`SHIM_ADDR6_OFF`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shim {
    /// [`SHIM_MAGIC`].
    pub magic: u8,
    /// [`SHIM_VERSION`].
    pub version: u8,
    /// Backend port, network order.
    pub port_be: u16,
    /// Backend IPv4 address, network order; zero in an IPv6 wrap.
    pub addr_be: u32,
}
const _: () = assert!(core::mem::size_of::<Shim>() == 8);

/// Key of the peers map (LPM trie): the nodes (or node networks) whose
/// wrapped packets this node unwraps. The prefix length counts
/// [`DSR_PEER_HEAD_BITS`] plus the address's bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DsrPeer {
    /// Address family ([`crate::family`]).
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
    /// Address, network byte order.
    pub addr_be: IpAddrBe,
}
const _: () = assert!(core::mem::size_of::<DsrPeer>() == 20);

/// Bits of a [`DsrPeer`] before the address.
pub const DSR_PEER_HEAD_BITS: u32 = 32;

/// Capacity of the peers map: a node's address each, or a few networks.
pub const DSR_PEERS_MAX: u32 = 16_384;

pod!(DsrPeer);
