//! State recovery after a restart: blocks first, then mappings, then the
//! allocation history. Each restore is checked against the current
//! configuration and emits no event (a restore is not a creation).

use std::net::IpAddr;

use super::lifetime::Report;
use super::Engine;
use crate::alloc::{deterministic_block, Block};
use crate::config::PoolMode;
use crate::types::{Holder, Mapping, Millis};

impl Engine {
    /// Every block held, with its subscriber and since when (for snapshots).
    pub fn blocks(&self) -> impl Iterator<Item = (IpAddr, Block, Millis)> + '_ {
        self.subscribers
            .iter()
            .flat_map(|s| s.blocks.iter().map(move |(b, since)| (s.addr, *b, *since)))
    }

    /// The allocation history kept for [`Engine::lookup`].
    pub fn history(&self) -> impl Iterator<Item = &Holder> {
        self.history.iter()
    }

    /// Gives a subscriber back a block it held before a restart. Refused
    /// (false) when the configuration no longer allows it: the subscriber's
    /// class or pool changed, or the block is not free. Emits no event.
    pub fn restore_block(
        &mut self,
        now: Millis,
        subscriber: IpAddr,
        block: Block,
        since: Millis,
    ) -> bool {
        let Some(sub) = self.subscriber_entry(now, subscriber) else {
            return false;
        };
        let (pool, det_index, ext) = (usize::from(sub.pool), sub.det_index, sub.ext);
        if ext.is_some_and(|a| a != block.addr) {
            return false; // paired pooling: one address per subscriber
        }
        // A firewall class (no pool) holds no block.
        let ok = match self.pools.pools.get(pool).map(|p| (p, p.mode)) {
            Some((p, PoolMode::Deterministic)) => deterministic_block(p, det_index) == Some(block),
            Some((_, PoolMode::Dynamic)) => self.pools.claim_block(pool, subscriber, block),
            None => false,
        };
        if ok {
            if let Some(sub) = self.subscribers.get_mut(&subscriber) {
                sub.ext = Some(block.addr);
                sub.blocks.push((block, since));
            }
            self.unsettled.push(subscriber);
        } else {
            self.forget_if_stateless(subscriber);
        }
        ok
    }

    /// Re-installs a mapping from before a restart, with its external
    /// endpoint, nonce and expiry. Refused (false) when it has expired, or
    /// its ports are not in its subscriber's restored port set or are taken.
    /// Emits no event.
    pub fn restore_mapping(&mut self, now: Millis, mapping: Mapping) -> bool {
        if mapping.counts_against_quota() && mapping.expires_ms <= now {
            return false;
        }
        // A pinhole only in a firewall class, a translation only in a NAT
        // class: a class whose kind changed does not keep the other kind's
        // state. A pinhole needs no block, so its subscriber record is
        // made here.
        if mapping.firewall != self.compiled.is_firewall(mapping.internal_addr) {
            return false;
        }
        if mapping.firewall {
            let identity = mapping.external_addr.is_unspecified()
                && mapping.external_port == mapping.internal_port;
            let fresh = self.table.find(&mapping.key()).is_none();
            if identity && fresh && self.subscriber_entry(now, mapping.internal_addr).is_some() {
                self.insert_as(now, mapping, Report::Silent);
                return true;
            }
            return false;
        }
        let Some(sub) = self.subscribers.get(&mapping.internal_addr) else {
            return false;
        };
        let inside = (0..mapping.port_count).all(|i| {
            sub.ext == Some(mapping.external_addr)
                && sub
                    .blocks
                    .iter()
                    .any(|(b, _)| b.contains(mapping.external(i).port))
        });
        // A port of the subscriber's block held for another internal port
        // (by one of its mappings: the block is its own; by anything else,
        // taken too).
        let taken_by_other = (0..mapping.port_count).any(|i| {
            let external = mapping.external(i);
            let internal = mapping.internal_port.wrapping_add(i);
            let mut mine = sub.slots.iter().filter_map(|s| self.table.get(*s));
            self.table.port_in_use(&external)
                && !mine.any(|m| m.forwards(&external) == Some(internal))
        });
        let duplicate = self.table.find(&mapping.key()).is_some();
        if !inside || taken_by_other || duplicate {
            return false;
        }
        self.insert_as(now, mapping, Report::Silent);
        true
    }

    /// Restores one allocation-history record.
    pub fn restore_history(&mut self, holder: Holder) {
        self.history.restore(holder);
    }
}
