//! Where the reconciler writes: the pinned maps in production, memory in tests.
//!
//! The reconciler speaks in its own terms and the store lays them out in
//! the datapath's maps. In particular, where a Maglev table lives is the
//! store's business: writing a table hands back a [`TableHandle`], and a
//! frontend's [`Record`] names its table by that handle. The datapath's
//! store puts every new table in a new place (a region of one flat slot
//! array) and hands back a new handle; the reconciler deletes the old
//! table once no frontend points at it. A store may also replace a table
//! in place and hand back the same handle ([`Placement::ById`], kept for
//! the checked store's tests). Either way no frontend ever points at a
//! partial or missing table.

use std::collections::BTreeMap;

use lb_common::{Backend, BackendId, IpAddrBe, ServiceKey};

/// One `loadBalancerSourceRanges` entry as the datapath keys it: address,
/// family, prefix length.
pub type Range = (IpAddrBe, u8, u8);

/// Where a store put a Maglev table. Opaque to the reconciler, which only
/// hands it back to the store that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableHandle(u32);

impl TableHandle {
    /// The handle of a table a store placed at `raw` (stores only).
    pub const fn from_raw(raw: u32) -> Self {
        Self(raw)
    }

    /// Where the store placed the table (stores only).
    pub const fn raw(self) -> u32 {
        self.0
    }
}

/// The part of a table a frontend spreads new flows over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    /// The table.
    pub table: TableHandle,
    /// How many of its first slots: all of them, or fewer while a table in
    /// place is replaced by a smaller one.
    pub count: u32,
}

/// What a frontend leads to, as the reconciler writes it; the store lays
/// it out as the datapath's frontend record (`ServiceValue`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The Service port's id: its counters, affinity entries and source
    /// ranges are keyed by it.
    pub svc_id: u32,
    /// The table new flows are spread over; `None`: no endpoint, new flows
    /// are refused.
    pub slots: Option<Slots>,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// ClientIP affinity timeout in seconds (0: none).
    pub affinity_timeout_s: u32,
}

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
    /// The text of its [`super::TableId`]; as read back, possibly cut short
    /// or empty (a record the reconciler then treats as gone).
    pub name: String,
    /// Fingerprint of the Maglev table in place (0: none).
    pub table_fingerprint: u64,
    /// Where that table is: `Some` exactly when the fingerprint is not 0.
    pub table: Option<TableHandle>,
    /// How many slots the store set aside for that table, as it recorded
    /// them (the store fills this in; the reconciler leaves it 0).
    pub table_slots: u32,
}

/// What the service maps hold, as read at start (tables are not read back:
/// their fingerprints in [`Info`] say what they hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Frontends.
    pub services: BTreeMap<ServiceKey, Record>,
    /// Backends.
    pub backends: BTreeMap<BackendId, Backend>,
    /// Service port records by svc_id.
    pub infos: BTreeMap<u32, Info>,
    /// Maglev tables by handle (only [`MemStore`] fills this).
    pub tables: BTreeMap<TableHandle, Vec<BackendId>>,
    /// Source ranges by svc_id.
    pub ranges: BTreeMap<u32, std::collections::BTreeSet<Range>>,
}

/// The writes the reconciler needs.
pub trait Store {
    /// Inserts or replaces a backend.
    fn put_backend(&mut self, id: BackendId, b: &Backend) -> Result<(), StoreError>;
    /// Writes many backends, each as [`Store::put_backend`] would. On an
    /// error some may be written and others not: the caller writes them
    /// one by one to learn which. Stores where each write has a fixed
    /// cost may write them together.
    fn put_backends(&mut self, backends: &[(BackendId, Backend)]) -> Result<(), StoreError> {
        backends
            .iter()
            .try_for_each(|(id, b)| self.put_backend(*id, b))
    }
    /// Deletes a backend.
    fn del_backend(&mut self, id: BackendId) -> Result<(), StoreError>;
    /// Writes a Maglev table of Service port `svc_id`, whole, and says
    /// where it is. A store may replace the Service port's table in place,
    /// with one atomic swap (a packet sees the old table or the new one,
    /// never a mix), and hand back the handle it had; or put the table in
    /// a new place and hand back a new handle, the old table staying until
    /// [`Store::del_table`].
    fn put_table(&mut self, svc_id: u32, table: &[BackendId]) -> Result<TableHandle, StoreError>;
    /// Writes many Service ports' tables, each as [`Store::put_table`]
    /// would; one result per table, in order. Stores where each write
    /// has a fixed cost may write them together.
    fn put_tables(
        &mut self,
        tables: &[(u32, Vec<BackendId>)],
    ) -> Vec<Result<TableHandle, StoreError>> {
        tables
            .iter()
            .map(|(svc_id, table)| self.put_table(*svc_id, table))
            .collect()
    }
    /// Deletes a Maglev table that no frontend points at any more.
    fn del_table(&mut self, table: TableHandle) -> Result<(), StoreError>;
    /// Whether [`Store::put_table`] replaces a Service port's table in
    /// place (the same handle back): then a smaller table must first be
    /// announced to the frontends, so none indexes past its end. A store
    /// that puts every table in a new place flips the frontends' table
    /// and slot count together.
    fn tables_in_place(&self) -> bool {
        true
    }
    /// Inserts or replaces a frontend record.
    fn put_service(&mut self, key: ServiceKey, record: Record) -> Result<(), StoreError>;
    /// Deletes a frontend record.
    fn del_service(&mut self, key: ServiceKey) -> Result<(), StoreError>;
    /// Records a Service port's name and table.
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

/// Where a [`MemStore`] puts tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// At the Service port's id, replaced in place (the map of maps that
    /// held the tables before the flat slot array).
    #[default]
    ById,
    /// Every table in a new place: regions of one flat array, as the
    /// datapath's store puts them.
    Fresh,
}

/// An in-memory store: the maps as plain collections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStore {
    /// The current contents.
    pub snap: Snapshot,
    /// Number of operations performed.
    pub ops: usize,
    /// Where tables go.
    pub placement: Placement,
    /// The last place [`Placement::Fresh`] gave out.
    last_place: u32,
    /// Places of deleted tables, which [`Placement::Fresh`] gives out
    /// again first, as a free list would: so a test sees a reused place.
    freed: std::collections::BTreeSet<u32>,
}

impl MemStore {
    /// An empty store that puts tables where `placement` says.
    pub fn with_placement(placement: Placement) -> Self {
        Self {
            placement,
            ..Self::default()
        }
    }
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

    fn put_table(&mut self, svc_id: u32, table: &[BackendId]) -> Result<TableHandle, StoreError> {
        self.ops += 1;
        let handle = match self.placement {
            Placement::ById => TableHandle(svc_id),
            Placement::Fresh => match self.freed.pop_first() {
                Some(place) => TableHandle(place),
                None => {
                    self.last_place += 1;
                    TableHandle(self.last_place)
                }
            },
        };
        self.snap.tables.insert(handle, table.to_vec());
        Ok(handle)
    }

    fn del_table(&mut self, table: TableHandle) -> Result<(), StoreError> {
        self.ops += 1;
        if self.snap.tables.remove(&table).is_some() && self.placement == Placement::Fresh {
            self.freed.insert(table.0);
        }
        Ok(())
    }

    fn tables_in_place(&self) -> bool {
        self.placement == Placement::ById
    }

    fn put_service(&mut self, key: ServiceKey, record: Record) -> Result<(), StoreError> {
        self.ops += 1;
        self.snap.services.insert(key, record);
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
