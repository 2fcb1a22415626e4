//! One view of a packet for XDP and TC, so every stage is written once.
//!
//! Stages keep offsets, never pointers: TC's checksum and resize helpers
//! invalidate packet pointers, so each access re-derives and re-checks its
//! pointer from the context.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::{
        bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_skb_adjust_room, bpf_skb_change_head,
        bpf_skb_change_tail, bpf_skb_pull_data, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
        bpf_xdp_get_buff_len,
    },
    programs::{TcContext, XdpContext},
};

use lb_common::csum;

/// The furthest header byte any stage reads.
const MAX_OFFSET: usize = 512;

/// Error of a packet access or helper: the packet must not be translated.
#[derive(Clone, Copy)]
pub struct PacketError;

/// Bounds-checked access and rewrite primitives over a packet.
pub trait Packet {
    /// Start of packet data.
    fn data(&self) -> usize;
    /// End of packet data.
    fn data_end(&self) -> usize;
    /// Total packet length (for TC this includes non-linear data).
    fn len(&self) -> u32;
    /// Updates the IP header checksum at `off` for a 4-byte change.
    fn l3_csum_replace(&mut self, off: usize, from: u32, to: u32) -> Result<(), PacketError>;
    /// Updates the L4 checksum at `off` for a `size`-byte change (2 or 4);
    /// `pseudo` when the changed bytes are in the pseudo header (addresses).
    fn l4_csum_replace(
        &mut self,
        off: usize,
        from: u32,
        to: u32,
        size: u8,
        pseudo: bool,
        udp: bool,
    ) -> Result<(), PacketError>;
    /// Grows (positive) the packet at its head by `len` bytes.
    fn grow_head(&mut self, len: u32) -> Result<(), PacketError>;
    /// Removes the `len` bytes that follow the Ethernet header (an
    /// encapsulation), keeping the Ethernet header.
    fn pop_after_eth(&mut self, len: u32) -> Result<(), PacketError>;
    /// Cuts the packet to `new_len` bytes.
    fn truncate(&mut self, new_len: u32) -> Result<(), PacketError>;

    /// The program context, for helpers that take it.
    fn ctx_ptr(&self) -> *mut core::ffi::c_void;
    /// The interface the packet arrived on.
    fn ifindex(&self) -> u32;

    /// A checked pointer to a `T` at `off`.
    #[inline(always)]
    fn ptr<T>(&self, off: usize) -> Result<*mut T, PacketError> {
        // An explicit ceiling gives the verifier a bound on every offset.
        if off > MAX_OFFSET {
            return Err(PacketError);
        }
        let start = self.data() + off;
        if start + core::mem::size_of::<T>() > self.data_end() {
            return Err(PacketError);
        }
        Ok(start as *mut T)
    }

    /// Reads a `T` at `off`.
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, PacketError> {
        // SAFETY: `ptr` checked the bounds; packet data has no alignment guarantee.
        Ok(unsafe { self.ptr::<T>(off)?.read_unaligned() })
    }

    /// Writes a `T` at `off`.
    #[inline(always)]
    fn store<T: Copy>(&mut self, off: usize, v: T) -> Result<(), PacketError> {
        // SAFETY: `ptr` checked the bounds; packet data has no alignment guarantee.
        unsafe { self.ptr::<T>(off)?.write_unaligned(v) };
        Ok(())
    }
}

// data_end is read afresh at every check, by one load instruction with the
// field's offset: LLVM would otherwise fold a bounds check into an earlier,
// wider one made through another pointer (which the verifier, tracking each
// pointer separately, rejects), and a plain volatile load lets it keep the
// field's address, a modified context pointer, in a register or on the
// stack, which the verifier refuses to dereference.

/// Loads the `u32` at byte `OFF` of a program context (zero-extended by
/// the load itself: a cast would be arithmetic the verifier refuses on a
/// packet-end pointer).
#[inline(always)]
fn ctx_u32<const OFF: i16>(ctx: *const core::ffi::c_void) -> usize {
    let v: usize;
    // SAFETY: `ctx` is the program's context and OFF a field of it; the
    // instruction only reads.
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({ctx} + {off})",
            v = out(reg) v,
            ctx = in(reg) ctx,
            off = const OFF,
            options(readonly, nostack, preserves_flags),
        );
    }
    v
}

impl Packet for XdpContext {
    #[inline(always)]
    fn ctx_ptr(&self) -> *mut core::ffi::c_void {
        self.ctx.cast()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // `xdp_md.data_end`.
        ctx_u32::<4>(self.ctx.cast())
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        // The verifier forbids arithmetic on data_end, so ask the kernel.
        // SAFETY: the helper only reads the context.
        unsafe { bpf_xdp_get_buff_len(self.ctx) as u32 }
    }

