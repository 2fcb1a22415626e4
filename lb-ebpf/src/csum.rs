//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624).
//!
//! Words are used exactly as they sit in memory: one's-complement sums do not
//! care about byte order as long as reads and writes agree.

use crate::{
    packet::{Packet, PacketError},
    parse::IP4_CSUM,
};

/// Folds a 32-bit accumulator into 16 bits with end-around carry.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the two halves of a 32-bit word to an accumulator.
#[inline(always)]
pub fn add32(sum: u32, w: u32) -> u32 {
    sum + (w & 0xffff) + (w >> 16)
}

/// New checksum after a 4-byte field changed from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = u32::from(!check);
    let sum = add32(sum, !from);
    !fold(add32(sum, to))
}

/// New checksum after a 2-byte field changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!from) + u32::from(to);
    !fold(sum)
}

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
