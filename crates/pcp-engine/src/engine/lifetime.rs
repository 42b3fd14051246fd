//! What MAP and PEER share once a mapping exists (RFC 6887 §15): the nonce
//! check (§11.3, §12.3), renewal, and deletion by the client; and the two
//! places a mapping enters and leaves the shard, [`Engine::insert`] and
//! [`Engine::remove`].

use std::net::{IpAddr, SocketAddr};

use pcp_wire::{MapData, Nonce, PortSet, ResultCode};

use super::map::Via;
use super::request::{Granted, Refusal};
use super::Engine;
use crate::config::DeleteAnswer;
use crate::types::{DeleteReason, Event, Mapping, MappingId, MappingKey, MappingKind, Millis};

/// Whether a new mapping is reported as created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Report {
    /// Queue `MappingCreated`.
    Created,
    /// Queue nothing: a restore, or a move the caller reports itself.
    Silent,
}

impl Engine {
    /// §11.3 / §12.3: a request whose nonce differs from the existing
    /// mapping's is NOT_AUTHORIZED, with that mapping's remaining lifetime.
    pub(super) fn check_nonce(&self, now: Millis, slot: u32, nonce: Nonce) -> Result<(), Refusal> {
        if self.table.nonce(slot).ok_or(ResultCode::NoResources)? == nonce {
            return Ok(());
        }
        let mapping = self.table.get(slot).ok_or(ResultCode::NoResources)?;
        Err(Refusal {
            code: ResultCode::NotAuthorized,
            lifetime: Some(mapping.remaining_secs(now)),
        })
    }

    /// Renews the mapping in `slot` for `lifetime` seconds on behalf of
    /// `client` (§14.2: updates go where the last response went), applying
    /// `update` to it first (which says whether it changed anything but the
    /// expiry); reports the renewal, as a refresh when the store already
    /// holds an expiry at least as late and nothing else changed.
    pub(super) fn extend(
        &mut self,
        now: Millis,
        slot: u32,
        lifetime: u32,
        client: SocketAddr,
        update: impl FnOnce(&mut Mapping) -> bool,
    ) -> Result<Granted, Refusal> {
        let expires = now + u64::from(lifetime) * 1000;
        let durable = self.durable_for(now, expires);
        let (snapshot, (old_expires, refreshed)) = self
            .table
            .update(slot, |mapping| {
                let old_expires = mapping.expires_ms;
                mapping.expires_ms = expires;
                mapping.client_port = client.port();
                let changed = update(mapping);
                let refreshed = !changed && expires <= mapping.durable_ms;
                if !refreshed {
                    mapping.durable_ms = durable;
                }
                (old_expires, refreshed)
            })
            .ok_or(ResultCode::NoResources)?;
        self.table.refreshed(slot, now);
        if snapshot.counts_against_quota() && snapshot.expires_ms != old_expires {
            // Later: the armed timer re-arms when it fires; earlier (a
            // shorter lifetime asked for): armed for the new expiry (§15).
            self.arm_expiry(slot, snapshot.id.generation, snapshot.expires_ms);
        }
        let granted = Granted {
            lifetime,
            external_addr: snapshot.external_ip(),
            external_port: snapshot.external_port,
            port_set: (snapshot.port_count > 1).then_some(PortSet {
                size: snapshot.port_count,
                first_internal_port: snapshot.internal_port,
                parity: false,
            }),
        };
        self.events.push_back(if refreshed {
            Event::MappingRefreshed(snapshot)
        } else {
            Event::MappingRenewed(snapshot)
        });
        Ok(granted)
    }

