//! Lowering the model to the map-level picture: which tables each Service
//! port needs, with their frontends as the datapath keys and flags them,
//! their backends and their source ranges.
//!
//! Pure: the reconciler diffs what this returns against what it wrote.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    addr::addr_be,
    proto,
    service::{
        BACKEND_F_LOCAL, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL, SVC_F_LOAD_BALANCER, SVC_F_LOCAL_ONLY,
        SVC_F_NODEPORT, SVC_F_SRC_RANGES,
    },
    Backend, ServiceKey,
};

use super::{Family, Range, Scope, TableId};
use crate::model::{Endpoint, FrontendKind, Model, Protocol, ServicePort, ServicePortRef};

/// What the maps should hold for one table of a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DesiredService {
    /// Frontends with their `SVC_F_*` flags.
    pub frontends: BTreeMap<ServiceKey, u32>,
    /// Backends that take new flows.
    pub backends: Vec<Backend>,
    /// Terminating backends: kept in the backends map so that their
    /// established flows go on, but in no table, so they get no new flows.
    pub draining: Vec<Backend>,
    /// ClientIP affinity timeout in seconds (0: none).
    pub affinity_timeout_s: u32,
    /// Source ranges guarding the LoadBalancer frontends.
    pub ranges: BTreeSet<Range>,
}

/// The IP protocol number the datapath keys a protocol by.
pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
        Protocol::Sctp => proto::SCTP,
    }
}

/// The protocol an IP protocol number in a map stands for.
pub fn protocol_of(number: u8) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .find(|p| proto_number(*p) == number)
}

/// The `SVC_F_*` bits of a frontend kind.
fn kind_flags(k: FrontendKind) -> u32 {
    match k {
        FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
        FrontendKind::NodePort => SVC_F_NODEPORT,
        FrontendKind::External => SVC_F_EXTERNAL,
        FrontendKind::LoadBalancer => SVC_F_EXTERNAL | SVC_F_LOAD_BALANCER,
    }
}

/// The map-level picture of the model, by table (see [`TableId`]).
pub(super) fn desired(model: &Model) -> BTreeMap<TableId, DesiredService> {
    model
        .services
        .iter()
        .flat_map(|(r, sp)| desired_for(r, sp))
        .collect()
}

/// The tables of one Service port (see [`desired`]); none for SCTP, which
/// the model carries and the reconciler reports as not programmed.
pub(super) fn desired_for(r: &ServicePortRef, sp: &ServicePort) -> Vec<(TableId, DesiredService)> {
    let mut out = Vec::new();
    if r.protocol == Protocol::Sctp {
        return out;
    }
    let p = proto_number(r.protocol);
    // Frontends by scope: false = all endpoints, true = local ones.
    let mut scopes: [BTreeMap<ServiceKey, u32>; 2] = [BTreeMap::new(), BTreeMap::new()];
    for f in &sp.frontends {
        let local = match f.kind {
            FrontendKind::ClusterIp => sp.internal_local,
            FrontendKind::NodePort | FrontendKind::External | FrontendKind::LoadBalancer => {
                sp.external_local
            }
        };
        let (addr, fam) = addr_be(f.addr);
        let key = ServiceKey {
            addr_be: addr,
            port_be: f.port.to_be(),
            proto: p,
            family: fam,
        };
        let mut flags = kind_flags(f.kind) | if local { SVC_F_LOCAL_ONLY } else { 0 };
        // The ranges guard the load balancer's addresses only, as in kube-proxy.
        if f.kind == FrontendKind::LoadBalancer && !sp.source_ranges.is_empty() {
            flags |= SVC_F_SRC_RANGES;
        }
        *scopes[usize::from(local)].entry(key).or_insert(0) |= flags;
    }
    let backend = |e: &&Endpoint| {
        let (addr, fam) = addr_be(e.addr);
        Backend {
            addr_be: addr,
            port_be: e.port.to_be(),
            family: fam,
            flags: if e.local { BACKEND_F_LOCAL } else { 0 },
        }
    };
    let ranges: BTreeSet<Range> = sp
        .source_ranges
        .iter()
        .map(|c| {
            let (addr, fam) = addr_be(c.addr);
            (addr, fam, c.prefix)
        })
        .collect();
    for (local, frontends) in scopes.into_iter().enumerate() {
        let local = local == 1;
        // One table per address family: the datapath rewrites addresses
        // in place, so an IPv4 frontend may only lead to IPv4 backends.
        let mut by_family: BTreeMap<u8, BTreeMap<ServiceKey, u32>> = BTreeMap::new();
        for (key, flags) in frontends {
            by_family.entry(key.family).or_default().insert(key, flags);
        }
        for (fam, frontends) in by_family {
            let same_family = |e: &&&Endpoint| addr_be(e.addr).1 == fam;
            let active = sp.active_in(local);
            let draining = sp.draining_in(local);
            let id = TableId::new(
                r.clone(),
                if local { Scope::Local } else { Scope::Cluster },
                if fam == lb_common::family::V6 {
                    Family::V6
                } else {
                    Family::V4
                },
            );
            out.push((
                id,
                DesiredService {
                    frontends,
                    backends: active.iter().filter(same_family).map(backend).collect(),
                    draining: draining.iter().filter(same_family).map(backend).collect(),
                    affinity_timeout_s: sp.affinity_timeout_s,
                    ranges: ranges.clone(),
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_numbers_read_back() {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_eq!(protocol_of(proto_number(p)), Some(p));
        }
        assert_eq!(protocol_of(1), None);
    }
}
