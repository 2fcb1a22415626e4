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
    snat::SnatCursorKey,
    Backend, BackendId, Config, CtKey, CtValue, IpAddrBe, ServiceValue, Tuple,
};

use crate::{
    env::Env,
    hdr::tcp_flags,
    maps::{LB_CT_EMBRYO_V1, LB_CT_V1, LB_SNAT_CURSORS_V1},
    scratch::Entry,
    stats::{count_ct, CtOp},
    verdict::Reason,
};

/// Refresh `last_seen_ns` at most this often, so that busy flows do not
/// bounce the entry's cache line between CPUs on every packet.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// How many SNAT ports a new flow probes for a free one before it takes
/// back the first one whose flow looked over, or is refused. Ports come
/// from the backend's cursor in order, so the first probe is the port
/// handed out longest ago, free unless that flow still lives; every probe
/// moves the cursor on, so refused flows push the search through the whole
/// range and later flows find what is free anywhere in it.
const SNAT_PROBES: u32 = 32;

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

/// The SNAT port cursor of the backend (address, port, protocol) whose
/// reply tuple is `key`, made at `start` when it has none; `None` only if
/// the LRU map refuses it.
#[inline(always)]
fn cursor(key: &CtKey, start: u32) -> Option<*mut u64> {
    let k = SnatCursorKey {
        addr_be: key.saddr_be,
        port_be: key.sport_be,
        proto: key.proto,
        family: key.family,
    };
    if let Some(c) = LB_SNAT_CURSORS_V1.get_ptr_mut(&k) {
        return Some(c);
    }
    let _ = LB_SNAT_CURSORS_V1.insert(&k, &u64::from(start), u64::from(BPF_NOEXIST));
    LB_SNAT_CURSORS_V1.get_ptr_mut(&k)
}

/// Takes the cursor's position and moves it on, atomically: new flows to
/// one backend on several CPUs at once never probe the same port. (The
/// instruction by hand: core's `fetch_add` is missing on this target, and
/// the kernel has had it since 5.12.)
#[inline(always)]
fn take(cursor: *mut u64) -> u32 {
    let mut n: u64 = 1;
    // SAFETY: `cursor` is an LRU value, 8-byte aligned, valid for the
    // program's run; every access to it is this atomic add.
    unsafe {
        core::arch::asm!(
            "{n} = atomic_fetch_add((u64 *)({p} + 0), {n})",
            p = in(reg) cursor,
            n = inout(reg) n,
            options(nostack, preserves_flags),
        );
    }
    // The low half is the position: ranges are far below 2^32 ports.
    n as u32
}

/// How long a translated flow's reply entry must have been idle before its
/// port may be taken back: the protocol's short timeout (TCP after FIN,
/// UDP) in the main map; the embryonic timeout for a backend that never
/// answered.
struct Graces {
    established: u64,
    embryonic: u64,
}

/// Who holds a reply tuple, at a first look.
enum Holder {
    /// Nobody: the tuple is free.
    Nobody,
    /// A translated flow (`CT_F_DNAT`: its reply entry holds a port) whose
    /// reply entry has been idle past its grace: over, unless its client
    /// still sends (`take_back` checks).
    Idle,
    /// A live flow, or an entry that holds no port of ours.
    Live,
}

/// Who holds reply tuple `key` at time `now`.
#[inline(always)]
fn holder(key: &CtKey, now: u64, graces: &Graces) -> Holder {
    let (entry, grace) = match LB_CT_V1.get_ptr(key) {
        Some(entry) => (entry, graces.established),
        None => match LB_CT_EMBRYO_V1.get_ptr(key) {
            Some(entry) => (entry, graces.embryonic),
            None => return Holder::Nobody,
        },
    };
    // SAFETY: as in `lookup`.
    let (flags, last_seen) = unsafe { ((*entry).flags, (*entry).last_seen_ns) };
    let held = CT_F_REPLY | CT_F_DNAT;
    if flags & held == held && now.wrapping_sub(last_seen) > grace {
        Holder::Idle
    } else {
        Holder::Live
    }
}

/// Takes reply tuple `key` (and so its SNAT port) back from a flow that is
/// over, removing its entries; false when the flow lives on. Over means,
/// as Linux's NAT gives a port back when the conntrack entry dies: its
/// reply entry idle past its grace ([`holder`]), and its forward entry
/// gone, timed out or leading to another port. A race with another CPU
/// over one entry needs both at one port at once, which the cursor's
/// atomic steps rule out.
#[inline(always)]
fn take_back(key: &CtKey, env: &Env) -> bool {
    let Some(reply) = LB_CT_V1
        .get_ptr(key)
        .or_else(|| LB_CT_EMBRYO_V1.get_ptr(key))
    else {
        return true;
    };
    // SAFETY: as in `lookup`.
    let fwd = forward_key(key, unsafe { &*reply });
    match forward_state(&fwd, key, env) {
        Forward::Alive => return false,
        // Its forward entry goes too, or it would lead to the new flow's
        // port until its client's next packet found it timed out.
        Forward::TimedOut => remove(&fwd),
        Forward::Gone => {}
    }
    remove(key);
    true
}

