//! Header layouts and constants: Ethernet, IPv4, IPv6 and its extension
//! headers, TCP, UDP, SCTP, ICMP and ICMPv6.
//!
//! Every offset is relative to the start of its own header. Nothing here
//! reads a packet; this is the bottom of the crate.

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Offset of the EtherType within the Ethernet header.
pub const ETH_TYPE: usize = 12;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;

/// IPv4 header length without options (the IHL of 5 words).
pub const IP4_HLEN: usize = 20;
/// First byte of an IPv4 header without options: version 4, IHL 5.
pub const IP4_VER_IHL: u8 = 0x45;
/// Offset of the type of service (DSCP and ECN).
pub const IP4_TOS: usize = 1;
/// Offset of the total length.
pub const IP4_TOT_LEN: usize = 2;
/// Offset of the identification.
pub const IP4_ID: usize = 4;
/// Offset of the flags and fragment offset.
pub const IP4_FRAG_OFF: usize = 6;
/// Offset of the time to live.
pub const IP4_TTL: usize = 8;
/// Offset of the protocol.
pub const IP4_PROTO: usize = 9;
/// Offset of the header checksum.
pub const IP4_CSUM: usize = 10;
/// Offset of the source address.
pub const IP4_SADDR: usize = 12;
/// Offset of the destination address.
pub const IP4_DADDR: usize = 16;
/// "Don't fragment" bit of the flags/offset field.
pub const IP4_DF: u16 = 0x4000;
/// "More fragments" bit of the flags/offset field.
pub const IP4_MF: u16 = 0x2000;
/// Fragment offset bits of the flags/offset field.
pub const IP4_OFFSET_MASK: u16 = 0x1fff;
/// TTL of the packets the datapath builds (Linux's default).
pub const IP4_DEFAULT_TTL: u8 = 64;

/// IPv6 fixed header length.
pub const IP6_HLEN: usize = 40;
/// First word of an IPv6 header the datapath builds: version 6, traffic
/// class and flow label zero (network order).
pub const IP6_VER_WORD: u32 = 0x6000_0000u32.to_be();
/// Offset of the payload length (everything after the fixed header).
pub const IP6_PAYLOAD_LEN: usize = 4;
/// Offset of the next header.
pub const IP6_NEXTHDR: usize = 6;
/// Offset of the hop limit.
pub const IP6_HOP_LIMIT: usize = 7;
/// Offset of the source address.
pub const IP6_SADDR: usize = 8;
/// Offset of the destination address.
pub const IP6_DADDR: usize = 24;
/// Hop limit of the packets the datapath builds (Linux's default).
pub const IP6_DEFAULT_HOP_LIMIT: u8 = 64;
/// Extension headers walked before the transport header; a packet with
/// more passes untouched (counted as `pass_v6_ext_limit`).
pub const IP6_EXT_MAX: usize = 4;

/// IPv6 extension header numbers (next-header values) the parser walks.
pub mod ext {
    /// Hop-by-hop options.
    pub const HOPOPTS: u8 = 0;
    /// Routing.
    pub const ROUTING: u8 = 43;
    /// Fragment.
    pub const FRAGMENT: u8 = 44;
    /// Authentication header (its length counts 4-byte units, less 2).
    pub const AH: u8 = 51;
    /// Destination options.
    pub const DSTOPTS: u8 = 60;

    /// Whether `nexthdr` is one of the extension headers above.
    #[inline(always)]
    pub fn is_ext(nexthdr: u8) -> bool {
        matches!(nexthdr, HOPOPTS | ROUTING | FRAGMENT | AH | DSTOPTS)
    }
}

/// "More fragments" bit of the IPv6 fragment header's offset field.
pub const IP6_MF: u16 = 0x0001;
/// Fragment offset bits of the IPv6 fragment header's offset field.
pub const IP6_OFFSET_MASK: u16 = 0xfff8;

/// Offset of the source port in a TCP or UDP header.
pub const L4_SPORT: usize = 0;
/// Offset of the destination port in a TCP or UDP header.
pub const L4_DPORT: usize = 2;

/// TCP header length without options.
pub const TCP_HLEN: usize = 20;
/// Offset of the TCP checksum.
pub const TCP_CSUM: usize = 16;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// Offset of the UDP checksum.
pub const UDP_CSUM: usize = 6;

/// The SCTP common header and the first chunk's header that the parser
/// reads (RFC 9260, 3.1 and 3.2).
pub const SCTP_HLEN: usize = 16;
/// Offset of the SCTP checksum (CRC32c, little-endian as a `u32`).
pub const SCTP_CSUM: usize = 8;

