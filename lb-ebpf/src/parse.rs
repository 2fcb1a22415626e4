//! Parsing: Ethernet, IPv4 (IHL honoured) or IPv6 (extension headers
//! walked, at most `IP6_EXT_MAX`) and the L4 ports, into the flow's
//! family-tagged [`Tuple`] and the packet's [`Layout`]. Every later stage
//! is written once over these two; only the reading of the IP header
//! differs by family.
//!
//! The parser reads, never writes. Anything it cannot read completely is
//! `Err` (passed untouched); anything it can read but does not translate
//! (other protocols, VLAN tags) is [`Parsed::Other`]. A later fragment has a
//! tuple without ports ([`Frag::Later`]): the pipeline takes them from the
//! datagram's first fragment (`lb_common::frag`). The same parser reads the
//! packet an ICMP error quotes ([`quoted`]).

use lb_common::{family, proto, Tuple};

use crate::{
    hdr::{
        ext, icmp::IPPROTO_ICMP, icmp6::IPPROTO_ICMPV6, sctp_chunk, tcp_flags, Ip4Hdr, Ip6FragHdr,
        Ip6Hdr, SctpHdr, TcpHdr, UdpHdr, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ETH_TYPE, IP4_HLEN,
        IP4_MF, IP4_OFFSET_MASK, IP6_EXT_MAX, IP6_HLEN, IP6_MF, IP6_OFFSET_MASK,
    },
    packet::{Packet, PacketError},
};

pub use crate::layout::{Frag, Layout};

/// What the parser found in a frame.
pub enum Parsed {
    /// TCP, UDP or SCTP: the tuple and the layout are written.
    Flow,
    /// ICMP (ICMPv6 over IPv6), its message at the layout's `l4_off`; the
    /// tuple has the addresses, family and protocol, no ports.
    Icmp,
    /// IPv6 with more extension headers than the parser walks.
    ExtLimit,
    /// Anything else: other EtherTypes (VLAN tags) and protocols.
    Other,
}

/// Parses the frame's headers, writing the flow's tuple into `t` and the
/// packet's layout into `layout` (both in the scratch map: read the layout
/// back with [`settled`]).
#[inline(always)]
pub fn parse<P: Packet>(
    pkt: &P,
    t: &mut Tuple,
    layout: &mut Layout,
) -> Result<Parsed, PacketError> {
    let ethertype = u16::from_be(pkt.load::<u16>(ETH_TYPE)?);
    // An IP EtherType without its IP header behind it is malformed.
    let mut ip = match ethertype {
        ETH_P_IP => ip4(pkt, ETH_HLEN, t)?,
        ETH_P_IPV6 => ip6(pkt, ETH_HLEN, t)?,
        _ => return Ok(Parsed::Other),
    }
    .ok_or(PacketError)?;
    match ip.proto {
        proto::TCP | proto::UDP => {}
        // A port rewrite updates the CRC32c by the SCTP packet's length,
        // which a fragment does not hold whole; and SCTP fits its packets
        // to the path MTU itself, so IP fragments of it are rare.
        proto::SCTP if ip.layout.frag == Frag::None => {}
        IPPROTO_ICMP if t.family == family::V4 => {
            *layout = ip.layout;
            return Ok(Parsed::Icmp);
        }
        IPPROTO_ICMPV6 if t.family == family::V6 => {
            *layout = ip.layout;
            return Ok(Parsed::Icmp);
        }
        p if t.family == family::V6 && ext::is_ext(p) => return Ok(Parsed::ExtLimit),
        _ => return Ok(Parsed::Other),
    }
    // The whole fixed L4 header must be there before anything is rewritten.
    ports(pkt, t, &mut ip, true)?;
    *layout = ip.layout;
    Ok(Parsed::Flow)
}

/// The layout [`parse`] wrote into the scratch map, read back from there.
/// The parse ends in many verifier states (one per way through the IPv6
/// extension headers, each with its own offsets); values read from map
/// memory are unknown to the verifier, so every way goes on from here in
/// the same state and the rest of the program is verified once, not once
/// per way. The read is volatile so that the compiler does not reuse what
/// it knows was written. The IP header's offset, the same on every way,
/// stays a constant: stages write at fixed offsets from it.
#[inline(always)]
pub fn settled(layout: &Layout) -> Layout {
    // SAFETY: a reference is valid for a read; `parse` wrote every field
    // (a valid `Frag` included) before the caller asks.
    let mut layout = unsafe { core::ptr::read_volatile(layout) };
    layout.l3_off = ETH_HLEN;
    // Bounded, because 6.1's verifier forgets an unbounded scalar spilled
    // to the stack (and with it the bounds check made before the spill),
    // and takes a packet pointer's bounds check only while its variable
    // offset stays below 64 KiB. No header this parser finds lies that
    // far, so the bound changes no packet's fate: every access past
    // `packet::MAX_OFFSET` (512) fails either way.
    layout.l4_off = layout.l4_off.min(L4_OFF_MAX);
    layout
}

/// Where [`settled`] bounds the L4 offset: past every offset a stage may
/// read, below what 6.1's verifier takes as a packet pointer's variable
/// offset.
const L4_OFF_MAX: usize = 1023;

