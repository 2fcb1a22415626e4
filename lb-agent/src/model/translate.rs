//! Services and EndpointSlices → [`Model`], with the semantics kube-proxy gives
//! them.
//!
//! [`build`] is pure and total: any input yields a model plus a list of
//! [`Problem`]s, and both are independent of the order of the input.
//! Invalid parts are skipped at the smallest sensible grain (one address, one
//! port, one slice) so that one bad object never hides the others.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort as ApiServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tracing::debug;

use super::{
    Cidr, Endpoint, Frontend, FrontendKind, Model, NodeInfo, Problem, Protocol, ServicePort,
    ServicePortRef, SliceObject, Topology, DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S,
};

/// Links an EndpointSlice to the Service (same namespace) it belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Marks a Service handled by another proxy: kube-proxy leaves it alone, so do we.
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Marks the EndpointSlices of a headless Service: DNS serves them, and
/// kube-proxy does not watch them.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Every label the translation reads, of Services and EndpointSlices: a
/// source may drop the others.
pub const READ_LABELS: [&str; 3] = [SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL];

/// Translates Services and their EndpointSlices into the desired state of
/// this node, plus whatever had to be skipped and why.
///
/// Pure and deterministic: the result does not depend on the order of
/// `services` or `slices`, and no input makes it panic.
#[must_use]
pub fn build(
    services: &[Service],
    slices: &[SliceObject],
    node: &NodeInfo,
) -> (Model, Vec<Problem>) {
    let mut t = Translator::new(node.clone());
    let groups = group(services, slices);
    t.update(node, groups.keys().cloned(), |id| {
        groups.get(id).cloned().unwrap_or_default()
    });
    let problems = t.problems();
    (t.model, problems)
}

/// A Service's identity: `(namespace, name)`, with the API's defaults.
pub type Id = (String, String);

/// The identity of a Service.
pub fn service_id(svc: &Service) -> Id {
    identity(&svc.metadata)
}

/// The identity of the Service the EndpointSlice with metadata `meta`
/// belongs to (its namespace and `kubernetes.io/service-name` label);
/// `None` without the label, when the slice belongs to no Service and is
/// ignored.
pub fn slice_owner(meta: &ObjectMeta) -> Option<Id> {
    let service = meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((identity(meta).0, service.clone()))
}

/// What one Service identity is made of: its Service documents (one,
/// unless the same Service is defined twice) and its EndpointSlices.
pub type Inputs<'a> = (Vec<&'a Service>, Vec<&'a SliceObject>);

/// Groups Services and EndpointSlices by the Service identity they
/// belong to; slices without an owner are left out (with a debug line).
pub fn group<'a>(services: &'a [Service], slices: &'a [SliceObject]) -> BTreeMap<Id, Inputs<'a>> {
    let mut out: BTreeMap<Id, Inputs<'a>> = BTreeMap::new();
    for svc in services {
        out.entry(service_id(svc)).or_default().0.push(svc);
    }
    for slice in slices {
        match slice_owner(&slice.metadata) {
            Some(id) => out.entry(id).or_default().1.push(slice),
            None => {
                let (namespace, name) = identity(&slice.metadata);
                debug!(slice = %format!("{namespace}/{name}"), "no {SERVICE_NAME_LABEL} label; slice ignored");
            }
        }
    }
    out
}

/// The translation of one Service identity, before frontend conflicts
/// between Services are settled.
#[derive(Debug, Default)]
struct Part {
    ports: Vec<(ServicePortRef, ServicePort)>,
    problems: Vec<Problem>,
    /// What the translation saw of each port of `ports` (same order), for
    /// `lb-agent explain`. A Vec, not a map keyed again by the port: a
    /// map of one entry allocates room for eleven, kilobytes per Service.
    notes: Vec<PortNotes>,
}

/// What the translation saw of one Service port beyond what the model
/// keeps: the grounds on which `lb-agent explain` and the Warning Events
/// say why a port has no (ready, local) endpoint or lost a frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortNotes {
    /// `spec.ports[].targetPort` as written (a number or a port name;
    /// empty when unset, which means the port's own number).
    pub target_port: String,
    /// Whether the Service has a selector (without one, its
    /// EndpointSlices are written by hand or by another controller).
    pub has_selector: bool,
    /// EndpointSlices of the Service (of a family this agent reads).
    pub slices: usize,
    /// Endpoints in those slices, with or without this port.
    pub slice_endpoints: usize,
    /// Endpoints in slices that carry no port of this name and protocol,
    /// so that this port cannot reach them (a targetPort that no pod's
    /// ports resolve).
    pub unresolved_endpoints: usize,
    /// The `name/PROTO` of every port the slices carry, sorted, without
    /// duplicates.
    pub slice_ports: Vec<String>,
    /// Frontends given to another Service port, with that port.
    pub lost_frontends: Vec<(Frontend, ServicePortRef)>,
    /// `spec.ports[].nodePort` of a NodePort or LoadBalancer Service.
    pub node_port: Option<u16>,
}

/// A frontend as the datapath keys it: what two Service ports cannot share.
type FrontendKey = (IpAddr, u16, Protocol);

/// [`build`] kept up to date between syncs: only the Service identities
/// whose objects changed are translated again, and frontend conflicts are
/// settled again only among the Service ports that claim a frontend one of
/// them claims. One changed Service among 10 000 then costs one Service's
/// translation, where [`build`] costs all of them.
#[derive(Debug, Default)]
pub struct Translator {
    node: NodeInfo,
    parts: HashMap<Id, Part>,
    /// Every Service port that claims each frontend, sorted; the first
    /// owns it. Almost always one: a sorted Vec, since a set of one
    /// allocates room for eleven.
    claims: HashMap<FrontendKey, Vec<ServicePortRef>>,
    /// The translated model, conflicts settled.
    model: Model,
    /// The problems of settling conflicts, by the Service port that lost.
    conflicts: HashMap<ServicePortRef, Vec<Problem>>,
    /// The frontends each Service port lost in settling, with their owner.
    lost: HashMap<ServicePortRef, Vec<(Frontend, ServicePortRef)>>,
    /// Service identities translated since the start (each update counts
    /// every identity it was given, or all when the node changed).
    translated: u64,
}

fn frontend_keys<'a>(
    r: &'a ServicePortRef,
    sp: &'a ServicePort,
) -> impl Iterator<Item = FrontendKey> + 'a {
    sp.frontends.iter().map(|f| (f.addr, f.port, r.protocol))
}

impl Translator {
    /// An empty translation for `node`.
    pub fn new(node: NodeInfo) -> Self {
        Self {
            node,
            ..Self::default()
        }
    }

