//! `lb-agent explain SERVICE`: why a Service answers the way it does on
//! this node, one finding per cause with its fix.
//!
//! The agent keeps, per Service, what its translation decided and why
//! (frontends, endpoints with their conditions, the target port each
//! resolved to, frontends lost to other Services, refusals) and writes it
//! after each sync as one JSON file per Service under [`state_dir`]. A
//! file, rather than a question to the running agent over HTTP, so that
//! `explain` works as the other inspection commands do: while the agent is
//! down, from any network namespace (its metrics port is loopback in the
//! node's), and with nothing listening for it. Files are per Service so a
//! sync writes only the Services it changed. `explain` adds what only the
//! pins know (whether each frontend is programmed now) and, for a client
//! address, what the source ranges and the datapath would do with it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::model::{
    Cidr, Endpoint, FrontendKind, Id, PortNotes, Problem, ServicePort, ServicePortRef, Translator,
};

/// Where the agent keeps its per-Service state: one directory per bpffs
/// directory (one per agent), under `/run/lb/explain`.
pub fn state_dir(bpffs: &Path) -> PathBuf {
    let escaped: String = bpffs
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    Path::new("/run/lb/explain").join(escaped)
}

/// A cause `explain` names, as JSON, the Events' notes and the
/// `lb_service_problems` gauge label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// No EndpointSlice, or only empty ones.
    NoEndpoints,
    /// Endpoints exist but their slices lack the port.
    TargetPortUnresolved,
    /// Endpoints exist and none takes new flows.
    NoneReady,
    /// A Local traffic policy and no endpoint on this node.
    NoLocalEndpoint,
    /// The client of `--from` is outside `loadBalancerSourceRanges`.
    ClientOutsideSourceRanges,
    /// A node address does not serve NodePorts (`--nodeport-addresses`).
    NodeportAddressFiltered,
    /// Another Service port has the frontend.
    FrontendConflict,
    /// The maps had no room (or the datapath cannot carry it).
    Refused,
    /// Invalid input skipped by the translation.
    Invalid,
}

impl Cause {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NoEndpoints => "no_endpoints",
            Cause::TargetPortUnresolved => "target_port_unresolved",
            Cause::NoneReady => "none_ready",
            Cause::NoLocalEndpoint => "no_local_endpoint",
            Cause::ClientOutsideSourceRanges => "client_outside_source_ranges",
            Cause::NodeportAddressFiltered => "nodeport_address_filtered",
            Cause::FrontendConflict => "frontend_conflict",
            Cause::Refused => "refused",
            Cause::Invalid => "invalid",
        }
    }

    /// Whether the agent already reports it as a problem of the sync
    /// (warning log, `lb_sync_problems` or `lb_refused_service_ports`,
    /// NotProgrammed Event).
    pub fn is_sync_problem(self) -> bool {
        matches!(
            self,
            Cause::FrontendConflict | Cause::Refused | Cause::Invalid
        )
    }
}

/// One finding: the cause in the operator's words, and the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The cause.
    pub cause: Cause,
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub fix: String,
}

/// The node as the agent saw it at its last sync.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// `--node-name`.
    pub name: String,
    /// `--iface`.
    pub ifaces: Vec<String>,
    /// Addresses that serve NodePorts.
    pub addresses: Vec<IpAddr>,
    /// Node addresses `--nodeport-addresses` leaves out.
    pub filtered_out: Vec<IpAddr>,
    /// `--nodeport-addresses`.
    pub nodeport_addresses: Vec<String>,
}

/// One frontend of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendState {
    /// `addr:port/PROTO`.
    pub frontend: String,
    /// `ClusterIP`, `NodePort`, `External` or `LoadBalancer`.
    pub kind: String,
    /// Set by `explain` from the pins: whether the datapath has it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed: Option<bool>,
}

/// One endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    /// `addr:port`, the port being the target port it resolved to.
    pub address: String,
    /// On this node.
    pub local: bool,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// Its zone, when the slice says.
    pub zone: Option<String>,
    /// Whether new flows from outside (`external`) and from pods and the
    /// node (`internal`) reach it from this node.
    pub new_flows_external: bool,
    /// See `new_flows_external`.
    pub new_flows_internal: bool,
    /// Why not, when it takes no new flows on one of the two.
    pub why_not: Option<String>,
}

