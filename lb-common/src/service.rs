//! Frontends, Maglev tables and backends.
//!
//! A packet finds its Service through [`ServiceKey`] → [`ServiceValue`],
//! hashes its flow into `0..slot_count`, reads that slot of the Service's
//! Maglev table (the region of the flat slot array that starts at
//! `slot_base`) to get a [`BackendId`], and turns the id into a [`Backend`].
//!
//! A table is replaced whole: the agent writes the new table into a free
//! region, then points the frontend records at it with one update each, so
//! a packet reads the old table or the new one, never a mix; the old
//! region is reused only after every program that could have read the old
//! record has finished (docs/architecture.md, Maps).

use crate::{pod, IpAddrBe};

/// Identifies a backend (endpoint address and port) across all Services.
pub type BackendId = u32;

/// One frontend: a virtual address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address, network byte order.
    pub addr_be: IpAddrBe,
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Address family ([`crate::family`]).
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Set in a [`ServiceKey`]'s `family` byte: the key is the in-cluster twin
/// of a NodePort, externalIP or LoadBalancer frontend under
/// `externalTrafficPolicy: Local`. The frontend's own key leads to this
/// node's endpoints, for clients outside the cluster; its twin leads to
/// every endpoint, for pods and the node itself, which the policy does not
/// bind (kube-proxy's short-circuit of in-cluster traffic). Only programs
/// that see in-cluster clients look the twin up, and only after the
/// frontend's own record says it has one ([`ServiceValue::has_in_cluster_twin`]).
pub const KEY_F_IN_CLUSTER: u8 = 0x80;

impl ServiceKey {
    /// The in-cluster twin of this frontend's key (see [`KEY_F_IN_CLUSTER`]).
    #[must_use]
    pub const fn in_cluster(&self) -> Self {
        Self {
            family: self.family | KEY_F_IN_CLUSTER,
            ..*self
        }
    }

    /// Whether this is an in-cluster twin (see [`KEY_F_IN_CLUSTER`]).
    pub const fn is_in_cluster(&self) -> bool {
        self.family & KEY_F_IN_CLUSTER != 0
    }

    /// The address family ([`crate::family`]), without the twin bit.
    pub const fn addr_family(&self) -> u8 {
        self.family & !KEY_F_IN_CLUSTER
    }

    /// The key of a ClusterIP address as a whole (port and protocol 0),
    /// present while a Service port uses the address: a packet from a pod
    /// or the node that matched no frontend but has this address is
    /// refused, as kube-proxy's nftables mode refuses ClusterIP ports no
    /// Service uses. No frontend has port or protocol 0.
    pub const fn address_only(addr_be: IpAddrBe, family: u8) -> Self {
        Self {
            addr_be,
            port_be: 0,
            proto: 0,
            family,
        }
    }

    /// Whether this is an address-only key (see [`Self::address_only`]).
    pub const fn is_address_only(&self) -> bool {
        self.port_be == 0 && self.proto == 0
    }
}

/// The frontend is a ClusterIP.
pub const SVC_F_CLUSTER_IP: u32 = 1 << 0;
/// The frontend is a NodePort on one of this node's addresses.
pub const SVC_F_NODEPORT: u32 = 1 << 1;
/// The frontend is a LoadBalancer ingress IP or an externalIP.
pub const SVC_F_EXTERNAL: u32 = 1 << 2;
/// The frontend is a LoadBalancer ingress IP.
pub const SVC_F_LOAD_BALANCER: u32 = 1 << 4;
/// Only sources in the Service's ranges may open flows (`loadBalancerSourceRanges`).
pub const SVC_F_SRC_RANGES: u32 = 1 << 5;

/// A Local traffic policy applies: the table holds only this node's
/// endpoints; with none, the packet is dropped when other nodes have some
/// ([`SVC_F_REMOTE_ENDPOINTS`]) and refused otherwise.
pub const SVC_F_LOCAL_ONLY: u32 = 1 << 3;
/// With [`SVC_F_LOCAL_ONLY`]: the Service port has endpoints on other nodes.
/// A node without a local one then drops (so that an outside load balancer,
/// which health-checks nodes, retries elsewhere); a Service without any
/// endpoint is refused like every other (kube-proxy's rule).
pub const SVC_F_REMOTE_ENDPOINTS: u32 = 1 << 6;