/// SCTP chunk types the conntrack stage tells apart (RFC 9260, 3.2).
pub mod sctp_chunk {
    /// INIT.
    pub const INIT: u8 = 1;
    /// INIT ACK.
    pub const INIT_ACK: u8 = 2;
    /// ABORT.
    pub const ABORT: u8 = 6;
    /// SHUTDOWN COMPLETE.
    pub const SHUTDOWN_COMPLETE: u8 = 14;
}

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// ICMPv6 (RFC 4443), as the datapath reads and writes it: the header
/// has ICMP's layout (type, code, checksum, 4 more bytes), and its
/// checksum covers a pseudo-header as TCP's and UDP's do.
pub mod icmp6 {
    /// Next-header value of ICMPv6.
    pub const IPPROTO_ICMPV6: u8 = 58;
    /// Destination unreachable.
    pub const DEST_UNREACH: u8 = 1;
    /// Code of destination unreachable: port unreachable.
    pub const PORT_UNREACH: u8 = 4;
    /// Packet too big (the 4 bytes after the checksum: the next hop's MTU).
    pub const PKT_TOOBIG: u8 = 2;
    /// Time exceeded (code 0: hop limit exceeded in transit).
    pub const TIME_EXCEEDED: u8 = 3;
}

/// ICMP (v4), as the datapath reads and writes it.
pub mod icmp {
    /// IP protocol number of ICMP.
    pub const IPPROTO_ICMP: u8 = 1;
    /// ICMP header length (type, code, checksum, 4 more bytes).
    pub const HLEN: usize = 8;
    /// Offset of the type.
    pub const TYPE: usize = 0;
    /// Offset of the code.
    pub const CODE: usize = 1;
    /// Offset of the checksum within the header.
    pub const CSUM: usize = 2;
    /// Offset of the 4 bytes after the checksum: unused, but for the
    /// next-hop MTU in their low half in "fragmentation needed" (RFC 1191;
    /// all four in ICMPv6's "packet too big").
    pub const UNUSED: usize = 4;
    /// Destination unreachable.
    pub const DEST_UNREACH: u8 = 3;
    /// Code of destination unreachable: port unreachable.
    pub const PORT_UNREACH: u8 = 3;
    /// Code of destination unreachable: fragmentation needed and DF set.
    pub const FRAG_NEEDED: u8 = 4;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
}

/// The IPv4 header without options. Read whole: one bounds check the
/// verifier can follow, also at a variable offset (a quoted header).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ip4Hdr {
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub ver_ihl: u8,
    /// Type of service.
    pub tos: u8,
    /// Total length, network order.
    pub tot_len: u16,
    /// Identification, network order.
    pub id: u16,
    /// Flags and fragment offset, network order.
    pub frag_off: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub proto: u8,
    /// Header checksum.
    pub check: u16,
    /// Source address, network order.
    pub saddr: u32,
    /// Destination address, network order.
    pub daddr: u32,
}
const _: () = assert!(core::mem::size_of::<Ip4Hdr>() == IP4_HLEN);

impl Ip4Hdr {
    /// The IP version (4 for a header that is one).
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.ver_ihl >> 4
    }

    /// The header's length in bytes, options included.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        usize::from(self.ver_ihl & 0x0f) * 4
    }
}

/// The IPv6 fixed header. Read whole, as [`Ip4Hdr`] is.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ip6Hdr {
    /// Version (high nibble of the first byte), traffic class, flow label.
    pub ver_tc_flow: [u8; 4],
    /// Payload length, network order.
    pub payload_len: u16,
    /// Next header.
    pub nexthdr: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address, network order.
    pub saddr: [u32; 4],
    /// Destination address, network order.
    pub daddr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<Ip6Hdr>() == IP6_HLEN);

impl Ip6Hdr {
    /// The IP version (6 for a header that is one).
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.ver_tc_flow[0] >> 4
    }
}

/// The IPv6 fragment header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ip6FragHdr {
    /// Next header.
    pub nexthdr: u8,
    /// Reserved.
    pub reserved: u8,
    /// Fragment offset (8-byte units, high 13 bits) and M flag, network order.
    pub frag_off: u16,
    /// Identification, network order.
    pub id: u32,
}
const _: () = assert!(core::mem::size_of::<Ip6FragHdr>() == 8);

/// The fixed TCP header. Variable-offset headers are read whole: one bounds
/// check the verifier can follow, instead of one per field.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// Sequence number, network order.
    pub seq: u32,
    /// Acknowledgment number, network order.
    pub ack: u32,
    /// Data offset (high nibble, in 32-bit words).
    pub doff: u8,
    /// Flags.
    pub flags: u8,
    /// Window, network order.
    pub window: u16,
    /// Checksum.
    pub check: u16,
    /// Urgent pointer.
    pub urg: u16,
}
const _: () = assert!(core::mem::size_of::<TcpHdr>() == TCP_HLEN);

/// The UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// Length, network order.
    pub len: u16,
    /// Checksum.
    pub check: u16,
}
const _: () = assert!(core::mem::size_of::<UdpHdr>() == UDP_HLEN);

/// The SCTP common header and the header of the first chunk.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SctpHdr {
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// Verification tag.
    pub vtag: u32,
    /// CRC32c.
    pub check: u32,
    /// The first chunk's type.
    pub chunk_type: u8,
    /// The first chunk's flags.
    pub chunk_flags: u8,
    /// The first chunk's length, network order.
    pub chunk_len: u16,
}
const _: () = assert!(core::mem::size_of::<SctpHdr>() == SCTP_HLEN);
