//! The mapping table: slots with generations, and every secondary index
//! over them, kept in step by the only two functions that change them,
//! [`MappingTable::insert`] and [`MappingTable::detach`].

use std::collections::hash_map::Entry;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher as _;

use super::packed::Packed;
use super::portmap::PortMap;
use crate::keyed::PositionIndex;
use pcp_wire::Nonce;

use crate::types::{ExternalEndpoint, InternalEndpoint, Mapping, MappingId, MappingKey, Millis};

/// 88 bytes: at a million mappings the daemon's largest table.
struct Slot {
    generation: u32,
    /// The second the mapping's expiry timer is armed for (0: none). One
    /// timer per mapping: a renewal that moves the expiry later leaves it,
    /// and it re-arms when it fires early; one that moves it earlier arms
    /// another, and the later one is then stale.
    expiry_armed_s: u32,
    /// The mapping, packed (`packed.rs`); its id is the slot's.
    mapping: Option<Packed>,
    /// When the client last refreshed it (to cancel §14.2 retransmissions).
    refreshed_ms: Millis,
}

const _: () = assert!(std::mem::size_of::<Slot>() <= 88);

/// Slots per chunk of [`Slots`]: 352 KiB of them.
const CHUNK: usize = 4096;

/// The slots, in chunks of [`CHUNK`] that never move: growing a `Vec` of
/// them copied every slot at each doubling (64 MB and tens of ms of a
/// shard's time at half a million mappings), and left up to half of its
/// capacity unused.
#[derive(Default)]
struct Slots {
    chunks: Vec<Vec<Slot>>,
}

impl Slots {
    fn get(&self, slot: u32) -> Option<&Slot> {
        let i = slot as usize;
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    fn get_mut(&mut self, slot: u32) -> Option<&mut Slot> {
        let i = slot as usize;
        self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)
    }

    /// Adds a slot; returns its number.
    fn push(&mut self, slot: Slot) -> u32 {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(slot),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(slot);
                self.chunks.push(chunk);
            }
        }
        (self.len() - 1) as u32
    }

    fn len(&self) -> usize {
        self.chunks.len().saturating_sub(1) * CHUNK + self.chunks.last().map_or(0, Vec::len)
    }

    /// Every slot with its number.
    fn iter(&self) -> impl Iterator<Item = (u32, &Slot)> {
        self.chunks
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, s)| (i as u32, s))
    }
}

/// An external port that a detached mapping gave back.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReleasedPort {
    pub(super) external: ExternalEndpoint,
    /// The internal port it forwarded to (§15 "same client" is per port).
    pub(super) internal_port: u16,
}

/// Every mapping of a shard, by slot, with its indexes.
pub(super) struct MappingTable {
    shard: u16,
    slots: Slots,
    free: Vec<u32>,
    /// Every mapping's slot, found by its key: MAP and static by internal
    /// endpoint (§11.3: one per endpoint), PEER by the full key (§12.3).
    /// Slot numbers with 32 bits of the key's hash, compared against the
    /// mapping in the slot (no copy of the key).
    by_key: PositionIndex,
    /// Keys are chosen by subscribers: SipHash, randomly keyed.
    hasher: RandomState,
    /// External ports in use, with how many mappings hold each (those of
    /// one internal endpoint share its port, RFC 4787 EIM; which internal
    /// port it forwards to is theirs). A create probes it several times.
    ports: PortMap<u32>,
    /// External port of each outbound (PEER) internal endpoint (RFC 4787
    /// EIM), and how many PEER mappings of it there are.
    outbound: HashMap<InternalEndpoint, (u16, u32)>,
    live: usize,
}

