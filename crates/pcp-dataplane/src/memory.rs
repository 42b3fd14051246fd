//! The in-memory backend: what would be installed, kept compactly.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use pcp_engine::keyed::Keyed;
use pcp_engine::{InternalEndpoint, MappingKind, Millis};

use crate::{key_of, ApplyError, Change, Dataplane, Entry, Key, KeyedTable};

/// What the memory dataplane keeps of an [`Entry`] that cannot be kept
/// [`Narrow`]: 64 bytes where an entry takes 80. The pinhole flag sits in
/// the kind's padding, and the rare filters behind one pointer.
#[derive(Debug)]
struct Kept {
    kind: Kind,
    internal_addr: IpAddr,
    external_addr: Ipv4Addr,
    external_port: u16,
    port_count: u16,
    internal_port: u16,
    protocol: u8,
    filters: Option<Box<Filters>>,
    expires_ms: Millis,
}

const _: () = assert!(std::mem::size_of::<Kept>() <= 64);

/// An entry's remote-peer filters ([`Entry::filters`]).
type Filters = Box<[(IpAddr, u8, u16)]>;

/// [`MappingKind`] with the entry's pinhole flag.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Map {
        firewall: bool,
    },
    Static {
        firewall: bool,
    },
    Peer {
        remote_addr: IpAddr,
        remote_port: u16,
        firewall: bool,
    },
}

impl Kept {
    fn of(e: &Entry) -> Self {
        let firewall = e.firewall;
        Kept {
            kind: match e.kind {
                MappingKind::Map => Kind::Map { firewall },
                MappingKind::Static => Kind::Static { firewall },
                MappingKind::Peer {
                    remote_addr,
                    remote_port,
                } => Kind::Peer {
                    remote_addr,
                    remote_port,
                    firewall,
                },
            },
            internal_addr: e.internal_addr,
            external_addr: e.external_addr,
            external_port: e.external_port,
            port_count: e.port_count,
            internal_port: e.internal_port,
            protocol: e.protocol,
            filters: (!e.filters.is_empty()).then(|| Box::new(e.filters.clone())),
            expires_ms: e.expires_ms,
        }
    }

    fn kind(&self) -> (MappingKind, bool) {
        match self.kind {
            Kind::Map { firewall } => (MappingKind::Map, firewall),
            Kind::Static { firewall } => (MappingKind::Static, firewall),
            Kind::Peer {
                remote_addr,
                remote_port,
                firewall,
            } => (
                MappingKind::Peer {
                    remote_addr,
                    remote_port,
                },
                firewall,
            ),
        }
    }

    fn entry(&self) -> Entry {
        let (kind, firewall) = self.kind();
        Entry {
            kind,
            external_addr: self.external_addr,
            external_port: self.external_port,
            port_count: self.port_count,
            protocol: self.protocol,
            firewall,
            internal_addr: self.internal_addr,
            internal_port: self.internal_port,
            filters: self.filters.as_deref().cloned().unwrap_or_default(),
            expires_ms: self.expires_ms,
        }
    }
}

impl Keyed for Kept {
    type Key = Key;
    fn key(&self) -> Key {
        let (kind, firewall) = self.kind();
        let internal = InternalEndpoint {
            addr: self.internal_addr,
            protocol: self.protocol,
            port: self.internal_port,
        };
        key_of(
            kind,
            firewall,
            internal,
            self.external_addr,
            self.external_port,
        )
    }
}

/// An entry of IPv4 addresses without filters, as nearly every CGNAT
/// mapping is: 32 bytes where [`Kept`] takes 64 (at a million mappings,
/// 32 MB). Others are kept as [`Kept`].
#[derive(Debug)]
struct Narrow {
    expires_ms: Millis,
    internal_addr: Ipv4Addr,
    external_addr: Ipv4Addr,
    /// The remote peer of a PEER entry (unspecified otherwise).
    remote_addr: Ipv4Addr,
    internal_port: u16,
    external_port: u16,
    port_count: u16,
    remote_port: u16,
    protocol: u8,
    /// [`Narrow::MAP`], [`Narrow::STATIC`] or [`Narrow::PEER`], with
    /// [`Narrow::FIREWALL`].
    flags: u8,
}

const _: () = assert!(std::mem::size_of::<Narrow>() <= 32);

impl Narrow {
    const MAP: u8 = 0;
    const STATIC: u8 = 1;
    const PEER: u8 = 2;
    const KIND: u8 = 3;
    const FIREWALL: u8 = 4;

    /// `e` kept narrow, if it can be.
    fn of(e: &Entry) -> Option<Self> {
        let (IpAddr::V4(internal_addr), true) = (e.internal_addr, e.filters.is_empty()) else {
            return None;
        };
        let (kind, remote_addr, remote_port) = match e.kind {
            MappingKind::Map => (Self::MAP, Ipv4Addr::UNSPECIFIED, 0),
            MappingKind::Static => (Self::STATIC, Ipv4Addr::UNSPECIFIED, 0),
            MappingKind::Peer {
                remote_addr: IpAddr::V4(a),
                remote_port,
            } => (Self::PEER, a, remote_port),
            MappingKind::Peer { .. } => return None,
        };
        Some(Narrow {
            expires_ms: e.expires_ms,
            internal_addr,
            external_addr: e.external_addr,
            remote_addr,
            internal_port: e.internal_port,
            external_port: e.external_port,
            port_count: e.port_count,
            remote_port,
            protocol: e.protocol,
            flags: kind | if e.firewall { Self::FIREWALL } else { 0 },
        })
    }