/// One Service port as the agent decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    /// `namespace/name[:port]/PROTO`, as `lb-agent services` prints it.
    pub port: String,
    /// `spec.ports[].name`.
    pub port_name: String,
    /// `spec.ports[].targetPort` as written.
    pub target_port: String,
    /// The port numbers the endpoints resolved it to.
    pub resolved_ports: Vec<u16>,
    /// Whether the port is in the model (false: it lost every frontend).
    pub in_model: bool,
    /// Its frontends (after conflicts).
    pub frontends: Vec<FrontendState>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `loadBalancerSourceRanges`.
    pub source_ranges: Vec<String>,
    /// Its endpoints.
    pub endpoints: Vec<EndpointState>,
    /// What is wrong, with the fix.
    pub findings: Vec<Finding>,
}

/// One Service as the agent decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its ports.
    pub ports: Vec<PortState>,
    /// Findings that concern the whole Service (invalid fields, …).
    pub findings: Vec<Finding>,
    /// Set by `explain` for `--from`: what the datapath does with a client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientState>,
}

/// What a new flow from one client address would meet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientState {
    /// The client address.
    pub from: IpAddr,
    /// Per frontend traced: the frontend, and the backend or why none.
    pub flows: Vec<ClientFlow>,
}

/// One traced flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFlow {
    /// `addr:port/PROTO` of the frontend.
    pub frontend: String,
    /// Admitted by the source ranges (or none apply).
    pub admitted: bool,
    /// The backend a new flow would get (`None`: dropped or refused).
    pub backend: Option<String>,
    /// The datapath's outcome, or why it could not be traced.
    pub outcome: String,
}

fn kind_name(k: FrontendKind) -> &'static str {
    match k {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::External => "External",
        FrontendKind::LoadBalancer => "LoadBalancer",
    }
}

/// How `services` names a Service port: `namespace/name[:port]/PROTO`.
pub fn port_name(r: &ServicePortRef) -> String {
    format!("{r}/{}", r.protocol)
}

/// Builds the state of Service `id` from the translation, with each
/// port's refusal (from the last reconcile) if any; `None` when the
/// translation has nothing of it.
pub fn service_state(
    translator: &Translator,
    id: &Id,
    node: &NodeState,
    refused: &BTreeMap<ServicePortRef, String>,
) -> Option<ServiceState> {
    let notes = translator.notes(id);
    let problems = translator.problems_of(id);
    if notes.is_empty() && problems.is_empty() {
        return None;
    }
    let model = translator.model();
    let ports = notes
        .iter()
        .map(|(r, n)| {
            port_state(
                r,
                model.services.get(r),
                n,
                node,
                refused.get(r).map(String::as_str),
            )
        })
        .collect();
    let findings = problems.iter().map(invalid).collect();
    Some(ServiceState {
        namespace: id.0.clone(),
        name: id.1.clone(),
        ports,
        findings,
        client: None,
    })
}

fn invalid(p: &Problem) -> Finding {
    Finding {
        cause: Cause::Invalid,
        message: format!("{}: {}", p.object, p.message),
        fix: "correct the field named (the rest of the Service is programmed)".to_owned(),
    }
}

/// Why an endpoint takes no new flows in a scope (`local_only`: a Local
/// traffic policy), or `None` when it does.
fn why_not(e: &Endpoint, active: &[&Endpoint], local_only: bool) -> Option<&'static str> {
    if active.contains(&e) {
        return None;
    }
    Some(if local_only && !e.local {
        "on another node (Local traffic policy)"
    } else if e.terminating && e.serving {
        "terminating: keeps its flows, gets no new ones"
    } else if e.terminating {
        "terminating and not serving"
    } else {
        "not ready"
    })
}

