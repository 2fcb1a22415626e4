//! Health as load balancers read it.
//!
//! [`AgentHealth`] is the agent's own: whether its syncs keep up with the
//! changes it sees and whether this node should still get traffic (not
//! being deleted, not tainted for removal by the cluster autoscaler), as
//! `/healthz` on the health port reports it; `/livez` says only that the
//! process serves.
//!
//! [`HealthServers`] are the `healthCheckNodePort` servers: for each Service
//! with `externalTrafficPolicy: Local`, an HTTP endpoint on the node's
//! addresses that answers 200 while this node has a local endpoint for it
//! and the agent is healthy, and 503 otherwise, so that cloud load
//! balancers send traffic only to nodes that can serve it. The bodies have
//! the shape kube-proxy serves.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::{
    endpoints::{self, Reply},
    model::{Model, Problem},
};

/// How long a change may wait for its sync before the agent counts as
/// unhealthy by default: kube-proxy's, twice its default sync period.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The start of every Problem about a healthCheckNodePort that cannot be
/// bound: the Kubernetes source posts those with kube-proxy's Event reason.
pub const BIND_PROBLEM: &str = "healthCheckNodePort";

/// The agent's health, shared by the run loop (which reports syncs and the
/// Node) and the servers that answer for it. Clones share the state.
#[derive(Clone, Debug)]
pub struct AgentHealth(Arc<Mutex<SyncState>>);

#[derive(Debug)]
struct SyncState {
    timeout: Duration,
    /// When the oldest change not yet in the maps was noticed; the start
    /// counts as one, so an agent that never syncs turns unhealthy too.
    pending_since: Option<Instant>,
    /// The last sync attempt failed as a whole.
    failed: bool,
    /// When the maps last took a sync.
    last_updated: Option<k8s_openapi::jiff::Timestamp>,
    /// Whether this node should get traffic: false while its Node is being
    /// deleted, tainted for deletion, or missing.
    node_eligible: bool,
}

