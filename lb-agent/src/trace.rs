//! `lb-agent trace`: one hand-built packet through a private copy of the
//! datapath, explained.
//!
//! The copy reads the live frontends, tables and backends but keeps its own
//! conntrack, affinity, fragment and counter maps
//! ([`Programs::load_shadow`]), seeded with the live entries this packet
//! would meet, so the verdict is the one the live datapath would give while
//! nothing live changes. The counters the run moved say what happened; the
//! seeded entries and the flow hash say why.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap, PerCpuArray};
use lb_common::{
    addr::{addr_be, addr_from_be, socket_from_be},
    hash::flow_hash,
    proto,
    stats::Counter,
    AffinityKey, AffinityValue, CtKey, CtValue, ServiceKey, ServiceValue,
};
use serde::Serialize;

use crate::{
    datapath::{
        bpffs,
        maps::{decode_info, Maps},
        programs::{self, Programs, TestProgram},
    },
    inspect::{frontend_kinds, monotonic_ns},
    packet::{self, Packet, Summary, MAC_A, MAC_B},
};

/// The packet to trace.
#[derive(Clone, Debug)]
pub struct Request {
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// TCP flags (ignored for UDP).
    pub tcp_flags: u8,
    /// The interface it arrives on; `None`: from a pod, without a device.
    pub iface: Option<String>,
}

/// One program's run.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    /// The program.
    pub program: &'static str,
    /// Its return code, named.
    pub verdict: String,
    /// The counters the run moved: what happened (`new_flow`, `ct_hit`,
    /// `drop_source_range`, …).
    pub outcome: Vec<&'static str>,
    /// The packet as the program left it.
    pub output: Option<Summary>,
    /// The packet as the program left it, in hex.
    pub output_hex: String,
}

/// What `trace` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The packet sent in.
    pub input: Summary,
    /// The interface it was given as arriving on.
    pub iface: Option<String>,
    /// The frontend it matched: `namespace/name:port/PROTO (kinds)`.
    pub frontend: Option<String>,
    /// The backend its flow goes to: `address:port (id N)`.
    pub backend: Option<String>,
    /// Why that backend: conntrack, affinity or the Maglev slot.
    pub reason: Option<String>,
    /// The programs it went through, in order (XDP may hand over to TC).
    pub stages: Vec<Stage>,
}

