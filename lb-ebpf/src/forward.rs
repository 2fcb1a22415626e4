//! Forwarding a translated packet ourselves, by FIB lookup, when the stack
//! would refuse it (its new source is one of this node's addresses).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::bpf_fib_lookup,
};
use lb_common::{csum::replace2, family, snat::IfaceAddrKey, IpAddrBe, Tuple};

use crate::{
    env::Hook,
    hdr::{IP4_CSUM, IP4_TTL, IP6_HOP_LIMIT},
    maps::{LB_FIB_SCRATCH, LB_IFACE_ADDRS_V1},
    packet::{Packet, PacketError},
    parse::Layout,
};

/// Where a packet goes next.
pub enum Route {
    /// Next hop resolved: send out `ifindex` with these MACs.
    Resolved {
        /// Egress interface.
        ifindex: u32,
        /// Source MAC.
        smac: [u8; 6],
        /// Destination MAC.
        dmac: [u8; 6],
    },
    /// Route found, neighbour unknown: only TC can resolve it.
    NoNeighbour {
        /// Egress interface.
        ifindex: u32,
    },
    /// The packet, at the length asked about, exceeds the route's MTU.
    TooBig {
        /// The route's MTU.
        mtu: u16,
    },
    /// No usable route.
    Unreachable,
}

/// Looks up the route of the packet whose tuple after translation is `t`.
#[inline(always)]
pub fn lookup<P: Packet>(pkt: &P, t: &Tuple) -> Route {
    let Some(p) = params(pkt, t.family, t.proto, &t.saddr_be, &t.daddr_be) else {
        return Route::Unreachable;
    };
    p.sport = t.sport_be;
    p.dport = t.dport_be;
    fib(pkt, p)
}

/// Looks up the route of a packet of family `fam` and `tot_len` bytes (IP
/// header included) from `saddr` to `daddr`, checking it against the
/// route's MTU.
#[inline(always)]
pub fn lookup_sized<P: Packet>(
    pkt: &P,
    fam: u8,
    proto: u8,
    saddr: &IpAddrBe,
    daddr: &IpAddrBe,
    tot_len: u16,
) -> Route {
    let Some(p) = params(pkt, fam, proto, saddr, daddr) else {
        return Route::Unreachable;
    };
    p.__bindgen_anon_1.tot_len = tot_len;
    fib(pkt, p)
}

/// The gateway the route of family `fam` to `daddr` goes through: the node
/// behind which a remote pod lives. `None` for a directly connected
/// destination.
#[inline(always)]
pub fn gateway<P: Packet>(
    pkt: &P,
    fam: u8,
    saddr: &IpAddrBe,
    daddr: &IpAddrBe,
) -> Option<IpAddrBe> {
    let p = params(pkt, fam, 0, saddr, daddr)?;
    // SAFETY: `params` built a valid request.
    let ret = unsafe { call(pkt, p) };
    if ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    // On success the kernel leaves the next hop in the destination.
    // SAFETY: reading the union member of the family the lookup wrote.
    let next_hop = unsafe {
        if fam == family::V6 {
            p.__bindgen_anon_4.ipv6_dst
        } else {
            [p.__bindgen_anon_4.ipv4_dst, 0, 0, 0]
        }
    };
    (next_hop != *daddr).then_some(next_hop)
}

/// The address of the interface a packet of flow `t` leaves by once its
/// destination is `daddr`: the SNAT source, as masquerading takes it from
/// the route's device after the routing decision (so the lookup is made
/// with the client's source). `None` without a route, or for an interface
/// the agent gave no address (one without the node programs, whose
/// replies nothing here would translate back): the caller takes the
/// node's address then.
#[inline(always)]
pub fn egress_addr<P: Packet>(pkt: &P, t: &Tuple, daddr: &IpAddrBe) -> Option<IpAddrBe> {
    let p = params(pkt, t.family, t.proto, &t.saddr_be, daddr)?;
    // SAFETY: `params` built a valid request.
    let ret = unsafe { call(pkt, p) };
    if ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    let key = IfaceAddrKey {
        ifindex: p.ifindex,
        family: t.family,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once.
    unsafe { LB_IFACE_ADDRS_V1.get(&key) }.map(|a| a.addr_be)
}

/// A fresh lookup request of family `fam` in this CPU's scratch slot: 64
/// bytes that would otherwise take a share of the 512-byte stack at every
/// call site. `None` for a family the FIB does not know.
#[inline(always)]
fn params<P: Packet>(
    pkt: &P,
    fam: u8,
    proto: u8,
    saddr: &IpAddrBe,
    daddr: &IpAddrBe,
) -> Option<&'static mut FibParams> {
    let slot = LB_FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot, used by one program run at a time and only
    // within this lookup; all-zero is a valid (empty) request.
    let p = unsafe {
        core::ptr::write_bytes(slot, 0, 1);
        &mut *slot
    };
    // The FIB's families are the AF_* values that `family` carries.
    p.family = fam;
    p.l4_protocol = proto;
    p.ifindex = pkt.ifindex();
    match fam {
        family::V4 => {
            p.__bindgen_anon_3.ipv4_src = saddr[0];
            p.__bindgen_anon_4.ipv4_dst = daddr[0];
        }
        family::V6 => {
            p.__bindgen_anon_3.ipv6_src = *saddr;
            p.__bindgen_anon_4.ipv6_dst = *daddr;
        }
        _ => return None,
    }
    Some(p)
}

