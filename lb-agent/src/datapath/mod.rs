//! The only code that touches BPF maps, programs, links and bpffs.

pub mod bpffs;
pub mod cgroup;
pub mod config;
pub mod maps;
pub mod programs;
pub mod regions;
pub mod stale;
pub mod sys;
pub mod upgrade;
pub mod xdp_mode;
