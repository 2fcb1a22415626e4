//! Refusing new flows to a Service with no endpoint, as kube-proxy does:
//! TCP gets a reset, UDP an ICMP port unreachable, both from the frontend;
//! and the ICMP errors a router sends (fragmentation needed, time
//! exceeded). The packet is turned into the answer in place and sent back
//! where it came from.

use lb_common::{
    csum::{add32, fold},
    proto, Tuple,
};

use crate::{
    csum,
    hdr::{
        icmp::{
            CODE as ICMP_CODE, CSUM as ICMP_CSUM, DEST_UNREACH as ICMP_DEST_UNREACH,
            FRAG_NEEDED as ICMP_FRAG_NEEDED, HLEN as ICMP_HLEN, IPPROTO_ICMP, MTU as ICMP_MTU,
            PORT_UNREACH as ICMP_PORT_UNREACH, TIME_EXCEEDED as ICMP_TIME_EXCEEDED,
            TYPE as ICMP_TYPE, UNUSED as ICMP_UNUSED,
        },
        tcp_flags, TcpHdr, ETH_HLEN, ETH_P_IP, ETH_TYPE, IP4_DADDR, IP4_DEFAULT_TTL, IP4_DF,
        IP4_FRAG_OFF, IP4_HLEN, IP4_ID, IP4_PROTO, IP4_SADDR, IP4_TOS, IP4_TOT_LEN, IP4_TTL,
        IP4_VER_IHL, TCP_HLEN, UDP_HLEN,
    },
    packet::{Packet, PacketError},
    parse::Layout,
};

/// Rewrites the packet into its refusal. `Err` means: drop it instead (for
/// example a RST, which is never answered).
#[inline(always)]
pub fn reject<P: Packet>(pkt: &mut P, t: &Tuple, layout: &Layout) -> Result<(), PacketError> {
    if t.proto == proto::TCP {
        tcp_reset(pkt, t, layout)
    } else {
        icmp_error(
            pkt,
            t,
            layout,
            ICMP_DEST_UNREACH,
            ICMP_PORT_UNREACH,
            0,
            t.daddr_be[0],
        )
    }
}

/// Rewrites the packet into an ICMP "time exceeded in transit" from this
/// node (`node`, network order), as a router answers a packet it would
/// have to forward with TTL 0. `Err` for a later fragment: only a first
/// fragment carries the header to quote (and RFC 1812 4.3.2.7 wants no
/// error about the others).
#[inline(always)]
pub fn time_exceeded<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    node: u32,
) -> Result<(), PacketError> {
    if !layout.has_l4() {
        return Err(PacketError);
    }
    icmp_error(pkt, t, layout, ICMP_TIME_EXCEEDED, 0, 0, node)
}

/// Rewrites the packet into an ICMP "fragmentation needed" from its
/// destination, announcing `mtu`: the answer to a packet with DF set that
/// cannot go on at its size.
#[inline(always)]
pub fn frag_needed<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    mtu: u16,
) -> Result<(), PacketError> {
    icmp_error(
        pkt,
        t,
        layout,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        mtu,
        t.daddr_be[0],
    )
}

#[inline(always)]
fn swap_macs<P: Packet>(pkt: &mut P) -> Result<(), PacketError> {
    let dst: [u8; 6] = pkt.load(0)?;
    let src: [u8; 6] = pkt.load(6)?;
    pkt.store(0, src)?;
    pkt.store(6, dst)
}

