//! I/O shards: one thread per shard, each with its own current-thread
//! runtime, its own engine and dataplane, and one SO_REUSEPORT socket per
//! listen address.
//!
//! Per batch: receive up to `quinn_udp::BATCH_SIZE` datagrams (recvmmsg,
//! with the destination address of each), hand the ones owned by another
//! shard to it over a bounded queue, answer the rest, apply the engine's
//! effects (dataplane, NAT event log), and only then send the replies,
//! from the address the request was sent to. No task and no heap
//! allocation per datagram.

use std::cell::RefCell;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pcp_dataplane::{Change, Dataplane};
use pcp_engine::{
    shard_of, subscriber_key, Compiled, Engine, Event, Holder, Mapping, MappingId, Millis, Shared,
    Stats, SubscriberUsage,
};
use pcp_store::{Journal, Record};
use pcp_wire::ResultCode;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::metrics::Metrics;
use crate::natlog::NatLog;

/// Largest PCP datagram (RFC 6887 §7).
pub const MAX_DATAGRAM: usize = 1100;
/// Receive buffer per datagram: large enough to see oversize requests.
const RECV_BUF: usize = 1500;
/// Replies held before a flush.
const REPLY_SLOTS: usize = 256;
/// Receives (of up to BATCH datagrams) folded into one journal commit.
const RECVS_PER_COMMIT: usize = 8;
/// Datagrams received per system call (at most quinn-udp's batch).
const BATCH: usize = 32;

/// Wall-clock milliseconds.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// A datagram handed to the shard that owns its subscriber.
pub struct Handoff {
    len: u16,
    buf: [u8; MAX_DATAGRAM],
    src: SocketAddr,
    dst_ip: Option<IpAddr>,
    socket: u8,
}

/// Operator requests a shard answers.
pub enum Control {
    /// Mappings matching a filter.
    Mappings(MappingFilter, oneshot::Sender<Vec<Mapping>>),
    /// One mapping.
    Mapping(MappingId, oneshot::Sender<Option<Mapping>>),
    /// A subscriber's usage.
    Subscriber(IpAddr, oneshot::Sender<Option<SubscriberUsage>>),
    /// Create a static mapping.
    CreateStatic {
        /// Internal address.
        internal: IpAddr,
        /// Protocol.
        protocol: u8,
        /// Internal port.
        internal_port: u16,
        /// Suggested external port (0: any).
        external_port: u16,
        /// Answer.
        reply: oneshot::Sender<Result<Mapping, pcp_wire::ResultCode>>,
    },
    /// Delete a mapping.
    Delete(MappingId, oneshot::Sender<Option<Mapping>>),
    /// Move mappings off a drained address.
    Drain(Ipv4Addr, oneshot::Sender<usize>),
    /// Who held an external port at a time.
    Lookup(Ipv4Addr, u16, Millis, oneshot::Sender<Option<Holder>>),
    /// New configuration.
    Reload(Arc<Compiled>, oneshot::Sender<()>),
}

/// Filter for listing mappings.
#[derive(Debug, Clone, Default)]
pub struct MappingFilter {
    /// Only this subscriber.
    pub subscriber: Option<IpAddr>,
    /// Only this external address.
    pub external: Option<Ipv4Addr>,
    /// Only this protocol.
    pub protocol: Option<u8>,
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
    /// Shared pool state.
    pub shared: Arc<Shared>,
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
    /// Tells the daemon the shard has restored its state.
    pub restored: oneshot::Sender<Result<RestoreReport, String>>,
    /// This shard's dataplane (its share of the table for nftables).
    pub dataplane: Box<dyn Dataplane>,
}

/// Recovered state for one shard.
#[derive(Default)]
pub struct Restore {
    /// Blocks (subscriber, block, since).
    pub blocks: Vec<(IpAddr, pcp_engine::Block, Millis)>,
    /// Mappings.
    pub mappings: Vec<Mapping>,
    /// Allocation history.
    pub history: Vec<Holder>,
}

