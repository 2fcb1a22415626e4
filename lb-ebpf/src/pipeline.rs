//! The per-packet ladder shared by every entry point:
//! parse → conntrack → frontend → select → conntrack create → NAT → verdict.
//!
//! The stages below report outcomes (`Result<T, Reason>`, a route); this
//! module alone counts them and decides the verdict.

use lb_common::{
    conntrack::{CT_F_DNAT, CT_F_DSR, CT_F_FORWARD, CT_F_REPLY, CT_F_SNAT},
    dsr::encap_len,
    proto,
    service::{BACKEND_F_LOCAL, SVC_F_LOCAL_ONLY, SVC_F_REMOTE_ENDPOINTS},
    CtValue, Tuple,
};

use crate::{
    conntrack::{self, NewFlow},
    dsr,
    env::{Ctx, Env, Hook},
    forward::{self, Route},
    frag, frontend, icmp,
    maps::LB_SCRATCH,
    nat,
    packet::Packet,
    parse::{self, Frag, Layout, Parsed},
    reject,
    scratch::{Entry, Scratch},
    select,
    stats::{count, count_new_flow, count_service},
    verdict::{Reason, Verdict},
};

/// Bench-only: a build with `--cfg lb_stop="STAGE"` passes every packet
/// right after STAGE, uncounted, so that the benchmark can time the ladder
/// stage by stage (the cost of a stage is the difference between its stop
/// and the one before). Without the cfg this is nothing.
macro_rules! stop_after {
    ($stage:literal, $ret:expr) => {
        if cfg!(lb_stop = $stage) {
            return $ret;
        }
    };
}

/// Runs the whole ladder on one packet.
#[inline(always)]
pub fn process<P: Packet>(pkt: &mut P, hook: Hook) -> Verdict {
    let len = pkt.len();
    let (Some(env), Some(s)) = (Env::load(), scratch()) else {
        // Arrays always have their entries; without them nothing can be
        // translated right, so the packet goes on untouched.
        return pass(Reason::PassUnsupported, len);
    };
    let mut ctx = Ctx { env, hook, len };
    stop_after!("entry", Verdict::Pass);
    // A packet another node wrapped for DSR is unwrapped first; then it is
    // an ordinary packet, for the backend its shim names.
    let unwrapped = if hook == Hook::TcPod {
        None
    } else {
        match dsr::unwrap(pkt, &ctx.env) {
            Ok(Some(shim)) => {
                ctx.len -= encap_len(shim.family) as u32;
                Some(shim)
            }
            Ok(None) => None,
            Err(reason) => return drop(reason, len),
        }
    };
    let Scratch {
        tuple: t,
        ct,
        other,
        layout: parsed,
    } = s;
    let layout = match parse::parse(pkt, t, parsed) {
        Ok(Parsed::Flow) => parse::settled(parsed),
        Ok(Parsed::Icmp) => {
            let layout = parse::settled(parsed);
            return match icmp::translate_error(pkt, &layout, t, &mut other.key) {
                Ok(true) => pass(Reason::IcmpError, len),
                Ok(false) => pass(Reason::PassUnsupported, len),
                Err(_) => drop(Reason::DropRewrite, len),
            };
        }
        Ok(Parsed::ExtLimit) => return pass(Reason::PassV6ExtLimit, len),
        Ok(Parsed::Other) => return pass(Reason::PassUnsupported, len),
        Err(_) => return pass(Reason::PassMalformed, len),
    };
    stop_after!("parse", Verdict::Pass);

    if let Some(shim) = unwrapped {
        return match dsr::deliver(pkt, t, &layout, &shim, &ctx.env, other) {
            Ok(()) => pass(Reason::DsrDecap, ctx.len),
            Err(reason) => drop(reason, ctx.len),
        };
    }
    let found = if layout.frag == Frag::Later {
        later_fragment(t, &layout, &ctx, ct)
    } else {
        flow(pkt, t, &layout, &ctx, ct, other)
    };
    stop_after!("flow", Verdict::Pass);
    match found {
        Ok(()) => translate(pkt, t, &layout, ct, &ctx),
        Err(verdict) => verdict,
    }
}

