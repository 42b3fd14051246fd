//! External address pools and port sets.
//!
//! * `dynamic` pools hand out port blocks on first need (port-block
//!   allocation). All of a subscriber's blocks sit on one external address
//!   (paired pooling, RFC 6888 REQ-2). Blocks are the only thing shards share:
//!   a mutex per pool guards the free lists (the rare path), and a [`DashMap`]
//!   records which subscriber owns each block, by external address, so any
//!   thread can answer "who holds external address:port".
//! * `deterministic` pools (RFC 7422) compute a subscriber's address and port
//!   range from its internal address; nothing is shared or logged.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use dashmap::DashMap;

use crate::config::{EngineConfig, PoolConfig, PoolMode, PortRange};

/// A contiguous run of external ports on one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Block {
    /// External address.
    pub addr: Ipv4Addr,
    /// First port.
    pub first: u16,
    /// Number of ports.
    pub len: u16,
}

impl Block {
    /// Last port of the block.
    pub fn last(&self) -> u16 {
        self.first + (self.len - 1)
    }

    /// Whether `port` lies in the block.
    pub fn contains(&self, port: u16) -> bool {
        port >= self.first && port <= self.last()
    }
}

/// A pool compiled from its configuration.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) name: String,
    pub(crate) mode: PoolMode,
    pub(crate) ports: PortRange,
    pub(crate) block_size: u16,
    pub(crate) blocks_per_addr: u32,
    pub(crate) reuse_delay_ms: u64,
    pub(crate) block_hold_ms: u64,
    prefixes: Vec<ipnet::Ipv4Net>,
    address_count: u64,
}

impl Pool {
    fn new(name: &str, cfg: &PoolConfig) -> Self {
        Pool {
            name: name.to_string(),
            mode: cfg.mode,
            ports: cfg.ports,
            block_size: cfg.block_size,
            blocks_per_addr: cfg.ports.len() / u32::from(cfg.block_size),
            reuse_delay_ms: u64::from(cfg.reuse_delay_secs) * 1000,
            block_hold_ms: u64::from(cfg.block_hold_secs) * 1000,
            prefixes: cfg.prefixes.clone(),
            address_count: cfg.address_count(),
        }
    }

    /// The `i`-th external address of the pool.
    pub(crate) fn address(&self, mut i: u64) -> Option<Ipv4Addr> {
        for net in &self.prefixes {
            let size = 1u64 << (32 - u32::from(net.prefix_len()));
            if i < size {
                return Some(Ipv4Addr::from(u32::from(net.network()) + i as u32));
            }
            i -= size;
        }
        None
    }

    /// The index of an external address in the pool.
    /// The address a subscriber is told it will get before it has a block
    /// (`compatibility.delete_answer: external`): a fixed function of its
    /// internal address, so nothing is stored and every shard and node
    /// agrees.
    pub(crate) fn preferred_address(&self, who: IpAddr) -> Option<Ipv4Addr> {
        let key = match who {
            IpAddr::V4(a) => u64::from(u32::from(a)),
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                (bits >> 64) as u64 ^ bits as u64
            }
        };
        // Fibonacci hashing spreads neighbouring subscribers evenly.
        let spread = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let index = ((u128::from(spread) * u128::from(self.address_count)) >> 64) as u64;
        self.address(index)
    }

    pub(crate) fn address_index(&self, addr: Ipv4Addr) -> Option<u64> {
        let mut base = 0u64;
        for net in &self.prefixes {
            if net.contains(&addr) {
                return Some(base + u64::from(u32::from(addr) - u32::from(net.network())));
            }
            base += 1u64 << (32 - u32::from(net.prefix_len()));
        }
        None
    }

    /// The block with index `b` on address `addr`.
    pub(crate) fn block(&self, addr: Ipv4Addr, b: u32) -> Block {
        Block {
            addr,
            first: self.ports.first + (b * u32::from(self.block_size)) as u16,
            len: self.block_size,
        }
    }

    /// The block index of a port, if the port is in the pool's block area.
    pub(crate) fn block_index(&self, port: u16) -> Option<u32> {
        if port < self.ports.first {
            return None;
        }
        let b = u32::from(port - self.ports.first) / u32::from(self.block_size);
        (b < self.blocks_per_addr).then_some(b)
    }

    /// Total ports in the pool's block area.
    pub(crate) fn total_ports(&self) -> u64 {
        self.address_count * u64::from(self.blocks_per_addr) * u64::from(self.block_size)
    }

    /// Total blocks in the pool.
    pub(crate) fn total_blocks(&self) -> u64 {
        self.address_count * u64::from(self.blocks_per_addr)
    }
}

