//! Turning the desired model into map contents, changing only what differs.
//!
//! Order is what keeps the datapath whole (STYLE.md 7): backends first, then
//! the Service's Maglev table (built whole in a new inner map and swapped in
//! with one update), then the frontend records that point at it, and only
//! then what nobody uses any more. A packet therefore always finds a complete
//! table behind any frontend it matches. Within one apply this holds per
//! Service port while the work is done in phases over all of them, so that
//! the tables go in with a few batch updates (see [`Reconciler::apply`]).
//!
//! The reconciler keeps a mirror of what it wrote. At start it builds that
//! mirror from the maps themselves ([`Reconciler::adopt`]), so a restarted
//! agent compares against reality and rewrites nothing that is already right;
//! a table is recognised by the fingerprint recorded beside it.

mod refusals;
mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use lb_common::{
    family, proto,
    service::{
        BACKEND_F_LOCAL, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL, SVC_F_LOAD_BALANCER, SVC_F_LOCAL_ONLY,
        SVC_F_NODEPORT, SVC_F_SRC_RANGES,
    },
    Backend, BackendId, IpAddrBe, ServiceKey, ServiceValue,
};
use tracing::{debug, warn};

use crate::{
    maglev::{self, TableSize},
    model::{Endpoint, FrontendKind, Model, Problem, Protocol, ServicePort, ServicePortRef},
};

pub use refusals::RefusalLog;
pub use store::{Info, MemStore, Range, Snapshot, Store, StoreError};

/// What the maps should hold for one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DesiredService {
    /// The Service port this table belongs to.
    port: ServicePortRef,
    frontends: BTreeMap<ServiceKey, u32>,
    /// Backends that take new flows.
    backends: Vec<Backend>,
    /// Terminating backends: kept in the backends map so that their
    /// established flows go on, but in no table, so they get no new flows.
    draining: Vec<Backend>,
    /// ClientIP affinity timeout in seconds (0: none).
    affinity_timeout_s: u32,
    /// Source ranges guarding the LoadBalancer frontends.
    ranges: BTreeSet<Range>,
}

/// What the reconciler last wrote for one Service port.
#[derive(Clone, Debug, Default)]
struct AppliedService {
    name: String,
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    /// Fingerprint of the table in place (0: none).
    fingerprint: u64,
    /// Backends the table holds and backends draining: all in use.
    used: Vec<BackendId>,
    /// Backends the table holds: the only ones new flows may go to.
    active: Vec<BackendId>,
    /// Source ranges in the map.
    ranges: BTreeSet<Range>,
}

/// Identity of a backend: the same address and port is one backend id
/// however many Services use it.
type BackendIdentity = (IpAddrBe, u16, u8);

fn identity(b: &Backend) -> BackendIdentity {
    (b.addr_be, b.port_be, b.family)
}

/// Converts an address into the datapath's representation.
pub fn addr_be(addr: IpAddr) -> (IpAddrBe, u8) {
    match addr {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], family::V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let mut w = [0u32; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            (w, family::V6)
        }
    }
}

/// Converts the datapath's representation back into an address.
pub fn addr_from_be(addr: IpAddrBe, fam: u8) -> IpAddr {
    if fam == family::V6 {
        let mut o = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(addr[0].to_ne_bytes())
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
        Protocol::Sctp => proto::SCTP,
    }
}

fn kind_flags(k: FrontendKind) -> u32 {
    match k {
        FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
        FrontendKind::NodePort => SVC_F_NODEPORT,
        FrontendKind::External => SVC_F_EXTERNAL,
        FrontendKind::LoadBalancer => SVC_F_EXTERNAL | SVC_F_LOAD_BALANCER,
    }
}

/// A Service port the reconciler could not program, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// `namespace/name:port/PROTO`.
    pub service: String,
    /// What went wrong.
    pub message: String,
    /// The map that had no room, when that was the reason.
    pub full_map: Option<&'static str>,
}

impl Failure {
    /// The failure as a [`Problem`] of its Service, as sources report them.
    pub fn to_problem(&self) -> Problem {
        // `namespace/name[:port]/PROTO[@local]`: Kubernetes names hold
        // neither `/` nor `:`.
        let (namespace, rest) = self.service.split_once('/').unwrap_or(("", &self.service));
        let name = rest.split([':', '/']).next().unwrap_or_default();
        Problem {
            object: format!("Service {namespace}/{name}"),
            message: format!("{}: {}", self.service, self.message),
        }
    }
}

