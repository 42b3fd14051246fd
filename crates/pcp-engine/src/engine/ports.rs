//! Where external ports come from: the quota, the subscriber's port
//! blocks (dynamic, paired pooling, or deterministic RFC 7422), the choice
//! of a port inside them (the suggestion, else random: RFC 6888
//! REQ-13..15), and the reuse delay that keeps a freed port from going to
//! someone else too soon (RFC 6887 §15).

use std::collections::hash_map::Entry;
use std::net::{IpAddr, Ipv4Addr};

use pcp_wire::{Nonce, ResultCode};

use super::request::Refusal;
use super::table::ReleasedPort;
use super::timers::Timer;
use super::Engine;
use crate::alloc::{deterministic_block, Block, BlockError};
use crate::config::{DeleteAnswer, PoolMode};
use crate::types::{Event, ExternalEndpoint, InternalEndpoint, Millis};

/// Whether a suggested external port must be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Suggestion {
    /// A hint: another port will do (§11.3).
    Hint,
    /// Only the suggestion will do: PREFER_FAILURE (§13.2), or a PEER that
    /// suggests something (§12.3).
    Required,
}

/// What a mapping needs from the port set.
pub(super) struct PortAsk {
    pub(super) internal: InternalEndpoint,
    pub(super) nonce: Nonce,
    /// Suggested external address and port (unspecified / 0: any).
    pub(super) suggested: (IpAddr, u16),
    /// Contiguous ports wanted (PORT_SET, RFC 7753); fewer may be given.
    pub(super) count: u16,
    pub(super) suggestion: Suggestion,
    /// RFC 7753 §4.1: keep the internal port's parity.
    pub(super) parity: bool,
}

/// A subscriber's port set as it stands: its address and blocks.
struct Held<'a> {
    addr: Ipv4Addr,
    blocks: &'a [Block],
}

/// A freed port in its reuse delay, and the one client that may reclaim it.
#[derive(Debug, Clone, Copy)]
struct Cooling {
    until: Millis,
    internal: IpAddr,
    internal_port: u16,
    nonce: Nonce,
}

/// Ports in their reuse delay (§15), and when each pool's exhaustion
/// was last reported.
#[derive(Default)]
pub(super) struct ReuseDelay {
    ports: super::portmap::PortMap<Cooling>,
    exhausted_logged: Vec<Option<Millis>>,
}

impl Engine {
    pub(super) fn quota_left(&self, subscriber: IpAddr) -> u32 {
        let Some(sub) = self.subscribers.get(&subscriber) else {
            return 0;
        };
        self.compiled.class_profile[usize::from(sub.class)]
            .max_mappings
            .saturating_sub(sub.quota_used)
    }

    pub(super) fn quota_check(
        &mut self,
        now: Millis,
        subscriber: IpAddr,
        ports: u32,
    ) -> Result<(), Refusal> {
        if self.quota_left(subscriber) >= ports {
            return Ok(());
        }
        Err(self.quota_refusal(now, subscriber))
    }

    fn quota_refusal(&mut self, now: Millis, subscriber: IpAddr) -> Refusal {
        self.stats.quota_refusals += 1;
        self.events.push_back(Event::QuotaExceeded { subscriber });
        // §7.4: USER_EX_QUOTA is short lifetime; report when the first of the
        // subscriber's mappings frees up, if sooner.
        let soonest = self.subscribers.get(&subscriber).and_then(|s| {
            s.slots
                .iter()
                .filter_map(|slot| self.table.get(*slot))
                .filter(|m| m.counts_against_quota())
                .map(|m| m.remaining_secs(now))
                .min()
        });
        let short = self.compiled.config.lifetimes.short_error;
        Refusal {
            code: ResultCode::UserExQuota,
            lifetime: Some(soonest.map_or(short, |s| s.clamp(1, short.max(1)))),
        }
    }

    /// NO_RESOURCES for lack of a block; the event (NAT log:
    /// addresses_exhausted) at most once a second per pool, so a flood of
    /// refused creates does not become a flood of log lines.
    fn pool_exhausted(&mut self, now: Millis, pool: usize) -> Refusal {
        self.stats.pool_exhausted += 1;
        if self.reuse.exhausted_logged.len() <= pool {
            self.reuse.exhausted_logged.resize(pool + 1, None);
        }
        let last = &mut self.reuse.exhausted_logged[pool];
        if last.is_none_or(|t| now >= t + 1000) {
            *last = Some(now);
            self.events.push_back(Event::PoolExhausted {
                pool: self.pools.pools[pool].name.clone(),
            });
        }
        ResultCode::NoResources.into()
    }

