//! A SYN flood against a NodePort while real connections go through it
//! (docs/architecture.md, Connection tracking): the scenario of the flood
//! test (tests/tests/hostile.rs) and of the benchmark's flood row, so that
//! both measure one thing.
//!
//! node-a's agent runs with a small `--conntrack-size`; a TCP NodePort on
//! it has backends on node-a (DNAT) and node-b (SNAT). The client opens
//! long-lived connections, then keeps opening new ones while the
//! generator ([`crate::xdp::syn_flood`]) sends SYNs from random sources
//! in 10.77.0.0/16 to the NodePort. It runs in the fabric on the client's
//! port and hands each frame to the bridge (XDP_PASS), so the frames reach
//! node-a's `eth0` as an outside client's do. The backends answer every
//! SYN (a listening socket does, with SYN cookies once its queue is full);
//! the answers to the spoofed sources find no route on node-a and are
//! dropped there, so nothing leaves the rig.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    manifests::one_port,
    packet::{flags, Packet},
    rig::{
        http_get, in_ns, serve_all_pods, sh, tcp_hello, Cluster, ClusterSpec, EchoStream,
        POD_TCP_PORT,
    },
    xdp::{self, Prog},
};

/// The flooded NodePort.
pub const NODE_PORT: u16 = 30080;

/// Frames per BPF_PROG_TEST_RUN of the generator: small enough that the
/// new connections get the CPU between runs now and then.
const CHUNK: u32 = 16_384;

/// What to run.
#[derive(Clone, Debug)]
pub struct Spec {
    /// SYNs the generator sends.
    pub syns: u64,
    /// Connections open across the flood.
    pub long_lived: usize,
    /// node-a's `--conntrack-size`.
    pub conntrack_size: u32,
    /// node-a's `--conntrack-embryonic-size`.
    pub embryonic_size: u32,
    /// Pause between two new connections during the flood: bounds how
    /// many established entries the real connections themselves add.
    pub new_every: Duration,
    /// How long a new connection may take to get its greeting: long
    /// enough for one SYN retransmission (after 1 s), as a saturated
    /// node's backlog drops frames whoever sent them.
    pub new_timeout: Duration,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            syns: 1_000_000,
            long_lived: 200,
            conntrack_size: 16_384,
            embryonic_size: 65_536,
            new_every: Duration::from_millis(5),
            new_timeout: Duration::from_secs(3),
        }
    }
}

/// node-a's metrics, as scraped after the flood.
#[derive(Clone, Copy, Debug, Default)]
pub struct Metrics {
    /// `lb_service_new_flows_total` of the flooded Service port.
    pub new_flows: f64,
    /// `lb_conntrack_established_total`.
    pub established: f64,
    /// `lb_conntrack_evictions_total` (the main map).
    pub evictions: f64,
    /// `lb_conntrack_embryonic_evictions_total`.
    pub embryonic_evictions: f64,
    /// `lb_conntrack_embryonic_entries` after the flood (not a difference).
    pub embryonic_entries: f64,
}

/// What happened.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Long-lived connections opened before the flood.
    pub long_lived: usize,
    /// Of those, how many still echoed after it.
    pub long_lived_kept: usize,
    /// The first failure of a long-lived connection, if any.
    pub long_lived_error: Option<String>,
    /// New connections tried during the flood.
    pub new_tried: usize,
    /// Of those, how many got their greeting within `new_timeout`.
    pub new_ok: usize,
    /// SYNs the generator sent.
    pub syns: u64,
    /// How long the generator took to send them.
    pub flood_time: Duration,
    /// node-a's counters after the flood, minus before it.
    pub metrics: Metrics,
}

impl Outcome {
    /// SYNs per second sent.
    pub fn rate(&self) -> f64 {
        self.syns as f64 / self.flood_time.as_secs_f64()
    }

    /// The fraction of new connections served during the flood.
    pub fn served(&self) -> f64 {
        if self.new_tried == 0 {
            return 0.0;
        }
        self.new_ok as f64 / self.new_tried as f64
    }
}

/// The value of the sample `series` (name with labels, or the name and
/// the start of its labels `{`) in Prometheus text: the sum over every
/// line that starts so.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(series)?;
            let value = if series.ends_with('{') {
                rest.rsplit_once(' ')?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.parse::<f64>().ok()
        })
        .sum()
}

fn scrape(c: &Cluster) -> Metrics {
    let addr: SocketAddr = "127.0.0.1:10249".parse().expect("metrics address");
    let (_, text) = http_get(&c.node("a").ns, addr, "/metrics", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("scrape node-a's metrics: {e}"));
    Metrics {
        new_flows: sample(&text, "lb_service_new_flows_total{"),
        established: sample(&text, "lb_conntrack_established_total"),
        evictions: sample(&text, "lb_conntrack_evictions_total"),
        embryonic_evictions: sample(&text, "lb_conntrack_embryonic_evictions_total"),
        embryonic_entries: sample(&text, "lb_conntrack_embryonic_entries"),
    }
}

/// The interface's MAC address in namespace `ns`.
fn mac(ns: &str, ifname: &str) -> [u8; 6] {
    let text = sh(
        Some(ns),
        &["cat", &format!("/sys/class/net/{ifname}/address")],
    );
    let mut out = [0u8; 6];
    for (o, x) in out.iter_mut().zip(text.trim().split(':')) {
        *o = u8::from_str_radix(x, 16).unwrap_or_else(|e| panic!("MAC {text:?}: {e}"));
    }
    out
}

