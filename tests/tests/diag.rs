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
fn a_first_start_that_fails_on_attaching_removes_what_it_made() {
    let c = Cluster::new(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default().tag("noattach")
    });
    let ns = c.node("a").ns.clone();
    // A bridge has no native XDP: forcing it fails after the maps exist.
    lb_tests::rig::sh(Some(&ns), &["ip", "link", "add", "lbbr0", "type", "bridge"]);
    lb_tests::rig::sh(Some(&ns), &["ip", "link", "set", "lbbr0", "up"]);
    let manifests = c.manifests_dir();
    let err = failed_start(
        &c,
        &[
            "--iface",
            "lbbr0",
            "--xdp-mode",
            "native",
            "--manifests",
            &manifests.to_string_lossy(),
        ],
    );
    assert!(err.contains("lacks native XDP"), "{err}");
    assert!(err.contains("the failed start left nothing"), "{err}");
    let bpffs = c.node("a").bpffs();
    assert_untouched(&bpffs);
    let state = lb_agent::explain::state_dir(&bpffs);
    assert!(!state.exists(), "{} left behind", state.display());
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

/// A Service (`namespace/name`), the `--from` address if any, the cause
/// `explain` names for it, and a piece of that finding's line.
type Case = (
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static str,
);

/// Services on node-a that each show one cause `explain` names, with the
/// cause and a piece of the table's line for it.
fn explain_cases() -> (String, Vec<Case>) {
    use lb_tests::manifests::{
        docs, service, slice, with_external_ips, with_load_balancer, with_local_policies, Ep,
    };
    let ep = |addr: &'static str, node: &'static str, ready: bool| Ep {
        addr,
        node,
        ready,
        terminating: false,
    };
    let manifests = docs(&[
        format!(
            "{}  selector: {{app: a-noep}}\n",
            service("a-noep", "10.96.1.1", 80, 8080, None, "TCP")
        ),
        service("b-named", "10.96.1.2", 80, 8080, None, "TCP")
            .replace("targetPort: 8080", "targetPort: http"),
        slice(
            "b-named",
            "b-named-1",
            8080,
            "TCP",
            &[ep("10.244.1.20", "node-a", true)],
        )
        .replace(
            "ports:\n  - name: p\n    protocol: TCP\n    port: 8080\n",
            "ports: []\n",
        ),
        service("c-notready", "10.96.1.3", 80, 8080, None, "TCP"),
        slice(
            "c-notready",
            "c-notready-1",
            8080,
            "TCP",
            &[ep("10.244.1.30", "node-a", false)],
        ),
        with_local_policies(
            &with_external_ips(
                &service("d-local", "10.96.1.4", 80, 8080, None, "TCP"),
                &["10.99.0.60"],
            ),
            true,
            false,
        ),
        slice(
            "d-local",
            "d-local-1",
            8080,
            "TCP",
            &[ep("10.244.2.40", "node-b", true)],
        ),
        with_load_balancer(
            &service("e-ranges", "10.96.1.5", 80, 8080, None, "TCP"),
            "10.99.0.70",
            &["10.99.1.0/24"],
        ),
        slice(
            "e-ranges",
            "e-ranges-1",
            8080,
            "TCP",
            &[ep("10.244.1.50", "node-a", true)],
        ),
        service("f-nodeport", "10.96.1.6", 80, 8080, Some(30086), "TCP"),
        slice(
            "f-nodeport",
            "f-nodeport-1",
            8080,
            "TCP",
            &[ep("10.244.1.60", "node-a", true)],
        ),
        service("g-conflict-a", "10.96.1.7", 80, 8080, None, "TCP"),
        slice(
            "g-conflict-a",
            "g-conflict-a-1",
            8080,
            "TCP",
            &[ep("10.244.1.70", "node-a", true)],
        ),
        service("g-conflict-b", "10.96.1.7", 80, 8080, None, "TCP"),
        slice(
            "g-conflict-b",
            "g-conflict-b-1",
            8080,
            "TCP",
            &[ep("10.244.1.71", "node-a", true)],
        ),
        with_external_ips(
            &service("z-full", "10.96.1.9", 80, 8080, None, "TCP"),
            &["10.99.0.90"],
        ),
        slice(
            "z-full",
            "z-full-1",
            8080,
            "TCP",
            &[ep("10.244.1.90", "node-a", true)],
        ),
    ]);
    let cases = vec![
        (
            "test/a-noep",
            None,
            "no_endpoints",
            "selector matches no endpoint",
        ),
        (
            "test/b-named",
            None,
            "target_port_unresolved",
            "targetPort 'http' is not a port of any endpoint",
        ),
        (
            "test/c-notready",
            None,
            "none_ready",
            "none of the 1 endpoints is ready",
        ),
        (
            "test/d-local",
            None,
            "no_local_endpoint",
            "externalTrafficPolicy is Local and no ready endpoint runs on this node (node-a)",
        ),
        (
            "test/e-ranges",
            Some("10.99.0.100"),
            "client_outside_source_ranges",
            "client 10.99.0.100 is outside loadBalancerSourceRanges 10.99.1.0/24",
        ),
        (
            "test/f-nodeport",
            None,
            "nodeport_address_filtered",
            "node address 10.99.0.1 is outside --nodeport-addresses 10.98.0.0/16",
        ),
        (
            "test/g-conflict-b",
            None,
            "frontend_conflict",
            "frontend 10.96.1.7:80/TCP is also claimed by Service test/g-conflict-a:p/TCP",
        ),
        ("test/z-full", None, "refused", "refused by the datapath"),
    ];
    (manifests, cases)
}

