//! Typed handles on the pinned maps, opened by path so that the running agent
//! and the inspection commands (which work while the agent is down) share
//! one way in; and the reconciler's [`Store`] over them, the one place that
//! lays its records out in the maps.
//!
//! Table placement: every Maglev table is a region of the flat slot array
//! `LB_MAGLEV_V2` ([`super::regions`]); a [`TableHandle`] is the region's
//! first slot, which a frontend's `ServiceValue` names as `slot_base` and
//! the Service port's `ServiceInfo` records with the region's length. A
//! new table always goes into a free region, written with one batch
//! update, and the frontends are then flipped to it with one update each:
//! no update of a map of maps, so no RCU grace period, on the change path.

use std::{net::IpAddr, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, HashMap, Map, MapData, PerCpuArray,
};
use lb_common::{
    addr::addr_be,
    dsr::{DsrPeer, DSR_PEER_HEAD_BITS},
    maps,
    service::{MAGLEV_CHUNK, SERVICE_NAME_LEN, SRC_RANGE_HEAD_BITS},
    snat::{IfaceAddr, IfaceAddrKey},
    stats::{Counter, SvcCounters},
    AffinityKey, AffinityValue, Backend, BackendId, Config, CtKey, CtValue, MaglevChunk,
    ServiceInfo, ServiceKey, ServiceValue, SrcRange,
};

use tracing::debug;

use super::{
    bpffs,
    regions::{chunks_for, Regions},
    sys::GraceWaiter,
};
use crate::{
    model::Cidr,
    reconcile::{Info, Range, Record, Slots, Snapshot, Store, StoreError, TableHandle},
};

/// Every map of the datapath.
pub struct Maps {
    /// Frontends.
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Maglev tables: the flat slot array.
    pub maglev: Array<MapData, MaglevChunk>,
    /// Backends, indexed by id; an unused id is an all-zero entry.
    pub backends: Array<MapData, Backend>,
    /// Connection tracking.
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    /// Embryonic connection tracking (flows not established yet).
    pub ct_embryo: HashMap<MapData, CtKey, CtValue>,
    /// Node settings.
    pub config: Array<MapData, Config>,
    /// Datapath counters.
    pub stats: PerCpuArray<MapData, Counter>,
    /// Service port records.
    pub infos: HashMap<MapData, u32, ServiceInfo>,
    /// ClientIP affinity.
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// Source ranges.
    pub src_ranges: LpmTrie<MapData, SrcRange, u32>,
    /// Per-Service counters.
    pub svc_stats: PerCpuArray<MapData, SvcCounters>,
    /// The nodes whose DSR-wrapped packets are unwrapped.
    pub dsr_peers: LpmTrie<MapData, DsrPeer, u32>,
    /// Each node interface's SNAT source address.
    pub iface_addrs: HashMap<MapData, IfaceAddrKey, IfaceAddr>,
    /// Which regions of the slot array hold tables: read from the maps at
    /// the first table write (or given by [`Maps::adopt_regions`]).
    regions: Option<Regions>,
    /// Made at the first wait for a grace period.
    grace: Option<GraceWaiter>,
    /// Possible CPUs (per-CPU values), once counted.
    cpus: Option<usize>,
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
            maglev: typed!(bpffs, maps::MAGLEV),
            backends: typed!(bpffs, maps::BACKENDS),
            conntrack: typed!(bpffs, maps::CONNTRACK),
            ct_embryo: typed!(bpffs, maps::CT_EMBRYO),
            config: typed!(bpffs, maps::CONFIG),
            stats: typed!(bpffs, maps::STATS),
            infos: typed!(bpffs, maps::SVC_INFO),
            affinity: typed!(bpffs, maps::AFFINITY),
            src_ranges: typed!(bpffs, maps::SRC_RANGES),
            svc_stats: typed!(bpffs, maps::SVC_STATS),
            dsr_peers: typed!(bpffs, maps::DSR_PEERS),
            iface_addrs: typed!(bpffs, maps::IFACE_ADDRS),
            regions: None,
            grace: None,
            cpus: None,
        })
    }
}

