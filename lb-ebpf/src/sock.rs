//! Socket-level load balancing for the node's own sockets: cgroup v2 hooks
//! on `connect`, `sendmsg`, `recvmsg` and `getpeername`.
//!
//! Packets the node itself sends never cross an interface our packet
//! programs run on before they leave, so the node's sockets are translated
//! where they start: `connect` (TCP, connected UDP) and `sendmsg` (each
//! datagram of an unconnected UDP socket) rewrite a frontend to the backend
//! that the packet path's own stages choose (frontend lookup, source ranges,
//! affinity, Maglev), and the socket talks to the backend directly. What the
//! application sees stays the frontend: the forward hook leaves a reverse
//! entry (socket cookie and backend → frontend) that `recvmsg` (a UDP
//! reply's source) and `getpeername` read.
//!
//! The agent attaches the hooks at the root of the cgroup v2 hierarchy, so
//! they run for every socket of the machine; each hook first checks that the
//! socket lives in the agent's network namespace (its cookie is in the sock
//! config map) and lets every other socket through untouched. Pods, in
//! network namespaces of their own, keep going through the TC path.
//!
//! Choice of the Maglev hash: at `connect` the source port is usually not
//! chosen yet (it is bound after the hook) and the source address is the
//! routing decision's, so the packet path's 5-tuple hash would give every
//! connection of the node the same backend. The hooks hash the socket's
//! cookie (unique per socket for the kernel's uptime) with the frontend:
//! connections spread over the backends as the packet path's flows do, and
//! one unconnected UDP socket keeps its backend for every datagram to a
//! frontend while the table holds, as a 5-tuple would. The decision never
//! leaves the node, so it need not be the one another node would make.
//!
//! The "client" of affinity and source ranges is the socket's bound
//! address, or the node's address (the SNAT source of the config map) for
//! an unbound socket: the address its packets would most likely carry.
//!
//! One pair of bodies serves both families (`forward`, `reverse`); only
//! the fields of the socket address differ ([`SockFamily`]). On an IPv6
//! socket an IPv4-mapped address (`::ffff:10.96.0.10`) is an IPv4 flow:
//! it is looked up as the IPv4 frontend and rewritten to the IPv4 backend,
//! mapped back into the IPv6 address.

use aya_ebpf::{
    bindings::{bpf_sock_addr, xdp_action, BPF_ANY},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::{SockAddrContext, XdpContext},
    EbpfContext as _,
};
use lb_common::{
    family, proto,
    sock::{
        sock_hash, SockRevKey, SockRevValue, TraceRequest, TraceResult, STAT_REFUSED,
        STAT_REVERSED, STAT_SOURCE_RANGE, STAT_TRANSLATED, TRACE_FRAME_LEN, TRACE_PASS,
        TRACE_REFUSED, TRACE_TRANSLATED,
    },
    stats::SvcCounters,
    BackendId, IpAddrBe, Tuple,
};

use crate::{
    env::Env,
    frontend,
    maps::{LB_SOCK_CONFIG_V1, LB_SOCK_REV_V1, LB_SOCK_STATS_V1, LB_SVC_STATS_V1},
    select,
    stats::count_new_flow,
};

/// Return code of a cgroup sock_addr program: go on.
const ALLOW: i32 = 1;
/// Return code of a cgroup sock_addr program: fail the call, with the error
/// set by `bpf_set_retval` (EPERM if none).
const REJECT: i32 = 0;
/// `ECONNREFUSED`: what a client of a Service without endpoints gets, as
/// from kube-proxy's reject rules, at once instead of a timeout.
const ECONNREFUSED: i32 = 111;
/// `EPERM`: a client outside the Service's `loadBalancerSourceRanges`.
const EPERM: i32 = 1;

/// A socket address: the frontend a socket asks for or the backend it gets.
#[derive(Clone, Copy)]
struct Endpoint {
    family: u8,
    addr: IpAddrBe,
    port_be: u16,
}

