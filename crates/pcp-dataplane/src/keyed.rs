//! A hash table of values found by the key each one implies
//! ([`Keyed::key`]), which is not stored beside it: what a dataplane keeps
//! per installed mapping is its largest memory cost, and an entry already
//! holds every field of its key (40 bytes of a ~110-byte record).

use std::hash::BuildHasher as _;

use crate::Key;

/// A value that knows its own key.
pub(crate) trait Keyed {
    fn key(&self) -> Key;
}

/// Values by key, at most one per key. A value's key must not change
/// while it is in the table (`get_mut` is for the rest of it).
pub(crate) struct KeyedTable<T> {
    table: hashbrown::HashTable<T>,
    // Keys are pcpd's own mappings: foldhash, randomly seeded.
    hasher: foldhash::fast::RandomState,
}

impl<T> Default for KeyedTable<T> {
    fn default() -> Self {
        KeyedTable {
            table: hashbrown::HashTable::new(),
            hasher: Default::default(),
        }
    }
}

impl<T: Keyed> KeyedTable<T> {
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub(crate) fn get(&self, key: &Key) -> Option<&T> {
        self.table
            .find(self.hasher.hash_one(key), |v| v.key() == *key)
    }

    /// The value under `key`, to change anything but its key.
    pub(crate) fn get_mut(&mut self, key: &Key) -> Option<&mut T> {
        self.table
            .find_mut(self.hasher.hash_one(key), |v| v.key() == *key)
    }

    /// Puts `value` under its key; returns the value it replaced.
    pub(crate) fn insert(&mut self, value: T) -> Option<T> {
        match self.get_mut(&value.key()) {
            Some(have) => Some(std::mem::replace(have, value)),
            None => {
                self.insert_new(value);
                None
            }
        }
    }

    /// Puts `value` in, its key known to be absent (no search).
    pub(crate) fn insert_new(&mut self, value: T) {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(value.key());
        self.table
            .insert_unique(hash, value, |v| hasher.hash_one(v.key()));
    }

    pub(crate) fn remove(&mut self, key: &Key) -> Option<T> {
        let found = self
            .table
            .find_entry(self.hasher.hash_one(key), |v| v.key() == *key);
        found.ok().map(|e| e.remove().0)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.table.iter()
    }
}

impl<T> IntoIterator for KeyedTable<T> {
    type Item = T;
    type IntoIter = hashbrown::hash_table::IntoIter<T>;

    fn into_iter(self) -> Self::IntoIter {
        self.table.into_iter()
    }
}

impl<T: Keyed> FromIterator<T> for KeyedTable<T> {
    fn from_iter<I: IntoIterator<Item = T>>(values: I) -> Self {
        let mut t = KeyedTable::default();
        for v in values {
            t.insert(v);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcp_engine::ExternalEndpoint;
    use std::net::Ipv4Addr;

    #[derive(Debug, PartialEq)]
    struct V(u16, &'static str);

    impl Keyed for V {
        fn key(&self) -> Key {
            Key::Inbound(ExternalEndpoint {
                addr: Ipv4Addr::new(192, 0, 2, 1),
                protocol: 6,
                port: self.0,
            })
        }
    }

    #[test]
    fn values_are_found_replaced_and_removed_by_the_key_they_imply() {
        let mut t: KeyedTable<V> = (0..1000).map(|p| V(p, "a")).collect();
        assert_eq!(t.len(), 1000);
        assert_eq!(t.insert(V(7, "b")), Some(V(7, "a")));
        assert_eq!(t.len(), 1000);
        assert_eq!(t.get(&V(7, "").key()), Some(&V(7, "b")));
        if let Some(v) = t.get_mut(&V(8, "").key()) {
            v.1 = "c";
        }
        assert_eq!(t.get(&V(8, "").key()), Some(&V(8, "c")));
        assert_eq!(t.remove(&V(9, "").key()), Some(V(9, "a")));
        assert_eq!(t.remove(&V(9, "").key()), None);
        assert!(t.get(&V(9, "").key()).is_none());
        assert_eq!(t.len(), 999);
        assert_eq!(t.iter().count(), 999);
        assert_eq!(t.into_iter().count(), 999);
    }
}
