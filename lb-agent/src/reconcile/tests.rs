use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use lb_common::{
    addr::{addr_be, addr_from_be},
    proto,
};

use super::*;
use crate::maglev::TableSize;
use crate::model::{Endpoint, Frontend, FrontendKind, Protocol, ServicePort, ServicePortRef};

/// A store that checks, after every single operation, that each frontend
/// leads to a complete table of existing backends: what a packet could see
/// at any instant.
#[derive(Default)]
struct CheckedStore {
    inner: MemStore,
    violations: Vec<String>,
}

impl CheckedStore {
    /// A checked store that puts tables where `placement` says.
    fn with_placement(placement: Placement) -> Self {
        Self {
            inner: MemStore::with_placement(placement),
            violations: Vec::new(),
        }
    }

    fn check(&mut self, op: &str) {
        let snap = &self.inner.snap;
        for (key, v) in &snap.services {
            if v.flags & lb_common::service::SVC_F_SRC_RANGES != 0
                && snap
                    .ranges
                    .get(&v.svc_id)
                    .is_none_or(std::collections::BTreeSet::is_empty)
            {
                self.violations
                    .push(format!("after {op}: frontend {key:?} guarded by no range"));
            }
            let Some(slots) = v.slots else {
                continue;
            };
            match snap.tables.get(&slots.table) {
                // A frontend may index fewer slots than its table holds
                // while a table is resized; never more.
                Some(t) if t.len() >= slots.count as usize => {
                    if let Some(id) = t.iter().find(|id| !snap.backends.contains_key(id)) {
                        self.violations.push(format!(
                            "after {op}: frontend {key:?} table names missing backend {id}"
                        ));
                    }
                }
                other => self.violations.push(format!(
                    "after {op}: frontend {key:?} wants {} slots, table {:?}",
                    slots.count,
                    other.map(Vec::len)
                )),
            }
        }
    }
}

macro_rules! checked {
    ($($f:ident($($a:ident: $t:ty),*) -> $r:ty),* $(,)?) => {
        impl Store for CheckedStore {
            $(fn $f(&mut self, $($a: $t),*) -> Result<$r, StoreError> {
                let out = self.inner.$f($($a),*)?;
                self.check(stringify!($f));
                Ok(out)
            })*

            fn put_table(
                &mut self,
                svc_id: u32,
                table: &[BackendId],
            ) -> Result<TableHandle, StoreError> {
                let handle = self.inner.put_table(svc_id, table)?;
                // A store that puts tables in new places must never write
                // into one a frontend reads: a packet would see a mix.
                if !self.inner.tables_in_place()
                    && self
                        .inner
                        .snap
                        .services
                        .values()
                        .any(|r| r.slots.is_some_and(|s| s.table == handle))
                {
                    self.violations.push(format!(
                        "put_table wrote table {handle:?}, which a frontend reads"
                    ));
                }
                self.check("put_table");
                Ok(handle)
            }

            fn tables_in_place(&self) -> bool {
                self.inner.tables_in_place()
            }
        }
    };
}

checked!(
    put_backend(id: BackendId, b: &Backend) -> (),
    del_backend(id: BackendId) -> (),
    del_table(table: TableHandle) -> (),
    put_service(key: ServiceKey, record: Record) -> (),
    del_service(key: ServiceKey) -> (),
    put_info(svc_id: u32, info: &Info) -> (),
    del_info(svc_id: u32) -> (),
    put_range(svc_id: u32, range: Range) -> (),
    del_range(svc_id: u32, range: Range) -> (),
    reset_stats(svc_id: u32) -> (),
);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn svc(name: &str, vip: &str, port: u16, endpoints: &[&str]) -> (ServicePortRef, ServicePort) {
    let r = ServicePortRef {
        namespace: "default".into(),
        name: name.into(),
        port_name: String::new(),
        protocol: Protocol::Tcp,
    };
    let sp = ServicePort {
        frontends: vec![Frontend {
            addr: ip(vip),
            port,
            kind: FrontendKind::ClusterIp,
        }],
        endpoints: endpoints
            .iter()
            .map(|e| Endpoint {
                addr: ip(e),
                port: 8080,
                local: false,
                ready: true,
                serving: true,
                terminating: false,
            })
            .collect(),
        ..ServicePort::default()
    };
    (r, sp)
}

