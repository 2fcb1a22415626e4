//! Building Maglev tables and recognising them again.
//!
//! A table is fully determined by its size and its backends (their Maglev
//! names, sorted, with their ids), so its fingerprint, recorded beside it,
//! tells a restarted agent whether the table in place is the one it would
//! build, without reading the table back.

use std::collections::HashMap;

use lb_common::{addr::socket_from_be, Backend, BackendId};

use crate::maglev;

/// The name a backend has in Maglev: `address:port`, as every node spells it.
pub(super) fn maglev_name(b: &Backend) -> String {
    socket_from_be(b.addr_be, b.family, b.port_be).to_string()
}

/// Identifies a table: its size and its backends with their ids. Never 0.
pub(super) fn fingerprint(table_size: u32, backends: &[(String, BackendId)]) -> u64 {
    let mut text = table_size.to_string();
    for (name, id) in backends {
        text.push_str(&format!(" {name}={id}"));
    }
    maglev::hash(maglev::OFFSET_SEED, text.as_bytes()).max(1)
}

/// A table to build: its Service port and its backends, sorted by name.
pub(super) struct TableJob {
    /// The Service port.
    pub svc_id: u32,
    /// Slots.
    pub size: u32,
    /// [`fingerprint`] of size and backends.
    pub fingerprint: u64,
    /// Backends by Maglev name, sorted.
    pub active: Vec<(String, BackendId)>,
}

/// Builds the tables of `jobs`, on every core when there are many; jobs
/// with the same fingerprint (the same size and backends) share one build.
pub(super) fn build_tables(jobs: &[TableJob]) -> Vec<Vec<BackendId>> {
    let build = |job: &TableJob| -> Vec<BackendId> {
        let names: Vec<&str> = job.active.iter().map(|(n, _)| n.as_str()).collect();
        maglev::table(&names, job.size)
            .iter()
            .map(|i| job.active[*i as usize].1)
            .collect()
    };
    let mut first: HashMap<u64, usize> = HashMap::new();
    let unique: Vec<usize> = (0..jobs.len())
        .filter(|i| first.insert(jobs[*i].fingerprint, *i).is_none())
        .collect();
    let built = crate::parallel::map(unique.clone(), 64, |i| build(&jobs[i]));
    let by_fp: HashMap<u64, &Vec<BackendId>> = unique
        .iter()
        .zip(&built)
        .map(|(i, t)| (jobs[*i].fingerprint, t))
        .collect();
    jobs.iter()
        .map(|j| {
            by_fp
                .get(&j.fingerprint)
                .map_or_else(Vec::new, |t| (*t).clone())
        })
        .collect()
}
