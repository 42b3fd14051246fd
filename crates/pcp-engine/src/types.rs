//! Public data types of the engine: mappings, events, transmits, stats.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_wire::{Filter, Nonce, OpData, PeerData, ResultCode};

use crate::alloc::Block;

/// Milliseconds of wall-clock time (Unix epoch), supplied by the caller.
pub type Millis = u64;

/// Lifetime reported for static mappings (RFC 6887 §11.3 item 2: 2^32-1).
pub const STATIC_LIFETIME: u32 = u32::MAX;

/// A stable handle on a mapping within one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct MappingId {
    /// Shard that owns the mapping.
    pub shard: u16,
    /// Slot in the shard's table.
    pub slot: u32,
    /// Generation of the slot, so a reused slot is a different id.
    pub generation: u32,
}

/// A subscriber's side of a mapping: the internal address, protocol and
/// port that traffic is forwarded to (RFC 6887 §11.1 "internal address and
/// port").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InternalEndpoint {
    /// Internal address (the subscriber).
    pub addr: IpAddr,
    /// IANA protocol number.
    pub protocol: u8,
    /// Internal port.
    pub port: u16,
}

/// The CGNAT's side of a mapping: external address, protocol and port.
/// Never the same type as [`InternalEndpoint`], even where the shapes meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExternalEndpoint {
    /// External address.
    pub addr: Ipv4Addr,
    /// IANA protocol number.
    pub protocol: u8,
    /// External port.
    pub port: u16,
}

/// The remote peer of a PEER mapping (RFC 6887 §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteEndpoint {
    /// Remote peer address.
    pub addr: IpAddr,
    /// Remote peer port.
    pub port: u16,
}

/// Which mapping this is, independent of the slot it lives in: the same
/// value before and after a restart or a move. The engine's indexes, the
/// journal (pcp-store) and the dataplane's keys (pcp-dataplane) all use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappingKey {
    /// The internal endpoint.
    pub internal: InternalEndpoint,
    /// The remote peer, for PEER mappings; `None` for MAP and static ones.
    pub remote: Option<RemoteEndpoint>,
}

impl MappingKey {
    /// The key of a MAP (or static) mapping of `internal`.
    pub fn inbound(internal: InternalEndpoint) -> Self {
        MappingKey {
            internal,
            remote: None,
        }
    }

    /// The key a PEER request for `subscriber` names.
    pub fn of_peer(subscriber: IpAddr, p: &PeerData) -> Self {
        MappingKey {
            internal: InternalEndpoint {
                addr: subscriber,
                protocol: p.map.protocol,
                port: p.map.internal_port,
            },
            remote: Some(RemoteEndpoint {
                addr: p.remote_addr,
                port: p.remote_port,
            }),
        }
    }

    /// The mapping a MAP or PEER request for `subscriber` names; `None`
    /// for ANNOUNCE.
    pub fn of_request(subscriber: IpAddr, data: &OpData) -> Option<Self> {
        match data {
            OpData::Announce => None,
            OpData::Map(m) => Some(Self::inbound(InternalEndpoint {
                addr: subscriber,
                protocol: m.protocol,
                port: m.internal_port,
            })),
            OpData::Peer(p) => Some(Self::of_peer(subscriber, p)),
        }
    }
}

/// The admin API's mapping id: the key written out, so it is the same
/// before and after a restart, a snapshot or a cluster takeover, and names
/// its shard. `PROTOCOL-ADDR-PORT` for MAP and static mappings,
/// `PROTOCOL-ADDR-PORT-REMOTE_ADDR-REMOTE_PORT` for PEER (IPv6 addresses
/// have no `-`).
impl std::fmt::Display for MappingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.internal;
        write!(f, "{}-{}-{}", i.protocol, i.addr, i.port)?;
        if let Some(r) = &self.remote {
            write!(f, "-{}-{}", r.addr, r.port)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for MappingKey {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let parts: Vec<&str> = s.split('-').collect();
        let addr = |t: &str| {
            t.parse::<IpAddr>()
                .map(|a| a.to_canonical())
                .map_err(|_| ())
        };
        let (proto, internal, remote) = match parts[..] {
            [p, a, port] => (p, (a, port), None),
            [p, a, port, ra, rp] => (p, (a, port), Some((ra, rp))),
            _ => return Err(()),
        };
        let remote = match remote {
            Some((ra, rp)) => Some(RemoteEndpoint {
                addr: addr(ra)?,
                port: rp.parse().map_err(|_| ())?,
            }),
            None => None,
        };
        Ok(MappingKey {
            internal: InternalEndpoint {
                addr: addr(internal.0)?,
                protocol: proto.parse().map_err(|_| ())?,
                port: internal.1.parse().map_err(|_| ())?,
            },
            remote,
        })
    }
}

