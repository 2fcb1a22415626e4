//! Parsing: Ethernet, IPv4 (IHL honoured) and the L4 ports, into the flow's
//! [`Tuple`] and the packet's [`Layout`].
//!
//! The parser reads, never writes. Anything it cannot read completely is
//! `Err` (passed untouched); anything it can read but does not translate
//! (other protocols, VLAN tags) is `Ok(None)`. A later IPv4 fragment has a
//! tuple without ports ([`Frag::Later`]): the pipeline takes them from the
//! datagram's first fragment (`lb_common::frag`).

use lb_common::{family, proto, Tuple};

use crate::{
    hdr::{
        tcp_flags, TcpHdr, UdpHdr, ETH_HLEN, ETH_P_IP, ETH_TYPE, IP4_DADDR, IP4_FRAG_OFF, IP4_HLEN,
        IP4_ID, IP4_MF, IP4_OFFSET_MASK, IP4_PROTO, IP4_SADDR, TCP_CSUM, UDP_CSUM,
    },
    packet::{Packet, PacketError},
};

/// Where a packet stands in its IP datagram.
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
#[derive(Clone, Copy)]
pub struct Layout {
    /// Offset of the L3 header.
    pub l3_off: usize,
    /// Offset of the L4 header (where it would be, for a later fragment).
    pub l4_off: usize,
    /// Fragment position.
    pub frag: Frag,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// IP identification, network order (ties fragments together).
    pub ip_id_be: u16,
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

    /// Offset of the L4 checksum of protocol `l4`.
    #[inline(always)]
    pub fn l4_csum_off(&self, l4: u8) -> usize {
        self.l4_off + if l4 == proto::TCP { TCP_CSUM } else { UDP_CSUM }
    }
}

/// Parses the packet's headers.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Result<Option<(Tuple, Layout)>, PacketError> {
    let ethertype = u16::from_be(pkt.load::<u16>(ETH_TYPE)?);
    if ethertype != ETH_P_IP {
        return Ok(None);
    }
    let l3_off = ETH_HLEN;
    let ver_ihl: u8 = pkt.load(l3_off)?;
    if ver_ihl >> 4 != 4 {
        return Err(PacketError);
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < IP4_HLEN {
        return Err(PacketError);
    }
    let frag_off: u16 = u16::from_be(pkt.load(l3_off + IP4_FRAG_OFF)?);
    let frag = if frag_off & IP4_OFFSET_MASK != 0 {
        Frag::Later
    } else if frag_off & IP4_MF != 0 {
        Frag::First
    } else {
        Frag::None
    };
    let ip_id_be: u16 = pkt.load(l3_off + IP4_ID)?;
    let l4_proto: u8 = pkt.load(l3_off + IP4_PROTO)?;
    let l4_off = l3_off + ihl;
    // The whole fixed L4 header must be there before anything is rewritten.
    let (sport, dport, tcp_flags) = match l4_proto {
        proto::TCP | proto::UDP if frag == Frag::Later => (0, 0, 0),
        proto::TCP => {
            let h: TcpHdr = pkt.load(l4_off)?;
            (h.sport, h.dport, h.flags)
        }
        proto::UDP => {
            let h: UdpHdr = pkt.load(l4_off)?;
            (h.sport, h.dport, 0)
        }
        _ => return Ok(None),
    };
    let saddr: u32 = pkt.load(l3_off + IP4_SADDR)?;
    let daddr: u32 = pkt.load(l3_off + IP4_DADDR)?;
    let tuple = Tuple {
        saddr_be: [saddr, 0, 0, 0],
        daddr_be: [daddr, 0, 0, 0],
        sport_be: sport,
        dport_be: dport,
        proto: l4_proto,
        family: family::V4,
        _pad: [0; 2],
    };
    let layout = Layout {
        l3_off,
        l4_off,
        frag,
        tcp_flags,
        ip_id_be,
    };
    Ok(Some((tuple, layout)))
}
