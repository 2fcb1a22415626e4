//! BPF_PROG_TEST_RUN tests: hand-built packets through the real programs,
//! maps seeded with the agent's own reconciler, exact bytes out.
//!
//! Needs root (loads BPF programs). Run through `cargo xtask test`.

use std::net::SocketAddrV4;

use lb_agent::{
    datapath::programs::TestProgram::{self, TcEgress, TcNode, TcPod, XdpNode, XdpPass},
    model::{FrontendKind::*, Protocol},
};
use lb_tests::{
    fixture::{counter, service, service_counters, Datapath},
    packet::{flags, fragment, sctp_chunk, verify_checksums, Packet, L4, MAC_A, MAC_B},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const ALL: [TestProgram; 3] = [XdpNode, TcNode, TcPod];

// IPv6 through the same programs, with these fixtures.
#[path = "datapath/ipv6.rs"]
mod ipv6;

fn addr(s: &str) -> SocketAddrV4 {
    s.parse().expect("test address")
}

fn pass(p: TestProgram) -> u32 {
    if matches!(p, XdpNode | XdpPass) {
        XDP_PASS
    } else {
        TC_ACT_OK
    }
}

fn drop_verdict(p: TestProgram) -> u32 {
    if p == XdpNode {
        XDP_DROP
    } else {
        TC_ACT_SHOT
    }
}

fn bounce(p: TestProgram) -> u32 {
    if p == XdpNode {
        XDP_TX
    } else {
        TC_ACT_REDIRECT
    }
}

/// One ClusterIP per protocol with a single local backend, so the expected
/// translation is exact, plus a NodePort and a Service with no endpoint.
fn seeded() -> Datapath {
    let mut dp = Datapath::new();
    dp.apply(&[
        service(
            "web",
            Protocol::Tcp,
            &[
                ("10.96.0.10", 80, ClusterIp),
                ("10.99.0.1", 30080, NodePort),
            ],
            &[("10.244.1.10", 8080, true)],
        ),
        service(
            "dns",
            Protocol::Udp,
            &[("10.96.0.53", 53, ClusterIp)],
            &[("10.244.1.11", 5353, true)],
        ),
        service(
            "empty",
            Protocol::Tcp,
            &[("10.96.0.99", 80, ClusterIp)],
            &[],
        ),
        service(
            "empty-udp",
            Protocol::Udp,
            &[("10.96.0.99", 53, ClusterIp)],
            &[],
        ),
    ]);
    dp
}

/// A TCP ClusterIP and a UDP one whose endpoints are the same pod.
fn web_and_dns() -> (
    (
        lb_agent::model::ServicePortRef,
        lb_agent::model::ServicePort,
    ),
    (
        lb_agent::model::ServicePortRef,
        lb_agent::model::ServicePort,
    ),
) {
    let web = service(
        "web",
        Protocol::Tcp,
        &[("10.96.0.10", 80, ClusterIp)],
        &[("10.244.1.10", 8080, true)],
    );
    let dns = service(
        "dns",
        Protocol::Udp,
        &[("10.96.0.53", 53, ClusterIp)],
        &[("10.244.1.10", 5353, true)],
    );
    (web, dns)
}

/// The reset the datapath must answer `input` with: from the frontend `from`
/// back to the client, MACs swapped, with this sequence, ack and flags.
fn expected_rst(input: &Packet, from: SocketAddrV4, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut rst = input.with_addrs(from, input.src);
    rst.src_mac = MAC_B;
    rst.dst_mac = MAC_A;
    rst.l4 = L4::Tcp {
        seq,
        ack,
        flags,
        window: 0,
        payload: Vec::new(),
    };
    rst.bytes()
}

struct Translation {
    name: &'static str,
    input: Packet,
    /// Where the destination must be rewritten to.
    backend: SocketAddrV4,
}

fn translations() -> Vec<Translation> {
    let client = addr("10.244.2.20:40000");
    let mut with_options = Packet::tcp(client, addr("10.96.0.10:80"), flags::SYN, b"");
    with_options.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL: IHL 6
    let mut no_csum = Packet::udp(client, addr("10.96.0.53:53"), b"query");
    no_csum.l4 = L4::Udp {
        payload: b"query".to_vec(),
        no_checksum: true,
    };
    vec![
        Translation {
            name: "ClusterIP TCP SYN",
            input: Packet::tcp(client, addr("10.96.0.10:80"), flags::SYN, b""),
            backend: addr("10.244.1.10:8080"),
        },
        Translation {
            name: "ClusterIP TCP with payload",
            input: Packet::tcp(
                client,
                addr("10.96.0.10:80"),
                flags::ACK | flags::PSH,
                b"GET / HTTP/1.1\r\n\r\n",
            ),
            backend: addr("10.244.1.10:8080"),
        },
        Translation {
            name: "ClusterIP UDP",
            input: Packet::udp(client, addr("10.96.0.53:53"), b"query"),
            backend: addr("10.244.1.11:5353"),
        },
        Translation {
            name: "UDP without checksum keeps none",
            input: no_csum,
            backend: addr("10.244.1.11:5353"),
        },
        Translation {
            name: "IP options honoured",
            input: with_options,
            backend: addr("10.244.1.10:8080"),
        },
        Translation {
            name: "NodePort to a local backend",
            input: Packet::tcp(
                addr("10.99.0.100:40000"),
                addr("10.99.0.1:30080"),
                flags::SYN,
                b"",
            ),
            backend: addr("10.244.1.10:8080"),
        },
    ]
}

#[test]
fn new_flows_are_translated_to_exact_bytes_with_valid_checksums() {
    for prog in ALL {
        for t in translations() {
            let mut dp = seeded();
            let (verdict, out) = dp.run(prog, &t.input.bytes());
            assert_eq!(verdict, pass(prog), "{}: {prog:?} verdict", t.name);
            let want = t.input.with_addrs(t.input.src, t.backend).bytes();
            assert_eq!(out, want, "{}: {prog:?} output bytes", t.name);
            verify_checksums(&out).unwrap_or_else(|e| panic!("{}: {prog:?}: {e}", t.name));
        }
    }
}

#[test]
fn replies_are_reverse_translated_to_the_frontend() {
    for prog in [TcPod, XdpNode] {
        let mut dp = seeded();
        let client = addr("10.244.2.20:40001");
        let syn = Packet::tcp(client, addr("10.96.0.10:80"), flags::SYN, b"");
        assert_eq!(dp.run(prog, &syn.bytes()).0, pass(prog));
        let synack = Packet::tcp(
            addr("10.244.1.10:8080"),
            client,
            flags::SYN | flags::ACK,
            b"",
        );
        let (verdict, out) = dp.run(prog, &synack.bytes());
        assert_eq!(verdict, pass(prog), "{prog:?}");
        assert_eq!(
            out,
            synack.with_addrs(addr("10.96.0.10:80"), client).bytes(),
            "{prog:?}"
        );
    }
}

/// A backend that is this node itself (a hostNetwork endpoint) answers
/// through the stack, past every ingress hook: egress translates its
/// replies back, and passes everything else untouched.
#[test]
fn egress_translates_back_only_the_replies_of_backends_on_the_node_itself() {
    let mut dp = Datapath::new();
    dp.apply(&[service(
        "host",
        Protocol::Tcp,
        &[("10.96.0.90", 90, ClusterIp)],
        &[("10.99.0.1", 9090, true)],
    )]);
    let client = addr("10.244.1.20:40000");
    let node_backend = addr("10.99.0.1:9090");
    let syn = Packet::tcp(client, addr("10.96.0.90:90"), flags::SYN, b"");
    let (verdict, out) = dp.run(TcPod, &syn.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, syn.with_addrs(client, node_backend).bytes());

    let synack = Packet::tcp(node_backend, client, flags::SYN | flags::ACK, b"");
    let (verdict, out) = dp.run(TcEgress, &synack.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        synack.with_addrs(addr("10.96.0.90:90"), client).bytes(),
        "the reply leaves from the frontend"
    );
    verify_checksums(&out).expect("checksums of the translated reply");
    let hits = counter(&dp, "ct_hit");

    for (what, p) in [
        (
            "the node's own untranslated traffic",
            Packet::tcp(addr("10.99.0.1:9091"), client, flags::ACK, b"x"),
        ),
        (
            "a pod's reply forwarded to another pod",
            Packet::tcp(addr("10.244.1.10:8080"), client, flags::ACK, b""),
        ),
    ] {
        let (verdict, out) = dp.run(TcEgress, &p.bytes());
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(out, p.bytes(), "{what} passes untouched");
    }
    assert_eq!(
        counter(&dp, "ct_hit"),
        hits,
        "egress counts only translations"
    );
}

/// One client address and port reaching two Services that share a backend:
/// both flows would have the same reply tuple, so the second gets another
/// source port, and each reply is translated to its own frontend.
#[test]
fn flows_whose_replies_would_clash_get_a_port_of_their_own() {
    for prog in [TcPod, XdpNode] {
        let mut dp = Datapath::new();
        let backend = addr("10.244.1.10:8080");
        dp.apply(&[
            service(
                "a",
                Protocol::Tcp,
                &[("10.96.0.10", 80, ClusterIp)],
                &[("10.244.1.10", 8080, true)],
            ),
            service(
                "b",
                Protocol::Tcp,
                &[("10.96.0.20", 80, ClusterIp)],
                &[("10.244.1.10", 8080, true)],
            ),
        ]);
        let client = addr("10.244.2.20:40001");
        let (front_a, front_b) = (addr("10.96.0.10:80"), addr("10.96.0.20:80"));
        let syn_a = Packet::tcp(client, front_a, flags::SYN, b"");
        let (verdict, out) = dp.run(prog, &syn_a.bytes());
        assert_eq!(verdict, pass(prog), "{prog:?}");
        assert_eq!(out, syn_a.with_addrs(client, backend).bytes(), "{prog:?}");

        let syn_b = Packet::tcp(client, front_b, flags::SYN, b"");
        let (verdict, out) = dp.run(prog, &syn_b.bytes());
        assert_eq!(verdict, pass(prog), "{prog:?}");
        // Ethernet, a 20-byte IPv4 header, then the TCP source port.
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert_ne!(
            port,
            client.port(),
            "{prog:?}: the clashing flow kept its port"
        );
        let moved = SocketAddrV4::new(*client.ip(), port);
        assert_eq!(out, syn_b.with_addrs(moved, backend).bytes(), "{prog:?}");

        // Later packets of both flows keep their translations.
        let ack_b = Packet::tcp(client, front_b, flags::ACK, b"more");
        assert_eq!(
            dp.run(prog, &ack_b.bytes()).1,
            ack_b.with_addrs(moved, backend).bytes(),
            "{prog:?}"
        );
        for (to, front) in [(client, front_a), (moved, front_b)] {
            let synack = Packet::tcp(backend, to, flags::SYN | flags::ACK, b"");
            let (verdict, out) = dp.run(prog, &synack.bytes());
            assert_eq!(verdict, pass(prog), "{prog:?}");
            assert_eq!(
                out,
                synack.with_addrs(front, client).bytes(),
                "{prog:?}: reply to {to}"
            );
        }
    }
}

#[test]
fn an_established_flow_keeps_its_backend_when_backends_change() {
    let mut dp = Datapath::new();
    let svc = |eps: &[(&str, u16, bool)]| {
        service("web", Protocol::Tcp, &[("10.96.0.10", 80, ClusterIp)], eps)
    };
    dp.apply(&[svc(&[("10.244.1.10", 8080, true)])]);
    let client = addr("10.244.2.20:40002");
    let syn = Packet::tcp(client, addr("10.96.0.10:80"), flags::SYN, b"");
    let (_, out) = dp.run(TcPod, &syn.bytes());
    assert_eq!(
        out,
        syn.with_addrs(client, addr("10.244.1.10:8080")).bytes()
    );
    // Many new backends: the hash would now pick among them, conntrack must not.
    dp.apply(&[svc(&[
        ("10.244.1.10", 8080, true),
        ("10.244.1.12", 8080, true),
        ("10.244.1.13", 8080, true),
        ("10.244.1.14", 8080, true),
    ])]);
    for _ in 0..3 {
        let ack = Packet::tcp(client, addr("10.96.0.10:80"), flags::ACK, b"more");
        let (_, out) = dp.run(TcPod, &ack.bytes());
        assert_eq!(
            out,
            ack.with_addrs(client, addr("10.244.1.10:8080")).bytes()
        );
    }
}

#[test]
fn new_flows_spread_over_all_backends() {
    let mut dp = Datapath::new();
    let backends = ["10.244.1.10", "10.244.1.11", "10.244.2.10"];
    let eps: Vec<(&str, u16, bool)> = backends.iter().map(|b| (*b, 8080, true)).collect();
    dp.apply(&[service(
        "web",
        Protocol::Tcp,
        &[("10.96.0.10", 80, ClusterIp)],
        &eps,
    )]);
    let mut seen = std::collections::BTreeMap::new();
    for port in 0..300u16 {
        let syn = Packet::tcp(
            addr(&format!("10.244.2.20:{}", 20000 + port)),
            addr("10.96.0.10:80"),
            flags::SYN,
            b"",
        );
        let (_, out) = dp.run(TcPod, &syn.bytes());
        let dst = std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        *seen.entry(dst.to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), backends.len(), "every backend chosen: {seen:?}");
    assert!(seen.values().all(|n| *n >= 50), "roughly even: {seen:?}");
}

#[test]
fn tcp_to_a_service_without_endpoints_is_reset() {
    for prog in ALL {
        let mut dp = seeded();
        let client = addr("10.244.2.20:40003");
        let mut syn = Packet::tcp(client, addr("10.96.0.99:80"), flags::SYN, b"");
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
            expected_rst(&syn, addr("10.96.0.99:80"), 0, 778, flags::RST | flags::ACK),
            "{prog:?}: RST bytes"
        );

        // An ACK is answered with its own ack number as sequence.
        let ack = Packet::tcp(client, addr("10.96.0.99:80"), flags::ACK, b"data");
        let (verdict, out) = dp.run(prog, &ack.bytes());
        assert_eq!(verdict, bounce(prog));
        assert_eq!(
            out,
            expected_rst(&ack, addr("10.96.0.99:80"), 5000, 0, flags::RST),
            "{prog:?}: RST to an ACK"
        );

        // A RST is never answered.
        let reset = Packet::tcp(client, addr("10.96.0.99:80"), flags::RST, b"");
        assert_eq!(
            dp.run(prog, &reset.bytes()).0,
            drop_verdict(prog),
            "{prog:?}"
        );
    }
}

