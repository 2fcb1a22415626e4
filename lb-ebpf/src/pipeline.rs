//! The per-packet ladder shared by every entry point:
//! parse → conntrack → frontend → select → conntrack create → NAT → verdict.

use lb_common::{
    conntrack::{CT_F_DNAT, CT_F_DSR, CT_F_FORWARD, CT_F_SNAT},
    dsr::ENCAP_LEN,
    proto,
    service::SVC_F_LOCAL_ONLY,
    stats, CtValue, Tuple,
};

use crate::{
    conntrack::{self, NewFlow},
    dsr,
    env::{Ctx, Env, Hook},
    forward::{self, Route},
    frag, frontend, icmp, nat,
    packet::Packet,
    parse::{self, Frag, Layout},
    reject, select,
    stats::{count, count_new_flow, count_service},
};

/// What the entry point should do with the packet.
pub enum Verdict {
    /// Hand it to the stack.
    Pass,
    /// Drop it; the reason was counted.
    Drop,
    /// Send it back out the interface it came from (a refusal).
    Bounce,
    /// Send it out `ifindex`; MACs are already written.
    Redirect(u32),
    /// Send it out `ifindex`, letting the kernel resolve the neighbour (TC only).
    RedirectNeigh(u32),
}

/// Runs the whole ladder on one packet.
#[inline(always)]
pub fn process<P: Packet>(pkt: &mut P, hook: Hook) -> Verdict {
    let len = pkt.len();
    let Some(env) = Env::load() else {
        // The config array always has its one entry; without it nothing
        // can be translated right, so the packet goes on untouched.
        count(stats::PASS_UNSUPPORTED, len);
        return Verdict::Pass;
    };
    let mut ctx = Ctx { env, hook, len };
    // A packet another node wrapped for DSR is unwrapped first; then it is
    // an ordinary packet, for the backend its shim names.
    let unwrapped = if hook == Hook::TcPod {
        None
    } else {
        match dsr::unwrap(pkt, &ctx.env) {
            Ok(Some(shim)) => {
                ctx.len -= ENCAP_LEN as u32;
                Some(shim)
            }
            Ok(None) => None,
            Err(_) => return drop(stats::DROP_REWRITE, len),
        }
    };
    let (mut t, layout) = match parse::parse(pkt) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            return match icmp::translate_error(pkt) {
                Ok(true) => {
                    count(stats::ICMP_ERROR, len);
                    Verdict::Pass
                }
                Ok(false) => {
                    count(stats::PASS_UNSUPPORTED, len);
                    Verdict::Pass
                }
                Err(_) => drop(stats::DROP_REWRITE, len),
            };
        }
        Err(_) => {
            count(stats::PASS_MALFORMED, len);
            return Verdict::Pass;
        }
    };

    if let Some(shim) = unwrapped {
        return dsr::deliver(pkt, &t, &layout, &shim, &ctx);
    }
    if layout.frag == Frag::Later {
        return later_fragment(pkt, &mut t, &layout, &ctx);
    }

    if let Some(ct) = conntrack::lookup(&t, layout.closing(), &ctx.env) {
        if select::backend_alive(&ct) {
            count(stats::CT_HIT, len);
            return translate(pkt, &t, &layout, &ct, &ctx);
        }
        // The flow's backend was removed: end the flow visibly instead of
        // sending it into the void. TCP gets a reset; UDP, which has no
        // connection to end, is given a live backend as a new flow.
        conntrack::remove(&t);
        count(stats::BACKEND_GONE, len);
        if t.proto == proto::TCP {
            count_service(ct.svc_id, len, true);
            return match reject::reject(pkt, &t, &layout) {
                Ok(()) => Verdict::Bounce,
                Err(_) => drop(stats::DROP_REWRITE, len),
            };
        }
    }

    let Some(svc) = frontend::lookup(&t) else {
        count(stats::PASS_NO_SERVICE, len);
        return Verdict::Pass;
    };
    let svc_id = svc.svc_id;
    if !frontend::source_allowed(&svc, &t) {
        return drop_for(svc_id, stats::DROP_SOURCE_RANGE, len);
    }
    if svc.slot_count == 0 {
        // Local traffic policy without a local endpoint: kube-proxy drops,
        // so that the client's load balancer, which health-checks the
        // node, retries elsewhere.
        if svc.flags & SVC_F_LOCAL_ONLY != 0 {
            return drop_for(svc_id, stats::DROP_NO_LOCAL_ENDPOINT, len);
        }
        return match reject::reject(pkt, &t, &layout) {
            Ok(()) => {
                count(stats::REJECT_NO_ENDPOINT, len);
                count_service(svc_id, len, true);
                Verdict::Bounce
            }
            Err(_) => drop_for(svc_id, stats::DROP_REWRITE, len),
        };
    }
    let hash = t.hash();
    let Some((backend_id, backend)) = select::pick(&svc, &t, hash, ctx.env.now()) else {
        return drop_for(svc_id, stats::DROP_NO_BACKEND, len);
    };
    let dsr_endpoint = if hook.is_external() {
        dsr::endpoint_for(pkt, t.saddr_be[0], svc.flags, &backend, &ctx.env)
    } else {
        None
    };
    if let Some(endpoint) = dsr_endpoint {
        return match dsr::create(&t, &svc, backend_id, &backend, endpoint, &ctx.env) {
            Ok(ct) => {
                count(stats::NEW_FLOW, len);
                count_new_flow(svc_id);
                translate(pkt, &t, &layout, &ct, &ctx)
            }
            Err(reason) => drop_for(svc_id, reason, len),
        };
    }
    let new = NewFlow {
        hash,
        external: hook.is_external(),
        closing: layout.closing(),
    };
    match conntrack::create(&t, new, &svc, backend_id, &backend, &ctx.env) {
        Ok(ct) => {
            count(stats::NEW_FLOW, len);
            count_new_flow(svc_id);
            translate(pkt, &t, &layout, &ct, &ctx)
        }
        Err(reason) => drop_for(svc_id, reason, len),
    }
}