    /// The node the model is for.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// The model as of the last [`Self::update`].
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Every problem of the current input, sorted, without duplicates.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .parts
            .values()
            .flat_map(|p| p.problems.iter().cloned())
            .chain(self.conflicts.values().flatten().cloned())
            .collect();
        // Sorting makes them as stable as the model, so a reload with the
        // same files logs the same lines.
        problems.sort_by(|a, b| (&a.object, &a.message).cmp(&(&b.object, &b.message)));
        problems.dedup();
        problems
    }

    /// How many Service identities were translated since the start: what
    /// shows that a change re-translates only its own Services.
    pub fn translated(&self) -> u64 {
        self.translated
    }

    /// The identities translated now (those with any port or problem).
    pub fn ids(&self) -> impl Iterator<Item = &Id> {
        self.parts.keys()
    }

    /// Every port of Service `id` the translation kept, with what it saw
    /// of it (frontends lost to other Services included); ports that lost
    /// every frontend are here though not in the model.
    pub fn notes(&self, id: &Id) -> Vec<(ServicePortRef, PortNotes)> {
        let Some(part) = self.parts.get(id) else {
            return Vec::new();
        };
        part.ports
            .iter()
            .zip(&part.notes)
            .map(|((r, _), n)| {
                let mut n = n.clone();
                n.lost_frontends = self.lost.get(r).cloned().unwrap_or_default();
                (r.clone(), n)
            })
            .collect()
    }

    /// The problems of Service `id` (its own and its slices'; conflicts
    /// over frontends are in [`Self::notes`]), sorted.
    pub fn problems_of(&self, id: &Id) -> Vec<Problem> {
        let mut out: Vec<Problem> = self
            .parts
            .get(id)
            .map(|p| p.problems.clone())
            .unwrap_or_default();
        out.sort_by(|a, b| (&a.object, &a.message).cmp(&(&b.object, &b.message)));
        out.dedup();
        out
    }

    /// Translates again the identities in `changed`, reading each one's
    /// objects through `inputs` (empty: the identity is gone). A changed
    /// `node` changes every Service, so then all are translated again.
    /// Returns the Service ports of the model that may differ now (changed,
    /// added or gone).
    pub fn update<'a>(
        &mut self,
        node: &NodeInfo,
        changed: impl IntoIterator<Item = Id>,
        mut inputs: impl FnMut(&Id) -> Inputs<'a>,
    ) -> BTreeSet<ServicePortRef> {
        let mut changed: BTreeSet<Id> = changed.into_iter().collect();
        if *node != self.node {
            self.node = node.clone();
            changed.extend(self.parts.keys().cloned());
        }
        // The Service ports whose settled frontends may differ now.
        let mut affected: BTreeSet<ServicePortRef> = BTreeSet::new();
        self.translated += changed.len() as u64;
        for id in changed {
            if let Some(old) = self.parts.remove(&id) {
                for (r, sp) in &old.ports {
                    for key in frontend_keys(r, sp) {
                        if let Some(set) = self.claims.get_mut(&key) {
                            if let Ok(i) = set.binary_search(r) {
                                set.remove(i);
                            }
                            affected.extend(set.iter().cloned());
                            if set.is_empty() {
                                self.claims.remove(&key);
                            }
                        }
                    }
                    affected.insert(r.clone());
                }
            }
            let (services, slices) = inputs(&id);
            if services.is_empty() && slices.is_empty() {
                continue;
            }
            let part = translate_identity(&id, &services, &slices, &self.node);
            for (r, sp) in &part.ports {
                for key in frontend_keys(r, sp) {
                    let set = self.claims.entry(key).or_default();
                    affected.extend(set.iter().cloned());
                    if let Err(i) = set.binary_search(r) {
                        set.insert(i, r.clone());
                    }
                }
                affected.insert(r.clone());
            }
            if !part.ports.is_empty() || !part.problems.is_empty() {
                self.parts.insert(id, part);
            }
        }
        for r in &affected {
            self.settle(r);
        }
        affected
    }

    /// Gives each `(address, port, protocol)` to one Service port only.
    ///
    /// The datapath keys frontends on exactly that triple, so two owners
    /// cannot both be programmed; the first in `ServicePortRef` order wins
    /// so the outcome does not depend on which file or event came first.
    fn settle(&mut self, r: &ServicePortRef) {
        self.conflicts.remove(r);
        self.lost.remove(r);
        let mut lost = Vec::new();
        let id = (r.namespace.clone(), r.name.clone());
        let unsettled = self
            .parts
            .get(&id)
            .and_then(|p| p.ports.iter().find(|(pr, _)| pr == r))
            .map(|(_, sp)| sp);
        let Some(sp) = unsettled else {
            self.model.services.remove(r);
            return;
        };
        let mut sp = sp.clone();
        let mut problems = Vec::new();
        let had_frontends = !sp.frontends.is_empty();
        sp.frontends.retain(|f| {
            let owner = self
                .claims
                .get(&(f.addr, f.port, r.protocol))
                .and_then(|set| set.first());
            match owner {
                // The same port may use one address:port as several kinds.
                Some(o) if o != r => {
                    lost.push((*f, o.clone()));
                    problems.push(Problem {
                        object: format!("Service {}/{}", r.namespace, r.name),
                        message: format!(
                            "{}: frontend {}/{} is already used by Service {}/{} {}; frontend dropped from this port",
                            port_label(&r.port_name, r.protocol),
                            SocketAddr::new(f.addr, f.port),
                            r.protocol,
                            o.namespace,
                            o.name,
                            port_label(&o.port_name, o.protocol),
                        ),
                    });
                    false
                }
                _ => true,
            }
        });
        if had_frontends && sp.frontends.is_empty() {
            problems.push(Problem {
                object: format!("Service {}/{}", r.namespace, r.name),
                message: format!(
                    "{} lost every frontend to other Services; port skipped",
                    port_label(&r.port_name, r.protocol)
                ),
            });
            self.model.services.remove(r);
        } else {
            self.model.services.insert(r.clone(), sp);
        }
        if !problems.is_empty() {
            self.conflicts.insert(r.clone(), problems);
        }
        if !lost.is_empty() {
            self.lost.insert(r.clone(), lost);
        }
    }
}

/// Translates one Service identity: its Service (when defined once, or in
/// identical copies) with its slices, and the problems of both.
fn translate_identity(
    id: &Id,
    services: &[&Service],
    slices: &[&SliceObject],
    node: &NodeInfo,
) -> Part {
    let mut part = Part::default();
    let mut parsed = Vec::new();
    for slice in slices {
        let (namespace, name) = identity(&slice.metadata);
        let object = format!("EndpointSlice {namespace}/{name}");
        let labels = slice.metadata.labels.as_ref();
        // The EndpointSlice controller copies these labels from the Service;
        // kube-proxy filters on them, so the slices are skipped even when
        // their Service is (wrongly) not.
        if let Some(label) = [HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL]
            .into_iter()
            .find(|l| labels.is_some_and(|ls| ls.contains_key(*l)))
        {
            debug!(slice = %object, "labelled {label}; slice ignored");
            continue;
        }
        if let Some(p) = parse_slice(slice, &object, node, &mut part.problems) {
            parsed.push(p);
        }
    }
    let (namespace, name) = id;
    if name.is_empty() {
        for _ in services {
            part.problems.push(Problem {
                object: format!("Service {namespace}/"),
                message: "has no metadata.name; Service skipped".to_owned(),
            });
        }
        return part;
    }
    let Some(first) = services.first() else {
        return part;
    };
    // Identical copies (the same manifest in two files) collapse into one;
    // differing copies cannot be told apart by order, so all are skipped.
    if services.iter().all(|c| *c == *first) {
        let mut ports = BTreeMap::new();
        translate_service(first, &parsed, node, &mut ports, &mut part.problems);
        part.notes = ports
            .keys()
            .map(|r| port_notes(first, &parsed, r))
            .collect();
        part.ports = ports.into_iter().collect();
    } else {
        part.problems.push(Problem {
            object: format!("Service {namespace}/{name}"),
            message: format!(
                "defined {} times with different contents; every copy skipped until only one remains",
                services.len()
            ),
        });
    }
    part
}

/// `(namespace, name)` of an object, with the API server's defaults.
fn identity(meta: &ObjectMeta) -> (String, String) {
    let namespace = match meta.namespace.as_deref() {
        None | Some("") => "default",
        Some(ns) => ns,
    };
    let name = meta.name.as_deref().unwrap_or_default();
    (namespace.to_owned(), name.to_owned())
}

/// The usable content of one EndpointSlice.
struct Slice {
    /// Port number by `(name, protocol)`: how this slice resolves a targetPort.
    ports: BTreeMap<(String, Protocol), u16>,
    /// One entry per valid address, with its zone and hints; `port` is
    /// filled in per Service port.
    endpoints: Vec<(Endpoint, Topology)>,
}