#[test]
fn udp_to_a_service_without_endpoints_gets_port_unreachable() {
    for prog in ALL {
        let mut dp = seeded();
        let client = addr("10.244.2.20:40004");
        let dgram = Packet::udp(client, addr("10.96.0.99:53"), b"is anyone there?");
        let input = dgram.bytes();
        let (verdict, out) = dp.run(prog, &input);
        assert_eq!(verdict, bounce(prog), "{prog:?}");
        verify_checksums(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
        assert_eq!(&out[0..6], &MAC_A, "back to the sender's MAC");
        assert_eq!(&out[6..12], &MAC_B);
        assert_eq!(out[14 + 9], 1, "ICMP");
        assert_eq!(&out[26..30], &[10, 96, 0, 99], "from the frontend");
        assert_eq!(&out[30..34], &[10, 244, 2, 20], "to the client");
        assert_eq!(
            (out[34], out[35]),
            (3, 3),
            "destination unreachable / port unreachable"
        );
        assert_eq!(
            &out[42..],
            &input[14..14 + 20 + 8],
            "quotes the IP header and 8 bytes"
        );
    }
}

#[test]
fn packets_not_for_a_service_pass_untouched() {
    let client = addr("10.244.2.20:40005");
    // (case, packet, whether pods are refused: a ClusterIP's other ports
    // and protocols, as kube-proxy's nftables mode refuses them).
    let cases = [
        (
            "other address",
            Packet::tcp(client, addr("10.96.0.11:80"), flags::SYN, b"").bytes(),
            false,
        ),
        (
            "other port",
            Packet::tcp(client, addr("10.96.0.10:81"), flags::SYN, b"").bytes(),
            true,
        ),
        (
            "other protocol on the port",
            Packet::udp(client, addr("10.96.0.10:80"), b"x").bytes(),
            true,
        ),
    ];
    for prog in ALL {
        let mut dp = seeded();
        for (name, input, refused_from_pods) in &cases {
            let (verdict, out) = dp.run(prog, input);
            if *refused_from_pods && prog == TcPod {
                assert_eq!(verdict, bounce(prog), "{name}: {prog:?}");
                continue;
            }
            assert_eq!(verdict, pass(prog), "{name}: {prog:?}");
            assert_eq!(&out, input, "{name}: {prog:?}");
        }
    }
}

#[test]
fn a_cluster_ip_port_no_service_uses_is_reset_for_pods_and_the_address_goes_with_its_last_port() {
    let mut dp = Datapath::new();
    let web = service(
        "web",
        Protocol::Tcp,
        &[("10.96.0.10", 80, ClusterIp)],
        &[("10.244.1.10", 8080, true)],
    );
    let dns = service(
        "dns",
        Protocol::Udp,
        &[("10.96.0.10", 53, ClusterIp)],
        &[("10.244.1.10", 5353, true)],
    );
    dp.apply(&[web.clone(), dns]);
    let syn = Packet::tcp(
        addr("10.244.2.20:40006"),
        addr("10.96.0.10:81"),
        flags::SYN,
        b"",
    );
    let (verdict, out) = dp.run(TcPod, &syn.bytes());
    assert_eq!(verdict, TC_ACT_REDIRECT, "refused");
    assert_eq!(
        out,
        expected_rst(
            &syn,
            addr("10.96.0.10:81"),
            0,
            1001,
            flags::RST | flags::ACK
        )
    );
    // One of the two ports leaves: the address still has the other.
    dp.apply(&[web]);
    assert_eq!(dp.run(TcPod, &syn.bytes()).0, TC_ACT_REDIRECT);
    // The address leaves with its last port: not ours any more.
    dp.apply(&[]);
    let (verdict, out) = dp.run(TcPod, &syn.bytes());
    assert_eq!((verdict, out), (TC_ACT_OK, syn.bytes()));
}

/// What a corpus packet must come out as.
enum Expect {
    /// Passed on unchanged.
    Untouched,
    /// Passed on, rewritten to exactly these bytes.
    Translated(Vec<u8>),
}

/// An Ethernet + IPv6 frame to a ClusterIP-like address with a hop-by-hop
/// extension header before its UDP header.
fn ipv6_with_extension_header() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    let udp = [0x9c, 0x40, 0x00, 0x35, 0x00, 0x09, 0x00, 0x00, b'q'];
    let hbh = [17, 0, 1, 4, 0, 0, 0, 0]; // next: UDP; PadN
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((hbh.len() + udp.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 64]); // next: hop-by-hop; hop limit
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&hbh);
    f.extend_from_slice(&udp);
    f
}

#[test]
fn packet_corpus_gets_the_asserted_verdict_from_every_program() {
    let client = addr("10.244.2.20:40006");
    let web = addr("10.96.0.10:80");
    let dns = addr("10.96.0.53:53");
    let syn = Packet::tcp(client, web, flags::SYN, b"").bytes();
    let udp = Packet::udp(client, dns, b"q").bytes();
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x43;
    let mut not_v4 = syn.clone();
    not_v4[14] = 0x65;
    let mut vlan = syn.clone();
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x01]);
    let mut qinq = syn.clone();
    qinq.splice(12..12, [0x88, 0xa8, 0x00, 0x01, 0x81, 0x00, 0x00, 0x02]);
    let mut ihl_past_end = syn.clone();
    ihl_past_end[14] = 0x4f; // 60-byte header claimed in a 54-byte frame
    let mut arp = syn[..42].to_vec();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let (_, orphan_fragment) = fragment(&Packet::udp(client, dns, &[7; 64]).bytes(), 16);
    let mut with_options = Packet::tcp(client, web, flags::SYN, b"");
    with_options.ip_options = vec![7, 7, 4, 0, 0, 0, 0, 0]; // record route, empty
    let empty_udp = Packet::udp(client, dns, b"");
    let backend_web = addr("10.244.1.10:8080");
    let backend_dns = addr("10.244.1.11:5353");
    // (name, frame, expectation, runs in XDP only: BPF_PROG_TEST_RUN
    // refuses to build an skb from less than an Ethernet and IPv4 header,
    // and any frame shorter than an Ethernet header, so a truncated
    // Ethernet header cannot be fed to a program at all; the parser's
    // first load is bounds-checked like every other)
    let cases: Vec<(&str, Vec<u8>, Expect, bool)> = vec![
        (
            "Ethernet header only",
            syn[..14].to_vec(),
            Expect::Untouched,
            true,
        ),
        (
            "truncated IP header",
            syn[..14 + 12].to_vec(),
            Expect::Untouched,
            true,
        ),
        (
            "truncated TCP header",
            syn[..14 + 20 + 10].to_vec(),
            Expect::Untouched,
            false,
        ),
        (
            "truncated UDP header",
            udp[..14 + 20 + 4].to_vec(),
            Expect::Untouched,
            false,
        ),
        ("IHL below 5", bad_ihl, Expect::Untouched, false),
        (
            "IP version 6 in an IPv4 frame",
            not_v4,
            Expect::Untouched,
            false,
        ),
        ("IHL past the end", ihl_past_end, Expect::Untouched, false),
        ("VLAN tag", vlan, Expect::Untouched, false),
        ("QinQ tags", qinq, Expect::Untouched, false),
        ("ARP", arp, Expect::Untouched, false),
        (
            "IPv6 extension header",
            ipv6_with_extension_header(),
            Expect::Untouched,
            false,
        ),
        (
            "later fragment without its first",
            orphan_fragment,
            Expect::Untouched,
            false,
        ),
        (
            "IP options",
            with_options.bytes(),
            Expect::Translated(with_options.with_addrs(client, backend_web).bytes()),
            false,
        ),
        (
            "UDP without payload",
            empty_udp.bytes(),
            Expect::Translated(empty_udp.with_addrs(client, backend_dns).bytes()),
            false,
        ),
    ];
    for prog in [XdpNode, TcNode, TcPod, XdpPass] {
        let mut dp = seeded();
        for (name, input, expect, xdp_only) in &cases {
            if *xdp_only && !matches!(prog, XdpNode | XdpPass) {
                continue;
            }
            let (verdict, out) = dp.run(prog, input);
            assert_eq!(verdict, pass(prog), "{name}: {prog:?} verdict");
            match expect {
                Expect::Translated(want) if prog != XdpPass => {
                    assert_eq!(&out, want, "{name}: {prog:?} translation");
                    verify_checksums(&out).unwrap_or_else(|e| panic!("{name}: {prog:?}: {e}"));
                }
                _ => assert_eq!(&out, input, "{name}: {prog:?} must not be modified"),
            }
        }
    }
}

/// A datagram of `payload` bytes from `src` to `dst`, split after 16 bytes
/// of UDP payload.
fn udp_fragments(src: SocketAddrV4, dst: SocketAddrV4, id: u16) -> (Vec<u8>, Vec<u8>) {
    let payload: Vec<u8> = (0..200u8).collect();
    let mut p = Packet::udp(src, dst, &payload);
    p.id = id;
    fragment(&p.bytes(), 24)
}

#[test]
fn later_fragments_follow_their_first_fragment_and_untracked_ones_pass() {
    let client = addr("10.244.2.20:40100");
    let vip = addr("10.96.0.53:53");
    let backend = addr("10.244.1.11:5353");
    for prog in ALL {
        let mut dp = seeded();
        // The whole datagram, translated and then cut the same way, is what
        // both fragments must become: the first fragment's UDP checksum
        // covers the whole datagram, so exact bytes prove it right.
        let (first, later) = udp_fragments(client, vip, 0x4242);
        let (want_first, want_later) = udp_fragments(client, backend, 0x4242);
        let (verdict, out) = dp.run(prog, &first);
        assert_eq!(verdict, pass(prog), "{prog:?}: first fragment");
        assert_eq!(out, want_first, "{prog:?}: first fragment translated");
        let (verdict, out) = dp.run(prog, &later);
        assert_eq!(verdict, pass(prog), "{prog:?}: later fragment");
        assert_eq!(out, want_later, "{prog:?}: later fragment follows");
        assert_eq!(counter(&dp, "frag_tracked"), 1, "{prog:?}");

        // The reply, fragmented by the backend, comes back from the frontend
        // (where replies are translated: see the reply test above).
        if prog != TcNode {
            let (r_first, r_later) = udp_fragments(backend, client, 0x0707);
            let (want_first, want_later) = udp_fragments(vip, client, 0x0707);
            assert_eq!(dp.run(prog, &r_first), (pass(prog), want_first), "{prog:?}");
            assert_eq!(dp.run(prog, &r_later), (pass(prog), want_later), "{prog:?}");
            assert_eq!(counter(&dp, "frag_tracked"), 2, "{prog:?}");
        }

        // A later fragment whose first fragment never came (another id), or
        // was not translated (not for a Service), passes untouched.
        let (_, orphan) = udp_fragments(client, vip, 0x4243);
        let (other_first, other_later) = udp_fragments(client, addr("10.96.0.54:53"), 0x4244);
        for (name, input) in [
            ("orphan", &orphan),
            ("first not for a Service", &other_first),
            ("later not for a Service", &other_later),
        ] {
            let (verdict, out) = dp.run(prog, input);
            assert_eq!(verdict, pass(prog), "{prog:?}: {name}");
            assert_eq!(&out, input, "{prog:?}: {name} must pass untouched");
        }
        assert_eq!(counter(&dp, "frag_untracked"), 2, "{prog:?}");
    }
}

