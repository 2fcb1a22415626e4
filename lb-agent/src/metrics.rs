//! Prometheus metrics (text format 0.0.4, through `prometheus-client`).
//!
//! Two kinds: what the run loop records as it goes (sync outcomes,
//! reconcile latency, refused Service ports, full maps), and what the pinned
//! maps hold, read when Prometheus scrapes (datapath counters, per-Service
//! counters, map fill, conntrack evictions). Nothing is counted on the
//! packet path for metrics' sake: the datapath's own per-CPU counters are
//! summed at scrape time.
//!
//! Conntrack evictions are derived, since the kernel does not count LRU
//! evictions: the datapath counts the entries it inserts under a new key and
//! the entries it deletes itself, and nothing else deletes conntrack entries
//! (the agent never does), so `inserts - removals - entries` is the number of
//! entries the LRU evicted. The agent reports its growth since the agent
//! started, as a counter that never goes down.

use std::{
    path::Path,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, Result};
use lb_common::{maps, stats};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use tracing::warn;

use crate::{
    datapath::{
        maps::{capacity, Maps, SIZED},
        xdp_mode::Attachment,
    },
    problem_log::RefusalLog,
    reconcile::{Report, TableId},
};

/// Labels of a map.
type MapLabels = Vec<(&'static str, String)>;
/// Labels of an XDP attachment: interface, mode, reason.
type XdpLabels = Vec<(&'static str, String)>;

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconcile_seconds: Histogram,
    translated: Counter,
    sync_errors: Counter,
    refused: Gauge,
    problems: Gauge,
    map_full: Family<MapLabels, Gauge>,
    xdp_attach: Family<XdpLabels, Gauge>,
    service_problems: Family<Vec<(&'static str, String)>, Gauge>,
}

impl Metrics {
    /// Metrics over the maps pinned under `bpffs` (opened a second time, for
    /// reading only, so that scrapes never wait for the reconciler).
    pub fn new(bpffs: &Path) -> Result<Self> {
        let mut registry = Registry::with_prefix("lb");
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "reconcile_latency_seconds",
            "Time from a change being seen (manifest or address event) to the maps holding it",
            reconcile_seconds.clone(),
        );
        let translated = Counter::default();
        registry.register(
            "translated_services",
            "Services translated again from their objects because they (or the node) changed",
            translated.clone(),
        );
        let sync_errors = Counter::default();
        registry.register(
            "sync_errors",
            "Syncs that failed as a whole (the datapath kept its last state)",
            sync_errors.clone(),
        );
        let refused = Gauge::default();
        registry.register(
            "refused_service_ports",
            "Service ports the last sync could not program (see the log for why)",
            refused.clone(),
        );
        let problems = Gauge::default();
        registry.register(
            "sync_problems",
            "Invalid objects, documents or fields the last sync skipped (each logged as a warning)",
            problems.clone(),
        );
        let map_full = Family::<MapLabels, Gauge>::default();
        registry.register(
            "map_full",
            "1 while the last sync found the map without room for an entry it needed",
            map_full.clone(),
        );
        let xdp_attach = Family::<XdpLabels, Gauge>::default();
        registry.register(
            "xdp_attach_info",
            "1 for each node interface's XDP attach mode (native or skb) and why it was chosen",
            xdp_attach.clone(),
        );
        let service_problems = Family::<Vec<(&'static str, String)>, Gauge>::default();
        registry.register(
            "service_problems",
            "Service ports with each cause `lb-agent explain` names (no ready endpoint, targetPort not resolved, ...)",
            service_problems.clone(),
        );
        for cause in crate::explain::CAUSES {
            service_problems
                .get_or_create(&vec![("cause", cause.as_str().to_owned())])
                .set(0);
        }
        let mut capacities = Vec::new();
        for name in SIZED {
            capacities.push((name, capacity(bpffs, name)?));
            // Present from the start, so that alerts see 0 before any trouble.
            map_full.get_or_create(&map_labels(name)).set(0);
        }
        registry.register_collector(Box::new(DatapathCollector {
            maps: Mutex::new(Maps::open(bpffs).context("open the maps for metrics")?),
            capacities,
            evictions: Mutex::new(Evictions::default()),
            embryonic_evictions: Mutex::new(Evictions::default()),
        }));
        registry.register_collector(Box::new(SocketCollector {
            bpffs: bpffs.to_path_buf(),
        }));
        Ok(Self {
            registry,
            reconcile_seconds,
            translated,
            sync_errors,
            refused,
            problems,
            map_full,
            xdp_attach,
            service_problems,
        })
    }

    /// Records how many Service ports have each cause of trouble.
    pub fn service_problems(
        &self,
        counts: &std::collections::BTreeMap<crate::explain::Cause, usize>,
    ) {
        for cause in crate::explain::CAUSES {
            self.service_problems
                .get_or_create(&vec![("cause", cause.as_str().to_owned())])
                .set(gauge(counts.get(&cause).copied().unwrap_or(0)));
        }
    }

    /// Records the XDP mode of each node interface and why.
    pub fn xdp_attached(&self, attachments: &[Attachment]) {
        self.xdp_attach.clear();
        for a in attachments {
            let labels = vec![
                ("iface", a.iface.clone()),
                ("mode", a.mode.as_str().to_string()),
                ("reason", a.reason.clone()),
            ];
            self.xdp_attach.get_or_create(&labels).set(1);
        }
    }

    /// Records how long a change took from being seen to being in the maps.
    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    /// Counts `n` more Services translated again.
    pub fn translated(&self, n: u64) {
        self.translated.inc_by(n);
    }

    /// Counts a sync that failed as a whole.
    pub fn sync_failed(&self) {
        self.sync_errors.inc();
    }

    /// Records the outcome of a sync: `problems` (invalid objects or fields)
    /// skipped, and what the reconciler could not program.
    pub fn record_sync(&self, problems: usize, report: &Report) {
        self.problems.set(gauge(problems));
        self.refused.set(gauge(report.failures.len()));
        for name in SIZED.iter().chain(&[maps::SVC_INFO, maps::MAGLEV]) {
            let full = report.failures.iter().any(|f| f.full_map == Some(*name));
            self.map_full
                .get_or_create(&map_labels(name))
                .set(i64::from(full));
        }
    }

    /// The Prometheus text of every metric, reading the maps now.
    pub fn render(&self) -> Result<String> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .context("encode metrics")?;
        Ok(out)
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn map_labels(name: &str) -> MapLabels {
    vec![("map", name.to_string())]
}

/// Tracks `inserts - removals - entries` to turn it into an eviction counter
/// that starts at 0 with the agent and never decreases (the three values
/// are read one after the other, so they may disagree by a flow or two).
#[derive(Debug, Default)]
struct Evictions {
    base: Option<i128>,
    seen: u64,
}

impl Evictions {
    fn update(&mut self, inserts: u64, removals: u64, entries: u64) -> u64 {
        let raw = i128::from(inserts) - i128::from(removals) - i128::from(entries);
        let base = *self.base.get_or_insert(raw);
        let now = u64::try_from(raw - base).unwrap_or(0);
        self.seen = self.seen.max(now);
        self.seen
    }
}

/// Reads the pinned maps at scrape time.
struct DatapathCollector {
    maps: Mutex<Maps>,
    capacities: Vec<(&'static str, u32)>,
    evictions: Mutex<Evictions>,
    /// The same for the embryonic conntrack map.
    embryonic_evictions: Mutex<Evictions>,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCollector")
            .field("capacities", &self.capacities)
            .finish_non_exhaustive()
    }
}

/// A table's name, as its record holds it, split into labels (see
/// [`TableId`]). A name that does not read back (cut short at the record's
/// length) is the `name` label whole.
fn service_labels(full: &str) -> Vec<(&'static str, String)> {
    let (namespace, name, port, proto, scope, family) = match full.parse::<TableId>() {
        Ok(id) => (
            id.port.namespace,
            id.port.name,
            id.port.port_name,
            id.port.protocol.to_string(),
            id.scope.to_string(),
            id.family.to_string(),
        ),
        Err(_) => (
            String::new(),
            full.to_string(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ),
    };
    vec![
        ("namespace", namespace),
        ("name", name),
        ("port", port),
        ("proto", proto),
        ("scope", scope),
        ("family", family),
    ]
}

/// Encodes one metric family of constant values.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        // A map that cannot be read leaves its metrics out of this scrape
        // (and says why in the log) rather than failing the whole scrape.
        match maps.counters() {
            Ok(counters) => {
                let (ct, packets): (Vec<_>, Vec<_>) =
                    counters.iter().enumerate().partition(|(i, _)| {
                        matches!(
                            *i as u32,
                            stats::CT_INSERT
                                | stats::CT_REMOVE
                                | stats::CT_EMBRYO_INSERT
                                | stats::CT_EMBRYO_REMOVE
                                | stats::CT_ESTABLISHED
                        )
                    });
                family(
                    &mut encoder,
                    "packets",
                    "Packets the datapath handled, by outcome (summed over CPUs)",
                    MetricType::Counter,
                    packets.iter().map(|(_, (n, c))| {
                        (
                            vec![("outcome", n.to_string())],
                            ConstCounter::new(c.packets),
                        )
                    }),
                )?;
                family(
                    &mut encoder,
                    "drops",
                    "Packets dropped or refused, by reason",
                    MetricType::Counter,
                    packets
                        .iter()
                        .filter(|(i, _)| stats::is_drop(*i as u32))
                        .map(|(_, (n, c))| {
                            (
                                vec![("reason", n.to_string())],
                                ConstCounter::new(c.packets),
                            )
                        }),
                )?;
                let get = |idx: u32| {
                    ct.iter()
                        .find(|(i, _)| *i as u32 == idx)
                        .map_or(0, |(_, (_, c))| c.packets)
                };
                let (inserts, removals) = (get(stats::CT_INSERT), get(stats::CT_REMOVE));
                family(
                    &mut encoder,
                    "conntrack_inserts",
                    "Conntrack entries the datapath inserted under a new key",
                    MetricType::Counter,
                    [(vec![], ConstCounter::new(inserts))],
                )?;
                family(
                    &mut encoder,
                    "conntrack_removals",
                    "Conntrack entries the datapath deleted (timeout, backend gone)",
                    MetricType::Counter,
                    [(vec![], ConstCounter::new(removals))],
                )?;
                match maps.entries(maps::CONNTRACK) {
                    Ok(entries) => {
                        let evicted = self
                            .evictions
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .update(inserts, removals, entries);
                        family(
                            &mut encoder,
                            "conntrack_evictions",
                            "Conntrack entries the LRU evicted to make room, since the agent started \
                             (inserts - removals - entries)",
                            MetricType::Counter,
                            [(vec![], ConstCounter::new(evicted))],
                        )?;
                    }
                    Err(e) => warn!("metrics: {e:#}"),
                }
                let (inserts, removals) =
                    (get(stats::CT_EMBRYO_INSERT), get(stats::CT_EMBRYO_REMOVE));
                family(
                    &mut encoder,
                    "conntrack_established",
                    "Flows established: moved from the embryonic conntrack map to the main \
                     one once the backend sent past the handshake (or the client kept sending \
                     where no answer passes this node)",
                    MetricType::Counter,
                    [(vec![], ConstCounter::new(get(stats::CT_ESTABLISHED)))],
                )?;
                match maps.entries(maps::CT_EMBRYO) {
                    Ok(entries) => {
                        let evicted = self
                            .embryonic_evictions
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .update(inserts, removals, entries);
                        family(
                            &mut encoder,
                            "conntrack_embryonic_entries",
                            "Entries of flows not established yet (two per flow)",
                            MetricType::Gauge,
                            [(vec![], ConstGauge::new(entries as i64))],
                        )?;
                        family(
                            &mut encoder,
                            "conntrack_embryonic_evictions",
                            "Embryonic conntrack entries the LRU evicted to make room for other \
                             new flows, since the agent started",
                            MetricType::Counter,
                            [(vec![], ConstCounter::new(evicted))],
                        )?;
                    }
                    Err(e) => warn!("metrics: {e:#}"),
                }
            }
            Err(e) => warn!("metrics: {e:#}"),
        }

        match maps.service_counters() {
            Ok(services) => {
                let rows = |f: fn(&stats::SvcCounters) -> u64| {
                    services
                        .iter()
                        .map(move |(_, name, c)| (service_labels(name), ConstCounter::new(f(c))))
                };
                family(
                    &mut encoder,
                    "service_packets",
                    "Packets of a Service port's flows, both directions",
                    MetricType::Counter,
                    rows(|c| c.packets),
                )?;
                family(
                    &mut encoder,
                    "service_bytes",
                    "Bytes of a Service port's flows, both directions",
                    MetricType::Counter,
                    rows(|c| c.bytes),
                )?;
                family(
                    &mut encoder,
                    "service_new_flows",
                    "Flows opened to a Service port",
                    MetricType::Counter,
                    rows(|c| c.new_flows),
                )?;
                family(
                    &mut encoder,
                    "service_drops",
                    "Packets to a Service port that reached no backend (dropped or refused)",
                    MetricType::Counter,
                    rows(|c| c.drops),
                )?;
            }
            Err(e) => warn!("metrics: {e:#}"),
        }

        let mut fill = Vec::new();
        for (name, cap) in &self.capacities {
            match maps.entries(name) {
                Ok(n) => fill.push((*name, n, *cap)),
                Err(e) => warn!("metrics: {e:#}"),
            }
        }
        family(
            &mut encoder,
            "map_entries",
            "Entries a map holds",
            MetricType::Gauge,
            fill.iter()
                .map(|(name, n, _)| (map_labels(name), ConstGauge::new(*n))),
        )?;
        family(
            &mut encoder,
            "map_capacity",
            "Entries a map can hold (its size flag)",
            MetricType::Gauge,
            fill.iter()
                .map(|(name, _, cap)| (map_labels(name), ConstGauge::new(*cap))),
        )?;
        family(
            &mut encoder,
            "map_fill_ratio",
            "Entries over capacity",
            MetricType::Gauge,
            fill.iter().map(|(name, n, cap)| {
                (
                    map_labels(name),
                    ConstGauge::new(*n as f64 / f64::from((*cap).max(1))),
                )
            }),
        )?;
        if let Some((_, n, _)) = fill.iter().find(|(name, _, _)| *name == maps::CONNTRACK) {
            family(
                &mut encoder,
                "conntrack_entries",
                "Tracked flow directions (two per flow)",
                MetricType::Gauge,
                [(vec![], ConstGauge::new(*n))],
            )?;
        }
        Ok(())
    }
}

/// The socket hooks' counters, read from their pinned map at each scrape.
#[derive(Debug)]
struct SocketCollector {
    bpffs: std::path::PathBuf,
}

impl Collector for SocketCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match crate::datapath::cgroup::counters(&self.bpffs) {
            // No socket hooks: no family.
            Ok(rows) if rows.is_empty() => Ok(()),
            Ok(rows) => family(
                &mut encoder,
                "socket_events",
                "Calls of the node's sockets the socket hooks translated, refused or \
                 reversed, and sockets of gone backends ended or left (summed over CPUs)",
                MetricType::Counter,
                rows.into_iter()
                    .map(|(name, n)| (vec![("event", name.to_string())], ConstCounter::new(n))),
            ),
            Err(e) => {
                warn!("metrics: {e:#}");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_split_into_labels() {
        let l = service_labels("demo/web:http/TCP@local@v6");
        assert_eq!(
            l,
            vec![
                ("namespace", "demo".to_string()),
                ("name", "web".to_string()),
                ("port", "http".to_string()),
                ("proto", "TCP".to_string()),
                ("scope", "local".to_string()),
                ("family", "IPv6".to_string()),
            ]
        );
        let l = service_labels("demo/dns/UDP");
        assert_eq!(l[1].1, "dns");
        assert_eq!(l[2].1, "");
        assert_eq!(l[3].1, "UDP");
        assert_eq!(l[4].1, "cluster");
        assert_eq!(l[5].1, "IPv4");
    }

    #[test]
    fn a_name_that_does_not_read_back_is_the_name_label() {
        let l = service_labels("demo/a-very-long-name:po");
        assert_eq!(l[0].1, "");
        assert_eq!(l[1].1, "demo/a-very-long-name:po");
    }

    #[test]
    fn evictions_count_from_the_start_and_never_go_down() {
        let mut e = Evictions::default();
        // An older map may hold entries the counters never saw.
        assert_eq!(e.update(10, 0, 40), 0);
        // 100 more inserts, 10 removals, 60 more entries: 30 evicted.
        assert_eq!(e.update(110, 10, 100), 30);
        // Reads that race a flow's two inserts must not make it shrink.
        assert_eq!(e.update(110, 10, 101), 30);
        assert_eq!(e.update(120, 10, 100), 40);
    }
}

/// What the run loop calls after each sync: metrics and the refusal log.
#[derive(Debug)]
pub struct SyncRecorder {
    metrics: std::sync::Arc<Metrics>,
    refusals: RefusalLog,
}

impl SyncRecorder {
    /// Records into `metrics`.
    pub fn new(metrics: std::sync::Arc<Metrics>) -> Self {
        Self {
            metrics,
            refusals: RefusalLog::default(),
        }
    }

    /// A sync reached the maps: `problems` (invalid objects or fields) were
    /// skipped, `report` says what the reconciler did; `seen` is when the
    /// change that caused it was first noticed, if a change did.
    pub fn synced(&mut self, seen: Option<std::time::Instant>, problems: usize, report: &Report) {
        if let Some(seen) = seen {
            self.metrics.observe_reconcile(seen.elapsed());
        }
        self.metrics.record_sync(problems, report);
        self.refusals.update(report);
    }

    /// A sync failed as a whole.
    pub fn failed(&self) {
        self.metrics.sync_failed();
    }
}
