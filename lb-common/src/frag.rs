//! Fragment tracking (IPv4, and IPv6's fragment header): later fragments carry no L4 header, so the ports
//! of the first fragment are remembered for the rest of the datagram.
//!
//! Policy (documented in the README): a first fragment is translated like
//! any packet and, once translated, leaves its ports under the datagram's
//! identity; a later fragment finds them there and takes the same
//! translation (addresses only, since it has no ports to rewrite). A later
//! fragment that arrives before its first one, or whose first one was not
//! translated, is passed untouched and counted (`frag_untracked`): the
//! datapath does not reassemble or reorder.

use crate::IpAddrBe;

/// How long a first fragment's ports stay usable, in nanoseconds: Linux's
/// default reassembly timeout (`ipfrag_time`, 30 s), after which no
/// receiver would still accept the datagram's other fragments.
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// One IP datagram, as RFC 791 (RFC 8200 for IPv6) identifies its
/// fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address, network order.
    pub saddr_be: IpAddrBe,
    /// Destination address, network order.
    pub daddr_be: IpAddrBe,
    /// IP identification, network order (IPv4's 16 bits, widened; IPv6's
    /// fragment header's 32).
    pub id_be: u32,
    /// IP protocol.
    pub proto: u8,
    /// Address family.
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// The L4 ports a datagram's first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// Source port, network order.
    pub sport_be: u16,
    /// Destination port, network order.
    pub dport_be: u16,
    /// Zero.
    pub _pad: u32,
    /// When the first fragment was seen (`bpf_ktime_get_ns`).
    pub seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 16);

crate::pod!(FragKey, FragValue);