/// Validates one slice; `None` when it has nothing for this datapath.
fn parse_slice(
    slice: &SliceObject,
    object: &str,
    node: &NodeInfo,
    problems: &mut Vec<Problem>,
) -> Option<Slice> {
    let want_v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => {
            // kube-proxy cannot forward to a name either.
            debug!(slice = %object, "FQDN EndpointSlice ignored");
            return None;
        }
        other => {
            problems.push(Problem {
                object: object.to_owned(),
                message: format!("addressType {other:?} is not IPv4, IPv6 or FQDN; slice skipped"),
            });
            return None;
        }
    };
    let family = if want_v4 { "IPv4" } else { "IPv6" };

    let mut ports = BTreeMap::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        let protocol = match parse_protocol(p.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(msg) => {
                problems.push(Problem {
                    object: object.to_owned(),
                    message: format!("ports[{i}]: {msg}; port skipped"),
                });
                continue;
            }
        };
        let Some(number) = p.port else {
            problems.push(Problem {
                object: object.to_owned(),
                message: format!("ports[{i}] ({name:?}) has no port number; port skipped"),
            });
            continue;
        };
        let Some(number) = valid_port(number) else {
            problems.push(Problem {
                object: object.to_owned(),
                message: format!(
                    "ports[{i}] ({name:?}): port {number} is outside 1-65535; port skipped"
                ),
            });
            continue;
        };
        match ports.entry((name, protocol)) {
            Entry::Vacant(v) => {
                v.insert(number);
            }
            Entry::Occupied(o) => problems.push(Problem {
                object: object.to_owned(),
                message: format!(
                    "ports[{i}] repeats name {:?} and protocol {}; the first one is used, this one skipped",
                    o.key().0,
                    protocol
                ),
            }),
        }
    }

    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        let conditions = ep.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        // kube-proxy reads a missing `serving` as true whatever `ready`
        // says (the API's text says to defer to `ready`); which UDP flows
        // move off a not-ready endpoint depends on it, so read it alike.
        let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        // An agent that does not know its name must not call everything local.
        let local = !node.name.is_empty() && ep.node_name.as_deref() == Some(node.name.as_str());
        let hints = ep.hints.as_ref();
        let topology = Topology {
            zone: ep.zone.clone().filter(|z| !z.is_empty()),
            for_zones: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|zs| zs.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
            for_nodes: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|ns| ns.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
        };
        // The API calls an endpoint's addresses fungible and kube-proxy uses
        // only the first; so do we, so that a pod with two addresses does not
        // get twice the traffic.
        for (j, a) in ep.addresses.iter().enumerate().take(1) {
            match a.parse::<IpAddr>() {
                Ok(addr) if addr.is_ipv4() == want_v4 => {
                    endpoints.push((Endpoint { addr, port: 0, local, ready, serving, terminating }, topology.clone()));
                }
                Ok(_) => problems.push(Problem {
                    object: object.to_owned(),
                    message: format!("endpoints[{i}].addresses[{j}] {a:?} is not an {family} address as addressType says; address skipped"),
                }),
                Err(_) => problems.push(Problem {
                    object: object.to_owned(),
                    message: format!("endpoints[{i}].addresses[{j}] {a:?} is not an IP address; address skipped"),
                }),
            }
        }
    }
    Some(Slice { ports, endpoints })
}

/// A Kubernetes protocol string; a missing one is TCP, as the API defaults it.
fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    p.map_or(Ok(Protocol::Tcp), str::parse)
}

/// A port number from the API's `i32`, if it is a usable L4 port.
fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// How a Problem names one port of a Service.
fn port_label(name: &str, protocol: Protocol) -> String {
    if name.is_empty() {
        format!("unnamed {} port", protocol)
    } else {
        format!("port {name:?} ({})", protocol)
    }
}

/// True when kube-proxy would leave this Service to DNS.
fn is_headless(spec: &ServiceSpec) -> bool {
    spec.cluster_ip.as_deref() == Some("None")
        || spec
            .cluster_ips
            .as_ref()
            .is_some_and(|ips| ips.iter().any(|ip| ip == "None"))
}

/// Parses `(field path, address)` pairs, reporting and skipping bad ones.
fn parse_addresses<'a>(
    addrs: impl IntoIterator<Item = (String, &'a str)>,
    object: &str,
    problems: &mut Vec<Problem>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (field, a) in addrs {
        match a.parse() {
            Ok(addr) => out.push(addr),
            Err(_) => problems.push(Problem {
                object: object.to_owned(),
                message: format!("{field} {a:?} is not an IP address; that address skipped"),
            }),
        }
    }
    out
}

/// The addresses of `field` in the Service's `families` (`true`: IPv4);
/// the others are reported and left out. No family known: all are kept.
fn of_families(
    addrs: Vec<IpAddr>,
    families: &BTreeSet<bool>,
    field: &str,
    object: &str,
    problems: &mut Vec<Problem>,
) -> Vec<IpAddr> {
    let name = |v4: bool| if v4 { "IPv4" } else { "IPv6" };
    addrs
        .into_iter()
        .filter(|a| {
            let ok = families.is_empty() || families.contains(&a.is_ipv4());
            if !ok {
                let have: Vec<&str> = families.iter().rev().map(|v4| name(*v4)).collect();
                problems.push(Problem {
                    object: object.to_owned(),
                    message: format!(
                        "{field}: {a} is an {} address but the Service's IP families are {}; that address ignored",
                        name(a.is_ipv4()),
                        have.join(", ")
                    ),
                });
            }
            ok
        })
        .collect()
}

/// Pairs each entry of a list field with its path, as Problems name it.
fn indexed<'a>(
    field: &'a str,
    items: &'a [String],
) -> impl Iterator<Item = (String, &'a str)> + 'a {
    items
        .iter()
        .enumerate()
        .map(move |(i, a)| (format!("{field}[{i}]"), a.as_str()))
}

/// The virtual addresses of a Service, by frontend kind.
struct ServiceAddrs {
    cluster: Vec<IpAddr>,
    external: Vec<IpAddr>,
    load_balancer: Vec<IpAddr>,
    /// NodePorts are served only by these Service types.
    node_ports: bool,
    /// The Service's IP families (`true`: IPv4); empty when none is known
    /// (no clusterIP and no `ipFamilies`), which serves every family.
    families: BTreeSet<bool>,
}

/// Reads the Service-wide addresses; `None` when the Service is not ours.
fn service_addrs(svc: &Service, object: &str, problems: &mut Vec<Problem>) -> Option<ServiceAddrs> {
    if svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
    {
        debug!(service = %object, "labelled {SERVICE_PROXY_NAME_LABEL}: another proxy serves it; skipped");
        return None;
    }
    let Some(spec) = svc.spec.as_ref() else {
        debug!(service = %object, "no spec; skipped");
        return None;
    };
    let node_ports = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => false,
        "NodePort" | "LoadBalancer" => true,
        "ExternalName" => {
            debug!(service = %object, "ExternalName is served by DNS; skipped");
            return None;
        }
        other => {
            problems.push(Problem {
                object: object.to_owned(),
                message: format!(
                    "unknown type {other:?} (expected ClusterIP, NodePort, LoadBalancer or ExternalName); Service skipped"
                ),
            });
            return None;
        }
    };
    if is_headless(spec) {
        debug!(service = %object, "headless: served by DNS; skipped");
        return None;
    }

    // The API server keeps clusterIPs[0] == clusterIP; the list is the
    // dual-stack superset, the single field what older writers set.
    let cluster = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => {
            parse_addresses(indexed("spec.clusterIPs", ips), object, problems)
        }
        // An empty clusterIP is "not allocated yet", not an error.
        _ => parse_addresses(
            spec.cluster_ip
                .as_deref()
                .filter(|ip| !ip.is_empty())
                .map(|ip| ("spec.clusterIP".to_owned(), ip)),
            object,
            problems,
        ),
    };

    let external = parse_addresses(
        indexed(
            "spec.externalIPs",
            spec.external_ips.as_deref().unwrap_or_default(),
        ),
        object,
        problems,
    );
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref());
    let ingress_ips = ingress
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, ing)| {
            // A hostname-only ingress has no address for us to serve.
            let ip = ing.ip.as_deref()?;
            if ing.ip_mode.as_deref() == Some("Proxy") {
                // The load balancer delivers to the node, not to the VIP: kube-proxy
                // does not capture the VIP, so neither do we.
                debug!(service = %object, %ip, "ingress ipMode Proxy; VIP not captured");
                return None;
            }
            Some((format!("status.loadBalancer.ingress[{i}].ip"), ip))
        });
    let load_balancer = parse_addresses(ingress_ips, object, problems);

    // kube-proxy serves a Service in the families of its clusterIPs (or
    // `ipFamilies` while none is allocated): an externalIP or ingress IP
    // of another family is ignored, with a Warning.
    let mut families: BTreeSet<bool> = cluster.iter().map(IpAddr::is_ipv4).collect();
    if families.is_empty() {
        families = spec
            .ip_families
            .iter()
            .flatten()
            .filter_map(|f| match f.as_str() {
                "IPv4" => Some(true),
                "IPv6" => Some(false),
                _ => None,
            })
            .collect();
    }
    let external = of_families(external, &families, "spec.externalIPs", object, problems);
    let load_balancer = of_families(
        load_balancer,
        &families,
        "status.loadBalancer.ingress",
        object,
        problems,
    );
    Some(ServiceAddrs {
        cluster,
        external,
        load_balancer,
        node_ports,
        families,
    })
}

