//! The kind of an IPv4 mapping, compactly: what the engine's packed slots
//! and the dataplanes' compact entries keep instead of a [`MappingKind`].

use std::net::{IpAddr, Ipv4Addr};

use crate::types::{MappingKind, RemoteEndpoint};

/// A [`MappingKind`] whose peer, if any, is an IPv4 address: 8 bytes
/// where a `MappingKind` takes 20. The compact records of IPv4 mappings
/// keep it (the engine's slots, the dataplanes' entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindV4 {
    tag: KindTag,
    remote_addr: Ipv4Addr,
    remote_port: u16,
}

/// [`MappingKind`] without the peer; its spare values are the niche that
/// the records holding a [`KindV4`] use for their own variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KindTag {
    Map,
    Static,
    Peer,
}

impl KindV4 {
    /// `kind` kept compactly; `None` for a PEER with an IPv6 peer.
    pub fn of(kind: MappingKind) -> Option<Self> {
        let (tag, remote_addr, remote_port) = match kind {
            MappingKind::Map => (KindTag::Map, Ipv4Addr::UNSPECIFIED, 0),
            MappingKind::Static => (KindTag::Static, Ipv4Addr::UNSPECIFIED, 0),
            MappingKind::Peer {
                remote_addr: IpAddr::V4(a),
                remote_port,
            } => (KindTag::Peer, a, remote_port),
            MappingKind::Peer { .. } => return None,
        };
        Some(KindV4 {
            tag,
            remote_addr,
            remote_port,
        })
    }

    /// The kind.
    pub fn kind(&self) -> MappingKind {
        match self.tag {
            KindTag::Map => MappingKind::Map,
            KindTag::Static => MappingKind::Static,
            KindTag::Peer => MappingKind::Peer {
                remote_addr: IpAddr::V4(self.remote_addr),
                remote_port: self.remote_port,
            },
        }
    }

    /// The remote peer of a PEER mapping.
    pub fn remote(&self) -> Option<RemoteEndpoint> {
        (self.tag == KindTag::Peer).then_some(RemoteEndpoint {
            addr: IpAddr::V4(self.remote_addr),
            port: self.remote_port,
        })
    }

    /// Whether the mapping counts against the subscriber's quota (see
    /// [`crate::Mapping::counts_against_quota`]).
    pub fn counts_against_quota(&self) -> bool {
        self.tag != KindTag::Static
    }
}