#[derive(Debug, Default)]
struct AddrState {
    /// Blocks never handed out are `next_fresh..blocks_per_addr`.
    next_fresh: u32,
    /// Blocks handed back.
    released: Vec<u32>,
    draining: bool,
}

#[derive(Debug, Default)]
struct DynState {
    addrs: Vec<AddrState>,
    cursor: usize,
    allocated: u64,
}

/// Why a block could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockError {
    /// The pool has no free block on any usable address (NO_RESOURCES).
    PoolExhausted,
    /// The subscriber's address has no free block left (paired pooling).
    AddressFull,
}

/// The block allocator, the only state shards share: the dynamic pools'
/// free lists (a mutex per pool; only block allocation and release take
/// it) and the block ownership table, which answers "who holds external
/// address:port now" from any thread without asking the shards.
#[derive(Debug)]
pub struct BlockAllocator {
    pub(crate) pools: Vec<Pool>,
    dynamic: Vec<Mutex<DynState>>,
    /// Holders of each address's blocks, sorted by first port: ~20 bytes
    /// a block, where a map entry per block cost ~56 at a million blocks.
    owners: DashMap<Ipv4Addr, Vec<(u16, IpAddr)>>,
}

impl BlockAllocator {
    /// Builds the shared pool state for a validated configuration.
    pub fn new(cfg: &EngineConfig) -> Self {
        let pools: Vec<Pool> = cfg.pools.iter().map(|(n, p)| Pool::new(n, p)).collect();
        let dynamic = pools
            .iter()
            .map(|p| {
                let n = if p.mode == PoolMode::Dynamic {
                    p.address_count as usize
                } else {
                    0
                };
                Mutex::new(DynState {
                    addrs: (0..n).map(|_| AddrState::default()).collect(),
                    cursor: 0,
                    allocated: 0,
                })
            })
            .collect();
        BlockAllocator {
            pools,
            dynamic,
            owners: DashMap::new(),
        }
    }

    pub(crate) fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    fn lock(&self, pool: usize) -> std::sync::MutexGuard<'_, DynState> {
        // A poisoned lock only means another shard panicked mid-update; the
        // free lists are still consistent (every update is a single push/pop).
        self.dynamic[pool]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Allocates one block for `owner`: on `addr` if given (paired pooling),
    /// else on the next address with a free block, round robin.
    pub(crate) fn allocate_block(
        &self,
        pool: usize,
        owner: IpAddr,
        addr: Option<Ipv4Addr>,
    ) -> Result<Block, BlockError> {
        let p = &self.pools[pool];
        let mut st = self.lock(pool);
        let take = |a: &mut AddrState| -> Option<u32> {
            if a.draining {
                return None;
            }
            if let Some(b) = a.released.pop() {
                return Some(b);
            }
            (a.next_fresh < p.blocks_per_addr).then(|| {
                a.next_fresh += 1;
                a.next_fresh - 1
            })
        };
        let (ai, b) = match addr {
            Some(addr) => {
                let ai = p.address_index(addr).ok_or(BlockError::AddressFull)? as usize;
                let b = take(&mut st.addrs[ai]).ok_or(BlockError::AddressFull)?;
                (ai, b)
            }
            None => {
                let n = st.addrs.len();
                let start = st.cursor;
                let mut found = None;
                for k in 0..n {
                    let ai = (start + k) % n;
                    if let Some(b) = take(&mut st.addrs[ai]) {
                        found = Some((ai, b));
                        break;
                    }
                }
                let (ai, b) = found.ok_or(BlockError::PoolExhausted)?;
                st.cursor = (ai + 1) % n;
                (ai, b)
            }
        };
        st.allocated += 1;
        let block = p.block(p.address(ai as u64).unwrap_or(Ipv4Addr::UNSPECIFIED), b);
        self.own(block, owner);
        Ok(block)
    }

    /// Notes that `block` is `owner`'s.
    fn own(&self, block: Block, owner: IpAddr) {
        let mut holders = self.owners.entry(block.addr).or_default();
        match holders.binary_search_by_key(&block.first, |&(f, _)| f) {
            Ok(at) => holders[at].1 = owner,
            Err(at) => holders.insert(at, (block.first, owner)),
        }
    }

    /// Notes that `block` is held no more.
    fn disown(&self, block: Block) {
        let emptied = self.owners.get_mut(&block.addr).is_some_and(|mut holders| {
            if let Ok(at) = holders.binary_search_by_key(&block.first, |&(f, _)| f) {
                holders.remove(at);
            }
            holders.is_empty()
        });
        if emptied {
            self.owners
                .remove_if(&block.addr, |_, holders| holders.is_empty());
        }
    }

