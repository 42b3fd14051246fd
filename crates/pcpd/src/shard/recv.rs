//! Receiving: batches of datagrams from each socket (recvmmsg through
//! quinn-udp, with the destination address of each), the hand-off of
//! datagrams owned by another shard, and the flush that settles a batch
//! and sends its replies.

use std::cell::RefCell;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use pcp_engine::{shard_of, subscriber_key};
use quinn_udp::RecvMeta;
use tokio::io::Interest;
use tokio::sync::{mpsc, Notify};

use pcp_wire::ResultCode;

use super::effects::{Completed, Origin};
use super::now_ms;
use super::replies::{Peer, REPLY_SLOTS};
use super::stage::{Stage, STAGE};
use super::{Handoff, ShardHandle, Sockets, State, MAX_DATAGRAM};
use crate::cluster::Admit;

/// Receive buffer per datagram: large enough to see oversize requests.
const RECV_BUF: usize = 1500;
/// Datagrams received per system call (at most quinn-udp's batch).
const BATCH: usize = 32;

/// Answers one datagram into the reply arena (flushing it first when full).
pub(super) fn handle_one(st: &mut State, sockets: &Sockets, peer: Peer, datagram: &[u8]) {
    if st.replies.is_full() {
        flush(st, sockets);
    }
    let started = Instant::now();
    if let Some(own) = &st.ownership {
        // Cluster mode: only partitions this node certainly owns.
        let subscriber = subscriber_key(datagram, peer.src.ip());
        match own.admit(subscriber, now_ms()) {
            Admit::Yes => {}
            Admit::Uncertain => {
                st.replies
                    .refuse(&st.engine, peer, datagram, ResultCode::NoResources);
                return;
            }
            Admit::NotOwner => {
                st.metrics.drop_io("cluster_not_owner");
                return;
            }
        }
    }
    if let Some(slot) = st.replies.answer(&mut st.engine, peer, datagram) {
        st.effects.collect(&mut st.engine, Origin::Reply(slot));
    }
    st.metrics.latency.observe(started.elapsed().as_secs_f64());
}

/// Batches that wait for the journal writer or the dataplane at most
/// (their replies are held; past this the shard stops receiving until the
/// oldest is answered, and datagrams wait in the socket's buffer).
const IN_FLIGHT: usize = 4;
/// The same with a dataplane that waits on the kernel (nftables): a batch
/// whose removals hold only from the kernel's next tick is answered a few
/// ms after its transaction, and the batches behind it with it (answers
/// leave in order), so more are held while the shard goes on receiving.
const IN_FLIGHT_KERNEL: usize = 16;

/// Ends a batch. With the journal store, its records go to the writer
/// thread and its replies are parked until their own commit completes and
/// their changes are applied (`commit_loop`), so the shard goes on
/// receiving meanwhile. Otherwise
/// (cluster mode, a poisoned journal) it settles now and sends the held
/// replies, each as the outcome allows (see `effects.rs`).
pub(super) fn flush(st: &mut State, sockets: &Sockets) {
    if !st.effects.pipelined() {
        let settled = st.effects.settle(&mut st.engine);
        // Batches completed meanwhile go first (they came first).
        answer_finished(st, sockets);
        st.replies.apply(&settled, &st.engine);
        st.replies.send_all(&mut st.sender, sockets, &st.metrics);
        return;
    }
    if st.replies.is_empty() && !st.effects.has_events() {
        return;
    }
    st.effects.submit(&st.engine);
    st.parked.park(&mut st.replies);
    // A batch with nothing to write may be complete already.
    answer_finished(st, sockets);
}

/// Whether fewer batches than the shard may hold are held.
fn has_room(st: &State) -> bool {
    let cap = if st.effects.dataplane_waits() {
        IN_FLIGHT_KERNEL
    } else {
        IN_FLIGHT
    };
    st.effects.in_flight() < cap
}

