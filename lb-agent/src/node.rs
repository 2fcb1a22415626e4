//! The node's own network: the addresses of its external interfaces and the
//! kernel's link and address events (interfaces coming and going, addresses
//! changing), which the run loop answers by attaching to new pod interfaces
//! and rewriting what depends on the addresses.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;

/// The addresses (both families) of the given interfaces, in interface
/// order, each interface's in the kernel's order.
pub fn iface_addresses(ifaces: &[String]) -> Result<Vec<IpAddr>> {
    let all = local_addresses()?;
    Ok(ifaces
        .iter()
        .flat_map(|iface| {
            all.iter()
                .filter(move |(name, _)| name == iface)
                .map(|(_, addr)| *addr)
        })
        .collect())
}

/// Every address of this network namespace with its interface, in the
/// kernel's order (IPv4 before IPv6), loopback and IPv6 link-local left
/// out: NodePorts are not served on them (the node's own connections reach
/// Services through the socket hooks, and a link-local address names no
/// node outside its link).
pub fn local_addresses() -> Result<Vec<(String, IpAddr)>> {
    Ok(nix::ifaddrs::getifaddrs()
        .context("list interface addresses")?
        .filter_map(|a| {
            let sa = a.address.as_ref()?;
            let ip = if let Some(sin) = sa.as_sockaddr_in() {
                IpAddr::V4(sin.ip())
            } else {
                IpAddr::V6(sa.as_sockaddr_in6()?.ip())
            };
            serves_nodeports(ip).then_some((a.interface_name, ip))
        })
        .collect())
}

/// Whether a node address may carry NodePorts: not loopback, not IPv6
/// link-local (fe80::/10).
fn serves_nodeports(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The first address of each family in `addrs`, IPv4 first: the node's
/// primary addresses when no Node object names them (the `--iface`
/// addresses of a manifests-folder agent).
pub fn first_of_each_family(addrs: &[IpAddr]) -> Vec<IpAddr> {
    [true, false]
        .into_iter()
        .filter_map(|v4| addrs.iter().copied().find(|a| a.is_ipv4() == v4))
        .collect()
}

/// The interfaces among `local` that carry one of `addresses`, without
/// those `skip` names, each once, in order.
pub fn ifaces_carrying(
    local: &[(String, IpAddr)],
    addresses: &[IpAddr],
    skip: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (iface, addr) in local {
        if addresses.contains(addr) && !skip(iface) && !out.contains(iface) {
            out.push(iface.clone());
        }
    }
    out
}

/// The primary address of each family of each of `ifaces` that has one:
/// its first in `local` (the kernel lists an interface's primary IPv4
/// addresses before its secondary ones; IPv6 has no such rank, and its
/// first global address is the one source selection prefers among equals).
/// This is the address SNAT gives flows leaving by the interface, as
/// masquerading takes the device's primary address.
pub fn primary_addresses(local: &[(String, IpAddr)], ifaces: &[String]) -> Vec<(String, IpAddr)> {
    ifaces
        .iter()
        .flat_map(|iface| {
            [true, false].into_iter().filter_map(move |v4| {
                local
                    .iter()
                    .find(|(name, addr)| name == iface && addr.is_ipv4() == v4)
                    .cloned()
            })
        })
        .collect()
}

/// Link and address changes in this network namespace, as a stream of
/// wake-ups (the receiver re-reads what it needs).
pub fn link_events() -> Result<mpsc::Receiver<()>> {
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    const RTMGRP_LINK: u32 = 0x1;
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    let mut socket = Socket::new(NETLINK_ROUTE).context("open netlink socket")?;
    socket
        .bind(&SocketAddr::new(
            0,
            RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
        ))
        .context("subscribe to netlink link events")?;
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(65536);
            loop {
                buf.clear();
                if socket.recv(&mut buf, 0).is_err() {
                    // ENOBUFS after a burst: events were lost, which a
                    // wake-up covers, since the receiver rescans anyway.
                }
                if tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        })
        .context("start netlink thread")?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interfaces_primary_address_is_its_first() {
        let ip = |a: &str| -> IpAddr { a.parse().expect("ip") };
        let local = vec![
            ("eth0".to_owned(), ip("10.99.0.1")),
            ("eth1".to_owned(), ip("10.98.0.1")),
            ("eth1".to_owned(), ip("10.98.0.2")),
            ("eth0".to_owned(), ip("10.99.0.9")),
            ("eth0".to_owned(), ip("fd00:99::1")),
            ("eth0".to_owned(), ip("fd00:99::9")),
        ];
        let ifaces = ["eth1".to_owned(), "eth2".to_owned(), "eth0".to_owned()];
        assert_eq!(
            primary_addresses(&local, &ifaces),
            [
                ("eth1".to_owned(), ip("10.98.0.1")),
                ("eth0".to_owned(), ip("10.99.0.1")),
                ("eth0".to_owned(), ip("fd00:99::1")),
            ]
        );
    }

    #[test]
    fn the_primary_addresses_without_a_node_are_the_first_of_each_family() {
        let ips =
            |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|a| a.parse().expect("ip")).collect() };
        assert_eq!(
            first_of_each_family(&ips(&["fd00::1", "10.0.0.1", "fd00::2", "10.0.0.2"])),
            ips(&["10.0.0.1", "fd00::1"])
        );
        assert_eq!(first_of_each_family(&ips(&["fd00::1"])), ips(&["fd00::1"]));
        assert!(first_of_each_family(&[]).is_empty());
    }

    #[test]
    fn loopback_and_link_local_addresses_serve_no_nodeports() {
        let ip = |a: &str| -> IpAddr { a.parse().expect("ip") };
        assert!(!serves_nodeports(ip("127.0.0.1")));
        assert!(!serves_nodeports(ip("::1")));
        assert!(!serves_nodeports(ip("fe80::1")));
        assert!(!serves_nodeports(ip("febf::1")));
        assert!(serves_nodeports(ip("fec0::1")));
        assert!(serves_nodeports(ip("fd00::1")));
        assert!(serves_nodeports(ip("10.0.0.1")));
    }

    #[test]
    fn interfaces_carrying_nodeport_addresses_are_found_once_each() {
        let ip = |a: &str| -> IpAddr { a.parse().expect("ip") };
        let local = vec![
            ("eth0".to_owned(), ip("10.99.0.1")),
            ("eth1".to_owned(), ip("10.98.0.1")),
            ("eth1".to_owned(), ip("10.98.0.2")),
            ("lxc0".to_owned(), ip("10.244.1.1")),
            ("eth2".to_owned(), ip("10.97.0.1")),
        ];
        let addrs = [
            ip("10.99.0.1"),
            ip("10.98.0.1"),
            ip("10.98.0.2"),
            ip("10.244.1.1"),
        ];
        assert_eq!(
            ifaces_carrying(&local, &addrs, |i| i == "eth0" || i.starts_with("lxc")),
            ["eth1"]
        );
    }
}
