//! The pipelined path of a batch of requests (journal store only): the
//! batch's records go to the journal writer and the shard goes on
//! receiving; when the writer says they are on disk (or not), the batch is
//! finished exactly as the synchronous path would have: take back what is
//! not durable, then the dataplane, then the NAT log, then the replies.
//!
//! Completions arrive in submission order, so a batch is never answered
//! before an earlier one, and a failed commit poisons the journal for every
//! batch after it (each is refused and taken back in turn). While the
//! journal is poisoned, batches take the synchronous path again
//! (`Effects::settle`), which repairs it with a snapshot from memory once
//! nothing is in flight.

// Without the cluster feature the store has one kind.
#![cfg_attr(not(feature = "cluster"), allow(irrefutable_let_patterns))]

use std::sync::Arc;

use pcp_engine::{Engine, Event, MappingId};
use tokio::sync::Notify;

use super::super::applier::Applied;
use super::super::now_ms;
use super::super::writer::{Done, JournalWriter};
use super::{records_of, take_back, Effects, Origin, Origins, Settled, Store};

/// A job the writer has not completed yet.
pub(in crate::shard) enum Pending {
    /// A batch of requests: its events (and who waits for each), and the
    /// origins whose events made records.
    Batch {
        batch: Vec<(Origin, Event)>,
        with_records: Origins,
    },
    /// A compaction snapshot.
    Snapshot,
}

/// A durable batch whose dataplane changes are being applied.
pub(in crate::shard) struct Applying {
    batch: Vec<(Origin, Event)>,
    /// Per change handed to the applier: the mapping an upsert makes real
    /// (none: nothing was handed over, it only waits for the batches
    /// before it).
    origins: Vec<Option<(Origin, MappingId)>>,
    settled: Settled,
}

/// What [`Effects::complete`] finished.
pub(in crate::shard) enum Completed {
    /// A batch of requests: answer its held replies by this outcome.
    Batch(Settled),
    /// Housekeeping (a snapshot): nobody waits.
    Other,
}

impl Effects {
    /// Whether a batch of requests may be handed to the journal writer
    /// and answered later: the journal store, not poisoned.
    pub(in crate::shard) fn pipelined(&self) -> bool {
        matches!(&self.store, Store::Journal(w) if !w.poisoned())
    }

    /// The writer's and applier's wake-up, for the task that finishes
    /// completed batches.
    pub(in crate::shard) fn wake(&self) -> Option<Arc<Notify>> {
        match &self.store {
            Store::Journal(w) => Some(w.wake.clone()),
            #[cfg(feature = "cluster")]
            Store::Etcd(_) => None,
        }
    }

    /// Whether the dataplane waits on the kernel (from a thread of its
    /// own): batches are then answered later, and more may be held.
    pub(in crate::shard) fn dataplane_waits(&self) -> bool {
        self.applier.threaded()
    }

    /// Whether events wait to be settled.
    pub(in crate::shard) fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The journal writer (not in cluster mode).
    pub(super) fn writer(&mut self) -> Option<&mut JournalWriter> {
        match &mut self.store {
            Store::Journal(w) => Some(w),
            #[cfg(feature = "cluster")]
            Store::Etcd(_) => None,
        }
    }

    /// Batches handed to the writer or the applier and not yet answered.
    pub(in crate::shard) fn in_flight(&self) -> usize {
        self.inflight
            .iter()
            .filter(|p| matches!(p, Pending::Batch { .. }))
            .count()
            + self.applying.len()
            + self.finished.len()
    }

    /// Hands the queued events to the journal writer as one batch (the
    /// caller holds the batch's replies until [`Effects::complete`]
    /// returns it). When the journal has grown past its limit, a
    /// compaction follows it in the writer's queue (`compaction.rs`).
    ///
    /// A batch with nothing to write (renewals within the stored expiry,
    /// refusals, queries) skips the writer when no batch before it waits
    /// there: it goes straight to the dataplane, behind the durable batches
    /// already there, and is answered as soon as those are.
    pub(in crate::shard) fn submit(&mut self, engine: &Engine) {
        let batch = std::mem::take(&mut self.events);
        let writing = self
            .inflight
            .iter()
            .any(|p| matches!(p, Pending::Batch { .. }));
        let Store::Journal(writer) = &mut self.store else {
            self.events = batch;
            return;
        };
        let mut records = writer.buffer();
        let (with_records, _) = records_of(&batch, now_ms(), &mut records);
        if records.is_empty() && !writing {
            writer.recycle(records);
            let settled = Settled {
                durable: !writer.poisoned(),
                ..Settled::default()
            };
            self.hand_to_applier(batch, settled);
            return;
        }
        writer.commit(records);
        self.inflight.push_back(Pending::Batch {
            batch,
            with_records,
        });
        self.start_compaction(engine);
    }

