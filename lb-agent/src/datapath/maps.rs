//! Typed handles on the pinned maps, opened by path so that the running agent
//! and the inspection commands (which work while the agent is down) share
//! one way in.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    maps, stats::Counter, Backend, BackendId, Config, CtKey, CtValue, ServiceKey, ServiceName,
    ServiceValue, SlotKey,
};

use super::bpffs;
use crate::reconcile::{Snapshot, Store, StoreError};

/// Every map of the datapath.
pub struct Maps {
    /// Frontends.
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Backend tables.
    pub slots: HashMap<MapData, SlotKey, BackendId>,
    /// Backends.
    pub backends: HashMap<MapData, BackendId, Backend>,
    /// Connection tracking.
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    /// Node settings.
    pub config: Array<MapData, Config>,
    /// Datapath counters.
    pub stats: PerCpuArray<MapData, Counter>,
    /// Service port names.
    pub names: HashMap<MapData, u32, ServiceName>,
}

fn open(bpffs: &Path, name: &str) -> Result<Map> {
    let path = bpffs::maps_dir(bpffs).join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "open pinned map {}: is an agent of this version running with --bpffs {}?",
            path.display(),
            bpffs.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

macro_rules! typed {
    ($bpffs:expr, $name:expr) => {
        open($bpffs, $name)?
            .try_into()
            .with_context(|| format!("map {} has an unexpected type or layout", $name))?
    };
}

impl Maps {
    /// Opens every map pinned under `bpffs`.
    pub fn open(bpffs: &Path) -> Result<Self> {
        Ok(Self {
            services: typed!(bpffs, maps::SERVICES),
            slots: typed!(bpffs, maps::SLOTS),
            backends: typed!(bpffs, maps::BACKENDS),
            conntrack: typed!(bpffs, maps::CONNTRACK),
            config: typed!(bpffs, maps::CONFIG),
            stats: typed!(bpffs, maps::STATS),
            names: typed!(bpffs, maps::NAMES),
        })
    }
}

/// Decodes a NUL-padded [`ServiceName`].
pub fn name_str(name: &ServiceName) -> String {
    let end = name
        .bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name.bytes.len());
    String::from_utf8_lossy(&name.bytes[..end]).into_owned()
}

/// Encodes a name into a [`ServiceName`], truncating at a char boundary.
pub fn name_bytes(name: &str) -> ServiceName {
    let mut out = ServiceName::default();
    let mut end = name.len().min(out.bytes.len());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    out.bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
    out
}

fn store_err(op: &'static str, map: &'static str, e: &aya::maps::MapError) -> StoreError {
    StoreError {
        op,
        map,
        message: e.to_string(),
    }
}

impl Store for Maps {
    fn put_backend(&mut self, id: BackendId, b: &Backend) -> Result<(), StoreError> {
        self.backends
            .insert(id, b, 0)
            .map_err(|e| store_err("insert", maps::BACKENDS, &e))
    }

    fn del_backend(&mut self, id: BackendId) -> Result<(), StoreError> {
        ignore_missing(self.backends.remove(&id))
            .map_err(|e| store_err("remove", maps::BACKENDS, &e))
    }

    fn put_slot(&mut self, key: SlotKey, id: BackendId) -> Result<(), StoreError> {
        self.slots
            .insert(key, id, 0)
            .map_err(|e| store_err("insert", maps::SLOTS, &e))
    }

    fn del_slot(&mut self, key: SlotKey) -> Result<(), StoreError> {
        ignore_missing(self.slots.remove(&key)).map_err(|e| store_err("remove", maps::SLOTS, &e))
    }

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), StoreError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| store_err("insert", maps::SERVICES, &e))
    }

    fn del_service(&mut self, key: ServiceKey) -> Result<(), StoreError> {
        ignore_missing(self.services.remove(&key))
            .map_err(|e| store_err("remove", maps::SERVICES, &e))
    }

    fn put_name(&mut self, svc_id: u32, name: &str) -> Result<(), StoreError> {
        self.names
            .insert(svc_id, name_bytes(name), 0)
            .map_err(|e| store_err("insert", maps::NAMES, &e))
    }

    fn del_name(&mut self, svc_id: u32) -> Result<(), StoreError> {
        ignore_missing(self.names.remove(&svc_id)).map_err(|e| store_err("remove", maps::NAMES, &e))
    }
}

/// Deleting what is already gone is success: the goal state holds.
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

impl Maps {
    /// Reads the service maps for [`crate::reconcile::Reconciler::adopt`].
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut snap = Snapshot::default();
        for entry in self.services.iter() {
            let (k, v) = entry.context("read services map")?;
            snap.services.insert(k, v);
        }
        for entry in self.slots.iter() {
            let (k, v) = entry.context("read slots map")?;
            snap.slots.insert((k.svc_id, k.generation, k.index), v);
        }
        for entry in self.backends.iter() {
            let (k, v) = entry.context("read backends map")?;
            snap.backends.insert(k, v);
        }
        for entry in self.names.iter() {
            let (k, v) = entry.context("read names map")?;
            snap.names.insert(k, name_str(&v));
        }
        Ok(snap)
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<Vec<(&'static str, Counter)>> {
        let mut out = Vec::new();
        for (idx, name) in lb_common::stats::NAMES.iter().enumerate() {
            let per_cpu = self.stats.get(&(idx as u32), 0).context("read stats map")?;
            let mut sum = Counter::default();
            for c in per_cpu.iter() {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
            }
            out.push((*name, sum));
        }
        Ok(out)
    }
}
