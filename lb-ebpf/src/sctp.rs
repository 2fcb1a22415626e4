//! SCTP's checksum: what translating SCTP takes beyond TCP's and UDP's
//! ladder, which SCTP packets otherwise run as they are.
//!
//! SCTP's checksum is a CRC32c over the SCTP packet only, no IP
//! pseudo-header: an address rewrite leaves it valid, and a port rewrite
//! changes it by an amount that needs no payload, since the CRC is linear
//! (`lb_common::crc32c`): two 32-step multiplications. Inlined where a
//! port is rewritten, the verifier would walk them once per way of the
//! ladder reaching a rewrite; so a rewrite only records its change
//! ([`port_changed`]), and the entry point, when a change is recorded,
//! tail-calls a small program of its own hook type that applies it
//! ([`apply`]) and returns the action the entry point decided on. That
//! program is verified once, apart, and an address-only translation (a
//! ClusterIP whose targetPort is its port, a reply to it) never reaches it.

use aya_ebpf::{btf_maps::ProgramArray, EbpfContext};
use lb_common::crc32c::{self, Pending};

use crate::{
    hdr::{ETH_HLEN, IP4_TOT_LEN, IP6_HLEN, IP6_PAYLOAD_LEN, SCTP_CSUM, SCTP_HLEN},
    maps::LB_SCTP_CRC_V1,
    packet::{Packet, PacketError},
    parse::Layout,
    verdict::Verdict,
};

/// `x^(8·n) mod P` for every packet length, in two halves (see
/// `lb_common::crc32c::TABLE`): read-only data the verifier knows.
static CRC_SHIFTS: [u32; crc32c::TABLE_LEN] = crc32c::TABLE;

/// Records that the port at `field` (0 or 2) of the SCTP packet at
/// `layout` changed from `old` to `new` (network order), for [`apply`].
/// Nothing is read here, and nothing branches: the record is in map
/// memory, which the verifier does not track, so paths that differ only
/// in it stay one state to it, and the lengths are [`apply`]'s to read.
#[inline(always)]
pub fn port_changed(layout: &Layout, field: usize, old: u16, new: u16) -> Result<(), PacketError> {
    let rec = LB_SCTP_CRC_V1.get_ptr_mut(0).ok_or(PacketError)?;
    // The ports read as the low (source) and high (destination) half of
    // the little-endian word the CRC takes the first four bytes as.
    let diff = u32::from(old ^ new) << (8 * field);
    // SAFETY: a per-CPU slot, used by one program run at a time.
    unsafe {
        (*rec).diff ^= diff;
        (*rec).l4_off = layout.l4_off as u32;
    }
    Ok(())
}

/// Ends a main program's run whose packet leaves with `verdict` and
/// `action`: returns `action` when no checksum update is pending, else
/// tail-calls the checksum program in `progs`, which returns `action`
/// itself. `Err` when that tail call failed (no agent has filled the
/// slot): the packet's checksum would be wrong, so the caller drops it.
/// Either way the record is left clear for the next run.
#[inline(always)]
pub fn finish<C: EbpfContext>(
    ctx: &C,
    progs: &ProgramArray<1>,
    verdict: Verdict,
    action: u32,
) -> Result<u32, PacketError> {
    let Some(rec) = LB_SCTP_CRC_V1.get_ptr_mut(0) else {
        return Ok(action);
    };
    // SAFETY (all blocks): a per-CPU slot, used by one program run at a
    // time; the tail call replaces this run with the target's on the same
    // context, leaving nothing of ours to drop.
    if unsafe { (*rec).diff } == 0 {
        return Ok(action);
    }
    // A dropped packet needs no update; an answer built in the packet's
    // place (a reset, an ICMP error) computed its own checksums.
    if matches!(verdict, Verdict::Drop | Verdict::Bounce) {
        unsafe { (*rec).diff = 0 };
        return Ok(action);
    }
    unsafe {
        (*rec).action = action;
        progs.tail_call(ctx, 0);
        (*rec).diff = 0;
    }
    Err(PacketError)
}

/// The checksum programs' run: applies the pending update to the packet,
/// without reading its payload, and returns the action its main program
/// decided on; `Err` (a drop) when the packet cannot be rewritten.
#[inline(always)]
pub fn apply<P: Packet>(pkt: &mut P) -> Result<u32, PacketError> {
    let rec = LB_SCTP_CRC_V1.get_ptr_mut(0).ok_or(PacketError)?;
    // SAFETY: as in `finish`; the record is taken and cleared.
    let Pending {
        diff,
        l4_off,
        action,
        ..
    } = unsafe { core::ptr::replace(rec, Pending::default()) };
    let l4_off = l4_off as usize;
    // The SCTP packet runs from its header to the end of the IP datagram
    // (not of the frame, which may carry Ethernet padding). The IP header
    // is where the parse found it, right after Ethernet.
    let [ver_ihl]: [u8; 1] = pkt.load(ETH_HLEN)?;
    let end = if ver_ihl >> 4 == 6 {
        let plen: u16 = pkt.load(ETH_HLEN + IP6_PAYLOAD_LEN)?;
        ETH_HLEN + IP6_HLEN + usize::from(u16::from_be(plen))
    } else {
        let tot_len: u16 = pkt.load(ETH_HLEN + IP4_TOT_LEN)?;
        ETH_HLEN + usize::from(u16::from_be(tot_len))
    };
    // A datagram too short for the headers the parse read is not one to
    // rewrite.
    if end < l4_off + SCTP_HLEN {
        return Err(PacketError);
    }
    let len = (end - l4_off) as u16;
    let off = l4_off + SCTP_CSUM;
    let crc: u32 = pkt.load(off)?;
    let crc = crc32c::update(&CRC_SHIFTS, u32::from_le(crc), diff, len);
    pkt.store(off, crc.to_le())?;
    Ok(action)
}
