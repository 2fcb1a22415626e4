//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624).
//!
//! Words are used exactly as they sit in memory: one's-complement sums do not
//! care about byte order as long as reads and writes agree.

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
