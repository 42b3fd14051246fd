//! Read-only answers for the admin API and snapshots: mappings, a
//! subscriber's usage, and "who held external IP:port at time T" (RFC 6302,
//! RFC 7422 for deterministic pools).

use std::net::{IpAddr, Ipv4Addr};

use super::Engine;
use crate::alloc::{deterministic_block, deterministic_index, Block};
use crate::config::PoolMode;
use crate::types::{
    ExternalEndpoint, Holder, Mapping, MappingId, MappingKey, Millis, SubscriberUsage,
};

impl Engine {
    /// Every live mapping of this shard (copies: slots keep them packed).
    pub fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.table.iter()
    }

    /// Subscribers with a record in this shard (each holds a block or a
    /// mapping).
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// A mapping by id.
    pub fn mapping(&self, id: MappingId) -> Option<Mapping> {
        self.table.by_id(id)
    }

    /// The live mapping `key` names.
    pub fn mapping_by_key(&self, key: &MappingKey) -> Option<Mapping> {
        self.table.find(key).and_then(|slot| self.table.get(slot))
    }

    /// The mappings of one subscriber.
    pub fn mappings_of(&self, subscriber: IpAddr) -> Vec<Mapping> {
        self.subscribers
            .get(&subscriber)
            .map(|s| {
                s.slots
                    .iter()
                    .filter_map(|slot| self.table.get(*slot))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The mapping that holds external `addr:port` for `protocol`, if any.
    pub fn mapping_at(&self, addr: Ipv4Addr, protocol: u8, port: u16) -> Option<Mapping> {
        let external = ExternalEndpoint {
            addr,
            protocol,
            port,
        };
        if !self.table.port_in_use(&external) {
            return None;
        }
        self.mappings().find(|m| m.forwards(&external).is_some())
    }

    /// A subscriber's usage, if it is known to this shard.
    pub fn subscriber(&self, addr: IpAddr) -> Option<SubscriberUsage> {
        let s = self.subscribers.get(&addr)?;
        let class = usize::from(s.class);
        Some(SubscriberUsage {
            internal_addr: addr,
            pool: self
                .pool(s.pool)
                .map(|p| p.name.clone())
                .unwrap_or_default(),
            firewall: self.compiled.class_firewall[class],
            profile: self.compiled.class_profile_name[class].clone(),
            external_addr: s.ext,
            blocks: s.blocks.iter().map(|(b, _)| *b).collect(),
            mappings: s.quota_used,
            max_mappings: self.compiled.class_profile[class].max_mappings,
        })
    }

    /// Who held external `addr:port` at `at` (RFC 6302 / RFC 7422 logging
    /// questions): from this shard's block history and live blocks. For
    /// deterministic pools the answer is computed.
    pub fn lookup(&self, addr: Ipv4Addr, port: u16, at: Millis) -> Option<Holder> {
        if let Some(h) = self.deterministic_holder(addr, port) {
            return h;
        }
        for s in self.subscribers.iter() {
            for (b, from) in &s.blocks {
                if b.addr == addr && b.contains(port) && *from <= at {
                    return Some(Holder {
                        internal_addr: s.addr,
                        block: *b,
                        from_ms: Some(*from),
                        to_ms: None,
                    });
                }
            }
        }
        self.history
            .iter()
            .rev()
            .find(|h| {
                h.block.addr == addr
                    && h.block.contains(port)
                    && h.from_ms.is_some_and(|f| f <= at)
                    && h.to_ms.is_some_and(|t| at < t)
            })
            .cloned()
    }

    /// `Some(answer)` when `addr` is in a deterministic pool (RFC 7422: the
    /// holder is computed, at any time); `None` for dynamic pools.
    fn deterministic_holder(&self, addr: Ipv4Addr, port: u16) -> Option<Option<Holder>> {
        let (pi, pool) = self
            .pools
            .pools
            .iter()
            .enumerate()
            .find(|(_, p)| p.address_index(addr).is_some())?;
        if pool.mode != PoolMode::Deterministic {
            return None;
        }
        let Some(idx) = deterministic_index(pool, addr, port) else {
            return Some(None);
        };
        let holder = self
            .compiled
            .class_pool
            .iter()
            .enumerate()
            .filter(|(_, p)| usize::from(**p) == pi)
            .find_map(|(ci, _)| self.compiled.address_at(ci as u16, idx))
            .map(|internal_addr| Holder {
                internal_addr,
                block: deterministic_block(pool, idx).unwrap_or(Block {
                    addr,
                    first: port,
                    len: 1,
                }),
                from_ms: None,
                to_ms: None,
            });
        Some(holder)
    }
}