/// Translates back a reply leaving by egress from this node's own address:
/// a flow whose backend is the node itself (a hostNetwork endpoint) was
/// DNATed where it arrived and delivered to a local socket, and the answer
/// leaves through the stack, past every ingress hook. Only packets from
/// the node's address cost a conntrack lookup: everything else leaving a
/// pod or node interface (forwarded traffic, the pods' own replies) is
/// passed after the parse. Nothing is counted but translated replies, so
/// the counters do not double for traffic that ingress hooks already saw.
#[inline(always)]
pub fn host_reply<P: Packet>(pkt: &mut P) -> Verdict {
    let len = pkt.len();
    let (Some(env), Some(s)) = (Env::load(), scratch()) else {
        return Verdict::Pass;
    };
    let Scratch {
        tuple: t,
        ct,
        layout: parsed,
        ..
    } = s;
    let Ok(Parsed::Flow) = parse::parse(pkt, t, parsed) else {
        return Verdict::Pass;
    };
    let layout = parse::settled(parsed);
    if layout.frag == Frag::Later || env.cfg().node_addr(t.family) != Some(t.saddr_be) {
        return Verdict::Pass;
    }
    if !conntrack::lookup(t, layout.tcp_flags, &env, ct)
        || ct.flags & CT_F_REPLY == 0
        || ct.flags & CT_F_DSR != 0
    {
        return Verdict::Pass;
    }
    // The stack has routed the packet already: only the addresses change,
    // whatever the entry says about forwarding.
    match nat::rewrite(pkt, t, &layout, ct) {
        Ok(()) => {
            count(Reason::CtHit, len);
            count_service(ct.svc_id, len, false);
            Verdict::Pass
        }
        Err(_) => drop_for(ct.svc_id, Reason::DropRewrite, len),
    }
}

/// This CPU's scratch slot, as the previous run left it.
#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    let slot = LB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot, used by one program run at a time (XDP and
    // TC run in softirq context, which does not nest on a CPU); every field
    // is plain integers, valid whatever the previous run left, and each is
    // written before it is read.
    Some(unsafe { &mut *slot })
}

/// Finds the translation of a packet's flow into `ct`: its conntrack
/// entry, or a new flow to a backend of the Service it is addressed to
/// (whose reply entry is made in `reply`). `Err` is the packet's verdict
/// when there is nothing to translate it by (counted).
#[inline(always)]
fn flow<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    ctx: &Ctx,
    ct: &mut CtValue,
    reply: &mut Entry,
) -> Result<(), Verdict> {
    let len = ctx.len;
    if conntrack::lookup(t, layout.tcp_flags, &ctx.env, ct) {
        if select::backend_alive(ct, t.proto) {
            stop_after!("ct", Err(Verdict::Pass));
            count(Reason::CtHit, len);
            return Ok(());
        }
        // The flow's backend was removed (or, for UDP, stopped serving):
        // end the flow visibly instead of sending it into the void. TCP
        // gets a reset; UDP, which has no connection to end, is given a
        // live backend as a new flow, and so is SCTP, whose new backend
        // answers a packet of an association it does not know with an
        // ABORT (RFC 9260, 8.4), which ends it at once.
        conntrack::remove(t);
        count(Reason::BackendGone, len);
        if t.proto == proto::TCP {
            count_service(ct.svc_id, len, true);
            return Err(match reject::reject(pkt, t, layout) {
                Ok(()) => Verdict::Bounce,
                Err(_) => drop(Reason::DropRewrite, len),
            });
        }
    }
    stop_after!("ct", Err(Verdict::Pass));

    let Some(svc) = frontend::lookup(t, !ctx.hook.is_external()) else {
        // A ClusterIP on a port no Service uses is refused to pods, as
        // kube-proxy's nftables mode does (the node's own sockets are
        // refused by the socket hooks); from outside it is not ours.
        if ctx.hook == Hook::TcPod && frontend::unused_cluster_ip_port(t) {
            return Err(match reject::reject(pkt, t, layout) {
                Ok(()) => {
                    count(Reason::RejectNoEndpoint, len);
                    Verdict::Bounce
                }
                Err(_) => drop(Reason::DropRewrite, len),
            });
        }
        return Err(pass(Reason::PassNoService, len));
    };
    let svc_id = svc.svc_id;
    if !frontend::source_allowed(&svc, t) {
        return Err(drop_for(svc_id, Reason::DropSourceRange, len));
    }
    stop_after!("frontend", Err(Verdict::Pass));
    if svc.slot_count == 0 {
        // Local traffic policy without a local endpoint while other nodes
        // have some: kube-proxy drops, so that the client's load balancer,
        // which health-checks the node, retries elsewhere. Without any
        // endpoint at all it is refused, like any Service.
        let local_policy = SVC_F_LOCAL_ONLY | SVC_F_REMOTE_ENDPOINTS;
        if svc.flags & local_policy == local_policy {
            return Err(drop_for(svc_id, Reason::DropNoLocalEndpoint, len));
        }
        return Err(match reject::reject(pkt, t, layout) {
            Ok(()) => {
                count(Reason::RejectNoEndpoint, len);
                count_service(svc_id, len, true);
                Verdict::Bounce
            }
            Err(_) => drop_for(svc_id, Reason::DropRewrite, len),
        });
    }
    let hash = t.hash();
    let Some((backend_id, backend)) = select::pick(&svc, t, hash, ctx.env.now()) else {
        return Err(drop_for(svc_id, Reason::DropNoBackend, len));
    };
    let dsr_endpoint = if ctx.hook.is_external() {
        dsr::endpoint_for(pkt, t, svc.flags, &backend, &ctx.env)
    } else {
        None
    };
    // From outside to another node's backend: SNAT, to the address of the
    // interface the route leaves by.
    let egress_addr =
        if ctx.hook.is_external() && dsr_endpoint.is_none() && backend.flags & BACKEND_F_LOCAL == 0
        {
            forward::egress_addr(pkt, t, &backend.addr_be)
        } else {
            None
        };
    stop_after!("select", Err(Verdict::Pass));
    let new = NewFlow {
        svc: &svc,
        backend_id,
        backend: &backend,
        hash,
        external: ctx.hook.is_external(),
        egress_addr,
        closing: layout.closing(),
    };
    let created = if let Some(endpoint) = dsr_endpoint {
        dsr::create(t, &new, &endpoint, &ctx.env, ct)
    } else {
        conntrack::create(t, &new, &ctx.env, ct, reply)
    };
    stop_after!("create", Err(Verdict::Pass));
    match created {
        Ok(()) => {
            count(Reason::NewFlow, len);
            count_new_flow(svc_id);
            Ok(())
        }
        Err(reason) => Err(drop_for(svc_id, reason, len)),
    }
}

