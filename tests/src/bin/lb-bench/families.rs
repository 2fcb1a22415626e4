//! Figure 1's IPv6 rows: the per-packet cost of figure 1's cases over IPv6
//! beside the same cases over IPv4, and their ratio.
//!
//! One datapath holds two Services of the same shape (a ClusterIP and a
//! NodePort, backends on this node), one per family; every run measures
//! each case over both families back to back, so that the ratio compares
//! figures taken under the same load.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use lb_agent::{
    datapath::programs::TestProgram,
    model::{FrontendKind, Protocol},
};
use lb_tests::{
    fixture::{service, Datapath},
    packet::{flags, Packet, Packet6},
};

use crate::{
    datapath::{time_packets, Params},
    report::{Report, Verdict},
    stats::Stat,
};

/// Backends per Service, as in the rest of figure 1.
const BACKENDS: usize = 10;
/// The target: IPv6 within 10% of IPv4, per case.
const TARGET: f64 = 1.10;

/// The cases compared: figure 1's, less the non-Service packet (no
/// translation to compare).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    XdpNodePortEstablished,
    XdpNodePortNew,
    TcClusterIpEstablished,
    TcClusterIpNew,
    ReverseNat,
}

const CASES: [Case; 5] = [
    Case::XdpNodePortEstablished,
    Case::XdpNodePortNew,
    Case::TcClusterIpEstablished,
    Case::TcClusterIpNew,
    Case::ReverseNat,
];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::XdpNodePortEstablished => "XDP NodePort, established flow",
            Case::XdpNodePortNew => "XDP NodePort, new flow",
            Case::TcClusterIpEstablished => "TC ClusterIP, established flow",
            Case::TcClusterIpNew => "TC ClusterIP, new flow",
            Case::ReverseNat => "reverse NAT (TC, backend reply)",
        }
    }

    fn is_new(self) -> bool {
        matches!(self, Case::XdpNodePortNew | Case::TcClusterIpNew)
    }

    fn program(self) -> TestProgram {
        match self {
            Case::XdpNodePortEstablished | Case::XdpNodePortNew => TestProgram::XdpNode,
            _ => TestProgram::TcPod,
        }
    }
}

/// One family's addresses: the Service's frontends, its backends' network
/// and the clients'.
struct Family {
    v6: bool,
    cluster_ip: SocketAddr,
    node_port: SocketAddr,
    external_client: SocketAddr,
    pod_client: SocketAddr,
}

impl Family {
    fn of(v6: bool) -> Self {
        let sa = |s: &str| s.parse().expect("bench address");
        if v6 {
            Self {
                v6,
                cluster_ip: sa("[fd00:96::10]:80"),
                node_port: sa("[fd00:99::1]:30080"),
                external_client: sa("[fd00:50::1]:40000"),
                pod_client: sa("[fd00:244:2::20]:40000"),
            }
        } else {
            Self {
                v6,
                cluster_ip: sa("10.96.0.10:80"),
                node_port: sa("10.99.0.1:30080"),
                external_client: sa("10.50.0.1:40000"),
                pod_client: sa("10.244.2.20:40000"),
            }
        }
    }

    /// Backend `j`, a pod on this node (a remote one needs a FIB route,
    /// which test runs lack).
    fn backend(&self, j: usize) -> IpAddr {
        let j = j as u8;
        if self.v6 {
            Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, u16::from(j) + 1).into()
        } else {
            Ipv4Addr::new(10, 128, 0, j + 1).into()
        }
    }

    /// The source of new flow `k`: a distinct address and port each.
    fn new_client(&self, external: bool, k: u32) -> SocketAddr {
        let port = 1024 + (k & 63) as u16 * 512 + 7;
        let [_, _, hi, lo] = (k >> 6).to_be_bytes();
        let ip: IpAddr = match (self.v6, external) {
            (true, true) => Ipv6Addr::new(0xfd00, 0x51, 0, 0, 0, 0, 0, (k >> 6) as u16).into(),
            (true, false) => Ipv6Addr::new(0xfd00, 0x245, 0, 0, 0, 0, 0, (k >> 6) as u16).into(),
            (false, true) => Ipv4Addr::new(10, 51, hi, lo).into(),
            (false, false) => Ipv4Addr::new(10, 245, hi, lo).into(),
        };
        SocketAddr::new(ip, port)
    }
}

