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

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    task::JoinHandle,
};
use tracing::{debug, warn};

use crate::model::Model;

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
            let std_listener = match std::net::TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    // One taken port must not stop the others.
                    warn!(%addr, "cannot serve health check port: {e}");
                    continue;
                }
            };
            let listener = match std_listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(std_listener))
            {
                Ok(l) => l,
                Err(e) => {
                    warn!(%addr, "cannot serve health check port: {e}");
                    continue;
                }
            };
            debug!(%addr, "health check port open");
            self.listeners.insert(
                key,
                tokio::spawn(serve(listener, key.1, self.state.clone())),
            );
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

async fn serve(listener: TcpListener, port: u16, state: State) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            // The request itself does not matter; read what came and answer.
            let mut buf = [0u8; 1024];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut buf)).await;
            let health = state.read().ok().and_then(|s| s.get(&port).cloned());
            let _ = conn.write_all(response(health.as_ref()).as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// The HTTP response for a Service's health.
pub fn response(health: Option<&Health>) -> String {
    let (status, body) = match health {
        Some(h) => (
            if h.local_endpoints > 0 { "200 OK" } else { "503 Service Unavailable" },
            format!(
                "{{\"service\":{{\"namespace\":{:?},\"name\":{:?}}},\"localEndpoints\":{},\"serviceProxyHealthy\":true}}",
                h.namespace, h.name, h.local_endpoints
            ),
        ),
        None => ("503 Service Unavailable", "{\"localEndpoints\":0}".to_string()),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
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
        let ok = response(Some(&h));
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("{\"service\":{\"namespace\":\"demo\",\"name\":\"web\"},\"localEndpoints\":2,\"serviceProxyHealthy\":true}"));
        let none = Health {
            local_endpoints: 0,
            ..h
        };
        assert!(response(Some(&none)).starts_with("HTTP/1.1 503 "));
        assert!(response(None).starts_with("HTTP/1.1 503 "));
    }
}