/// Traces `req` through the datapath pinned under `bpffs`.
pub fn run(bpffs: &Path, req: &Request) -> Result<Report> {
    if req.proto != proto::TCP && req.proto != proto::UDP {
        bail!("only TCP and UDP can be traced");
    }
    if req.src.is_ipv4() != req.dst.is_ipv4() {
        bail!("--src and --dst must be of one family");
    }
    let live = Maps::open(bpffs)?;
    let mut shadow = Programs::load_shadow(bpffs)?;
    let (program, ifindex, dst_mac) = match &req.iface {
        Some(iface) => {
            let ifindex = programs::ifindex(iface)?;
            let program = programs::attached_program(bpffs, ifindex).with_context(|| {
                format!(
                    "the agent has no program on {iface} (no link pin for ifindex {ifindex} under {})",
                    bpffs::links_dir(bpffs).display()
                )
            })?;
            (program, Some(ifindex), iface_mac(iface).unwrap_or(MAC_B))
        }
        None => (TestProgram::TcPod, None, MAC_B),
    };
    let frame = build(req, dst_mac);
    let input = packet::summarize(&frame).context("the built packet reads back")?;

    // Seed the copy with what the live maps hold for this packet.
    let (saddr, family) = addr_be(req.src.ip());
    let (daddr, _) = addr_be(req.dst.ip());
    let ct_key = CtKey {
        saddr_be: saddr,
        daddr_be: daddr,
        sport_be: req.src.port().to_be(),
        dport_be: req.dst.port().to_be(),
        proto: req.proto,
        family,
        _pad: [0; 2],
    };
    // Established, else embryonic (a flow not established yet).
    let live_ct = live.conntrack.get(&ct_key, 0).ok();
    let live_embryo = live.ct_embryo.get(&ct_key, 0).ok();
    if let Some(v) = live_ct {
        conntrack(&mut shadow, lb_common::maps::CONNTRACK)?.insert(ct_key, v, 0)?;
    } else if let Some(v) = live_embryo {
        conntrack(&mut shadow, lb_common::maps::CT_EMBRYO)?.insert(ct_key, v, 0)?;
    }
    let live_ct = live_ct.or(live_embryo);
    let svc_key = ServiceKey {
        addr_be: daddr,
        port_be: req.dst.port().to_be(),
        proto: req.proto,
        family,
    };
    let svc = live.services.get(&svc_key, 0).ok();
    let aff_key = svc.map(|s| AffinityKey {
        svc_id: s.svc_id,
        family,
        _pad: [0; 3],
        client_be: saddr,
    });
    let live_affinity = match (svc, aff_key) {
        (Some(s), Some(k)) if s.affinity_timeout_s > 0 => live.affinity.get(&k, 0).ok(),
        _ => None,
    };
    if let (Some(k), Some(v)) = (aff_key, live_affinity) {
        affinity(&mut shadow)?.insert(k, v, 0)?;
    }

    let mut stages = vec![run_stage(&mut shadow, program, &frame, ifindex)?];
    // XDP hands packets it cannot finish to TC on the same interface, which
    // finds the conntrack entry XDP just made.
    if program == TestProgram::XdpNode && stages[0].outcome.contains(&"xdp_to_tc") {
        stages.push(run_stage(
            &mut shadow,
            TestProgram::TcNode,
            &frame,
            ifindex,
        )?);
    }

    let frontend = svc.map(|s| {
        let name = live
            .infos
            .get(&s.svc_id, 0)
            .map(|i| decode_info(&i).name)
            .unwrap_or_else(|_| format!("svc {}", s.svc_id));
        format!("{name} ({})", frontend_kinds(s.flags).join(", "))
    });
    let after = match conntrack(&mut shadow, lb_common::maps::CONNTRACK)?.get(&ct_key, 0) {
        Ok(v) => Some(v),
        Err(_) => conntrack(&mut shadow, lb_common::maps::CT_EMBRYO)?
            .get(&ct_key, 0)
            .ok(),
    };
    let backend = after
        .filter(|v| v.flags & lb_common::conntrack::CT_F_DNAT != 0)
        .map(|v| {
            let backend = socket_from_be(v.nat_daddr_be, family, v.nat_dport_be);
            format!("{backend} (id {})", v.backend_id)
        });
    let reason = explain(
        &live,
        &stages,
        &ct_key,
        svc.as_ref(),
        live_ct.as_ref(),
        live_affinity.as_ref(),
        after.as_ref(),
    );
    Ok(Report {
        input,
        iface: req.iface.clone(),
        frontend,
        backend,
        reason,
        stages,
    })
}

