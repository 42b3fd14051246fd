//! Handing a set of subscribers to another node (pcpd's cluster mode,
//! docs/architecture.md "Cluster"): their state leaves this engine without
//! an event (it is not deleted, it is now someone else's), and the
//! epoch base is the cluster's, so the epoch continues across nodes
//! (RFC 6887 §8.5).

use std::net::IpAddr;

use super::Engine;
use crate::alloc::Block;
use crate::config::PoolMode;
use crate::types::{Mapping, Millis};

/// What [`Engine::forget_subscribers`] removed, for the dataplane.
#[derive(Debug, Default)]
pub struct Forgotten {
    /// The mappings.
    pub mappings: Vec<Mapping>,
    /// The blocks, with their subscriber.
    pub blocks: Vec<(IpAddr, Block)>,
}

impl Engine {
    /// Sets when the epoch began (RFC 6887 §8.5): in cluster mode, the
    /// cluster's epoch base, shared by every node.
    pub fn set_epoch_start(&mut self, epoch_start_ms: Millis) {
        self.epoch_start_ms = epoch_start_ms;
    }

    /// Removes every subscriber `owned` says yes to, with its mappings and
    /// blocks, emitting no event and starting no reuse delay: the state
    /// was handed over, not ended. Blocks of dynamic pools go back to this
    /// node's allocator (the partition's new owner allocates them now).
    pub fn forget_subscribers(&mut self, owned: impl Fn(IpAddr) -> bool) -> Forgotten {
        let mut out = Forgotten::default();
        let leaving: Vec<IpAddr> = self
            .subscribers
            .iter()
            .map(|s| s.addr)
            .filter(|a| owned(*a))
            .collect();
        for subscriber in leaving {
            let Some(sub) = self.subscribers.remove(&subscriber) else {
                continue;
            };
            for slot in sub.slots {
                if let Some((m, _)) = self.table.detach(slot) {
                    out.mappings.push(m);
                }
            }
            let dynamic = self
                .pool(sub.pool)
                .is_some_and(|p| p.mode == PoolMode::Dynamic);
            for (block, _) in sub.blocks {
                if dynamic {
                    self.pools.release_block(usize::from(sub.pool), block);
                }
                out.blocks.push((subscriber, block));
            }
        }
        out
    }
}