/// The state and findings of one port.
fn port_state(
    r: &ServicePortRef,
    sp: Option<&ServicePort>,
    notes: &PortNotes,
    node: &NodeState,
    refused: Option<&str>,
) -> PortState {
    let empty = ServicePort::default();
    let in_model = sp.is_some();
    let sp = sp.unwrap_or(&empty);
    let external_active = sp.active_in(sp.external_local);
    let internal_active = sp.active_in(sp.internal_local);
    let endpoints = sp
        .endpoints
        .iter()
        .map(|e| {
            let ext = why_not(e, &external_active, sp.external_local);
            let int = why_not(e, &internal_active, sp.internal_local);
            let why = match (ext, int) {
                (None, None) => None,
                (Some(a), Some(b)) if a == b => Some(a.to_owned()),
                (Some(a), None) => Some(format!("from outside: {a}")),
                (None, Some(b)) => Some(format!("from pods and the node: {b}")),
                (Some(a), Some(b)) => {
                    Some(format!("from outside: {a}; from pods and the node: {b}"))
                }
            };
            EndpointState {
                address: SocketAddr::new(e.addr, e.port).to_string(),
                local: e.local,
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                zone: sp.topology.get(&e.addr).and_then(|t| t.zone.clone()),
                new_flows_external: ext.is_none(),
                new_flows_internal: int.is_none(),
                why_not: why,
            }
        })
        .collect();
    let resolved_ports: BTreeSet<u16> = sp.endpoints.iter().map(|e| e.port).collect();
    PortState {
        port: port_name(r),
        port_name: r.port_name.clone(),
        target_port: notes.target_port.clone(),
        resolved_ports: resolved_ports.into_iter().collect(),
        in_model,
        frontends: sp
            .frontends
            .iter()
            .map(|f| FrontendState {
                frontend: format!("{}/{}", SocketAddr::new(f.addr, f.port), r.protocol),
                kind: kind_name(f.kind).to_owned(),
                programmed: None,
            })
            .collect(),
        external_local: sp.external_local,
        internal_local: sp.internal_local,
        source_ranges: sp.source_ranges.iter().map(ToString::to_string).collect(),
        endpoints,
        findings: port_findings(r, sp, notes, node, refused),
    }
}

/// What is wrong with one port, each with its fix.
fn port_findings(
    r: &ServicePortRef,
    sp: &ServicePort,
    notes: &PortNotes,
    node: &NodeState,
    refused: Option<&str>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |cause, message: String, fix: &str| {
        out.push(Finding {
            cause,
            message,
            fix: fix.to_owned(),
        });
    };
    if let Some(why) = refused {
        add(
            Cause::Refused,
            format!("refused by the datapath: {why}"),
            "raise the size flag of the map named (--services-size, --backends-size, …) or remove Services; the others keep working",
        );
    }
    for (f, owner) in &notes.lost_frontends {
        add(
            Cause::FrontendConflict,
            format!(
                "frontend {}/{} is also claimed by Service {}, which has it (the first in name order wins)",
                SocketAddr::new(f.addr, f.port),
                r.protocol,
                port_name(owner)
            ),
            "give one of the two Services another address or port",
        );
    }
    let target = if notes.target_port.is_empty() {
        format!("port {:?}", r.port_name)
    } else {
        format!("targetPort '{}'", notes.target_port)
    };
    if notes.slice_endpoints == 0 {
        if notes.has_selector {
            add(
                Cause::NoEndpoints,
                "selector matches no endpoint: no pod is selected (no EndpointSlice has an endpoint), so new connections are refused".to_owned(),
                "compare spec.selector with the pods' labels (kubectl get pods -l …) and check that the pods exist",
            );
        } else {
            add(
                Cause::NoEndpoints,
                "the Service has no selector and no EndpointSlice with an endpoint names it, so new connections are refused".to_owned(),
                "add a selector, or write an EndpointSlice labelled kubernetes.io/service-name with the endpoints",
            );
        }
    } else if notes.unresolved_endpoints > 0 {
        let ports: Vec<&str> = notes.slice_ports.iter().map(String::as_str).collect();
        let scope = if sp.endpoints.is_empty() {
            "any endpoint".to_owned()
        } else {
            format!(
                "{} of the {} endpoints",
                notes.unresolved_endpoints, notes.slice_endpoints
            )
        };
        add(
            Cause::TargetPortUnresolved,
            format!(
                "{target} is not a port of {scope} (their EndpointSlices carry {}), so {}",
                if ports.is_empty() {
                    "no port".to_owned()
                } else {
                    ports.join(", ")
                },
                if sp.endpoints.is_empty() {
                    "new connections are refused"
                } else {
                    "those endpoints get no traffic on this port"
                }
            ),
            "name the container port as targetPort says (ports[].name in the pod spec), or set targetPort to the number the pods listen on",
        );
    }
    if !sp.endpoints.is_empty() && sp.active_endpoints().is_empty() {
        add(
            Cause::NoneReady,
            format!(
                "none of the {} endpoints is ready, so new connections are refused",
                sp.endpoints.len()
            ),
            "find out why the pods are not ready (kubectl describe pod: readiness probe, crash loop)",
        );
    }
    let any_active = !sp.active_endpoints().is_empty();
    let has = |kinds: &[FrontendKind]| sp.frontends.iter().any(|f| kinds.contains(&f.kind));
    if any_active
        && sp.external_local
        && has(&[
            FrontendKind::NodePort,
            FrontendKind::External,
            FrontendKind::LoadBalancer,
        ])
        && sp.active_in(true).is_empty()
    {
        add(
            Cause::NoLocalEndpoint,
            format!(
                "externalTrafficPolicy is Local and no ready endpoint runs on this node ({}), so NodePort, LoadBalancer and external-IP traffic reaching it is dropped",
                node.name
            ),
            "send such traffic only to nodes with an endpoint (a load balancer checking healthCheckNodePort does), or set externalTrafficPolicy: Cluster",
        );
    }
    if any_active
        && sp.internal_local
        && has(&[FrontendKind::ClusterIp])
        && sp.active_in(true).is_empty()
    {
        add(
            Cause::NoLocalEndpoint,
            format!(
                "internalTrafficPolicy is Local and no ready endpoint runs on this node ({}), so pods and the node here get no answer from the ClusterIP",
                node.name
            ),
            "run an endpoint on every node that has clients (a DaemonSet), or set internalTrafficPolicy: Cluster",
        );
    }
    if let Some(np) = notes.node_port {
        for addr in &node.filtered_out {
            add(
                Cause::NodeportAddressFiltered,
                format!(
                    "node address {addr} is outside --nodeport-addresses {}, so NodePort {np} is not served on it",
                    node.nodeport_addresses.join(",")
                ),
                "send NodePort traffic to an address inside --nodeport-addresses, or widen the flag",
            );
        }
    }
    out
}