/// What a shard restored.
#[derive(Debug, Default, Clone, Copy)]
pub struct RestoreReport {
    /// Mappings restored.
    pub mappings: usize,
    /// Mappings dropped (expired, or refused by the current configuration).
    pub dropped: usize,
    /// Blocks restored.
    pub blocks: usize,
    /// Blocks refused by the current configuration.
    pub blocks_dropped: usize,
    /// Dataplane entries installed by reconcile.
    pub installed: usize,
    /// Stray dataplane entries removed by reconcile.
    pub removed: usize,
    /// Reconcile changes the dataplane refused.
    pub failed: usize,
}

/// Opens one shard's socket for `addr` with SO_REUSEPORT.
fn open_socket(addr: SocketAddr) -> io::Result<(UdpSocket, UdpSocketState)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    let std_sock: std::net::UdpSocket = sock.into();
    let state = UdpSocketState::new((&std_sock).into())?;
    Ok((UdpSocket::from_std(std_sock)?, state))
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

/// A reply waiting in `reply_bufs[slot]`, its request in `request_bufs[slot]`.
#[derive(Clone, Copy)]
struct HeldReply {
    socket: usize,
    dst: SocketAddr,
    src_ip: Option<IpAddr>,
    len: usize,
    request_len: usize,
}

struct State {
    index: usize,
    engine: Engine,
    dataplane: Box<dyn Dataplane>,
    /// Events of the batch, with the reply slot of the request that caused them.
    events: Vec<(Option<usize>, Event)>,
    changes: Vec<Change>,
    /// For each change: the mapping an `Upsert` makes real, and its reply slot.
    change_origin: Vec<Option<(Option<usize>, MappingId)>>,
    metrics: Metrics,
    natlog: NatLog,
    journal: Journal,
    journal_max_bytes: u64,
    records: Vec<Record>,
    /// Replies held until the batch's effects are applied.
    replies: Vec<HeldReply>,
    reply_bufs: Box<[[u8; MAX_DATAGRAM]; REPLY_SLOTS]>,
    /// The requests of the held replies, to answer with an error instead.
    request_bufs: Box<[[u8; MAX_DATAGRAM]; REPLY_SLOTS]>,
}

impl State {
    /// Moves the engine's queued events into the batch, tagged with the
    /// reply slot that caused them.
    fn take_events(&mut self, slot: Option<usize>) {
        while let Some(event) = self.engine.poll_event() {
            self.events.push((slot, event));
        }
    }

    /// Applies the engine's effects in order: journal (group commit, one
    /// fdatasync for the batch), then the dataplane batch, then the NAT
    /// event log. A mapping the dataplane refused is taken back from the
    /// engine and its reply becomes NETWORK_FAILURE, so a client is told
    /// success only for what forwards traffic; the take-back is journaled
    /// in a second round. Returns false when the journal could not be
    /// written: the caller must not tell clients about state that is not
    /// durable.
    fn apply_effects(&mut self) -> bool {
        let mut durable = true;
        for _round in 0..2 {
            self.take_events(None);
            if self.events.is_empty() {
                break;
            }
            let (ok, refused) = self.apply_round();
            durable &= ok;
            if refused.is_empty() {
                break;
            }
            self.revoke(refused);
        }
        self.natlog.flush();
        if durable && self.journal.len() > self.journal_max_bytes {
            self.compact();
        }
        durable
    }

