//! The in-memory backend: what would be installed, kept compactly.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use pcp_engine::keyed::Keyed;

use crate::compact::Compact;
use crate::{ApplyError, Change, Dataplane, Entry, Key, KeyedTable};

/// The in-memory backend: keeps what would be installed (a renewal that
/// only moves the expiry updates it in place). It is the embedded
/// default's dataplane, so its memory counts in the daemon's bytes per
/// mapping: each entry is stored once, compactly (`compact.rs`: 32 bytes
/// for IPv4), and found by the key it implies ([`Entry::key`], not stored
/// beside it).
#[derive(Default)]
pub struct MemoryDataplane {
    entries: KeyedTable<Compact>,
    /// Port blocks by external address: (first port, subscriber), sorted.
    /// ~20 bytes a block, where a set of (subscriber, address, port)
    /// took ~50 at a million blocks.
    blocks: HashMap<Ipv4Addr, Vec<(u16, IpAddr)>, foldhash::fast::RandomState>,
}

impl std::fmt::Debug for MemoryDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDataplane")
            .field("entries", &self.len())
            .field("blocks", &self.blocks.values().map(Vec::len).sum::<usize>())
            .finish()
    }
}

impl MemoryDataplane {
    /// An empty dataplane.
    pub fn new() -> Self {
        Self::default()
    }

    /// Installed entries (mappings only).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no mapping is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One installed entry.
    pub fn get(&self, key: &Key) -> Option<Entry> {
        self.entries.get(key).map(Compact::entry)
    }

    fn upsert(&mut self, e: &Entry) {
        // A renewal replaces the record in place: its key is the same.
        match self.entries.get_mut(&e.key()) {
            Some(have) => *have = Compact::of(e),
            None => self.entries.insert_new(Compact::of(e)),
        }
    }

    fn remove_block(&mut self, subscriber: IpAddr, external_addr: Ipv4Addr, first_port: u16) {
        if let Some(held) = self.blocks.get_mut(&external_addr) {
            if let Ok(at) = held.binary_search(&(first_port, subscriber)) {
                held.remove(at);
            }
            if held.is_empty() {
                self.blocks.remove(&external_addr);
            }
        }
    }

    fn remove(&mut self, key: &Key) {
        if let Key::SubscriberBlock {
            subscriber,
            external_addr,
            first_port,
        } = *key
        {
            self.remove_block(subscriber, external_addr, first_port);
        } else {
            self.entries.remove(key);
        }
    }
}

impl Dataplane for MemoryDataplane {
    fn apply(&mut self, changes: &[Change]) -> Vec<Result<(), ApplyError>> {
        for c in changes {
            match c {
                Change::Upsert(e) => self.upsert(e),
                Change::Remove(k) => self.remove(k),
                Change::AddBlock { subscriber, block } => {
                    let held = self.blocks.entry(block.addr).or_default();
                    if let Err(at) = held.binary_search(&(block.first, *subscriber)) {
                        held.insert(at, (block.first, *subscriber));
                    }
                }
                Change::RemoveBlock { subscriber, block } => {
                    self.remove_block(*subscriber, block.addr, block.first);
                }
            }
        }
        vec![Ok(()); changes.len()]
    }

