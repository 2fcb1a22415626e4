//! Human and JSON views of what the maps hold (`lb-agent services`).

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Result;
use lb_common::{
    proto,
    service::{BACKEND_F_LOCAL, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL, SVC_F_NODEPORT},
};
use serde::Serialize;

use crate::{datapath::maps::Maps, reconcile::addr_from_be};

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

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        _ => "?",
    }
}

/// Reads the maps into views, ordered by name.
pub fn services(maps: &Maps) -> Result<Vec<ServiceView>> {
    let snap = maps.snapshot()?;
    let mut by_id: BTreeMap<u32, ServiceView> = BTreeMap::new();
    for (key, value) in &snap.services {
        if let std::collections::btree_map::Entry::Vacant(entry) = by_id.entry(value.svc_id) {
            // Backends in the order of their first slot, with their share.
            let mut slots: Vec<(u32, u32)> = Vec::new();
            for id in maps.table(value.svc_id)? {
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
                        address: std::net::SocketAddr::new(
                            addr_from_be(b.addr_be, b.family),
                            u16::from_be(b.port_be),
                        )
                        .to_string(),
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
        let kinds = [
            (SVC_F_CLUSTER_IP, "ClusterIP"),
            (SVC_F_NODEPORT, "NodePort"),
            (SVC_F_EXTERNAL, "External"),
        ]
        .iter()
        .filter(|(f, _)| value.flags & f != 0)
        .map(|(_, n)| *n)
        .collect();
        let addr = std::net::SocketAddr::new(
            addr_from_be(key.addr_be, key.family),
            u16::from_be(key.port_be),
        );
        if let Some(view) = by_id.get_mut(&value.svc_id) {
            view.frontends.push(FrontendView {
                frontend: format!("{addr}/{}", proto_name(key.proto)),
                kinds,
                table_size: value.slot_count,
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