/// Counts of map operations one apply performed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries written.
    pub writes: usize,
    /// Entries deleted.
    pub deletes: usize,
    /// Service ports that could not be programmed.
    pub failures: Vec<Failure>,
}

/// Keeps the maps equal to the model.
#[derive(Debug)]
pub struct Reconciler {
    table_size: TableSize,
    services: BTreeMap<u32, AppliedService>,
    by_name: HashMap<String, u32>,
    /// Which Service port owns each frontend key.
    owners: BTreeMap<ServiceKey, u32>,
    backends: HashMap<BackendId, Backend>,
    backend_ids: HashMap<BackendIdentity, BackendId>,
    /// How many Service ports use each backend (in a table or draining):
    /// a backend is deleted when its count falls to zero.
    backend_users: HashMap<BackendId, u32>,
    /// Every service id below this is taken: where the search for the
    /// lowest free one starts, so that loading N Services is not O(N²).
    svc_hint: u32,
    /// The same for backend ids.
    backend_hint: u32,
    /// Whether a full apply has compared every Service port with the
    /// maps yet: until then [`Self::apply_changed`] makes a full one.
    synced: bool,
    /// Tables that could not be programmed, with the Service port they
    /// come from: retried at every apply, reported until they succeed.
    failed: BTreeMap<String, (ServicePortRef, Failure)>,
    /// Backends that may have lost their last user during this apply.
    maybe_unused: Vec<BackendId>,
}

/// The name a backend has in Maglev: `address:port`, as every node spells it.
fn maglev_name(b: &Backend) -> String {
    std::net::SocketAddr::new(addr_from_be(b.addr_be, b.family), u16::from_be(b.port_be))
        .to_string()
}

/// Identifies a table: its size and its backends with their ids. Never 0.
fn fingerprint(table_size: u32, backends: &[(String, BackendId)]) -> u64 {
    let mut text = table_size.to_string();
    for (name, id) in backends {
        text.push_str(&format!(" {name}={id}"));
    }
    maglev::hash(maglev::OFFSET_SEED, text.as_bytes()).max(1)
}

/// A table to build: its Service port and its backends, sorted by name.
struct TableJob {
    svc_id: u32,
    size: u32,
    fingerprint: u64,
    active: Vec<(String, BackendId)>,
}

/// Builds the tables of `jobs`, on every core when there are many; jobs
/// with the same fingerprint (the same size and backends) share one build.
fn build_tables(jobs: &[TableJob]) -> Vec<Vec<BackendId>> {
    let build = |job: &TableJob| -> Vec<BackendId> {
        let names: Vec<&str> = job.active.iter().map(|(n, _)| n.as_str()).collect();
        maglev::table(&names, job.size)
            .iter()
            .map(|i| job.active[*i as usize].1)
            .collect()
    };
    let mut first: HashMap<u64, usize> = HashMap::new();
    let unique: Vec<usize> = (0..jobs.len())
        .filter(|i| first.insert(jobs[*i].fingerprint, *i).is_none())
        .collect();
    let built = crate::parallel::map(unique.clone(), 64, |i| build(&jobs[i]));
    let by_fp: HashMap<u64, &Vec<BackendId>> = unique
        .iter()
        .zip(&built)
        .map(|(i, t)| (jobs[*i].fingerprint, t))
        .collect();
    jobs.iter()
        .map(|j| {
            by_fp
                .get(&j.fingerprint)
                .map_or_else(Vec::new, |t| (*t).clone())
        })
        .collect()
}

/// Tables built and written together: bounds the memory a large first
/// sync holds (1024 tables of 16381 slots are 64 MiB) while keeping the
/// kernel's wait to one per batch.
const TABLE_BATCH: usize = 1024;