    /// One round of effects for the queued events; returns whether the
    /// journal commit held, and the mappings the dataplane refused.
    fn apply_round(&mut self) -> (bool, Vec<(Option<usize>, MappingId)>) {
        self.changes.clear();
        self.change_origin.clear();
        self.records.clear();
        let now = now_ms();
        for (slot, event) in self.events.drain(..) {
            let before = self.changes.len();
            Change::from_event(&event, &mut self.changes);
            let made = match &event {
                Event::MappingCreated(m) | Event::MappingRenewed(m) => Some(m.id),
                Event::MappingMoved { new, .. } => Some(new.id),
                _ => None,
            };
            for c in &self.changes[before..] {
                self.change_origin.push(
                    matches!(c, Change::Upsert(_))
                        .then_some(made)
                        .flatten()
                        .map(|id| (slot, id)),
                );
            }
            Record::from_event(&event, now, &mut self.records);
            self.natlog.record(now, &event);
        }
        let mut durable = true;
        if !self.records.is_empty() {
            for r in &self.records {
                self.journal.append(r);
            }
            let started = Instant::now();
            match self.journal.commit() {
                Ok(_) => self
                    .metrics
                    .journal_latency
                    .observe(started.elapsed().as_secs_f64()),
                Err(e) => {
                    durable = false;
                    self.metrics.journal_errors.inc();
                    tracing::error!(
                        shard = self.index,
                        "journal {}: {e}",
                        self.journal.path().display()
                    );
                }
            }
        }
        let mut refused = Vec::new();
        if !self.changes.is_empty() {
            let started = Instant::now();
            let results = self.dataplane.apply(&self.changes);
            self.metrics
                .dataplane_latency
                .observe(started.elapsed().as_secs_f64());
            for (r, origin) in results.into_iter().zip(&self.change_origin) {
                let label = if r.is_ok() { "ok" } else { "error" };
                self.metrics
                    .dataplane_changes
                    .with_label_values(&[label])
                    .inc();
                if let Err(e) = r {
                    tracing::error!(shard = self.index, "dataplane: {e}");
                    refused.extend(*origin);
                }
            }
        }
        (durable, refused)
    }

    /// Takes back mappings the dataplane refused and turns their held
    /// replies into NETWORK_FAILURE (RFC 6887 §7.4: a short-lifetime error).
    fn revoke(&mut self, refused: Vec<(Option<usize>, MappingId)>) {
        let now = now_ms();
        let epoch = self.engine.epoch(now);
        let lifetime = self
            .engine
            .compiled()
            .error_lifetime(ResultCode::NetworkFailure);
        for (slot, id) in refused {
            if let Some(m) = self.engine.revoke(now, id) {
                tracing::warn!(
                    shard = self.index,
                    internal = %m.internal_addr,
                    port = m.internal_port,
                    "mapping taken back: the dataplane did not install it"
                );
            }
            let Some(slot) = slot else { continue };
            let Some(reply) = self.replies.get_mut(slot) else {
                continue;
            };
            let request = &self.request_bufs[slot][..reply.request_len];
            if let Some(n) = pcp_wire::network_failure_response(
                request,
                lifetime,
                epoch,
                &mut self.reply_bufs[slot],
            ) {
                reply.len = n;
            }
        }
    }

    /// Replaces journal and snapshot with a snapshot of the engine's state.
    fn compact(&mut self) {
        let started = Instant::now();
        let records = state_records(&self.engine);
        if let Err(e) = self.journal.compact(now_ms(), records) {
            self.metrics.journal_errors.inc();
            tracing::error!(shard = self.index, "snapshot: {e}");
            return;
        }
        tracing::info!(
            shard = self.index,
            ms = started.elapsed().as_millis() as u64,
            "journal compacted into a snapshot"
        );
    }
}

/// The engine's whole state as records (for snapshots).
fn state_records(engine: &Engine) -> Vec<Record> {
    let mut v: Vec<Record> = engine
        .blocks()
        .map(|(subscriber, block, since)| Record::Block {
            subscriber,
            block,
            since,
        })
        .collect();
    v.extend(engine.mappings().map(|m| Record::Mapping(m.clone())));
    v.extend(engine.history().map(|h| Record::History(h.clone())));
    v
}