/// Adds every valid port of one Service to the model.
fn translate_service(
    svc: &Service,
    service_slices: &[Slice],
    node: &NodeInfo,
    ports_out: &mut BTreeMap<ServicePortRef, ServicePort>,
    problems: &mut Vec<Problem>,
) {
    let (namespace, name) = identity(&svc.metadata);
    let object = format!("Service {namespace}/{name}");
    let Some(addrs) = service_addrs(svc, &object, problems) else {
        return;
    };
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    if ports.is_empty() {
        debug!(service = %object, "no ports; nothing to program");
    }
    let affinity = affinity_timeout(svc, &object, problems);
    let ranges = source_ranges(svc, &object, problems);
    let mut seen = BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let (r, mut sp) =
            match translate_port(port, &addrs, node, service_slices, &namespace, &name) {
                Ok(v) => v,
                Err(msg) => {
                    problems.push(Problem {
                        object: object.clone(),
                        message: format!("spec.ports[{i}]: {msg}"),
                    });
                    continue;
                }
            };
        if !seen.insert(r.clone()) {
            problems.push(Problem {
                object: object.clone(),
                message: format!(
                    "spec.ports[{i}]: {} appears twice; the first is used, this one skipped",
                    port_label(&r.port_name, r.protocol)
                ),
            });
            continue;
        }
        if sp.frontends.is_empty() {
            problems.push(Problem {
                object: object.clone(),
                message: format!(
                    "{} has no frontend (no clusterIP, nodePort, externalIP or ingress IP); port skipped",
                    port_label(&r.port_name, r.protocol)
                ),
            });
            continue;
        }
        sp.affinity_timeout_s = affinity;
        if let Some(spec) = svc.spec.as_ref() {
            sp.traffic_distribution = spec.traffic_distribution.clone().filter(|t| !t.is_empty());
            sp.external_local = spec.external_traffic_policy.as_deref() == Some("Local");
            sp.internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
            sp.health_check_node_port = spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0);
            sp.source_ranges.clone_from(&ranges);
        }
        ports_out.insert(r, sp);
    }
}

/// What the translation saw of port `r` of `svc` (lost frontends come
/// later, from settling).
fn port_notes(svc: &Service, slices: &[Slice], r: &ServicePortRef) -> PortNotes {
    let spec = svc.spec.as_ref();
    let api_port = spec
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default()
        .iter()
        .find(|p| {
            p.name.as_deref().unwrap_or_default() == r.port_name
                && parse_protocol(p.protocol.as_deref()) == Ok(r.protocol)
        });
    let target_port = api_port
        .and_then(|p| p.target_port.as_ref())
        .map(|t| match t {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
        })
        .unwrap_or_default();
    let key = (r.port_name.clone(), r.protocol);
    PortNotes {
        target_port,
        has_selector: spec
            .and_then(|s| s.selector.as_ref())
            .is_some_and(|sel| !sel.is_empty()),
        slices: slices.len(),
        slice_endpoints: slices.iter().map(|s| s.endpoints.len()).sum(),
        unresolved_endpoints: slices
            .iter()
            .filter(|s| !s.ports.contains_key(&key))
            .map(|s| s.endpoints.len())
            .sum(),
        slice_ports: {
            let mut names: Vec<String> = slices
                .iter()
                .flat_map(|s| s.ports.keys())
                .map(|(name, proto)| {
                    if name.is_empty() {
                        format!("(unnamed)/{proto}")
                    } else {
                        format!("{name}/{proto}")
                    }
                })
                .collect();
            names.sort_unstable();
            names.dedup();
            names
        },
        lost_frontends: Vec::new(),
        node_port: api_port
            .and_then(|p| p.node_port)
            .filter(|_| {
                matches!(
                    spec.and_then(|s| s.type_.as_deref()),
                    Some("NodePort" | "LoadBalancer")
                )
            })
            .and_then(valid_port),
    }
}

/// `spec.loadBalancerSourceRanges`, parsed; a bad entry is reported and
/// skipped. When every entry is bad the Service is left open rather than
/// closed, as an empty list means.
fn source_ranges(svc: &Service, object: &str, problems: &mut Vec<Problem>) -> Vec<Cidr> {
    let raw = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_deref())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        match r.parse::<Cidr>() {
            Ok(c) => out.push(c),
            Err(e) => problems.push(Problem {
                object: object.to_owned(),
                message: format!("spec.loadBalancerSourceRanges[{i}]: {e}; range skipped"),
            }),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `sessionAffinity: ClientIP` with its timeout (the API's default when
/// unset), or 0 for `None`. A timeout outside what the API accepts is
/// reported and replaced by the default rather than losing the affinity.
fn affinity_timeout(svc: &Service, object: &str, problems: &mut Vec<Problem>) -> u32 {
    let Some(spec) = svc.spec.as_ref() else {
        return 0;
    };
    match spec.session_affinity.as_deref() {
        None | Some("None") => 0,
        Some("ClientIP") => {
            let configured = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match configured {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S as i32).contains(&t) => t as u32,
                Some(t) => {
                    problems.push(Problem {
                        object: object.to_owned(),
                        message: format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1-{MAX_AFFINITY_TIMEOUT_S}; the default {DEFAULT_AFFINITY_TIMEOUT_S} is used"
                        ),
                    });
                    DEFAULT_AFFINITY_TIMEOUT_S
                }
            }
        }
        Some(other) => {
            problems.push(Problem {
                object: object.to_owned(),
                message: format!("unknown sessionAffinity {other:?}; no affinity"),
            });
            0
        }
    }
}

/// One Service port with its frontends and endpoints; `Err` says why it was
/// skipped.
fn translate_port(
    port: &ApiServicePort,
    addrs: &ServiceAddrs,
    node: &NodeInfo,
    slices: &[Slice],
    namespace: &str,
    name: &str,
) -> Result<(ServicePortRef, ServicePort), String> {
    let port_name = port.name.clone().unwrap_or_default();
    let protocol =
        parse_protocol(port.protocol.as_deref()).map_err(|msg| format!("{msg}; port skipped"))?;
    let label = port_label(&port_name, protocol);
    let number = valid_port(port.port).ok_or_else(|| {
        format!(
            "{label}: port {} is outside 1-65535; port skipped",
            port.port
        )
    })?;
    let node_port = match port.node_port {
        // 0 is how a manifest says "not set" (the API server would allocate).
        Some(n) if addrs.node_ports && n != 0 => Some(
            valid_port(n)
                .ok_or_else(|| format!("{label}: nodePort {n} is outside 1-65535; port skipped"))?,
        ),
        _ => None,
    };

    let mut frontends: Vec<Frontend> = addrs
        .cluster
        .iter()
        .map(|&addr| Frontend {
            addr,
            port: number,
            kind: FrontendKind::ClusterIp,
        })
        .chain(addrs.external.iter().map(|&addr| Frontend {
            addr,
            port: number,
            kind: FrontendKind::External,
        }))
        .chain(addrs.load_balancer.iter().map(|&addr| Frontend {
            addr,
            port: number,
            kind: FrontendKind::LoadBalancer,
        }))
        // A NodePort is served on the node's addresses of the Service's
        // families only, as kube-proxy's per-family proxiers do: a
        // single-stack IPv4 Service has no backend an IPv6 frontend
        // could reach.
        .chain(node_port.into_iter().flat_map(|np| {
            node.addresses
                .iter()
                .filter(|a| addrs.families.is_empty() || addrs.families.contains(&a.is_ipv4()))
                .map(move |&addr| Frontend {
                    addr,
                    port: np,
                    kind: FrontendKind::NodePort,
                })
        }))
        .collect();
    frontends.sort();
    frontends.dedup();

    let (endpoints, topology) = merge_endpoints(slices, &port_name, protocol);
    let hinted_zone = super::hinted_zone(&endpoints, &topology, node.zone.as_deref());
    let r = ServicePortRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        port_name,
        protocol,
    };
    Ok((
        r,
        ServicePort {
            frontends,
            endpoints,
            topology,
            hinted_zone,
            ..ServicePort::default()
        },
    ))
}

