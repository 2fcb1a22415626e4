//! Later IPv4 fragments follow their first fragment (`lb_common::frag`).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use lb_common::{frag::FRAG_TIMEOUT_NS, FragKey, FragValue};

use crate::{
    maps::LB_FRAGS_V1,
    parse::{Flow, Frag},
};

#[inline(always)]
fn key(flow: &Flow) -> FragKey {
    FragKey {
        saddr_be: flow.saddr,
        daddr_be: flow.daddr,
        id_be: u32::from(flow.ip_id_be),
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    }
}

/// Records a translated first fragment's ports for the rest of its datagram.
#[inline(always)]
pub fn remember(flow: &Flow) {
    if flow.frag != Frag::First {
        return;
    }
    let value = FragValue {
        sport_be: flow.sport,
        dport_be: flow.dport,
        _pad: 0,
        // SAFETY: a plain helper call.
        seen_ns: unsafe { bpf_ktime_get_ns() },
    };
    // A full LRU evicts the oldest datagram; a failed insert only means the
    // later fragments pass untranslated, which the counters show.
    let _ = LB_FRAGS_V1.insert(&key(flow), &value, u64::from(BPF_ANY));
}

/// Gives a later fragment its first fragment's ports; false when no fresh
/// first fragment was translated.
#[inline(always)]
pub fn recall(flow: &mut Flow) -> bool {
    // SAFETY: the value is copied out at once; a racing update of the same
    // datagram writes the same ports.
    let Some(v) = (unsafe { LB_FRAGS_V1.get(&key(flow)).copied() }) else {
        return false;
    };
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(v.seen_ns) > FRAG_TIMEOUT_NS {
        return false;
    }
    flow.sport = v.sport_be;
    flow.dport = v.dport_be;
    true
}