/// `ms` moved by `delta` ms; `Millis::MAX` ("never", static mappings)
/// stays.
pub fn shift_ms(ms: Millis, delta: i64) -> Millis {
    if ms == Millis::MAX {
        return ms;
    }
    ms.saturating_add_signed(delta)
}

/// What created a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum MappingKind {
    /// Inbound, created by MAP or NAT-PMP (RFC 6887 §11).
    Map,
    /// Outbound to one remote peer, created by PEER (RFC 6887 §12).
    Peer {
        /// Remote peer address.
        remote_addr: IpAddr,
        /// Remote peer port.
        remote_port: u16,
    },
    /// Created by the operator, not by PCP (RFC 6887 §11.3 item 2).
    Static,
}

/// Rarely used per-mapping data, boxed so the common mapping stays small.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct MappingExtra {
    /// Remote-peer filters (RFC 6887 §13.3); empty: no filtering.
    #[serde(serialize_with = "ser_filters")]
    pub filters: Vec<Filter>,
    /// DESCRIPTION (RFC 7220).
    pub description: Option<String>,
    /// The THIRD_PARTY client that made the mapping (§13.1); updates go to
    /// it and carry the option too (§14.2).
    pub manager: Option<IpAddr>,
    /// The request carried PREFER_FAILURE (§13.2).
    pub prefer_failure: bool,
}

fn ser_filters<S: serde::Serializer>(f: &[Filter], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(f.len()))?;
    for x in f {
        seq.serialize_element(&format!(
            "{}/{}:{}",
            x.remote_addr,
            x.family_prefix_len(),
            x.remote_port
        ))?;
    }
    seq.end()
}

/// One mapping.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mapping {
    /// Handle.
    pub id: MappingId,
    /// What created it.
    pub kind: MappingKind,
    /// The subscriber: the internal address the mapping forwards to.
    pub internal_addr: IpAddr,
    /// Internal port (first of the set for PORT_SET).
    pub internal_port: u16,
    /// IANA protocol number.
    pub protocol: u8,
    /// External address of a NAT mapping (unspecified for a pinhole: see
    /// [`Mapping::external_ip`], which is right for both).
    pub external_addr: Ipv4Addr,
    /// External port (first of the set for PORT_SET).
    pub external_port: u16,
    /// A firewall pinhole (RFC 6887 §3: the mapping is the identity, so its
    /// external address and port are the internal ones) rather than a
    /// translation.
    pub firewall: bool,
    /// Ports in the mapping (RFC 7753 PORT_SET; 1 otherwise).
    pub port_count: u16,
    /// Mapping nonce (§11.1); zero for NAT-PMP and static mappings.
    #[serde(skip)]
    pub nonce: Nonce,
    /// When the mapping was created.
    pub created_ms: Millis,
    /// When it expires; `Millis::MAX` for static mappings.
    pub expires_ms: Millis,
    /// The expiry the durable store was last asked to hold, at or after
    /// `expires_ms`: a renewal that moves the expiry no further than this
    /// needs no write (see [`Event::MappingRefreshed`]). Equal to
    /// `expires_ms` unless the engine has a renewal slack
    /// (`Engine::set_renewal_slack`).
    #[serde(skip)]
    pub durable_ms: Millis,
    /// The client's UDP port, for unsolicited updates (§14.2); the client's
    /// address is the subscriber's, or the THIRD_PARTY manager's.
    pub client_port: u16,
    /// Created through NAT-PMP (RFC 6886).
    pub natpmp: bool,
    /// Options data, if any.
    pub extra: Option<Box<MappingExtra>>,
}

impl Mapping {
    /// The mapping as the durable store keeps it: with the expiry it was
    /// promised to hold (`durable_ms`), so that no client is ever told an
    /// expiry later than the stored one, and renewals within it need no
    /// write. After a crash the mapping lives until that stored expiry.
    pub fn as_stored(&self) -> Mapping {
        self.clone().into_stored()
    }

