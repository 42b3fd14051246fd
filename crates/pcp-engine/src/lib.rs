//! # pcp-engine: the PCP protocol as a sans-IO state machine
//!
//! One [`Engine`] is one shard: it owns a set of subscribers (chosen by
//! [`shard_of`] over the subscriber's internal address) and answers their
//! PCP (RFC 6887) and NAT-PMP (RFC 6886) requests: MAP, PEER, ANNOUNCE and
//! every option, epochs, nonces, lifetimes, quotas, THIRD_PARTY policy and
//! the unsolicited messages of §14.
//!
//! ```text
//!  (now, src, datagram) ──handle──▶ reply bytes (or drop)
//!                              └──▶ poll_event(): MappingCreated/Renewed/Deleted/Moved,
//!                                   BlockAllocated/Released, QuotaExceeded, PoolExhausted
//!  poll_timeout() ─▶ handle_timeout(now) ─▶ expiries, reuse delays, poll_transmit()
//! ```
//!
//! External ports come from port sets over CGNAT pools ([`alloc`]): dynamic
//! port blocks (paired pooling) or deterministic ranges (RFC 7422). The only
//! state shards share is the block allocator ([`BlockAllocator`]).
//!
//! What it does not do: sockets, clocks, randomness of its own (the caller
//! seeds it), metrics registries, durable storage or the dataplane. Those
//! are the daemon's; it applies the events.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod alloc;
mod compat;
mod compiled;
pub mod config;
mod engine;
pub mod keyed;
mod kind_v4;
pub mod types;
mod validate;

pub use alloc::{Block, BlockAllocator, PoolUsage};
pub use compiled::Compiled;
pub use config::{ConfigProblem, EngineConfig};
pub use engine::{
    shard_of, subscriber_key, Engine, Forgotten, StateCursor, StateItem, TIMER_BUDGET,
};
pub use kind_v4::KindV4;
pub use types::*;
