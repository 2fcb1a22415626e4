//! The config map: node-wide settings the datapath reads per packet.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use lb_common::{addr::addr_be, config::CONFIG_F_DSR, Config};
use tracing::warn;

use super::maps::Maps;

/// The settings of the config map that come from flags.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Source ports for SNAT, inclusive.
    pub snat_ports: (u16, u16),
    /// Idle timeouts in seconds: TCP, TCP after FIN or RST, UDP.
    pub timeouts: [u32; 3],
    /// Idle timeout of a flow not established yet (seconds).
    pub embryonic_timeout: u32,
    /// Direct server return instead of SNAT for Cluster-policy traffic
    /// from outside to a backend on another node.
    pub dsr: bool,
}

/// Writes the config map: the first IPv4 of `addresses` (the external
/// interfaces') is the SNAT source.
pub fn write_config(maps: &mut Maps, addresses: &[IpAddr], settings: &Settings) -> Result<()> {
    let node_addr4_be = addresses
        .iter()
        .find(|a| a.is_ipv4())
        .map_or(0, |a| addr_be(*a).0[0]);
    if node_addr4_be == 0 {
        warn!("no IPv4 address on the external interfaces: NodePorts to remote backends cannot be SNATed");
    }
    let cfg = Config {
        node_addr4_be,
        snat_port_min: settings.snat_ports.0,
        snat_port_max: settings.snat_ports.1,
        node_addr6_be: [0; 4],
        tcp_timeout_s: settings.timeouts[0],
        tcp_closing_timeout_s: settings.timeouts[1],
        udp_timeout_s: settings.timeouts[2],
        flags: if settings.dsr { CONFIG_F_DSR } else { 0 },
        embryonic_timeout_s: settings.embryonic_timeout,
    };
    maps.config.set(0, cfg, 0).context("write config map")
}
