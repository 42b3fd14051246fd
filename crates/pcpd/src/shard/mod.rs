//! I/O shards: one thread per shard, each with its own current-thread
//! runtime, its own engine and dataplane, and one SO_REUSEPORT socket per
//! listen address.
//!
//! | file | what lives there |
//! |---|---|
//! | `recv.rs` | batched receive, hand-off to the owning shard, flush |
//! | `stage.rs` | overload shedding: what is answered when not all can be |
//! | `effects.rs` | the one forward path: journal, dataplane, NAT log; refusals |
//! | `effects/pipeline.rs` | a batch with the journal writer, then the dataplane thread, finished in order |
//! | `effects/install.rs` | a batch's dataplane changes, refused upserts taken back, NAT log |
//! | `writer.rs` | the journal writer thread: group commit and fdatasync off the shard |
//! | `applier.rs` | the dataplane thread (nftables): kernel transactions off the shard |
//! | `replies.rs` | held replies, replaced by a refusal, sent after settling |
//! | `timers.rs` | timers and unsolicited messages (§14) |
//! | `control.rs` | operator requests (admin API, shutdown) |
//! | `restore.rs` | recovered state, snapshot and reconcile before answering |
//! | `health.rs` | whether each shard's state is durable (readiness) |
//! | `partition.rs` | cluster mode: a partition's state installed or handed over |
//!
//! Per batch: receive up to `quinn_udp::BATCH_SIZE` datagrams (recvmmsg,
//! with the destination address of each), hand the ones owned by another
//! shard to it over a bounded queue, answer the rest, hand the engine's
//! records to the journal writer, and only once they are on disk (and the
//! dataplane holds the changes) send the replies, from the address the request
//! was sent to. No task and no heap allocation per datagram.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use pcp_dataplane::Dataplane;
use pcp_engine::{BlockAllocator, Compiled, Engine, Millis, Stats};
use quinn_udp::UdpSocketState;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::metrics::Metrics;
use crate::natlog::NatLog;

mod applier;
mod control;
mod effects;
mod health;
mod multicast;
#[cfg(feature = "cluster")]
mod partition;
mod recv;
mod replies;
mod restore;
mod send;
mod slow_commits;
mod stage;
mod timers;
mod writer;

pub use control::{Control, MappingFilter, Refused};
pub use health::Health;
pub use restore::{Restore, RestoreReport};

use effects::{Effects, Store};
use replies::{Parked, ReplyArena};

/// Socket receive buffer asked for (the kernel doubles it for its own
/// bookkeeping and caps it at net.core.rmem_max).
const RECV_BUFFER: usize = 4 << 20;

/// Largest PCP datagram (RFC 6887 §7).
pub const MAX_DATAGRAM: usize = 1100;

pub(crate) use crate::clock::now_ms;

/// A datagram handed to the shard that owns its subscriber.
pub struct Handoff {
    len: u16,
    buf: [u8; MAX_DATAGRAM],
    src: SocketAddr,
    dst_ip: Option<IpAddr>,
    socket: u8,
}

/// The handles other threads use to reach a shard.
#[derive(Clone)]
pub struct ShardHandle {
    /// Operator requests.
    pub control: mpsc::Sender<Control>,
    handoff: mpsc::Sender<Handoff>,
}

/// What a shard needs to start.
pub struct ShardSpec {
    /// Shard index.
    pub index: usize,
    /// Compiled configuration.
    pub compiled: Arc<Compiled>,
    /// The block allocator every shard shares.
    pub pools: Arc<BlockAllocator>,
    /// Listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Epoch start.
    pub epoch_start_ms: Millis,
    /// Seed for the port randomizer.
    pub seed: u64,
    /// Metrics.
    pub metrics: Metrics,
    /// NAT event log.
    pub natlog: NatLog,
    /// Whether each shard's state is durable.
    pub health: Arc<Health>,
    /// Send restart ANNOUNCEs (state was lost).
    pub announce: bool,
    /// State recovered for this shard's subscribers.
    pub restore: Restore,
    /// Where the journal and snapshots live.
    pub state_dir: std::path::PathBuf,
    /// Generation of the snapshot written at start.
    pub generation: u64,
    /// Journal size that triggers a snapshot.
    pub journal_max_bytes: u64,
    /// `journal_renewal_slack` (journal store only).
    pub renewal_slack: u32,
    /// Tells the daemon the shard has restored its state.
    pub restored: oneshot::Sender<Result<RestoreReport, pcp_store::StoreError>>,
    /// This shard's dataplane (its share of the table for nftables).
    pub dataplane: Box<dyn Dataplane>,
    /// Cluster mode: no local state; partitions come and go through etcd.
    #[cfg(feature = "cluster")]
    pub cluster: Option<ShardCluster>,
}

