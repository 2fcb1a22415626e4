//! Counting packets by outcome and by Service port.

use lb_common::stats::{Counter, SvcCounters};

use crate::maps::{LB_STATS_V6, LB_SVC_STATS_V1};

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

/// Adds one packet of `bytes` to Service port `svc_id`, as a drop if it
/// reached no backend.
#[inline(always)]
pub fn count_service(svc_id: u32, bytes: u32, dropped: bool) {
    if let Some(c) = LB_SVC_STATS_V1.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            let c: &mut SvcCounters = &mut *c;
            c.packets += 1;
            c.bytes += u64::from(bytes);
            if dropped {
                c.drops += 1;
            }
        }
    }
}

/// Counts a flow opened to Service port `svc_id`.
#[inline(always)]
pub fn count_new_flow(svc_id: u32) {
    if let Some(c) = LB_SVC_STATS_V1.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { (*c).new_flows += 1 };
    }
}