/// A later fragment takes its first fragment's flow, or passes untouched: it
/// has no header to start a flow or to answer with a reset.
#[inline(always)]
fn later_fragment<P: Packet>(pkt: &mut P, t: &mut Tuple, layout: &Layout, ctx: &Ctx) -> Verdict {
    let len = ctx.len;
    if !frag::recall(t, layout, &ctx.env) {
        count(stats::FRAG_UNTRACKED, len);
        return Verdict::Pass;
    }
    let Some(ct) = conntrack::lookup(t, layout.closing(), &ctx.env) else {
        count(stats::FRAG_UNTRACKED, len);
        return Verdict::Pass;
    };
    if !select::backend_alive(&ct) {
        return drop_for(ct.svc_id, stats::BACKEND_GONE, len);
    }
    count(stats::FRAG_TRACKED, len);
    translate(pkt, t, layout, &ct, ctx)
}

/// Counts `reason` and drops.
#[inline(always)]
pub fn drop(reason: u32, len: u32) -> Verdict {
    count(reason, len);
    Verdict::Drop
}

/// Drops a packet of Service port `svc_id`, counting it for the Service too.
#[inline(always)]
fn drop_for(svc_id: u32, reason: u32, len: u32) -> Verdict {
    count_service(svc_id, len, true);
    drop(reason, len)
}

/// Applies a flow's translation and decides where the packet goes, counting
/// the packet for its Service port unless it is left to TC.
#[inline(always)]
fn translate<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    ct: &CtValue,
    ctx: &Ctx,
) -> Verdict {
    let len = ctx.len;
    frag::remember(t, layout, &ctx.env);
    let verdict = if ct.flags & CT_F_DSR != 0 {
        match dsr::encap(pkt, t, layout, ct, ctx) {
            // Left to TC, which counts it.
            Verdict::Pass => return Verdict::Pass,
            v => v,
        }
    } else if ct.flags & CT_F_FORWARD == 0 {
        match nat::rewrite(pkt, t, layout, ct) {
            Ok(()) => Verdict::Pass,
            Err(_) => drop(stats::DROP_REWRITE, len),
        }
    } else {
        match route_forwarded(pkt, t, layout, ct, ctx) {
            Some(v) => v,
            // Left to TC, which counts it.
            None => return Verdict::Pass,
        }
    };
    count_service(ct.svc_id, len, matches!(verdict, Verdict::Drop));
    verdict
}

/// Translates and routes a forwarded flow's packet; `None` when XDP leaves
/// it untouched for TC.
#[inline(always)]
fn route_forwarded<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    ct: &CtValue,
    ctx: &Ctx,
) -> Option<Verdict> {
    let len = ctx.len;
    let mut after = *t;
    if ct.flags & CT_F_SNAT != 0 {
        after.saddr_be = ct.nat_saddr_be;
        after.sport_be = ct.nat_sport_be;
    }
    if ct.flags & CT_F_DNAT != 0 {
        after.daddr_be = ct.nat_daddr_be;
        after.dport_be = ct.nat_dport_be;
    }
    let route = forward::lookup(pkt, &after);
    if forward::xdp_hands_over(pkt, ctx.hook, &route) {
        count(stats::XDP_TO_TC, len);
        return None;
    }
    if nat::rewrite(pkt, t, layout, ct).is_err() {
        return Some(drop(stats::DROP_REWRITE, len));
    }
    Some(match route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => match forward::set_macs(pkt, smac, dmac) {
            Ok(()) => Verdict::Redirect(ifindex),
            Err(_) => drop(stats::DROP_REWRITE, len),
        },
        Route::NoNeighbour { ifindex } => Verdict::RedirectNeigh(ifindex),
        Route::TooBig { .. } | Route::Unreachable => drop(stats::DROP_NO_ROUTE, len),
    })
}