/// The endpoints of one Service port across all slices of its Service.
///
/// Each slice resolves the port by name on its own, which is how a named
/// targetPort can map to different numbers on different pods. The topology
/// of an address comes with the endpoint entry that won.
fn merge_endpoints(
    slices: &[Slice],
    port_name: &str,
    protocol: Protocol,
) -> (Vec<Endpoint>, BTreeMap<IpAddr, Topology>) {
    // An address:port listed by two slices (a pod moving between slices)
    // counts once; the preference is a total order on the remaining fields,
    // so the winner does not depend on slice order.
    fn preference(e: &Endpoint) -> (bool, bool, bool, bool) {
        (e.ready, e.serving, !e.terminating, e.local)
    }
    let key = (port_name.to_owned(), protocol);
    let mut merged: BTreeMap<(IpAddr, u16), (Endpoint, &Topology)> = BTreeMap::new();
    for slice in slices {
        let Some(&port) = slice.ports.get(&key) else {
            continue;
        };
        for (e, topology) in &slice.endpoints {
            let e = Endpoint { port, ..*e };
            merged
                .entry((e.addr, e.port))
                .and_modify(|old| {
                    // Ties on the endpoint go to the smaller topology, so
                    // slice order never decides.
                    if (preference(&e), std::cmp::Reverse(topology))
                        > (preference(&old.0), std::cmp::Reverse(old.1))
                    {
                        *old = (e, topology);
                    }
                })
                .or_insert((e, topology));
        }
    }
    let mut topologies = BTreeMap::new();
    let endpoints = merged
        .into_values()
        .map(|(e, t)| {
            if !t.is_empty() {
                topologies.insert(e.addr, t.clone());
            }
            e
        })
        .collect();
    (endpoints, topologies)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Parses `---`-separated Services and EndpointSlices.
    pub(crate) fn objects(yaml: &str) -> (Vec<Service>, Vec<SliceObject>) {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
                .expect("test YAML parses");
            if value.get("addressType").is_some() {
                slices.push(serde_yaml::from_value(value).expect("test slice deserializes"));
            } else {
                services.push(serde_yaml::from_value(value).expect("test Service deserializes"));
            }
        }
        (services, slices)
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            addresses: vec!["192.168.1.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            zone: None,
        }
    }

    fn run(yaml: &str) -> (Model, Vec<Problem>) {
        let (services, slices) = objects(yaml);
        build(&services, &slices, &node())
    }

    fn port_ref(ns: &str, name: &str, port_name: &str, protocol: Protocol) -> ServicePortRef {
        ServicePortRef {
            namespace: ns.into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol,
        }
    }

    fn ep(addr: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            port,
            local: false,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// One Service port as `("ns/name:port_name/PROTO", frontends, endpoints)`.
    type Summary = (String, Vec<(String, FrontendKind)>, Vec<String>);

    /// The model in a form that compact expectations can compare against.
    fn summary(model: &Model) -> Vec<Summary> {
        model
            .services
            .iter()
            .map(|(r, sp)| {
                (
                    format!("{r}/{}", r.protocol),
                    sp.frontends
                        .iter()
                        .map(|f| (SocketAddr::new(f.addr, f.port).to_string(), f.kind))
                        .collect(),
                    sp.endpoints
                        .iter()
                        .map(|e| SocketAddr::new(e.addr, e.port).to_string())
                        .collect(),
                )
            })
            .collect()
    }

    const WEB: &str = "
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}]
";

    /// [`Summary`] spelled with literals.
    type Want = (
        &'static str,
        Vec<(&'static str, FrontendKind)>,
        Vec<&'static str>,
    );

    #[test]
    fn translation_table() {
        use FrontendKind::{ClusterIp as C, External as X, NodePort as N};
        struct Case {
            name: &'static str,
            yaml: String,
            want: Vec<Want>,
        }
        let cases = [
            Case {
                name: "ClusterIP single port",
                yaml: format!(
                    "{WEB}---
metadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.1.10]}}, {{addresses: [10.244.2.10]}}]
"
                ),
                want: vec![(
                    "demo/web:http/TCP",
                    vec![("10.96.0.10:80", C)],
                    vec!["10.244.1.10:8080", "10.244.2.10:8080"],
                )],
            },
            Case {
                name: "multi-port, UDP and a slice port of another protocol",
                yaml: "
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.53
  ports:
    - {name: dns, protocol: UDP, port: 53}
    - {name: dns-tcp, protocol: TCP, port: 53}
---
metadata: {name: dns-1, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
  - {name: dns, protocol: UDP, port: 5353}
  - {name: dns-tcp, port: 5354}
  - {name: dns, protocol: TCP, port: 9999}
endpoints: [{addresses: [10.244.1.11]}]
"
                .to_owned(),
                want: vec![
                    ("default/dns:dns/UDP", vec![("10.96.0.53:53", C)], vec!["10.244.1.11:5353"]),
                    ("default/dns:dns-tcp/TCP", vec![("10.96.0.53:53", C)], vec!["10.244.1.11:5354"]),
                ],
            },
            Case {
                name: "named targetPort resolved differently in two slices; a slice without the port adds nothing",
                yaml: format!(
                    "{WEB}---
metadata: {{name: web-a, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.1.10]}}]
---
metadata: {{name: web-b, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 9090}}]
endpoints: [{{addresses: [10.244.2.10]}}]
---
metadata: {{name: web-c, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: metrics, port: 9100}}]
endpoints: [{{addresses: [10.244.3.10]}}]
---
metadata: {{name: web-d, namespace: other, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 1}}]
endpoints: [{{addresses: [10.244.4.10]}}]
"
                ),
                want: vec![(
                    "demo/web:http/TCP",
                    vec![("10.96.0.10:80", C)],
                    vec!["10.244.1.10:8080", "10.244.2.10:9090"],
                )],
            },
            Case {
                name: "NodePort on every node address of the Service's family",
                yaml: "
metadata: {name: np}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports: [{port: 80, nodePort: 30080}]
"
                .to_owned(),
                want: vec![(
                    "default/np/TCP",
                    vec![("10.96.0.20:80", C), ("192.168.1.10:30080", N)],
                    vec![],
                )],
            },
            Case {
                name: "SingleStack IPv6: IPv6 frontends only, NodePort on the IPv6 node address",
                yaml: "
metadata: {name: v6only}
spec:
  type: LoadBalancer
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIPs: ['fd00:96::40']
  externalIPs: ['fd00:ee::5']
  ports: [{port: 80, nodePort: 30040}]
status: {loadBalancer: {ingress: [{ip: 'fd00:1b::7'}]}}
"
                .to_owned(),
                want: vec![(
                    "default/v6only/TCP",
                    vec![
                        ("[fd00::10]:30040", N),
                        ("[fd00:1b::7]:80", FrontendKind::LoadBalancer),
                        ("[fd00:96::40]:80", C),
                        ("[fd00:ee::5]:80", X),
                    ],
                    vec![],
                )],
            },
            Case {
                name: "PreferDualStack given one family serves that family only",
                yaml: "
metadata: {name: prefer}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv4]
  clusterIPs: [10.96.0.41]
  ports: [{port: 80, nodePort: 30041}]
"
                .to_owned(),
                want: vec![(
                    "default/prefer/TCP",
                    vec![("10.96.0.41:80", C), ("192.168.1.10:30041", N)],
                    vec![],
                )],
            },
            Case {
                name: "RequireDualStack: both families, IPv6 primary, endpoints of both slices",
                yaml: "
metadata: {name: dual}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: 'fd00:96::42'
  clusterIPs: ['fd00:96::42', 10.96.0.42]
  ports: [{port: 80, nodePort: 30042}]
---
metadata: {name: dual-v4, labels: {kubernetes.io/service-name: dual}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.42]}]
---
metadata: {name: dual-v6, labels: {kubernetes.io/service-name: dual}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00:244:1::42']}]
"
                .to_owned(),
                want: vec![(
                    "default/dual/TCP",
                    vec![
                        ("10.96.0.42:80", C),
                        ("192.168.1.10:30042", N),
                        ("[fd00::10]:30042", N),
                        ("[fd00:96::42]:80", C),
                    ],
                    vec!["10.244.1.42:8080", "[fd00:244:1::42]:8080"],
                )],
            },
            Case {
                name: "no clusterIP allocated yet: ipFamilies decide the NodePort's family",
                yaml: "
metadata: {name: pending}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  externalIPs: ['fd00:ee::6']
  ports: [{port: 80, nodePort: 30043}]
"
                .to_owned(),
                want: vec![(
                    "default/pending/TCP",
                    vec![("[fd00::10]:30043", N), ("[fd00:ee::6]:80", X)],
                    vec![],
                )],
            },
            Case {
                name: "nodePort ignored on a ClusterIP Service",
                yaml: "
metadata: {name: np}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80, nodePort: 30080}]
"
                .to_owned(),
                want: vec![("default/np/TCP", vec![("10.96.0.20:80", C)], vec![])],
            },
            Case {
                name: "LoadBalancer ingress and externalIPs; hostname and Proxy-mode ingress skipped",
                yaml: "
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.30, fd00:96::30]
  externalIPs: [203.0.113.5]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer:
    ingress:
      - ip: 198.51.100.7
      - hostname: lb.example.org
      - {ip: 198.51.100.8, ipMode: Proxy}
      - {ip: 198.51.100.9, ipMode: VIP}
