//! The desired state: what every Service port on this node should look like.
//!
//! Pure data and pure functions. Both sources (the manifests folder and the
//! Kubernetes API) hand the same objects to [`build`] (Services as
//! k8s-openapi's, EndpointSlices as [`SliceObject`]s), so the two produce
//! the same model from the same objects.

mod node;
mod slice_object;
mod translate;
#[cfg(test)]
mod translation_lines;

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use node::{AddressFilter, CidrList, NodeInfo};
pub use slice_object::{SliceEndpoint, SliceObject};
pub use translate::{
    build, group, service_id, slice_owner, Id, Inputs, PortNotes, Translator, READ_LABELS,
};

/// The API's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API's largest accepted affinity timeout (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// L4 protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The protocol as Kubernetes spells it (`TCP`, `UDP`, `SCTP`): the one
    /// spelling of table names, metrics labels, logs and `lb-agent` output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    /// Parses the protocol as Kubernetes spells it (case matters, as in the API).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(format!(
                "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
            )),
        }
    }
}

/// Identity of one port of one Service: the unit the datapath programs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortRef {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// `spec.ports[].name` (empty for a single unnamed port).
    pub port_name: String,
    /// `spec.ports[].protocol`.
    pub protocol: Protocol,
}

impl std::fmt::Display for ServicePortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// Which kind of frontend an address:port is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)` with `spec.ports[].port`.
    ClusterIp,
    /// A node address with `spec.ports[].nodePort`.
    NodePort,
    /// An externalIP, with `spec.ports[].port`.
    External,
    /// A LoadBalancer ingress IP, with `spec.ports[].port`.
    LoadBalancer,
}

/// One virtual address, port and kind that leads to a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// The virtual address.
    pub addr: IpAddr,
    /// The virtual port.
    pub port: u16,
    /// Which kind of frontend this is.
    pub kind: FrontendKind,
}

/// One endpoint of a Service port, after resolving the targetPort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Endpoint address.
    pub addr: IpAddr,
    /// Resolved target port.
    pub port: u16,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
    /// `conditions.ready` (a missing value counts as ready, as the API says).
    pub ready: bool,
    /// `conditions.serving` (a missing value counts as serving, as in kube-proxy).
    pub serving: bool,
    /// `conditions.terminating` (a missing value counts as false).
    pub terminating: bool,
}

/// Everything about one Service port that the datapath needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    /// Frontends, sorted and without duplicates.
    pub frontends: Vec<Frontend>,
    /// Endpoints from all slices of the Service, sorted, one per address:port.
    pub endpoints: Vec<Endpoint>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// `externalTrafficPolicy: Local`: NodePort and external frontends lead
    /// only to endpoints on this node.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`: ClusterIP frontends lead only to
    /// endpoints on this node.
    pub internal_local: bool,
    /// `healthCheckNodePort` (0 when unset).
    pub health_check_node_port: u16,
    /// `loadBalancerSourceRanges`: who may reach the LoadBalancer ingress
    /// IPs (empty: everyone).
    pub source_ranges: Vec<Cidr>,
    /// `spec.trafficDistribution` as the API spells it (`PreferClose`,
    /// `PreferSameZone`, `PreferSameNode`), for topology-aware routing.
    pub traffic_distribution: Option<String>,
    /// Zone and topology hints of the endpoint addresses that have any,
    /// from the slice each endpoint was taken from.
    pub topology: BTreeMap<IpAddr, Topology>,
    /// This node's zone when the hints are followed (kube-proxy's rule,
    /// see [`hinted_zone`]): then only endpoints hinted for it take new
    /// Cluster-scope flows. `None`: every endpoint does.
    pub hinted_zone: Option<String>,
}

/// kube-proxy's topology rule: `zone` when every ready endpoint has a
/// zone hint and at least one is hinted for `zone`, else `None` (all
/// endpoints are used). It reads only the hints, which the EndpointSlice
/// controller writes for `trafficDistribution: PreferClose` and the
/// `service.kubernetes.io/topology-mode: Auto` annotation, so every node
/// of a zone computes the same endpoint set, and the same Maglev table.
pub fn hinted_zone(
    endpoints: &[Endpoint],
    topology: &BTreeMap<IpAddr, Topology>,
    zone: Option<&str>,
) -> Option<String> {
    let zone = zone.filter(|z| !z.is_empty())?;
    let mut hinted_here = false;
    for e in endpoints.iter().filter(|e| e.ready) {
        let hints = topology.get(&e.addr).map_or(&[][..], |t| &t.for_zones[..]);
        if hints.is_empty() {
            return None;
        }
        hinted_here |= hints.iter().any(|h| h == zone);
    }
    hinted_here.then(|| zone.to_owned())
}

/// Where an endpoint runs and where the EndpointSlice controller suggests
/// it be used from (`endpoints[].zone` and `endpoints[].hints`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topology {
    /// `zone` of the endpoint.
    pub zone: Option<String>,
    /// `hints.forZones[].name`: zones whose clients should use it.
    pub for_zones: Vec<String>,
    /// `hints.forNodes[].name`: nodes whose clients should use it.
    pub for_nodes: Vec<String>,
}