/// What a shard needs in cluster mode.
#[cfg(feature = "cluster")]
pub struct ShardCluster {
    /// What this node answers for.
    pub ownership: Arc<crate::cluster::Ownership>,
    /// The shard's etcd writer.
    pub store: crate::cluster::store::EtcdStore,
}

/// A shard's state, owned by its thread.
struct State {
    engine: Engine,
    effects: Effects,
    replies: ReplyArena,
    /// Replies of batches with the journal writer.
    parked: Parked,
    /// Message headers for sending replies (send.rs).
    sender: send::Sender,
    metrics: Metrics,
    health: Arc<Health>,
    /// Cluster mode: what this node answers for (`None`: everything).
    ownership: Option<Arc<crate::cluster::Ownership>>,
}

type Sockets = Rc<Vec<(UdpSocket, UdpSocketState)>>;

/// Opens one shard's socket for `addr` with SO_REUSEPORT.
fn open_socket(addr: SocketAddr) -> io::Result<(UdpSocket, UdpSocketState)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    // Room for a receive cycle or two, so that under overload pcpd, not the
    // kernel, chooses what is dropped (stage.rs).
    let _ = sock.set_recv_buffer_size(RECV_BUFFER);
    if sock.recv_buffer_size().is_ok_and(|n| n < RECV_BUFFER) {
        tracing::warn!(
            "{addr}: the kernel caps the receive buffer below {RECV_BUFFER} bytes; \
             raise net.core.rmem_max so overload is shed by priority"
        );
    }
    sock.bind(&addr.into())?;
    let std_sock: std::net::UdpSocket = sock.into();
    let state = UdpSocketState::new((&std_sock).into())?;
    quiet_socket(&std_sock, addr)?;
    Ok((UdpSocket::from_std(std_sock)?, state))
}

/// Turns off the control messages quinn-udp asks for that pcpd never
/// reads: each costs the kernel a `put_cmsg` per datagram received.
/// Receive timestamps and the TOS byte (ECN) are never used; the
/// destination address (IP_PKTINFO) is kept only on a wildcard socket,
/// where it tells which address a reply must leave from (RFC 6887 §8.3).
/// A socket bound to one address replies from that address without it.
fn quiet_socket(sock: &std::net::UdpSocket, addr: SocketAddr) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let specific = !addr.ip().is_unspecified();
    setsockopt(sock, sockopt::ReceiveTimestampns, &false)?;
    let s = socket2::SockRef::from(sock);
    if addr.is_ipv4() {
        s.set_recv_tos_v4(false)?;
        if specific {
            setsockopt(sock, sockopt::Ipv4PacketInfo, &false)?;
        }
    } else {
        s.set_recv_tclass_v6(false)?;
        if specific {
            setsockopt(sock, sockopt::Ipv6RecvPacketInfo, &false)?;
        }
    }
    Ok(())
}

