//! Replies held until their batch is settled, then sent from the address
//! each request was sent to. A refusal from [`Settled::refusal`] replaces
//! the held answer here and nowhere else.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use pcp_engine::Engine;
use pcp_wire::{Opcode, ResultCode};
use tokio::sync::Notify;

use super::effects::{Origin, Settled};
use super::send::Sender;
use super::{now_ms, Sockets, MAX_DATAGRAM};
use crate::metrics::Metrics;

/// Replies held before a flush.
pub(super) const REPLY_SLOTS: usize = 256;

/// A reply waiting in `replies[slot]`, its request in `requests[slot]`.
#[derive(Clone, Copy)]
struct Held {
    socket: usize,
    dst: SocketAddr,
    src_ip: Option<IpAddr>,
    len: usize,
    request_len: usize,
}

/// Where a datagram came from and arrived.
#[derive(Clone, Copy)]
pub(super) struct Peer {
    pub(super) socket: usize,
    pub(super) src: SocketAddr,
    pub(super) dst_ip: Option<IpAddr>,
}

/// The held replies of one batch.
pub(super) struct ReplyArena {
    held: Vec<Held>,
    replies: Box<[[u8; MAX_DATAGRAM]; REPLY_SLOTS]>,
    /// The requests, to answer with an error instead.
    requests: Box<[[u8; MAX_DATAGRAM]; REPLY_SLOTS]>,
}

impl ReplyArena {
    pub(super) fn new() -> Self {
        ReplyArena {
            held: Vec::with_capacity(REPLY_SLOTS),
            replies: Box::new([[0u8; MAX_DATAGRAM]; REPLY_SLOTS]),
            requests: Box::new([[0u8; MAX_DATAGRAM]; REPLY_SLOTS]),
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.held.len() == REPLY_SLOTS
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Lets the engine answer `datagram` into the next slot; returns the
    /// slot when there is a reply to hold.
    pub(super) fn answer(
        &mut self,
        engine: &mut Engine,
        peer: Peer,
        datagram: &[u8],
    ) -> Option<usize> {
        let slot = self.held.len();
        let n = engine.handle(now_ms(), peer.src, datagram, &mut self.replies[slot])?;
        let request_len = datagram.len().min(MAX_DATAGRAM);
        self.requests[slot][..request_len].copy_from_slice(&datagram[..request_len]);
        self.held.push(Held {
            socket: peer.socket,
            dst: peer.src,
            src_ip: peer.dst_ip,
            len: n,
            request_len,
        });
        Some(slot)
    }

    /// Holds an error answer with `code` for `datagram`, without asking
    /// the engine (cluster mode: the partition's lease is uncertain).
    pub(super) fn refuse(
        &mut self,
        engine: &Engine,
        peer: Peer,
        datagram: &[u8],
        code: ResultCode,
    ) {
        let slot = self.held.len();
        let lifetime = engine.compiled().error_lifetime(code);
        let epoch = engine.epoch(now_ms());
        let Some(n) =
            pcp_wire::late_error_response(datagram, code, lifetime, epoch, &mut self.replies[slot])
        else {
            return;
        };
        self.held.push(Held {
            socket: peer.socket,
            dst: peer.src,
            src_ip: peer.dst_ip,
            len: n,
            request_len: 0,
        });
    }

    /// Replaces every held reply the batch's outcome refuses: a refusal
    /// for its own change, or any success that reports state while the
    /// state is not durable.
    pub(super) fn apply(&mut self, settled: &Settled, engine: &Engine) {
        let now = now_ms();
        let epoch = engine.epoch(now);
        for slot in 0..self.held.len() {
            let refusal = settled.refusal(Origin::Reply(slot)).or_else(|| {
                (!settled.durable && reports_state(self.reply(slot)))
                    .then_some(ResultCode::NoResources)
            });
            let Some(code) = refusal else { continue };
            let lifetime = engine.compiled().error_lifetime(code);
            let h = &mut self.held[slot];
            let request = &self.requests[slot][..h.request_len];
            if let Some(n) = pcp_wire::late_error_response(
                request,
                code,
                lifetime,
                epoch,
                &mut self.replies[slot],
            ) {
                h.len = n;
            }
        }
    }

    fn reply(&self, slot: usize) -> &[u8] {
        &self.replies[slot][..self.held[slot].len]
    }

    /// Sends every held reply and empties the arena.
    pub(super) fn send_all(&mut self, sender: &mut Sender, sockets: &Sockets, metrics: &Metrics) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (i, r) in self.held.iter().enumerate() {
                log_reply(r.dst, &self.replies[i][..r.len]);
            }
        }
        // Runs of replies by the same socket from the same address go out
        // together (send.rs).
        let mut run: Vec<(SocketAddr, &[u8])> = Vec::with_capacity(self.held.len());
        let mut start = 0;
        while start < self.held.len() {
            let (socket, src) = (self.held[start].socket, self.held[start].src_ip);
            let end = self.held[start..]
                .iter()
                .position(|h| h.socket != socket || h.src_ip != src)
                .map_or(self.held.len(), |n| start + n);
            run.clear();
            run.extend(
                self.held[start..end]
                    .iter()
                    .zip(&self.replies[start..end])
                    .map(|(h, r)| (h.dst, &r[..h.len])),
            );
            let unsent = sender.send_from(&sockets[socket], src, &run);
            if unsent > 0 {
                metrics.drop_io_n("send_failed", unsent as u64);
            }
            start = end;
        }
        self.held.clear();
    }
}

