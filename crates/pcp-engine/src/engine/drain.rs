//! Draining an external address (operator action): every subscriber on it
//! gets new blocks elsewhere, its mappings move with their offset in the
//! block kept when possible, and clients are told with unsolicited MAP/PEER
//! responses (RFC 6887 §14.2). PREFER_FAILURE mappings cannot move: they
//! are deleted and their clients told CANNOT_PROVIDE_EXTERNAL.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_wire::ResultCode;

use super::lifetime::Report;
use super::ports::{PortAsk, Suggestion};
use super::request::Refusal;
use super::unsolicited::Update;
use super::Engine;
use crate::config::PoolMode;
use crate::types::{DeleteReason, Event, Mapping, MappingId, Millis};

impl Engine {
    /// Moves every mapping of this shard off `addr` (already marked draining
    /// in [`crate::BlockAllocator::set_draining`]) and tells clients with
    /// unsolicited MAP/PEER responses (RFC 6887 §14.2). Returns how many
    /// mappings moved.
    pub fn drain(&mut self, now: Millis, addr: Ipv4Addr) -> usize {
        let mut affected: Vec<IpAddr> = self
            .subscribers
            .iter()
            .filter(|s| {
                s.ext == Some(addr)
                    && self
                        .pool(s.pool)
                        .is_some_and(|p| p.mode == PoolMode::Dynamic)
            })
            .map(|s| s.addr)
            .collect();
        // A stable order, so a drain is reproducible.
        affected.sort_unstable();
        affected
            .into_iter()
            .map(|subscriber| self.move_subscriber(now, subscriber))
            .sum()
    }

    fn move_subscriber(&mut self, now: Millis, subscriber: IpAddr) -> usize {
        let Some(sub) = self.subscribers.get_mut(&subscriber) else {
            return 0;
        };
        let pool = usize::from(sub.pool);
        let old_blocks = std::mem::take(&mut sub.blocks);
        sub.ext = None;
        // Detach every mapping (their ports stay unusable: the old address is
        // going away), then release the old blocks.
        let old: Vec<Mapping> = self
            .slots_of(subscriber)
            .into_iter()
            .filter_map(|slot| self.detach(now, slot))
            .collect();
        self.release_blocks(now, subscriber, pool, &old_blocks);
        let mut moved = 0;
        for m in old {
            // Keep the port's offset within its block when possible.
            let offset = old_blocks
                .iter()
                .find(|(b, _)| b.contains(m.external_port))
                .map_or(0, |(b, _)| m.external_port - b.first);
            let placed = self.place_moved(now, &m, offset);
            let (result, new) = match placed {
                Ok(new) => {
                    moved += 1;
                    (ResultCode::Success, Some(new))
                }
                Err(r) => {
                    self.events.push_back(Event::MappingDeleted {
                        mapping: m.clone(),
                        reason: DeleteReason::Drained,
                    });
                    (r.code, None)
                }
            };
            self.tell_moved(now, &m, result, new.as_ref());
        }
        moved
    }

    /// Re-creates a drained mapping on the subscriber's new block at the
    /// same offset (a hint), reporting the move.
    fn place_moved(&mut self, now: Millis, m: &Mapping, offset: u16) -> Result<Mapping, Refusal> {
        if m.extra.as_ref().is_some_and(|e| e.prefer_failure) {
            // §14.2: the same external address cannot be provided.
            return Err(ResultCode::CannotProvideExternal.into());
        }
        let subscriber = m.internal_addr;
        self.ensure_blocks(now, subscriber, None)?;
        let first = self
            .subscribers
            .get(&subscriber)
            .and_then(|s| s.blocks.first())
            .ok_or(ResultCode::NoResources)?
            .0
            .first;
        let (addr, port, count) = self.choose_ports(
            now,
            &PortAsk {
                internal: m.internal(),
                nonce: m.nonce,
                suggested: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), first + offset),
                count: m.port_count,
                suggestion: Suggestion::Hint,
                parity: false,
            },
        )?;
        let mut new = m.clone();
        new.external_addr = addr;
        new.external_port = port;
        new.port_count = count;
        new.created_ms = now;
        new.id = self.insert_as(now, new.clone(), Report::Silent);
        self.events.push_back(Event::MappingMoved {
            old: m.clone(),
            new: new.clone(),
        });
        Ok(new)
    }

    /// Queues the §14.2 update telling the client where its mapping went.
    fn tell_moved(&mut self, now: Millis, m: &Mapping, result: ResultCode, new: Option<&Mapping>) {
        if m.natpmp {
            // A NAT-PMP client hears of an address change by its port 5350
            // (RFC 6886 §3.2.1); a PCP update means nothing to it. A lost
            // mapping shows in its next renewal's answer.
            if let Some(n) = new.filter(|n| n.external_addr != m.external_addr) {
                let dst = SocketAddr::new(m.internal_addr, pcp_wire::CLIENT_PORT);
                self.queue_natpmp(now, dst, n.external_addr);
            }
            return;
        }
        let payload = self.update_payload(
            now,
            m,
            result,
            new.map(|n| (n.external_addr, n.external_port)),
        );
        let MappingId {
            slot, generation, ..
        } = new.map_or(NO_MAPPING, |n| n.id);
        let update = Update {
            slot,
            generation,
            stamp: now,
            payload,
            dst: m.client(),
        };
        let count = self.compiled.config.unsolicited.update_count.max(1);
        self.queue_update(now, update, count);
    }
}

/// The id an error update carries: no mapping.
const NO_MAPPING: MappingId = MappingId {
    shard: 0,
    slot: u32::MAX,
    generation: 0,
};
