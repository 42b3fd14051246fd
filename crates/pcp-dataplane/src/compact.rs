//! An [`Entry`] as a backend keeps it: one per mapping is most of a
//! backend's memory, and an entry is 80 bytes, most of them room for IPv6
//! addresses and filters that nearly no CGNAT mapping has. An entry of
//! IPv4 addresses without filters is kept in 32 bytes ([`Narrow`]); any
//! other whole, behind a pointer.

use std::net::{IpAddr, Ipv4Addr};

use pcp_engine::keyed::Keyed;
use pcp_engine::{InternalEndpoint, MappingKind, Millis};

use crate::{key_of, Entry, Key};

/// A kept entry.
#[derive(Debug, Clone)]
pub(crate) enum Compact {
    /// IPv4 addresses, no filters.
    Narrow(Narrow),
    /// Anything else.
    Wide(Box<Entry>),
}

// The kind's spare values tell the two forms apart.
const _: () = assert!(std::mem::size_of::<Compact>() <= 32);

/// [`MappingKind`] without the peer (kept beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Map,
    Static,
    Peer,
}

/// An entry of IPv4 addresses without filters.
#[derive(Debug, Clone)]
pub(crate) struct Narrow {
    expires_ms: Millis,
    internal_addr: Ipv4Addr,
    external_addr: Ipv4Addr,
    /// The remote peer of a PEER entry (unspecified otherwise).
    remote_addr: Ipv4Addr,
    internal_port: u16,
    external_port: u16,
    port_count: u16,
    remote_port: u16,
    protocol: u8,
    kind: Kind,
    firewall: bool,
}

impl Compact {
    /// `e` as kept.
    pub(crate) fn of(e: &Entry) -> Self {
        let wide = || Compact::Wide(Box::new(e.clone()));
        let (IpAddr::V4(internal_addr), true) = (e.internal_addr, e.filters.is_empty()) else {
            return wide();
        };
        let (kind, remote_addr, remote_port) = match e.kind {
            MappingKind::Map => (Kind::Map, Ipv4Addr::UNSPECIFIED, 0),
            MappingKind::Static => (Kind::Static, Ipv4Addr::UNSPECIFIED, 0),
            MappingKind::Peer {
                remote_addr: IpAddr::V4(a),
                remote_port,
            } => (Kind::Peer, a, remote_port),
            MappingKind::Peer { .. } => return wide(),
        };
        Compact::Narrow(Narrow {
            expires_ms: e.expires_ms,
            internal_addr,
            external_addr: e.external_addr,
            remote_addr,
            internal_port: e.internal_port,
            external_port: e.external_port,
            port_count: e.port_count,
            remote_port,
            protocol: e.protocol,
            kind,
            firewall: e.firewall,
        })
    }

    /// The whole entry.
    pub(crate) fn entry(&self) -> Entry {
        let n = match self {
            Compact::Wide(e) => return (**e).clone(),
            Compact::Narrow(n) => n,
        };
        Entry {
            kind: n.kind(),
            external_addr: n.external_addr,
            external_port: n.external_port,
            port_count: n.port_count,
            protocol: n.protocol,
            firewall: n.firewall,
            internal_addr: IpAddr::V4(n.internal_addr),
            internal_port: n.internal_port,
            filters: Box::new([]),
            expires_ms: n.expires_ms,
        }
    }

    /// The subscriber.
    pub(crate) fn internal_addr(&self) -> IpAddr {
        match self {
            Compact::Wide(e) => e.internal_addr,
            Compact::Narrow(n) => IpAddr::V4(n.internal_addr),
        }
    }

    /// Moves the expiry (a renewal that changes nothing else).
    pub(crate) fn set_expires_ms(&mut self, ms: Millis) -> Millis {
        let at = match self {
            Compact::Wide(e) => &mut e.expires_ms,
            Compact::Narrow(n) => &mut n.expires_ms,
        };
        std::mem::replace(at, ms)
    }

