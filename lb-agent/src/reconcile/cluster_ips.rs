//! ClusterIP addresses as a whole: a packet from a pod or the node to a
//! ClusterIP on a port no Service uses is refused (TCP reset, ICMP port
//! unreachable), as kube-proxy's nftables mode does, instead of being
//! passed to a stack that has no such address.
//!
//! Each address some Service port uses as its ClusterIP has an
//! address-only key in the services map (`ServiceKey::address_only`: port
//! and protocol 0) with a record that leads nowhere; the datapath looks it
//! up only when a packet matched no frontend. Keys are counted per Service
//! port, so a sync touches only the changed ports' addresses, and one
//! address shared by several ports (or, briefly, by a Service being
//! replaced) stays while any of them uses it. Order does not matter for
//! the datapath: a missing key only means "pass", an extra one "refuse"
//! a port that has no frontend anyway.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lb_common::{addr::addr_be, service::SVC_F_CLUSTER_IP, ServiceKey};
use tracing::{debug, warn};

use super::{Record, Report, Store};
use crate::model::{FrontendKind, Model, ServicePort, ServicePortRef};

/// The record of an address-only key: no Service port, no table.
pub(super) const RECORD: Record = Record {
    svc_id: 0,
    slots: None,
    flags: SVC_F_CLUSTER_IP,
    affinity_timeout_s: 0,
};

/// The address-only keys the maps should hold and do hold.
#[derive(Debug, Default)]
pub(super) struct ClusterIps {
    /// The address keys of each Service port, as last applied.
    by_port: HashMap<ServicePortRef, Vec<ServiceKey>>,
    /// How many Service ports use each address key.
    users: BTreeMap<ServiceKey, usize>,
    /// Address keys in the map.
    written: BTreeSet<ServiceKey>,
    /// Whether a full map was reported and has not had room since.
    full_warned: bool,
    /// Keys to settle: those the last plan touched, and those whose
    /// write or delete failed (looked at again by every apply).
    retry: BTreeSet<ServiceKey>,
}

