//! Which stored objects hold the inputs of each Service identity: what lets
//! a source translate again only the Services a change touched. Both
//! sources keep one, keyed by what they store (the manifests folder by file
//! name, the API by EndpointSlice), and both report a change as the
//! identities an object held before it and holds after it.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

use crate::model::Id;

/// For each stored object `K`, the Service identities its objects belong
/// to, and the way back.
#[derive(Debug)]
pub struct Owners<K> {
    /// The objects that hold inputs of each identity.
    holders: HashMap<Id, Vec<K>>,
    /// The identities each object holds inputs of, sorted.
    ids: HashMap<K, Vec<Id>>,
}

impl<K> Default for Owners<K> {
    fn default() -> Self {
        Self {
            holders: HashMap::new(),
            ids: HashMap::new(),
        }
    }
}

impl<K: Clone + Eq + Hash> Owners<K> {
    /// Records that `key` now holds inputs of `ids` (none: it is gone);
    /// adds to `changed` every identity it held before or holds now,
    /// since each may translate differently.
    pub fn set(&mut self, key: &K, ids: impl IntoIterator<Item = Id>, changed: &mut BTreeSet<Id>) {
        let now: BTreeSet<Id> = ids.into_iter().collect();
        if let Some(before) = self.ids.remove(key) {
            for id in before {
                if !now.contains(&id) {
                    self.unhold(&id, key);
                }
                changed.insert(id);
            }
        }
        for id in &now {
            let holders = self.holders.entry(id.clone()).or_default();
            if !holders.contains(key) {
                holders.push(key.clone());
            }
        }
        changed.extend(now.iter().cloned());
        if !now.is_empty() {
            self.ids.insert(key.clone(), now.into_iter().collect());
        }
    }

    /// Forgets `key`; adds the identities it held to `changed`.
    pub fn remove(&mut self, key: &K, changed: &mut BTreeSet<Id>) {
        self.set(key, [], changed);
    }

    /// The objects that hold inputs of `id`.
    pub fn holders(&self, id: &Id) -> &[K] {
        self.holders.get(id).map_or(&[], Vec::as_slice)
    }

    /// Every identity some object holds inputs of.
    pub fn all_ids(&self) -> impl Iterator<Item = &Id> {
        self.holders.keys()
    }

    fn unhold(&mut self, id: &Id, key: &K) {
        if let Some(holders) = self.holders.get_mut(id) {
            holders.retain(|k| k != key);
            if holders.is_empty() {
                self.holders.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> Id {
        ("default".to_owned(), name.to_owned())
    }

    #[test]
    fn a_moved_object_changes_the_identities_it_left_and_joined() {
        let mut o = Owners::<&str>::default();
        let mut changed = BTreeSet::new();
        o.set(&"f", [id("a"), id("b")], &mut changed);
        o.set(&"g", [id("b")], &mut changed);
        assert_eq!(changed, BTreeSet::from([id("a"), id("b")]));
        assert_eq!(o.holders(&id("b")), ["f", "g"]);

        changed.clear();
        o.set(&"f", [id("b"), id("c")], &mut changed);
        assert_eq!(changed, BTreeSet::from([id("a"), id("b"), id("c")]));
        assert!(o.holders(&id("a")).is_empty());
        assert_eq!(o.holders(&id("b")), ["f", "g"]);

        changed.clear();
        o.remove(&"f", &mut changed);
        assert_eq!(changed, BTreeSet::from([id("b"), id("c")]));
        assert_eq!(o.holders(&id("b")), ["g"]);
        assert!(o.holders(&id("c")).is_empty() && !o.ids.contains_key(&"f"));
    }
}