impl Maps {
    /// Makes the interface address map hold exactly `addrs` (interface
    /// index, its SNAT source): writes first, then removes the interfaces
    /// no longer listed, so a kept interface is never without its address.
    pub fn set_iface_addrs(&mut self, addrs: &[(u32, IpAddr)]) -> Result<()> {
        let want: Vec<(IfaceAddrKey, IfaceAddr)> = addrs
            .iter()
            .map(|(ifindex, addr)| {
                let (addr_be, family) = addr_be(*addr);
                let key = IfaceAddrKey {
                    ifindex: *ifindex,
                    family,
                    _pad: [0; 3],
                };
                (key, IfaceAddr { addr_be })
            })
            .collect();
        for (key, value) in &want {
            self.iface_addrs
                .insert(key, value, 0)
                .with_context(|| format!("insert into {}", maps::IFACE_ADDRS))?;
        }
        let have: Vec<IfaceAddrKey> = self
            .iface_addrs
            .keys()
            .collect::<Result<_, _>>()
            .with_context(|| format!("read {}", maps::IFACE_ADDRS))?;
        for key in have {
            if !want.iter().any(|(k, _)| *k == key) {
                ignore_missing(self.iface_addrs.remove(&key))
                    .with_context(|| format!("remove from {}", maps::IFACE_ADDRS))?;
            }
        }
        Ok(())
    }

    /// Makes the DSR peers map hold exactly `peers`: adds the new ones
    /// first, then removes the gone ones (a peer that stays is never
    /// missing in between).
    pub fn set_dsr_peers(&mut self, peers: &[Cidr]) -> Result<()> {
        let want: Vec<LpmKey<DsrPeer>> = peers.iter().map(|c| peer_key(*c)).collect();
        for key in &want {
            self.dsr_peers
                .insert(key, 1, 0)
                .with_context(|| format!("insert into {}", maps::DSR_PEERS))?;
        }
        let have: Vec<LpmKey<DsrPeer>> = self
            .dsr_peers
            .keys()
            .collect::<Result<_, _>>()
            .with_context(|| format!("read {}", maps::DSR_PEERS))?;
        for key in have {
            let kept = want
                .iter()
                .any(|w| w.prefix_len() == key.prefix_len() && w.data() == key.data());
            if !kept {
                ignore_missing(self.dsr_peers.remove(&key))
                    .with_context(|| format!("remove from {}", maps::DSR_PEERS))?;
            }
        }
        Ok(())
    }
}

/// The peers map's key of `cidr`.
fn peer_key(cidr: Cidr) -> LpmKey<DsrPeer> {
    let (addr_be, family) = addr_be(cidr.addr);
    LpmKey::new(
        DSR_PEER_HEAD_BITS + u32::from(cidr.prefix),
        DsrPeer {
            family,
            _pad: [0; 3],
            addr_be,
        },
    )
}

/// Decodes the [`ServiceInfo`] of Service port `svc_id`.
pub fn decode_info(raw: &ServiceInfo) -> Info {
    let end = raw
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(raw.name.len());
    Info {
        name: String::from_utf8_lossy(&raw.name[..end]).into_owned(),
        table_fingerprint: raw.table_fingerprint,
        table: (raw.table_fingerprint != 0).then_some(TableHandle::from_raw(raw.table_base)),
        table_slots: raw.table_slots,
    }
}

/// Encodes an [`Info`], truncating the name at a char boundary.
pub fn encode_info(info: &Info) -> ServiceInfo {
    let mut out = ServiceInfo {
        table_fingerprint: info.table_fingerprint,
        table_base: info.table.map_or(0, TableHandle::raw),
        table_slots: if info.table.is_some() {
            info.table_slots
        } else {
            0
        },
        ..ServiceInfo::default()
    };
    let mut end = info.name.len().min(SERVICE_NAME_LEN);
    while !info.name.is_char_boundary(end) {
        end -= 1;
    }
    out.name[..end].copy_from_slice(&info.name.as_bytes()[..end]);
    out
}