fn model(services: &[(ServicePortRef, ServicePort)]) -> Model {
    Model {
        services: services.iter().cloned().collect(),
    }
}

/// Table size of these tests: small and prime.
const M: u32 = 251;

/// The distinct backends a frontend's table leads to, sorted.
fn frontend_backends(store: &MemStore, vip: &str, port: u16) -> Vec<IpAddr> {
    let (addr, fam) = addr_be(ip(vip));
    let key = ServiceKey {
        addr_be: addr,
        port_be: port.to_be(),
        proto: proto::TCP,
        family: fam,
    };
    let Some(slots) = store.snap.services.get(&key).and_then(|v| v.slots) else {
        return Vec::new();
    };
    let table = store
        .snap
        .tables
        .get(&slots.table)
        .cloned()
        .unwrap_or_default();
    let mut out: Vec<IpAddr> = table
        .iter()
        .map(|id| {
            let b = store.snap.backends[id];
            addr_from_be(b.addr_be, b.family)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn programs_a_service_with_a_full_maglev_table() {
    let mut store = CheckedStore::default();
    let mut r = Reconciler::new(M);
    let m = model(&[svc(
        "web",
        "10.96.0.10",
        80,
        &["10.244.1.10", "10.244.2.10"],
    )]);
    let report = r.apply(&m, &mut store);
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(
        frontend_backends(&store.inner, "10.96.0.10", 80),
        vec![ip("10.244.1.10"), ip("10.244.2.10")]
    );
    assert_eq!(
        store
            .inner
            .snap
            .infos
            .values()
            .next()
            .map(|i| i.name.as_str()),
        Some("default/web/TCP")
    );
    assert_eq!(
        store.inner.snap.tables.values().next().map(Vec::len),
        Some(M as usize)
    );
    assert!(store.violations.is_empty(), "{:?}", store.violations);
}

#[test]
fn applying_the_same_model_twice_writes_nothing() {
    let mut store = CheckedStore::default();
    let mut r = Reconciler::new(M);
    let m = model(&[svc("web", "10.96.0.10", 80, &["10.244.1.10"])]);
    r.apply(&m, &mut store);
    let before = store.inner.ops;
    let report = r.apply(&m, &mut store);
    assert_eq!((report.writes, report.deletes), (0, 0));
    assert_eq!(store.inner.ops, before);
}

#[test]
fn every_change_is_make_before_break() {
    let mut store = CheckedStore::default();
    let mut r = Reconciler::new(M);
    let steps = [
        vec![svc("a", "10.96.0.1", 80, &["10.244.1.10", "10.244.1.11"])],
        vec![svc("a", "10.96.0.1", 80, &["10.244.1.11", "10.244.2.10"])],
        vec![
            svc("a", "10.96.0.1", 80, &[]),
            svc("b", "10.96.0.2", 53, &["10.244.1.10"]),
        ],
        vec![svc("b", "10.96.0.2", 53, &["10.244.1.10", "10.244.1.12"])],
        // The frontend of "a" moves to "c" in one step.
        vec![svc("c", "10.96.0.1", 80, &["10.244.2.11"])],
        vec![],
    ];
    for step in &steps {
        let report = r.apply(&model(step), &mut store);
        assert!(report.failures.is_empty(), "{report:?}");
    }
    assert!(store.violations.is_empty(), "{:?}", store.violations);
    assert_eq!(
        store.inner.snap,
        Snapshot::default(),
        "everything removed at the end"
    );
}

#[test]
fn frontend_taken_over_by_another_service_stays_programmed() {
    let mut store = CheckedStore::default();
    let mut r = Reconciler::new(M);
    r.apply(
        &model(&[svc("a", "10.96.0.1", 80, &["10.244.1.10"])]),
        &mut store,
    );
    r.apply(
        &model(&[svc("z", "10.96.0.1", 80, &["10.244.2.10"])]),
        &mut store,
    );
    assert_eq!(
        frontend_backends(&store.inner, "10.96.0.1", 80),
        vec![ip("10.244.2.10")]
    );
}

#[test]
fn no_ready_endpoint_leaves_an_empty_table() {
    let mut store = CheckedStore::default();
    let mut r = Reconciler::new(M);
    let (rf, mut sp) = svc("a", "10.96.0.1", 80, &["10.244.1.10"]);
    sp.endpoints[0].ready = false;
    r.apply(&model(&[(rf, sp)]), &mut store);
    let v = store
        .inner
        .snap
        .services
        .values()
        .next()
        .expect("frontend kept");
    assert_eq!(
        v.slots, None,
        "a frontend with no endpoint rejects instead of vanishing"
    );
}

#[test]
fn adopting_the_maps_of_an_earlier_agent_changes_nothing() {
    let m = model(&[
        svc("a", "10.96.0.1", 80, &["10.244.1.10", "10.244.2.10"]),
        svc("b", "10.96.0.2", 80, &["10.244.1.10"]),
    ]);
    let mut store = CheckedStore::default();
    Reconciler::new(M).apply(&m, &mut store);
    let mut again = Reconciler::adopt(&store.inner.snap, M);
    let report = again.apply(&m, &mut store);
    assert_eq!((report.writes, report.deletes), (0, 0), "{report:?}");
    assert!(store.violations.is_empty(), "{:?}", store.violations);
}

#[test]
fn source_ranges_are_written_before_and_removed_after_the_frontends_they_guard() {
    let mut store = CheckedStore::default();
    let mut r = Reconciler::new(M);
    let (rf, mut sp) = svc("lb", "10.96.0.1", 80, &["10.244.1.10"]);
    sp.frontends.push(Frontend {
        addr: ip("203.0.113.10"),
        port: 80,
        kind: FrontendKind::LoadBalancer,
    });
    sp.source_ranges = vec![
        "10.0.0.0/8".parse().expect("cidr"),
        "192.168.1.0/24".parse().expect("cidr"),
    ];
    r.apply(&model(&[(rf.clone(), sp.clone())]), &mut store);
    assert_eq!(
        store
            .inner
            .snap
            .ranges
            .values()
            .next()
            .map(std::collections::BTreeSet::len),
        Some(2)
    );
    sp.source_ranges.truncate(1);
    r.apply(&model(&[(rf.clone(), sp.clone())]), &mut store);
    assert_eq!(
        store
            .inner
            .snap
            .ranges
            .values()
            .next()
            .map(std::collections::BTreeSet::len),
        Some(1)
    );
    sp.source_ranges.clear();
    r.apply(&model(&[(rf, sp)]), &mut store);
    assert!(store.inner.snap.ranges.is_empty());
    r.apply(&model(&[]), &mut store);
    assert!(store.violations.is_empty(), "{:?}", store.violations);
    assert_eq!(store.inner.snap, Snapshot::default());
}

/// A store whose frontend and backend maps hold only so many entries, like
/// the kernel's: inserting a new key into a full map fails, replacing an
/// existing one does not.
struct Limited {
    inner: CheckedStore,
    services_max: usize,
    backends_max: usize,
}

fn full(map: &'static str) -> StoreError {
    StoreError {
        op: "insert",
        map,
        message: "map is full".into(),
        full: true,
    }
}

impl Store for Limited {
    fn put_backend(&mut self, id: BackendId, b: &Backend) -> Result<(), StoreError> {
        let backends = &self.inner.inner.snap.backends;
        if !backends.contains_key(&id) && backends.len() >= self.backends_max {
            return Err(full("backends"));
        }
        self.inner.put_backend(id, b)
    }
    fn del_backend(&mut self, id: BackendId) -> Result<(), StoreError> {
        self.inner.del_backend(id)
    }
    fn put_table(&mut self, svc_id: u32, table: &[BackendId]) -> Result<TableHandle, StoreError> {
        self.inner.put_table(svc_id, table)
    }
    fn del_table(&mut self, table: TableHandle) -> Result<(), StoreError> {
        self.inner.del_table(table)
    }
    fn tables_in_place(&self) -> bool {
        self.inner.tables_in_place()
    }
    fn put_service(&mut self, key: ServiceKey, record: Record) -> Result<(), StoreError> {
        let services = &self.inner.inner.snap.services;
        if !services.contains_key(&key) && services.len() >= self.services_max {
            return Err(full("services"));
        }
        self.inner.put_service(key, record)
    }
    fn del_service(&mut self, key: ServiceKey) -> Result<(), StoreError> {
        self.inner.del_service(key)
    }
    fn put_info(&mut self, svc_id: u32, info: &Info) -> Result<(), StoreError> {
        self.inner.put_info(svc_id, info)
    }
    fn del_info(&mut self, svc_id: u32) -> Result<(), StoreError> {
        self.inner.del_info(svc_id)
    }
    fn put_range(&mut self, svc_id: u32, range: Range) -> Result<(), StoreError> {
        self.inner.put_range(svc_id, range)
    }
    fn del_range(&mut self, svc_id: u32, range: Range) -> Result<(), StoreError> {
        self.inner.del_range(svc_id, range)
    }
    fn reset_stats(&mut self, svc_id: u32) -> Result<(), StoreError> {
        self.inner.reset_stats(svc_id)
    }
}

#[test]
fn full_maps_refuse_only_the_service_ports_that_do_not_fit() {
    let mut store = Limited {
        inner: CheckedStore::default(),
        services_max: 2,
        backends_max: 3,
    };
    let mut r = Reconciler::new(M);
    let a = svc("a", "10.96.0.11", 80, &["10.244.1.10"]);
    let b = svc("b", "10.96.0.12", 80, &["10.244.1.11"]);
    let c = svc("c", "10.96.0.13", 80, &["10.244.1.12"]);
    let refused = |report: &Report| -> Vec<(String, Option<&'static str>)> {
        report
            .failures
            .iter()
            .map(|f| (f.service.to_string(), f.full_map))
            .collect()
    };
    let backends = |store: &Limited, vip: &str| frontend_backends(&store.inner.inner, vip, 80);

    let report = r.apply(&model(&[a.clone(), b.clone(), c.clone()]), &mut store);
    assert_eq!(
        refused(&report),
        vec![("default/c/TCP".to_string(), Some("services"))]
    );
    assert_eq!(backends(&store, "10.96.0.11"), vec![ip("10.244.1.10")]);
    assert_eq!(backends(&store, "10.96.0.12"), vec![ip("10.244.1.11")]);
    assert!(backends(&store, "10.96.0.13").is_empty());

    // With room for c's frontend, c goes in; the backends map fills: d,
    // needing two new backends, is refused; a, b and c are untouched.
    let d = svc("d", "10.96.0.14", 80, &["10.244.2.10", "10.244.2.11"]);
    store.services_max = 4;
    let report = r.apply(&model(&[a, b.clone(), c.clone(), d]), &mut store);
    assert_eq!(
        refused(&report),
        vec![("default/d/TCP".to_string(), Some("backends"))]
    );
    assert_eq!(backends(&store, "10.96.0.11"), vec![ip("10.244.1.10")]);
    assert_eq!(backends(&store, "10.96.0.12"), vec![ip("10.244.1.11")]);
    assert_eq!(backends(&store, "10.96.0.13"), vec![ip("10.244.1.12")]);

    // At capacity, replacing a by e works in one sync: e is retried once a
    // has left.
    store.services_max = 3;
    let e = svc("e", "10.96.0.15", 80, &["10.244.1.12"]);
    let report = r.apply(&model(&[b, c, e]), &mut store);
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(backends(&store, "10.96.0.15"), vec![ip("10.244.1.12")]);
    assert!(backends(&store, "10.96.0.11").is_empty());
    assert!(
        store.inner.violations.is_empty(),
        "{:?}",
        store.inner.violations
    );
}

#[test]
fn sctp_ports_are_programmed_like_tcp_and_udp_ones() {
    let mut store = MemStore::default();
    let mut rec = Reconciler::new(M);
    let (tcp_ref, tcp) = svc("web", "10.96.0.10", 80, &["10.0.0.1"]);
    let (mut sctp_ref, sctp) = svc("sig", "10.96.0.11", 3868, &["10.0.0.2"]);
    sctp_ref.protocol = Protocol::Sctp;
    let report = rec.apply(&model(&[(tcp_ref, tcp), (sctp_ref, sctp)]), &mut store);
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(rec.service_count(), 2);
    let (addr, family) = addr_be(ip("10.96.0.11"));
    let key = ServiceKey {
        addr_be: addr,
        port_be: 3868u16.to_be(),
        proto: proto::SCTP,
        family,
    };
    assert!(
        store
            .snap
            .services
            .get(&key)
            .and_then(|v| v.slots)
            .is_some(),
        "the SCTP frontend leads to a table"
    );
}

/// The Service ports whose entries differ between two models.
fn changes(old: &Model, new: &Model) -> BTreeSet<ServicePortRef> {
    old.services
        .keys()
        .chain(new.services.keys())
        .filter(|r| old.services.get(*r) != new.services.get(*r))
        .cloned()
        .collect()
}

/// Every frontend with the backends its table leads to.
fn routes(store: &MemStore) -> BTreeMap<ServiceKey, (u32, Vec<IpAddr>)> {
    store
        .snap
        .services
        .iter()
        .map(|(k, v)| {
            let addr = addr_from_be(k.addr_be, k.family);
            (
                *k,
                (
                    v.slots.map_or(0, |s| s.count),
                    frontend_backends(store, &addr.to_string(), u16::from_be(k.port_be)),
                ),
            )
        })
        .collect()
}

#[test]
fn applying_only_the_changes_matches_a_full_apply_and_resizes_make_before_break() {
    let eps = |n: usize| -> Vec<String> { (0..n).map(|i| format!("10.244.1.{}", i + 1)).collect() };
    let svc_n = |name: &str, vip: &str, n: usize| {
        let e = eps(n);
        let refs: Vec<&str> = e.iter().map(String::as_str).collect();
        svc(name, vip, 80, &refs)
    };
    // Table sizes 251 (2 backends), 1021 (3 to 10), 4093 (11): grown and
    // shrunk again, beside Service ports that come and go.
    let steps = [
        vec![svc_n("a", "10.96.0.1", 2), svc_n("b", "10.96.0.2", 1)],
        vec![svc_n("a", "10.96.0.1", 3), svc_n("b", "10.96.0.2", 1)],
        vec![svc_n("a", "10.96.0.1", 11), svc_n("c", "10.96.0.3", 4)],
        vec![svc_n("a", "10.96.0.1", 2), svc_n("c", "10.96.0.3", 4)],
        vec![svc_n("a", "10.96.0.1", 0), svc_n("c", "10.96.0.3", 5)],
        vec![svc_n("c", "10.96.0.3", 5)],
        vec![],
    ];
    let mut store = CheckedStore::default();
    let mut r = Reconciler::new(TableSize::Scaled);
    let mut last = Model::default();
    for step in &steps {
        let m = model(step);
        let report = r.apply_changed(&m, &changes(&last, &m), &mut store);
        assert!(report.failures.is_empty(), "{report:?}");
        let mut fresh = MemStore::default();
        Reconciler::new(TableSize::Scaled).apply(&m, &mut fresh);
        assert_eq!(routes(&store.inner), routes(&fresh), "after {step:?}");
        assert_eq!(
            store.inner.snap.backends.len(),
            fresh.snap.backends.len(),
            "unused backends are deleted"
        );
        assert_eq!(store.inner.snap.infos.len(), fresh.snap.infos.len());
        last = m;
    }
    assert!(store.violations.is_empty(), "{:?}", store.violations);
    assert_eq!(
        store.inner.snap,
        Snapshot::default(),
        "everything removed at the end"
    );
    // The sizes really changed along the way.
    let m = model(&[svc_n("a", "10.96.0.1", 11)]);
    let mut sized = MemStore::default();
    Reconciler::new(TableSize::Scaled).apply(&m, &mut sized);
    assert_eq!(sized.snap.tables.values().next().map(Vec::len), Some(4093));
}

#[test]
fn a_failed_table_is_retried_by_later_applies_of_other_changes() {
    let mut store = Limited {
        inner: CheckedStore::default(),
        services_max: 1,
        backends_max: 10,
    };
    let mut r = Reconciler::new(M);
    let a = svc("a", "10.96.0.11", 80, &["10.244.1.10"]);
    let b = svc("b", "10.96.0.12", 80, &["10.244.1.11"]);
    let m1 = model(&[a.clone(), b.clone()]);
    let report = r.apply_changed(&m1, &changes(&Model::default(), &m1), &mut store);
    assert_eq!(report.failures.len(), 1, "{report:?}");
    // Room appears; the next apply changes only a, and b goes in too.
    store.services_max = 2;
    let a2 = svc("a", "10.96.0.11", 80, &["10.244.1.12"]);
    let m2 = model(&[a2, b]);
    let report = r.apply_changed(&m2, &changes(&m1, &m2), &mut store);
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(
        frontend_backends(&store.inner.inner, "10.96.0.12", 80),
        vec![ip("10.244.1.11")]
    );
}

/// Tables no Service port's record names: left behind by a change.
fn orphan_tables(store: &MemStore) -> Vec<TableHandle> {
    let named: BTreeSet<TableHandle> = store.snap.infos.values().filter_map(|i| i.table).collect();
    store
        .snap
        .tables
        .keys()
        .filter(|h| !named.contains(h))
        .copied()
        .collect()
}

#[test]
fn tables_that_move_to_a_new_place_are_make_before_break_and_never_left_behind() {
    let eps = |n: usize| -> Vec<String> { (0..n).map(|i| format!("10.244.1.{}", i + 1)).collect() };
    let svc_n = |name: &str, vip: &str, n: usize| {
        let e = eps(n);
        let refs: Vec<&str> = e.iter().map(String::as_str).collect();
        svc(name, vip, 80, &refs)
    };
    // As above, and a frontend moving from one Service port to another: a
    // store that puts every table in a new place (regions of a flat array)
    // sees the same routes as one that replaces tables in place.
    let steps = [
        vec![svc_n("a", "10.96.0.1", 2), svc_n("b", "10.96.0.2", 1)],
        vec![svc_n("a", "10.96.0.1", 3), svc_n("b", "10.96.0.2", 1)],
        vec![svc_n("a", "10.96.0.1", 11), svc_n("c", "10.96.0.3", 4)],
        vec![svc_n("a", "10.96.0.1", 2), svc_n("c", "10.96.0.3", 4)],
        vec![svc_n("a", "10.96.0.1", 0), svc_n("c", "10.96.0.3", 5)],
        vec![svc_n("z", "10.96.0.3", 5)],
        vec![],
    ];
    let mut store = CheckedStore::with_placement(Placement::Fresh);
    let mut r = Reconciler::new(TableSize::Scaled);
    let mut last = Model::default();
    for step in &steps {
        let m = model(step);
        let report = r.apply_changed(&m, &changes(&last, &m), &mut store);
        assert!(report.failures.is_empty(), "{report:?}");
        let mut in_place = MemStore::default();
        Reconciler::new(TableSize::Scaled).apply(&m, &mut in_place);
        assert_eq!(routes(&store.inner), routes(&in_place), "after {step:?}");
        assert_eq!(orphan_tables(&store.inner), vec![], "after {step:?}");
        // A restarted agent finds the tables where they are.
        let mut copy = store.inner.clone();
        let report = Reconciler::adopt(&copy.snap, TableSize::Scaled).apply(&m, &mut copy);
        assert_eq!((report.writes, report.deletes), (0, 0), "after {step:?}");
        last = m;
    }
    assert!(store.violations.is_empty(), "{:?}", store.violations);
    assert_eq!(
        store.inner.snap,
        Snapshot::default(),
        "everything removed at the end"
    );
}

#[test]
fn a_table_moved_by_a_change_that_failed_half_way_goes_once_the_change_is_done() {
    let mut store = Limited {
        inner: CheckedStore::with_placement(Placement::Fresh),
        services_max: 1,
        backends_max: 10,
    };
    let mut r = Reconciler::new(M);
    let (rf, sp) = svc("a", "10.96.0.11", 80, &["10.244.1.10"]);
    r.apply(&model(&[(rf.clone(), sp.clone())]), &mut store);
    // New endpoints (a new table) and a second frontend that does not fit:
    // the first frontend moves to the new table, the second is refused.
    let mut grown = sp.clone();
    grown.endpoints[0].addr = ip("10.244.1.20");
    grown.frontends.push(Frontend {
        addr: ip("10.96.0.12"),
        port: 80,
        kind: FrontendKind::ClusterIp,
    });
    let report = r.apply(&model(&[(rf.clone(), grown.clone())]), &mut store);
    assert_eq!(report.failures.len(), 1, "{report:?}");
    assert_eq!(
        frontend_backends(&store.inner.inner, "10.96.0.11", 80),
        vec![ip("10.244.1.20")]
    );
    store.services_max = 2;
    let report = r.apply(&model(&[(rf, grown)]), &mut store);
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(
        frontend_backends(&store.inner.inner, "10.96.0.12", 80),
        vec![ip("10.244.1.20")]
    );
    assert_eq!(orphan_tables(&store.inner.inner), vec![]);
    assert_eq!(store.inner.inner.snap.tables.len(), 1);
    assert!(
        store.inner.violations.is_empty(),
        "{:?}",
        store.inner.violations
    );
}

#[test]
fn a_removed_backend_stays_marked_not_serving_for_the_grace_and_keeps_its_id() {
    let grace = std::time::Duration::from_millis(200);
    let mut store = CheckedStore::default();
    let mut r = Reconciler::new(M).with_backend_grace(grace);
    let both = model(&[svc(
        "web",
        "10.96.0.10",
        80,
        &["10.244.1.10", "10.244.2.10"],
    )]);
    r.apply(&both, &mut store);
    let id_of = |store: &CheckedStore, a: &str| {
        let (addr, _) = addr_be(ip(a));
        store
            .inner
            .snap
            .backends
            .iter()
            .find(|(_, b)| b.addr_be == addr)
            .map(|(id, b)| (*id, b.flags))
    };
    let (gone_id, _) = id_of(&store, "10.244.2.10").expect("backend written");

    let one = model(&[svc("web", "10.96.0.10", 80, &["10.244.1.10"])]);
    r.apply(&one, &mut store);
    assert_eq!(
        frontend_backends(&store.inner, "10.96.0.10", 80),
        vec![ip("10.244.1.10")],
        "the table no longer names it"
    );
    let (id, flags) = id_of(&store, "10.244.2.10").expect("kept for the grace");
    assert_eq!(id, gone_id);
    assert_ne!(flags & lb_common::service::BACKEND_F_NOT_SERVING, 0);
    let due = r.next_retirement().expect("a deletion is due later");

    // A new backend in the grace does not take the id of the one leaving.
    let other = model(&[svc(
        "web",
        "10.96.0.10",
        80,
        &["10.244.1.10", "10.244.3.10"],
    )]);
    r.apply(&other, &mut store);
    let (new_id, _) = id_of(&store, "10.244.3.10").expect("new backend written");
    assert_ne!(new_id, gone_id);
    assert!(id_of(&store, "10.244.2.10").is_some(), "still in its grace");

    // After the grace, any apply deletes it.
    while std::time::Instant::now() < due {
        std::thread::sleep(due - std::time::Instant::now());
    }
    r.apply(&other, &mut store);
    assert_eq!(
        id_of(&store, "10.244.2.10"),
        None,
        "deleted after the grace"
    );
    assert_eq!(r.next_retirement(), None);
}

#[test]
fn a_backend_back_within_its_grace_keeps_its_id_and_serves_again() {
    let mut store = CheckedStore::default();
    let mut r = Reconciler::new(M).with_backend_grace(std::time::Duration::from_secs(3600));
    let both = model(&[svc(
        "web",
        "10.96.0.10",
        80,
        &["10.244.1.10", "10.244.2.10"],
    )]);
    r.apply(&both, &mut store);
    let before = store.inner.snap.backends.clone();
    r.apply(
        &model(&[svc("web", "10.96.0.10", 80, &["10.244.1.10"])]),
        &mut store,
    );
    r.apply(&both, &mut store);
    assert_eq!(
        store.inner.snap.backends, before,
        "same ids, flags restored"
    );
    assert_eq!(
        frontend_backends(&store.inner, "10.96.0.10", 80),
        vec![ip("10.244.1.10"), ip("10.244.2.10")]
    );
}