    /// Finishes the oldest job that is complete: a batch once its records
    /// are durable and its dataplane changes applied, in submission order;
    /// with `wait`, waits for it. `None`: nothing (more) to finish.
    pub(in crate::shard) fn complete(
        &mut self,
        engine: &mut Engine,
        wait: bool,
    ) -> Option<Completed> {
        loop {
            if let Some(settled) = self.finished.pop_front() {
                return Some(Completed::Batch(settled));
            }
            // What is durable goes on to the applier at once, so batches
            // that queue behind a slow transaction share the next one.
            while let Some(done) = self.writer().and_then(JournalWriter::try_done) {
                if let Some(other) = self.durable_done(engine, done) {
                    return Some(other);
                }
            }
            if let Some(submitted) = self.applying.front().map(|h| !h.origins.is_empty()) {
                let applied = match (submitted, wait) {
                    (false, _) => None,
                    (true, false) => self.applier.try_done(),
                    (true, true) => self.applier.wait_done(),
                };
                if applied.is_some() || !submitted {
                    let head = self.applying.pop_front()?;
                    return Some(self.applied(engine, head, applied));
                }
                return None;
            }
            if !wait {
                return None;
            }
            let done = self.writer()?.wait_done()?;
            if let Some(other) = self.durable_done(engine, done) {
                return Some(other);
            }
        }
    }

    /// Completes everything the writer and the applier hold, keeping the
    /// batches' outcomes for [`Effects::complete`] (the synchronous path
    /// waits for them this way before it uses them).
    pub(super) fn settle_outstanding(&mut self, engine: &mut Engine) {
        // `complete` hands out what is already finished first: set those
        // aside so the loop reaches the writer and the applier.
        let mut finished = std::mem::take(&mut self.finished);
        while let Some(c) = self.complete(engine, true) {
            if let Completed::Batch(settled) = c {
                finished.push_back(settled);
            }
        }
        self.finished = finished;
    }

    /// A job the writer completed: a snapshot is done with (`Some`); a
    /// batch is taken back where not durable, and its dataplane changes go
    /// to the applier (`None`: it continues in `applying`).
    fn durable_done(&mut self, engine: &mut Engine, done: Done) -> Option<Completed> {
        self.background_compaction();
        let Some(job) = self.inflight.pop_front() else {
            tracing::error!(
                shard = self.index,
                seq = done.seq,
                "journal writer completed a job nobody waits for"
            );
            return Some(Completed::Other);
        };
        let (mut batch, with_records) = match job {
            Pending::Snapshot => {
                self.snapshot_done(done);
                return Some(Completed::Other);
            }
            Pending::Batch {
                batch,
                with_records,
            } => (batch, with_records),
        };
        let mut settled = Settled::default();
        self.metrics
            .journal_latency
            .observe(done.latency.as_secs_f64());
        if let Err(e) = done.outcome {
            self.metrics.journal_errors.inc();
            self.broken(e);
            settled.not_durable.extend(&with_records);
            take_back(engine, &mut batch, now_ms());
        }
        settled.durable = !done.poisoned;
        self.hand_to_applier(batch, settled);
        None
    }

    /// Hands a durable batch's dataplane changes to the applier; it waits
    /// in `applying` until they are applied.
    fn hand_to_applier(&mut self, batch: Vec<(Origin, Event)>, settled: Settled) {
        let (changes, origins) = self.plan(&batch);
        if !changes.is_empty() {
            self.applier.submit(changes);
        }
        self.applying.push_back(Applying {
            batch,
            origins,
            settled,
        });
    }

    /// A batch whose changes are applied: mappings the dataplane refused
    /// are taken back (journaled with the next batch), then the NAT log.
    fn applied(
        &mut self,
        engine: &mut Engine,
        job: Applying,
        applied: Option<Applied>,
    ) -> Completed {
        let Applying {
            mut batch,
            origins,
            mut settled,
            ..
        } = job;
        let refused = match applied {
            Some(a) => self.refused_of(a, &origins),
            None => Vec::new(),
        };
        self.log(&batch);
        self.revoke_refused(engine, refused, &mut settled);
        self.natlog.flush();
        batch.clear();
        if self.events.is_empty() && self.events.capacity() < batch.capacity() {
            self.events = batch;
        }
        Completed::Batch(settled)
    }
}