/// Why the flow got its backend, or what stopped it.
fn explain(
    live: &Maps,
    stages: &[Stage],
    key: &CtKey,
    svc: Option<&ServiceValue>,
    live_ct: Option<&CtValue>,
    live_affinity: Option<&AffinityValue>,
    after: Option<&CtValue>,
) -> Option<String> {
    let moved = |name: &str| stages.iter().any(|s| s.outcome.contains(&name));
    let now = monotonic_ns();
    if moved("ct_hit") {
        let idle = live_ct.map_or(0, |c| now.saturating_sub(c.last_seen_ns) / 1_000_000_000);
        return Some(format!(
            "conntrack: an established flow (idle {idle} s) keeps its backend"
        ));
    }
    if moved("new_flow") {
        let (svc, chosen) = (svc?, after?);
        if let Some(a) = live_affinity {
            let age = now.saturating_sub(a.last_seen_ns);
            if a.backend_id == chosen.backend_id
                && age <= u64::from(svc.affinity_timeout_s) * 1_000_000_000
            {
                return Some(format!(
                    "ClientIP affinity: this client's last new flow, {} s ago, went there \
                     (timeout {} s)",
                    age / 1_000_000_000,
                    svc.affinity_timeout_s
                ));
            }
        }
        let ports = (u32::from(key.sport_be) << 16) | u32::from(key.dport_be);
        let hash = flow_hash(&key.saddr_be, &key.daddr_be, ports, key.proto);
        return Some(maglev_reason(live, svc, "flow", hash, chosen.backend_id));
    }
    let notes = [
        (
            "pass_no_service",
            "no frontend has this address, port and protocol",
        ),
        (
            "drop_source_range",
            "the source is outside the loadBalancerSourceRanges",
        ),
        (
            "drop_no_local_endpoint",
            "Local traffic policy and no endpoint on this node",
        ),
        ("reject_no_endpoint", "the Service has no endpoint: refused"),
        ("backend_gone", "the flow's backend was removed"),
        ("pass_malformed", "the packet could not be parsed"),
    ];
    notes
        .iter()
        .find(|(c, _)| moved(c))
        .map(|(_, why)| (*why).to_string())
}

/// Why a new flow, or a socket, whose hash is `hash` got `backend_id`: an
/// affinity entry the run left (a fresh one that is not the Maglev choice)
/// or the Maglev slot.
fn maglev_reason(
    live: &Maps,
    svc: &ServiceValue,
    what: &str,
    hash: u32,
    backend_id: u32,
) -> String {
    let slot = hash % svc.slot_count.max(1);
    let table = live
        .table(svc.slot_base, svc.slot_count)
        .unwrap_or_default();
    let check = match table.get(slot as usize) {
        Some(id) if *id == backend_id => String::new(),
        Some(id) => format!(" (the live table now holds backend {id} there)"),
        None => " (the live table is shorter)".to_string(),
    };
    format!(
        "Maglev: {what} hash {hash:#010x} is slot {slot} of {}{check}",
        svc.slot_count
    )
}

/// Which socket hook to trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketCall {
    /// `connect()`: TCP, and UDP sockets that connect.
    Connect,
    /// `sendmsg()` of an unconnected UDP socket.
    Sendmsg,
}

/// A node socket's call to trace through the socket hooks.
#[derive(Clone, Debug)]
pub struct SocketRequest {
    /// The hook.
    pub call: SocketCall,
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// The address the socket is bound to; `None`: unbound (the node's).
    pub bound: Option<IpAddr>,
    /// The address and port it connects or sends to; an IPv6 address is
    /// an IPv6 socket's, whose IPv4-mapped destinations are IPv4 flows.
    pub dst: SocketAddr,
    /// The socket's cookie; `None`: a random one, as a new socket's.
    pub cookie: Option<u64>,
}

/// What `trace --socket` found.
#[derive(Clone, Debug, Serialize)]
pub struct SocketReport {
    /// The hook traced.
    pub call: SocketCall,
    /// The destination the socket asked for.
    pub dst: String,
    /// The client the decision used: the bound address or the node's.
    pub client: String,
    /// The socket cookie the Maglev hash mixed in.
    pub cookie: u64,
    /// `translated`, `refused` or `untouched`.
    pub verdict: &'static str,
    /// The error a refused call returns.
    pub errno: Option<&'static str>,
    /// The Service port matched: `namespace/name:port/PROTO`.
    pub frontend: Option<String>,
    /// The backend the socket talks to: `address:port (id N)`.
    pub backend: Option<String>,
    /// Why that backend, or why refused.
    pub reason: Option<String>,
}

