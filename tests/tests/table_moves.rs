//! A Service's Maglev table rewritten 1000 times under a flood of new
//! flows (issue 19, docs/architecture.md, Maps: the Maglev slot array):
//! each change writes the table into another region of the slot array and
//! flips the frontend to it, while a second Service's table moves too and
//! takes back the regions given up. Every flow must reach a live backend of
//! its own Service that its table held while the flow began, and none may
//! be refused or reset: a packet that read a half-written region, or a
//! region already reused by the other Service, would land elsewhere or be
//! refused. web's changes mark one pod terminating in turn (out of the
//! table, its flows kept), so that no backend entry is deleted under a
//! flow, which ends the flow by design (docs/architecture.md, Invariants).
//!
//! Needs root. Run through `cargo xtask test`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use lb_agent::datapath::maps::Maps;
use lb_common::ServiceKey;
use lb_tests::{
    manifests::{docs, service, slice, Ep},
    rig::{serve_all_pods, tcp_hello, Cluster, ClusterSpec, POD_TCP_PORT},
};

const WAIT: Duration = Duration::from_secs(10);
/// The flooded frontend: web's NodePort on node-a.
const NODE_PORT: &str = "10.99.0.1:30080";
/// Table rewrites.
const CHANGES: usize = 1000;
/// Threads opening connections back to back.
const CLIENTS: usize = 3;

/// Pod name → address, as the rig numbers them.
fn pod_addr(pod: &str) -> String {
    let (node, j) = pod.split_at(1);
    let j: u8 = j.parse().expect("pod number");
    let subnet = if node == "a" { 1 } else { 2 };
    format!("10.244.{subnet}.{}", 10 + j)
}

/// web's four pods: at change `k` one of them is terminating (it keeps
/// the flows it has, and so its backend entry, but leaves the table), a
/// different one at each change.
const WEB: [&str; 4] = ["a0", "b0", "a1", "b1"];

/// The pod web's table leaves out at change `k`.
fn web_terminating(k: usize) -> &'static str {
    WEB[k % WEB.len()]
}

/// The pods web's table holds at change `k`.
fn web_set(k: usize) -> impl Iterator<Item = &'static str> {
    WEB.into_iter().filter(move |p| *p != web_terminating(k))
}

/// other's backends at change `k`: never one of web's.
fn other_set(k: usize) -> Vec<&'static str> {
    match k % 3 {
        0 => vec!["a2"],
        1 => vec!["b2"],
        _ => vec!["a2", "b2"],
    }
}

/// The manifest of Service `name` (ClusterIP `vip`, NodePort `node_port`)
/// with `pods` as its endpoints, `terminating` one of them if given.
fn manifest(
    name: &str,
    vip: &str,
    node_port: u16,
    pods: &[&str],
    terminating: Option<&str>,
) -> String {
    let addrs: Vec<(String, &str, bool)> = pods
        .iter()
        .map(|p| {
            let node = if p.starts_with('a') {
                "node-a"
            } else {
                "node-b"
            };
            (pod_addr(p), node, terminating == Some(*p))
        })
        .collect();
    let eps: Vec<Ep<'_>> = addrs
        .iter()
        .map(|(addr, node, terminating)| Ep {
            addr,
            node,
            ready: !terminating,
            terminating: *terminating,
        })
        .collect();
    docs(&[
        service(name, vip, 80, POD_TCP_PORT, Some(node_port), "TCP"),
        slice(name, &format!("{name}-1"), POD_TCP_PORT, "TCP", &eps),
    ])
}

/// web's table as node-a's maps hold it: fingerprint and first slot.
fn web_table(maps: &Maps) -> Option<(u64, u32)> {
    let frontend: SocketAddr = NODE_PORT.parse().expect("frontend");
    let (addr_be, family) = lb_common::addr::addr_be(frontend.ip());
    let key = ServiceKey {
        addr_be,
        port_be: frontend.port().to_be(),
        proto: 6,
        family,
    };
    let svc = maps.services.get(&key, 0).ok()?;
    let info = maps.infos.get(&svc.svc_id, 0).ok()?;
    Some((info.table_fingerprint, info.table_base))
}

/// One connection: the changes confirmed when it began and when it
/// ended, and the pod that answered (or why none did).
struct Flow {
    began: usize,
    ended: usize,
    answer: Result<String, String>,
}