impl Topology {
    /// True when the slice said nothing about where the endpoint is.
    pub fn is_empty(&self) -> bool {
        self.zone.is_none() && self.for_zones.is_empty() && self.for_nodes.is_empty()
    }
}

/// An address range, `address/prefix`, with the host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not address/prefix"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?}: bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix must be 0-{max}"))?;
        // Clear the host bits, as the API server does.
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - prefix)
                };
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - prefix)
                };
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// True when `addr` is inside this range (of the same family).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let shift = 32 - u32::from(self.prefix);
                u32::from(net).checked_shr(shift) == u32::from(a).checked_shr(shift)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let shift = 128 - u32::from(self.prefix);
                u128::from(net).checked_shr(shift) == u128::from(a).checked_shr(shift)
            }
            _ => false,
        }
    }
}

impl ServicePort {
    /// Endpoints that take new flows: the ready ones; when none is ready,
    /// the serving terminating ones, as kube-proxy does, so that a Service
    /// whose pods are all being replaced keeps answering.
    pub fn active_endpoints(&self) -> Vec<&Endpoint> {
        self.active_in(false)
    }

    /// [`Self::active_endpoints`] among the endpoints on this node only
    /// (when `local_only`), for the Local traffic policies.
    /// Topology hints narrow the Cluster scope only, as in kube-proxy.
    pub fn active_in(&self, local_only: bool) -> Vec<&Endpoint> {
        let mine = |e: &&Endpoint| !local_only || e.local;
        let in_zone = |e: &&Endpoint| {
            local_only
                || self.hinted_zone.as_ref().is_none_or(|z| {
                    self.topology
                        .get(&e.addr)
                        .is_some_and(|t| t.for_zones.contains(z))
                })
        };
        let ready: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(mine)
            .filter(|e| e.ready)
            .filter(in_zone)
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        self.endpoints
            .iter()
            .filter(mine)
            .filter(|e| e.serving && e.terminating)
            .collect()
    }

    /// Endpoints that take no new flows but keep their established ones:
    /// every endpoint still listed that is not active (among this node's
    /// only, when `local_only`), whatever its conditions: a failed
    /// readiness probe must not end connections, as in kube-proxy, whose
    /// conntrack entries outlive readiness (only leaving the slices does);
    /// nor must the topology hints leaving a ready endpoint out (hints move
    /// as the controller rebalances).
    pub fn draining_in(&self, local_only: bool) -> Vec<&Endpoint> {
        let active = self.active_in(local_only);
        self.endpoints
            .iter()
            .filter(|e| (!local_only || e.local) && !active.contains(e))
            .collect()
    }
}

/// The whole desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// Every programmable Service port, by identity.
    pub services: BTreeMap<ServicePortRef, ServicePort>,
}

/// Something in the input that could not be translated, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The object at fault, as `Kind namespace/name`.
    pub object: String,
    /// What is wrong and what was done about it.
    pub message: String,
}

impl Problem {
    /// `(namespace, name)` when the object at fault is a Service.
    pub fn service(&self) -> Option<(&str, &str)> {
        let (namespace, name) = self.object.strip_prefix("Service ")?.split_once('/')?;
        (!name.is_empty()).then_some((namespace, name))
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::{Cidr, Problem};

    #[test]
    fn cidrs_parse_and_clear_host_bits() {
        let c: Cidr = "10.99.0.100/24".parse().expect("valid");
        assert_eq!((c.addr.to_string().as_str(), c.prefix), ("10.99.0.0", 24));
        let c: Cidr = "fd00::1/64".parse().expect("valid");
        assert_eq!((c.addr.to_string().as_str(), c.prefix), ("fd00::", 64));
        assert_eq!("0.0.0.0/0".parse::<Cidr>().map(|c| c.prefix), Ok(0));
        for bad in ["10.0.0.1", "10.0.0.1/33", "x/8", "fd00::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_contain_their_addresses_only() {
        let c: Cidr = "10.99.0.0/24".parse().expect("valid");
        assert!(c.contains("10.99.0.1".parse().expect("ip")));
        assert!(!c.contains("10.99.1.1".parse().expect("ip")));
        assert!(!c.contains("fd00::1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(all.contains("192.0.2.1".parse().expect("ip")));
        let one: Cidr = "fd00::1/128".parse().expect("valid");
        assert!(one.contains("fd00::1".parse().expect("ip")));
        assert!(!one.contains("fd00::2".parse().expect("ip")));
    }

    #[test]
    fn problems_name_their_service() {
        let p = |object: &str| Problem {
            object: object.to_owned(),
            message: String::new(),
        };
        assert_eq!(p("Service demo/web").service(), Some(("demo", "web")));
        assert_eq!(p("Service demo/").service(), None);
        assert_eq!(p("EndpointSlice demo/web-1").service(), None);
    }
}
