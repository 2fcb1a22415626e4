//! The Kubernetes API: Services, EndpointSlices and this agent's Node,
//! watched with kube-rs reflectors.
//!
//! Each resource has a local store fed by a list+watch stream. A watch
//! error (the API server gone, a 410 Gone) never empties a store: the
//! watcher retries with backoff and relists, and a relist replaces the
//! store's contents only once it is complete, so only objects that are
//! really gone disappear. The agent therefore keeps programming the last
//! state it saw while the API is away; nothing is flushed.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::owners::Owners;
use crate::model::{self, Id, Problem, SliceObject};

/// Connects with the kubeconfig at `path`, or with the in-cluster
/// configuration (service account token, `KUBERNETES_SERVICE_HOST`).
///
/// # Errors
///
/// When the file cannot be read or names no usable cluster, or when there
/// is no path and the agent does not run in a pod.
pub async fn connect(path: Option<&Path>) -> anyhow::Result<Client> {
    let config = match path {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("use kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "no --manifests or --kubeconfig given, and no in-cluster configuration \
             (KUBERNETES_SERVICE_HOST and the service account token are what a pod has); \
             pass one of the two flags",
        )?,
    };
    info!(server = %config.cluster_url, "using the Kubernetes API");
    Client::try_from(config).context("build the Kubernetes client")
}

/// Which of the three resources have completed their first full list.
#[derive(Debug, Default)]
struct Synced {
    services: AtomicBool,
    slices: AtomicBool,
    node: AtomicBool,
}

/// Local copies of the watched objects, kept current in the background.
#[derive(Clone)]
pub struct Watch {
    services: Store<Service>,
    slices: Store<SliceObject>,
    /// Every Node: this agent's for its NodePort addresses, all of them
    /// for the peers whose DSR-wrapped packets are unwrapped.
    nodes: Store<Node>,
    node_name: String,
    synced: Arc<Synced>,
    /// What changed since the last [`Watch::take_changes`], and which
    /// slices belong to which Service.
    index: Arc<std::sync::Mutex<Index>>,
}

/// Where the store keeps an EndpointSlice.
type SliceKey = reflector::ObjectRef<SliceObject>;

/// The store's key of `slice`, without the version and uid the store's
/// own keys carry (equality ignores them).
fn slice_key(slice: &SliceObject) -> SliceKey {
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    match slice.metadata.namespace.as_deref() {
        Some(ns) => SliceKey::new(name).within(ns),
        None => SliceKey::new(name),
    }
}

/// The Service identities whose objects changed since the last sync.
#[derive(Debug, Default)]
pub struct Changes {
    /// Every Service may have changed: a list (the first, or a relist
    /// after an outage or a 410 Gone) replaced a store whole, and a
    /// relist says nothing about which objects went away.
    pub all: bool,
    /// The identities a watch event touched.
    pub ids: BTreeSet<Id>,
}

/// What the reflector tasks record for the syncs.
#[derive(Debug, Default)]
struct Index {
    changes: Changes,
    /// The Service each stored EndpointSlice belongs to.
    slices: Owners<SliceKey>,
    /// The slices of a list under way, which replace `slices` once it is
    /// complete (as the store's contents are replaced).
    listing: Option<Owners<SliceKey>>,
}

impl Index {
    /// Records a Service event.
    fn service(&mut self, event: &watcher::Event<Service>) {
        match event {
            watcher::Event::Apply(s) | watcher::Event::Delete(s) => {
                self.changes.ids.insert(model::service_id(s));
            }
            watcher::Event::InitDone => self.changes.all = true,
            watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }

    /// Records an EndpointSlice event.
    fn slice(&mut self, event: &watcher::Event<SliceObject>) {
        let key = slice_key;
        match event {
            watcher::Event::Apply(s) => {
                self.slices.set(
                    &key(s),
                    model::slice_owner(&s.metadata),
                    &mut self.changes.ids,
                );
            }
            watcher::Event::Delete(s) => self.slices.remove(&key(s), &mut self.changes.ids),
            watcher::Event::Init => self.listing = Some(Owners::default()),
            watcher::Event::InitApply(s) => {
                if let Some(listing) = &mut self.listing {
                    listing.set(
                        &key(s),
                        model::slice_owner(&s.metadata),
                        &mut BTreeSet::new(),
                    );
                }
            }
            watcher::Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    self.slices = listing;
                }
                self.changes.all = true;
            }
        }
    }
}

/// Backoff between watch retries: quick at first so a short outage costs
/// little, capped so a long one is not hammered, reset once a watch works.
struct RetryBackoff {
    next: Duration,
}