/// Findings of `--from`: the client address against each port's
/// `loadBalancerSourceRanges`.
pub fn source_range_findings(state: &ServiceState, from: IpAddr) -> Vec<(usize, Finding)> {
    let mut out = Vec::new();
    for (i, p) in state.ports.iter().enumerate() {
        if p.source_ranges.is_empty() {
            continue;
        }
        let ranges: Vec<Cidr> = p
            .source_ranges
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        if ranges.iter().any(|c| c.contains(from)) {
            continue;
        }
        out.push((
            i,
            Finding {
                cause: Cause::ClientOutsideSourceRanges,
                message: format!(
                    "client {from} is outside loadBalancerSourceRanges {}, so its new flows to the LoadBalancer IPs are dropped",
                    p.source_ranges.join(", ")
                ),
                fix: "add a range that holds the client to spec.loadBalancerSourceRanges, or connect from inside one".to_owned(),
            },
        ));
    }
    out
}

/// Whether `from` may reach a frontend of `kind` of port `p`.
pub fn admitted(p: &PortState, kind: &str, from: IpAddr) -> bool {
    kind != "LoadBalancer"
        || p.source_ranges.is_empty()
        || p.source_ranges
            .iter()
            .filter_map(|c| c.parse::<Cidr>().ok())
            .any(|c| c.contains(from))
}

fn file_name(namespace: &str, name: &str) -> String {
    // Namespaces and names are DNS labels: no '_' and no '/'.
    format!("{namespace}_{name}.json")
}