/// What a frontend leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// The Service port's id, shared by all its frontends.
    pub svc_id: u32,
    /// Size of the Service's Maglev table; 0 means "no endpoint: reject".
    pub slot_count: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// ClientIP session affinity timeout in seconds; 0 means no affinity.
    pub affinity_timeout_s: u32,
    /// First slot of the Service's Maglev table in the flat slot array (a
    /// multiple of [`MAGLEV_CHUNK`]); meaningless while `slot_count` is 0.
    pub slot_base: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 20);

impl ServiceValue {
    /// Whether the frontend may have an in-cluster twin key
    /// ([`KEY_F_IN_CLUSTER`]): a NodePort, externalIP or LoadBalancer
    /// frontend under a Local policy.
    pub const fn has_in_cluster_twin(&self) -> bool {
        self.flags & SVC_F_LOCAL_ONLY != 0 && self.flags & (SVC_F_NODEPORT | SVC_F_EXTERNAL) != 0
    }
}

/// Largest Maglev table.
pub const MAGLEV_MAX: u32 = 131_071;

/// Slots per element of the flat slot array. An array map rounds every
/// value up to 8 bytes, so one 4-byte id per element would cost twice its
/// size; 16 ids per element also make a table's batch write 16 times
/// shorter. A table's region starts on an element boundary.
pub const MAGLEV_CHUNK: u32 = 16;

/// One element of the flat Maglev slot array: slots `16 i .. 16 i + 15`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaglevChunk {
    /// Backend ids.
    pub slots: [BackendId; MAGLEV_CHUNK as usize],
}
const _: () = assert!(core::mem::size_of::<MaglevChunk>() == 64);

/// Default size of the flat slot array, in slots (4 bytes each, 32 MiB):
/// room for about 4000 Service ports of 3 to 10 backends (1021 slots) with
/// as many again for tables being replaced.
pub const MAGLEV_SLOTS_DEFAULT: u32 = 1 << 23;

/// The data of a source-range key (the LPM trie's key is this behind a
/// prefix length): a Service port, then the address. A range's prefix
/// length is 64 (id, family and padding, always matched whole) plus the
/// range's own; a lookup uses 64 + 128.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange {
    /// The Service port's table id.
    pub svc_id: u32,
    /// Address family ([`crate::family`]).
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
    /// Address, network byte order.
    pub addr_be: IpAddrBe,
}
const _: () = assert!(core::mem::size_of::<SrcRange>() == 24);

/// Bits of a [`SrcRange`] before the address.
pub const SRC_RANGE_HEAD_BITS: u32 = 64;

/// The backend runs on this node (reached without SNAT).
pub const BACKEND_F_LOCAL: u8 = 1 << 0;
/// The endpoint is neither ready nor serving (a failed readiness probe):
/// it is in no table, its TCP flows go on, and its UDP flows are moved to
/// a live backend, as kube-proxy clears their conntrack entries.
pub const BACKEND_F_NOT_SERVING: u8 = 1 << 1;

/// Where a backend lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Endpoint address, network byte order.
    pub addr_be: IpAddrBe,
    /// Endpoint (target) port, network byte order.
    pub port_be: u16,
    /// Address family ([`crate::family`]).
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 20);

impl Backend {
    /// Whether the entry holds a backend: the backends map is an array, in
    /// which an id the agent has not given out (or has freed) reads as an
    /// all-zero entry, and every real backend has a family.
    #[inline(always)]
    #[must_use]
    pub const fn is_present(&self) -> bool {
        self.family != 0
    }
}

/// Longest Service port name kept in [`ServiceInfo`].
pub const SERVICE_NAME_LEN: usize = 120;

/// What the agent records about a Service port for itself and for
/// inspection: its name (`namespace/name:port/PROTO`, so that `lb-agent
/// services` and `bpftool` can say which Service an id is) and the
/// fingerprint and region of its Maglev table (so that a restarted agent
/// rewrites only tables that differ, and knows which regions are taken).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Hash of the table size and the sorted backend set; 0 for no table.
    pub table_fingerprint: u64,
    /// First slot of the table's region in the flat slot array.
    pub table_base: u32,
    /// Slots of the table's region (a multiple of [`MAGLEV_CHUNK`]).
    pub table_slots: u32,
    /// UTF-8 name, NUL-padded.
    pub name: [u8; SERVICE_NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<ServiceInfo>() == 136);

impl Default for ServiceInfo {
    fn default() -> Self {
        Self {
            table_fingerprint: 0,
            table_base: 0,
            table_slots: 0,
            name: [0; SERVICE_NAME_LEN],
        }
    }
}

pod!(
    ServiceKey,
    ServiceValue,
    Backend,
    ServiceInfo,
    SrcRange,
    MaglevChunk
);
