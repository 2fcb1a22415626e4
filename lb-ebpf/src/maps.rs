//! Every map of the datapath. Names come from `lb_common::maps`; the agent
//! resizes the hash maps at load time, so the sizes here are only defaults.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    maps::{BACKENDS_MAX, CONNTRACK_MAX, SERVICES_MAX, SLOTS_MAX},
    stats::{Counter, COUNT},
    Backend, BackendId, Config, CtKey, CtValue, ServiceKey, ServiceName, ServiceValue, SlotKey,
};

/// Frontends.
#[btf_map]
pub static LB_SERVICES_V1: HashMap<ServiceKey, ServiceValue, { SERVICES_MAX as usize }> =
    HashMap::new();

/// Backend tables, double-buffered by generation.
#[btf_map]
pub static LB_SLOTS_V1: HashMap<SlotKey, BackendId, { SLOTS_MAX as usize }> = HashMap::new();

/// Backends by id.
#[btf_map]
pub static LB_BACKENDS_V1: HashMap<BackendId, Backend, { BACKENDS_MAX as usize }> = HashMap::new();

/// Connection tracking; LRU so a full table evicts the idlest flow, never fails.
#[btf_map]
pub static LB_CT_V1: LruHashMap<CtKey, CtValue, { CONNTRACK_MAX as usize }> = LruHashMap::new();

/// Node settings (one entry).
#[btf_map]
pub static LB_CONFIG_V2: Array<Config, 1> = Array::new();

/// Counters by `lb_common::stats` index.
#[btf_map]
pub static LB_STATS_V2: PerCpuArray<Counter, { COUNT as usize }> = PerCpuArray::new();

/// Service port names for inspection; never read by the programs.
#[btf_map]
pub static LB_NAMES_V1: HashMap<u32, ServiceName, { SERVICES_MAX as usize }> = HashMap::new();
