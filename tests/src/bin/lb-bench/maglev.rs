//! Figure 5: Maglev table build time, balance and disruption.

use std::{fmt::Write as _, time::Instant};

use lb_agent::maglev;

use crate::{
    report::{Report, Verdict},
    stats::Stat,
};

/// One (table size, backend count) point.
pub struct Point {
    /// Table size.
    pub m: u32,
    /// Backends.
    pub n: usize,
    /// Build time in milliseconds.
    pub build_ms: Stat,
    /// Largest share over smallest share.
    pub balance: f64,
    /// Fraction of slots that change owner when one backend is removed.
    pub remove: f64,
    /// Fraction of slots that change owner when one backend is added.
    pub add: f64,
}

fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}:8080", 1 + i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

/// The owner's name of every slot.
fn owners(backends: &[String], m: u32) -> Vec<&str> {
    maglev::table(backends, m)
        .iter()
        .map(|&i| backends[i as usize].as_str())
        .collect()
}

fn moved(a: &[&str], b: &[&str]) -> f64 {
    let changed = a.iter().zip(b).filter(|(x, y)| x != y).count();
    changed as f64 / a.len() as f64
}

/// Runs figure 5.
pub fn run(runs: usize, report: &mut Report) -> Vec<Point> {
    let mut points = Vec::new();
    for m in [16381u32, 65521] {
        for n in [10usize, 100, 1000] {
            let backends = names(n);
            let mut times = Vec::new();
            for _ in 0..runs {
                let t = Instant::now();
                let table = maglev::table(&backends, m);
                times.push(t.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(table);
            }
            let table = maglev::table(&backends, m);
            let mut share = vec![0u32; n];
            for &i in &table {
                share[i as usize] += 1;
            }
            let max = share.iter().copied().max().unwrap_or(0);
            let min = share.iter().copied().min().unwrap_or(0);
            let before = owners(&backends, m);
            let mut fewer = backends.clone();
            fewer.remove(n / 2);
            let mut more = backends.clone();
            more.push("10.200.0.1:8080".to_string());
            let Some(build_ms) = Stat::of(&times) else {
                continue;
            };
            points.push(Point {
                m,
                n,
                build_ms,
                balance: f64::from(max) / f64::from(min.max(1)),
                remove: moved(&before, &owners(&fewer, m)),
                add: moved(&before, &owners(&more, m)),
            });
        }
    }
    let mut s = String::from("## Figure 5: Maglev\n\n");
    let _ = writeln!(
        s,
        "Build time of `lb_agent::maglev::table` ({runs} runs). Balance: the largest \
         backend's slot count over the smallest's (1.00 is perfect). Disruption: the \
         fraction of slots whose owner changes when the middle backend is removed, or a new \
         one added; the least possible is the removed backend's own share (1/N), \
         respectively the new backend's (1/(N+1)).\n\n\
         | M | N | build ms | balance max/min | removal moves | (ideal 1/N) | addition moves | (ideal 1/(N+1)) |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for p in &points {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.4} | {:.4} | {:.4} | {:.4} |",
            p.m,
            p.n,
            p.build_ms.show(2),
            p.balance,
            p.remove,
            1.0 / p.n as f64,
            p.add,
            1.0 / (p.n + 1) as f64
        );
    }
    report.sections.push(s);
    if let Some(p) = points.iter().find(|p| p.m == 16381 && p.n == 100) {
        report.row(
            "Maglev M=16381, 100 backends: build / balance / removal moves",
            format!(
                "{} ms / {:.3} / {:.4} (ideal {:.4})",
                p.build_ms.show(2),
                p.balance,
                p.remove,
                1.0 / p.n as f64
            ),
            "-",
            Verdict::Info,
            String::new(),
        );
    }
    points
}