/// Runs the scenario; panics when the rig cannot be built or the flood
/// cannot be sent (a result is only returned for a run that happened).
pub fn run(spec: &Spec) -> Outcome {
    let mut c = Cluster::new(ClusterSpec::default().tag("flood"));
    let _servers = serve_all_pods(&c);
    let eps: Vec<(String, &str)> = c
        .pods()
        .iter()
        .map(|p| (p.addr.to_string(), p.node.as_str()))
        .collect();
    let eps: Vec<(&str, &str)> = eps.iter().map(|(a, n)| (a.as_str(), *n)).collect();
    c.write_manifest(
        "web.yaml",
        &one_port(
            "web",
            "10.96.0.80",
            80,
            POD_TCP_PORT,
            NODE_PORT,
            "TCP",
            &eps,
        ),
    );
    let (ct, embryo) = (
        spec.conntrack_size.to_string(),
        spec.embryonic_size.to_string(),
    );
    c.node_mut("a").start_agent(&[
        "--conntrack-size",
        &ct,
        "--conntrack-embryonic-size",
        &embryo,
    ]);
    c.node("a").wait_agent_ready(Duration::from_secs(60));

    let client = c.client_ns();
    let np = SocketAddr::new(c.node("a").addr.into(), NODE_PORT);
    let mut streams: Vec<EchoStream> = (0..spec.long_lived)
        .map(|_| EchoStream::open(&client, np, Duration::from_secs(5)))
        .collect();

    // The frame: a SYN to the NodePort on node-a's MAC, through the
    // bridge, which knows node-a's port from the start (no flooding to
    // every port while it learns).
    let fabric = c.fabric_ns();
    let a_mac = mac(&c.node("a").ns, "eth0");
    let a_mac_s = a_mac.map(|x| format!("{x:02x}")).join(":");
    sh(
        Some(&fabric),
        &[
            "bridge", "fdb", "replace", &a_mac_s, "dev", "na", "master", "static",
        ],
    );
    let mut syn = Packet::tcp(
        SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 40000),
        SocketAddrV4::new(c.node("a").addr, NODE_PORT),
        flags::SYN,
        b"",
    );
    syn.dst_mac = a_mac;
    syn.src_mac = mac(&client, "eth0");
    let frame = syn.bytes();
    let headers: [u8; xdp::TCP_HEADERS] =
        frame[..xdp::TCP_HEADERS].try_into().expect("a whole SYN");
    let gen = Prog::load("flood_gen", &xdp::syn_flood(&headers, xdp::Inject::Pass))
        .unwrap_or_else(|e| panic!("load the SYN generator: {e}"));

    let before = scrape(&c);
    let flooding = Arc::new(AtomicBool::new(true));
    let (tried, ok) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let prober = {
        let (flooding, tried, ok, client) =
            (flooding.clone(), tried.clone(), ok.clone(), client.clone());
        let (every, timeout) = (spec.new_every, spec.new_timeout);
        std::thread::spawn(move || {
            while flooding.load(Ordering::Relaxed) {
                let t = Instant::now();
                let served = tcp_hello(&client, np, timeout).is_ok();
                // A probe that ended with the flood says nothing about it.
                if flooding.load(Ordering::Relaxed) {
                    tried.fetch_add(1, Ordering::Relaxed);
                    ok.fetch_add(usize::from(served), Ordering::Relaxed);
                }
                std::thread::sleep(every.saturating_sub(t.elapsed()));
            }
        })
    };
    let (syns, flood_time) = in_ns(&fabric, || {
        let ifindex = lb_agent::datapath::programs::ifindex("client")
            .unwrap_or_else(|e| panic!("the client's fabric port: {e:#}"));
        let (mut sent, mut took) = (0u64, Duration::ZERO);
        while sent < spec.syns {
            took += gen
                .send(ifindex, &frame, CHUNK)
                .unwrap_or_else(|e| panic!("SYN generator (live frames): {e}"));
            sent += u64::from(CHUNK);
        }
        (sent, took)
    });
    flooding.store(false, Ordering::Relaxed);
    prober
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));

    let mut long_lived_error = None;
    let mut kept = 0;
    for (i, s) in streams.iter_mut().enumerate() {
        let msg = format!("after the flood {i}");
        match s.echo(&msg) {
            Ok(back) if back == msg => kept += 1,
            Ok(back) => {
                long_lived_error.get_or_insert(format!("stream {i}: echoed {back:?}"));
            }
            Err(e) => {
                long_lived_error.get_or_insert(format!("stream {i}: {e}"));
            }
        }
    }
    let after = scrape(&c);
    Outcome {
        long_lived: streams.len(),
        long_lived_kept: kept,
        long_lived_error,
        new_tried: tried.load(Ordering::Relaxed),
        new_ok: ok.load(Ordering::Relaxed),
        syns,
        flood_time,
        metrics: Metrics {
            new_flows: after.new_flows - before.new_flows,
            established: after.established - before.established,
            evictions: after.evictions - before.evictions,
            embryonic_evictions: after.embryonic_evictions - before.embryonic_evictions,
            embryonic_entries: after.embryonic_entries,
        },
    }
}
