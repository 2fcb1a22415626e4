//! ICMP errors about translated flows (destination unreachable, including
//! fragmentation needed, and time exceeded): the quoted packet is rewritten
//! back to what its sender knows, so the sender's stack matches the error to
//! its socket and path MTU discovery works through the load balancer.
//!
//! The error quotes a packet the client's side sent after translation
//! (client or this node → backend). Reversed, that tuple is the flow's reply
//! conntrack entry, whose rewrite gives the frontend and, after SNAT, the
//! client. Only the quoted headers and, after SNAT, the outer destination
//! change; the outer source (the reporting router) stays, so the stack
//! forwards the result like any transit packet. Errors are not generated
//! here and never answered, so this stage only ever passes.

use lb_common::{
    conntrack::{CT_F_DNAT, CT_F_REPLY},
    family, proto, CtKey,
};

use crate::{
    hdr::{
        icmp::{CSUM as ICMP_CSUM, DEST_UNREACH, HLEN as ICMP_HLEN, IPPROTO_ICMP, TIME_EXCEEDED},
        ETH_HLEN, ETH_P_IP, ETH_TYPE, IP4_CSUM, IP4_DADDR, IP4_FRAG_MASK, IP4_FRAG_OFF, IP4_PROTO,
        IP4_SADDR,
    },
    maps::LB_CT_V1,
    packet::{Packet, PacketError},
};

/// Translates the packet if it is an ICMP error about a translated flow;
/// `Ok(true)` when it did.
#[inline(always)]
pub fn translate_error<P: Packet>(pkt: &mut P) -> Result<bool, PacketError> {
    if u16::from_be(pkt.load::<u16>(ETH_TYPE)?) != ETH_P_IP {
        return Ok(false);
    }
    let l3 = ETH_HLEN;
    let ver_ihl: u8 = pkt.load(l3)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 || pkt.load::<u8>(l3 + IP4_PROTO)? != IPPROTO_ICMP {
        return Ok(false);
    }
    if u16::from_be(pkt.load::<u16>(l3 + IP4_FRAG_OFF)?) & IP4_FRAG_MASK != 0 {
        return Ok(false);
    }
    // Headers at variable offsets are read whole: single-byte reads there
    // become checks the verifier cannot follow.
    let l4 = l3 + ihl;
    let icmp: [u8; ICMP_HLEN] = pkt.load(l4)?;
    if icmp[0] != DEST_UNREACH && icmp[0] != TIME_EXCEEDED {
        return Ok(false);
    }
    // The quoted packet: its IP header and at least its ports.
    let inner = l4 + ICMP_HLEN;
    let ih: [u8; 20] = pkt.load(inner)?;
    let inner_ihl = usize::from(ih[0] & 0x0f) * 4;
    if ih[0] >> 4 != 4 || inner_ihl < 20 {
        return Ok(false);
    }
    let inner_proto = ih[9];
    if inner_proto != proto::TCP && inner_proto != proto::UDP {
        return Ok(false);
    }
    let inner_l4 = inner + inner_ihl;
    let ports: [u16; 2] = pkt.load(inner_l4)?;
    let isrc = u32::from_ne_bytes([ih[12], ih[13], ih[14], ih[15]]);
    let idst = u32::from_ne_bytes([ih[16], ih[17], ih[18], ih[19]]);
    let key = CtKey {
        saddr_be: [idst, 0, 0, 0],
        daddr_be: [isrc, 0, 0, 0],
        sport_be: ports[1],
        dport_be: ports[0],
        proto: inner_proto,
        family: family::V4,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    let Some(ct) = (unsafe { LB_CT_V1.get(&key).copied() }) else {
        return Ok(false);
    };
    if ct.flags & CT_F_REPLY == 0 {
        return Ok(false);
    }
    let icmp_csum = l4 + ICMP_CSUM;
    let snat = ct.flags & CT_F_DNAT != 0;
    if snat {
        // The sender was this node on the client's behalf.
        set_inner_addr(pkt, inner, IP4_SADDR, isrc, ct.nat_daddr_be[0], icmp_csum)?;
        set_inner_port(pkt, inner_l4, ports[0], ct.nat_dport_be, icmp_csum)?;
        let outer: u32 = pkt.load(l3 + IP4_DADDR)?;
        pkt.store(l3 + IP4_DADDR, ct.nat_daddr_be[0])?;
        pkt.l3_csum_replace(l3 + IP4_CSUM, outer, ct.nat_daddr_be[0])?;
    }
    set_inner_addr(pkt, inner, IP4_DADDR, idst, ct.nat_saddr_be[0], icmp_csum)?;
    set_inner_port(pkt, inner_l4 + 2, ports[1], ct.nat_sport_be, icmp_csum)?;
    Ok(true)
}

/// Rewrites an address of the quoted IP header, keeping the quoted header's
/// checksum and the ICMP checksum right (the ICMP checksum covers the quote,
/// its checksum field included).
#[inline(always)]
fn set_inner_addr<P: Packet>(
    pkt: &mut P,
    inner: usize,
    field: usize,
    old: u32,
    new: u32,
    icmp_csum: usize,
) -> Result<(), PacketError> {
    if old == new {
        return Ok(());
    }
    let old_sum: u16 = pkt.load(inner + IP4_CSUM)?;
    pkt.store(inner + field, new)?;
    pkt.l3_csum_replace(inner + IP4_CSUM, old, new)?;
    let new_sum: u16 = pkt.load(inner + IP4_CSUM)?;
    pkt.l4_csum_replace(icmp_csum, old, new, 4, false, false)?;
    pkt.l4_csum_replace(
        icmp_csum,
        u32::from(old_sum),
        u32::from(new_sum),
        2,
        false,
        false,
    )
}

/// Rewrites a port of the quoted L4 header (its own checksum is not
/// recomputed: the quote is usually cut short, and stacks do not check it).
#[inline(always)]
fn set_inner_port<P: Packet>(
    pkt: &mut P,
    off: usize,
    old: u16,
    new: u16,
    icmp_csum: usize,
) -> Result<(), PacketError> {
    if old == new {
        return Ok(());
    }
    pkt.store(off, new)?;
    pkt.l4_csum_replace(icmp_csum, u32::from(old), u32::from(new), 2, false, false)
}
