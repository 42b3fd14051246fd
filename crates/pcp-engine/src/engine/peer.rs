//! PEER (RFC 6887 §12.3): an outbound mapping to one remote peer, with
//! endpoint-independent mapping (RFC 4787 REQ-1) for the internal endpoint.
//! Renewal and deletion, shared with MAP, are in `lifetime.rs`.

use std::net::{IpAddr, Ipv4Addr};

use pcp_wire::{MapData, PeerData, ResultCode};

use super::map::{suggestion_matches, Ask, Via};
use super::ports::{PortAsk, Suggestion};
use super::request::{Granted, Refusal};
use super::table::UNASSIGNED;
use super::Engine;
use crate::types::{Mapping, MappingExtra, MappingKey, MappingKind, Millis};

impl Engine {
    /// RFC 6887 §12.3.
    pub(super) fn peer(
        &mut self,
        now: Millis,
        ask: &Ask<'_>,
        p: &PeerData,
    ) -> Result<Granted, Refusal> {
        let m = &p.map;
        if m.protocol == 0 || m.internal_port == 0 {
            return Err(ResultCode::MalformedRequest.into());
        }
        if !self.compiled.config.protocols.contains(&m.protocol) {
            return Err(ResultCode::UnsuppProtocol.into());
        }
        // §12.3: an invalid remote peer is MALFORMED_REQUEST.
        let r = p.remote_addr;
        if r.is_unspecified()
            || r.is_loopback()
            || r.is_multicast()
            || p.remote_port == 0
            || matches!(r, IpAddr::V4(a) if a.is_broadcast())
        {
            return Err(ResultCode::MalformedRequest.into());
        }
        let key = MappingKey::of_peer(ask.subscriber, p);
        let existing = self.find_live(now, &key);
        if ask.lifetime == 0 {
            return self.delete_by_client(now, ask.subscriber, existing, m, Via::Pcp);
        }
        let lifetime = self.compiled.clamp_lifetime(ask.lifetime);
        if let Some(slot) = existing {
            self.check_nonce(now, slot, m.nonce)?;
            return self.extend(now, slot, lifetime, ask.client, |_| false);
        }
        self.peer_create(now, ask, key, lifetime, p)
    }

    fn peer_create(
        &mut self,
        now: Millis,
        ask: &Ask<'_>,
        key: MappingKey,
        lifetime: u32,
        p: &PeerData,
    ) -> Result<Granted, Refusal> {
        let m = &p.map;
        self.quota_check(now, ask.subscriber, 1)?;
        let (ext_addr, ext_port) = self.peer_external(now, ask, key, m)?;
        let opts = ask.opts;
        let extra = (opts.description.is_some() || opts.third_party.is_some()).then(|| {
            Box::new(MappingExtra {
                filters: Vec::new(),
                description: opts.description.map(str::to_string),
                manager: opts.third_party.map(|_| ask.client.ip()),
                prefer_failure: false,
            })
        });
        let mapping = Mapping {
            id: UNASSIGNED,
            kind: MappingKind::Peer {
                remote_addr: p.remote_addr,
                remote_port: p.remote_port,
            },
            internal_addr: ask.subscriber,
            internal_port: m.internal_port,
            protocol: m.protocol,
            external_addr: ext_addr,
            external_port: ext_port,
            firewall: self.compiled.is_firewall(ask.subscriber),
            port_count: 1,
            nonce: m.nonce,
            created_ms: now,
            expires_ms: now + u64::from(lifetime) * 1000,
            // Set by `insert`.
            durable_ms: 0,
            client_port: ask.client.port(),
            natpmp: false,
            extra,
        };
        let told = mapping.external_ip();
        self.insert(now, mapping);
        Ok(Granted {
            lifetime,
            external_addr: told,
            external_port: ext_port,
            port_set: None,
        })
    }

    /// The external endpoint of a new PEER mapping: the internal endpoint's
    /// existing one (endpoint-independent mapping, RFC 4787 REQ-1 and RFC
    /// 6888 REQ-1), else a new port; a suggestion that cannot be honoured
    /// is CANNOT_PROVIDE_EXTERNAL (§12.3).
    fn peer_external(
        &mut self,
        now: Millis,
        ask: &Ask<'_>,
        key: MappingKey,
        m: &MapData,
    ) -> Result<(Ipv4Addr, u16), Refusal> {
        let suggested = (m.external_addr, m.external_port);
        let suggested_any = suggested.0.is_unspecified() && suggested.1 == 0;
        let endpoint = self
            .table
            .find(&MappingKey::inbound(key.internal))
            .and_then(|slot| self.table.get(slot))
            .filter(|m| m.port_count == 1)
            .map(|m| m.external_port)
            .or_else(|| self.table.outbound_port(&key.internal));
        if let Some(port) = endpoint {
            let ext = self.subscriber_address(ask.subscriber);
            let told = self.external_of(ask.subscriber);
            if !suggested_any && !suggestion_matches(suggested, told, port) {
                return Err(ResultCode::CannotProvideExternal.into());
            }
            return Ok((ext, port));
        }
        // §12.3: PEER behaves as if PREFER_FAILURE were present when it
        // suggests something.
        let (a, port, _) = self.choose_ports(
            now,
            &PortAsk {
                internal: key.internal,
                nonce: m.nonce,
                suggested,
                count: 1,
                suggestion: if suggested_any {
                    Suggestion::Hint
                } else {
                    Suggestion::Required
                },
                parity: false,
            },
        )?;
        Ok((a, port))
    }
}