#[test]
fn wrapped_packets_for_this_node_are_unwrapped_to_the_backend_their_shim_names() {
    use lb_common::dsr::SHIM_MAGIC;
    use lb_tests::packet::dsr_wrap;
    let client = addr("10.99.0.100:40200");
    // Another node's NodePort, which this node does not serve itself.
    let frontend = addr("10.99.0.2:30080");
    let backend = addr("10.244.1.10:8080");
    let inner = Packet::tcp(client, frontend, flags::SYN, b"");
    let (other_node, this_node) = (
        *frontend.ip(),
        "10.99.0.1".parse::<std::net::Ipv4Addr>().expect("addr"),
    );
    let wrapped = dsr_wrap(&inner.bytes(), other_node, this_node, backend, SHIM_MAGIC);
    let elsewhere = dsr_wrap(&inner.bytes(), this_node, other_node, backend, SHIM_MAGIC);
    let bad_magic = dsr_wrap(&inner.bytes(), other_node, this_node, backend, 0);
    for prog in [XdpNode, TcNode] {
        let mut dp = seeded();
        // Only the cluster's nodes may send wrapped packets: none is known yet.
        assert_eq!(dp.run(prog, &wrapped).0, drop_verdict(prog), "{prog:?}");
        assert_eq!(counter(&dp, "drop_dsr_peer"), 1, "{prog:?}");
        assert_eq!(counter(&dp, "dsr_decap"), 0, "{prog:?}");
        let peers = ["10.99.0.2/31".parse().expect("cidr")];
        dp.maps.set_dsr_peers(&peers).expect("write DSR peers");
        let (verdict, out) = dp.run(prog, &wrapped);
        assert_eq!(verdict, pass(prog), "{prog:?}");
        assert_eq!(
            out,
            inner.with_addrs(client, backend).bytes(),
            "{prog:?}: unwrapped and sent to the backend"
        );
        assert_eq!(counter(&dp, "dsr_decap"), 1, "{prog:?}");
        for (name, input) in [("not for this node", &elsewhere), ("bad shim", &bad_magic)] {
            let (verdict, out) = dp.run(prog, input);
            assert_eq!(verdict, pass(prog), "{prog:?}: {name}");
            assert_eq!(&out, input, "{prog:?}: {name} passes untouched");
        }
        assert_eq!(counter(&dp, "dsr_decap"), 1, "{prog:?}");
        // A network that no longer holds the sender drops it again.
        let peers = ["10.99.0.4/30".parse().expect("cidr")];
        dp.maps.set_dsr_peers(&peers).expect("write DSR peers");
        assert_eq!(dp.run(prog, &wrapped).0, drop_verdict(prog), "{prog:?}");
        assert_eq!(counter(&dp, "drop_dsr_peer"), 2, "{prog:?}");
    }
    // Pods cannot have their packets unwrapped.
    let mut dp = seeded();
    assert_eq!(dp.run(TcPod, &wrapped), (TC_ACT_OK, wrapped.clone()));
}

#[test]
fn every_map_is_pinned_with_btf_and_the_layout_of_lb_common() {
    let dp = Datapath::new();
    for name in lb_common::maps::ALL {
        let path = dp.maps_dir().join(name);
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .expect("run bpftool");
        assert!(
            out.status.success(),
            "{name} is not pinned at {}",
            path.display()
        );
        let info = String::from_utf8_lossy(&out.stdout);
        assert!(
            info.contains("\"btf_id\":"),
            "{name} carries no BTF: {info}"
        );
    }
    // Opening every map typed with lb-common's key and value types checks
    // their sizes against what the object declares.
    lb_agent::datapath::maps::Maps::open(dp.bpffs()).expect("maps match lb-common's layouts");
}

#[test]
fn a_flow_whose_backend_is_removed_ends_at_once() {
    let mut dp = Datapath::new();
    let web = |eps: &[(&str, u16, bool)]| {
        service("web", Protocol::Tcp, &[("10.96.0.10", 80, ClusterIp)], eps)
    };
    let dns = |eps: &[(&str, u16, bool)]| {
        service("dns", Protocol::Udp, &[("10.96.0.53", 53, ClusterIp)], eps)
    };
    dp.apply(&[
        web(&[("10.244.1.10", 8080, true)]),
        dns(&[("10.244.1.10", 5353, true)]),
    ]);
    let client = addr("10.244.2.20:40010");
    let syn = Packet::tcp(client, addr("10.96.0.10:80"), flags::SYN, b"");
    assert_eq!(dp.run(TcPod, &syn.bytes()).0, TC_ACT_OK);
    let query = Packet::udp(client, addr("10.96.0.53:53"), b"q");
    assert_eq!(
        dp.run(TcPod, &query.bytes()).1,
        query.with_addrs(client, addr("10.244.1.10:5353")).bytes()
    );

    dp.apply(&[
        web(&[("10.244.1.11", 8080, true)]),
        dns(&[("10.244.1.11", 5353, true)]),
    ]);
    // TCP: the next packet of the flow is answered with a reset from the frontend.
    let ack = Packet::tcp(client, addr("10.96.0.10:80"), flags::ACK, b"more");
    let (verdict, out) = dp.run(TcPod, &ack.bytes());
    assert_eq!(verdict, TC_ACT_REDIRECT, "bounced back to the client");
    assert_eq!(
        out,
        expected_rst(&ack, addr("10.96.0.10:80"), 5000, 0, flags::RST)
    );
    // UDP: the next datagram goes to a live backend.
    assert_eq!(
        dp.run(TcPod, &query.bytes()).1,
        query.with_addrs(client, addr("10.244.1.11:5353")).bytes()
    );
}

#[test]
fn a_terminating_endpoint_keeps_its_flows_and_gets_no_new_ones() {
    use lb_agent::model::Endpoint;
    let mut dp = Datapath::new();
    let (r, mut sp) = service(
        "web",
        Protocol::Tcp,
        &[("10.96.0.10", 80, ClusterIp)],
        &[("10.244.1.10", 8080, true)],
    );
    dp.apply(&[(r.clone(), sp.clone())]);
    let client = addr("10.244.2.20:40011");
    let syn = Packet::tcp(client, addr("10.96.0.10:80"), flags::SYN, b"");
    assert_eq!(
        dp.run(TcPod, &syn.bytes()).1,
        syn.with_addrs(client, addr("10.244.1.10:8080")).bytes()
    );

    // .10 starts terminating (still serving) and .11 is ready.
    sp.endpoints[0] = Endpoint {
        ready: false,
        serving: true,
        terminating: true,
        ..sp.endpoints[0]
    };
    sp.endpoints.push(Endpoint {
        addr: "10.244.1.11".parse().expect("addr"),
        ..sp.endpoints[0]
    });
    sp.endpoints[1].ready = true;
    sp.endpoints[1].terminating = false;
    dp.apply(&[(r.clone(), sp.clone())]);
    let ack = Packet::tcp(client, addr("10.96.0.10:80"), flags::ACK, b"more");
    assert_eq!(
        dp.run(TcPod, &ack.bytes()).1,
        ack.with_addrs(client, addr("10.244.1.10:8080")).bytes(),
        "the established flow stays"
    );
    for port in 0..50u16 {
        let syn = Packet::tcp(
            addr(&format!("10.244.2.21:{}", 30000 + port)),
            addr("10.96.0.10:80"),
            flags::SYN,
            b"",
        );
        let (_, out) = dp.run(TcPod, &syn.bytes());
        assert_eq!(
            &out[30..34],
            &[10, 244, 1, 11],
            "new flows avoid the terminating endpoint"
        );
    }

    // With no ready endpoint left, serving terminating ones take new flows.
    sp.endpoints.truncate(1);
    dp.apply(&[(r, sp)]);
    let syn = Packet::tcp(
        addr("10.244.2.22:30000"),
        addr("10.96.0.10:80"),
        flags::SYN,
        b"",
    );
    let (_, out) = dp.run(TcPod, &syn.bytes());
    assert_eq!(&out[30..34], &[10, 244, 1, 10]);
}

#[test]
fn idle_flows_time_out_by_protocol_and_tcp_state() {
    use lb_agent::model::Endpoint;
    // The fixture's timeouts: TCP 3600 s, TCP after FIN/RST 60 s, UDP 30 s.
    let mut dp = Datapath::new();
    let (web, dns) = web_and_dns();
    dp.apply(&[web.clone(), dns.clone()]);
    let client = addr("10.244.2.20:40012");
    let closing = addr("10.244.2.20:40013");
    let query = Packet::udp(client, addr("10.96.0.53:53"), b"q");
    let ack = Packet::tcp(client, addr("10.96.0.10:80"), flags::ACK, b"x");
    let opened = Packet::tcp(closing, addr("10.96.0.10:80"), flags::ACK, b"y");
    let fin = Packet::tcp(closing, addr("10.96.0.10:80"), flags::FIN | flags::ACK, b"");
    for p in [&query, &ack, &opened, &fin] {
        dp.run(TcPod, &p.bytes());
    }
    // .10 drains and .11 takes new flows: where a packet goes tells whether
    // its flow was still tracked.
    let drain = |(r, mut sp): (
        lb_agent::model::ServicePortRef,
        lb_agent::model::ServicePort,
    )| {
        let old = sp.endpoints[0];
        sp.endpoints[0] = Endpoint {
            ready: false,
            terminating: true,
            ..old
        };
        sp.endpoints.push(Endpoint {
            addr: "10.244.1.11".parse().expect("addr"),
            ..old
        });
        (r, sp)
    };
    dp.apply(&[drain(web), drain(dns)]);
    let dst = |dp: &mut Datapath, p: &Packet| {
        let (_, out) = dp.run(TcPod, &p.bytes());
        std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]).to_string()
    };
    dp.age_flows(29);
    assert_eq!(
        dst(&mut dp, &query),
        "10.244.1.10",
        "UDP idle 29 s is still tracked"
    );
    dp.age_flows(31);
    assert_eq!(
        dst(&mut dp, &query),
        "10.244.1.11",
        "UDP idle 31 s is forgotten"
    );
    assert_eq!(
        dst(&mut dp, &ack),
        "10.244.1.10",
        "established TCP idle 31 s is still tracked"
    );
    dp.age_flows(61);
    assert_eq!(
        dst(&mut dp, &ack),
        "10.244.1.10",
        "established TCP idle 61 s is still tracked"
    );
    let after_fin = Packet::tcp(closing, addr("10.96.0.10:80"), flags::ACK, b"");
    assert_eq!(
        dst(&mut dp, &after_fin),
        "10.244.1.11",
        "TCP idle 61 s after FIN is forgotten"
    );
    dp.age_flows(3601);
    assert_eq!(
        dst(&mut dp, &ack),
        "10.244.1.11",
        "established TCP idle 3601 s is forgotten"
    );
}

#[test]
fn client_ip_affinity_holds_within_its_timeout_and_follows_backend_changes() {
    let mut dp = Datapath::new();
    let eps = [
        ("10.244.1.10", 8080, true),
        ("10.244.1.11", 8080, true),
        ("10.244.2.10", 8080, true),
    ];
    let (r, mut sp) = service("web", Protocol::Tcp, &[("10.96.0.10", 80, ClusterIp)], &eps);
    sp.affinity_timeout_s = 60;
    dp.apply(&[(r.clone(), sp.clone())]);
    let dst = |dp: &mut Datapath, client: &str, port: u16| {
        let syn = Packet::tcp(
            addr(&format!("{client}:{port}")),
            addr("10.96.0.10:80"),
            flags::SYN,
            b"",
        );
        let (_, out) = dp.run(TcPod, &syn.bytes());
        std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]).to_string()
    };
    // Every new connection of one client lands on one backend.
    let first = dst(&mut dp, "10.244.2.20", 20000);
    for port in 20001..20040 {
        assert_eq!(
            dst(&mut dp, "10.244.2.20", port),
            first,
            "flow from port {port}"
        );
    }
    // Other clients spread over the backends.
    let others: std::collections::BTreeSet<String> = (1..40)
        .map(|i| dst(&mut dp, &format!("10.244.3.{i}"), 20000))
        .collect();
    assert!(others.len() > 1, "clients spread: {others:?}");
    // After the timeout the client may move: over many new ports it does.
    dp.age_affinity(61);
    let moved: std::collections::BTreeSet<String> = (20100..20140)
        .map(|port| {
            dp.age_affinity(61);
            dst(&mut dp, "10.244.2.20", port)
        })
        .collect();
    assert!(
        moved.len() > 1,
        "affinity released after its timeout: {moved:?}"
    );
    // A backend that leaves the table loses its clients at once.
    let sticky = dst(&mut dp, "10.244.2.21", 20000);
    sp.endpoints.retain(|e| e.addr.to_string() != sticky);
    dp.apply(&[(r, sp)]);
    let now = dst(&mut dp, "10.244.2.21", 20001);
    assert_ne!(now, sticky, "affinity to a removed backend is dropped");
    for port in 20002..20010 {
        assert_eq!(
            dst(&mut dp, "10.244.2.21", port),
            now,
            "and a new one holds"
        );
    }
}

