//! An [`Entry`] as a backend keeps it: one per mapping is most of a
//! backend's memory, and an entry is 80 bytes, most of them room for IPv6
//! addresses and filters that nearly no CGNAT mapping has. An entry of
//! IPv4 addresses without filters is kept in 32 bytes ([`Narrow`]); any
//! other whole, behind a pointer.

use std::net::{IpAddr, Ipv4Addr};

use pcp_engine::keyed::Keyed;
use pcp_engine::{InternalEndpoint, KindV4, Millis};

use crate::{key_of, Entry, Key};

/// A kept entry.
#[derive(Debug, Clone)]
pub(crate) enum Compact {
    /// IPv4 addresses, no filters.
    Narrow(Narrow),
    /// Anything else.
    Wide(Box<Entry>),
}

// The kind's spare values (`KindV4`) tell the two forms apart.
const _: () = assert!(std::mem::size_of::<Compact>() <= 32);

/// An entry of IPv4 addresses without filters.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Narrow {
    expires_ms: Millis,
    internal_addr: Ipv4Addr,
    external_addr: Ipv4Addr,
    kind: KindV4,
    internal_port: u16,
    external_port: u16,
    port_count: u16,
    protocol: u8,
    firewall: bool,
}

impl Compact {
    /// `e` as kept.
    pub(crate) fn of(e: &Entry) -> Self {
        let wide = || Compact::Wide(Box::new(e.clone()));
        let (IpAddr::V4(internal_addr), true) = (e.internal_addr, e.filters.is_empty()) else {
            return wide();
        };
        let Some(kind) = KindV4::of(e.kind) else {
            return wide();
        };
        Compact::Narrow(Narrow {
            expires_ms: e.expires_ms,
            internal_addr,
            external_addr: e.external_addr,
            kind,
            internal_port: e.internal_port,
            external_port: e.external_port,
            port_count: e.port_count,
            protocol: e.protocol,
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
            kind: n.kind.kind(),
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
            Compact::Narrow(n) => match Compact::of(other) {
                Compact::Narrow(o) => {
                    Narrow {
                        expires_ms: n.expires_ms,
                        ..o
                    } == *n
                }
                Compact::Wide(_) => false,
            },
        }
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
            n.kind.kind(),
            n.firewall,
            internal,
            n.external_addr,
            n.external_port,
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pcp_engine::MappingKind;

    /// A MAP entry of IPv4 addresses without filters (the other tests of
    /// the crate's backends start from it too).
    pub(crate) fn sample() -> Entry {
        Entry {
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
        }
    }

    /// Every kind of entry comes back as it went in, IPv4 ones without
    /// filters kept narrow; an expiry moves in place, and anything else
    /// that differs is told.
    #[test]
    fn entries_come_back_as_they_went_in() {
        let base = sample();
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
