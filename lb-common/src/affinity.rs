//! ClientIP session affinity: which backend a client address last got, per
//! Service port, and when.

use crate::{pod, IpAddrBe};

/// A client of a Service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The Service port's id.
    pub svc_id: u32,
    /// Address family ([`crate::family`]).
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
    /// Client address, network byte order.
    pub client_be: IpAddrBe,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);

/// The backend a client sticks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// The backend.
    pub backend_id: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the client's last new flow.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

pod!(AffinityKey, AffinityValue);