/// Claims reply tuple `reply.key` (SNAT port `port`) for the new flow of
/// tuple `t` and writes its forward entry: `None` when another flow holds
/// the tuple, else the outcome. `BPF_NOEXIST` makes the tuple ours alone
/// among embryonic flows; [`holder`] has checked the established ones. (A
/// flow established between the two checks would need this very tuple in
/// the embryonic map, where NOEXIST refuses it.)
#[inline(always)]
fn claim(t: &Tuple, fwd: &mut CtValue, reply: &Entry, port: u16) -> Option<Result<(), Reason>> {
    LB_CT_EMBRYO_V1
        .insert(&reply.key, &reply.value, u64::from(BPF_NOEXIST))
        .ok()?;
    count_ct(CtOp::EmbryoInsert);
    fwd.nat_sport_be = port.to_be();
    if let Err(reason) = insert_embryonic(t, fwd) {
        remove_embryonic(&reply.key);
        return Some(Err(reason));
    }
    Some(Ok(()))
}

/// Where the forward entry of a flow stands, seen from its reply entry.
enum Forward {
    /// There, within its timeout, and translating to the reply tuple.
    Alive,
    /// There and translating to the reply tuple, but timed out.
    TimedOut,
    /// Not there, or translating to another port (a client that came back
    /// after its flow timed out may have been given another one since).
    Gone,
}

/// Where forward entry `fwd` stands for reply tuple `reply`.
#[inline(always)]
fn forward_state(fwd: &CtKey, reply: &CtKey, env: &Env) -> Forward {
    let (entry, established) = match LB_CT_V1.get_ptr(fwd) {
        Some(entry) => (entry, true),
        None => match LB_CT_EMBRYO_V1.get_ptr(fwd) {
            Some(entry) => (entry, false),
            None => return Forward::Gone,
        },
    };
    let cfg = env.cfg();
    // SAFETY: as in `lookup`.
    let (flags, last_seen, leads_here) = unsafe {
        (
            (*entry).flags,
            (*entry).last_seen_ns,
            (*entry).nat_sport_be == reply.dport_be && (*entry).nat_saddr_be == reply.daddr_be,
        )
    };
    if !leads_here || flags & CT_F_SNAT == 0 {
        return Forward::Gone;
    }
    let timeout = if established {
        timeout_ns(fwd.proto, flags, cfg)
    } else {
        secs_ns(cfg.embryonic_timeout_s)
    };
    if env.now().wrapping_sub(last_seen) <= timeout {
        Forward::Alive
    } else {
        Forward::TimedOut
    }
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
    /// The tuple's hash ([`Tuple::hash`]): where a backend's first SNAT
    /// port cursor starts.
    pub hash: u32,
    /// The flow comes from outside the cluster: it needs SNAT to reach a
    /// backend on another node.
    pub external: bool,
    /// The address of the interface the flow leaves by (its SNAT source,
    /// `forward::egress_addr`), when it needs SNAT and the agent named one;
    /// else SNAT takes the node's address.
    pub egress_addr: Option<IpAddrBe>,
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
    let count = cfg.snat_port_count();
    if count == 0 {
        return Err(Reason::DropSnatExhausted);
    }
    // Masquerading's source: the address of the interface the flow leaves
    // by, else the node's (hairpin flows, interfaces the agent named none).
    let src = if !snat {
        t.saddr_be
    } else if let Some(addr) = new.egress_addr {
        addr
    } else {
        cfg.node_addr(t.family).ok_or(Reason::DropSnatExhausted)?
    };
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
    let cursor = cursor(&reply.key, new.hash).ok_or(Reason::DropSnatExhausted)?;
    let graces = Graces {
        established: timeout_ns(t.proto, CT_F_CLOSING, cfg),
        embryonic: secs_ns(cfg.embryonic_timeout_s),
    };
    // The first port seen held by a flow that may be over, kept in the
    // scratch entry rather than a register: map memory is not part of the
    // verifier's state, so the loop's paths stay few.
    fwd.nat_sport_be = 0;
    let mut i = 0;
    while i < SNAT_PROBES {
        let port = cfg.snat_port(take(cursor) % count);
        reply.key.dport_be = port.to_be();
        match holder(&reply.key, now, &graces) {
            Holder::Nobody => {
                if let Some(done) = claim(t, fwd, reply, port) {
                    return done;
                }
            }
            Holder::Idle => {
                if fwd.nat_sport_be == 0 {
                    fwd.nat_sport_be = port.to_be();
                }
            }
            Holder::Live => {}
        }
        i += 1;
    }
    // No port was free: take back the first one whose flow is over.
    let spare = fwd.nat_sport_be;
    if spare != 0 {
        reply.key.dport_be = spare;
        if take_back(&reply.key, env) {
            if let Some(done) = claim(t, fwd, reply, u16::from_be(spare)) {
                return done;
            }
        }
    }
    // Refused, as Linux's NAT drops a packet it finds no tuple for: the
    // client's retransmission comes back when ports may be free, and meets
    // the cursor `SNAT_PROBES` ports further on.
    Err(Reason::DropSnatExhausted)
}
