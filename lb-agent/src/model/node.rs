//! What the node knows about itself: its name and the addresses that serve
//! NodePorts, after the `--nodeport-addresses` filter.

use std::net::IpAddr;

use super::Cidr;

/// Everything the node needs to know about itself to translate Services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// This node's name, compared with `EndpointSlice.endpoints[].nodeName`.
    pub name: String,
    /// This node's addresses: every NodePort is a frontend on each of them.
    pub addresses: Vec<IpAddr>,
}

/// Which node addresses serve NodePorts (`--nodeport-addresses`, as
/// kube-proxy's flag): those inside one of the ranges, or all of them when
/// there is none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressFilter(pub Vec<Cidr>);

impl AddressFilter {
    /// Keeps the addresses inside one of the ranges; all when there is none.
    pub fn keep(&self, addrs: Vec<IpAddr>) -> Vec<IpAddr> {
        if self.0.is_empty() {
            return addrs;
        }
        addrs
            .into_iter()
            .filter(|a| self.0.iter().any(|c| c.contains(*a)))
            .collect()
    }
}

impl std::str::FromStr for AddressFilter {
    type Err = String;

    /// A comma-separated list of CIDRs; empty entries are ignored, so an
    /// empty value (as a templated manifest may pass) means none.
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .filter(|c| !c.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Cidr>, String>>()
            .map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_address_lists_parse_and_may_be_empty() {
        let parse = |s: &str| s.parse::<AddressFilter>();
        assert!(parse("").is_ok_and(|c| c.0.is_empty()));
        let two = parse("10.0.0.0/8, fd00::/64").map(|c| c.0.len());
        assert_eq!(two, Ok(2));
        assert!(parse("10.0.0.0/8,nope").is_err());
    }

    #[test]
    fn only_addresses_inside_the_ranges_are_kept() {
        let ips =
            |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|a| a.parse().expect("ip")).collect() };
        let all = ips(&["10.99.0.1", "203.0.113.1", "fd00::1"]);
        let filter = |s: &str| s.parse::<AddressFilter>().expect("filter");
        assert_eq!(filter("").keep(all.clone()), all);
        assert_eq!(
            filter("10.99.0.0/24,fd00::/64").keep(all.clone()),
            ips(&["10.99.0.1", "fd00::1"])
        );
        assert!(filter("192.168.0.0/16").keep(all).is_empty());
    }
}
