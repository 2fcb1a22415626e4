//! The lb datapath: XDP on node interfaces, TC ingress on node and pod
//! interfaces, all running one ladder of stages (see `pipeline`), and TC
//! egress on both for the replies of backends on the node itself. SCTP
//! runs the same ladder; when a port of an SCTP packet was rewritten, the
//! entry point ends by tail call in a small program of its hook type that
//! updates the packet's CRC32c (`sctp`).
//!
//! # Layers
//!
//! Each module uses only modules on the lines above it (bottom first):
//!
//! 1. `hdr` (header layouts and constants), `layout` (a parsed packet's
//!    offsets), `scratch` (the per-CPU room's layout): definitions, no
//!    dependencies but each other.
//! 2. `maps`: every map the programs use.
//! 3. `packet` (bounds-checked access and rewrite primitives over XDP and
//!    TC), `env` (config, time, hook, length: looked up once per run),
//!    `verdict` (`Verdict`, and `Reason`, the one mapping to counters),
//!    `stats` (counting).
//! 4. Packet-free stages over `lb_common::Tuple`: `frontend` (lookup,
//!    source ranges), `select` (affinity, Maglev), `conntrack`. A program
//!    without a packet (a cgroup socket hook) can call them as they are.
//! 5. Packet stages: `csum`, `parse` (into a tuple and a layout), `sctp`
//!    (SCTP's checksum, recorded by `nat` and applied by tail call), `nat`,
//!    `frag`, `forward` (FIB), `reject` (RST, ICMP), `icmp` (errors about
//!    translated flows), `dsr` (encapsulation).
//! 6. `pipeline`: the ladder; the only module that counts a packet's
//!    outcome and decides its verdict.
//!    `sock`, beside it: the cgroup socket hooks (the node's own sockets),
//!    over the packet-free stages of line 4.
//! 7. The entry points below.
//!
//! # Stack budget
//!
//! 6.1's verifier allows a call chain 512 bytes of stack, each frame
//! rounded up to 32. Every program is one frame: the entry points and all
//! stages are inlined, and memset/memcpy are expanded in place (see
//! lb-agent/build.rs). The large, long-lived temporaries (the flow's
//! tuple, its conntrack entry, a new flow's reply entry, the FIB request)
//! live in per-CPU scratch maps instead. The frame is 392 bytes for
//! `lb_xdp_node` and `lb_tc_node` and 352 for `lb_tc_pod`, IPv6 included
//! (SNAT's port search and egress address took 48 to 72 of them): 120
//! bytes are left at least.
//!
//! # Verifier states
//!
//! The IPv6 parse walks up to four extension headers, and each way through
//! them ends with its own offsets; verified on as they are, every way
//! would take the rest of the program with it (over a million
//! instructions). The parse therefore leaves its `Layout` in the scratch
//! map and the pipeline reads it back (`parse::settled`): values from map
//! memory are unknown to the verifier, so all ways meet in one state. Measure
//! after a change with `llvm-objdump -d` on the object (the deepest
//! `r10 - N`) or the verifier log's `stack depth`.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod conntrack;
mod csum;
mod dsr;
mod env;
mod forward;
mod frag;
mod frontend;
mod hdr;
mod icmp;
mod layout;
mod maps;
mod nat;
mod packet;
mod parse;
mod pipeline;
mod reject;
mod scratch;
mod sctp;
mod select;
mod sock;
mod stats;
mod verdict;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect, bpf_redirect_neigh},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{
    env::Hook,
    maps::{LB_SCTP_CRC_TC_V1, LB_SCTP_CRC_XDP_V1},
    packet::{tc_pull, Packet},
    pipeline::{host_reply, process},
    stats::count,
    verdict::{Reason, Verdict},
};

// The entry points are `#[inline(always)]`: aya's macros wrap each in an
// extern fn, and an outer frame of its own would cost 32 of the stack
// budget (see the crate doc).

/// Headers TC needs linear before the ladder reads them directly.
const TC_PULL_LEN: u32 = 128;

