//! Node-wide settings the agent writes once at start.

use crate::{family, pod, IpAddrBe};

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
    /// Idle time after which an established TCP flow is forgotten (seconds).
    pub tcp_timeout_s: u32,
    /// Idle time after which a TCP flow that saw FIN or RST is forgotten (seconds).
    pub tcp_closing_timeout_s: u32,
    /// Idle time after which a UDP flow is forgotten (seconds).
    pub udp_timeout_s: u32,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// Idle time after which a flow whose backend never answered (an
    /// embryonic flow) is forgotten (seconds).
    pub embryonic_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 44);

impl Config {
    /// This node's address of `family` ([`crate::family`]), as the datapath
    /// uses it (SNAT source, DSR endpoint); `None` when the agent set none.
    #[inline(always)]
    #[must_use]
    pub const fn node_addr(&self, family: u8) -> Option<IpAddrBe> {
        let addr = match family {
            family::V4 => [self.node_addr4_be, 0, 0, 0],
            family::V6 => self.node_addr6_be,
            _ => return None,
        };
        if addr[0] | addr[1] | addr[2] | addr[3] == 0 {
            None
        } else {
            Some(addr)
        }
    }
}

/// Direct server return: Cluster-policy traffic from outside to a remote
/// backend is encapsulated to the backend's node, which answers the client
/// itself (see [`crate::dsr`]). Without it such traffic is SNATed.
pub const CONFIG_F_DSR: u32 = 1 << 0;

/// Default established-TCP idle timeout: kube-proxy's 24 hours.
pub const DEFAULT_TCP_TIMEOUT_S: u32 = 86_400;
/// Default idle timeout after FIN or RST: Linux's TIME_WAIT, 2 minutes.
pub const DEFAULT_TCP_CLOSING_TIMEOUT_S: u32 = 120;
/// Default idle timeout of a flow whose backend has not answered: a few
/// seconds, so that a flood of unanswered SYNs ages out fast; a client's
/// SYN retransmissions (1 s, 3 s) keep a slow handshake alive.
pub const DEFAULT_EMBRYONIC_TIMEOUT_S: u32 = 5;
/// Default UDP idle timeout: Linux's nf_conntrack_udp_timeout, 30 seconds.
pub const DEFAULT_UDP_TIMEOUT_S: u32 = 30;

/// Default SNAT port range: above Linux's default ephemeral range
/// (32768–60999), so translated flows never collide with the node's own.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61000, 65535);

pod!(Config);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_address_is_found_by_its_family_and_absent_when_unset() {
        let mut cfg = Config::default();
        assert_eq!(cfg.node_addr(family::V4), None);
        assert_eq!(cfg.node_addr(family::V6), None);
        cfg.node_addr4_be = u32::from_ne_bytes([10, 0, 0, 1]);
        cfg.node_addr6_be = [0xfd00_0000u32.to_be(), 0, 0, 1u32.to_be()];
        assert_eq!(
            cfg.node_addr(family::V4),
            Some([cfg.node_addr4_be, 0, 0, 0])
        );
        assert_eq!(cfg.node_addr(family::V6), Some(cfg.node_addr6_be));
        assert_eq!(cfg.node_addr(0), None);
    }
}
