//! Refusing new flows to a Service with no endpoint, as kube-proxy does:
//! TCP gets a reset, UDP an ICMP port unreachable, both from the frontend;
//! and the ICMP errors a router sends (fragmentation needed, time
//! exceeded). The packet is turned into the answer in place and sent back
//! where it came from.

use lb_common::{
    csum::{add32, fold},
    family, proto, IpAddrBe, Tuple,
};

use crate::{
    csum,
    hdr::{
        icmp::{
            CODE as ICMP_CODE, CSUM as ICMP_CSUM, DEST_UNREACH as ICMP_DEST_UNREACH,
            FRAG_NEEDED as ICMP_FRAG_NEEDED, HLEN as ICMP_HLEN, IPPROTO_ICMP,
            PORT_UNREACH as ICMP_PORT_UNREACH, TIME_EXCEEDED as ICMP_TIME_EXCEEDED,
            TYPE as ICMP_TYPE, UNUSED as ICMP_UNUSED,
        },
        icmp6, tcp_flags, TcpHdr, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ETH_TYPE, IP4_DADDR,
        IP4_DEFAULT_TTL, IP4_DF, IP4_FRAG_OFF, IP4_HLEN, IP4_ID, IP4_PROTO, IP4_SADDR, IP4_TOS,
        IP4_TOT_LEN, IP4_TTL, IP4_VER_IHL, IP6_DADDR, IP6_DEFAULT_HOP_LIMIT, IP6_HLEN,
        IP6_HOP_LIMIT, IP6_NEXTHDR, IP6_PAYLOAD_LEN, IP6_SADDR, IP6_VER_WORD, TCP_HLEN, UDP_HLEN,
    },
    packet::{Packet, PacketError},
    parse::Layout,
};

/// The most an ICMPv6 error built here quotes: the fixed header, 24 bytes
/// of extension headers and the transport header's first 8 (RFC 4443 asks
/// for as much as fits; this is what one checksum pass covers, see
/// `csum::sum_words`).
const ICMP6_QUOTE_MAX: usize = 72;

/// An ICMP error in each family's numbering: type and code.
#[derive(Clone, Copy)]
struct Kind {
    v4: (u8, u8),
    v6: (u8, u8),
}

/// Port unreachable: the refusal of a datagram.
const PORT_UNREACH: Kind = Kind {
    v4: (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH),
    v6: (icmp6::DEST_UNREACH, icmp6::PORT_UNREACH),
};
/// Time (hop limit) exceeded in transit.
const TIME_EXCEEDED: Kind = Kind {
    v4: (ICMP_TIME_EXCEEDED, 0),
    v6: (icmp6::TIME_EXCEEDED, 0),
};
/// Fragmentation needed and DF set; IPv6's packet too big.
const TOO_BIG: Kind = Kind {
    v4: (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED),
    v6: (icmp6::PKT_TOOBIG, 0),
};

/// Rewrites the packet into its refusal. `Err` means: drop it instead (for
/// example a RST, which is never answered).
#[inline(always)]
pub fn reject<P: Packet>(pkt: &mut P, t: &Tuple, layout: &Layout) -> Result<(), PacketError> {
    if t.proto == proto::TCP {
        tcp_reset(pkt, t, layout)
    } else {
        icmp_error(pkt, t, layout, PORT_UNREACH, 0, &t.daddr_be)
    }
}

/// Rewrites the packet into an ICMP "time exceeded in transit" (ICMPv6's
/// "hop limit exceeded") from this node (`node`, network order), as a
/// router answers a packet it would have to forward with no hop left.
/// `Err` for a later fragment: only a first fragment carries the header to
/// quote (and RFC 1812 4.3.2.7 wants no error about the others).
#[inline(always)]
pub fn time_exceeded<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    node: &IpAddrBe,
) -> Result<(), PacketError> {
    if !layout.has_l4() {
        return Err(PacketError);
    }
    icmp_error(pkt, t, layout, TIME_EXCEEDED, 0, node)
}

/// Rewrites the packet into an ICMP "fragmentation needed" (ICMPv6's
/// "packet too big") from its destination, announcing `mtu`: the answer to
/// a packet that may not be fragmented and cannot go on at its size.
#[inline(always)]
pub fn frag_needed<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    mtu: u16,
) -> Result<(), PacketError> {
    icmp_error(pkt, t, layout, TOO_BIG, u32::from(mtu), &t.daddr_be)
}