/// A later fragment takes its first fragment's flow, or passes untouched: it
/// has no header to start a flow or to answer with a reset.
#[inline(always)]
fn later_fragment(
    t: &mut Tuple,
    layout: &Layout,
    ctx: &Ctx,
    ct: &mut CtValue,
) -> Result<(), Verdict> {
    let len = ctx.len;
    if !frag::recall(t, layout, &ctx.env) {
        return Err(pass(Reason::FragUntracked, len));
    }
    if !conntrack::lookup(t, layout.tcp_flags, &ctx.env, ct) {
        return Err(pass(Reason::FragUntracked, len));
    }
    if !select::backend_alive(ct, t.proto) {
        return Err(drop_for(ct.svc_id, Reason::BackendGone, len));
    }
    count(Reason::FragTracked, len);
    Ok(())
}

/// Counts `reason` and passes.
#[inline(always)]
fn pass(reason: Reason, len: u32) -> Verdict {
    count(reason, len);
    Verdict::Pass
}

/// Counts `reason` and drops.
#[inline(always)]
fn drop(reason: Reason, len: u32) -> Verdict {
    count(reason, len);
    Verdict::Drop
}

/// Drops a packet of Service port `svc_id`, counting it for the Service too.
#[inline(always)]
fn drop_for(svc_id: u32, reason: Reason, len: u32) -> Verdict {
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
    let sent = if ct.flags & CT_F_DSR != 0 {
        encap(pkt, t, layout, ct, ctx)
    } else if ct.flags & CT_F_FORWARD == 0 {
        match nat::rewrite(pkt, t, layout, ct) {
            Ok(()) => Ok(Verdict::Pass),
            Err(e) => Err(e.into()),
        }
    } else {
        forwarded(pkt, t, layout, ct, ctx)
    };
    stop_after!("nat", Verdict::Pass);
    let verdict = match sent {
        Ok(verdict) => verdict,
        // Left untouched to TC, which counts it.
        Err(Reason::XdpToTc) => return pass(Reason::XdpToTc, len),
        Err(reason) => drop(reason, len),
    };
    count_service(ct.svc_id, len, verdict == Verdict::Drop);
    verdict
}

