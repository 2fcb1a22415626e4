//! Map and program names: the one place both sides take them from.
//!
//! A map whose key or value layout changes gets a new version suffix, so an
//! agent never reuses a pin of an older layout.

/// Frontends: [`crate::ServiceKey`] → [`crate::ServiceValue`].
pub const SERVICES: &str = "LB_SERVICES_V3";
/// Maglev tables, one flat array: element → [`crate::MaglevChunk`] (16
/// slots); each Service port's table is a region of it.
pub const MAGLEV: &str = "LB_MAGLEV_V2";
/// Backends, an array indexed by [`crate::BackendId`] → [`crate::Backend`];
/// an id that holds no backend is an all-zero entry (family 0). Version 1
/// was a hash map of the same key and value.
pub const BACKENDS: &str = "LB_BACKENDS_V2";
/// Connection tracking (LRU): [`crate::CtKey`] → [`crate::CtValue`].
pub const CONNTRACK: &str = "LB_CT_V1";
/// Embryonic connection tracking (LRU): flows whose backend has not
/// answered yet, [`crate::CtKey`] → [`crate::CtValue`], kept apart so that
/// they evict only each other.
pub const CT_EMBRYO: &str = "LB_CT_EMBRYO_V1";
/// Node settings: `u32` 0 → [`crate::Config`].
pub const CONFIG: &str = "LB_CONFIG_V4";
/// Per-CPU counters: `u32` → [`crate::stats::Counter`].
pub const STATS: &str = "LB_STATS_V8";
/// Per-CPU counters per Service port: `u32` svc_id → [`crate::stats::SvcCounters`].
/// Sized one above the services map, as ids start at 1.
pub const SVC_STATS: &str = "LB_SVC_STATS_V1";

/// ClientIP affinity (LRU): [`crate::AffinityKey`] → [`crate::AffinityValue`].
pub const AFFINITY: &str = "LB_AFFINITY_V1";
/// Source ranges (LPM trie): prefix + [`crate::SrcRange`] → `u32` 1.
pub const SRC_RANGES: &str = "LB_SRC_RANGES_V1";
/// First fragments' ports (LRU): [`crate::FragKey`] → [`crate::FragValue`].
pub const FRAGS: &str = "LB_FRAGS_V1";
/// Service port records: `u32` svc_id → [`crate::ServiceInfo`] (user space only).
pub const SVC_INFO: &str = "LB_SVC_INFO_V2";

/// Nodes whose DSR-wrapped packets are unwrapped (LPM trie):
/// [`crate::dsr::DsrPeer`] → `u32` 1.
pub const DSR_PEERS: &str = "LB_DSR_PEERS_V1";

/// Each interface's SNAT source address: [`crate::snat::IfaceAddrKey`] →
/// [`crate::snat::IfaceAddr`].
pub const IFACE_ADDRS: &str = "LB_IFACE_ADDRS_V1";
/// Where each backend's SNAT port search goes on (LRU):
/// [`crate::snat::SnatCursorKey`] → `u64`.
pub const SNAT_CURSORS: &str = "LB_SNAT_CURSORS_V1";

/// Scope of the socket hooks: `u32` 0 → [`crate::sock::SockConfig`].
pub const SOCK_CONFIG: &str = "LB_SOCK_CONFIG_V1";
/// Translated sockets (LRU): [`crate::sock::SockRevKey`] → [`crate::sock::SockRevValue`].
pub const SOCK_REV: &str = "LB_SOCK_REV_V1";
/// Per-CPU socket-hook counters: `u32` → `u64`, by `crate::sock::STAT_*`.
pub const SOCK_STATS: &str = "LB_SOCK_STATS_V1";

/// An SCTP packet's pending CRC32c update (per-CPU array, 0 →
/// [`crate::crc32c::Pending`]): the main programs record a port rewrite's
/// change here and tail-call [`PROG_XDP_SCTP_CRC`] or [`PROG_TC_SCTP_CRC`],
/// which apply it. Pinned, so that an older agent's programs and a newer
/// one's CRC programs meet in the same record during a restart's swap.
pub const SCTP_CRC: &str = "LB_SCTP_CRC_V1";
/// Program array (one slot) holding [`PROG_XDP_SCTP_CRC`], which
/// [`PROG_XDP_NODE`] tail-calls; filled by the agent. Pinned: the kernel
/// empties a program array when its last user reference goes.
pub const SCTP_CRC_XDP: &str = "LB_SCTP_CRC_XDP_V1";
/// Program array (one slot) holding [`PROG_TC_SCTP_CRC`], which the TC
/// programs tail-call; filled by the agent.
pub const SCTP_CRC_TC: &str = "LB_SCTP_CRC_TC_V1";