/// Writes the state of one Service (atomically: a reader sees the old or
/// the new file).
pub fn write(dir: &Path, state: &ServiceState) -> Result<()> {
    let path = dir.join(file_name(&state.namespace, &state.name));
    let tmp = dir.join(format!(".{}.tmp", file_name(&state.namespace, &state.name)));
    fs::write(&tmp, serde_json::to_vec(state)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
}

/// Removes the state of a Service that is gone.
pub fn remove(dir: &Path, id: &Id) -> Result<()> {
    let path = dir.join(file_name(&id.0, &id.1));
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Writes the node's state.
pub fn write_node(dir: &Path, node: &NodeState) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("node.json");
    fs::write(&path, serde_json::to_vec(node)?).with_context(|| format!("write {}", path.display()))
}

/// Reads a Service's state and the node's.
pub fn read(dir: &Path, namespace: &str, name: &str) -> Result<(ServiceState, NodeState)> {
    let node_path = dir.join("node.json");
    let node: NodeState = serde_json::from_slice(&fs::read(&node_path).with_context(|| {
        format!(
            "read {}: no agent state here (has an agent with this --bpffs synced since boot?)",
            node_path.display()
        )
    })?)
    .with_context(|| format!("parse {}", node_path.display()))?;
    let path = dir.join(file_name(namespace, name));
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "no Service {namespace}/{name} in the agent's last desired state (is the name right? a Service the agent ignores, such as a headless or ExternalName one, has none)"
        )
    })?;
    let state =
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
    Ok((state, node))
}

/// The report as `explain` prints it.
pub fn table(s: &ServiceState) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Service {}/{}", s.namespace, s.name);
    for f in &s.findings {
        let _ = writeln!(
            out,
            "  ! {}: {} (fix: {})",
            f.cause.as_str(),
            f.message,
            f.fix
        );
    }
    for p in &s.ports {
        let _ = writeln!(
            out,
            "port {}  targetPort {}  resolved to {}{}",
            p.port,
            if p.target_port.is_empty() {
                "(unset)"
            } else {
                &p.target_port
            },
            if p.resolved_ports.is_empty() {
                "nothing".to_owned()
            } else {
                p.resolved_ports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
            match (p.external_local, p.internal_local) {
                (true, true) => "  external and internal policy Local",
                (true, false) => "  externalTrafficPolicy Local",
                (false, true) => "  internalTrafficPolicy Local",
                (false, false) => "",
            }
        );
        if !p.in_model {
            let _ = writeln!(
                out,
                "  not programmed: every frontend belongs to another Service"
            );
        }
        for f in &p.frontends {
            let programmed = match f.programmed {
                Some(true) => "programmed",
                Some(false) => "NOT programmed",
                None => "",
            };
            let _ = writeln!(
                out,
                "  frontend {:<26} {:<12} {programmed}",
                f.frontend, f.kind
            );
        }
        if !p.source_ranges.is_empty() {
            let _ = writeln!(out, "  source ranges {}", p.source_ranges.join(", "));
        }
        if p.endpoints.is_empty() {
            let _ = writeln!(out, "  no endpoints");
        }
        for e in &p.endpoints {
            let conditions = format!(
                "{}{}{}",
                if e.ready { "ready" } else { "not ready" },
                if e.terminating { ",terminating" } else { "" },
                if e.serving { "" } else { ",not serving" },
            );
            let takes = match &e.why_not {
                None => "new flows".to_owned(),
                Some(why) => format!("no new flows: {why}"),
            };
            let _ = writeln!(
                out,
                "  endpoint {:<22} {:<6} {:<22} {takes}",
                e.address,
                if e.local { "local" } else { "remote" },
                conditions
            );
        }
        for f in &p.findings {
            let _ = writeln!(
                out,
                "  ! {}: {} (fix: {})",
                f.cause.as_str(),
                f.message,
                f.fix
            );
        }
        if p.findings.is_empty() && p.in_model {
            let _ = writeln!(out, "  ok: nothing found wrong");
        }
    }
    if let Some(c) = &s.client {
        let _ = writeln!(out, "client {}", c.from);
        for f in &c.flows {
            let _ = writeln!(
                out,
                "  to {:<26} {}  {}{}",
                f.frontend,
                if f.admitted {
                    "admitted"
                } else {
                    "outside the source ranges"
                },
                f.backend
                    .as_ref()
                    .map(|b| format!("backend {b}: "))
                    .unwrap_or_default(),
                f.outcome
            );
        }
    }
    out
}

