//! The one forward path for effects. Every change the engine makes, from
//! a request, an operator action or a timer, goes through
//! [`Effects::settle`]: journal (group commit) first, then the dataplane,
//! then the NAT event log. Only then is anyone told anything, and what
//! they are told comes from [`Settled::refusal`]:
//!
//! * records that did not reach the journal: the change is not durable;
//!   a mapping it created is taken back, one it deleted is put back, and
//!   the answer is NO_RESOURCES (RFC 6887 §7.4, short lifetime) or HTTP 503;
//! * a mapping the dataplane refused is taken back (journaled) and the
//!   answer is NETWORK_FAILURE or HTTP 503;
//! * while the journal is poisoned (a write or fdatasync failed), nothing
//!   that reports state goes out until the state in memory has been
//!   rewritten as a snapshot (see pcp-store's `Journal::commit`).
//!
//! In cluster mode the store is etcd instead of the journal
//! (`cluster/store.rs`): the same rule, with fenced transactions.

// Without the cluster feature the store has one kind, and its matches look
// infallible to clippy.
#![cfg_attr(
    not(feature = "cluster"),
    allow(clippy::infallible_destructuring_match)
)]

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use pcp_dataplane::Dataplane;

use super::applier::Applier;
use pcp_engine::{DeleteReason, Engine, Event, MappingId};
use pcp_store::Record;

#[cfg(feature = "cluster")]
use crate::cluster::store::{ClusterError, EtcdStore};
use pcp_wire::ResultCode;

use super::health::Health;
use super::now_ms;
use super::replies::REPLY_SLOTS;
use super::writer::JournalWriter;
use crate::metrics::Metrics;
use crate::natlog::NatLog;

/// How often a poisoned journal is retried (a snapshot of the whole shard)
/// and how often the operator's log hears about it.
const REPAIR_INTERVAL: Duration = Duration::from_secs(1);
const COMPLAIN_INTERVAL: Duration = Duration::from_secs(10);

/// Who waits for the outcome of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Origin {
    /// The request whose reply is held in this slot.
    Reply(usize),
    /// An admin API call.
    Operator,
    /// Timers (expiry, idle release) and unsolicited messages.
    Timer,
}

/// A set of origins: one bit per reply slot, plus the operator and timers
/// (no hashing on the request path).
#[derive(Debug, Default, Clone)]
struct Origins {
    replies: [u64; REPLY_SLOTS / 64],
    operator: bool,
    timer: bool,
}

impl Origins {
    fn insert(&mut self, origin: Origin) {
        match origin {
            Origin::Reply(i) if i < REPLY_SLOTS => self.replies[i / 64] |= 1 << (i % 64),
            Origin::Reply(_) => {}
            Origin::Operator => self.operator = true,
            Origin::Timer => self.timer = true,
        }
    }

    fn contains(&self, origin: Origin) -> bool {
        match origin {
            Origin::Reply(i) => i < REPLY_SLOTS && self.replies[i / 64] & (1 << (i % 64)) != 0,
            Origin::Operator => self.operator,
            Origin::Timer => self.timer,
        }
    }

    fn extend(&mut self, other: &Origins) {
        for (a, b) in self.replies.iter_mut().zip(other.replies.iter()) {
            *a |= b;
        }
        self.operator |= other.operator;
        self.timer |= other.timer;
    }
}

/// What became of a batch.
#[derive(Debug, Default)]
pub(super) struct Settled {
    /// Everything the shard holds in memory is durable.
    pub(super) durable: bool,
    not_durable: Origins,
    not_installed: Origins,
}

impl Settled {
    /// The refusal `origin` must get instead of its answer, if any.
    pub(super) fn refusal(&self, origin: Origin) -> Option<ResultCode> {
        if self.not_installed.contains(origin) {
            Some(ResultCode::NetworkFailure)
        } else if self.not_durable.contains(origin) {
            Some(ResultCode::NoResources)
        } else {
            None
        }
    }
}

mod compaction;
mod install;
mod pipeline;

pub(super) use pipeline::Completed;

