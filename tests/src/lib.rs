//! Privileged tests of the lb datapath: BPF_PROG_TEST_RUN fixtures
//! ([`fixture`], [`packet`]) and a network-namespace cluster ([`rig`]) for
//! end-to-end scenarios and the demo, and a test Kubernetes API server
//! ([`apiserver`]) for the agent's API source.

pub mod apiserver;
pub mod fixture;
pub mod manifests;
pub mod packet;
pub mod rig;