/// Parses the IP header of family `fam` an ICMP error quotes at `off`
/// and the ports after it (an error quotes at least the 8 bytes after the
/// header, not a whole TCP header), writing the quoted packet's tuple into
/// `t`; `Ok(None)` when it is not a TCP or UDP packet of that family.
#[inline(always)]
pub fn quoted<P: Packet>(
    pkt: &P,
    off: usize,
    fam: u8,
    t: &mut Tuple,
) -> Result<Option<Layout>, PacketError> {
    let ip = if fam == family::V6 {
        ip6(pkt, off, t)?
    } else {
        ip4(pkt, off, t)?
    };
    let Some(mut ip) = ip else {
        return Ok(None);
    };
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return Ok(None);
    }
    ports(pkt, t, &mut ip, false)?;
    Ok(Some(ip.layout))
}

/// What the IP header tells besides the addresses (which are written into
/// the tuple).
struct Ip {
    /// The L4 protocol (for IPv6 past the walked bound: the extension
    /// header still in the way).
    proto: u8,
    /// Where the headers are (TCP flags still zero).
    layout: Layout,
}

/// Reads the IPv4 header at `l3_off`, writing its addresses and family
/// into `t`; `Ok(None)` when the bytes there are not an IPv4 header
/// (version, IHL).
#[inline(always)]
fn ip4<P: Packet>(pkt: &P, l3_off: usize, t: &mut Tuple) -> Result<Option<Ip>, PacketError> {
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
    t.saddr_be = [h.saddr, 0, 0, 0];
    t.daddr_be = [h.daddr, 0, 0, 0];
    t.proto = h.proto;
    t.family = family::V4;
    Ok(Some(Ip {
        proto: h.proto,
        layout: Layout {
            l3_off,
            l4_off: l3_off + ihl,
            frag,
            tcp_flags: 0,
            ip_id_be: u32::from(h.id),
        },
    }))
}

/// Reads the IPv6 header at `l3_off` and walks its extension headers
/// (hop-by-hop, routing, destination options, fragment, AH) to the
/// transport header, at most `IP6_EXT_MAX` of them, writing the addresses
/// and family into `t`; `Ok(None)` when the bytes there are not an IPv6
/// header. Past the bound, the protocol is the extension header left.
#[inline(always)]
fn ip6<P: Packet>(pkt: &P, l3_off: usize, t: &mut Tuple) -> Result<Option<Ip>, PacketError> {
    let h: Ip6Hdr = pkt.load(l3_off)?;
    if h.version() != 6 {
        return Ok(None);
    }
    let mut next = h.nexthdr;
    let mut off = l3_off + IP6_HLEN;
    let mut frag = Frag::None;
    let mut id = 0;
    let mut i = 0;
    while i < IP6_EXT_MAX && ext::is_ext(next) {
        if next == ext::FRAGMENT {
            let f: Ip6FragHdr = pkt.load(off)?;
            let frag_off = u16::from_be(f.frag_off);
            frag = if frag_off & IP6_OFFSET_MASK != 0 {
                Frag::Later
            } else if frag_off & IP6_MF != 0 {
                Frag::First
            } else {
                // An atomic fragment (RFC 6946): a whole datagram.
                Frag::None
            };
            id = f.id;
            next = f.nexthdr;
            off += 8;
        } else {
            // Next header, then the length: in 4-byte units less 2 for AH,
            // in 8-byte units less 1 for the others.
            let [nh, len]: [u8; 2] = pkt.load(off)?;
            off += if next == ext::AH {
                (usize::from(len) + 2) * 4
            } else {
                (usize::from(len) + 1) * 8
            };
            next = nh;
        }
        i += 1;
    }
    t.saddr_be = h.saddr;
    t.daddr_be = h.daddr;
    t.proto = next;
    t.family = family::V6;
    Ok(Some(Ip {
        proto: next,
        layout: Layout {
            l3_off,
            l4_off: off,
            frag,
            tcp_flags: 0,
            ip_id_be: id,
        },
    }))
}

/// Reads the ports (and TCP flags, or SCTP's as [`sctp_flags`] gives them)
/// of a TCP, UDP or SCTP packet into `t`, whose
/// addresses, protocol and family the IP header gave. `whole`: the fixed
/// L4 header must be there entire (it will be rewritten), not only the
/// ports.
#[inline(always)]
fn ports<P: Packet>(pkt: &P, t: &mut Tuple, ip: &mut Ip, whole: bool) -> Result<(), PacketError> {
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
    } else if ip.proto == proto::SCTP {
        let h: SctpHdr = pkt.load(l4_off)?;
        (h.sport, h.dport, sctp_flags(h.chunk_type))
    } else {
        let h: UdpHdr = pkt.load(l4_off)?;
        (h.sport, h.dport, 0)
    };
    layout.tcp_flags = tcp_flags;
    t.sport_be = sport;
    t.dport_be = dport;
    t._pad = [0; 2];
    Ok(())
}

/// The TCP flags the conntrack stage goes by, for an SCTP packet whose
/// first chunk is of type `chunk`: INIT and INIT ACK open an association
/// as SYN and SYN-ACK open a connection (so a flood of INITs, which a
/// listening endpoint answers without keeping state, stays embryonic),
/// ABORT ends it as RST does, SHUTDOWN COMPLETE as the last FIN. Only the
/// first chunk is read: RFC 9260 bundles ABORT only behind control
/// chunks, and SHUTDOWN COMPLETE never.
#[inline(always)]
fn sctp_flags(chunk: u8) -> u8 {
    match chunk {
        sctp_chunk::INIT | sctp_chunk::INIT_ACK => tcp_flags::SYN,
        sctp_chunk::ABORT => tcp_flags::RST,
        sctp_chunk::SHUTDOWN_COMPLETE => tcp_flags::FIN,
        _ => tcp_flags::ACK,
    }
}
