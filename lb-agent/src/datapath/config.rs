//! The config map: node-wide settings the datapath reads per packet.

use std::net::IpAddr;

use anyhow::{bail, Context as _, Result};
use lb_common::{addr::addr_be, config::CONFIG_F_DSR, Config};
use tracing::warn;

use super::maps::Maps;

/// Where the kernel keeps the node's ephemeral port range (per network
/// namespace).
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Linux's default ephemeral port range, assumed when it cannot be read.
const LINUX_EPHEMERAL_PORTS: (u16, u16) = (32768, 60999);

/// The settings of the config map that come from flags.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Source ports for SNAT, inclusive.
    pub snat_ports: (u16, u16),
    /// The node's own ephemeral ports, inclusive, left out of the SNAT
    /// ports (see [`ephemeral_ports`]).
    pub ephemeral_ports: (u16, u16),
    /// Idle timeouts in seconds: TCP, TCP after FIN or RST, UDP.
    pub timeouts: [u32; 3],
    /// Idle timeout of a flow not established yet (seconds).
    pub embryonic_timeout: u32,
    /// Direct server return instead of SNAT for Cluster-policy traffic
    /// from outside to a backend on another node.
    pub dsr: bool,
}

impl Settings {
    /// How many source ports SNAT hands out per backend and protocol: the
    /// SNAT range less the ephemeral ports; an error when none is left.
    pub fn snat_port_count(&self) -> Result<u32> {
        let n = self.config(0, [0; 4]).snat_port_count();
        if n == 0 {
            let (min, max) = self.snat_ports;
            let (e0, e1) = self.ephemeral_ports;
            bail!(
                "--snat-ports {min}-{max} lies inside the node's ephemeral range {e0}-{e1} \
                 ({LOCAL_PORT_RANGE}), which is left to the node's own connections: \
                 give ports outside it (the default is 1024-65535 less that range)"
            );
        }
        Ok(n)
    }

    /// The config map's entry with the node's addresses of each family
    /// (zero: none).
    fn config(&self, node_addr4_be: u32, node_addr6_be: lb_common::IpAddrBe) -> Config {
        Config {
            node_addr4_be,
            snat_port_min: self.snat_ports.0,
            snat_port_max: self.snat_ports.1,
            node_addr6_be,
            tcp_timeout_s: self.timeouts[0],
            tcp_closing_timeout_s: self.timeouts[1],
            udp_timeout_s: self.timeouts[2],
            flags: if self.dsr { CONFIG_F_DSR } else { 0 },
            embryonic_timeout_s: self.embryonic_timeout,
            snat_skip_min: self.ephemeral_ports.0,
            snat_skip_max: self.ephemeral_ports.1,
        }
    }
}

/// The node's ephemeral port range (`net.ipv4.ip_local_port_range` of this
/// network namespace), from which its own sockets take their source
/// ports. SNAT leaves it out: the datapath's flows bypass the kernel's
/// conntrack, so the kernel, picking a port for a node socket, would not
/// see that a translated flow to the same backend holds it. Linux's
/// default when it cannot be read.
pub fn ephemeral_ports() -> (u16, u16) {
    match std::fs::read_to_string(LOCAL_PORT_RANGE)
        .context("read it")
        .and_then(|text| parse_port_pair(&text))
    {
        Ok(range) => range,
        Err(e) => {
            let (a, b) = LINUX_EPHEMERAL_PORTS;
            warn!("{LOCAL_PORT_RANGE}: {e:#}; SNAT leaves Linux's default {a}-{b} out");
            LINUX_EPHEMERAL_PORTS
        }
    }
}

/// Parses the two ports of `ip_local_port_range` ("32768\t60999").
fn parse_port_pair(text: &str) -> Result<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b)), None) if a <= b => Ok((a, b)),
        _ => bail!("expected two ports, low then high, got {text:?}"),
    }
}

/// Writes the config map: the first address of each family of
/// `addresses` (the external interfaces') is the node's address of that
/// family, SNAT's source where the interface a flow leaves by has none of
/// its own (`Maps::set_iface_addrs`).
pub fn write_config(maps: &mut Maps, addresses: &[IpAddr], settings: &Settings) -> Result<()> {
    let (node_addr4_be, node_addr6_be) = node_addrs_be(addresses);
    if node_addr4_be == 0 {
        warn!("no IPv4 address on the external interfaces: NodePorts to remote backends cannot be SNATed");
    }
    maps.config
        .set(0, settings.config(node_addr4_be, node_addr6_be), 0)
        .context("write config map")
}

/// The node's IPv4 and IPv6 addresses as the config map holds them: the
/// first of each family in `addresses`, zero for a family it lacks.
fn node_addrs_be(addresses: &[IpAddr]) -> (u32, lb_common::IpAddrBe) {
    let first = |v4: bool| {
        addresses
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .map_or([0; 4], |a| addr_be(*a).0)
    };
    (first(true)[0], first(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(snat_ports: (u16, u16), ephemeral_ports: (u16, u16)) -> Settings {
        Settings {
            snat_ports,
            ephemeral_ports,
            timeouts: [1, 1, 1],
            embryonic_timeout: 1,
            dsr: false,
        }
    }

    #[test]
    fn the_node_address_of_each_family_is_the_first_of_it() {
        let ips: Vec<IpAddr> = ["fd00::1", "10.0.0.1", "fd00::2", "10.0.0.2"]
            .iter()
            .map(|a| a.parse().expect("ip"))
            .collect();
        let cfg = settings((1024, 65535), (32768, 60999));
        let (v4, v6) = node_addrs_be(&ips);
        let c = cfg.config(v4, v6);
        assert_eq!(c.node_addr(lb_common::family::V4), Some(addr_be(ips[1]).0));
        assert_eq!(c.node_addr(lb_common::family::V6), Some(addr_be(ips[0]).0));
        let (v4, v6) = node_addrs_be(&ips[1..2]);
        assert_eq!(cfg.config(v4, v6).node_addr(lb_common::family::V6), None);
    }

    #[test]
    fn the_kernels_port_range_parses() {
        assert_eq!(parse_port_pair("32768\t60999\n").ok(), Some((32768, 60999)));
        assert!(parse_port_pair("60999 32768").is_err());
        assert!(parse_port_pair("1 2 3").is_err());
        assert!(parse_port_pair("").is_err());
    }

    #[test]
    fn snat_ports_leave_the_ephemeral_range_out_and_must_keep_some() {
        let default = settings((1024, 65535), (32768, 60999));
        assert_eq!(default.snat_port_count().ok(), Some(36_280));
        // The old default range, above the ephemeral one, keeps all its ports.
        assert_eq!(
            settings((61000, 65535), (32768, 60999))
                .snat_port_count()
                .ok(),
            Some(4536)
        );
        let inside = settings((40000, 50000), (32768, 60999)).snat_port_count();
        let msg = format!("{:#}", inside.expect_err("nothing left"));
        assert!(msg.contains("--snat-ports 40000-50000"), "{msg}");
    }
}
