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
    /// First port of the node's own ephemeral range (host order), left out
    /// of the SNAT range; 0 when nothing is left out.
    pub snat_skip_min: u16,
    /// Last port of the node's own ephemeral range (host order, inclusive).
    pub snat_skip_max: u16,
}
const _: () = assert!(core::mem::size_of::<Config>() == 48);

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

    /// The skipped ports inside the SNAT range: first port and count (0
    /// when the skipped range is unset or lies outside).
    #[inline(always)]
    const fn snat_skipped(&self) -> (u32, u32) {
        let (min, max) = (self.snat_port_min as u32, self.snat_port_max as u32);
        let (skip_min, skip_max) = (self.snat_skip_min as u32, self.snat_skip_max as u32);
        if skip_min == 0 || skip_max < skip_min {
            return (0, 0);
        }
        let lo = if skip_min > min { skip_min } else { min };
        let hi = if skip_max < max { skip_max } else { max };
        if hi < lo {
            (0, 0)
        } else {
            (lo, hi - lo + 1)
        }
    }

    /// How many source ports SNAT may hand out per backend and protocol:
    /// the SNAT range less the node's ephemeral ports inside it.
    #[inline(always)]
    #[must_use]
    pub const fn snat_port_count(&self) -> u32 {
        if self.snat_port_min == 0 || self.snat_port_max < self.snat_port_min {
            return 0;
        }
        let all = (self.snat_port_max - self.snat_port_min) as u32 + 1;
        all - self.snat_skipped().1
    }

    /// The `i`-th port SNAT may hand out, counting from the range's lowest
    /// and stepping over the skipped ports; `i` must be below
    /// [`Self::snat_port_count`].
    #[inline(always)]
    #[must_use]
    pub const fn snat_port(&self, i: u32) -> u16 {
        let port = self.snat_port_min as u32 + i;
        let (lo, skipped) = self.snat_skipped();
        if skipped != 0 && port >= lo {
            (port + skipped) as u16
        } else {
            port as u16
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

/// Default SNAT port range: every unprivileged port, as Linux's
/// masquerading uses; the agent leaves the node's own ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768–60999 by default) out of it
/// ([`Config::snat_skip_min`]), so translated flows never take the tuple of
/// one of the node's own connections.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 65535);

pod!(Config);

#[cfg(test)]
mod tests {
    extern crate std;

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

    fn ports(cfg: &Config) -> std::vec::Vec<u16> {
        (0..cfg.snat_port_count())
            .map(|i| cfg.snat_port(i))
            .collect()
    }

    #[test]
    fn snat_ports_are_the_range_in_order_without_the_skipped_ones() {
        let mut cfg = Config {
            snat_port_min: 10,
            snat_port_max: 20,
            ..Config::default()
        };
        assert_eq!(ports(&cfg), (10..=20).collect::<std::vec::Vec<_>>());
        cfg.snat_skip_min = 13;
        cfg.snat_skip_max = 17;
        assert_eq!(ports(&cfg), [10, 11, 12, 18, 19, 20]);
        // Skipped ports overlapping either end, or all of it.
        (cfg.snat_skip_min, cfg.snat_skip_max) = (5, 12);
        assert_eq!(ports(&cfg), (13..=20).collect::<std::vec::Vec<_>>());
        (cfg.snat_skip_min, cfg.snat_skip_max) = (18, 40);
        assert_eq!(ports(&cfg), (10..=17).collect::<std::vec::Vec<_>>());
        (cfg.snat_skip_min, cfg.snat_skip_max) = (1, 65535);
        assert_eq!(cfg.snat_port_count(), 0);
        // Outside the range: nothing skipped.
        (cfg.snat_skip_min, cfg.snat_skip_max) = (30, 40);
        assert_eq!(cfg.snat_port_count(), 11);
    }

    #[test]
    fn the_default_range_less_linux_default_ephemeral_range_is_36_280_ports() {
        let cfg = Config {
            snat_port_min: DEFAULT_SNAT_PORTS.0,
            snat_port_max: DEFAULT_SNAT_PORTS.1,
            snat_skip_min: 32768,
            snat_skip_max: 60999,
            ..Config::default()
        };
        assert_eq!(cfg.snat_port_count(), 36_280);
        assert_eq!(cfg.snat_port(0), 1024);
        assert_eq!(cfg.snat_port(32767 - 1024), 32767);
        assert_eq!(cfg.snat_port(32768 - 1024), 61000);
        assert_eq!(cfg.snat_port(36_279), 65535);
        // An empty or unset range hands out nothing.
        assert_eq!(Config::default().snat_port_count(), 0);
    }
}
