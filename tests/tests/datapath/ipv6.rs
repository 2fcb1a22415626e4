//! IPv6 through the same programs as IPv4: translation, reverse
//! translation, extension headers, fragments, hop limit, refusals and
//! ICMPv6 errors, exact bytes out.

use std::net::{Ipv6Addr, SocketAddrV6};

use lb_common::dsr::SHIM_MAGIC;

use lb_agent::{
    datapath::programs::TestProgram::{TcNode, TcPod, XdpNode, XdpPass},
    model::{FrontendKind::*, Protocol},
};
use lb_tests::{
    fixture::{counter, in_private_netns, service, Datapath},
    packet::{flags, icmp6_error, ipv6_frame, verify_checksums6, Ext, Packet6, L4, MAC_A, MAC_B},
};

use super::{bounce, drop_verdict, pass, snat_port, ALL, TC_ACT_REDIRECT, XDP_PASS};

fn addr6(s: &str) -> SocketAddrV6 {
    s.parse().expect("test address")
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().expect("test address")
}

/// The IPv6 twin of the IPv4 fixture: one ClusterIP per protocol with a
/// single local backend, a NodePort, and Services without endpoints.
fn seeded6() -> Datapath {
    let mut dp = Datapath::new();
    dp.apply(&[
        service(
            "web6",
            Protocol::Tcp,
            &[
                ("fd00:96::10", 80, ClusterIp),
                ("fd00:99::1", 30080, NodePort),
            ],
            &[("fd00:244:1::10", 8080, true)],
        ),
        service(
            "dns6",
            Protocol::Udp,
            &[("fd00:96::53", 53, ClusterIp)],
            &[("fd00:244:1::11", 5353, true)],
        ),
        service(
            "empty6",
            Protocol::Tcp,
            &[("fd00:96::99", 80, ClusterIp)],
            &[],
        ),
        service(
            "empty6-udp",
            Protocol::Udp,
            &[("fd00:96::99", 53, ClusterIp)],
            &[],
        ),
    ]);
    dp
}

/// A TCP SYN behind `ext`.
fn syn_with(src: SocketAddrV6, dst: SocketAddrV6, ext: Vec<Ext>) -> Packet6 {
    let mut p = Packet6::tcp(src, dst, flags::SYN, b"");
    p.ext = ext;
    p
}

#[test]
fn new_ipv6_flows_are_translated_to_exact_bytes_with_valid_checksums() {
    let client = addr6("[fd00:244:2::20]:40000");
    let (web, dns) = (addr6("[fd00:96::10]:80"), addr6("[fd00:96::53]:53"));
    let (web_backend, dns_backend) = (
        addr6("[fd00:244:1::10]:8080"),
        addr6("[fd00:244:1::11]:5353"),
    );
    let cases = [
        (
            "TCP SYN",
            Packet6::tcp(client, web, flags::SYN, b""),
            web_backend,
        ),
        (
            "TCP with payload",
            Packet6::tcp(
                client,
                web,
                flags::ACK | flags::PSH,
                b"GET / HTTP/1.1\r\n\r\n",
            ),
            web_backend,
        ),
        ("UDP", Packet6::udp(client, dns, b"query"), dns_backend),
        (
            "hop-by-hop, routing and destination options before TCP",
            syn_with(
                client,
                web,
                vec![Ext::hop_by_hop(), Ext::routing(), Ext::dest_opts()],
            ),
            web_backend,
        ),
        (
            "four extension headers, the bound",
            syn_with(
                client,
                web,
                vec![
                    Ext::hop_by_hop(),
                    Ext::dest_opts(),
                    Ext::routing(),
                    Ext::dest_opts(),
                ],
            ),
            web_backend,
        ),
        (
            "NodePort to a local backend",
            Packet6::tcp(
                addr6("[fd00:99::100]:40000"),
                addr6("[fd00:99::1]:30080"),
                flags::SYN,
                b"",
            ),
            web_backend,
        ),
    ];
    for prog in ALL {
        for (name, input, backend) in &cases {
            let mut dp = seeded6();
            let (verdict, out) = dp.run(prog, &input.bytes());
            assert_eq!(verdict, pass(prog), "{name}: {prog:?} verdict");
            let want = input.with_addrs(input.src, *backend).bytes();
            assert_eq!(out, want, "{name}: {prog:?} output bytes");
            verify_checksums6(&out).unwrap_or_else(|e| panic!("{name}: {prog:?}: {e}"));
            assert_eq!(counter(&dp, "new_flow"), 1, "{name}: {prog:?}");
        }
    }
}

