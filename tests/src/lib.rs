//! Privileged tests of the lb datapath: BPF_PROG_TEST_RUN fixtures
//! ([`fixture`], [`packet`]) and a network-namespace cluster ([`rig`]) for
//! end-to-end scenarios and the demo, a test Kubernetes API server
//! ([`apiserver`]) for the agent's API source, and traffic generators
//! ([`xdp`]) and a SYN flood scenario ([`flood`]) shared by the tests and
//! the benchmark; [`sctp`] speaks SCTP over raw sockets for the rig.

pub mod apiserver;
pub mod fixture;
pub mod flood;
pub mod manifests;
pub mod packet;
pub mod rig;
pub mod sctp;
pub mod xdp;
