//! Packets for BPF_PROG_TEST_RUN fixtures: the agent's builder, plus
//! fragments and ICMP errors, and IPv6 ([`Packet6`], over the same L4
//! builder) with extension headers, fragments and ICMPv6 errors.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use lb_common::proto;

pub use lb_agent::packet::*;

/// Splits an Ethernet/IPv4 frame into two fragments, the first carrying
/// `first_len` bytes of the IP payload (a multiple of 8), as a router would.
pub fn fragment(frame: &[u8], first_len: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(first_len % 8, 0, "fragment offsets count 8-byte units");
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let (eth_ip, payload) = frame.split_at(14 + ihl);
    assert!(
        first_len < payload.len(),
        "nothing left for a second fragment"
    );
    let make = |part: &[u8], offset: usize, more: bool| {
        let mut f = eth_ip.to_vec();
        let total = (ihl + part.len()) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        f[20..22].copy_from_slice(&flags.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum(&f[14..14 + ihl]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(part);
        f
    };
    (
        make(&payload[..first_len], 0, true),
        make(&payload[first_len..], first_len, false),
    )
}

/// Wraps an Ethernet/IP frame the way a DSR node does: an outer header of
/// the addresses' family from `outer_src` to `outer_dst` (IPv4 protocol or
/// IPv6 next header 253, hop limit 64) and a shim naming `backend`, with
/// `magic` as the shim's first byte; over IPv6 the backend's address
/// follows the shim. The frame's MACs are kept.
pub fn dsr_wrap(
    frame: &[u8],
    outer_src: impl Into<IpAddr>,
    outer_dst: impl Into<IpAddr>,
    backend: impl Into<SocketAddr>,
    magic: u8,
) -> Vec<u8> {
    use lb_common::dsr::{IPPROTO_LB, SHIM_VERSION};
    let inner = &frame[14..];
    let backend = backend.into();
    let mut shim = vec![magic, SHIM_VERSION];
    shim.extend_from_slice(&backend.port().to_be_bytes());
    match (outer_src.into(), outer_dst.into(), backend.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst), IpAddr::V4(b)) => {
            shim.extend_from_slice(&b.octets());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + shim.len() + inner.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_LB, 0, 0]);
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let mut out = frame[..14].to_vec();
            out.extend_from_slice(&ip);
            out.extend_from_slice(&shim);
            out.extend_from_slice(inner);
            out
        }
        (IpAddr::V6(src), IpAddr::V6(dst), IpAddr::V6(b)) => {
            shim.extend_from_slice(&[0; 4]);
            shim.extend_from_slice(&b.octets());
            shim.extend_from_slice(inner);
            let macs: ([u8; 6], [u8; 6]) = (
                frame[6..12].try_into().expect("6"),
                frame[..6].try_into().expect("6"),
            );
            ipv6_frame(macs, &src, &dst, 64, &[], IPPROTO_LB, &shim)
        }
        other => panic!("a DSR wrap is of one family: {other:?}"),
    }
}

/// An ICMP error from `src` to `dst` quoting `quoted`'s IP header and the
/// first `quote_len` bytes after it, with correct checksums.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: u32,
    quoted: &Packet,
    quote_len: usize,
) -> Vec<u8> {
    let q = quoted.bytes();
    let ihl = usize::from(q[14] & 0x0f) * 4;
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(&q[14..14 + ihl + quote_len]);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = Vec::new();
    out.extend_from_slice(&MAC_A);
    out.extend_from_slice(&MAC_B);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    out.extend_from_slice(&ip);
    out.extend_from_slice(&icmp);
    out
}

/// An IPv6 extension header of a [`Packet6`]: its number (the next-header
/// value that announces it) and its bytes, whose first (the next header)
/// [`Packet6::bytes`] fills in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext {
    /// The header's number (0 hop-by-hop, 43 routing, 44 fragment, 60
    /// destination options).
    pub kind: u8,
    /// The header, next-header byte included.
    pub bytes: Vec<u8>,
}

impl Ext {
    /// A hop-by-hop options header of 8 bytes (one PadN option).
    pub fn hop_by_hop() -> Self {
        Self {
            kind: 0,
            bytes: vec![0, 0, 1, 4, 0, 0, 0, 0],
        }
    }