/// A Service port between the phases of [`Reconciler::apply`]: its
/// backends are written, its table not yet.
struct Prepared<'a> {
    name: &'a String,
    want: &'a DesiredService,
    svc_id: u32,
    /// The id was allocated by this apply (nothing of it is in the maps).
    new: bool,
    active: Vec<(String, BackendId)>,
    used: Vec<BackendId>,
    size: u32,
    fingerprint: u64,
    /// Fingerprint of the table in place.
    old: u64,
    /// Whether the table in place is being replaced by this apply.
    table_written: bool,
}

impl Reconciler {
    /// A reconciler for empty maps, building Maglev tables of `table_size`.
    pub fn new(table_size: impl Into<TableSize>) -> Self {
        Self {
            table_size: table_size.into(),
            services: BTreeMap::new(),
            by_name: HashMap::new(),
            owners: BTreeMap::new(),
            backends: HashMap::new(),
            backend_ids: HashMap::new(),
            backend_users: HashMap::new(),
            svc_hint: 1,
            backend_hint: 1,
            synced: false,
            failed: BTreeMap::new(),
            maybe_unused: Vec::new(),
        }
    }

    /// Builds the mirror from what the maps hold now (left by an earlier agent).
    pub fn adopt(snap: &Snapshot, table_size: impl Into<TableSize>) -> Self {
        let mut r = Self::new(table_size);
        for (id, b) in &snap.backends {
            r.backends.insert(*id, *b);
            r.backend_ids.insert(identity(b), *id);
        }
        for (key, value) in &snap.services {
            let svc = r.services.entry(value.svc_id).or_default();
            svc.frontends.insert(*key, *value);
            r.owners.insert(*key, value.svc_id);
        }
        for (svc_id, info) in &snap.infos {
            let svc = r.services.entry(*svc_id).or_default();
            svc.name.clone_from(&info.name);
            svc.fingerprint = info.table_fingerprint;
            r.by_name.insert(info.name.clone(), *svc_id);
        }
        for (svc_id, ranges) in &snap.ranges {
            r.services
                .entry(*svc_id)
                .or_default()
                .ranges
                .clone_from(ranges);
        }
        // Records without a name cannot be matched to the model: they are
        // removed on the first apply like any other Service that is gone.
        r
    }

    /// Whether new flows of Service port `svc_id` may go to `backend`: what
    /// affinity entries must agree with.
    pub fn is_active(&self, svc_id: u32, backend: BackendId) -> bool {
        self.services
            .get(&svc_id)
            .is_some_and(|s| s.active.contains(&backend))
    }

    /// Number of Service ports currently programmed.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Makes the maps hold `model`, in make-before-break order, comparing
    /// every Service port with what the maps hold.
    ///
    /// In three phases over every Service port that changed: backends;
    /// then all new Maglev tables, written in batches (each write of the
    /// map of maps waits for the kernel, so one per Service would make a
    /// large sync slow); then each Service port's record, source ranges
    /// and frontends. Only then is anything removed that nothing points at
    /// any more.
    pub fn apply(&mut self, model: &Model, store: &mut dyn Store) -> Report {
        self.apply_inner(model, None, store)
    }

    /// [`Self::apply`] for a model that differs from the last one applied
    /// only in the Service ports in `changed` (changed, added or gone):
    /// only those are looked at, so one changed Service among 10 000 costs
    /// one Service's work. The first apply is a full one whatever
    /// `changed` says.
    pub fn apply_changed(
        &mut self,
        model: &Model,
        changed: &BTreeSet<ServicePortRef>,
        store: &mut dyn Store,
    ) -> Report {
        self.apply_inner(model, Some(changed), store)
    }

