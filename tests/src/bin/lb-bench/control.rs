//! Figure 4: the control plane at scale. An agent on N Services × 10
//! endpoints, from a manifests folder or from the Kubernetes API: time from
//! start to "lb-agent ready", its RSS, and how long a single endpoint
//! change takes from the file write (or the API's answer to the update)
//! until the pinned maps hold the new table.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::{Duration, Instant},
};

use lb_agent::datapath::maps::Maps;
use lb_common::ServiceKey;
use lb_tests::{
    apiserver::ApiServer,
    manifests::{docs, node, ready_on, service, slice},
    rig::{agent_bin, Cluster, ClusterSpec},
};

use crate::{
    kubeapi, realproxy,
    report::{Report, Verdict},
    stats::{quantile, Stat},
};

/// Where the agent reads its Services from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// A manifests folder, one file per Service.
    Manifests,
    /// The Kubernetes API: the project's test API server (in the rig's
    /// client namespace).
    Api,
}

impl From {
    fn label(self) -> &'static str {
        match self {
            Self::Manifests => "manifests",
            Self::Api => "API",
        }
    }
}

/// The API the agent reads in [`From::Api`].
enum Api {
    /// The project's test API server.
    Test(ApiServer),
    /// The real kube-apiserver.
    Real(kubeapi::RealApi),
}

impl Api {
    /// The real kube-apiserver if it can run here, else the test API
    /// server; with a sentence naming which and why.
    fn start(cluster: &Cluster) -> (Self, String) {
        match kubeapi::RealApi::start(&cluster.client_ns(), cluster.dir()) {
            Ok(api) => (
                Self::Real(api),
                "the real kube-apiserver v1.32.13 (from `../shared/k8s`) with etcd, in the rig's \
                 client namespace, over HTTPS; the agent authenticates as system:kube-proxy"
                    .to_owned(),
            ),
            Err(why) => {
                eprintln!("bench: figure 4: the real kube-apiserver cannot run ({why}); using the test API server");
                let addr = kubeapi::ADDR.parse().expect("API address");
                (
                    Self::Test(ApiServer::start(&cluster.client_ns(), addr, cluster.dir())),
                    format!(
                        "the project's test API server (`tests/src/apiserver.rs`, plain HTTP in \
                         the rig's client namespace), since the real kube-apiserver could not \
                         run: {why}"
                    ),
                )
            }
        }
    }

    fn kubeconfig(&self) -> &std::path::Path {
        match self {
            Self::Test(api) => api.kubeconfig(),
            Self::Real(api) => &api.kubeconfig,
        }
    }

    /// Creates or updates the objects; returns once the API answered.
    fn apply_all(&self, manifests: Vec<String>) {
        match self {
            Self::Test(api) => {
                for m in &manifests {
                    api.apply(m);
                }
            }
            Self::Real(api) => api
                .apply_all(manifests)
                .unwrap_or_else(|e| panic!("kube-apiserver refused an object: {e}")),
        }
    }
}

/// How much to measure.
pub struct Params {
    /// Where the Services come from.
    pub from: From,
    /// Services in the folder.
    pub services: usize,
    /// Cold starts (each on fresh pins).
    pub starts: usize,
    /// Endpoint changes to time.
    pub changes: usize,
    /// Time the changes may take at most; fewer are timed if it runs out.
    pub budget: Duration,
}

/// Endpoints per Service.
const ENDPOINTS: usize = 10;
/// Time between one change being seen in the maps and the next write.
const CHANGE_SPACING: Duration = Duration::from_millis(10);
/// The line the agent logs once its first full sync is done.
const READY: &str = "lb-agent ready";

/// Service `i`'s ClusterIP; 10.96.0.1 is the API server's own Service.
fn cluster_ip(i: usize) -> Ipv4Addr {
    let n = i + 2;
    Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8)
}

fn endpoint(i: usize, j: usize) -> String {
    let e = i * ENDPOINTS + j;
    Ipv4Addr::new(10, 128 + (e >> 16) as u8, (e >> 8) as u8, e as u8).to_string()
}