/// What a forward hook does with the socket's address.
enum Decision {
    /// Not a frontend (or not our socket): leave it.
    Pass,
    /// Rewrite it to this backend of Service port `svc_id`.
    To {
        backend: Endpoint,
        backend_id: BackendId,
        svc_id: u32,
    },
    /// Fail the call with this errno (`svc_id` 0: no Service port).
    Refuse { errno: i32, svc_id: u32 },
}

/// The address family of a hook's socket address (`sockaddr_in` or
/// `sockaddr_in6`): which fields of the context hold it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SockFamily {
    /// `user_ip4`, `msg_src_ip4`, `src_ip4`.
    Inet,
    /// `user_ip6`, `msg_src_ip6`, `src_ip6`.
    Inet6,
}

/// TCP connect and connected UDP: translate a frontend to a backend.
#[cgroup_sock_addr(connect4)]
#[inline(always)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, SockFamily::Inet, true)
}

/// Each datagram of an unconnected UDP socket: translate a frontend.
#[cgroup_sock_addr(sendmsg4)]
#[inline(always)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, SockFamily::Inet, false)
}

/// A UDP datagram's source as the application reads it: the frontend.
#[cgroup_sock_addr(recvmsg4)]
#[inline(always)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, SockFamily::Inet);
    ALLOW
}

/// A connected socket's peer as the application reads it: the frontend.
#[cgroup_sock_addr(getpeername4)]
#[inline(always)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, SockFamily::Inet);
    ALLOW
}

/// [`lb_sock_connect4`] for IPv6 sockets (and IPv4-mapped addresses on
/// them, translated as IPv4).
#[cgroup_sock_addr(connect6)]
#[inline(always)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, SockFamily::Inet6, true)
}

/// [`lb_sock_sendmsg4`] for IPv6 sockets. A datagram to an IPv4-mapped
/// address never gets here: Linux sends it through the IPv4 path, whose
/// `sendmsg4` hook translates it.
#[cgroup_sock_addr(sendmsg6)]
#[inline(always)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, SockFamily::Inet6, false)
}

/// [`lb_sock_recvmsg4`] for IPv6 sockets.
#[cgroup_sock_addr(recvmsg6)]
#[inline(always)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, SockFamily::Inet6);
    ALLOW
}

/// [`lb_sock_getpeername4`] for IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
#[inline(always)]
pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, SockFamily::Inet6);
    ALLOW
}

/// The second word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), in
/// network byte order.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The endpoint an IPv6 socket address names: an IPv4-mapped one is the
/// IPv4 address it carries, since its packets are IPv4 packets and the
/// frontend is an IPv4 one.
#[inline(always)]
fn from_sock6(words: IpAddrBe, port_be: u16) -> Endpoint {
    if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
        Endpoint {
            family: family::V4,
            addr: [words[3], 0, 0, 0],
            port_be,
        }
    } else {
        Endpoint {
            family: family::V6,
            addr: words,
            port_be,
        }
    }
}

/// The words of an IPv6 socket address for `ep`: IPv4 ones mapped.
#[inline(always)]
fn to_sock6(ep: &Endpoint) -> IpAddrBe {
    if ep.family == family::V4 {
        [0, 0, V4_MAPPED_WORD, ep.addr[0]]
    } else {
        ep.addr
    }
}

/// The address and port of the hook's socket address (`user_*`).
#[inline(always)]
fn read_user(sa: *mut bpf_sock_addr, fam: SockFamily) -> Endpoint {
    // SAFETY (every access to `sa` in this module): the kernel hands the
    // program a valid context; volatile keeps each access at the width the
    // verifier allows (LLVM could merge neighbouring fields into one wider
    // load).
    unsafe {
        let port_be = core::ptr::read_volatile(&(*sa).user_port) as u16;
        match fam {
            SockFamily::Inet => Endpoint {
                family: family::V4,
                addr: [core::ptr::read_volatile(&(*sa).user_ip4), 0, 0, 0],
                port_be,
            },
            SockFamily::Inet6 => from_sock6(
                [
                    core::ptr::read_volatile(&(*sa).user_ip6[0]),
                    core::ptr::read_volatile(&(*sa).user_ip6[1]),
                    core::ptr::read_volatile(&(*sa).user_ip6[2]),
                    core::ptr::read_volatile(&(*sa).user_ip6[3]),
                ],
                port_be,
            ),
        }
    }
}