/// The agent's side: keeps every Service's findings and its state file
/// current, sync after sync, touching only the Services a sync changed.
#[derive(Debug)]
pub struct Diagnosis {
    /// Every Service's port findings, as (port, finding).
    findings: BTreeMap<Id, Vec<(String, Finding)>>,
    /// What the last sync refused.
    refused: BTreeMap<ServicePortRef, String>,
    /// To the thread that writes the state files, in the order of the
    /// syncs. It is not waited for at exit: each file is replaced whole
    /// (written aside, then renamed), and the next agent's first sync
    /// writes them all again.
    writer: Option<std::sync::mpsc::Sender<Vec<FileWork>>>,
}

/// One change of the state directory.
#[derive(Debug)]
enum FileWork {
    /// Remove every file (an earlier agent's may name Services gone since).
    Clear,
    Node(NodeState),
    Service(Box<ServiceState>),
    Remove(Id),
}

/// Does a sync's file work in `dir`; stops at its first failure.
fn apply_work(dir: &Path, work: Vec<FileWork>) -> Result<()> {
    for w in work {
        match w {
            FileWork::Clear => {
                let _ = fs::remove_dir_all(dir);
            }
            FileWork::Node(node) => write_node(dir, &node)?,
            FileWork::Service(state) => write(dir, &state)?,
            FileWork::Remove(id) => remove(dir, &id)?,
        }
    }
    Ok(())
}

impl Diagnosis {
    /// State for the agent pinned under `bpffs`; any state an earlier agent
    /// left is replaced as Services sync. The files are written on a
    /// thread of their own: the first sync writes one per Service (10 000
    /// files took seconds on ext4, which the datapath need not wait for).
    pub fn new(bpffs: &Path) -> Self {
        let dir = state_dir(bpffs);
        let (tx, rx) = std::sync::mpsc::channel::<Vec<FileWork>>();
        let thread = std::thread::Builder::new()
            .name("explain-state".into())
            .spawn(move || {
                // Whether writing failed (warned once until it works again).
                let mut failing = false;
                for work in rx {
                    match apply_work(&dir, work) {
                        Err(e) if !failing => {
                            tracing::warn!(
                                "writing the state `lb-agent explain` reads failed: {e:#}"
                            );
                            failing = true;
                        }
                        Err(_) => {}
                        Ok(()) => failing = false,
                    }
                }
            });
        let writer = match thread {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(
                    "no thread for the state `lb-agent explain` reads, none written: {e}"
                );
                None
            }
        };
        Self {
            findings: BTreeMap::new(),
            refused: BTreeMap::new(),
            writer,
        }
    }

    /// Takes in a sync: `changed` are the Service ports the translation
    /// changed, `refused` what the reconciler refused (every refusal, not
    /// only the changed ones'), by port with the message.
    pub fn update(
        &mut self,
        translator: &Translator,
        changed: &BTreeSet<ServicePortRef>,
        node: &NodeState,
        refused: BTreeMap<ServicePortRef, String>,
        first: bool,
    ) {
        let mut ids: BTreeSet<Id> = changed
            .iter()
            .chain(refused.keys())
            .chain(self.refused.keys())
            .map(|r| (r.namespace.clone(), r.name.clone()))
            .collect();
        let mut work = Vec::new();
        if first {
            // An earlier agent's files may name Services gone since.
            ids.extend(translator.ids().cloned());
            work.push(FileWork::Clear);
        }
        self.refused = refused;
        work.push(FileWork::Node(node.clone()));
        for id in ids {
            match service_state(translator, &id, node, &self.refused) {
                Some(state) => {
                    let found: Vec<(String, Finding)> = state
                        .ports
                        .iter()
                        .flat_map(|p| p.findings.iter().map(|f| (p.port.clone(), f.clone())))
                        .collect();
                    if found.is_empty() {
                        self.findings.remove(&id);
                    } else {
                        self.findings.insert(id, found);
                    }
                    work.push(FileWork::Service(Box::new(state)));
                }
                None => {
                    self.findings.remove(&id);
                    work.push(FileWork::Remove(id));
                }
            }
        }
        if let Some(writer) = &self.writer {
            // Gone only if the thread panicked: the state is then stale,
            // which `explain` shows as an older sync's.
            let _ = writer.send(work);
        }
    }

    /// Service ports with each cause now.
    pub fn counts(&self) -> BTreeMap<Cause, usize> {
        let mut out = BTreeMap::new();
        for found in self.findings.values() {
            let ports: BTreeSet<(&str, Cause)> =
                found.iter().map(|(p, f)| (p.as_str(), f.cause)).collect();
            for (_, cause) in ports {
                *out.entry(cause).or_default() += 1;
            }
        }
        out
    }

    /// The findings the sync's problems do not carry yet, as problems of
    /// their Service, for the Warning Events. A port the sync could not
    /// program (refused, conflict) has its Event already, which is its
    /// headline: its other findings are left to `explain`.
    pub fn problems(&self) -> Vec<Problem> {
        self.findings
            .iter()
            .flat_map(|((namespace, name), found)| {
                let unprogrammed: BTreeSet<&str> = found
                    .iter()
                    .filter(|(_, f)| f.cause.is_sync_problem())
                    .map(|(p, _)| p.as_str())
                    .collect();
                found
                    .iter()
                    .filter(move |(p, f)| {
                        !f.cause.is_sync_problem()
                            && f.cause != Cause::NodeportAddressFiltered
                            && !unprogrammed.contains(p.as_str())
                    })
                    .map(move |(port, f)| Problem {
                        object: format!("Service {namespace}/{name}"),
                        message: format!("{port}: {}; fix: {}", f.message, f.fix),
                    })
            })
            .collect()
    }
}

