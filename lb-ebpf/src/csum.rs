//! Checksums over packet bytes. The arithmetic itself is `lb_common::csum`.

use lb_common::csum::fold;

use crate::{
    hdr::IP4_CSUM,
    packet::{Packet, PacketError},
};

/// One's-complement sum of `len` bytes (even, at most 80) at `off`.
#[inline(always)]
pub fn sum_words<P: Packet>(pkt: &P, off: usize, len: usize) -> Result<u32, PacketError> {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 40 {
        if i * 2 >= len {
            break;
        }
        sum += u32::from(pkt.load::<u16>(off + i * 2)?);
        i += 1;
    }
    Ok(sum)
}

/// Writes a fresh IPv4 header checksum for the header at `off`.
#[inline(always)]
pub fn ip_checksum<P: Packet>(pkt: &mut P, off: usize, ihl: usize) -> Result<(), PacketError> {
    pkt.store::<u16>(off + IP4_CSUM, 0)?;
    let sum = sum_words(pkt, off, ihl)?;
    pkt.store(off + IP4_CSUM, !fold(sum))
}
