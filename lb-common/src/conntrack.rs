//! Connection tracking: one entry per direction of a translated flow.
//!
//! Both entries are keyed by the tuple exactly as it appears on the wire, so a
//! packet needs one lookup whichever way it travels. The value says how to
//! rewrite the packet: the forward entry (client → frontend) rewrites the
//! destination to the backend (and the source to the node when SNAT applies);
//! the reply entry (backend → client or node) rewrites the source back to the
//! frontend (and the destination back to the client after SNAT).

use crate::{pod, IpAddrBe, Tuple};

/// A flow as seen on the wire: its [`Tuple`], as the packet carries it.
pub type CtKey = Tuple;
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);

/// Rewrite the source address and port to `nat_saddr_be`/`nat_sport_be`.
pub const CT_F_SNAT: u32 = 1 << 0;
/// Rewrite the destination address and port to `nat_daddr_be`/`nat_dport_be`.
pub const CT_F_DNAT: u32 = 1 << 1;
/// This entry is the reply direction.
pub const CT_F_REPLY: u32 = 1 << 2;
/// After the rewrite the packet carries one of this node's addresses as its
/// source, so the stack would drop it as martian: forward it by FIB lookup.
pub const CT_F_FORWARD: u32 = 1 << 3;

/// A FIN or RST was seen in this direction: the short timeout applies.
pub const CT_F_CLOSING: u32 = 1 << 4;
/// Direct server return: encapsulate to the backend's node, whose address
/// is in `nat_saddr_be` (nothing is rewritten here; see [`crate::dsr`]).
pub const CT_F_DSR: u32 = 1 << 5;

/// How to translate a packet of a tracked flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// New source address (with `CT_F_SNAT`).
    pub nat_saddr_be: IpAddrBe,
    /// New destination address (with `CT_F_DNAT`).
    pub nat_daddr_be: IpAddrBe,
    /// New source port (with `CT_F_SNAT`).
    pub nat_sport_be: u16,
    /// New destination port (with `CT_F_DNAT`).
    pub nat_dport_be: u16,
    /// `CT_F_*` bits.
    pub flags: u32,
    /// The backend the flow was given.
    pub backend_id: u32,
    /// The Service port the flow belongs to.
    pub svc_id: u32,
    /// `bpf_ktime_get_ns` of the last packet seen in this direction.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 56);

pod!(CtValue);