#[inline(always)]
fn swap_macs<P: Packet>(pkt: &mut P) -> Result<(), PacketError> {
    let dst: [u8; 6] = pkt.load(0)?;
    let src: [u8; 6] = pkt.load(6)?;
    pkt.store(0, src)?;
    pkt.store(6, dst)
}

/// The one's-complement sum of the pseudo-header of an L4 message of
/// protocol `l4` and `len` bytes from `src` to `dst`: IPv4's and IPv6's
/// differ in layout, not in sum (both add the addresses, the protocol and
/// the length as 16-bit words).
#[inline(always)]
fn pseudo_sum(fam: u8, src: &IpAddrBe, dst: &IpAddrBe, l4: u8, len: u16) -> u32 {
    let words = if fam == family::V6 { 4 } else { 1 };
    let mut sum = u32::from(u16::from(l4).to_be()) + u32::from(len.to_be());
    let mut i = 0;
    // Bounded by the array, so that indexing needs no check.
    while i < 4 && i < words {
        sum = add32(sum, src[i]);
        sum = add32(sum, dst[i]);
        i += 1;
    }
    sum
}

/// Writes a fresh IPv6 header at the frame's `ip` offset: no extension
/// headers, `payload_len` bytes of `nexthdr` after it (also DSR's outer
/// header).
#[inline(always)]
pub fn ip6_header<P: Packet>(
    pkt: &mut P,
    ip: usize,
    payload_len: u16,
    nexthdr: u8,
    src: &IpAddrBe,
    dst: &IpAddrBe,
) -> Result<(), PacketError> {
    pkt.store(ip, IP6_VER_WORD)?;
    pkt.store(ip + IP6_PAYLOAD_LEN, payload_len.to_be())?;
    pkt.store(ip + IP6_NEXTHDR, nexthdr)?;
    pkt.store(ip + IP6_HOP_LIMIT, IP6_DEFAULT_HOP_LIMIT)?;
    pkt.store(ip + IP6_SADDR, *src)?;
    pkt.store(ip + IP6_DADDR, *dst)
}

#[inline(always)]
fn tcp_reset<P: Packet>(pkt: &mut P, t: &Tuple, layout: &Layout) -> Result<(), PacketError> {
    let seen = layout.tcp_flags;
    if seen & tcp_flags::RST != 0 {
        return Err(PacketError);
    }
    let v6 = t.family == family::V6;
    let l3 = layout.l3_off;
    let l4 = layout.l4_off;
    let ihl = l4 - l3;
    let ip_len = if v6 {
        IP6_HLEN + usize::from(u16::from_be(pkt.load(l3 + IP6_PAYLOAD_LEN)?))
    } else {
        usize::from(u16::from_be(pkt.load(l3 + IP4_TOT_LEN)?))
    };
    let tcp: TcpHdr = pkt.load(l4)?;
    let doff = usize::from(tcp.doff >> 4) * 4;
    let payload = ip_len.saturating_sub(ihl + doff) as u32;
    // RFC 9293 3.10.7.1: answer an ACK with its ack number as our sequence;
    // anything else with an ACK covering the segment.
    let (seq, ack, flags) = if seen & tcp_flags::ACK != 0 {
        (tcp.ack, 0, tcp_flags::RST)
    } else {
        let mut len = payload;
        if seen & tcp_flags::SYN != 0 {
            len += 1;
        }
        if seen & tcp_flags::FIN != 0 {
            len += 1;
        }
        (
            0,
            u32::from_be(tcp.seq).wrapping_add(len).to_be(),
            tcp_flags::RST | tcp_flags::ACK,
        )
    };
    let mut rst = TcpHdr {
        sport: t.dport_be,
        dport: t.sport_be,
        seq,
        ack,
        doff: ((TCP_HLEN / 4) as u8) << 4,
        flags,
        window: 0,
        check: 0,
        urg: 0,
    };
    let mut sum = pseudo_sum(
        t.family,
        &t.daddr_be,
        &t.saddr_be,
        proto::TCP,
        TCP_HLEN as u16,
    );
    // SAFETY: TcpHdr is 20 bytes of plain integers.
    let words: [u16; TCP_HLEN / 2] = unsafe { core::mem::transmute(rst) };
    for w in words {
        sum += u32::from(w);
    }
    rst.check = !fold(sum);

    swap_macs(pkt)?;
    if v6 {
        // The reset goes without the extension headers the segment had.
        let l4 = l3 + IP6_HLEN;
        ip6_header(
            pkt,
            l3,
            TCP_HLEN as u16,
            proto::TCP,
            &t.daddr_be,
            &t.saddr_be,
        )?;
        pkt.store(l4, rst)?;
        return pkt.truncate((l4 + TCP_HLEN) as u32);
    }
    pkt.store(l3 + IP4_TOT_LEN, ((ihl + TCP_HLEN) as u16).to_be())?;
    pkt.store(l3 + IP4_FRAG_OFF, IP4_DF.to_be())?;
    pkt.store(l3 + IP4_TTL, IP4_DEFAULT_TTL)?;
    pkt.store(l3 + IP4_SADDR, t.daddr_be[0])?;
    pkt.store(l3 + IP4_DADDR, t.saddr_be[0])?;
    csum::ip_checksum(pkt, l3, ihl)?;
    pkt.store(l4, rst)?;
    pkt.truncate((l4 + TCP_HLEN) as u32)
}

