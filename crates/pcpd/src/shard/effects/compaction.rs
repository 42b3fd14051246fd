//! Journal compaction: once the journal passes `journal_max_mib`, the
//! shard's state is written as a snapshot and the journal starts again
//! (pcp-store's `rotation.rs`, the writer's `compact`).
//!
//! The state is handed over in slices of [`SLICE`] records, one slice per
//! turn of the shard's task loop (`shard::slice_loop`), so receiving and
//! answering go on between them: taking the state of a shard with half a
//! million mappings at once held every request for 30-50 ms (issue 15
//! item 2). A slice is taken only when no events wait to be submitted, so
//! every change a slice holds is in a batch queued before the slices'
//! end, and the writer abandons the snapshot if one of those fails.
//!
//! After a failed compaction the next one takes the state whole: the
//! writer may then have to write it synchronously (the previous rotation
//! not completed), which a fuzzy snapshot cannot be.

// Without the cluster feature the store has one kind.
#![cfg_attr(not(feature = "cluster"), allow(irrefutable_let_patterns))]

use std::time::{Duration, Instant};

use pcp_engine::{Engine, StateCursor};

use super::super::restore::{record_of, state_records};
use super::super::writer::{Done, JournalWriter};
use super::pipeline::Pending;
use super::{Effects, Store};
use crate::clock::{wall_ms, wall_offset_ms};

/// Records per slice: a few tenths of a millisecond of the shard's time.
const SLICE: usize = 4096;

/// A compaction's state being handed over in slices.
pub(in crate::shard) struct Slicing {
    cursor: StateCursor,
    records: usize,
    slices: u32,
    started: Instant,
    /// The shard's CPU time spent on slices, and the longest slice's
    /// (CPU time: on a busy machine a slice's wall time also counts the
    /// shard thread's waits to be scheduled).
    busy: Duration,
    longest: Duration,
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

impl Effects {
    /// Starts a compaction when the journal has grown past its limit and
    /// none is under way: not while the last one's state is handed over,
    /// nor while its snapshot is written (the writer would wait for it,
    /// and every commit behind it).
    pub(super) fn start_compaction(&mut self, engine: &Engine) {
        let Store::Journal(writer) = &mut self.store else {
            return;
        };
        let busy = self.compacting || self.slicing.is_some() || writer.snapshot_writing();
        if busy || writer.len() <= self.journal_max_bytes {
            return;
        }
        if self.whole_next {
            let started = Instant::now();
            let state = state_records(engine, wall_offset_ms());
            tracing::info!(
                shard = self.index,
                records = state.len(),
                ms = started.elapsed().as_millis() as u64,
                "journal compaction: state taken whole, since the last compaction failed"
            );
            writer.compact(wall_ms(), state, false);
        } else {
            writer.compact(wall_ms(), Vec::new(), true);
            self.slicing = Some(Slicing {
                cursor: engine.state_cursor(),
                records: 0,
                slices: 0,
                started: Instant::now(),
                busy: Duration::ZERO,
                longest: Duration::ZERO,
            });
            self.slicer.notify_one();
        }
        self.inflight.push_back(Pending::Snapshot);
        self.compacting = true;
    }

    /// The wake-up of the task that takes the slices.
    pub(in crate::shard) fn slicer(&self) -> std::rc::Rc<tokio::sync::Notify> {
        self.slicer.clone()
    }

    /// Hands the writer the next slice of the state under way; false when
    /// no compaction is being sliced (any more).
    pub(in crate::shard) fn take_slice(&mut self, engine: &Engine) -> bool {
        let (Some(s), Store::Journal(writer)) = (&mut self.slicing, &mut self.store) else {
            self.slicing = None;
            return false;
        };
        if !self.events.is_empty() {
            // Their batch goes to the writer first.
            return true;
        }
        let started = thread_cpu();
        let mut records = Vec::with_capacity(SLICE + 16);
        let more = engine.state_slice(&mut s.cursor, SLICE, |item| records.push(record_of(item)));
        let offset = wall_offset_ms();
        if offset != 0 {
            records.iter_mut().for_each(|r| r.shift(offset));
        }
        s.records += records.len();
        s.slices += 1;
        writer.slice(records, !more);
        let took = thread_cpu().saturating_sub(started);
        s.busy += took;
        s.longest = s.longest.max(took);
        if !more {
            tracing::info!(
                shard = self.index,
                records = s.records,
                slices = s.slices,
                cpu_ms = s.busy.as_millis() as u64,
                longest_slice_cpu_us = s.longest.as_micros() as u64,
                ms = s.started.elapsed().as_millis() as u64,
                "journal compaction: state handed over in slices (the snapshot is written beside the journal)"
            );
            self.slicing = None;
        }
        more
    }