    /// A client's delete (lifetime 0, §15.1) of `subscriber`'s mapping in
    /// `existing`, if any: deleting what does not exist is SUCCESS; static
    /// mappings cannot be deleted by PCP; PCP must prove the nonce (NAT-PMP
    /// has none). The answer copies the suggestion (§15.1) unless the
    /// operator chose [`DeleteAnswer::External`].
    pub(super) fn delete_by_client(
        &mut self,
        now: Millis,
        subscriber: IpAddr,
        existing: Option<u32>,
        m: &MapData,
        via: Via,
    ) -> Result<Granted, Refusal> {
        let deleted = match existing {
            Some(slot) => {
                let mapping = self.table.get(slot).ok_or(ResultCode::NoResources)?;
                if mapping.kind == MappingKind::Static {
                    return Err(ResultCode::NotAuthorized.into());
                }
                match via {
                    Via::Pcp => self.check_nonce(now, slot, m.nonce)?,
                    // NAT-PMP deletes only what NAT-PMP made (no nonce to
                    // prove it is the PCP client's).
                    Via::NatPmp if !mapping.natpmp => return Err(ResultCode::NotAuthorized.into()),
                    Via::NatPmp => {}
                }
                let endpoint = (mapping.external_ip(), mapping.external_port);
                self.remove(now, slot, DeleteReason::Client);
                Some(endpoint)
            }
            None => None,
        };
        let external = self.compiled.config.compatibility.delete_answer == DeleteAnswer::External;
        if !external || via == Via::NatPmp {
            return Ok(Granted::deleted(m.external_addr, m.external_port));
        }
        let (addr, port) = deleted.unwrap_or_else(|| (self.promised_external(subscriber), 0));
        Ok(Granted::deleted(addr, port))
    }

    /// Puts a new mapping in the table and its subscriber's record, arms its
    /// expiry, and reports it as created.
    pub(super) fn insert(&mut self, now: Millis, mapping: Mapping) -> MappingId {
        self.insert_as(now, mapping, Report::Created)
    }

    /// Inserts a mapping (see [`Engine::insert`]); `report` says whether
    /// `MappingCreated` is queued.
    pub(super) fn insert_as(
        &mut self,
        now: Millis,
        mut mapping: Mapping,
        report: Report,
    ) -> MappingId {
        if report == Report::Created {
            mapping.durable_ms = self.durable_for(now, mapping.expires_ms);
        }
        let subscriber = mapping.internal_addr;
        let counted = mapping
            .counts_against_quota()
            .then_some(u32::from(mapping.port_count));
        let expires_ms = mapping.expires_ms;
        let id = self.table.insert(now, mapping);
        self.link(subscriber, id.slot, counted);
        if counted.is_some() {
            self.arm_expiry(id.slot, id.generation, expires_ms);
        }
        if report == Report::Created {
            if let Some(m) = self.table.get(id.slot) {
                self.events.push_back(Event::MappingCreated(m));
            }
        }
        id
    }

    /// The slot of the mapping `key` names, if it is still alive at `now`.
    /// A mapping whose lifetime has passed is gone from that instant for
    /// every request (§15), even before the timer wheel's sweep (which runs
    /// on whole seconds) reaps it: it is removed here, as expired.
    pub(super) fn find_live(&mut self, now: Millis, key: &MappingKey) -> Option<u32> {
        let slot = self.table.find(key)?;
        if self.table.expired_at(slot, now) {
            self.remove(now, slot, DeleteReason::Expired);
            return None;
        }
        Some(slot)
    }

    /// Takes the mapping in `slot` out and reports why.
    pub(super) fn remove(&mut self, now: Millis, slot: u32, reason: DeleteReason) {
        if let Some(mapping) = self.detach(now, slot) {
            self.events
                .push_back(Event::MappingDeleted { mapping, reason });
        }
    }

    /// Takes the mapping in `slot` out of the table and its subscriber's
    /// record; its ports go to the reuse delay (§15).
    pub(super) fn detach(&mut self, now: Millis, slot: u32) -> Option<Mapping> {
        let (mapping, released) = self.table.detach(slot)?;
        let subscriber = mapping.internal_addr;
        let delay = self.reuse_delay_ms(subscriber);
        for port in released {
            self.start_reuse_delay(now, delay, port, subscriber, mapping.nonce);
        }
        let counted = mapping
            .counts_against_quota()
            .then_some(u32::from(mapping.port_count));
        self.unlink(now, subscriber, slot, counted);
        Some(mapping)
    }
}