#[test]
fn reply_entries_outlive_the_timeout_while_the_client_sends_and_a_backend_fin_closes_the_flow() {
    use lb_agent::model::Endpoint;
    let mut dp = Datapath::new();
    let (r, mut sp) = service(
        "web",
        Protocol::Tcp,
        &[("10.96.0.10", 80, ClusterIp)],
        &[("10.244.1.10", 8080, true)],
    );
    let dns = service(
        "dns",
        Protocol::Udp,
        &[("10.96.0.53", 53, ClusterIp)],
        &[("10.244.1.10", 5353, true)],
    );
    dp.apply(&[(r.clone(), sp.clone()), dns]);
    let client = addr("10.244.2.20:40014");
    // A one-way UDP stream: only the client sends, then the server answers
    // after longer than the UDP timeout.
    let query = Packet::udp(client, addr("10.96.0.53:53"), b"q");
    dp.run(TcPod, &query.bytes());
    dp.age_replies(31);
    let answer = Packet::udp(addr("10.244.1.10:5353"), client, b"a");
    let (_, out) = dp.run(TcPod, &answer.bytes());
    assert_eq!(
        out,
        answer.with_addrs(addr("10.96.0.53:53"), client).bytes(),
        "the late answer is still reverse-translated"
    );

    // TCP: the backend closes; the flow gets the short timeout.
    let ack = Packet::tcp(client, addr("10.96.0.10:80"), flags::ACK, b"x");
    dp.run(TcPod, &ack.bytes());
    let fin = Packet::tcp(
        addr("10.244.1.10:8080"),
        client,
        flags::FIN | flags::ACK,
        b"",
    );
    dp.run(TcPod, &fin.bytes());
    // .10 drains and .11 takes new flows: where the next packet goes tells
    // whether the flow was forgotten after the closing timeout (60 s).
    sp.endpoints[0] = Endpoint {
        ready: false,
        terminating: true,
        ..sp.endpoints[0]
    };
    sp.endpoints.push(Endpoint {
        addr: "10.244.1.11".parse().expect("addr"),
        ready: true,
        terminating: false,
        ..sp.endpoints[0]
    });
    dp.apply(&[(r, sp)]);
    dp.age_flows(61);
    let (_, out) = dp.run(TcPod, &ack.bytes());
    assert_eq!(
        &out[30..34],
        &[10, 244, 1, 11],
        "closed by the backend, forgotten after 61 s"
    );
}

#[test]
fn local_traffic_policies_keep_traffic_on_this_node_and_drop_without_a_local_endpoint() {
    let mut dp = Datapath::new();
    let fronts = [
        ("10.96.0.10", 80, ClusterIp),
        ("10.99.0.1", 30080, NodePort),
    ];
    let eps = [
        ("10.244.1.10", 8080, true),
        ("10.244.2.10", 8080, false),
        ("10.244.2.11", 8080, false),
    ];
    let (r, mut sp) = service("web", Protocol::Tcp, &fronts, &eps);
    sp.external_local = true;
    dp.apply(&[(r.clone(), sp.clone())]);
    let dst = |dp: &mut Datapath, prog: TestProgram, to: &str, port: u16| {
        let syn = Packet::tcp(
            addr(&format!("10.99.0.100:{port}")),
            addr(to),
            flags::SYN,
            b"",
        );
        let (verdict, out) = dp.run(prog, &syn.bytes());
        (
            verdict,
            std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]).to_string(),
        )
    };
    let mut via_cluster_ip = std::collections::BTreeSet::new();
    for port in 20000..20040 {
        // externalTrafficPolicy: Local: the NodePort leads to the local endpoint only,
        // untranslated source (no SNAT: the backend sees the client).
        let (verdict, to) = dst(&mut dp, XdpNode, "10.99.0.1:30080", port);
        assert_eq!((verdict, to.as_str()), (XDP_PASS, "10.244.1.10"));
        via_cluster_ip.insert(dst(&mut dp, TcPod, "10.96.0.10:80", port).1);
    }
    assert!(
        via_cluster_ip.len() > 1,
        "the ClusterIP still uses every endpoint: {via_cluster_ip:?}"
    );

    // Without a local endpoint the NodePort drops, the ClusterIP still works.
    sp.endpoints.retain(|e| !e.local);
    dp.apply(&[(r.clone(), sp.clone())]);
    let (verdict, _) = dst(&mut dp, XdpNode, "10.99.0.1:30080", 21000);
    assert_eq!(
        verdict, XDP_DROP,
        "eTP Local without a local endpoint drops"
    );
    assert_eq!(dst(&mut dp, TcPod, "10.96.0.10:80", 21000).0, TC_ACT_OK);

    // internalTrafficPolicy: Local: the ClusterIP leads to local endpoints only.
    let (r, mut sp) = service("web", Protocol::Tcp, &fronts, &eps);
    sp.internal_local = true;
    dp.apply(&[(r, sp)]);
    for port in 22000..22040 {
        assert_eq!(dst(&mut dp, TcPod, "10.96.0.10:80", port).1, "10.244.1.10");
    }
}

#[test]
fn in_cluster_clients_of_an_external_local_frontend_reach_every_endpoint() {
    let mut dp = Datapath::new();
    let fronts = [
        ("10.96.0.10", 80, ClusterIp),
        ("10.99.0.1", 30080, NodePort),
    ];
    // No endpoint on this node.
    let (r, mut sp) = service(
        "web",
        Protocol::Tcp,
        &fronts,
        &[("10.244.2.10", 8080, false)],
    );
    sp.external_local = true;
    dp.apply(&[(r.clone(), sp.clone())]);
    let syn =
        |from: &str| Packet::tcp(addr(from), addr("10.99.0.1:30080"), flags::SYN, b"").bytes();
    // From a pod: every endpoint (the in-cluster twin).
    let (verdict, out) = dp.run(TcPod, &syn("10.244.1.20:40020"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[30..34], &[10, 244, 2, 10], "to the remote endpoint");
    // From outside: this node's endpoints only, none: dropped.
    assert_eq!(dp.run(XdpNode, &syn("10.99.0.100:40021")).0, XDP_DROP);
    assert_eq!(dp.run(TcNode, &syn("10.99.0.100:40022")).0, TC_ACT_SHOT);

    // No endpoint anywhere: refused from outside, like any Service.
    sp.endpoints.clear();
    dp.apply(&[(r, sp)]);
    assert_eq!(dp.run(XdpNode, &syn("10.99.0.100:40023")).0, XDP_TX);
    assert_eq!(dp.run(TcPod, &syn("10.244.1.20:40024")).0, TC_ACT_REDIRECT);
}

#[test]
fn a_not_serving_endpoint_keeps_its_tcp_flows_while_its_udp_flows_move() {
    let mut dp = Datapath::new();
    let (web, dns) = web_and_dns();
    dp.apply(&[web.clone(), dns.clone()]);
    let client = addr("10.244.2.20:40030");
    let syn = Packet::tcp(client, addr("10.96.0.10:80"), flags::SYN, b"");
    assert_eq!(dp.run(TcPod, &syn.bytes()).0, TC_ACT_OK);
    let query = Packet::udp(client, addr("10.96.0.53:53"), b"q");
    assert_eq!(
        dp.run(TcPod, &query.bytes()).1,
        query.with_addrs(client, addr("10.244.1.10:5353")).bytes()
    );

    // .10 fails its readiness probe (not ready, not serving); .11 is ready.
    let flip = |(r, mut sp): (_, lb_agent::model::ServicePort)| {
        sp.endpoints[0].ready = false;
        sp.endpoints[0].serving = false;
        let mut other = sp.endpoints[0];
        other.addr = "10.244.1.11".parse().expect("addr");
        other.ready = true;
        other.serving = true;
        sp.endpoints.push(other);
        (r, sp)
    };
    dp.apply(&[flip(web), flip(dns)]);
    let ack = Packet::tcp(client, addr("10.96.0.10:80"), flags::ACK, b"more");
    assert_eq!(
        dp.run(TcPod, &ack.bytes()).1,
        ack.with_addrs(client, addr("10.244.1.10:8080")).bytes(),
        "the established TCP flow stays"
    );
    assert_eq!(
        dp.run(TcPod, &query.bytes()).1,
        query.with_addrs(client, addr("10.244.1.11:5353")).bytes(),
        "the UDP flow moves to a serving endpoint"
    );
}

#[test]
fn load_balancer_source_ranges_admit_only_their_sources() {
    let mut dp = Datapath::new();
    let fronts = [
        ("10.96.0.10", 80, ClusterIp),
        ("203.0.113.10", 80, LoadBalancer),
        ("10.99.0.1", 30080, NodePort),
    ];
    let (r, mut sp) = service(
        "web",
        Protocol::Tcp,
        &fronts,
        &[("10.244.1.10", 8080, true)],
    );
    sp.source_ranges = vec![
        "10.99.0.100/32".parse().expect("cidr"),
        "192.168.0.0/16".parse().expect("cidr"),
    ];
    dp.apply(&[(r.clone(), sp.clone())]);
    let verdict = |dp: &mut Datapath, from: &str, to: &str| {
        let syn = Packet::tcp(addr(from), addr(to), flags::SYN, b"");
        dp.run(XdpNode, &syn.bytes()).0
    };
    assert_eq!(
        verdict(&mut dp, "10.99.0.100:40000", "203.0.113.10:80"),
        XDP_PASS,
        "a /32 admits its address"
    );
    assert_eq!(
        verdict(&mut dp, "192.168.7.9:40000", "203.0.113.10:80"),
        XDP_PASS,
        "a /16 admits its network"
    );
    assert_eq!(
        verdict(&mut dp, "10.99.0.101:40000", "203.0.113.10:80"),
        XDP_DROP,
        "others are dropped"
    );
    // The ranges guard the load balancer's addresses only.
    assert_eq!(
        verdict(&mut dp, "10.99.0.101:40001", "10.99.0.1:30080"),
        XDP_PASS,
        "NodePort unguarded"
    );
    let stats = lb_tests::fixture::counter(&dp, "drop_source_range");
    assert_eq!(stats, 1, "the denied packet is counted");
    // Removing the ranges opens the frontend.
    sp.source_ranges.clear();
    dp.apply(&[(r, sp)]);
    assert_eq!(
        verdict(&mut dp, "10.99.0.101:40002", "203.0.113.10:80"),
        XDP_PASS
    );
}

#[test]
fn icmp_errors_about_translated_flows_quote_what_the_sender_sent() {
    use lb_tests::packet::icmp_error;
    use std::net::Ipv4Addr;
    let mut dp = seeded();
    let router = Ipv4Addr::new(10, 99, 0, 254);
    // A pod's flow to a ClusterIP; a router on the way to the backend says
    // "fragmentation needed" to the pod about the translated packet.
    let client = addr("10.244.2.20:40020");
    let big = Packet::tcp(client, addr("10.96.0.10:80"), flags::ACK, &[0u8; 64]);
    dp.run(TcPod, &big.bytes());
    let translated = big.with_addrs(client, addr("10.244.1.10:8080"));
    let err = icmp_error(router, *client.ip(), 3, 4, 1400, &translated, 8);
    for prog in [XdpNode, TcNode] {
        let (verdict, out) = dp.run(prog, &err);
        assert_eq!(verdict, pass(prog), "{prog:?}");
        assert_eq!(
            out,
            icmp_error(router, *client.ip(), 3, 4, 1400, &big, 8),
            "{prog:?}: quotes the ClusterIP"
        );
        verify_checksums(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
    }

    // After SNAT the error comes to the node; it goes on to the client.
    let outside = addr("10.99.0.100:40021");
    let syn = Packet::tcp(outside, addr("10.99.0.1:30080"), flags::SYN, b"");
    let mut dp = Datapath::new();
    dp.apply(&[service(
        "web",
        Protocol::Tcp,
        &[("10.99.0.1", 30080, NodePort)],
        &[("10.244.2.10", 8080, false)],
    )]);
    dp.run(XdpNode, &syn.bytes());
    let snat_port = snat_port(&dp);
    let sent = syn.with_addrs(
        SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), snat_port),
        addr("10.244.2.10:8080"),
    );
    let err = icmp_error(router, Ipv4Addr::new(10, 99, 0, 1), 11, 0, 0, &sent, 8);
    let (verdict, out) = dp.run(XdpNode, &err);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        icmp_error(router, *outside.ip(), 11, 0, 0, &syn, 8),
        "to the client, quoting its own packet"
    );
    assert_eq!(lb_tests::fixture::counter(&dp, "icmp_error"), 1);

    // An error about a flow nobody translated passes untouched.
    let other = Packet::udp(addr("10.244.2.20:1234"), addr("10.244.1.99:53"), b"q");
    let err = icmp_error(router, Ipv4Addr::new(10, 244, 2, 20), 3, 3, 0, &other, 8);
    assert_eq!(dp.run(XdpNode, &err), (XDP_PASS, err.clone()));
}

