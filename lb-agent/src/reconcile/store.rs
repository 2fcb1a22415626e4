//! Where the reconciler writes: the pinned maps in production, memory in tests.

use std::collections::BTreeMap;

use lb_common::{Backend, BackendId, IpAddrBe, ServiceKey, ServiceValue};

/// One `loadBalancerSourceRanges` entry as the datapath keys it: address,
/// family, prefix length.
pub type Range = (IpAddrBe, u8, u8);

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} in {map} failed: {message}")]
pub struct StoreError {
    /// `insert`, `remove` or `create`.
    pub op: &'static str,
    /// The map's name.
    pub map: &'static str,
    /// The underlying error (for example "map full").
    pub message: String,
    /// The map had no room for a new entry.
    pub full: bool,
}

/// What the agent recorded about a Service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Info {
    /// `namespace/name:port/PROTO`.
    pub name: String,
    /// Fingerprint of the Maglev table in place (0: none).
    pub table_fingerprint: u64,
}

/// What the service maps hold, as read at start (tables are not read back:
/// their fingerprints in [`Info`] say what they hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Frontends.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Backends.
    pub backends: BTreeMap<BackendId, Backend>,
    /// Service port records by svc_id.
    pub infos: BTreeMap<u32, Info>,
    /// Maglev tables by svc_id (only [`MemStore`] fills this).
    pub tables: BTreeMap<u32, Vec<BackendId>>,
    /// Source ranges by svc_id.
    pub ranges: BTreeMap<u32, std::collections::BTreeSet<Range>>,
}

/// The writes the reconciler needs.
pub trait Store {
    /// Inserts or replaces a backend.
    fn put_backend(&mut self, id: BackendId, b: &Backend) -> Result<(), StoreError>;
    /// Deletes a backend.
    fn del_backend(&mut self, id: BackendId) -> Result<(), StoreError>;
    /// Installs a Service port's Maglev table, replacing any old one whole.
    fn put_table(&mut self, svc_id: u32, table: &[BackendId]) -> Result<(), StoreError>;
    /// Installs many Service ports' tables, each as [`Store::put_table`]
    /// would; one result per table, in order. Stores where each install
    /// has a fixed cost (the kernel's wait after a map-of-maps update)
    /// install them together.
    fn put_tables(&mut self, tables: &[(u32, Vec<BackendId>)]) -> Vec<Result<(), StoreError>> {
        tables
            .iter()
            .map(|(svc_id, table)| self.put_table(*svc_id, table))
            .collect()
    }
    /// Deletes a Service port's Maglev table.
    fn del_table(&mut self, svc_id: u32) -> Result<(), StoreError>;
    /// Inserts or replaces a frontend record.
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), StoreError>;
    /// Deletes a frontend record.
    fn del_service(&mut self, key: ServiceKey) -> Result<(), StoreError>;
    /// Records a Service port's name and table fingerprint.
    fn put_info(&mut self, svc_id: u32, info: &Info) -> Result<(), StoreError>;
    /// Forgets a Service port's record.
    fn del_info(&mut self, svc_id: u32) -> Result<(), StoreError>;
    /// Allows a source range for a Service port.
    fn put_range(&mut self, svc_id: u32, range: Range) -> Result<(), StoreError>;
    /// Removes a source range of a Service port.
    fn del_range(&mut self, svc_id: u32, range: Range) -> Result<(), StoreError>;
    /// Zeroes a Service port's counters (its id is new, or reused).
    fn reset_stats(&mut self, svc_id: u32) -> Result<(), StoreError>;
}

/// An in-memory store: the maps as plain collections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStore {
    /// The current contents.
    pub snap: Snapshot,
    /// Number of operations performed.
    pub ops: usize,
}

impl Store for MemStore {
    fn put_backend(&mut self, id: BackendId, b: &Backend) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.backends.insert(id, *b);
        Ok(())
    }

    fn del_backend(&mut self, id: BackendId) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.backends.remove(&id);
        Ok(())
    }

    fn put_table(&mut self, svc_id: u32, table: &[BackendId]) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.tables.insert(svc_id, table.to_vec());
        Ok(())
    }

    fn del_table(&mut self, svc_id: u32) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.tables.remove(&svc_id);
        Ok(())
    }

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.services.insert(key, value);
        Ok(())
    }

    fn del_service(&mut self, key: ServiceKey) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.services.remove(&key);
        Ok(())
    }

    fn put_info(&mut self, svc_id: u32, info: &Info) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.infos.insert(svc_id, info.clone());
        Ok(())
    }

    fn del_info(&mut self, svc_id: u32) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.infos.remove(&svc_id);
        Ok(())
    }

    fn put_range(&mut self, svc_id: u32, range: Range) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.ranges.entry(svc_id).or_default().insert(range);
        Ok(())
    }

    fn del_range(&mut self, svc_id: u32, range: Range) -> Result<(), StoreError> {
        self.ops += 1;
        if let Some(set) = self.snap.ranges.get_mut(&svc_id) {
            set.remove(&range);
            if set.is_empty() {
                self.snap.ranges.remove(&svc_id);
            }
        }
        Ok(())
    }

    fn reset_stats(&mut self, _svc_id: u32) -> Result<(), StoreError> {
        self.ops += 1;
        Ok(())
    }
}