    fn kind(&self) -> MappingKind {
        match self.flags & Self::KIND {
            Self::PEER => MappingKind::Peer {
                remote_addr: IpAddr::V4(self.remote_addr),
                remote_port: self.remote_port,
            },
            Self::STATIC => MappingKind::Static,
            _ => MappingKind::Map,
        }
    }

    fn firewall(&self) -> bool {
        self.flags & Self::FIREWALL != 0
    }

    fn internal(&self) -> InternalEndpoint {
        InternalEndpoint {
            addr: IpAddr::V4(self.internal_addr),
            protocol: self.protocol,
            port: self.internal_port,
        }
    }

    fn entry(&self) -> Entry {
        Entry {
            kind: self.kind(),
            external_addr: self.external_addr,
            external_port: self.external_port,
            port_count: self.port_count,
            protocol: self.protocol,
            firewall: self.firewall(),
            internal_addr: IpAddr::V4(self.internal_addr),
            internal_port: self.internal_port,
            filters: Box::new([]),
            expires_ms: self.expires_ms,
        }
    }
}

impl Keyed for Narrow {
    type Key = Key;
    fn key(&self) -> Key {
        let (kind, firewall) = (self.kind(), self.firewall());
        key_of(
            kind,
            firewall,
            self.internal(),
            self.external_addr,
            self.external_port,
        )
    }
}

/// The in-memory backend: keeps what would be installed (a renewal that
/// only moves the expiry updates it in place). It is the embedded
/// default's dataplane, so its memory counts in the daemon's bytes per
/// mapping: each entry is stored once, compactly ([`Narrow`], else
/// [`Kept`]), and found by the key it implies ([`Entry::key`], not stored
/// beside it).
#[derive(Default)]
pub struct MemoryDataplane {
    entries: KeyedTable<Narrow>,
    /// Entries that cannot be kept narrow (IPv6, filters).
    wide: KeyedTable<Kept>,
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
        self.entries.len() + self.wide.len()
    }

    /// True when no mapping is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One installed entry.
    pub fn get(&self, key: &Key) -> Option<Entry> {
        match self.entries.get(key) {
            Some(n) => Some(n.entry()),
            None => self.wide.get(key).map(Kept::entry),
        }
    }

    fn upsert(&mut self, e: &Entry) {
        // A renewal replaces the record in place: its key is the same. An
        // entry that changes form (filters added) leaves the other table.
        let key = e.key();
        match Narrow::of(e) {
            Some(narrow) => match self.entries.get_mut(&key) {
                Some(have) => *have = narrow,
                None => {
                    if !self.wide.is_empty() {
                        self.wide.remove(&key);
                    }
                    self.entries.insert_new(narrow);
                }
            },
            None => {
                self.entries.remove(&key);
                self.wide.insert(Kept::of(e));
            }
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
        } else if self.entries.remove(key).is_none() {
            self.wide.remove(key);
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
            .chain(self.wide.iter().map(|e| (e.key(), Some(e.entry()))))
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
    use pcp_engine::Block;

    #[test]
    fn entries_come_back_as_they_went_in() {
        let mut dp = MemoryDataplane::new();
        let base = Entry {
            kind: MappingKind::Map,
            external_addr: Ipv4Addr::new(192, 0, 2, 1),
            external_port: 2000,
            port_count: 1,
            protocol: 6,
            firewall: false,
            internal_addr: "100.64.0.1".parse().unwrap(),
            internal_port: 80,
            filters: Box::new([]),
            expires_ms: 1000,
        };
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
        assert_eq!(
            (dp.entries.len(), dp.wide.len()),
            (2, 3),
            "IPv4 without filters narrow"
        );
        // A renewal moves the expiry in place.
        let renewed = Entry {
            expires_ms: 5000,
            ..all[0].clone()
        };
        dp.apply(&[Change::Upsert(renewed.clone())]);
        assert_eq!(dp.get(&renewed.key()), Some(renewed.clone()));
        assert_eq!(dp.len(), 5);
        // Filters added, then taken away: the entry changes form, once.
        let filtered = Entry {
            filters: Box::new([("198.51.100.0".parse().unwrap(), 24, 0)]),
            ..renewed.clone()
        };
        dp.apply(&[Change::Upsert(filtered.clone())]);
        assert_eq!(dp.get(&filtered.key()), Some(filtered));
        assert_eq!((dp.entries.len(), dp.wide.len()), (1, 4));
        dp.apply(&[Change::Upsert(renewed.clone())]);
        assert_eq!(dp.get(&renewed.key()), Some(renewed.clone()));
        assert_eq!((dp.entries.len(), dp.wide.len()), (2, 3));
        dp.apply(&[Change::Remove(renewed.key()), Change::Remove(all[4].key())]);
        assert_eq!((dp.entries.len(), dp.wide.len()), (1, 2));
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
