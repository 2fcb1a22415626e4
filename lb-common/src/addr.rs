//! Conversions between `core::net` addresses and the maps' [`IpAddrBe`]
//! with its [`family`](crate::family) (user space only: the agent converts
//! at its edge, the datapath never does).
//!
//! ```
//! use core::net::IpAddr;
//! use lb_common::addr::{addr_be, addr_from_be};
//!
//! let ip: IpAddr = "10.96.0.1".parse().unwrap();
//! let (words, family) = addr_be(ip);
//! assert_eq!(family, lb_common::family::V4);
//! assert_eq!(addr_from_be(words, family), ip);
//! ```

use core::net::{IpAddr, SocketAddr};

use crate::{family, IpAddrBe};

/// Converts an address into the datapath's representation: its words in
/// network byte order, and its family.
pub fn addr_be(addr: IpAddr) -> (IpAddrBe, u8) {
    match addr {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], family::V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let mut w = [0u32; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            (w, family::V6)
        }
    }
}

/// Converts the datapath's representation back into an address.
pub fn addr_from_be(addr: IpAddrBe, fam: u8) -> IpAddr {
    if fam == family::V6 {
        let mut o = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(addr[0].to_ne_bytes())
    }
}

/// An address and a port in network byte order, as map keys and values
/// hold them, as a socket address.
pub fn socket_from_be(addr: IpAddrBe, fam: u8, port_be: u16) -> SocketAddr {
    SocketAddr::new(addr_from_be(addr, fam), u16::from_be(port_be))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn addresses_round_trip() {
        for a in ["10.96.0.1", "255.1.2.3", "fd00::1", "2001:db8::42"] {
            let (w, fam) = addr_be(ip(a));
            assert_eq!(addr_from_be(w, fam), ip(a));
        }
        assert_eq!(
            addr_be(ip("10.0.0.1")).0[0],
            u32::from_ne_bytes([10, 0, 0, 1])
        );
    }

    #[test]
    fn sockets_read_ports_in_network_order() {
        let (w, fam) = addr_be(ip("10.0.0.1"));
        assert_eq!(
            socket_from_be(w, fam, 8080u16.to_be()),
            "10.0.0.1:8080".parse::<SocketAddr>().expect("socket")
        );
    }
}