    fn apply_inner(
        &mut self,
        model: &Model,
        changed: Option<&BTreeSet<ServicePortRef>>,
        store: &mut dyn Store,
    ) -> Report {
        let mut report = Report::default();
        let sctp: Vec<Failure> = model
            .services
            .keys()
            .filter(|r| r.protocol == Protocol::Sctp)
            .map(|r| Failure {
                service: format!("{r}/{}", protocol_name(r.protocol)),
                message: "SCTP is not translated by the datapath yet; port not programmed"
                    .to_owned(),
                full_map: None,
            })
            .collect();

        let full = changed.is_none() || !self.synced;
        self.synced = true;
        // What to write, and the ids of what is gone.
        let (desired, gone) = match changed {
            Some(changed) if !full => {
                // Failed tables are retried at every apply.
                let retry: Vec<ServicePortRef> =
                    self.failed.values().map(|(r, _)| r.clone()).collect();
                let refs: BTreeSet<&ServicePortRef> = changed.iter().chain(&retry).collect();
                let mut desired = BTreeMap::new();
                for r in &refs {
                    if let Some(sp) = model.services.get(*r) {
                        desired.extend(desired_for(r, sp));
                    }
                }
                // A failure not wanted any more is over.
                self.failed.retain(|name, _| desired.contains_key(name));
                let gone: Vec<u32> = refs
                    .iter()
                    .flat_map(|r| table_names(r))
                    .filter(|n| !desired.contains_key(n))
                    .filter_map(|n| self.by_name.get(&n).copied())
                    .collect();
                (desired, gone)
            }
            _ => {
                let desired = desired(model);
                let gone: Vec<u32> = self
                    .services
                    .iter()
                    .filter(|(_, s)| !desired.contains_key(&s.name))
                    .map(|(id, _)| *id)
                    .collect();
                self.failed.clear();
                (desired, gone)
            }
        };

        let wanted: Vec<(&String, &DesiredService)> = desired.iter().collect();
        let refused = self.apply_services(&wanted, store, &mut report);

        let removed = !gone.is_empty();
        for svc_id in gone {
            let name = self.services.get(&svc_id).map(|s| s.name.clone());
            match self.remove_service(svc_id, store, &mut report) {
                Ok(()) => {
                    if let Some(name) = name {
                        self.failed.remove(&name);
                    }
                }
                Err(e) => warn!(svc_id, "cannot remove Service port: {e}"),
            }
        }
        // New Service ports go in before old ones leave, so at capacity a
        // replacement finds the maps full: try the refused ones again now
        // that the gone ones made room, instead of waiting for another sync.
        if removed
            && refused
                .iter()
                .any(|n| self.failed.get(*n).is_some_and(|f| f.1.full_map.is_some()))
        {
            let retry: Vec<(&String, &DesiredService)> = refused
                .iter()
                .filter_map(|n| desired.get_key_value(*n))
                .collect();
            self.apply_services(&retry, store, &mut report);
        }

        // Backends nothing uses any more: those whose last user went in
        // this apply, or, on a full apply, any the maps hold.
        let mut candidates = std::mem::take(&mut self.maybe_unused);
        if full {
            candidates = self.backends.keys().copied().collect();
        }
        for id in candidates {
            if self.backend_users.get(&id).is_some_and(|n| *n > 0)
                || !self.backends.contains_key(&id)
            {
                continue;
            }
            match store.del_backend(id) {
                Ok(()) => {
                    report.deletes += 1;
                    self.backend_hint = self.backend_hint.min(id);
                    self.backend_users.remove(&id);
                    if let Some(b) = self.backends.remove(&id) {
                        self.backend_ids.remove(&identity(&b));
                    }
                }
                Err(e) => warn!(backend = id, "cannot remove backend: {e}"),
            }
        }
        report.failures = sctp;
        report
            .failures
            .extend(self.failed.values().map(|(_, f)| f.clone()));
        report
    }

