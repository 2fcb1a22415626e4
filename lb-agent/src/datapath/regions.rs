//! Which regions of the flat Maglev slot array hold tables.
//!
//! Every Service port's table is a region of `LB_MAGLEV_V2`, counted here
//! in array elements of [`MAGLEV_CHUNK`] slots. A new table always goes
//! into a free region, and the frontend records are then pointed at it,
//! so no record ever points at a region being written.
//!
//! A region no record points at any more is not free at once: a packet
//! that read the old record just before the flip may still be reading the
//! old table. It stays in quarantine until an RCU grace period has passed
//! since it was given back (every XDP, TC and socket program runs inside
//! one RCU read-side section, so after a grace period no program that saw
//! the old record is still running). The store waits for a grace period
//! only when an allocation finds no room outside the quarantine, so the
//! change path pays the wait once per array-full of changes, not per
//! change (docs/architecture.md, Maps).
//!
//! Free regions are coalesced and handed out best-fit; since table sizes
//! come in a few fixed classes, holes left by one table mostly fit the
//! next of its class. There is no compaction: an array too fragmented for
//! a table reports itself full, as a full array does.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::service::MAGLEV_CHUNK;

/// Elements needed for a table of `slots` slots.
pub fn chunks_for(slots: usize) -> u32 {
    u32::try_from(slots.div_ceil(MAGLEV_CHUNK as usize)).unwrap_or(u32::MAX)
}

/// The allocation state of the flat slot array, in elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Regions {
    /// Elements in the array.
    capacity: u32,
    /// Free regions by start → length, coalesced.
    free: BTreeMap<u32, u32>,
    /// The same by (length, start), for best fit.
    by_len: BTreeSet<(u32, u32)>,
    /// Regions given out, start → length.
    live: BTreeMap<u32, u32>,
    /// Regions given back, waiting for a grace period.
    quarantine: Vec<(u32, u32)>,
}

impl Regions {
    /// An empty array of `capacity` elements.
    pub fn new(capacity: u32) -> Self {
        Self::adopt(capacity, std::iter::empty())
    }

    /// An array of `capacity` elements whose `live` regions (start,
    /// length) hold tables, as read back from the maps at start. Regions
    /// may repeat or overlap (several records name one table); what they
    /// cover is taken, everything else is free at once, since no record
    /// points at it.
    pub fn adopt(capacity: u32, live: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut taken: BTreeMap<u32, u32> = BTreeMap::new();
        for (start, len) in live {
            if start >= capacity || len == 0 {
                continue;
            }
            let len = len.min(capacity - start);
            let e = taken.entry(start).or_insert(0);
            *e = (*e).max(len);
        }
        let mut r = Self {
            capacity,
            ..Self::default()
        };
        let mut at = 0u32;
        for (&start, &len) in &taken {
            if start > at {
                r.insert_free(at, start - at);
            }
            at = at.max(start + len);
        }
        if at < capacity {
            r.insert_free(at, capacity - at);
        }
        r.live = taken;
        r
    }

    /// Elements in the array.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Elements given out (tables in use or being replaced).
    pub fn used(&self) -> u64 {
        self.live.values().map(|l| u64::from(*l)).sum()
    }

    /// Elements waiting for a grace period.
    pub fn quarantined(&self) -> u64 {
        self.quarantine.iter().map(|(_, l)| u64::from(*l)).sum()
    }

    /// The length of the live region starting at `start`.
    pub fn len_of(&self, start: u32) -> Option<u32> {
        self.live.get(&start).copied()
    }