    /// A destination options header of 16 bytes (one PadN option).
    pub fn dest_opts() -> Self {
        Self {
            kind: 60,
            bytes: vec![0, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    /// A routing header with no segments left (type 4, segment routing,
    /// empty): the destination is final.
    pub fn routing() -> Self {
        Self {
            kind: 43,
            bytes: vec![0, 0, 4, 0, 0, 0, 0, 0],
        }
    }

    /// A fragment header: offset in bytes (a multiple of 8), more
    /// fragments, identification.
    pub fn fragment(offset: usize, more: bool, id: u32) -> Self {
        assert_eq!(offset % 8, 0, "fragment offsets count 8-byte units");
        let field = (offset as u16) | u16::from(more);
        let mut bytes = vec![0, 0];
        bytes.extend_from_slice(&field.to_be_bytes());
        bytes.extend_from_slice(&id.to_be_bytes());
        Self { kind: 44, bytes }
    }
}

/// An Ethernet + IPv6 (+ extension headers) + TCP/UDP packet description.
/// The L4 part is the IPv4 builder's ([`L4`]), its checksum over IPv6's
/// pseudo-header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet6 {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source address and port.
    pub src: SocketAddrV6,
    /// Destination address and port.
    pub dst: SocketAddrV6,
    /// Hop limit.
    pub hop_limit: u8,
    /// Extension headers between the fixed header and the L4 header.
    pub ext: Vec<Ext>,
    /// L4 header and payload.
    pub l4: L4,
}

impl Packet6 {
    /// A TCP segment from `src` to `dst`: default MACs, hop limit 64, the
    /// IPv4 builder's sequence numbers and window.
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8, payload: &[u8]) -> Self {
        let v4 = Packet::tcp(V4_STANDIN, V4_STANDIN, flags, payload);
        Self::from_l4(src, dst, v4.l4)
    }

    /// A UDP datagram from `src` to `dst`: default MACs, hop limit 64.
    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Self {
        let v4 = Packet::udp(V4_STANDIN, V4_STANDIN, payload);
        Self::from_l4(src, dst, v4.l4)
    }

    /// An SCTP packet from `src` to `dst` with one chunk of type `chunk`
    /// and value `value`: the IPv4 builder's SCTP part, whose CRC32c
    /// covers no IP header.
    pub fn sctp(src: SocketAddrV6, dst: SocketAddrV6, tag: u32, chunk: u8, value: &[u8]) -> Self {
        let v4 = Packet::sctp(V4_STANDIN, V4_STANDIN, tag, chunk, value);
        Self::from_l4(src, dst, v4.l4)
    }

    /// An SCTP INIT from `src` to `dst`, as the IPv4 builder's.
    pub fn sctp_init(src: SocketAddrV6, dst: SocketAddrV6, tag: u32) -> Self {
        let v4 = Packet::sctp_init(V4_STANDIN, V4_STANDIN, tag);
        Self::from_l4(src, dst, v4.l4)
    }

    fn from_l4(src: SocketAddrV6, dst: SocketAddrV6, l4: L4) -> Self {
        Self {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            src,
            dst,
            hop_limit: 64,
            ext: Vec::new(),
            l4,
        }
    }

    /// The same packet with source and destination rewritten.
    pub fn with_addrs(&self, src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        Self {
            src,
            dst,
            ..self.clone()
        }
    }

    /// The L4 header and payload, checksum over IPv6's pseudo-header (a
    /// UDP checksum that sums to zero is sent as 0xffff): the IPv4
    /// builder's L4.
    pub fn l4_bytes(&self) -> Vec<u8> {
        self.l4.bytes(self.src.into(), self.dst.into())
    }

    /// Serializes: Ethernet, IPv6, the extension headers, then `payload`
    /// (the L4 bytes, or a fragment of them).
    fn frame(&self, ext: &[Ext], payload: &[u8]) -> Vec<u8> {
        ipv6_frame(
            (self.src_mac, self.dst_mac),
            self.src.ip(),
            self.dst.ip(),
            self.hop_limit,
            ext,
            self.l4.proto(),
            payload,
        )
    }

    /// Serializes with a correct L4 checksum.
    pub fn bytes(&self) -> Vec<u8> {
        self.frame(&self.ext, &self.l4_bytes())
    }

    /// The datagram in two fragments (after its extension headers, a
    /// fragment header with identification `id`), the first carrying
    /// `first_len` bytes of L4 header and payload (a multiple of 8).
    pub fn fragments(&self, first_len: usize, id: u32) -> (Vec<u8>, Vec<u8>) {
        let l4 = self.l4_bytes();
        assert!(first_len < l4.len(), "nothing left for a second fragment");
        let with = |offset: usize, more: bool| {
            let mut ext = self.ext.clone();
            ext.push(Ext::fragment(offset, more, id));
            ext
        };
        (
            self.frame(&with(0, true), &l4[..first_len]),
            self.frame(&with(first_len, false), &l4[first_len..]),
        )
    }
}

/// The IPv4 addresses a [`Packet6`] borrows the IPv4 builder's L4 with
/// (only its L4 bytes are kept).
const V4_STANDIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);

