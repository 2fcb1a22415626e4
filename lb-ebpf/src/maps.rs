//! Every map of the datapath. Names come from `lb_common::maps`; the agent
//! resizes the hash maps at load time, so the sizes here are only defaults.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use lb_common::{
    crc32c::Pending,
    dsr::{DsrPeer, DSR_PEERS_MAX},
    maps::{
        AFFINITY_MAX, BACKENDS_MAX, CONNTRACK_MAX, CT_EMBRYO_MAX, FRAGS_MAX, SERVICES_MAX,
        SRC_RANGES_MAX,
    },
    service::{MAGLEV_CHUNK, MAGLEV_SLOTS_DEFAULT},
    snat::{IfaceAddr, IfaceAddrKey, SnatCursorKey, IFACE_ADDRS_MAX, SNAT_CURSORS_MAX},
    sock::{SockConfig, SockRevKey, SockRevValue, SOCK_REV_MAX, STAT_COUNT as SOCK_STAT_COUNT},
    stats::{Counter, SvcCounters, COUNT},
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtValue, FragKey, FragValue, MaglevChunk,
    ServiceInfo, ServiceKey, ServiceValue, SrcRange,
};

use crate::scratch::Scratch;

/// Frontends.
#[btf_map]
pub static LB_SERVICES_V3: HashMap<ServiceKey, ServiceValue, { SERVICES_MAX as usize }> =
    HashMap::new();

/// Every Maglev table, each a region of this flat array named by its
/// frontend records (`ServiceValue::slot_base`); sized by the agent.
#[btf_map]
pub static LB_MAGLEV_V2: Array<MaglevChunk, { (MAGLEV_SLOTS_DEFAULT / MAGLEV_CHUNK) as usize }> =
    Array::new();

/// Backends, indexed by id (an array: its lookup is inlined, where a hash
/// lookup hashes the key and walks a bucket on every established packet);
/// an unused id is an all-zero entry. Sized by the agent.
#[btf_map]
pub static LB_BACKENDS_V2: Array<Backend, { BACKENDS_MAX as usize }> = Array::new();

/// Connection tracking; LRU so a full table evicts the idlest flow, never fails.
#[btf_map]
pub static LB_CT_V1: LruHashMap<CtKey, CtValue, { CONNTRACK_MAX as usize }> = LruHashMap::new();

/// Flows not established yet (both directions), apart from
/// `LB_CT_V1` so that a flood of them evicts only each other; LRU.
#[btf_map]
pub static LB_CT_EMBRYO_V1: LruHashMap<CtKey, CtValue, { CT_EMBRYO_MAX as usize }> =
    LruHashMap::new();

/// ClientIP affinity; LRU so that idle clients make room.
#[btf_map]
pub static LB_AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_MAX as usize }> =
    LruHashMap::new();

/// `loadBalancerSourceRanges` of every Service port that has them.
#[btf_map]
pub static LB_SRC_RANGES_V1: LpmTrie<SrcRange, u32, { SRC_RANGES_MAX as usize }> = LpmTrie::new();

/// Node settings (one entry).
#[btf_map]
pub static LB_CONFIG_V4: Array<Config, 1> = Array::new();

/// The SNAT source address of each node interface; written by the agent.
#[btf_map]
pub static LB_IFACE_ADDRS_V1: HashMap<IfaceAddrKey, IfaceAddr, { IFACE_ADDRS_MAX as usize }> =
    HashMap::new();

/// The next SNAT port to try for each backend and protocol; LRU, since a
/// lost cursor only starts over.
#[btf_map]
pub static LB_SNAT_CURSORS_V1: LruHashMap<SnatCursorKey, u64, { SNAT_CURSORS_MAX as usize }> =
    LruHashMap::new();

/// Counters by `lb_common::stats` index.
#[btf_map]
pub static LB_STATS_V8: PerCpuArray<Counter, { COUNT as usize }> = PerCpuArray::new();

/// Counters by svc_id (ids start at 1, hence one more than the services map).
#[btf_map]
pub static LB_SVC_STATS_V1: PerCpuArray<SvcCounters, { SERVICES_MAX as usize + 1 }> =
    PerCpuArray::new();

/// Service port records for the agent and inspection; never read by the programs.
#[btf_map]
pub static LB_SVC_INFO_V2: HashMap<u32, ServiceInfo, { SERVICES_MAX as usize }> = HashMap::new();

/// Ports of translated first fragments, for the datagram's later fragments.
#[btf_map]
pub static LB_FRAGS_V1: LruHashMap<FragKey, FragValue, { FRAGS_MAX as usize }> = LruHashMap::new();

/// Per-CPU room for a run's large temporaries (`scratch`; not pinned:
/// nothing outlives a program run).
#[btf_map]
pub static LB_SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// Per-CPU scratch space for FIB lookup requests (not pinned: nothing
/// outlives a program run).
#[btf_map]
pub static LB_FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup, 1> = PerCpuArray::new();

/// Scope of the socket hooks (one entry: the agent's netns cookie).
#[btf_map]
pub static LB_SOCK_CONFIG_V1: Array<SockConfig, 1> = Array::new();

/// Translated sockets' backends → the frontends they asked for, so replies
/// and `getpeername` show the frontend; LRU so that closed sockets make room.
#[btf_map]
pub static LB_SOCK_REV_V1: LruHashMap<SockRevKey, SockRevValue, { SOCK_REV_MAX as usize }> =
    LruHashMap::new();

/// Socket-hook counters by `lb_common::sock::STAT_*`.
#[btf_map]
pub static LB_SOCK_STATS_V1: PerCpuArray<u64, { SOCK_STAT_COUNT as usize }> = PerCpuArray::new();

/// The nodes whose wrapped (DSR) packets are unwrapped; written by the agent.
#[btf_map]
pub static LB_DSR_PEERS_V1: LpmTrie<DsrPeer, u32, { DSR_PEERS_MAX as usize }> = LpmTrie::new();

/// An SCTP packet's checksum update between its rewrite and the program
/// that applies it (`crate::sctp`).
#[btf_map]
pub static LB_SCTP_CRC_V1: PerCpuArray<Pending, 1> = PerCpuArray::new();

/// `lb_xdp_sctp_crc`, for `lb_xdp_node` to tail-call; filled by the agent.
#[btf_map]
pub static LB_SCTP_CRC_XDP_V1: ProgramArray<1> = ProgramArray::new();

/// `lb_tc_sctp_crc`, for the TC programs to tail-call; filled by the agent.
#[btf_map]
pub static LB_SCTP_CRC_TC_V1: ProgramArray<1> = ProgramArray::new();
