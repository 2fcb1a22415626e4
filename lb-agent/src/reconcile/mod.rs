//! Turning the desired model into map contents, changing only what differs.
//!
//! Order is what keeps the datapath whole (docs/architecture.md, Invariants 3): backends first, then
//! the Service's Maglev table (written whole where the store puts it, see
//! [`Store::put_table`]), then the frontend records that point at it, and
//! only then what nobody uses any more. A packet therefore always finds a
//! complete table behind any frontend it matches. Within one apply this
//! holds per Service port while the work is done in phases over all of
//! them, so that the tables go in with a few batch updates (see
//! [`Reconciler::apply`]).
//!
//! [`lower`](self::lower) turns the model into the tables each Service port
//! needs, named by [`TableId`]; [`tables`](self::tables) builds and
//! fingerprints them; the [`Store`] says where each table lives.
//!
//! The reconciler keeps a mirror of what it wrote. At start it builds that
//! mirror from the maps themselves ([`Reconciler::adopt`]), so a restarted
//! agent compares against reality and rewrites nothing that is already right;
//! a table is recognised by the fingerprint recorded beside it.

mod cluster_ips;
mod lower;
mod store;
mod table_id;
mod tables;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use lb_common::{service::BACKEND_F_NOT_SERVING, Backend, BackendId, IpAddrBe, ServiceKey};
use tracing::{debug, warn};

use self::{
    lower::{desired, desired_for, DesiredService},
    tables::{build_tables, fingerprint, maglev_name, TableJob},
};
use crate::{
    maglev::TableSize,
    model::{Model, Problem, ServicePortRef},
};

pub use lower::{proto_number, protocol_of};
pub use store::{
    Info, MemStore, Placement, Range, Record, Slots, Snapshot, Store, StoreError, TableHandle,
};
pub use table_id::{Family, ParseTableIdError, Scope, TableId};

/// What the reconciler last wrote for one table of a Service port.
#[derive(Clone, Debug, Default)]
struct AppliedService {
    /// Which table it is; `None` for a record whose name does not read
    /// back (removed by the first apply) and for an id an apply reserved.
    id: Option<TableId>,
    frontends: BTreeMap<ServiceKey, Record>,
    /// Fingerprint of the table in place (0: none).
    fingerprint: u64,
    /// Where the table in place is: `Some` exactly when the fingerprint
    /// is not 0.
    table: Option<TableHandle>,
    /// Other tables written for this Service port: one that frontends may
    /// still point at after the table moved, or one written by an apply
    /// that failed before recording it. Deleted once no frontend points
    /// at them.
    retired: BTreeSet<TableHandle>,
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

/// A Service port the reconciler could not program, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The table that could not be programmed.
    pub service: TableId,
    /// What went wrong.
    pub message: String,
    /// The map that had no room, when that was the reason.
    pub full_map: Option<&'static str>,
}