    /// [`Mapping::as_stored`], taking the mapping.
    pub fn into_stored(mut self) -> Mapping {
        self.expires_ms = self.expires_ms.max(self.durable_ms);
        self.durable_ms = self.expires_ms;
        self
    }

    /// The mapping's identity.
    pub fn key(&self) -> MappingKey {
        MappingKey {
            internal: self.internal(),
            remote: match self.kind {
                MappingKind::Peer {
                    remote_addr,
                    remote_port,
                } => Some(RemoteEndpoint {
                    addr: remote_addr,
                    port: remote_port,
                }),
                _ => None,
            },
        }
    }

    /// The internal endpoint (first of the set for PORT_SET).
    pub fn internal(&self) -> InternalEndpoint {
        InternalEndpoint {
            addr: self.internal_addr,
            protocol: self.protocol,
            port: self.internal_port,
        }
    }

    /// The `i`-th external endpoint of the mapping (0 for the first).
    pub fn external(&self, i: u16) -> ExternalEndpoint {
        ExternalEndpoint {
            addr: self.external_addr,
            protocol: self.protocol,
            port: self.external_port.wrapping_add(i),
        }
    }

    /// The internal port this mapping forwards `external` to, if it holds
    /// that external port (a pinhole holds none: §3).
    pub fn forwards(&self, external: &ExternalEndpoint) -> Option<u16> {
        let i = external.port.wrapping_sub(self.external_port);
        let held = !self.firewall
            && external.addr == self.external_addr
            && external.protocol == self.protocol
            && i < self.port_count;
        held.then(|| self.internal_port.wrapping_add(i))
    }

    /// The external address as a client is told it: the pool address of a
    /// NAT mapping, the internal address of a pinhole (§3, §11.1).
    pub fn external_ip(&self) -> IpAddr {
        if self.firewall {
            self.internal_addr
        } else {
            IpAddr::V4(self.external_addr)
        }
    }

    /// Whether the mapping was made by PEER.
    pub fn is_peer(&self) -> bool {
        matches!(self.kind, MappingKind::Peer { .. })
    }

    /// Whether it counts against the subscriber's quota (every mapping but
    /// the operator's static ones).
    pub fn counts_against_quota(&self) -> bool {
        self.kind != MappingKind::Static
    }

    /// Where the last request for this mapping came from (§14.2 sends
    /// updates there).
    pub fn client(&self) -> SocketAddr {
        let ip = self
            .extra
            .as_deref()
            .and_then(|e| e.manager)
            .unwrap_or(self.internal_addr);
        SocketAddr::new(ip, self.client_port)
    }

    /// Filters of the mapping.
    pub fn filters(&self) -> &[Filter] {
        self.extra.as_deref().map_or(&[], |e| &e.filters)
    }

    /// Seconds of lifetime left at `now`, as a PCP lifetime.
    pub fn remaining_secs(&self, now: Millis) -> u32 {
        if self.kind == MappingKind::Static {
            return STATIC_LIFETIME;
        }
        let ms = self.expires_ms.saturating_sub(now);
        u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
    }
}

/// Why a mapping went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteReason {
    /// The client asked (lifetime 0).
    Client,
    /// Its lifetime ran out.
    Expired,
    /// The operator removed it.
    Operator,
    /// Its external address was drained and it could not move (§14.2, PREFER_FAILURE).
    Drained,
    /// The dataplane could not install it, so it must not be promised.
    Dataplane,
}

/// What the engine did, in order; the daemon turns each into journal
/// records, dataplane changes and NAT event log lines (RFC 8158 vocabulary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A mapping was created.
    MappingCreated(Mapping),
    /// A mapping's lifetime, filters or description changed, and the
    /// store must hold what it is now (its expiry as `durable_ms`).
    MappingRenewed(Mapping),
    /// A mapping was renewed and nothing but its expiry and client port
    /// moved, its expiry no later than the `durable_ms` the store already
    /// holds: the dataplane sees it as a renewal, the store writes nothing.
    MappingRefreshed(Mapping),
    /// A mapping was deleted.
    MappingDeleted {
        /// The mapping as it was.
        mapping: Mapping,
        /// Why.
        reason: DeleteReason,
    },
    /// A mapping got a new external endpoint (drain, §14.2).
    MappingMoved {
        /// Before.
        old: Mapping,
        /// After.
        new: Mapping,
    },
    /// A port block was handed to a subscriber.
    BlockAllocated {
        /// The subscriber.
        subscriber: IpAddr,
        /// The block.
        block: Block,
    },
    /// A port block came back.
    BlockReleased {
        /// The subscriber.
        subscriber: IpAddr,
        /// The block.
        block: Block,
        /// Since when the subscriber had held it.
        since: Millis,
    },
    /// A request was refused for quota (USER_EX_QUOTA).
    QuotaExceeded {
        /// The subscriber.
        subscriber: IpAddr,
    },
    /// A pool ran out of blocks (NO_RESOURCES).
    PoolExhausted {
        /// Pool name.
        pool: String,
    },
}

