//! The report: markdown sections, a summary table of targets, and loud
//! notes for whatever could not run.

use std::{fmt::Write as _, path::Path};

/// Whether a target was met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Met.
    Pass,
    /// Missed.
    Miss,
    /// Not measured in this run.
    NotRun,
    /// A figure without a target.
    Info,
}

/// One line of the summary.
pub struct Row {
    /// What is measured.
    pub what: String,
    /// The measured figure.
    pub value: String,
    /// The target.
    pub target: String,
    /// Met or not.
    pub verdict: Verdict,
    /// By how much and why, when missed; method notes otherwise.
    pub note: String,
}

/// Everything a run found.
#[derive(Default)]
pub struct Report {
    /// Summary rows, in figure order.
    pub summary: Vec<Row>,
    /// Markdown sections, in figure order.
    pub sections: Vec<String>,
    /// Benchmarks that could not run, with the reason.
    pub failures: Vec<String>,
}

impl Report {
    /// Adds a summary row.
    pub fn row(&mut self, what: &str, value: String, target: &str, verdict: Verdict, note: String) {
        self.summary.push(Row {
            what: what.into(),
            value,
            target: target.into(),
            verdict,
            note,
        });
    }

    /// Records a benchmark that could not run; it is printed at the top of
    /// the report and of the summary.
    pub fn failed(&mut self, what: &str, why: &str) {
        eprintln!("bench: {what} COULD NOT RUN: {why}");
        // One line in the report: the error chain without a backtrace.
        let why = why.split("Stack backtrace").next().unwrap_or(why);
        let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
        self.failures.push(format!("{what}: {why}"));
    }

    /// The summary table as markdown.
    pub fn summary_md(&self) -> String {
        let mut s = String::new();
        for f in &self.failures {
            let _ = writeln!(s, "**NOT RUN — {f}**\n");
        }
        s.push_str("| figure | measured (median [min–max]) | target | result | note |\n");
        s.push_str("|---|---|---|---|---|\n");
        for r in &self.summary {
            let v = match r.verdict {
                Verdict::Pass => "pass",
                Verdict::Miss => "**MISS**",
                Verdict::NotRun => "not run",
                Verdict::Info => "-",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {v} | {} |",
                r.what, r.value, r.target, r.note
            );
        }
        s
    }

    /// Writes report.md into `dir`.
    pub fn write(&self, dir: &Path, header: &str) -> std::io::Result<()> {
        let mut s = String::new();
        s.push_str(header);
        s.push_str("\n## Summary\n\n");
        s.push_str(&self.summary_md());
        for sec in &self.sections {
            s.push('\n');
            s.push_str(sec);
        }
        std::fs::write(dir.join("report.md"), s)
    }
}