/// The address-only keys of one Service port's ClusterIPs.
fn keys_of(sp: &ServicePort) -> Vec<ServiceKey> {
    let mut keys: Vec<ServiceKey> = sp
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::ClusterIp)
        .map(|f| {
            let (addr, family) = addr_be(f.addr);
            ServiceKey::address_only(addr, family)
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

impl ClusterIps {
    /// Takes an address-only key found in the maps (an earlier agent's):
    /// kept if the model still wants it, deleted at the first full apply
    /// otherwise.
    pub(super) fn adopt(&mut self, key: ServiceKey) {
        self.written.insert(key);
    }

    /// Brings the address keys in line with `model`: all of them when
    /// `changed` is `None`, else only those of the Service ports in it.
    /// Keys nobody uses go first and new ones last, around the frontends'
    /// writes: they share the services map, and at capacity a Service
    /// port's frontends must find the room first.
    pub(super) fn plan(&mut self, model: &Model, changed: Option<&BTreeSet<ServicePortRef>>) {
        let touched = &mut self.retry;
        match changed {
            None => {
                self.by_port.clear();
                self.users.clear();
                touched.extend(self.written.iter().copied());
                for (r, sp) in &model.services {
                    let keys = keys_of(sp);
                    for k in &keys {
                        *self.users.entry(*k).or_insert(0) += 1;
                        touched.insert(*k);
                    }
                    self.by_port.insert(r.clone(), keys);
                }
            }
            Some(changed) => {
                for r in changed {
                    for k in self.by_port.remove(r).unwrap_or_default() {
                        if let Some(n) = self.users.get_mut(&k) {
                            *n = n.saturating_sub(1);
                            if *n == 0 {
                                self.users.remove(&k);
                            }
                        }
                        touched.insert(k);
                    }
                    if let Some(sp) = model.services.get(r) {
                        let keys = keys_of(sp);
                        for k in &keys {
                            *self.users.entry(*k).or_insert(0) += 1;
                            touched.insert(*k);
                        }
                        self.by_port.insert(r.clone(), keys);
                    }
                }
            }
        }
    }

    /// Deletes the planned keys nobody uses any more.
    pub(super) fn remove_unused(&mut self, store: &mut dyn Store, report: &mut Report) {
        self.settle(store, report, false);
    }

    /// Writes the planned keys now in use; what fails (a full map) is
    /// tried again at the next apply.
    pub(super) fn write_wanted(&mut self, store: &mut dyn Store, report: &mut Report) {
        self.settle(store, report, true);
    }

    /// Settles the planned keys whose wish is `wanted`.
    fn settle(&mut self, store: &mut dyn Store, report: &mut Report, wanted: bool) {
        let keys: Vec<ServiceKey> = self
            .retry
            .iter()
            .filter(|k| self.users.contains_key(k) == wanted)
            .copied()
            .collect();
        for key in keys {
            let written = self.written.contains(&key);
            let res = match (wanted, written) {
                (true, false) => store.put_service(key, RECORD).map(|()| {
                    report.writes += 1;
                    self.written.insert(key);
                }),
                (false, true) => store.del_service(key).map(|()| {
                    report.deletes += 1;
                    self.written.remove(&key);
                }),
                _ => Ok(()),
            };
            match res {
                Ok(()) => {
                    self.retry.remove(&key);
                }
                // A full map refuses every other new key too: trying the
                // rest would cost a failing syscall per key at every sync
                // (thousands: most of a one-change sync's time). Not worth
                // failing a Service over: its ports work either way; the
                // keys stay planned for the next apply.
                Err(e) if e.full => {
                    if !self.full_warned {
                        warn!(
                            waiting = self.retry.len(),
                            "ClusterIP address entries not written, so ports no Service uses are not refused at those addresses: {e}"
                        );
                        self.full_warned = true;
                    }
                    return;
                }
                Err(e) => debug!("cannot update a ClusterIP address entry: {e}"),
            }
        }
        if wanted {
            self.full_warned = false;
        }
    }

    /// The address keys in the map (tests).
    #[cfg(test)]
    pub(super) fn written(&self) -> &BTreeSet<ServiceKey> {
        &self.written
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{
        maglev::TableSize,
        model::{Frontend, Protocol},
        reconcile::{MemStore, Reconciler},
    };

    fn port(
        name: &str,
        protocol: Protocol,
        vip: &str,
        number: u16,
    ) -> (ServicePortRef, ServicePort) {
        let r = ServicePortRef {
            namespace: "demo".to_owned(),
            name: "web".to_owned(),
            port_name: name.to_owned(),
            protocol,
        };
        let sp = ServicePort {
            frontends: vec![Frontend {
                addr: vip.parse().expect("test address"),
                port: number,
                kind: FrontendKind::ClusterIp,
            }],
            ..ServicePort::default()
        };
        (r, sp)
    }

    fn addresses(store: &MemStore) -> Vec<String> {
        store
            .snap
            .services
            .iter()
            .filter(|(k, _)| k.is_address_only())
            .map(|(k, v)| {
                assert_eq!(*v, RECORD);
                lb_common::addr::addr_from_be(k.addr_be, k.family).to_string()
            })
            .collect()
    }

    #[test]
    fn an_address_stays_while_any_port_uses_it_and_survives_a_restart() {
        let http = port("http", Protocol::Tcp, "10.96.0.10", 80);
        let dns = port("dns", Protocol::Udp, "10.96.0.10", 53);
        let other = port("other", Protocol::Tcp, "10.96.0.11", 80);
        let mut model = Model {
            services: [http.clone(), dns.clone(), other.clone()]
                .into_iter()
                .collect(),
        };
        let mut store = MemStore::default();
        let mut rec = Reconciler::new(TableSize::Scaled);
        rec.apply(&model, &mut store);
        assert_eq!(addresses(&store), ["10.96.0.10", "10.96.0.11"]);

        // One of two ports of an address leaves: the address stays.
        model.services.remove(&dns.0);
        let changed = BTreeSet::from([dns.0.clone()]);
        rec.apply_changed(&model, &changed, &mut store);
        assert_eq!(addresses(&store), ["10.96.0.10", "10.96.0.11"]);

        // A restarted agent adopts the keys and removes only the gone ones.
        let mut rec = Reconciler::adopt(&store.snap, TableSize::Scaled);
        assert_eq!(rec.cluster_ips.written().len(), 2);
        model.services.remove(&other.0);
        rec.apply(&model, &mut store);
        assert_eq!(addresses(&store), ["10.96.0.10"]);
        model.services.clear();
        let changed = BTreeSet::from([http.0]);
        rec.apply_changed(&model, &changed, &mut store);
        assert!(addresses(&store).is_empty());
        assert!(store.snap.services.is_empty(), "{:?}", store.snap.services);
    }
}