    #[inline(always)]
    fn l3_csum_replace(&mut self, off: usize, from: u32, to: u32) -> Result<(), PacketError> {
        let check: u16 = self.load(off)?;
        self.store(off, csum::replace4(check, from, to))
    }

    #[inline(always)]
    fn l4_csum_replace(
        &mut self,
        off: usize,
        from: u32,
        to: u32,
        size: u8,
        _pseudo: bool,
        udp: bool,
    ) -> Result<(), PacketError> {
        let check: u16 = self.load(off)?;
        // A zero UDP checksum means "none" and must stay zero.
        if udp && check == 0 {
            return Ok(());
        }
        let mut new = if size == 4 {
            csum::replace4(check, from, to)
        } else {
            csum::replace2(check, from as u16, to as u16)
        };
        if udp && new == 0 {
            new = 0xffff;
        }
        self.store(off, new)
    }

    #[inline(always)]
    fn grow_head(&mut self, len: u32) -> Result<(), PacketError> {
        // SAFETY: the helper checks the headroom itself.
        let ret = unsafe { bpf_xdp_adjust_head(self.ctx, -(len as i32)) };
        helper_result(ret)
    }

    #[inline(always)]
    fn pop_after_eth(&mut self, len: u32) -> Result<(), PacketError> {
        let eth: [u8; 14] = self.load(0)?;
        self.store(len as usize, eth)?;
        // SAFETY: the helper checks the new head against the data.
        let ret = unsafe { bpf_xdp_adjust_head(self.ctx, len as i32) };
        helper_result(ret)
    }

    #[inline(always)]
    fn truncate(&mut self, new_len: u32) -> Result<(), PacketError> {
        let delta = new_len as i32 - Packet::len(self) as i32;
        // SAFETY: the helper checks the new length itself.
        let ret = unsafe { bpf_xdp_adjust_tail(self.ctx, delta) };
        helper_result(ret)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn ctx_ptr(&self) -> *mut core::ffi::c_void {
        self.skb.skb.cast()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the program's own context.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // `__sk_buff.data_end`.
        ctx_u32::<80>(self.skb.skb.cast())
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn l3_csum_replace(&mut self, off: usize, from: u32, to: u32) -> Result<(), PacketError> {
        // SAFETY: the helper bounds-checks `off` against the skb.
        let ret =
            unsafe { bpf_l3_csum_replace(self.skb.skb, off as u32, from.into(), to.into(), 4) };
        helper_result(ret)
    }

    #[inline(always)]
    fn l4_csum_replace(
        &mut self,
        off: usize,
        from: u32,
        to: u32,
        size: u8,
        pseudo: bool,
        udp: bool,
    ) -> Result<(), PacketError> {
        // The helper knows whether the skb carries a partial (offloaded)
        // checksum, which XDP cannot tell: that is why TC uses it.
        let mut flags = u64::from(size);
        if pseudo {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
        }
        if udp {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        // SAFETY: the helper bounds-checks `off` against the skb.
        let ret =
            unsafe { bpf_l4_csum_replace(self.skb.skb, off as u32, from.into(), to.into(), flags) };
        helper_result(ret)
    }

    #[inline(always)]
    fn grow_head(&mut self, len: u32) -> Result<(), PacketError> {
        // SAFETY: the helper checks the skb itself.
        let ret = unsafe { bpf_skb_change_head(self.skb.skb, len, 0) };
        helper_result(ret)
    }

    #[inline(always)]
    fn pop_after_eth(&mut self, len: u32) -> Result<(), PacketError> {
        // SAFETY: the helper checks the skb itself.
        let ret = unsafe { bpf_skb_adjust_room(self.skb.skb, -(len as i32), BPF_ADJ_ROOM_MAC, 0) };
        helper_result(ret)
    }

    #[inline(always)]
    fn truncate(&mut self, new_len: u32) -> Result<(), PacketError> {
        // SAFETY: the helper checks the new length itself.
        let ret = unsafe { bpf_skb_change_tail(self.skb.skb, new_len, 0) };
        helper_result(ret)
    }
}

/// A helper's return code as a result: 0 is success.
#[inline(always)]
fn helper_result(ret: i64) -> Result<(), PacketError> {
    if ret == 0 {
        Ok(())
    } else {
        Err(PacketError)
    }
}

/// Makes the first `len` bytes of a TC packet directly accessible.
#[inline(always)]
pub fn tc_pull(ctx: &TcContext, len: u32) {
    let linear = (TcContext::data_end(ctx) - TcContext::data(ctx)) as u32;
    if linear < len {
        let want = if ctx.len() < len { ctx.len() } else { len };
        // SAFETY: the helper checks `want` against the skb. A failure leaves
        // the packet as it was, and the parser then passes it as too short.
        unsafe { bpf_skb_pull_data(ctx.skb.skb, want) };
    }
}
