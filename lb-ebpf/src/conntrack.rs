//! Connection tracking: find a flow's translation, or create both entries of
//! a new flow. Packet-free: entries are keyed by the flow's [`Tuple`] as the
//! wire carries it, and what a packet adds (FIN or RST seen) comes in as a
//! flag.
//!
//! Two maps, each its own LRU (docs/architecture.md, Connection tracking):
//! a new flow's entries go to the embryonic map (`LB_CT_EMBRYO_V1`, short
//! idle timeout), and the first packet from its backend that is not a SYN
//! or RST, a hit on its reply entry, moves both to `LB_CT_V1`, where
//! established flows live. A flow whose backend this node never hears (a
//! DSR flow where it is wrapped, a one-way UDP stream) moves once its
//! client still sends a second after it began. A flood of flows that never
//! complete (spoofed SYNs, answered or not) therefore evicts only other
//! embryonic flows. Losing an embryonic entry costs the flow only a new
//! choice on its next packet, and Maglev makes the same one while the
//! table holds.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    conntrack::{CT_F_CLOSING, CT_F_DNAT, CT_F_DSR, CT_F_FORWARD, CT_F_REPLY, CT_F_SNAT},
    proto,
    service::{BACKEND_F_LOCAL, SVC_F_NODEPORT},
    Backend, BackendId, Config, CtKey, CtValue, ServiceValue, Tuple,
};

use crate::{
    env::Env,
    hdr::tcp_flags,
    maps::{LB_CT_EMBRYO_V1, LB_CT_V1},
    scratch::Entry,
    stats::{count_ct, CtOp},
    verdict::Reason,
};

/// Refresh `last_seen_ns` at most this often, so that busy flows do not
/// bounce the entry's cache line between CPUs on every packet.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// How many SNAT ports a new flow tries before giving up.
const SNAT_TRIES: u32 = 16;

/// Copies the translation of an existing flow into `ct`, refreshing its
/// idle timer and, when the packet's TCP flags (`flags`, 0 for UDP) carry
/// FIN or RST, giving it the short timeout; false when there is none or its forward entry has been
/// idle longer than its timeout (then it is removed, and the packet starts
/// a new flow).
///
/// Only forward entries time out: a flow is as alive as its client, and a
/// reply entry must keep translating while the client still sends (one-way
/// UDP streams refresh only the forward entry). A stale reply entry is
/// overwritten by the next flow with its tuple and translation, or evicted
/// by the LRU; a new flow whose translation differs takes another port.
#[inline(always)]
pub fn lookup(t: &Tuple, flags: u8, env: &Env, ct: &mut CtValue) -> bool {
    let closing = flags & (tcp_flags::FIN | tcp_flags::RST) != 0;
    let entry = match LB_CT_V1.get_ptr_mut(t) {
        Some(entry) => entry,
        None => match embryonic(t, flags, env) {
            Some(entry) => entry,
            None => return false,
        },
    };
    // SAFETY: LRU entries stay valid for the program's run; racing updates
    // of `last_seen_ns` and `flags` by another CPU are harmless.
    unsafe {
        let now = env.now();
        let idle = now.wrapping_sub((*entry).last_seen_ns);
        let reply = (*entry).flags & CT_F_REPLY != 0;
        if !reply && idle > timeout_ns(t.proto, (*entry).flags, env.cfg()) {
            remove(t);
            return false;
        }
        if closing {
            if reply {
                mark_forward_closing(t, &*entry);
            } else {
                (*entry).flags |= CT_F_CLOSING;
            }
        }
        if idle > TOUCH_INTERVAL_NS {
            (*entry).last_seen_ns = now;
        }
        *ct = *entry;
        true
    }
}

/// `t`'s embryonic entry, or the flow established by this packet (then the
/// main map's entry): a forward entry waits for its backend (forgotten once
/// idle longer than the embryonic timeout), unless this node never sees
/// the backend's answers (a DSR flow it wraps, UDP that only the client
/// sends): then it is established once its client still sends a second
/// after it began (its first refresh). A reply entry establishes the flow
/// on the backend's first packet that is not a SYN or RST (`flags`): a
/// SYN-ACK answers spoofed SYNs as readily as real ones, and a flood of
/// those must not reach the main map.
#[inline(always)]
fn embryonic(t: &Tuple, flags: u8, env: &Env) -> Option<*mut CtValue> {
    let entry = LB_CT_EMBRYO_V1.get_ptr_mut(t)?;
    // SAFETY: as in `lookup`.
    unsafe {
        if (*entry).flags & CT_F_REPLY == 0 {
            let idle = env.now().wrapping_sub((*entry).last_seen_ns);
            if idle > secs_ns(env.cfg().embryonic_timeout_s) {
                remove_embryonic(t);
                return None;
            }
            let unheard = (*entry).flags & CT_F_DSR != 0 || t.proto == proto::UDP;
            if idle <= TOUCH_INTERVAL_NS || !unheard || establish_forward(t, &*entry).is_err() {
                return Some(entry);
            }
        } else if flags & (tcp_flags::SYN | tcp_flags::RST) != 0 || establish(t, &*entry).is_err() {
            // A handshake's answer, a refusal, or the main map refused it:
            // the flow goes on embryonic.
            return Some(entry);
        }
    }
    LB_CT_V1.get_ptr_mut(t)
}

