//! Parsing: Ethernet, IPv4 (IHL honoured) and the L4 ports, into the flow's
//! [`Tuple`] and the packet's [`Layout`].
//!
//! The parser reads, never writes. Anything it cannot read completely is
//! `Err` (passed untouched); anything it can read but does not translate
//! (other protocols, VLAN tags) is [`Parsed::Other`]. A later IPv4 fragment
//! has a tuple without ports ([`Frag::Later`]): the pipeline takes them
//! from the datagram's first fragment (`lb_common::frag`). The same IPv4
//! parser reads the packet an ICMP error quotes ([`quoted`]).

use lb_common::{family, proto, Tuple};

use crate::{
    hdr::{
        icmp::IPPROTO_ICMP, tcp_flags, Ip4Hdr, TcpHdr, UdpHdr, ETH_HLEN, ETH_P_IP, ETH_TYPE,
        IP4_HLEN, IP4_MF, IP4_OFFSET_MASK, TCP_CSUM, UDP_CSUM,
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

/// What the parser found in a frame.
pub enum Parsed {
    /// TCP or UDP over IPv4: the tuple is written.
    Flow(Layout),
    /// ICMP over IPv4, its message at `l4_off` (the tuple is not written).
    Icmp(Layout),
    /// Anything else: other EtherTypes (VLAN tags, IPv6) and protocols.
    Other,
}

/// Parses the frame's headers, writing the flow's tuple into `t`.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P, t: &mut Tuple) -> Result<Parsed, PacketError> {
    let ethertype = u16::from_be(pkt.load::<u16>(ETH_TYPE)?);
    if ethertype != ETH_P_IP {
        return Ok(Parsed::Other);
    }
    // An IPv4 EtherType without an IPv4 header behind it is malformed.
    let mut ip = ip4(pkt, ETH_HLEN)?.ok_or(PacketError)?;
    match ip.proto {
        proto::TCP | proto::UDP => {}
        IPPROTO_ICMP => return Ok(Parsed::Icmp(ip.layout)),
        _ => return Ok(Parsed::Other),
    }
    // The whole fixed L4 header must be there before anything is rewritten.
    ports(pkt, t, &mut ip, true)?;
    Ok(Parsed::Flow(ip.layout))
}

/// Parses the IP header an ICMP error quotes at `off` and the ports after
/// it (an error quotes at least the 8 bytes after the header, not a whole
/// TCP header), writing the quoted packet's tuple into `t`; `Ok(None)` when
/// it is not a TCP or UDP packet over IPv4.
#[inline(always)]
pub fn quoted<P: Packet>(
    pkt: &P,
    off: usize,
    t: &mut Tuple,
) -> Result<Option<Layout>, PacketError> {
    let Some(mut ip) = ip4(pkt, off)? else {
        return Ok(None);
    };
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return Ok(None);
    }
    ports(pkt, t, &mut ip, false)?;
    Ok(Some(ip.layout))
}

/// What the IPv4 header tells.
struct Ip4 {
    /// The L4 protocol.
    proto: u8,
    /// Source address, network order.
    saddr: u32,
    /// Destination address, network order.
    daddr: u32,
    /// Where the headers are (TCP flags still zero).
    layout: Layout,
}

/// Reads the IPv4 header at `l3_off`; `Ok(None)` when the bytes there are
/// not an IPv4 header (version, IHL).
#[inline(always)]
fn ip4<P: Packet>(pkt: &P, l3_off: usize) -> Result<Option<Ip4>, PacketError> {
    let h: Ip4Hdr = pkt.load(l3_off)?;
    let ihl = h.header_len();
    if h.version() != 4 || ihl < IP4_HLEN {
        return Ok(None);
    }
    let frag_off = u16::from_be(h.frag_off);
    let frag = if frag_off & IP4_OFFSET_MASK != 0 {
        Frag::Later
    } else if frag_off & IP4_MF != 0 {
        Frag::First
    } else {
        Frag::None
    };
    Ok(Some(Ip4 {
        proto: h.proto,
        saddr: h.saddr,
        daddr: h.daddr,
        layout: Layout {
            l3_off,
            l4_off: l3_off + ihl,
            frag,
            tcp_flags: 0,
            ip_id_be: h.id,
        },
    }))
}

/// Reads the ports (and TCP flags) of a TCP or UDP packet and writes its
/// tuple into `t`. `whole`: the fixed L4 header must be there entire (it
/// will be rewritten), not only the ports.
#[inline(always)]
fn ports<P: Packet>(pkt: &P, t: &mut Tuple, ip: &mut Ip4, whole: bool) -> Result<(), PacketError> {
    let layout = &mut ip.layout;
    let l4_off = layout.l4_off;
    let (sport, dport, tcp_flags) = if layout.frag == Frag::Later {
        (0, 0, 0)
    } else if !whole {
        let ports: [u16; 2] = pkt.load(l4_off)?;
        (ports[0], ports[1], 0)
    } else if ip.proto == proto::TCP {
        let h: TcpHdr = pkt.load(l4_off)?;
        (h.sport, h.dport, h.flags)
    } else {
        let h: UdpHdr = pkt.load(l4_off)?;
        (h.sport, h.dport, 0)
    };
    layout.tcp_flags = tcp_flags;
    *t = Tuple {
        saddr_be: [ip.saddr, 0, 0, 0],
        daddr_be: [ip.daddr, 0, 0, 0],
        sport_be: sport,
        dport_be: dport,
        proto: ip.proto,
        family: family::V4,
        _pad: [0; 2],
    };
    Ok(())
}