impl MappingTable {
    pub(super) fn new(shard: u16) -> Self {
        MappingTable {
            shard,
            slots: Slots::default(),
            free: Vec::new(),
            by_key: PositionIndex::default(),
            hasher: RandomState::new(),
            ports: PortMap::default(),
            outbound: HashMap::new(),
            live: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// The id of whatever `slot` holds now.
    fn id(&self, slot: u32, s: &Slot) -> MappingId {
        MappingId {
            shard: self.shard,
            slot,
            generation: s.generation,
        }
    }

    /// The mapping in `slot` (a copy: slots keep it packed).
    pub(super) fn get(&self, slot: u32) -> Option<Mapping> {
        let s = self.slots.get(slot)?;
        Some(s.mapping.as_ref()?.unpack(self.id(slot, s)))
    }

    /// Changes the mapping in `slot` (anything but its key: the index finds
    /// it by the key it holds) by `change`; returns the mapping after it.
    pub(super) fn update<R>(
        &mut self,
        slot: u32,
        change: impl FnOnce(&mut Mapping) -> R,
    ) -> Option<(Mapping, R)> {
        let mut m = self.get(slot)?;
        let r = change(&mut m);
        debug_assert_eq!(self.key_at(slot), Some(m.key()), "an update moved the key");
        let kept = self.slots.get_mut(slot)?;
        kept.mapping = Some(Packed::of(m.clone()));
        Some((m, r))
    }

    /// The mapping behind `id`, if that slot still holds that generation.
    pub(super) fn by_id(&self, id: MappingId) -> Option<Mapping> {
        let s = self.slots.get(id.slot)?;
        (s.generation == id.generation).then_some(())?;
        Some(s.mapping.as_ref()?.unpack(id))
    }

    /// The slot of the mapping with `key`.
    pub(super) fn find(&self, key: &MappingKey) -> Option<u32> {
        let h = self.short_hash(key);
        self.by_key.find(h, |s| self.key_at(s) == Some(*key))
    }

    /// The 32 bits of a key's hash the index keeps.
    fn short_hash(&self, key: &MappingKey) -> u32 {
        self.hasher.hash_one(key) as u32
    }

    /// The key of the mapping in `slot`.
    fn key_at(&self, slot: u32) -> Option<MappingKey> {
        Some(self.slots.get(slot)?.mapping.as_ref()?.key())
    }

    /// The external port an outbound (PEER) mapping of `internal` uses.
    pub(super) fn outbound_port(&self, internal: &InternalEndpoint) -> Option<u16> {
        self.outbound.get(internal).map(|(port, _)| *port)
    }

    /// Whether an external port is held by a mapping.
    pub(super) fn port_in_use(&self, external: &ExternalEndpoint) -> bool {
        self.ports.contains_key(external)
    }

    /// Slots ever made (live or free): slot numbers run below this.
    pub(super) fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Every mapping (copies).
    pub(super) fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.slots
            .iter()
            .filter_map(|(slot, s)| Some(s.mapping.as_ref()?.unpack(self.id(slot, s))))
    }

    /// A client refreshed the mapping in `slot` at `now` (§14.2 stops).
    pub(super) fn refreshed(&mut self, slot: u32, now: Millis) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.refreshed_ms = now;
        }
    }

    /// Whether `slot` still holds `generation`, not refreshed after `stamp`.
    pub(super) fn unrefreshed_since(&self, slot: u32, generation: u32, stamp: Millis) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|s| s.generation == generation && s.refreshed_ms <= stamp)
    }

    /// The second the expiry timer of `slot` is armed for, if it holds
    /// `generation` (0: none armed).
    pub(super) fn expiry_armed(&self, slot: u32, generation: u32) -> Option<u32> {
        let s = self.slots.get(slot)?;
        (s.generation == generation && s.mapping.is_some()).then_some(s.expiry_armed_s)
    }

    /// Notes the second the expiry timer of `slot` is armed for.
    pub(super) fn set_expiry_armed(&mut self, slot: u32, second: u32) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.expiry_armed_s = second;
        }
    }

    /// Whether the mapping in `slot` counts against a quota and has
    /// expired at `now` (read in place: no copy).
    pub(super) fn expired_at(&self, slot: u32, now: Millis) -> bool {
        let kept = self.slots.get(slot).and_then(|s| s.mapping.as_ref());
        kept.is_some_and(|m| m.expired(now))
    }

    /// [`MappingTable::expired_at`], if `slot` still holds `generation`.
    pub(super) fn expired(&self, slot: u32, generation: u32, now: Millis) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|s| s.generation == generation)
            && self.expired_at(slot, now)
    }

    /// The nonce of the mapping in `slot` (read in place: no copy).
    pub(super) fn nonce(&self, slot: u32) -> Option<Nonce> {
        Some(self.slots.get(slot)?.mapping.as_ref()?.nonce())
    }

    /// Puts a mapping in a free slot and in every index; returns its id.
    pub(super) fn insert(&mut self, now: Millis, mut mapping: Mapping) -> MappingId {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => self.slots.push(Slot {
                generation: 0,
                expiry_armed_s: 0,
                mapping: None,
                refreshed_ms: now,
            }),
        };
        let id = MappingId {
            shard: self.shard,
            slot,
            generation: self.slots.get(slot).map_or(0, |s| s.generation),
        };
        mapping.id = id;
        let key = mapping.key();
        if key.remote.is_some() {
            // Outbound endpoints (PEER) are indexed apart; a MAP
            // mapping's port is found through its key.
            self.outbound
                .entry(key.internal)
                .or_insert((mapping.external_port, 0))
                .1 += 1;
        }
        // A pinhole holds no external port: it is its internal one (§3).
        let held = if mapping.firewall {
            0
        } else {
            mapping.port_count
        };
        for i in 0..held {
            let external = mapping.external(i);
            *self.ports.entry(external).or_insert(0) += 1;
        }
        if let Some(s) = self.slots.get_mut(slot) {
            s.refreshed_ms = now;
            s.expiry_armed_s = 0;
            s.mapping = Some(Packed::of(mapping));
        }
        self.live += 1;
        let h = self.short_hash(&key);
        self.by_key.insert(h, slot);
        id
    }

    /// Takes a mapping out of its slot and every index; returns it with
    /// the external ports no other mapping holds any more.
    pub(super) fn detach(&mut self, slot: u32) -> Option<(Mapping, Vec<ReleasedPort>)> {
        let key = self.key_at(slot)?;
        let h = self.short_hash(&key);
        self.by_key.remove(h, slot);
        let mapping = self.get(slot)?;
        let entry = self.slots.get_mut(slot)?;
        entry.mapping = None;
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(slot);
        self.live -= 1;
        if key.remote.is_some() {
            // A NAT endpoint's outbound port goes when the port is
            // released (below); a pinhole's when its last PEER goes.
            if let Some(o) = self.outbound.get_mut(&key.internal) {
                o.1 = o.1.saturating_sub(1);
                if mapping.firewall && o.1 == 0 {
                    self.outbound.remove(&key.internal);
                }
            }
        }
        let mut released = Vec::new();
        let held = if mapping.firewall {
            0
        } else {
            mapping.port_count
        };
        for i in 0..held {
            let external = mapping.external(i);
            // One search: the count goes down, and the port with it at 0.
            if let Entry::Occupied(mut refs) = self.ports.entry(external) {
                *refs.get_mut() -= 1;
                if *refs.get() == 0 {
                    refs.remove();
                    released.push(ReleasedPort {
                        external,
                        internal_port: mapping.internal_port.wrapping_add(i),
                    });
                }
            }
        }
        if !released.is_empty() && mapping.port_count == 1 {
            self.outbound.remove(&key.internal);
        }
        Some((mapping, released))
    }
}