/// Where a shard's state is made durable.
pub(super) enum Store {
    /// The local journal and snapshots (single node, the default), written
    /// by the shard's writer thread (`writer.rs`).
    Journal(JournalWriter),
    /// etcd, in cluster mode.
    #[cfg(feature = "cluster")]
    Etcd(Box<EtcdStore>),
}

/// The shard's durable and kernel state, fed by engine events.
pub(super) struct Effects {
    pub(super) index: usize,
    store: Store,
    journal_max_bytes: u64,
    applier: Applier,
    natlog: NatLog,
    metrics: Metrics,
    health: Arc<Health>,
    events: Vec<(Origin, Event)>,
    records: Vec<Record>,
    last_repair: Option<Instant>,
    last_complaint: Option<Instant>,
    /// Jobs handed to the journal writer, oldest first (`pipeline.rs`).
    inflight: std::collections::VecDeque<pipeline::Pending>,
    /// Durable batches whose changes are with the applier, oldest first.
    applying: std::collections::VecDeque<pipeline::Applying>,
    /// Batches completed while the synchronous path waited for the
    /// writer; their replies are sent by the next [`Effects::complete`].
    finished: std::collections::VecDeque<Settled>,
    /// A compaction is in the writer's queue.
    compacting: bool,
    /// A compaction's state being handed over in slices.
    slicing: Option<compaction::Slicing>,
    /// The last compaction failed: the next takes the state whole.
    whole_next: bool,
    /// Wakes the task that takes the slices (`shard::slice_loop`).
    slicer: Rc<Notify>,
}

impl Effects {
    pub(super) fn new(
        index: usize,
        store: Store,
        journal_max_bytes: u64,
        dataplane: Box<dyn Dataplane>,
        sinks: (NatLog, Metrics, Arc<Health>),
    ) -> std::io::Result<Self> {
        let (natlog, metrics, health) = sinks;
        metrics.state_writable(index, true);
        // The applier wakes the task that answers completed batches (a
        // notification nobody awaits in cluster mode, which never
        // pipelines).
        let wake = match &store {
            Store::Journal(w) => w.wake.clone(),
            #[cfg(feature = "cluster")]
            Store::Etcd(_) => Arc::new(tokio::sync::Notify::new()),
        };
        let applier = Applier::start(index, dataplane, wake)?;
        Ok(Effects {
            index,
            store,
            journal_max_bytes,
            applier,
            natlog,
            metrics,
            health,
            events: Vec::new(),
            records: Vec::new(),
            last_repair: None,
            last_complaint: None,
            inflight: std::collections::VecDeque::new(),
            applying: std::collections::VecDeque::new(),
            finished: std::collections::VecDeque::new(),
            compacting: false,
            slicing: None,
            whole_next: false,
            slicer: Rc::new(Notify::new()),
        })
    }

    /// Moves the engine's queued events into the batch, for `origin`.
    pub(super) fn collect(&mut self, engine: &mut Engine, origin: Origin) {
        while let Some(event) = engine.poll_event() {
            self.events.push((origin, event));
        }
    }

    /// Whether the shard's state is durable now, repairing a poisoned
    /// journal first when it is time to try.
    pub(super) fn durable(&mut self, engine: &mut Engine) -> bool {
        self.repair(engine);
        !self.poisoned()
    }

    /// Whether the journal waits for a snapshot (no repair attempted).
    /// etcd is never poisoned: each batch stands on its own transaction.
    pub(super) fn poisoned(&self) -> bool {
        match &self.store {
            Store::Journal(w) => w.poisoned(),
            #[cfg(feature = "cluster")]
            Store::Etcd(_) => false,
        }
    }

    /// Whether the timers must wake each second to retry writing: the
    /// journal is poisoned, or (cluster mode) failed records wait.
    pub(super) fn needs_repair(&self) -> bool {
        match &self.store {
            Store::Journal(w) => w.poisoned(),
            #[cfg(feature = "cluster")]
            Store::Etcd(e) => e.has_pending() || self.last_complaint.is_some(),
        }
    }