/// Moves a flow whose client kept sending from the embryonic map to the
/// main one: its forward entry `fwd` (keyed `t`) and, but for DSR (whose
/// reply entry is the backend node's), the reply entry it leads to.
#[inline(always)]
fn establish_forward(t: &Tuple, fwd: &CtValue) -> Result<(), Reason> {
    insert(t, fwd)?;
    if fwd.flags & CT_F_DSR == 0 {
        let key = reply_key(t, fwd);
        if let Some(reply) = LB_CT_EMBRYO_V1.get_ptr_mut(&key) {
            // SAFETY: as in `lookup`; the kernel copies the value.
            if insert(&key, unsafe { &*reply }).is_ok() {
                remove_embryonic(&key);
            }
        }
    }
    remove_embryonic(t);
    count_ct(CtOp::Established);
    Ok(())
}

/// The key of the reply entry of the flow whose forward entry, keyed `t`,
/// is `fwd`: from the backend to the client, or to this node after SNAT.
#[inline(always)]
fn reply_key(t: &Tuple, fwd: &CtValue) -> Tuple {
    let (dst, dst_port) = if fwd.flags & CT_F_SNAT != 0 {
        (fwd.nat_saddr_be, fwd.nat_sport_be)
    } else {
        (t.saddr_be, t.sport_be)
    };
    Tuple {
        saddr_be: fwd.nat_daddr_be,
        daddr_be: dst,
        sport_be: fwd.nat_dport_be,
        dport_be: dst_port,
        proto: t.proto,
        family: t.family,
        _pad: [0; 2],
    }
}

/// Moves a flow whose backend sent past the handshake from the embryonic
/// map to the main
/// one: its reply entry `reply` (keyed `t`), and the forward entry that
/// the reply's translation leads to while it is still there (on a DSR
/// backend's node there is none: the forward entry is another node's).
#[inline(always)]
fn establish(t: &Tuple, reply: &CtValue) -> Result<(), Reason> {
    insert(t, reply)?;
    let key = forward_key(t, reply);
    if let Some(fwd) = LB_CT_EMBRYO_V1.get_ptr_mut(&key) {
        // SAFETY: as in `lookup`; the kernel copies the value.
        if insert(&key, unsafe { &*fwd }).is_ok() {
            remove_embryonic(&key);
        }
    }
    remove_embryonic(t);
    count_ct(CtOp::Established);
    Ok(())
}

/// The key of the forward entry of the flow whose reply entry, keyed `t`,
/// is `reply`.
#[inline(always)]
fn forward_key(t: &Tuple, reply: &CtValue) -> Tuple {
    // After SNAT the reply's destination is this node; the client is in the
    // entry's rewrite. Otherwise the reply goes to the client directly.
    let (client, client_port) = if reply.flags & CT_F_DNAT != 0 {
        (reply.nat_daddr_be, reply.nat_dport_be)
    } else {
        (t.daddr_be, t.dport_be)
    };
    Tuple {
        saddr_be: client,
        daddr_be: reply.nat_saddr_be,
        sport_be: client_port,
        dport_be: reply.nat_sport_be,
        proto: t.proto,
        family: t.family,
        _pad: [0; 2],
    }
}

/// A FIN or RST from the backend closes the flow too: find the forward
/// entry from the reply entry's translation and give it the short timeout.
#[inline(always)]
fn mark_forward_closing(t: &Tuple, reply: &CtValue) {
    let key = forward_key(t, reply);
    if let Some(fwd) = LB_CT_V1.get_ptr_mut(&key) {
        // SAFETY: as in `lookup`.
        unsafe { (*fwd).flags |= CT_F_CLOSING };
    }
}

/// A copy of `key`'s entry, established or embryonic, without touching it.
#[inline(always)]
pub fn peek(key: &CtKey) -> Option<CtValue> {
    // SAFETY: the values are copied out at once.
    unsafe {
        LB_CT_V1
            .get(key)
            .or_else(|| LB_CT_EMBRYO_V1.get(key))
            .copied()
    }
}