/// Restores a shard's state into its engine, writes a fresh snapshot, and
/// reconciles the dataplane with the result (add missing, remove strays).
fn restore(
    engine: &mut Engine,
    dataplane: &mut dyn Dataplane,
    spec_restore: Restore,
    state_dir: &std::path::Path,
    index: usize,
    generation: u64,
) -> Result<(Journal, RestoreReport), String> {
    let now = now_ms();
    let mut report = RestoreReport::default();
    for (subscriber, block, since) in spec_restore.blocks {
        if engine.restore_block(now, subscriber, block, since) {
            report.blocks += 1;
        } else {
            report.blocks_dropped += 1;
        }
    }
    for m in spec_restore.mappings {
        if engine.restore_mapping(now, m) {
            report.mappings += 1;
        } else {
            report.dropped += 1;
        }
    }
    for h in spec_restore.history {
        engine.restore_history(h);
    }
    while engine.poll_event().is_some() {}
    let journal = pcp_store::write_snapshot(state_dir, index, generation, state_records(engine))
        .map_err(|e| e.to_string())?;
    // Reconcile: what the engine holds is what must be installed.
    let mut desired: Vec<Change> = Vec::new();
    for (subscriber, block, _) in engine.blocks() {
        desired.push(Change::AddPortSet { subscriber, block });
    }
    for m in engine.mappings() {
        Change::from_event(&pcp_engine::Event::MappingCreated(m.clone()), &mut desired);
    }
    let done = dataplane.reconcile(desired);
    report.installed = done.installed;
    report.removed = done.removed;
    report.failed = done.failed;
    if done.failed > 0 {
        // The mappings stay in the engine; a renewal retries them.
        tracing::error!(
            shard = index,
            "dataplane {}: reconcile: {} of {} changes failed",
            dataplane.name(),
            done.failed,
            done.installed + done.removed
        );
    }
    Ok((journal, report))
}

type Sockets = Rc<Vec<(UdpSocket, UdpSocketState)>>;

async fn run(
    spec: ShardSpec,
    sockets: Vec<(UdpSocket, UdpSocketState)>,
    peers: Vec<ShardHandle>,
    mut ctl_rx: mpsc::Receiver<Control>,
    mut ho_rx: mpsc::Receiver<Handoff>,
) {
    let index = spec.index;
    let mut engine = Engine::new(
        spec.compiled,
        spec.shared,
        index as u16,
        spec.epoch_start_ms,
        spec.seed,
    );
    let mut dataplane = spec.dataplane;
    let journal = match restore(
        &mut engine,
        dataplane.as_mut(),
        spec.restore,
        &spec.state_dir,
        index,
        spec.generation,
    ) {
        Ok((journal, report)) => {
            let _ = spec.restored.send(Ok(report));
            journal
        }
        Err(e) => {
            let _ = spec.restored.send(Err(e));
            return;
        }
    };
    if spec.announce {
        // RFC 6887 §14.1.3: state was lost; tell clients.
        engine.announce_restart(now_ms(), &[]);
    }
    let state = Rc::new(RefCell::new(State {
        index,
        engine,
        dataplane,
        events: Vec::new(),
        changes: Vec::new(),
        change_origin: Vec::new(),
        metrics: spec.metrics.clone(),
        natlog: spec.natlog,
        journal,
        journal_max_bytes: spec.journal_max_bytes,
        records: Vec::new(),
        replies: Vec::with_capacity(REPLY_SLOTS),
        reply_bufs: Box::new([[0u8; MAX_DATAGRAM]; REPLY_SLOTS]),
        request_bufs: Box::new([[0u8; MAX_DATAGRAM]; REPLY_SLOTS]),
    }));
    let sockets: Sockets = Rc::new(sockets);
    let timer = Rc::new(Notify::new());
    let shards = peers.len();

    for si in 0..sockets.len() {
        let (state, sockets, peers, timer) =
            (state.clone(), sockets.clone(), peers.clone(), timer.clone());
        tokio::task::spawn_local(async move {
            recv_loop(index, si, shards, state, sockets, peers, timer).await;
        });
    }
    {
        let (state, sockets, timer) = (state.clone(), sockets.clone(), timer.clone());
        tokio::task::spawn_local(async move {
            while let Some(first) = ho_rx.recv().await {
                {
                    let mut st = state.borrow_mut();
                    // This one and what else is queued, bounded, then flush.
                    let mut next = Some(first);
                    let mut budget = REPLY_SLOTS;
                    while let Some(h) = next.take() {
                        let datagram = &h.buf[..usize::from(h.len)];
                        handle_one(
                            &mut st,
                            &sockets,
                            usize::from(h.socket),
                            h.src,
                            h.dst_ip,
                            datagram,
                        );
                        budget -= 1;
                        if budget > 0 {
                            next = ho_rx.try_recv().ok();
                        }
                    }
                    flush(&mut st, &sockets);
                }
                timer.notify_one();
            }
        });
    }
    {
        let (state, sockets, timer) = (state.clone(), sockets.clone(), timer.clone());
        tokio::task::spawn_local(async move { timer_loop(state, sockets, timer).await });
    }
    {
        let state = state.clone();
        tokio::task::spawn_local(async move {
            let mut prev = Stats::default();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let st = state.borrow();
                let now = st.engine.stats().clone();
                st.metrics
                    .publish(&prev, &now, st.index, st.engine.mapping_count());
                prev = now;
            }
        });
    }
    while let Some(ctl) = ctl_rx.recv().await {
        let mut st = state.borrow_mut();
        control(&mut st, ctl);
        st.apply_effects();
        drop(st);
        timer.notify_one();
    }
}

