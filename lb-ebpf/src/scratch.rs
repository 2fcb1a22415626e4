//! Per-CPU room for a run's large temporaries.
//!
//! 6.1's verifier allows a program 512 bytes of stack, and one inlined
//! frame holds everything live at once. What is big and lives long (the
//! flow's tuple, its conntrack entry, a new flow's reply entry) lives in
//! a per-CPU array slot instead: program runs on a CPU do not nest, and
//! nothing here outlives the run, so the slot is this run's alone
//! (`maps::LB_SCRATCH`; the pipeline takes it once per run and lends its
//! parts to the stages, which take them as plain references).

use lb_common::{CtValue, Tuple};

use crate::layout::Layout;

/// A conntrack entry being written: key and value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Entry {
    /// The key (a flow's tuple as the wire carries it).
    pub key: Tuple,
    /// The value.
    pub value: CtValue,
}

/// What a packet's run keeps off the stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    /// The packet's flow, as parsed (its conntrack key).
    pub tuple: Tuple,
    /// The flow's translation, as found or made.
    pub ct: CtValue,
    /// A second entry: the reply direction of a new flow, or a key to look
    /// up (an ICMP error's quoted flow, reversed).
    pub other: Entry,
    /// The packet's layout, as parsed: written here and read back (see
    /// `parse::settled`) so that the verifier, which does not track what
    /// map memory holds, goes on from the parse in one state instead of
    /// one per way through the IPv6 extension headers.
    pub layout: Layout,
}