/// Lays a frontend's [`Record`] out as the datapath's [`ServiceValue`].
fn encode_record(record: Record) -> ServiceValue {
    ServiceValue {
        svc_id: record.svc_id,
        slot_count: record.slots.map_or(0, |s| s.count),
        flags: record.flags,
        affinity_timeout_s: record.affinity_timeout_s,
        slot_base: record.slots.map_or(0, |s| s.table.raw()),
    }
}

/// Reads a [`ServiceValue`] back as the [`Record`] it was written from.
pub fn decode_record(value: &ServiceValue) -> Record {
    Record {
        svc_id: value.svc_id,
        slots: (value.slot_count != 0).then_some(Slots {
            table: TableHandle::from_raw(value.slot_base),
            count: value.slot_count,
        }),
        flags: value.flags,
        affinity_timeout_s: value.affinity_timeout_s,
    }
}

/// The `lb-agent run` flag that sizes map `name`.
pub fn size_flag(name: &str) -> &'static str {
    match name {
        maps::SERVICES | maps::SVC_INFO | maps::SVC_STATS => "--services-size",
        maps::MAGLEV => "--maglev-slots",
        maps::BACKENDS => "--backends-size",
        maps::CONNTRACK => "--conntrack-size",
        maps::CT_EMBRYO => "--conntrack-embryonic-size",
        maps::AFFINITY => "--affinity-size",
        maps::SRC_RANGES => "--src-ranges-size",
        _ => "its size flag",
    }
}

fn store_err(op: &'static str, map: &'static str, e: &aya::maps::MapError) -> StoreError {
    // The kernel says "argument list too long" for a full hash map and an
    // index out of range: say what it means.
    let full = matches!(e, aya::maps::MapError::SyscallError(s)
        if s.io_error.raw_os_error() == Some(libc::E2BIG));
    StoreError {
        op,
        map,
        message: if full {
            format!("map is full (raise {})", size_flag(map))
        } else {
            e.to_string()
        },
        full,
    }
}

/// `b` as the datapath reads an absent backend (family 0), for the first
/// of the two writes that change an entry's presence: a program reading
/// the entry during either write then sees a whole backend or none (the
/// datapath's `select::backend` says why this matters).
fn hidden(b: &Backend) -> Backend {
    Backend { family: 0, ..*b }
}

impl Maps {
    /// Refuses a backend id the array has no entry for: ids run below the
    /// map's capacity, which a restart with a smaller size flag can leave
    /// lower than ids already given out.
    fn check_backend_id(&self, id: BackendId) -> Result<(), StoreError> {
        let len = self.backends.len();
        if id >= len {
            return Err(StoreError {
                op: "insert",
                map: maps::BACKENDS,
                message: format!(
                    "map is full: backend id {id} is past its {len} entries (raise {})",
                    size_flag(maps::BACKENDS)
                ),
                full: true,
            });
        }
        Ok(())
    }

    /// Whether the backends array holds a backend under `id` (below its
    /// capacity).
    fn backend_present(&self, id: BackendId) -> Result<bool, StoreError> {
        self.backends
            .get(&id, 0)
            .map(|b| b.is_present())
            .map_err(|e| store_err("read", maps::BACKENDS, &e))
    }

    /// Every backend the array holds, by id, read with batched lookups.
    pub fn backend_entries(&self) -> Result<Vec<(BackendId, Backend)>> {
        let all = lookup_batch_array::<Backend>(aya::maps::IterableMap::map(&self.backends))
            .context("read backends map")?;
        Ok(all.into_iter().filter(|(_, b)| b.is_present()).collect())
    }
}

