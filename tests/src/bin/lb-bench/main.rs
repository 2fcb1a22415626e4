//! `cargo xtask bench`: the benchmarks of issue 7. Writes
//! `<out>/report.md` and plots, and prints the summary table.
//!
//! ```text
//! lb-bench [--quick] [--out DIR] [--only 1,2,3,4,5,6] [--fig4-from manifests|api] [--stages DIR]
//! ```
//!
//! Every figure is the median of several runs with min and max beside it;
//! every comparison is a ratio to a baseline measured in the same run,
//! because the machine is shared. Benchmarks report; they never fail on a
//! figure, but a benchmark that cannot run says so at the top of the report.

mod cluster;
mod control;
mod datapath;
mod families;
mod kubeapi;
mod kubeproxy;
mod maglev;
mod plot;
mod realproxy;
mod report;
mod stats;

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::PathBuf,
    time::{Duration, Instant},
};

use report::Report;

/// What to run.
struct Options {
    quick: bool,
    out: PathBuf,
    /// Figures to run; empty means all.
    only: Vec<u32>,
    /// The one source figure 4 runs on; `None` means both.
    fig4_from: Option<control::From>,
    /// Where figure 1's stage-by-stage objects are (`--stages DIR`).
    stages: Option<PathBuf>,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        quick: false,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        only: Vec::new(),
        fig4_from: None,
        stages: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = args.next().ok_or("--out needs a directory")?.into(),
            "--only" => {
                let list = args.next().ok_or("--only needs figure numbers")?;
                for f in list.split(',') {
                    o.only
                        .push(f.parse().map_err(|_| format!("--only: bad figure {f:?}"))?);
                }
            }
            "--stages" => o.stages = Some(args.next().ok_or("--stages needs a directory")?.into()),
            "--fig4-from" => {
                o.fig4_from = match args.next().as_deref() {
                    Some("manifests") => Some(control::From::Manifests),
                    Some("api") => Some(control::From::Api),
                    other => return Err(format!("--fig4-from: {other:?} is not manifests or api")),
                };
            }
            other => {
                return Err(format!(
                "unknown argument {other:?}; usage: lb-bench [--quick] [--out DIR] [--only 1,2,3,4,5,6] [--fig4-from manifests|api] [--stages DIR]"
            ))
            }
        }
    }
    Ok(o)
}

