//! `lb-agent run`: the agent's loop. Load the programs and open the maps,
//! adopt what an earlier agent left, then on every change of the source or
//! of the node's interfaces: load what changed, translate, reconcile the
//! maps, serve the health check ports, and once the first sync is in,
//! attach the programs and report ready.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Instant};

use anyhow::{bail, Context as _, Result};
use lb_agent::{
    check,
    datapath::{
        bpffs, cgroup,
        config::{ephemeral_ports, write_config, Settings},
        maps::Maps,
        programs::{self, Programs},
        stale, upgrade,
    },
    endpoints::{self, Readiness},
    explain,
    health::{self, AgentHealth, HealthServers},
    maglev,
    metrics::{Metrics, SyncRecorder},
    model::{AddressFilter, Cidr, NodeInfo, Problem, ServicePortRef, Translator},
    node::{iface_addresses, ifaces_carrying, link_events, local_addresses, primary_addresses},
    problem_log::ProblemLog,
    reconcile::{Reconciler, Report},
    source::Source,
};
use tracing::{debug, error, info, warn};

use crate::cli::{self, Mode, RunArgs};

/// Runs the agent until SIGTERM or Ctrl-C: programs stay attached and maps
/// pinned when it returns.
pub(crate) fn run(args: &RunArgs) -> Result<()> {
    // Before anything is attached: a source that cannot work is an error
    // the user should see at once, not after programs are in place.
    if args.manifests.is_none()
        && args.kubeconfig.is_none()
        && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none()
    {
        bail!("no --manifests DIR or --kubeconfig FILE, and not in a pod (KUBERNETES_SERVICE_HOST is unset): pass one of the two flags");
    }
    if args.zone.is_some() && args.manifests.is_none() {
        warn!("--zone is for --manifests: with the API the Node's topology.kubernetes.io/zone label is used");
    }
    let snat_ports = cli::parse_port_range(&args.snat_ports)?;
    let flag_errors = check::flag_errors(&args.check_flags());
    if !flag_errors.is_empty() {
        bail!("{}", flag_errors.join("; "));
    }
    let preflight = check::run(&args.check_flags());
    preflight.log();
    if preflight.fails() {
        bail!("this node cannot run the agent: see the failed checks above (`lb-agent check` with the same flags says the same)");
    }
    let patterns = args
        .pod_ifaces
        .iter()
        .map(|p| glob::Pattern::new(p).with_context(|| format!("--pod-ifaces: bad pattern {p}")))
        .collect::<Result<Vec<_>>>()?;
    let start = bpffs::StartGuard::new(&args.bpffs).also_remove(explain::state_dir(&args.bpffs));
    bpffs::ensure(&args.bpffs)?;

    // The SNAT source is an address of the external interfaces in both
    // modes: it is what replies must come back to.
    let mut iface_addrs = iface_addresses(&args.iface)?;
    let mut local = local_addresses()?;

    // Multi-threaded: the API source lists on a worker while this thread
    // loads the programs below.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let (mut source, mut changes) = rt.block_on(Source::start(
        args.manifests.as_deref(),
        args.kubeconfig.as_deref(),
        &args.node_name,
    ))?;
    let mut translator = Translator::default();
    let mut node = NodeInfo {
        name: args.node_name.clone(),
        addresses: Vec::new(),
        zone: args.zone.clone(),
    };
    // Loading and verifying the programs and reading the source do not
    // depend on each other: the first read (a manifests folder read and
    // translated in full; the API lists meanwhile) runs beside the load.
    let (progs, first_load) = std::thread::scope(|scope| {
        let reading = scope.spawn(|| {
            let local_ips: Vec<_> = local.iter().map(|(_, a)| *a).collect();
            let t = Instant::now();
            let loaded = source.load(
                &iface_addrs,
                &local_ips,
                &args.nodeport_addresses,
                &mut node,
                &mut translator,
            );
            debug!(took = ?t.elapsed(), "first read of the source");
            loaded
        });
        let t = Instant::now();
        let progs = Programs::load(&args.bpffs, args.sizes(), args.xdp_policy());
        debug!(took = ?t.elapsed(), "programs loaded");
        let first = reading
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (progs, first)
    });
    // The parse of the whole source left its garbage in the reading
    // thread's malloc arena; the first sync allocates in another one, so
    // without this both peaks would add up in the RSS.
    release_free_memory();
    let mut progs = progs?;
    let mut first_load = Some(first_load);
    let mut maps = Maps::open(&args.bpffs)?;
    let settings = Settings {
        snat_ports,
        ephemeral_ports: ephemeral_ports(),
        timeouts: [
            args.conntrack_tcp_timeout,
            args.conntrack_tcp_closing_timeout,
            args.conntrack_udp_timeout,
        ],
        embryonic_timeout: args.conntrack_embryonic_timeout,
        dsr: args.mode == Mode::Dsr,
    };
    let snat_port_count = settings.snat_port_count()?;
    info!(
        ports = ?settings.snat_ports,
        node_ephemeral = ?settings.ephemeral_ports,
        per_backend = snat_port_count,
        "SNAT ports: the range less the node's ephemeral ports"
    );
    write_config(&mut maps, &iface_addrs, &settings)?;
    let sock_cgroup = cgroup::prepare(
        &args.bpffs,
        args.socket_lb,
        args.cgroup2.as_deref(),
        progs.sock_error(),
    );
    let old_pins = upgrade::older_pins(&args.bpffs)?;
    for (name, n) in upgrade::migrate(&args.bpffs, &old_pins)? {
        info!(map = %name, entries = n, "converted an older map layout");
    }

    let metrics = Arc::new(Metrics::new(&args.bpffs)?);
    let mut recorder = SyncRecorder::new(metrics.clone());

    let table_size = args
        .maglev_table_size
        .map_or(maglev::TableSize::Scaled, maglev::TableSize::Fixed);
    let snap = maps.snapshot()?;
    maps.adopt_regions(&snap);
    let mut reconciler = Reconciler::adopt(&snap, table_size).with_backend_grace(BACKEND_GRACE);
    drop(snap);
    info!(
        services = reconciler.service_count(),
        "adopted existing maps"
    );

    rt.block_on(async {
        let mut link_events = link_events()?;
        let agent_health = AgentHealth::new(std::time::Duration::from_secs(u64::from(args.health_timeout)));
        let mut health = HealthServers::new(agent_health.clone());
        let mut reported = ProblemLog::default();
        let mut diagnosis = explain::Diagnosis::new(&args.bpffs);
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("install SIGTERM handler")?;
        let ready = Readiness::default();
        let _metrics_server = endpoints::serve_metrics(args.metrics_addr, metrics.clone())?;
        let _health_server =
            endpoints::serve_health(args.health_addr, ready.clone(), agent_health.clone())?;

        // Written into the peers map so far (`None`: not yet this run).
        let mut dsr_peers: Option<Vec<Cidr>> = None;
        // Written into the interface address map so far, likewise.
        let mut snat_addrs: Option<Vec<(u32, IpAddr)>> = None;
        // The manifests folder is complete at once; the API once listed.
        let mut due = true;
        // When the change a pending sync answers was first noticed.
        let mut seen: Option<Instant> = None;
        // Whether changes came in while the last sync ran, and when it
        // ended.
        let mut burst = false;
        let mut last_end: Option<Instant> = None;
        loop {
            if due {
                due = false;
                let local_ips: Vec<_> = local.iter().map(|(_, a)| *a).collect();
                let translated = translator.translated();
                let loaded = match first_load.take() {
                    Some(loaded) => {
                        metrics.translated(translator.translated());
                        loaded
                    }
                    None => {
                        let loaded = source.load(&iface_addrs, &local_ips, &args.nodeport_addresses, &mut node, &mut translator);
                        metrics.translated(translator.translated() - translated);
                        loaded
                    }
                };
                match loaded {
                    Ok(None) => {}
                    Ok(Some((source_problems, changed))) => {
                        match source.node_eligibility() {
                            Ok(()) => agent_health.set_node_eligible(true, ""),
                            Err(why) => agent_health.set_node_eligible(false, &why),
                        }
                        let (problems, report) =
                            sync(source_problems, &translator, &changed, &node, &mut reconciler, &mut maps, &mut health);
                        update_dsr_peers(&args.dsr_peers.0, &source.node_peers(), &mut dsr_peers, &mut maps);
                        agent_health.synced();
                        if sock_cgroup.is_some() && report.deletes > 0 {
                            stale::after_sync(&args.bpffs, reconciler.backends());
                        }
                        let invalid = problems.len().saturating_sub(report.failures.len());
                        recorder.synced(seen.take(), invalid, &report);
                        // Refused Service ports (the tail of `problems`)
                        // are logged by the recorder's refusal log.
                        reported.log(&problems[..invalid]);
                        let refused = report
                            .failures
                            .iter()
                            .map(|f| (f.service.port.clone(), f.message.clone()))
                            .collect();
                        let all_addrs = source.node_addresses_unfiltered(&local_ips);
                        let node_state = explain::NodeState {
                            name: node.name.clone(),
                            ifaces: args.iface.clone(),
                            addresses: node.addresses.clone(),
                            filtered_out: all_addrs
                                .into_iter()
                                .filter(|a| !node.addresses.contains(a))
                                .collect(),
                            nodeport_addresses: args.nodeport_addresses.entries(),
                        };
                        let extra = nodeport_ifaces(&local, &node, args, &patterns);
                        let first = !ready.is_ready();
                        if ready.is_ready() {
                            match progs.sync_node(&args.iface, &extra) {
                                Ok(()) => metrics.xdp_attached(progs.xdp_attachments()),
                                Err(e) => warn!("node interface sync failed: {e:#}"),
                            }
                            update_snat_addrs(&progs, &local, &mut snat_addrs, &mut maps);
                        } else {
                            // Programs are attached (or swapped, on a restart
                            // or upgrade) only now that the maps hold the
                            // whole desired state: new programs never see a
                            // half-filled map, and old ones keep theirs until
                            // the swap.
                            progs.install_sctp()?;
                            progs.sync_node(&args.iface, &extra)?;
                            metrics.xdp_attached(progs.xdp_attachments());
                            update_snat_addrs(&progs, &local, &mut snat_addrs, &mut maps);
                            progs.sync_pods(&patterns)?;
                            if let Some(dir) = &sock_cgroup {
                                if let Err(e) = progs.attach_sockets(dir) {
                                    warn!("socket-level load balancing is off: {e:#}");
                                }
                            }
                            upgrade::retire(&args.bpffs, &old_pins)?;
                            for pin in &old_pins {
                                info!(old = %pin.name, new = pin.current, "older map layout {}", upgrade::describe(pin));
                            }
                            ready.set_ready();
                            start.keep();
                            info!(
                                node = %node.name,
                                addresses = ?node.addresses,
                                metrics = %args.metrics_addr,
                                health = %args.health_addr,
                                "lb-agent ready"
                            );
                        }
                        // After the attach: on the first sync this writes
                        // the state of every Service for `lb-agent
                        // explain`, which the datapath need not wait for.
                        diagnosis.update(&translator, &changed, &node_state, refused, first);
                        metrics.service_problems(&diagnosis.counts());
                        source.report(&problems, &diagnosis.problems());
                        if first {
                            release_free_memory();
                        }
                    }
                    // Without a first state there is nothing to keep.
                    Err(e) if !ready.is_ready() => return Err(e),
                    Err(e) => {
                        agent_health.failed();
                        recorder.failed();
                        error!("reload failed, datapath keeps its last state: {e:#}");
                    }
                }
                burst = !changes.is_empty();
                last_end = Some(Instant::now());
            }
            tokio::select! {
                Some(()) = changes.recv() => {
                    agent_health.queued(*seen.get_or_insert_with(Instant::now));
                    // Coalesce a burst of changes into one sync. A whole
                    // change (a file renamed into place, an API event) that
                    // found the agent idle, nothing for the quiet time
                    // since the last sync, syncs at once with what is
                    // queued beside it; changes that came in while a sync
                    // ran or right after it are a burst, and wait to be
                    // coalesced, as do files still being written.
                    let (quiet, longest) = source.coalescing();
                    let now = Instant::now();
                    let until = now + longest;
                    let mut wait = burst
                        || last_end.is_some_and(|t| now < t + quiet)
                        || !source.settled();
                    loop {
                        if wait {
                            tokio::time::sleep(quiet).await;
                        } else {
                            tokio::task::yield_now().await;
                            wait = true;
                        }
                        let mut more = false;
                        while changes.try_recv().is_ok() {
                            more = true;
                        }
                        if !more || Instant::now() >= until {
                            break;
                        }
                    }
                    due = true;
                }
                Some(()) = link_events.recv() => {
                    while link_events.try_recv().is_ok() {}
                    // Before the first sync nothing is attached yet.
                    if ready.is_ready() {
                        if let Err(e) = progs.sync_pods(&patterns) {
                            warn!("pod interface sync failed: {e:#}");
                        }
                    }
                    match iface_addresses(&args.iface) {
                        Ok(addrs) if addrs != iface_addrs => {
                            info!(addresses = ?addrs, "interface addresses changed");
                            iface_addrs = addrs;
                            if let Err(e) = write_config(&mut maps, &iface_addrs, &settings) {
                                error!("rewriting the config after an address change failed: {e:#}");
                            }
                            agent_health.queued(*seen.get_or_insert_with(Instant::now));
                            due = true;
                        }
                        Ok(_) => {}
                        Err(e) => warn!("reading interface addresses failed: {e:#}"),
                    }
                    // Addresses elsewhere may be NodePort addresses
                    // (`--nodeport-addresses` CIDRs), or move interfaces.
                    match local_addresses() {
                        Ok(now) if now != local => {
                            // With `primary` only the interfaces carrying
                            // it matter: a pod interface's address is no
                            // reason to sync.
                            let before = nodeport_ifaces(&local, &node, args, &patterns);
                            local = now;
                            if matches!(args.nodeport_addresses, AddressFilter::Cidrs(_))
                                || nodeport_ifaces(&local, &node, args, &patterns) != before
                            {
                                agent_health.queued(*seen.get_or_insert_with(Instant::now));
                                due = true;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => warn!("reading interface addresses failed: {e:#}"),
                    }
                    if ready.is_ready() {
                        update_snat_addrs(&progs, &local, &mut snat_addrs, &mut maps);
                    }
                }
                // Half a grace late, so that one apply deletes the
                // backends of many changes.
                () = retirement(reconciler.next_retirement().map(|t| t + BACKEND_GRACE / 2)) => {
                    // Nothing changed: an apply of no change deletes the
                    // backends whose grace is over.
                    let report = reconciler.apply_changed(translator.model(), &BTreeSet::new(), &mut maps);
                    debug!(deletes = report.deletes, "removed backends after their grace");
                    if sock_cgroup.is_some() && report.deletes > 0 {
                        stale::after_sync(&args.bpffs, reconciler.backends());
                    }
                }
                _ = sigterm.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        info!("exiting; programs stay attached and maps stay pinned (`lb-agent cleanup` removes them)");
        Ok::<(), anyhow::Error>(())
    })
}

/// How long a backend that left every slice stays in the backends map
/// (marked not serving) after its Service's table stopped naming it: a
/// handshake that chose it from the old table on another CPU just before
/// the flip completes instead of being reset, and its id is not reused
/// under such a flow meanwhile. UDP flows leave it at once.
const BACKEND_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Sleeps until `at`, or forever when it is `None`.
async fn retirement(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// The interfaces outside `--iface` that carry a NodePort address (a
/// second NIC, a bond, a VLAN): the node programs go there too, since a
/// NodePort is served wherever its address lives, as the kernel would
/// accept a packet to that address on any interface. Pod interfaces are
/// left to the pod program.
fn nodeport_ifaces(
    local: &[(String, std::net::IpAddr)],
    node: &NodeInfo,
    args: &RunArgs,
    pods: &[glob::Pattern],
) -> Vec<String> {
    ifaces_carrying(local, &node.addresses, |i| {
        args.iface.iter().any(|x| x == i) || pods.iter().any(|p| p.matches(i))
    })
}

/// Writes the primary address of each family of each interface the node
/// programs run on as its SNAT source, when that differs from what `written` says
/// the map holds. Only those interfaces: a flow SNATed to another one's
/// address would have its replies come back where nothing translates them
/// (it takes the node's address instead). A failure is logged and retried
/// at the next sync or link event.
fn update_snat_addrs(
    progs: &Programs,
    local: &[(String, IpAddr)],
    written: &mut Option<Vec<(u32, IpAddr)>>,
    maps: &mut Maps,
) {
    let ifaces: Vec<String> = progs
        .xdp_attachments()
        .iter()
        .map(|a| a.iface.clone())
        .collect();
    let mut addrs = Vec::new();
    for (iface, addr) in primary_addresses(local, &ifaces) {
        match programs::ifindex(&iface) {
            Ok(idx) => addrs.push((idx, addr)),
            Err(e) => debug!(%iface, "no SNAT address for it: {e:#}"),
        }
    }
    if written.as_ref() == Some(&addrs) {
        return;
    }
    match maps.set_iface_addrs(&addrs) {
        Ok(()) => {
            info!(addresses = ?addrs, "SNAT source per interface (index, address)");
            *written = Some(addrs);
        }
        Err(e) => warn!("SNAT interface addresses not written, retried later: {e:#}"),
    }
}

/// Makes the maps, and the health check ports, match the translated
/// model; returns every problem found (the source's, untranslatable input
/// and Service ports the maps refused) and what the reconciler did.
fn sync(
    source_problems: Vec<Problem>,
    translator: &Translator,
    changed: &BTreeSet<ServicePortRef>,
    node: &NodeInfo,
    reconciler: &mut Reconciler,
    maps: &mut Maps,
    health: &mut HealthServers,
) -> (Vec<Problem>, Report) {
    let model = translator.model();
    let problems = translator.problems();
    let report = reconciler.apply_changed(model, changed, maps);
    let health_problems = health.update(&health::desired(model), &node.addresses);
    match maps.purge_affinity(|svc, backend| reconciler.is_active(svc, backend)) {
        Ok(0) => {}
        Ok(n) => debug!(
            entries = n,
            "dropped affinity entries of backends that take no new flows"
        ),
        Err(e) => warn!("purging affinity entries failed: {e:#}"),
    }
    info!(
        services = model.services.len(),
        writes = report.writes,
        deletes = report.deletes,
        failures = report.failures.len(),
        "synced"
    );
    let mut all = source_problems;
    all.extend(problems);
    all.extend(health_problems);
    all.extend(report.failures.iter().map(|f| f.to_problem()));
    (all, report)
}

/// Writes the DSR peers, `--dsr-peers` and the nodes' addresses, when they
/// differ from what `written` says the map holds; a failure is logged and
/// retried at the next sync (the map keeps its last peers meanwhile).
fn update_dsr_peers(
    flag: &[Cidr],
    nodes: &[std::net::IpAddr],
    written: &mut Option<Vec<Cidr>>,
    maps: &mut Maps,
) {
    let mut peers: Vec<Cidr> = flag
        .iter()
        .copied()
        .chain(nodes.iter().map(|a| Cidr {
            addr: *a,
            prefix: if a.is_ipv4() { 32 } else { 128 },
        }))
        .collect();
    peers.sort();
    peers.dedup();
    if written.as_ref() == Some(&peers) {
        return;
    }
    match maps.set_dsr_peers(&peers) {
        Ok(()) => {
            let list: Vec<String> = peers
                .iter()
                .map(|c| format!("{}/{}", c.addr, c.prefix))
                .collect();
            info!(peers = %list.join(","), "DSR peers: wrapped packets from these are unwrapped, others dropped");
            *written = Some(peers);
        }
        Err(e) => warn!("DSR peers not written, retried at the next sync: {e:#}"),
    }
}

/// Hands the allocator's free pages back to the kernel: after the first
/// read and the first sync, whose temporary objects would otherwise stay
/// in the process's RSS for good.
#[cfg(target_env = "gnu")]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
    let released = unsafe { libc::malloc_trim(0) };
    debug!(released = released != 0, "free heap pages handed back");
}

/// Other C libraries have no `malloc_trim`: nothing to hand back by hand.
#[cfg(not(target_env = "gnu"))]
fn release_free_memory() {}