    /// Returns a block to its pool.
    pub(crate) fn release_block(&self, pool: usize, block: Block) {
        let p = &self.pools[pool];
        let (Some(ai), Some(b)) = (p.address_index(block.addr), p.block_index(block.first)) else {
            return;
        };
        self.disown(block);
        let mut st = self.lock(pool);
        st.addrs[ai as usize].released.push(b);
        st.allocated = st.allocated.saturating_sub(1);
    }

    /// Takes a specific block for `owner` (state recovery). False when the
    /// block is not in the pool's block area or is already held.
    pub(crate) fn claim_block(&self, pool: usize, owner: IpAddr, block: Block) -> bool {
        let p = &self.pools[pool];
        let (Some(ai), Some(b)) = (p.address_index(block.addr), p.block_index(block.first)) else {
            return false;
        };
        if p.block(block.addr, b) != block {
            return false;
        }
        let mut st = self.lock(pool);
        let a = &mut st.addrs[ai as usize];
        if b >= a.next_fresh {
            // Blocks skipped over stay free.
            a.released.extend(a.next_fresh..b);
            a.next_fresh = b + 1;
        } else if let Some(pos) = a.released.iter().position(|x| *x == b) {
            a.released.swap_remove(pos);
        } else {
            return false;
        }
        st.allocated += 1;
        drop(st);
        self.own(block, owner);
        true
    }

    /// Takes the free block that holds `addr:port` for `owner`, unless the
    /// address is draining: a client back after the server lost its state
    /// suggests its old endpoint (RFC 6887 §11.2.1, §16.3.1).
    pub(crate) fn claim_containing(
        &self,
        pool: usize,
        owner: IpAddr,
        addr: Ipv4Addr,
        port: u16,
    ) -> Option<Block> {
        let p = &self.pools[pool];
        let ai = p.address_index(addr)?;
        let block = p.block(addr, p.block_index(port)?);
        if self.lock(pool).addrs[ai as usize].draining {
            return None;
        }
        self.claim_block(pool, owner, block).then_some(block)
    }

    /// Stops (or resumes) handing out blocks on `addr`. Returns false when
    /// no dynamic pool holds the address.
    pub fn set_draining(&self, addr: Ipv4Addr, draining: bool) -> bool {
        for (i, p) in self.pools.iter().enumerate() {
            if p.mode != PoolMode::Dynamic {
                continue;
            }
            if let Some(ai) = p.address_index(addr) {
                self.lock(i).addrs[ai as usize].draining = draining;
                return true;
            }
        }
        false
    }

    /// Whether `addr` is being drained.
    pub fn is_draining(&self, addr: Ipv4Addr) -> bool {
        self.pools.iter().enumerate().any(|(i, p)| {
            p.mode == PoolMode::Dynamic
                && p.address_index(addr)
                    .is_some_and(|ai| self.lock(i).addrs[ai as usize].draining)
        })
    }

    /// The subscriber that owns the dynamic block holding `addr:port` now.
    pub fn block_owner(&self, addr: Ipv4Addr, port: u16) -> Option<IpAddr> {
        self.pools.iter().find_map(|p| {
            if p.mode != PoolMode::Dynamic || p.address_index(addr).is_none() {
                return None;
            }
            let b = p.block_index(port)?;
            let first = p.block(addr, b).first;
            let holders = self.owners.get(&addr)?;
            let at = holders.binary_search_by_key(&first, |&(f, _)| f).ok()?;
            Some(holders[at].1)
        })
    }

    /// The one external address of every pool, when there is exactly one:
    /// then it is true for every subscriber on the link (RFC 6886 §3.2.1).
    pub fn single_address(&self) -> Option<Ipv4Addr> {
        let total: u64 = self.pools.iter().map(|p| p.address_count).sum();
        (total == 1)
            .then(|| self.pools.iter().find_map(|p| p.address(0)))
            .flatten()
    }

    /// Utilization of every pool.
    pub fn usage(&self) -> Vec<PoolUsage> {
        self.pools
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (allocated, draining) = match p.mode {
                    PoolMode::Dynamic => {
                        let st = self.lock(i);
                        (st.allocated, st.addrs.iter().filter(|a| a.draining).count())
                    }
                    // Deterministic pools are fully pre-assigned.
                    PoolMode::Deterministic => (p.total_blocks(), 0),
                };
                PoolUsage {
                    name: p.name.clone(),
                    mode: p.mode,
                    addresses: p.address_count,
                    blocks_total: p.total_blocks(),
                    blocks_allocated: allocated,
                    ports_total: p.total_ports(),
                    block_size: p.block_size,
                    draining_addresses: draining as u64,
                }
            })
            .collect()
    }
}

