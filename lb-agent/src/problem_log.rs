//! Logging what is wrong when it starts and when it ends, not again at
//! every sync while it lasts: skipped input ([`ProblemLog`]) and refused
//! Service ports ([`RefusalLog`]). A full map stays full across many
//! syncs, and the log must show the moment it filled and the moment it had
//! room again.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use crate::{
    model::Problem,
    reconcile::{Report, TableId},
};

/// Logs each problem when it appears, not again at every sync while it lasts.
#[derive(Debug, Default)]
pub struct ProblemLog {
    last: BTreeSet<(String, String)>,
}

impl ProblemLog {
    /// Logs the problems that are new since the last call, and those that
    /// went away.
    pub fn log(&mut self, problems: &[Problem]) {
        let now: BTreeSet<(String, String)> = problems
            .iter()
            .map(|p| (p.object.clone(), p.message.clone()))
            .collect();
        for (object, message) in now.difference(&self.last) {
            warn!(%object, "skipped: {message}");
        }
        for (object, message) in self.last.difference(&now) {
            info!(%object, "resolved: {message}");
        }
        self.last = now;
    }
}

/// What the previous sync refused.
#[derive(Debug, Default)]
pub struct RefusalLog {
    refused: BTreeMap<TableId, String>,
    full: BTreeSet<&'static str>,
}

impl RefusalLog {
    /// Logs the differences between this sync's refusals and the last one's.
    pub fn update(&mut self, report: &Report) {
        let refused: BTreeMap<TableId, String> = report
            .failures
            .iter()
            .map(|f| (f.service.clone(), f.message.clone()))
            .collect();
        let full: BTreeSet<&'static str> =
            report.failures.iter().filter_map(|f| f.full_map).collect();
        for map in full.difference(&self.full) {
            let n = report
                .failures
                .iter()
                .filter(|f| f.full_map == Some(*map))
                .count();
            warn!(
                map = *map,
                refused = n,
                "map is full: Service ports that do not fit are refused, the others keep working; \
                 raise the map's size flag"
            );
        }
        for map in self.full.difference(&full) {
            info!(map = *map, "map has room again");
        }
        for (service, message) in &refused {
            if self.refused.get(service) != Some(message) {
                warn!(%service, "Service port refused: {message}");
            }
        }
        for service in self.refused.keys() {
            if !refused.contains_key(service) {
                info!(%service, "Service port programmed after earlier refusal");
            }
        }
        self.refused = refused;
        self.full = full;
    }
}