impl RetryBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(now)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Starts watching Services and EndpointSlices in every namespace and the
/// Node called `node_name`. The receiver gets a wake-up after every change
/// (and after every completed list); read the state with [`Watch::objects`].
pub fn watch(client: &Client, node_name: &str) -> (Watch, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel(1);
    let synced = Arc::new(Synced::default());
    let index = Arc::new(std::sync::Mutex::new(Index::default()));
    let shared = Arc::clone(&index);
    let services = spawn_reflector(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        tx.clone(),
        Arc::clone(&synced),
        |s| &s.services,
        strip_service,
        move |event| lock(&shared).service(event),
    );
    let shared = Arc::clone(&index);
    let slices = spawn_reflector(
        Api::<SliceObject>::all(client.clone()),
        watcher::Config::default(),
        tx.clone(),
        Arc::clone(&synced),
        |s| &s.slices,
        strip_slice,
        move |event| lock(&shared).slice(event),
    );
    // A Node's change reaches the translation through the node's
    // addresses and zone, which every sync compares.
    let nodes = spawn_reflector(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        tx,
        Arc::clone(&synced),
        |s| &s.node,
        strip_node,
        |_| {},
    );
    (
        Watch {
            services,
            slices,
            nodes,
            node_name: node_name.to_owned(),
            synced,
            index,
        },
        rx,
    )
}

/// The index, also when a reflector task panicked holding it (what it
/// recorded is still true).
fn lock(index: &std::sync::Mutex<Index>) -> std::sync::MutexGuard<'_, Index> {
    index
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The Node label that names its zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Keeps of an object's metadata what the agent reads: name, namespace,
/// uid and version (Events name them), deletion time (a Node's), and the
/// labels in `labels`. The rest (managed fields above all, annotations,
/// owners) is often most of an object's size.
fn strip_meta(meta: &mut ObjectMeta, labels: &[&str]) {
    let kept = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        labels: meta.labels.take().and_then(|mut all| {
            all.retain(|k, _| labels.contains(&k.as_str()));
            (!all.is_empty()).then_some(all)
        }),
        ..ObjectMeta::default()
    };
    *meta = kept;
}

/// A Service as the stores keep it: the status only for its load
/// balancer ingress.
fn strip_service(svc: &mut Service) {
    strip_meta(&mut svc.metadata, &model::READ_LABELS);
    if let Some(status) = &mut svc.status {
        status.conditions = None;
    }
}

/// An EndpointSlice as the stores keep it: [`SliceObject`] holds only the
/// fields the translation reads; its metadata is cut here as the others'.
fn strip_slice(slice: &mut SliceObject) {
    strip_meta(&mut slice.metadata, &model::READ_LABELS);
}

/// A Node as the stores keep it: its addresses, taints, deletion time and
/// zone (not its images, conditions, capacity, …).
fn strip_node(node: &mut Node) {
    strip_meta(&mut node.metadata, &[ZONE_LABEL]);
    node.spec = node
        .spec
        .take()
        .map(|spec| k8s_openapi::api::core::v1::NodeSpec {
            taints: spec.taints,
            ..Default::default()
        });
    node.status = node
        .status
        .take()
        .map(|status| k8s_openapi::api::core::v1::NodeStatus {
            addresses: status.addresses,
            ..Default::default()
        });
}

/// Runs one reflector until the agent exits; returns its store, which
/// holds the objects as `strip` leaves them. `record` sees every event
/// once the store holds it.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    tx: mpsc::Sender<()>,
    synced: Arc<Synced>,
    flag: fn(&Synced) -> &AtomicBool,
    strip: fn(&mut K),
    mut record: impl FnMut(&watcher::Event<K>) + Send + 'static,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&());
    tokio::spawn(async move {
        let stream = reflector::reflector(
            writer,
            watcher(api, config)
                .backoff(RetryBackoff::new())
                .modify(strip),
        );
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        info!(%kind, "watch works again");
                        failing = false;
                    }
                    record(&event);
                    match event {
                        watcher::Event::Init => debug!(%kind, "listing"),
                        watcher::Event::InitDone => {
                            if !flag(&synced).swap(true, Ordering::SeqCst) {
                                debug!(%kind, "first full list done");
                            }
                        }
                        watcher::Event::InitApply(_) => continue,
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
                    }
                    // A full channel already holds a wake-up: the receiver
                    // reads every store anyway.
                    let _ = tx.try_send(());
                }
                Err(e) => {
                    // Logged once per outage at warn; the retries at debug.
                    if failing {
                        debug!(%kind, "watch still failing: {e}");
                    } else {
                        warn!(%kind, "watch failed, the datapath keeps its last state; retrying with backoff: {e}");
                        failing = true;
                    }
                }
            }
        }
    });
    store
}

impl Watch {
    /// True once Services, EndpointSlices and the Node have each been
    /// listed in full at least once: before that a sync would remove
    /// Services that are merely not listed yet.
    pub fn is_synced(&self) -> bool {
        self.synced.services.load(Ordering::SeqCst)
            && self.synced.slices.load(Ordering::SeqCst)
            && self.synced.node.load(Ordering::SeqCst)
    }

