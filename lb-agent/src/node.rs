//! The node's own network: the addresses of its external interfaces and the
//! kernel's link and address events (interfaces coming and going, addresses
//! changing), which the run loop answers by attaching to new pod interfaces
//! and rewriting what depends on the addresses.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;

/// IPv4 addresses of the given interfaces, in interface order.
pub fn iface_addresses(ifaces: &[String]) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let all: Vec<_> = nix::ifaddrs::getifaddrs()
        .context("list interface addresses")?
        .collect();
    for iface in ifaces {
        for a in &all {
            if &a.interface_name != iface {
                continue;
            }
            if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
                out.push(IpAddr::V4(sin.ip()));
            }
        }
    }
    Ok(out)
}

/// Every IPv4 address of this network namespace with its interface, in
/// the kernel's order, loopback left out: NodePorts are not served on it
/// (the node's own connections reach Services through the socket hooks).
pub fn local_addresses() -> Result<Vec<(String, IpAddr)>> {
    Ok(nix::ifaddrs::getifaddrs()
        .context("list interface addresses")?
        .filter_map(|a| {
            let sin = a.address.as_ref().and_then(|s| s.as_sockaddr_in())?;
            let ip = sin.ip();
            (!ip.is_loopback()).then_some((a.interface_name, IpAddr::V4(ip)))
        })
        .collect())
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

/// The primary IPv4 address of each of `ifaces` that has one: its first
/// in `local` (the kernel lists an interface's primary addresses before
/// its secondary ones). This is the address SNAT gives flows leaving by
/// the interface, as masquerading takes the device's primary address.
pub fn primary_addresses(local: &[(String, IpAddr)], ifaces: &[String]) -> Vec<(String, IpAddr)> {
    ifaces
        .iter()
        .filter_map(|iface| {
            local
                .iter()
                .find(|(name, addr)| name == iface && addr.is_ipv4())
                .cloned()
        })
        .collect()
}

/// Link and address changes in this network namespace, as a stream of
/// wake-ups (the receiver re-reads what it needs).
pub fn link_events() -> Result<mpsc::Receiver<()>> {
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    const RTMGRP_LINK: u32 = 0x1;
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    let mut socket = Socket::new(NETLINK_ROUTE).context("open netlink socket")?;
    socket
        .bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
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
        ];
        let ifaces = ["eth1".to_owned(), "eth2".to_owned(), "eth0".to_owned()];
        assert_eq!(
            primary_addresses(&local, &ifaces),
            [
                ("eth1".to_owned(), ip("10.98.0.1")),
                ("eth0".to_owned(), ip("10.99.0.1"))
            ]
        );
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