impl Store for Maps {
    fn put_backend(&mut self, id: BackendId, b: &Backend) -> Result<(), StoreError> {
        self.check_backend_id(id)?;
        if !self.backend_present(id)? {
            self.backends
                .set(id, hidden(b), 0)
                .map_err(|e| store_err("insert", maps::BACKENDS, &e))?;
        }
        self.backends
            .set(id, b, 0)
            .map_err(|e| store_err("insert", maps::BACKENDS, &e))
    }

    fn put_backends(&mut self, backends: &[(BackendId, Backend)]) -> Result<(), StoreError> {
        // All or nothing: an id past the array refuses the whole batch
        // before anything is written.
        for (id, _) in backends {
            self.check_backend_id(*id)?;
        }
        let mut fresh = Vec::new();
        for (id, b) in backends {
            if !self.backend_present(*id)? {
                fresh.push((*id, hidden(b)));
            }
        }
        let batch_err = |e: std::io::Error| StoreError {
            op: "insert",
            map: maps::BACKENDS,
            message: e.to_string(),
            full: e.raw_os_error() == Some(libc::E2BIG),
        };
        let (ids, values): (Vec<BackendId>, Vec<Backend>) = fresh.into_iter().unzip();
        update_batch(aya::maps::IterableMap::map(&self.backends), &ids, &values)
            .map_err(batch_err)?;
        let (ids, values): (Vec<BackendId>, Vec<Backend>) = backends.iter().copied().unzip();
        update_batch(aya::maps::IterableMap::map(&self.backends), &ids, &values).map_err(batch_err)
    }

    fn del_backend(&mut self, id: BackendId) -> Result<(), StoreError> {
        if id >= self.backends.len() {
            // Never written: the goal state holds.
            return Ok(());
        }
        let current = self
            .backends
            .get(&id, 0)
            .map_err(|e| store_err("remove", maps::BACKENDS, &e))?;
        if current.is_present() {
            self.backends
                .set(id, hidden(&current), 0)
                .map_err(|e| store_err("remove", maps::BACKENDS, &e))?;
        }
        self.backends
            .set(id, Backend::default(), 0)
            .map_err(|e| store_err("remove", maps::BACKENDS, &e))
    }

    fn put_table(&mut self, _svc_id: u32, table: &[BackendId]) -> Result<TableHandle, StoreError> {
        let len = chunks_for(table.len());
        let start = self.alloc_region(len)?;
        let keys: Vec<u32> = (start..start + len).collect();
        let mut values = vec![MaglevChunk::default(); len as usize];
        for (i, id) in table.iter().enumerate() {
            values[i / MAGLEV_CHUNK as usize].slots[i % MAGLEV_CHUNK as usize] = *id;
        }
        // No record points at the region yet: the write is invisible until
        // the reconciler flips the frontends to it.
        if let Err(e) = update_batch(aya::maps::IterableMap::map(&self.maglev), &keys, &values) {
            if let Some(r) = self.regions.as_mut() {
                r.give_back_unused(start);
            }
            return Err(StoreError {
                op: "fill",
                map: maps::MAGLEV,
                message: e.to_string(),
                full: false,
            });
        }
        Ok(TableHandle::from_raw(start * MAGLEV_CHUNK))
    }

