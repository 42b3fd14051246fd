//! The §14 outbox: unsolicited messages and their retransmissions. Restart
//! ANNOUNCE (§14.1.3: at least 250 ms apart, then doubling), mapping
//! updates after a move (§14.2: until the client refreshes the mapping),
//! and NAT-PMP's address announcements (RFC 6886 §3.2.1).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pcp_wire::pcp::field;
use pcp_wire::{MapData, OpData, Options, PcpOption, PeerData, Response, ResultCode};

use super::Engine;
use crate::types::{Mapping, MappingKind, Millis, Transmit};

/// First retransmission interval (§14.1.3, §14.2).
const FIRST_INTERVAL_MS: u64 = 250;

/// A §14.2 update: what it reports and for which mapping.
#[derive(Debug, Clone)]
pub(super) struct Update {
    /// The mapping it reports (`u32::MAX`: none, an error update).
    pub(super) slot: u32,
    pub(super) generation: u32,
    /// When it was queued; a refresh after this stops it.
    pub(super) stamp: Millis,
    pub(super) payload: Vec<u8>,
    pub(super) dst: SocketAddr,
}

#[derive(Debug, Clone)]
enum Message {
    /// Restart ANNOUNCE (§14.1.3).
    Announce(SocketAddr),
    /// Mapping update (§14.2).
    Update(Update),
    /// NAT-PMP's gratuitous public-address response (RFC 6886 §3.2.1).
    NatPmp { dst: SocketAddr, addr: Ipv4Addr },
}

/// One queued message, with how many more times it goes out.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    message: Message,
    left: u8,
    interval_ms: u64,
}

/// Messages by when they are due (and queue order).
#[derive(Default)]
pub(super) struct Outbox {
    queue: BTreeMap<(Millis, u64), Pending>,
    seq: u64,
}

impl Outbox {
    fn push(&mut self, at: Millis, pending: Pending) {
        self.seq += 1;
        self.queue.insert((at, self.seq), pending);
    }

    pub(super) fn next_deadline(&self) -> Option<Millis> {
        self.queue.keys().next().map(|(t, _)| *t)
    }

    pub(super) fn pop_due(&mut self, now: Millis) -> Option<Pending> {
        let entry = self.queue.first_entry()?;
        (entry.key().0 <= now).then(|| entry.remove())
    }
}

impl Engine {
    /// Queues restart ANNOUNCEs (RFC 6887 §14.1.3) to the configured groups
    /// (port 5350) and to `clients`: call after starting with lost state.
    pub fn announce_restart(&mut self, now: Millis, clients: &[SocketAddr]) {
        let count = self.compiled.config.unsolicited.announce_count.clamp(1, 10);
        let groups: Vec<SocketAddr> = self
            .compiled
            .config
            .unsolicited
            .announce_targets
            .iter()
            .map(|ip| SocketAddr::new(*ip, pcp_wire::CLIENT_PORT))
            .collect();
        for dst in groups.iter().copied().chain(clients.iter().copied()) {
            self.outbox.push(
                now,
                Pending {
                    message: Message::Announce(dst),
                    left: count - 1,
                    interval_ms: FIRST_INTERVAL_MS,
                },
            );
        }
        // RFC 6886 §3.2.1: NAT-PMP listeners ignore the PCP form. The
        // multicast says one address to the whole link, so it goes only
        // when that is true (one external address in all); on a CGNAT
        // with many, a NAT-PMP client learns of the loss from the epoch
        // of its next renewal (§3.6) and its address from the answer.
        let Some(addr) = self
            .pools
            .single_address()
            .filter(|_| self.compiled.config.natpmp)
        else {
            return;
        };
        for dst in groups.into_iter().filter(SocketAddr::is_ipv4) {
            self.queue_natpmp(now, dst, addr);
        }
    }

    /// Queues NAT-PMP address announcements to `dst` (a group, or one
    /// client's port 5350), 10 by default, 250 ms apart, then doubling.
    pub(super) fn queue_natpmp(&mut self, now: Millis, dst: SocketAddr, addr: Ipv4Addr) {
        let count = self
            .compiled
            .config
            .unsolicited
            .natpmp_announce_count
            .clamp(1, 10);
        self.outbox.push(
            now,
            Pending {
                message: Message::NatPmp { dst, addr },
                left: count - 1,
                interval_ms: FIRST_INTERVAL_MS,
            },
        );
    }