/// Service `i`.
fn service_doc(i: usize) -> String {
    let name = format!("svc-{i}");
    service(&name, &cluster_ip(i).to_string(), 80, 8080, None, "TCP")
}

/// Service `i`'s EndpointSlice, with endpoint 0 replaced by `first` when
/// given.
fn slice_doc(i: usize, first: Option<&str>) -> String {
    let name = format!("svc-{i}");
    let addrs: Vec<String> = (0..ENDPOINTS)
        .map(|j| match (j, first) {
            (0, Some(a)) => a.to_string(),
            _ => endpoint(i, j),
        })
        .collect();
    let eps = ready_on("node-b", &addrs);
    slice(&name, &format!("{name}-1"), 8080, "TCP", &eps)
}

/// Service `i`'s manifest file (Service and EndpointSlice), with endpoint 0
/// replaced by `first` when given.
fn manifest(i: usize, first: Option<&str>) -> String {
    docs(&[service_doc(i), slice_doc(i, first)])
}

fn file(i: usize) -> String {
    format!("svc-{i:06}.yaml")
}

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The svc_id behind Service `i`'s ClusterIP.
fn svc_id(maps: &Maps, i: usize) -> Option<u32> {
    let (addr_be, family) = lb_common::addr::addr_be(IpAddr::V4(cluster_ip(i)));
    let key = ServiceKey {
        addr_be,
        port_be: 80u16.to_be(),
        proto: 6,
        family,
    };
    maps.services.get(&key, 0).ok().map(|v| v.svc_id)
}

fn fingerprint(maps: &Maps, svc_id: u32) -> Option<u64> {
    maps.infos.get(&svc_id, 0).ok().map(|i| i.table_fingerprint)
}