    /// The Service identities whose objects changed since the last call.
    /// Take them before reading the objects: a change that lands between
    /// the two is then read now and named again next time.
    pub fn take_changes(&self) -> Changes {
        std::mem::take(&mut lock(&self.index).changes)
    }

    /// Every Service identity the stores hold objects of.
    pub fn ids(&self) -> BTreeSet<Id> {
        let index = lock(&self.index);
        self.services
            .state()
            .iter()
            .map(|s| model::service_id(s))
            .chain(index.slices.all_ids().cloned())
            .collect()
    }

    /// The objects of each identity in `ids`, as the stores hold them now.
    pub fn inputs(&self, ids: &BTreeSet<Id>) -> HashMap<Id, Held> {
        let index = lock(&self.index);
        ids.iter()
            .map(|id| {
                let (namespace, name) = id;
                let services = self
                    .service(namespace, name)
                    .into_iter()
                    .collect::<Vec<_>>();
                let slices = index
                    .slices
                    .holders(id)
                    .iter()
                    .filter_map(|key| self.slices.get(key))
                    // The store may be a step ahead of the index: a slice
                    // moved to another Service is that one's input now.
                    .filter(|s| model::slice_owner(&s.metadata).as_ref() == Some(id))
                    .collect();
                (id.clone(), (services, slices))
            })
            .collect()
    }

    /// This agent's Node, once listed (`None` when it does not exist).
    pub fn node(&self) -> Option<Arc<Node>> {
        self.nodes.get(&reflector::ObjectRef::new(&self.node_name))
    }

    /// The addresses of every Node (InternalIP and ExternalIP): where
    /// DSR-wrapped packets may come from.
    pub fn node_peers(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .nodes
            .state()
            .iter()
            .flat_map(|n| node_addresses(n))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The Service `namespace/name`, if the store has it.
    fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }
}

/// One identity's objects as a store holds them.
pub type Held = (Vec<Arc<Service>>, Vec<Arc<SliceObject>>);

/// Every InternalIP and ExternalIP of a Node, unfiltered: where DSR-wrapped
/// packets may come from, and what `--nodeport-addresses` chooses among.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| a.address.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A Node's primary addresses, as kube-proxy finds them: its first
/// InternalIP of each family, or else its first ExternalIP of each family.
pub fn node_primary_addresses(node: &Node) -> Vec<IpAddr> {
    let of_type = |t: &str| -> Vec<IpAddr> {
        node.status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| a.type_ == t)
            .filter_map(|a| a.address.parse().ok())
            .collect()
    };
    let mut out = Vec::new();
    for v4 in [true, false] {
        let first = |t: &str| of_type(t).into_iter().find(|a: &IpAddr| a.is_ipv4() == v4);
        if let Some(a) = first("InternalIP").or_else(|| first("ExternalIP")) {
            out.push(a);
        }
    }
    out
}

/// The Node's `topology.kubernetes.io/zone` label, if set and not empty.
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

/// How long a problem already posted as an Event stays quiet: it is
/// posted again only after it went away and came back this much later.
const EVENT_QUIET: Duration = Duration::from_secs(600);
/// At most this many Events per sync; the rest are logged only, so that a
/// flood of bad objects does not turn into a flood of API calls.
const EVENTS_PER_SYNC: usize = 20;

/// Posts a Kubernetes Event for each Service that cannot be programmed.
///
/// The Events are `events.k8s.io/v1` (the current Events API; `kubectl
/// describe service` shows them, as it does core v1 ones), type Warning,
/// regarding the Service. Each distinct message is posted once while it
/// lasts, and again only if it returns after [`EVENT_QUIET`]; posting
/// runs in the background, so an unreachable API never delays a sync, and
/// an Event that could not be posted is tried again at the next sync.
pub struct EventPoster {
    client: Client,
    node: String,
    /// When each problem was last posted.
    posted: HashMap<ProblemKey, Instant>,
    /// Problems reported in the last sync.
    current: BTreeSet<ProblemKey>,
    /// Problems whose Event the API did not take.
    failed: Arc<std::sync::Mutex<Vec<ProblemKey>>>,
}

/// `(namespace, name, message)` of a Service's problem.
type ProblemKey = (String, String, String);

impl EventPoster {
    /// A poster reporting as `lb-agent` on `node`.
    pub fn new(client: Client, node: &str) -> Self {
        Self {
            client,
            node: node.to_owned(),
            posted: HashMap::new(),
            current: BTreeSet::new(),
            failed: Arc::default(),
        }
    }

