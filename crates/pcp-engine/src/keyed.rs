//! A table of records found by the key each one implies ([`Keyed::key`]),
//! which is not stored beside it, and kept dense.
//!
//! Records sit side by side in a vector; a hash index holds each one's
//! position and 32 bits of its key's hash. At a million records this costs
//! the record plus ~10 bytes, where a hash table holding the records
//! themselves, at the load factor it has right after growing (under one
//! half), costs twice the record. Removal moves the last record into the
//! hole, so a record's position is not stable: hold its key, not where it
//! sits.

use std::hash::{BuildHasher, Hash};

/// A record that knows its own key.
pub trait Keyed {
    /// The key the record is found by; it must not change while the record
    /// is in a table.
    type Key: Hash + Eq;
    /// The record's key.
    fn key(&self) -> Self::Key;
}

/// Records by key, at most one per key.
pub struct KeyedTable<T, S = std::collections::hash_map::RandomState> {
    values: Vec<T>,
    index: PositionIndex,
    hasher: S,
}

impl<T, S: Default> Default for KeyedTable<T, S> {
    fn default() -> Self {
        KeyedTable {
            values: Vec::new(),
            index: PositionIndex::default(),
            hasher: S::default(),
        }
    }
}

/// Positions of records, found by 32 bits of their key's hash: the index
/// of a [`KeyedTable`], and of the engine's mapping slots. A position is
/// 4 bytes where a copy of the key would be tens. The stored hash spares a
/// visit to a record on a probe that does not match, and growing the index
/// rehashes from what it holds, never from the records (at a million
/// records a visit to each would stall the owner for tens of ms).
#[derive(Default)]
pub(crate) struct PositionIndex {
    table: hashbrown::HashTable<(u32, u32)>,
}

/// The index's hash from the 32 bits it keeps: the table places entries by
/// the low bits and tags them with the top seven, so both halves carry it.
fn widen(h: u32) -> u64 {
    u64::from(h) << 32 | u64::from(h)
}

fn rehash(&(_, h): &(u32, u32)) -> u64 {
    widen(h)
}

impl PositionIndex {
    /// The position with short hash `h` whose record `is` accepts.
    pub(crate) fn find(&self, h: u32, mut is: impl FnMut(u32) -> bool) -> Option<u32> {
        self.table
            .find(widen(h), |&(at, hs)| hs == h && is(at))
            .map(|&(at, _)| at)
    }

    /// Adds position `at` under short hash `h`.
    pub(crate) fn insert(&mut self, h: u32, at: u32) {
        self.table.insert_unique(widen(h), (at, h), rehash);
    }

    /// Takes position `at` (short hash `h`) out.
    pub(crate) fn remove(&mut self, h: u32, at: u32) {
        if let Ok(e) = self.table.find_entry(widen(h), |&(p, _)| p == at) {
            e.remove();
        }
    }

    /// The record with short hash `h` moved from position `from` to `to`.
    pub(crate) fn moved(&mut self, h: u32, from: u32, to: u32) {
        if let Some(e) = self.table.find_mut(widen(h), |&(p, _)| p == from) {
            e.0 = to;
        }
    }

    /// Doubles now if the next insert would fill it past `num / den` of
    /// its capacity: tables that each take an entry per mapping then
    /// double at different inserts, not all on the same one.
    pub(crate) fn grow_at(&mut self, num: usize, den: usize) {
        let cap = self.table.capacity();
        if self.table.len() >= cap / den * num {
            self.table.reserve(cap - cap / den * num + 1, rehash);
        }
    }
}

impl<T: Keyed, S: BuildHasher> KeyedTable<T, S> {
    /// Records held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn short_hash(&self, key: &T::Key) -> u32 {
        self.hasher.hash_one(key) as u32
    }

    /// The position of the record under `key`, with the key's short hash.
    fn position(&self, key: &T::Key) -> (Option<u32>, u32) {
        let h = self.short_hash(key);
        let values = &self.values;
        let found = self.index.find(h, |at| {
            values.get(at as usize).is_some_and(|v| v.key() == *key)
        });
        (found, h)
    }

    /// The record under `key`.
    pub fn get(&self, key: &T::Key) -> Option<&T> {
        let (at, _) = self.position(key);
        self.values.get(at? as usize)
    }

    /// The record under `key`, to change anything but its key.
    pub fn get_mut(&mut self, key: &T::Key) -> Option<&mut T> {
        let (at, _) = self.position(key);
        self.values.get_mut(at? as usize)
    }

    /// The record under `key`, made by `make` if there is none (and
    /// `None` if `make` makes none): one search either way.
    pub fn get_or_make(
        &mut self,
        key: &T::Key,
        make: impl FnOnce() -> Option<T>,
    ) -> Option<&mut T> {
        let (found, h) = self.position(key);
        let at = match found {
            Some(at) => at as usize,
            None => {
                self.push(h, make()?);
                self.values.len() - 1
            }
        };
        self.values.get_mut(at)
    }

    /// Puts `value` under its key; returns the record it replaced.
    pub fn insert(&mut self, value: T) -> Option<T> {
        match self.get_mut(&value.key()) {
            Some(have) => Some(std::mem::replace(have, value)),
            None => {
                self.insert_new(value);
                None
            }
        }
    }

    /// Puts `value` in, its key known to be absent (no search).
    pub fn insert_new(&mut self, value: T) {
        let h = self.short_hash(&value.key());
        self.push(h, value);
    }

    fn push(&mut self, h: u32, value: T) {
        // Positions are 32 bits: four billion records is far past what a
        // shard's memory holds.
        let at = self.values.len() as u32;
        self.values.push(value);
        self.index.insert(h, at);
    }

    /// Takes out the record under `key`.
    pub fn remove(&mut self, key: &T::Key) -> Option<T> {
        let (at, h) = self.position(key);
        let at = at?;
        self.index.remove(h, at);
        let last = (self.values.len() - 1) as u32;
        let value = self.values.swap_remove(at as usize);
        if at != last {
            // The last record moved into the hole: point its entry there.
            let moved = self.short_hash(&self.values[at as usize].key());
            self.index.moved(moved, last, at);
        }
        Some(value)
    }

    /// The record at position `at` (0 to `len() - 1`). Positions change
    /// only by removal, which moves the last record into the hole.
    pub fn at(&self, at: usize) -> Option<&T> {
        self.values.get(at)
    }

    /// Every record, in no particular order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.values.iter()
    }
}

