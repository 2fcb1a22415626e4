//! Packets for BPF_PROG_TEST_RUN fixtures: the agent's builder, plus
//! fragments and ICMP errors.

use std::net::Ipv4Addr;

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

/// Wraps an Ethernet/IPv4 frame the way a DSR node does: outer IPv4 from
/// `outer_src` to `outer_dst` (protocol 253) and a shim naming `backend`,
/// with `magic` as the shim's first byte.
pub fn dsr_wrap(
    frame: &[u8],
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    backend: std::net::SocketAddrV4,
    magic: u8,
) -> Vec<u8> {
    let inner = &frame[14..];
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + 8 + inner.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, lb_common::dsr::IPPROTO_LB, 0, 0]);
    ip.extend_from_slice(&outer_src.octets());
    ip.extend_from_slice(&outer_dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = frame[..14].to_vec();
    out.extend_from_slice(&ip);
    out.extend_from_slice(&[magic, lb_common::dsr::SHIM_VERSION]);
    out.extend_from_slice(&backend.port().to_be_bytes());
    out.extend_from_slice(&backend.ip().octets());
    out.extend_from_slice(inner);
    out
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
