//! Refusing new flows to a Service with no endpoint, as kube-proxy does:
//! TCP gets a reset, UDP an ICMP port unreachable, both from the frontend.
//! The packet is turned into the answer in place and sent back where it came
//! from.

use lb_common::proto;

use crate::{
    csum,
    packet::{Packet, PacketError},
    parse::{
        tcp_flags, Flow, TcpHdr, ETH_HLEN, IP4_CSUM, IP4_DADDR, IP4_SADDR, TCP_HLEN, UDP_HLEN,
    },
};

use crate::parse::icmp::{
    DEST_UNREACH as ICMP_DEST_UNREACH, HLEN as ICMP_HLEN, IPPROTO_ICMP,
    PORT_UNREACH as ICMP_PORT_UNREACH,
};

const IP4_HLEN: usize = 20;

/// Rewrites the packet into its refusal. `Err` means: drop it instead (for
/// example a RST, which is never answered).
#[inline(always)]
pub fn reject<P: Packet>(pkt: &mut P, flow: &Flow) -> Result<(), PacketError> {
    if flow.proto == proto::TCP {
        tcp_reset(pkt, flow)
    } else {
        icmp_port_unreachable(pkt, flow)
    }
}

#[inline(always)]
fn swap_macs<P: Packet>(pkt: &mut P) -> Result<(), PacketError> {
    let dst: [u8; 6] = pkt.load(0)?;
    let src: [u8; 6] = pkt.load(6)?;
    pkt.store(0, src)?;
    pkt.store(6, dst)
}

/// One's-complement sum of `len` bytes (even, at most 80) at `off`.
#[inline(always)]
fn sum_words<P: Packet>(pkt: &P, off: usize, len: usize) -> Result<u32, PacketError> {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 40 {
        if i * 2 >= len {
            break;
        }
        sum += u32::from(pkt.load::<u16>(off + i * 2)?);
        i += 1;
    }
    Ok(sum)
}

/// Writes a fresh IPv4 header checksum for the header at `off`.
#[inline(always)]
fn ip_checksum<P: Packet>(pkt: &mut P, off: usize, ihl: usize) -> Result<(), PacketError> {
    pkt.store::<u16>(off + IP4_CSUM, 0)?;
    let sum = sum_words(pkt, off, ihl)?;
    pkt.store(off + IP4_CSUM, !csum::fold(sum))
}

#[inline(always)]
fn tcp_reset<P: Packet>(pkt: &mut P, flow: &Flow) -> Result<(), PacketError> {
    if flow.tcp_flags & tcp_flags::RST != 0 {
        return Err(PacketError);
    }
    let l3 = flow.l3_off;
    let l4 = flow.l4_off;
    let ihl = l4 - l3;
    let tot_len = usize::from(u16::from_be(pkt.load(l3 + 2)?));
    let tcp: TcpHdr = pkt.load(l4)?;
    let doff = usize::from(tcp.doff >> 4) * 4;
    let payload = tot_len.saturating_sub(ihl + doff) as u32;
    // RFC 9293 3.10.7.1: answer an ACK with its ack number as our sequence;
    // anything else with an ACK covering the segment.
    let (seq, ack, flags) = if flow.tcp_flags & tcp_flags::ACK != 0 {
        (tcp.ack, 0, tcp_flags::RST)
    } else {
        let mut len = payload;
        if flow.tcp_flags & tcp_flags::SYN != 0 {
            len += 1;
        }
        if flow.tcp_flags & tcp_flags::FIN != 0 {
            len += 1;
        }
        (
            0,
            u32::from_be(tcp.seq).wrapping_add(len).to_be(),
            tcp_flags::RST | tcp_flags::ACK,
        )
    };
    let mut rst = TcpHdr {
        sport: flow.dport,
        dport: flow.sport,
        seq,
        ack,
        doff: ((TCP_HLEN / 4) as u8) << 4,
        flags,
        window: 0,
        check: 0,
        urg: 0,
    };
    let mut sum = csum::add32(0, flow.daddr[0]);
    sum = csum::add32(sum, flow.saddr[0]);
    sum += u32::from(u16::from(proto::TCP).to_be()) + u32::from((TCP_HLEN as u16).to_be());
    // SAFETY: TcpHdr is 20 bytes of plain integers.
    let words: [u16; TCP_HLEN / 2] = unsafe { core::mem::transmute(rst) };
    for w in words {
        sum += u32::from(w);
    }
    rst.check = !csum::fold(sum);

    swap_macs(pkt)?;
    pkt.store(l3 + 2, ((ihl + TCP_HLEN) as u16).to_be())?;
    pkt.store(l3 + 6, 0x4000u16.to_be())?;
    pkt.store(l3 + 8, 64u8)?;
    pkt.store(l3 + IP4_SADDR, flow.daddr[0])?;
    pkt.store(l3 + IP4_DADDR, flow.saddr[0])?;
    ip_checksum(pkt, l3, ihl)?;
    pkt.store(l4, rst)?;
    pkt.truncate((l4 + TCP_HLEN) as u32)
}

#[inline(always)]
fn icmp_port_unreachable<P: Packet>(pkt: &mut P, flow: &Flow) -> Result<(), PacketError> {
    let ihl = flow.l4_off - flow.l3_off;
    // The error quotes the offending IP header and the first 8 bytes after it.
    let quoted = ihl + UDP_HLEN;
    let dst: [u8; 6] = pkt.load(0)?;
    let src: [u8; 6] = pkt.load(6)?;
    pkt.truncate((flow.l4_off + UDP_HLEN) as u32)?;
    // Room for the new IP and ICMP headers between Ethernet and the quote:
    // after this the old frame starts at 28, so its IP header already sits
    // where the quote belongs (14 + 20 + 8).
    pkt.grow_head((IP4_HLEN + ICMP_HLEN) as u32)?;

    pkt.store(0, src)?;
    pkt.store(6, dst)?;
    pkt.store(12, 0x0800u16.to_be())?;
    let ip = ETH_HLEN;
    pkt.store(ip, 0x45u8)?;
    pkt.store(ip + 1, 0u8)?;
    pkt.store(ip + 2, ((IP4_HLEN + ICMP_HLEN + quoted) as u16).to_be())?;
    pkt.store(ip + 4, 0u32)?;
    pkt.store(ip + 8, 64u8)?;
    pkt.store(ip + 9, IPPROTO_ICMP)?;
    pkt.store(ip + IP4_SADDR, flow.daddr[0])?;
    pkt.store(ip + IP4_DADDR, flow.saddr[0])?;
    ip_checksum(pkt, ip, IP4_HLEN)?;

    let icmp = ip + IP4_HLEN;
    pkt.store(icmp, ICMP_DEST_UNREACH)?;
    pkt.store(icmp + 1, ICMP_PORT_UNREACH)?;
    pkt.store(icmp + 2, 0u16)?;
    pkt.store(icmp + 4, 0u32)?;
    let sum = sum_words(pkt, icmp, ICMP_HLEN + quoted)?;
    pkt.store(icmp + 2, !csum::fold(sum))
}
