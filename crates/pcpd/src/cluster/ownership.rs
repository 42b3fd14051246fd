//! What this node may answer for. The node task (`node.rs`) writes it; every
//! shard reads it for each request, lock-free.
//!
//! A partition is answered only while it is `Active` here **and** the
//! node's lease is certainly alive: `certain_until` is the send time of the
//! last acknowledged keep-alive plus the TTL etcd granted, minus the
//! configured margin. Past it, etcd may be about to hand the partition to
//! another node, so requests get NO_RESOURCES with the short error lifetime
//! (RFC 6887 §7.4) until a keep-alive succeeds again.

// Without the `cluster` feature only the gate reads it (and never finds one).
#![cfg_attr(not(feature = "cluster"), allow(dead_code))]

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};

use ipnet::IpNet;
use pcp_engine::Millis;

use super::config::ClusterConfig;

/// A partition's state on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PartState {
    /// Someone else's, or nobody's: requests are not answered here.
    NotOwned = 0,
    /// Claimed; its state is being read from etcd and installed.
    Loading = 1,
    /// Owned and loaded: answered.
    Active = 2,
    /// Being handed over: not answered; what is in flight settles.
    Releasing = 3,
    /// Lost (lease expired, or a fenced write was refused): not answered;
    /// the state in memory and the kernel entries stay until a new owner
    /// is seen (routing decides which kernel sees the traffic).
    Lost = 4,
}

impl PartState {
    fn from_u8(v: u8) -> PartState {
        match v {
            1 => PartState::Loading,
            2 => PartState::Active,
            3 => PartState::Releasing,
            4 => PartState::Lost,
            _ => PartState::NotOwned,
        }
    }

    /// The name shown by the admin API.
    pub fn name(self) -> &'static str {
        match self {
            PartState::NotOwned => "not_owned",
            PartState::Loading => "loading",
            PartState::Active => "active",
            PartState::Releasing => "releasing",
            PartState::Lost => "lost",
        }
    }
}

/// Whether a request may be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Answer it.
    Yes,
    /// Owned, but the lease may be expiring: NO_RESOURCES (short lifetime).
    Uncertain,
    /// Not this node's: no answer (routing sends it to the owner; the
    /// client retransmits, RFC 6887 §8.1.1).
    NotOwner,
}

/// Per-partition ownership, shared by the node task and every shard.
#[derive(Debug)]
pub struct Ownership {
    /// This node's name.
    pub node: String,
    /// Partition names, in configuration order.
    pub names: Vec<String>,
    /// Subscriber prefixes and their partition, longest first.
    prefixes: Vec<(IpNet, usize)>,
    states: Vec<AtomicU8>,
    fences: Vec<AtomicI64>,
    certain_until: AtomicU64,
}

impl Ownership {
    /// Nothing owned yet.
    pub fn new(node: String, cfg: &ClusterConfig) -> Self {
        let names: Vec<String> = cfg.partitions.iter().map(|p| p.name.clone()).collect();
        let mut prefixes: Vec<(IpNet, usize)> = cfg
            .partitions
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.subscribers.iter().map(move |n| (*n, i)))
            .collect();
        prefixes.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        let n = names.len();
        Ownership {
            node,
            names,
            prefixes,
            states: (0..n).map(|_| AtomicU8::new(0)).collect(),
            fences: (0..n).map(|_| AtomicI64::new(0)).collect(),
            certain_until: AtomicU64::new(0),
        }
    }

    /// The partition of `subscriber`.
    pub fn partition_of(&self, subscriber: IpAddr) -> Option<usize> {
        self.prefixes
            .iter()
            .find(|(n, _)| n.contains(&subscriber))
            .map(|(_, i)| *i)
    }

    /// How many partitions there are.
    pub fn count(&self) -> usize {
        self.names.len()
    }

    /// A partition's state.
    pub fn state(&self, p: usize) -> PartState {
        self.states.get(p).map_or(PartState::NotOwned, |s| {
            PartState::from_u8(s.load(Ordering::Acquire))
        })
    }

    /// Sets a partition's state.
    pub fn set_state(&self, p: usize, s: PartState) {
        if let Some(a) = self.states.get(p) {
            a.store(s as u8, Ordering::Release);
        }
    }

    /// The create revision of this node's ownership key of `p`, which every
    /// write for `p` compares (fencing); `None` when `p` is not owned.
    pub fn fence(&self, p: usize) -> Option<i64> {
        match self.state(p) {
            PartState::Active | PartState::Loading | PartState::Releasing => self
                .fences
                .get(p)
                .map(|f| f.load(Ordering::Acquire))
                .filter(|r| *r > 0),
            PartState::NotOwned | PartState::Lost => None,
        }
    }

    /// Records the revision of a successful claim.
    pub fn set_fence(&self, p: usize, revision: i64) {
        if let Some(f) = self.fences.get(p) {
            f.store(revision, Ordering::Release);
        }
    }

    /// Until when (engine clock) the lease is certainly alive.
    pub fn certain_until(&self) -> Millis {
        self.certain_until.load(Ordering::Acquire)
    }

    /// Extends certainty after an acknowledged keep-alive.
    pub fn set_certain_until(&self, at: Millis) {
        self.certain_until.store(at, Ordering::Release);
    }

    /// Whether a request of `subscriber` is answered now (one in no
    /// partition is: the engine refuses it itself, NOT_AUTHORIZED).
    pub fn admit(&self, subscriber: IpAddr, now: Millis) -> Admit {
        let Some(p) = self.partition_of(subscriber) else {
            return Admit::Yes;
        };
        match self.state(p) {
            PartState::Active if now < self.certain_until() => Admit::Yes,
            PartState::Active => Admit::Uncertain,
            _ => Admit::NotOwner,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_partitions() -> Ownership {
        let cfg: ClusterConfig = serde_yaml::from_str(
            "etcd: { endpoints: [http://127.0.0.1:2379] }\n\
             partitions:\n\
             - { name: p0, subscribers: [100.64.0.0/16], pool: default, external: [192.0.2.0/25] }\n\
             - { name: p1, subscribers: [100.64.1.0/24], pool: default, external: [192.0.2.128/25] }\n",
        )
        .unwrap();
        Ownership::new("a".into(), &cfg)
    }

    #[test]
    fn answers_only_active_partitions_while_the_lease_is_certain() {
        let o = two_partitions();
        let (a, b, none) = (
            "100.64.0.9".parse().unwrap(),
            "100.64.1.9".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
        );
        assert_eq!(o.partition_of(b), Some(1), "longest prefix first");
        assert_eq!(o.admit(a, 10), Admit::NotOwner);
        assert_eq!(o.admit(none, 10), Admit::Yes);
        o.set_state(0, PartState::Active);
        o.set_fence(0, 7);
        assert_eq!(o.admit(a, 10), Admit::Uncertain);
        o.set_certain_until(100);
        assert_eq!(o.admit(a, 10), Admit::Yes);
        assert_eq!(o.admit(a, 100), Admit::Uncertain);
        assert_eq!(o.admit(b, 10), Admit::NotOwner);
        assert_eq!(o.fence(0), Some(7));
        o.set_state(0, PartState::Lost);
        assert_eq!(o.fence(0), None, "a lost partition is never written");
        assert_eq!(o.admit(a, 10), Admit::NotOwner);
    }
}
