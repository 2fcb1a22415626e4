//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4): the
//! lookup table a Service's new flows are hashed into.
//!
//! Every backend walks its own permutation of the table's slots (an offset
//! and a skip derived from its name) and the backends take turns claiming
//! their next free slot until the table is full. So each backend owns
//! `M / N` slots give or take one, and adding or removing one backend moves
//! few slots of the others.
//!
//! Determinism across nodes (docs/architecture.md, Invariants 2): a backend's
//! permutation depends only on its `address:port` and on the fixed seeds
//! below, and backends take their turns in sorted order, so the same backend
//! set gives the same table on every node whatever order the endpoints
//! arrived in.

/// Table sizes accepted by `--maglev-table-size`: primes, so that every skip
/// is coprime with the size and each permutation visits every slot.
pub const TABLE_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071,
];

/// Table size when every Service port gets the same one
/// (`--maglev-table-size`): Cilium's and the paper's order of magnitude,
/// enough for 1% balance up to about 160 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// The size classes of [`TableSize::Scaled`], smallest first.
pub const SIZE_CLASSES: [u32; 6] = [251, 1021, 4093, 16381, 65521, 131_071];

/// Slots per backend that [`TableSize::Scaled`] provides at least: the
/// share M/N that keeps every backend within 1% of its ideal slot count
/// (tested below for every N up to 1000).
pub const SLOTS_PER_BACKEND: u32 = 100;

/// How large a Service port's table is.
///
/// `Scaled` (the default) takes the smallest of [`SIZE_CLASSES`] with at
/// least [`SLOTS_PER_BACKEND`] slots per backend. Why not one size for all:
/// a table costs 4 bytes a slot of kernel memory and its build time grows
/// with the size, so 10 000 Services of 10 backends at 16381 slots are
/// 655 MB and seconds of CPU at every start, for a balance that 1021 slots
/// give as well (1% at M/N >= 100). The classes are fixed and the class
/// depends only on the backend count, so every node still computes the
/// same table from the same backend set (invariant 2). The price: when a
/// Service crosses a class (10 → 11 backends) its table is rebuilt at the
/// new size and new flows are reshuffled once, as if the table were new;
/// established flows keep their backend through conntrack, as through any
/// table change. `Fixed` (an explicit `--maglev-table-size`) never
/// resizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableSize {
    /// Every table has this many slots (a prime of [`TABLE_SIZES`]).
    Fixed(u32),
    /// The size grows with the backend count, in [`SIZE_CLASSES`].
    Scaled,
}

impl From<u32> for TableSize {
    fn from(size: u32) -> Self {
        Self::Fixed(size)
    }
}

impl TableSize {
    /// The table size for `backends` backends.
    pub fn for_backends(self, backends: usize) -> u32 {
        match self {
            Self::Fixed(m) => m,
            Self::Scaled => {
                let want = (backends as u64).saturating_mul(u64::from(SLOTS_PER_BACKEND));
                SIZE_CLASSES
                    .into_iter()
                    .find(|m| u64::from(*m) >= want)
                    .unwrap_or(SIZE_CLASSES[SIZE_CLASSES.len() - 1])
            }
        }
    }
}

/// Seed of the hash that gives a backend's offset.
pub const OFFSET_SEED: u64 = 0x6c62_6d61_676c_6576;
/// Seed of the hash that gives a backend's skip.
pub const SKIP_SEED: u64 = 0x736b_6970_5f6c_6221;

