//! Direct server return (`lb_common::dsr`): wrapping a client's packet to
//! the backend's node, and unwrapping it there.

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    config::CONFIG_F_DSR,
    conntrack::{CT_F_DSR, CT_F_FORWARD, CT_F_REPLY, CT_F_SNAT},
    dsr::{
        encap_len, DsrPeer, Shim, DSR_PEER_HEAD_BITS, IPPROTO_LB, SHIM_ADDR6_OFF, SHIM_MAGIC,
        SHIM_VERSION,
    },
    family,
    service::{BACKEND_F_LOCAL, SVC_F_LOCAL_ONLY},
    Backend, CtValue, IpAddrBe, Tuple,
};

use crate::{
    conntrack::{self, NewFlow},
    csum,
    env::Env,
    forward::{self, Route},
    hdr::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ETH_TYPE, IP4_DADDR, IP4_DEFAULT_TTL, IP4_DF, IP4_FRAG_OFF,
        IP4_HLEN, IP4_ID, IP4_PROTO, IP4_SADDR, IP4_TOS, IP4_TOT_LEN, IP4_TTL, IP4_VER_IHL,
        IP6_DADDR, IP6_HLEN, IP6_NEXTHDR, IP6_PAYLOAD_LEN, IP6_SADDR,
    },
    maps::LB_DSR_PEERS_V1,
    nat,
    packet::{Packet, PacketError},
    parse::Layout,
    reject,
    scratch::Entry,
    verdict::Reason,
};

/// The node to wrap a new flow of tuple `t` from outside to, when DSR
/// applies: this node runs in DSR mode and has an address of the flow's
/// family, the Service (`svc_flags`) is not Local-only, and the backend is
/// on another node that the FIB reaches through a gateway of that family.
#[inline(always)]
pub fn endpoint_for<P: Packet>(
    pkt: &P,
    t: &Tuple,
    svc_flags: u32,
    backend: &Backend,
    env: &Env,
) -> Option<IpAddrBe> {
    let cfg = env.cfg();
    if cfg.flags & CONFIG_F_DSR == 0
        || svc_flags & SVC_F_LOCAL_ONLY != 0
        || backend.flags & BACKEND_F_LOCAL != 0
        || backend.addr_be == t.saddr_be
    {
        return None;
    }
    let node = cfg.node_addr(t.family)?;
    forward::gateway(pkt, t.family, &node, &backend.addr_be)
}