/// Runs one benchmark; a panic (a step that could not run) is recorded
/// loudly in the report instead of ending the whole run.
fn guarded<T>(report: &mut Report, what: &str, f: impl FnOnce(&mut Report) -> T) -> Option<T> {
    let t = Instant::now();
    eprintln!("bench: {what}");
    let res = catch_unwind(AssertUnwindSafe(|| f(report)));
    match res {
        Ok(v) => {
            eprintln!("bench: {what} done in {:.1?}", t.elapsed());
            Some(v)
        }
        Err(p) => {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "panicked".into());
            report.failed(what, &why);
            None
        }
    }
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("lb-bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&o.out) {
        eprintln!("lb-bench: cannot create {}: {e}", o.out.display());
        std::process::exit(2);
    }
    let started = Instant::now();
    let mut report = Report::default();
    let fig1 = datapath::Params {
        scales: if o.quick {
            vec![1, 1000, 10_000]
        } else {
            vec![1, 1000, 10_000, 100_000]
        },
        runs: if o.quick { 5 } else { 9 },
        repeat: if o.quick { 20_000 } else { 100_000 },
        singles: if o.quick { 300 } else { 2000 },
        stages: o.stages.clone(),
    };
    let wanted = |f: u32| o.only.is_empty() || o.only.contains(&f);
    if wanted(1) {
        if let Some(res) = guarded(&mut report, "figure 1: per-packet cost", |r| {
            datapath::run(&fig1, r)
        }) {
            let series = datapath::CASE_NAMES
                .iter()
                .map(|name| plot::Series {
                    label: (*name).to_string(),
                    points: res
                        .iter()
                        .filter_map(|sr| {
                            let c = sr.cases.iter().find(|c| c.0 == *name)?;
                            Some((sr.n as f64, c.1.median))
                        })
                        .collect(),
                })
                .collect::<Vec<_>>();
            let axes = plot::Axes {
                title: "Per-packet cost (BPF_PROG_TEST_RUN, median)",
                x: "Services loaded",
                y: "ns per packet",
                log_x: true,
            };
            add_plot(&mut report, &o.out, "fig1-per-packet.svg", &axes, &series);
        }
        guarded(&mut report, "figure 1: IPv6 beside IPv4", |r| {
            families::run(&fig1, r);
        });
    }
    if wanted(4) {
        let mut series = Vec::new();
        let sources = [control::From::Manifests, control::From::Api];
        for from in sources
            .into_iter()
            .filter(|f| o.fig4_from.is_none_or(|o| o == *f))
        {
            let fig4 = control::Params {
                from,
                services: if o.quick { 1000 } else { 10_000 },
                starts: 5,
                changes: if o.quick { 100 } else { 1000 },
                budget: Duration::from_secs(if o.quick { 20 } else { 150 }),
            };
            let what = format!("figure 4: control plane ({from:?})");
            if let Some(res) = guarded(&mut report, &what, |r| control::run(&fig4, r)) {
                let mut sorted = res.propagation_ms.clone();
                sorted.sort_by(f64::total_cmp);
                let n = sorted.len() as f64;
                series.push(plot::Series {
                    label: format!("{from:?}: {} changes", sorted.len()),
                    points: sorted
                        .iter()
                        .enumerate()
                        .map(|(i, ms)| (*ms, (i + 1) as f64 / n))
                        .collect(),
                });
            }
        }
        if !series.is_empty() {
            let axes = plot::Axes {
                title: "Endpoint change propagation (CDF)",
                x: "ms from the write (file rename, API answer) to the map",
                y: "fraction of changes",
                log_x: false,
            };
            add_plot(&mut report, &o.out, "fig4-propagation.svg", &axes, &series);
        }
    }
    if wanted(5) {
        if let Some(points) = guarded(&mut report, "figure 5: Maglev", |r| {
            maglev::run(if o.quick { 5 } else { 9 }, r)
        }) {
            let series: Vec<plot::Series> = [16381u32, 65521]
                .iter()
                .map(|m| plot::Series {
                    label: format!("M = {m}"),
                    points: points
                        .iter()
                        .filter(|p| p.m == *m)
                        .map(|p| (p.n as f64, p.build_ms.median))
                        .collect(),
                })
                .collect();
            let axes = plot::Axes {
                title: "Maglev table build time (median)",
                x: "backends",
                y: "ms",
                log_x: true,
            };
            add_plot(&mut report, &o.out, "fig5-maglev-build.svg", &axes, &series);
        }
    }
    if wanted(6) {
        guarded(&mut report, "figure 6: SYN flood", |r| {
            flood(&lb_tests::flood::Spec::default(), r);
        });
    }
    if wanted(2) || wanted(3) {
        let p = cluster::Params {
            // --quick: two scales the rule sets load in a second.
            scales: if o.quick {
                vec![10, 100]
            } else {
                vec![10, 10_000]
            },
            // Full: about 5 minutes (figure 2 in two shapes), most of it
            // loading the rule sets of 10 000 Services; the whole run stays
            // under 15 minutes.
            runs: 5,
            window: Duration::from_millis(if o.quick { 100 } else { 600 }),
            conn_window: Duration::from_millis(if o.quick { 100 } else { 400 }),
            fig2: wanted(2),
            fig3: wanted(3),
        };
        let what = match (p.fig2, p.fig3) {
            (true, true) => "figures 2 and 3: throughput, connections",
            (true, false) => "figure 2: throughput",
            _ => "figure 3: connections",
        };
        if let Some(res) = guarded(&mut report, what, |r| cluster::run(&p, r)) {
            for (wanted, points, file, title, y) in [
                (
                    p.fig2,
                    res.throughput,
                    "fig2-throughput.svg",
                    "UDP NodePort throughput (delivered, median)",
                    "Mpps",
                ),
                (
                    p.fig3,
                    res.connections,
                    "fig3-connections.svg",
                    "TCP connect + request + close to a ClusterIP (median)",
                    "connections per second",
                ),
            ] {
                if !wanted {
                    continue;
                }
                let axes = plot::Axes {
                    title,
                    x: "Services loaded",
                    y,
                    log_x: true,
                };
                let series: Vec<plot::Series> = points
                    .into_iter()
                    .map(|(label, points)| plot::Series { label, points })
                    .collect();
                add_plot(&mut report, &o.out, file, &axes, &series);
            }
        }
    }
    let header = format!(
        "# lb benchmarks\n\n{} run, {:.0} s, on {} (shared machine: absolute figures are \
         noisy; compare the ratios, each taken within one run).\n",
        if o.quick { "Quick (--quick)" } else { "Full" },
        started.elapsed().as_secs_f64(),
        uname()
    );
    if let Err(e) = report.write(&o.out, &header) {
        eprintln!("lb-bench: cannot write the report: {e}");
        std::process::exit(2);
    }
    println!("{}", report.summary_md());
    println!("report: {}", o.out.join("report.md").display());
}

