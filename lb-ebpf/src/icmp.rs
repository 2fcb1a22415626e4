//! ICMP errors about translated flows (destination unreachable, including
//! fragmentation needed, and time exceeded; ICMPv6's destination
//! unreachable, packet too big and time exceeded): the quoted packet is rewritten
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
    family, IpAddrBe, Tuple,
};

use crate::{
    conntrack,
    hdr::{
        icmp::{
            CSUM as ICMP_CSUM, DEST_UNREACH, HLEN as ICMP_HLEN, TIME_EXCEEDED, TYPE as ICMP_TYPE,
        },
        icmp6, IP4_CSUM, IP4_DADDR, IP4_SADDR, IP6_DADDR, IP6_SADDR, L4_DPORT, L4_SPORT,
    },
    packet::{Packet, PacketError},
    parse::{self, Frag, Layout},
};

/// Which address of an IP header a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

/// Translates the ICMP (ICMPv6) message of a packet laid out as `layout`,
/// whose tuple `quote` holds its addresses and family, if it is an error
/// about a translated flow; `Ok(true)` when it did. The quoted packet's
/// tuple is then parsed into `quote`, the key of its reply entry built in
/// `key`.
#[inline(always)]
pub fn translate_error<P: Packet>(
    pkt: &mut P,
    layout: &Layout,
    quote: &mut Tuple,
    key: &mut Tuple,
) -> Result<bool, PacketError> {
    if layout.frag != Frag::None {
        return Ok(false);
    }
    let fam = quote.family;
    let (l3, l4) = (layout.l3_off, layout.l4_off);
    // Headers at variable offsets are read whole: single-byte reads there
    // become checks the verifier cannot follow.
    let icmp: [u8; ICMP_HLEN] = pkt.load(l4)?;
    let kind = icmp[ICMP_TYPE];
    let error = if fam == family::V6 {
        matches!(
            kind,
            icmp6::DEST_UNREACH | icmp6::PKT_TOOBIG | icmp6::TIME_EXCEEDED
        )
    } else {
        kind == DEST_UNREACH || kind == TIME_EXCEEDED
    };
    if !error {
        return Ok(false);
    }
    let inner = l4 + ICMP_HLEN;
    let Some(quoted) = parse::quoted(pkt, inner, fam, quote)? else {
        return Ok(false);
    };
    // The quote went from the client's side to the backend: reversed, it
    // is the flow's reply entry.
    *key = quote.reversed();
    // Embryonic flows included: an error about a SYN is the usual one.
    let Some(ct) = conntrack::peek(key) else {
        return Ok(false);
    };
    if ct.flags & CT_F_REPLY == 0 {
        return Ok(false);
    }
    let icmp_csum = l4 + ICMP_CSUM;
    let snat = ct.flags & CT_F_DNAT != 0;
    if snat {
        // The sender was this node on the client's behalf.
        let (addr, port) = (quote.saddr_be, quote.sport_be);
        set_inner_addr(
            pkt,
            fam,
            inner,
            End::Source,
            &addr,
            &ct.nat_daddr_be,
            icmp_csum,
        )?;
        set_inner_port(
            pkt,
            quoted.l4_off + L4_SPORT,
            port,
            ct.nat_dport_be,
            icmp_csum,
        )?;
        set_outer_dst(pkt, fam, l3, &ct.nat_daddr_be, icmp_csum)?;
    }
    let (addr, port) = (quote.daddr_be, quote.dport_be);
    set_inner_addr(
        pkt,
        fam,
        inner,
        End::Destination,
        &addr,
        &ct.nat_saddr_be,
        icmp_csum,
    )?;
    set_inner_port(
        pkt,
        quoted.l4_off + L4_DPORT,
        port,
        ct.nat_sport_be,
        icmp_csum,
    )?;
    Ok(true)
}

/// Rewrites the error's own destination to `new`: IPv4's header checksum
/// covers it; ICMPv6's checksum does, through its pseudo-header.
#[inline(always)]
fn set_outer_dst<P: Packet>(
    pkt: &mut P,
    fam: u8,
    l3: usize,
    new: &IpAddrBe,
    icmp_csum: usize,
) -> Result<(), PacketError> {
    if fam != family::V6 {
        let old: u32 = pkt.load(l3 + IP4_DADDR)?;
        pkt.store(l3 + IP4_DADDR, new[0])?;
        return pkt.l3_csum_replace(l3 + IP4_CSUM, old, new[0]);
    }
    let old: IpAddrBe = pkt.load(l3 + IP6_DADDR)?;
    pkt.store(l3 + IP6_DADDR, *new)?;
    let mut i = 0;
    while i < 4 {
        pkt.l4_csum_replace(icmp_csum, old[i], new[i], 4, true, false)?;
        i += 1;
    }
    Ok(())
}

/// Rewrites an address of the quoted IP header, keeping the ICMP checksum
/// right (it covers the quote) and, for IPv4, the quoted header's own
/// checksum (which the ICMP checksum covers too); an IPv6 header has none.
#[inline(always)]
fn set_inner_addr<P: Packet>(
    pkt: &mut P,
    fam: u8,
    inner: usize,
    end: End,
    old: &IpAddrBe,
    new: &IpAddrBe,
    icmp_csum: usize,
) -> Result<(), PacketError> {
    if old == new {
        return Ok(());
    }
    if fam == family::V6 {
        let field = if end == End::Source {
            IP6_SADDR
        } else {
            IP6_DADDR
        };
        pkt.store(inner + field, *new)?;
        let mut i = 0;
        while i < 4 {
            pkt.l4_csum_replace(icmp_csum, old[i], new[i], 4, false, false)?;
            i += 1;
        }
        return Ok(());
    }
    let field = if end == End::Source {
        IP4_SADDR
    } else {
        IP4_DADDR
    };
    let (old, new) = (old[0], new[0]);
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