/// Seconds of the day of a log line's timestamp
/// (`2026-12-04T00:10:15.936721Z …`).
fn log_time(line: &str) -> Option<f64> {
    let time = line.get(11..26)?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The stages of the start that logged the `(before + 1)`th ready line:
/// first line to maps adopted, to first sync, to ready (seconds).
fn start_stages(log: &str, before: usize) -> Option<[f64; 3]> {
    let lines: Vec<&str> = log.lines().collect();
    let ready: Vec<usize> = (0..lines.len())
        .filter(|i| lines[*i].contains(READY))
        .collect();
    let end = *ready.get(before)?;
    let begin = if before == 0 {
        0
    } else {
        ready[before - 1] + 1
    };
    // The previous agent's last lines (its exit) come before this one's.
    let run = &lines[begin..=end];
    let first = run.iter().position(|l| l.contains("lb_agent::check"))?;
    let at = |what: &str| {
        run[first..]
            .iter()
            .find(|l| l.contains(what))
            .and_then(|l| log_time(l))
    };
    let t0 = log_time(run[first])?;
    let adopted = at("adopted existing maps")?;
    let synced = at("agent: synced")?;
    let ready = log_time(run[run.len() - 1])?;
    Some([adopted - t0, synced - adopted, ready - synced])
}

/// Results of the figure.
pub struct Results {
    /// Propagation latencies in ms.
    pub propagation_ms: Vec<f64>,
}

/// Runs figure 4.
pub fn run(p: &Params, report: &mut Report) -> Results {
    let mut cluster = Cluster::new(
        ClusterSpec {
            nodes: 1,
            pods_per_node: 0,
            ..ClusterSpec::default()
        }
        .tag(if p.from == From::Api {
            "bencha"
        } else {
            "bench"
        }),
    );
    let (api, source) = if p.from == From::Api {
        let (api, source) = Api::start(&cluster);
        (Some(api), source)
    } else {
        let source = "a manifests folder, one file per Service with its EndpointSlice";
        (None, source.to_owned())
    };
    let t = Instant::now();
    match &api {
        Some(api) => {
            let mut objects = vec![node("node-a", "10.99.0.1")];
            objects.extend((0..p.services).flat_map(|i| [service_doc(i), slice_doc(i, None)]));
            api.apply_all(objects);
        }
        None => {
            for i in 0..p.services {
                cluster.write_manifest(&file(i), &manifest(i, None));
            }
        }
    }
    eprintln!(
        "bench: figure 4 ({}): wrote {} Services in {:.1?}",
        p.from.label(),
        p.services,
        t.elapsed()
    );
    let backends = (p.services * ENDPOINTS + p.changes + 1024).next_power_of_two();
    let backends_arg = backends.to_string();
    // Each Service has a frontend and its ClusterIP's address entry.
    let services_arg = (2 * p.services + 1024)
        .next_power_of_two()
        .max(1024)
        .to_string();
    // Tables of 10 backends take 1024 slots; every change writes a new
    // one beside the old, whose room comes back after a grace period.
    let slots_arg = ((p.services + p.changes + 1024) * 1024)
        .next_power_of_two()
        .to_string();
    let extra = [
        "--backends-size",
        &backends_arg,
        "--services-size",
        &services_arg,
        "--maglev-slots",
        &slots_arg,
    ];
    let bpffs = cluster.node("a").bpffs();
    let mut ready_s = Vec::new();
    let mut stages: [Vec<f64>; 3] = Default::default();
    let mut rss = Vec::new();
    let mut hwm = Vec::new();
    for start in 0..p.starts {
        let node = cluster.node_mut("a");
        let before = node.agent_log().matches(READY).count();
        let t = Instant::now();
        match &api {
            Some(api) => {
                let kubeconfig = api.kubeconfig().to_owned();
                node.start_agent_api(&kubeconfig, &extra);
            }
            None => node.start_agent(&extra),
        }
        let deadline = t + Duration::from_secs(600);
        while node.agent_log().matches(READY).count() == before {
            assert!(
                Instant::now() < deadline,
                "agent not ready after 600 s:\n{}",
                node.agent_log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let took = t.elapsed();
        ready_s.push(took.as_secs_f64());
        if let Some(times) = start_stages(&node.agent_log(), before) {
            for (all, t) in stages.iter_mut().zip(times) {
                all.push(t);
            }
        }
        if let Some((r, h)) = node.agent_pid().and_then(rss_mib) {
            rss.push(r);
            hwm.push(h);
        }
        let maps = Maps::open(&bpffs).expect("open the agent's maps");
        // A ClusterIP's address-only key (port 0: it refuses the ports no
        // Service uses) is not a frontend.
        let frontends = maps
            .services
            .keys()
            .filter(|k| k.as_ref().is_ok_and(|k| k.port_be != 0))
            .count();
        // The real API server has its own Service, `default/kubernetes`.
        let expected = p.services + usize::from(matches!(api, Some(Api::Real(_))));
        assert_eq!(
            frontends, expected,
            "the agent said ready with {frontends} of {expected} frontends written"
        );
        eprintln!("bench: figure 4: start {start}: ready in {took:.2?}");
        if start + 1 < p.starts {
            stop_and_clean(node);
        }
    }
    // Propagation, on the agent started last.
    let maps = Maps::open(&bpffs).expect("open the agent's maps");
    let mut latencies = Vec::new();
    let mut lost = 0usize;
    let budget_end = Instant::now() + p.budget;
    // Each change is timed alone: the next is written once the agent has
    // been idle for a while, since changes that follow a sync closely are
    // a burst, which the agent coalesces on purpose.
    let mut idle_from = Instant::now();
    for k in 0..p.changes {
        if Instant::now() > budget_end {
            break;
        }
        let pace = idle_from + CHANGE_SPACING;
        if let Some(left) = pace.checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
        let i = (k * 7919) % p.services;
        let id = svc_id(&maps, i).expect("the Service's frontend is in the map");
        let old = fingerprint(&maps, id);
        let new_addr = Ipv4Addr::new(10, 200 + (k >> 16) as u8, (k >> 8) as u8, k as u8);
        let first = new_addr.to_string();
        // From the write: the file's rename, or the API's answer.
        let t = match &api {
            Some(api) => {
                api.apply_all(vec![slice_doc(i, Some(&first))]);
                Instant::now()
            }
            None => {
                let t = Instant::now();
                cluster.write_manifest(&file(i), &manifest(i, Some(&first)));
                t
            }
        };
        let deadline = t + Duration::from_secs(10);
        loop {
            if fingerprint(&maps, id) != old {
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
                idle_from = Instant::now();
                break;
            }
            if Instant::now() > deadline {
                lost += 1;
                idle_from = Instant::now();
                break;
            }
            std::hint::spin_loop();
        }
    }
    let ready = Stat::of(&ready_s);
    let rss_stat = Stat::of(&rss);
    let hwm_stat = Stat::of(&hwm);
    // The changes split into runs of equal size, for median/min/max of p50
    // and p99 over runs.
    let runs = 5.min(latencies.len().max(1));
    let chunk = (latencies.len() / runs).max(1);
    let p50s: Vec<f64> = latencies
        .chunks(chunk)
        .filter_map(|c| quantile(c, 0.5))
        .collect();
    let p99s: Vec<f64> = latencies
        .chunks(chunk)
        .filter_map(|c| quantile(c, 0.99))
        .collect();
    let (p50, p99) = (Stat::of(&p50s), Stat::of(&p99s));

    let mut s = format!("## Figure 4: control plane ({})\n\n", p.from.label());
    let _ = writeln!(
        s,
        "{} Services × {ENDPOINTS} endpoints (remote), from {source}, default Maglev table size (scaled: 1021 slots for 10 backends). Ready: from spawning the agent (`ip netns \
         exec` in a one-node namespace rig) to its \"lb-agent ready\" log line; {} cold starts \
         on fresh pins, and after each the frontend map is checked to hold every Service. \
         RSS: VmRSS (and peak VmHWM) from /proc once ready. Propagation: {} single-endpoint \
         changes (one file rewritten atomically, or one EndpointSlice updated through the API), \
         each written 10 ms after the previous one was seen (so it finds the agent idle; a \
         burst is coalesced on purpose), timed from the write (the API's answer) until the Service's \
         record in the pinned info map carries the new table fingerprint, which the agent \
         writes after the new table; polled without sleeping. p50/p99: per run of {chunk} \
         changes, median [min–max] over the runs; {lost} change(s) not seen within 10 s.\n",
        p.services,
        ready_s.len(),
        latencies.len()
    );
    let show = |x: Option<Stat>, d| x.map_or_else(|| "-".to_string(), |x| x.show(d));
    let _ = writeln!(
        s,
        "| figure | median [min–max] |\n|---|---|\n| ready (s) | {} |\n| RSS once ready (MiB) | {} |\n| peak RSS (MiB) | {} |\n| propagation p50 (ms) | {} |\n| propagation p99 (ms) | {} |\n| propagation p99, all changes (ms) | {} |\n",
        show(ready, 2),
        show(rss_stat, 1),
        show(hwm_stat, 1),
        show(p50, 1),
        show(p99, 1),
        quantile(&latencies, 0.99).map_or_else(|| "-".into(), |v| format!("{v:.1}")),
    );
    let _ = writeln!(
        s,
        "Where a start's time goes, from the agent's log (seconds, median [min–max]): \
         from its first line to the programs loaded and the maps adopted {}; then to the \
         first sync written (the source read in full, translated, reconciled) {}; then to \
         \"lb-agent ready\" (programs attached) {}.\n",
        show(Stat::of(&stages[0]), 2),
        show(Stat::of(&stages[1]), 2),
        show(Stat::of(&stages[2]), 2),
    );
    report.sections.push(s);

    let scale_note = if p.services < 10_000 {
        format!(" (at {} Services: --quick)", p.services)
    } else {
        String::new()
    };
    let from = p.from.label();
    // The targets (issue 19): ready in a second, p50 ≤ 2 ms and
    // p99 ≤ 5 ms, peak RSS ≤ 64 MiB, in both source modes.
    let mut row = |what: String, value: String, target: &str, ok: bool| {
        let verdict = if ok { Verdict::Pass } else { Verdict::Miss };
        report.row(&what, value, target, verdict, scale_note.clone());
    };
    if let Some(r) = ready {
        row(
            format!("{} × 10 ready ({from})", p.services),
            format!("{} s", r.show(2)),
            "≤ 1 s",
            r.median <= 1.0,
        );
    }
    if let Some(r) = hwm_stat {
        row(
            format!("agent peak RSS ({from})"),
            format!("{} MiB", r.show(1)),
            "≤ 64 MiB",
            r.median <= 64.0,
        );
    }
    if let Some(r) = p50 {
        row(
            format!("propagation p50 ({from})"),
            format!("{} ms over {} changes", r.show(1), latencies.len()),
            "≤ 2 ms",
            r.median <= 2.0,
        );
    }
    if let Some(r) = p99 {
        row(
            format!("propagation p99 ({from})"),
            format!("{} ms over {} changes", r.show(1), latencies.len()),
            "≤ 5 ms",
            r.median <= 5.0,
        );
    }
    if ready_s.len() < 5 {
        report.failed(
            &format!("figure 4 ({from}): ready time"),
            &format!(
                "only {} cold start(s), fewer than the 5 runs a figure should have",
                ready_s.len()
            ),
        );
    }
    if latencies.len() < p.changes {
        report.failed(
            &format!("figure 4 ({from}): propagation"),
            &format!(
                "only {} of {} changes timed within the {:?} budget ({lost} not seen)",
                latencies.len(),
                p.changes,
                p.budget
            ),
        );
    }
    drop(maps);
    if let Some(Api::Real(real)) = &api {
        stop_and_clean(cluster.node_mut("a"));
        let agent = AgentFigures {
            ready,
            hwm: hwm_stat,
            p50: quantile(&latencies, 0.5),
            p99: quantile(&latencies, 0.99),
        };
        real_proxy(p, &cluster, real, &agent, report);
    }
    drop(api);
    drop(cluster);
    Results {
        propagation_ms: latencies,
    }
}

/// Stops the agent and removes its pins and programs, for a cold start.
fn stop_and_clean(node: &mut lb_tests::rig::Node) {
    let bpffs = node.bpffs();
    node.stop_agent();
    let out = Command::new(agent_bin())
        .args(["cleanup", "--bpffs"])
        .arg(&bpffs)
        .output()
        .expect("run lb-agent cleanup");
    assert!(out.status.success(), "lb-agent cleanup failed: {out:?}");
}

/// The agent's figures that the real kube-proxy's are put beside.
struct AgentFigures {
    ready: Option<Stat>,
    hwm: Option<Stat>,
    p50: Option<f64>,
    p99: Option<f64>,
}

/// Changes timed through the real kube-proxy: each waits out its default
/// `--min-sync-period` (1 s) and then its sync, which takes it about 10 s
/// at 10 000 Services on this machine (Debian 12's nft 1.0.6), so fewer
/// than the agent's.
const PROXY_CHANGES: usize = 20;
/// How long a change may take to show in kube-proxy's rules.
const PROXY_PATIENCE: Duration = Duration::from_secs(120);
/// Between one change seen in kube-proxy's rules and the next write: more
/// than its minimum sync period, so every change finds it idle.
const PROXY_SPACING: Duration = Duration::from_millis(1100);

/// The real kube-proxy (nftables mode) on the objects the agent just ran
/// on, in the same node namespace with the agent stopped and cleaned up:
/// cold starts to its first sync, its memory, and single-endpoint changes.
/// When it cannot run, the report says so.
fn real_proxy(
    p: &Params,
    cluster: &Cluster,
    api: &kubeapi::RealApi,
    agent: &AgentFigures,
    report: &mut Report,
) {
    let node = cluster.node("a");
    let dir = cluster.dir();
    let start = || {
        let mode = realproxy::Mode::Nftables;
        realproxy::RealProxy::start(mode, &node.ns, dir, &api.kubeconfig, &node.name)
    };
    let mut first_sync = Vec::new();
    let mut rss = Vec::new();
    let mut hwm = Vec::new();
    let mut proxy = None;
    for run in 0..p.starts {
        // The previous one goes first, its tables with it: a cold start.
        drop(proxy.take());
        let t = Instant::now();
        let kp = match start() {
            Ok(kp) => kp,
            Err(why) => {
                report.row(
                    "real kube-proxy (nftables) beside the agent",
                    "-".to_owned(),
                    "its first sync, RSS and propagation",
                    Verdict::NotRun,
                    format!("it cannot run here: {why}"),
                );
                return;
            }
        };
        kp.wait_sync(kp.syncs(), t + Duration::from_secs(600))
            .unwrap_or_else(|e| panic!("kube-proxy, within 600 s: {e}"));
        let took = t.elapsed();
        let frontends = kp
            .frontends()
            .unwrap_or_else(|e| panic!("{e}\n{}", kp.log_tail()));
        // `default/kubernetes` has no endpoints here: kube-proxy puts it
        // in its map of Services to reject, not in this one.
        assert_eq!(
            frontends, p.services,
            "kube-proxy's first sync holds {frontends} of {} frontends",
            p.services
        );
        first_sync.push(took.as_secs_f64());
        if let Some((r, h)) = rss_mib(kp.pid()) {
            rss.push(r);
            hwm.push(h);
        }
        eprintln!("bench: figure 4: kube-proxy start {run}: first sync in {took:.2?}");
        proxy = Some(kp);
    }
    let Some(kp) = proxy else { return };
    // The new endpoints are 10.210.x.y; nft prints the DNAT target of each
    // endpoint chain as `ADDR:8080`.
    let monitor = realproxy::Monitor::start(&node.ns, "10.210.")
        .unwrap_or_else(|e| panic!("nft monitor: {e}"));
    let syncs_before = kp.sync_ms().len();
    let mut latencies = Vec::new();
    let mut lost = 0usize;
    for k in 0..PROXY_CHANGES {
        std::thread::sleep(PROXY_SPACING);
        let i = (k * 7919 + 1) % p.services;
        let addr = Ipv4Addr::new(10, 210, (k >> 8) as u8, k as u8);
        api.apply_all(vec![slice_doc(i, Some(&addr.to_string()))])
            .unwrap_or_else(|e| panic!("kube-apiserver refused an object: {e}"));
        let t = Instant::now();
        match monitor.wait_for(&format!("{addr}:8080"), t + PROXY_PATIENCE) {
            Some(at) => latencies.push(at.saturating_duration_since(t).as_secs_f64() * 1e3),
            None => lost += 1,
        }
    }
    drop(monitor);
    let mut own_ms = kp.sync_ms();
    let own_ms = own_ms.split_off(syncs_before.min(own_ms.len()));
    let kp_rss = rss_mib(kp.pid());
    drop(kp);

    let show = |x: Option<Stat>, d| x.map_or_else(|| "-".to_string(), |x| x.show(d));
    let ms = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.1}"));
    let ratio = |ours: Option<f64>, theirs: Option<f64>| match (ours, theirs) {
        (Some(o), Some(t)) if o > 0.0 => format!("{:.1}×", t / o),
        _ => "-".to_owned(),
    };
    let (first, peak) = (Stat::of(&first_sync), Stat::of(&hwm));
    let (kp50, kp99) = (quantile(&latencies, 0.5), quantile(&latencies, 0.99));
    let mut s = "## Figure 4b: the real kube-proxy on the same objects\n\n".to_owned();
    let _ = writeln!(
        s,
        "kube-proxy v1.32.13 (`../shared/k8s`), `--proxy-mode=nftables` and otherwise its \
         defaults, with the machine's `nft` ({nft}, which it runs for every sync), in the \
         same node namespace against the same kube-apiserver and objects, \
         with the agent stopped and its programs removed. First sync: from spawning it to its \
         first \"{sync}\" log line (of its IPv4 proxier; {n} cold starts, each after its tables were deleted), after \
         which its `service-ips` map is checked to hold every Service. RSS: kube-proxy's own \
         process once synced (the `nft` it runs is not counted). Propagation: {m} \
         single-endpoint changes through the API, each {spacing} ms after the previous one \
         was seen, more than its default minimum sync period of 1 s, so that each finds it \
         idle (a burst is held to one sync a second, after two at once); timed from the API's \
         answer until `nft monitor` in the node's namespace prints the new endpoint's DNAT \
         rule, which nftables commits in the same transaction as the Service's chain that \
         uses it; {lost} not seen within {patience} s. The agent's column repeats figure 4 (API).\n",
        sync = realproxy::SYNCED,
        nft = lb_tests::rig::sh(None, &["nft", "--version"]).trim(),
        n = first_sync.len(),
        m = latencies.len(),
        spacing = PROXY_SPACING.as_millis(),
        patience = PROXY_PATIENCE.as_secs(),
    );
    let _ = writeln!(
        s,
        "| figure | agent | kube-proxy (nftables) | kube-proxy / agent |\n|---|---|---|---|\n\
         | ready / first sync (s) | {} | {} | {} |\n\
         | peak RSS (MiB) | {} | {} | {} |\n\
         | propagation p50 (ms) | {} | {} | {} |\n\
         | propagation p99 (ms) | {} | {} | {} |\n",
        show(agent.ready, 2),
        show(first, 2),
        ratio(agent.ready.map(|x| x.median), first.map(|x| x.median)),
        show(agent.hwm, 1),
        show(peak, 1),
        ratio(agent.hwm.map(|x| x.median), peak.map(|x| x.median)),
        ms(agent.p50),
        ms(kp50),
        ratio(agent.p50, kp50),
        ms(agent.p99),
        ms(kp99),
        ratio(agent.p99, kp99),
    );
    if let Some((r, h)) = kp_rss {
        let _ = writeln!(
            s,
            "kube-proxy after the changes: RSS {r:.1} MiB, peak {h:.1} MiB; once synced, \
             RSS {}.\n",
            show(Stat::of(&rss), 1)
        );
    }
    let _ = writeln!(
        s,
        "Where kube-proxy's time goes: its own account of each sync during the changes \
         (the `elapsed` of its log line: building and committing the rules, after the \
         change reached it) was {} ms at the median over {} syncs, [{}–{}].\n",
        ms(quantile(&own_ms, 0.5)),
        own_ms.len(),
        ms(own_ms.iter().copied().reduce(f64::min)),
        ms(own_ms.iter().copied().reduce(f64::max)),
    );
    report.sections.push(s);
    let note = if p.services < 10_000 {
        format!(" (at {} Services: --quick)", p.services)
    } else {
        String::new()
    };
    let mut row = |what: &str, value: String| {
        report.row(what, value, "beside the agent", Verdict::Info, note.clone());
    };
    if let Some(f) = first {
        row(
            "real kube-proxy (nftables) first sync",
            format!("{} s; agent ready {}", f.show(2), show(agent.ready, 2)),
        );
    }
    if let Some(h) = peak {
        row(
            "real kube-proxy (nftables) peak RSS",
            format!("{} MiB; agent {}", h.show(1), show(agent.hwm, 1)),
        );
    }
    row(
        "real kube-proxy (nftables) propagation p50 / p99",
        format!(
            "{} / {} ms over {} changes; agent {} / {}",
            ms(kp50),
            ms(kp99),
            latencies.len(),
            ms(agent.p50),
            ms(agent.p99)
        ),
    );
    if latencies.len() < PROXY_CHANGES {
        report.failed(
            "figure 4b: kube-proxy propagation",
            &format!(
                "{lost} of {PROXY_CHANGES} changes not seen in kube-proxy's rules within {:?}",
                PROXY_PATIENCE
            ),
        );
    }
}