    /// Programs `wanted` in the three phases of [`Self::apply`]; returns
    /// the names that failed (recorded in `self.failed`).
    fn apply_services<'a>(
        &mut self,
        wanted: &[(&'a String, &'a DesiredService)],
        store: &mut dyn Store,
        report: &mut Report,
    ) -> Vec<&'a String> {
        let mut refused = Vec::new();
        let mut fail =
            |this: &mut Self, name: &'a String, want: &DesiredService, e: &StoreError| {
                // Logged by the caller when the set of failures changes, not on
                // every sync.
                debug!(service = %name, "cannot program Service port: {e}");
                this.failed.insert(
                    name.clone(),
                    (
                        want.port.clone(),
                        Failure {
                            service: name.clone(),
                            message: e.to_string(),
                            full_map: e.full.then_some(e.map),
                        },
                    ),
                );
                refused.push(name);
            };
        for chunk in wanted.chunks(TABLE_BATCH) {
            // Phase 1: ids and backends.
            let mut prepared = Vec::with_capacity(chunk.len());
            for (name, want) in chunk {
                self.failed.remove(*name);
                match self.prepare(name, want, store, report) {
                    Ok(p) => prepared.push(p),
                    Err(e) => fail(self, name, want, &e),
                }
            }
            // Phase 2: the tables that changed, built and written together.
            let (jobs, idx): (Vec<TableJob>, Vec<usize>) = prepared
                .iter()
                .enumerate()
                .filter(|(_, p)| p.fingerprint != 0 && p.fingerprint != p.old)
                .map(|(i, p)| {
                    (
                        TableJob {
                            svc_id: p.svc_id,
                            size: p.size,
                            fingerprint: p.fingerprint,
                            active: p.active.clone(),
                        },
                        i,
                    )
                })
                .unzip();
            let tables: Vec<(u32, Vec<BackendId>)> = jobs
                .iter()
                .map(|j| j.svc_id)
                .zip(build_tables(&jobs))
                .collect();
            drop(jobs);
            let results = store.put_tables(&tables);
            drop(tables);
            let mut ok = vec![true; prepared.len()];
            for (i, res) in idx.into_iter().zip(results) {
                match res {
                    Ok(()) => {
                        report.writes += 1;
                        prepared[i].table_written = true;
                    }
                    Err(e) => {
                        ok[i] = false;
                        let p = &prepared[i];
                        fail(self, p.name, p.want, &e);
                    }
                }
            }
            // Phase 3: records, ranges, frontends; then what they no
            // longer point at.
            for (p, ok) in prepared.into_iter().zip(ok) {
                let (name, want, svc_id, new) = (p.name, p.want, p.svc_id, p.new);
                let written = p.table_written;
                let res = if ok {
                    self.finish(p, store, report)
                } else {
                    Ok(())
                };
                if new && (!ok || res.is_err()) {
                    self.forget_new(svc_id, written, store);
                }
                if let Err(e) = res {
                    fail(self, name, want, &e);
                }
            }
        }
        refused
    }

    /// Phase 1 of one Service port: its id and its backends.
    fn prepare<'a>(
        &mut self,
        name: &'a String,
        want: &'a DesiredService,
        store: &mut dyn Store,
        report: &mut Report,
    ) -> Result<Prepared<'a>, StoreError> {
        let existing = self.by_name.get(name).copied();
        let svc_id = match existing {
            Some(id) => id,
            None => {
                let id = self.allocate_svc_id();
                // Reserved until the record is written (or given back).
                self.services.insert(id, AppliedService::default());
                // An id may be reused: the new Service port starts from
                // zero. Counters are not worth refusing a Service over.
                if let Err(e) = store.reset_stats(id) {
                    debug!(service = name, svc_id = id, "cannot reset counters: {e}");
                }
                id
            }
        };
        let res = (|| {
            let mut active = Vec::with_capacity(want.backends.len());
            for b in &want.backends {
                active.push((maglev_name(b), self.ensure_backend(b, store, report)?));
            }
            active.sort();
            let mut used: Vec<BackendId> = active.iter().map(|(_, id)| *id).collect();
            for b in &want.draining {
                used.push(self.ensure_backend(b, store, report)?);
            }
            Ok((active, used))
        })();
        let (active, used) = match res {
            Ok(v) => v,
            Err(e) => {
                if existing.is_none() {
                    self.forget_new(svc_id, false, store);
                }
                return Err(e);
            }
        };
        let old = self.services.get(&svc_id).map_or(0, |s| s.fingerprint);
        let size = self.table_size.for_backends(active.len());
        let fp = if active.is_empty() {
            0
        } else {
            fingerprint(size, &active)
        };
        // A smaller table replacing a larger one: the frontends first
        // index only what both tables hold, so no packet looks past the
        // end of the new one when it is swapped in.
        if fp != 0 && fp != old {
            if let Some(applied) = self.services.get_mut(&svc_id) {
                for (key, value) in &mut applied.frontends {
                    if value.slot_count > size {
                        let shrunk = ServiceValue {
                            slot_count: size,
                            ..*value
                        };
                        store.put_service(*key, shrunk)?;
                        report.writes += 1;
                        *value = shrunk;
                    }
                }
            }
        }
        Ok(Prepared {
            name,
            want,
            svc_id,
            new: existing.is_none(),
            active,
            used,
            size,
            fingerprint: fp,
            old,
            table_written: false,
        })
    }

    /// Phase 3 of one Service port, after its table is in place.
    fn finish(
        &mut self,
        p: Prepared<'_>,
        store: &mut dyn Store,
        report: &mut Report,
    ) -> Result<(), StoreError> {
        let Prepared {
            name,
            want,
            svc_id,
            new,
            active,
            used,
            size,
            fingerprint: fp,
            old,
            ..
        } = p;
        if new || fp != old {
            store.put_info(
                svc_id,
                &Info {
                    name: name.to_string(),
                    table_fingerprint: fp,
                },
            )?;
            report.writes += 1;
        }
        self.by_name.insert(name.to_string(), svc_id);
        let applied = self.services.entry(svc_id).or_default();
        applied.name = name.to_string();
        applied.fingerprint = fp;
        let old_used = std::mem::replace(&mut applied.used, used.clone());
        applied.active = active.iter().map(|(_, id)| *id).collect();
        for id in &used {
            *self.backend_users.entry(*id).or_insert(0) += 1;
        }
        // Users of the old set are dropped after this Service port's
        // frontends point at the new table; a backend at zero is deleted
        // at the end of the apply.
        for id in old_used {
            if let Some(n) = self.backend_users.get_mut(&id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.maybe_unused.push(id);
                }
            }
        }
        let applied = self.services.entry(svc_id).or_default();

        // New ranges go in before any frontend is guarded by them.
        let new_ranges: Vec<Range> = want.ranges.difference(&applied.ranges).copied().collect();
        for range in new_ranges {
            store.put_range(svc_id, range)?;
            report.writes += 1;
            applied.ranges.insert(range);
        }

        let slot_count = if active.is_empty() { 0 } else { size };
        for (key, flags) in &want.frontends {
            let value = ServiceValue {
                svc_id,
                slot_count,
                flags: *flags,
                affinity_timeout_s: want.affinity_timeout_s,
            };
            if applied.frontends.get(key) != Some(&value) {
                store.put_service(*key, value)?;
                report.writes += 1;
                applied.frontends.insert(*key, value);
                self.owners.insert(*key, svc_id);
            }
        }
        let stale: Vec<ServiceKey> = applied
            .frontends
            .keys()
            .filter(|k| !want.frontends.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            // Another Service port may have taken this frontend over already.
            if self.owners.get(&key) == Some(&svc_id) {
                store.del_service(key)?;
                report.deletes += 1;
                self.owners.remove(&key);
            }
            applied.frontends.remove(&key);
        }
        let stale: Vec<Range> = applied.ranges.difference(&want.ranges).copied().collect();
        for range in stale {
            store.del_range(svc_id, range)?;
            report.deletes += 1;
            applied.ranges.remove(&range);
        }
        // No frontend points at a table any more: drop it.
        if fp == 0 && old != 0 {
            store.del_table(svc_id)?;
            report.deletes += 1;
        }
        debug!(service = name, svc_id, "programmed");
        Ok(())
    }

    /// Gives back the id of a new Service port that could not be
    /// programmed, with the table written for it, if any.
    /// Its record was not written: once it is, the Service port is
    /// known by name and the next apply carries on from what it holds.
    fn forget_new(&mut self, svc_id: u32, table_written: bool, store: &mut dyn Store) {
        if !self
            .services
            .get(&svc_id)
            .is_some_and(|s| s.name.is_empty())
        {
            return;
        }
        if table_written {
            if let Err(e) = store.del_table(svc_id) {
                warn!(
                    svc_id,
                    "cannot remove the table of a refused Service port: {e}"
                );
            }
        }
        self.services.remove(&svc_id);
        self.svc_hint = self.svc_hint.min(svc_id);
    }

    fn remove_service(
        &mut self,
        svc_id: u32,
        store: &mut dyn Store,
        report: &mut Report,
    ) -> Result<(), StoreError> {
        let Some(applied) = self.services.get(&svc_id).cloned() else {
            return Ok(());
        };
        for key in applied.frontends.keys() {
            if self.owners.get(key) == Some(&svc_id) {
                store.del_service(*key)?;
                report.deletes += 1;
                self.owners.remove(key);
            }
        }
        if applied.fingerprint != 0 {
            store.del_table(svc_id)?;
            report.deletes += 1;
        }
        for range in &applied.ranges {
            store.del_range(svc_id, *range)?;
            report.deletes += 1;
        }
        store.del_info(svc_id)?;
        report.deletes += 1;
        for id in &applied.used {
            if let Some(n) = self.backend_users.get_mut(id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.maybe_unused.push(*id);
                }
            }
        }
        self.services.remove(&svc_id);
        self.svc_hint = self.svc_hint.min(svc_id);
        self.by_name.remove(&applied.name);
        debug!(service = %applied.name, svc_id, "removed");
        Ok(())
    }

    fn ensure_backend(
        &mut self,
        b: &Backend,
        store: &mut dyn Store,
        report: &mut Report,
    ) -> Result<BackendId, StoreError> {
        let id = match self.backend_ids.get(&identity(b)) {
            Some(id) => *id,
            None => {
                let id = lowest_free(self.backend_hint, |id| self.backends.contains_key(&id));
                self.backend_hint = id;
                self.backend_ids.insert(identity(b), id);
                // Deleted at the end of the apply if its Service port
                // could not be programmed after all.
                self.maybe_unused.push(id);
                id
            }
        };
        if self.backends.get(&id) != Some(b) {
            if let Err(e) = store.put_backend(id, b) {
                if !self.backends.contains_key(&id) {
                    self.backend_ids.remove(&identity(b));
                }
                return Err(e);
            }
            report.writes += 1;
            self.backends.insert(id, *b);
        }
        Ok(id)
    }

    fn allocate_svc_id(&mut self) -> u32 {
        let id = lowest_free(self.svc_hint, |id| self.services.contains_key(&id));
        self.svc_hint = id;
        id
    }
}

