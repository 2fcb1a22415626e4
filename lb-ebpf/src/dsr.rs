//! Direct server return (`lb_common::dsr`): wrapping a client's packet to
//! the backend's node, and unwrapping it there.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use lb_common::{
    config::CONFIG_F_DSR,
    conntrack::{CT_F_DNAT, CT_F_DSR, CT_F_FORWARD, CT_F_REPLY, CT_F_SNAT},
    dsr::{Shim, ENCAP_LEN, IPPROTO_LB, SHIM_MAGIC, SHIM_VERSION},
    service::{BACKEND_F_LOCAL, SVC_F_LOCAL_ONLY},
    stats, Backend, BackendId, CtKey, CtValue, ServiceValue,
};

use crate::{
    csum, forward,
    forward::Route,
    maps::{LB_CONFIG_V2, LB_CT_V1},
    nat,
    packet::{Hook, Packet, PacketError},
    parse::{self, Flow, ETH_HLEN, ETH_P_IP, IP4_DADDR},
    pipeline::{drop, Verdict},
    reject,
    stats::count,
};

const IP4_HLEN: usize = 20;
/// The IPv4 "don't fragment" bit.
const IP4_DF: u16 = 0x4000;

/// The node to wrap a new flow to, when DSR applies: this node runs in DSR
/// mode, the flow comes from outside, the Service is not Local-only, and the
/// backend is on another node that the FIB reaches through a gateway.
#[inline(always)]
pub fn endpoint_for<P: Packet>(
    pkt: &P,
    flow: &Flow,
    svc: &ServiceValue,
    backend: &Backend,
    hook: Hook,
) -> Option<u32> {
    let cfg = LB_CONFIG_V2.get(0)?;
    if cfg.flags & CONFIG_F_DSR == 0
        || !hook.is_external()
        || svc.flags & SVC_F_LOCAL_ONLY != 0
        || backend.flags & BACKEND_F_LOCAL != 0
        || backend.addr_be == flow.saddr
        || cfg.node_addr4_be == 0
    {
        return None;
    }
    forward::gateway(pkt, cfg.node_addr4_be, backend.addr_be[0])
}

/// Records a new DSR flow: one forward entry on this node (the replies
/// never come back through it).
#[inline(always)]
pub fn create(
    flow: &Flow,
    svc: &ServiceValue,
    backend_id: BackendId,
    backend: &Backend,
    endpoint: u32,
) -> Result<CtValue, u32> {
    let fwd = CtValue {
        nat_saddr_be: [endpoint, 0, 0, 0],
        nat_daddr_be: backend.addr_be,
        nat_dport_be: backend.port_be,
        flags: CT_F_DSR,
        backend_id,
        svc_id: svc.svc_id,
        // SAFETY: a plain helper call.
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
        ..CtValue::default()
    };
    LB_CT_V1
        .insert(&flow.ct_key(), &fwd, u64::from(BPF_ANY))
        .map_err(|_| stats::DROP_CT_FULL)?;
    Ok(fwd)
}

/// Wraps the packet to the backend's node named in `ct` and says where it
/// goes. Too big for the path once wrapped: ICMP fragmentation needed back
/// to the client when it set DF (it then sends smaller), else a drop.
#[inline(always)]
pub fn encap<P: Packet>(pkt: &mut P, flow: &Flow, ct: &CtValue, hook: Hook) -> Verdict {
    let len = pkt.len();
    let Some(cfg) = LB_CONFIG_V2.get(0) else {
        return drop(stats::DROP_NO_ROUTE, len);
    };
    let (node, endpoint) = (cfg.node_addr4_be, ct.nat_saddr_be[0]);
    let Ok(inner_len) = pkt.load::<u16>(flow.l3_off + 2).map(u16::from_be) else {
        return drop(stats::DROP_REWRITE, len);
    };
    let outer_len = inner_len.saturating_add(ENCAP_LEN as u16);
    let route = forward::lookup_sized(pkt, IPPROTO_LB, node, endpoint, outer_len);
    if let Route::TooBig { mtu } = route {
        let df = pkt
            .load::<u16>(flow.l3_off + 6)
            .is_ok_and(|f| u16::from_be(f) & IP4_DF != 0);
        count(stats::DSR_TOO_BIG, len);
        if !df || !flow.has_l4() {
            return Verdict::Drop;
        }
        let inner_mtu = mtu.saturating_sub(ENCAP_LEN as u16);
        return match reject::frag_needed(pkt, flow, inner_mtu) {
            Ok(()) => Verdict::Bounce,
            Err(_) => drop(stats::DROP_REWRITE, len),
        };
    }
    if forward::xdp_hands_over(pkt, hook, &route) {
        count(stats::XDP_TO_TC, len);
        return Verdict::Pass;
    }
    let (smac, dmac) = match route {
        Route::Resolved { smac, dmac, .. } => (smac, dmac),
        // The neighbour helper writes the MACs itself.
        _ => ([0; 6], [0; 6]),
    };
    if wrap(pkt, ct, node, endpoint, outer_len, smac, dmac).is_err() {
        return drop(stats::DROP_REWRITE, len);
    }
    count(stats::DSR_ENCAP, len);
    match route {
        Route::Resolved { ifindex, .. } => Verdict::Redirect(ifindex),
        Route::NoNeighbour { ifindex } => Verdict::RedirectNeigh(ifindex),
        Route::TooBig { .. } | Route::Unreachable => drop(stats::DROP_NO_ROUTE, len),
    }
}

