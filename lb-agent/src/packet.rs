//! Hand-built Ethernet/IPv4 and Ethernet/IPv6 packets (TCP, UDP, SCTP)
//! with correct checksums, for `lb-agent trace` and the BPF_PROG_TEST_RUN
//! tests: one L4 builder ([`L4::bytes`]) over both families.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use lb_common::{crc32c, proto};

use crate::model::Protocol;

/// Source MAC of built packets (locally administered).
pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
/// Destination MAC of built packets (locally administered).
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// TCP flag bits.
pub mod flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// The L4 part of a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment (no options).
    Tcp {
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number.
        ack: u32,
        /// Flags.
        flags: u8,
        /// Window.
        window: u16,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A UDP datagram; `no_checksum` sends a zero checksum.
    Udp {
        /// Payload.
        payload: Vec<u8>,
        /// Leave the checksum zero ("none").
        no_checksum: bool,
    },
    /// An SCTP packet with one chunk (its value padded to four bytes).
    Sctp {
        /// Verification tag.
        vtag: u32,
        /// Chunk type (1 INIT, 6 ABORT, 0 DATA, …).
        chunk_type: u8,
        /// Chunk flags.
        chunk_flags: u8,
        /// Chunk value, after the 4-byte chunk header.
        value: Vec<u8>,
        /// Leave the CRC32c zero, as Linux does when a device computes it.
        no_checksum: bool,
    },
}

impl L4 {
    /// The IP protocol number.
    pub fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => proto::TCP,
            L4::Udp { .. } => proto::UDP,
            L4::Sctp { .. } => proto::SCTP,
        }
    }

    /// The header (ports from `src` and `dst`) and payload, with the
    /// checksum over the pseudo-header of their family (SCTP's CRC32c
    /// covers the packet alone; a UDP checksum that sums to 0 is sent as
    /// 0xffff): the one L4 builder of both families.
    pub fn bytes(&self, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&src.port().to_be_bytes());
        l4.extend_from_slice(&dst.port().to_be_bytes());
        let pseudo = |l4: &[u8]| l4_checksum_of(src.ip(), dst.ip(), self.proto(), l4);
        match self {
            L4::Tcp {
                seq,
                ack,
                flags,
                window,
                payload,
            } => {
                l4.extend_from_slice(&seq.to_be_bytes());
                l4.extend_from_slice(&ack.to_be_bytes());
                l4.push(5 << 4);
                l4.push(*flags);
                l4.extend_from_slice(&window.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]);
                l4.extend_from_slice(payload);
                let c = pseudo(&l4);
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp {
                payload,
                no_checksum,
            } => {
                l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.extend_from_slice(payload);
                if !no_checksum {
                    let mut c = pseudo(&l4);
                    if c == 0 {
                        c = 0xffff;
                    }
                    l4[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            L4::Sctp {
                vtag,
                chunk_type,
                chunk_flags,
                value,
                no_checksum,
            } => {
                l4.extend_from_slice(&vtag.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]);
                l4.push(*chunk_type);
                l4.push(*chunk_flags);
                l4.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
                l4.extend_from_slice(value);
                l4.resize(l4.len().next_multiple_of(4), 0);
                if !no_checksum {
                    let c = crc32c::of_bytes(&l4);
                    l4[8..12].copy_from_slice(&c.to_le_bytes());
                }
            }
        }
        l4
    }
}

/// SCTP chunk types the tests use.
pub mod sctp_chunk {
    /// DATA.
    pub const DATA: u8 = 0;
    /// INIT.
    pub const INIT: u8 = 1;
    /// INIT ACK.
    pub const INIT_ACK: u8 = 2;
    /// ABORT.
    pub const ABORT: u8 = 6;
    /// COOKIE ECHO.
    pub const COOKIE_ECHO: u8 = 10;
    /// COOKIE ACK.
    pub const COOKIE_ACK: u8 = 11;
    /// SHUTDOWN COMPLETE.
    pub const SHUTDOWN_COMPLETE: u8 = 14;
}

/// An Ethernet + IPv4 + TCP/UDP packet description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// IP TTL.
    pub ttl: u8,
    /// IP identification.
    pub id: u16,
    /// IP options (length a multiple of 4, at most 40 bytes).
    pub ip_options: Vec<u8>,
    /// L4 header and payload.
    pub l4: L4,
}