/// How much of a pool is in use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolUsage {
    /// Pool name.
    pub name: String,
    /// Allocation mode.
    pub mode: PoolMode,
    /// External addresses.
    pub addresses: u64,
    /// Blocks in the pool.
    pub blocks_total: u64,
    /// Blocks held by subscribers.
    pub blocks_allocated: u64,
    /// Ports in the pool's block area.
    pub ports_total: u64,
    /// Ports per block.
    pub block_size: u16,
    /// Addresses being drained.
    pub draining_addresses: u64,
}

/// RFC 7422 deterministic assignment: the subscriber with index `idx` in its
/// class gets address `idx / per_addr` and the `idx % per_addr`-th range.
pub(crate) fn deterministic_block(pool: &Pool, idx: u64) -> Option<Block> {
    let per_addr = u64::from(pool.blocks_per_addr);
    let addr = pool.address(idx / per_addr)?;
    Some(pool.block(addr, (idx % per_addr) as u32))
}

/// Inverse of [`deterministic_block`]: the subscriber index holding `addr:port`.
pub(crate) fn deterministic_index(pool: &Pool, addr: Ipv4Addr, port: u16) -> Option<u64> {
    let ai = pool.address_index(addr)?;
    let b = pool.block_index(port)?;
    Some(ai * u64::from(pool.blocks_per_addr) + u64::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_cfg(prefix: &str, mode: PoolMode, block: u16) -> EngineConfig {
        let mut cfg = EngineConfig::example();
        let p = cfg.pools.get_mut("default").unwrap();
        p.prefixes = vec![prefix.parse().unwrap()];
        p.mode = mode;
        p.block_size = block;
        p.ports = PortRange {
            first: 1024,
            last: 2047,
        };
        cfg
    }

    #[test]
    fn dynamic_blocks_are_disjoint_and_exhaust() {
        let shared = BlockAllocator::new(&pool_cfg("192.0.2.0/31", PoolMode::Dynamic, 256));
        let mut seen = std::collections::HashSet::new();
        for i in 0..8u8 {
            let owner = IpAddr::V4(Ipv4Addr::new(100, 64, 0, i));
            let b = shared.allocate_block(0, owner, None).unwrap();
            assert!(seen.insert((b.addr, b.first)), "block handed out twice");
            assert_eq!(shared.block_owner(b.addr, b.last()), Some(owner));
        }
        assert_eq!(
            shared.allocate_block(0, IpAddr::V4(Ipv4Addr::LOCALHOST), None),
            Err(BlockError::PoolExhausted)
        );
        let usage = &shared.usage()[0];
        assert_eq!((usage.blocks_allocated, usage.blocks_total), (8, 8));
        let b = Block {
            addr: Ipv4Addr::new(192, 0, 2, 1),
            first: 1280,
            len: 256,
        };
        shared.release_block(0, b);
        assert_eq!(shared.block_owner(b.addr, 1300), None);
        let again = shared
            .allocate_block(0, IpAddr::V4(Ipv4Addr::LOCALHOST), Some(b.addr))
            .unwrap();
        assert_eq!(again, b);
    }

    #[test]
    fn draining_address_gets_no_new_blocks() {
        let shared = BlockAllocator::new(&pool_cfg("192.0.2.0/31", PoolMode::Dynamic, 512));
        assert!(shared.set_draining(Ipv4Addr::new(192, 0, 2, 0), true));
        for _ in 0..2 {
            let b = shared
                .allocate_block(0, IpAddr::V4(Ipv4Addr::LOCALHOST), None)
                .unwrap();
            assert_eq!(b.addr, Ipv4Addr::new(192, 0, 2, 1));
        }
        assert!(shared.is_draining(Ipv4Addr::new(192, 0, 2, 0)));
        assert!(!shared.set_draining(Ipv4Addr::new(10, 0, 0, 1), true));
    }

    #[test]
    fn deterministic_is_a_bijection_rfc7422() {
        let shared = BlockAllocator::new(&pool_cfg("192.0.2.0/30", PoolMode::Deterministic, 128));
        let pool = &shared.pools[0];
        // 4 addresses x 8 ranges of 128 ports.
        let mut seen = std::collections::HashSet::new();
        for idx in 0..32 {
            let b = deterministic_block(pool, idx).unwrap();
            assert!(seen.insert((b.addr, b.first)));
            assert_eq!(deterministic_index(pool, b.addr, b.first + 5), Some(idx));
        }
        assert_eq!(deterministic_block(pool, 32), None);
    }
}
