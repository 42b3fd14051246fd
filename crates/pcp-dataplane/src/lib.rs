//! # pcp-dataplane: make mappings real
//!
//! The [`Dataplane`] trait takes batches of [`Change`]s derived from the
//! engine's events and reports, per change, whether it was applied; it can
//! list what is installed (for reconcile on start).
//!
//! ```text
//!  engine events ──Change::from_event──▶ batch ──apply──▶ backend
//!                                                    └──▶ per-change result
//! ```
//!
//! Backends: [`MemoryDataplane`] (tests, dry runs, unprivileged default)
//! and [`NftablesDataplane`] (the kernel's NAT: one table of maps, one
//! `nft -f -` transaction per batch).
//! What this crate does not do: decide anything. It installs what the
//! engine decided.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use pcp_engine::{
    Block, Event, ExternalEndpoint, InternalEndpoint, Mapping, MappingKey, MappingKind, Millis,
    RemoteEndpoint,
};

mod compact;
mod conntrack;
mod memory;
mod nfnetlink;
mod nftables;
mod pinholes;
pub use conntrack::{flow_stats, FlowStats};
pub use memory::MemoryDataplane;
pub use nftables::NftablesDataplane;
pub use pinholes::{FirewallRules, Unsolicited};

/// The dataplanes' tables of installed entries, found by the key each
/// entry implies and kept dense ([`pcp_engine::keyed`]). Keys are pcpd's
/// own mappings: foldhash, randomly seeded.
type KeyedTable<T> = pcp_engine::keyed::KeyedTable<T, foldhash::fast::RandomState>;

/// What one installed mapping looks like to the dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// DNAT (MAP, static) or SNAT (PEER).
    pub kind: MappingKind,
    /// External address.
    pub external_addr: Ipv4Addr,
    /// First external port.
    pub external_port: u16,
    /// Ports in the entry.
    pub port_count: u16,
    /// IANA protocol.
    pub protocol: u8,
    /// A firewall pinhole (RFC 6887 §3): traffic to the internal endpoint
    /// is let in, nothing is translated, `external_addr` is unused.
    pub firewall: bool,
    /// Internal address.
    pub internal_addr: IpAddr,
    /// First internal port.
    pub internal_port: u16,
    /// Remote prefixes allowed in (RFC 6887 §13.3) as (address, family prefix length, port).
    pub filters: Box<[(IpAddr, u8, u16)]>,
    /// When the kernel should drop it by itself (`Millis::MAX`: never).
    pub expires_ms: Millis,
}

impl Entry {
    fn from_mapping(m: &Mapping) -> Self {
        Entry {
            kind: m.kind,
            external_addr: m.external_addr,
            external_port: m.external_port,
            port_count: m.port_count,
            protocol: m.protocol,
            firewall: m.firewall,
            internal_addr: m.internal_addr,
            internal_port: m.internal_port,
            filters: m
                .filters()
                .iter()
                .map(|f| (f.remote_addr, f.family_prefix_len(), f.remote_port))
                .collect(),
            expires_ms: m.expires_ms,
        }
    }

    /// Whether `other` is this entry with another expiry (nothing else
    /// differs).
    pub(crate) fn same_but_expiry(&self, other: &Entry) -> bool {
        let Entry {
            kind,
            external_addr,
            external_port,
            port_count,
            protocol,
            firewall,
            internal_addr,
            internal_port,
            filters,
            expires_ms: _,
        } = other;
        self.kind == *kind
            && self.external_addr == *external_addr
            && self.external_port == *external_port
            && self.port_count == *port_count
            && self.protocol == *protocol
            && self.firewall == *firewall
            && self.internal_addr == *internal_addr
            && self.internal_port == *internal_port
            && self.filters == *filters
    }

    /// The key an entry is installed under: the mapping's identity for a
    /// PEER (one SNAT entry, or one permit, per five-tuple), the internal
    /// endpoint of a pinhole, the external endpoint otherwise (one DNAT
    /// entry per external port).
    pub fn key(&self) -> Key {
        key_of(
            self.kind,
            self.firewall,
            InternalEndpoint {
                addr: self.internal_addr,
                protocol: self.protocol,
                port: self.internal_port,
            },
            self.external_addr,
            self.external_port,
        )
    }
}

/// The key of an entry from the fields it depends on (see [`Entry::key`]).
pub(crate) fn key_of(
    kind: MappingKind,
    firewall: bool,
    internal: InternalEndpoint,
    external_addr: Ipv4Addr,
    external_port: u16,
) -> Key {
    match kind {
        MappingKind::Peer {
            remote_addr,
            remote_port,
        } => Key::Peer(MappingKey {
            internal,
            remote: Some(RemoteEndpoint {
                addr: remote_addr,
                port: remote_port,
            }),
        }),
        _ if firewall => Key::Pinhole(internal),
        _ => Key::Inbound(ExternalEndpoint {
            addr: external_addr,
            protocol: internal.protocol,
            port: external_port,
        }),
    }
}