/// Traces a node socket's `connect` or `sendmsg` through the socket hooks'
/// own decision, on a private copy of the datapath under `bpffs`
/// (`lb_sock_trace`; nothing live changes, and no packet is sent).
pub fn run_socket(bpffs: &Path, req: &SocketRequest) -> Result<SocketReport> {
    use lb_common::sock::{TraceRequest, TraceResult, TRACE_REFUSED, TRACE_TRANSLATED};
    if req.proto != proto::TCP && req.proto != proto::UDP {
        bail!("only TCP and UDP sockets are translated");
    }
    if req.call == SocketCall::Sendmsg && req.proto != proto::UDP {
        bail!("only UDP sockets send unconnected datagrams (--socket sendmsg)");
    }
    let live = Maps::open(bpffs)?;
    let mut shadow = Programs::load_shadow(bpffs)?;
    if req.bound.is_some_and(|b| b.is_ipv4() != req.dst.is_ipv4()) {
        bail!("--src and --dst must be of one family (an IPv6 socket bound to an IPv4 address gives it mapped: [::ffff:10.0.0.1])");
    }
    let cookie = req.cookie.unwrap_or_else(random_cookie);
    // What the socket's own family carries, as the hook reads it…
    let (dst_raw, family_raw) = addr_be(req.dst.ip());
    let bound_raw = req.bound.map_or([0; 4], |a| addr_be(a).0);
    // …and the flow it is: an IPv4-mapped destination is an IPv4 one, and
    // a bound address only counts when it is of the flow's family.
    let dst_ip = unmapped(req.dst.ip());
    let (dst, family) = addr_be(dst_ip);
    let bound = req
        .bound
        .map(unmapped)
        .filter(|b| b.is_ipv4() == dst_ip.is_ipv4())
        .map_or([0; 4], |a| addr_be(a).0);
    // The client an unbound socket is taken for: the node's address, from
    // the live config (as the hook reads it).
    let node = live
        .config
        .get(&0, 0)
        .ok()
        .and_then(|c| c.node_addr(family))
        .unwrap_or([0; 4]);
    let client = if bound == [0; 4] { node } else { bound };
    let t = lb_common::Tuple {
        saddr_be: client,
        daddr_be: dst,
        sport_be: 0,
        dport_be: req.dst.port().to_be(),
        proto: req.proto,
        family,
        _pad: [0; 2],
    };
    // The hooks look up the in-cluster twin first, as pods do.
    let svc = [true, false].iter().find_map(|&twin| {
        let mut key = t.frontend();
        if twin {
            key.family |= lb_common::service::KEY_F_IN_CLUSTER;
        }
        live.services.get(&key, 0).ok()
    });
    let aff_key = svc.map(|s| AffinityKey {
        svc_id: s.svc_id,
        family,
        _pad: [0; 3],
        client_be: client,
    });
    let live_affinity = match (svc, aff_key) {
        (Some(s), Some(k)) if s.affinity_timeout_s > 0 => live.affinity.get(&k, 0).ok(),
        _ => None,
    };
    if let (Some(k), Some(v)) = (aff_key, live_affinity) {
        affinity(&mut shadow)?.insert(k, v, 0)?;
    }

    let input = TraceRequest {
        cookie,
        dst_be: dst_raw,
        client_be: bound_raw,
        dst_port_be: req.dst.port().to_be(),
        proto: req.proto,
        family: family_raw,
        connect: u8::from(req.call == SocketCall::Connect),
        _pad: [0; 3],
    };
    let (_, out) = shadow.test_run_on(TestProgram::SockTrace, &input.frame(), None)?;
    let result = TraceResult::from_frame(&out).context("lb_sock_trace wrote no result")?;

    let name = |svc_id: u32| {
        live.infos
            .get(&svc_id, 0)
            .map(|i| decode_info(&i).name)
            .unwrap_or_else(|_| format!("svc {svc_id}"))
    };
    let frontend = (result.svc_id != 0).then(|| name(result.svc_id));
    let (verdict, errno, backend, reason) = match result.verdict {
        TRACE_TRANSLATED => {
            let backend = socket_from_be(result.addr_be, result.family, result.port_be);
            let why = svc.map(|s| {
                match live_affinity.filter(|a| {
                    a.backend_id == result.backend_id
                        && monotonic_ns().saturating_sub(a.last_seen_ns)
                            <= u64::from(s.affinity_timeout_s) * 1_000_000_000
                }) {
                    Some(_) => format!(
                        "ClientIP affinity: {} was last sent to this backend (timeout {} s)",
                        addr_from_be(client, family),
                        s.affinity_timeout_s
                    ),
                    None => maglev_reason(
                        &live,
                        &s,
                        "socket",
                        lb_common::sock::sock_hash(&t, cookie),
                        result.backend_id,
                    ),
                }
            });
            (
                "translated",
                None,
                Some(format!("{backend} (id {})", result.backend_id)),
                why,
            )
        }
        TRACE_REFUSED => {
            let (errno, why) = match result.errno {
                1 => (
                    "EPERM",
                    "the client is outside the loadBalancerSourceRanges",
                ),
                _ if result.svc_id == 0 => {
                    ("ECONNREFUSED", "a ClusterIP on a port no Service uses")
                }
                _ => ("ECONNREFUSED", "the Service has no endpoint to take it"),
            };
            ("refused", Some(errno), None, Some(why.to_string()))
        }
        _ => (
            "untouched",
            None,
            None,
            Some("no frontend has this address, port and protocol".to_string()),
        ),
    };
    Ok(SocketReport {
        call: req.call,
        dst: req.dst.to_string(),
        client: addr_from_be(client, family).to_string(),
        cookie,
        verdict,
        errno,
        frontend,
        backend,
        reason,
    })
}

