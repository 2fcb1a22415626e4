//! `healthCheckNodePort` servers: for each Service with
//! `externalTrafficPolicy: Local`, an HTTP endpoint on the node's addresses
//! that answers 200 while this node has a local endpoint for it and 503
//! otherwise, so that cloud load balancers send traffic only to nodes that
//! can serve it. The body has the shape kube-proxy serves.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::{
    endpoints::{self, Reply},
    model::Model,
};

/// What one health check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
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
                },
                Vec::new(),
            )
        });
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
#[derive(Default)]
pub struct HealthServers {
    state: State,
    listeners: HashMap<(IpAddr, u16), JoinHandle<()>>,
}

impl HealthServers {
    /// Serves exactly `want` on each of `addresses`: updates the answers at
    /// once, opens listeners for new ports and closes those of gone ones.
    /// Must run inside the tokio runtime.
    pub fn update(&mut self, want: &BTreeMap<u16, Health>, addresses: &[IpAddr]) {
        if let Ok(mut state) = self.state.write() {
            *state = want.iter().map(|(p, h)| (*p, h.clone())).collect();
        }
        let keys: Vec<(IpAddr, u16)> = addresses
            .iter()
            .flat_map(|a| want.keys().map(move |p| (*a, *p)))
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
                    // One taken port must not stop the others.
                    warn!(%addr, "cannot serve health check port: {e:#}");
                    continue;
                }
            };
            debug!(%addr, "health check port open");
            let state = self.state.clone();
            let port = key.1;
            let task = endpoints::spawn(listener, move |_path| {
                // Any path answers, as kube-proxy's servers do.
                let health = state.read().ok().and_then(|s| s.get(&port).cloned());
                async move { reply(health.as_ref()) }
            });
            self.listeners.insert(key, task);
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

/// The HTTP answer for a Service's health.
pub fn reply(health: Option<&Health>) -> Reply {
    let (status, body) = match health {
        Some(h) => (
            if h.local_endpoints > 0 { 200 } else { 503 },
            format!(
                "{{\"service\":{{\"namespace\":{:?},\"name\":{:?}}},\"localEndpoints\":{},\"serviceProxyHealthy\":true}}",
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
        };
        let ok = reply(Some(&h));
        assert_eq!(ok.status, 200, "{ok:?}");
        assert_eq!(ok.body, "{\"service\":{\"namespace\":\"demo\",\"name\":\"web\"},\"localEndpoints\":2,\"serviceProxyHealthy\":true}");
        let none = Health {
            local_endpoints: 0,
            ..h
        };
        assert_eq!(reply(Some(&none)).status, 503);
        assert_eq!(reply(None).status, 503);
    }
}