/// Figure 6: the SYN flood scenario (`lb_tests::flood`, which the flood
/// test asserts on): its section and its summary row.
fn flood(spec: &lb_tests::flood::Spec, report: &mut Report) {
    let o = lb_tests::flood::run(spec);
    let m = &o.metrics;
    report.sections.push(format!(
        "## Figure 6: SYN flood against a NodePort\n\n\
         Method: node-a's agent with --conntrack-size {} and --conntrack-embryonic-size {}; a TCP \
         NodePort with two backends on node-a and two on node-b. The client opens {} \
         connections, then, while a generator in the fabric (BPF_PROG_TEST_RUN live frames, \
         XDP_PASS into the bridge from the client's port, as an outside client's frames come) \
         sends {} SYNs from random sources in 10.77.0.0/16 (random ports), keeps opening new \
         connections (one every {:?}, each given {:?} for the server's greeting). The \
         backends answer every SYN (SYN cookies), so every spoofed flow gets a SYN-ACK. After the \
         flood every long-lived connection must echo a line. Counters are node-a's metrics, \
         after minus before.\n\n\
         | what | value |\n|---|---|\n\
         | SYNs sent | {} in {:.2} s: {:.0} per second |\n\
         | long-lived connections kept | {}/{}{} |\n\
         | new connections served during the flood | {}/{} ({:.1}%) |\n\
         | new flows of the Service (lb_service_new_flows_total) | {:.0} |\n\
         | flows established (lb_conntrack_established_total) | {:.0} |\n\
         | main map evictions (lb_conntrack_evictions_total) | {:.0} |\n\
         | embryonic evictions (lb_conntrack_embryonic_evictions_total) | {:.0} |\n",
        spec.conntrack_size,
        spec.embryonic_size,
        spec.long_lived,
        spec.syns,
        spec.new_every,
        spec.new_timeout,
        o.syns,
        o.flood_time.as_secs_f64(),
        o.rate(),
        o.long_lived_kept,
        o.long_lived,
        o.long_lived_error
            .as_ref()
            .map_or_else(String::new, |e| format!(" (first failure: {e})")),
        o.new_ok,
        o.new_tried,
        100.0 * o.served(),
        m.new_flows,
        m.established,
        m.evictions,
        m.embryonic_evictions,
    ));
    let kept = o.long_lived_kept == o.long_lived && m.evictions == 0.0;
    report.row(
        "SYN flood: long-lived kept, new connections served, flood rate",
        format!(
            "{}/{} kept; {:.1}% of {} served; {:.0} SYN/s ({} SYNs)",
            o.long_lived_kept,
            o.long_lived,
            100.0 * o.served(),
            o.new_tried,
            o.rate(),
            o.syns
        ),
        "all kept, ≥ 90% served",
        if kept && o.served() >= 0.9 {
            report::Verdict::Pass
        } else {
            report::Verdict::Miss
        },
        format!(
            "--conntrack-size {}; main map evictions {:.0}, embryonic {:.0}",
            spec.conntrack_size, m.evictions, m.embryonic_evictions
        ),
    );
}

/// Draws a plot into `dir` and links it from the report; a plot that
/// cannot be drawn is reported, not fatal.
fn add_plot(
    report: &mut Report,
    dir: &std::path::Path,
    file: &str,
    axes: &plot::Axes<'_>,
    series: &[plot::Series],
) {
    match plot::lines(&dir.join(file), axes, series) {
        Ok(()) => report.sections.push(format!("![{}]({file})\n", axes.title)),
        Err(e) => report.failed(&format!("plot {file}"), &e),
    }
}

/// Kernel release and CPU count, for the report's header.
fn uname() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!("Linux {} with {cpus} CPUs", release.trim())
}