impl Failure {
    /// The failure as a [`Problem`] of its Service, as sources report them.
    pub fn to_problem(&self) -> Problem {
        let port = &self.service.port;
        Problem {
            object: format!("Service {}/{}", port.namespace, port.name),
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
    by_name: HashMap<TableId, u32>,
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
    /// Tables that could not be programmed: retried at every apply,
    /// reported until they succeed.
    failed: BTreeMap<TableId, Failure>,
    /// Backends that may have lost their last user during this apply.
    maybe_unused: Vec<BackendId>,
    /// Backends no Service port uses any more, since when: kept for
    /// [`Self::backend_grace`] before they are deleted.
    retiring: BTreeMap<BackendId, Instant>,
    /// How long a backend nothing uses stays in the map (see
    /// [`Self::with_backend_grace`]).
    backend_grace: Duration,
    /// ClusterIP addresses as a whole (ports no Service uses are refused).
    cluster_ips: cluster_ips::ClusterIps,
}

/// Tables built and written together: bounds the memory a large first
/// sync holds (1024 tables of 16381 slots are 64 MiB) while letting a
/// store write them together.
const TABLE_BATCH: usize = 1024;

/// A Service port between the phases of [`Reconciler::apply`]: its
/// backends are written, its table not yet.
struct Prepared<'a> {
    name: &'a TableId,
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
    /// Where the table in place is.
    old_table: Option<TableHandle>,
    /// Where this apply wrote the new table, if it wrote one.
    table: Option<TableHandle>,
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
            retiring: BTreeMap::new(),
            backend_grace: Duration::ZERO,
            cluster_ips: cluster_ips::ClusterIps::default(),
        }
    }

    /// Keeps a backend that lost its last user in the map for `grace`
    /// before deleting it (the default is none). A packet may have chosen
    /// it from the table just replaced, on another CPU, and a handshake in
    /// flight (a SYN sent to it, its conntrack entry being made) must still
    /// find it when its next packet comes; and its id is not reused
    /// meanwhile, so such a flow never lands on another backend. The
    /// deletion happens at the first apply after the grace
    /// ([`Self::next_retirement`] says when one is needed).
    #[must_use]
    pub fn with_backend_grace(mut self, grace: Duration) -> Self {
        self.backend_grace = grace;
        self
    }

    /// When the earliest backend kept after losing its last user may be
    /// deleted: an apply from then on deletes it.
    pub fn next_retirement(&self) -> Option<Instant> {
        self.retiring
            .values()
            .min()
            .map(|t| *t + self.backend_grace)
    }

    /// Builds the mirror from what the maps hold now (left by an earlier agent).
    pub fn adopt(snap: &Snapshot, table_size: impl Into<TableSize>) -> Self {
        let mut r = Self::new(table_size);
        for (id, b) in &snap.backends {
            r.backends.insert(*id, *b);
            r.backend_ids.insert(identity(b), *id);
        }
        for (key, value) in &snap.services {
            if key.is_address_only() {
                r.cluster_ips.adopt(*key);
                continue;
            }
            let svc = r.services.entry(value.svc_id).or_default();
            svc.frontends.insert(*key, *value);
            r.owners.insert(*key, value.svc_id);
        }
        for (svc_id, info) in &snap.infos {
            let svc = r.services.entry(*svc_id).or_default();
            svc.id = info.name.parse().ok();
            svc.fingerprint = info.table_fingerprint;
            svc.table = info.table;
            if let Some(id) = &svc.id {
                r.by_name.insert(id.clone(), *svc_id);
            }
        }
        for (svc_id, ranges) in &snap.ranges {
            r.services
                .entry(*svc_id)
                .or_default()
                .ranges
                .clone_from(ranges);
        }
        // A table a frontend points at that is not the one recorded (left
        // by an agent stopped half-way through a change) goes once no
        // frontend points at it.
        for svc in r.services.values_mut() {
            for record in svc.frontends.values() {
                if let Some(slots) = record.slots.filter(|s| Some(s.table) != svc.table) {
                    svc.retired.insert(slots.table);
                }
            }
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

    /// The backends the maps hold, as this reconciler wrote them.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.backends.values()
    }

    /// Number of Service ports currently programmed.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Makes the maps hold `model`, in make-before-break order, comparing
    /// every Service port with what the maps hold.
    ///
    /// In three phases over every Service port that changed: backends;
    /// then all new Maglev tables, built on every core and written in
    /// batches; then each Service port's record, source ranges
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

        let full = changed.is_none() || !self.synced;
        self.synced = true;
        // What to write, and the ids of what is gone.
        let (desired, gone) = match changed {
            Some(changed) if !full => {
                // Failed tables are retried at every apply.
                let retry: Vec<ServicePortRef> =
                    self.failed.keys().map(|id| id.port.clone()).collect();
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
                    .flat_map(|r| TableId::all_of(r))
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
                    .filter(|(_, s)| !s.id.as_ref().is_some_and(|id| desired.contains_key(id)))
                    .map(|(id, _)| *id)
                    .collect();
                self.failed.clear();
                (desired, gone)
            }
        };

        let wanted: Vec<(&TableId, &DesiredService)> = desired.iter().collect();
        self.cluster_ips
            .plan(model, if full { None } else { changed });
        let refused = self.apply_services(&wanted, store, &mut report);

        let removed = !gone.is_empty();
        for svc_id in gone {
            let name = self.services.get(&svc_id).and_then(|s| s.id.clone());
            match self.remove_service(svc_id, store, &mut report) {
                Ok(()) => {
                    if let Some(name) = name {
                        self.failed.remove(&name);
                    }
                }
                Err(e) => warn!(svc_id, "cannot remove Service port: {e}"),
            }
        }
        self.cluster_ips.remove_unused(store, &mut report);
        // New Service ports go in before old ones leave, so at capacity a
        // replacement finds the maps full: try the refused ones again now
        // that the gone ones made room, instead of waiting for another sync.
        if removed
            && refused
                .iter()
                .any(|n| self.failed.get(*n).is_some_and(|f| f.full_map.is_some()))
        {
            let retry: Vec<(&TableId, &DesiredService)> = refused
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
        let now = Instant::now();
        for id in candidates {
            if self.backend_users.get(&id).is_some_and(|n| *n > 0) {
                continue;
            }
            let Some(b) = self.backends.get(&id).copied() else {
                continue;
            };
            if self.retiring.contains_key(&id) {
                continue;
            }
            self.retiring.insert(id, now);
            // Kept for TCP flows and handshakes in flight only: a UDP
            // flow takes a live backend with its next datagram, as it
            // would were the backend gone.
            if !self.backend_grace.is_zero() && b.flags & BACKEND_F_NOT_SERVING == 0 {
                let retired = Backend {
                    flags: b.flags | BACKEND_F_NOT_SERVING,
                    ..b
                };
                match store.put_backend(id, &retired) {
                    Ok(()) => {
                        report.writes += 1;
                        self.backends.insert(id, retired);
                    }
                    Err(e) => debug!(backend = id, "cannot mark a removed backend: {e}"),
                }
            }
        }
        let due: Vec<BackendId> = self
            .retiring
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= self.backend_grace)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.retiring.remove(&id);
            // Back in use during the grace (an endpoint removed and added
            // again), or gone already.
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
                Err(e) => {
                    warn!(backend = id, "cannot remove backend: {e}");
                    self.retiring.insert(id, now);
                }
            }
        }
        self.cluster_ips.write_wanted(store, &mut report);
        report.failures.extend(self.failed.values().cloned());
        report
    }

    /// Programs `wanted` in the three phases of [`Self::apply`]; returns
    /// the names that failed (recorded in `self.failed`).
    fn apply_services<'a>(
        &mut self,
        wanted: &[(&'a TableId, &'a DesiredService)],
        store: &mut dyn Store,
        report: &mut Report,
    ) -> Vec<&'a TableId> {
        let mut refused = Vec::new();
        let mut fail = |this: &mut Self, name: &'a TableId, e: &StoreError| {
            // Logged by the caller when the set of failures changes, not on
            // every sync.
            debug!(service = %name, "cannot program Service port: {e}");
            this.failed.insert(
                name.clone(),
                Failure {
                    service: name.clone(),
                    message: e.to_string(),
                    full_map: e.full.then_some(e.map),
                },
            );
            refused.push(name);
        };
        for chunk in wanted.chunks(TABLE_BATCH) {
            // Phase 1: ids and backends, the backends written together.
            let mut prepared = Vec::with_capacity(chunk.len());
            let mut writes = Vec::new();
            for (name, want) in chunk {
                self.failed.remove(*name);
                match self.prepare(name, want, &mut writes, store, report) {
                    Ok(p) => prepared.push(p),
                    Err(e) => fail(self, name, &e),
                }
            }
            if let Some((lost, e)) = self.write_backends(&writes, store, report) {
                let (kept, refused): (Vec<_>, Vec<_>) = prepared
                    .into_iter()
                    .partition(|p| !p.used.iter().any(|id| lost.contains(id)));
                prepared = kept;
                for p in refused {
                    if p.new {
                        self.forget_new(p.svc_id, store);
                    }
                    fail(self, p.name, &e);
                }
            }
            // Phase 2: the tables that changed, built and written together.
            let (jobs, idx): (Vec<TableJob>, Vec<usize>) = prepared
                .iter()
                .enumerate()
                .filter(|(_, p)| {
                    p.fingerprint != 0 && (p.fingerprint != p.old || p.old_table.is_none())
                })
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
                    Ok(handle) => {
                        report.writes += 1;
                        let p = &mut prepared[i];
                        p.table = Some(handle);
                        // Owned from now on, whatever happens to the rest
                        // of this Service port's changes.
                        if let Some(applied) = self.services.get_mut(&p.svc_id) {
                            if applied.table != Some(handle) {
                                applied.retired.insert(handle);
                            }
                        }
                    }
                    Err(e) => {
                        ok[i] = false;
                        fail(self, prepared[i].name, &e);
                    }
                }
            }
            // Phase 3: records, ranges, frontends; then what they no
            // longer point at.
            for (p, ok) in prepared.into_iter().zip(ok) {
                let (name, svc_id, new) = (p.name, p.svc_id, p.new);
                let res = if ok {
                    self.finish(p, store, report)
                } else {
                    Ok(())
                };
                if new && (!ok || res.is_err()) {
                    self.forget_new(svc_id, store);
                }
                if let Err(e) = res {
                    fail(self, name, &e);
                }
            }
        }
        refused
    }

    /// Writes the backends phase 1 wanted (id, new value, value before)
    /// with one batch; when that fails, one by one. Returns the ids that
    /// could not be written, with the error, after putting the mirror
    /// back to what the map holds for them.
    fn write_backends(
        &mut self,
        writes: &[(BackendId, Backend, Option<Backend>)],
        store: &mut dyn Store,
        report: &mut Report,
    ) -> Option<(BTreeSet<BackendId>, StoreError)> {
        if writes.is_empty() {
            return None;
        }
        let batch: Vec<(BackendId, Backend)> = writes.iter().map(|(id, b, _)| (*id, *b)).collect();
        if store.put_backends(&batch).is_ok() {
            report.writes += batch.len();
            return None;
        }
        let mut lost = BTreeSet::new();
        let mut error = None;
        for (id, b, old) in writes {
            match store.put_backend(*id, b) {
                Ok(()) => report.writes += 1,
                Err(e) => {
                    lost.insert(*id);
                    match old {
                        Some(old) => {
                            self.backends.insert(*id, *old);
                        }
                        None => {
                            self.backends.remove(id);
                            self.backend_ids.remove(&identity(b));
                        }
                    }
                    error.get_or_insert(e);
                }
            }
        }
        error.map(|e| (lost, e))
    }

    /// Phase 1 of one Service port: its id, and its backends, those to
    /// write added to `writes` (id, new value, value before).
    fn prepare<'a>(
        &mut self,
        name: &'a TableId,
        want: &'a DesiredService,
        writes: &mut Vec<(BackendId, Backend, Option<Backend>)>,
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
                    debug!(service = %name, svc_id = id, "cannot reset counters: {e}");
                }
                id
            }
        };
        let mut active = Vec::with_capacity(want.backends.len());
        for b in &want.backends {
            active.push((maglev_name(b), self.ensure_backend(b, writes)));
        }
        active.sort();
        let mut used: Vec<BackendId> = active.iter().map(|(_, id)| *id).collect();
        for b in &want.draining {
            used.push(self.ensure_backend(b, writes));
        }
        let (old, old_table) = self
            .services
            .get(&svc_id)
            .map_or((0, None), |s| (s.fingerprint, s.table));
        let size = self.table_size.for_backends(active.len());
        let fp = if active.is_empty() {
            0
        } else {
            fingerprint(size, &active)
        };
        // A smaller table replacing a larger one: the frontends first
        // index only what both tables hold, so no packet looks past the
        // end of the new one when it is swapped in.
        if fp != 0 && fp != old && store.tables_in_place() {
            if let Some(applied) = self.services.get_mut(&svc_id) {
                for (key, value) in &mut applied.frontends {
                    if let Some(slots) = value.slots.filter(|s| s.count > size) {
                        let shrunk = Record {
                            slots: Some(Slots {
                                count: size,
                                ..slots
                            }),
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
            old_table,
            table: None,
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
            old_table,
            table,
        } = p;
        // The table frontends are to point at: the one just written, or
        // the one in place when it is still right.
        let table = if fp == 0 { None } else { table.or(old_table) };
        if new || fp != old || table != old_table {
            store.put_info(
                svc_id,
                &Info {
                    name: name.to_string(),
                    table_fingerprint: fp,
                    table,
                    table_slots: 0,
                },
            )?;
            report.writes += 1;
        }
        self.by_name.insert(name.clone(), svc_id);
        let applied = self.services.entry(svc_id).or_default();
        applied.id = Some(name.clone());
        applied.fingerprint = fp;
        applied.table = table;
        applied.retired.retain(|h| Some(*h) != table);
        if let Some(old_table) = old_table.filter(|h| Some(*h) != table) {
            applied.retired.insert(old_table);
        }
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

        let slots = table.map(|table| Slots { table, count: size });
        for (key, flags) in &want.frontends {
            let value = Record {
                svc_id,
                slots,
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
        // Tables no frontend points at any more go.
        self.sweep(svc_id, store, report)?;
        debug!(service = %name, svc_id, "programmed");
        Ok(())
    }

    /// Deletes the retired tables of Service port `svc_id` that no
    /// frontend points at any more.
    fn sweep(
        &mut self,
        svc_id: u32,
        store: &mut dyn Store,
        report: &mut Report,
    ) -> Result<(), StoreError> {
        let Some(applied) = self.services.get_mut(&svc_id) else {
            return Ok(());
        };
        let mut result = Ok(());
        for handle in std::mem::take(&mut applied.retired) {
            if Some(handle) == applied.table {
                continue;
            }
            let in_use = applied
                .frontends
                .values()
                .any(|r| r.slots.is_some_and(|s| s.table == handle));
            // Kept for a later sweep: in use, or after a failure.
            if in_use || result.is_err() {
                applied.retired.insert(handle);
                continue;
            }
            match store.del_table(handle) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    applied.retired.insert(handle);
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Gives back the id of a new Service port that could not be
    /// programmed, with the table written for it, if any.
    /// Its record was not written: once it is, the Service port is
    /// known by name and the next apply carries on from what it holds.
    fn forget_new(&mut self, svc_id: u32, store: &mut dyn Store) {
        if self.services.get(&svc_id).is_none_or(|s| s.id.is_some()) {
            return;
        }
        let Some(applied) = self.services.remove(&svc_id) else {
            return;
        };
        for handle in applied.table.into_iter().chain(applied.retired) {
            if let Err(e) = store.del_table(handle) {
                warn!(
                    svc_id,
                    "cannot remove the table of a refused Service port: {e}"
                );
            }
        }
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
        let tables = applied.table.into_iter().chain(
            applied
                .retired
                .iter()
                .copied()
                .filter(|h| Some(*h) != applied.table),
        );
        for handle in tables {
            store.del_table(handle)?;
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
        if let Some(id) = &applied.id {
            self.by_name.remove(id);
        }
        let name = applied.id.as_ref().map(ToString::to_string);
        debug!(service = name.unwrap_or_default(), svc_id, "removed");
        Ok(())
    }

    /// The id of backend `b`, allocated if new; when the map does not hold
    /// `b` under it yet, the mirror takes it at once and the write is
    /// added to `writes`, made by [`Self::write_backends`].
    fn ensure_backend(
        &mut self,
        b: &Backend,
        writes: &mut Vec<(BackendId, Backend, Option<Backend>)>,
    ) -> BackendId {
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
            let old = self.backends.insert(id, *b);
            writes.push((id, *b, old));
        }
        id
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

#[cfg(test)]
mod tests;
