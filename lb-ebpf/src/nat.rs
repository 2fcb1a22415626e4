//! Address and port rewriting with checksum updates.

use lb_common::{
    conntrack::{CT_F_DNAT, CT_F_SNAT},
    proto, CtValue,
};

use crate::{
    hdr::{IP4_CSUM, IP4_DADDR, IP4_SADDR, L4_DPORT, L4_SPORT},
    packet::{Packet, PacketError},
    parse::Flow,
};

/// Applies a conntrack entry's rewrite to the packet.
#[inline(always)]
pub fn rewrite<P: Packet>(pkt: &mut P, flow: &Flow, ct: &CtValue) -> Result<(), PacketError> {
    if ct.flags & CT_F_DNAT != 0 {
        set_dst(pkt, flow, ct.nat_daddr_be[0], ct.nat_dport_be)?;
    }
    if ct.flags & CT_F_SNAT != 0 {
        set_addr(pkt, flow, IP4_SADDR, flow.saddr[0], ct.nat_saddr_be[0])?;
        set_port(pkt, flow, L4_SPORT, flow.sport, ct.nat_sport_be)?;
    }
    Ok(())
}

/// Rewrites the destination address and port (network order).
#[inline(always)]
pub fn set_dst<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    addr: u32,
    port: u16,
) -> Result<(), PacketError> {
    set_addr(pkt, flow, IP4_DADDR, flow.daddr[0], addr)?;
    set_port(pkt, flow, L4_DPORT, flow.dport, port)
}

#[inline(always)]
fn set_addr<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    field: usize,
    old: u32,
    new: u32,
) -> Result<(), PacketError> {
    if old == new {
        return Ok(());
    }
    pkt.store(flow.l3_off + field, new)?;
    pkt.l3_csum_replace(flow.l3_off + IP4_CSUM, old, new)?;
    // A later fragment has no L4 checksum: the first fragment's update
    // covers the whole datagram's pseudo-header.
    if !flow.has_l4() {
        return Ok(());
    }
    pkt.l4_csum_replace(
        flow.l4_csum_off(),
        old,
        new,
        4,
        true,
        flow.proto == proto::UDP,
    )
}

#[inline(always)]
fn set_port<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    field: usize,
    old: u16,
    new: u16,
) -> Result<(), PacketError> {
    if old == new || !flow.has_l4() {
        return Ok(());
    }
    pkt.store(flow.l4_off + field, new)?;
    pkt.l4_csum_replace(
        flow.l4_csum_off(),
        u32::from(old),
        u32::from(new),
        2,
        false,
        flow.proto == proto::UDP,
    )
}
