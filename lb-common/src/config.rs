//! Node-wide settings the agent writes once at start.

use crate::{pod, IpAddrBe};

/// The single entry of the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// This node's IPv4 address used as the SNAT source, network byte order.
    pub node_addr4_be: u32,
    /// First port of the SNAT range (host order, inclusive).
    pub snat_port_min: u16,
    /// Last port of the SNAT range (host order, inclusive).
    pub snat_port_max: u16,
    /// This node's IPv6 address used as the SNAT source, network byte order.
    pub node_addr6_be: IpAddrBe,
}
const _: () = assert!(core::mem::size_of::<Config>() == 24);

/// Default SNAT port range: above Linux's default ephemeral range
/// (32768–60999), so translated flows never collide with the node's own.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61000, 65535);

pod!(Config);