    fn put_tables(
        &mut self,
        tables: &[(u32, Vec<BackendId>)],
    ) -> Vec<Result<TableHandle, StoreError>> {
        // Every region first, then all of them with one batch update (a
        // first sync writes thousands of tables): still invisible until
        // the frontends are flipped to them.
        let mut placed: Vec<Result<u32, StoreError>> = Vec::with_capacity(tables.len());
        let mut keys: Vec<u32> = Vec::new();
        let mut values: Vec<MaglevChunk> = Vec::new();
        for (_, table) in tables {
            let len = chunks_for(table.len());
            let start = self.alloc_region(len);
            if let Ok(start) = start {
                keys.extend(start..start + len);
                let first = values.len();
                values.resize(first + len as usize, MaglevChunk::default());
                for (i, id) in table.iter().enumerate() {
                    values[first + i / MAGLEV_CHUNK as usize].slots[i % MAGLEV_CHUNK as usize] =
                        *id;
                }
            }
            placed.push(start);
        }
        let written = update_batch(aya::maps::IterableMap::map(&self.maglev), &keys, &values);
        placed
            .into_iter()
            .map(|start| {
                let start = start?;
                if let Err(e) = &written {
                    if let Some(r) = self.regions.as_mut() {
                        r.give_back_unused(start);
                    }
                    return Err(StoreError {
                        op: "fill",
                        map: maps::MAGLEV,
                        message: e.to_string(),
                        full: false,
                    });
                }
                Ok(TableHandle::from_raw(start * MAGLEV_CHUNK))
            })
            .collect()
    }

    fn tables_in_place(&self) -> bool {
        false
    }

    fn del_table(&mut self, table: TableHandle) -> Result<(), StoreError> {
        // Nothing is written: the region keeps its contents for packets
        // that read an old record, and is reused after a grace period.
        self.regions()?.retire(table.raw() / MAGLEV_CHUNK);
        Ok(())
    }

    fn put_service(&mut self, key: ServiceKey, record: Record) -> Result<(), StoreError> {
        self.services
            .insert(key, encode_record(record), 0)
            .map_err(|e| store_err("insert", maps::SERVICES, &e))
    }

    fn del_service(&mut self, key: ServiceKey) -> Result<(), StoreError> {
        ignore_missing(self.services.remove(&key))
            .map_err(|e| store_err("remove", maps::SERVICES, &e))
    }

    fn put_info(&mut self, svc_id: u32, info: &Info) -> Result<(), StoreError> {
        // The region's length is the store's to know, not the reconciler's.
        let table_slots = match info.table {
            Some(t) => self
                .regions()?
                .len_of(t.raw() / MAGLEV_CHUNK)
                .map_or(0, |l| l.saturating_mul(MAGLEV_CHUNK)),
            None => 0,
        };
        self.infos
            .insert(
                svc_id,
                encode_info(&Info {
                    table_slots,
                    ..info.clone()
                }),
                0,
            )
            .map_err(|e| store_err("insert", maps::SVC_INFO, &e))
    }

    fn del_info(&mut self, svc_id: u32) -> Result<(), StoreError> {
        ignore_missing(self.infos.remove(&svc_id))
            .map_err(|e| store_err("remove", maps::SVC_INFO, &e))
    }

    fn put_range(&mut self, svc_id: u32, range: Range) -> Result<(), StoreError> {
        self.src_ranges
            .insert(&range_key(svc_id, range), 1, 0)
            .map_err(|e| store_err("insert", maps::SRC_RANGES, &e))
    }

    fn del_range(&mut self, svc_id: u32, range: Range) -> Result<(), StoreError> {
        ignore_missing(self.src_ranges.remove(&range_key(svc_id, range)))
            .map_err(|e| store_err("remove", maps::SRC_RANGES, &e))
    }

    fn reset_stats(&mut self, svc_id: u32) -> Result<(), StoreError> {
        // Counted once: aya reads a sysfs file for it, and a first sync
        // resets the counters of thousands of Service ports.
        let cpus = match self.cpus {
            Some(n) => n,
            None => {
                let n = aya::util::nr_cpus().map_err(|(_, e)| StoreError {
                    op: "reset",
                    map: maps::SVC_STATS,
                    message: format!("count CPUs: {e}"),
                    full: false,
                })?;
                *self.cpus.insert(n)
            }
        };
        let zeros =
            aya::maps::PerCpuValues::try_from(vec![SvcCounters::default(); cpus]).map_err(|e| {
                StoreError {
                    op: "reset",
                    map: maps::SVC_STATS,
                    message: e.to_string(),
                    full: false,
                }
            })?;
        self.svc_stats
            .set(svc_id, zeros, 0)
            .map_err(|e| store_err("reset", maps::SVC_STATS, &e))
    }
}