    /// Gives out the smallest free region of at least `len` elements (its
    /// start), or `None` if none is that large.
    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return None;
        }
        let &(have, start) = self.by_len.range((len, 0)..).next()?;
        self.remove_free(start, have);
        if have > len {
            self.insert_free(start + len, have - len);
        }
        self.live.insert(start, len);
        Some(start)
    }

    /// Takes back a region no record ever pointed at (its write failed):
    /// free at once.
    pub fn give_back_unused(&mut self, start: u32) {
        if let Some(len) = self.live.remove(&start) {
            self.add_free(start, len);
        }
    }

    /// Takes back a region no record points at any more: quarantined
    /// until [`Self::grace_period_passed`]. Returns whether it was live.
    pub fn retire(&mut self, start: u32) -> bool {
        match self.live.remove(&start) {
            Some(len) => {
                self.quarantine.push((start, len));
                true
            }
            None => false,
        }
    }

    /// Frees every region quarantined before a grace period that has now
    /// passed (the caller waited for one after they were retired).
    pub fn grace_period_passed(&mut self) {
        for (start, len) in std::mem::take(&mut self.quarantine) {
            self.add_free(start, len);
        }
    }

    /// Adds a region to the free list, merged with its free neighbours.
    fn add_free(&mut self, mut start: u32, mut len: u32) {
        if let Some((&s, &l)) = self.free.range(..start).next_back() {
            if s + l == start {
                self.remove_free(s, l);
                start = s;
                len += l;
            }
        }
        if let Some(&l) = self.free.get(&(start + len)) {
            self.remove_free(start + len, l);
            len += l;
        }
        self.insert_free(start, len);
    }

    fn insert_free(&mut self, start: u32, len: u32) {
        self.free.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove_free(&mut self, start: u32, len: u32) {
        self.free.remove(&start);
        self.by_len.remove(&(len, start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_rounds_up_to_whole_elements() {
        assert_eq!(chunks_for(1021), 64);
        assert_eq!(chunks_for(1024), 64);
        assert_eq!(chunks_for(251), 16);
    }

    #[test]
    fn a_retired_region_is_not_reused_before_a_grace_period() {
        let mut r = Regions::new(8);
        let a = r.alloc(4).expect("room");
        let b = r.alloc(4).expect("room");
        assert_ne!(a, b);
        assert!(r.retire(a));
        assert_eq!(r.alloc(4), None, "a quarantined region was given out");
        assert_eq!(r.quarantined(), 4);
        r.grace_period_passed();
        assert_eq!(r.alloc(4), Some(a));
    }

    #[test]
    fn free_neighbours_merge_into_one_region() {
        let mut r = Regions::new(12);
        let a = r.alloc(4).expect("room");
        let b = r.alloc(4).expect("room");
        let c = r.alloc(4).expect("room");
        r.retire(a);
        r.retire(c);
        r.retire(b);
        r.grace_period_passed();
        assert_eq!(r.alloc(12), Some(0));
        assert_eq!(r.used(), 12);
    }

    #[test]
    fn the_smallest_hole_that_fits_is_used() {
        let mut r = Regions::new(20);
        let a = r.alloc(8).expect("room");
        let _keep = r.alloc(1).expect("room");
        let b = r.alloc(2).expect("room");
        let _keep2 = r.alloc(1).expect("room");
        r.retire(a);
        r.retire(b);
        r.grace_period_passed();
        // Holes: 8 at a, 2 at b, 8 at the end: a table of 2 takes b's.
        assert_eq!(r.alloc(2), Some(b));
        assert_eq!(r.alloc(8), Some(a));
    }

    #[test]
    fn adoption_keeps_every_named_region_and_frees_the_rest() {
        // A table named by its record (5 elements) and by a frontend that
        // reads fewer of its slots (3) is one region of 5.
        let mut r = Regions::adopt(16, [(4, 5), (4, 3), (12, 2), (40, 1)]);
        assert_eq!(r.used(), 7);
        assert_eq!(r.len_of(4), Some(5));
        assert_eq!(r.alloc(4), Some(0));
        assert_eq!(r.alloc(3), Some(9));
        assert_eq!(r.alloc(2), Some(14));
        assert_eq!(r.alloc(1), None);
    }

    #[test]
    fn an_unused_region_is_free_at_once() {
        let mut r = Regions::new(4);
        let a = r.alloc(4).expect("room");
        r.give_back_unused(a);
        assert_eq!(r.alloc(4), Some(a));
    }
}
