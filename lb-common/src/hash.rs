//! The flow hash that picks a backend slot.
//!
//! Fixed seed, no per-boot randomness: every node must pick the same slot for
//! the same flow (docs/architecture.md, Invariants 2).

/// Seed of the flow hash; changing it reshuffles every new flow.
pub const FLOW_HASH_SEED: u32 = 0x6c62_5f31;

/// Mixes one 32-bit word into the running hash (murmur3's block step).
#[inline(always)]
#[must_use]
pub const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// Final avalanche (murmur3's fmix32).
#[inline(always)]
#[must_use]
pub const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hashes a flow's 5-tuple (addresses and ports as carried in the packet).
#[inline(always)]
#[must_use]
pub const fn flow_hash(
    saddr: &crate::IpAddrBe,
    daddr: &crate::IpAddrBe,
    ports: u32,
    proto: u8,
) -> u32 {
    let mut h = FLOW_HASH_SEED;
    let mut i = 0;
    while i < 4 {
        h = mix(h, saddr[i]);
        h = mix(h, daddr[i]);
        i += 1;
    }
    h = mix(h, ports);
    h = mix(h, proto as u32);
    finish(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_every_field() {
        let a = [1, 0, 0, 0];
        let b = [2, 0, 0, 0];
        let base = flow_hash(&a, &b, 80, 6);
        assert_ne!(base, flow_hash(&b, &a, 80, 6));
        assert_ne!(base, flow_hash(&a, &b, 81, 6));
        assert_ne!(base, flow_hash(&a, &b, 80, 17));
    }
}