/// # Safety
/// `p` must be a valid bpf_fib_lookup.
#[inline(always)]
unsafe fn call<P: Packet>(pkt: &P, p: &mut FibParams) -> u32 {
    // SAFETY: the caller passes a valid request; the context is the program's.
    unsafe {
        bpf_fib_lookup(
            pkt.ctx_ptr(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        ) as u32
    }
}

#[inline(always)]
fn fib<P: Packet>(pkt: &P, p: &mut FibParams) -> Route {
    // SAFETY: `params` built a valid request.
    match unsafe { call(pkt, p) } {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Resolved {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeighbour { ifindex: p.ifindex },
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig {
            // SAFETY: on FRAG_NEEDED the kernel wrote mtu_result.
            mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        },
        _ => Route::Unreachable,
    }
}

/// Whether XDP must leave a packet to TC on the same interface: XDP sends
/// only back out the interface it runs on. It cannot resolve a neighbour,
/// and a frame redirected into a veth is lost unless the peer runs XDP or
/// GRO; so otherwise it leaves the packet untouched for the TC program,
/// which finds the conntrack entry just made and finishes the job with
/// bpf_redirect or bpf_redirect_neigh.
#[inline(always)]
pub fn xdp_hands_over<P: Packet>(pkt: &P, hook: Hook, route: &Route) -> bool {
    if hook != Hook::XdpNode {
        return false;
    }
    let same_device = matches!(route, Route::Resolved { ifindex, .. } if *ifindex == pkt.ifindex());
    !same_device && !matches!(route, Route::Unreachable)
}

/// Writes the next hop's MAC addresses.
#[inline(always)]
pub fn set_macs<P: Packet>(pkt: &mut P, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), PacketError> {
    pkt.store(0, dmac)?;
    pkt.store(6, smac)
}

/// The hops a packet of `fam` may still take (IPv4's TTL, IPv6's hop
/// limit), as it arrived. A router forwards a packet only while this is
/// above 1: it would leave with 0 otherwise, and is answered with time
/// exceeded instead.
#[inline(always)]
pub fn hops_left<P: Packet>(pkt: &P, layout: &Layout, fam: u8) -> Result<u8, PacketError> {
    match fam {
        family::V4 => pkt.load(layout.l3_off + IP4_TTL),
        family::V6 => pkt.load(layout.l3_off + IP6_HOP_LIMIT),
        _ => Err(PacketError),
    }
}

/// Takes one hop off a packet this node sends on itself: the paths that
/// bypass the kernel's forwarding (a redirect, XDP_TX, DSR's wrap) must do
/// what it would have done. IPv4's header checksum is updated
/// incrementally (it covers the TTL, sharing a word with the protocol);
/// IPv6 has none, and no L4 checksum covers either. `ttl` is
/// [`hops_left`]'s answer, above 1.
#[inline(always)]
pub fn take_hop<P: Packet>(
    pkt: &mut P,
    layout: &Layout,
    fam: u8,
    ttl: u8,
) -> Result<(), PacketError> {
    let l3 = layout.l3_off;
    match fam {
        family::V4 => {}
        family::V6 => return pkt.store(l3 + IP6_HOP_LIMIT, ttl.saturating_sub(1)),
        _ => return Err(PacketError),
    }
    let [_, proto]: [u8; 2] = pkt.load(l3 + IP4_TTL)?;
    let (old, new) = (
        u16::from_ne_bytes([ttl, proto]),
        u16::from_ne_bytes([ttl.saturating_sub(1), proto]),
    );
    let check: u16 = pkt.load(l3 + IP4_CSUM)?;
    pkt.store(l3 + IP4_TTL, ttl.saturating_sub(1))?;
    pkt.store(l3 + IP4_CSUM, replace2(check, old, new))
}
