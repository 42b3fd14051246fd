//! One engine shard: the RFC 6887 / RFC 6886 state machine for the
//! subscribers this shard owns.
//!
//! `impl Engine` is spread over the files of this folder; each file is the
//! answer to "where is this rule?":
//!
//! | file | what lives there |
//! |---|---|
//! | `request.rs` | datagram dispatch, §7.3 option processing, §13.1 THIRD_PARTY policy, error and success answers |
//! | `map.rs` | MAP (§11.3): create, PREFER_FAILURE, PORT_SET, FILTER |
//! | `peer.rs` | PEER (§12.3) |
//! | `lifetime.rs` | what MAP and PEER share: nonce check, renewal, delete (§15) |
//! | `natpmp.rs` | NAT-PMP (RFC 6886) |
//! | `subscriber.rs` | subscriber records, the rate limiter's token bucket, idle release |
//! | `ports.rs` | quota, port blocks, port choice, the reuse delay (§15) |
//! | `table.rs` | [`MappingTable`](table::MappingTable): slots and every index |
//! | `packed.rs` | a mapping as its slot keeps it (72 bytes for IPv4) |
//! | `timers.rs` | the timer wheel |
//! | `unsolicited.rs` | the §14 outbox: restart ANNOUNCE, mapping updates |
//! | `drain.rs` | moving subscribers off a drained address (§14.2) |
//! | `firewall.rs` | firewall classes: identity mappings, pinholes (§3) |
//! | `operator.rs` | static mappings, deletes and take-backs |
//! | `restore.rs` | state recovery after a restart |
//! | `slices.rs` | the state read in slices, for a snapshot that does not stall the shard |
//! | `queries.rs` | read-only answers for the admin API |
//! | `history.rs` | who held which block until when |

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

use pcp_wire::{parse_request, Message, PcpOption};

use crate::alloc::BlockAllocator;
use crate::compiled::Compiled;
use crate::types::{Event, Millis, Stats, Transmit};

mod drain;
mod firewall;
mod history;
mod lifetime;
mod map;
mod natpmp;
mod operator;
mod packed;
mod partition;
mod peer;
mod portmap;
mod ports;
mod queries;
mod request;
mod restore;
mod slices;
mod subscriber;
mod table;
mod timers;
mod unsolicited;

use history::History;
pub use partition::Forgotten;
use ports::ReuseDelay;
pub use slices::{StateCursor, StateItem};
use subscriber::Subscriber;
use table::MappingTable;
use timers::TimerWheel;
pub use timers::TIMER_BUDGET;
use unsolicited::Outbox;

/// Which shard owns a subscriber: a pure function of its internal address,
/// the last 32 bits of the address modulo the shard count. The daemon's
/// reuseport BPF program computes the same in the kernel, so datagrams land
/// on their owner's socket. A subscriber cannot choose its address, so it
/// cannot crowd another shard.
pub fn shard_of(subscriber: IpAddr, shards: usize) -> usize {
    let low = match subscriber.to_canonical() {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(a) => (u128::from(a) & 0xffff_ffff) as u32,
    };
    (low % shards.max(1) as u32) as usize
}

/// The subscriber a datagram acts for: the THIRD_PARTY address if the
/// request carries one (RFC 6887 §13.1), else the source address. Used by
/// the I/O layer to pick the owning shard before handing the datagram over.
pub fn subscriber_key(datagram: &[u8], src: IpAddr) -> IpAddr {
    if let Ok(Message::Pcp(req)) = parse_request(datagram) {
        for opt in req.options.iter() {
            if let PcpOption::ThirdParty(addr) = opt {
                return addr;
            }
        }
    }
    src.to_canonical()
}

/// One shard of the PCP engine.
///
/// The method families, and the order to call them in:
///
/// 1. **Input**: [`Engine::handle`] answers one datagram into a buffer (or
///    returns `None` to drop it). Operator actions ([`Engine::create_static`],
///    [`Engine::delete`], [`Engine::drain`]) change state the same way.
/// 2. **Effects**: after input, drain [`Engine::poll_event`] and apply the
///    events (journal first, then dataplane) *before* sending the answer; a
///    mapping the dataplane refused goes back with [`Engine::revoke`].
/// 3. **Time**: sleep until [`Engine::poll_timeout`], call
///    [`Engine::handle_timeout`], apply its events, then send what
///    [`Engine::poll_transmit`] gives (§14 unsolicited messages).
/// 4. **Start**: [`Engine::restore_block`], [`Engine::restore_mapping`] and
///    [`Engine::restore_history`] before the first datagram; then
///    [`Engine::announce_restart`] if state was lost.
/// 5. **Queries** (`queries.rs`) read without changing anything.
pub struct Engine {
    // What the shard answers by.
    compiled: Arc<Compiled>,
    pools: Arc<BlockAllocator>,
    /// When the epoch began (RFC 6887 §8.5).
    epoch_start_ms: Millis,
    /// SplitMix64 state for port randomization (RFC 6888 REQ-13..15).
    rng: u64,