    /// Gives the subscriber its first port block if it has none. With a
    /// `wanted` endpoint (a suggested external address and port), a
    /// dynamic pool gives the block that holds it when that block is free:
    /// after a restart without state (or a cluster takeover that lost it),
    /// clients re-send their mappings suggesting the old endpoints, and
    /// §11.2.1 / §14.1.3 expect the server to honour them when it can.
    pub(super) fn ensure_blocks(
        &mut self,
        now: Millis,
        subscriber: IpAddr,
        wanted: Option<(Ipv4Addr, u16)>,
    ) -> Result<(), Refusal> {
        let Some(sub) = self.subscriber_entry(now, subscriber) else {
            return Err(ResultCode::NotAuthorized.into());
        };
        if !sub.blocks.is_empty() {
            return Ok(());
        }
        let (pool_index, det_index) = (sub.pool, sub.det_index);
        let pool = usize::from(pool_index);
        // A firewall class has no pool (RFC 6887 §3): nothing to allocate.
        let Some(mode) = self.pool(pool_index).map(|p| p.mode) else {
            return Err(ResultCode::NoResources.into());
        };
        let block = match mode {
            PoolMode::Deterministic => deterministic_block(&self.pools.pools[pool], det_index)
                .ok_or(ResultCode::NoResources)?,
            PoolMode::Dynamic => {
                let old = wanted.and_then(|(addr, port)| {
                    self.pools.claim_containing(pool, subscriber, addr, port)
                });
                // The address promised by a delete's answer, if any was.
                let promised = (self.compiled.config.compatibility.delete_answer
                    == DeleteAnswer::External)
                    .then(|| self.pools.pools[pool].preferred_address(subscriber))
                    .flatten();
                let on_promised = || {
                    let a = promised?;
                    self.pools.allocate_block(pool, subscriber, Some(a)).ok()
                };
                let block = old
                    .or_else(on_promised)
                    .map_or_else(|| self.pools.allocate_block(pool, subscriber, None), Ok);
                match block {
                    Ok(b) => b,
                    Err(_) => return Err(self.pool_exhausted(now, pool)),
                }
            }
        };
        self.add_block(now, subscriber, block);
        Ok(())
    }

