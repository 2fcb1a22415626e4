//! Direct server return (`lb_common::dsr`): wrapping a client's packet to
//! the backend's node, and unwrapping it there.

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    config::CONFIG_F_DSR,
    conntrack::{CT_F_DSR, CT_F_FORWARD, CT_F_REPLY, CT_F_SNAT},
    dsr::{DsrPeer, Shim, DSR_PEER_HEAD_BITS, ENCAP_LEN, IPPROTO_LB, SHIM_MAGIC, SHIM_VERSION},
    family,
    service::{BACKEND_F_LOCAL, SVC_F_LOCAL_ONLY},
    Backend, CtValue, Tuple,
};

use crate::{
    conntrack::{self, NewFlow},
    csum,
    env::Env,
    forward::{self, Route},
    hdr::{
        ETH_HLEN, ETH_P_IP, ETH_TYPE, IP4_DADDR, IP4_DEFAULT_TTL, IP4_DF, IP4_FRAG_OFF, IP4_HLEN,
        IP4_ID, IP4_PROTO, IP4_SADDR, IP4_TOS, IP4_TOT_LEN, IP4_TTL, IP4_VER_IHL,
    },
    maps::LB_DSR_PEERS_V1,
    nat,
    packet::{Packet, PacketError},
    parse::Layout,
    scratch::Entry,
    verdict::Reason,
};

/// The node to wrap a new flow of tuple `t` from outside to, when DSR
/// applies: this node runs in DSR mode, the flow is IPv4 (IPv6 flows are
/// SNATed: the wrap is IPv4-only, see docs/architecture.md), the Service
/// (`svc_flags`) is not Local-only, and the backend is on another node
/// that the FIB reaches through a gateway.
#[inline(always)]
pub fn endpoint_for<P: Packet>(
    pkt: &P,
    t: &Tuple,
    svc_flags: u32,
    backend: &Backend,
    env: &Env,
) -> Option<u32> {
    let cfg = env.cfg();
    if cfg.flags & CONFIG_F_DSR == 0
        || t.family != family::V4
        || svc_flags & SVC_F_LOCAL_ONLY != 0
        || backend.flags & BACKEND_F_LOCAL != 0
        || backend.addr_be[0] == t.saddr_be[0]
    {
        return None;
    }
    let [node, ..] = cfg.node_addr(family::V4)?;
    forward::gateway(pkt, node, backend.addr_be[0])
}

/// Records a new DSR flow to `endpoint`, the backend's node, in `fwd`: one
/// forward entry on this node (the replies never come back through it),
/// embryonic like any new flow's until its client has sent for a second.
#[inline(always)]
pub fn create(
    t: &Tuple,
    new: &NewFlow,
    endpoint: u32,
    env: &Env,
    fwd: &mut CtValue,
) -> Result<(), Reason> {
    *fwd = CtValue {
        nat_saddr_be: [endpoint, 0, 0, 0],
        nat_daddr_be: new.backend.addr_be,
        nat_dport_be: new.backend.port_be,
        flags: CT_F_DSR,
        backend_id: new.backend_id,
        svc_id: new.svc.svc_id,
        last_seen_ns: env.now(),
        ..CtValue::default()
    };
    conntrack::insert_embryonic(t, fwd)
}

/// The outer IPv4 header of a DSR flow's packet.
pub struct Outer {
    /// Source: this node.
    pub node: u32,
    /// Destination: the backend's node.
    pub endpoint: u32,
    /// Total length of the wrapped packet (outer header included).
    pub len: u16,
}

/// The outer header the packet of DSR flow `ct` gets.
#[inline(always)]
pub fn outer<P: Packet>(
    pkt: &P,
    layout: &Layout,
    ct: &CtValue,
    env: &Env,
) -> Result<Outer, Reason> {
    let [node, ..] = env.cfg().node_addr(family::V4).ok_or(Reason::DropNoRoute)?;
    let inner_len = u16::from_be(pkt.load(layout.l3_off + IP4_TOT_LEN)?);
    Ok(Outer {
        node,
        endpoint: ct.nat_saddr_be[0],
        len: inner_len.saturating_add(ENCAP_LEN as u16),
    })
}

/// The route of the packet once wrapped in `outer`.
#[inline(always)]
pub fn route<P: Packet>(pkt: &P, outer: &Outer) -> Route {
    forward::lookup_sized(pkt, IPPROTO_LB, outer.node, outer.endpoint, outer.len)
}

/// Whether a packet too big for the path once wrapped may be answered with
/// ICMP fragmentation needed (the client then sends smaller): it set DF
/// and carries its L4 header to quote. Else it can only be dropped.
#[inline(always)]
pub fn may_answer_too_big<P: Packet>(pkt: &P, layout: &Layout) -> bool {
    let df = pkt
        .load::<u16>(layout.l3_off + IP4_FRAG_OFF)
        .is_ok_and(|f| u16::from_be(f) & IP4_DF != 0);
    df && layout.has_l4()
}

/// The largest inner packet a path of `mtu` takes.
#[inline(always)]
pub fn inner_mtu(mtu: u16) -> u16 {
    mtu.saturating_sub(ENCAP_LEN as u16)
}