"
                .to_owned(),
                want: vec![(
                    "default/lb/TCP",
                    vec![
                        ("10.96.0.30:443", C),
                        ("192.168.1.10:30443", N),
                        ("198.51.100.7:443", FrontendKind::LoadBalancer),
                        ("198.51.100.9:443", FrontendKind::LoadBalancer),
                        ("203.0.113.5:443", X),
                        ("[fd00::10]:30443", N),
                        ("[fd00:96::30]:443", C),
                    ],
                    vec![],
                )],
            },
            Case {
                name: "headless and ExternalName give nothing",
                yaml: "
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
metadata: {name: headless-list}
spec: {clusterIPs: [None], ports: [{port: 80}]}
---
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.org, ports: [{port: 80}]}
---
metadata: {name: headless-1, labels: {kubernetes.io/service-name: headless}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.1.10]}]
"
                .to_owned(),
                want: vec![],
            },
            Case {
                name: "service-proxy-name label skips the Service",
                yaml: "
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: someone-else}}
spec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}
"
                .to_owned(),
                want: vec![],
            },
            Case {
                name: "FQDN slices and unlabelled slices contribute nothing; orphan slices are silent",
                yaml: format!(
                    "{WEB}---
metadata: {{name: web-fqdn, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: FQDN
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [pod.example.org]}}]
---
metadata: {{name: web-nolabel, namespace: demo}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.1.10]}}]
---
metadata: {{name: ghost-1, namespace: demo, labels: {{kubernetes.io/service-name: ghost}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.1.11]}}]
"
                ),
                want: vec![("demo/web:http/TCP", vec![("10.96.0.10:80", C)], vec![])],
            },
            Case {
                name: "IPv6 slice",
                yaml: "
metadata: {name: v6}
spec: {clusterIPs: ['fd00:96::1'], ports: [{port: 80}]}
---
metadata: {name: v6-1, labels: {kubernetes.io/service-name: v6}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00:244::1']}]
"
                .to_owned(),
                want: vec![("default/v6/TCP", vec![("[fd00:96::1]:80", C)], vec!["[fd00:244::1]:8080"])],
            },
        ];
        for case in cases {
            let (model, problems) = run(&case.yaml);
            assert!(
                problems.is_empty(),
                "{}: unexpected problems {problems:?}",
                case.name
            );
            let want: Vec<_> = case
                .want
                .iter()
                .map(|(r, f, e)| {
                    (
                        (*r).to_owned(),
                        f.iter()
                            .map(|(a, k)| ((*a).to_owned(), *k))
                            .collect::<Vec<_>>(),
                        e.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
                    )
                })
                .collect();
            assert_eq!(summary(&model), want, "{}", case.name);
        }
    }

    #[test]
    fn readiness_conditions_and_local_flag() {
        let (model, problems) = run(&format!(
            "{WEB}---
metadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
  - {{addresses: [10.0.0.1], nodeName: node-a}}
  - {{addresses: [10.0.0.2], nodeName: node-b, conditions: {{ready: false}}}}
  - {{addresses: [10.0.0.3], conditions: {{ready: false, serving: true, terminating: true}}}}
  - {{addresses: [10.0.0.4], conditions: {{ready: true, serving: false}}}}
  - {{addresses: [10.0.0.5], conditions: {{}}}}
  - {{addresses: [10.0.0.6], conditions: {{ready: false, serving: false}}}}
"
        ));
        assert!(problems.is_empty(), "{problems:?}");
        let sp = &model.services[&port_ref("demo", "web", "http", Protocol::Tcp)];
        let got: Vec<_> = sp
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addr.to_string(),
                    e.local,
                    e.ready,
                    e.serving,
                    e.terminating,
                )
            })
            .collect();
        let want = [
            ("10.0.0.1", true, true, true, false),
            // `serving` left unset is serving, whatever `ready` says, as
            // kube-proxy reads it.
            ("10.0.0.2", false, false, true, false),
            ("10.0.0.3", false, false, true, true),
            ("10.0.0.4", false, true, false, false),
            ("10.0.0.5", false, true, true, false),
            ("10.0.0.6", false, false, false, false),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(a, l, r, s, t)| ((*a).to_owned(), *l, *r, *s, *t))
            .collect();
        assert_eq!(got, want);
        assert_eq!(sp.active_endpoints().len(), 3);
        // Every listed endpoint that takes no new flows keeps its
        // established ones, whatever its conditions.
        let draining: Vec<String> = sp
            .draining_in(false)
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(draining, ["10.0.0.2", "10.0.0.3", "10.0.0.6"]);
        let local: Vec<String> = sp
            .draining_in(true)
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert!(local.is_empty(), "{local:?}");
    }

    #[test]
    fn addresses_of_another_family_than_the_service_are_ignored_with_a_problem() {
        let (model, problems) = run("
metadata: {name: web, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.1, 'fd00::1']
  ports: [{port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 'fd00::2'}, {ip: 203.0.113.2}]}}
");
        let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "Service demo/web: spec.externalIPs: fd00::1 is an IPv6 address but the Service's IP families are IPv4; that address ignored",
                "Service demo/web: status.loadBalancer.ingress: fd00::2 is an IPv6 address but the Service's IP families are IPv4; that address ignored",
            ]
        );
        let sp = &model.services[&port_ref("demo", "web", "", Protocol::Tcp)];
        let virtual_ips: Vec<String> = sp
            .frontends
            .iter()
            .filter(|f| matches!(f.kind, FrontendKind::External | FrontendKind::LoadBalancer))
            .map(|f| f.addr.to_string())
            .collect();
        assert_eq!(virtual_ips, ["203.0.113.1", "203.0.113.2"]);
    }

    #[test]
    fn address_in_two_slices_counts_once_preferring_ready() {
        for order in [[0, 1], [1, 0]] {
            let slices = [
                "
metadata: {name: web-a, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1], conditions: {ready: false}}, {addresses: [10.0.0.2]}]
",
                "
metadata: {name: web-b, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
",
            ];
            let (model, problems) = run(&format!(
                "{WEB}---{}---{}",
                slices[order[0]], slices[order[1]]
            ));
            assert!(problems.is_empty(), "{problems:?}");
            let sp = &model.services[&port_ref("demo", "web", "http", Protocol::Tcp)];
            assert_eq!(
                sp.endpoints,
                vec![ep("10.0.0.1", 8080), ep("10.0.0.2", 8080)],
                "order {order:?}"
            );
        }
    }

    /// A good Service that every validation case carries along: it must
    /// survive whatever is wrong with its neighbours.
    const GOOD: &str = "