    fn installed(&self) -> Vec<(Key, Option<Entry>)> {
        let mut all: Vec<(Key, Option<Entry>)> = self
            .entries
            .iter()
            .map(|e| (e.key(), Some(e.entry())))
            .chain(self.blocks.iter().flat_map(|(&external_addr, held)| {
                held.iter().map(move |&(first_port, subscriber)| {
                    let key = Key::SubscriberBlock {
                        subscriber,
                        external_addr,
                        first_port,
                    };
                    (key, None)
                })
            }))
            .collect();
        all.sort_unstable_by_key(|(k, _)| *k);
        all
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    fn waits(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port_set_key;
    use pcp_engine::{Block, MappingKind, Millis};

    #[test]
    fn entries_come_back_as_they_went_in() {
        let mut dp = MemoryDataplane::new();
        let base = crate::compact::tests::sample();
        let peer = Entry {
            kind: MappingKind::Peer {
                remote_addr: "2001:db8::1".parse().unwrap(),
                remote_port: 443,
            },
            ..base.clone()
        };
        let pinhole = Entry {
            kind: MappingKind::Static,
            external_addr: Ipv4Addr::UNSPECIFIED,
            firewall: true,
            filters: Box::new([("203.0.113.0".parse().unwrap(), 24, 0)]),
            expires_ms: Millis::MAX,
            ..base.clone()
        };
        let peer4 = Entry {
            kind: MappingKind::Peer {
                remote_addr: "203.0.113.9".parse().unwrap(),
                remote_port: 443,
            },
            internal_port: 81,
            ..base.clone()
        };
        let v6 = Entry {
            internal_addr: "2001:db8::2".parse().unwrap(),
            firewall: true,
            ..base.clone()
        };
        let all = [base, peer, pinhole, peer4, v6];
        let changes: Vec<Change> = all.iter().cloned().map(Change::Upsert).collect();
        dp.apply(&changes);
        for e in &all {
            assert_eq!(dp.get(&e.key()).as_ref(), Some(e));
        }
        let installed: Vec<Entry> = dp.installed().into_iter().filter_map(|(_, e)| e).collect();
        assert_eq!(installed.len(), 5);
        assert!(all.iter().all(|e| installed.contains(e)));
        // A renewal moves the expiry in place.
        let renewed = Entry {
            expires_ms: 5000,
            ..all[0].clone()
        };
        dp.apply(&[Change::Upsert(renewed.clone())]);
        assert_eq!(dp.get(&renewed.key()), Some(renewed.clone()));
        assert_eq!(dp.len(), 5);
        // Filters added, then taken away: the entry changes form in place.
        let filtered = Entry {
            filters: Box::new([("198.51.100.0".parse().unwrap(), 24, 0)]),
            ..renewed.clone()
        };
        dp.apply(&[Change::Upsert(filtered.clone())]);
        assert_eq!(dp.get(&filtered.key()), Some(filtered));
        dp.apply(&[Change::Upsert(renewed.clone())]);
        assert_eq!(dp.get(&renewed.key()), Some(renewed.clone()));
        assert_eq!(dp.len(), 5);
        dp.apply(&[Change::Remove(renewed.key()), Change::Remove(all[4].key())]);
        assert_eq!(dp.len(), 3);
    }

    #[test]
    fn port_blocks_are_kept_per_address_and_removed_by_either_change() {
        let mut dp = MemoryDataplane::new();
        let addr = Ipv4Addr::new(192, 0, 2, 1);
        let block = |first| Block {
            addr,
            first,
            len: 512,
        };
        let a: IpAddr = "100.64.0.1".parse().unwrap();
        let b: IpAddr = "100.64.0.2".parse().unwrap();
        let add = |subscriber, first| Change::AddBlock {
            subscriber,
            block: block(first),
        };
        // Out of order, and one twice: the set holds three.
        dp.apply(&[add(a, 2048), add(b, 1024), add(a, 1536), add(b, 1024)]);
        let keys = |dp: &MemoryDataplane| -> Vec<Key> {
            dp.installed().into_iter().map(|(k, _)| k).collect()
        };
        let mut want = vec![
            port_set_key(a, &block(1536)),
            port_set_key(a, &block(2048)),
            port_set_key(b, &block(1024)),
        ];
        want.sort_unstable();
        assert_eq!(keys(&dp), want);
        dp.apply(&[
            Change::Remove(port_set_key(a, &block(2048))),
            Change::RemoveBlock {
                subscriber: b,
                block: block(1024),
            },
            // Another subscriber's block at that port: nothing to remove.
            Change::RemoveBlock {
                subscriber: b,
                block: block(1536),
            },
        ]);
        assert_eq!(keys(&dp), vec![port_set_key(a, &block(1536))]);
        dp.apply(&[Change::Remove(port_set_key(a, &block(1536)))]);
        assert!(dp.installed().is_empty());
        assert!(dp.blocks.is_empty(), "an address with no block is dropped");
    }
}