#[cfg(test)]
mod tests {
    //! The pipeline against pcp-store's fault seam: a slow fdatasync does
    //! not hold the shard, nothing is released before its own commit, one
    //! fdatasync covers what queued meanwhile, and a failed commit refuses
    //! its batch and every batch after it. Then the same for a dataplane
    //! that waits (the applier thread): a slow transaction holds only its
    //! own replies, and a refused mapping is taken back.
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use pcp_dataplane::{ApplyError, Change, Dataplane, Entry, Key};
    use pcp_store::Faults;
    use pcp_wire::ResultCode;

    use super::super::super::control::tests::{dir, map, state, state_with};
    use super::super::super::State;
    use super::{Completed, Origin};

    /// A MAP request for internal port `port` from 127.0.0.1, engine only
    /// (its events wait in the effects, from reply slot `slot`).
    fn request(st: &mut State, port: u16, slot: usize) {
        assert_eq!(map(st, port, 17, 9), ResultCode::Success);
        st.effects.collect(&mut st.engine, Origin::Reply(slot));
    }

    fn batch(c: Option<Completed>) -> super::Settled {
        match c {
            Some(Completed::Batch(s)) => s,
            Some(Completed::Other) => panic!("a snapshot, not a batch"),
            None => panic!("nothing completed"),
        }
    }

