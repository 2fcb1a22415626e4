//! lb-agent: the node agent of the lb eBPF Service load balancer.
//!
//! One pipeline: `source` (manifests folder or the Kubernetes API) →
//! `model` (pure translation of Services and EndpointSlices) → `reconcile`
//! (diff against what the maps hold) → `datapath` (the only code that touches
//! BPF maps, programs and links). Around it: `node` (the node's interfaces
//! and their events), `health`, `metrics` and `endpoints` (what the agent
//! serves), `problem_log` (what it logs once per change), `inspect` and
//! `trace` (the read-only subcommands), `check` (preflight) and `explain`
//! (why a Service answers as it does). The binary (`main.rs`, `cli.rs`,
//! `agent.rs`) parses the command line and runs the loop.

pub mod check;
pub mod datapath;
pub mod endpoints;
pub mod explain;
pub mod health;
pub mod inspect;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod node;
pub mod packet;
pub mod parallel;
pub mod problem_log;
pub mod reconcile;
pub mod source;
pub mod trace;