/// `BPF_MAP_LOOKUP_BATCH`, from `enum bpf_cmd` in uapi/linux/bpf.h.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_BATCH`, from `enum bpf_cmd` in uapi/linux/bpf.h.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr` (uapi/linux/bpf.h, Linux 5.6+).
/// The kernel accepts an attr shorter than its own and zero-extends it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// One batched map command (`BPF_MAP_*_BATCH`) on `attr`.
///
/// # Safety
/// The pointers in `attr` must be valid for what `cmd` reads and writes
/// through them: `count` keys and values of the map's types, and one key
/// at `in_batch` and `out_batch` where set.
unsafe fn batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a `bpf_attr.batch` of the size passed, and the
    // caller vouches for the memory it points at.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Inserts or replaces `keys[i]` → `values[i]` in `map` with one
/// `BPF_MAP_UPDATE_BATCH` (Linux 5.6+). aya 0.14 has no batch operations,
/// hence the raw syscall. `K` and `V` must be the map's key and value types.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};

    if keys.len() != values.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    if keys.is_empty() {
        return Ok(());
    }
    let count =
        u32::try_from(keys.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: fd as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `keys` and `values` hold `count` elements of the map's key
    // and value types (the kernel reads `count` times the map's key and
    // value sizes, which the caller's types match) and outlive the call,
    // which only reads them; the kernel writes only `attr.count` back.
    unsafe { batch(BPF_MAP_UPDATE_BATCH, &mut attr) }?;
    if attr.count != count {
        return Err(std::io::Error::other(format!(
            "batch update wrote {} of {count} entries",
            attr.count
        )));
    }
    Ok(())
}

/// Elements an array's batched read asks for at a time.
const LOOKUP_BATCH: usize = 4096;

/// Every element of the array map `map` (index, value) with
/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+), a few thousand a system call where
/// aya's iterator makes one per element. `V` must be the map's value type.
pub fn lookup_batch_array<V: aya::Pod>(map: &MapData) -> std::io::Result<Vec<(u32, V)>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};

    let fd = map.fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut keys = vec![0u32; LOOKUP_BATCH];
    // SAFETY: `V` is `Pod`: all-zero bytes are a valid value.
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; LOOKUP_BATCH];
    // Where the next call goes on: the last index the previous one read.
    let mut resume: Option<u32> = None;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: resume.as_ref().map_or(0, |r| std::ptr::from_ref(r) as u64),
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_BATCH as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `keys` and `values` have room for `count` elements of the
        // map's key (`u32`, an array's) and value types, `in_batch` and
        // `out_batch` point at one key each, and all outlive the call.
        let rc = unsafe { batch(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let read = (attr.count as usize).min(LOOKUP_BATCH);
        out.extend(
            keys[..read]
                .iter()
                .copied()
                .zip(values[..read].iter().copied()),
        );
        if let Err(e) = rc {
            // ENOENT: the last element has been read.
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(out);
            }
            return Err(e);
        }
        if read == 0 {
            return Ok(out);
        }
        resume = Some(next);
    }
}

impl Maps {
    /// The region allocator, read from the maps at first use.
    fn regions(&mut self) -> Result<&mut Regions, StoreError> {
        if self.regions.is_none() {
            let snap = self.snapshot().map_err(|e| StoreError {
                op: "read",
                map: maps::MAGLEV,
                message: format!("{e:#}"),
                full: false,
            })?;
            self.adopt_regions(&snap);
        }
        Ok(self.regions.get_or_insert_with(Regions::default))
    }