    /// Queues a §14.2 update to go out now and `count - 1` more times.
    pub(super) fn queue_update(&mut self, now: Millis, update: Update, count: u8) {
        self.outbox.push(
            now,
            Pending {
                message: Message::Update(update),
                left: count.max(1) - 1,
                interval_ms: FIRST_INTERVAL_MS,
            },
        );
    }

    pub(super) fn send_pending(&mut self, now: Millis, pending: Pending) {
        let sent = match &pending.message {
            Message::Announce(dst) => self.announce_payload(now).map(|p| (*dst, p)),
            Message::Update(u) => self.update_due(now, u).map(|p| (u.dst, p)),
            Message::NatPmp { dst, addr } => {
                // §3.2.1: the epoch is updated in each transmission.
                let resp = pcp_wire::natpmp::Response::PublicAddress {
                    result: pcp_wire::NatPmpResult::Success,
                    epoch: self.epoch(now),
                    addr: *addr,
                };
                let mut buf = [0u8; 12];
                resp.emit(&mut buf).ok().map(|n| (*dst, buf[..n].to_vec()))
            }
        };
        let Some((dst, payload)) = sent else {
            return;
        };
        self.stats.unsolicited += 1;
        self.transmits.push_back(Transmit { dst, payload });
        if pending.left > 0 {
            // §14.1.3: at least 250 ms, then at least doubling.
            self.outbox.push(
                now + pending.interval_ms,
                Pending {
                    message: pending.message,
                    left: pending.left - 1,
                    interval_ms: pending.interval_ms * 2,
                },
            );
        }
    }

    fn announce_payload(&self, now: Millis) -> Option<Vec<u8>> {
        let mut buf = [0u8; pcp_wire::pcp::HEADER_LEN];
        let resp = Response {
            result: ResultCode::Success,
            lifetime: 0,
            epoch: self.epoch(now),
            data: OpData::Announce,
            options: Options::NONE,
        };
        resp.emit(&mut buf).ok().map(|n| buf[..n].to_vec())
    }

    /// The update's datagram with the current epoch, unless the client has
    /// refreshed the mapping since (§14.2: then it stops).
    fn update_due(&self, now: Millis, u: &Update) -> Option<Vec<u8>> {
        let alive = self.table.unrefreshed_since(u.slot, u.generation, u.stamp);
        // An error update (PREFER_FAILURE) outlives its mapping.
        let is_error = u.payload.get(field::RESULT).is_some_and(|c| *c != 0);
        if !alive && !is_error {
            return None;
        }
        let mut payload = u.payload.clone();
        if let Some(epoch) = payload.get_mut(field::EPOCH) {
            epoch.copy_from_slice(&self.epoch(now).to_be_bytes());
        }
        Some(payload)
    }

    /// The unsolicited MAP/PEER response for a moved mapping (§14.2): the
    /// response it would have got, with THIRD_PARTY and FILTER carried.
    pub(super) fn update_payload(
        &self,
        now: Millis,
        m: &Mapping,
        result: ResultCode,
        new: Option<(Ipv4Addr, u16)>,
    ) -> Vec<u8> {
        let (ext_addr, ext_port) = new.map_or((m.external_ip(), m.external_port), |(a, p)| {
            (IpAddr::V4(a), p)
        });
        let map = MapData {
            nonce: m.nonce,
            protocol: m.protocol,
            internal_port: m.internal_port,
            external_port: ext_port,
            external_addr: ext_addr,
        };
        let data = match m.kind {
            MappingKind::Peer {
                remote_addr,
                remote_port,
            } => OpData::Peer(PeerData {
                map,
                remote_port,
                remote_addr,
            }),
            _ => OpData::Map(map),
        };
        let mut opts: Vec<PcpOption<'_>> = Vec::new();
        if m.extra.as_ref().is_some_and(|e| e.manager.is_some()) {
            opts.push(PcpOption::ThirdParty(m.internal_addr));
        }
        if m.extra.as_ref().is_some_and(|e| e.prefer_failure) {
            opts.push(PcpOption::PreferFailure);
        }
        for f in m.filters() {
            opts.push(PcpOption::Filter(*f));
        }
        let lifetime = if result == ResultCode::Success {
            m.remaining_secs(now)
        } else {
            self.compiled.error_lifetime(result)
        };
        let resp = Response {
            result,
            lifetime,
            epoch: self.epoch(now),
            data,
            options: Options::List(&opts),
        };
        let mut buf = vec![0u8; resp.buffer_len().min(pcp_wire::pcp::MAX_MESSAGE_LEN)];
        match resp.emit(&mut buf) {
            Ok(n) => buf.truncate(n),
            Err(_) => buf.clear(),
        }
        buf
    }
}
