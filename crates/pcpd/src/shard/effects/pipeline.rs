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

use pcp_engine::{Engine, Event};
use tokio::sync::Notify;

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

    /// The writer's wake-up, for the task that finishes completed batches.
    pub(in crate::shard) fn wake(&self) -> Option<Arc<Notify>> {
        match &self.store {
            Store::Journal(w) => Some(w.wake.clone()),
            #[cfg(feature = "cluster")]
            Store::Etcd(_) => None,
        }
    }

    /// Whether events wait to be settled.
    pub(in crate::shard) fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The journal writer (not in cluster mode).
    fn writer(&mut self) -> Option<&mut JournalWriter> {
        match &mut self.store {
            Store::Journal(w) => Some(w),
            #[cfg(feature = "cluster")]
            Store::Etcd(_) => None,
        }
    }

    /// Batches handed to the writer and not yet answered.
    pub(in crate::shard) fn in_flight(&self) -> usize {
        self.inflight
            .iter()
            .filter(|p| matches!(p, Pending::Batch { .. }))
            .count()
            + self.finished.len()
    }

    /// Hands the queued events to the journal writer as one batch (the
    /// caller holds the batch's replies until [`Effects::complete`]
    /// returns it). When the journal has grown past its limit, a snapshot
    /// of the state follows it in the writer's queue.
    pub(in crate::shard) fn submit(&mut self, engine: &Engine) {
        let (compacting, max) = (self.compacting, self.journal_max_bytes);
        let batch = std::mem::take(&mut self.events);
        let Store::Journal(writer) = &mut self.store else {
            self.events = batch;
            return;
        };
        let mut records = writer.buffer();
        let (with_records, offset) = records_of(&batch, now_ms(), &mut records);
        writer.commit(records);
        let compact = !compacting && writer.len() > max;
        if compact {
            // Every change made so far is in a batch before it in the
            // queue; if one of them fails, the writer skips the snapshot.
            let state = super::super::restore::state_records(engine, offset);
            writer.compact(crate::clock::wall_ms(), state);
        }
        self.inflight.push_back(Pending::Batch {
            batch,
            with_records,
        });
        if compact {
            self.inflight.push_back(Pending::Snapshot);
            self.compacting = true;
        }
    }

    /// Finishes the oldest job the writer has completed; with `wait`,
    /// waits for it. `None`: nothing (more) to finish.
    pub(in crate::shard) fn complete(
        &mut self,
        engine: &mut Engine,
        wait: bool,
    ) -> Option<Completed> {
        if let Some(settled) = self.finished.pop_front() {
            return Some(Completed::Batch(settled));
        }
        let writer = self.writer()?;
        let done = if wait {
            writer.wait_done()?
        } else {
            writer.try_done()?
        };
        Some(self.finish(engine, done))
    }

    /// Completes everything the writer holds, keeping the batches'
    /// outcomes for [`Effects::complete`] (the synchronous path waits
    /// for the writer this way before it uses it).
    pub(super) fn settle_outstanding(&mut self, engine: &mut Engine) {
        loop {
            let Some(writer) = self.writer() else {
                return;
            };
            let Some(done) = writer.wait_done() else {
                return;
            };
            if let Completed::Batch(settled) = self.finish(engine, done) {
                self.finished.push_back(settled);
            }
        }
    }

    /// One completion: the job at the head of the queue.
    fn finish(&mut self, engine: &mut Engine, done: Done) -> Completed {
        let Some(job) = self.inflight.pop_front() else {
            tracing::error!(
                shard = self.index,
                seq = done.seq,
                "journal writer completed a job nobody waits for"
            );
            return Completed::Other;
        };
        let (mut batch, with_records) = match job {
            Pending::Snapshot => {
                self.compacting = false;
                match done.outcome {
                    Ok(()) => {
                        tracing::info!(shard = self.index, "journal compacted into a snapshot");
                        // An earlier compaction that failed said so: the
                        // state is durable again.
                        if self.last_complaint.take().is_some() && !done.poisoned {
                            self.health.set_ok(self.index);
                            self.metrics.state_writable(self.index, true);
                        }
                    }
                    // A commit before it failed: that failure is reported.
                    Err(_) if done.poisoned => {}
                    Err(e) => {
                        self.metrics.journal_errors.inc();
                        self.broken(e);
                    }
                }
                return Completed::Other;
            }
            Pending::Batch {
                batch,
                with_records,
            } => (batch, with_records),
        };
        let mut settled = Settled::default();
        let now = now_ms();
        self.metrics
            .journal_latency
            .observe(done.latency.as_secs_f64());
        if let Err(e) = done.outcome {
            self.metrics.journal_errors.inc();
            self.broken(e);
            settled.not_durable.extend(&with_records);
            take_back(engine, &mut batch, now);
        }
        let refused = self.install_and_log(&batch);
        // The take-backs are journaled with the next batch.
        self.revoke_refused(engine, refused, &mut settled);
        self.natlog.flush();
        settled.durable = !done.poisoned;
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
    //! its batch and every batch after it.
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use pcp_store::Faults;
    use pcp_wire::ResultCode;

    use super::super::super::control::tests::{dir, map, state};
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
}
