//! A flow's identity without a packet: addresses, ports, protocol, family.
//!
//! This is all that frontend lookup, backend selection and conntrack need,
//! and all a socket-level program (cgroup `connect4`, `sendmsg4`) has: it
//! sees a socket address, never a packet. The datapath stages that decide a
//! flow's fate take a [`Tuple`] so that both kinds of program share them.
//!
//! The tuple is also the conntrack key ([`crate::CtKey`]): conntrack keys a
//! flow by its tuple exactly as it appears on the wire, so a packet's tuple
//! is looked up as it is, with no copy. A change of this layout is a change
//! of the conntrack map's layout (and needs a new map version).

use crate::{hash::flow_hash, pod, IpAddrBe, ServiceKey};

/// Addresses, ports and protocol of one direction of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// Source address, network byte order.
    pub saddr_be: IpAddrBe,
    /// Destination address, network byte order.
    pub daddr_be: IpAddrBe,
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Address family ([`crate::family`]).
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Tuple>() == 40);

impl Tuple {
    /// The flow hash ([`flow_hash`]) of this tuple: picks the Maglev slot of
    /// a new flow (and starts a backend's SNAT port cursor). Callers
    /// compute it once.
    #[inline(always)]
    #[must_use]
    pub const fn hash(&self) -> u32 {
        let ports = ((self.sport_be as u32) << 16) | self.dport_be as u32;
        flow_hash(&self.saddr_be, &self.daddr_be, ports, self.proto)
    }

    /// The frontend this tuple is addressed to.
    #[inline(always)]
    #[must_use]
    pub const fn frontend(&self) -> ServiceKey {
        ServiceKey {
            addr_be: self.daddr_be,
            port_be: self.dport_be,
            proto: self.proto,
            family: self.family,
        }
    }

    /// The tuple of the other direction of the flow.
    #[inline(always)]
    #[must_use]
    pub const fn reversed(&self) -> Tuple {
        Tuple {
            saddr_be: self.daddr_be,
            daddr_be: self.saddr_be,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

pod!(Tuple);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{family, proto};

    fn tuple() -> Tuple {
        Tuple {
            saddr_be: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            daddr_be: [u32::from_ne_bytes([10, 96, 0, 10]), 0, 0, 0],
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: proto::TCP,
            family: family::V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn the_hash_is_the_flow_hash_of_the_ports_as_carried() {
        let t = tuple();
        let ports = (u32::from(t.sport_be) << 16) | u32::from(t.dport_be);
        assert_eq!(
            t.hash(),
            flow_hash(&t.saddr_be, &t.daddr_be, ports, t.proto)
        );
    }

    #[test]
    fn reversing_twice_gives_the_tuple_back() {
        let t = tuple();
        let r = t.reversed();
        assert_eq!((r.saddr_be, r.sport_be), (t.daddr_be, t.dport_be));
        assert_eq!((r.daddr_be, r.dport_be), (t.saddr_be, t.sport_be));
        assert_eq!(r.reversed(), t);
    }

    #[test]
    fn the_frontend_is_the_destination() {
        let t = tuple();
        let f = t.frontend();
        assert_eq!((f.addr_be, f.port_be), (t.daddr_be, t.dport_be));
        assert_eq!((f.proto, f.family), (t.proto, t.family));
    }
}