/// Puts Ethernet, the outer IPv4 header and the shim in front of the
/// client's IP header.
#[inline(always)]
fn wrap<P: Packet>(
    pkt: &mut P,
    ct: &CtValue,
    node: u32,
    endpoint: u32,
    outer_len: u16,
    smac: [u8; 6],
    dmac: [u8; 6],
) -> Result<(), PacketError> {
    // The old Ethernet header ends up at 28..42, exactly where the outer
    // header's tail and the shim go: nothing needs moving.
    pkt.grow_head(ENCAP_LEN as u32)?;
    pkt.store(0, dmac)?;
    pkt.store(6, smac)?;
    pkt.store(12, ETH_P_IP.to_be())?;
    let ip = ETH_HLEN;
    pkt.store(ip, 0x45u8)?;
    pkt.store(ip + 1, 0u8)?;
    pkt.store(ip + 2, outer_len.to_be())?;
    pkt.store(ip + 4, 0u16)?;
    pkt.store(ip + 6, IP4_DF.to_be())?;
    pkt.store(ip + 8, 64u8)?;
    pkt.store(ip + 9, IPPROTO_LB)?;
    pkt.store(ip + 12, node)?;
    pkt.store(ip + IP4_DADDR, endpoint)?;
    csum::ip_checksum(pkt, ip, IP4_HLEN)?;
    pkt.store(
        ip + IP4_HLEN,
        Shim {
            magic: SHIM_MAGIC,
            version: SHIM_VERSION,
            port_be: ct.nat_dport_be,
            addr_be: ct.nat_daddr_be[0],
        },
    )
}

/// Unwraps a packet another node wrapped to this one, rewrites it to the
/// backend its shim names and remembers how to rewrite the backend's replies
/// (source back to the frontend, forwarded straight to the client). `None`:
/// not such a packet.
#[inline(always)]
pub fn decap<P: Packet>(pkt: &mut P) -> Option<Verdict> {
    let len = pkt.len();
    let cfg = LB_CONFIG_V2.get(0)?;
    let ethertype = u16::from_be(pkt.load::<u16>(12).ok()?);
    let ver_ihl: u8 = pkt.load(ETH_HLEN).ok()?;
    let proto: u8 = pkt.load(ETH_HLEN + 9).ok()?;
    let daddr: u32 = pkt.load(ETH_HLEN + IP4_DADDR).ok()?;
    if ethertype != ETH_P_IP || ver_ihl != 0x45 || proto != IPPROTO_LB || daddr != cfg.node_addr4_be
    {
        return None;
    }
    let shim: Shim = pkt.load(ETH_HLEN + IP4_HLEN).ok()?;
    if shim.magic != SHIM_MAGIC || shim.version != SHIM_VERSION {
        return None;
    }
    if pkt.pop_after_eth(ENCAP_LEN as u32).is_err() {
        return Some(drop(stats::DROP_REWRITE, len));
    }
    let flow = match parse::parse(pkt) {
        Ok(Some(flow)) if flow.has_l4() => flow,
        _ => return Some(drop(stats::DROP_REWRITE, len)),
    };
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let backend = [shim.addr_be, 0, 0, 0];
    let reply_key = CtKey {
        saddr_be: backend,
        daddr_be: flow.saddr,
        sport_be: shim.port_be,
        dport_be: flow.sport,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    // The frontend is another node's (or a shared) address, which this
    // node's stack would not send from a pod's interface: forward by FIB.
    let reply = CtValue {
        nat_saddr_be: flow.daddr,
        nat_sport_be: flow.dport,
        flags: CT_F_SNAT | CT_F_REPLY | CT_F_FORWARD,
        last_seen_ns: now,
        ..CtValue::default()
    };
    // SAFETY: the value is read at once.
    let known = unsafe { LB_CT_V1.get(&reply_key) }.is_some_and(|v| {
        v.nat_saddr_be == reply.nat_saddr_be && v.nat_sport_be == reply.nat_sport_be
    });
    if !known
        && LB_CT_V1
            .insert(&reply_key, &reply, u64::from(BPF_ANY))
            .is_err()
    {
        return Some(drop(stats::DROP_CT_FULL, len));
    }
    let fwd = CtValue {
        nat_daddr_be: backend,
        nat_dport_be: shim.port_be,
        flags: CT_F_DNAT,
        ..CtValue::default()
    };
    if nat::rewrite(pkt, &flow, &fwd).is_err() {
        return Some(drop(stats::DROP_REWRITE, len));
    }
    count(stats::DSR_DECAP, len);
    Some(Verdict::Pass)
}