#[test]
fn per_service_counters_count_packets_bytes_new_flows_and_drops() {
    let mut dp = seeded();
    let client = addr("10.244.2.20:40100");
    let syn = Packet::tcp(client, addr("10.96.0.10:80"), flags::SYN, b"").bytes();
    let ack = Packet::tcp(client, addr("10.96.0.10:80"), flags::ACK, b"hello").bytes();
    let reply = Packet::tcp(addr("10.244.1.10:8080"), client, flags::ACK, b"hi").bytes();
    for p in [&syn, &ack, &reply] {
        assert_eq!(dp.run(TcPod, p).0, TC_ACT_OK);
    }
    let web = service_counters(&dp, "default/web/TCP");
    assert_eq!(web.packets, 3, "{web:?}");
    assert_eq!(web.bytes, (syn.len() + ack.len() + reply.len()) as u64);
    assert_eq!((web.new_flows, web.drops), (1, 0), "{web:?}");

    // A refused flow counts as a packet and a drop of its own Service only.
    let refused = Packet::tcp(client, addr("10.96.0.99:80"), flags::SYN, b"").bytes();
    assert_eq!(dp.run(XdpNode, &refused).0, XDP_TX);
    let empty = service_counters(&dp, "default/empty/TCP");
    assert_eq!(
        (empty.packets, empty.bytes, empty.new_flows, empty.drops),
        (1, refused.len() as u64, 0, 1)
    );
    assert_eq!(service_counters(&dp, "default/web/TCP"), web);
    let dns = service_counters(&dp, "default/dns/UDP");
    assert_eq!(dns, lb_common::stats::SvcCounters::default());

    // XDP counts the flows it finishes itself too (a local backend).
    let udp = Packet::udp(addr("10.244.2.20:40101"), addr("10.96.0.53:53"), b"q").bytes();
    assert_eq!(dp.run(XdpNode, &udp).0, XDP_PASS);
    let dns = service_counters(&dp, "default/dns/UDP");
    assert_eq!(
        (dns.packets, dns.new_flows, dns.drops),
        (1, 1, 0),
        "{dns:?}"
    );
}

#[test]
fn a_reused_service_id_starts_its_counters_from_zero() {
    let mut dp = Datapath::new();
    let web = service(
        "web",
        Protocol::Tcp,
        &[("10.96.0.10", 80, ClusterIp)],
        &[("10.244.1.10", 8080, true)],
    );
    dp.apply(std::slice::from_ref(&web));
    let syn = Packet::tcp(
        addr("10.244.2.20:40102"),
        addr("10.96.0.10:80"),
        flags::SYN,
        b"",
    );
    dp.run(TcPod, &syn.bytes());
    assert_eq!(service_counters(&dp, "default/web/TCP").packets, 1);
    let old_id = dp.maps.service_counters().expect("counters")[0].0;

    let other = service(
        "other",
        Protocol::Tcp,
        &[("10.96.0.11", 80, ClusterIp)],
        &[("10.244.1.10", 8080, true)],
    );
    // New Service ports are programmed before gone ones are removed: the
    // id is free for the next sync.
    dp.apply(&[]);
    dp.apply(&[other]);
    let now = dp.maps.service_counters().expect("counters");
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].0, old_id, "the freed id is reused");
    assert_eq!(now[0].2, lb_common::stats::SvcCounters::default());
}

#[test]
fn conntrack_inserts_minus_removals_equal_the_entries_without_eviction() {
    let mut dp = seeded();
    let client = addr("10.244.2.20:40103");
    let query = Packet::udp(client, addr("10.96.0.53:53"), b"q");
    dp.run(TcPod, &query.bytes());
    assert_eq!(
        counter(&dp, "ct_embryo_insert"),
        2,
        "forward and reply entry"
    );
    assert_eq!(counter(&dp, "ct_insert"), 0, "nothing established yet");
    // The answer establishes the flow: both entries move.
    let answer = Packet::udp(addr("10.244.1.11:5353"), client, b"a");
    dp.run(TcPod, &answer.bytes());
    assert_eq!(counter(&dp, "ct_insert"), 2);
    assert_eq!(counter(&dp, "ct_embryo_remove"), 2);
    // The forward entry times out (UDP: 30 s) and the next packet opens the
    // flow again: one removal, and an embryonic forward entry beside the
    // established reply entry, which it joins (its translation is the same).
    dp.age_flows(60);
    dp.run(TcPod, &query.bytes());
    let entries = dp.maps.conntrack.keys().count() as u64;
    let embryonic = dp.maps.ct_embryo.keys().count() as u64;
    assert_eq!((entries, embryonic), (2, 0));
    assert_eq!(counter(&dp, "ct_remove"), 1);
    assert_eq!(counter(&dp, "ct_insert"), 3);
    assert_eq!(
        counter(&dp, "ct_insert") - counter(&dp, "ct_remove"),
        entries,
        "no eviction: inserts - removals = entries"
    );
    assert_eq!(
        counter(&dp, "ct_embryo_insert") - counter(&dp, "ct_embryo_remove"),
        embryonic
    );
}

/// A NodePort whose only backend is on another node: its flows are SNATed
/// and forwarded by the datapath itself (FIB lookup, XDP_TX or redirect).
fn remote_nodeport() -> Datapath {
    let mut dp = Datapath::new();
    dp.apply(&[service(
        "web",
        Protocol::Tcp,
        &[("10.99.0.1", 30080, NodePort)],
        &[("10.244.2.10", 8080, false)],
    )]);
    dp
}

/// The SNAT port the only flow in `dp` was given (its reply entry's key,
/// established or embryonic).
fn snat_port(dp: &Datapath) -> u16 {
    dp.maps
        .conntrack
        .iter()
        .chain(dp.maps.ct_embryo.iter())
        .map(|e| e.expect("conntrack"))
        .find(|(_, v)| v.flags & lb_common::conntrack::CT_F_REPLY != 0)
        .map(|(k, _)| u16::from_be(k.dport_be))
        .expect("the SNAT flow's reply entry")
}

#[test]
fn a_packet_that_would_leave_with_ttl_0_gets_time_exceeded_from_the_node() {
    use lb_tests::packet::icmp_error;
    let node = std::net::Ipv4Addr::new(10, 99, 0, 1);
    for prog in [XdpNode, TcNode] {
        let mut dp = remote_nodeport();
        for (i, ttl) in [1u8, 0].into_iter().enumerate() {
            let client = addr(&format!("10.99.0.100:{}", 40300 + i));
            let mut syn = Packet::tcp(client, addr("10.99.0.1:30080"), flags::SYN, b"");
            syn.ttl = ttl;
            let (verdict, out) = dp.run(prog, &syn.bytes());
            assert_eq!(verdict, bounce(prog), "{prog:?}: TTL {ttl}");
            assert_eq!(
                out,
                icmp_error(node, *client.ip(), 11, 0, 0, &syn, 8),
                "{prog:?}: TTL {ttl}: time exceeded from the node, quoting the packet as it came"
            );
            verify_checksums(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
        }
        assert_eq!(counter(&dp, "ttl_exceeded"), 2, "{prog:?}");
        assert_eq!(counter(&dp, "xdp_to_tc"), 0, "{prog:?}: XDP answers itself");
    }

    // The backend's reply, forwarded by TC on the backend's side, likewise.
    let mut dp = remote_nodeport();
    let client = addr("10.99.0.100:40310");
    let syn = Packet::tcp(client, addr("10.99.0.1:30080"), flags::SYN, b"");
    dp.run(TcNode, &syn.bytes());
    let mut synack = Packet::tcp(
        addr("10.244.2.10:8080"),
        SocketAddrV4::new(node, snat_port(&dp)),
        flags::SYN | flags::ACK,
        b"",
    );
    synack.ttl = 1;
    let (verdict, out) = dp.run(TcNode, &synack.bytes());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        icmp_error(
            node,
            std::net::Ipv4Addr::new(10, 244, 2, 10),
            11,
            0,
            0,
            &synack,
            8
        )
    );

    // A packet the stack delivers (a local backend) keeps its TTL: the
    // kernel's forwarding decrements it and answers it if it must.
    let mut dp = seeded();
    let mut syn = Packet::tcp(client, addr("10.99.0.1:30080"), flags::SYN, b"");
    syn.ttl = 1;
    let (verdict, out) = dp.run(XdpNode, &syn.bytes());
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        syn.with_addrs(client, addr("10.244.1.10:8080")).bytes(),
        "left to the kernel"
    );
    assert_eq!(counter(&dp, "ttl_exceeded"), 0);
}