/// Puts Ethernet (MACs zero: the route's are written by whoever sends it,
/// or by the neighbour helper), the outer IPv4 header and the shim naming
/// `ct`'s backend in front of the client's IP header.
#[inline(always)]
pub fn wrap<P: Packet>(pkt: &mut P, ct: &CtValue, outer: &Outer) -> Result<(), PacketError> {
    // The old Ethernet header ends up at 28..42, exactly where the outer
    // header's tail and the shim go: nothing needs moving.
    pkt.grow_head(ENCAP_LEN as u32)?;
    pkt.store(0, [0u8; 12])?;
    pkt.store(ETH_TYPE, ETH_P_IP.to_be())?;
    let ip = ETH_HLEN;
    pkt.store(ip, IP4_VER_IHL)?;
    pkt.store(ip + IP4_TOS, 0u8)?;
    pkt.store(ip + IP4_TOT_LEN, outer.len.to_be())?;
    pkt.store(ip + IP4_ID, 0u16)?;
    pkt.store(ip + IP4_FRAG_OFF, IP4_DF.to_be())?;
    pkt.store(ip + IP4_TTL, IP4_DEFAULT_TTL)?;
    pkt.store(ip + IP4_PROTO, IPPROTO_LB)?;
    pkt.store(ip + IP4_SADDR, outer.node)?;
    pkt.store(ip + IP4_DADDR, outer.endpoint)?;
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

/// Unwraps a packet another node wrapped to this one and returns its shim;
/// `Ok(None)`: not such a packet (the cheap protocol check comes first, as
/// every packet on a node interface passes here). `Err(DropDsrPeer)`: one
/// for this node, but not from one of the cluster's nodes.
#[inline(always)]
pub fn unwrap<P: Packet>(pkt: &mut P, env: &Env) -> Result<Option<Shim>, Reason> {
    // Too short to be ours is not an error here: the parser judges it.
    if pkt
        .load::<u8>(ETH_HLEN + IP4_PROTO)
        .map_or(true, |p| p != IPPROTO_LB)
    {
        return Ok(None);
    }
    let Some([node, ..]) = env.cfg().node_addr(family::V4) else {
        return Ok(None);
    };
    let ours = pkt
        .load::<u16>(ETH_TYPE)
        .is_ok_and(|t| u16::from_be(t) == ETH_P_IP)
        && pkt.load::<u8>(ETH_HLEN).is_ok_and(|v| v == IP4_VER_IHL)
        && pkt
            .load::<u32>(ETH_HLEN + IP4_DADDR)
            .is_ok_and(|d| d == node);
    let Ok(shim) = pkt.load::<Shim>(ETH_HLEN + IP4_HLEN) else {
        return Ok(None);
    };
    if !ours || shim.magic != SHIM_MAGIC || shim.version != SHIM_VERSION {
        return Ok(None);
    }
    if !from_peer(pkt.load(ETH_HLEN + IP4_SADDR)?) {
        return Err(Reason::DropDsrPeer);
    }
    pkt.pop_after_eth(ENCAP_LEN as u32)?;
    Ok(Some(shim))
}

/// Whether `saddr` (IPv4, network order) is one of the cluster's nodes.
#[inline(always)]
fn from_peer(saddr: u32) -> bool {
    let key = Key::new(
        DSR_PEER_HEAD_BITS + 32,
        DsrPeer {
            family: family::V4,
            _pad: [0; 3],
            addr_be: [saddr, 0, 0, 0],
        },
    );
    LB_DSR_PEERS_V1.get(&key).is_some()
}

/// Sends an unwrapped packet to the backend its shim names and remembers how
/// to rewrite the backend's replies: source back to the frontend, forwarded
/// straight to the client.
#[inline(always)]
pub fn deliver<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    shim: &Shim,
    env: &Env,
    reply: &mut Entry,
) -> Result<(), Reason> {
    // The shim names an IPv4 backend: an inner packet of another family
    // (which no node wraps) is not translated.
    if !layout.has_l4() || t.family != family::V4 {
        return Err(Reason::DropRewrite);
    }
    let backend = [shim.addr_be, 0, 0, 0];
    reply.key = Tuple {
        saddr_be: backend,
        daddr_be: t.saddr_be,
        sport_be: shim.port_be,
        dport_be: t.sport_be,
        proto: t.proto,
        family: t.family,
        _pad: [0; 2],
    };
    let known = conntrack::peek(&reply.key)
        .is_some_and(|v| v.nat_saddr_be == t.daddr_be && v.nat_sport_be == t.dport_be);
    if !known {
        // The frontend is another node's (or a shared) address, which this
        // node's stack would not send from a pod's interface: forward by FIB.
        reply.value = CtValue {
            nat_saddr_be: t.daddr_be,
            nat_sport_be: t.dport_be,
            flags: CT_F_SNAT | CT_F_REPLY | CT_F_FORWARD,
            last_seen_ns: env.now(),
            ..CtValue::default()
        };
        // Embryonic until the backend sends past the handshake, as any
        // new flow.
        conntrack::insert_embryonic(&reply.key, &reply.value)?;
    }
    nat::set_dst(pkt, t, layout, &backend, shim.port_be)?;
    Ok(())
}
