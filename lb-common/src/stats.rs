//! Datapath counters: a per-CPU array indexed by the constants below.
//!
//! The agent sums the CPUs; [`NAMES`] gives each index its name.

/// Packets translated on a new flow (a backend was chosen).
pub const NEW_FLOW: u32 = 0;
/// Packets translated through an existing conntrack entry.
pub const CT_HIT: u32 = 1;
/// New flows to a Service with no endpoint, answered with RST or ICMP.
pub const REJECT_NO_ENDPOINT: u32 = 2;
/// Packets passed because they were not for a Service.
pub const PASS_NO_SERVICE: u32 = 3;
/// Packets the parser could not read far enough (passed untouched).
pub const PASS_MALFORMED: u32 = 4;
/// A slot or backend the service record pointed to was missing (dropped).
pub const DROP_NO_BACKEND: u32 = 5;
/// No free SNAT port for a new flow (dropped).
pub const DROP_SNAT_EXHAUSTED: u32 = 6;
/// Conntrack insert failed (dropped).
pub const DROP_CT_FULL: u32 = 7;
/// A packet rewrite or helper call failed (dropped).
pub const DROP_REWRITE: u32 = 8;
/// FIB lookup found no route for a forwarded packet (dropped).
pub const DROP_NO_ROUTE: u32 = 9;
/// XDP could not finish (no neighbour entry) and left the packet to TC.
pub const XDP_TO_TC: u32 = 10;
/// Protocols the datapath does not translate (passed).
pub const PASS_UNSUPPORTED: u32 = 11;
/// A tracked flow whose backend was removed (TCP reset, UDP re-picked).
pub const BACKEND_GONE: u32 = 12;
/// A Local-policy frontend with no endpoint on this node (dropped).
pub const DROP_NO_LOCAL_ENDPOINT: u32 = 13;
/// A new flow from outside a Service's `loadBalancerSourceRanges` (dropped).
pub const DROP_SOURCE_RANGE: u32 = 14;
/// An ICMP error about a translated flow, translated back.
pub const ICMP_ERROR: u32 = 15;
/// Conntrack entries inserted under a new key (two per flow; a stale entry
/// overwritten in place is not counted). With [`CT_REMOVE`] and the map's
/// entry count this gives the LRU evictions: nothing else deletes entries
/// (the agent never does), so `evictions = inserts - removes - entries`.
pub const CT_INSERT: u32 = 16;
/// Conntrack entries the datapath deleted itself (idle timeout, backend gone,
/// an SNAT port given back).
pub const CT_REMOVE: u32 = 17;
/// A later fragment (IPv4 or IPv6) translated like its datagram's first fragment.
pub const FRAG_TRACKED: u32 = 18;
/// A later fragment (IPv4 or IPv6) with no translated first fragment (passed).
pub const FRAG_UNTRACKED: u32 = 19;
/// Packets of DSR flows encapsulated to their backend's node.
pub const DSR_ENCAP: u32 = 20;
/// Encapsulated packets unwrapped for a local backend.
pub const DSR_DECAP: u32 = 21;
/// DSR packets too big for the path once encapsulated: answered with ICMP
/// fragmentation needed when they carry DF, dropped otherwise.
pub const DSR_TOO_BIG: u32 = 22;
/// Packets to forward that arrived with TTL 1 or 0: answered with ICMP time
/// exceeded from the node, as a router does (a later fragment is dropped).
pub const TTL_EXCEEDED: u32 = 23;
/// Wrapped (DSR) packets from an address that is not one of the cluster's
/// nodes (dropped: they could inject any client's packet to any backend).
pub const DROP_DSR_PEER: u32 = 24;
/// Entries inserted under a new key into the embryonic conntrack map (two
/// per new flow). With [`CT_EMBRYO_REMOVE`] and that map's entry count this
/// gives its LRU evictions, as [`CT_INSERT`] does for the main map.
pub const CT_EMBRYO_INSERT: u32 = 25;
/// Embryonic entries the datapath deleted: moved to the main map when the
/// backend answered, timed out, or their backend gone.
pub const CT_EMBRYO_REMOVE: u32 = 26;
/// Flows established (their backend sent past the handshake, or their
/// client kept sending where no answer passes): their entries moved from
/// the embryonic map to the main one.
pub const CT_ESTABLISHED: u32 = 27;
/// IPv6 packets with more extension headers than the datapath walks
/// before the transport header (passed untouched).
pub const PASS_V6_EXT_LIMIT: u32 = 28;
/// Number of counters.
pub const COUNT: u32 = 29;

/// Counter names by index, as shown by `lb-agent stats` and metrics.
pub const NAMES: [&str; COUNT as usize] = [
    "new_flow",
    "ct_hit",
    "reject_no_endpoint",
    "pass_no_service",
    "pass_malformed",
    "drop_no_backend",
    "drop_snat_exhausted",
    "drop_ct_full",
    "drop_rewrite",
    "drop_no_route",
    "xdp_to_tc",
    "pass_unsupported",
    "backend_gone",
    "drop_no_local_endpoint",
    "drop_source_range",
    "icmp_error",
    "ct_insert",
    "ct_remove",
    "frag_tracked",
    "frag_untracked",
    "dsr_encap",
    "dsr_decap",
    "dsr_too_big",
    "ttl_exceeded",
    "drop_dsr_peer",
    "ct_embryo_insert",
    "ct_embryo_remove",
    "ct_established",
    "pass_v6_ext_limit",
];

/// Whether counter `idx` counts packets that were dropped (or refused), as
/// opposed to passed, translated or bookkeeping.
pub const fn is_drop(idx: u32) -> bool {
    matches!(
        idx,
        REJECT_NO_ENDPOINT
            | DROP_NO_BACKEND
            | DROP_SNAT_EXHAUSTED
            | DROP_CT_FULL
            | DROP_REWRITE
            | DROP_NO_ROUTE
            | DROP_NO_LOCAL_ENDPOINT
            | DROP_SOURCE_RANGE
            | DSR_TOO_BIG
            | TTL_EXCEEDED
            | DROP_DSR_PEER
    )
}

/// One counter: packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (whole frames).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

crate::pod!(Counter);

/// Counters of one Service port, indexed by its svc_id in the per-CPU
/// per-Service stats map.
///
/// A packet is counted once, where the datapath decides its fate: XDP does
/// not count a packet it leaves to TC. Both directions of a flow count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcCounters {
    /// Packets of the Service port's flows (both directions).
    pub packets: u64,
    /// Bytes of those packets (whole frames, as received).
    pub bytes: u64,
    /// Flows opened (a backend was chosen and tracked).
    pub new_flows: u64,
    /// Packets that reached no backend: dropped or refused (RST/ICMP).
    pub drops: u64,
}
const _: () = assert!(core::mem::size_of::<SvcCounters>() == 32);

crate::pod!(SvcCounters);