    #[test]
    fn a_slow_fdatasync_holds_only_its_own_replies_and_one_covers_what_queued() {
        let faults = Arc::new(Faults::default());
        let (mut st, _) = state(&dir("pipeline-slow"), faults.clone());
        assert!(st.effects.pipelined());
        let syncs_before = faults.syncs();
        faults.slow_sync(400);
        let started = Instant::now();
        request(&mut st, 1000, 0);
        st.effects.submit(&st.engine);
        // The shard goes on: a second and a third batch while the first
        // commit sleeps in fdatasync.
        std::thread::sleep(Duration::from_millis(50));
        request(&mut st, 1001, 0);
        st.effects.submit(&st.engine);
        request(&mut st, 1002, 0);
        st.effects.submit(&st.engine);
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "submitting waited for the disk: {:?}",
            started.elapsed()
        );
        assert_eq!(st.effects.in_flight(), 3);
        // Nothing is released before its commit is done.
        assert!(st.effects.complete(&mut st.engine, false).is_none());
        // In order, each durable; the second and third share one fdatasync.
        for _ in 0..3 {
            let s = batch(st.effects.complete(&mut st.engine, true));
            assert!(s.durable);
            assert_eq!(s.refusal(Origin::Reply(0)), None);
        }
        assert!(started.elapsed() >= Duration::from_millis(400));
        // One fdatasync for the first batch, one for the two queued behind
        // it (one in all if the writer saw all three at once).
        let syncs = faults.syncs() - syncs_before;
        assert!(syncs <= 2, "{syncs} fdatasyncs for 3 batches");
        assert!(st.effects.complete(&mut st.engine, false).is_none());
        assert_eq!(st.engine.mapping_count(), 3);
    }

    #[test]
    fn a_failed_commit_refuses_its_batch_and_every_batch_behind_it() {
        let faults = Arc::new(Faults::default());
        let (mut st, _) = state(&dir("pipeline-fail"), faults.clone());
        faults.slow_sync(200);
        faults.fail_syncs(1);
        request(&mut st, 2000, 0);
        st.effects.submit(&st.engine);
        request(&mut st, 2001, 1);
        st.effects.submit(&st.engine);
        for slot in 0..2 {
            let s = batch(st.effects.complete(&mut st.engine, true));
            assert!(!s.durable);
            assert_eq!(
                s.refusal(Origin::Reply(slot)),
                Some(ResultCode::NoResources)
            );
        }
        // Both creations were taken back (RFC 6887 §7.4: nothing the client
        // was not told about survives), and batches take the synchronous
        // path until a snapshot from memory replaces the journal.
        assert_eq!(st.engine.mapping_count(), 0);
        assert!(!st.effects.pipelined());
        assert!(st.effects.durable(&mut st.engine));
        assert!(st.effects.pipelined());
    }
    /// A dataplane that waits like the kernel does on a delete (so it gets
    /// a thread of its own), counts its transactions and can refuse.
    struct Slow {
        delay: Duration,
        transactions: Arc<AtomicUsize>,
        changes: Arc<AtomicUsize>,
        refuse: Arc<AtomicBool>,
    }

    impl Dataplane for Slow {
        fn apply(&mut self, changes: &[Change]) -> Vec<Result<(), ApplyError>> {
            std::thread::sleep(self.delay);
            self.transactions.fetch_add(1, Ordering::SeqCst);
            self.changes.fetch_add(changes.len(), Ordering::SeqCst);
            let refuse = self.refuse.load(Ordering::SeqCst);
            changes
                .iter()
                .map(|_| match refuse {
                    true => Err(ApplyError::Refused("test".into())),
                    false => Ok(()),
                })
                .collect()
        }
        fn installed(&self) -> Vec<(Key, Option<Entry>)> {
            Vec::new()
        }
        fn name(&self) -> &'static str {
            "slow"
        }
    }

    type Counters = (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicBool>);

    /// A shard state whose dataplane takes `delay_ms` per transaction.
    fn slow(name: &str, delay_ms: u64) -> (State, Counters) {
        let (transactions, changes) = (Arc::default(), Arc::default());
        let refuse = Arc::new(AtomicBool::new(false));
        let dp = Slow {
            delay: Duration::from_millis(delay_ms),
            transactions: Arc::clone(&transactions),
            changes: Arc::clone(&changes),
            refuse: Arc::clone(&refuse),
        };
        let (st, _) = state_with(&dir(name), Arc::new(Faults::default()), Box::new(dp));
        (st, (transactions, changes, refuse))
    }

    #[test]
    fn a_slow_dataplane_holds_only_its_own_replies_and_one_transaction_covers_what_queued() {
        let (mut st, (transactions, changes, _)) = slow("applier-slow", 400);
        let started = Instant::now();
        request(&mut st, 3000, 0);
        st.effects.submit(&st.engine);
        // Once durable, the first batch goes to the dataplane thread;
        // finishing what is complete never waits for it.
        while st.effects.applying.is_empty() {
            assert!(st.effects.complete(&mut st.engine, false).is_none());
            std::thread::sleep(Duration::from_millis(5));
        }
        request(&mut st, 3001, 1);
        st.effects.submit(&st.engine);
        request(&mut st, 3002, 2);
        st.effects.submit(&st.engine);
        // Both become durable and queue behind the first transaction.
        while st.effects.applying.len() < 3 {
            assert!(st.effects.complete(&mut st.engine, false).is_none());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "the shard waited for the dataplane: {:?}",
            started.elapsed()
        );
        assert_eq!(st.effects.in_flight(), 3);
        // In submission order, each answered once its change is applied.
        for slot in 0..3 {
            let s = batch(st.effects.complete(&mut st.engine, true));
            assert!(s.durable);
            assert_eq!(s.refusal(Origin::Reply(slot)), None);
            assert!(started.elapsed() >= Duration::from_millis(400));
        }
        assert!(st.effects.complete(&mut st.engine, false).is_none());
        // The two batches that queued behind the first share a transaction.
        let n = transactions.load(Ordering::SeqCst);
        assert_eq!(n, 2, "{n} transactions for 3 batches");
        // The subscriber's port block with the first mapping, then one each.
        assert_eq!(changes.load(Ordering::SeqCst), 4);
        assert_eq!(st.engine.mapping_count(), 3);
    }

    #[test]
    fn a_mapping_the_dataplane_refuses_is_taken_back_and_answered_network_failure() {
        let (mut st, (_, _, refuse)) = slow("applier-refuse", 20);
        refuse.store(true, Ordering::SeqCst);
        request(&mut st, 4000, 7);
        st.effects.submit(&st.engine);
        let s = batch(st.effects.complete(&mut st.engine, true));
        // RFC 6887 §7.4: NETWORK_FAILURE when the NAT could not be set up.
        assert_eq!(
            s.refusal(Origin::Reply(7)),
            Some(ResultCode::NetworkFailure)
        );
        assert_eq!(st.engine.mapping_count(), 0);
        // The take-back is journaled with the next batch.
        refuse.store(false, Ordering::SeqCst);
        assert!(st.effects.has_events());
        st.effects.submit(&st.engine);
        assert!(batch(st.effects.complete(&mut st.engine, true)).durable);
    }
}
