//! Where Services and EndpointSlices come from: a folder of manifests or
//! the Kubernetes API. Both hand the same objects to [`crate::model::build`]
//! (through a [`Translator`]), and [`Source`] reads either into it.

pub mod kube;
pub mod manifests;
mod owners;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::model::{AddressFilter, NodeInfo, Problem, ServicePortRef, Translator};

pub use manifests::Objects;

/// Where the Services and EndpointSlices come from, as the run loop reads them.
pub struct Source(Kind);

/// The two sources.
enum Kind {
    /// A folder of manifests, watched (the watcher lives as long as this).
    Manifests {
        dir: PathBuf,
        _watcher: notify::RecommendedWatcher,
        /// What changed since the last load.
        pending: manifests::Pending,
        /// The files as last read.
        folder: manifests::Folder,
    },
    /// The Kubernetes API.
    Kube {
        watch: kube::Watch,
        // Boxed: the largest variant by far, and there is one Source.
        events: Box<kube::EventPoster>,
        /// Whether the Node was missing at the last load (warned once).
        node_missing: std::cell::Cell<bool>,
        /// The Node's primary addresses and zone as last seen: kept while
        /// the Node is briefly gone (deleted and re-registered), so its
        /// NodePorts and zone go on.
        last_node: Option<(Vec<IpAddr>, Option<String>)>,
    },
}

impl Source {
    /// Starts watching the manifests folder `manifests`, or else the API
    /// (through `kubeconfig`, or in-cluster) for node `node_name`; the
    /// receiver wakes on changes.
    pub async fn start(
        manifests: Option<&Path>,
        kubeconfig: Option<&Path>,
        node_name: &str,
    ) -> Result<(Self, mpsc::Receiver<()>)> {
        if let Some(dir) = manifests {
            let (watcher, changes, pending) = manifests::watch(dir)?;
            return Ok((
                Self(Kind::Manifests {
                    dir: dir.to_path_buf(),
                    _watcher: watcher,
                    pending,
                    folder: manifests::Folder::default(),
                }),
                changes,
            ));
        }
        let client = kube::connect(kubeconfig).await?;
        let (watch, changes) = kube::watch(&client, node_name);
        let events = Box::new(kube::EventPoster::new(client, node_name));
        Ok((
            Self(Kind::Kube {
                watch,
                events,
                node_missing: std::cell::Cell::new(false),
                last_node: None,
            }),
            changes,
        ))
    }

    /// How a burst of changes is coalesced into one sync: the sync waits
    /// until no change came for the first duration (the events of one file
    /// write, or of one API update, come within it), but no longer than
    /// the second after the first change (a long burst, a rollout, still
    /// syncs as it goes). One change is then delayed by the first only,
    /// and a burst of a thousand becomes a few syncs. Both sources
    /// translate only what changed, so a short wait costs little.
    pub fn coalescing(&self) -> (Duration, Duration) {
        (Duration::from_millis(2), Duration::from_millis(100))
    }

    /// Whether the pending changes are whole, so a sync need not wait for
    /// more events of the same write: an API event always is, a file
    /// only once renamed into place or closed after writing.
    pub fn settled(&self) -> bool {
        match &self.0 {
            Kind::Manifests { pending, .. } => pending.settled(),
            Kind::Kube { .. } => true,
        }
    }

