//! What the node knows about itself: its name, its zone and the addresses
//! that serve NodePorts, after `--nodeport-addresses`.

use std::net::IpAddr;

use super::Cidr;

/// Everything the node needs to know about itself to translate Services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// This node's name, compared with `EndpointSlice.endpoints[].nodeName`.
    pub name: String,
    /// This node's addresses: every NodePort is a frontend on each of them.
    pub addresses: Vec<IpAddr>,
    /// This node's zone (`topology.kubernetes.io/zone`, or `--zone`), for
    /// topology-aware routing; `None` turns it off.
    pub zone: Option<String>,
}

/// Which node addresses serve NodePorts (`--nodeport-addresses`, as
/// kube-proxy's flag).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AddressFilter {
    /// The node's primary addresses (kube-proxy's nftables default): one
    /// per family, the address the cluster knows the node by.
    #[default]
    Primary,
    /// Every local address of the node, on any interface, inside one of
    /// the ranges (`0.0.0.0/0` gives kube-proxy's iptables default).
    Cidrs(Vec<Cidr>),
}

impl AddressFilter {
    /// The NodePort addresses, from the node's `primary` ones and all its
    /// `local` ones (loopback excluded by the caller).
    pub fn select(&self, primary: &[IpAddr], local: &[IpAddr]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = match self {
            Self::Primary => primary.to_vec(),
            Self::Cidrs(ranges) => local
                .iter()
                .copied()
                .filter(|a| ranges.iter().any(|c| c.contains(*a)))
                .collect(),
        };
        let mut seen = std::collections::BTreeSet::new();
        out.retain(|a| seen.insert(*a));
        out
    }
}

impl std::str::FromStr for AddressFilter {
    type Err = String;

    /// `primary`, or a comma-separated list of CIDRs; empty entries are
    /// ignored, so an empty value (as a templated manifest may pass) means
    /// the default, `primary`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        match parts.as_slice() {
            [] | ["primary"] => Ok(Self::Primary),
            _ if parts.contains(&"primary") => {
                Err("`primary` stands alone: give it or a list of CIDRs, not both".to_owned())
            }
            _ => parts
                .iter()
                .map(|c| c.parse())
                .collect::<Result<Vec<Cidr>, String>>()
                .map(Self::Cidrs),
        }
    }
}

/// A comma-separated list of CIDRs as a flag gives it (`--dsr-peers`);
/// empty entries are ignored, so an empty value is an empty list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl std::str::FromStr for CidrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Cidr>, String>>()
            .map(Self)
    }
}

impl AddressFilter {
    /// The filter as its flag spells it, one entry per item.
    pub fn entries(&self) -> Vec<String> {
        match self {
            Self::Primary => vec!["primary".to_owned()],
            Self::Cidrs(cidrs) => cidrs.iter().map(ToString::to_string).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|a| a.parse().expect("ip")).collect()
    }

    #[test]
    fn nodeport_addresses_parse_as_primary_or_cidrs() {
        let parse = |s: &str| s.parse::<AddressFilter>();
        assert_eq!(parse(""), Ok(AddressFilter::Primary));
        assert_eq!(parse("primary"), Ok(AddressFilter::Primary));
        let two = parse("10.0.0.0/8, fd00::/64");
        assert!(
            matches!(two, Ok(AddressFilter::Cidrs(ref c)) if c.len() == 2),
            "{two:?}"
        );
        assert!(parse("10.0.0.0/8,nope").is_err());
        assert!(parse("primary,10.0.0.0/8").is_err());
    }

    #[test]
    fn primary_takes_the_primary_addresses_and_cidrs_every_local_one_inside() {
        let primary = ips(&["10.99.0.1"]);
        let local = ips(&["10.99.0.1", "10.98.0.1", "203.0.113.1", "10.244.1.1"]);
        let filter = |s: &str| s.parse::<AddressFilter>().expect("filter");
        assert_eq!(filter("primary").select(&primary, &local), primary);
        assert_eq!(
            filter("10.99.0.0/24,10.98.0.0/16").select(&primary, &local),
            ips(&["10.99.0.1", "10.98.0.1"])
        );
        assert_eq!(filter("0.0.0.0/0").select(&primary, &local), local);
        assert!(filter("192.168.0.0/16").select(&primary, &local).is_empty());
    }
}