/// An unsolicited datagram to send (RFC 6887 §14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub dst: SocketAddr,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// Engine counters: plain numbers, exported by the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Answered requests by opcode row (see [`Stats::ROWS`]) and result code.
    pub responses: [[u64; 14]; 5],
    /// Datagrams dropped without an answer, by reason.
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    /// Requests refused for quota (USER_EX_QUOTA).
    pub quota_refusals: u64,
    /// Requests refused by the rate limiter.
    pub rate_limited: u64,
    /// THIRD_PARTY requests refused (UNSUPP_OPTION, NOT_AUTHORIZED or MALFORMED_REQUEST).
    pub third_party_refusals: u64,
    /// Unsolicited datagrams produced.
    pub unsolicited: u64,
    /// Requests refused NO_RESOURCES because the pool had no free block.
    pub pool_exhausted: u64,
}

impl Stats {
    /// Names of the rows of [`Stats::responses`].
    pub const ROWS: [&'static str; 5] = ["announce", "map", "peer", "natpmp", "other"];

    pub(crate) fn count(&mut self, row: usize, code: ResultCode) {
        let c = usize::from(u8::from(code));
        if let Some(slot) = self.responses.get_mut(row).and_then(|r| r.get_mut(c)) {
            *slot += 1;
        }
    }

    pub(crate) fn drop(&mut self, reason: &'static str) {
        *self.drops.entry(reason).or_insert(0) += 1;
    }

    /// Adds another shard's counters.
    pub fn merge(&mut self, other: &Stats) {
        for (a, b) in self.responses.iter_mut().zip(other.responses.iter()) {
            for (x, y) in a.iter_mut().zip(b.iter()) {
                *x += y;
            }
        }
        for (k, v) in &other.drops {
            *self.drops.entry(k).or_insert(0) += v;
        }
        self.quota_refusals += other.quota_refusals;
        self.rate_limited += other.rate_limited;
        self.third_party_refusals += other.third_party_refusals;
        self.unsolicited += other.unsolicited;
        self.pool_exhausted += other.pool_exhausted;
    }
}

/// A subscriber's usage, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SubscriberUsage {
    /// Internal address.
    pub internal_addr: IpAddr,
    /// Pool name (empty for a firewall class).
    pub pool: String,
    /// Of a firewall class: its mappings are pinholes.
    pub firewall: bool,
    /// Profile name.
    pub profile: String,
    /// External address, once one is assigned.
    pub external_addr: Option<Ipv4Addr>,
    /// Port blocks held.
    pub blocks: Vec<Block>,
    /// Explicit mappings (ports) counted against the quota.
    pub mappings: u32,
    /// The quota.
    pub max_mappings: u32,
}

/// Who held an external port at some time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    /// The subscriber (internal address).
    pub internal_addr: IpAddr,
    /// The block or deterministic range that covered the port.
    pub block: Block,
    /// Since when (None: deterministic, always).
    pub from_ms: Option<Millis>,
    /// Until when (None: still held, or deterministic).
    pub to_ms: Option<Millis>,
}

impl serde::Serialize for Block {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Block", 3)?;
        st.serialize_field("addr", &self.addr)?;
        st.serialize_field("first_port", &self.first)?;
        st.serialize_field("last_port", &self.last())?;
        st.end()
    }
}

/// What a datagram is worth when there is no time for all of them
/// (overload): the I/O layer answers the higher ones first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Refreshes a mapping that exists (same nonce): a client keeps what it
    /// has, and losing it would break a running service.
    Renewal,
    /// Asks for something new (create, delete, ANNOUNCE, public address).
    Create,
    /// Would be refused or dropped anyway: unparsable, bad options, not a
    /// subscriber.
    Garbage,
}