/// The lowest id from `from` up that `taken` says is free.
fn lowest_free(from: u32, taken: impl Fn(u32) -> bool) -> u32 {
    (from.max(1)..).find(|id| !taken(*id)).unwrap_or(u32::MAX)
}

/// Suffix of the table of a Service port's frontends under a Local traffic
/// policy.
pub const LOCAL_SUFFIX: &str = "@local";
/// Suffix of the table of a Service port's IPv6 frontends.
pub const V6_SUFFIX: &str = "@v6";

/// The map-level picture of the model, by table name.
///
/// A Service port is one table per address family of its frontends (an
/// IPv6 table is named with an `@v6` suffix), times two when a Local
/// traffic policy applies to some of its frontends: those lead to a table
/// of this node's endpoints only, named with an `@local` suffix.
fn desired(model: &Model) -> BTreeMap<String, DesiredService> {
    model
        .services
        .iter()
        .flat_map(|(r, sp)| desired_for(r, sp))
        .collect()
}

/// Every name [`desired_for`] may give a table of Service port `r`.
fn table_names(r: &ServicePortRef) -> [String; 4] {
    let base = format!("{r}/{}", protocol_name(r.protocol));
    [
        format!("{base}{LOCAL_SUFFIX}"),
        format!("{base}{V6_SUFFIX}"),
        format!("{base}{LOCAL_SUFFIX}{V6_SUFFIX}"),
        base,
    ]
}

/// The tables of one Service port, by name (see [`desired`]).
fn desired_for(r: &ServicePortRef, sp: &ServicePort) -> Vec<(String, DesiredService)> {
    let mut out = Vec::new();
    {
        let name = format!("{r}/{}", protocol_name(r.protocol));
        if r.protocol == Protocol::Sctp {
            // Carried by the model; `apply` reports it as a failure.
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
                let mut table_name = name.clone();
                if local {
                    table_name.push_str(LOCAL_SUFFIX);
                }
                if fam == family::V6 {
                    table_name.push_str(V6_SUFFIX);
                }
                out.push((
                    table_name,
                    DesiredService {
                        port: r.clone(),
                        frontends,
                        backends: active.iter().filter(same_family).map(backend).collect(),
                        draining: draining.iter().filter(same_family).map(backend).collect(),
                        affinity_timeout_s: sp.affinity_timeout_s,
                        ranges: ranges.clone(),
                    },
                ));
            }
        }
    }
    out
}

/// The protocol as Kubernetes spells it.
fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

#[cfg(test)]
mod tests;