/// The IPv4 address an IPv4-mapped IPv6 one carries; any other as it is.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A cookie for a socket that does not exist yet: random, as the kernel's
/// are unknowable before the socket is made.
fn random_cookie() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(monotonic_ns());
    h.finish()
}

/// Renders a socket report for people.
pub fn socket_table(r: &SocketReport) -> String {
    let mut s = String::new();
    let call = match r.call {
        SocketCall::Connect => "connect",
        SocketCall::Sendmsg => "sendmsg",
    };
    let _ = writeln!(
        s,
        "socket    {call} to {} from {} (cookie {:#x})",
        r.dst, r.client, r.cookie
    );
    let verdict = match r.errno {
        Some(e) => format!("{} ({e})", r.verdict),
        None => r.verdict.to_string(),
    };
    let _ = writeln!(s, "verdict   {verdict}");
    let _ = writeln!(s, "frontend  {}", r.frontend.as_deref().unwrap_or("none"));
    let _ = writeln!(s, "backend   {}", r.backend.as_deref().unwrap_or("none"));
    if let Some(why) = &r.reason {
        let _ = writeln!(s, "why       {why}");
    }
    s
}

/// Runs one program on the copy and reads which counters moved.
fn run_stage(
    shadow: &mut Programs,
    program: TestProgram,
    frame: &[u8],
    ifindex: Option<u32>,
) -> Result<Stage> {
    let before = counters(shadow)?;
    let (code, out) = shadow.test_run_on(program, frame, ifindex)?;
    let after = counters(shadow)?;
    let outcome = lb_common::stats::NAMES
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a.packets > b.packets)
        .map(|(n, _)| *n)
        .collect();
    let xdp = program == TestProgram::XdpNode;
    Ok(Stage {
        program: program.name(),
        verdict: verdict_name(xdp, code),
        outcome,
        output: packet::summarize(&out),
        output_hex: out.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        }),
    })
}

/// Names a program's return code.
fn verdict_name(xdp: bool, code: u32) -> String {
    let name = match (xdp, code) {
        (true, 0) => "XDP_ABORTED",
        (true, 1) => "XDP_DROP",
        (true, 2) => "XDP_PASS",
        (true, 3) => "XDP_TX (back out the interface)",
        (true, 4) => "XDP_REDIRECT",
        (false, 0) => "TC_ACT_OK (pass)",
        (false, 2) => "TC_ACT_SHOT (drop)",
        (false, 7) => "TC_ACT_REDIRECT",
        _ => return format!("{code}"),
    };
    name.to_string()
}

