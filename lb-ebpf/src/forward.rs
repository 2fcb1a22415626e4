//! Forwarding a translated packet ourselves, by FIB lookup, when the stack
//! would refuse it (its new source is one of this node's addresses).

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::generated::bpf_fib_lookup,
};
use lb_common::IpAddrBe;

use crate::{
    packet::{Packet, PacketError},
    parse::Flow,
};

const AF_INET: u8 = 2;

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
    /// No usable route.
    Unreachable,
}

/// Looks up the route of the packet as it will be after translation.
#[inline(always)]
pub fn lookup<P: Packet>(
    pkt: &P,
    flow: &Flow,
    saddr: &IpAddrBe,
    daddr: &IpAddrBe,
    sport: u16,
    dport: u16,
) -> Route {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = flow.proto;
    p.sport = sport;
    p.dport = dport;
    p.ifindex = pkt.ifindex();
    p.__bindgen_anon_3.ipv4_src = saddr[0];
    p.__bindgen_anon_4.ipv4_dst = daddr[0];
    // SAFETY: `p` is a valid bpf_fib_lookup and the context is the program's.
    let ret = unsafe {
        bpf_fib_lookup(
            pkt.ctx_ptr(),
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Resolved {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeighbour { ifindex: p.ifindex },
        _ => Route::Unreachable,
    }
}

/// Writes the next hop's MAC addresses.
#[inline(always)]
pub fn set_macs<P: Packet>(pkt: &mut P, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), PacketError> {
    pkt.store(0, dmac)?;
    pkt.store(6, smac)
}
