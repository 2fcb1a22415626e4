//! Counting packets by outcome and by Service port. Only the pipeline counts
//! packets; conntrack counts its own map operations (entries made and
//! removed, from which the agent derives LRU evictions).

use lb_common::stats::{self, Counter, SvcCounters};

use crate::{
    maps::{LB_STATS_V8, LB_SVC_STATS_V1},
    verdict::Reason,
};

/// Adds one packet of `bytes` to the counter of `reason`.
#[inline(always)]
pub fn count(reason: Reason, bytes: u32) {
    add(reason.counter(), bytes);
}

/// A conntrack map operation the agent accounts for.
#[derive(Clone, Copy)]
pub enum CtOp {
    /// An entry written under a new key.
    Insert,
    /// An entry the datapath deleted.
    Remove,
    /// An embryonic entry written under a new key.
    EmbryoInsert,
    /// An embryonic entry the datapath deleted (also when moved on).
    EmbryoRemove,
    /// A flow established: moved to the main map.
    Established,
}

/// Counts a conntrack map operation.
#[inline(always)]
pub fn count_ct(op: CtOp) {
    add(
        match op {
            CtOp::Insert => stats::CT_INSERT,
            CtOp::Remove => stats::CT_REMOVE,
            CtOp::EmbryoInsert => stats::CT_EMBRYO_INSERT,
            CtOp::EmbryoRemove => stats::CT_EMBRYO_REMOVE,
            CtOp::Established => stats::CT_ESTABLISHED,
        },
        0,
    );
}

/// Adds one packet of `bytes` to counter `idx` (a `lb_common::stats` index).
#[inline(always)]
fn add(idx: u32, bytes: u32) {
    if let Some(c) = LB_STATS_V8.get_ptr_mut(idx) {
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