#[test]
fn ipv6_replies_are_reverse_translated_to_the_frontend() {
    for prog in [TcPod, XdpNode] {
        let mut dp = seeded6();
        let client = addr6("[fd00:244:2::20]:40001");
        let syn = Packet6::tcp(client, addr6("[fd00:96::10]:80"), flags::SYN, b"");
        assert_eq!(dp.run(prog, &syn.bytes()).0, pass(prog));
        let synack = Packet6::tcp(
            addr6("[fd00:244:1::10]:8080"),
            client,
            flags::SYN | flags::ACK,
            b"",
        );
        let (verdict, out) = dp.run(prog, &synack.bytes());
        assert_eq!(verdict, pass(prog), "{prog:?}");
        assert_eq!(
            out,
            synack.with_addrs(addr6("[fd00:96::10]:80"), client).bytes(),
            "{prog:?}"
        );
        verify_checksums6(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
        assert_eq!(counter(&dp, "ct_hit"), 1, "{prog:?}");
    }
}

#[test]
fn ipv6_with_more_extension_headers_than_the_bound_passes_untouched_and_counted() {
    let input = syn_with(
        addr6("[fd00:244:2::20]:40002"),
        addr6("[fd00:96::10]:80"),
        vec![
            Ext::hop_by_hop(),
            Ext::dest_opts(),
            Ext::routing(),
            Ext::dest_opts(),
            Ext::dest_opts(),
        ],
    )
    .bytes();
    for prog in ALL {
        let mut dp = seeded6();
        assert_eq!(
            dp.run(prog, &input),
            (pass(prog), input.clone()),
            "{prog:?}"
        );
        assert_eq!(counter(&dp, "pass_v6_ext_limit"), 1, "{prog:?}");
        assert_eq!(counter(&dp, "new_flow"), 0, "{prog:?}");
    }
}

#[test]
fn ndp_and_other_icmpv6_pass_untouched() {
    let pod = ip6("fd00:244:2::20");
    // Neighbour solicitation for the ClusterIP, and an echo request to it.
    let mut solicit = vec![135, 0, 0, 0, 0, 0, 0, 0];
    solicit.extend_from_slice(&ip6("fd00:96::10").octets());
    let solicit = ipv6_frame(
        (MAC_A, MAC_B),
        &pod,
        &ip6("ff02::1:ff00:10"),
        255,
        &[],
        58,
        &with_icmp6_checksum(&pod, &ip6("ff02::1:ff00:10"), solicit),
    );
    let echo = ipv6_frame(
        (MAC_A, MAC_B),
        &pod,
        &ip6("fd00:96::10"),
        64,
        &[],
        58,
        &with_icmp6_checksum(&pod, &ip6("fd00:96::10"), vec![128, 0, 0, 0, 0, 1, 0, 1]),
    );
    for prog in [XdpNode, TcNode, TcPod, XdpPass] {
        let mut dp = seeded6();
        for (name, input) in [
            ("neighbour solicitation", &solicit),
            ("echo request", &echo),
        ] {
            assert_eq!(
                dp.run(prog, input),
                (pass(prog), input.clone()),
                "{name}: {prog:?}"
            );
        }
    }
}

/// An ICMPv6 message with its checksum filled in.
fn with_icmp6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, mut msg: Vec<u8>) -> Vec<u8> {
    let c = lb_tests::packet::l4_checksum6(src, dst, 58, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    msg
}

#[test]
fn later_ipv6_fragments_follow_their_first_fragment() {
    let client = addr6("[fd00:244:2::20]:40100");
    let vip = addr6("[fd00:96::53]:53");
    let backend = addr6("[fd00:244:1::11]:5353");
    let payload: Vec<u8> = (0..200u8).collect();
    let datagram = |src, dst| Packet6::udp(src, dst, &payload);
    for prog in ALL {
        let mut dp = seeded6();
        // The whole datagram, translated and then cut the same way, is what
        // both fragments must become: the first fragment's UDP checksum
        // covers the whole datagram, so exact bytes prove it right.
        let (first, later) = datagram(client, vip).fragments(24, 0x4242_4242);
        let (want_first, want_later) = datagram(client, backend).fragments(24, 0x4242_4242);
        assert_eq!(dp.run(prog, &first), (pass(prog), want_first), "{prog:?}");
        assert_eq!(dp.run(prog, &later), (pass(prog), want_later), "{prog:?}");
        assert_eq!(counter(&dp, "frag_tracked"), 1, "{prog:?}");

        if prog != TcNode {
            let (r_first, r_later) = datagram(backend, client).fragments(24, 7);
            let (want_first, want_later) = datagram(vip, client).fragments(24, 7);
            assert_eq!(dp.run(prog, &r_first), (pass(prog), want_first), "{prog:?}");
            assert_eq!(dp.run(prog, &r_later), (pass(prog), want_later), "{prog:?}");
            assert_eq!(counter(&dp, "frag_tracked"), 2, "{prog:?}");
        }

        // Another identification: no first fragment was seen.
        let (_, orphan) = datagram(client, vip).fragments(24, 0x4242_4243);
        assert_eq!(
            dp.run(prog, &orphan),
            (pass(prog), orphan.clone()),
            "{prog:?}"
        );
        assert_eq!(counter(&dp, "frag_untracked"), 1, "{prog:?}");
    }
}

/// The IPv6 twin of the forwarding tests' namespace: this node's address
/// on `d0`, the backends' node (fd00:99::2) as the gateway to their pod
/// CIDR, and the client, neighbours known so that the FIB resolves them.
const ROUTED6: &[&[&str]] = &[
    &[
        "link",
        "add",
        "d0",
        "address",
        "02:00:00:00:00:d0",
        "type",
        "veth",
        "peer",
        "d1",
    ],
    &["link", "set", "d1", "up"],
    &["link", "set", "d0", "up"],
    &["-6", "addr", "add", "fd00:99::1/64", "dev", "d0", "nodad"],
    &["-6", "route", "add", "fd00:244:2::/64", "via", "fd00:99::2"],
    &[
        "-6",
        "neigh",
        "add",
        "fd00:99::2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        "d0",
        "nud",
        "permanent",
    ],
    &[
        "-6",
        "neigh",
        "add",
        "fd00:99::100",
        "lladdr",
        "02:00:00:00:00:64",
        "dev",
        "d0",
        "nud",
        "permanent",
    ],
];
const MAC_D0: [u8; 6] = [2, 0, 0, 0, 0, 0xd0];
const MAC_NODE_B: [u8; 6] = [2, 0, 0, 0, 0, 0x02];
const MAC_CLIENT: [u8; 6] = [2, 0, 0, 0, 0, 0x64];

/// An IPv6 NodePort whose only endpoint is on another node.
fn remote_nodeport6() -> Datapath {
    let mut dp = Datapath::new();
    dp.apply(&[service(
        "web6",
        Protocol::Tcp,
        &[("fd00:99::1", 30080, NodePort)],
        &[("fd00:244:2::10", 8080, false)],
    )]);
    dp
}

#[test]
fn an_ipv6_nodeport_to_a_remote_backend_is_snated_to_the_node_and_forwarded_by_fib() {
    in_private_netns(ROUTED6, || {
        let node = ip6(lb_tests::fixture::NODE_ADDR6);
        let front = addr6("[fd00:99::1]:30080");
        let backend = addr6("[fd00:244:2::10]:8080");
        let client = addr6("[fd00:99::100]:40320");
        let mut dp = remote_nodeport6();
        let syn = Packet6::tcp(client, front, flags::SYN, b"");
        // XDP cannot send out another interface: left to TC untouched.
        assert_eq!(
            dp.run(XdpNode, &syn.bytes()),
            (XDP_PASS, syn.bytes()),
            "left to TC untouched"
        );
        let (verdict, out) = dp.run(TcNode, &syn.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let snat = SocketAddrV6::new(node, snat_port(&dp), 0, 0);
        let mut want = syn.with_addrs(snat, backend);
        (want.hop_limit, want.src_mac, want.dst_mac) = (63, MAC_D0, MAC_NODE_B);
        assert_eq!(out, want.bytes(), "SNATed to the node, one hop less");
        verify_checksums6(&out).unwrap_or_else(|e| panic!("{e}"));

        let synack = Packet6::tcp(backend, snat, flags::SYN | flags::ACK, b"");
        let (verdict, out) = dp.run(TcNode, &synack.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let mut want = synack.with_addrs(front, client);
        (want.hop_limit, want.src_mac, want.dst_mac) = (63, MAC_D0, MAC_CLIENT);
        assert_eq!(out, want.bytes(), "the reply, from the NodePort");
        verify_checksums6(&out).unwrap_or_else(|e| panic!("{e}"));
    });
}

#[test]
fn an_ipv6_packet_that_would_leave_with_hop_limit_0_gets_time_exceeded_from_the_node() {
    let node = ip6(lb_tests::fixture::NODE_ADDR6);
    for prog in [XdpNode, TcNode] {
        let mut dp = remote_nodeport6();
        for (i, hops) in [1u8, 0].into_iter().enumerate() {
            let client = addr6(&format!("[fd00:99::100]:{}", 40300 + i));
            let mut syn = Packet6::tcp(client, addr6("[fd00:99::1]:30080"), flags::SYN, b"");
            syn.hop_limit = hops;
            let (verdict, out) = dp.run(prog, &syn.bytes());
            assert_eq!(verdict, bounce(prog), "{prog:?}: hop limit {hops}");
            assert_eq!(
                out,
                icmp6_error(node, *client.ip(), 3, 0, 0, &syn.bytes(), 8),
                "{prog:?}: hop limit {hops}"
            );
            verify_checksums6(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
        }
        assert_eq!(counter(&dp, "ttl_exceeded"), 2, "{prog:?}");
    }
}

/// The reset the datapath must answer `input` with: from `from` back to
/// the client, MACs swapped, no extension headers, with this sequence, ack
/// and flags.
fn expected_rst6(input: &Packet6, from: SocketAddrV6, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut rst = input.with_addrs(from, input.src);
    (rst.src_mac, rst.dst_mac, rst.hop_limit) = (MAC_B, MAC_A, 64);
    rst.ext.clear();
    rst.l4 = L4::Tcp {
        seq,
        ack,
        flags,
        window: 0,
        payload: Vec::new(),
    };
    rst.bytes()
}

#[test]
fn ipv6_tcp_to_a_service_without_endpoints_is_reset() {
    let front = addr6("[fd00:96::99]:80");
    for prog in ALL {
        let mut dp = seeded6();
        let client = addr6("[fd00:244:2::20]:40003");
        let mut syn = syn_with(client, front, vec![Ext::dest_opts()]);
        syn.l4 = L4::Tcp {
            seq: 777,
            ack: 0,
            flags: flags::SYN,
            window: 1000,
            payload: Vec::new(),
        };
        let (verdict, out) = dp.run(prog, &syn.bytes());
        assert_eq!(verdict, bounce(prog), "{prog:?}");
        assert_eq!(
            out,
            expected_rst6(&syn, front, 0, 778, flags::RST | flags::ACK),
            "{prog:?}: RST bytes"
        );
        verify_checksums6(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));

        let ack = Packet6::tcp(client, front, flags::ACK, b"data");
        let (verdict, out) = dp.run(prog, &ack.bytes());
        assert_eq!(verdict, bounce(prog), "{prog:?}");
        assert_eq!(
            out,
            expected_rst6(&ack, front, 5000, 0, flags::RST),
            "{prog:?}: RST to an ACK"
        );

        let reset = Packet6::tcp(client, front, flags::RST, b"");
        assert_eq!(
            dp.run(prog, &reset.bytes()).0,
            drop_verdict(prog),
            "{prog:?}"
        );
        assert_eq!(counter(&dp, "reject_no_endpoint"), 2, "{prog:?}");
    }
}

#[test]
fn ipv6_udp_to_a_service_without_endpoints_gets_icmpv6_port_unreachable() {
    let front = addr6("[fd00:96::99]:53");
    for prog in ALL {
        let mut dp = seeded6();
        let client = addr6("[fd00:244:2::20]:40004");
        let dgram = Packet6::udp(client, front, b"is anyone there?").bytes();
        let (verdict, out) = dp.run(prog, &dgram);
        assert_eq!(verdict, bounce(prog), "{prog:?}");
        assert_eq!(
            out,
            icmp6_error(*front.ip(), *client.ip(), 1, 4, 0, &dgram, 8),
            "{prog:?}: port unreachable from the frontend, quoting the header and 8 bytes"
        );
        verify_checksums6(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
    }
}

#[test]
fn ipv6_source_ranges_admit_only_their_sources() {
    let mut dp = Datapath::new();
    let (r, mut sp) = service(
        "web6",
        Protocol::Tcp,
        &[("fd00:203::10", 80, LoadBalancer)],
        &[("fd00:244:1::10", 8080, true)],
    );
    sp.source_ranges = vec![
        "fd00:99::100/128".parse().expect("cidr"),
        "fd00:42::/32".parse().expect("cidr"),
    ];
    dp.apply(&[(r, sp)]);
    let verdict = |dp: &mut Datapath, from: &str| {
        let syn = Packet6::tcp(addr6(from), addr6("[fd00:203::10]:80"), flags::SYN, b"");
        dp.run(XdpNode, &syn.bytes()).0
    };
    assert_eq!(
        verdict(&mut dp, "[fd00:99::100]:40000"),
        XDP_PASS,
        "a /128 admits its address"
    );
    assert_eq!(
        verdict(&mut dp, "[fd00:42:1::9]:40000"),
        XDP_PASS,
        "a /32 admits its network"
    );
    assert_eq!(
        verdict(&mut dp, "[fd00:99::101]:40000"),
        drop_verdict(XdpNode),
        "others are dropped"
    );
    assert_eq!(counter(&dp, "drop_source_range"), 1);
}

#[test]
fn icmpv6_errors_about_translated_flows_quote_what_the_sender_sent() {
    let router = ip6("fd00:99::fe");
    // A pod's flow to a ClusterIP; a router on the way to the backend says
    // "packet too big" to the pod about the translated packet.
    let mut dp = seeded6();
    let client = addr6("[fd00:244:2::20]:40020");
    let big = Packet6::tcp(client, addr6("[fd00:96::10]:80"), flags::ACK, &[0u8; 64]);
    dp.run(TcPod, &big.bytes());
    let translated = big
        .with_addrs(client, addr6("[fd00:244:1::10]:8080"))
        .bytes();
    let err = icmp6_error(router, *client.ip(), 2, 0, 1280, &translated, 8);
    for prog in [XdpNode, TcNode] {
        let (verdict, out) = dp.run(prog, &err);
        assert_eq!(verdict, pass(prog), "{prog:?}");
        assert_eq!(
            out,
            icmp6_error(router, *client.ip(), 2, 0, 1280, &big.bytes(), 8),
            "{prog:?}: quotes the ClusterIP"
        );
        verify_checksums6(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
    }

    // After SNAT the error comes to the node; it goes on to the client
    // (its destination changes: the pseudo-header's part of the checksum).
    let outside = addr6("[fd00:99::100]:40021");
    let syn = Packet6::tcp(outside, addr6("[fd00:99::1]:30080"), flags::SYN, b"");
    let mut dp = remote_nodeport6();
    dp.run(XdpNode, &syn.bytes());
    let node = ip6(lb_tests::fixture::NODE_ADDR6);
    let sent = syn
        .with_addrs(
            SocketAddrV6::new(node, snat_port(&dp), 0, 0),
            addr6("[fd00:244:2::10]:8080"),
        )
        .bytes();
    for (kind, code) in [(3, 0), (1, 3)] {
        let err = icmp6_error(router, node, kind, code, 0, &sent, 8);
        let (verdict, out) = dp.run(XdpNode, &err);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(
            out,
            icmp6_error(router, *outside.ip(), kind, code, 0, &syn.bytes(), 8),
            "type {kind}: to the client, quoting its own packet"
        );
        verify_checksums6(&out).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(counter(&dp, "icmp_error"), 2);

    // An error about a flow nobody translated passes untouched.
    let other = Packet6::udp(client, addr6("[fd00:244:1::99]:53"), b"q").bytes();
    let err = icmp6_error(router, *client.ip(), 1, 4, 0, &other, 8);
    assert_eq!(dp.run(XdpNode, &err), (XDP_PASS, err.clone()));
}

/// [`ROUTED6`] with a 1400-byte MTU on `d0`: a 1360-byte packet fits, but
/// not once wrapped for DSR (64 bytes more).
fn routed6_mtu_1400() -> Vec<&'static [&'static str]> {
    let mut setup = ROUTED6.to_vec();
    setup.push(&["link", "set", "d0", "mtu", "1400"]);
    setup
}

/// The backends' node in [`ROUTED6`], where DSR wraps go.
const NODE_B6: &str = "fd00:99::2";

#[test]
fn an_ipv6_dsr_flow_is_wrapped_in_ipv6_to_the_backends_node_with_one_hop_less_inside() {
    use lb_tests::packet::dsr_wrap;
    in_private_netns(ROUTED6, || {
        let node = ip6(lb_tests::fixture::NODE_ADDR6);
        let front = addr6("[fd00:99::1]:30080");
        let backend = addr6("[fd00:244:2::10]:8080");
        let client = addr6("[fd00:99::100]:40330");
        let mut dp = remote_nodeport6();
        dp.set_config_flags(lb_common::config::CONFIG_F_DSR);
        for (i, syn) in [
            Packet6::tcp(client, front, flags::SYN, b""),
            syn_with(addr6("[fd00:99::100]:40331"), front, vec![Ext::dest_opts()]),
        ]
        .into_iter()
        .enumerate()
        {
            // XDP cannot send out another interface: left to TC untouched.
            assert_eq!(
                dp.run(XdpNode, &syn.bytes()),
                (XDP_PASS, syn.bytes()),
                "{i}: left to TC"
            );
            let (verdict, out) = dp.run(TcNode, &syn.bytes());
            assert_eq!(verdict, TC_ACT_REDIRECT, "{i}");
            let mut inner = syn.clone();
            inner.hop_limit = 63;
            let mut want = dsr_wrap(&inner.bytes(), node, ip6(NODE_B6), backend, SHIM_MAGIC);
            want[..6].copy_from_slice(&MAC_NODE_B);
            want[6..12].copy_from_slice(&MAC_D0);
            assert_eq!(out, want, "{i}: wrapped in IPv6 to the backend's node");
            assert_eq!(counter(&dp, "dsr_encap"), i as u64 + 1);
        }
        // Not SNATed: no reply entry, and no SNAT port held.
        assert_eq!(counter(&dp, "new_flow"), 2);
        assert!(
            dp.maps
                .ct_embryo
                .iter()
                .map(|e| e.expect("conntrack").1)
                .all(|v| v.flags & lb_common::conntrack::CT_F_DSR != 0),
            "only DSR forward entries"
        );
    });
}

#[test]
fn an_ipv6_packet_too_big_once_wrapped_gets_packet_too_big_with_the_mtu_less_the_wrap() {
    let setup = routed6_mtu_1400();
    in_private_netns(&setup, || {
        let front = addr6("[fd00:99::1]:30080");
        let client = addr6("[fd00:99::100]:40340");
        for prog in [XdpNode, TcNode] {
            let mut dp = remote_nodeport6();
            dp.set_config_flags(lb_common::config::CONFIG_F_DSR);
            // 1360 bytes of IPv6: fits the link, not the wrap.
            let big = Packet6::tcp(client, front, flags::ACK, &[7u8; 1300]);
            assert_eq!(big.bytes().len() - 14, 1360);
            let (verdict, out) = dp.run(prog, &big.bytes());
            assert_eq!(verdict, bounce(prog), "{prog:?}");
            let mtu = 1400 - lb_common::dsr::ENCAP_LEN_V6 as u32;
            assert_eq!(
                out,
                icmp6_error(*front.ip(), *client.ip(), 2, 0, mtu, &big.bytes(), 8),
                "{prog:?}: packet too big from the frontend, MTU less the wrap"
            );
            verify_checksums6(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
            assert_eq!(counter(&dp, "dsr_too_big"), 1, "{prog:?}");
            assert_eq!(counter(&dp, "dsr_encap"), 0, "{prog:?}");
        }
    });
}

#[test]
fn ipv6_wrapped_packets_from_a_peer_are_unwrapped_and_the_backends_replies_go_to_the_client() {
    use lb_tests::packet::dsr_wrap;
    in_private_netns(ROUTED6, || {
        let this_node = ip6(lb_tests::fixture::NODE_ADDR6);
        let other_node = ip6(NODE_B6);
        // Another node's NodePort; the backend is on this node.
        let front = addr6("[fd00:99::2]:30080");
        let backend = addr6("[fd00:244:1::10]:8080");
        let client = addr6("[fd00:99::100]:40350");
        let syn = Packet6::tcp(client, front, flags::SYN, b"");
        let wrapped = dsr_wrap(&syn.bytes(), other_node, this_node, backend, SHIM_MAGIC);
        let elsewhere = dsr_wrap(&syn.bytes(), this_node, other_node, backend, SHIM_MAGIC);
        let bad_magic = dsr_wrap(&syn.bytes(), other_node, this_node, backend, 0);
        for prog in [XdpNode, TcNode] {
            let mut dp = seeded6();
            // A forged wrap: no peer is known yet.
            assert_eq!(dp.run(prog, &wrapped).0, drop_verdict(prog), "{prog:?}");
            assert_eq!(counter(&dp, "drop_dsr_peer"), 1, "{prog:?}");
            let peers = ["fd00:99::2/127".parse().expect("cidr")];
            dp.maps.set_dsr_peers(&peers).expect("write DSR peers");
            let (verdict, out) = dp.run(prog, &wrapped);
            assert_eq!(verdict, pass(prog), "{prog:?}");
            assert_eq!(
                out,
                syn.with_addrs(client, backend).bytes(),
                "{prog:?}: unwrapped and sent to the backend"
            );
            verify_checksums6(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
            assert_eq!(counter(&dp, "dsr_decap"), 1, "{prog:?}");
            for (name, input) in [("not for this node", &elsewhere), ("bad shim", &bad_magic)] {
                assert_eq!(
                    dp.run(prog, input),
                    (pass(prog), input.clone()),
                    "{prog:?}: {name} passes untouched"
                );
            }

            // The backend's answer, leaving its pod: from the frontend,
            // straight to the client by FIB, one hop less.
            let synack = Packet6::tcp(backend, client, flags::SYN | flags::ACK, b"");
            let (verdict, out) = dp.run(TcPod, &synack.bytes());
            assert_eq!(verdict, TC_ACT_REDIRECT, "{prog:?}");
            let mut want = synack.with_addrs(front, client);
            (want.hop_limit, want.src_mac, want.dst_mac) = (63, MAC_D0, MAC_CLIENT);
            assert_eq!(out, want.bytes(), "{prog:?}: the reply, from the frontend");
            verify_checksums6(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));

            // A peer network that no longer holds the sender: dropped again.
            let peers = ["fd00:99::4/126".parse().expect("cidr")];
            dp.maps.set_dsr_peers(&peers).expect("write DSR peers");
            assert_eq!(dp.run(prog, &wrapped).0, drop_verdict(prog), "{prog:?}");
            assert_eq!(counter(&dp, "drop_dsr_peer"), 2, "{prog:?}");
        }
    });
}

#[test]
fn ipv6_sctp_flows_and_replies_are_translated_with_their_crc32c_updated() {
    use lb_tests::packet::sctp_chunk;
    let sctp6 = || {
        let mut dp = Datapath::new();
        dp.apply(&[service(
            "sig6",
            Protocol::Sctp,
            &[
                ("fd00:96::40", 3868, ClusterIp),
                ("fd00:99::1", 30868, NodePort),
            ],
            &[("fd00:244:1::12", 3869, true)],
        )]);
        dp
    };
    let data = |src, dst, n: usize| {
        let mut value = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        value.extend((0..n).map(|i| (i * 7 + 3) as u8));
        Packet6::sctp(src, dst, 7, sctp_chunk::DATA, &value)
    };
    let backend = addr6("[fd00:244:1::12]:3869");
    for prog in ALL {
        let client = if prog == TcPod {
            addr6("[fd00:244:2::20]:40000")
        } else {
            addr6("[fd00:99::100]:40000")
        };
        for front in [addr6("[fd00:96::40]:3868"), addr6("[fd00:99::1]:30868")] {
            let mut behind_ext = data(client, front, 300);
            behind_ext.ext = vec![Ext::hop_by_hop(), Ext::dest_opts()];
            for (name, input) in [
                ("INIT", Packet6::sctp_init(client, front, 0x0a0b_0c0d)),
                ("long DATA", data(client, front, 1300)),
                ("DATA behind extension headers", behind_ext),
            ] {
                let mut dp = sctp6();
                let (verdict, out) = dp.run(prog, &input.bytes());
                assert_eq!(verdict, pass(prog), "{name} to {front}: {prog:?}");
                // The builder computes the whole CRC32c afresh.
                assert_eq!(
                    out,
                    input.with_addrs(client, backend).bytes(),
                    "{name} to {front}: {prog:?}"
                );
                verify_checksums6(&out).unwrap_or_else(|e| panic!("{name}: {prog:?}: {e}"));
            }
        }
    }
    // Replies, as the IPv4 reply test runs them: from a pod client.
    for prog in [TcPod, XdpNode] {
        let mut dp = sctp6();
        let client = addr6("[fd00:244:2::20]:40001");
        let front = addr6("[fd00:96::40]:3868");
        let init = Packet6::sctp_init(client, front, 1);
        assert_eq!(dp.run(prog, &init.bytes()).0, pass(prog), "{prog:?}");
        for (name, reply) in [
            (
                "INIT ACK",
                Packet6::sctp(backend, client, 1, sctp_chunk::INIT_ACK, &[0; 20]),
            ),
            ("long DATA", data(backend, client, 900)),
        ] {
            let (verdict, out) = dp.run(prog, &reply.bytes());
            assert_eq!(verdict, pass(prog), "{name}: {prog:?}");
            assert_eq!(
                out,
                reply.with_addrs(front, client).bytes(),
                "{name}: {prog:?}"
            );
            verify_checksums6(&out).unwrap_or_else(|e| panic!("{name}: {prog:?}: {e}"));
        }
    }
}
