//! SNAT's two maps: the source address of each interface a translated
//! flow may leave by, and the per-backend cursors of the port search.
//!
//! As Linux's masquerading does, a flow SNATed to a backend on another node
//! takes the address of the interface it leaves by (the FIB lookup names
//! it; a program cannot ask an interface for its address, so the agent
//! writes each one's primary address here, keyed by index and family), and
//! a source port that makes its reply tuple unique: unique per backend
//! address, backend port and protocol, so each backend has the whole port
//! range. Ports are handed out in order from a cursor per backend and
//! protocol: the port handed out longest ago is the one likeliest free
//! again.

use crate::{pod, IpAddrBe};

/// Key of the interface address map: an interface and an address family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfaceAddrKey {
    /// Interface index.
    pub ifindex: u32,
    /// Address family ([`crate::family`]).
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<IfaceAddrKey>() == 8);

/// The address SNAT gives flows leaving by an interface: its primary one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceAddr {
    /// Address, network byte order.
    pub addr_be: IpAddrBe,
}
const _: () = assert!(core::mem::size_of::<IfaceAddr>() == 16);

/// Capacity of the interface address map: node interfaces, not pods.
pub const IFACE_ADDRS_MAX: u32 = 1024;

/// Key of the SNAT cursor map: a backend's address, port and protocol,
/// what a reply tuple must be unique within.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnatCursorKey {
    /// Backend address, network byte order.
    pub addr_be: IpAddrBe,
    /// Backend port, network byte order.
    pub port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Address family ([`crate::family`]).
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<SnatCursorKey>() == 20);

/// Default capacity of the cursor map (LRU): a cursor evicted starts again
/// from the next flow's hash, which costs only probes.
pub const SNAT_CURSORS_MAX: u32 = 65_536;

pod!(IfaceAddrKey, IfaceAddr, SnatCursorKey);
