//! Subscriber records: class and pool, port blocks, the mappings held,
//! the request rate limiter's token bucket (RFC 6887 §8.2 allows
//! NO_RESOURCES), and the release of an idle subscriber's blocks.

use std::net::{IpAddr, Ipv4Addr};

use pcp_wire::ResultCode;
use smallvec::SmallVec;

use super::request::Refusal;
use super::timers::Timer;
use super::Engine;
use crate::alloc::Block;
use crate::config::{PoolMode, QuotaProfile};
use crate::types::{Event, Millis};

/// A token bucket in thousandths of a request.
#[derive(Debug)]
struct TokenBucket {
    tokens_milli: u64,
    refilled_ms: Millis,
}

impl TokenBucket {
    fn full(profile: &QuotaProfile, now: Millis) -> Self {
        TokenBucket {
            tokens_milli: u64::from(profile.burst) * 1000,
            refilled_ms: now,
        }
    }

    /// Takes one token; `Err(ms)` says how long until one is back.
    fn take(&mut self, profile: &QuotaProfile, now: Millis) -> Result<(), u64> {
        let elapsed = now.saturating_sub(self.refilled_ms);
        let cap = u64::from(profile.burst) * 1000;
        self.tokens_milli =
            (self.tokens_milli + elapsed * u64::from(profile.rate_per_sec)).min(cap);
        self.refilled_ms = now;
        if self.tokens_milli >= 1000 {
            self.tokens_milli -= 1000;
            return Ok(());
        }
        Err((1000 - self.tokens_milli).div_ceil(u64::from(profile.rate_per_sec).max(1)))
    }
}

#[derive(Debug)]
pub(super) struct Subscriber {
    /// The subscriber's internal address: the key it is found by.
    pub(super) addr: IpAddr,
    pub(super) class: u16,
    pub(super) pool: u16,
    /// Index within its class, for deterministic pools.
    pub(super) det_index: u64,
    /// The external address of every block (paired pooling).
    pub(super) ext: Option<Ipv4Addr>,
    /// Blocks held, with since when. Most subscribers hold one block and a
    /// few mappings: both lists sit inline in the record (no allocation of
    /// their own) until they outgrow it, at the size of an empty `Vec`.
    pub(super) blocks: SmallVec<[(Block, Millis); 1]>,
    /// Ports held by mappings that count against the quota.
    pub(super) quota_used: u32,
    /// Slots of the subscriber's mappings.
    pub(super) slots: SmallVec<[u32; 4]>,
    bucket: TokenBucket,
    idle_since: Option<Millis>,
}

// One record per subscriber: at a million subscribers each byte here is
// a megabyte of the daemon's memory.
const _: () = assert!(std::mem::size_of::<Subscriber>() <= 120);

impl crate::keyed::Keyed for Subscriber {
    type Key = IpAddr;
    fn key(&self) -> IpAddr {
        self.addr
    }
}

impl Engine {
    /// The subscriber's record, made on first use (with a full bucket). A
    /// record that ends a request with no block and no mapping is dropped
    /// again ([`Engine::forget_if_stateless`]), so a flood from many
    /// sources leaves nothing behind.
    pub(super) fn subscriber_entry(
        &mut self,
        now: Millis,
        addr: IpAddr,
    ) -> Option<&mut Subscriber> {
        let compiled = &self.compiled;
        // One search: at a million subscribers each is a cache miss.
        self.subscribers.get_or_make(&addr, || {
            let (class, det_index) = compiled.class_of(addr)?;
            let profile = compiled.class_profile[usize::from(class)];
            Some(Subscriber {
                addr,
                class,
                pool: compiled.class_pool[usize::from(class)],
                det_index,
                ext: None,
                blocks: SmallVec::new(),
                quota_used: 0,
                slots: SmallVec::new(),
                bucket: TokenBucket::full(&profile, now),
                idle_since: Some(now),
            })
        })
    }

    /// Drops the record of a subscriber that holds nothing (no block, no
    /// mapping): its token bucket goes with it. Requests that change no
    /// state are therefore not rate-limited per subscriber; they cost CPU
    /// only, and a flood of them from any number of sources keeps memory
    /// flat.
    pub(super) fn forget_if_stateless(&mut self, subscriber: IpAddr) {
        if self
            .subscribers
            .get(&subscriber)
            .is_some_and(|s| s.blocks.is_empty() && s.slots.is_empty())
        {
            self.subscribers.remove(&subscriber);
        }
    }

    /// Arms the idle release of a subscriber that holds blocks but no
    /// mapping.
    pub(super) fn arm_idle(&mut self, now: Millis, subscriber: IpAddr) {
        let Some(class) = self
            .subscribers
            .get(&subscriber)
            .filter(|s| s.slots.is_empty())
            .map(|s| s.class)
        else {
            return;
        };
        let hold = self.idle_hold_ms(class);
        self.timers.schedule(now + hold, Timer::Idle { subscriber });
    }