/// North-south traffic on a node's external interface.
#[xdp]
#[inline(always)]
pub fn lb_xdp_node(mut ctx: XdpContext) -> u32 {
    let ingress = Packet::ifindex(&ctx);
    let verdict = process(&mut ctx, Hook::XdpNode);
    let action = match verdict {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Bounce => xdp_action::XDP_TX,
        Verdict::Redirect(ifindex) if ifindex == ingress => xdp_action::XDP_TX,
        // SAFETY: the helper validates the ifindex.
        Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
        // The ladder never asks XDP for a neighbour redirect; drop if it did.
        Verdict::RedirectNeigh(_) => xdp_action::XDP_DROP,
    };
    match sctp::finish(&ctx, &LB_SCTP_CRC_XDP_V1, verdict, action) {
        Ok(action) => action,
        Err(_) => {
            count(Reason::DropRewrite, Packet::len(&ctx));
            xdp_action::XDP_DROP
        }
    }
}

/// `lb_xdp_node`'s end for an SCTP packet whose port it rewrote, reached
/// by tail call: updates the CRC32c and returns the action decided there.
#[xdp]
pub fn lb_xdp_sctp_crc(mut ctx: XdpContext) -> u32 {
    match sctp::apply(&mut ctx) {
        Ok(action) => action,
        Err(_) => {
            count(Reason::DropRewrite, Packet::len(&ctx));
            xdp_action::XDP_DROP
        }
    }
}

/// The TC programs' end for an SCTP packet whose port they rewrote, as
/// `lb_xdp_sctp_crc` is XDP's.
#[classifier]
pub fn lb_tc_sctp_crc(mut ctx: TcContext) -> i32 {
    match sctp::apply(&mut ctx) {
        Ok(action) => action as i32,
        Err(_) => {
            count(Reason::DropRewrite, Packet::len(&ctx));
            TC_ACT_SHOT as i32
        }
    }
}

/// Only passes: the baseline of benchmarks, and the program a test rig puts
/// on the peer of a veth whose frames are sent with XDP_TX (veth delivers
/// XDP_TX frames promptly only to a peer that runs XDP).
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Never attached: the socket hooks' decision on a request frame, for
/// `lb-agent trace --socket` (see `sock::trace`).
#[xdp]
pub fn lb_sock_trace(ctx: XdpContext) -> u32 {
    sock::trace(&ctx)
}

/// XDP's slow path on a node's external interface.
#[classifier]
#[inline(always)]
pub fn lb_tc_node(ctx: TcContext) -> i32 {
    tc(ctx, Hook::TcNode)
}

/// East-west traffic leaving pods (host side of the pod interface).
#[classifier]
#[inline(always)]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    tc(ctx, Hook::TcPod)
}

/// Replies leaving node and pod interfaces from a backend that is this
/// node itself (a hostNetwork endpoint), which no ingress hook sees.
#[classifier]
#[inline(always)]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    tc(ctx, Hook::TcEgress)
}

#[inline(always)]
fn tc(mut ctx: TcContext, hook: Hook) -> i32 {
    tc_pull(&ctx, TC_PULL_LEN);
    let ingress = Packet::ifindex(&ctx);
    let verdict = if hook == Hook::TcEgress {
        host_reply(&mut ctx)
    } else {
        process(&mut ctx, hook)
    };
    // SAFETY (all arms): the redirect helpers validate the ifindex.
    let action = match verdict {
        Verdict::Pass => TC_ACT_OK as i32,
        Verdict::Drop => TC_ACT_SHOT as i32,
        Verdict::Bounce => unsafe { bpf_redirect(ingress, 0) as i32 },
        Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Verdict::RedirectNeigh(ifindex) => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
    };
    match sctp::finish(&ctx, &LB_SCTP_CRC_TC_V1, verdict, action as u32) {
        Ok(action) => action as i32,
        Err(_) => {
            count(Reason::DropRewrite, Packet::len(&ctx));
            TC_ACT_SHOT as i32
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// License required for GPL-only helpers (fib lookup, redirect_neigh).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