    /// Learns which regions of the slot array hold tables from a snapshot
    /// of the maps just read (the tables the Service port records name,
    /// and those frontends still point at); the rest is free.
    pub fn adopt_regions(&mut self, snap: &Snapshot) {
        let recorded = snap.infos.values().filter_map(|i| {
            let t = i.table?;
            Some((t.raw() / MAGLEV_CHUNK, i.table_slots.div_ceil(MAGLEV_CHUNK)))
        });
        // A frontend still on an older table (an agent stopped half-way
        // through a change) names only the slots it reads: at worst the
        // tail of that region is lost until the next restart.
        let pointed = snap.services.values().filter_map(|r| {
            let s = r.slots?;
            Some((s.table.raw() / MAGLEV_CHUNK, s.count.div_ceil(MAGLEV_CHUNK)))
        });
        self.regions = Some(Regions::adopt(
            self.maglev.len(),
            recorded.chain(pointed).collect::<Vec<_>>(),
        ));
    }

    /// Gives out a free region of `len` elements; when only quarantined
    /// regions would make room, waits for a grace period to free them.
    fn alloc_region(&mut self, len: u32) -> Result<u32, StoreError> {
        if let Some(start) = self.regions()?.alloc(len) {
            return Ok(start);
        }
        if self.regions()?.quarantined() > 0 {
            let waited = match self.grace.as_ref() {
                Some(g) => g.wait(),
                None => GraceWaiter::new().and_then(|g| {
                    let r = g.wait();
                    self.grace = Some(g);
                    r
                }),
            };
            waited.map_err(|e| StoreError {
                op: "insert",
                map: maps::MAGLEV,
                message: format!("{e:#}"),
                full: false,
            })?;
            let regions = self.regions()?;
            debug!(
                quarantined = regions.quarantined(),
                "slot array: freed the regions of replaced tables after a grace period"
            );
            regions.grace_period_passed();
            if let Some(start) = regions.alloc(len) {
                return Ok(start);
            }
        }
        Err(StoreError {
            op: "insert",
            map: maps::MAGLEV,
            message: format!(
                "map is full: no free region of {} slots (raise {})",
                u64::from(len) * u64::from(MAGLEV_CHUNK),
                size_flag(maps::MAGLEV)
            ),
            full: true,
        })
    }
}

