//! A mapping as its slot keeps it: [`Mapping`] is 112 bytes, most of
//! them room for IPv6 addresses and an id the slot already implies, and a
//! million of them were the largest part of the daemon's memory. A
//! mapping whose subscriber (and peer, for PEER) is an IPv4 address, as
//! nearly every CGNAT mapping is, is kept in 72 bytes ([`Narrow`]); any
//! other whole, behind a pointer. The table hands out whole
//! [`Mapping`]s, made from this on the way out (`table.rs`).

use std::net::{IpAddr, Ipv4Addr};

use pcp_wire::Nonce;

use crate::kind_v4::KindV4;
use crate::types::{InternalEndpoint, Mapping, MappingExtra, MappingId, MappingKey, Millis};

/// A kept mapping.
#[derive(Debug)]
pub(super) enum Packed {
    /// IPv4 subscriber, and IPv4 peer if any.
    Narrow(Narrow),
    /// Anything else (IPv6).
    Wide(Box<Mapping>),
}

// The kind's spare values tell the two forms (and a free slot) apart.
const _: () = assert!(std::mem::size_of::<Option<Packed>>() <= 72);

/// A mapping of IPv4 addresses, every field of [`Mapping`] but its id.
#[derive(Debug)]
pub(super) struct Narrow {
    created_ms: Millis,
    expires_ms: Millis,
    durable_ms: Millis,
    extra: Option<Box<MappingExtra>>,
    nonce: [u8; 12],
    internal_addr: Ipv4Addr,
    external_addr: Ipv4Addr,
    kind: KindV4,
    internal_port: u16,
    external_port: u16,
    port_count: u16,
    client_port: u16,
    protocol: u8,
    firewall: bool,
    natpmp: bool,
}

impl Packed {
    /// `m` as a slot keeps it (its id is the slot's).
    pub(super) fn of(m: Mapping) -> Self {
        let IpAddr::V4(internal_addr) = m.internal_addr else {
            return Packed::Wide(Box::new(m));
        };
        let Some(kind) = KindV4::of(m.kind) else {
            return Packed::Wide(Box::new(m));
        };
        Packed::Narrow(Narrow {
            created_ms: m.created_ms,
            expires_ms: m.expires_ms,
            durable_ms: m.durable_ms,
            extra: m.extra,
            nonce: m.nonce.0,
            internal_addr,
            external_addr: m.external_addr,
            kind,
            internal_port: m.internal_port,
            external_port: m.external_port,
            port_count: m.port_count,
            client_port: m.client_port,
            protocol: m.protocol,
            firewall: m.firewall,
            natpmp: m.natpmp,
        })
    }

    /// The whole mapping, as `id`.
    pub(super) fn unpack(&self, id: MappingId) -> Mapping {
        let n = match self {
            Packed::Wide(m) => {
                return Mapping {
                    id,
                    ..(**m).clone()
                }
            }
            Packed::Narrow(n) => n,
        };
        Mapping {
            id,
            kind: n.kind.kind(),
            internal_addr: IpAddr::V4(n.internal_addr),
            internal_port: n.internal_port,
            protocol: n.protocol,
            external_addr: n.external_addr,
            external_port: n.external_port,
            firewall: n.firewall,
            port_count: n.port_count,
            nonce: Nonce(n.nonce),
            created_ms: n.created_ms,
            expires_ms: n.expires_ms,
            durable_ms: n.durable_ms,
            client_port: n.client_port,
            natpmp: n.natpmp,
            extra: n.extra.clone(),
        }
    }

    /// The mapping's key (what the slot index compares).
    pub(super) fn key(&self) -> MappingKey {
        let n = match self {
            Packed::Wide(m) => return m.key(),
            Packed::Narrow(n) => n,
        };
        MappingKey {
            internal: InternalEndpoint {
                addr: IpAddr::V4(n.internal_addr),
                protocol: n.protocol,
                port: n.internal_port,
            },
            remote: n.kind.remote(),
        }
    }

    /// The mapping's nonce.
    pub(super) fn nonce(&self) -> Nonce {
        match self {
            Packed::Wide(m) => m.nonce,
            Packed::Narrow(n) => Nonce(n.nonce),
        }
    }

    /// Whether the mapping counts against a quota and has expired at `now`.
    pub(super) fn expired(&self, now: Millis) -> bool {
        match self {
            Packed::Wide(m) => m.counts_against_quota() && m.expires_ms <= now,
            Packed::Narrow(n) => n.kind.counts_against_quota() && n.expires_ms <= now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::MappingKind;
    use pcp_wire::Filter;

    fn mapping(internal: &str, kind: MappingKind) -> Mapping {
        Mapping {
            id: MappingId {
                shard: 1,
                slot: 7,
                generation: 3,
            },
            kind,
            internal_addr: internal.parse().unwrap(),
            internal_port: 8080,
            protocol: 17,
            external_addr: Ipv4Addr::new(192, 0, 2, 9),
            external_port: 40000,
            firewall: false,
            port_count: 4,
            nonce: Nonce([9; 12]),
            created_ms: 1,
            expires_ms: 2,
            durable_ms: 3,
            client_port: 5350,
            natpmp: true,
            extra: None,
        }
    }

    /// Every kind of mapping comes back as it went in, IPv4 ones kept
    /// narrow, with the key and expiry read without unpacking.
    #[test]
    fn mappings_come_back_as_they_went_in() {
        let peer = |a: &str| MappingKind::Peer {
            remote_addr: a.parse().unwrap(),
            remote_port: 443,
        };
        let mut filtered = mapping("100.64.0.1", MappingKind::Map);
        filtered.extra = Some(Box::new(MappingExtra {
            filters: vec![Filter {
                remote_addr: "203.0.113.0".parse().unwrap(),
                prefix_len: 120,
                remote_port: 0,
            }],
            description: Some("x".into()),
            manager: Some("100.64.0.9".parse().unwrap()),
            prefer_failure: true,
        }));
        let mut pinhole = mapping("2001:db8::1", MappingKind::Static);
        pinhole.firewall = true;
        let cases = [
            (mapping("100.64.0.1", MappingKind::Map), true),
            (mapping("100.64.0.1", MappingKind::Static), true),
            (mapping("100.64.0.1", peer("198.51.100.1")), true),
            (filtered, true),
            (mapping("100.64.0.1", peer("2001:db8::2")), false),
            (pinhole, false),
        ];
        for (m, narrow) in cases {
            let p = Packed::of(m.clone());
            assert_eq!(matches!(p, Packed::Narrow(_)), narrow, "{m:?}");
            assert_eq!(p.unpack(m.id), m);
            assert_eq!(p.key(), m.key());
            assert_eq!(p.nonce(), m.nonce);
            assert_eq!(p.expired(2), m.counts_against_quota());
            assert!(!p.expired(1));
        }
    }
}