/// Default capacity of the services map.
pub const SERVICES_MAX: u32 = 65536;
/// Default capacity of the backends map: ids run from 1 to one below it.
pub const BACKENDS_MAX: u32 = 65536;
/// Default capacity of the affinity map.
pub const AFFINITY_MAX: u32 = 65536;
/// Default capacity of the source-range map.
pub const SRC_RANGES_MAX: u32 = 16384;
/// Default capacity of the fragment map (datagrams in flight at once).
pub const FRAGS_MAX: u32 = 8192;
/// Default capacity of the conntrack map.
pub const CONNTRACK_MAX: u32 = 262_144;
/// Default capacity of the embryonic conntrack map.
pub const CT_EMBRYO_MAX: u32 = 65_536;

/// Every map the programs declare, for loaders and layout checks.
pub const ALL: [&str; 21] = [
    SERVICES,
    MAGLEV,
    BACKENDS,
    CONNTRACK,
    AFFINITY,
    SRC_RANGES,
    CONFIG,
    STATS,
    SVC_INFO,
    SVC_STATS,
    FRAGS,
    SOCK_CONFIG,
    SOCK_REV,
    SOCK_STATS,
    DSR_PEERS,
    CT_EMBRYO,
    IFACE_ADDRS,
    SNAT_CURSORS,
    SCTP_CRC,
    SCTP_CRC_XDP,
    SCTP_CRC_TC,
];

/// The XDP program on the node's external interfaces.
pub const PROG_XDP_NODE: &str = "lb_xdp_node";
/// An XDP program that only passes (benchmark baseline, test rig veth peers).
pub const PROG_XDP_PASS: &str = "lb_xdp_pass";
/// The TC ingress program on the node's external interfaces.
pub const PROG_TC_NODE: &str = "lb_tc_node";
/// The TC ingress program on the host side of pod interfaces.
pub const PROG_TC_POD: &str = "lb_tc_pod";
/// TC egress on node and pod interfaces: replies of flows whose backend is
/// this node itself.
pub const PROG_TC_EGRESS: &str = "lb_tc_egress";
/// XDP's SCTP checksum update, reached by tail call through
/// [`SCTP_CRC_XDP`] when a port of an SCTP packet was rewritten.
pub const PROG_XDP_SCTP_CRC: &str = "lb_xdp_sctp_crc";
/// TC's SCTP checksum update, reached by tail call through [`SCTP_CRC_TC`].
pub const PROG_TC_SCTP_CRC: &str = "lb_tc_sctp_crc";
/// Never attached: the socket hooks' decision over a
/// [`crate::sock::TraceRequest`] frame, for `lb-agent trace --socket`.
pub const PROG_SOCK_TRACE: &str = "lb_sock_trace";
/// The cgroup hook translating `connect()` of the node's IPv4 sockets.
pub const PROG_SOCK_CONNECT4: &str = "lb_sock_connect4";
/// The cgroup hook translating unconnected IPv4 UDP `sendmsg()`.
pub const PROG_SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
/// The cgroup hook showing the frontend as an IPv4 UDP reply's source.
pub const PROG_SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
/// The cgroup hook showing the frontend as a connected IPv4 socket's peer.
pub const PROG_SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";
/// The cgroup hook translating an IPv6 socket's `connect`.
pub const PROG_SOCK_CONNECT6: &str = "lb_sock_connect6";
/// The cgroup hook translating each datagram of an unconnected IPv6 socket.
pub const PROG_SOCK_SENDMSG6: &str = "lb_sock_sendmsg6";
/// The cgroup hook showing the frontend as an IPv6 UDP reply's source.
pub const PROG_SOCK_RECVMSG6: &str = "lb_sock_recvmsg6";
/// The cgroup hook showing the frontend as a connected IPv6 socket's peer.
pub const PROG_SOCK_GETPEERNAME6: &str = "lb_sock_getpeername6";