/// The LPM key of a source range of a Service port.
fn range_key(svc_id: u32, (addr_be, family, prefix): Range) -> LpmKey<SrcRange> {
    LpmKey::new(
        SRC_RANGE_HEAD_BITS + u32::from(prefix),
        SrcRange {
            svc_id,
            family,
            _pad: [0; 3],
            addr_be,
        },
    )
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
            snap.services.insert(k, decode_record(&v));
        }
        snap.backends.extend(self.backend_entries()?);
        for key in self.src_ranges.keys() {
            let key = key.context("read source ranges map")?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(SRC_RANGE_HEAD_BITS) as u8;
            snap.ranges
                .entry(data.svc_id)
                .or_default()
                .insert((data.addr_be, data.family, prefix));
        }
        for entry in self.infos.iter() {
            let (k, v) = entry.context("read service info map")?;
            snap.infos.insert(k, decode_info(&v));
        }
        Ok(snap)
    }

    /// Deletes affinity entries whose backend may no longer take new flows
    /// of their Service port (removed, or terminating); returns how many.
    pub fn purge_affinity(&mut self, keep: impl Fn(u32, BackendId) -> bool) -> Result<usize> {
        let mut stale = Vec::new();
        for entry in self.affinity.iter() {
            let (k, v) = entry.context("read affinity map")?;
            if !keep(k.svc_id, v.backend_id) {
                stale.push(k);
            }
        }
        for k in &stale {
            ignore_missing(self.affinity.remove(k)).context("remove affinity entry")?;
        }
        Ok(stale.len())
    }

    /// The Maglev table a frontend reads as the datapath sees it: `count`
    /// slots from slot `base` of the slot array (empty for no table).
    pub fn table(&self, base: u32, count: u32) -> Result<Vec<BackendId>> {
        let mut out = Vec::with_capacity(count as usize);
        let end = u64::from(base) + u64::from(count);
        let mut slot = u64::from(base);
        while slot < end {
            let index =
                u32::try_from(slot / u64::from(MAGLEV_CHUNK)).context("slot out of range")?;
            let chunk = self
                .maglev
                .get(&index, 0)
                .context("read maglev slot array")?;
            let from = (slot % u64::from(MAGLEV_CHUNK)) as usize;
            let to = (end - slot + from as u64).min(u64::from(MAGLEV_CHUNK)) as usize;
            out.extend_from_slice(&chunk.slots[from..to]);
            slot += (to - from) as u64;
        }
        Ok(out)
    }

    /// The table new flows of Service port `svc_id` are spread over, as
    /// its frontends in `snap` name it (all name the same one, except for
    /// a moment during a change); empty without one.
    pub fn service_table(&self, snap: &Snapshot, svc_id: u32) -> Result<Vec<BackendId>> {
        let slots = snap
            .services
            .values()
            .filter(|r| r.svc_id == svc_id)
            .find_map(|r| r.slots);
        match slots {
            Some(s) => self.table(s.table.raw(), s.count),
            None => Ok(Vec::new()),
        }
    }

    /// Sums the per-CPU counters of every Service port the info map names,
    /// by svc_id, with its name.
    pub fn service_counters(&self) -> Result<Vec<(u32, String, SvcCounters)>> {
        let mut out = Vec::new();
        for entry in self.infos.iter() {
            let (svc_id, info) = entry.context("read service info map")?;
            let per_cpu = match self.svc_stats.get(&svc_id, 0) {
                Ok(v) => v,
                // An id beyond the stats map (an older, smaller pin) has no counters.
                Err(aya::maps::MapError::OutOfBounds { .. }) => continue,
                Err(e) => return Err(e).context("read per-Service stats map"),
            };
            let mut sum = SvcCounters::default();
            for c in per_cpu.iter() {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
                sum.new_flows += c.new_flows;
                sum.drops += c.drops;
            }
            out.push((svc_id, decode_info(&info).name, sum));
        }
        out.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        Ok(out)
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

/// The capacity (`max_entries`) of the map `name` pinned under `bpffs`.
pub fn capacity(bpffs: &Path, name: &str) -> Result<u32> {
    let path = bpffs::maps_dir(bpffs).join(name);
    let info = aya::maps::MapInfo::from_pin(&path)
        .with_context(|| format!("read map info of {}", path.display()))?;
    Ok(info.max_entries())
}

/// The maps whose fill the agent watches, with how many entries each holds.
pub const SIZED: [&str; 6] = [
    maps::SERVICES,
    maps::BACKENDS,
    maps::CONNTRACK,
    maps::CT_EMBRYO,
    maps::AFFINITY,
    maps::SRC_RANGES,
];

impl Maps {
    /// How many entries the map `name` (one of [`SIZED`]) holds now. Walks
    /// its keys: O(entries) syscalls, so not for the packet path's pace.
    pub fn entries(&self, name: &str) -> Result<u64> {
        fn count<K, E: Into<anyhow::Error>>(
            keys: impl Iterator<Item = Result<K, E>>,
        ) -> Result<u64> {
            let mut n = 0;
            for k in keys {
                k.map_err(Into::into)?;
                n += 1;
            }
            Ok(n)
        }
        match name {
            maps::SERVICES => count(self.services.keys()),
            maps::BACKENDS => self.backend_entries().map(|b| b.len() as u64),
            maps::CONNTRACK => count(self.conntrack.keys()),
            maps::CT_EMBRYO => count(self.ct_embryo.keys()),
            maps::AFFINITY => count(self.affinity.keys()),
            maps::SRC_RANGES => count(self.src_ranges.keys()),
            other => anyhow::bail!("no entry count for map {other}"),
        }
        .with_context(|| format!("count entries of {name}"))
    }
}