/// An Ethernet + IPv6 frame: MACs (source, destination), addresses, hop
/// limit, extension headers (next headers filled in), then `payload` of
/// protocol `proto`.
pub fn ipv6_frame(
    macs: ([u8; 6], [u8; 6]),
    src: &Ipv6Addr,
    dst: &Ipv6Addr,
    hop_limit: u8,
    ext: &[Ext],
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut after = Vec::new();
    for (i, e) in ext.iter().enumerate() {
        let mut b = e.bytes.clone();
        b[0] = ext.get(i + 1).map_or(proto, |n| n.kind);
        after.extend_from_slice(&b);
    }
    after.extend_from_slice(payload);
    let first = ext.first().map_or(proto, |e| e.kind);
    ipv6_over_ethernet(macs, src, dst, hop_limit, first, &after)
}

/// Where an Ethernet/IPv6 frame's extension headers end: the offset of the
/// L4 header and its protocol.
pub fn ipv6_l4(frame: &[u8]) -> (usize, u8) {
    let mut next = frame[20];
    let mut off = 54;
    while matches!(next, 0 | 43 | 44 | 60) {
        let len = if next == 44 {
            8
        } else {
            (usize::from(frame[off + 1]) + 1) * 8
        };
        next = frame[off];
        off += len;
    }
    (off, next)
}

/// Checks the L4 checksum (TCP, UDP, ICMPv6, SCTP's CRC32c recomputed
/// whole) of an Ethernet/IPv6 frame
/// that is not a fragment; returns what is wrong. A UDP checksum of zero
/// is wrong in IPv6.
pub fn verify_checksums6(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 54 || frame[12..14] != [0x86, 0xdd] {
        return Err("not an Ethernet/IPv6 frame".into());
    }
    let payload_len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    if 54 + payload_len != frame.len() {
        return Err(format!(
            "payload length {payload_len} does not match the frame's {}",
            frame.len() - 54
        ));
    }
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[at..at + 16]).expect("16"));
    let (src, dst) = (addr(22), addr(38));
    let (off, proto) = ipv6_l4(frame);
    let l4 = &frame[off..];
    if proto == proto::UDP && l4.get(6..8) == Some(&[0, 0]) {
        return Err("UDP over IPv6 with a zero checksum".into());
    }
    match proto {
        proto::TCP | proto::UDP | 58 => (l4_checksum6(&src, &dst, proto, l4) == 0)
            .then_some(())
            .ok_or_else(|| format!("bad checksum of protocol {proto}")),
        proto::SCTP => sctp_checksum_ok(l4)
            .then_some(())
            .ok_or_else(|| "bad SCTP CRC32c".to_string()),
        p => Err(format!("unexpected protocol {p}")),
    }
}

/// An ICMPv6 error from `src` to `dst` quoting the Ethernet/IPv6 frame
/// `quoted` from its IPv6 header to `quote_len` bytes past its extension
/// headers, with a correct checksum; MACs as [`icmp_error`]'s.
pub fn icmp6_error(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let (l4_off, _) = ipv6_l4(quoted);
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(&quoted[14..l4_off + quote_len]);
    let c = l4_checksum6(&src, &dst, 58, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6_frame((MAC_B, MAC_A), &src, &dst, 64, &[], 58, &icmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_have_valid_checksums() {
        let a = "10.0.0.1:1234".parse().expect("addr");
        let b = "10.96.0.10:80".parse().expect("addr");
        for p in [
            Packet::tcp(a, b, flags::SYN, b""),
            Packet::udp(a, b, b"hello"),
        ] {
            verify_checksums(&p.bytes()).expect("valid");
        }
        let mut bytes = Packet::udp(a, b, b"hello").bytes();
        bytes[40] ^= 1;
        assert!(
            verify_checksums(&bytes).is_err(),
            "a flipped bit must be caught"
        );
    }
}