    /// A compaction's snapshot written beside the journal ended: a failure
    /// is reported as a failed synchronous compaction is (not ready, the
    /// gauge, one log line per interval); a success clears that.
    pub(super) fn background_compaction(&mut self) {
        let Some(ended) = self.writer().and_then(JournalWriter::take_compacted) else {
            return;
        };
        match ended {
            Ok(()) => {
                self.whole_next = false;
                if !self.poisoned() && self.last_complaint.take().is_some() {
                    self.health.set_ok(self.index);
                    self.metrics.state_writable(self.index, true);
                }
            }
            Err(e) => {
                self.whole_next = true;
                self.metrics.journal_errors.inc();
                self.broken(e);
            }
        }
    }

    /// The writer took the compaction job: the snapshot is being written
    /// beside the journal, or was written synchronously, or not at all.
    pub(super) fn snapshot_done(&mut self, done: Done) {
        self.compacting = false;
        match done.outcome {
            Ok(()) => {
                tracing::debug!(
                    shard = self.index,
                    "journal compaction under way (the snapshot is written beside the journal)"
                );
                // An earlier compaction that failed said so: the
                // state is durable again.
                if self.last_complaint.take().is_some() && !done.poisoned {
                    self.health.set_ok(self.index);
                    self.metrics.state_writable(self.index, true);
                }
            }
            Err(e) => {
                // No slice goes to a compaction the writer refused.
                self.slicing = None;
                self.whole_next = true;
                // A commit before it failed: that failure is reported.
                if !done.poisoned {
                    self.metrics.journal_errors.inc();
                    self.broken(e);
                }
            }
        }
    }

    /// Replaces journal and snapshot with a snapshot of the engine's state
    /// taken whole, and waits for it (the way out of a poisoned journal,
    /// and after a step of the wall clock). A compaction being sliced is
    /// abandoned.
    pub(in crate::shard) fn snapshot_now(&mut self, engine: &mut Engine) -> bool {
        if matches!(self.store, Store::Journal(_)) {
            self.settle_outstanding(engine);
        }
        let writer = match &mut self.store {
            Store::Journal(w) => w,
            #[cfg(feature = "cluster")]
            Store::Etcd(_) => return true, // each record is its own key in etcd
        };
        self.slicing = None;
        let started = Instant::now();
        let records = state_records(engine, wall_offset_ms());
        writer.repair(wall_ms(), records);
        let outcome = writer.wait_done().map_or_else(
            || Err("snapshot: the writer stopped".to_string()),
            |d| d.outcome,
        );
        if let Err(e) = outcome {
            self.metrics.journal_errors.inc();
            self.broken(e);
            return false;
        }
        self.whole_next = false;
        tracing::info!(
            shard = self.index,
            ms = started.elapsed().as_millis() as u64,
            "journal compacted into a snapshot"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    //! A compaction sliced across batches that change the state meanwhile,
    //! through the real writer and state directory: loaded as after a crash
    //! in the middle of it or after it, the directory holds exactly what
    //! the engine holds.
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::sync::Arc;

    use pcp_store::Faults;
    use pcp_wire::ResultCode;

    use super::super::super::control::tests::{dir, map_from, state};
    use super::super::super::writer::rotation_completed;
    use super::super::super::State;
    use super::super::Origin;

    fn subscriber(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + i)
    }

    /// Submits the batch waiting in the effects and finishes every batch.
    fn submit_all(st: &mut State) {
        st.effects.collect(&mut st.engine, Origin::Reply(0));
        st.effects.submit(&st.engine);
        while st.effects.complete(&mut st.engine, true).is_some() {}
    }

    /// The mappings (key and external port) and blocks the engine holds.
    fn held(st: &State) -> Held {
        let maps = st.engine.mappings();
        let maps = maps.map(|m| (m.key().to_string(), m.external_port));
        let blocks = st.engine.blocks().map(|(_, b, _)| (b.addr, b.first));
        (maps.collect(), blocks.collect())
    }

    /// The same, as a restart would load them from a copy of `dir` taken
    /// now (a crash now).
    fn loaded(dir: &Path) -> Held {
        let copy = dir.with_extension("crash");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for f in std::fs::read_dir(dir).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
        }
        if !copy.join("epoch").exists() {
            pcp_store::write_epoch(&copy, 1).unwrap();
        }
        let state = pcp_store::load(&copy).unwrap();
        let _ = std::fs::remove_dir_all(&copy);
        let maps = state.mappings.values();
        let maps = maps.map(|m| (m.key().to_string(), m.external_port));
        let blocks = state.blocks.values().map(|(_, b, _)| (b.addr, b.first));
        (maps.collect(), blocks.collect())
    }