/// A TCP segment of either family (both ends of one family).
fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => Packet::tcp(s, d, flags, b"").bytes(),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => Packet6::tcp(s, d, flags, b"").bytes(),
        _ => panic!("a flow is of one family: {src} → {dst}"),
    }
}

/// The source and destination of an Ethernet/IPv4 or Ethernet/IPv6 (no
/// extension headers) TCP frame.
fn ends(frame: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let (src, dst, l4): (IpAddr, IpAddr, usize) = match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ihl = usize::from(*frame.get(14)? & 0x0f) * 4;
            let s: [u8; 4] = frame.get(26..30)?.try_into().ok()?;
            let d: [u8; 4] = frame.get(30..34)?.try_into().ok()?;
            (s.into(), d.into(), 14 + ihl)
        }
        [0x86, 0xdd] => {
            let s: [u8; 16] = frame.get(22..38)?.try_into().ok()?;
            let d: [u8; 16] = frame.get(38..54)?.try_into().ok()?;
            (s.into(), d.into(), 54)
        }
        _ => return None,
    };
    let p = frame.get(l4..l4 + 4)?;
    Some((
        SocketAddr::new(src, u16::from_be_bytes([p[0], p[1]])),
        SocketAddr::new(dst, u16::from_be_bytes([p[2], p[3]])),
    ))
}

/// One family's established flows and the packets of each case.
struct Flows {
    fam: Family,
    np_ack: Vec<u8>,
    cip_ack: Vec<u8>,
    reply: Vec<u8>,
    next_flow: u32,
}

impl Flows {
    /// Opens a NodePort and a ClusterIP flow of the family in `dp`, each
    /// established (the backend sends past the handshake), as figure 1's
    /// own set-up does.
    fn open(dp: &mut Datapath, fam: Family) -> Self {
        let syn = tcp(fam.external_client, fam.node_port, flags::SYN);
        let (_, out) = dp.run(TestProgram::XdpNode, &syn);
        if let Some((src, dst)) = ends(&out) {
            dp.run(TestProgram::TcPod, &tcp(dst, src, flags::ACK));
        }
        let np_ack = tcp(fam.external_client, fam.node_port, flags::ACK);
        let syn = tcp(fam.pod_client, fam.cluster_ip, flags::SYN);
        let (_, out) = dp.run(TestProgram::TcPod, &syn);
        let chosen = ends(&out).map_or(SocketAddr::new(fam.backend(0), 8080), |(_, d)| d);
        let reply = tcp(chosen, fam.pod_client, flags::ACK);
        dp.run(TestProgram::TcPod, &reply);
        let cip_ack = tcp(fam.pod_client, fam.cluster_ip, flags::ACK);
        Self {
            fam,
            np_ack,
            cip_ack,
            reply,
            next_flow: 0,
        }
    }

    /// A SYN of a flow never seen.
    fn new_flow(&mut self, case: Case) -> Vec<u8> {
        self.next_flow += 1;
        let external = case == Case::XdpNodePortNew;
        let src = self.fam.new_client(external, self.next_flow);
        let dst = if external {
            self.fam.node_port
        } else {
            self.fam.cluster_ip
        };
        tcp(src, dst, flags::SYN)
    }

    fn packet(&self, case: Case) -> &[u8] {
        match case {
            Case::XdpNodePortEstablished => &self.np_ack,
            Case::TcClusterIpEstablished => &self.cip_ack,
            _ => &self.reply,
        }
    }

    /// One measurement of `case`: mean kernel ns per packet, and the
    /// verdict (figure 1's method: repeated runs, or single runs of new
    /// flows).
    fn measure(&mut self, dp: &mut Datapath, case: Case, p: &Params) -> (f64, u32) {
        let fresh: Vec<Vec<u8>> = if case.is_new() {
            (0..p.singles).map(|_| self.new_flow(case)).collect()
        } else {
            Vec::new()
        };
        let steady = self.packet(case).to_vec();
        time_packets(dp, case.program(), &fresh, &steady, p.repeat)
    }
}

