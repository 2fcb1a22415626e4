//! Human and JSON views of what the maps hold (`lb-agent services`).

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Result;
use lb_common::{
    proto,
    service::{BACKEND_F_LOCAL, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL, SVC_F_NODEPORT},
    SlotKey,
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
    /// Active slot-table generation.
    pub generation: u32,
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
        let view = by_id.entry(value.svc_id).or_insert_with(|| {
            let backends = (0..value.slot_count)
                .filter_map(|index| {
                    let slot = SlotKey {
                        svc_id: value.svc_id,
                        generation: value.generation,
                        index,
                    };
                    let id = snap.slot(&slot)?;
                    let b = snap.backends.get(&id)?;
                    Some(BackendView {
                        id,
                        address: std::net::SocketAddr::new(
                            addr_from_be(b.addr_be, b.family),
                            u16::from_be(b.port_be),
                        )
                        .to_string(),
                        local: b.flags & BACKEND_F_LOCAL != 0,
                    })
                })
                .collect();
            ServiceView {
                svc_id: value.svc_id,
                name: snap.names.get(&value.svc_id).cloned().unwrap_or_default(),
                frontends: Vec::new(),
                backends,
            }
        });
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
        view.frontends.push(FrontendView {
            frontend: format!("{addr}/{}", proto_name(key.proto)),
            kinds,
            generation: value.generation,
        });
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
                "  backend  {:<28} {}",
                b.address,
                if b.local { "local" } else { "remote" }
            );
        }
    }
    s
}