/// Waits (without blocking the shard's thread) until there is room
/// ([`has_room`]); woken each time a held batch is answered
/// (`Parked::recycle`).
async fn until_room(state: &Rc<RefCell<State>>, room: &Notify) {
    loop {
        // Created before the check, so an answer in between is not missed.
        let answered = room.notified();
        if has_room(&state.borrow()) {
            return;
        }
        // Re-checked now and then too: a wake-up that never comes must not
        // stop the shard from receiving for good.
        tokio::select! {
            _ = answered => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Answers the oldest batch the journal writer has completed (with
/// `wait`, waits for it); false when there is none.
fn finish_one(st: &mut State, sockets: &Sockets, wait: bool) -> bool {
    match st.effects.complete(&mut st.engine, wait) {
        None => false,
        Some(Completed::Other) => true,
        Some(Completed::Batch(settled)) => {
            if let Some(mut arena) = st.parked.next() {
                arena.apply(&settled, &st.engine);
                arena.send_all(&mut st.sender, sockets, &st.metrics);
                st.parked.recycle(arena);
            }
            true
        }
    }
}

/// Waits for every batch with the journal writer and answers it (before
/// an operator request, and so before a shutdown: none is left unanswered
/// and unlogged).
pub(super) fn drain(st: &mut State, sockets: &Sockets) {
    while finish_one(st, sockets, true) {}
}

/// Answers every batch the journal writer has completed, without waiting.
pub(super) fn answer_finished(st: &mut State, sockets: &Sockets) {
    while finish_one(st, sockets, false) {}
}

/// Answers batches as the journal writer and the dataplane complete them.
pub(super) async fn commit_loop(
    state: Rc<RefCell<State>>,
    sockets: Sockets,
    wake: std::sync::Arc<Notify>,
    timer: Rc<Notify>,
) {
    loop {
        wake.notified().await;
        answer_finished(&mut state.borrow_mut(), &sockets);
        // Mappings just made durable may bring the next deadline closer.
        timer.notify_one();
    }
}

/// The receive loop of socket `si`: per cycle, read what the socket holds
/// (up to the stage), hand off what another shard owns, answer the rest
/// (see `stage.rs` for what happens when that is more than the budget),
/// then yield.
pub(super) async fn recv_loop(
    si: usize,
    state: Rc<RefCell<State>>,
    sockets: Sockets,
    peers: Vec<ShardHandle>,
    timer: Rc<Notify>,
) {
    let batch = quinn_udp::BATCH_SIZE.clamp(1, BATCH);
    let mut bufs: Box<[[u8; RECV_BUF]; BATCH]> = Box::new([[0u8; RECV_BUF]; BATCH]);
    let mut metas = [RecvMeta::default(); BATCH];
    let mut stage = Stage::new();
    let room = state.borrow().parked.answered();
    loop {
        until_room(&state, &room).await;
        let (sock, udp) = &sockets[si];
        if sock.readable().await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        {
            let mut st = state.borrow_mut();
            let index = st.effects.index;
            // Group commit: what the socket holds goes into one cycle, so
            // one fdatasync covers many requests.
            while !stage.is_full() {
                let mut iovs = bufs.each_mut().map(|b| IoSliceMut::new(&mut b[..]));
                let room = batch.min(STAGE - stage.len());
                let n = match sock.try_io(Interest::READABLE, || {
                    udp.recv(sock.into(), &mut iovs[..room], &mut metas[..room])
                }) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(shard = index, "recv: {e}");
                        break;
                    }
                };
                for (meta, buf) in metas.iter().zip(bufs.iter()).take(n) {
                    for datagram in buf[..meta.len].chunks(meta.stride.max(1)) {
                        let src = SocketAddr::new(meta.addr.ip().to_canonical(), meta.addr.port());
                        let peer = Peer {
                            socket: si,
                            src,
                            dst_ip: meta.dst_ip,
                        };
                        // Oversize datagrams only ever get MALFORMED_REQUEST
                        // (§8.2), which changes no state: answer them here.
                        if datagram.len() > MAX_DATAGRAM {
                            handle_one(&mut st, &sockets, peer, datagram);
                            continue;
                        }
                        let to = shard_of(subscriber_key(datagram, src.ip()), peers.len());
                        if to != index {
                            hand_off(&st, &peers[to], peer, datagram);
                        } else if stage.is_full() {
                            st.metrics.drop_io("overload_stage_full");
                        } else {
                            stage.push(peer, datagram);
                        }
                    }
                }
            }
            stage.answer(&mut st, &sockets);
        }
        timer.notify_one();
        // Let the other socket and the timers run (DESIGN.md).
        tokio::task::yield_now().await;
    }
}

fn hand_off(st: &State, to: &ShardHandle, peer: Peer, datagram: &[u8]) {
    let mut h = Handoff {
        len: datagram.len() as u16,
        buf: [0u8; MAX_DATAGRAM],
        src: peer.src,
        dst_ip: peer.dst_ip,
        socket: peer.socket as u8,
    };
    h.buf[..datagram.len()].copy_from_slice(datagram);
    if to.handoff.try_send(h).is_ok() {
        st.metrics.handoffs.inc();
    } else {
        st.metrics.drop_io("handoff_queue_full");
    }
}

/// Answers datagrams other shards handed over: this one and what else is
/// queued, bounded, then one flush.
pub(super) async fn handoff_loop(
    state: Rc<RefCell<State>>,
    sockets: Sockets,
    mut rx: mpsc::Receiver<Handoff>,
    timer: Rc<Notify>,
) {
    let room = state.borrow().parked.answered();
    loop {
        until_room(&state, &room).await;
        let Some(first) = rx.recv().await else { break };
        {
            let mut st = state.borrow_mut();
            let mut next = Some(first);
            let mut budget = REPLY_SLOTS;
            while let Some(h) = next.take() {
                let peer = Peer {
                    socket: usize::from(h.socket),
                    src: h.src,
                    dst_ip: h.dst_ip,
                };
                handle_one(&mut st, &sockets, peer, &h.buf[..usize::from(h.len)]);
                budget -= 1;
                if budget > 0 {
                    next = rx.try_recv().ok();
                }
            }
            flush(&mut st, &sockets);
        }
        timer.notify_one();
    }
}