impl AgentHealth {
    /// A starting agent: healthy until its first sync is `timeout` late.
    pub fn new(timeout: Duration) -> Self {
        Self(Arc::new(Mutex::new(SyncState {
            timeout,
            pending_since: Some(Instant::now()),
            failed: false,
            last_updated: None,
            node_eligible: true,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SyncState> {
        // A panicked holder cannot leave the few plain fields half-written.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change was noticed at `since` and is not in the maps yet.
    pub fn queued(&self, since: Instant) {
        let mut s = self.state();
        if s.pending_since.is_none_or(|t| since < t) {
            s.pending_since = Some(since);
        }
    }

    /// A sync reached the maps: everything noticed so far is in.
    pub fn synced(&self) {
        let mut s = self.state();
        s.pending_since = None;
        s.failed = false;
        s.last_updated = Some(k8s_openapi::jiff::Timestamp::now());
    }

    /// A sync failed as a whole: the maps keep their last state.
    pub fn failed(&self) {
        self.state().failed = true;
    }

    /// Records whether this node should get traffic, saying when that changes.
    pub fn set_node_eligible(&self, eligible: bool, why: &str) {
        let mut s = self.state();
        if s.node_eligible != eligible {
            if eligible {
                info!("node eligible for traffic again: /healthz follows the sync alone");
            } else {
                warn!("node not eligible for traffic ({why}): /healthz answers 503");
            }
            s.node_eligible = eligible;
        }
    }

    /// Whether syncs keep up: the last one did not fail and no change has
    /// waited longer than the timeout. What `serviceProxyHealthy` reports.
    pub fn sync_healthy(&self) -> bool {
        let s = self.state();
        !s.failed && s.pending_since.is_none_or(|t| t.elapsed() < s.timeout)
    }

    /// `/healthz`: 200 while syncs keep up and the node is eligible, 503
    /// otherwise, with a JSON body of when the maps were last updated, the
    /// time now and the node's eligibility.
    pub fn healthz(&self) -> Reply {
        self.reply(true)
    }

    /// `/livez`: 200 while the process serves (restarting the agent would
    /// not bring back an API that is away), with the same times as
    /// `/healthz`.
    pub fn livez(&self) -> Reply {
        self.reply(false)
    }

    fn reply(&self, healthz: bool) -> Reply {
        let healthy = self.sync_healthy();
        let (eligible, last) = {
            let s = self.state();
            (s.node_eligible, s.last_updated)
        };
        let now = k8s_openapi::jiff::Timestamp::now();
        // As kube-proxy: a healthy agent reports itself updated now, so a
        // checker that wants a recent `lastUpdated` is not misled by an
        // agent that is idle because nothing changed.
        let last = if healthy { Some(now) } else { last };
        let last = last.map_or_else(|| "null".to_owned(), |t| format!("\"{t}\""));
        let mut body = format!("{{\"lastUpdated\":{last},\"currentTime\":\"{now}\"");
        if healthz {
            body.push_str(&format!(",\"nodeEligible\":{eligible}"));
        }
        body.push('}');
        Reply {
            status: if !healthz || (healthy && eligible) {
                200
            } else {
                503
            },
            content_type: "application/json",
            body,
        }
    }
}

/// Whether a Node should get traffic, and why not: kube-proxy's rule (not
/// while it is being deleted or tainted `ToBeDeletedByClusterAutoscaler`,
/// the cue cloud load balancers use to drain it).
pub fn node_eligibility(node: Option<&k8s_openapi::api::core::v1::Node>) -> Result<(), String> {
    const TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";
    let Some(node) = node else {
        return Err("the Node is not in the API".to_owned());
    };
    if node.metadata.deletion_timestamp.is_some() {
        return Err("the Node is being deleted".to_owned());
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.key == TO_BE_DELETED));
    if tainted {
        return Err(format!("the Node has the {TO_BE_DELETED} taint"));
    }
    Ok(())
}

/// What one health check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
    /// The Service's address families (`true`: IPv4), from its frontends:
    /// the port is served on the node addresses of these families only, as
    /// each family's NodePorts are; empty serves every family.
    pub families: BTreeSet<bool>,
}

/// The health check ports the model asks for, with what each reports.
pub fn desired(model: &Model) -> BTreeMap<u16, Health> {
    let mut out: BTreeMap<u16, (Health, Vec<IpAddr>)> = BTreeMap::new();
    for (r, sp) in &model.services {
        if !sp.external_local || sp.health_check_node_port == 0 {
            continue;
        }
        let entry = out.entry(sp.health_check_node_port).or_insert_with(|| {
            (
                Health {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    local_endpoints: 0,
                    families: BTreeSet::new(),
                },
                Vec::new(),
            )
        });
        entry
            .0
            .families
            .extend(sp.frontends.iter().map(|f| f.addr.is_ipv4()));
        // Endpoints are pods: one pod serving several ports counts once.
        for e in sp.endpoints.iter().filter(|e| e.local && e.ready) {
            if !entry.1.contains(&e.addr) {
                entry.1.push(e.addr);
            }
        }
        entry.0.local_endpoints = entry.1.len();
    }
    out.into_iter().map(|(port, (h, _))| (port, h)).collect()
}

type State = Arc<RwLock<HashMap<u16, Health>>>;

/// The running health check servers.
pub struct HealthServers {
    state: State,
    agent: AgentHealth,
    listeners: HashMap<(IpAddr, u16), JoinHandle<()>>,
}

impl HealthServers {
    /// No servers yet; their answers will include `agent`'s sync health.
    pub fn new(agent: AgentHealth) -> Self {
        Self {
            state: State::default(),
            agent,
            listeners: HashMap::new(),
        }
    }

    /// Serves exactly `want` on each of `addresses`: updates the answers at
    /// once, opens listeners for new ports and closes those of gone ones.
    /// Returns a problem, naming its Service, for each port that cannot be
    /// bound (tried again at every call). Must run inside the tokio runtime.
    pub fn update(&mut self, want: &BTreeMap<u16, Health>, addresses: &[IpAddr]) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Ok(mut state) = self.state.write() {
            *state = want.iter().map(|(p, h)| (*p, h.clone())).collect();
        }
        let keys: Vec<(IpAddr, u16)> = addresses
            .iter()
            .flat_map(|a| {
                want.iter()
                    .filter(|(_, h)| h.families.is_empty() || h.families.contains(&a.is_ipv4()))
                    .map(move |(p, _)| (*a, *p))
            })
            .collect();
        self.listeners.retain(|key, task| {
            let keep = keys.contains(key);
            if !keep {
                task.abort();
                debug!(addr = %key.0, port = key.1, "health check port closed");
            }
            keep
        });
        for key in keys {
            if self.listeners.contains_key(&key) {
                continue;
            }
            let addr = SocketAddr::new(key.0, key.1);
            let listener = match endpoints::bind("healthCheckNodePort", addr) {
                Ok(l) => l,
                Err(e) => {
                    // One taken port must not stop the others; the problem
                    // log and the Event say it once, not at every retry.
                    debug!(%addr, "cannot serve health check port: {e:#}");
                    if let Some(h) = want.get(&key.1) {
                        problems.push(Problem {
                            object: format!("Service {}/{}", h.namespace, h.name),
                            message: format!(
                                "{BIND_PROBLEM} {} cannot be served on {}: {}; load balancers see this node fail the check (tried again at every sync)",
                                key.1,
                                key.0,
                                e.root_cause()
                            ),
                        });
                    }
                    continue;
                }
            };
            debug!(%addr, "health check port open");
            let state = self.state.clone();
            let agent = self.agent.clone();
            let port = key.1;
            let task = endpoints::spawn(listener, move |_path| {
                // Any path answers, as kube-proxy's servers do.
                let health = state.read().ok().and_then(|s| s.get(&port).cloned());
                let healthy = agent.sync_healthy();
                async move { reply(health.as_ref(), healthy) }
            });
            self.listeners.insert(key, task);
        }
        problems
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

/// The HTTP answer for a Service's health, given whether the agent's
/// syncs keep up (`serviceProxyHealthy`): a node whose agent lags may
/// forward to endpoints that are gone, so it fails the check too.
pub fn reply(health: Option<&Health>, proxy_healthy: bool) -> Reply {
    let (status, body) = match health {
        Some(h) => (
            if h.local_endpoints > 0 && proxy_healthy { 200 } else { 503 },
            format!(
                "{{\"service\":{{\"namespace\":{:?},\"name\":{:?}}},\"localEndpoints\":{},\"serviceProxyHealthy\":{proxy_healthy}}}",
                h.namespace, h.name, h.local_endpoints
            ),
        ),
        None => (503, "{\"localEndpoints\":0}".to_string()),
    };
    Reply {
        status,
        content_type: "application/json",
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_200_with_local_endpoints_and_503_without() {
        let h = Health {
            namespace: "demo".into(),
            name: "web".into(),
            local_endpoints: 2,
            families: BTreeSet::from([true]),
        };
        let ok = reply(Some(&h), true);
        assert_eq!(ok.status, 200, "{ok:?}");
        assert_eq!(ok.body, "{\"service\":{\"namespace\":\"demo\",\"name\":\"web\"},\"localEndpoints\":2,\"serviceProxyHealthy\":true}");
        let lagging = reply(Some(&h), false);
        assert_eq!(lagging.status, 503);
        assert!(
            lagging.body.ends_with("\"serviceProxyHealthy\":false}"),
            "{lagging:?}"
        );
        let none = Health {
            local_endpoints: 0,
            ..h
        };
        assert_eq!(reply(Some(&none), true).status, 503);
        assert_eq!(reply(None, true).status, 503);
    }

    fn json(r: &Reply) -> serde_json::Value {
        serde_json::from_str(&r.body).expect("JSON body")
    }

    #[test]
    fn healthz_follows_failed_and_late_syncs_and_the_node_while_livez_stays_200() {
        let h = AgentHealth::new(Duration::from_millis(50));
        // Starting: healthy until the first sync is late.
        assert_eq!(h.healthz().status, 200);
        assert!(json(&h.healthz())["lastUpdated"].is_string());
        std::thread::sleep(Duration::from_millis(60));
        let late = h.healthz();
        assert_eq!(late.status, 503, "{late:?}");
        assert!(json(&late)["lastUpdated"].is_null(), "{late:?}");
        assert_eq!(h.livez().status, 200);
        h.synced();
        assert_eq!(h.healthz().status, 200);
        // A change noticed and not yet synced is fine until it is late.
        h.queued(Instant::now());
        assert!(h.sync_healthy());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!h.sync_healthy());
        h.synced();
        h.failed();
        assert_eq!(h.healthz().status, 503);
        let live = h.livez();
        assert_eq!(live.status, 200);
        assert!(json(&live).get("nodeEligible").is_none(), "{live:?}");
        h.synced();
        h.set_node_eligible(false, "test");
        let drained = h.healthz();
        assert_eq!(drained.status, 503);
        assert_eq!(json(&drained)["nodeEligible"], false);
        assert_eq!(h.livez().status, 200);
        h.set_node_eligible(true, "test");
        let ok = json(&h.healthz());
        assert_eq!(ok["nodeEligible"], true);
        assert_eq!(ok["lastUpdated"], ok["currentTime"]);
    }

    fn node(yaml: &str) -> k8s_openapi::api::core::v1::Node {
        serde_yaml::from_str(yaml).expect("test Node")
    }

    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        assert!(node_eligibility(Some(&node("metadata: {name: a}"))).is_ok());
        let other_taint = "metadata: {name: a}\nspec: {taints: [{key: x, effect: NoSchedule}]}";
        assert!(node_eligibility(Some(&node(other_taint))).is_ok());
        let tainted = "metadata: {name: a}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}]}";
        assert!(node_eligibility(Some(&node(tainted))).is_err());
        let deleting = "metadata: {name: a, deletionTimestamp: '2026-01-01T00:00:00Z'}";
        assert!(node_eligibility(Some(&node(deleting))).is_err());
        assert!(node_eligibility(None).is_err());
    }
}