/// What the private namespace of the forwarding tests holds: this node's
/// address on `d0` (a veth: no dummy module here), the backends' node (10.99.0.2) as the gateway to their
/// pod CIDR, and the client: neighbours known, so the FIB resolves them.
const ROUTED: &[&[&str]] = &[
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
    &["addr", "add", "10.99.0.1/24", "dev", "d0"],
    &["link", "set", "d1", "up"],
    &["link", "set", "d0", "up"],
    &["route", "add", "10.244.2.0/24", "via", "10.99.0.2"],
    &[
        "neigh",
        "add",
        "10.99.0.2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        "d0",
        "nud",
        "permanent",
    ],
    &[
        "neigh",
        "add",
        "10.99.0.100",
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

#[test]
fn packets_the_datapath_forwards_itself_leave_with_one_hop_less() {
    use lb_tests::{fixture::in_private_netns, packet::dsr_wrap};
    in_private_netns(ROUTED, || {
        let node = std::net::Ipv4Addr::new(10, 99, 0, 1);
        let front = addr("10.99.0.1:30080");
        let backend = addr("10.244.2.10:8080");
        let client = addr("10.99.0.100:40320");
        // SNAT: the client's packet and the backend's reply, both routed
        // out d0 by TC (XDP hands packets for another interface to TC).
        let mut dp = remote_nodeport();
        let mut syn = Packet::tcp(client, front, flags::SYN, b"");
        syn.ttl = 2;
        let (verdict, out) = dp.run(XdpNode, &syn.bytes());
        assert_eq!(
            (verdict, &out),
            (XDP_PASS, &syn.bytes()),
            "left to TC untouched"
        );
        let (verdict, out) = dp.run(TcNode, &syn.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let mut want = syn.with_addrs(SocketAddrV4::new(node, snat_port(&dp)), backend);
        (want.ttl, want.src_mac, want.dst_mac) = (1, MAC_D0, MAC_NODE_B);
        assert_eq!(out, want.bytes(), "SNATed with TTL 1");
        verify_checksums(&out).unwrap_or_else(|e| panic!("{e}"));

        let synack = Packet::tcp(
            backend,
            SocketAddrV4::new(node, snat_port(&dp)),
            flags::SYN | flags::ACK,
            b"",
        );
        let (verdict, out) = dp.run(TcNode, &synack.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let mut want = synack.with_addrs(front, client);
        (want.ttl, want.src_mac, want.dst_mac) = (63, MAC_D0, MAC_CLIENT);
        assert_eq!(out, want.bytes(), "the reply with TTL 63");
        verify_checksums(&out).unwrap_or_else(|e| panic!("{e}"));

        // DSR: the client's packet is wrapped with one hop less inside.
        let mut dp = remote_nodeport();
        dp.set_config_flags(lb_common::config::CONFIG_F_DSR);
        let syn = Packet::tcp(client, front, flags::SYN, b"");
        let (verdict, out) = dp.run(TcNode, &syn.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let mut inner = syn.clone();
        inner.ttl = 63;
        let mut want = dsr_wrap(
            &inner.bytes(),
            node,
            std::net::Ipv4Addr::new(10, 99, 0, 2),
            backend,
            lb_common::dsr::SHIM_MAGIC,
        );
        want[..6].copy_from_slice(&MAC_NODE_B);
        want[6..12].copy_from_slice(&MAC_D0);
        assert_eq!(out, want, "wrapped to the backend's node");
        assert_eq!(counter(&dp, "dsr_encap"), 1);
    });
}

/// Every entry of a conntrack map, sorted, with the times zeroed.
fn ct_entries(
    map: &aya::maps::HashMap<aya::maps::MapData, lb_common::CtKey, lb_common::CtValue>,
) -> Vec<(lb_common::CtKey, lb_common::CtValue)> {
    let mut out: Vec<_> = map
        .iter()
        .map(|e| {
            let (k, mut v) = e.expect("read conntrack");
            v.last_seen_ns = 0;
            (k, v)
        })
        .collect();
    out.sort_by_key(|(k, _)| (k.saddr_be, k.sport_be, k.daddr_be, k.dport_be));
    out
}

#[test]
fn a_new_flow_is_embryonic_until_its_backend_sends_more_than_a_syn_ack_then_established() {
    use lb_common::{
        conntrack::{CT_F_DNAT, CT_F_REPLY, CT_F_SNAT},
        family, proto, CtValue, Tuple,
    };
    let mut dp = seeded();
    let be = |s: &str| {
        let a: SocketAddrV4 = addr(s);
        (
            [u32::from_ne_bytes(a.ip().octets()), 0, 0, 0],
            a.port().to_be(),
        )
    };
    let tuple = |src: &str, dst: &str| {
        let ((saddr_be, sport_be), (daddr_be, dport_be)) = (be(src), be(dst));
        Tuple {
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto: proto::TCP,
            family: family::V4,
            _pad: [0; 2],
        }
    };
    let (client, front, backend) = ("10.244.2.20:40400", "10.96.0.10:80", "10.244.1.10:8080");
    let syn = Packet::tcp(addr(client), addr(front), flags::SYN, b"");
    dp.run(TcPod, &syn.bytes());
    let svc_id = dp
        .maps
        .service_counters()
        .expect("counters")
        .into_iter()
        .find(|(_, n, _)| n == "default/web/TCP")
        .map(|(id, _, _)| id)
        .expect("web's id");
    let mut fwd = CtValue {
        nat_daddr_be: be(backend).0,
        nat_dport_be: be(backend).1,
        flags: CT_F_DNAT,
        svc_id,
        ..CtValue::default()
    };
    let mut reply = CtValue {
        nat_saddr_be: be(front).0,
        nat_sport_be: be(front).1,
        flags: CT_F_SNAT | CT_F_REPLY,
        svc_id,
        ..CtValue::default()
    };
    // The backend's id is the reconciler's choice: take it from the entry.
    let found = ct_entries(&dp.maps.ct_embryo);
    (fwd.backend_id, reply.backend_id) = (found[0].1.backend_id, found[0].1.backend_id);
    let mut want_sorted = vec![(tuple(backend, client), reply), (tuple(client, front), fwd)];
    want_sorted.sort_by_key(|(k, _)| (k.saddr_be, k.sport_be, k.daddr_be, k.dport_be));
    assert_eq!(found, want_sorted, "both directions embryonic");
    assert!(
        ct_entries(&dp.maps.conntrack).is_empty(),
        "nothing established"
    );

    // The client's retransmission stays embryonic, and so does the
    // backend's SYN-ACK (it would answer a spoofed SYN alike), translated;
    // the backend's next packet establishes the flow: the same entries,
    // now in the main map.
    dp.run(TcPod, &syn.bytes());
    assert_eq!(ct_entries(&dp.maps.ct_embryo), want_sorted);
    let synack = Packet::tcp(addr(backend), addr(client), flags::SYN | flags::ACK, b"");
    let (_, out) = dp.run(TcPod, &synack.bytes());
    assert_eq!(out, synack.with_addrs(addr(front), addr(client)).bytes());
    assert_eq!(
        ct_entries(&dp.maps.ct_embryo),
        want_sorted,
        "still embryonic"
    );
    let greeting = Packet::tcp(addr(backend), addr(client), flags::ACK, b"hello");
    let (_, out) = dp.run(TcPod, &greeting.bytes());
    assert_eq!(out, greeting.with_addrs(addr(front), addr(client)).bytes());
    assert_eq!(ct_entries(&dp.maps.conntrack), want_sorted, "established");
    assert!(ct_entries(&dp.maps.ct_embryo).is_empty());
    assert_eq!(counter(&dp, "ct_established"), 1);
    let ack = Packet::tcp(addr(client), addr(front), flags::ACK, b"x");
    assert_eq!(
        dp.run(TcPod, &ack.bytes()).1,
        ack.with_addrs(addr(client), addr(backend)).bytes()
    );
}

#[test]
fn a_lost_embryonic_entry_sends_the_flows_next_packet_to_the_same_backend() {
    let mut dp = Datapath::new();
    let eps: Vec<(String, u16, bool)> = (10..18)
        .map(|i| (format!("10.244.1.{i}"), 8080, true))
        .collect();
    let eps: Vec<(&str, u16, bool)> = eps.iter().map(|(a, p, l)| (a.as_str(), *p, *l)).collect();
    dp.apply(&[service(
        "web",
        Protocol::Tcp,
        &[("10.96.0.10", 80, ClusterIp)],
        &eps,
    )]);
    for port in 0..64u16 {
        let client = addr(&format!("10.244.2.20:{}", 41000 + port));
        let syn = Packet::tcp(client, addr("10.96.0.10:80"), flags::SYN, b"");
        let (_, first) = dp.run(TcPod, &syn.bytes());
        // Evicted, as a flood would evict it.
        let keys: Vec<_> = dp.maps.ct_embryo.keys().map(|k| k.expect("key")).collect();
        for k in keys {
            dp.maps.ct_embryo.remove(&k).expect("remove");
        }
        let (_, again) = dp.run(TcPod, &syn.bytes());
        assert_eq!(again, first, "flow from {client}: same backend");
    }
}

#[test]
fn embryonic_flows_time_out_after_the_embryonic_timeout_and_established_ones_do_not() {
    let mut dp = seeded();
    dp.set_embryonic_timeout(5);
    let (open, answered) = (addr("10.244.2.20:40410"), addr("10.244.2.20:40411"));
    let front = addr("10.96.0.10:80");
    for c in [open, answered] {
        dp.run(TcPod, &Packet::tcp(c, front, flags::SYN, b"").bytes());
    }
    let greeting = Packet::tcp(addr("10.244.1.10:8080"), answered, flags::ACK, b"hello");
    dp.run(TcPod, &greeting.bytes());
    dp.age_flows(6);
    let removed = counter(&dp, "ct_embryo_remove");
    for c in [open, answered] {
        dp.run(TcPod, &Packet::tcp(c, front, flags::ACK, b"x").bytes());
    }
    assert_eq!(
        counter(&dp, "ct_embryo_remove"),
        removed + 1,
        "the unanswered flow's forward entry timed out"
    );
    assert_eq!(
        counter(&dp, "ct_hit"),
        2,
        "the answer and the answered flow's ACK"
    );
    assert_eq!(
        counter(&dp, "new_flow"),
        3,
        "the timed-out flow started again"
    );
}

#[test]
fn a_flood_of_unanswered_flows_evicts_only_other_unanswered_flows() {
    use lb_agent::datapath::programs::MapSizes;
    let mut dp = Datapath::with_sizes(
        MapSizes {
            services: 64,
            backends: 64,
            // Room to spare in both: an LRU map may evict (or refuse)
            // before it is full, as its free entries are spread over
            // per-CPU lists; a thread that moves to another CPU finds
            // them on the first one's list (seen in the 6.1 VM with 64).
            conntrack: 256,
            embryonic: 256,
            affinity: 64,
            src_ranges: 64,
            maglev_slots: 1 << 16,
        },
        lb_tests::fixture::TABLE_SIZE,
    );
    dp.apply(&[service(
        "web",
        Protocol::Tcp,
        &[
            ("10.99.0.1", 30080, NodePort),
            ("10.96.0.10", 80, ClusterIp),
        ],
        &[("10.244.1.10", 8080, true)],
    )]);
    // Established flows: 32, two entries each.
    let front = addr("10.96.0.10:80");
    let backend = addr("10.244.1.10:8080");
    let clients: Vec<SocketAddrV4> = (0..32)
        .map(|i| addr(&format!("10.244.2.{}:40500", 20 + i)))
        .collect();
    for c in &clients {
        dp.run(TcPod, &Packet::tcp(*c, front, flags::SYN, b"").bytes());
        let greeting = Packet::tcp(backend, *c, flags::ACK, b"hello");
        dp.run(TcPod, &greeting.bytes());
    }
    assert_eq!(dp.maps.conntrack.keys().count(), 64);
    // 2000 SYNs from as many spoofed sources, never answered.
    for i in 0..2000u32 {
        let src = SocketAddrV4::new(
            std::net::Ipv4Addr::from(0x0a32_0000 + i),
            1024 + (i % 60000) as u16,
        );
        let syn = Packet::tcp(src, addr("10.99.0.1:30080"), flags::SYN, b"");
        assert_eq!(dp.run(XdpNode, &syn.bytes()).0, XDP_PASS);
    }
    // Every established flow is still there and translated both ways.
    assert_eq!(
        dp.maps.conntrack.keys().count(),
        64,
        "no established entry lost"
    );
    let hits = counter(&dp, "ct_hit");
    for c in &clients {
        let ack = Packet::tcp(*c, front, flags::ACK, b"x");
        assert_eq!(
            dp.run(TcPod, &ack.bytes()).1,
            ack.with_addrs(*c, backend).bytes()
        );
        let data = Packet::tcp(backend, *c, flags::ACK, b"y");
        assert_eq!(
            dp.run(TcPod, &data.bytes()).1,
            data.with_addrs(front, *c).bytes()
        );
    }
    assert_eq!(counter(&dp, "ct_hit"), hits + 64);
    let embryonic = dp.maps.ct_embryo.keys().count() as u64;
    let evicted = counter(&dp, "ct_embryo_insert") - counter(&dp, "ct_embryo_remove") - embryonic;
    assert!(embryonic <= 256, "{embryonic}");
    assert!(evicted >= 4000 - 256, "the flood evicted itself: {evicted}");
    assert_eq!(
        counter(&dp, "ct_insert") - counter(&dp, "ct_remove"),
        64,
        "nothing evicted from the main map"
    );
}

#[test]
fn tables_rewritten_again_and_again_in_a_small_slot_array_lead_only_to_live_backends() {
    use lb_agent::datapath::programs::MapSizes;
    // Room for four tables of 251 slots (256 with rounding): two Service
    // ports in use, so every change reuses the region of a replaced table,
    // which the store may hand out only after a grace period.
    let mut dp = Datapath::with_sizes(
        MapSizes {
            services: 64,
            backends: 64,
            conntrack: 4096,
            embryonic: 4096,
            affinity: 64,
            src_ranges: 64,
            maglev_slots: 4 * 256,
        },
        lb_tests::fixture::TABLE_SIZE,
    );
    let pool = [
        "10.244.1.10",
        "10.244.1.11",
        "10.244.1.12",
        "10.244.2.10",
        "10.244.2.11",
    ];
    let front = addr("10.96.0.10:80");
    for round in 0..60u16 {
        // A different backend set each round: one to three of the pool.
        let live: Vec<&str> = (0..pool.len())
            .filter(|i| (usize::from(round) + i) % 3 != 0 || *i == usize::from(round) % 5)
            .map(|i| pool[i])
            .collect();
        let eps: Vec<(&str, u16, bool)> = live.iter().map(|a| (*a, 8080, false)).collect();
        dp.apply(&[
            service("web", Protocol::Tcp, &[("10.96.0.10", 80, ClusterIp)], &eps),
            service(
                "dns",
                Protocol::Udp,
                &[("10.96.0.53", 53, ClusterIp)],
                &eps[..1],
            ),
        ]);
        for j in 0..8u16 {
            let client = SocketAddrV4::new(
                std::net::Ipv4Addr::new(10, 244, 9, 1),
                20000 + round * 8 + j,
            );
            let syn = Packet::tcp(client, front, flags::SYN, b"");
            let (_, out) = dp.run(TcPod, &syn.bytes());
            assert!(
                live.iter()
                    .any(|b| { out == syn.with_addrs(client, addr(&format!("{b}:8080"))).bytes() }),
                "round {round}: a new flow went to none of {live:?}"
            );
        }
    }
}

#[test]
fn a_syn_flood_its_backend_answers_with_syn_acks_establishes_none_of_its_flows() {
    let mut dp = seeded();
    let front = addr("10.99.0.1:30080");
    // Spoofed SYNs to the NodePort, each answered by the backend's kernel
    // (as a listening socket answers any SYN), and translated back.
    for i in 0..200u32 {
        let src = SocketAddrV4::new(std::net::Ipv4Addr::from(0x0a33_0000 + i), 40000);
        let syn = Packet::tcp(src, front, flags::SYN, b"");
        let (_, out) = dp.run(XdpNode, &syn.bytes());
        let Some(to) = dst_of(&out) else {
            panic!("SYN from {src} not translated")
        };
        let synack = Packet::tcp(to, src, flags::SYN | flags::ACK, b"");
        let (_, out) = dp.run(TcPod, &synack.bytes());
        // A NodePort's reply is forwarded by the datapath: one hop less.
        let mut want = synack.with_addrs(front, src);
        want.ttl = 63;
        assert_eq!(out, want.bytes(), "from {to}");
        // A backend that refuses (a closed port) answers with RST: no more.
        let rst = Packet::tcp(to, src, flags::RST, b"");
        dp.run(TcPod, &rst.bytes());
    }
    assert_eq!(dp.maps.conntrack.keys().count(), 0, "nothing established");
    assert_eq!(counter(&dp, "ct_established"), 0);
    assert_eq!(counter(&dp, "ct_insert"), 0);
}

/// The destination of an Ethernet/IPv4 (no options) TCP or UDP frame.
fn dst_of(frame: &[u8]) -> Option<SocketAddrV4> {
    let ip: [u8; 4] = frame.get(30..34)?.try_into().ok()?;
    let port = frame.get(36..38)?;
    Some(SocketAddrV4::new(
        ip.into(),
        u16::from_be_bytes([port[0], port[1]]),
    ))
}

#[test]
fn a_one_way_udp_stream_is_established_once_it_has_sent_for_a_second() {
    let mut dp = seeded();
    let client = addr("10.244.2.20:40620");
    let query = Packet::udp(client, addr("10.96.0.53:53"), b"q");
    let (_, first) = dp.run(TcPod, &query.bytes());
    // Within its first second it stays embryonic, however many it sends.
    for _ in 0..10 {
        assert_eq!(dp.run(TcPod, &query.bytes()).1, first);
    }
    assert_eq!(dp.maps.ct_embryo.keys().count(), 2, "both directions");
    assert_eq!(dp.maps.conntrack.keys().count(), 0);
    // Still sending after a second (within the embryonic timeout): both
    // entries move, and the translation is the same.
    dp.age_flows(2);
    assert_eq!(dp.run(TcPod, &query.bytes()).1, first);
    assert_eq!(dp.maps.conntrack.keys().count(), 2, "established");
    assert_eq!(dp.maps.ct_embryo.keys().count(), 0);
    assert_eq!(counter(&dp, "ct_established"), 1);
    // A stream that paused longer than the embryonic timeout starts again
    // instead (to the same backend).
    let other = addr("10.244.2.20:40621");
    let query = Packet::udp(other, addr("10.96.0.53:53"), b"q");
    let (_, first) = dp.run(TcPod, &query.bytes());
    dp.set_embryonic_timeout(5);
    dp.age_flows(6);
    assert_eq!(dp.run(TcPod, &query.bytes()).1, first);
    assert_eq!(counter(&dp, "ct_established"), 1, "no second establishment");
    assert_eq!(counter(&dp, "new_flow"), 3);
}

#[test]
fn a_dsr_flows_entry_where_it_is_wrapped_is_embryonic_then_established_after_a_second() {
    use lb_tests::fixture::in_private_netns;
    in_private_netns(ROUTED, || {
        let front = addr("10.99.0.1:30080");
        let client = addr("10.99.0.100:40330");
        let mut dp = remote_nodeport();
        dp.set_config_flags(lb_common::config::CONFIG_F_DSR);
        let syn = Packet::tcp(client, front, flags::SYN, b"");
        let (verdict, wrapped) = dp.run(TcNode, &syn.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(counter(&dp, "dsr_encap"), 1);
        // This node never sees the backend's answers: the entry stays
        // embryonic while the handshake goes on (a spoofed SYN's stays so).
        let ack = Packet::tcp(client, front, flags::ACK, b"");
        let (_, ack_wrapped) = dp.run(TcNode, &ack.bytes());
        assert_eq!(dp.maps.ct_embryo.keys().count(), 1, "one forward entry");
        assert_eq!(dp.maps.conntrack.keys().count(), 0);
        // The client still sends a second later: established, same wrap.
        dp.age_flows(2);
        assert_eq!(dp.run(TcNode, &ack.bytes()).1, ack_wrapped);
        assert_eq!(dp.maps.conntrack.keys().count(), 1, "established");
        assert_eq!(dp.maps.ct_embryo.keys().count(), 0);
        assert_eq!(counter(&dp, "ct_established"), 1);
        assert_eq!(counter(&dp, "dsr_encap"), 3);
        assert_ne!(wrapped, ack_wrapped);
    });
}

/// The conntrack key of a TCP packet from `src` to `dst`.
fn tcp_key(src: SocketAddrV4, dst: SocketAddrV4) -> lb_common::CtKey {
    let be = |a: SocketAddrV4| {
        (
            [u32::from_ne_bytes(a.ip().octets()), 0, 0, 0],
            a.port().to_be(),
        )
    };
    let ((saddr_be, sport_be), (daddr_be, dport_be)) = (be(src), be(dst));
    lb_common::CtKey {
        saddr_be,
        daddr_be,
        sport_be,
        dport_be,
        proto: lb_common::proto::TCP,
        family: lb_common::family::V4,
        _pad: [0; 2],
    }
}

/// The SNAT source (address, port) the flow from `client` to `front` was
/// given: its forward entry's rewrite.
fn snat_source(dp: &Datapath, client: SocketAddrV4, front: SocketAddrV4) -> Option<SocketAddrV4> {
    let key = tcp_key(client, front);
    let v = dp
        .maps
        .conntrack
        .get(&key, 0)
        .or_else(|_| dp.maps.ct_embryo.get(&key, 0))
        .ok()?;
    Some(SocketAddrV4::new(
        v.nat_saddr_be[0].to_ne_bytes().into(),
        u16::from_be(v.nat_sport_be),
    ))
}

/// The SNAT ports held by flows to `backend`: the destination ports of its
/// reply entries, established and embryonic, sorted.
fn held_ports(dp: &Datapath, backend: SocketAddrV4) -> Vec<u16> {
    let addr = [u32::from_ne_bytes(backend.ip().octets()), 0, 0, 0];
    let mut out: Vec<u16> = dp
        .maps
        .conntrack
        .iter()
        .chain(dp.maps.ct_embryo.iter())
        .map(|e| e.expect("read conntrack"))
        .filter(|(k, v)| {
            v.flags & lb_common::conntrack::CT_F_REPLY != 0
                && k.saddr_be == addr
                && k.sport_be == backend.port().to_be()
        })
        .map(|(k, _)| u16::from_be(k.dport_be))
        .collect();
    out.sort_unstable();
    out
}

#[test]
fn a_backend_gets_snat_ports_until_its_range_is_truly_exhausted_and_others_keep_theirs() {
    use lb_tests::fixture::in_private_netns;
    in_private_netns(ROUTED, || {
        let mut dp = Datapath::new();
        dp.apply(&[
            service(
                "web",
                Protocol::Tcp,
                &[("10.99.0.1", 30080, NodePort)],
                &[("10.244.2.10", 8080, false)],
            ),
            service(
                "api",
                Protocol::Tcp,
                &[("10.99.0.1", 30081, NodePort)],
                &[("10.244.2.11", 8080, false)],
            ),
        ]);
        // 40 ports, less the 10 the node's own sockets take: 30 per
        // backend, fewer than a new flow's 32 probes, so each new flow sees
        // the whole range and a refusal means it is truly exhausted.
        dp.set_snat_ports((40000, 40039), (40010, 40019));
        let usable: Vec<u16> = (40000..40010).chain(40020..40040).collect();
        let node = std::net::Ipv4Addr::new(10, 99, 0, 1);
        let (web, web_backend) = (addr("10.99.0.1:30080"), addr("10.244.2.10:8080"));
        let client = |i: u16| addr(&format!("10.99.0.100:{}", 41000 + i));

        // Every port, handed out in order from the backend's cursor; each
        // flow is established by its backend's first packet past the
        // handshake.
        let mut given = Vec::new();
        for i in 0..30 {
            let syn = Packet::tcp(client(i), web, flags::SYN, b"");
            assert_eq!(dp.run(TcNode, &syn.bytes()).0, TC_ACT_REDIRECT, "flow {i}");
            let src = snat_source(&dp, client(i), web).expect("SNATed");
            assert_eq!(*src.ip(), node);
            let synack = Packet::tcp(web_backend, src, flags::SYN | flags::ACK, b"");
            assert_eq!(dp.run(TcNode, &synack.bytes()).0, TC_ACT_REDIRECT);
            // Past the handshake: the backend's greeting establishes it.
            let hello = Packet::tcp(web_backend, src, flags::ACK | flags::PSH, b"hi");
            assert_eq!(dp.run(TcNode, &hello.bytes()).0, TC_ACT_REDIRECT);
            given.push(src.port());
        }
        let first = usable
            .iter()
            .position(|p| *p == given[0])
            .expect("a port of the range");
        let in_order: Vec<u16> = (0..30).map(|i| usable[(first + i) % 30]).collect();
        assert_eq!(given, in_order, "in order, skipping 40010-40019");
        assert_eq!(held_ports(&dp, web_backend), usable);
        assert_eq!(counter(&dp, "ct_established"), 30);

        // The range is exhausted: the next flow is refused, visibly.
        let syn = Packet::tcp(client(30), web, flags::SYN, b"");
        assert_eq!(dp.run(TcNode, &syn.bytes()).0, TC_ACT_SHOT);
        assert_eq!(counter(&dp, "drop_snat_exhausted"), 1);
        assert_eq!(service_counters(&dp, "default/web/TCP").drops, 1);
        assert_eq!(snat_source(&dp, client(30), web), None);

        // Another backend has its own range.
        let api = addr("10.99.0.1:30081");
        let syn = Packet::tcp(client(0), api, flags::SYN, b"");
        assert_eq!(dp.run(TcNode, &syn.bytes()).0, TC_ACT_REDIRECT);
        let api_port = snat_source(&dp, client(0), api).expect("SNATed").port();
        assert!(usable.contains(&api_port), "{api_port}");
        assert_eq!(held_ports(&dp, addr("10.244.2.11:8080")), [api_port]);

        // Three flows close (FIN both ways) and outlive TIME_WAIT (60 s
        // here): their ports, scattered over the range, are free again,
        // and exactly those go to the next flows; then it is full again.
        let closed = [4u16, 13, 27];
        let mut freed = Vec::new();
        for i in closed {
            let src = snat_source(&dp, client(i), web).expect("SNATed");
            let fin = Packet::tcp(client(i), web, flags::FIN | flags::ACK, b"");
            assert_eq!(dp.run(TcNode, &fin.bytes()).0, TC_ACT_REDIRECT);
            let fin = Packet::tcp(web_backend, src, flags::FIN | flags::ACK, b"");
            assert_eq!(dp.run(TcNode, &fin.bytes()).0, TC_ACT_REDIRECT);
            dp.age_entry(&tcp_key(client(i), web), 120);
            dp.age_entry(&tcp_key(web_backend, src), 120);
            freed.push(src.port());
        }
        let removed = counter(&dp, "ct_remove");
        let mut reused = Vec::new();
        for i in 100..103 {
            let syn = Packet::tcp(client(i), web, flags::SYN, b"");
            assert_eq!(dp.run(TcNode, &syn.bytes()).0, TC_ACT_REDIRECT, "flow {i}");
            reused.push(snat_source(&dp, client(i), web).expect("SNATed").port());
        }
        reused.sort_unstable();
        freed.sort_unstable();
        assert_eq!(reused, freed, "the closed flows' ports, and only those");
        assert_eq!(
            counter(&dp, "ct_remove") - removed,
            6,
            "both entries of each closed flow"
        );
        for i in closed {
            assert_eq!(snat_source(&dp, client(i), web), None, "flow {i} is gone");
        }
        assert_eq!(held_ports(&dp, web_backend), usable);
        let syn = Packet::tcp(client(103), web, flags::SYN, b"");
        assert_eq!(dp.run(TcNode, &syn.bytes()).0, TC_ACT_SHOT);
        assert_eq!(counter(&dp, "drop_snat_exhausted"), 2);

        // Live flows kept their ports throughout.
        let ack = Packet::tcp(client(0), web, flags::ACK, b"x");
        let (verdict, out) = dp.run(TcNode, &ack.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let mut want = ack.with_addrs(SocketAddrV4::new(node, given[0]), web_backend);
        (want.ttl, want.src_mac, want.dst_mac) = (63, MAC_D0, MAC_NODE_B);
        assert_eq!(out, want.bytes());
    });
}

/// A second network on the forwarding tests' node: `d2` with 10.98.0.1,
/// the way to the pods of a third node (10.244.3.0/24, behind 10.98.0.2).
const SECOND_WIRE: &[&[&str]] = &[
    &[
        "link",
        "add",
        "d2",
        "address",
        "02:00:00:00:00:d2",
        "type",
        "veth",
        "peer",
        "d3",
    ],
    &["addr", "add", "10.98.0.1/24", "dev", "d2"],
    &["link", "set", "d3", "up"],
    &["link", "set", "d2", "up"],
    &["route", "add", "10.244.3.0/24", "via", "10.98.0.2"],
    &[
        "neigh",
        "add",
        "10.98.0.2",
        "lladdr",
        "02:00:00:00:00:03",
        "dev",
        "d2",
        "nud",
        "permanent",
    ],
];
const MAC_D2: [u8; 6] = [2, 0, 0, 0, 0, 0xd2];
const MAC_NODE_C: [u8; 6] = [2, 0, 0, 0, 0, 0x03];

#[test]
fn snat_takes_the_address_of_the_interface_the_flow_leaves_by() {
    use lb_tests::fixture::in_private_netns;
    let setup: Vec<&[&str]> = ROUTED.iter().chain(SECOND_WIRE).copied().collect();
    in_private_netns(&setup, || {
        let mut dp = Datapath::new();
        dp.apply(&[
            service(
                "web",
                Protocol::Tcp,
                &[("10.99.0.1", 30080, NodePort)],
                &[("10.244.2.10", 8080, false)],
            ),
            service(
                "far",
                Protocol::Tcp,
                &[("10.99.0.1", 30082, NodePort)],
                &[("10.244.3.10", 8080, false)],
            ),
        ]);
        let d2 = lb_agent::datapath::programs::ifindex("d2").expect("d2");
        let second: std::net::IpAddr = "10.98.0.1".parse().expect("addr");
        dp.maps
            .set_iface_addrs(&[(d2, second)])
            .expect("write interface addresses");
        let (far, backend) = (addr("10.99.0.1:30082"), addr("10.244.3.10:8080"));
        let client = addr("10.99.0.100:40500");

        // Out by d2, from d2's address; the reply, to that address, goes
        // back to the client from the frontend.
        let syn = Packet::tcp(client, far, flags::SYN, b"");
        let (verdict, out) = dp.run(TcNode, &syn.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let src = snat_source(&dp, client, far).expect("SNATed");
        assert_eq!(src.ip().to_string(), "10.98.0.1");
        let mut want = syn.with_addrs(src, backend);
        (want.ttl, want.src_mac, want.dst_mac) = (63, MAC_D2, MAC_NODE_C);
        assert_eq!(out, want.bytes(), "SNATed to d2's address, out d2");
        verify_checksums(&out).unwrap_or_else(|e| panic!("{e}"));
        let synack = Packet::tcp(backend, src, flags::SYN | flags::ACK, b"");
        let (verdict, out) = dp.run(TcNode, &synack.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let mut want = synack.with_addrs(far, client);
        (want.ttl, want.src_mac, want.dst_mac) = (63, MAC_D0, MAC_CLIENT);
        assert_eq!(out, want.bytes(), "the reply, from the frontend");

        // Out by d0, which the agent named no address for: the node's.
        let web = addr("10.99.0.1:30080");
        let syn = Packet::tcp(client, web, flags::SYN, b"");
        assert_eq!(dp.run(TcNode, &syn.bytes()).0, TC_ACT_REDIRECT);
        let src = snat_source(&dp, client, web).expect("SNATed");
        assert_eq!(src.ip().to_string(), "10.99.0.1");

        // The map is the agent's to keep: d2 leaves it, and d2's new flows
        // take the node's address too.
        dp.maps
            .set_iface_addrs(&[])
            .expect("write interface addresses");
        let other = addr("10.99.0.100:40501");
        let syn = Packet::tcp(other, far, flags::SYN, b"");
        assert_eq!(dp.run(TcNode, &syn.bytes()).0, TC_ACT_REDIRECT);
        let src = snat_source(&dp, other, far).expect("SNATed");
        assert_eq!(src.ip().to_string(), "10.99.0.1");
    });
}
/// An SCTP Service whose port differs from its endpoint's (so every new
/// flow rewrites a port and its CRC32c), with a NodePort, and one without
/// endpoints.
fn sctp_seeded() -> Datapath {
    let mut dp = Datapath::new();
    dp.apply(&[
        service(
            "sig",
            Protocol::Sctp,
            &[
                ("10.96.0.40", 3868, ClusterIp),
                ("10.99.0.1", 30868, NodePort),
            ],
            &[("10.244.1.12", 3869, true)],
        ),
        service(
            "gone",
            Protocol::Sctp,
            &[("10.96.0.41", 3868, ClusterIp)],
            &[],
        ),
    ]);
    dp
}

/// An SCTP DATA chunk of `n` payload bytes (TSN, stream, sequence, PPID,
/// then the payload).
fn sctp_data(src: SocketAddrV4, dst: SocketAddrV4, vtag: u32, n: usize) -> Packet {
    let mut value = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
    value.extend((0..n).map(|i| (i * 7 + 3) as u8));
    Packet::sctp(src, dst, vtag, sctp_chunk::DATA, &value)
}

#[test]
fn sctp_flows_are_translated_with_their_crc32c_updated_for_the_new_port() {
    let client = addr("10.244.2.20:40000");
    let outside = addr("10.99.0.100:40000");
    let (front, nodeport) = (addr("10.96.0.40:3868"), addr("10.99.0.1:30868"));
    let backend = addr("10.244.1.12:3869");
    // Lengths on both halves of the shift table (below and above 256).
    let inputs = |from: SocketAddrV4, to: SocketAddrV4| {
        [
            ("INIT", Packet::sctp_init(from, to, 0x0a0b_0c0d)),
            ("short DATA", sctp_data(from, to, 7, 1)),
            ("long DATA", sctp_data(from, to, 7, 1400)),
        ]
    };
    for prog in ALL {
        let from = if prog == TcPod { client } else { outside };
        for to in [front, nodeport] {
            for (name, input) in inputs(from, to) {
                let mut dp = sctp_seeded();
                let (verdict, out) = dp.run(prog, &input.bytes());
                assert_eq!(verdict, pass(prog), "{name} to {to}: {prog:?} verdict");
                // The builder computes the whole CRC32c of the expected
                // packet afresh.
                let want = input.with_addrs(from, backend).bytes();
                assert_eq!(out, want, "{name} to {to}: {prog:?} output bytes");
                verify_checksums(&out).unwrap_or_else(|e| panic!("{name}: {prog:?}: {e}"));
            }
        }
    }
}

#[test]
fn sctp_replies_are_reverse_translated_with_their_crc32c_updated() {
    let client = addr("10.244.2.20:40001");
    let (front, backend) = (addr("10.96.0.40:3868"), addr("10.244.1.12:3869"));
    for prog in [TcPod, XdpNode] {
        let mut dp = sctp_seeded();
        let init = Packet::sctp_init(client, front, 1);
        assert_eq!(dp.run(prog, &init.bytes()).0, pass(prog), "{prog:?}");
        for (name, reply) in [
            (
                "INIT ACK",
                Packet::sctp(backend, client, 1, sctp_chunk::INIT_ACK, &[0; 20]),
            ),
            ("long DATA", sctp_data(backend, client, 1, 900)),
        ] {
            let (verdict, out) = dp.run(prog, &reply.bytes());
            assert_eq!(verdict, pass(prog), "{name}: {prog:?}");
            assert_eq!(
                out,
                reply.with_addrs(front, client).bytes(),
                "{name}: {prog:?}"
            );
            verify_checksums(&out).unwrap_or_else(|e| panic!("{name}: {prog:?}: {e}"));
        }
    }
}

#[test]
fn sctp_flows_whose_replies_would_clash_get_a_source_port_and_crc_of_their_own() {
    for prog in [TcPod, XdpNode] {
        let mut dp = Datapath::new();
        let backend = addr("10.244.1.12:3868");
        dp.apply(&[
            service(
                "a",
                Protocol::Sctp,
                &[("10.96.0.40", 3868, ClusterIp)],
                &[("10.244.1.12", 3868, true)],
            ),
            service(
                "b",
                Protocol::Sctp,
                &[("10.96.0.42", 3868, ClusterIp)],
                &[("10.244.1.12", 3868, true)],
            ),
        ]);
        let client = addr("10.244.2.20:40002");
        let init_a = Packet::sctp_init(client, addr("10.96.0.40:3868"), 1);
        let (verdict, out) = dp.run(prog, &init_a.bytes());
        assert_eq!(verdict, pass(prog), "{prog:?}");
        // Address only: the CRC32c covers no pseudo-header, so it stays.
        assert_eq!(out, init_a.with_addrs(client, backend).bytes(), "{prog:?}");
        assert_eq!(out[42..46], init_a.bytes()[42..46], "{prog:?}: CRC32c");

        let init_b = Packet::sctp_init(client, addr("10.96.0.42:3868"), 2);
        let (verdict, out) = dp.run(prog, &init_b.bytes());
        assert_eq!(verdict, pass(prog), "{prog:?}");
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert_ne!(
            port,
            client.port(),
            "{prog:?}: the clashing flow kept its port"
        );
        let moved = SocketAddrV4::new(*client.ip(), port);
        assert_eq!(out, init_b.with_addrs(moved, backend).bytes(), "{prog:?}");
        verify_checksums(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
    }
}

#[test]
fn sctp_to_a_service_without_endpoints_gets_port_unreachable() {
    for prog in ALL {
        let mut dp = sctp_seeded();
        let init = Packet::sctp_init(addr("10.244.2.20:40003"), addr("10.96.0.41:3868"), 1);
        let input = init.bytes();
        let (verdict, out) = dp.run(prog, &input);
        assert_eq!(verdict, bounce(prog), "{prog:?}");
        verify_checksums(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
        assert_eq!(out[14 + 9], 1, "ICMP");
        assert_eq!(&out[26..30], &[10, 96, 0, 41], "from the frontend");
        assert_eq!((out[34], out[35]), (3, 3), "port unreachable");
        assert_eq!(&out[42..], &input[14..14 + 20 + 8], "quotes the INIT");
    }
}

#[test]
fn an_sctp_association_is_established_past_its_handshake_and_closes_on_abort() {
    use lb_common::conntrack::{CT_F_CLOSING, CT_F_REPLY};
    let mut dp = sctp_seeded();
    let client = addr("10.244.2.20:40004");
    let (front, backend) = (addr("10.96.0.40:3868"), addr("10.244.1.12:3869"));
    let run = |dp: &mut Datapath, p: Packet| {
        assert_eq!(dp.run(TcPod, &p.bytes()).0, TC_ACT_OK);
    };
    run(&mut dp, Packet::sctp_init(client, front, 1));
    // The endpoint answers every INIT, spoofed ones too: still embryonic.
    run(
        &mut dp,
        Packet::sctp(backend, client, 1, sctp_chunk::INIT_ACK, &[0; 20]),
    );
    assert_eq!(
        ct_entries(&dp.maps.ct_embryo).len(),
        2,
        "embryonic after INIT ACK"
    );
    assert!(ct_entries(&dp.maps.conntrack).is_empty());
    run(
        &mut dp,
        Packet::sctp(client, front, 2, sctp_chunk::COOKIE_ECHO, &[0; 8]),
    );
    run(
        &mut dp,
        Packet::sctp(backend, client, 1, sctp_chunk::COOKIE_ACK, &[]),
    );
    let established = ct_entries(&dp.maps.conntrack);
    assert_eq!(established.len(), 2, "established by the COOKIE ACK");
    assert!(established.iter().all(|(_, v)| v.flags & CT_F_CLOSING == 0));
    // An ABORT from the backend closes the flow as a RST would.
    run(
        &mut dp,
        Packet::sctp(backend, client, 1, sctp_chunk::ABORT, &[]),
    );
    let fwd = ct_entries(&dp.maps.conntrack)
        .into_iter()
        .find(|(_, v)| v.flags & CT_F_REPLY == 0)
        .expect("forward entry");
    assert_ne!(fwd.1.flags & CT_F_CLOSING, 0, "ABORT closes the flow");
}

#[test]
fn an_address_only_sctp_translation_needs_no_checksum_program_and_a_port_rewrite_without_one_is_dropped(
) {
    use lb_common::maps::{SCTP_CRC_TC, SCTP_CRC_XDP};
    let client = addr("10.244.2.20:40005");
    for prog in ALL {
        let mut dp = Datapath::new();
        dp.apply(&[
            service(
                "same",
                Protocol::Sctp,
                &[("10.96.0.40", 3868, ClusterIp)],
                &[("10.244.1.12", 3868, true)],
            ),
            service(
                "moved",
                Protocol::Sctp,
                &[("10.96.0.42", 3868, ClusterIp)],
                &[("10.244.1.13", 3869, true)],
            ),
        ]);
        // As before an agent has filled the program arrays.
        for array in [SCTP_CRC_XDP, SCTP_CRC_TC] {
            let map = dp.progs.map_mut(array).expect("program array");
            aya::maps::ProgramArray::try_from(map)
                .expect("a program array")
                .clear_index(&0)
                .expect("empty the slot");
        }
        let same = Packet::sctp_init(client, addr("10.96.0.40:3868"), 1);
        let (verdict, out) = dp.run(prog, &same.bytes());
        assert_eq!(verdict, pass(prog), "{prog:?}: address only");
        assert_eq!(
            out,
            same.with_addrs(client, addr("10.244.1.12:3868")).bytes(),
            "{prog:?}"
        );
        assert_eq!(counter(&dp, "drop_rewrite"), 0, "{prog:?}");
        let moved = Packet::sctp_init(client, addr("10.96.0.42:3868"), 1);
        let (verdict, _) = dp.run(prog, &moved.bytes());
        assert_eq!(verdict, drop_verdict(prog), "{prog:?}: port rewritten");
        assert_eq!(counter(&dp, "drop_rewrite"), 1, "{prog:?}");
        // Nothing of the dropped packet's update is left for the next one.
        let again = Packet::sctp_init(addr("10.244.2.20:40006"), addr("10.96.0.40:3868"), 2);
        assert_eq!(dp.run(prog, &again.bytes()).0, pass(prog), "{prog:?}");
    }
}

#[test]
fn sctp_wrapped_for_dsr_is_unwrapped_with_its_port_and_crc32c_rewritten() {
    use lb_common::dsr::SHIM_MAGIC;
    use lb_tests::packet::dsr_wrap;
    let client = addr("10.99.0.100:40201");
    let frontend = addr("10.99.0.2:30868");
    let backend = addr("10.244.1.12:3869");
    let inner = sctp_data(client, frontend, 7, 300);
    let other_node = *frontend.ip();
    let wrapped = dsr_wrap(
        &inner.bytes(),
        other_node,
        "10.99.0.1".parse::<std::net::Ipv4Addr>().expect("addr"),
        backend,
        SHIM_MAGIC,
    );
    for prog in [XdpNode, TcNode] {
        let mut dp = sctp_seeded();
        let peers = ["10.99.0.2/31".parse().expect("cidr")];
        dp.maps.set_dsr_peers(&peers).expect("write DSR peers");
        let (verdict, out) = dp.run(prog, &wrapped);
        assert_eq!(verdict, pass(prog), "{prog:?}");
        assert_eq!(out, inner.with_addrs(client, backend).bytes(), "{prog:?}");
        verify_checksums(&out).unwrap_or_else(|e| panic!("{prog:?}: {e}"));
    }
}
