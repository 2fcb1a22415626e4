//! The per-packet ladder shared by every entry point:
//! parse → conntrack → frontend → select → conntrack create → NAT → verdict.

use lb_common::{
    conntrack::{CT_F_DSR, CT_F_FORWARD},
    proto,
    service::SVC_F_LOCAL_ONLY,
    stats, CtValue,
};

use crate::{
    conntrack, dsr, forward,
    forward::Route,
    frag, frontend, icmp, nat,
    packet::{Hook, Packet},
    parse::{self, Flow, Frag},
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
    // A packet another node wrapped for DSR is unwrapped first; then it is
    // an ordinary packet, for the backend its shim names.
    let unwrapped = if hook == Hook::TcPod {
        None
    } else {
        match dsr::unwrap(pkt) {
            Ok(shim) => shim,
            Err(_) => return drop(stats::DROP_REWRITE, len),
        }
    };
    let mut flow = match parse::parse(pkt) {
        Ok(Some(flow)) => flow,
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
        return dsr::deliver(pkt, &flow, &shim);
    }
    if flow.frag == Frag::Later {
        return later_fragment(pkt, &mut flow, hook, len);
    }

    let key = flow.ct_key();
    if let Some(ct) = conntrack::lookup(&flow, &key) {
        if select::backend_alive(&ct) {
            count(stats::CT_HIT, len);
            return translate(pkt, &flow, &ct, hook);
        }
        // The flow's backend was removed: end the flow visibly instead of
        // sending it into the void. TCP gets a reset; UDP, which has no
        // connection to end, is given a live backend as a new flow.
        conntrack::remove(&key);
        count(stats::BACKEND_GONE, len);
        if flow.proto == proto::TCP {
            count_service(ct.svc_id, len, true);
            return match reject::reject(pkt, &flow) {
                Ok(()) => Verdict::Bounce,
                Err(_) => drop(stats::DROP_REWRITE, len),
            };
        }
    }

    let Some(svc) = frontend::lookup(&flow) else {
        count(stats::PASS_NO_SERVICE, len);
        return Verdict::Pass;
    };
    let svc_id = svc.svc_id;
    if !frontend::source_allowed(&svc, &flow) {
        return drop_for(svc_id, stats::DROP_SOURCE_RANGE, len);
    }
    if svc.slot_count == 0 {
        // Local traffic policy without a local endpoint: kube-proxy drops,
        // so that the client's load balancer, which health-checks the
        // node, retries elsewhere.
        if svc.flags & SVC_F_LOCAL_ONLY != 0 {
            return drop_for(svc_id, stats::DROP_NO_LOCAL_ENDPOINT, len);
        }
        return match reject::reject(pkt, &flow) {
            Ok(()) => {
                count(stats::REJECT_NO_ENDPOINT, len);
                count_service(svc_id, len, true);
                Verdict::Bounce
            }
            Err(_) => drop_for(svc_id, stats::DROP_REWRITE, len),
        };
    }
    let Some((backend_id, backend)) = select::pick(&svc, &flow) else {
        return drop_for(svc_id, stats::DROP_NO_BACKEND, len);
    };
    let dsr_endpoint = if hook.is_external() {
        dsr::endpoint_for(pkt, flow.saddr[0], svc.flags, &backend)
    } else {
        None
    };
    if let Some(endpoint) = dsr_endpoint {
        return match dsr::create(&flow, &svc, backend_id, &backend, endpoint) {
            Ok(ct) => {
                count(stats::NEW_FLOW, len);
                count_new_flow(svc_id);
                translate(pkt, &flow, &ct, hook)
            }
            Err(reason) => drop_for(svc_id, reason, len),
        };
    }
    match conntrack::create(&flow, &svc, backend_id, &backend, hook) {
        Ok(ct) => {
            count(stats::NEW_FLOW, len);
            count_new_flow(svc_id);
            translate(pkt, &flow, &ct, hook)
        }
        Err(reason) => drop_for(svc_id, reason, len),
    }
}

/// A later fragment takes its first fragment's flow, or passes untouched: it
/// has no header to start a flow or to answer with a reset.
#[inline(always)]
fn later_fragment<P: Packet>(pkt: &mut P, flow: &mut Flow, hook: Hook, len: u32) -> Verdict {
    if !frag::recall(flow) {
        count(stats::FRAG_UNTRACKED, len);
        return Verdict::Pass;
    }
    let Some(ct) = conntrack::lookup(flow, &flow.ct_key()) else {
        count(stats::FRAG_UNTRACKED, len);
        return Verdict::Pass;
    };
    if !select::backend_alive(&ct) {
        return drop_for(ct.svc_id, stats::BACKEND_GONE, len);
    }
    count(stats::FRAG_TRACKED, len);
    translate(pkt, flow, &ct, hook)
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
fn translate<P: Packet>(pkt: &mut P, flow: &Flow, ct: &CtValue, hook: Hook) -> Verdict {
    let len = pkt.len();
    frag::remember(flow);
    let verdict = if ct.flags & CT_F_DSR != 0 {
        match dsr::encap(pkt, flow, ct, hook) {
            // Left to TC, which counts it.
            Verdict::Pass => return Verdict::Pass,
            v => v,
        }
    } else if ct.flags & CT_F_FORWARD == 0 {
        match nat::rewrite(pkt, flow, ct) {
            Ok(()) => Verdict::Pass,
            Err(_) => drop(stats::DROP_REWRITE, len),
        }
    } else {
        match route_forwarded(pkt, flow, ct, hook) {
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
    flow: &Flow,
    ct: &CtValue,
    hook: Hook,
) -> Option<Verdict> {
    let len = pkt.len();
    let (saddr, sport) = if ct.flags & lb_common::conntrack::CT_F_SNAT != 0 {
        (ct.nat_saddr_be, ct.nat_sport_be)
    } else {
        (flow.saddr, flow.sport)
    };
    let (daddr, dport) = if ct.flags & lb_common::conntrack::CT_F_DNAT != 0 {
        (ct.nat_daddr_be, ct.nat_dport_be)
    } else {
        (flow.daddr, flow.dport)
    };
    let route = forward::lookup(pkt, flow, &saddr, &daddr, sport, dport);
    if forward::xdp_hands_over(pkt, hook, &route) {
        count(stats::XDP_TO_TC, len);
        return None;
    }
    if nat::rewrite(pkt, flow, ct).is_err() {
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