fn control(st: &mut State, ctl: Control) {
    let now = now_ms();
    // A dropped receiver only means the API client went away.
    match ctl {
        Control::Mappings(f, reply) => {
            let list = st
                .engine
                .mappings()
                .filter(|m| f.subscriber.is_none_or(|s| m.internal_addr == s))
                .filter(|m| f.external.is_none_or(|e| m.external_addr == e))
                .filter(|m| f.protocol.is_none_or(|p| m.protocol == p))
                .cloned()
                .collect();
            let _ = reply.send(list);
        }
        Control::Mapping(id, reply) => {
            let _ = reply.send(st.engine.mapping(id).cloned());
        }
        Control::Subscriber(ip, reply) => {
            let _ = reply.send(st.engine.subscriber(ip));
        }
        Control::CreateStatic {
            internal,
            protocol,
            internal_port,
            external_port,
            reply,
        } => {
            let r = st
                .engine
                .create_static(now, internal, protocol, internal_port, external_port);
            // Installed before the API answers; taken back if it was not.
            st.apply_effects();
            let r = r.and_then(|m| {
                st.engine
                    .mapping(m.id)
                    .cloned()
                    .ok_or(ResultCode::NetworkFailure)
            });
            let _ = reply.send(r);
        }
        Control::Delete(id, reply) => {
            let _ = reply.send(st.engine.delete(now, id));
        }
        Control::Drain(addr, reply) => {
            let _ = reply.send(st.engine.drain(now, addr));
        }
        Control::Lookup(addr, port, at, reply) => {
            let _ = reply.send(st.engine.lookup(addr, port, at));
        }
        Control::Reload(compiled, reply) => {
            st.engine.reconfigure(compiled);
            let _ = reply.send(());
        }
    }
}

/// Answers one datagram into the reply arena (flushing it first when full).
fn handle_one(
    st: &mut State,
    sockets: &Sockets,
    socket: usize,
    src: SocketAddr,
    dst_ip: Option<IpAddr>,
    datagram: &[u8],
) {
    if st.replies.len() == REPLY_SLOTS {
        flush(st, sockets);
    }
    let started = Instant::now();
    let slot = st.replies.len();
    let now = now_ms();
    if let Some(n) = st
        .engine
        .handle(now, src, datagram, &mut st.reply_bufs[slot])
    {
        let req = datagram.len().min(MAX_DATAGRAM);
        st.request_bufs[slot][..req].copy_from_slice(&datagram[..req]);
        st.replies.push(HeldReply {
            socket,
            dst: src,
            src_ip: dst_ip,
            len: n,
            request_len: req,
        });
        st.take_events(Some(slot));
    }
    st.metrics.latency.observe(started.elapsed().as_secs_f64());
}

/// Applies effects, then sends the held replies (a success is only sent
/// for state that was applied).
fn flush(st: &mut State, sockets: &Sockets) {
    if !st.apply_effects() {
        // Not durable: no reply. Clients retry (RFC 6887 §8.1.1).
        for _ in 0..st.replies.len() {
            st.metrics.drop_io("journal_failed");
        }
        st.replies.clear();
        return;
    }
    for i in 0..st.replies.len() {
        let r = st.replies[i];
        let (sock, udp) = &sockets[r.socket];
        let t = Transmit {
            destination: r.dst,
            ecn: None,
            contents: &st.reply_bufs[i][..r.len],
            segment_size: None,
            src_ip: r.src_ip,
        };
        if sock
            .try_io(Interest::WRITABLE, || udp.try_send(sock.into(), &t))
            .is_err()
        {
            st.metrics.drop_io("send_failed");
        }
    }
    st.replies.clear();
}