impl Packet {
    /// A TCP segment from `src` to `dst` with default MACs, TTL 64.
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Self {
        Self {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            ip_options: Vec::new(),
            l4: L4::Tcp {
                seq: 1000,
                ack: if flags & flags::ACK != 0 { 5000 } else { 0 },
                flags,
                window: 64240,
                payload: payload.to_vec(),
            },
        }
    }

    /// A UDP datagram from `src` to `dst` with default MACs, TTL 64.
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            ip_options: Vec::new(),
            l4: L4::Udp {
                payload: payload.to_vec(),
                no_checksum: false,
            },
        }
    }

    /// An SCTP packet from `src` to `dst` with one chunk, default MACs, TTL
    /// 64.
    pub fn sctp(
        src: SocketAddrV4,
        dst: SocketAddrV4,
        vtag: u32,
        chunk_type: u8,
        value: &[u8],
    ) -> Self {
        Self {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            ip_options: Vec::new(),
            l4: L4::Sctp {
                vtag,
                chunk_type,
                chunk_flags: 0,
                value: value.to_vec(),
                no_checksum: false,
            },
        }
    }

    /// An SCTP INIT from `src` to `dst` whose initiate tag is `tag`.
    pub fn sctp_init(src: SocketAddrV4, dst: SocketAddrV4, tag: u32) -> Self {
        let mut value = Vec::new();
        value.extend_from_slice(&tag.to_be_bytes());
        // a_rwnd, outbound and inbound streams, initial TSN.
        value.extend_from_slice(&65536u32.to_be_bytes());
        value.extend_from_slice(&10u16.to_be_bytes());
        value.extend_from_slice(&10u16.to_be_bytes());
        value.extend_from_slice(&tag.wrapping_add(1).to_be_bytes());
        Self::sctp(src, dst, 0, sctp_chunk::INIT, &value)
    }

    /// The same packet with source and destination rewritten.
    pub fn with_addrs(&self, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            src,
            dst,
            ..self.clone()
        }
    }

    /// The IP protocol number.
    pub fn proto(&self) -> u8 {
        self.l4.proto()
    }

    /// Serializes with correct IP and L4 checksums.
    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4.bytes(self.src.into(), self.dst.into());
        let ihl = 20 + self.ip_options.len();
        let mut ip = vec![0x40 | (ihl / 4) as u8, 0];
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&0x4000u16.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.ip().octets());
        ip.extend_from_slice(&self.dst.ip().octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut out = Vec::new();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(&l4);
        out
    }
}

/// One's-complement sum of big-endian 16-bit words.
fn sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// The TCP/UDP checksum with the IPv4 pseudo header.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    l4_checksum_of(src.into(), dst.into(), proto, l4)
}

/// The TCP/UDP/ICMPv6 checksum with the IPv6 pseudo header.
pub fn l4_checksum6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
    l4_checksum_of((*src).into(), (*dst).into(), proto, l4)
}

/// The checksum of `l4` with the pseudo-header of `src`'s family: IPv4's
/// and IPv6's differ in layout, not in sum (the addresses, the protocol
/// and the length as 16-bit words).
fn l4_checksum_of(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let octets = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let len = l4.len() as u32;
    let pseudo =
        sum(&octets(src)) + sum(&octets(dst)) + u32::from(proto) + (len >> 16) + (len & 0xffff);
    !fold(pseudo + sum(l4))
}

/// Checks every checksum of an Ethernet/IPv4 frame (IP, and TCP, UDP,
/// SCTP or ICMP); returns what is wrong.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 34 {
        return Err(format!("frame of {} bytes is too short", frame.len()));
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total > ip.len() || ihl > total {
        return Err(format!("IP total length {total} beyond the frame"));
    }
    if checksum(&ip[..ihl]) != 0 {
        return Err("bad IPv4 header checksum".into());
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..total];
    match ip[9] {
        1 => (checksum(l4) == 0)
            .then_some(())
            .ok_or_else(|| "bad ICMP checksum".into()),
        6 => (l4_checksum(src, dst, 6, l4) == 0)
            .then_some(())
            .ok_or_else(|| "bad TCP checksum".into()),
        17 => {
            if l4.len() >= 8 && l4[6..8] == [0, 0] {
                return Ok(());
            }
            (l4_checksum(src, dst, 17, l4) == 0)
                .then_some(())
                .ok_or_else(|| "bad UDP checksum".into())
        }
        proto::SCTP => sctp_checksum_ok(l4)
            .then_some(())
            .ok_or_else(|| "bad SCTP checksum (CRC32c)".into()),
        p => Err(format!("unexpected protocol {p}")),
    }
}