    // What the shard holds.
    table: MappingTable,
    /// Subscriber records, dense: at a million subscribers they are the
    /// shard's largest table.
    subscribers: crate::keyed::KeyedTable<Subscriber>,
    reuse: ReuseDelay,
    history: History,

    // What is due later.
    timers: TimerWheel,
    /// Subscribers given a block since the last [`Engine::start_idle_holds`]: those
    /// that still hold no mapping then start their idle hold. Arming it
    /// at the block would cost a timer per subscriber, when nearly every
    /// block is taken for the mapping made right after it.
    unsettled: Vec<IpAddr>,
    outbox: Outbox,

    // What the caller drains.
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
    /// Lifetimes beyond the granted one that a mapping's stored expiry
    /// reaches (see [`Engine::set_renewal_slack`]).
    renewal_slack: u32,
}

impl Engine {
    /// A shard. `epoch_start_ms` is when the epoch began (now, after state
    /// loss; the recovered value otherwise, RFC 6887 §8.5). `seed` feeds the
    /// port randomizer (RFC 6888 REQ-13..15); give each shard its own.
    pub fn new(
        compiled: Arc<Compiled>,
        pools: Arc<BlockAllocator>,
        shard: u16,
        epoch_start_ms: Millis,
        seed: u64,
    ) -> Self {
        Engine {
            compiled,
            pools,
            epoch_start_ms,
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            table: MappingTable::new(shard),
            subscribers: Default::default(),
            reuse: ReuseDelay::default(),
            history: History::default(),
            timers: TimerWheel::default(),
            unsettled: Vec::new(),
            outbox: Outbox::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            renewal_slack: 0,
        }
    }

    /// Makes the durable store hold each mapping `slack` lifetimes beyond
    /// the one granted (`Mapping::durable_ms`), so that a renewal that
    /// moves nothing but the expiry, within that, is reported as
    /// [`Event::MappingRefreshed`] and costs the store no write. No client
    /// is ever told an expiry later than the stored one; after a crash a
    /// mapping lives until its stored expiry. 0 (the default): every
    /// renewal is written.
    pub fn set_renewal_slack(&mut self, slack: u32) {
        self.renewal_slack = slack;
    }

    /// The expiry to store for a mapping granted until `expires` now.
    fn durable_for(&self, now: Millis, expires: Millis) -> Millis {
        if expires == Millis::MAX {
            return expires;
        }
        let lifetime = expires.saturating_sub(now);
        expires.saturating_add(lifetime.saturating_mul(u64::from(self.renewal_slack)))
    }

    /// The epoch time to put in responses (RFC 6887 §8.5).
    pub fn epoch(&self, now: Millis) -> u32 {
        (now.saturating_sub(self.epoch_start_ms) / 1000) as u32
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Live mappings in this shard.
    pub fn mapping_count(&self) -> usize {
        self.table.len()
    }

    /// The compiled configuration.
    pub fn compiled(&self) -> &Arc<Compiled> {
        &self.compiled
    }

    /// Swaps in a new configuration (reload). The caller guarantees pools
    /// and subscriber classes are unchanged, so every live mapping and block
    /// stays valid; lifetimes, quotas, THIRD_PARTY and options take effect
    /// for the next request.
    pub fn reconfigure(&mut self, compiled: Arc<Compiled>) {
        self.compiled = compiled;
    }

    /// Drains the effects of the last calls, in order.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Drains the unsolicited datagrams that are due.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Whether unsolicited datagrams are due.
    pub fn has_transmit(&self) -> bool {
        !self.transmits.is_empty()
    }

    fn next_random(&mut self) -> u64 {
        // SplitMix64: seeded by the caller; the engine has no entropy source.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