    /// The etcd writer, in cluster mode.
    #[cfg(feature = "cluster")]
    pub(super) fn etcd(&mut self) -> Option<&mut EtcdStore> {
        match &mut self.store {
            Store::Etcd(e) => Some(e),
            Store::Journal(_) => None,
        }
    }

    /// Applies the batch: journal, dataplane, NAT log; takes back what did
    /// not hold. The caller answers according to the result.
    ///
    /// This is the synchronous path (timers, operator requests, a poisoned
    /// journal, cluster mode): batches still with the journal writer are
    /// completed first (their replies wait in `finished`).
    pub(super) fn settle(&mut self, engine: &mut Engine) -> Settled {
        self.settle_outstanding(engine);
        let mut settled = Settled::default();
        let repaired = self.repair(engine);
        let refused = self.apply_round(engine, repaired, &mut settled);
        if self.revoke_refused(engine, refused, &mut settled) {
            // The take-backs are journaled before anyone is told.
            let mut second = Settled::default();
            self.apply_round(engine, false, &mut second);
        }
        self.natlog.flush();
        self.background_compaction();
        settled.durable = !self.poisoned();
        if settled.durable {
            self.start_compaction(engine);
        }
        settled
    }

    /// One round: the queued events become journal records (committed),
    /// then dataplane changes, then NAT log lines. Returns the mappings the
    /// dataplane refused.
    fn apply_round(
        &mut self,
        engine: &mut Engine,
        repaired: bool,
        settled: &mut Settled,
    ) -> Vec<(Origin, MappingId)> {
        if self.events.is_empty() {
            return Vec::new();
        }
        // The batch's buffer goes back to `events` at the end (no
        // reallocation per batch).
        let mut batch = std::mem::take(&mut self.events);
        let now = now_ms();
        self.records.clear();
        let (with_records, offset) = records_of(&batch, now, &mut self.records);
        // A snapshot written just now already holds this batch.
        if !repaired && !self.commit() {
            settled.not_durable.extend(&with_records);
            let undone = take_back(engine, &mut batch, now);
            self.retry_later(undone, offset);
        }
        let refused = self.install_and_log(&batch);
        batch.clear();
        if self.events.is_empty() {
            self.events = batch;
        }
        refused
    }

    /// In cluster mode, what was taken back is written too (a transaction
    /// that timed out may have committed).
    fn retry_later(&mut self, undone: Vec<Record>, offset: i64) {
        #[cfg(feature = "cluster")]
        if let Store::Etcd(e) = &mut self.store {
            e.retry_later(undone.into_iter().map(|mut r| {
                r.shift(offset);
                r
            }));
        }
        #[cfg(not(feature = "cluster"))]
        let _ = (undone, offset);
    }

    /// Makes the round's records durable; false when they are not.
    fn commit(&mut self) -> bool {
        if self.records.is_empty() {
            return true;
        }
        let writer = match &mut self.store {
            Store::Journal(w) => w,
            #[cfg(feature = "cluster")]
            Store::Etcd(e) => {
                return match e.commit(&self.records, crate::clock::wall_ms()) {
                    Ok(()) => {
                        if self.last_complaint.is_some() {
                            self.healed();
                        }
                        true
                    }
                    Err(ClusterError::Fenced(_)) => false,
                    Err(err) => {
                        self.broken(err.to_string());
                        false
                    }
                };
            }
        };
        // Nothing is with the writer (settle_outstanding ran): the next
        // completion is this commit's.
        let mut records = writer.buffer();
        records.append(&mut self.records);
        writer.commit(records);
        let outcome = writer.wait_done().map_or_else(
            || Err("journal: the writer stopped".to_string()),
            |d| {
                self.metrics
                    .journal_latency
                    .observe(d.latency.as_secs_f64());
                d.outcome
            },
        );
        match outcome {
            Ok(()) => true,
            Err(e) => {
                self.metrics.journal_errors.inc();
                self.broken(e);
                false
            }
        }
    }