async fn recv_loop(
    index: usize,
    si: usize,
    shards: usize,
    state: Rc<RefCell<State>>,
    sockets: Sockets,
    peers: Vec<ShardHandle>,
    timer: Rc<Notify>,
) {
    let batch = quinn_udp::BATCH_SIZE.clamp(1, BATCH);
    let mut bufs: Box<[[u8; RECV_BUF]; BATCH]> = Box::new([[0u8; RECV_BUF]; BATCH]);
    let mut metas = [RecvMeta::default(); BATCH];
    loop {
        let (sock, udp) = &sockets[si];
        if sock.readable().await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        {
            let mut st = state.borrow_mut();
            // Group commit: drain what the socket holds (up to RECVS_PER_COMMIT
            // receives) into one batch, so one fdatasync covers them all.
            for _ in 0..RECVS_PER_COMMIT {
                let mut iovs = bufs.each_mut().map(|b| IoSliceMut::new(&mut b[..]));
                let n = match sock.try_io(Interest::READABLE, || {
                    udp.recv(sock.into(), &mut iovs[..batch], &mut metas[..batch])
                }) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(shard = index, "recv: {e}");
                        break;
                    }
                };
                for (meta, buf) in metas.iter().zip(bufs.iter()).take(n) {
                    let stride = meta.stride.max(1);
                    for datagram in buf[..meta.len].chunks(stride) {
                        let src = SocketAddr::new(meta.addr.ip().to_canonical(), meta.addr.port());
                        // Oversize datagrams only ever get MALFORMED_REQUEST
                        // (§8.2), which changes no state: answer them here.
                        let owner = if datagram.len() > MAX_DATAGRAM {
                            index
                        } else {
                            shard_of(subscriber_key(datagram, src.ip()), shards)
                        };
                        if owner != index {
                            let mut h = Handoff {
                                len: datagram.len() as u16,
                                buf: [0u8; MAX_DATAGRAM],
                                src,
                                dst_ip: meta.dst_ip,
                                socket: si as u8,
                            };
                            h.buf[..datagram.len()].copy_from_slice(datagram);
                            if peers[owner].handoff.try_send(h).is_ok() {
                                st.metrics.handoffs.inc();
                            } else {
                                st.metrics.drop_io("handoff_queue_full");
                            }
                            continue;
                        }
                        handle_one(&mut st, &sockets, si, src, meta.dst_ip, datagram);
                    }
                }
            }
            flush(&mut st, &sockets);
        }
        timer.notify_one();
        // Let the other socket and the timers run (DESIGN.md).
        tokio::task::yield_now().await;
    }
}

async fn timer_loop(state: Rc<RefCell<State>>, sockets: Sockets, notify: Rc<Notify>) {
    loop {
        let next = state.borrow().engine.poll_timeout();
        let wait = match next {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = notify.notified() => continue,
        }
        let mut st = state.borrow_mut();
        st.engine.handle_timeout(now_ms());
        st.apply_effects();
        while let Some(tx) = st.engine.poll_transmit() {
            let family_v6 = tx.dst.is_ipv6();
            let Some((sock, udp)) = sockets
                .iter()
                .find(|(s, _)| s.local_addr().is_ok_and(|a| a.is_ipv6() == family_v6))
            else {
                continue;
            };
            let t = Transmit {
                destination: tx.dst,
                ecn: None,
                contents: &tx.payload,
                segment_size: None,
                src_ip: None,
            };
            if let Err(e) = sock.try_io(Interest::WRITABLE, || udp.try_send(sock.into(), &t)) {
                tracing::debug!("unsolicited to {}: {e}", tx.dst);
                st.metrics.drop_io("unsolicited_send_failed");
            }
        }
    }
}
