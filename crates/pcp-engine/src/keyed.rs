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
///
/// The index is [`SEGMENTS`] tables, chosen by the hash's low bits, each
/// growing on its own: a table that doubles rehashes a 32nd of the index,
/// a fraction of a ms at a million records where one table stalled its
/// shard for several (the longest waits of a flood of creates), and the
/// memory grows in 32 steps instead of doubling at once.
pub(crate) struct PositionIndex {
    segments: Box<[hashbrown::HashTable<(u32, u32)>; SEGMENTS]>,
}

/// Tables of a [`PositionIndex`].
pub(crate) const SEGMENTS: usize = 32;

impl Default for PositionIndex {
    fn default() -> Self {
        PositionIndex {
            segments: Box::new(std::array::from_fn(|_| hashbrown::HashTable::new())),
        }
    }
}

/// A segment's hash from the 32 bits the index keeps, past the bits that
/// chose the segment: spread over 64 (the table places entries by the low
/// bits and tags them with the top seven).
fn spread(h: u32) -> u64 {
    u64::from(h >> SEGMENTS.trailing_zeros()).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn rehash(&(_, h): &(u32, u32)) -> u64 {
    spread(h)
}

impl PositionIndex {
    fn segment(&self, h: u32) -> &hashbrown::HashTable<(u32, u32)> {
        &self.segments[h as usize % SEGMENTS]
    }

    fn segment_mut(&mut self, h: u32) -> &mut hashbrown::HashTable<(u32, u32)> {
        &mut self.segments[h as usize % SEGMENTS]
    }

    /// The position with short hash `h` whose record `is` accepts.
    pub(crate) fn find(&self, h: u32, mut is: impl FnMut(u32) -> bool) -> Option<u32> {
        self.segment(h)
            .find(spread(h), |&(at, hs)| hs == h && is(at))
            .map(|&(at, _)| at)
    }

    /// Adds position `at` under short hash `h`.
    pub(crate) fn insert(&mut self, h: u32, at: u32) {
        self.segment_mut(h)
            .insert_unique(spread(h), (at, h), rehash);
    }

    /// Takes position `at` (short hash `h`) out.
    pub(crate) fn remove(&mut self, h: u32, at: u32) {
        if let Ok(e) = self.segment_mut(h).find_entry(spread(h), |&(p, _)| p == at) {
            e.remove();
        }
    }

    /// The record with short hash `h` moved from position `from` to `to`.
    pub(crate) fn moved(&mut self, h: u32, from: u32, to: u32) {
        if let Some(e) = self.segment_mut(h).find_mut(spread(h), |&(p, _)| p == from) {
            e.0 = to;
        }
    }

    /// Positions the index could hold before its tables grow.
    #[cfg(test)]
    fn capacities(&self) -> Vec<usize> {
        self.segments.iter().map(|t| t.capacity()).collect()
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
    fn an_index_grows_a_32nd_at_a_time() {
        let mut index = PositionIndex::default();
        let mut before = index.capacities();
        for p in 0..200_000u32 {
            let h = p.wrapping_mul(2_654_435_761);
            index.insert(h, p);
            let now = index.capacities();
            // One insert grows one table at most, holding about a 32nd.
            let grown: Vec<usize> = (0..SEGMENTS).filter(|&i| now[i] != before[i]).collect();
            assert!(grown.len() <= 1, "insert {p} grew {grown:?}");
            if let (Some(&i), true) = (grown.first(), p > 10_000) {
                assert!(now[i] < 4 * 200_000 / SEGMENTS, "{}", now[i]);
            }
            before = now;
        }
        // Every position is found again, and taken out.
        for p in (0..200_000u32).step_by(997) {
            let h = p.wrapping_mul(2_654_435_761);
            assert_eq!(index.find(h, |at| at == p), Some(p));
            index.remove(h, p);
            assert_eq!(index.find(h, |at| at == p), None);
        }
        // The tables fill evenly: none holds twice its share.
        let held: Vec<usize> = index.segments.iter().map(|t| t.len()).collect();
        assert!(held.iter().all(|&n| n < 2 * 200_000 / SEGMENTS), "{held:?}");
    }
}
