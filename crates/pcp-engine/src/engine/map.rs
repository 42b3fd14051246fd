//! MAP (RFC 6887 §11.3): create an inbound mapping, with PREFER_FAILURE
//! (§13.2), FILTER (§13.3), DESCRIPTION (RFC 7220) and PORT_SET (RFC 7753).
//! Renewal and deletion, shared with PEER, are in `lifetime.rs`.

use std::net::{IpAddr, SocketAddr};

use pcp_wire::{Filter, MapData, Nonce, PortSet, ResultCode};

use super::ports::{PortAsk, Suggestion};
use super::request::{Granted, Refusal, ReqOptions};
use super::table::UNASSIGNED;
use super::Engine;
use crate::types::{InternalEndpoint, Mapping, MappingExtra, MappingKey, MappingKind, Millis};

/// Which protocol a MAP came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// PCP: mappings carry the client's nonce (§11.1).
    Pcp,
    /// NAT-PMP (RFC 6886): no nonce; the internal host's address alone
    /// identifies its mappings.
    NatPmp,
}

/// Who asks, for whom, for how long, with which options.
pub(super) struct Ask<'a> {
    pub(super) client: SocketAddr,
    pub(super) subscriber: IpAddr,
    /// The requested lifetime, before clamping (0: delete).
    pub(super) lifetime: u32,
    pub(super) opts: &'a ReqOptions<'a>,
}

impl Engine {
    /// RFC 6887 §11.3 and §15.1.
    pub(super) fn map(
        &mut self,
        now: Millis,
        ask: &Ask<'_>,
        m: &MapData,
        via: Via,
    ) -> Result<Granted, Refusal> {
        // §11.3 / §15.1: protocol 0 with a non-zero port is MALFORMED_REQUEST.
        if m.protocol == 0 && m.internal_port != 0 {
            return Err(ResultCode::MalformedRequest.into());
        }
        let internal = InternalEndpoint {
            addr: ask.subscriber,
            protocol: m.protocol,
            port: m.internal_port,
        };
        let existing = self.find_live(now, &MappingKey::inbound(internal));
        if ask.lifetime == 0 {
            if existing.is_none() && self.table.outbound_port(&internal).is_some() {
                // §15.1: MAP cannot delete an outbound (PEER-created) mapping.
                return Err(ResultCode::NotAuthorized.into());
            }
            return self.delete_by_client(now, ask.subscriber, existing, m, via);
        }
        // §11.3: wildcard (port 0) and DMZ (protocol 0) mappings cannot be
        // fulfilled in their entirety inside a port set: UNSUPP_PROTOCOL.
        if m.protocol == 0
            || m.internal_port == 0
            || !self.compiled.config.protocols.contains(&m.protocol)
        {
            return Err(ResultCode::UnsuppProtocol.into());
        }
        let lifetime = self.compiled.clamp_lifetime(ask.lifetime);
        if let Some(slot) = existing {
            return self.map_renew(now, ask, slot, lifetime, m, via);
        }
        self.map_create(now, ask, internal, lifetime, m, via)
    }

    fn map_create(
        &mut self,
        now: Millis,
        ask: &Ask<'_>,
        internal: InternalEndpoint,
        lifetime: u32,
        m: &MapData,
        via: Via,
    ) -> Result<Granted, Refusal> {
        let opts = ask.opts;
        if opts.filters.len() > self.compiled.config.options.max_filters {
            return Err(ResultCode::ExcessiveRemotePeers.into());
        }
        let wanted = match opts.port_set {
            Some(ps) if ps.size > 1 => {
                let by_internal = 65536 - u32::from(m.internal_port);
                u32::from(ps.size.min(self.compiled.config.options.max_port_set)).min(by_internal)
                    as u16
            }
            _ => 1,
        };
        self.quota_check(now, ask.subscriber, 1)?;
        let wanted = wanted.min(self.quota_left(ask.subscriber).max(1) as u16);
        let (ext_addr, ext_port, count) = self.map_external(now, ask, internal, m, wanted)?;
        let mapping = Mapping {
            id: UNASSIGNED,
            kind: MappingKind::Map,
            internal_addr: ask.subscriber,
            internal_port: m.internal_port,
            protocol: m.protocol,
            external_addr: ext_addr,
            external_port: ext_port,
            firewall: self.compiled.is_firewall(ask.subscriber),
            port_count: count,
            nonce: match via {
                Via::Pcp => m.nonce,
                Via::NatPmp => Nonce::default(),
            },
            created_ms: now,
            expires_ms: now + u64::from(lifetime) * 1000,
            // Set by `insert`.
            durable_ms: 0,
            client_port: ask.client.port(),
            natpmp: via == Via::NatPmp,
            extra: map_extra(ask),
        };
        let told = mapping.external_ip();
        self.insert(now, mapping);
        Ok(Granted {
            lifetime,
            external_addr: told,
            external_port: ext_port,
            port_set: (count > 1).then_some(PortSet {
                size: count,
                first_internal_port: m.internal_port,
                parity: opts.port_set.is_some_and(|p| p.parity),
            }),
        })
    }