/// A placeholder id: [`MappingTable::insert`] assigns the real one.
pub(super) const UNASSIGNED: MappingId = MappingId {
    shard: 0,
    slot: 0,
    generation: 0,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::MappingKind;
    use pcp_wire::Nonce;
    use std::net::{IpAddr, Ipv4Addr};

    fn mapping(kind: MappingKind, ext_port: u16) -> Mapping {
        Mapping {
            id: UNASSIGNED,
            kind,
            internal_addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
            internal_port: 80,
            protocol: 6,
            external_addr: Ipv4Addr::new(192, 0, 2, 1),
            external_port: ext_port,
            firewall: false,
            port_count: 1,
            nonce: Nonce::default(),
            created_ms: 0,
            expires_ms: 1000,
            durable_ms: 1000,
            client_port: 1,
            natpmp: false,
            extra: None,
        }
    }

    #[test]
    fn insert_and_detach_keep_every_index_in_step() {
        let mut t = MappingTable::new(3);
        let peer = MappingKind::Peer {
            remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)),
            remote_port: 443,
        };
        let a = t.insert(0, mapping(MappingKind::Map, 2000));
        let b = t.insert(0, mapping(peer, 2000));
        assert_eq!(a.shard, 3);
        let ma = t.by_id(a).unwrap();
        let mb = t.by_id(b).unwrap();
        assert_eq!(t.find(&ma.key()), Some(a.slot));
        assert_eq!(t.find(&mb.key()), Some(b.slot));
        assert_eq!(t.outbound_port(&mb.internal()), Some(2000));
        // Two mappings share the port: the first detach releases nothing.
        let (_, released) = t.detach(a.slot).unwrap();
        assert!(released.is_empty());
        assert!(t.port_in_use(&mb.external(0)));
        let (_, released) = t.detach(b.slot).unwrap();
        assert_eq!(released.len(), 1);
        assert!(!t.port_in_use(&mb.external(0)));
        assert_eq!(t.outbound_port(&mb.internal()), None);
        assert_eq!(t.len(), 0);
        // A reused slot is a new generation: the old id is gone.
        let c = t.insert(0, mapping(MappingKind::Map, 2001));
        assert!(t.by_id(a).is_none() && t.by_id(b).is_none());
        assert!(t.by_id(c).is_some());
        assert_ne!((c.slot, c.generation), (b.slot, b.generation));
    }
}
