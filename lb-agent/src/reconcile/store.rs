//! Where the reconciler writes: the pinned maps in production, memory in tests.

use std::collections::BTreeMap;

use lb_common::{Backend, BackendId, ServiceKey, ServiceValue, SlotKey};

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} in {map} failed: {message}")]
pub struct StoreError {
    /// `insert` or `remove`.
    pub op: &'static str,
    /// The map's name.
    pub map: &'static str,
    /// The underlying error (for example "map full").
    pub message: String,
}

/// Everything the service maps hold, as read at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Frontends.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Slots of every generation.
    pub slots: BTreeMap<(u32, u32, u32), BackendId>,
    /// Backends.
    pub backends: BTreeMap<BackendId, Backend>,
    /// Service port names by svc_id.
    pub names: BTreeMap<u32, String>,
}

impl Snapshot {
    /// Looks up a slot.
    pub fn slot(&self, key: &SlotKey) -> Option<BackendId> {
        self.slots
            .get(&(key.svc_id, key.generation, key.index))
            .copied()
    }
}

/// The writes the reconciler needs.
pub trait Store {
    /// Inserts or replaces a backend.
    fn put_backend(&mut self, id: BackendId, b: &Backend) -> Result<(), StoreError>;
    /// Deletes a backend.
    fn del_backend(&mut self, id: BackendId) -> Result<(), StoreError>;
    /// Inserts or replaces a slot.
    fn put_slot(&mut self, key: SlotKey, id: BackendId) -> Result<(), StoreError>;
    /// Deletes a slot.
    fn del_slot(&mut self, key: SlotKey) -> Result<(), StoreError>;
    /// Inserts or replaces a frontend record.
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), StoreError>;
    /// Deletes a frontend record.
    fn del_service(&mut self, key: ServiceKey) -> Result<(), StoreError>;
    /// Records a Service port's name.
    fn put_name(&mut self, svc_id: u32, name: &str) -> Result<(), StoreError>;
    /// Forgets a Service port's name.
    fn del_name(&mut self, svc_id: u32) -> Result<(), StoreError>;
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

    fn put_slot(&mut self, key: SlotKey, id: BackendId) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap
            .slots
            .insert((key.svc_id, key.generation, key.index), id);
        Ok(())
    }

    fn del_slot(&mut self, key: SlotKey) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap
            .slots
            .remove(&(key.svc_id, key.generation, key.index));
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

    fn put_name(&mut self, svc_id: u32, name: &str) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.names.insert(svc_id, name.to_string());
        Ok(())
    }

    fn del_name(&mut self, svc_id: u32) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.names.remove(&svc_id);
        Ok(())
    }
}
