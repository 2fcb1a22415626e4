//! Counting packets by outcome.

use lb_common::stats::Counter;

use crate::maps::LB_STATS_V6;

/// Adds one packet of `bytes` to counter `idx` (a `lb_common::stats` index).
#[inline(always)]
pub fn count(idx: u32, bytes: u32) {
    if let Some(c) = LB_STATS_V6.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            let c: &mut Counter = &mut *c;
            c.packets += 1;
            c.bytes += u64::from(bytes);
        }
    }
}
