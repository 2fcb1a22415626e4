//! What a program run knows besides the bytes of a packet: the node's
//! config and the time, each looked up at most once per run, and for a
//! packet, the hook it arrived on and its length.
//!
//! Stages take these from the caller instead of asking the kernel again
//! (four stages looked up the config map, and XDP asked for the frame
//! length up to three times a packet). [`Env`] holds nothing about
//! packets, so the packet-free stages (frontend, select, conntrack) can be
//! called by a program that has none.

use core::cell::Cell;

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::Config;

use crate::maps::LB_CONFIG_V4;

/// The node's config and the time of this run.
pub struct Env {
    cfg: &'static Config,
    /// `bpf_ktime_get_ns` once asked; 0 until then (the monotonic clock is
    /// never 0 once the kernel runs programs).
    now: Cell<u64>,
}

impl Env {
    /// The environment of this run; `None` if the config map has no entry,
    /// which an array of one entry always has.
    #[inline(always)]
    pub fn load() -> Option<Self> {
        Some(Self {
            cfg: LB_CONFIG_V4.get(0)?,
            now: Cell::new(0),
        })
    }

    /// The node's settings.
    #[inline(always)]
    pub fn cfg(&self) -> &'static Config {
        self.cfg
    }

    /// The time of this run (`bpf_ktime_get_ns`), read on first use: a
    /// packet that no stage times (not for a Service) never pays for it.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        let now = self.now.get();
        if now != 0 {
            return now;
        }
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        self.now.set(now);
        now
    }
}

/// Where a program runs, which decides SNAT and how packets are forwarded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// XDP on a node's external interface.
    XdpNode,
    /// TC ingress on a node's external interface (XDP's slow path).
    TcNode,
    /// TC ingress on the host side of a pod interface.
    TcPod,
    /// TC egress on node and pod interfaces: only replies from this node's
    /// own address are translated there (see `pipeline::host_reply`).
    TcEgress,
}

impl Hook {
    /// Traffic from outside the cluster, which needs SNAT to reach a remote backend.
    #[inline(always)]
    pub fn is_external(self) -> bool {
        matches!(self, Hook::XdpNode | Hook::TcNode)
    }
}

/// One packet's run: the environment, the hook, and the packet's length as
/// it arrived (what the counters count).
pub struct Ctx {
    /// Config and time.
    pub env: Env,
    /// The program the packet runs through.
    pub hook: Hook,
    /// Length of the packet, whole (for TC including non-linear data).
    pub len: u32,
}