/// Every cause, for gauges that start at 0.
pub const CAUSES: [Cause; 9] = [
    Cause::NoEndpoints,
    Cause::TargetPortUnresolved,
    Cause::NoneReady,
    Cause::NoLocalEndpoint,
    Cause::ClientOutsideSourceRanges,
    Cause::NodeportAddressFiltered,
    Cause::FrontendConflict,
    Cause::Refused,
    Cause::Invalid,
];

/// `lb-agent explain`: the agent's state of `service` (`namespace/name`,
/// `namespace/name:port` or `name` in `default`), with what the pins under
/// `bpffs` hold and, for `from`, what a new flow from that client meets.
pub fn explain(bpffs: &Path, service: &str, from: Option<IpAddr>) -> Result<ServiceState> {
    let (id, port) = match service.split_once(':') {
        Some((id, port)) => (id, Some(port)),
        None => (service, None),
    };
    let (namespace, name) = id.split_once('/').unwrap_or(("default", id));
    let (mut state, node) = read(&state_dir(bpffs), namespace, name)?;
    if let Some(port) = port {
        state.ports.retain(|p| p.port_name == port);
        if state.ports.is_empty() {
            anyhow::bail!("Service {namespace}/{name} has no port named {port:?}");
        }
    }
    if let Ok(maps) = crate::datapath::maps::Maps::open(bpffs) {
        let views = crate::inspect::services(&maps)?;
        for p in &mut state.ports {
            let mine: BTreeSet<&str> = views
                .iter()
                .filter(|v| v.name == p.port || v.name.starts_with(&format!("{}@", p.port)))
                .flat_map(|v| v.frontends.iter().map(|f| f.frontend.as_str()))
                .collect();
            for f in &mut p.frontends {
                f.programmed = Some(mine.contains(f.frontend.as_str()));
            }
        }
    }
    if let Some(from) = from {
        for (i, f) in source_range_findings(&state, from) {
            state.ports[i].findings.push(f);
        }
        let mut flows = Vec::new();
        for p in &state.ports {
            let mut kinds = BTreeSet::new();
            for f in &p.frontends {
                if !kinds.insert(f.kind.as_str()) {
                    continue;
                }
                flows.push(trace_flow(bpffs, &node, p, f, from));
            }
        }
        state.client = Some(ClientState { from, flows });
    }
    Ok(state)
}

