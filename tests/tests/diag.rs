//! Diagnosis for operators: bad flags refused before the kernel is
//! touched, `lb-agent check`, and `lb-agent explain`.
//!
//! Needs root. Run through `cargo xtask test`.

use std::{net::SocketAddr, path::Path, process::Output, time::Duration};

use lb_tests::rig::{agent_bin, http_get, Cluster, ClusterSpec};

const WAIT: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(3);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// Runs `lb-agent ARGS` inside network namespace `ns` and waits for it.
fn agent_in(ns: &str, args: &[&str]) -> Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(agent_bin())
        .args(args)
        .output()
        .expect("run lb-agent")
}

/// `lb-agent run` on node-a with `extra` after the usual flags (node name,
/// bpffs), run to its end: these runs are expected to fail at start.
fn failed_start(c: &Cluster, extra: &[&str]) -> String {
    let node = c.node("a");
    let bpffs = node.bpffs();
    let mut args = vec!["run", "--node-name", "node-a", "--bpffs"];
    let bpffs_s = bpffs.to_string_lossy().into_owned();
    args.push(&bpffs_s);
    args.extend_from_slice(extra);
    let out = agent_in(&node.ns, &args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "lb-agent {args:?} started:\n{stderr}"
    );
    stderr
}

/// Panics unless `bpffs` is an unmounted, empty directory (as the rig made it).
fn assert_untouched(bpffs: &Path) {
    let on_bpffs = nix::sys::statfs::statfs(bpffs)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    assert!(
        !on_bpffs,
        "{} is a bpffs after a failed start",
        bpffs.display()
    );
    let left: Vec<_> = std::fs::read_dir(bpffs)
        .expect("read the bpffs directory")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "a failed start left {left:?}");
}

#[test]
fn a_missing_interface_is_refused_by_name_and_nothing_is_pinned() {
    let c = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default().tag("noif")
    });
    let manifests = c.manifests_dir();
    let err = failed_start(
        &c,
        &[
            "--iface",
            "nosuch0",
            "--manifests",
            &manifests.to_string_lossy(),
        ],
    );
    assert!(err.contains("--iface nosuch0: no such interface"), "{err}");
    assert_untouched(&c.node("a").bpffs());
}

#[test]
fn a_missing_manifests_folder_is_refused_by_name_and_nothing_is_pinned() {
    let c = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default().tag("nodir")
    });
    let missing = c.dir().join("no-such-folder");
    let missing = missing.to_string_lossy();
    let err = failed_start(&c, &["--iface", "eth0", "--manifests", &missing]);
    assert!(
        err.contains(&format!("--manifests {missing}: no such directory")),
        "{err}"
    );
    assert_untouched(&c.node("a").bpffs());
}

#[test]
fn an_unreadable_kubeconfig_is_refused_by_name_and_nothing_is_pinned() {
    let c = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default().tag("nokc")
    });
    let missing = c.dir().join("no-such-kubeconfig");
    let missing = missing.to_string_lossy();
    let err = failed_start(&c, &["--iface", "eth0", "--kubeconfig", &missing]);
    assert!(
        err.contains(&format!("--kubeconfig {missing}: no such file")),
        "{err}"
    );
    let garbage = c.dir().join("garbage-kubeconfig");
    std::fs::write(&garbage, "clusters: [this is not\n").expect("write a bad kubeconfig");
    let garbage = garbage.to_string_lossy();
    let err = failed_start(&c, &["--iface", "eth0", "--kubeconfig", &garbage]);
    assert!(
        err.contains(&format!("--kubeconfig {garbage}: not a kubeconfig")),
        "{err}"
    );
    assert_untouched(&c.node("a").bpffs());
}

#[test]
fn check_reports_the_xdp_mode_run_then_uses() {
    let mut c = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default().tag("check")
    });
    let node = c.node("a");
    let (ns, bpffs) = (node.ns.clone(), node.bpffs());
    let manifests = c.manifests_dir();
    let out = agent_in(
        &ns,
        &[
            "check",
            "-o",
            "json",
            "--node-name",
            "node-a",
            "--iface",
            "eth0",
            "--manifests",
            &manifests.to_string_lossy(),
            "--bpffs",
            &bpffs.to_string_lossy(),
        ],
    );
    assert!(
        out.status.success(),
        "check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check's JSON");
    let plan = &report["interfaces"][0];
    assert_eq!(plan["iface"], "eth0", "{report:#}");
    assert_eq!(plan["kind"], "veth", "{report:#}");
    let mode = plan["mode"].as_str().expect("a mode").to_owned();
    let reason = plan["reason"].as_str().expect("a reason").to_owned();
    assert!(
        report["map_bytes"].as_u64().unwrap_or_default() > 0,
        "{report:#}"
    );
    // check made nothing.
    assert_untouched(&bpffs);

    c.node_mut("a").start_agent(&[]);
    c.node("a").wait_agent_ready(WAIT);
    let (status, body) =
        http_get(&ns, sa("127.0.0.1:10249"), "/metrics", IO).expect("scrape node-a's metrics");
    assert_eq!(status, 200, "{body}");
    let info =
        format!("lb_xdp_attach_info{{iface=\"eth0\",mode=\"{mode}\",reason=\"{reason}\"}} 1");
    assert!(body.lines().any(|l| l == info), "no {info} in:\n{body}");
    // run logs the same plan at start.
    let log = c.node("a").agent_log();
    assert!(
        log.lines()
            .any(|l| l.contains("check=--iface eth0") && l.contains(&format!("XDP in {mode} mode"))),
        "{log}"
    );
}
