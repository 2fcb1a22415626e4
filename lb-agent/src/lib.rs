//! lb-agent: the node agent of the lb eBPF Service load balancer.
//!
//! One pipeline: `source` (manifests folder or the Kubernetes API) →
//! `model` (pure translation of Services and EndpointSlices) → `reconcile`
//! (diff against what the maps hold) → `datapath` (the only code that touches
//! BPF maps, programs and links).

pub mod datapath;
pub mod endpoints;
pub mod health;
pub mod inspect;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod packet;
pub mod parallel;
pub mod reconcile;
pub mod source;
pub mod trace;
