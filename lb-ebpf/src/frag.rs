//! Later fragments (IPv4, IPv6) follow their first fragment
//! (`lb_common::frag`).

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{frag::FRAG_TIMEOUT_NS, FragKey, FragValue, Tuple};

use crate::{
    env::Env,
    maps::LB_FRAGS_V1,
    parse::{Frag, Layout},
};

/// The datagram a fragment belongs to.
#[inline(always)]
fn key(t: &Tuple, layout: &Layout) -> FragKey {
    FragKey {
        saddr_be: t.saddr_be,
        daddr_be: t.daddr_be,
        id_be: layout.ip_id_be,
        proto: t.proto,
        family: t.family,
        _pad: [0; 2],
    }
}

/// Records a translated first fragment's ports for the rest of its datagram.
#[inline(always)]
pub fn remember(t: &Tuple, layout: &Layout, env: &Env) {
    if layout.frag != Frag::First {
        return;
    }
    let value = FragValue {
        sport_be: t.sport_be,
        dport_be: t.dport_be,
        _pad: 0,
        seen_ns: env.now(),
    };
    // A full LRU evicts the oldest datagram; a failed insert only means the
    // later fragments pass untranslated, which the counters show.
    let _ = LB_FRAGS_V1.insert(&key(t, layout), &value, u64::from(BPF_ANY));
}

/// Gives a later fragment's tuple its first fragment's ports; false when no
/// fresh first fragment was translated.
#[inline(always)]
pub fn recall(t: &mut Tuple, layout: &Layout, env: &Env) -> bool {
    // SAFETY: the value is copied out at once; a racing update of the same
    // datagram writes the same ports.
    let Some(v) = (unsafe { LB_FRAGS_V1.get(&key(t, layout)).copied() }) else {
        return false;
    };
    if env.now().wrapping_sub(v.seen_ns) > FRAG_TIMEOUT_NS {
        return false;
    }
    t.sport_be = v.sport_be;
    t.dport_be = v.dport_be;
    true
}