/// Identity of an installed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// A DNAT entry: inbound to an external endpoint (MAP, static).
    Inbound(ExternalEndpoint),
    /// An SNAT entry for one outbound five-tuple, or a firewall's permit
    /// of one remote peer: the PEER mapping's key.
    Peer(MappingKey),
    /// A firewall pinhole to an internal endpoint (MAP, static).
    Pinhole(InternalEndpoint),
    /// A subscriber's port block (SNAT of its ordinary outbound traffic).
    SubscriberBlock {
        /// The subscriber.
        subscriber: IpAddr,
        /// External address.
        external_addr: Ipv4Addr,
        /// First port of the block.
        first_port: u16,
    },
}

/// One change to the dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Install or replace a mapping (new lifetime, filters).
    Upsert(Entry),
    /// Remove a mapping.
    Remove(Key),
    /// Give a subscriber a port block.
    AddBlock {
        /// The subscriber.
        subscriber: IpAddr,
        /// The block.
        block: Block,
    },
    /// Take a port block away.
    RemoveBlock {
        /// The subscriber.
        subscriber: IpAddr,
        /// The block.
        block: Block,
    },
}

impl Change {
    /// The key an `Upsert` or `AddBlock` installs (none for removals).
    pub fn key(&self) -> Option<Key> {
        match self {
            Change::Upsert(e) => Some(e.key()),
            Change::AddBlock { subscriber, block } => Some(port_set_key(*subscriber, block)),
            Change::Remove(_) | Change::RemoveBlock { .. } => None,
        }
    }

    /// The changes an engine event implies (none for pure log events).
    pub fn from_event(event: &Event, out: &mut Vec<Change>) {
        match event {
            Event::MappingCreated(m) | Event::MappingRenewed(m) | Event::MappingRefreshed(m) => {
                out.push(Change::Upsert(Entry::from_mapping(m)));
            }
            Event::MappingDeleted { mapping, .. } => {
                out.push(Change::Remove(Entry::from_mapping(mapping).key()));
            }
            Event::MappingMoved { old, new } => {
                out.push(Change::Remove(Entry::from_mapping(old).key()));
                out.push(Change::Upsert(Entry::from_mapping(new)));
            }
            Event::BlockAllocated { subscriber, block } => out.push(Change::AddBlock {
                subscriber: *subscriber,
                block: *block,
            }),
            Event::BlockReleased {
                subscriber, block, ..
            } => out.push(Change::RemoveBlock {
                subscriber: *subscriber,
                block: *block,
            }),
            Event::QuotaExceeded { .. } | Event::PoolExhausted { .. } => {}
        }
    }
}

/// Why a change was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The backend refused the change.
    #[error("dataplane refused the change: {0}")]
    Refused(String),
    /// The backend could not be reached.
    #[error("dataplane unavailable: {0}")]
    Unavailable(String),
}

/// What a reconcile did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    /// Entries (re)installed because they were missing or different.
    pub installed: usize,
    /// Stray entries removed.
    pub removed: usize,
    /// Changes the backend refused.
    pub failed: usize,
}

/// The changes that turn what is installed into what is desired: strays
/// removed first, then what is missing or different; shared by every
/// backend's `reconcile`, each with its own idea of "already current".
pub struct ReconcilePlan {
    changes: Vec<Change>,
    removed: usize,
}

impl ReconcilePlan {
    /// Plans from the installed keys, the desired `Upsert`s and
    /// `AddBlock`s, and whether a desired change is already in place.
    pub fn new(
        installed: impl Iterator<Item = Key>,
        desired: Vec<Change>,
        is_current: impl Fn(&Change) -> bool,
    ) -> Self {
        let wanted: HashSet<Key> = desired.iter().filter_map(Change::key).collect();
        let mut changes: Vec<Change> = installed
            .filter(|k| !wanted.contains(k))
            .map(Change::Remove)
            .collect();
        let removed = changes.len();
        changes.extend(desired.into_iter().filter(|c| !is_current(c)));
        ReconcilePlan { changes, removed }
    }

    /// Applies the plan as one batch.
    pub fn apply<D: Dataplane + ?Sized>(self, dp: &mut D) -> Reconciled {
        let failed = dp
            .apply(&self.changes)
            .iter()
            .filter(|r| r.is_err())
            .count();
        Reconciled {
            installed: self.changes.len() - self.removed,
            removed: self.removed,
            failed,
        }
    }
}