/// What a new flow from `from` to frontend `f` gets, through the datapath's
/// own programs (`lb-agent trace`).
fn trace_flow(
    bpffs: &Path,
    node: &NodeState,
    p: &PortState,
    f: &FrontendState,
    from: IpAddr,
) -> ClientFlow {
    let admitted = admitted(p, &f.kind, from);
    let mut flow = ClientFlow {
        frontend: f.frontend.clone(),
        admitted,
        backend: None,
        outcome: String::new(),
    };
    let (addr, proto) = f.frontend.split_once('/').unwrap_or((&f.frontend, "TCP"));
    let Ok(dst) = addr.parse::<SocketAddr>() else {
        flow.outcome = format!("not traced: {addr} is not an address and port");
        return flow;
    };
    if dst.is_ipv4() != from.is_ipv4() {
        flow.outcome = "not traced: the client is of the other address family".to_owned();
        return flow;
    }
    let req = crate::trace::Request {
        proto: if proto == "UDP" {
            lb_common::proto::UDP
        } else {
            lb_common::proto::TCP
        },
        src: SocketAddr::new(from, 40000),
        dst,
        tcp_flags: 0x02,
        // Traffic from outside arrives on a node interface; ClusterIPs are
        // reached from pods.
        iface: (f.kind != "ClusterIP")
            .then(|| node.ifaces.first().cloned())
            .flatten(),
    };
    match crate::trace::run(bpffs, &req) {
        Ok(r) => {
            flow.backend = r.backend.clone();
            let outcome = r
                .stages
                .last()
                .map(|s| format!("{} ({})", s.outcome.join(","), s.verdict))
                .unwrap_or_default();
            flow.outcome = match r.reason {
                Some(why) => format!("{outcome}; {why}"),
                None => outcome,
            };
        }
        Err(e) => flow.outcome = format!("not traced: {e:#}"),
    }
    flow
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;

    use super::*;
    use crate::model::{group, NodeInfo, SliceObject};

    /// The findings' causes of every port of `name` in `yaml`, on node-a.
    fn causes(yaml: &str, name: &str) -> Vec<Cause> {
        let mut services: Vec<Service> = Vec::new();
        let mut slices: Vec<SliceObject> = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v = serde_yaml::Value::deserialize(doc).expect("yaml");
            if v["kind"] == "Service" {
                services.push(serde_yaml::from_value(v).expect("Service"));
            } else {
                slices.push(serde_yaml::from_value(v).expect("EndpointSlice"));
            }
        }
        let node = NodeInfo {
            name: "node-a".into(),
            addresses: vec!["10.99.0.1".parse().expect("ip")],
            zone: None,
        };
        let mut t = Translator::new(node.clone());
        let groups = group(&services, &slices);
        t.update(&node, groups.keys().cloned(), |id| {
            groups.get(id).cloned().unwrap_or_default()
        });
        let id = ("test".to_owned(), name.to_owned());
        let state =
            service_state(&t, &id, &NodeState::default(), &BTreeMap::new()).expect("a state");
        state
            .ports
            .iter()
            .flat_map(|p| p.findings.iter().map(|f| f.cause))
            .collect()
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: test}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n";

    fn slice(ports: &str, ready: bool, node: &str) -> String {
        format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: test\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: {ports}\nendpoints:\n  - {{addresses: [10.244.1.10], nodeName: {node}, conditions: {{ready: {ready}}}}}\n")
    }

    #[test]
    fn each_endpoint_cause_is_found_and_a_healthy_service_has_none() {
        let http = "[{name: http, port: 8080}]";
        assert_eq!(causes(SVC, "web"), [Cause::NoEndpoints]);
        assert_eq!(
            causes(&format!("{SVC}{}", slice("[]", true, "node-a")), "web"),
            [Cause::TargetPortUnresolved]
        );
        assert_eq!(
            causes(&format!("{SVC}{}", slice(http, false, "node-a")), "web"),
            [Cause::NoneReady]
        );
        assert_eq!(
            causes(&format!("{SVC}{}", slice(http, true, "node-b")), "web"),
            []
        );
        let local = SVC.replace("  ports:", "  internalTrafficPolicy: Local\n  ports:");
        assert_eq!(
            causes(&format!("{local}{}", slice(http, true, "node-b")), "web"),
            [Cause::NoLocalEndpoint]
        );
    }

    #[test]
    fn state_directories_are_one_per_bpffs_directory() {
        assert_eq!(
            state_dir(Path::new("/sys/fs/bpf/lb")),
            Path::new("/run/lb/explain/sys-fs-bpf-lb")
        );
        assert_ne!(
            state_dir(Path::new("/run/a/bpffs")),
            state_dir(Path::new("/run/b/bpffs"))
        );
    }
}
