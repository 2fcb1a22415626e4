//! A parsed packet's [`Layout`]: where its headers are and what only the
//! packet carries. Defined apart from `parse` because the per-CPU scratch
//! room holds one (see `parse::settled`).

use lb_common::proto;

use crate::hdr::{tcp_flags, TCP_CSUM, UDP_CSUM};

/// Where a packet stands in its IP datagram.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// A whole datagram.
    None,
    /// The first fragment: it carries the L4 header.
    First,
    /// A later fragment: no L4 header, so the ports are unknown (zero).
    Later,
}

/// Where a parsed packet's headers are, and what only the packet carries
/// (the flow itself is its [`Tuple`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Layout {
    /// Offset of the L3 header.
    pub l3_off: usize,
    /// Offset of the L4 header (where it would be, for a later fragment).
    pub l4_off: usize,
    /// Fragment position.
    pub frag: Frag,
    /// TCP flags (0 for UDP; for SCTP, what its first chunk means in TCP's
    /// terms: `parse::sctp_flags`).
    pub tcp_flags: u8,
    /// IP identification, network order (ties fragments together): IPv4's
    /// 16 bits, or the 32 of IPv6's fragment header (0 without one).
    pub ip_id_be: u32,
}

impl Layout {
    /// Whether the packet carries the L4 header (ports and checksum).
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        self.frag != Frag::Later
    }

    /// Whether the packet carries FIN or RST: its flow is closing.
    #[inline(always)]
    pub fn closing(&self) -> bool {
        self.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0
    }

    /// Offset of the L4 checksum of protocol `l4` (TCP or UDP: SCTP's is
    /// `sctp`'s business).
    #[inline(always)]
    pub fn l4_csum_off(&self, l4: u8) -> usize {
        self.l4_off + if l4 == proto::TCP { TCP_CSUM } else { UDP_CSUM }
    }
}