/// Rewrites the packet into an ICMP (ICMPv6) error of `kind` from `from`
/// (network order) to its sender, `rest` (host order) in the 4 bytes after
/// the checksum (the next hop's MTU for a packet too big).
#[inline(always)]
fn icmp_error<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    kind: Kind,
    rest: u32,
    from: &IpAddrBe,
) -> Result<(), PacketError> {
    let ihl = layout.l4_off - layout.l3_off;
    // The error quotes the offending IP header and the first 8 bytes after
    // it (IPv6: at most ICMP6_QUOTE_MAX bytes from its start).
    let mut quoted = ihl + UDP_HLEN;
    let v6 = t.family == family::V6;
    let ip_hlen = if v6 {
        if quoted > ICMP6_QUOTE_MAX {
            quoted = ICMP6_QUOTE_MAX;
        }
        IP6_HLEN
    } else {
        IP4_HLEN
    };
    let dst: [u8; 6] = pkt.load(0)?;
    let src: [u8; 6] = pkt.load(6)?;
    pkt.truncate((layout.l3_off + quoted) as u32)?;
    // Room for the new IP and ICMP headers between Ethernet and the quote:
    // after this the old frame's IP header sits where the quote belongs.
    pkt.grow_head((ip_hlen + ICMP_HLEN) as u32)?;

    pkt.store(0, src)?;
    pkt.store(6, dst)?;
    let ip = ETH_HLEN;
    let icmp = ip + ip_hlen;
    let msg_len = ICMP_HLEN + quoted;
    let ((kind, code), mut sum) = if v6 {
        pkt.store(ETH_TYPE, ETH_P_IPV6.to_be())?;
        ip6_header(
            pkt,
            ip,
            msg_len as u16,
            icmp6::IPPROTO_ICMPV6,
            from,
            &t.saddr_be,
        )?;
        // ICMPv6's checksum covers a pseudo-header, as TCP's does.
        let pseudo = pseudo_sum(
            family::V6,
            from,
            &t.saddr_be,
            icmp6::IPPROTO_ICMPV6,
            msg_len as u16,
        );
        (kind.v6, pseudo)
    } else {
        pkt.store(ETH_TYPE, ETH_P_IP.to_be())?;
        pkt.store(ip, IP4_VER_IHL)?;
        pkt.store(ip + IP4_TOS, 0u8)?;
        pkt.store(ip + IP4_TOT_LEN, ((IP4_HLEN + msg_len) as u16).to_be())?;
        pkt.store(ip + IP4_ID, 0u32)?;
        pkt.store(ip + IP4_TTL, IP4_DEFAULT_TTL)?;
        pkt.store(ip + IP4_PROTO, IPPROTO_ICMP)?;
        pkt.store(ip + IP4_SADDR, from[0])?;
        pkt.store(ip + IP4_DADDR, t.saddr_be[0])?;
        csum::ip_checksum(pkt, ip, IP4_HLEN)?;
        (kind.v4, 0)
    };
    pkt.store(icmp + ICMP_TYPE, kind)?;
    pkt.store(icmp + ICMP_CODE, code)?;
    pkt.store(icmp + ICMP_CSUM, 0u16)?;
    pkt.store(icmp + ICMP_UNUSED, rest.to_be())?;
    sum += csum::sum_words(pkt, icmp, msg_len)?;
    pkt.store(icmp + ICMP_CSUM, !fold(sum))
}