metadata: {name: good}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
metadata: {name: good-1, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
";

    #[test]
    fn validation_problems_leave_the_rest_intact() {
        struct Case {
            name: &'static str,
            yaml: &'static str,
            /// Service ports of `bad` expected in the model.
            kept: &'static [&'static str],
            /// Substrings of the expected problems, as `(object, message)`.
            problems: &'static [(&'static str, &'static str)],
        }
        let cases = [
            Case {
                name: "invalid clusterIP skips that address only",
                yaml: "metadata: {name: bad}\nspec: {clusterIPs: [10.96.0.300, 10.96.0.2], ports: [{port: 80}]}",
                kept: &["default/bad"],
                problems: &[("Service default/bad", "spec.clusterIPs[0] \"10.96.0.300\" is not an IP address")],
            },
            Case {
                name: "invalid clusterIP leaving no frontend skips the port",
                yaml: "metadata: {name: bad}\nspec: {clusterIP: nope, ports: [{port: 80}]}",
                kept: &[],
                problems: &[
                    ("Service default/bad", "spec.clusterIP \"nope\" is not an IP address"),
                    ("Service default/bad", "has no frontend"),
                ],
            },
            Case {
                name: "invalid externalIP and ingress IP",
                yaml: "metadata: {name: bad}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.2, externalIPs: [1.2.3], ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 'x::y::z'}]}}",
                kept: &["default/bad"],
                problems: &[
                    ("Service default/bad", "spec.externalIPs[0] \"1.2.3\" is not an IP address"),
                    ("Service default/bad", "status.loadBalancer.ingress[0].ip \"x::y::z\" is not an IP address"),
                ],
            },
            Case {
                name: "port 0 skips that port only",
                yaml: "metadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{name: a, port: 0}, {name: b, port: 81}]}",
                kept: &["default/bad:b"],
                problems: &[("Service default/bad", "port \"a\" (TCP): port 0 is outside 1-65535; port skipped")],
            },
            Case {
                name: "port out of range",
                yaml: "metadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 70000}]}",
                kept: &[],
                problems: &[("Service default/bad", "port 70000 is outside 1-65535")],
            },
            Case {
                name: "negative nodePort",
                yaml: "metadata: {name: bad}\nspec: {type: NodePort, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: -1}]}",
                kept: &[],
                problems: &[("Service default/bad", "nodePort -1 is outside 1-65535; port skipped")],
            },
            Case {
                name: "unknown protocol",
                yaml: "metadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{name: a, port: 80, protocol: QUIC}, {name: b, port: 81}]}",
                kept: &["default/bad:b"],
                problems: &[("Service default/bad", "spec.ports[0]: unknown protocol \"QUIC\"")],
            },
            Case {
                name: "unknown type",
                yaml: "metadata: {name: bad}\nspec: {type: Magic, clusterIP: 10.96.0.2, ports: [{port: 80}]}",
                kept: &[],
                problems: &[("Service default/bad", "unknown type \"Magic\"")],
            },
            Case {
                name: "repeated port name",
                yaml: "metadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{name: a, port: 80}, {name: a, port: 81}]}",
                kept: &["default/bad:a"],
                problems: &[("Service default/bad", "spec.ports[1]: port \"a\" (TCP) appears twice")],
            },
            Case {
                name: "slice: bad and wrong-family addresses skip only themselves",
                yaml: "metadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n---
metadata: {name: bad-1, labels: {kubernetes.io/service-name: bad}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.999]}, {addresses: ['fd00::1']}, {addresses: [10.0.0.7, 10.0.0.8]}]",
                kept: &["default/bad"],
                problems: &[
                    ("EndpointSlice default/bad-1", "endpoints[0].addresses[0] \"10.0.0.999\" is not an IP address"),
                    ("EndpointSlice default/bad-1", "endpoints[1].addresses[0] \"fd00::1\" is not an IPv4 address"),
                ],
            },
            Case {
                name: "slice: unknown addressType, bad ports",
                yaml: "metadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n---
metadata: {name: bad-1, labels: {kubernetes.io/service-name: bad}}
addressType: IPX
endpoints: [{addresses: [10.0.0.1]}]
---
metadata: {name: bad-2, labels: {kubernetes.io/service-name: bad}}
addressType: IPv4
ports: [{name: a, port: 0}, {name: b}, {name: c, port: 1, protocol: ICMP}]
endpoints: [{addresses: [10.0.0.1]}]",
                kept: &["default/bad"],
                problems: &[
                    ("EndpointSlice default/bad-1", "addressType \"IPX\""),
                    ("EndpointSlice default/bad-2", "ports[0] (\"a\"): port 0 is outside 1-65535"),
                    ("EndpointSlice default/bad-2", "ports[1] (\"b\") has no port number"),
                    ("EndpointSlice default/bad-2", "ports[2]: unknown protocol \"ICMP\""),
                ],
            },
            Case {
                name: "Service without a name",
                yaml: "metadata: {namespace: x}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}",
                kept: &[],
                problems: &[("Service x/", "has no metadata.name")],
            },
            Case {
                name: "conflicting duplicate Service definitions",
                yaml: "metadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n---
metadata: {name: bad}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}",
                kept: &[],
                problems: &[("Service default/bad", "defined 2 times with different contents")],
            },
            Case {
                name: "identical duplicate Service definitions collapse",
                yaml: "metadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n---
metadata: {name: bad}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}",
                kept: &["default/bad"],
                problems: &[],
            },
        ];
        for case in cases {
            let (model, problems) = run(&format!("{GOOD}---\n{}", case.yaml));
            let good = &model.services[&port_ref("default", "good", "", Protocol::Tcp)];
            assert_eq!(
                good.endpoints,
                vec![ep("10.0.0.1", 8080)],
                "{}: the good Service is intact",
                case.name
            );
            let kept: Vec<String> = model
                .services
                .keys()
                .filter(|r| r.name == "bad")
                .map(ToString::to_string)
                .collect();
            assert_eq!(kept, case.kept, "{}", case.name);
            assert_eq!(
                problems.len(),
                case.problems.len(),
                "{}: {problems:#?}",
                case.name
            );
            for (object, message) in case.problems {
                assert!(
                    problems
                        .iter()
                        .any(|p| p.object == *object && p.message.contains(message)),
                    "{}: no problem ({object}, …{message}…) in {problems:#?}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn duplicate_frontend_goes_to_the_first_service_port() {
        let (model, problems) = run("
metadata: {name: b}
spec: {type: NodePort, clusterIP: 10.96.0.5, externalIPs: [203.0.113.1], ports: [{name: web, port: 80, nodePort: 30080}]}
---
metadata: {name: a}
spec: {clusterIP: 10.96.0.6, externalIPs: [203.0.113.1], ports: [{port: 80}]}
---
metadata: {name: c}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80}, {name: udp, port: 80, protocol: UDP}]}
---
metadata: {name: d}
spec: {type: NodePort, clusterIP: 10.96.0.7, ports: [{port: 81, nodePort: 30080}]}
");
        assert_eq!(
            summary(&model),
            vec![
                (
                    "default/a/TCP".to_owned(),
                    vec![
                        ("10.96.0.6:80".to_owned(), FrontendKind::ClusterIp),
                        ("203.0.113.1:80".to_owned(), FrontendKind::External)
                    ],
                    vec![]
                ),
                (
                    "default/b:web/TCP".to_owned(),
                    vec![
                        ("10.96.0.5:80".to_owned(), FrontendKind::ClusterIp),
                        ("192.168.1.10:30080".to_owned(), FrontendKind::NodePort)
                    ],
                    vec![]
                ),
                // The same address:port over UDP is a different frontend.
                (
                    "default/c:udp/UDP".to_owned(),
                    vec![("10.96.0.5:80".to_owned(), FrontendKind::ClusterIp)],
                    vec![]
                ),
                (
                    "default/d/TCP".to_owned(),
                    vec![("10.96.0.7:81".to_owned(), FrontendKind::ClusterIp)],
                    vec![]
                ),
            ]
        );
        let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            vec![
                "Service default/b: port \"web\" (TCP): frontend 203.0.113.1:80/TCP is already used by Service default/a unnamed TCP port; frontend dropped from this port",
                "Service default/c: unnamed TCP port lost every frontend to other Services; port skipped",
                "Service default/c: unnamed TCP port: frontend 10.96.0.5:80/TCP is already used by Service default/b port \"web\" (TCP); frontend dropped from this port",
                "Service default/d: unnamed TCP port: frontend 192.168.1.10:30080/TCP is already used by Service default/b port \"web\" (TCP); frontend dropped from this port",
            ]
        );
    }

    #[test]
    fn frontend_shared_by_two_kinds_of_one_port_is_kept() {
        let (model, problems) = run("
metadata: {name: s}
spec: {type: NodePort, clusterIP: 10.96.0.5, externalIPs: [10.96.0.5, 192.168.1.10], ports: [{port: 30080, nodePort: 30080}]}
");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            model.services.values().next().map(|sp| sp.frontends.len()),
            Some(4)
        );
    }

    #[test]
    fn output_is_independent_of_input_order() {
        let yaml = format!(
            "{WEB}---{GOOD}---
metadata: {{name: web-a, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.0.0.1, 10.0.0.x], conditions: {{ready: false}}}}, {{addresses: [10.0.0.2], nodeName: node-a}}]
---
metadata: {{name: web-b, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.0.0.1], conditions: {{serving: false}}}}, {{addresses: [10.0.0.2], nodeName: node-b}}]
---
metadata: {{name: other, namespace: demo}}
spec: {{clusterIP: 10.96.0.12, externalIPs: [bad], ports: [{{name: http, port: 80}}]}}
---
metadata: {{namespace: demo, name: web}}
spec: {{ports: [{{targetPort: http, port: 80, name: http}}], clusterIP: 10.96.0.10}}
"
        );
        let (services, slices) = objects(&yaml);
        let expected = build(&services, &slices, &node());
        assert!(!expected.1.is_empty(), "the fixture exercises problems too");
        let web = &expected.0.services[&port_ref("demo", "web", "http", Protocol::Tcp)];
        assert_eq!(web.endpoints.len(), 2, "the fixture merges slices too");
        // Every rotation of both lists, each also reversed: cheap, and enough
        // to move every object to the front and the back.
        for s in 0..services.len() {
            for e in 0..slices.len() {
                for reverse in [false, true] {
                    let mut sv = services.clone();
                    let mut sl = slices.clone();
                    sv.rotate_left(s);
                    sl.rotate_left(e);
                    if reverse {
                        sv.reverse();
                        sl.reverse();
                    }
                    assert_eq!(
                        build(&sv, &sl, &node()),
                        expected,
                        "rotation {s}/{e}, reversed {reverse}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_and_default_objects_do_not_panic() {
        let services = [
            Service::default(),
            Service {
                spec: Some(ServiceSpec::default()),
                ..Service::default()
            },
        ];
        let slices = [SliceObject::default()];
        let (model, problems) = build(&services, &slices, &NodeInfo::default());
        assert!(model.services.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn translator_updates_match_a_full_build() {
        // Two Services claiming one frontend (a wins), a slice in its own
        // document, and a Service defined twice differently.
        let a = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\n\
                 spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let b = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns}\n\
                 spec: {clusterIP: 10.96.0.1, ports: [{port: 80}], externalIPs: [10.0.9.9]}\n";
        let b_alone = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns}\n\
                 spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
        let slice = |svc: &str, addr: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {svc}-1, namespace: ns, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{addr}]}}]\n"
            )
        };
        let steps: Vec<Vec<String>> = vec![
            vec![a.into(), slice("a", "10.0.0.1")],
            vec![
                a.into(),
                slice("a", "10.0.0.1"),
                b.into(),
                slice("b", "10.0.0.2"),
            ],
            vec![
                a.into(),
                slice("a", "10.0.0.3"),
                b.into(),
                slice("b", "10.0.0.2"),
            ],
            vec![slice("a", "10.0.0.3"), b.into(), slice("b", "10.0.0.2")],
            vec![b.into(), b_alone.into(), slice("b", "10.0.0.2")],
            vec![b_alone.into(), slice("b", "10.0.0.4"), slice("c", "bad")],
            vec![],
        ];
        let mut t = Translator::new(node());
        let mut before: BTreeMap<Id, String> = BTreeMap::new();
        for docs in &steps {
            let (services, slices) = objects(&docs.join("---\n"));
            let groups = group(&services, &slices);
            // Only identities whose documents changed are updated.
            let now: BTreeMap<Id, String> = groups
                .iter()
                .map(|(id, (s, l))| (id.clone(), format!("{s:?}{l:?}")))
                .collect();
            let changed: Vec<Id> = before
                .keys()
                .chain(now.keys())
                .filter(|id| before.get(*id) != now.get(*id))
                .cloned()
                .collect();
            let old_model = t.model().clone();
            let affected = t.update(&node(), changed, |id| {
                groups.get(id).cloned().unwrap_or_default()
            });
            let (model, problems) = build(&services, &slices, &node());
            assert_eq!(t.model(), &model, "model after {docs:?}");
            assert_eq!(t.problems(), problems, "problems after {docs:?}");
            for r in old_model.services.keys().chain(model.services.keys()) {
                if old_model.services.get(r) != model.services.get(r) {
                    assert!(affected.contains(r), "{r} changed but was not reported");
                }
            }
            before = now;
        }
    }

    /// A Service with three ready endpoints hinted for the zones given
    /// (empty: no hints), one not ready endpoint without hints, and the
    /// model of it on a node in `zone`: the Cluster scope's active and
    /// draining addresses.
    fn zone_scope(hints: [&str; 3], zone: Option<&str>) -> (Vec<String>, Vec<String>) {
        let mut yaml = String::from(
            "metadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{port: 80}]\n\
             endpoints:\n  - {addresses: [10.0.0.9], conditions: {ready: false}}\n",
        );
        for (i, h) in hints.iter().enumerate() {
            let hints = if h.is_empty() {
                String::new()
            } else {
                let zones: Vec<String> = h.split(',').map(|z| format!("{{name: {z}}}")).collect();
                format!(", hints: {{forZones: [{}]}}", zones.join(", "))
            };
            yaml.push_str(&format!("  - {{addresses: [10.0.0.{}]{hints}}}\n", i + 1));
        }
        let (services, slices) = objects(&yaml);
        let node = NodeInfo {
            zone: zone.map(str::to_owned),
            ..node()
        };
        let (model, problems) = build(&services, &slices, &node);
        assert!(problems.is_empty(), "{problems:?}");
        let sp = model.services.values().next().expect("one port");
        let addrs = |v: Vec<&Endpoint>| v.iter().map(|e| e.addr.to_string()).collect();
        (addrs(sp.active_in(false)), addrs(sp.draining_in(false)))
    }

    #[test]
    fn zone_hints_are_followed_only_when_every_ready_endpoint_has_one_and_one_is_for_this_zone() {
        let all = vec!["10.0.0.1".to_owned(), "10.0.0.2".into(), "10.0.0.3".into()];
        // The not-ready endpoint takes no new flows but keeps its
        // established ones, hints or not.
        let none = vec!["10.0.0.9".to_owned()];
        // Every ready endpoint hinted, two for zone a: only those.
        assert_eq!(
            zone_scope(["a", "b", "a"], Some("a")),
            (
                vec!["10.0.0.1".to_owned(), "10.0.0.3".into()],
                vec!["10.0.0.2".to_owned(), "10.0.0.9".into()]
            )
        );
        // An endpoint hinted for several zones serves each.
        assert_eq!(
            zone_scope(["a,b", "b", "c"], Some("b")),
            (
                vec!["10.0.0.1".to_owned(), "10.0.0.2".into()],
                vec!["10.0.0.3".to_owned(), "10.0.0.9".into()]
            )
        );
        // One ready endpoint without a hint: all (the not-ready one's lack
        // of a hint does not count).
        assert_eq!(
            zone_scope(["a", "", "a"], Some("a")),
            (all.clone(), none.clone())
        );
        // No endpoint for this zone: all.
        assert_eq!(
            zone_scope(["a", "b", "a"], Some("c")),
            (all.clone(), none.clone())
        );
        // A node without a zone: all.
        assert_eq!(
            zone_scope(["a", "b", "a"], None),
            (all.clone(), none.clone())
        );
        assert_eq!(zone_scope(["a", "b", "a"], Some("")), (all, none));
    }

    #[test]
    fn zone_hints_leave_the_local_scope_alone() {
        let (services, slices) = objects(
            "metadata: {name: web, namespace: demo}\n\
             spec: {clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{port: 80}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{port: 80}]\nendpoints:\n\
               - {addresses: [10.0.0.1], nodeName: node-a, hints: {forZones: [{name: b}]}}\n\
               - {addresses: [10.0.0.2], nodeName: node-b, hints: {forZones: [{name: a}]}}\n",
        );
        let node = NodeInfo {
            zone: Some("a".into()),
            ..node()
        };
        let (model, _) = build(&services, &slices, &node);
        let sp = model.services.values().next().expect("one port");
        assert_eq!(sp.hinted_zone.as_deref(), Some("a"));
        let local: Vec<String> = sp
            .active_in(true)
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(local, ["10.0.0.1"]);
    }
}
