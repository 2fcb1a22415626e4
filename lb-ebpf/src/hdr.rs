//! Header layouts and constants: Ethernet, IPv4, TCP, UDP, ICMP.
//!
//! Every offset is relative to the start of its own header. Nothing here
//! reads a packet; this is the bottom of the crate.

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Offset of the EtherType within the Ethernet header.
pub const ETH_TYPE: usize = 12;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;

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
    /// Offset of the two bytes "destination unreachable" leaves unused.
    pub const UNUSED: usize = 4;
    /// Offset of the next-hop MTU of "fragmentation needed" (RFC 1191).
    pub const MTU: usize = 6;
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