/// The idle timeout of a flow in its state, from the node's config.
#[inline(always)]
fn timeout_ns(l4: u8, flags: u32, cfg: &Config) -> u64 {
    let secs = if l4 == proto::UDP {
        cfg.udp_timeout_s
    } else if flags & CT_F_CLOSING != 0 {
        cfg.tcp_closing_timeout_s
    } else {
        cfg.tcp_timeout_s
    };
    secs_ns(secs)
}

/// A timeout of the config in nanoseconds; zero means "no timeout" (a
/// config map not written yet).
#[inline(always)]
fn secs_ns(secs: u32) -> u64 {
    if secs == 0 {
        u64::MAX
    } else {
        u64::from(secs) * 1_000_000_000
    }
}

/// Forgets a flow's entry (one direction), established or embryonic,
/// counting the removal so that the agent can tell removals from LRU
/// evictions.
#[inline(always)]
pub fn remove(key: &CtKey) {
    if LB_CT_V1.remove(key).is_ok() {
        count_ct(CtOp::Remove);
    }
    remove_embryonic(key);
}

/// Forgets an embryonic entry, counting the removal.
#[inline(always)]
fn remove_embryonic(key: &CtKey) {
    if LB_CT_EMBRYO_V1.remove(key).is_ok() {
        count_ct(CtOp::EmbryoRemove);
    }
}

/// Where a new flow's reply tuple stands.
enum Claim {
    /// Written as an embryonic entry: the flow starts embryonic.
    Embryonic,
    /// This flow's own established entry from before (its forward entry
    /// timed out or was evicted while the backend still answers): the
    /// forward entry joins it in the main map.
    Established,
    /// Another flow's: this one needs a port of its own.
    Taken,
}

/// Whether an existing reply entry `old` is the one a flow of reply entry
/// `new` would write (same translation, no port of its own).
#[inline(always)]
fn same_reply(old: &CtValue, new: &CtValue) -> bool {
    old.flags & CT_F_DNAT == 0
        && old.nat_saddr_be == new.nat_saddr_be
        && old.nat_sport_be == new.nat_sport_be
}

/// Writes the reply entry of a flow that keeps its source, unless its tuple
/// holds another translation. An embryonic entry with the same translation
/// is this flow's own from before and is replaced.
#[inline(always)]
fn claim_reply(key: &CtKey, reply: &CtValue) -> Result<Claim, Reason> {
    // SAFETY: the value is read at once.
    if let Some(old) = unsafe { LB_CT_V1.get(key) } {
        return Ok(if same_reply(old, reply) {
            Claim::Established
        } else {
            Claim::Taken
        });
    }
    if LB_CT_EMBRYO_V1
        .insert(key, reply, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        count_ct(CtOp::EmbryoInsert);
        return Ok(Claim::Embryonic);
    }
    // SAFETY: the value is read at once.
    let same = unsafe { LB_CT_EMBRYO_V1.get(key) }.is_none_or(|old| same_reply(old, reply));
    if !same {
        return Ok(Claim::Taken);
    }
    insert_embryonic(key, reply)?;
    Ok(Claim::Embryonic)
}

/// [`insert`] into the embryonic map.
#[inline(always)]
pub fn insert_embryonic(key: &CtKey, value: &CtValue) -> Result<(), Reason> {
    if LB_CT_EMBRYO_V1
        .insert(key, value, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        count_ct(CtOp::EmbryoInsert);
        return Ok(());
    }
    LB_CT_EMBRYO_V1
        .insert(key, value, u64::from(BPF_ANY))
        .map_err(|_| Reason::DropCtFull)
}

/// Writes an entry, replacing a stale one with the same key. Only a new key
/// counts as an insert: a replacement does not add an entry, and the agent
/// derives evictions from inserts, removals and the entry count.
#[inline(always)]
pub fn insert(key: &CtKey, value: &CtValue) -> Result<(), Reason> {
    if LB_CT_V1.insert(key, value, u64::from(BPF_NOEXIST)).is_ok() {
        count_ct(CtOp::Insert);
        return Ok(());
    }
    LB_CT_V1
        .insert(key, value, u64::from(BPF_ANY))
        .map_err(|_| Reason::DropCtFull)
}

/// A new flow's choice of backend and what else decides its entries.
#[derive(Clone, Copy)]
pub struct NewFlow<'a> {
    /// The Service record of the frontend.
    pub svc: &'a ServiceValue,
    /// The chosen backend's id.
    pub backend_id: BackendId,
    /// The chosen backend.
    pub backend: &'a Backend,
    /// The tuple's hash ([`Tuple::hash`]): where the SNAT port search starts.
    pub hash: u32,
    /// The flow comes from outside the cluster: it needs SNAT to reach a
    /// backend on another node.
    pub external: bool,
    /// Its first packet carries FIN or RST.
    pub closing: bool,
}