#[test]
fn explain_names_each_cause_with_its_fix_in_table_and_json() {
    let mut c = Cluster::new(ClusterSpec {
        nodes: 2,
        ..ClusterSpec::default().tag("explain")
    });
    let (manifests, cases) = explain_cases();
    c.write_manifest("cases.yaml", &manifests);
    // Room for every frontend but z-full's two; node-a's address outside
    // the NodePort range.
    c.node_mut("a").start_agent(&[
        "--services-size",
        "10",
        "--nodeport-addresses",
        "10.98.0.0/16",
    ]);
    c.node("a").wait_agent_ready(WAIT);
    let ns = c.node("a").ns.clone();
    let bpffs = c.node("a").bpffs().to_string_lossy().into_owned();
    let explain = |service: &str, from: Option<&str>, json: bool| -> String {
        let mut args = vec!["explain", service, "--bpffs", &bpffs];
        if let Some(from) = from {
            args.extend(["--from", from]);
        }
        if json {
            args.extend(["-o", "json"]);
        }
        let out = agent_in(&ns, &args);
        assert!(
            out.status.success(),
            "explain {service}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (service, from, cause, words) in &cases {
        let table = explain(service, *from, false);
        let line = table
            .lines()
            .find(|l| l.contains(&format!("! {cause}: ")))
            .unwrap_or_else(|| panic!("{service}: no {cause} line in:\n{table}"));
        assert!(line.contains(words), "{service}: {line:?} lacks {words:?}");
        assert!(line.contains("(fix: "), "{service}: {line:?} has no fix");
        let json: serde_json::Value =
            serde_json::from_str(&explain(service, *from, true)).expect("explain's JSON");
        let found: Vec<&serde_json::Value> = json["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["findings"].as_array().into_iter().flatten())
            .filter(|f| f["cause"] == *cause)
            .collect();
        assert!(
            found
                .iter()
                .any(|f| f["message"].as_str().is_some_and(|m| m.contains(words))
                    && f["fix"].as_str().is_some_and(|s| !s.is_empty())),
            "{service}: no {cause} finding in {json:#}"
        );
    }
    // A Service without trouble has no finding, and its frontend is in the
    // pins; the client trace names its backend.
    let json: serde_json::Value =
        serde_json::from_str(&explain("test/g-conflict-a", Some("10.99.0.100"), true))
            .expect("JSON");
    let port = &json["ports"][0];
    assert_eq!(port["findings"], serde_json::json!([]), "{json:#}");
    assert_eq!(port["frontends"][0]["programmed"], true, "{json:#}");
    assert_eq!(
        port["endpoints"][0]["address"], "10.244.1.70:8080",
        "{json:#}"
    );
    assert_eq!(
        json["client"]["flows"][0]["backend"]
            .as_str()
            .map(|b| b.starts_with("10.244.1.70:8080")),
        Some(true),
        "{json:#}"
    );
    // What did not fit of refused z-full is not in the pins.
    let json: serde_json::Value =
        serde_json::from_str(&explain("test/z-full", None, true)).expect("JSON");
    assert!(
        json["ports"][0]["frontends"]
            .as_array()
            .is_some_and(|fs| fs.iter().any(|f| f["programmed"] == false)),
        "{json:#}"
    );

    // The same causes are on the problems gauge.
    let (status, body) =
        http_get(&ns, sa("127.0.0.1:10249"), "/metrics", IO).expect("scrape node-a's metrics");
    assert_eq!(status, 200, "{body}");
    for (_, _, cause, _) in cases
        .iter()
        .filter(|c| c.2 != "client_outside_source_ranges")
    {
        let series = format!("lb_service_problems{{cause=\"{cause}\"}} ");
        let n: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"));
        assert!(n >= 1.0, "{series}{n}");
    }
}