/// How often a backend's thread calls [`Dataplane::idle`] while no batch
/// comes.
pub const IDLE_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// A backend that makes mappings forward traffic.
pub trait Dataplane: Send {
    /// Applies a batch; returns one result per change, in order.
    fn apply(&mut self, changes: &[Change]) -> Vec<Result<(), ApplyError>>;
    /// What is installed now.
    fn installed(&self) -> Vec<(Key, Option<Entry>)>;
    /// Makes what is installed equal to `desired` (`Upsert`s and
    /// `AddBlock`s): strays removed, missing or different entries
    /// (re)installed, one batch.
    fn reconcile(&mut self, desired: Vec<Change>) -> Reconciled {
        let have: HashMap<Key, Option<Entry>> = self.installed().into_iter().collect();
        let changes = ReconcilePlan::new(have.keys().copied(), desired, |c| match c {
            Change::Upsert(e) => have.get(&e.key()) == Some(&Some(e.clone())),
            other => other.key().is_some_and(|k| have.contains_key(&k)),
        });
        changes.apply(self)
    }
    /// Backend name, for logs and metrics.
    fn name(&self) -> &'static str;
    /// Whether `apply` may wait on something outside the process (the
    /// kernel): such a backend is driven from a thread of its own, so the
    /// shard that feeds it never blocks.
    fn waits(&self) -> bool {
        true
    }
    /// Like `apply`, but may return before removals hold (the nftables
    /// backend expires elements, which still match until the kernel's next
    /// tick): also returns from when they do (`None`: now). Nobody may be
    /// told of the batch before that time has passed and [`settle`] has
    /// run after it. The dataplane's thread uses this to start the next
    /// transaction meanwhile.
    ///
    /// [`settle`]: Dataplane::settle
    fn apply_early(
        &mut self,
        changes: &[Change],
    ) -> (Vec<Result<(), ApplyError>>, Option<std::time::Instant>) {
        (self.apply(changes), None)
    }
    /// Finishes the removals whose time has come (see `apply_early`).
    fn settle(&mut self) {}
    /// Housekeeping while no batch comes (the thread that drives a
    /// backend calls it about every [`IDLE_TICK`]): the nftables backend
    /// reads conntrack's events, so the kernel need not drop any between
    /// batches, and rebuilds its flow index off the request path when it
    /// must.
    fn idle(&mut self) {}
}

pub(crate) fn port_set_key(subscriber: IpAddr, block: &Block) -> Key {
    Key::SubscriberBlock {
        subscriber,
        external_addr: block.addr,
        first_port: block.first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcp_engine::{DeleteReason, MappingId};
    use pcp_wire::Nonce;

    fn mapping(port: u16) -> Mapping {
        Mapping {
            id: MappingId {
                shard: 0,
                slot: 0,
                generation: 0,
            },
            kind: MappingKind::Map,
            internal_addr: "100.64.0.1".parse().unwrap(),
            internal_port: 80,
            protocol: 6,
            external_addr: Ipv4Addr::new(192, 0, 2, 1),
            external_port: port,
            firewall: false,
            port_count: 1,
            nonce: Nonce::default(),
            created_ms: 0,
            expires_ms: 1000,
            durable_ms: 1000,
            client_port: 1,
            natpmp: false,
            extra: None,
        }
    }

    #[test]
    fn events_become_changes_and_apply() {
        let mut dp = MemoryDataplane::new();
        let mut changes = Vec::new();
        let block = Block {
            addr: Ipv4Addr::new(192, 0, 2, 1),
            first: 1024,
            len: 512,
        };
        let sub: IpAddr = "100.64.0.1".parse().unwrap();
        for e in [
            Event::BlockAllocated {
                subscriber: sub,
                block,
            },
            Event::MappingCreated(mapping(2000)),
            Event::MappingMoved {
                old: mapping(2000),
                new: mapping(2001),
            },
        ] {
            Change::from_event(&e, &mut changes);
        }
        assert!(dp.apply(&changes).iter().all(Result::is_ok));
        assert_eq!(dp.len(), 1);
        let key = Entry::from_mapping(&mapping(2001)).key();
        assert_eq!(dp.get(&key).unwrap().external_port, 2001);
        changes.clear();
        Change::from_event(
            &Event::MappingDeleted {
                mapping: mapping(2001),
                reason: DeleteReason::Client,
            },
            &mut changes,
        );
        Change::from_event(
            &Event::BlockReleased {
                subscriber: sub,
                block,
                since: 0,
            },
            &mut changes,
        );
        dp.apply(&changes);
        assert!(dp.is_empty());
        assert!(dp.installed().is_empty());
    }
}
