//! Types shared by the lb eBPF programs and the agent.
//!
//! Everything here is `no_std`, `#[repr(C)]` and free of implicit padding, so
//! the kernel and user space agree on every byte. Addresses and ports keep
//! network byte order (`_be` in the field name) because the datapath compares
//! them against packet bytes; the agent converts at its edge.
//!
//! IPv4 and IPv6 share one address type, [`IpAddrBe`]: an IPv4 address lives
//! in word 0 with the other words zero, and every key that carries an address
//! also carries its [`family`], so the two families never collide.
//!
//! With the `user` feature each type implements `aya::Pod`, and [`addr`]
//! converts between `core::net` addresses and [`IpAddrBe`].
#![no_std]

#[cfg(feature = "user")]
pub mod addr;
pub mod affinity;
pub mod config;
pub mod conntrack;
pub mod crc32c;
pub mod csum;
pub mod dsr;
pub mod frag;
pub mod hash;
pub mod maps;
pub mod service;
pub mod snat;
pub mod sock;
pub mod stats;
pub mod tuple;

pub use affinity::{AffinityKey, AffinityValue};
pub use config::Config;
pub use conntrack::{CtKey, CtValue};
pub use frag::{FragKey, FragValue};
pub use service::{
    Backend, BackendId, MaglevChunk, ServiceInfo, ServiceKey, ServiceValue, SrcRange,
};
pub use tuple::Tuple;

/// Address families as carried in keys (the values of `AF_INET`/`AF_INET6`).
pub mod family {
    /// IPv4.
    pub const V4: u8 = 2;
    /// IPv6.
    pub const V6: u8 = 10;
}

/// IP protocol numbers the datapath translates.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// SCTP (its checksum updated by programs of its own, see
    /// `maps::SCTP_CRC`).
    pub const SCTP: u8 = 132;
}

/// An IPv4 or IPv6 address as four 32-bit words in network byte order.
///
/// IPv4 uses word 0 only. `bpftool` prints the words as host integers, so an
/// address shows byte-swapped on little-endian machines.
pub type IpAddrBe = [u32; 4];

/// Implements `aya::Pod` for map types when built for user space.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, `Copy`, made of integers only and
            // has no implicit padding (each has a size assertion next to it).
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;
