//! Human and JSON views of what the maps hold (`lb-agent services`).

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::{Context as _, Result};
use lb_common::{
    addr::{addr_from_be, socket_from_be},
    service::{
        BACKEND_F_LOCAL, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL, SVC_F_LOAD_BALANCER, SVC_F_NODEPORT,
        SVC_F_SRC_RANGES,
    },
};
use serde::Serialize;

use crate::{datapath::maps::Maps, reconcile::protocol_of};

/// One Service port as the maps hold it.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    /// Internal id.
    pub svc_id: u32,
    /// `namespace/name:port/PROTO`, or empty if the name map lacks it.
    pub name: String,
    /// Frontends with their kind.
    pub frontends: Vec<FrontendView>,
    /// Backends in slot order.
    pub backends: Vec<BackendView>,
}

/// One frontend.
#[derive(Debug, Serialize)]
pub struct FrontendView {
    /// `addr:port/proto`.
    pub frontend: String,
    /// Kinds (`ClusterIP`, `NodePort`, `External`).
    pub kinds: Vec<&'static str>,
    /// Size of the Maglev table behind it (0: no endpoint).
    pub table_size: u32,
}

/// One backend.
#[derive(Debug, Serialize)]
pub struct BackendView {
    /// Backend id.
    pub id: u32,
    /// `addr:port`.
    pub address: String,
    /// Runs on this node.
    pub local: bool,
    /// Slots of the Maglev table it owns.
    pub slots: u32,
}

/// The protocol a map key names, as Kubernetes spells it.
fn proto_name(p: u8) -> &'static str {
    protocol_of(p).map_or("?", |p| p.as_str())
}

/// Reads the maps into views, ordered by name.
pub fn services(maps: &Maps) -> Result<Vec<ServiceView>> {
    let snap = maps.snapshot()?;
    let mut by_id: BTreeMap<u32, ServiceView> = BTreeMap::new();
    // Address-only keys (ClusterIPs as a whole) belong to no Service port.
    for (key, value) in snap.services.iter().filter(|(k, _)| !k.is_address_only()) {
        if let std::collections::btree_map::Entry::Vacant(entry) = by_id.entry(value.svc_id) {
            // Backends in the order of their first slot, with their share.
            let mut slots: Vec<(u32, u32)> = Vec::new();
            let (base, count) = value.slots.map_or((0, 0), |s| (s.table.raw(), s.count));
            for id in maps.table(base, count)? {
                match slots.iter_mut().find(|(b, _)| *b == id) {
                    Some((_, n)) => *n += 1,
                    None => slots.push((id, 1)),
                }
            }
            let backends = slots
                .iter()
                .filter_map(|(id, n)| {
                    let b = snap.backends.get(id)?;
                    Some(BackendView {
                        id: *id,
                        address: socket(b.addr_be, b.family, b.port_be),
                        local: b.flags & BACKEND_F_LOCAL != 0,
                        slots: *n,
                    })
                })
                .collect();
            entry.insert(ServiceView {
                svc_id: value.svc_id,
                name: snap
                    .infos
                    .get(&value.svc_id)
                    .map(|i| i.name.clone())
                    .unwrap_or_default(),
                frontends: Vec::new(),
                backends,
            });
        }
        let mut kinds = frontend_kinds(value.flags);
        if key.is_in_cluster() {
            // The twin pods and the node itself take under a Local policy.
            kinds.push("in-cluster");
        }
        let addr = socket_from_be(key.addr_be, key.addr_family(), key.port_be);
        if let Some(view) = by_id.get_mut(&value.svc_id) {
            view.frontends.push(FrontendView {
                frontend: format!("{addr}/{}", proto_name(key.proto)),
                kinds,
                table_size: value.slots.map_or(0, |s| s.count),
            });
        }
    }
    let mut out: Vec<ServiceView> = by_id.into_values().collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.svc_id.cmp(&b.svc_id)));
    Ok(out)
}

