//! Frontend lookup: is this packet addressed to a Service?

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    service::{SRC_RANGE_HEAD_BITS, SVC_F_SRC_RANGES},
    ServiceKey, ServiceValue, SrcRange,
};

use crate::{
    maps::{LB_SERVICES_V2, LB_SRC_RANGES_V1},
    parse::Flow,
};

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

/// Whether the flow's source may reach a frontend guarded by
/// `loadBalancerSourceRanges`.
#[inline(always)]
pub fn source_allowed(svc: &ServiceValue, flow: &Flow) -> bool {
    if svc.flags & SVC_F_SRC_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SRC_RANGE_HEAD_BITS + 128,
        SrcRange {
            svc_id: svc.svc_id,
            family: flow.family,
            _pad: [0; 3],
            addr_be: flow.saddr,
        },
    );
    LB_SRC_RANGES_V1.get(&key).is_some()
}
