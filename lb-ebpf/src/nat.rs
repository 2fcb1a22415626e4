//! Address and port rewriting with checksum updates.
//!
//! One rewrite for every address family: only where the address sits and
//! whether the IP header has a checksum of its own differ (IPv4 has one;
//! IPv6 has none, its addresses are covered by the L4 pseudo-header only).
//! SCTP's checksum covers no pseudo-header and changes with its ports
//! only: a port rewrite records its change for `sctp` to apply once.

use lb_common::{
    conntrack::{CT_F_DNAT, CT_F_SNAT},
    family, proto, CtValue, IpAddrBe, Tuple,
};

use crate::{
    hdr::{IP4_CSUM, IP4_DADDR, IP4_SADDR, IP6_DADDR, IP6_SADDR, L4_DPORT, L4_SPORT},
    packet::{Packet, PacketError},
    parse::Layout,
    sctp,
};

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

/// Applies a conntrack entry's rewrite to the packet of tuple `t`.
#[inline(always)]
pub fn rewrite<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    ct: &CtValue,
) -> Result<(), PacketError> {
    if ct.flags & CT_F_DNAT != 0 {
        set_dst(pkt, t, layout, &ct.nat_daddr_be, ct.nat_dport_be)?;
    }
    if ct.flags & CT_F_SNAT != 0 {
        set_addr(pkt, t, layout, End::Source, &ct.nat_saddr_be)?;
        set_port(pkt, t, layout, End::Source, ct.nat_sport_be)?;
    }
    Ok(())
}

/// Rewrites the destination address and port (network order).
#[inline(always)]
pub fn set_dst<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    addr: &IpAddrBe,
    port: u16,
) -> Result<(), PacketError> {
    set_addr(pkt, t, layout, End::Destination, addr)?;
    set_port(pkt, t, layout, End::Destination, port)
}

/// Rewrites one address of the IP header from the tuple's to `new`, keeping
/// the IP header checksum (IPv4) and the L4 checksum (pseudo-header) right.
#[inline(always)]
fn set_addr<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    end: End,
    new: &IpAddrBe,
) -> Result<(), PacketError> {
    let old = if end == End::Source {
        &t.saddr_be
    } else {
        &t.daddr_be
    };
    // Words the address takes (and the pseudo-header update covers).
    let words = match t.family {
        family::V4 => {
            if old[0] == new[0] {
                return Ok(());
            }
            let field = if end == End::Source {
                IP4_SADDR
            } else {
                IP4_DADDR
            };
            pkt.store(layout.l3_off + field, new[0])?;
            pkt.l3_csum_replace(layout.l3_off + IP4_CSUM, old[0], new[0])?;
            1
        }
        family::V6 => {
            if old == new {
                return Ok(());
            }
            let field = if end == End::Source {
                IP6_SADDR
            } else {
                IP6_DADDR
            };
            // No header checksum: the pseudo-header update below covers
            // all four words.
            pkt.store(layout.l3_off + field, *new)?;
            4
        }
        _ => return Err(PacketError),
    };
    // A later fragment has no L4 checksum: the first fragment's update
    // covers the whole datagram's pseudo-header. SCTP's covers none.
    if !layout.has_l4() || t.proto == proto::SCTP {
        return Ok(());
    }
    let mut i = 0;
    // Bounded by the array, so that indexing needs no check.
    while i < 4 && i < words {
        pkt.l4_csum_replace(
            layout.l4_csum_off(t.proto),
            old[i],
            new[i],
            4,
            true,
            t.proto == proto::UDP,
        )?;
        i += 1;
    }
    Ok(())
}

/// Rewrites one port of the L4 header from the tuple's to `new`.
#[inline(always)]
fn set_port<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    end: End,
    new: u16,
) -> Result<(), PacketError> {
    let (field, old) = if end == End::Source {
        (L4_SPORT, t.sport_be)
    } else {
        (L4_DPORT, t.dport_be)
    };
    if old == new || !layout.has_l4() {
        return Ok(());
    }
    pkt.store(layout.l4_off + field, new)?;
    if t.proto == proto::SCTP {
        return sctp::port_changed(layout, field, old, new);
    }
    pkt.l4_csum_replace(
        layout.l4_csum_off(t.proto),
        u32::from(old),
        u32::from(new),
        2,
        false,
        t.proto == proto::UDP,
    )
}