#[test]
fn a_table_rewritten_1000_times_under_a_flood_of_flows_sends_every_flow_to_a_live_backend_of_its_set(
) {
    let mut c = Cluster::new(
        ClusterSpec {
            pods_per_node: 3,
            ..ClusterSpec::default()
        }
        .tag("tmove"),
    );
    let _servers = serve_all_pods(&c);
    let web = |k: usize| manifest("web", "10.96.0.10", 30080, &WEB, Some(web_terminating(k)));
    let other = |k: usize| manifest("other", "10.96.0.11", 30081, &other_set(k), None);
    c.write_manifest("web.yaml", &web(0));
    c.write_manifest("other.yaml", &other(0));
    // Room for four of web's tables (three backends: 1021 slots, a region
    // of 1024) or sixteen of other's (256): each move soon reuses a region
    // that one of the two Services gave up.
    c.node_mut("a").start_agent(&["--maglev-slots", "4096"]);
    c.node("a").wait_agent_ready(WAIT);
    let maps = Maps::open(&c.node("a").bpffs()).expect("open node-a's maps");

    // Changes confirmed in the maps so far: change k is in once this is k.
    let confirmed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let flows = Arc::new(Mutex::new(Vec::<Flow>::new()));
    let client = c.client_ns();
    let frontend: SocketAddr = NODE_PORT.parse().expect("frontend");
    let mut bases = BTreeSet::new();
    let mut moves = 0usize;
    std::thread::scope(|s| {
        for _ in 0..CLIENTS {
            let (confirmed, done, flows, client) = (
                confirmed.clone(),
                done.clone(),
                flows.clone(),
                client.clone(),
            );
            s.spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let began = confirmed.load(Ordering::SeqCst);
                    let answer = tcp_hello(&client, frontend, Duration::from_secs(3))
                        .map(|(line, _)| line.split_whitespace().next().unwrap_or("").to_owned())
                        .map_err(|e| e.to_string());
                    let ended = confirmed.load(Ordering::SeqCst);
                    let flow = Flow {
                        began,
                        ended,
                        answer,
                    };
                    flows.lock().expect("flows lock").push(flow);
                }
            });
        }
        let started = Instant::now();
        let mut table = web_table(&maps).expect("web's table is in the maps");
        bases.insert(table.1);
        for k in 1..=CHANGES {
            c.write_manifest("web.yaml", &web(k));
            c.write_manifest("other.yaml", &other(k));
            let deadline = Instant::now() + WAIT;
            let now = loop {
                match web_table(&maps) {
                    Some(t) if t.0 != table.0 => break t,
                    _ => {}
                }
                assert!(
                    Instant::now() < deadline,
                    "change {k}: web's new table not in the maps within {WAIT:?}"
                );
                std::thread::sleep(Duration::from_micros(200));
            };
            if now.1 != table.1 {
                moves += 1;
            }
            bases.insert(now.1);
            table = now;
            confirmed.store(k, Ordering::SeqCst);
        }
        done.store(true, Ordering::SeqCst);
        eprintln!(
            "{CHANGES} changes in {:?}: web's table moved {moves} times among {} regions",
            started.elapsed(),
            bases.len()
        );
    });

    let flows = flows.lock().expect("flows lock");
    let mut bad = Vec::new();
    for f in flows.iter() {
        // While a flow began, table `began` was in, or `began + 1` was
        // being flipped in; until it ended, later ones may have come.
        let allowed: BTreeSet<&str> = (f.began..=f.ended + 1).flat_map(web_set).collect();
        match &f.answer {
            Ok(pod) if allowed.contains(pod.as_str()) => {}
            other => bad.push(format!(
                "changes {}..={}: {other:?} (allowed {allowed:?})",
                f.began, f.ended
            )),
        }
    }
    eprintln!("{} flows, {} bad", flows.len(), bad.len());
    assert!(
        flows.len() >= CHANGES,
        "only {} flows during {CHANGES} changes",
        flows.len()
    );
    assert!(
        bad.is_empty(),
        "{} of {} flows went wrong: {:#?}",
        bad.len(),
        flows.len(),
        &bad[..bad.len().min(20)]
    );
    assert!(
        moves >= CHANGES / 2 && bases.len() < moves,
        "the table moved {moves} times among {} regions: the test did not exercise region reuse",
        bases.len()
    );
}