/// The tuple of a packet of tuple `t` after `ct`'s rewrite.
#[inline(always)]
fn translated(t: &Tuple, ct: &CtValue) -> Tuple {
    let mut after = *t;
    if ct.flags & CT_F_SNAT != 0 {
        after.saddr_be = ct.nat_saddr_be;
        after.sport_be = ct.nat_sport_be;
    }
    if ct.flags & CT_F_DNAT != 0 {
        after.daddr_be = ct.nat_daddr_be;
        after.dport_be = ct.nat_dport_be;
    }
    after
}

/// Wraps a DSR flow's packet to its backend's node. Too big for the path
/// once wrapped: ICMP fragmentation needed (ICMPv6 packet too big) back to
/// the client when it set DF or is IPv6 (it then sends smaller), else a
/// drop.
#[inline(always)]
fn encap<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    ct: &CtValue,
    ctx: &Ctx,
) -> Result<Verdict, Reason> {
    let ttl = forward::hops_left(pkt, layout, t.family)?;
    if ttl <= 1 {
        return expired(pkt, t, layout, ctx);
    }
    let outer = dsr::outer(pkt, t, layout, ct, &ctx.env)?;
    let route = dsr::route(pkt, &outer);
    if let Route::TooBig { mtu } = route {
        if !dsr::may_answer_too_big(pkt, t, layout) {
            return Err(Reason::DsrTooBig);
        }
        count(Reason::DsrTooBig, ctx.len);
        reject::frag_needed(pkt, t, layout, dsr::inner_mtu(t.family, mtu))?;
        return Ok(Verdict::Bounce);
    }
    leave_to_tc(pkt, ctx.hook, &route)?;
    // The client's packet is forwarded through the tunnel: it loses its
    // hop here, as under the kernel's own tunnels.
    forward::take_hop(pkt, layout, t.family, ttl)?;
    dsr::wrap(pkt, ct, &outer)?;
    count(Reason::DsrEncap, ctx.len);
    send(pkt, &route)
}

/// Translates a packet that must be forwarded by FIB lookup (its new source
/// is this node's, which the stack would refuse) and routes it, taking the
/// hop off its TTL that the kernel's forwarding, bypassed here, would take.
#[inline(always)]
fn forwarded<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    ct: &CtValue,
    ctx: &Ctx,
) -> Result<Verdict, Reason> {
    let ttl = forward::hops_left(pkt, layout, t.family)?;
    if ttl <= 1 {
        return expired(pkt, t, layout, ctx);
    }
    let route = forward::lookup(pkt, &translated(t, ct));
    leave_to_tc(pkt, ctx.hook, &route)?;
    nat::rewrite(pkt, t, layout, ct)?;
    forward::take_hop(pkt, layout, t.family, ttl)?;
    send(pkt, &route)
}

/// Answers a packet that would leave with TTL (hop limit) 0 as a router
/// does: ICMP (ICMPv6) time exceeded from this node, quoting the packet as
/// it arrived. A later fragment (nothing to quote) or a node without an
/// address of its family is dropped.
/// Checked before the route, so XDP answers itself and never hands such a
/// packet to TC.
#[inline(always)]
fn expired<P: Packet>(
    pkt: &mut P,
    t: &Tuple,
    layout: &Layout,
    ctx: &Ctx,
) -> Result<Verdict, Reason> {
    let node = ctx
        .env
        .cfg()
        .node_addr(t.family)
        .ok_or(Reason::TtlExceeded)?;
    reject::time_exceeded(pkt, t, layout, &node).map_err(|_| Reason::TtlExceeded)?;
    count(Reason::TtlExceeded, ctx.len);
    Ok(Verdict::Bounce)
}

/// `Err(XdpToTc)` when XDP cannot send the packet along `route` itself: it
/// must then leave the packet untouched for TC.
#[inline(always)]
fn leave_to_tc<P: Packet>(pkt: &P, hook: Hook, route: &Route) -> Result<(), Reason> {
    if forward::xdp_hands_over(pkt, hook, route) {
        return Err(Reason::XdpToTc);
    }
    Ok(())
}

/// Sends a translated packet along `route`: the one place a route becomes
/// a verdict.
#[inline(always)]
fn send<P: Packet>(pkt: &mut P, route: &Route) -> Result<Verdict, Reason> {
    match *route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => {
            forward::set_macs(pkt, smac, dmac)?;
            Ok(Verdict::Redirect(ifindex))
        }
        Route::NoNeighbour { ifindex } => Ok(Verdict::RedirectNeigh(ifindex)),
        Route::TooBig { .. } | Route::Unreachable => Err(Reason::DropNoRoute),
    }
}
