//! CRC32c (Castagnoli), the SCTP checksum (RFC 9260, Appendix A), and how
//! to update it when a few bytes of a packet change: the datapath's SCTP
//! port rewrites use the update, the tests' packet builder the whole CRC.
//!
//! SCTP's checksum covers the SCTP packet only (no IP pseudo-header), so
//! rewriting addresses leaves it valid; rewriting a port changes it. The
//! CRC is linear over GF(2): for two messages of the same length that
//! differ by `d`, their CRCs differ by the raw CRC (no initial value, no
//! final inversion) of `d`. When `d` is zero except for its first four
//! bytes `D`, that raw CRC is `D · x^(8·len) mod P`, one multiplication
//! in GF(2)[x]/P whatever the packet's length, so a port rewrite costs
//! two table reads and two multiplications instead of a pass over the
//! payload (which XDP and TC could not even read whole: it may sit in
//! pages the programs do not see).
//!
//! Polynomials are in the reflected bit order of the CRC itself: bit 31
//! is the coefficient of x^0, bit 0 that of x^31. Four message bytes read
//! as a little-endian `u32` are their polynomial in this order, and the
//! checksum field, read as a little-endian `u32`, is the CRC's value.

/// An SCTP packet's checksum update, pending from the rewrite of a port
/// (in a main program) to its application (in an SCTP checksum program
/// reached by tail call): the value of `maps::SCTP_CRC`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Old XOR new of the first four bytes (the ports), read little-endian
    /// as [`update`] takes them; 0 when nothing is pending.
    pub diff: u32,
    /// Offset of the SCTP header in the frame.
    pub l4_off: u32,
    /// Unused (explicit padding).
    pub _pad: u32,
    /// The action code the main program decided on, which the checksum
    /// program returns for it.
    pub action: u32,
}
const _: () = assert!(core::mem::size_of::<Pending>() == 16);
crate::pod!(Pending);

/// The CRC32c polynomial, reflected.
pub const POLY: u32 = 0x82f6_3b78;

/// x^0 in the reflected order.
const ONE: u32 = 1 << 31;

/// `a · b mod P`. Branch-free, so that the verifier walks it once.
#[inline(always)]
#[must_use]
pub const fn mul(a: u32, mut b: u32) -> u32 {
    let mut p = 0;
    let mut i = 0;
    while i < 32 {
        // Bit 31 - i of `a` is its coefficient of x^i; `b` is b·x^i here.
        p ^= b & 0u32.wrapping_sub((a >> (31 - i)) & 1);
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        i += 1;
    }
    p
}

/// `x^(8·n) mod P`, the effect of `n` zero bytes, for small `n` (used to
/// build [`TABLE`]).
const fn x8(n: u32) -> u32 {
    let mut r = ONE;
    let mut i = 0;
    while i < n {
        // One byte is eight steps of x.
        let mut bit = 0;
        while bit < 8 {
            r = (r >> 1) ^ (POLY & 0u32.wrapping_sub(r & 1));
            bit += 1;
        }
        i += 1;
    }
    r
}

/// Entries of [`TABLE`]: `x^(8·i)` for `i < 256`, then `x^(8·256·j)` for
/// `j < 256` at `256 + j`.
pub const TABLE_LEN: usize = 512;

/// `x^(8·n) mod P` for every packet length `n < 65536`, as two halves
/// (the low and high byte of `n`), multiplied by [`shift`].
pub const TABLE: [u32; TABLE_LEN] = {
    let mut t = [0u32; TABLE_LEN];
    let mut i = 0;
    while i < 256 {
        t[i] = x8(i as u32);
        i += 1;
    }
    // x^(8·256·j) = (x^(8·256))^j.
    let step = x8(256);
    let mut acc = ONE;
    let mut j = 0;
    while j < 256 {
        t[256 + j] = acc;
        acc = mul(acc, step);
        j += 1;
    }
    t
};

/// `x^(8·len) mod P` from [`TABLE`] (`len` below 65536).
#[inline(always)]
#[must_use]
pub fn shift(table: &[u32; TABLE_LEN], len: u16) -> u32 {
    let lo = table[usize::from(len & 0xff)];
    let hi = table[256 + usize::from(len >> 8)];
    mul(lo, hi)
}

/// The checksum of an SCTP packet of `len` bytes whose first four bytes
/// (the ports) changed by `diff` (old XOR new, read little-endian), given
/// its checksum `crc` before the change.
#[inline(always)]
#[must_use]
pub fn update(table: &[u32; TABLE_LEN], crc: u32, diff: u32, len: u16) -> u32 {
    crc ^ mul(diff, shift(table, len))
}

/// Feeds four bytes (read little-endian) into a running CRC register.
#[inline(always)]
#[must_use]
pub const fn step_word(crc: u32, word: u32) -> u32 {
    let mut c = crc ^ word;
    let mut i = 0;
    while i < 32 {
        c = (c >> 1) ^ (POLY & 0u32.wrapping_sub(c & 1));
        i += 1;
    }
    c
}

/// The CRC32c of `words` (each four message bytes read little-endian), as
/// SCTP's checksum field holds it (little-endian).
#[inline(always)]
#[must_use]
pub fn of_words<const N: usize>(words: &[u32; N]) -> u32 {
    let mut c = !0u32;
    let mut i = 0;
    while i < N {
        c = step_word(c, words[i]);
        i += 1;
    }
    !c
}

/// The CRC32c of `bytes`, bit by bit: the reference the tests check the
/// fast paths against.
#[must_use]
pub fn of_bytes(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = (c >> 1) ^ (POLY & 0u32.wrapping_sub(c & 1));
        }
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so the tests need no crate.
    fn bytes(seed: u32, n: usize) -> [u8; 2048] {
        let mut out = [0u8; 2048];
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        for b in out.iter_mut().take(n) {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            *b = s as u8;
        }
        out
    }

    #[test]
    fn the_reference_matches_rfc_3720s_check_value() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(of_bytes(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(of_bytes(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_port_rewrite_updates_the_checksum_as_a_full_recomputation_would() {
        for (seed, len) in [
            (1, 12),
            (2, 16),
            (3, 17),
            (4, 255),
            (5, 256),
            (6, 1500),
            (7, 2048),
        ] {
            let mut pkt = bytes(seed, len);
            pkt[8..12].fill(0);
            let before = of_bytes(&pkt[..len]);
            let old = u32::from_le_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]);
            pkt[0..4].copy_from_slice(&[0x9c, 0x40, 0x1f, 0x90]);
            let new = u32::from_le_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]);
            let after = of_bytes(&pkt[..len]);
            let len16 = u16::try_from(len).unwrap();
            assert_eq!(update(&TABLE, before, old ^ new, len16), after, "len {len}");
        }
    }

    #[test]
    fn the_table_covers_lengths_beyond_one_byte() {
        for n in [0u16, 1, 255, 256, 257, 9000, 65535] {
            let mut r = ONE;
            for _ in 0..u32::from(n) * 8 {
                r = (r >> 1) ^ (POLY & 0u32.wrapping_sub(r & 1));
            }
            assert_eq!(shift(&TABLE, n), r, "n {n}");
        }
    }

    #[test]
    fn words_and_bytes_give_the_same_crc() {
        let pkt = bytes(9, 16);
        let mut words = [0u32; 4];
        for (i, w) in words.iter_mut().enumerate() {
            *w = u32::from_le_bytes([pkt[4 * i], pkt[4 * i + 1], pkt[4 * i + 2], pkt[4 * i + 3]]);
        }
        assert_eq!(of_words(&words), of_bytes(&pkt[..16]));
    }
}