/// Renders views as a table: one line per frontend, backends indented below.
pub fn services_table(views: &[ServiceView]) -> String {
    let mut s = String::new();
    for v in views {
        let _ = writeln!(
            s,
            "{} (id {}, {} backends)",
            if v.name.is_empty() { "?" } else { &v.name },
            v.svc_id,
            v.backends.len()
        );
        for f in &v.frontends {
            let _ = writeln!(s, "  frontend {:<28} {}", f.frontend, f.kinds.join(","));
        }
        if v.backends.is_empty() {
            let _ = writeln!(s, "  (no ready endpoint: new connections are refused)");
        }
        for b in &v.backends {
            let _ = writeln!(
                s,
                "  backend  {:<28} {:<7} {} slots",
                b.address,
                if b.local { "local" } else { "remote" },
                b.slots
            );
        }
    }
    s
}

/// One datapath counter.
#[derive(Debug, Serialize)]
pub struct CounterView {
    /// Counter name.
    pub name: &'static str,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// One Service port's counters.
#[derive(Debug, Serialize)]
pub struct ServiceStatsView {
    /// Service port id.
    pub svc_id: u32,
    /// `namespace/name:port/PROTO`.
    pub name: String,
    /// Packets of its flows, both directions.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// Flows opened.
    pub new_flows: u64,
    /// Packets that reached no backend (dropped or refused).
    pub drops: u64,
}

/// The datapath counters: by outcome, and by Service port.
#[derive(Debug, Serialize)]
pub struct StatsView {
    /// Counters by outcome (drop reasons among them), summed over CPUs.
    pub counters: Vec<CounterView>,
    /// Counters by Service port, summed over CPUs.
    pub services: Vec<ServiceStatsView>,
    /// Socket-hook events by name (`sock_translated`, …), summed over
    /// CPUs; empty without socket hooks.
    pub sockets: Vec<SocketCounterView>,
}

/// One socket-hook counter.
#[derive(Debug, Serialize)]
pub struct SocketCounterView {
    /// Its name.
    pub name: &'static str,
    /// Events counted.
    pub events: u64,
}

/// Adds the socket-hook counters pinned under `bpffs` to `view`.
pub fn with_socket_counters(mut view: StatsView, bpffs: &std::path::Path) -> Result<StatsView> {
    view.sockets = crate::datapath::cgroup::counters(bpffs)?
        .into_iter()
        .map(|(name, events)| SocketCounterView { name, events })
        .collect();
    Ok(view)
}

/// Reads the counters, summed over CPUs.
pub fn stats(maps: &Maps) -> Result<StatsView> {
    let counters = maps
        .counters()?
        .into_iter()
        .map(|(name, c)| CounterView {
            name,
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    let services = maps
        .service_counters()?
        .into_iter()
        .map(|(svc_id, name, c)| ServiceStatsView {
            svc_id,
            name,
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            drops: c.drops,
        })
        .collect();
    Ok(StatsView {
        counters,
        services,
        sockets: Vec::new(),
    })
}

/// Renders counters as two tables: by outcome, then by Service port.
pub fn stats_table(v: &StatsView) -> String {
    let mut s = format!("{:<24} {:>12} {:>14}\n", "COUNTER", "PACKETS", "BYTES");
    for c in &v.counters {
        let _ = writeln!(s, "{:<24} {:>12} {:>14}", c.name, c.packets, c.bytes);
    }
    let _ = writeln!(
        s,
        "\n{:<40} {:>12} {:>14} {:>10} {:>10}",
        "SERVICE", "PACKETS", "BYTES", "NEW FLOWS", "DROPS"
    );
    for c in &v.services {
        let _ = writeln!(
            s,
            "{:<40} {:>12} {:>14} {:>10} {:>10}",
            c.name, c.packets, c.bytes, c.new_flows, c.drops
        );
    }
    if !v.sockets.is_empty() {
        let _ = writeln!(s, "\n{:<24} {:>12}", "SOCKET HOOKS", "EVENTS");
        for c in &v.sockets {
            let _ = writeln!(s, "{:<24} {:>12}", c.name, c.events);
        }
    }
    s
}

fn socket(addr: lb_common::IpAddrBe, family: u8, port_be: u16) -> String {
    socket_from_be(addr, family, port_be).to_string()
}

/// Every backend in the backends map, by id.
pub fn backends(maps: &Maps) -> Result<Vec<BackendView>> {
    let snap = maps.snapshot()?;
    Ok(snap
        .backends
        .iter()
        .map(|(id, b)| BackendView {
            id: *id,
            address: socket(b.addr_be, b.family, b.port_be),
            local: b.flags & BACKEND_F_LOCAL != 0,
            slots: 0,
        })
        .collect())
}

/// Renders backends as a table.
pub fn backends_table(v: &[BackendView]) -> String {
    let mut s = format!("{:>6}  {:<28} {}\n", "ID", "ADDRESS", "WHERE");
    for b in v {
        let _ = writeln!(
            s,
            "{:>6}  {:<28} {}",
            b.id,
            b.address,
            if b.local { "local" } else { "remote" }
        );
    }
    s
}

/// Which flows `conntrack` prints.
#[derive(Debug, Default)]
pub struct FlowFilter {
    /// An address on either side, before or after translation.
    pub addr: Option<std::net::IpAddr>,
    /// A port on either side, before or after translation.
    pub port: Option<u16>,
    /// A Service port by name or id.
    pub service: Option<String>,
}

/// One conntrack entry.
#[derive(Debug, Serialize)]
pub struct FlowView {
    /// `established` or `embryonic` (docs/architecture.md, Connection
    /// tracking).
    pub state: &'static str,
    /// The map the entry is in (`LB_CT_V1` or `LB_CT_EMBRYO_V1`).
    pub map: &'static str,
    /// `forward` (client side) or `reply` (backend side).
    pub direction: &'static str,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// Source as on the wire.
    pub src: String,
    /// Destination as on the wire.
    pub dst: String,
    /// Source after translation.
    pub new_src: String,
    /// Destination after translation.
    pub new_dst: String,
    /// Service port id.
    pub svc_id: u32,
    /// Backend id.
    pub backend_id: u32,
    /// A FIN or RST was seen.
    pub closing: bool,
    /// Seconds since the entry was last refreshed (refreshed at most once a second).
    pub idle_s: u64,
}

/// Reads both conntrack maps (established flows, then embryonic ones),
/// keeping the flows `filter` selects.
pub fn conntrack(maps: &Maps, filter: &FlowFilter) -> Result<Vec<FlowView>> {
    use lb_common::conntrack::{CT_F_CLOSING, CT_F_DNAT, CT_F_REPLY, CT_F_SNAT};
    let svc_id = match &filter.service {
        Some(s) => Some(service_id(maps, s)?),
        None => None,
    };
    let now = monotonic_ns();
    let mut out = Vec::new();
    let both = [
        ("established", lb_common::maps::CONNTRACK, &maps.conntrack),
        ("embryonic", lb_common::maps::CT_EMBRYO, &maps.ct_embryo),
    ];
    let entries = both
        .into_iter()
        .flat_map(|(state, name, map)| map.iter().map(move |e| (state, name, e)));
    for (state, map, entry) in entries {
        let (k, v) = entry.with_context(|| format!("read conntrack map {map}"))?;
        if svc_id.is_some_and(|id| id != v.svc_id) {
            continue;
        }
        let (new_src, new_sport) = if v.flags & CT_F_SNAT != 0 {
            (v.nat_saddr_be, v.nat_sport_be)
        } else {
            (k.saddr_be, k.sport_be)
        };
        let (new_dst, new_dport) = if v.flags & CT_F_DNAT != 0 {
            (v.nat_daddr_be, v.nat_dport_be)
        } else {
            (k.daddr_be, k.dport_be)
        };
        let addrs = [k.saddr_be, k.daddr_be, new_src, new_dst].map(|a| addr_from_be(a, k.family));
        let ports = [k.sport_be, k.dport_be, new_sport, new_dport].map(u16::from_be);
        if filter.addr.is_some_and(|a| !addrs.contains(&a))
            || filter.port.is_some_and(|p| !ports.contains(&p))
        {
            continue;
        }
        out.push(FlowView {
            state,
            map,
            direction: if v.flags & CT_F_REPLY != 0 {
                "reply"
            } else {
                "forward"
            },
            protocol: proto_name(k.proto),
            src: socket(k.saddr_be, k.family, k.sport_be),
            dst: socket(k.daddr_be, k.family, k.dport_be),
            new_src: socket(new_src, k.family, new_sport),
            new_dst: socket(new_dst, k.family, new_dport),
            svc_id: v.svc_id,
            backend_id: v.backend_id,
            closing: v.flags & CT_F_CLOSING != 0,
            idle_s: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        });
    }
    out.sort_by(|a, b| (a.svc_id, &a.src, &a.dst, a.map).cmp(&(b.svc_id, &b.src, &b.dst, b.map)));
    Ok(out)
}

/// Renders flows as a table.
pub fn conntrack_table(v: &[FlowView]) -> String {
    let mut s = format!(
        "{:<8} {:<5} {:<22} {:<22} {:<22} {:<22} {:>4} {:>6}\n",
        "DIR", "PROTO", "SRC", "DST", "NEW SRC", "NEW DST", "SVC", "IDLE"
    );
    for f in v {
        let _ = writeln!(
            s,
            "{:<8} {:<5} {:<22} {:<22} {:<22} {:<22} {:>4} {:>5}s{}",
            f.direction,
            f.protocol,
            f.src,
            f.dst,
            f.new_src,
            f.new_dst,
            f.svc_id,
            f.idle_s,
            match (f.state, f.closing) {
                ("embryonic", true) => " embryonic closing",
                ("embryonic", false) => " embryonic",
                (_, true) => " closing",
                _ => "",
            }
        );
    }
    s
}

/// A Service port's Maglev table.
#[derive(Debug, Serialize)]
pub struct MaglevView {
    /// Service port name.
    pub service: String,
    /// Service port id.
    pub svc_id: u32,
    /// Backends with the number of slots each owns, in order of first slot.
    pub shares: Vec<BackendView>,
    /// Every slot's backend id.
    pub table: Vec<u32>,
}

/// Reads one Service port's Maglev table.
pub fn maglev(maps: &Maps, service: &str) -> Result<MaglevView> {
    let svc_id = service_id(maps, service)?;
    let snap = maps.snapshot()?;
    let table = maps.service_table(&snap, svc_id)?;
    let mut shares: Vec<BackendView> = Vec::new();
    for id in &table {
        match shares.iter_mut().find(|b| b.id == *id) {
            Some(b) => b.slots += 1,
            None => {
                let (address, local) =
                    snap.backends.get(id).map_or(("?".to_string(), false), |b| {
                        (
                            socket(b.addr_be, b.family, b.port_be),
                            b.flags & BACKEND_F_LOCAL != 0,
                        )
                    });
                shares.push(BackendView {
                    id: *id,
                    address,
                    local,
                    slots: 1,
                });
            }
        }
    }
    Ok(MaglevView {
        service: snap
            .infos
            .get(&svc_id)
            .map(|i| i.name.clone())
            .unwrap_or_default(),
        svc_id,
        shares,
        table,
    })
}

/// Renders a Maglev table as its backends' shares.
pub fn maglev_table(v: &MaglevView) -> String {
    let mut s = format!("{} (id {}): {} slots\n", v.service, v.svc_id, v.table.len());
    for b in &v.shares {
        let pct = 100.0 * f64::from(b.slots) / v.table.len().max(1) as f64;
        let _ = writeln!(s, "  {:<28} {:>7} slots {:>6.2}%", b.address, b.slots, pct);
    }
    s
}

/// Resolves a Service port given by id or by the name `services` prints.
fn service_id(maps: &Maps, service: &str) -> Result<u32> {
    if let Ok(id) = service.parse::<u32>() {
        return Ok(id);
    }
    let snap = maps.snapshot()?;
    snap.infos
        .iter()
        .find(|(_, i)| i.name == service)
        .map(|(id, _)| *id)
        .ok_or_else(|| {
            anyhow::anyhow!("no Service port named {service:?}; `lb-agent services` lists them")
        })
}

/// The names of a frontend's `SVC_F_` flags.
pub fn frontend_kinds(flags: u32) -> Vec<&'static str> {
    [
        (SVC_F_CLUSTER_IP, "ClusterIP"),
        (SVC_F_NODEPORT, "NodePort"),
        (SVC_F_EXTERNAL, "External"),
        (SVC_F_LOAD_BALANCER, "LoadBalancer"),
        (SVC_F_SRC_RANGES, "SourceRanges"),
    ]
    .iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| *n)
    .collect()
}

/// `bpf_ktime_get_ns`'s clock.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}