/// The reply arenas of batches the journal writer has not completed,
/// oldest first, and emptied arenas kept for reuse (one allocation per
/// arena for the life of the shard).
#[derive(Default)]
pub(super) struct Parked {
    queue: VecDeque<ReplyArena>,
    spare: Vec<ReplyArena>,
    /// Notified each time a parked batch has been answered.
    answered: Rc<Notify>,
}

impl Parked {
    /// Parks the current arena with its batch and gives `current` an
    /// empty one.
    pub(super) fn park(&mut self, current: &mut ReplyArena) {
        let fresh = self.spare.pop().unwrap_or_else(ReplyArena::new);
        self.queue.push_back(std::mem::replace(current, fresh));
    }

    /// The oldest parked arena (its batch completed).
    pub(super) fn next(&mut self) -> Option<ReplyArena> {
        self.queue.pop_front()
    }

    /// Keeps a sent (empty) arena for reuse, and wakes whoever waits for
    /// a batch to be answered.
    pub(super) fn recycle(&mut self, arena: ReplyArena) {
        self.spare.push(arena);
        self.answered.notify_waiters();
    }

    /// Notified each time a parked batch has been answered.
    pub(super) fn answered(&self) -> Rc<Notify> {
        self.answered.clone()
    }
}

/// One debug line per answered request, as sent (after any refusal):
/// protocol, opcode, result and lifetime; never the nonce.
fn log_reply(client: SocketAddr, reply: &[u8]) {
    use pcp_wire::pcp::field;
    match reply.first() {
        Some(&pcp_wire::natpmp::VERSION) => {
            let opcode = reply.get(1).map_or(0, |o| o & 0x7f);
            let result = reply
                .get(2..4)
                .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            tracing::debug!(%client, protocol = "nat-pmp", opcode, result, "answered");
        }
        Some(_) => {
            let opcode = reply
                .get(field::OPCODE)
                .map_or(Opcode::from(0), |o| Opcode::from(o & 0x7f));
            let result = reply
                .get(field::RESULT)
                .map_or(ResultCode::from(0), |r| ResultCode::from(*r));
            let lifetime = reply
                .get(4..8)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            tracing::debug!(
                %client,
                protocol = "pcp",
                opcode = opcode.name(),
                result = result.name(),
                lifetime,
                "answered"
            );
        }
        None => {}
    }
}

/// Whether a reply is a success that tells the client about state: a PCP
/// MAP or PEER success, or a NAT-PMP success (public address or mapping).
/// ANNOUNCE and error answers report nothing that could be lost.
fn reports_state(reply: &[u8]) -> bool {
    use pcp_wire::pcp::field;
    match reply.first() {
        Some(&pcp_wire::natpmp::VERSION) => reply.get(2..4) == Some(&[0, 0]),
        Some(_) => {
            let opcode = reply.get(field::OPCODE).map(|o| Opcode::from(o & 0x7f));
            reply.get(field::RESULT) == Some(&u8::from(ResultCode::Success))
                && matches!(opcode, Some(Opcode::Map | Opcode::Peer))
        }
        None => false,
    }
}
