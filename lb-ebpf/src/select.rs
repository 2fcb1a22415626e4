//! Backend selection for a new flow.
//!
//! Invariant: the slot is a pure function of the flow's 5-tuple and the
//! Service's Maglev table, which every node builds identically from the same
//! backend set, so every node picks the same backend for the same flow.

use lb_common::{
    conntrack::CT_F_REPLY, hash::flow_hash, Backend, BackendId, CtValue, ServiceValue,
};

use crate::{
    maps::{LB_BACKENDS_V1, LB_MAGLEV_V1},
    parse::Flow,
};

/// Picks the backend for a new flow; `None` if the table is inconsistent.
#[inline(always)]
pub fn pick(svc: &ServiceValue, flow: &Flow) -> Option<(BackendId, Backend)> {
    let ports = (u32::from(flow.sport) << 16) | u32::from(flow.dport);
    let hash = flow_hash(&flow.saddr, &flow.daddr, ports, flow.proto);
    let index = hash % svc.slot_count;
    // SAFETY: values are copied out at once; the agent replaces a table by
    // swapping in a new inner map, never by writing into a live one.
    let id = unsafe { *LB_MAGLEV_V1.get_value(&svc.svc_id, &index)? };
    let backend = unsafe { *LB_BACKENDS_V1.get(&id)? };
    Some((id, backend))
}

/// Whether the backend a tracked flow was given still exists. Reply entries
/// always pass: only the client side decides the flow's fate.
#[inline(always)]
pub fn backend_alive(ct: &CtValue) -> bool {
    if ct.flags & CT_F_REPLY != 0 {
        return true;
    }
    // SAFETY: the value is read at once.
    match unsafe { LB_BACKENDS_V1.get(&ct.backend_id) } {
        // An id can be reused for another endpoint: compare the address too.
        Some(b) => b.addr_be == ct.nat_daddr_be && b.port_be == ct.nat_dport_be,
        None => false,
    }
}