/// Records a new flow of tuple `t` in both directions, embryonic until its
/// backend answers: the forward translation is made in `fwd`, the reply
/// entry in `reply` (both are the caller's room, not the stack's); `Err`
/// is the drop reason.
#[inline(always)]
pub fn create(
    t: &Tuple,
    new: &NewFlow,
    env: &Env,
    fwd: &mut CtValue,
    reply: &mut Entry,
) -> Result<(), Reason> {
    let (svc, backend) = (new.svc, new.backend);
    let now = env.now();
    // Traffic from outside the cluster to another node's backend must come
    // back through this node: give it this node's address as source. So must
    // hairpin traffic, a pod that reached its own Service and was picked
    // itself: with its own address as source it would answer itself
    // directly and never see the frontend.
    let hairpin = backend.addr_be == t.saddr_be && backend.family == t.family;
    let snat = (new.external && backend.flags & BACKEND_F_LOCAL == 0) || hairpin;
    *fwd = CtValue {
        nat_daddr_be: backend.addr_be,
        nat_dport_be: backend.port_be,
        flags: CT_F_DNAT,
        backend_id: new.backend_id,
        svc_id: svc.svc_id,
        last_seen_ns: now,
        ..CtValue::default()
    };
    reply.key = Tuple {
        saddr_be: backend.addr_be,
        daddr_be: t.saddr_be,
        sport_be: backend.port_be,
        dport_be: t.sport_be,
        proto: t.proto,
        family: t.family,
        _pad: [0; 2],
    };
    reply.value = CtValue {
        nat_saddr_be: t.daddr_be,
        nat_sport_be: t.dport_be,
        flags: CT_F_SNAT | CT_F_REPLY,
        backend_id: new.backend_id,
        svc_id: svc.svc_id,
        last_seen_ns: now,
        ..CtValue::default()
    };
    // A reply whose new source is one of this node's addresses (a NodePort)
    // would be dropped by the stack as martian: it must be forwarded here.
    if svc.flags & SVC_F_NODEPORT != 0 {
        reply.value.flags |= CT_F_FORWARD;
    }

    if new.closing {
        fwd.flags |= CT_F_CLOSING;
    }

    if !snat {
        match claim_reply(&reply.key, &reply.value)? {
            Claim::Embryonic => return insert_embryonic(t, fwd),
            Claim::Established => return insert(t, fwd),
            Claim::Taken => {}
        }
        // The reply tuple is another flow's: the same client address and
        // port reached another Service, or the backend directly, and this
        // flow's replies would be translated as that one's. Give this flow
        // a source port of its own (its address stays), as the kernel's
        // NAT resolves such a clash.
    }

    let cfg = env.cfg();
    if cfg.snat_port_max < cfg.snat_port_min {
        return Err(Reason::DropSnatExhausted);
    }
    let src = if snat {
        cfg.node_addr(t.family).ok_or(Reason::DropSnatExhausted)?
    } else {
        t.saddr_be
    };
    let range = u32::from(cfg.snat_port_max - cfg.snat_port_min) + 1;
    fwd.nat_saddr_be = src;
    fwd.flags |= CT_F_SNAT;
    reply.value.nat_daddr_be = t.saddr_be;
    reply.value.nat_dport_be = t.sport_be;
    reply.value.flags |= CT_F_DNAT;
    if snat {
        fwd.flags |= CT_F_FORWARD;
        reply.value.flags |= CT_F_FORWARD;
    }
    reply.key.daddr_be = src;
    let mut i = 0;
    while i < SNAT_TRIES {
        let port = cfg.snat_port_min + (new.hash.wrapping_add(i) % range) as u16;
        reply.key.dport_be = port.to_be();
        // NOEXIST makes the reply tuple, and so the port, ours alone
        // among embryonic flows; an established flow may hold it too. (A
        // flow established between the two checks would need this very
        // tuple in the embryonic map, where NOEXIST refuses it.)
        if LB_CT_V1.get_ptr(&reply.key).is_none()
            && LB_CT_EMBRYO_V1
                .insert(&reply.key, &reply.value, u64::from(BPF_NOEXIST))
                .is_ok()
        {
            count_ct(CtOp::EmbryoInsert);
            fwd.nat_sport_be = port.to_be();
            if let Err(reason) = insert_embryonic(t, fwd) {
                remove_embryonic(&reply.key);
                return Err(reason);
            }
            return Ok(());
        }
        i += 1;
    }
    Err(Reason::DropSnatExhausted)
}