    type Held = (BTreeSet<(String, u16)>, BTreeSet<(Ipv4Addr, u16)>);

    /// Asserts `loaded` is `held`, naming what differs.
    fn same(loaded: Held, held: Held, when: &str) {
        fn diff<T: Ord + std::fmt::Debug>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> String {
            let lost: Vec<_> = b.difference(a).take(3).collect();
            let extra: Vec<_> = a.difference(b).take(3).collect();
            format!(
                "{} lost {lost:?}, {} extra {extra:?}",
                b.difference(a).count(),
                a.difference(b).count()
            )
        }
        assert!(
            loaded.0 == held.0,
            "{when}: mappings: {}",
            diff(&loaded.0, &held.0)
        );
        assert!(
            loaded.1 == held.1,
            "{when}: blocks: {}",
            diff(&loaded.1, &held.1)
        );
    }

    #[test]
    fn a_compaction_taken_in_slices_while_batches_change_the_state_loses_nothing() {
        let dir = dir("sliced-compaction");
        let (mut st, _) = state(&dir, Arc::new(Faults::default()));
        // 3,000 subscribers with two mappings each: a state of three slices.
        for i in 0..3000 {
            for port in [1000, 1001] {
                let r = map_from(&mut st, subscriber(i), (port, 6), 1, 3600);
                assert_eq!(r, ResultCode::Success);
            }
            if i % 100 == 99 {
                submit_all(&mut st);
            }
        }
        // Any journal is now past the limit: the next batch starts one.
        st.effects.journal_max_bytes = 1;
        let mut i = 0;
        let mut slices = 0;
        let mut crashed_midway = false;
        loop {
            // A batch: a new subscriber and a new mapping of an old one,
            // and old subscribers' mappings deleted (their records move
            // in the table), all between two slices.
            for _ in 0..40 {
                i += 1;
                let new = map_from(&mut st, subscriber(3000 + i), (2000, 17), 1, 3600);
                let more = map_from(&mut st, subscriber(i * 7 % 3000), (3000, 17), 1, 3600);
                let gone = map_from(&mut st, subscriber(i * 13 % 3000), (1000, 6), 1, 0);
                assert_eq!([new, more, gone], [ResultCode::Success; 3]);
            }
            submit_all(&mut st);
            if !st.effects.take_slice(&st.engine) {
                break;
            }
            slices += 1;
            if slices == 2 {
                // A crash in the middle: old snapshot and journal, then
                // the next journal.
                assert!(dir.join("shard-0.journal.next").exists());
                same(loaded(&dir), held(&st), "crash in the middle");
                crashed_midway = true;
            }
        }
        assert!(crashed_midway && slices >= 2, "{slices} slices");
        // The end went through the writer behind the last batch; the
        // snapshot is put in place once written.
        submit_all(&mut st);
        assert!(rotation_completed(&dir), "put in place");
        same(loaded(&dir), held(&st), "crash after it");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