/// Binds every shard's sockets, then starts the shard threads. Sockets are
/// opened here so a bind error is reported before anything runs.
pub fn start(
    specs: Vec<ShardSpec>,
    queue: usize,
) -> io::Result<(Vec<ShardHandle>, Vec<std::thread::JoinHandle<()>>)> {
    let n = specs.len();
    let mut handles = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let (ctl_tx, ctl_rx) = mpsc::channel(64);
        let (ho_tx, ho_rx) = mpsc::channel(queue);
        handles.push(ShardHandle {
            control: ctl_tx,
            handoff: ho_tx,
        });
        receivers.push((ctl_rx, ho_rx));
    }
    let mut threads = Vec::with_capacity(n);
    for (spec, (ctl_rx, ho_rx)) in specs.into_iter().zip(receivers) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Sockets must be registered with the shard's own runtime.
        let sockets = {
            let _guard = rt.enter();
            spec.listen
                .iter()
                .map(|a| open_socket(*a).map_err(|e| io::Error::new(e.kind(), format!("{a}: {e}"))))
                .collect::<io::Result<Vec<_>>>()?
        };
        // Steer by source address in the kernel; without it, hand-offs.
        for ((sock, _), addr) in sockets.iter().zip(&spec.listen) {
            if let Err(e) = crate::steer::attach(sock, addr.is_ipv6(), n as u32) {
                if spec.index == 0 {
                    tracing::warn!("{addr}: no kernel steering ({e}); requests reach their shard through the hand-off queue");
                }
            }
        }
        let peers = handles.clone();
        let name = format!("pcpd-shard-{}", spec.index);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(spec, sockets, peers, ctl_rx, ho_rx));
        })?;
        threads.push(thread);
    }
    Ok((handles, threads))
}

/// Restores the shard's state; reports the outcome to the daemon.
fn open(spec: ShardSpec) -> Option<State> {
    #[cfg(feature = "cluster")]
    let mut spec = spec;
    #[cfg(feature = "cluster")]
    if let Some(cluster) = spec.cluster.take() {
        return open_clustered(spec, cluster);
    }
    let index = spec.index;
    let mut engine = Engine::new(
        spec.compiled,
        spec.pools,
        index as u16,
        spec.epoch_start_ms,
        spec.seed,
    );
    engine.set_renewal_slack(spec.renewal_slack);
    let mut dataplane = spec.dataplane;
    let restored = restore::restore(
        &mut engine,
        dataplane.as_mut(),
        spec.restore,
        &spec.state_dir,
        index,
        spec.generation,
    );
    let journal = match restored {
        Ok((journal, report)) => {
            let _ = spec.restored.send(Ok(report));
            journal
        }
        Err(e) => {
            let _ = spec.restored.send(Err(e));
            return None;
        }
    };
    if spec.announce && index == 0 {
        // RFC 6887 §14.1.3, RFC 6886 §3.2.1: state was lost; tell clients
        // (once per node: the first shard speaks for all).
        engine.announce_restart(now_ms(), &[]);
    }
    let sinks = (spec.natlog, spec.metrics.clone(), spec.health.clone());
    let store = match writer::JournalWriter::start(index, journal) {
        Ok(w) => Store::Journal(w),
        Err(e) => {
            tracing::error!(shard = index, "cannot start the journal writer thread: {e}");
            return None;
        }
    };
    let effects = match Effects::new(index, store, spec.journal_max_bytes, dataplane, sinks) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(shard = index, "cannot start the dataplane thread: {e}");
            return None;
        }
    };
    Some(State {
        engine,
        effects,
        replies: ReplyArena::new(),
        parked: Parked::default(),
        sender: send::Sender::new(),
        metrics: spec.metrics,
        health: spec.health,
        ownership: None,
    })
}

/// Cluster mode: nothing local to restore; the node task installs each
/// partition's state from etcd once it owns it (`Control::Adopt`).
#[cfg(feature = "cluster")]
fn open_clustered(spec: ShardSpec, cluster: ShardCluster) -> Option<State> {
    let engine = Engine::new(
        spec.compiled,
        spec.pools,
        spec.index as u16,
        spec.epoch_start_ms,
        spec.seed,
    );
    let _ = spec.restored.send(Ok(RestoreReport::default()));
    let sinks = (spec.natlog, spec.metrics.clone(), spec.health.clone());
    let store = Store::Etcd(Box::new(cluster.store));
    let effects = Effects::new(
        spec.index,
        store,
        spec.journal_max_bytes,
        spec.dataplane,
        sinks,
    );
    let effects = match effects {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(shard = spec.index, "cannot start the dataplane thread: {e}");
            return None;
        }
    };
    Some(State {
        engine,
        effects,
        replies: ReplyArena::new(),
        parked: Parked::default(),
        sender: send::Sender::new(),
        metrics: spec.metrics,
        health: spec.health,
        ownership: Some(cluster.ownership),
    })
}