    /// A poisoned journal is replaced by a snapshot of the state in memory,
    /// at most once per [`REPAIR_INTERVAL`]. Returns whether it was now.
    fn repair(&mut self, engine: &mut Engine) -> bool {
        #[cfg(feature = "cluster")]
        if let Store::Etcd(_) = &self.store {
            self.repair_etcd();
            return false;
        }
        if !self.poisoned()
            || self
                .last_repair
                .is_some_and(|t| t.elapsed() < REPAIR_INTERVAL)
        {
            return false;
        }
        self.last_repair = Some(Instant::now());
        if self.snapshot_now(engine) {
            tracing::warn!(
                shard = self.index,
                "state directory writable again: state rewritten as a snapshot; answering again"
            );
            self.health.set_ok(self.index);
            self.metrics.state_writable(self.index, true);
            self.last_complaint = None;
            return true;
        }
        false
    }

    /// Cluster mode: writes what failed before (at most once per
    /// [`REPAIR_INTERVAL`], also when no request comes), and says so once
    /// etcd and memory agree again.
    #[cfg(feature = "cluster")]
    fn repair_etcd(&mut self) {
        let Store::Etcd(e) = &mut self.store else {
            return;
        };
        let broken = self.last_complaint.is_some();
        let due = self
            .last_repair
            .is_none_or(|t| t.elapsed() >= REPAIR_INTERVAL);
        if !(broken || e.has_pending()) || !due {
            return;
        }
        self.last_repair = Some(Instant::now());
        if e.commit(&[], crate::clock::wall_ms()).is_ok() && broken {
            self.healed();
        }
    }

    /// etcd takes writes again: readiness and the gauge say so.
    #[cfg(feature = "cluster")]
    fn healed(&mut self) {
        tracing::warn!(shard = self.index, "etcd writable again; answering again");
        self.last_complaint = None;
        self.health.set_ok(self.index);
        self.metrics.state_writable(self.index, true);
    }

    /// Records that the state is not durable: readiness, gauge, and one
    /// log line per [`COMPLAIN_INTERVAL`].
    fn broken(&mut self, reason: String) {
        self.metrics.state_writable(self.index, false);
        if self
            .last_complaint
            .is_none_or(|t| t.elapsed() >= COMPLAIN_INTERVAL)
        {
            self.last_complaint = Some(Instant::now());
            tracing::error!(
                shard = self.index,
                "{reason}; requests that need a state change are answered NO_RESOURCES until it can be written"
            );
        }
        self.health.set_broken(self.index, reason);
    }
}

/// Appends the records of `batch`'s events to `out`, in wall time (see
/// clock.rs); returns the origins whose events made a record, and the
/// wall-clock offset used.
fn records_of(batch: &[(Origin, Event)], now: u64, out: &mut Vec<Record>) -> (Origins, i64) {
    let mut with_records = Origins::default();
    let first = out.len();
    for (origin, event) in batch {
        let before = out.len();
        Record::from_event(event, now, out);
        if out.len() > before {
            with_records.insert(*origin);
        }
    }
    let offset = crate::clock::wall_offset_ms();
    if offset != 0 {
        out[first..].iter_mut().for_each(|r| r.shift(offset));
    }
    (with_records, offset)
}

/// The journal did not take the batch, so what a client or operator asked
/// for in it is undone: mappings it created are taken back, mappings it
/// deleted are put back, and none of that reaches the dataplane or the NAT
/// log (nothing was promised; the answer is NO_RESOURCES or 503). What time
/// did (expiry) and what the operator moved (drain) stays as it is in
/// memory; the next snapshot makes it durable. Returns the records that
/// say what was undone.
fn take_back(engine: &mut Engine, batch: &mut Vec<(Origin, Event)>, now: u64) -> Vec<Record> {
    let mut undone = Vec::new();
    batch.retain(|(_, event)| match event {
        Event::MappingCreated(m) => {
            engine.revoke(now, m.id);
            undone.push(Record::Gone(m.key()));
            false
        }
        Event::MappingDeleted {
            mapping,
            reason: DeleteReason::Client | DeleteReason::Operator,
        } => {
            let restored = engine.restore_mapping(now, mapping.clone());
            if restored {
                undone.push(Record::Mapping(mapping.clone()));
            }
            !restored
        }
        _ => true,
    });
    while engine.poll_event().is_some() {}
    undone
}