    /// Starts the idle hold of each subscriber given a block since the last
    /// call that holds no mapping now.
    pub(super) fn start_idle_holds(&mut self, now: Millis) {
        if self.unsettled.is_empty() {
            return; // nearly every request: no block was taken
        }
        let mut unsettled = std::mem::take(&mut self.unsettled);
        for subscriber in unsettled.drain(..) {
            self.arm_idle(now, subscriber);
        }
        self.unsettled = unsettled;
    }

    /// The subscriber's external address (unspecified before its first block).
    pub(super) fn subscriber_address(&self, subscriber: IpAddr) -> Ipv4Addr {
        self.subscribers
            .get(&subscriber)
            .and_then(|s| s.ext)
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// Pool `index`; `None` for a class without one (a firewall class).
    pub(super) fn pool(&self, index: u16) -> Option<&crate::alloc::Pool> {
        self.pools.pools.get(usize::from(index))
    }

    /// Slots of the subscriber's mappings (a copy: callers remove).
    pub(super) fn slots_of(&self, subscriber: IpAddr) -> Vec<u32> {
        self.subscribers
            .get(&subscriber)
            .map(|s| s.slots.to_vec())
            .unwrap_or_default()
    }

    fn idle_hold_ms(&self, class: u16) -> u64 {
        self.pool(self.compiled.class_pool[usize::from(class)])
            .map_or(1000, |p| p.block_hold_ms.max(1000))
    }

    /// Token bucket per subscriber; when empty, RFC 6887 §8.2 lets the server
    /// answer NO_RESOURCES (the lifetime says when a token is back).
    pub(super) fn rate_limit(&mut self, now: Millis, subscriber: IpAddr) -> Result<(), Refusal> {
        let cfg = std::sync::Arc::clone(&self.compiled);
        let Some(sub) = self.subscriber_entry(now, subscriber) else {
            return Err(ResultCode::NotAuthorized.into());
        };
        let profile = cfg.class_profile[usize::from(sub.class)];
        let Err(wait_ms) = sub.bucket.take(&profile, now) else {
            return Ok(());
        };
        self.stats.rate_limited += 1;
        Err(Refusal {
            code: ResultCode::NoResources,
            lifetime: Some(wait_ms.div_ceil(1000).max(1) as u32),
        })
    }

    /// A mapping in `slot` now belongs to `subscriber`; `counted` ports
    /// count against its quota.
    pub(super) fn link(&mut self, subscriber: IpAddr, slot: u32, counted: Option<u32>) {
        if let Some(s) = self.subscribers.get_mut(&subscriber) {
            s.quota_used += counted.unwrap_or(0);
            s.slots.push(slot);
            s.idle_since = None;
        }
    }

    /// The mapping in `slot` left `subscriber`; with no mapping left, the
    /// subscriber starts its idle hold.
    pub(super) fn unlink(
        &mut self,
        now: Millis,
        subscriber: IpAddr,
        slot: u32,
        counted: Option<u32>,
    ) {
        if let Some(s) = self.subscribers.get_mut(&subscriber) {
            s.quota_used = s.quota_used.saturating_sub(counted.unwrap_or(0));
            s.slots.retain(|x| *x != slot);
            if s.slots.is_empty() {
                s.idle_since = Some(now);
            }
        }
        self.arm_idle(now, subscriber);
    }

    /// Forgets a subscriber idle for its pool's hold time, giving its blocks
    /// back (dynamic pools) and recording who held them.
    pub(super) fn release_if_idle(&mut self, now: Millis, subscriber: IpAddr) {
        let Some(sub) = self.subscribers.get(&subscriber) else {
            return;
        };
        let hold = self.idle_hold_ms(sub.class);
        if sub.idle_since.is_none_or(|since| since + hold > now) {
            return;
        }
        let Some(sub) = self.subscribers.remove(&subscriber) else {
            return;
        };
        self.release_blocks(now, subscriber, usize::from(sub.pool), &sub.blocks);
    }

    /// Gives `blocks` back to pool `pool` (dynamic pools keep history), and
    /// reports each release.
    pub(super) fn release_blocks(
        &mut self,
        now: Millis,
        subscriber: IpAddr,
        pool: usize,
        blocks: &[(Block, Millis)],
    ) {
        let dynamic = self
            .pools
            .pools
            .get(pool)
            .is_some_and(|p| p.mode == PoolMode::Dynamic);
        for &(block, since) in blocks {
            if dynamic {
                self.pools.release_block(pool, block);
                self.history
                    .record(&self.compiled.config, now, subscriber, block, since);
            }
            self.events.push_back(Event::BlockReleased {
                subscriber,
                block,
                since,
            });
        }
    }
}