/// Writes `ep` into the hook's socket address (`user_*`): 4-byte writes,
/// which every hook of this module may make.
#[inline(always)]
fn write_user(sa: *mut bpf_sock_addr, fam: SockFamily, ep: &Endpoint) {
    // SAFETY: as in `read_user`.
    unsafe {
        match fam {
            SockFamily::Inet => core::ptr::write_volatile(&mut (*sa).user_ip4, ep.addr[0]),
            SockFamily::Inet6 => {
                let w = to_sock6(ep);
                core::ptr::write_volatile(&mut (*sa).user_ip6[0], w[0]);
                core::ptr::write_volatile(&mut (*sa).user_ip6[1], w[1]);
                core::ptr::write_volatile(&mut (*sa).user_ip6[2], w[2]);
                core::ptr::write_volatile(&mut (*sa).user_ip6[3], w[3]);
            }
        }
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(ep.port_be));
    }
}

/// The forward hooks: translate the socket address if it is a frontend.
#[inline(always)]
fn forward(ctx: &SockAddrContext, fam: SockFamily, connect: bool) -> i32 {
    if !in_scope(ctx) {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: as in `read_user`.
    let l4 = unsafe { core::ptr::read_volatile(&(*sa).protocol) };
    let Some(l4) = sock_proto(l4) else {
        return ALLOW;
    };
    let dst = read_user(sa, fam);
    let client = client(sa, fam, dst.family, connect);
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match decide(l4, &dst, client, cookie, connect) {
        Decision::Pass => ALLOW,
        Decision::To { backend, .. } => {
            write_user(sa, fam, &backend);
            ALLOW
        }
        Decision::Refuse { errno, .. } => {
            // SAFETY: bpf_set_retval has no preconditions in these hooks.
            unsafe { bpf_set_retval(-errno) };
            REJECT
        }
    }
}

/// The reverse hooks: show a translated socket's backend as its frontend.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, fam: SockFamily) {
    if !in_scope(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    let seen = read_user(sa, fam);
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(front) = frontend_of(cookie, &seen) {
        write_user(sa, fam, &front);
    }
}

/// The address of family `dst_family` a socket's packets will most likely
/// carry: the source a datagram asks for (`IP_PKTINFO`, `IPV6_PKTINFO`),
/// the address the socket is bound to, or 0 for the node's address (which
/// `decide` takes from the config). An IPv6 socket bound to an IPv4-mapped
/// address sends IPv4 packets from that IPv4 address.
#[inline(always)]
fn client(sa: *mut bpf_sock_addr, fam: SockFamily, dst_family: u8, connect: bool) -> IpAddrBe {
    // SAFETY: msg_src_* may be read in sendmsg hooks only (`!connect`);
    // `sk` is always a valid socket pointer in these hooks.
    unsafe {
        let sk = core::ptr::read_volatile(&(*sa).__bindgen_anon_1.sk);
        match fam {
            SockFamily::Inet => {
                let mut addr = 0;
                if !connect {
                    addr = core::ptr::read_volatile(&(*sa).msg_src_ip4);
                }
                if addr == 0 && !sk.is_null() {
                    addr = core::ptr::read_volatile(&(*sk).src_ip4);
                }
                [addr, 0, 0, 0]
            }
            SockFamily::Inet6 => {
                let mut words = [0; 4];
                if !connect {
                    words = [
                        core::ptr::read_volatile(&(*sa).msg_src_ip6[0]),
                        core::ptr::read_volatile(&(*sa).msg_src_ip6[1]),
                        core::ptr::read_volatile(&(*sa).msg_src_ip6[2]),
                        core::ptr::read_volatile(&(*sa).msg_src_ip6[3]),
                    ];
                }
                if words == [0; 4] && !sk.is_null() {
                    words = [
                        core::ptr::read_volatile(&(*sk).src_ip6[0]),
                        core::ptr::read_volatile(&(*sk).src_ip6[1]),
                        core::ptr::read_volatile(&(*sk).src_ip6[2]),
                        core::ptr::read_volatile(&(*sk).src_ip6[3]),
                    ];
                }
                client6(words, dst_family)
            }
        }
    }
}

/// The client an IPv6 socket's source `words` give a flow of `dst_family`:
/// a mapped address is IPv4; an address of the other family (a socket
/// bound to `::` connecting to a mapped address) is none, so the node's.
#[inline(always)]
fn client6(words: IpAddrBe, dst_family: u8) -> IpAddrBe {
    let src = from_sock6(words, 0);
    if src.family == dst_family {
        src.addr
    } else {
        [0; 4]
    }
}

/// Whether the socket lives in the agent's network namespace.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = LB_SOCK_CONFIG_V1.get(0) else {
        return false;
    };
    // A cookie of 0 is an agent that has not written its scope yet.
    // SAFETY: the helper takes the program's context.
    cfg.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.netns_cookie
}