#[inline(always)]
fn tcp_reset<P: Packet>(pkt: &mut P, t: &Tuple, layout: &Layout) -> Result<(), PacketError> {
    let seen = layout.tcp_flags;
    if seen & tcp_flags::RST != 0 {
        return Err(PacketError);
    }
    let l3 = layout.l3_off;
    let l4 = layout.l4_off;
    let ihl = l4 - l3;
    let tot_len = usize::from(u16::from_be(pkt.load(l3 + IP4_TOT_LEN)?));
    let tcp: TcpHdr = pkt.load(l4)?;
    let doff = usize::from(tcp.doff >> 4) * 4;
    let payload = tot_len.saturating_sub(ihl + doff) as u32;
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
    let mut sum = add32(0, t.daddr_be[0]);
    sum = add32(sum, t.saddr_be[0]);
    sum += u32::from(u16::from(proto::TCP).to_be()) + u32::from((TCP_HLEN as u16).to_be());
    // SAFETY: TcpHdr is 20 bytes of plain integers.
    let words: [u16; TCP_HLEN / 2] = unsafe { core::mem::transmute(rst) };
    for w in words {
        sum += u32::from(w);
    }
    rst.check = !fold(sum);

    swap_macs(pkt)?;
    pkt.store(l3 + IP4_TOT_LEN, ((ihl + TCP_HLEN) as u16).to_be())?;
    pkt.store(l3 + IP4_FRAG_OFF, IP4_DF.to_be())?;
    pkt.store(l3 + IP4_TTL, IP4_DEFAULT_TTL)?;
    pkt.store(l3 + IP4_SADDR, t.daddr_be[0])?;
    pkt.store(l3 + IP4_DADDR, t.saddr_be[0])?;
    csum::ip_checksum(pkt, l3, ihl)?;
    pkt.store(l4, rst)?;
    pkt.truncate((l4 + TCP_HLEN) as u32)
}

/// Rewrites the packet into an ICMP error of `kind` and `code` from `from`
/// (network order) to its sender (and, for fragmentation needed, the next
/// hop's `mtu`).
#[inline(always)]
fn icmp_error<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    kind: u8,
    code: u8,
    mtu: u16,
    from: u32,
) -> Result<(), PacketError> {
    let ihl = layout.l4_off - layout.l3_off;
    // The error quotes the offending IP header and the first 8 bytes after it.
    let quoted = ihl + UDP_HLEN;
    let dst: [u8; 6] = pkt.load(0)?;
    let src: [u8; 6] = pkt.load(6)?;
    pkt.truncate((layout.l4_off + UDP_HLEN) as u32)?;
    // Room for the new IP and ICMP headers between Ethernet and the quote:
    // after this the old frame starts at 28, so its IP header already sits
    // where the quote belongs (14 + 20 + 8).
    pkt.grow_head((IP4_HLEN + ICMP_HLEN) as u32)?;

    pkt.store(0, src)?;
    pkt.store(6, dst)?;
    pkt.store(ETH_TYPE, ETH_P_IP.to_be())?;
    let ip = ETH_HLEN;
    pkt.store(ip, IP4_VER_IHL)?;
    pkt.store(ip + IP4_TOS, 0u8)?;
    pkt.store(
        ip + IP4_TOT_LEN,
        ((IP4_HLEN + ICMP_HLEN + quoted) as u16).to_be(),
    )?;
    pkt.store(ip + IP4_ID, 0u32)?;
    pkt.store(ip + IP4_TTL, IP4_DEFAULT_TTL)?;
    pkt.store(ip + IP4_PROTO, IPPROTO_ICMP)?;
    pkt.store(ip + IP4_SADDR, from)?;
    pkt.store(ip + IP4_DADDR, t.saddr_be[0])?;
    csum::ip_checksum(pkt, ip, IP4_HLEN)?;

    let icmp = ip + IP4_HLEN;
    pkt.store(icmp + ICMP_TYPE, kind)?;
    pkt.store(icmp + ICMP_CODE, code)?;
    pkt.store(icmp + ICMP_CSUM, 0u16)?;
    pkt.store(icmp + ICMP_UNUSED, 0u16)?;
    pkt.store(icmp + ICMP_MTU, mtu.to_be())?;
    let sum = csum::sum_words(pkt, icmp, ICMP_HLEN + quoted)?;
    pkt.store(icmp + ICMP_CSUM, !fold(sum))
}
