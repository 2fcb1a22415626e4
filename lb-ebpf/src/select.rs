//! Backend selection for a new flow.
//!
//! Invariant: the slot is a pure function of the flow's hash ([`Tuple::hash`],
//! computed by the caller) and the Service's Maglev table, which every node
//! builds identically from the same backend set, so every node picks the
//! same backend for the same flow. Packet-free: a socket program picks with
//! the same call.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    conntrack::CT_F_REPLY,
    proto,
    service::{BACKEND_F_NOT_SERVING, MAGLEV_CHUNK},
    AffinityKey, AffinityValue, Backend, BackendId, CtValue, ServiceValue, Tuple,
};

use crate::maps::{LB_AFFINITY_V1, LB_BACKENDS_V2, LB_MAGLEV_V2};

/// Picks the backend for a new flow of tuple `t` (whose hash is `hash`) at
/// time `now`: the client's affinity backend while it is fresh, else by
/// Maglev. `None` if the table is inconsistent.
#[inline(always)]
pub fn pick(svc: &ServiceValue, t: &Tuple, hash: u32, now: u64) -> Option<(BackendId, Backend)> {
    if svc.affinity_timeout_s == 0 {
        return pick_maglev(svc, hash);
    }
    let key = AffinityKey {
        svc_id: svc.svc_id,
        family: t.family,
        _pad: [0; 3],
        client_be: t.saddr_be,
    };
    let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    // SAFETY: the value is copied out at once.
    if let Some(a) = unsafe { LB_AFFINITY_V1.get(&key).copied() } {
        if now.wrapping_sub(a.last_seen_ns) <= timeout_ns {
            // The agent deletes entries whose backend leaves the table; a
            // backend id that vanished meanwhile falls through to Maglev.
            if let Some(b) = backend(a.backend_id) {
                remember(&key, a.backend_id, now);
                return Some((a.backend_id, *b));
            }
        }
    }
    let (id, b) = pick_maglev(svc, hash)?;
    remember(&key, id, now);
    Some((id, b))
}

/// Records the client's backend; a full LRU map evicts the idlest client.
#[inline(always)]
fn remember(key: &AffinityKey, backend_id: BackendId, now: u64) {
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_seen_ns: now,
    };
    let _ = LB_AFFINITY_V1.insert(key, &value, u64::from(BPF_ANY));
}

/// Picks by the flow's hash in the Service's Maglev table.
#[inline(always)]
fn pick_maglev(svc: &ServiceValue, hash: u32) -> Option<(BackendId, Backend)> {
    // A Service without a table has no slot (the pipeline refuses its new
    // flows before picking; a caller that does not is answered `None`).
    let slot = svc
        .slot_base
        .wrapping_add(hash.checked_rem(svc.slot_count)?);
    // The agent never writes into a region a record points at, nor reuses
    // one until every program that could have read such a record is done.
    let chunk = LB_MAGLEV_V2.get(slot / MAGLEV_CHUNK)?;
    let id = *chunk.slots.get((slot % MAGLEV_CHUNK) as usize)?;
    Some((id, *backend(id)?))
}

/// The backend the agent holds under `id`, if any.
///
/// The entry is read in place while the agent may be rewriting it (an
/// array's update copies the new value over the old one, where a hash
/// map swaps in a new element), so a read can mix the bytes of two
/// values. The agent keeps every such mix whole: it never changes an
/// entry's presence (its family) and its address in one write. A new
/// backend is written without its family first, then with it; a removed
/// one loses its family first, then is zeroed; a live backend is
/// rewritten only to change its flags, since an id keeps its address,
/// port and family while it is given out. So a read sees either no
/// backend or a backend's whole address, with its old or its new flags.
/// The two writes of a step are separate system calls.
#[inline(always)]
fn backend(id: BackendId) -> Option<&'static Backend> {
    LB_BACKENDS_V2.get(id).filter(|b| b.is_present())
}

/// Whether the backend a tracked flow of protocol `l4` was given may still
/// carry it: it exists, and for UDP it still serves (a not-ready endpoint
/// keeps its TCP connections and SCTP associations, while its UDP flows
/// move, as kube-proxy clears only UDP's conntrack entries). Reply entries
/// always pass: only the client side decides the flow's fate.
#[inline(always)]
pub fn backend_alive(ct: &CtValue, l4: u8) -> bool {
    if ct.flags & CT_F_REPLY != 0 {
        return true;
    }
    match backend(ct.backend_id) {
        // An id can be reused for another endpoint: compare the address too.
        Some(b) => {
            b.addr_be == ct.nat_daddr_be
                && b.port_be == ct.nat_dport_be
                && (l4 != proto::UDP || b.flags & BACKEND_F_NOT_SERVING == 0)
        }
        None => false,
    }
}