/// A fixed 64-bit hash: FNV-1a from `seed`, then SplitMix64's finaliser so
/// that nearby names spread. Not for adversarial input; only for layout.
pub fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Builds the table for `backends` (their `address:port` names): entry `i`
/// is the index into `backends` that owns slot `i`. Empty when there is no
/// backend. `size` must be prime (one of [`TABLE_SIZES`]).
pub fn table<S: AsRef<str>>(backends: &[S], size: u32) -> Vec<u32> {
    if backends.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    // Turn order is the sorted name order, so input order does not matter.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|a, b| backends[*a].as_ref().cmp(backends[*b].as_ref()));
    order.dedup_by(|a, b| backends[*a].as_ref() == backends[*b].as_ref());
    // Each backend's next candidate slot and its skip: the paper's
    // `(offset + j * skip) % M`, walked by adding the skip and subtracting
    // M once when it overflows (both are below M), which gives the same
    // slots without a division per step.
    let mut walks: Vec<(u32, u32)> = order
        .iter()
        .map(|i| {
            let name = backends[*i].as_ref().as_bytes();
            let offset = hash(OFFSET_SEED, name) % m;
            let skip = if m > 1 {
                hash(SKIP_SEED, name) % (m - 1) + 1
            } else {
                1
            };
            // Both are below M, which is a u32.
            (offset as u32, skip as u32)
        })
        .collect();
    let step = |slot: u32, skip: u32| {
        let next = slot + skip;
        if next >= size {
            next - size
        } else {
            next
        }
    };
    let mut entry = vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (walk, &backend) in walks.iter_mut().zip(&order) {
            let (mut slot, skip) = *walk;
            while entry[slot as usize] != u32::MAX {
                slot = step(slot, skip);
            }
            entry[slot as usize] = backend as u32;
            walk.0 = step(slot, skip);
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256))
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u32> {
        let mut c = vec![0u32; n];
        for e in table {
            c[*e as usize] += 1;
        }
        c
    }

    #[test]
    fn every_backend_owns_its_share_within_one_percent() {
        let mut worst = (0.0f64, 0, 0);
        for &m in &TABLE_SIZES {
            // Every N from 2 to 1000 for which the share M/N is at least 100.
            for n in 2..=(m as usize / 100).min(1000) {
                let table = table(&names(n), m);
                assert!(
                    table.iter().all(|e| (*e as usize) < n),
                    "M={m} N={n}: unfilled slot"
                );
                let ideal = f64::from(m) / n as f64;
                for c in counts(&table, n) {
                    let dev = (f64::from(c) - ideal).abs() / ideal;
                    if dev > worst.0 {
                        worst = (dev, m, n);
                    }
                    assert!(
                        dev <= 0.01,
                        "M={m} N={n}: a backend has {c} slots, ideal {ideal:.1}"
                    );
                }
            }
        }
        println!(
            "worst balance deviation {:.3}% at M={} N={}",
            worst.0 * 100.0,
            worst.1,
            worst.2
        );
    }

    #[test]
    fn removing_or_adding_one_backend_moves_few_other_slots() {
        for (m, n) in [(16381u32, 10usize), (16381, 100), (65521, 500), (1021, 10)] {
            let all = names(n + 1);
            let before = table(&all[..n], m);
            // Remove the middle backend: only its slots must move, plus few others.
            let gone = n / 2;
            let mut fewer = all[..n].to_vec();
            fewer.remove(gone);
            let after = table(&fewer, m);
            let by_name_before: Vec<&str> =
                before.iter().map(|e| all[*e as usize].as_str()).collect();
            let by_name_after: Vec<&str> =
                after.iter().map(|e| fewer[*e as usize].as_str()).collect();
            let moved_others = by_name_before
                .iter()
                .zip(&by_name_after)
                .filter(|(b, a)| **b != all[gone] && b != a)
                .count();
            let share = moved_others as f64 / f64::from(m);
            println!("M={m} N={n}: removing one moved {:.2}% of other slots (ideal 0, its own share {:.2}%)", share * 100.0, 100.0 / n as f64);
            assert!(share < 0.05, "M={m} N={n}: {share}");

            let grown = table(&all, m);
            let changed = before
                .iter()
                .zip(&grown)
                .filter(|(b, g)| all[**b as usize] != all[**g as usize])
                .count();
            let share = changed as f64 / f64::from(m);
            println!(
                "M={m} N={n}: adding one moved {:.2}% of slots (ideal {:.2}%)",
                share * 100.0,
                100.0 / (n + 1) as f64
            );
            assert!(share < 1.0 / (n + 1) as f64 + 0.05, "M={m} N={n}: {share}");
        }
    }

    #[test]
    fn the_table_does_not_depend_on_input_order() {
        let a = names(37);
        let mut b = a.clone();
        b.reverse();
        b.swap(3, 20);
        let ta: Vec<&str> = table(&a, 4093)
            .iter()
            .map(|e| a[*e as usize].as_str())
            .collect();
        let tb: Vec<&str> = table(&b, 4093)
            .iter()
            .map(|e| b[*e as usize].as_str())
            .collect();
        assert_eq!(ta, tb);
    }

    #[test]
    fn the_table_is_pinned_by_its_seeds() {
        // Changing the hash or the seeds reshuffles every node's flows at
        // upgrade: this pins the layout so such a change is deliberate.
        let t = table(&names(3), 251);
        let c: HashMap<u32, usize> = t.iter().fold(HashMap::new(), |mut m, e| {
            *m.entry(*e).or_insert(0) += 1;
            m
        });
        assert_eq!(c.values().sum::<usize>(), 251);
        assert_eq!(
            hash(OFFSET_SEED, b"10.0.0.1:80"),
            hash(OFFSET_SEED, b"10.0.0.1:80")
        );
        assert_ne!(
            hash(OFFSET_SEED, b"10.0.0.1:80"),
            hash(SKIP_SEED, b"10.0.0.1:80")
        );
        assert_eq!(&t[..8], &PINNED_PREFIX, "table layout changed");
    }

    #[test]
    fn scaled_sizes_give_each_backend_a_hundred_slots_in_fixed_classes() {
        let size = |n| TableSize::Scaled.for_backends(n);
        assert_eq!(size(0), 251);
        assert_eq!(size(2), 251);
        assert_eq!(size(3), 1021);
        assert_eq!(size(10), 1021);
        assert_eq!(size(11), 4093);
        assert_eq!(size(163), 16381);
        assert_eq!(size(164), 65521);
        assert_eq!(size(100_000), 131_071);
        assert_eq!(TableSize::from(16381).for_backends(1000), 16381);
        for m in SIZE_CLASSES {
            assert!(TABLE_SIZES.contains(&m), "{m} is a supported prime");
        }
    }

    const PINNED_PREFIX: [u32; 8] = [2, 0, 1, 2, 2, 2, 1, 1];

    #[test]
    fn no_backend_gives_an_empty_table_and_duplicates_count_once() {
        assert!(table::<&str>(&[], 251).is_empty());
        let t = table(&["a:1", "a:1", "b:1"], 251);
        assert!(
            t.iter().all(|e| *e == 0 || *e == 2),
            "the duplicate at index 1 owns nothing"
        );
    }
}
