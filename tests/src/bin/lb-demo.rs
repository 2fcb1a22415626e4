//! `cargo xtask demo`: a namespace cluster running the agents on
//! examples/manifests, with traffic to a ClusterIP and a NodePort (the
//! dual-stack `web` over both families), and a table of where it went.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use lb_tests::rig::{serve_all_pods, tcp_hello, udp_hello, Cluster, ClusterSpec};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops between steps on Ctrl-C, so the cluster is torn down by Drop.
fn check_interrupt() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("interrupted: cleaning up");
        std::panic::resume_unwind(Box::new("interrupted"));
    }
}

fn main() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let result = std::panic::catch_unwind(run);
    if result.is_err() {
        std::process::exit(1);
    }
}

fn run() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
    println!("== building a cluster of network namespaces: a client, node-a and node-b with two pods each");
    let mut cluster = Cluster::new(ClusterSpec::default());
    for entry in std::fs::read_dir(&examples).expect("examples/manifests") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let body = std::fs::read_to_string(&path).expect("read manifest");
        cluster.write_manifest(&name, &body);
    }
    let servers = serve_all_pods(&cluster);
    check_interrupt();
    println!(
        "== starting one lb-agent per node on {}",
        examples.display()
    );
    for n in ["a", "b"] {
        cluster.node_mut(n).start_agent(&[]);
    }
    for n in ["a", "b"] {
        cluster.node(n).wait_agent_ready(Duration::from_secs(15));
    }
    check_interrupt();

    // b1 is not ready in any Service, so the table shows a pure client.
    let pod = cluster.pod("b1").ns.clone();
    let client = cluster.client_ns().to_string();
    let node = cluster.node("a").ns.clone();
    let flows: Vec<(&str, String, &str, &str)> = vec![
        ("pod b1", pod.clone(), "10.96.0.10:80", "tcp"),
        // The node's own sockets, through the socket hooks: `web` is
        // dual-stack, so it answers over both families.
        ("node-a", node.clone(), "10.96.0.10:80", "tcp"),
        ("node-a", node.clone(), "[fd00:96::10]:80", "tcp"),
        ("node-a", node, "[fd00:99::1]:30080", "tcp"),
        // Pods and outside clients over IPv6: the packet datapath.
        ("pod b1", pod.clone(), "[fd00:96::10]:80", "tcp"),
        ("client", client.clone(), "[fd00:99::1]:30080", "tcp"),
        ("client", client.clone(), "[fd00:99::2]:30080", "tcp"),
        ("pod b1", pod.clone(), "10.96.0.53:53", "udp"),
        ("client", client.clone(), "10.99.0.1:30080", "tcp"),
        ("client", client.clone(), "10.99.0.2:30080", "tcp"),
        ("client", client.clone(), "10.99.0.1:30053", "udp"),
        ("client", client, "10.99.0.2:30053", "udp"),
        ("pod b1", pod.clone(), "10.96.0.99:80", "tcp"),
    ];
    println!(
        "\n{:<8} {:<22} {:<5} {:<36} {:>5}",
        "FROM", "FRONTEND", "PROTO", "BACKEND (CLIENT ADDRESS IT SAW)", "CONNS"
    );
    for (from, ns, dst, proto) in &flows {
        let dst: SocketAddr = dst.parse().expect("frontend");
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..30 {
            check_interrupt();
            let res = if *proto == "tcp" {
                tcp_hello(ns, dst, Duration::from_secs(2)).map(|(l, _)| l)
            } else {
                udp_hello(ns, dst, Duration::from_secs(2)).map(|(l, _)| l)
            };
            // "b0 10.99.0.1:61139" → "b0 (sees 10.99.0.1)": the backend and
            // the client address it saw, without the ephemeral port.
            let key = match res {
                Ok(line) => {
                    let mut parts = line.split_whitespace();
                    let name = parts.next().unwrap_or("?").to_string();
                    let peer = parts
                        .next()
                        .and_then(|p| p.rsplit_once(':'))
                        .map_or("?", |(a, _)| a);
                    format!("{name} (sees {peer})")
                }
                Err(e) => format!("refused: {}", e.kind()),
            };
            *seen.entry(key).or_insert(0) += 1;
        }
        for (i, (backend, n)) in seen.iter().enumerate() {
            let (f, d, p) = if i == 0 {
                (*from, dst.to_string(), *proto)
            } else {
                ("", String::new(), "")
            };
            println!("{f:<8} {d:<22} {p:<5} {backend:<36} {n:>5}");
        }
    }

    let bin = lb_tests::rig::agent_bin();
    for n in ["a", "b"] {
        println!("\n== lb-agent services on node-{n}");
        let out = Command::new(&bin)
            .args(["services", "--bpffs"])
            .arg(cluster.node(n).bpffs())
            .output()
            .expect("run lb-agent services");
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\n== done; tearing the cluster down");
    drop(servers);
    drop(cluster);
}
