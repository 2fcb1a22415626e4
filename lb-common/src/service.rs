//! Frontends, backend slots and backends.
//!
//! A packet finds its Service through [`ServiceKey`] → [`ServiceValue`], picks
//! a slot by hashing the flow into `0..slot_count`, turns the slot into a
//! [`BackendId`] through [`SlotKey`], and the id into a [`Backend`].
//!
//! Slots are double-buffered: the agent writes a new table under the inactive
//! `generation`, then flips the generation in the [`ServiceValue`] with one map
//! update. A packet reads the service record once, so it never sees half a
//! table. Maglev replaces "slot = hash % backends" with "slot = hash % M" over
//! the same slot map.

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

/// The frontend is a ClusterIP.
pub const SVC_F_CLUSTER_IP: u32 = 1 << 0;
/// The frontend is a NodePort on one of this node's addresses.
pub const SVC_F_NODEPORT: u32 = 1 << 1;
/// The frontend is a LoadBalancer ingress IP or an externalIP.
pub const SVC_F_EXTERNAL: u32 = 1 << 2;

/// What a frontend leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// The Service port's id, shared by all its frontends.
    pub svc_id: u32,
    /// Number of slots in the active table; 0 means "no endpoint: reject".
    pub slot_count: u32,
    /// Which of the two slot tables (0 or 1) is active.
    pub generation: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// One slot of a Service's backend table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    /// The Service port's id.
    pub svc_id: u32,
    /// Table generation, 0 or 1.
    pub generation: u32,
    /// Slot index within the table.
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 12);

/// The backend runs on this node (reached without SNAT).
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

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

/// Longest Service port name kept in [`ServiceName`].
pub const SERVICE_NAME_LEN: usize = 128;

/// A Service port's name (`namespace/name:port/PROTO`), NUL-padded, so that
/// `lb-agent services` and `bpftool` can say which Service an id is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// UTF-8 bytes, NUL-padded.
    pub bytes: [u8; SERVICE_NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<ServiceName>() == SERVICE_NAME_LEN);

impl Default for ServiceName {
    fn default() -> Self {
        Self {
            bytes: [0; SERVICE_NAME_LEN],
        }
    }
}

pod!(ServiceKey, ServiceValue, SlotKey, Backend, ServiceName);