/// Whether an SCTP packet's CRC32c (bytes 8..12, little-endian) is right.
pub fn sctp_checksum_ok(l4: &[u8]) -> bool {
    let Some(field) = l4.get(8..12) else {
        return false;
    };
    let stored = u32::from_le_bytes([field[0], field[1], field[2], field[3]]);
    let mut zeroed = l4.to_vec();
    zeroed[8..12].fill(0);
    crc32c::of_bytes(&zeroed) == stored
}

/// The headers of an Ethernet/IPv4 frame, as `trace` prints them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// `TCP`, `UDP`, `SCTP`, `ICMP` or the protocol number.
    pub proto: String,
    /// Source address, with the port for TCP, UDP and SCTP.
    pub src: String,
    /// Destination address, with the port for TCP, UDP and SCTP.
    pub dst: String,
    /// TCP flags as letters (`S`, `A`, `F`, `R`, `P`), empty otherwise.
    pub tcp_flags: String,
    /// IP TTL.
    pub ttl: u8,
    /// Frame length in bytes.
    pub len: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} > {}", self.proto, self.src, self.dst)?;
        if !self.tcp_flags.is_empty() {
            write!(f, " [{}]", self.tcp_flags)?;
        }
        write!(f, " ttl {} len {}", self.ttl, self.len)
    }
}