/// The two Services, one per family, of the same shape.
fn seeded() -> Datapath {
    let mut dp = Datapath::new();
    let svcs: Vec<_> = [false, true]
        .into_iter()
        .map(|v6| {
            let fam = Family::of(v6);
            let backends: Vec<String> = (0..BACKENDS).map(|j| fam.backend(j).to_string()).collect();
            let eps: Vec<(&str, u16, bool)> =
                backends.iter().map(|a| (a.as_str(), 8080, true)).collect();
            let (cip, np) = (
                fam.cluster_ip.ip().to_string(),
                fam.node_port.ip().to_string(),
            );
            service(
                if v6 { "web6" } else { "web4" },
                Protocol::Tcp,
                &[
                    (cip.as_str(), fam.cluster_ip.port(), FrontendKind::ClusterIp),
                    (np.as_str(), fam.node_port.port(), FrontendKind::NodePort),
                ],
                &eps,
            )
        })
        .collect();
    dp.apply(&svcs);
    dp
}

/// Runs the IPv6 rows of figure 1, adding their section and summary row
/// to `report`.
pub fn run(p: &Params, report: &mut Report) {
    let mut dp = seeded();
    let mut v4 = Flows::open(&mut dp, Family::of(false));
    let mut v6 = Flows::open(&mut dp, Family::of(true));
    let mut ns: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; CASES.len()];
    let mut verdicts = vec![[0u32; 2]; CASES.len()];
    for run in 0..p.runs {
        for (c, case) in CASES.iter().enumerate() {
            // Each family goes first in every other run, so that what the
            // first leaves in the caches (or evicts) favours neither.
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for f in order {
                let flows = if f == 0 { &mut v4 } else { &mut v6 };
                let (t, v) = flows.measure(&mut dp, *case, p);
                ns[c][f].push(t);
                verdicts[c][f] = v;
            }
        }
    }
    let mut s = String::from("### IPv6 beside IPv4 (1 Service per family)\n\n");
    let _ = writeln!(
        s,
        "The same cases over each family, measured as above: one datapath holding two \
         Services of the same shape ({BACKENDS} backends on this node, a ClusterIP and a \
         NodePort), one IPv4 and one IPv6; each run measures a case over both families back to \
         back (IPv4 first in even runs, IPv6 in odd ones), and 'IPv6/IPv4' is the per-run ratio. Target: within 10% per \
         case. {} runs.\n\n| case | IPv4 ns/packet | IPv6 ns/packet | IPv6/IPv4 | verdicts (v4, v6) |\n|---|---|---|---|---|",
        p.runs
    );
    let mut worst: Option<(&str, Stat)> = None;
    for (c, case) in CASES.iter().enumerate() {
        let (Some(s4), Some(s6), Some(r)) = (
            Stat::of(&ns[c][0]),
            Stat::of(&ns[c][1]),
            Stat::ratio(&ns[c][1], &ns[c][0]),
        ) else {
            continue;
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {}, {} |",
            case.name(),
            s4.show(1),
            s6.show(1),
            r.show(3),
            verdicts[c][0],
            verdicts[c][1]
        );
        if worst.is_none_or(|(_, w)| r.median > w.median) {
            worst = Some((case.name(), r));
        }
    }
    s.push('\n');
    report.sections.push(s);
    let Some((name, r)) = worst else {
        report.row(
            "IPv6 per-packet cost vs IPv4",
            "-".into(),
            "≤ 1.10",
            Verdict::NotRun,
            "no case measured".into(),
        );
        return;
    };
    let ok = r.median <= TARGET;
    report.row(
        "IPv6 per-packet cost vs IPv4 (worst case)",
        r.show(3),
        "≤ 1.10",
        if ok { Verdict::Pass } else { Verdict::Miss },
        format!(
            "worst: {name}{}",
            if ok {
                String::new()
            } else {
                format!(
                    "; {:.0}% over: an IPv6 header is 40 bytes, its addresses four words to \
                     hash, compare and checksum",
                    (r.median - 1.0) * 100.0
                )
            }
        ),
    );
}
