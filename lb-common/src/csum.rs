//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624).
//!
//! Pure functions over words, shared by the datapath (which applies them to
//! packet bytes) and host unit tests: the eBPF crate is a `no_std` binary
//! that `cargo test` does not build, so arithmetic that can be tested on its
//! own lives here.
//!
//! Words are used exactly as they sit in memory: one's-complement sums do not
//! care about byte order as long as reads and writes agree.

/// Folds a 32-bit accumulator into 16 bits with end-around carry.
///
/// Two rounds suffice for any 32-bit accumulator: the first leaves at most
/// 0x1fffe.
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the two halves of a 32-bit word to an accumulator.
#[inline(always)]
#[must_use]
pub const fn add32(sum: u32, w: u32) -> u32 {
    sum + (w & 0xffff) + (w >> 16)
}

/// New checksum after a 4-byte field changed from `from` to `to`.
#[inline(always)]
#[must_use]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = (!check) as u32;
    let sum = add32(sum, !from);
    !fold(add32(sum, to))
}

/// New checksum after a 2-byte field changed from `from` to `to`.
#[inline(always)]
#[must_use]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u32 + (!from) as u32 + to as u32;
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of `words` computed from scratch, as a receiver checks it.
    fn full(words: &[u16]) -> u16 {
        let mut sum: u64 = words.iter().map(|w| u64::from(*w)).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A 20-byte IPv4 header as words, checksum field (word 5) zero.
    const HEADER: [u16; 10] = [
        0x4500, 0x0073, 0x0000, 0x4000, 0x4011, 0x0000, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
    ];

    #[test]
    fn fold_carries_end_around() {
        assert_eq!(fold(0x0001_fffe), 0xffff);
        assert_eq!(fold(0xffff_ffff), 0xffff);
        assert_eq!(fold(0x0000_1234), 0x1234);
        assert_eq!(fold(0x0002_0000), 0x0002);
    }

    #[test]
    fn the_rfc_1071_example_sums_to_its_published_value() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2.
        let sum = [0x0001u32, 0xf203, 0xf4f5, 0xf6f7].iter().sum();
        assert_eq!(fold(sum), 0xddf2);
        assert_eq!(add32(0, 0xf203_0001), 0xf203 + 0x0001);
    }

    #[test]
    fn replace4_matches_a_checksum_computed_from_scratch() {
        let mut words = HEADER;
        let check = full(&words);
        assert_eq!(check, 0xb861, "a well-known example header");
        // Change the destination address (words 8 and 9) the way the
        // datapath does: as one 32-bit word in memory order.
        let from = (u32::from(words[9]) << 16) | u32::from(words[8]);
        let to = 0x0a00_0a0a_u32;
        words[8] = to as u16;
        words[9] = (to >> 16) as u16;
        assert_eq!(replace4(check, from, to), full(&words));
    }

    #[test]
    fn replace2_matches_a_checksum_computed_from_scratch() {
        for to in [0u16, 1, 0x1f90, 0xffff] {
            let mut words = HEADER;
            let check = full(&words);
            let from = words[3];
            words[3] = to;
            assert_eq!(
                replace2(check, from, to),
                full(&words),
                "0x{from:04x} -> 0x{to:04x}"
            );
        }
        let check = full(&HEADER);
        assert_eq!(replace2(check, 7, 7), check, "no change is no change");
    }

    #[test]
    fn replacing_and_restoring_gives_the_checksum_back() {
        let check = full(&HEADER);
        let there = replace4(check, 0xc0a8_0001, 0x0a00_0001);
        let back = replace4(there, 0x0a00_0001, 0xc0a8_0001);
        // One's complement has two zeros: compare the sums they stand for.
        assert_eq!(fold(u32::from(back)), fold(u32::from(check)));
    }
}