/// The protocol number a socket's `protocol` field names, if the hooks
/// translate it.
#[inline(always)]
fn sock_proto(protocol: u32) -> Option<u8> {
    match protocol {
        6 => Some(proto::TCP),
        17 => Some(proto::UDP),
        _ => None,
    }
}

/// The address an unbound socket's packets will carry: the node's.
#[inline(always)]
fn client_or_node(client: IpAddrBe, family: u8, env: &Env) -> IpAddrBe {
    if client == [0; 4] {
        env.cfg().node_addr(family).unwrap_or(client)
    } else {
        client
    }
}

/// Chooses the backend for a socket asking for `dst`, with the packet
/// path's stages, and records the translation for the reverse hooks.
#[inline(always)]
fn decide(l4: u8, dst: &Endpoint, client: IpAddrBe, cookie: u64, connect: bool) -> Decision {
    let Some(env) = Env::load() else {
        return Decision::Pass;
    };
    let client = client_or_node(client, dst.family, &env);
    // The source port is not known yet (see the module comment).
    let t = Tuple {
        saddr_be: client,
        daddr_be: dst.addr,
        sport_be: 0,
        dport_be: dst.port_be,
        proto: l4,
        family: dst.family,
        _pad: [0; 2],
    };
    let Some(svc) = frontend::lookup(&t, true) else {
        // A ClusterIP on a port no Service uses: refused, as kube-proxy's
        // nftables mode does.
        if frontend::unused_cluster_ip_port(&t) {
            count(STAT_REFUSED);
            return Decision::Refuse {
                errno: ECONNREFUSED,
                svc_id: 0,
            };
        }
        return Decision::Pass;
    };
    if !frontend::source_allowed(&svc, &t) {
        count(STAT_SOURCE_RANGE);
        count_refusal(svc.svc_id);
        return Decision::Refuse {
            errno: EPERM,
            svc_id: svc.svc_id,
        };
    }
    // No endpoint (or an inconsistent table): refuse at once. The packet
    // path drops instead for a Local policy without a local endpoint, so
    // that an outside load balancer retries elsewhere; a local client has
    // nowhere else to go, and a refusal beats a timeout.
    let picked = if svc.slot_count == 0 {
        None
    } else {
        select::pick(&svc, &t, sock_hash(&t, cookie), env.now())
    };
    let Some((backend_id, backend)) = picked else {
        count(STAT_REFUSED);
        count_refusal(svc.svc_id);
        return Decision::Refuse {
            errno: ECONNREFUSED,
            svc_id: svc.svc_id,
        };
    };
    let key = SockRevKey {
        cookie,
        addr_be: backend.addr_be,
        port_be: backend.port_be,
        family: backend.family,
        _pad: [0; 5],
    };
    let value = SockRevValue {
        addr_be: dst.addr,
        port_be: dst.port_be,
        family: dst.family,
        _pad: 0,
        svc_id: svc.svc_id,
    };
    // A datagram socket sends many datagrams; its flow is new when it
    // first reaches this backend for this frontend.
    // SAFETY: the value is compared at once.
    let known = !connect && unsafe { LB_SOCK_REV_V1.get(&key) }.is_some_and(|v| *v == value);
    if !known {
        // A full LRU map evicts the idlest socket's entry; a failure leaves
        // only the reverse view untranslated, so the call goes on.
        let _ = LB_SOCK_REV_V1.insert(&key, &value, u64::from(BPF_ANY));
        count_new_flow(svc.svc_id);
    }
    count(STAT_TRANSLATED);
    Decision::To {
        backend: Endpoint {
            family: backend.family,
            addr: backend.addr_be,
            port_be: backend.port_be,
        },
        backend_id,
        svc_id: svc.svc_id,
    }
}