    /// Reads what changed into `translator` (and the NodePort addresses
    /// and zone into `node`); returns the problems of the source itself
    /// (files that cannot be read) and the Service ports whose translation
    /// may have changed, or `None` until the source has been read in full
    /// once. `iface_addrs` are the `--iface` addresses, `local` every
    /// address of the node, for `filter` to choose from.
    pub fn load(
        &mut self,
        iface_addrs: &[IpAddr],
        local: &[IpAddr],
        filter: &AddressFilter,
        node: &mut NodeInfo,
        translator: &mut Translator,
    ) -> Result<Option<(Vec<Problem>, BTreeSet<ServicePortRef>)>> {
        match &mut self.0 {
            Kind::Manifests {
                dir,
                pending,
                folder,
                ..
            } => {
                // Without a Node object, the first `--iface` address of
                // each family stands for the Node's primary ones (the SNAT
                // sources): the addresses the node is known by.
                let primary = crate::node::first_of_each_family(iface_addrs);
                set_addresses(node, filter.select(&primary, local));
                // New node addresses change every Service: all files are
                // read and parsed again (the folder keeps no objects).
                let mut scan = pending.take();
                if translator.node() != node {
                    scan = manifests::Scan::Reparse;
                }
                let mut changed = BTreeSet::new();
                folder
                    .refresh(dir, &scan, |folder, ids| {
                        changed.extend(translator.update(node, ids, |id| folder.inputs(id)));
                    })
                    .with_context(|| {
                        // Whatever the events named is read again next time.
                        pending.rescan();
                        format!("read manifests in {}", dir.display())
                    })?;
                Ok(Some((folder.problems(), changed)))
            }
            Kind::Kube {
                watch,
                node_missing,
                last_node,
                ..
            } => {
                if !watch.is_synced() {
                    return Ok(None);
                }
                let this = watch.node();
                if this.is_none() && !node_missing.get() {
                    if last_node.is_some() {
                        warn!("this agent's Node is gone from the API: NodePorts keep its last known addresses and zone until it is back");
                    } else {
                        warn!("this agent's Node is not in the API (is --node-name right?): no primary NodePort address and no zone until it is");
                    }
                }
                node_missing.set(this.is_none());
                if let Some(n) = &this {
                    *last_node = Some((kube::node_primary_addresses(n), kube::node_zone(n)));
                }
                let (primary, zone) = last_node.clone().unwrap_or_default();
                set_addresses(node, filter.select(&primary, local));
                if zone != node.zone {
                    info!(zone = ?zone, "node zone");
                    node.zone = zone;
                }
                // Only the Services whose objects a watch event touched
                // are translated again (a changed node changes them all,
                // which the translator sees itself).
                let changes = watch.take_changes();
                let mut ids = changes.ids;
                // A changed node re-translates every Service it translated
                // before, so each must find its objects among the inputs.
                if changes.all || translator.node() != node {
                    ids.extend(watch.ids());
                    ids.extend(translator.ids().cloned());
                }
                let held = watch.inputs(&ids);
                let changed = translator.update(node, ids, |id| {
                    held.get(id)
                        .map_or_else(Default::default, |(services, slices)| {
                            (
                                services.iter().map(AsRef::as_ref).collect(),
                                slices.iter().map(AsRef::as_ref).collect(),
                            )
                        })
                });
                Ok(Some((Vec::new(), changed)))
            }
        }
    }

    /// The addresses of the cluster's nodes as the source knows them (the
    /// Node objects of the API; none from a manifests folder, which holds
    /// no Nodes): the DSR peers besides `--dsr-peers`.
    pub fn node_peers(&self) -> Vec<IpAddr> {
        match &self.0 {
            Kind::Manifests { .. } => Vec::new(),
            Kind::Kube { watch, .. } => watch.node_peers(),
        }
    }

    /// Whether this node should get traffic, as `/healthz` reports it: in
    /// the API, not while its Node is being deleted, tainted for deletion
    /// or missing; a manifests folder has no Node, so always.
    pub fn node_eligibility(&self) -> Result<(), String> {
        match &self.0 {
            Kind::Manifests { .. } => Ok(()),
            Kind::Kube { watch, .. } => crate::health::node_eligibility(watch.node().as_deref()),
        }
    }

    /// Tells the cluster about Services that cannot be programmed
    /// (`problems`) and about those that do not answer as they could
    /// (`findings`, from [`crate::explain::Diagnosis::problems`]).
    pub fn report(&mut self, problems: &[Problem], findings: &[Problem]) {
        if let Kind::Kube { watch, events, .. } = &mut self.0 {
            events.report(watch, problems, findings);
        }
    }

    /// Every address of this node before `--nodeport-addresses` filters
    /// them: the interfaces' with manifests, the Node's with the API.
    pub fn node_addresses_unfiltered(&self, iface_addrs: &[IpAddr]) -> Vec<IpAddr> {
        match &self.0 {
            Kind::Manifests { .. } => iface_addrs.to_vec(),
            Kind::Kube { watch, .. } => watch
                .node()
                .map(|n| kube::node_addresses(&n))
                .unwrap_or_default(),
        }
    }
}

/// Sets the NodePort addresses of `node`, saying when they change.
fn set_addresses(node: &mut NodeInfo, addresses: Vec<IpAddr>) {
    if addresses != node.addresses {
        info!(addresses = ?addresses, "NodePort addresses");
        node.addresses = addresses;
    }
}