/// Records a new DSR flow to `endpoint`, the backend's node, in `fwd`: one
/// forward entry on this node (the replies never come back through it),
/// embryonic like any new flow's until its client has sent for a second.
#[inline(always)]
pub fn create(
    t: &Tuple,
    new: &NewFlow,
    endpoint: &IpAddrBe,
    env: &Env,
    fwd: &mut CtValue,
) -> Result<(), Reason> {
    *fwd = CtValue {
        nat_saddr_be: *endpoint,
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

/// The outer IP header of a DSR flow's packet, of the flow's family.
pub struct Outer {
    /// Address family ([`lb_common::family`]).
    pub family: u8,
    /// Source: this node.
    pub node: IpAddrBe,
    /// Destination: the backend's node.
    pub endpoint: IpAddrBe,
    /// Total length of the wrapped packet (outer header included).
    pub len: u16,
}

/// The outer header the packet of DSR flow `ct`, of tuple `t`, gets.
#[inline(always)]
pub fn outer<P: Packet>(
    pkt: &P,
    t: &Tuple,
    layout: &Layout,
    ct: &CtValue,
    env: &Env,
) -> Result<Outer, Reason> {
    let node = env.cfg().node_addr(t.family).ok_or(Reason::DropNoRoute)?;
    let inner_len = if t.family == family::V6 {
        u16::from_be(pkt.load(layout.l3_off + IP6_PAYLOAD_LEN)?).saturating_add(IP6_HLEN as u16)
    } else {
        u16::from_be(pkt.load(layout.l3_off + IP4_TOT_LEN)?)
    };
    Ok(Outer {
        family: t.family,
        node,
        endpoint: ct.nat_saddr_be,
        len: inner_len.saturating_add(encap_len(t.family) as u16),
    })
}

/// The route of the packet once wrapped in `outer`.
#[inline(always)]
pub fn route<P: Packet>(pkt: &P, outer: &Outer) -> Route {
    forward::lookup_sized(
        pkt,
        outer.family,
        IPPROTO_LB,
        &outer.node,
        &outer.endpoint,
        outer.len,
    )
}

/// Whether a packet too big for the path once wrapped may be answered with
/// ICMP fragmentation needed or ICMPv6 packet too big (the client then
/// sends smaller): it carries its L4 header to quote and, over IPv4, set
/// DF (IPv6 is never fragmented on the way). Else it can only be dropped.
#[inline(always)]
pub fn may_answer_too_big<P: Packet>(pkt: &P, t: &Tuple, layout: &Layout) -> bool {
    let df = t.family == family::V6
        || pkt
            .load::<u16>(layout.l3_off + IP4_FRAG_OFF)
            .is_ok_and(|f| u16::from_be(f) & IP4_DF != 0);
    df && layout.has_l4()
}

/// The largest inner packet of family `fam` a path of `mtu` takes.
#[inline(always)]
pub fn inner_mtu(fam: u8, mtu: u16) -> u16 {
    mtu.saturating_sub(encap_len(fam) as u16)
}

/// Puts Ethernet (MACs zero: the route's are written by whoever sends it,
/// or by the neighbour helper), the outer IP header and the shim naming
/// `ct`'s backend in front of the client's IP header.
#[inline(always)]
pub fn wrap<P: Packet>(pkt: &mut P, ct: &CtValue, outer: &Outer) -> Result<(), PacketError> {
    // The old Ethernet header ends up just before the client's IP header,
    // where the shim (IPv4) or the backend's address (IPv6) goes: nothing
    // needs moving.
    pkt.grow_head(encap_len(outer.family) as u32)?;
    pkt.store(0, [0u8; 12])?;
    let ip = ETH_HLEN;
    let (shim_off, addr_be) = if outer.family == family::V6 {
        pkt.store(ETH_TYPE, ETH_P_IPV6.to_be())?;
        reject::ip6_header(
            pkt,
            ip,
            outer.len.saturating_sub(IP6_HLEN as u16),
            IPPROTO_LB,
            &outer.node,
            &outer.endpoint,
        )?;
        pkt.store(ip + IP6_HLEN + SHIM_ADDR6_OFF, ct.nat_daddr_be)?;
        (ip + IP6_HLEN, 0)
    } else {
        pkt.store(ETH_TYPE, ETH_P_IP.to_be())?;
        pkt.store(ip, IP4_VER_IHL)?;
        pkt.store(ip + IP4_TOS, 0u8)?;
        pkt.store(ip + IP4_TOT_LEN, outer.len.to_be())?;
        pkt.store(ip + IP4_ID, 0u16)?;
        pkt.store(ip + IP4_FRAG_OFF, IP4_DF.to_be())?;
        pkt.store(ip + IP4_TTL, IP4_DEFAULT_TTL)?;
        pkt.store(ip + IP4_PROTO, IPPROTO_LB)?;
        pkt.store(ip + IP4_SADDR, outer.node[0])?;
        pkt.store(ip + IP4_DADDR, outer.endpoint[0])?;
        csum::ip_checksum(pkt, ip, IP4_HLEN)?;
        (ip + IP4_HLEN, ct.nat_daddr_be[0])
    };
    pkt.store(
        shim_off,
        Shim {
            magic: SHIM_MAGIC,
            version: SHIM_VERSION,
            port_be: ct.nat_dport_be,
            addr_be,
        },
    )
}

/// What a wrapped packet's outer headers said: the backend its client's
/// flow goes to.
pub struct Unwrapped {
    /// Address family of the outer header, and so of the client's packet.
    pub family: u8,
    /// The backend's address, network order.
    pub backend: IpAddrBe,
    /// The backend's port, network order.
    pub port_be: u16,
}

/// Where the outer IP header of family `fam` keeps what unwrapping reads:
/// its length, and the offsets of the protocol, source and destination.
#[inline(always)]
fn outer_fields(fam: u8) -> (usize, usize, usize, usize) {
    if fam == family::V6 {
        (IP6_HLEN, IP6_NEXTHDR, IP6_SADDR, IP6_DADDR)
    } else {
        (IP4_HLEN, IP4_PROTO, IP4_SADDR, IP4_DADDR)
    }
}

/// Reads an address of family `fam` at `off`.
#[inline(always)]
fn load_addr<P: Packet>(pkt: &P, fam: u8, off: usize) -> Result<IpAddrBe, PacketError> {
    if fam == family::V6 {
        pkt.load(off)
    } else {
        Ok([pkt.load(off)?, 0, 0, 0])
    }
}

/// Unwraps a packet another node wrapped to this one and returns what its
/// shim names; `Ok(None)`: not such a packet (the cheap protocol check
/// comes first, as every packet on a node interface passes here).
/// `Err(DropDsrPeer)`: one for this node, but not from one of the
/// cluster's nodes.
#[inline(always)]
pub fn unwrap<P: Packet>(pkt: &mut P, env: &Env) -> Result<Option<Unwrapped>, Reason> {
    // Too short to be ours is not an error here: the parser judges it.
    let fam = match pkt.load::<u16>(ETH_TYPE).map(u16::from_be) {
        Ok(ETH_P_IP) => family::V4,
        Ok(ETH_P_IPV6) => family::V6,
        _ => return Ok(None),
    };
    let (hlen, proto_off, saddr_off, daddr_off) = outer_fields(fam);
    if pkt
        .load::<u8>(ETH_HLEN + proto_off)
        .map_or(true, |p| p != IPPROTO_LB)
    {
        return Ok(None);
    }
    let Some(node) = env.cfg().node_addr(fam) else {
        return Ok(None);
    };
    let version_ok = pkt.load::<u8>(ETH_HLEN).is_ok_and(|v| {
        if fam == family::V6 {
            v >> 4 == 6
        } else {
            v == IP4_VER_IHL
        }
    });
    let ours = version_ok && load_addr(pkt, fam, ETH_HLEN + daddr_off).is_ok_and(|d| d == node);
    let Ok(shim) = pkt.load::<Shim>(ETH_HLEN + hlen) else {
        return Ok(None);
    };
    if !ours || shim.magic != SHIM_MAGIC || shim.version != SHIM_VERSION {
        return Ok(None);
    }
    if !from_peer(fam, &load_addr(pkt, fam, ETH_HLEN + saddr_off)?) {
        return Err(Reason::DropDsrPeer);
    }
    let backend = if fam == family::V6 {
        pkt.load(ETH_HLEN + hlen + SHIM_ADDR6_OFF)?
    } else {
        [shim.addr_be, 0, 0, 0]
    };
    pkt.pop_after_eth(encap_len(fam) as u32)?;
    Ok(Some(Unwrapped {
        family: fam,
        backend,
        port_be: shim.port_be,
    }))
}

/// Whether `saddr` (of family `fam`, network order) is one of the
/// cluster's nodes.
#[inline(always)]
fn from_peer(fam: u8, saddr: &IpAddrBe) -> bool {
    let bits = if fam == family::V6 { 128 } else { 32 };
    let key = Key::new(
        DSR_PEER_HEAD_BITS + bits,
        DsrPeer {
            family: fam,
            _pad: [0; 3],
            addr_be: *saddr,
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
    shim: &Unwrapped,
    env: &Env,
    reply: &mut Entry,
) -> Result<(), Reason> {
    // The backend is of the outer header's family: an inner packet of
    // another family (which no node wraps) is not translated.
    if !layout.has_l4() || t.family != shim.family {
        return Err(Reason::DropRewrite);
    }
    let backend = shim.backend;
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
