//! Outcomes: what happens to a packet ([`Verdict`]) and why ([`Reason`]).
//!
//! Stages report with these and never count or decide themselves: a stage
//! returns `Result<T, Reason>` (or a route), and the pipeline alone counts
//! the reason and turns it into a verdict.

use lb_common::stats;

use crate::packet::PacketError;

/// What the entry point should do with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the stack.
    Pass,
    /// Drop it; the reason was counted.
    Drop,
    /// Send it back out the interface it came from (a refusal).
    Bounce,
    /// Send it out `ifindex`; MACs are already written.
    Redirect(u32),
    /// Send it out `ifindex`, letting the kernel resolve the neighbour (TC only).
    RedirectNeigh(u32),
}

/// Why a packet got its verdict, or what happened to it on the way: one
/// variant per per-packet counter of `lb_common::stats`, named after it.
///
/// As a stage's `Err` it is a drop reason (`Drop…`, `BackendGone`,
/// `DsrTooBig`, `TtlExceeded`) or, for `XdpToTc`, a packet left untouched for TC.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A new flow was translated.
    NewFlow,
    /// A tracked flow was translated.
    CtHit,
    /// A new flow to a Service without endpoints was refused.
    RejectNoEndpoint,
    /// Not for a Service.
    PassNoService,
    /// Headers that could not be read whole.
    PassMalformed,
    /// A Service's table or backend was missing.
    DropNoBackend,
    /// No SNAT port was free.
    DropSnatExhausted,
    /// A conntrack entry could not be written.
    DropCtFull,
    /// A rewrite or a packet helper failed.
    DropRewrite,
    /// No route for a packet to forward.
    DropNoRoute,
    /// XDP left the packet to TC.
    XdpToTc,
    /// A protocol the datapath does not translate.
    PassUnsupported,
    /// A tracked flow's backend is gone.
    BackendGone,
    /// A Local-policy frontend without a local endpoint.
    DropNoLocalEndpoint,
    /// A source outside the Service's source ranges.
    DropSourceRange,
    /// An ICMP error about a translated flow was translated back.
    IcmpError,
    /// A later fragment followed its first fragment.
    FragTracked,
    /// A later fragment had no translated first fragment.
    FragUntracked,
    /// A DSR flow's packet was wrapped to its backend's node.
    DsrEncap,
    /// A DSR packet was unwrapped for a local backend.
    DsrDecap,
    /// A DSR packet too big for the path once wrapped.
    DsrTooBig,
    /// A packet to forward arrived with no hop left (TTL 1 or 0).
    TtlExceeded,
    /// A wrapped packet from an address that is not a node's.
    DropDsrPeer,
    /// IPv6 with more extension headers than the parser walks.
    PassV6ExtLimit,
}

impl Reason {
    /// The `lb_common::stats` index of this reason's counter: the one place
    /// reasons meet counter indices.
    #[inline(always)]
    pub const fn counter(self) -> u32 {
        match self {
            Reason::NewFlow => stats::NEW_FLOW,
            Reason::CtHit => stats::CT_HIT,
            Reason::RejectNoEndpoint => stats::REJECT_NO_ENDPOINT,
            Reason::PassNoService => stats::PASS_NO_SERVICE,
            Reason::PassMalformed => stats::PASS_MALFORMED,
            Reason::DropNoBackend => stats::DROP_NO_BACKEND,
            Reason::DropSnatExhausted => stats::DROP_SNAT_EXHAUSTED,
            Reason::DropCtFull => stats::DROP_CT_FULL,
            Reason::DropRewrite => stats::DROP_REWRITE,
            Reason::DropNoRoute => stats::DROP_NO_ROUTE,
            Reason::XdpToTc => stats::XDP_TO_TC,
            Reason::PassUnsupported => stats::PASS_UNSUPPORTED,
            Reason::BackendGone => stats::BACKEND_GONE,
            Reason::DropNoLocalEndpoint => stats::DROP_NO_LOCAL_ENDPOINT,
            Reason::DropSourceRange => stats::DROP_SOURCE_RANGE,
            Reason::IcmpError => stats::ICMP_ERROR,
            Reason::FragTracked => stats::FRAG_TRACKED,
            Reason::FragUntracked => stats::FRAG_UNTRACKED,
            Reason::DsrEncap => stats::DSR_ENCAP,
            Reason::DsrDecap => stats::DSR_DECAP,
            Reason::DsrTooBig => stats::DSR_TOO_BIG,
            Reason::TtlExceeded => stats::TTL_EXCEEDED,
            Reason::DropDsrPeer => stats::DROP_DSR_PEER,
            Reason::PassV6ExtLimit => stats::PASS_V6_EXT_LIMIT,
        }
    }
}

/// A failed packet access or helper means the packet cannot be translated
/// as it should: it is dropped as a failed rewrite.
impl From<PacketError> for Reason {
    #[inline(always)]
    fn from(_: PacketError) -> Self {
        Reason::DropRewrite
    }
}
