//! Frontend lookup: is this flow addressed to a Service, and may its source
//! reach it? Packet-free: a tuple in, a Service record out.

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    service::{SRC_RANGE_HEAD_BITS, SVC_F_SRC_RANGES},
    ServiceValue, SrcRange, Tuple,
};

use crate::maps::{LB_SERVICES_V2, LB_SRC_RANGES_V1};

/// The Service record of the tuple's destination, if it is a frontend.
#[inline(always)]
pub fn lookup(t: &Tuple) -> Option<ServiceValue> {
    // SAFETY: the value is copied out at once, before any map update.
    unsafe { LB_SERVICES_V2.get(&t.frontend()).copied() }
}

/// Whether the tuple's source may reach a frontend guarded by
/// `loadBalancerSourceRanges`.
#[inline(always)]
pub fn source_allowed(svc: &ServiceValue, t: &Tuple) -> bool {
    if svc.flags & SVC_F_SRC_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SRC_RANGE_HEAD_BITS + 128,
        SrcRange {
            svc_id: svc.svc_id,
            family: t.family,
            _pad: [0; 3],
            addr_be: t.saddr_be,
        },
    );
    LB_SRC_RANGES_V1.get(&key).is_some()
}
