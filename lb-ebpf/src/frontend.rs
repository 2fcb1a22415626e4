//! Frontend lookup: is this flow addressed to a Service, and may its source
//! reach it? Packet-free: a tuple in, a Service record out.

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::{
    service::{SRC_RANGE_HEAD_BITS, SVC_F_SRC_RANGES},
    ServiceKey, ServiceValue, SrcRange, Tuple,
};

use crate::maps::{LB_SERVICES_V3, LB_SRC_RANGES_V1};

/// The Service record of the tuple's destination, if it is a frontend.
/// A client inside the cluster (`in_cluster`: a pod, the node itself) gets
/// the in-cluster twin of a frontend under `externalTrafficPolicy: Local`,
/// which leads to every endpoint: the policy binds only outside clients.
#[inline(always)]
pub fn lookup(t: &Tuple, in_cluster: bool) -> Option<ServiceValue> {
    let key = t.frontend();
    // SAFETY: the value is copied out at once, before any map update.
    let svc = unsafe { LB_SERVICES_V3.get(&key).copied() }?;
    if in_cluster && svc.has_in_cluster_twin() {
        // SAFETY: as above. Without a twin (an agent that writes none), the
        // frontend's own record still serves.
        if let Some(twin) = unsafe { LB_SERVICES_V3.get(&key.in_cluster()).copied() } {
            return Some(twin);
        }
    }
    Some(svc)
}

/// Whether the tuple's destination is a ClusterIP on a port no Service
/// uses (its address-only key exists): such a packet is refused.
#[inline(always)]
pub fn unused_cluster_ip_port(t: &Tuple) -> bool {
    let key = ServiceKey::address_only(t.daddr_be, t.family);
    // SAFETY: only the presence is read.
    unsafe { LB_SERVICES_V3.get(&key) }.is_some()
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