    /// The subscriber's external address: the one its blocks are on, else
    /// the one its first block will be on (deterministic pools: computed;
    /// dynamic ones: its preferred address, which `ensure_blocks` takes
    /// while it has a free block). Unspecified for a non-subscriber.
    pub(super) fn promised_address(&self, subscriber: IpAddr) -> Ipv4Addr {
        let ext = self.subscriber_address(subscriber);
        if !ext.is_unspecified() {
            return ext;
        }
        let Some((class, det_index)) = self.compiled.class_of(subscriber) else {
            return Ipv4Addr::UNSPECIFIED;
        };
        let Some(pool) = self.pool(self.compiled.class_pool[usize::from(class)]) else {
            return Ipv4Addr::UNSPECIFIED;
        };
        let addr = match pool.mode {
            PoolMode::Deterministic => deterministic_block(pool, det_index).map(|b| b.addr),
            PoolMode::Dynamic => pool.preferred_address(subscriber),
        };
        addr.unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    fn add_block(&mut self, now: Millis, subscriber: IpAddr, block: Block) {
        if let Some(sub) = self.subscribers.get_mut(&subscriber) {
            sub.ext = Some(block.addr);
            sub.blocks.push((block, now));
        }
        self.unsettled.push(subscriber);
        self.events
            .push_back(Event::BlockAllocated { subscriber, block });
    }

    /// One more dynamic block on the subscriber's address (paired pooling),
    /// within its `max_blocks`.
    fn grow_blocks(&mut self, now: Millis, subscriber: IpAddr) -> Result<(), Refusal> {
        let Some(sub) = self.subscribers.get(&subscriber) else {
            return Err(ResultCode::NotAuthorized.into());
        };
        let pool = usize::from(sub.pool);
        let max_blocks = self.compiled.class_profile[usize::from(sub.class)].max_blocks as usize;
        if self
            .pool(sub.pool)
            .is_none_or(|p| p.mode == PoolMode::Deterministic)
            || sub.blocks.len() >= max_blocks
        {
            return Err(self.quota_refusal(now, subscriber));
        }
        match self.pools.allocate_block(pool, subscriber, sub.ext) {
            Ok(block) => {
                self.add_block(now, subscriber, block);
                Ok(())
            }
            Err(BlockError::AddressFull) | Err(BlockError::PoolExhausted) => {
                Err(self.pool_exhausted(now, pool))
            }
        }
    }

    /// Whether `port` may go to `who` (internal address, port, nonce) now.
    fn port_free(&self, now: Millis, port: ExternalEndpoint, who: (IpAddr, u16, Nonce)) -> bool {
        // §11.3: never map external UDP 5350 or 5351.
        if port.protocol == 17 && (port.port == 5350 || port.port == 5351) {
            return false;
        }
        if self.table.port_in_use(&port) {
            return false;
        }
        match self.reuse.ports.get(&port) {
            // §15: within the reuse delay only the same client (internal
            // address, port and nonce) may reclaim the port.
            Some(c) if c.until > now => (c.internal, c.internal_port, c.nonce) == who,
            _ => true,
        }
    }

    /// Whether `n` ports from `first` lie in one of the blocks and are free
    /// for the asking mapping.
    fn run_free(&self, now: Millis, ask: &PortAsk, held: &Held<'_>, first: u16, n: u16) -> bool {
        let (addr, blocks) = (held.addr, held.blocks);
        blocks.iter().any(|b| {
            b.contains(first) && u32::from(first) + u32::from(n) - 1 <= u32::from(b.last())
        }) && (0..n).all(|i| {
            // §15 "same client" is per port: the internal port this
            // external port will forward to.
            let who = (
                ask.internal.addr,
                ask.internal.port.wrapping_add(i),
                ask.nonce,
            );
            let port = ExternalEndpoint {
                addr,
                protocol: ask.internal.protocol,
                port: first + i,
            };
            self.port_free(now, port, who)
        })
    }

    /// Picks up to `ask.count` contiguous external ports inside the
    /// subscriber's port set: the suggestion if it can be honored, else a
    /// random free run. Returns (addr, first port, count).
    pub(super) fn choose_ports(
        &mut self,
        now: Millis,
        ask: &PortAsk,
    ) -> Result<(Ipv4Addr, u16, u16), Refusal> {
        let subscriber = ask.internal.addr;
        if self.compiled.is_firewall(subscriber) {
            return self.pinhole(ask);
        }
        let wanted = match ask.suggested {
            (IpAddr::V4(addr), port) if !addr.is_unspecified() && port != 0 => Some((addr, port)),
            _ => None,
        };
        self.ensure_blocks(now, subscriber, wanted)?;
        loop {
            let addr = self.subscriber_address(subscriber);
            // A subscriber holds a block or two: no allocation per create.
            let blocks: smallvec::SmallVec<[Block; 4]> = self
                .subscribers
                .get(&subscriber)
                .map(|s| s.blocks.iter().map(|(b, _)| *b).collect())
                .unwrap_or_default();
            let held = Held {
                addr,
                blocks: &blocks,
            };
            // The suggestion (§11.3: honored when free and ours).
            let (s_addr, s_port) = ask.suggested;
            let addr_ok = s_addr.is_unspecified() || s_addr == IpAddr::V4(addr);
            if s_port != 0 && addr_ok && self.run_free(now, ask, &held, s_port, ask.count) {
                return Ok((addr, s_port, ask.count));
            }
            if ask.suggestion == Suggestion::Required {
                // §13.2 / §12.3: the suggestion cannot be provided.
                return Err(ResultCode::CannotProvideExternal.into());
            }
            if let Some((port, n)) = self.random_run(now, ask, &held) {
                return Ok((addr, port, n));
            }
            // The port set is full: another block on the same address.
            self.grow_blocks(now, subscriber)?;
        }
    }

    /// A random start, then a linear walk over the whole port set; RFC 7753
    /// §4.2: as many ports as possible, at least one.
    fn random_run(&mut self, now: Millis, ask: &PortAsk, held: &Held<'_>) -> Option<(u16, u16)> {
        let blocks = held.blocks;
        let parity = ask.parity.then_some(ask.internal.port & 1);
        let total: u32 = blocks.iter().map(|b| u32::from(b.len)).sum();
        let mut n = ask.count;
        while n >= 1 {
            let start = (self.next_random() % u64::from(total.max(1))) as u32;
            for k in 0..total {
                let Some(port) = nth_port(blocks, (start + k) % total) else {
                    continue;
                };
                if parity.is_some_and(|p| port & 1 != p) {
                    continue;
                }
                if self.run_free(now, ask, held, port, n) {
                    return Some((port, n));
                }
            }
            n /= 2;
        }
        None
    }

    /// The reuse delay of the subscriber's pool, in ms.
    pub(super) fn reuse_delay_ms(&self, subscriber: IpAddr) -> u64 {
        self.subscribers
            .get(&subscriber)
            .and_then(|s| self.pool(s.pool))
            .map_or(0, |p| p.reuse_delay_ms)
    }

    /// Starts a freed port's reuse delay (§15): for `delay` ms only the
    /// same client may have it back.
    pub(super) fn start_reuse_delay(
        &mut self,
        now: Millis,
        delay: u64,
        port: ReleasedPort,
        internal: IpAddr,
        nonce: Nonce,
    ) {
        if delay == 0 {
            return;
        }
        self.reuse.ports.insert(
            port.external,
            Cooling {
                until: now + delay,
                internal,
                internal_port: port.internal_port,
                nonce,
            },
        );
        self.timers.schedule(
            now + delay,
            Timer::Cool {
                port: port.external,
            },
        );
    }

    /// Ends a reuse delay that is over.
    pub(super) fn end_reuse_delay(&mut self, now: Millis, port: ExternalEndpoint) {
        // One search (an expiry storm ends a million of them).
        if let Entry::Occupied(c) = self.reuse.ports.entry(port) {
            if c.get().until <= now {
                c.remove();
            }
        }
    }
}

/// The `i`-th port of a port set made of `blocks`.
fn nth_port(blocks: &[Block], mut i: u32) -> Option<u16> {
    blocks.iter().find_map(|b| {
        if i < u32::from(b.len) {
            Some(b.first + i as u16)
        } else {
            i -= u32::from(b.len);
            None
        }
    })
}