/// Sums the copy's per-CPU counters.
fn counters(shadow: &mut Programs) -> Result<Vec<Counter>> {
    let map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(shadow.map_mut(lb_common::maps::STATS)?)?;
    (0..lb_common::stats::COUNT)
        .map(|i| {
            let per_cpu = map.get(&i, 0).context("read the copy's counters")?;
            Ok(per_cpu.iter().fold(Counter::default(), |s, c| Counter {
                packets: s.packets + c.packets,
                bytes: s.bytes + c.bytes,
            }))
        })
        .collect()
}

/// The shadow's conntrack map `name` (established or embryonic).
fn conntrack<'a>(
    shadow: &'a mut Programs,
    name: &str,
) -> Result<HashMap<&'a mut aya::maps::MapData, CtKey, CtValue>> {
    Ok(HashMap::try_from(shadow.map_mut(name)?)?)
}

fn affinity(
    shadow: &mut Programs,
) -> Result<HashMap<&mut aya::maps::MapData, AffinityKey, AffinityValue>> {
    Ok(HashMap::try_from(
        shadow.map_mut(lb_common::maps::AFFINITY)?,
    )?)
}

/// The interface's MAC, so the packet looks addressed to it (read through
/// getifaddrs, which answers for this network namespace whatever /sys shows).
fn iface_mac(iface: &str) -> Option<[u8; 6]> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address?.as_link_addr()?.addr())
}

/// The frame `req` describes, of its addresses' family.
fn build(req: &Request, dst_mac: [u8; 6]) -> Vec<u8> {
    // The builder's IPv4 addresses are placeholders for an IPv6 frame,
    // which takes the L4 part and the MACs from it.
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, a.port()),
    };
    let mut p = if req.proto == proto::TCP {
        Packet::tcp(v4(req.src), v4(req.dst), req.tcp_flags, b"")
    } else {
        Packet::udp(v4(req.src), v4(req.dst), b"lb-agent trace")
    };
    p.src_mac = MAC_A;
    p.dst_mac = dst_mac;
    match (req.src, req.dst) {
        (SocketAddr::V6(src), SocketAddr::V6(dst)) => packet::ipv6_frame(&p, src, dst),
        _ => p.bytes(),
    }
}

/// Parses TCP flags given as letters (`S`, `SA`, `A`, `F`, `R`, `P`).
pub fn parse_tcp_flags(s: &str) -> Result<u8, String> {
    s.chars().try_fold(0u8, |acc, c| {
        let bit = match c.to_ascii_uppercase() {
            'S' => packet::flags::SYN,
            'A' => packet::flags::ACK,
            'F' => packet::flags::FIN,
            'R' => packet::flags::RST,
            'P' => packet::flags::PSH,
            _ => return Err(format!("{c:?} is not a TCP flag (S, A, F, R, P)")),
        };
        Ok(acc | bit)
    })
}

/// Renders a report for people.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "packet    {}", r.input);
    if let Some(i) = &r.iface {
        let _ = writeln!(s, "arrives   on {i}");
    }
    for st in &r.stages {
        let _ = writeln!(s, "program   {}: {}", st.program, st.verdict);
        let _ = writeln!(s, "  outcome {}", st.outcome.join(", "));
        if let Some(o) = &st.output {
            let _ = writeln!(s, "  leaves  {o}");
        }
    }
    let _ = writeln!(s, "frontend  {}", r.frontend.as_deref().unwrap_or("none"));
    let _ = writeln!(s, "backend   {}", r.backend.as_deref().unwrap_or("none"));
    if let Some(why) = &r.reason {
        let _ = writeln!(s, "why       {why}");
    }
    s
}
