//! Operator actions through the admin API: static mappings (RFC 6887
//! §11.3 item 2: not deletable by PCP, lifetime 2^32-1), deletes, and the
//! take-back of a mapping the dataplane refused.

use std::net::{IpAddr, Ipv4Addr};

use pcp_wire::{Nonce, ResultCode};

use super::ports::{PortAsk, Suggestion};
use super::table::UNASSIGNED;
use super::Engine;
use crate::types::{
    DeleteReason, Event, InternalEndpoint, Mapping, MappingId, MappingKey, MappingKind, Millis,
};

impl Engine {
    /// Creates a static mapping for `internal` (operator action). The
    /// external port comes from the subscriber's port set (`external_port`
    /// is a hint). Static mappings do not count against the quota.
    pub fn create_static(
        &mut self,
        now: Millis,
        internal: InternalEndpoint,
        external_port: u16,
    ) -> Result<Mapping, ResultCode> {
        if self.compiled.class_of(internal.addr).is_none() {
            return Err(ResultCode::NotAuthorized);
        }
        if internal.port == 0 || !self.compiled.config.protocols.contains(&internal.protocol) {
            return Err(ResultCode::UnsuppProtocol);
        }
        if self.table.find(&MappingKey::inbound(internal)).is_some() {
            return Err(ResultCode::CannotProvideExternal);
        }
        self.subscriber_entry(now, internal.addr)
            .ok_or(ResultCode::NotAuthorized)?;
        let ask = PortAsk {
            internal,
            nonce: Nonce::default(),
            suggested: (IpAddr::V4(Ipv4Addr::UNSPECIFIED), external_port),
            count: 1,
            suggestion: Suggestion::Hint,
            parity: false,
        };
        // A refused subscriber leaves no record behind; a granted one keeps
        // it (a pinhole takes no block, so its record holds only the
        // mapping about to be linked).
        let (addr, port, _) = match self.choose_ports(now, &ask) {
            Ok(chosen) => chosen,
            Err(r) => {
                self.forget_if_stateless(internal.addr);
                return Err(r.code);
            }
        };
        let mapping = Mapping {
            id: UNASSIGNED,
            kind: MappingKind::Static,
            internal_addr: internal.addr,
            internal_port: internal.port,
            protocol: internal.protocol,
            external_addr: addr,
            external_port: port,
            firewall: self.compiled.is_firewall(internal.addr),
            port_count: 1,
            nonce: Nonce::default(),
            created_ms: now,
            expires_ms: Millis::MAX,
            // Set by `insert`.
            durable_ms: 0,
            client_port: 0,
            natpmp: false,
            extra: None,
        };
        let id = self.insert(now, mapping);
        self.table.get(id.slot).ok_or(ResultCode::NoResources)
    }

    /// Deletes a mapping by id (operator action).
    pub fn delete(&mut self, now: Millis, id: MappingId) -> Option<Mapping> {
        self.delete_for(now, id, DeleteReason::Operator)
    }

    /// Takes back a mapping the dataplane could not install: the daemon
    /// answers its request with an error instead (a client is told success
    /// only for what forwards traffic).
    pub fn revoke(&mut self, now: Millis, id: MappingId) -> Option<Mapping> {
        self.delete_for(now, id, DeleteReason::Dataplane)
    }

    fn delete_for(&mut self, now: Millis, id: MappingId, reason: DeleteReason) -> Option<Mapping> {
        self.table.by_id(id)?;
        let m = self.detach(now, id.slot)?;
        self.events.push_back(Event::MappingDeleted {
            mapping: m.clone(),
            reason,
        });
        Some(m)
    }
}