/// `lb_sock_trace`: the decision `decide` makes for the [`TraceRequest`]
/// at the start of the frame, written over it as a [`TraceResult`]. It
/// only ever runs under BPF_PROG_TEST_RUN on a private copy of the
/// datapath (`lb-agent trace --socket`): a cgroup socket program cannot be
/// test-run, and a real `connect` would send a SYN to the backend.
#[inline(always)]
pub fn trace(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    if start + TRACE_FRAME_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let req = start as *const TraceRequest;
    let out = start as *mut TraceResult;
    // SAFETY (every access through `req` and `out`): the bounds were
    // checked above and the frame is the program's; the request is read
    // whole before the result is written over it.
    let (l4, dst, client, req_family, cookie, connect) = unsafe {
        (
            sock_proto(u32::from((*req).proto)),
            // As the IPv6 hooks read it: a mapped address is IPv4.
            if (*req).family == family::V6 {
                from_sock6((*req).dst_be, (*req).dst_port_be)
            } else {
                Endpoint {
                    family: (*req).family,
                    addr: (*req).dst_be,
                    port_be: (*req).dst_port_be,
                }
            },
            (*req).client_be,
            (*req).family,
            (*req).cookie,
            (*req).connect != 0,
        )
    };
    let client = if req_family == family::V6 {
        client6(client, dst.family)
    } else {
        client
    };
    let decision = match (l4, Env::load()) {
        (Some(l4), Some(env)) => {
            // SAFETY: as above.
            unsafe { (*out).client_be = client_or_node(client, dst.family, &env) };
            decide(l4, &dst, client, cookie, connect)
        }
        _ => Decision::Pass,
    };
    // SAFETY: as above.
    unsafe {
        (*out).errno = 0;
        (*out).backend_id = 0;
        (*out).svc_id = 0;
        match decision {
            Decision::Pass => (*out).verdict = TRACE_PASS,
            Decision::To {
                backend,
                backend_id,
                svc_id,
            } => {
                (*out).verdict = TRACE_TRANSLATED;
                (*out).svc_id = svc_id;
                (*out).backend_id = backend_id;
                (*out).addr_be = backend.addr;
                (*out).port_be = backend.port_be;
                (*out).family = backend.family;
            }
            Decision::Refuse { errno, svc_id } => {
                (*out).verdict = TRACE_REFUSED;
                (*out).errno = errno as u32;
                (*out).svc_id = svc_id;
            }
        }
    }
    xdp_action::XDP_PASS
}

/// The frontend a translated socket asked for, given the backend it sees.
#[inline(always)]
fn frontend_of(cookie: u64, seen: &Endpoint) -> Option<Endpoint> {
    let key = SockRevKey {
        cookie,
        addr_be: seen.addr,
        port_be: seen.port_be,
        family: seen.family,
        _pad: [0; 5],
    };
    // SAFETY: the value is copied out at once.
    let v = unsafe { LB_SOCK_REV_V1.get(&key).copied() }?;
    count(STAT_REVERSED);
    Some(Endpoint {
        family: v.family,
        addr: v.addr_be,
        port_be: v.port_be,
    })
}

/// Adds one to socket counter `idx`.
#[inline(always)]
fn count(idx: u32) {
    if let Some(c) = LB_SOCK_STATS_V1.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *c += 1 };
    }
}

/// Counts a refused socket call as a drop of Service port `svc_id` (no
/// packet was sent, so packets and bytes stay).
#[inline(always)]
fn count_refusal(svc_id: u32) {
    if let Some(c) = LB_SVC_STATS_V1.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            let c: &mut SvcCounters = &mut *c;
            c.drops += 1;
        }
    }
}