impl<T, S> IntoIterator for KeyedTable<T, S> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;

    fn into_iter(self) -> Self::IntoIter {
        self.values.into_iter()
    }
}

impl<T: Keyed, S: BuildHasher + Default> FromIterator<T> for KeyedTable<T, S> {
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
    use std::collections::hash_map::RandomState;

    #[derive(Debug, PartialEq)]
    struct V(u16, &'static str);

    impl Keyed for V {
        type Key = u16;
        fn key(&self) -> u16 {
            self.0
        }
    }

    #[test]
    fn records_are_found_replaced_and_removed_by_the_key_they_imply() {
        let mut t: KeyedTable<V, RandomState> = (0..1000).map(|p| V(p, "a")).collect();
        assert_eq!(t.len(), 1000);
        assert_eq!(t.insert(V(7, "b")), Some(V(7, "a")));
        assert_eq!(t.len(), 1000);
        assert_eq!(t.get(&7), Some(&V(7, "b")));
        if let Some(v) = t.get_mut(&8) {
            v.1 = "c";
        }
        assert_eq!(t.get(&8), Some(&V(8, "c")));
        assert_eq!(t.remove(&9), Some(V(9, "a")));
        assert_eq!(t.remove(&9), None);
        assert!(t.get(&9).is_none());
        assert_eq!(t.len(), 999);
        assert!(t.get_or_make(&9, || None).is_none());
        assert_eq!(t.get_or_make(&9, || Some(V(9, "d"))), Some(&mut V(9, "d")));
        assert_eq!(t.get_or_make(&9, || Some(V(9, "e"))), Some(&mut V(9, "d")));
        assert_eq!(t.iter().count(), 1000);
        assert_eq!(t.into_iter().count(), 1000);
    }

    #[test]
    fn every_record_stays_found_through_removals_that_move_others() {
        let mut t: KeyedTable<V, RandomState> = KeyedTable::default();
        for p in 0..500 {
            t.insert_new(V(p, "a"));
        }
        // Remove from the front, the middle and the end: each removal but
        // the last moves the last record into the hole.
        for p in (0..500).step_by(3).chain([499, 250]) {
            t.remove(&p);
        }
        let gone = |p: u16| p % 3 == 0 || p == 499 || p == 250;
        for p in 0..500u16 {
            assert_eq!(t.get(&p).is_some(), !gone(p), "record {p}");
        }
        assert_eq!(t.len(), (0..500u16).filter(|p| !gone(*p)).count());
    }

    #[test]
    fn an_index_doubles_at_the_fill_it_is_told() {
        let mut at_3_4 = PositionIndex::default();
        let mut when_full = PositionIndex::default();
        let mut doubled = (Vec::new(), Vec::new());
        for p in 0..10_000u32 {
            let before = (at_3_4.table.capacity(), when_full.table.capacity());
            at_3_4.grow_at(3, 4);
            at_3_4.insert(p.wrapping_mul(2_654_435_761), p);
            when_full.insert(p.wrapping_mul(2_654_435_761), p);
            if at_3_4.table.capacity() != before.0 {
                doubled.0.push(p);
            }
            if when_full.table.capacity() != before.1 {
                doubled.1.push(p);
            }
            assert!(at_3_4.table.len() <= at_3_4.table.capacity() / 4 * 3 + 1);
        }
        // Both double as often, never on the same insert past the first few.
        assert_eq!(doubled.0.len(), doubled.1.len());
        let late = |d: &Vec<u32>| d.iter().copied().filter(|p| *p > 64).collect::<Vec<_>>();
        assert!(late(&doubled.0)
            .iter()
            .all(|p| !late(&doubled.1).contains(p)));
        assert_eq!(
            at_3_4.find(4_u32.wrapping_mul(2_654_435_761), |p| p == 4),
            Some(4)
        );
    }
}