    /// Whether `other` is this entry with another expiry at most.
    pub(crate) fn same_but_expiry(&self, other: &Entry) -> bool {
        match self {
            Compact::Wide(e) => e.same_but_expiry(other),
            Compact::Narrow(n) => {
                matches!(Compact::of(other), Compact::Narrow(o) if o.fields() == n.fields())
            }
        }
    }
}

/// Every field of a [`Narrow`] entry but its expiry.
type NarrowFields = ([Ipv4Addr; 3], [u16; 4], (u8, Kind, bool));

impl Narrow {
    fn kind(&self) -> MappingKind {
        match self.kind {
            Kind::Map => MappingKind::Map,
            Kind::Static => MappingKind::Static,
            Kind::Peer => MappingKind::Peer {
                remote_addr: IpAddr::V4(self.remote_addr),
                remote_port: self.remote_port,
            },
        }
    }

    fn fields(&self) -> NarrowFields {
        (
            [self.internal_addr, self.external_addr, self.remote_addr],
            [
                self.internal_port,
                self.external_port,
                self.port_count,
                self.remote_port,
            ],
            (self.protocol, self.kind, self.firewall),
        )
    }
}

impl Keyed for Compact {
    type Key = Key;
    fn key(&self) -> Key {
        let n = match self {
            Compact::Wide(e) => return e.key(),
            Compact::Narrow(n) => n,
        };
        let internal = InternalEndpoint {
            addr: IpAddr::V4(n.internal_addr),
            protocol: n.protocol,
            port: n.internal_port,
        };
        key_of(
            n.kind(),
            n.firewall,
            internal,
            n.external_addr,
            n.external_port,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of entry comes back as it went in, IPv4 ones without
    /// filters kept narrow; an expiry moves in place, and anything else
    /// that differs is told.
    #[test]
    fn entries_come_back_as_they_went_in() {
        let base = Entry {
            kind: MappingKind::Map,
            external_addr: Ipv4Addr::new(192, 0, 2, 1),
            external_port: 2000,
            port_count: 1,
            protocol: 6,
            firewall: false,
            internal_addr: "100.64.0.1".parse().unwrap(),
            internal_port: 80,
            filters: Box::new([]),
            expires_ms: 1000,
        };
        let peer = |a: &str| MappingKind::Peer {
            remote_addr: a.parse().unwrap(),
            remote_port: 443,
        };
        let cases = [
            (base.clone(), true),
            (
                Entry {
                    kind: MappingKind::Static,
                    ..base.clone()
                },
                true,
            ),
            (
                Entry {
                    kind: peer("203.0.113.9"),
                    ..base.clone()
                },
                true,
            ),
            (
                Entry {
                    kind: peer("2001:db8::1"),
                    ..base.clone()
                },
                false,
            ),
            (
                Entry {
                    internal_addr: "2001:db8::2".parse().unwrap(),
                    firewall: true,
                    ..base.clone()
                },
                false,
            ),
            (
                Entry {
                    filters: Box::new([("198.51.100.0".parse().unwrap(), 24, 0)]),
                    ..base.clone()
                },
                false,
            ),
        ];
        for (e, narrow) in cases {
            let mut c = Compact::of(&e);
            assert_eq!(matches!(c, Compact::Narrow(_)), narrow, "{e:?}");
            assert_eq!(c.entry(), e);
            assert_eq!(c.key(), e.key());
            assert_eq!(c.internal_addr(), e.internal_addr);
            let later = Entry {
                expires_ms: 9000,
                ..e.clone()
            };
            assert!(c.same_but_expiry(&later));
            let moved = Entry {
                external_port: 2001,
                ..e.clone()
            };
            assert!(!c.same_but_expiry(&moved));
            assert_eq!(c.set_expires_ms(9000), 1000);
            assert_eq!(c.entry(), later);
        }
    }
}