/// Reads back a frame's IP and L4 headers; `None` when it is not a
/// complete Ethernet/IPv4 or Ethernet/IPv6 frame (an IPv6 one read up to
/// its first header: extension headers show as their protocol number).
pub fn summarize(frame: &[u8]) -> Option<Summary> {
    let (src, dst, next, ttl, l4): (IpAddr, IpAddr, u8, u8, &[u8]) = match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ip = frame.get(14..)?;
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], *ip.get(15)?);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], *ip.get(19)?);
            (src.into(), dst.into(), ip[9], ip[8], ip.get(ihl..)?)
        }
        [0x86, 0xdd] => {
            let ip = frame.get(14..54)?;
            let addr = |o: usize| -> Option<IpAddr> {
                let b: [u8; 16] = ip.get(o..o + 16)?.try_into().ok()?;
                Some(Ipv6Addr::from(b).into())
            };
            (addr(8)?, addr(24)?, ip[6], ip[7], frame.get(54..)?)
        }
        _ => return None,
    };
    // `[v6]:port` for IPv6, as socket addresses print.
    let (src_ip, dst_ip) = (src, dst);
    let src = SocketAddr::new(src_ip, 0).to_string();
    let dst = SocketAddr::new(dst_ip, 0).to_string();
    let src = src.strip_suffix(":0").unwrap_or(&src);
    let dst = dst.strip_suffix(":0").unwrap_or(&dst);
    let ip_proto = next;
    let port = |off: usize| {
        l4.get(off..off + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let (proto, src, dst, tcp_flags) = match ip_proto {
        p @ (proto::TCP | proto::UDP) => {
            let tcp = p == proto::TCP;
            let letters = if tcp {
                let f = *l4.get(13)?;
                [
                    (flags::SYN, 'S'),
                    (flags::ACK, 'A'),
                    (flags::FIN, 'F'),
                    (flags::RST, 'R'),
                    (flags::PSH, 'P'),
                ]
                .iter()
                .filter(|(bit, _)| f & bit != 0)
                .map(|(_, c)| *c)
                .collect()
            } else {
                String::new()
            };
            (
                if tcp { Protocol::Tcp } else { Protocol::Udp }.to_string(),
                format!("{src}:{}", port(0)?),
                format!("{dst}:{}", port(2)?),
                letters,
            )
        }
        proto::SCTP => (
            Protocol::Sctp.to_string(),
            format!("{src}:{}", port(0)?),
            format!("{dst}:{}", port(2)?),
            String::new(),
        ),
        1 => (
            "ICMP".into(),
            src_ip.to_string(),
            dst_ip.to_string(),
            String::new(),
        ),
        58 => (
            "ICMPv6".into(),
            src_ip.to_string(),
            dst_ip.to_string(),
            String::new(),
        ),
        p => (
            p.to_string(),
            src_ip.to_string(),
            dst_ip.to_string(),
            String::new(),
        ),
    };
    Some(Summary {
        proto,
        src,
        dst,
        tcp_flags,
        ttl,
        len: frame.len(),
    })
}

/// An Ethernet/IPv6 frame (no extension headers) carrying `p`'s L4 part
/// from `src` to `dst`, `p`'s MACs and its TTL as the hop limit, with the
/// L4 checksum over the IPv6 pseudo-header.
pub fn ipv6_frame(p: &Packet, src: SocketAddrV6, dst: SocketAddrV6) -> Vec<u8> {
    let l4 = p.l4.bytes(src.into(), dst.into());
    ipv6_over_ethernet(
        (p.src_mac, p.dst_mac),
        src.ip(),
        dst.ip(),
        p.ttl,
        p.proto(),
        &l4,
    )
}

/// An Ethernet + IPv6 frame: MACs (source, destination), addresses, hop
/// limit, then `after` (everything after the fixed header: extension
/// headers and payload), announced by `nexthdr`.
pub fn ipv6_over_ethernet(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    src: &Ipv6Addr,
    dst: &Ipv6Addr,
    hop_limit: u8,
    nexthdr: u8,
    after: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(54 + after.len());
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&0x86ddu16.to_be_bytes());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(after.len() as u16).to_be_bytes());
    out.push(nexthdr);
    out.push(hop_limit);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(after);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_frame_carries_a_pseudo_header_checksum_and_reads_back() {
        let src: SocketAddrV6 = "[2001:db8::1]:4000".parse().expect("addr");
        let dst: SocketAddrV6 = "[fd00:96::10]:80".parse().expect("addr");
        let v4 = "10.0.0.1:4000".parse().expect("addr");
        let syn = Packet::tcp(v4, v4, flags::SYN, b"");
        let frame = ipv6_frame(&syn, src, dst);
        assert_eq!(frame.len(), 14 + 40 + 20);
        assert_eq!(frame[12..14], [0x86, 0xdd]);
        // The checksum over the pseudo-header and segment sums to zero.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&frame[22..54]);
        pseudo.extend_from_slice(&20u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
        assert_eq!(!fold(sum(&pseudo) + sum(&frame[54..])), 0);
        let s = summarize(&frame).expect("reads back");
        assert_eq!(
            (s.proto.as_str(), s.src.as_str(), s.dst.as_str()),
            ("TCP", "[2001:db8::1]:4000", "[fd00:96::10]:80")
        );
        assert_eq!((s.tcp_flags.as_str(), s.ttl), ("S", 64));
        let udp = ipv6_frame(&Packet::udp(v4, v4, b"x"), src, dst);
        assert_ne!(
            udp[54 + 6..54 + 8],
            [0, 0],
            "UDP over IPv6 always has a checksum"
        );
    }

    #[test]
    fn a_built_sctp_packet_carries_a_valid_crc32c_and_its_chunk() {
        let src: SocketAddrV4 = "10.0.0.1:40000".parse().expect("addr");
        let dst: SocketAddrV4 = "10.96.0.30:3868".parse().expect("addr");
        let frame = Packet::sctp_init(src, dst, 0x0102_0304).bytes();
        verify_checksums(&frame).expect("checksums");
        let sctp = &frame[34..];
        assert_eq!(sctp[..4], [0x9c, 0x40, 0x0f, 0x1c], "ports");
        assert_eq!(sctp[12], sctp_chunk::INIT);
        assert_eq!(sctp[16..20], [1, 2, 3, 4], "initiate tag");
        assert_eq!(sctp.len() % 4, 0, "padded to four bytes");
        let mut broken = frame.clone();
        broken[34] ^= 1;
        assert!(
            verify_checksums(&broken).is_err(),
            "a changed port breaks it"
        );
    }
}