    /// The external endpoint of a new MAP mapping and its port count: an
    /// existing outbound mapping's port (§11.3 item 4), else ports from the
    /// subscriber's port set (a pinhole's own, in a firewall class).
    fn map_external(
        &mut self,
        now: Millis,
        ask: &Ask<'_>,
        internal: InternalEndpoint,
        m: &MapData,
        wanted: u16,
    ) -> Result<(std::net::Ipv4Addr, u16, u16), Refusal> {
        let opts = ask.opts;
        let suggested = (m.external_addr, m.external_port);
        if let Some(port) = self.table.outbound_port(&internal) {
            let told = self.external_of(ask.subscriber);
            if opts.prefer_failure && !suggestion_matches(suggested, told, port) {
                return Err(ResultCode::CannotProvideExternal.into());
            }
            return Ok((self.subscriber_address(ask.subscriber), port, 1));
        }
        self.choose_ports(
            now,
            &PortAsk {
                internal,
                nonce: m.nonce,
                suggested,
                count: wanted,
                suggestion: if opts.prefer_failure {
                    Suggestion::Required
                } else {
                    Suggestion::Hint
                },
                parity: opts.port_set.is_some_and(|p| p.parity),
            },
        )
    }

    /// §11.3 renewal of an existing MAP mapping: PREFER_FAILURE, static
    /// mappings, NAT-PMP adoption, nonce, and FILTER/DESCRIPTION updates.
    fn map_renew(
        &mut self,
        now: Millis,
        ask: &Ask<'_>,
        slot: u32,
        lifetime: u32,
        m: &MapData,
        via: Via,
    ) -> Result<Granted, Refusal> {
        let opts = ask.opts;
        let mapping = self.table.get(slot).ok_or(ResultCode::NoResources)?;
        // §11.3 item 1: PREFER_FAILURE and a different suggestion.
        if opts.prefer_failure
            && !suggestion_matches(
                (m.external_addr, m.external_port),
                mapping.external_ip(),
                mapping.external_port,
            )
        {
            return Err(ResultCode::CannotProvideExternal.into());
        }
        if mapping.kind == MappingKind::Static {
            // §11.3 item 2: static mappings answer with 2^32-1.
            return Ok(Granted {
                lifetime: crate::types::STATIC_LIFETIME,
                external_addr: mapping.external_ip(),
                external_port: mapping.external_port,
                port_set: None,
            });
        }
        // NAT-PMP carries no nonce: it may renew only what NAT-PMP made, not
        // a PCP client's mapping (which its nonce protects, §11.3).
        if via == Via::NatPmp && !mapping.natpmp {
            return Err(Refusal {
                code: ResultCode::NotAuthorized,
                lifetime: Some(mapping.remaining_secs(now)),
            });
        }
        // A NAT-PMP mapping has no nonce (RFC 6886); PCP from the same host
        // adopts it and its nonce from then on.
        let adopt = via == Via::Pcp && mapping.natpmp;
        if via == Via::Pcp && !adopt {
            self.check_nonce(now, slot, m.nonce)?;
        }
        let filters = merged_filters(mapping.filters(), &opts.filters);
        if filters.len() > self.compiled.config.options.max_filters {
            return Err(ResultCode::ExcessiveRemotePeers.into());
        }
        let parity = opts.port_set.is_some_and(|p| p.parity);
        let mut granted = self.extend(now, slot, lifetime, ask.client, |mapping| {
            let mut changed = false;
            if adopt {
                mapping.natpmp = false;
                mapping.nonce = m.nonce;
                changed = true;
            }
            if opts.has_filter || opts.description.is_some() {
                let extra = mapping.extra.get_or_insert_with(Default::default);
                if opts.has_filter && extra.filters != filters {
                    extra.filters = filters;
                    changed = true;
                }
                if let Some(d) = opts.description {
                    if extra.description.as_deref() != Some(d) {
                        extra.description = Some(d.to_string());
                        changed = true;
                    }
                }
            }
            changed
        })?;
        if let Some(ps) = granted.port_set.as_mut() {
            ps.parity = parity;
        }
        Ok(granted)
    }
}

/// The options data a new MAP mapping keeps, if any.
fn map_extra(ask: &Ask<'_>) -> Option<Box<MappingExtra>> {
    let opts = ask.opts;
    let any = !opts.filters.is_empty()
        || opts.description.is_some()
        || opts.third_party.is_some()
        || opts.prefer_failure;
    any.then(|| {
        Box::new(MappingExtra {
            filters: opts
                .filters
                .iter()
                .copied()
                .filter(|f| f.prefix_len != 0)
                .collect(),
            description: opts.description.map(str::to_string),
            manager: opts.third_party.map(|_| ask.client.ip()),
            prefer_failure: opts.prefer_failure,
        })
    })
}

/// §13.3: new filters are added to the existing ones; prefix length 0
/// first removes them all.
fn merged_filters(existing: &[Filter], new: &[Filter]) -> Vec<Filter> {
    let mut filters = existing.to_vec();
    for f in new {
        if f.prefix_len == 0 {
            filters.clear();
        } else if !filters.contains(f) {
            filters.push(*f);
        }
    }
    filters
}

/// Whether a suggested external endpoint names `addr:port` (an unspecified
/// address matches any).
pub(super) fn suggestion_matches(suggested: (IpAddr, u16), addr: IpAddr, port: u16) -> bool {
    (suggested.0.is_unspecified() || suggested.0 == addr) && suggested.1 == port
}
