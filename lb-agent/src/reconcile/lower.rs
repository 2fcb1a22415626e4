//! Lowering the model to the map-level picture: which tables each Service
//! port needs, with their frontends as the datapath keys and flags them,
//! their backends and their source ranges.
//!
//! Under `externalTrafficPolicy: Local` a NodePort, externalIP or
//! LoadBalancer frontend is in the `@local` table, and its in-cluster twin
//! key (`lb_common::service::KEY_F_IN_CLUSTER`) in the table of every
//! endpoint, which therefore exists whenever the port takes outside
//! traffic, as kube-proxy keeps its cluster endpoints for that case.
//!
//! Pure: the reconciler diffs what this returns against what it wrote.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    addr::addr_be,
    proto,
    service::{
        BACKEND_F_LOCAL, BACKEND_F_NOT_SERVING, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL,
        SVC_F_LOAD_BALANCER, SVC_F_LOCAL_ONLY, SVC_F_NODEPORT, SVC_F_REMOTE_ENDPOINTS,
        SVC_F_SRC_RANGES,
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

/// The tables of one Service port (see [`desired`]).
pub(super) fn desired_for(r: &ServicePortRef, sp: &ServicePort) -> Vec<(TableId, DesiredService)> {
    let mut out = Vec::new();
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
        let mut flags = kind_flags(f.kind);
        // The ranges guard the load balancer's addresses only, as in kube-proxy.
        if f.kind == FrontendKind::LoadBalancer && !sp.source_ranges.is_empty() {
            flags |= SVC_F_SRC_RANGES;
        }
        if local && f.kind != FrontendKind::ClusterIp {
            // externalTrafficPolicy binds only clients from outside: pods
            // and the node itself take the twin, to every endpoint.
            *scopes[0].entry(key.in_cluster()).or_insert(0) |= flags;
        }
        if local {
            flags |= SVC_F_LOCAL_ONLY;
        }
        *scopes[usize::from(local)].entry(key).or_insert(0) |= flags;
    }
    let backend = |e: &&Endpoint| {
        let (addr, fam) = addr_be(e.addr);
        Backend {
            addr_be: addr,
            port_be: e.port.to_be(),
            family: fam,
            flags: if e.local { BACKEND_F_LOCAL } else { 0 }
                // Never set on an active endpoint (active means ready, or
                // serving and terminating), so no table holds such a backend.
                | if e.ready || e.serving { 0 } else { BACKEND_F_NOT_SERVING },
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
            by_family
                .entry(key.addr_family())
                .or_default()
                .insert(key, flags);
        }
        for (fam, mut frontends) in by_family {
            let same_family = |e: &&&Endpoint| addr_be(e.addr).1 == fam;
            let active = sp.active_in(local);
            let draining = sp.draining_in(local);
            // Without a local endpoint, a Local frontend drops only while
            // some node has one; a Service with none anywhere is refused.
            if local && sp.active_in(false).iter().any(|e| same_family(&e)) {
                for flags in frontends.values_mut() {
                    *flags |= SVC_F_REMOTE_ENDPOINTS;
                }
            }
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

    fn endpoint(addr: &str, local: bool, ready: bool, serving: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse().expect("test address"),
            port: 8080,
            local,
            ready,
            serving,
            terminating: false,
        }
    }

    fn port_ref() -> ServicePortRef {
        ServicePortRef {
            namespace: "demo".to_owned(),
            name: "web".to_owned(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
        }
    }

    fn frontend(addr: &str, port: u16, kind: FrontendKind) -> crate::model::Frontend {
        crate::model::Frontend {
            addr: addr.parse().expect("test address"),
            port,
            kind,
        }
    }

    fn key(addr: &str, port: u16) -> ServiceKey {
        let (addr_be, family) = addr_be(addr.parse().expect("test address"));
        ServiceKey {
            addr_be,
            port_be: port.to_be(),
            proto: proto::TCP,
            family,
        }
    }

    #[test]
    fn an_external_local_policy_gives_in_cluster_clients_every_endpoint() {
        let sp = ServicePort {
            frontends: vec![
                frontend("10.96.0.10", 80, FrontendKind::ClusterIp),
                frontend("10.99.0.1", 30080, FrontendKind::NodePort),
            ],
            endpoints: vec![endpoint("10.244.2.10", false, true, true)],
            external_local: true,
            ..ServicePort::default()
        };
        let tables: BTreeMap<String, DesiredService> = desired_for(&port_ref(), &sp)
            .into_iter()
            .map(|(id, d)| (id.to_string(), d))
            .collect();
        let cluster = &tables["demo/web/TCP"];
        let local = &tables["demo/web/TCP@local"];
        let nodeport = key("10.99.0.1", 30080);
        assert_eq!(
            cluster.frontends,
            BTreeMap::from([
                (key("10.96.0.10", 80), SVC_F_CLUSTER_IP),
                (nodeport.in_cluster(), SVC_F_NODEPORT),
            ])
        );
        assert_eq!(cluster.backends.len(), 1);
        // No local endpoint, but one elsewhere: outside clients are dropped.
        assert_eq!(
            local.frontends,
            BTreeMap::from([(
                nodeport,
                SVC_F_NODEPORT | SVC_F_LOCAL_ONLY | SVC_F_REMOTE_ENDPOINTS
            )])
        );
        assert!(local.backends.is_empty());

        // No endpoint anywhere: refused like any Service.
        let none = ServicePort {
            endpoints: Vec::new(),
            ..sp
        };
        let tables = desired_for(&port_ref(), &none);
        let (_, local) = tables
            .iter()
            .find(|(id, _)| id.scope == Scope::Local)
            .expect("a local table");
        assert_eq!(
            local.frontends.values().copied().collect::<Vec<_>>(),
            [SVC_F_NODEPORT | SVC_F_LOCAL_ONLY]
        );
    }

    #[test]
    fn a_not_ready_endpoint_drains_and_is_marked_when_it_no_longer_serves() {
        let sp = ServicePort {
            frontends: vec![frontend("10.96.0.10", 80, FrontendKind::ClusterIp)],
            endpoints: vec![
                endpoint("10.244.1.11", true, true, true),
                endpoint("10.244.2.10", false, false, false),
                endpoint("10.244.2.11", false, false, true),
            ],
            ..ServicePort::default()
        };
        let tables = desired_for(&port_ref(), &sp);
        let [(_, d)] = tables.as_slice() else {
            panic!("one table: {tables:?}");
        };
        let flags = |b: &[Backend]| -> Vec<u8> { b.iter().map(|b| b.flags).collect() };
        assert_eq!(flags(&d.backends), [BACKEND_F_LOCAL]);
        assert_eq!(flags(&d.draining), [BACKEND_F_NOT_SERVING, 0]);
    }

    #[test]
    fn a_dual_stack_port_has_one_table_per_family_with_that_familys_endpoints() {
        let sp = ServicePort {
            frontends: vec![
                frontend("10.96.0.10", 80, FrontendKind::ClusterIp),
                frontend("fd00:96::10", 80, FrontendKind::ClusterIp),
                frontend("fd00:1b::7", 80, FrontendKind::LoadBalancer),
            ],
            endpoints: vec![
                endpoint("10.244.1.10", true, true, true),
                endpoint("fd00:244:1::10", true, true, true),
                endpoint("fd00:244:2::10", false, true, true),
            ],
            source_ranges: vec![
                "10.1.0.0/16".parse().expect("cidr"),
                "fd00:c1::/64".parse().expect("cidr"),
            ],
            ..ServicePort::default()
        };
        let tables: BTreeMap<String, DesiredService> = desired_for(&port_ref(), &sp)
            .into_iter()
            .map(|(id, d)| (id.to_string(), d))
            .collect();
        let v4 = &tables["demo/web/TCP"];
        let v6 = &tables["demo/web/TCP@v6"];
        assert_eq!(tables.len(), 2, "{:?}", tables.keys());
        assert_eq!(
            v4.frontends,
            BTreeMap::from([(key("10.96.0.10", 80), SVC_F_CLUSTER_IP)])
        );
        assert_eq!(
            v6.frontends,
            BTreeMap::from([
                (key("fd00:96::10", 80), SVC_F_CLUSTER_IP),
                (
                    key("fd00:1b::7", 80),
                    kind_flags(FrontendKind::LoadBalancer) | SVC_F_SRC_RANGES
                ),
            ])
        );
        assert!(v4
            .backends
            .iter()
            .all(|b| b.family == lb_common::family::V4));
        assert_eq!(v4.backends.len(), 1);
        assert!(v6
            .backends
            .iter()
            .all(|b| b.family == lb_common::family::V6));
        assert_eq!(v6.backends.len(), 2);
        // The ranges of both families go with the Service port; the trie's
        // keys carry the family, so each applies to its own clients.
        assert_eq!(v6.ranges.len(), 2);
    }

    #[test]
    fn protocol_numbers_read_back() {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_eq!(protocol_of(proto_number(p)), Some(p));
        }
        assert_eq!(protocol_of(1), None);
    }
}