async fn run(
    spec: ShardSpec,
    sockets: Vec<(UdpSocket, UdpSocketState)>,
    peers: Vec<ShardHandle>,
    mut ctl_rx: mpsc::Receiver<Control>,
    ho_rx: mpsc::Receiver<Handoff>,
) {
    let index = spec.index;
    let Some(state) = open(spec) else { return };
    let state = Rc::new(RefCell::new(state));
    let sockets: Sockets = Rc::new(sockets);
    let timer = Rc::new(Notify::new());
    for si in 0..sockets.len() {
        let loop_ = recv::recv_loop(
            si,
            state.clone(),
            sockets.clone(),
            peers.clone(),
            timer.clone(),
        );
        tokio::task::spawn_local(loop_);
    }
    tokio::task::spawn_local(recv::handoff_loop(
        state.clone(),
        sockets.clone(),
        ho_rx,
        timer.clone(),
    ));
    tokio::task::spawn_local(timers::timer_loop(
        state.clone(),
        sockets.clone(),
        timer.clone(),
    ));
    tokio::task::spawn_local(publish_stats(state.clone(), index));
    let slicer = state.borrow().effects.slicer();
    tokio::task::spawn_local(slice_loop(state.clone(), slicer));
    let wake = state.borrow().effects.wake();
    if let Some(wake) = wake {
        tokio::task::spawn_local(recv::commit_loop(
            state.clone(),
            sockets.clone(),
            wake,
            timer.clone(),
        ));
    }
    // Every task works on the state between awaits only, and every batch
    // with the journal writer is completed and answered before a control
    // message is handled, so when this loop ends (Shutdown), no batch is
    // half done. Returning drops the tasks.
    while let Some(ctl) = ctl_rx.recv().await {
        let more = {
            let mut st = state.borrow_mut();
            recv::drain(&mut st, &sockets);
            let more = control::control(&mut st, ctl);
            recv::answer_finished(&mut st, &sockets);
            more
        };
        timer.notify_one();
        if !more {
            break;
        }
    }
    tracing::debug!(shard = index, "stopped");
}

/// Hands a compaction's state to the writer a slice at a time
/// (effects/compaction.rs), letting the shard's other tasks receive and
/// answer between slices.
async fn slice_loop(state: Rc<RefCell<State>>, wake: Rc<Notify>) {
    loop {
        wake.notified().await;
        loop {
            let more = {
                let mut st = state.borrow_mut();
                let st = &mut *st;
                st.effects.take_slice(&st.engine)
            };
            if !more {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Publishes the engine's counters every half second.
async fn publish_stats(state: Rc<RefCell<State>>, index: usize) {
    let mut prev = Stats::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let st = state.borrow();
        let now = st.engine.stats().clone();
        let held = crate::metrics::Held {
            mappings: st.engine.mapping_count(),
            subscribers: st.engine.subscriber_count(),
        };
        st.metrics.publish(&prev, &now, index, held);
        prev = now;
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::{getsockopt, sockopt};

    use super::open_socket;

    /// A socket bound to one address asks the kernel for no control
    /// message pcpd does not read; a wildcard one keeps the destination
    /// address, which a reply must leave from (RFC 6887 §8.3).
    #[test]
    fn sockets_ask_only_for_the_control_messages_pcpd_reads() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _in = rt.enter();
        let (bound, _) = open_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let (wild, _) = open_socket("0.0.0.0:0".parse().unwrap()).unwrap();
        for sock in [&bound, &wild] {
            assert!(!getsockopt(sock, sockopt::ReceiveTimestampns).unwrap());
        }
        assert!(!getsockopt(&bound, sockopt::Ipv4PacketInfo).unwrap());
        assert!(getsockopt(&wild, sockopt::Ipv4PacketInfo).unwrap());
    }
}