    /// Posts Events for the problems that are new since the last call.
    /// `problems` are all the problems of this sync (reason
    /// `NotProgrammed`); those about objects other than Services are only
    /// logged by the caller. `findings` are why programmed Services do not
    /// answer as they could (no ready endpoint, …: reason `NotServing`).
    pub fn report(&mut self, watch: &Watch, problems: &[Problem], findings: &[Problem]) {
        let failed = std::mem::take(
            &mut *self
                .failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for key in failed {
            self.posted.remove(&key);
            self.current.remove(&key);
        }
        let mut now_current = BTreeSet::new();
        let mut budget = EVENTS_PER_SYNC;
        let tagged = problems
            .iter()
            .map(|p| (p, "NotProgrammed"))
            .chain(findings.iter().map(|p| (p, "NotServing")));
        for (p, reason) in tagged {
            let Some((namespace, name)) = p.service() else {
                continue;
            };
            let key = (namespace.to_owned(), name.to_owned(), p.message.clone());
            now_current.insert(key.clone());
            if self.current.contains(&key) {
                continue;
            }
            if self
                .posted
                .get(&key)
                .is_some_and(|t| t.elapsed() < EVENT_QUIET)
            {
                continue;
            }
            let Some(svc) = watch.service(namespace, name) else {
                continue;
            };
            if budget == 0 {
                debug!(service = %format!("{namespace}/{name}"), "event budget of this sync spent; not posted");
                continue;
            }
            budget -= 1;
            self.posted.insert(key.clone(), Instant::now());
            let event = self.event(&svc, reason, &p.message);
            let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
            let failed = Arc::clone(&self.failed);
            tokio::spawn(async move {
                let name = event.metadata.name.clone().unwrap_or_default();
                let error = match tokio::time::timeout(
                    Duration::from_secs(10),
                    api.create(&PostParams::default(), &event),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        debug!(event = %name, "event posted");
                        return;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_owned(),
                };
                warn!(event = %name, "posting event failed, retried at the next sync: {error}");
                failed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(key);
            });
        }
        self.current = now_current;
        self.posted.retain(|_, t| t.elapsed() < EVENT_QUIET);
    }

    /// The Event saying why `svc` cannot be (fully) programmed.
    fn event(&self, svc: &Service, reason: &str, message: &str) -> Event {
        let now = Timestamp::now();
        let meta = &svc.metadata;
        let name = meta.name.clone().unwrap_or_default();
        let mut note = format!("{}: {message}", self.node);
        // kube-proxy's reason for a check port it cannot open, which
        // alerting written for it may look for.
        let (action, reason) = if message.starts_with(crate::health::BIND_PROBLEM) {
            ("Listen", "FailedToStartServiceHealthcheck")
        } else {
            ("Program", reason)
        };
        // The API rejects notes over 1 kB.
        if note.len() > 1000 {
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: meta.namespace.clone(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(action.to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(note),
            type_: Some("Warning".to_owned()),
            reporting_controller: Some("lb-agent".to_owned()),
            reporting_instance: Some(format!("lb-agent-{}", self.node)),
            regarding: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Service".to_owned()),
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
                uid: meta.uid.clone(),
                resource_version: meta.resource_version.clone(),
                ..ObjectReference::default()
            }),
            ..Event::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addresses: &[(&str, &str)]) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": addresses
                .iter()
                .map(|(t, a)| serde_json::json!({"type": t, "address": a}))
                .collect::<Vec<_>>()},
        }))
        .expect("test Node")
    }

    #[test]
    fn primary_addresses_are_the_first_internal_ip_of_each_family_else_the_external_one() {
        let ips =
            |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|a| a.parse().expect("ip")).collect() };
        let n = node(&[
            ("Hostname", "node-a"),
            ("ExternalIP", "203.0.113.1"),
            ("InternalIP", "10.99.0.1"),
            ("InternalIP", "10.99.0.7"),
            ("InternalIP", "fd00::1"),
            ("InternalDNS", "node-a.example.org"),
        ]);
        assert_eq!(node_primary_addresses(&n), ips(&["10.99.0.1", "fd00::1"]));
        let external_only = node(&[("ExternalIP", "203.0.113.1"), ("Hostname", "node-a")]);
        assert_eq!(
            node_primary_addresses(&external_only),
            ips(&["203.0.113.1"])
        );
        assert!(node_primary_addresses(&node(&[])).is_empty());
    }

    #[test]
    fn retry_backoff_grows_to_its_cap_and_resets() {
        let mut b = RetryBackoff::new();
        let first: Vec<Duration> = b.by_ref().take(7).collect();
        assert_eq!(first[0], RetryBackoff::FIRST);
        assert!(first.windows(2).all(|w| w[0] <= w[1]), "{first:?}");
        assert_eq!(first[6], RetryBackoff::MAX);
        b.reset();
        assert_eq!(b.next(), Some(RetryBackoff::FIRST));
    }
}
