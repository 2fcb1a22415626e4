//! Frontend lookup: is this packet addressed to a Service?

use lb_common::{ServiceKey, ServiceValue};

use crate::{maps::LB_SERVICES_V2, parse::Flow};

/// The Service record for the packet's destination, if it is a frontend.
#[inline(always)]
pub fn lookup(flow: &Flow) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr_be: flow.daddr,
        port_be: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    // SAFETY: the value is copied out at once, before any map update.
    unsafe { LB_SERVICES_V2.get(&key).copied() }
}
